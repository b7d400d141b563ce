//! Compact port storage: a pair with up to two port ranges (a TCP policy
//! and the TLS port fronting it) is one 24-byte `POLICIES` entry; a pair
//! with more also has its ranges in `PORT_SETS` (up to eight) or
//! `PORT_SETS_WIDE` (up to `MAX_PORT_RANGES`, far beyond the 16 one entry
//! used to hold), which go again once the pair needs them no more. An older
//! version's `POLICIES` (each pair's ranges whole in its value) is carried
//! over, never read as the new layout.

use std::{process::Command, time::Duration};

use aya::maps::MapData;
use integration_tests::{
    daemon::Daemon,
    eventually, require_root,
    topology::Host,
    traffic::{udp_echo_server, udp_echo_works, udp_socket},
};
use policy_agent::Maps;
use policy_common::maps::{PairKey, PairPorts, names, proto};
use serde_json::{Value, json};

const POLICIES: &str = "/networking/v1/external/policies";
const DELETE: &str = "/networking/v1/external/policies/delete";
const WAIT: Duration = Duration::from_millis(500);

/// Whether a datagram from container 0 to container 1's `port` is echoed
/// (a new socket each time: a new flow, checked against the policies).
fn udp_passes(host: &Host, port: u16) -> bool {
    let socket = udp_socket(&host.container(0).ns, None);
    udp_echo_works(&socket, host.container(1).ip, port, 32, WAIT)
}

fn policies_body(ports: impl Iterator<Item = u16>) -> String {
    let policies: Vec<Value> = ports
        .map(|port| {
            json!({"source": {"id": "frontend"}, "destination": {"id": "backend", "protocol": "udp", "ports": {"start": port, "end": port}}})
        })
        .collect();
    json!({ "policies": policies }).to_string()
}

/// `entries` of map `name` in `status`.
fn entries(daemon: &Daemon, name: &str) -> u64 {
    let status = daemon.get("/v1/status");
    let maps = status["maps"].as_array().expect("maps");
    maps.iter().find(|m| m["name"] == name).and_then(|m| m["entries"].as_u64()).expect(name)
}

fn pair_key(daemon: &Daemon) -> PairKey {
    PairKey::new(daemon.tag("frontend"), daemon.tag("backend"), proto::UDP)
}

#[test]
fn a_pair_with_many_ranges_allows_exactly_them_and_its_set_goes_with_them() {
    require_root();
    let host = Host::new(2);
    let daemon = Daemon::start(&host.ns, "");
    daemon.register(host.container(0), "frontend");
    daemon.register(host.container(1), "backend");
    let backend = host.container(1);
    // 40 ranges (an entry used to hold 16); echo servers on the first, a
    // middle one, the last, and a port no policy names.
    for port in [7001, 7020, 7040, 7100] {
        udp_echo_server(&backend.ns, backend.ip, port);
    }
    let (status, reply) = daemon.curl("POST", POLICIES, Some(&policies_body(7001..=7040)));
    assert_eq!(status, 200, "{reply}");
    for port in [7001, 7020, 7040] {
        assert!(udp_passes(&host, port), "udp {port} is allowed");
    }
    assert!(!udp_passes(&host, 7100), "control: udp 7100 is named by no policy");
    let maps = Maps::open_pinned(&daemon.maps_dir()).expect("pinned maps");
    assert_eq!(maps.pair(&pair_key(&daemon)).len(), 40);
    assert_eq!(entries(&daemon, names::POLICIES), 1);
    assert_eq!(entries(&daemon, names::PORT_SETS_WIDE), 1, "40 ranges: a wide set");
    assert_eq!(entries(&daemon, names::PORT_SETS), 0);

    // Down to one range: the pair's entry holds it, its set goes.
    let (status, reply) = daemon.curl("POST", DELETE, Some(&policies_body(7002..=7040)));
    assert_eq!(status, 200, "{reply}");
    assert!(udp_passes(&host, 7001), "the range left still passes");
    assert!(!udp_passes(&host, 7040), "a removed range is denied");
    assert!(!udp_passes(&host, 7020), "a removed range is denied");
    assert_eq!(entries(&daemon, names::POLICIES), 1);
    assert!(
        eventually(Duration::from_secs(5), || entries(&daemon, names::PORT_SETS_WIDE) == 0),
        "a pair with one range keeps no set"
    );
    assert_eq!(entries(&daemon, names::PORT_SETS), 0);
    let maps = Maps::open_pinned(&daemon.maps_dir()).expect("pinned maps");
    assert_eq!(maps.pair(&pair_key(&daemon)).len(), 1);

    // A TCP policy on the app's port: that port and the platform TLS port
    // fronting it, two ranges, still the pair's entry alone.
    daemon.allow("frontend", "backend", "tcp", "8080");
    let tcp = PairKey::new(daemon.tag("frontend"), daemon.tag("backend"), proto::TCP);
    let maps = Maps::open_pinned(&daemon.maps_dir()).expect("pinned maps");
    assert_eq!(maps.pair(&tcp).len(), 2, "8080 and the TLS port 61443");
    assert_eq!(entries(&daemon, names::POLICIES), 2);
    assert_eq!(entries(&daemon, names::PORT_SETS), 0, "two ranges need no set");
    assert_eq!(entries(&daemon, names::PORT_SETS_WIDE), 0);

    // Three UDP ranges again, then none.
    daemon.allow("frontend", "backend", "udp", "7100");
    daemon.allow("frontend", "backend", "udp", "7020");
    assert!(udp_passes(&host, 7100), "the new range passes");
    assert!(udp_passes(&host, 7001), "and the old one");
    assert!(!udp_passes(&host, 7040), "not a removed one");
    assert_eq!(entries(&daemon, names::PORT_SETS), 1, "three ranges: a small set");
    assert_eq!(entries(&daemon, names::PORT_SETS_WIDE), 0);
    let (status, reply) =
        daemon.curl("POST", DELETE, Some(&policies_body([7001, 7020, 7100].into_iter())));
    assert_eq!(status, 200, "{reply}");
    assert!(!udp_passes(&host, 7001), "no UDP policy left");
    assert_eq!(entries(&daemon, names::POLICIES), 1, "the TCP pair's");
    assert!(eventually(Duration::from_secs(5), || entries(&daemon, names::PORT_SETS) == 0));
}

