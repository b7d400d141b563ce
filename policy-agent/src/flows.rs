//! Flow events: read from the kernel's ring buffer, named (app ids for the
//! tags and addresses), written as JSON lines to a rotated log, kept in a
//! short in-memory history and streamed to followers.
//!
//! The line has the fields of Cloud Foundry's iptables-logger events
//! (`data.packet.direction`, `allowed`, `src_ip`, `src_port`, `dst_ip`,
//! `dst_port`, `protocol`, `mark`, and the apps' guids), plus the reason and
//! the policy that allowed the packet.

use std::{
    collections::{BTreeMap, VecDeque},
    fs::{self, File, OpenOptions},
    io::Write as _,
    net::{IpAddr, Ipv6Addr},
    os::fd::AsRawFd as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use policy_common::{
    Reason,
    maps::{FlowEvent, Ipv6Key, action, direction, proto},
};
use serde_json::json;
use tokio::sync::broadcast;
use tracing::warn;

use crate::{
    agent::{self, SharedAgent},
    dataplane::addr_from_key,
    state::tag_text,
};

/// Events kept in memory for `flows` without `--follow`.
pub const HISTORY: usize = 10_000;

/// One event, rendered, with what the filters need.
#[derive(Clone, Debug)]
pub struct FlowLine {
    pub json: String,
    pub allowed: bool,
    pub src_app: Option<String>,
    pub dst_app: Option<String>,
}

impl FlowLine {
    /// `denied`: only denied packets; `app`: only events naming that app.
    pub fn matches(&self, denied: bool, app: Option<&str>) -> bool {
        (!denied || !self.allowed)
            && app.is_none_or(|a| {
                self.src_app.as_deref() == Some(a) || self.dst_app.as_deref() == Some(a)
            })
    }
}

/// History and live subscribers.
pub struct FlowHub {
    history: Mutex<VecDeque<Arc<FlowLine>>>,
    live: broadcast::Sender<Arc<FlowLine>>,
}

impl Default for FlowHub {
    fn default() -> Self {
        Self {
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            live: broadcast::channel(4096).0,
        }
    }
}

impl FlowHub {
    pub fn publish(&self, line: Arc<FlowLine>) {
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(line.clone());
        // No subscriber is fine.
        let _ = self.live.send(line);
    }

    pub fn recent(&self) -> Vec<Arc<FlowLine>> {
        self.history.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FlowLine>> {
        self.live.subscribe()
    }
}

/// An append-only log rotated by size: `flows.log` → `flows.log.1` → ...
pub struct FlowLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<File>,
    size: u64,
}

impl FlowLog {
    pub fn new(path: PathBuf, max_bytes: u64, keep: u32) -> Self {
        Self { path, max_bytes, keep, file: None, size: 0 }
    }

    fn open(&mut self) -> std::io::Result<&mut File> {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                fs::create_dir_all(dir)?;
            }
            // Flow records name every app's traffic: owner-only, like the state.
            let file = OpenOptions::new().create(true).append(true).mode(0o600).open(&self.path)?;
            self.size = file.metadata()?.len();
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("just opened"))
    }

    fn rotated(path: &Path, n: u32) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        if self.keep == 0 {
            return fs::remove_file(&self.path);
        }
        for n in (1..self.keep).rev() {
            let from = Self::rotated(&self.path, n);
            if from.exists() {
                fs::rename(&from, Self::rotated(&self.path, n + 1))?;
            }
        }
        fs::rename(&self.path, Self::rotated(&self.path, 1))
    }

    pub fn write(&mut self, line: &str) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        let file = self.open()?;
        file.write_all(line.as_bytes())?;
        file.write_all(b"\n")?;
        self.size += len;
        Ok(())
    }
}

/// Names for tags and addresses, taken from the agent's state.
#[derive(Default)]
pub struct Names {
    apps_by_tag: BTreeMap<u32, String>,
    apps_by_ip: BTreeMap<IpAddr, String>,
}

impl Names {
    pub fn from_agent(agent: &SharedAgent) -> Self {
        let agent = agent::lock(agent);
        let state = agent.state();
        Self {
            apps_by_tag: state.tags().iter().map(|(app, tag)| (*tag, app.clone())).collect(),
            apps_by_ip: state
                .endpoints()
                .flat_map(|e| e.addresses().map(|ip| (ip, e.app.to_string())))
                .collect(),
        }
    }

    fn app(&self, tag: u32, ip: IpAddr) -> Option<String> {
        (tag != 0)
            .then(|| self.apps_by_tag.get(&tag).cloned())
            .flatten()
            .or_else(|| self.apps_by_ip.get(&ip).cloned())
    }
}

