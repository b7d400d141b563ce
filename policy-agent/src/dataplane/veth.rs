//! Host-side veths: both TC programs as legacy TC filters (see [`tc`]),
//! each recorded by pinning the program it runs at
//! `links/tc-IFNAME-HOOK`.
//!
//! That pin says: this pin directory's dataplane put this program at our
//! priority and handle on that hook. The filter there is live (attached,
//! nothing to do) while it runs the pinned program, and ours (ours to
//! replace on a take-over, ours to delete) while it runs the pinned program
//! or carries our program's name: a take-over that stopped between swapping
//! the program and pinning the new one leaves the second. Another tool's
//! filter at another priority or handle is never touched.
//!
//! A veth whose clsact slot another tool's qdisc holds (an `ingress`
//! qdisc: filters there would all run on ingress) is attached through TCX
//! instead, its links pinned at the same names; so are the veths earlier
//! versions attached. Such pins are updated, checked and detached as
//! links.

use std::{
    collections::BTreeSet,
    fs,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use log::{info, warn};

use super::{
    Dataplane, Direction, list_pins, nix_ifindex, remove_link_pin, remove_pin, tc, tcx_link_live,
};
use crate::{DataplaneError, sys};

/// The suffix of a program pinned before it is renamed over its record
/// (bpffs refuses names with a dot).
pub(super) const NEW_PIN_SUFFIX: &str = "-new";

/// What a `tc-*` pin holds.
enum Pinned {
    /// A TCX link (an earlier version's attachment).
    Link,
    /// The program a filter was given, by id.
    Program(u32),
}

fn pinned(pin: &Path) -> Option<Pinned> {
    let fd: OwnedFd = sys::obj_get(pin).ok()?;
    if sys::is_link(fd.as_fd()) {
        return Some(Pinned::Link);
    }
    sys::prog_id(fd.as_fd()).ok().map(Pinned::Program)
}

/// The interface and direction a `tc-IFNAME-HOOK` pin name records.
pub(super) fn parse_tc_pin(name: &str) -> Option<(&str, Direction)> {
    let (ifname, hook) = name.strip_prefix("tc-")?.rsplit_once('-')?;
    Direction::BOTH.into_iter().find(|d| d.tc_hook() == hook).map(|d| (ifname, d))
}

impl Direction {
    fn hook(self) -> tc::Hook {
        match self {
            Direction::FromContainer => tc::Hook::Ingress,
            Direction::ToContainer => tc::Hook::Egress,
        }
    }
}

/// Whether the filter at our slot on the hook for `direction` runs program
/// `id` (live, by the rule above).
fn filter_runs(ifindex: u32, direction: Direction, id: u32) -> bool {
    tc::filter(ifindex, direction.hook()).is_ok_and(|f| f.is_some_and(|f| f.program_id == id))
}

/// The filter at our slot on `ifname`'s hook for `direction`, if it is
/// ours by the rule above (`pinned_id` being the recorded program).
fn our_filter(ifindex: u32, direction: Direction, pinned_id: u32) -> Option<tc::Filter> {
    tc::filter(ifindex, direction.hook())
        .ok()
        .flatten()
        .filter(|f| f.program_id == pinned_id || f.name == direction.tc_program())
}

/// Pins `program` at `pin`, replacing what is there in one step (a rename
/// on the bpffs), so the record never goes missing.
fn pin_program(program: BorrowedFd<'_>, pin: &Path) -> Result<(), DataplaneError> {
    let mut fresh = pin.as_os_str().to_owned();
    fresh.push(NEW_PIN_SUFFIX);
    let fresh = PathBuf::from(fresh);
    remove_pin(&fresh)?;
    sys::obj_pin(program, &fresh).map_err(DataplaneError::io("cannot pin", &fresh))?;
    fs::rename(&fresh, pin).map_err(DataplaneError::io("cannot pin", pin))
}

/// Removes the attachment a `links/` pin records: a TCX link is detached,
/// a filter of ours deleted. Used by teardown.
pub(super) fn remove_attachment(pin: &Path) -> Result<(), DataplaneError> {
    let name = pin.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match (parse_tc_pin(&name), pinned(pin)) {
        (Some((ifname, direction)), Some(Pinned::Program(id))) => {
            delete_our_filter(ifname, direction, id, pin)?;
            remove_pin(pin)
        }
        (_, Some(Pinned::Program(_))) => remove_pin(pin),
        _ => remove_link_pin(pin),
    }
}

/// Where named network namespaces are (`ip netns add`).
const NAMED_NETNS: &str = "/run/netns";

/// Runs `op` with the ifindex of `ifname` in the network namespace where
/// it carries our filter for `direction` (recorded with program
/// `pinned_id`), and returns what it returns; `None` if no namespace has
/// it.
///
/// Pins are seen from every namespace, filters only from their own: the
/// teardown, or a load, may run outside the agent's namespace (a test's,
/// an operator's shell). This namespace is looked at first (where the
/// module's rule of ownership applies); then each named one (`/run/netns`),
/// where only a filter running exactly the recorded program counts as
/// ours. A namespace with no name is found only from inside.
fn in_filters_netns<T: Send>(
    ifname: &str,
    direction: Direction,
    pinned_id: u32,
    op: &(dyn Fn(u32) -> T + Sync),
) -> Option<T> {
    if let Some(ifindex) = nix_ifindex(ifname)
        && our_filter(ifindex, direction, pinned_id).is_some()
    {
        return Some(op(ifindex));
    }
    let named = fs::read_dir(NAMED_NETNS).ok()?;
    for entry in named.flatten() {
        let Ok(netns) = fs::File::open(entry.path()) else { continue };
        let found = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    use std::os::fd::AsRawFd as _;
                    // SAFETY: moves this thread only (it ends with the
                    // scope) into the namespace the open file names.
                    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return None;
                    }
                    let ifindex = nix_ifindex(ifname)?;
                    let filter = tc::filter(ifindex, direction.hook()).ok().flatten()?;
                    (filter.program_id == pinned_id).then(|| op(ifindex))
                })
                .join()
                .ok()
                .flatten()
        });
        if found.is_some() {
            return found;
        }
    }
    None
}

