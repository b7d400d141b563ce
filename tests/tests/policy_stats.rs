//! Per-policy counters (`POLICY_STATS`) belong to the agent: one entry per
//! policy in force, made before the policy reaches the kernel and
//! forgotten after it left. The programs hold counts back (in a
//! connection's `CONNTRACK` entry, in the flow cache) and flush them
//! later, possibly after the policy went: such a late flush must not bring
//! the entry back, and a restart forgets entries of no policy in force (an
//! older version's leak).
//!
//! The per-address rate limits (`EVENT_LIMITS`, `REJECT_LIMITS`) are made
//! by the programs; the agent forgets an endpoint's with it, and every
//! entry whose window has ended at a removal and at a start.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use integration_tests::{
    daemon::Daemon, eventually, netns::NetNs, pin_this_thread_to_cpu0, require_root, topology::Host,
};
use policy_agent::Maps;
use policy_common::{
    limits::address_key as limit_key,
    maps::{EventLimit, PolicyCounters, names},
};
use serde_json::Value;

/// A host with a frontend and a backend container, its agent, and a policy
/// from frontend to backend on UDP 9000.
fn setup() -> (Host, Daemon) {
    require_root();
    let host = Host::new(2);
    let daemon = Daemon::start(&host.ns, "");
    daemon.register(host.container(0), "frontend");
    daemon.register(host.container(1), "backend");
    daemon.allow("frontend", "backend", "udp", "9000");
    (host, daemon)
}