fn reason_name(reason: u8) -> &'static str {
    Reason::ALL.get(usize::from(reason)).map_or("unknown", |r| r.name())
}

fn protocol_name(protocol: u8) -> String {
    match protocol {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::ICMP => "ICMP".into(),
        proto::ICMPV6 => "ICMPv6".into(),
        n => n.to_string(),
    }
}

/// An event record of either family with its addresses as `IpAddr`.
fn with_ip_addrs<A>(event: &FlowEvent<A>, ip: impl Fn(&A) -> IpAddr) -> FlowEvent<IpAddr> {
    FlowEvent {
        time_ns: event.time_ns,
        saddr: ip(&event.saddr),
        daddr: ip(&event.daddr),
        sport: event.sport,
        dport: event.dport,
        protocol: event.protocol,
        direction: event.direction,
        allowed: event.allowed,
        reason: event.reason,
        src_tag: event.src_tag,
        dst_tag: event.dst_tag,
        policy_id: event.policy_id,
        ifindex: event.ifindex,
    }
}

/// Reads one ring buffer record: an IPv4 or an IPv6 event, by its size.
fn read_event(record: &[u8]) -> Option<FlowEvent<IpAddr>> {
    if record.len() == size_of::<FlowEvent>() {
        // SAFETY: a record of exactly a FlowEvent's size, which is Pod.
        let event = unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<FlowEvent>()) };
        return Some(with_ip_addrs(&event, |a| IpAddr::V4(addr_from_key(*a))));
    }
    if record.len() == size_of::<FlowEvent<Ipv6Key>>() {
        // SAFETY: as above, for the IPv6 record.
        let event =
            unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<FlowEvent<Ipv6Key>>()) };
        return Some(with_ip_addrs(&event, |a| IpAddr::V6(Ipv6Addr::from(a.octets()))));
    }
    None
}

/// Renders one event; `wall` is the event's wall-clock time.
pub fn render(event: &FlowEvent<IpAddr>, wall: SystemTime, names: &Names) -> FlowLine {
    let (src_ip, dst_ip) = (event.saddr, event.daddr);
    let (src_app, dst_app) = (names.app(event.src_tag, src_ip), names.app(event.dst_tag, dst_ip));
    let dir = if event.direction == direction::EGRESS { "egress" } else { "ingress" };
    let allowed = event.allowed == action::PASSED;
    // What was done: passed, dropped, or dropped and answered with a reject.
    let action = match event.allowed {
        action::PASSED => "allow",
        action::REJECTED => "reject",
        _ => "drop",
    };
    let side = |app: &Option<String>, tag: u32| {
        let mut v = json!({"app_guid": app});
        if tag != 0 {
            v["tag"] = json!(tag_text(tag));
        }
        v
    };
    let mut json = json!({
        "timestamp": humantime::format_rfc3339_nanos(wall).to_string(),
        "source": "policy-agent",
        "message": format!("policy-agent.{dir}-{}", if allowed { "allowed" } else { "denied" }),
        "log_level": 1,
        "data": {
            "packet": {
                "direction": dir,
                "allowed": allowed,
                "action": action,
                "reason": reason_name(event.reason),
                "src_ip": src_ip.to_string(),
                "src_port": event.sport,
                "dst_ip": dst_ip.to_string(),
                "dst_port": event.dport,
                "protocol": protocol_name(event.protocol),
                "mark": format!("0x{:x}", event.src_tag),
            },
            "source": side(&src_app, event.src_tag),
            "destination": side(&dst_app, event.dst_tag),
            "policy_id": (event.policy_id != 0).then_some(event.policy_id),
        },
    });
    if event.protocol == proto::ICMP || event.protocol == proto::ICMPV6 {
        // The programs carry an ICMP message's identifier and type/code in
        // the port fields (policy_common::packet::Flow); say what they are.
        let [icmp_type, code] = event.dport.to_be_bytes();
        let packet = &mut json["data"]["packet"];
        packet["icmp_type"] = json!(icmp_type);
        packet["icmp_code"] = json!(code);
        packet["icmp_id"] = json!(event.sport);
    }
    FlowLine { json: json.to_string(), allowed, src_app, dst_app }
}