fn delete_our_filter(
    ifname: &str,
    direction: Direction,
    pinned_id: u32,
    pin: &Path,
) -> Result<(), DataplaneError> {
    let delete = |ifindex| tc::delete_filter(ifindex, direction.hook());
    match in_filters_netns(ifname, direction, pinned_id, &delete) {
        Some(deleted) => {
            deleted.map_err(DataplaneError::io("cannot delete the TC filter recorded at", pin))
        }
        None => Ok(()),
    }
}

impl Dataplane {
    /// The veths recorded under `pin_dir` whose programs are no longer
    /// attached while the interface is still there: another tool deleted
    /// the filter or the `clsact` qdisc (`tc qdisc del dev VETH clsact`),
    /// which a TCX link would not have allowed. Only reads, so it needs no
    /// hold on the dataplane; `attach_veth` repairs.
    pub fn detached_veths(pin_dir: &Path) -> BTreeSet<String> {
        let links = pin_dir.join("links");
        let mut detached = BTreeSet::new();
        for name in list_pins(&links).unwrap_or_default() {
            let Some((ifname, direction)) = parse_tc_pin(&name) else { continue };
            let Some(ifindex) = nix_ifindex(ifname) else { continue };
            let pin = links.join(&name);
            let live = match pinned(&pin) {
                Some(Pinned::Program(id)) => filter_runs(ifindex, direction, id),
                Some(Pinned::Link) => tcx_link_live(&pin, ifname, direction.tc_attach_type()),
                // Detached meanwhile.
                None => true,
            };
            if !live {
                detached.insert(ifname.to_owned());
            }
        }
        detached
    }

    pub(super) fn tc_pin(&self, ifname: &str, direction: Direction) -> PathBuf {
        self.links_dir().join(format!("tc-{ifname}-{}", direction.tc_hook()))
    }

