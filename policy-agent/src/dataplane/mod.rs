//! Loading, attaching, pinning and taking over the dataplane.
//!
//! Pin layout under the pin directory:
//! - `maps/<NAME>`: every map (reused as-is when the dataplane is loaded again);
//! - `links/tc-<ifname>-<ingress|egress>`: the program of the TC filter on a
//!   host-side veth (legacy TC, see `veth`; a TCX link from earlier versions);
//! - `links/cgroup-<id>-<ingress|egress>`: cgroup_skb links;
//! - `links/underlay-<ifname>`: the underlay program's TCX link.
//!
//! A pinned link, and a TC filter, keep their program attached after the
//! loading process exits (fail-static). Loading again reuses the pinned maps
//! and swaps the new programs into the pinned links with `BPF_LINK_UPDATE`
//! and into the filters by replacing them in place, so the hooks never run
//! without a program.

use std::{
    fs,
    net::Ipv4Addr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
    },
};
use log::{info, warn};
use policy_common::maps::{FLOW_CACHE_SETS, FLOW_CACHE6_SETS, flow_cache_stat, names, programs};

mod config;
mod kernel;
mod maps;
mod tc;
mod upgrade;
mod veth;

pub use config::{
    Capacities, DataplaneConfig, DenyAction, DenySettings, EventSettings, OverlayNetwork,
    kernel_settings,
};
pub use maps::{EventStats, FlowCacheStats, Maps, addr_from_key, addr_key, limits_clock_ns};

use crate::{DataplaneError, EBPF_OBJECT, bpffs, sys};

/// Which way the traffic a TC program sees flows, from the container's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// TC ingress of the host-side veth / cgroup egress.
    FromContainer,
    /// TC egress of the host-side veth / cgroup ingress.
    ToContainer,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::FromContainer, Direction::ToContainer];

    fn tc_program(self) -> &'static str {
        match self {
            Direction::FromContainer => programs::TC_FROM_CONTAINER,
            Direction::ToContainer => programs::TC_TO_CONTAINER,
        }
    }

    fn cgroup_program(self) -> &'static str {
        match self {
            Direction::FromContainer => programs::CGROUP_EGRESS,
            Direction::ToContainer => programs::CGROUP_INGRESS,
        }
    }

    fn tc_attach_type(self) -> TcAttachType {
        match self {
            Direction::FromContainer => TcAttachType::Ingress,
            Direction::ToContainer => TcAttachType::Egress,
        }
    }

    /// The hook name as it appears in link pin names.
    fn tc_hook(self) -> &'static str {
        match self {
            Direction::FromContainer => "ingress",
            Direction::ToContainer => "egress",
        }
    }

    fn cgroup_hook(self) -> &'static str {
        match self {
            Direction::FromContainer => "egress",
            Direction::ToContainer => "ingress",
        }
    }
}

/// A flow cache's size: `sets` for each possible CPU.
fn flow_cache_entries(sets: u32) -> Result<u32, DataplaneError> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(path, e)| DataplaneError::io("cannot read", Path::new(path))(e))?;
    Ok(u32::try_from(cpus).unwrap_or(u32::MAX / sets) * sets)
}

fn ignore_absent(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) }
}

/// Pin name prefix of the underlay program's link.
const UNDERLAY_PIN: &str = "underlay-";

/// The loaded dataplane.
pub struct Dataplane {
    ebpf: Ebpf,
    maps: Maps,
    pin_dir: PathBuf,
    flow_events: Option<RingBuf<MapData>>,
    /// The host addresses NetIn port mappings listen on (those of the
    /// interfaces given to `attach_netin`).
    netin_addrs: Vec<Ipv4Addr>,
}