fn monotonic_now() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Reads the ring buffer until `stop`: renders, logs and publishes events.
pub fn run_reader(
    mut ring: RingBuf<MapData>,
    agent: SharedAgent,
    hub: Arc<FlowHub>,
    mut log: FlowLog,
    stop: Arc<AtomicBool>,
) {
    let fd = ring.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 200) };
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            events.extend(read_event(&item));
        }
        if events.is_empty() {
            continue;
        }
        let names = Names::from_agent(&agent);
        // Event times are CLOCK_MONOTONIC nanoseconds.
        let (wall_now, mono_now) = (SystemTime::now(), monotonic_now());
        for event in &events {
            let age = mono_now.saturating_sub(Duration::from_nanos(event.time_ns));
            let line = Arc::new(render(event, wall_now - age, &names));
            if let Err(e) = log.write(&line.json) {
                warn!(error = %e, "cannot write the flow log");
            }
            hub.publish(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn renders_cloud_foundry_fields() {
        let names = Names {
            apps_by_tag: [(1, "frontend".to_owned()), (2, "backend".to_owned())].into(),
            apps_by_ip: BTreeMap::new(),
        };
        let event = FlowEvent {
            time_ns: 0,
            saddr: IpAddr::from([10, 255, 0, 1]),
            daddr: IpAddr::from([10, 255, 0, 2]),
            sport: 40000,
            dport: 9000,
            protocol: proto::TCP,
            direction: direction::INGRESS,
            allowed: 0,
            reason: Reason::NoPolicy as u8,
            src_tag: 1,
            dst_tag: 2,
            policy_id: 0,
            ifindex: 3,
        };
        let line = render(&event, SystemTime::UNIX_EPOCH, &names);
        let v: Value = serde_json::from_str(&line.json).unwrap();
        let p = &v["data"]["packet"];
        assert_eq!(p["direction"], "ingress");
        assert_eq!(p["allowed"], false);
        assert_eq!(p["reason"], "no_policy");
        assert_eq!(
            (p["src_ip"].as_str(), p["dst_port"].as_u64()),
            (Some("10.255.0.1"), Some(9000))
        );
        assert_eq!(p["protocol"], "TCP");
        assert_eq!(p["mark"], "0x1");
        assert_eq!(v["data"]["source"]["app_guid"], "frontend");
        assert_eq!(v["data"]["destination"]["app_guid"], "backend");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000000000Z");
        assert!(line.matches(true, Some("backend")));
        assert!(!line.matches(false, Some("other")));
    }

    #[test]
    fn ipv4_and_ipv6_records_are_told_apart_by_size() {
        let v6 = FlowEvent {
            saddr: Ipv6Key::from_octets("fd00::1".parse::<Ipv6Addr>().unwrap().octets()),
            daddr: Ipv6Key::from_octets("fd00::2".parse::<Ipv6Addr>().unwrap().octets()),
            protocol: proto::ICMPV6,
            dport: 128 << 8,
            sport: 7,
            ..FlowEvent::default()
        };
        // SAFETY: FlowEvent is Pod; its bytes are what the ring buffer holds.
        let bytes =
            unsafe { std::slice::from_raw_parts((&raw const v6).cast::<u8>(), size_of_val(&v6)) };
        let event = read_event(bytes).unwrap();
        assert_eq!(event.saddr, "fd00::1".parse::<IpAddr>().unwrap());
        let line = render(&event, SystemTime::UNIX_EPOCH, &Names::default());
        let v: Value = serde_json::from_str(&line.json).unwrap();
        assert_eq!(v["data"]["packet"]["protocol"], "ICMPv6");
        assert_eq!(v["data"]["packet"]["icmp_type"], 128);
        assert_eq!(v["data"]["packet"]["dst_ip"], "fd00::2");
        let v4 = FlowEvent { saddr: u32::from_ne_bytes([10, 0, 0, 1]), ..FlowEvent::default() };
        // SAFETY: as above.
        let bytes =
            unsafe { std::slice::from_raw_parts((&raw const v4).cast::<u8>(), size_of_val(&v4)) };
        assert_eq!(read_event(bytes).unwrap().saddr, IpAddr::from([10, 0, 0, 1]));
        assert!(read_event(&bytes[..20]).is_none());
    }

    #[test]
    fn the_log_rotates_by_size() {
        let dir = std::env::temp_dir().join(format!("flowlog-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("flows.log");
        let mut log = FlowLog::new(path.clone(), 100, 2);
        for i in 0..10 {
            log.write(&format!("{i:040}")).unwrap();
        }
        assert!(
            path.exists()
                && FlowLog::rotated(&path, 1).exists()
                && FlowLog::rotated(&path, 2).exists()
        );
        assert!(!FlowLog::rotated(&path, 3).exists());
        assert!(fs::metadata(&path).unwrap().len() <= 100);
        fs::remove_dir_all(&dir).unwrap();
    }
}