    fn tc_prog_fd(&self, direction: Direction) -> Result<BorrowedFd<'_>, DataplaneError> {
        let name = direction.tc_program();
        // Loaded in `open`, so it has a descriptor.
        self.tc_program(direction)
            .fd()
            .map(|fd| fd.as_fd())
            .map_err(|_| DataplaneError::MissingProgram { name })
    }

    /// Attaches both TC programs to a host-side veth (a `clsact` qdisc and
    /// a filter on each hook) and records each by pinning its program.
    /// Idempotent: a direction already attached is left as it is.
    pub fn attach_veth(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        let ifindex = nix_ifindex(ifname)
            .ok_or_else(|| DataplaneError::NoInterface { ifname: ifname.to_owned() })?;
        let mut have_clsact = false;
        for direction in Direction::BOTH {
            let pin = self.tc_pin(ifname, direction);
            match pinned(&pin) {
                Some(Pinned::Link) if tcx_link_live(&pin, ifname, direction.tc_attach_type()) => {
                    continue;
                }
                Some(Pinned::Link) => remove_link_pin(&pin)?,
                Some(Pinned::Program(id)) if filter_runs(ifindex, direction, id) => continue,
                Some(Pinned::Program(_)) | None => {}
            }
            let program = direction.tc_program();
            let attach_err = |e: std::io::Error| DataplaneError::Attach {
                program,
                target: ifname.to_owned(),
                source: Box::new(e),
            };
            if !have_clsact {
                if let tc::Clsact::Taken(kind) = tc::add_clsact(ifindex).map_err(attach_err)? {
                    // Filters here would all run on ingress: TCX instead.
                    warn!("{ifname} has an {kind} qdisc (another tool's): attaching through TCX");
                    return self.attach_veth_tcx(ifname);
                }
                have_clsact = true;
            }
            let fd = self.tc_prog_fd(direction)?;
            tc::set_filter(ifindex, direction.hook(), fd, program).map_err(attach_err)?;
            pin_program(fd, &pin)?;
        }
        Ok(())
    }

    /// Attaches both TC programs to a veth through TCX and pins the links,
    /// for a veth whose clsact slot another tool's qdisc holds.
    fn attach_veth_tcx(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        for direction in Direction::BOTH {
            let pin = self.tc_pin(ifname, direction);
            match pinned(&pin) {
                Some(Pinned::Link) if tcx_link_live(&pin, ifname, direction.tc_attach_type()) => {
                    continue;
                }
                Some(Pinned::Link) => remove_link_pin(&pin)?,
                Some(Pinned::Program(id)) => delete_our_filter(ifname, direction, id, &pin)?,
                None => {}
            }
            self.attach_tcx_pinned(
                direction.tc_program(),
                ifname,
                direction.tc_attach_type(),
                &pin,
            )?;
        }
        Ok(())
    }

    /// Detaches a veth's programs (only filters of ours) and removes their
    /// pins. Missing pins, filters or interfaces are not an error.
    pub fn detach_veth(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        for direction in Direction::BOTH {
            let pin = self.tc_pin(ifname, direction);
            match pinned(&pin) {
                Some(Pinned::Program(id)) => {
                    delete_our_filter(ifname, direction, id, &pin)?;
                    remove_pin(&pin)?;
                }
                Some(Pinned::Link) => remove_link_pin(&pin)?,
                None => remove_pin(&pin)?,
            }
        }
        Ok(())
    }

    /// Take-over of a veth filter recorded at `pin`: this load's program
    /// replaces the one in the filter (in place, the hook never empty) and
    /// is pinned over the record. A record whose interface or filter is
    /// gone is removed (the reconcile attaches what is still wanted).
    /// Returns false if `pin` is not a filter's record (a TCX link).
    pub(super) fn take_over_filter(&self, name: &str, pin: &Path) -> Result<bool, DataplaneError> {
        let Some((ifname, direction)) = parse_tc_pin(name) else { return Ok(false) };
        let Some(Pinned::Program(id)) = pinned(pin) else { return Ok(false) };
        let program = direction.tc_program();
        let fd = self.tc_prog_fd(direction)?;
        let replace = |ifindex| tc::set_filter(ifindex, direction.hook(), fd, program);
        let Some(replaced) = in_filters_netns(ifname, direction, id, &replace) else {
            warn!("removing the record of a filter no longer there: {name}");
            remove_pin(pin)?;
            return Ok(true);
        };
        if let Err(e) = replaced {
            // As a link that can no longer be updated: the interface is
            // going (or went) away. Without the record, a reconcile that
            // still wants it attaches it afresh.
            warn!("removing the record of a filter that cannot be updated: {name}: {e}");
            remove_pin(pin)?;
            return Ok(true);
        }
        pin_program(fd, pin)?;
        info!("took over {name} with {program}");
        Ok(true)
    }
}