impl Dataplane {
    /// Loads the programs, creating the maps or reopening the pinned ones,
    /// and moves every pinned link over to the newly loaded programs.
    pub fn open(config: &DataplaneConfig) -> Result<Self, DataplaneError> {
        let pin_dir = config.pin_dir.clone();
        bpffs::prepare(&pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(DataplaneError::io("cannot create", dir))?;
        }
        let caps = &config.capacities;
        let sizes = [
            (names::ENDPOINTS, caps.endpoints),
            (names::VETHS, caps.veths),
            (names::CGROUPS, caps.cgroups),
            (names::POLICIES, caps.policies),
            (names::PORT_SETS, caps.port_sets),
            (names::PORT_SETS_WIDE, caps.port_sets_wide),
            (names::CONNTRACK, caps.conntrack),
            (names::FRAGMENTS, caps.fragments),
            // The IPv6 twins, sized like the IPv4 maps.
            (names::ENDPOINTS6, caps.endpoints),
            (names::VETHS6, caps.veths),
            (names::CONNTRACK6, caps.conntrack),
            (names::FRAGMENTS6, caps.fragments),
            (names::FLOW_EVENTS, caps.flow_events),
            (names::EVENT_LIMITS, caps.event_limits),
            (names::POLICY_STATS, caps.policy_stats),
        ];
        let mut loader = EbpfLoader::new();
        for (name, size) in sizes {
            loader.map_max_entries(name, size);
        }
        // A pinned slots array is reused at the size it has (aya checks
        // indexes against the size given here); a new one is sized for the
        // overlay (one unused slot without one: arrays cannot be empty), or
        // like VETHS.
        let pinned_size = |name: &str| {
            MapData::from_pin(maps_dir.join(name)).ok()?.info().ok().map(|i| i.max_entries())
        };
        let slots = pinned_size(names::ENDPOINT_SLOTS)
            .unwrap_or_else(|| config.overlay.map_or(1, |o| o.slots()));
        loader.map_max_entries(names::ENDPOINT_SLOTS, slots);
        let veth_slots = pinned_size(names::VETH_SLOTS).unwrap_or(caps.veths.max(1));
        loader.map_max_entries(names::VETH_SLOTS, veth_slots);
        // A flow cache has a region per possible CPU; one pinned for
        // another count (or set size) is replaced: it only caches. So is
        // a statistics array from a version that counted less.
        for (name, sets) in
            [(names::FLOW_CACHE, FLOW_CACHE_SETS), (names::FLOW_CACHE6, FLOW_CACHE6_SETS)]
        {
            let entries = flow_cache_entries(sets)?;
            if pinned_size(name).is_some_and(|n| n != entries) {
                let pin = maps_dir.join(name);
                fs::remove_file(&pin).map_err(DataplaneError::io("cannot replace", &pin))?;
            }
            loader.map_max_entries(name, entries);
        }
        if pinned_size(names::FLOW_CACHE_STATS).is_some_and(|n| n < flow_cache_stat::COUNT) {
            let pin = maps_dir.join(names::FLOW_CACHE_STATS);
            fs::remove_file(&pin).map_err(DataplaneError::io("cannot replace", &pin))?;
        }
        // A pinned verdict counter array from a version with fewer reasons
        // is replaced (its counts restart): the programs index it by reason.
        if pinned_size(names::VERDICTS).is_some_and(|n| n < policy_common::Reason::COUNT) {
            let pin = maps_dir.join(names::VERDICTS);
            fs::remove_file(&pin).map_err(DataplaneError::io("cannot replace", &pin))?;
            tracing::info!("verdict counters restart: this version counts more reasons");
        }
        // What a version before `CONFIG` kept in single-value arrays, and
        // the pairs of one before `PORT_SETS` (its `POLICIES` unpinned).
        let legacy = upgrade::legacy_config(&maps_dir);
        let whole_pairs = upgrade::take_whole_pairs(&maps_dir)?;
        let per_cpu_counters = upgrade::take_per_cpu_counters(&maps_dir)?;
        for name in names::ALL {
            loader.map_pin_path(name, maps_dir.join(name));
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(|e| DataplaneError::Load(Box::new(e)))?;
        for name in
            [programs::TC_FROM_CONTAINER, programs::TC_TO_CONTAINER, programs::TC_FROM_UNDERLAY]
        {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load().map_err(|e| DataplaneError::LoadProgram { name, source: Box::new(e) })?;
        }
        for name in [programs::CGROUP_EGRESS, programs::CGROUP_INGRESS] {
            let prog: &mut CgroupSkb = program(&mut ebpf, name)?;
            prog.load().map_err(|e| DataplaneError::LoadProgram { name, source: Box::new(e) })?;
        }
        let mut maps = Maps::take(&mut ebpf)?;
        if let Some(values) = legacy {
            // Carried over before the new programs run: the epoch above
            // all (a tracked connection stamped with an epoch the new
            // programs also read would skip its re-check). The old arrays
            // stay referenced by the old programs until their links move.
            maps.set_config(values)?;
            for name in names::LEGACY_CONFIG {
                let pin = maps_dir.join(name);
                fs::remove_file(&pin)
                    .or_else(ignore_absent)
                    .map_err(DataplaneError::io("cannot unpin", &pin))?;
            }
            info!("per-packet settings moved into {}", names::CONFIG);
        }
        if let Some(pairs) = whole_pairs {
            // Before the new programs take over the links: they read the
            // new POLICIES only.
            let count = pairs.len();
            for (key, allowances) in pairs {
                maps.set_pair(key, &allowances)?;
            }
            info!("{} carried over to its compact layout: {count} pairs", names::POLICIES);
        }
        if let Some(counts) = per_cpu_counters {
            let count = counts.len();
            for (policy_id, counters) in counts {
                maps.set_policy_counters(policy_id, counters)?;
            }
            info!(
                "{} carried over to one value for all CPUs: {count} policies",
                names::POLICY_STATS
            );
        }
        maps.set_settings(config.kernel_settings())?;
        maps.set_overlay(config.overlay)?;
        maps.fill_veth_slots()?;
        let flow_events = ebpf
            .take_map(names::FLOW_EVENTS)
            .ok_or(DataplaneError::MissingMap { name: names::FLOW_EVENTS })
            .and_then(|map| {
                RingBuf::try_from(map).map_err(|e| DataplaneError::Map {
                    name: names::FLOW_EVENTS,
                    source: Box::new(e),
                })
            })?;
        let dataplane =
            Self { ebpf, maps, pin_dir, flow_events: Some(flow_events), netin_addrs: Vec::new() };
        dataplane.take_over_links()?;
        Ok(dataplane)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The flow event ring buffer, for one reader (`None` once taken).
    pub fn take_flow_events(&mut self) -> Option<RingBuf<MapData>> {
        self.flow_events.take()
    }

    fn links_dir(&self) -> PathBuf {
        self.pin_dir.join("links")
    }

    /// The typed maps.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// A loaded program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn tc_program(&self, direction: Direction) -> &SchedClassifier {
        let name = direction.tc_program();
        self.ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .unwrap_or_else(|| unreachable!("{name} was loaded in open()"))
    }

    pub fn cgroup_program(&self, direction: Direction) -> &CgroupSkb {
        let name = direction.cgroup_program();
        self.ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .unwrap_or_else(|| unreachable!("{name} was loaded in open()"))
    }

    fn program_for_pin(&self, pin_name: &str) -> Option<&'static str> {
        if pin_name.starts_with(UNDERLAY_PIN) {
            return Some(programs::TC_FROM_UNDERLAY);
        }
        let kind_tc = pin_name.starts_with("tc-");
        let kind_cgroup = pin_name.starts_with("cgroup-");
        let hook = pin_name.rsplit('-').next()?;
        Direction::BOTH.into_iter().find_map(|d| {
            if kind_tc && d.tc_hook() == hook {
                Some(d.tc_program())
            } else if kind_cgroup && d.cgroup_hook() == hook {
                Some(d.cgroup_program())
            } else {
                None
            }
        })
    }