/// `POLICY_STATS` as the kernel holds it: policy id → packets counted (one
/// value for all CPUs; no pending counts added, unlike the agent's report).
fn policy_stats(daemon: &Daemon) -> BTreeMap<u32, u64> {
    let pin = daemon.maps_dir().join(names::POLICY_STATS);
    let map = MapData::from_pin(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    let stats: HashMap<MapData, u32, PolicyCounters> =
        HashMap::try_from(Map::HashMap(map)).expect("a hash map");
    stats
        .iter()
        .map(|entry| {
            let (id, counters) = entry.expect("read POLICY_STATS");
            (id, counters.packets)
        })
        .collect()
}

/// The id and the packet count the agent reports (`network-policies
/// --stats`) for the policy from frontend to backend on `ports`.
fn reported(daemon: &Daemon, ports: (u64, u64)) -> Option<(u32, u64)> {
    let stats: Value =
        serde_json::from_str(&daemon.cli_ok(&["network-policies", "--stats", "--json"])).unwrap();
    stats["policies"].as_array().expect("policies").iter().find_map(|p| {
        let range = &p["destination"]["ports"];
        let matches =
            (range["start"].as_u64(), range["end"].as_u64()) == (Some(ports.0), Some(ports.1));
        matches.then(|| (p["id"].as_u64().unwrap() as u32, p["packets"].as_u64().unwrap()))
    })
}

/// The entries of map `name` as `status` reports them (what an operator
/// sees, also as the `policy_map_entries` metric).
fn status_entries(daemon: &Daemon, name: &str) -> Option<u64> {
    let status = daemon.get("/v1/status");
    let maps = status["maps"].as_array().expect("maps");
    maps.iter().find(|m| m["name"] == name).and_then(|m| m["entries"].as_u64())
}

/// One UDP connection (one socket, one 5-tuple) from `from` to `to:port`,
/// a datagram every 200 µs, sent from a thread on CPU 0: every packet
/// meets CPU 0's flow cache (a veth hands a packet to its peer on the
/// sending CPU).
struct Stream {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    sender: Option<JoinHandle<u64>>,
    receiver: Option<JoinHandle<()>>,
}

impl Stream {
    fn start(from: &NetNs, to_ns: &NetNs, to: Ipv4Addr, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let socket = to_ns.run(move || UdpSocket::bind((to, port))).expect("bind receiver");
        socket.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        let receiver = {
            let (stop, received) = (stop.clone(), received.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if socket.recv(&mut buf).is_ok() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let socket = from.run(|| UdpSocket::bind(("0.0.0.0", 0))).expect("bind sender");
        let sender = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin_this_thread_to_cpu0();
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Dropped datagrams (between the policies) are no error.
                    let _ = socket.send_to(b"counted", (to, port));
                    sent += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                sent
            })
        };
        Self { stop, received, sender: Some(sender), receiver: Some(receiver) }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Stops both ends; returns how many datagrams were sent.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(receiver) = self.receiver.take() {
            receiver.join().expect("receiver");
        }
        self.sender.take().map_or(0, |sender| sender.join().expect("sender"))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Also when a test fails before `finish`: both threads end (within
        // the receiver's 50 ms timeout) before the namespaces go.
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.sender.take().map(JoinHandle::join);
        let _ = self.receiver.take().map(JoinHandle::join);
    }
}

/// A long-lived connection counts under its policy (the control: counts
/// of a policy in force reach `POLICY_STATS` and the report); its policy
/// is removed while it sends, and another policy lets the same connection
/// on, so CPU 0's flow cache refills its way and flushes the count it
/// held back for the removed policy — which used to make the removed
/// policy's entry again, for good. Once the second policy and both
/// endpoints are gone too, `POLICY_STATS` is empty, like every map.
#[test]
fn a_removed_policys_counters_stay_gone_whatever_traffic_was_in_flight() {
    let (host, daemon) = setup();
    let (a, b) = (host.container(0), host.container(1));
    let (first, _) = reported(&daemon, (9000, 9000)).expect("the first policy");
    assert_eq!(policy_stats(&daemon), BTreeMap::from([(first, 0)]), "made with the policy");

    let stream = Stream::start(&a.ns, &b.ns, b.ip, 9000);
    // Past a few flushes (every 64 packets) into POLICY_STATS.
    assert!(
        eventually(Duration::from_secs(10), || policy_stats(&daemon)[&first] >= 256),
        "the first policy counted in POLICY_STATS: {:?}",
        policy_stats(&daemon)
    );
    assert!(reported(&daemon, (9000, 9000)).unwrap().1 >= 256);

    // Removed while the connection sends: its packets are dropped, and
    // CPU 0's flow cache still holds up to 63 of them for the first policy.
    daemon.disallow("frontend", "backend", "udp", "9000");
    let before = stream.received();
    std::thread::sleep(Duration::from_millis(300));
    assert!(stream.received() - before < 10, "the connection was cut");
    assert_eq!(policy_stats(&daemon), BTreeMap::new(), "forgotten with the policy");

    // Another policy lets the same connection on: its next packets refill
    // the way and flush what it held for the first policy.
    daemon.allow("frontend", "backend", "udp", "9000-9001");
    let (second, _) = reported(&daemon, (9000, 9001)).expect("the second policy");
    assert_ne!(first, second);
    assert!(
        eventually(Duration::from_secs(10), || {
            policy_stats(&daemon).get(&second).is_some_and(|&p| p >= 256)
        }),
        "the second policy counted in POLICY_STATS: {:?}",
        policy_stats(&daemon)
    );
    assert!(reported(&daemon, (9000, 9001)).unwrap().1 >= 256, "and reported");
    let stats = policy_stats(&daemon);
    assert!(!stats.contains_key(&first), "the removed policy's entry came back: {stats:?}");
    assert_eq!(stats.keys().copied().collect::<Vec<_>>(), [second]);

    // Everything removed while the connection still sends.
    daemon.disallow("frontend", "backend", "udp", "9000-9001");
    for c in [a, b] {
        daemon.cli_ok(&["endpoint", "del", "--ip", &c.ip.to_string()]);
    }
    std::thread::sleep(Duration::from_millis(300));
    let sent = stream.finish();
    assert!(sent > 1000, "only {sent} datagrams sent");
    let maps = Maps::open_pinned(&daemon.maps_dir()).expect("open the pinned maps");
    assert_eq!(policy_stats(&daemon), BTreeMap::new(), "no policy, no counters");
    assert_eq!(status_entries(&daemon, names::POLICY_STATS), Some(0));
    assert_eq!(maps.pairs(), Vec::new());
    assert_eq!(maps.endpoints(), Vec::new());
    assert_eq!(maps.connections(), Vec::new());
}

/// A restart makes the counters of every policy in force (an older
/// version made them at a policy's first packet only) and forgets every
/// other entry (an older version's leak).
#[test]
fn a_restart_leaves_counters_for_exactly_the_policies_in_force() {
    let (host, mut daemon) = setup();
    let (id, _) = reported(&daemon, (9000, 9000)).expect("the policy");
    assert!(daemon.stop().success());
    {
        // What an older version left: no entry for the policy in force, two
        // for policies long gone.
        let mut maps = Maps::open_pinned(&daemon.maps_dir()).expect("open the pinned maps");
        maps.remove_policy_counters(id).unwrap();
        maps.add_policy_counters(id + 100).unwrap();
        maps.add_policy_counters(id + 101).unwrap();
    }
    assert_eq!(policy_stats(&daemon).keys().copied().collect::<Vec<_>>(), [id + 100, id + 101]);
    // And rate limits whose windows ended long ago, of an address that is
    // no endpoint and of one that is.
    let (outside, frontend) =
        (limit_key([203, 0, 113, 9].into()), limit_key(host.container(0).ip.into()));
    for name in [names::EVENT_LIMITS, names::REJECT_LIMITS] {
        plant_limit(&daemon, name, outside);
        plant_limit(&daemon, name, frontend);
    }
    assert_eq!(limits(&daemon).len(), 4);
    daemon.spawn();
    assert_eq!(policy_stats(&daemon), BTreeMap::from([(id, 0)]));
    assert_eq!(limits(&daemon), Vec::new(), "ended windows swept at the start");
}

/// `EVENT_LIMITS` and `REJECT_LIMITS` as the kernel holds them: map name
/// and key.
fn limits(daemon: &Daemon) -> Vec<(&'static str, u32)> {
    let maps = Maps::open_pinned(&daemon.maps_dir()).expect("open the pinned maps");
    maps.limits().into_iter().map(|(name, key, _)| (name, key)).collect()
}

/// Writes a rate-limit entry whose window ended long ago (what an older
/// version, or a packet in flight at a removal, leaves) into map `name`.
fn plant_limit(daemon: &Daemon, name: &str, key: u32) {
    let pin = daemon.maps_dir().join(name);
    let map = MapData::from_pin(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    let mut limits: HashMap<MapData, u32, EventLimit> =
        HashMap::try_from(Map::LruHashMap(map)).expect("an LRU hash map");
    let ended = EventLimit { window_start_ns: 0, count: 1, _pad: 0 };
    limits.insert(key, ended, 0).unwrap_or_else(|e| panic!("plant into {name}: {e}"));
}

/// Denied datagrams from frontend to backend (no policy on the port) make
/// rate-limit entries: the denied-event limit keyed by the destination,
/// the reject limit keyed by the sender (the control: they are there while
/// the endpoints are). Both endpoints are removed while the datagrams keep
/// coming; then no entry is left, and one planted for an address that is
/// no endpoint, its window ended, went with the first removal.
#[test]
fn a_removed_endpoints_rate_limits_go_with_it_whatever_traffic_was_in_flight() {
    let (host, daemon) = setup();
    let (a, b) = (host.container(0), host.container(1));
    let (sender, destination) = (limit_key(a.ip.into()), limit_key(b.ip.into()));
    let denied = Stream::start(&a.ns, &b.ns, b.ip, 9001);
    assert!(
        eventually(Duration::from_secs(10), || {
            let limits = limits(&daemon);
            limits.contains(&(names::EVENT_LIMITS, destination))
                && limits.contains(&(names::REJECT_LIMITS, sender))
        }),
        "denied events limited per destination, rejects per sender: {:?}",
        limits(&daemon)
    );
    assert!(status_entries(&daemon, names::EVENT_LIMITS) >= Some(1));
    assert!(status_entries(&daemon, names::REJECT_LIMITS) >= Some(1));
    let outside = limit_key([203, 0, 113, 9].into());
    plant_limit(&daemon, names::EVENT_LIMITS, outside);

    daemon.cli_ok(&["endpoint", "del", "--ip", &a.ip.to_string()]);
    let after_one = limits(&daemon);
    assert!(!after_one.contains(&(names::REJECT_LIMITS, sender)), "{after_one:?}");
    assert!(!after_one.contains(&(names::EVENT_LIMITS, outside)), "swept: {after_one:?}");
    daemon.cli_ok(&["endpoint", "del", "--ip", &b.ip.to_string()]);
    daemon.disallow("frontend", "backend", "udp", "9000");
    std::thread::sleep(Duration::from_millis(300));
    let sent = denied.finish();
    assert!(sent > 1000, "only {sent} datagrams sent");
    assert_eq!(limits(&daemon), Vec::new(), "no endpoint, no rate limits");
    for name in [names::EVENT_LIMITS, names::REJECT_LIMITS] {
        assert_eq!(status_entries(&daemon, name), Some(0), "{name}");
    }
}