/// `bpftool ARGS`, which must succeed.
fn bpftool(args: &[&str]) {
    let out = Command::new("bpftool").args(args).output().expect("run bpftool");
    assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Bytes as bpftool's `hex` arguments.
fn hex(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn an_older_versions_whole_pair_policies_are_carried_over() {
    require_root();
    let host = Host::new(2);
    let mut daemon = Daemon::start(&host.ns, "");
    daemon.register(host.container(0), "frontend");
    daemon.register(host.container(1), "backend");
    daemon.allow("frontend", "backend", "udp", "9000");
    let backend = host.container(1);
    for port in [9000, 9001] {
        udp_echo_server(&backend.ns, backend.ip, port);
    }
    assert!(udp_passes(&host, 9000));
    let key = pair_key(&daemon);
    assert!(daemon.stop().success());

    // What the version before PORT_SETS pinned: POLICIES with the pair's
    // ranges whole in a 200-byte value (len, pad, 16 ranges of start, end,
    // reach, reach index, pad, policy id), and no PORT_SETS.
    let maps_dir = daemon.maps_dir();
    for name in [names::POLICIES, names::PORT_SETS] {
        std::fs::remove_file(maps_dir.join(name)).expect("unpin");
    }
    let pin = maps_dir.join(names::POLICIES);
    let pin = pin.to_str().unwrap();
    bpftool(&[
        "map", "create", pin, "type", "hash", "key", "12", "value", "200", "entries", "1024",
        "name", "POLICIES", "flags", "1",
    ]);
    let mut key_bytes = Vec::new();
    for word in [key.src_tag, key.dst_tag, key.protocol] {
        key_bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let mut value = vec![0u8; 200];
    value[0..4].copy_from_slice(&1u32.to_ne_bytes());
    value[8..10].copy_from_slice(&9000u16.to_ne_bytes());
    value[10..12].copy_from_slice(&9000u16.to_ne_bytes());
    value[12..14].copy_from_slice(&9000u16.to_ne_bytes());
    value[16..20].copy_from_slice(&1u32.to_ne_bytes());
    let mut args = vec!["map".to_owned(), "update".into(), "pinned".into(), pin.into()];
    args.push("key".into());
    args.push("hex".into());
    args.extend(hex(&key_bytes));
    args.push("value".into());
    args.push("hex".into());
    args.extend(hex(&value));
    bpftool(&args.iter().map(String::as_str).collect::<Vec<_>>());

    daemon.spawn();
    let log = daemon.log();
    assert!(log.contains("POLICIES carried over to its compact layout: 1 pairs"), "{log}");
    let info = MapData::from_pin(maps_dir.join(names::POLICIES)).unwrap().info().unwrap();
    assert_eq!(info.value_size() as usize, size_of::<PairPorts>(), "POLICIES made anew");
    assert!(udp_passes(&host, 9000), "the policy holds after the upgrade");
    assert!(!udp_passes(&host, 9001), "control: a port no policy names is denied");
    let maps = Maps::open_pinned(&maps_dir).expect("pinned maps");
    assert_eq!(maps.pair(&key).len(), 1);
}