    /// Swaps this load's programs into every pinned link. A link that can no
    /// longer be updated (its interface or cgroup is gone) is unpinned.
    fn take_over_links(&self) -> Result<(), DataplaneError> {
        let links_dir = self.links_dir();
        let entries =
            fs::read_dir(&links_dir).map_err(DataplaneError::io("cannot read", &links_dir))?;
        for entry in entries {
            let entry = entry.map_err(DataplaneError::io("cannot read", &links_dir))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(veth::NEW_PIN_SUFFIX) {
                // A take-over or attach that stopped before its rename.
                remove_pin(&path)?;
                continue;
            }
            if self.take_over_filter(&name, &path)? {
                continue;
            }
            let Some(program) = self.program_for_pin(&name) else {
                warn!("ignoring unknown pin {}", path.display());
                continue;
            };
            let updated = sys::obj_get(&path).and_then(|link| {
                let prog_fd = self.program_fd(program)?;
                sys::link_update(link.as_fd(), prog_fd.as_fd())
            });
            match updated {
                Ok(()) => info!("took over {name} with {program}"),
                Err(e) => {
                    warn!("unpinning stale link {name}: {e}");
                    fs::remove_file(&path).map_err(DataplaneError::io("cannot unpin", &path))?;
                }
            }
        }
        Ok(())
    }

    fn program_fd(&self, name: &str) -> std::io::Result<aya::programs::ProgramFd> {
        let fd = match self.ebpf.program(name) {
            Some(aya::programs::Program::SchedClassifier(p)) => p.fd(),
            Some(aya::programs::Program::CgroupSkb(p)) => p.fd(),
            _ => return Err(std::io::Error::other(format!("program {name} not loaded"))),
        };
        fd.and_then(|fd| fd.try_clone().map_err(Into::into)).map_err(std::io::Error::other)
    }

    fn cgroup_pin(&self, cgroup_id: u64, direction: Direction) -> PathBuf {
        self.links_dir().join(format!("cgroup-{cgroup_id}-{}", direction.cgroup_hook()))
    }

    /// Attaches the underlay program to TC ingress of the interface other
    /// hosts' tunnel packets arrive on (cluster mode), pinned as
    /// `links/underlay-IFNAME`. Idempotent.
    pub fn attach_underlay(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        let pin = self.links_dir().join(format!("{UNDERLAY_PIN}{ifname}"));
        let name = programs::TC_FROM_UNDERLAY;
        if pin.exists() {
            if tcx_link_live(&pin, ifname, TcAttachType::Ingress) {
                return Ok(());
            }
            remove_link_pin(&pin)?;
        }
        self.attach_tcx_pinned(name, ifname, TcAttachType::Ingress, &pin)?;
        Ok(())
    }

    /// Attaches program `name` to `ifname`'s TC hook through TCX and pins
    /// the link at `pin` (replacing what is there).
    fn attach_tcx_pinned(
        &mut self,
        name: &'static str,
        ifname: &str,
        attach_type: TcAttachType,
        pin: &Path,
    ) -> Result<(), DataplaneError> {
        let attach_err = |source: Box<dyn std::error::Error + Send + Sync>| {
            DataplaneError::Attach { program: name, target: ifname.to_owned(), source }
        };
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let id = prog.attach(ifname, attach_type).map_err(|e| attach_err(Box::new(e)))?;
        let link = prog.take_link(id).map_err(|e| attach_err(Box::new(e)))?;
        let link = FdLink::try_from(link).map_err(|e| attach_err(Box::new(e)))?;
        remove_pin(pin)?;
        link.pin(pin).map(drop).map_err(|e| attach_err(Box::new(e)))
    }

    /// NetIn through `ifname` (an uplink of the host): attaches the uplink
    /// program at its ingress and adds its IPv4 addresses to those port
    /// mappings listen on. Returns those addresses.
    pub fn attach_netin(&mut self, ifname: &str) -> Result<Vec<Ipv4Addr>, DataplaneError> {
        if nix_ifindex(ifname).is_none() {
            return Err(DataplaneError::NoInterface { ifname: ifname.to_owned() });
        }
        self.attach_underlay(ifname)?;
        let addrs = interface_addresses(ifname);
        for addr in &addrs {
            if !self.netin_addrs.contains(addr) {
                self.netin_addrs.push(*addr);
            }
        }
        Ok(addrs)
    }

    /// The host addresses NetIn mappings listen on.
    pub fn netin_addresses(&self) -> &[Ipv4Addr] {
        &self.netin_addrs
    }

    /// Attaches both cgroup_skb programs to a cgroup (v2 directory) and pins
    /// the links. Returns the cgroup id (the key of `CGROUPS`).
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<u64, DataplaneError> {
        let cgroup_id = cgroup_id(cgroup)?;
        let file =
            fs::File::open(cgroup).map_err(DataplaneError::io("cannot open cgroup", cgroup))?;
        for direction in Direction::BOTH {
            let pin = self.cgroup_pin(cgroup_id, direction);
            if pin.exists() {
                continue;
            }
            let name = direction.cgroup_program();
            let attach_err =
                |source: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Attach {
                    program: name,
                    target: cgroup.display().to_string(),
                    source,
                };
            let attach_type = match direction {
                Direction::FromContainer => CgroupSkbAttachType::Egress,
                Direction::ToContainer => CgroupSkbAttachType::Ingress,
            };
            let prog: &mut CgroupSkb = program(&mut self.ebpf, name)?;
            // Links are always multi-attach; BPF_LINK_CREATE takes no flags
            // for cgroups (kernel/bpf/cgroup.c, cgroup_bpf_link_attach), so
            // "Single" here means "no flags", not exclusive.
            let id = prog
                .attach(&file, attach_type, CgroupAttachMode::Single)
                .map_err(|e| attach_err(Box::new(e)))?;
            let link = prog.take_link(id).map_err(|e| attach_err(Box::new(e)))?;
            let link = FdLink::try_from(link).map_err(|e| attach_err(Box::new(e)))?;
            link.pin(&pin).map_err(|e| attach_err(Box::new(e)))?;
        }
        Ok(cgroup_id)
    }

    pub fn detach_cgroup(&mut self, cgroup_id: u64) -> Result<(), DataplaneError> {
        for direction in Direction::BOTH {
            remove_link_pin(&self.cgroup_pin(cgroup_id, direction))?;
        }
        Ok(())
    }

    /// The names of the pinned links (what is attached where).
    pub fn attachments(&self) -> Result<Vec<String>, DataplaneError> {
        list_pins(&self.links_dir())
    }

    /// Detaches every program and removes every pin under `pin_dir`
    /// (enforcement stops). Nothing pinned is not an error.
    pub fn remove_all(pin_dir: &Path) -> Result<(), DataplaneError> {
        for sub in ["links", "maps"] {
            let dir = pin_dir.join(sub);
            for name in list_pins(&dir)? {
                if sub == "links" {
                    veth::remove_attachment(&dir.join(name))?;
                } else {
                    remove_pin(&dir.join(name))?;
                }
            }
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(DataplaneError::io("cannot remove", &dir)(e)),
            }
        }
        match fs::remove_dir(pin_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DataplaneError::io("cannot remove", pin_dir)(e)),
        }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DataplaneError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(DataplaneError::MissingProgram { name })
}

/// Whether the TCX link pinned at `pin` is live on `ifname`'s hook (and
/// not left over from an interface of the same name that was deleted).
fn tcx_link_live(pin: &Path, ifname: &str, attach_type: TcAttachType) -> bool {
    let Ok(link) = PinnedLink::from_pin(pin) else { return false };
    let Ok(info) = FdLink::from(link).info() else { return false };
    SchedClassifier::query_tcx(ifname, attach_type)
        .is_ok_and(|(_, progs)| progs.iter().any(|p| p.id() == info.program_id()))
}

/// Detaches the link pinned at `path` (synchronously) and removes the pin.
fn remove_link_pin(path: &Path) -> Result<(), DataplaneError> {
    match sys::obj_get(path) {
        // A link whose device or cgroup is gone cannot be detached: fine.
        Ok(link) => {
            let _ = sys::link_detach(link.as_fd());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(DataplaneError::io("cannot open pinned link", path)(e)),
    }
    remove_pin(path)
}

fn remove_pin(path: &Path) -> Result<(), DataplaneError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DataplaneError::io("cannot unpin", path)(e)),
    }
}

fn list_pins(dir: &Path) -> Result<Vec<String>, DataplaneError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DataplaneError::io("cannot read", dir)(e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// The ifindex of an interface in this network namespace.
/// The MTU of interface `ifname` in this network namespace (asked through
/// a socket of the namespace: `/sys/class/net` shows the namespace sysfs
/// was mounted in).
pub fn interface_mtu(ifname: &str) -> Option<u32> {
    let name = ifname.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: a datagram socket closed below; the ifreq is zeroed and its
    // name NUL-terminated within IFNAMSIZ.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(name) {
            *dst = *src as libc::c_char;
        }
        let ok = libc::ioctl(fd, libc::SIOCGIFMTU as _, &mut req) == 0;
        libc::close(fd);
        ok.then_some(req.ifr_ifru.ifru_mtu as u32)
    }
}

/// The IPv4 addresses of interface `ifname` in this network namespace.
pub fn interface_addresses(ifname: &str) -> Vec<Ipv4Addr> {
    ipv4_addresses(Some(ifname))
}

/// The IPv4 addresses of this network namespace's interfaces (of `ifname`
/// only, if given).
pub fn ipv4_addresses(ifname: Option<&str>) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list freed below; entries are read while
    // it is alive.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut at = list;
        while !at.is_null() {
            let (addr, name) = ((*at).ifa_addr, (*at).ifa_name);
            if !addr.is_null()
                && !name.is_null()
                && i32::from((*addr).sa_family) == libc::AF_INET
                && ifname.is_none_or(|n| std::ffi::CStr::from_ptr(name).to_bytes() == n.as_bytes())
            {
                let sin = &*(addr as *const libc::sockaddr_in);
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            at = (*at).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

pub fn nix_ifindex(ifname: &str) -> Option<u32> {
    let c_name = std::ffi::CString::new(ifname).ok()?;
    // SAFETY: c_name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (index != 0).then_some(index)
}

/// A cgroup v2 directory's id: its inode number (what `bpf_skb_cgroup_id`
/// returns; see kernel/cgroup/cgroup.c, `cgroup_id`).
pub fn cgroup_id(cgroup: &Path) -> Result<u64, DataplaneError> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(fs::metadata(cgroup).map_err(DataplaneError::io("cannot stat cgroup", cgroup))?.ino())
}
