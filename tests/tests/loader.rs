//! The loader against the real kernel: pins, capacities, full maps, errors,
//! reopening, attaching and detaching.

use std::{net::Ipv4Addr, process::Command};

use aya::programs::{SchedClassifier, TcAttachType, links::FdLink};
use integration_tests::{netns::NetNs, pins::PinDir, require_root, unique_name};
use policy_agent::{Capacities, Dataplane, DataplaneConfig, DataplaneError, Direction};
use policy_common::{
    maps::{MAX_PORT_RANGES, PairKey, proto},
    ports::{Allowance, PortsError},
};

fn bpftool_json(args: &[&str]) -> serde_like::Json {
    let out = Command::new("bpftool").arg("-j").args(args).output().expect("run bpftool");
    assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_like::Json(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Just enough JSON inspection for bpftool's output, without a JSON crate.
mod serde_like {
    pub struct Json(pub String);
    impl Json {
        pub fn has(&self, needle: &str) -> bool {
            self.0.contains(needle)
        }
    }
}

#[test]
fn maps_are_pinned_with_names_and_typed_for_bpftool() {
    require_root();
    let pins = PinDir::new();
    let mut dataplane = pins.open();
    let tables = dataplane.maps_mut();
    tables.set_endpoint(Ipv4Addr::new(10, 255, 0, 1), 7).unwrap();
    tables
        .allow(PairKey::new(7, 8, proto::TCP), Allowance { start: 8080, end: 8090, policy_id: 3 })
        .unwrap();
    for name in policy_common::maps::names::ALL {
        assert!(pins.path().join("maps").join(name).exists(), "{name} is not pinned");
    }
    let endpoints = bpftool_json(&[
        "map",
        "dump",
        "pinned",
        pins.path().join("maps/ENDPOINTS").to_str().unwrap(),
    ]);
    assert!(endpoints.has("\"tag\":7"), "bpftool shows no named fields: {}", endpoints.0);
    let policies = bpftool_json(&[
        "map",
        "dump",
        "pinned",
        pins.path().join("maps/POLICIES").to_str().unwrap(),
    ]);
    for field in
        ["\"src_tag\":7", "\"dst_tag\":8", "\"start\":8080", "\"end\":8090", "\"policy_id\":3"]
    {
        assert!(policies.has(field), "{field} missing from {}", policies.0);
    }
    let info = bpftool_json(&[
        "map",
        "show",
        "pinned",
        pins.path().join("maps/POLICIES").to_str().unwrap(),
    ]);
    assert!(info.has("\"max_entries\":262144"), "default policy capacity: {}", info.0);
    let info = bpftool_json(&[
        "map",
        "show",
        "pinned",
        pins.path().join("maps/ENDPOINTS").to_str().unwrap(),
    ]);
    assert!(info.has("\"max_entries\":65536"), "default endpoint capacity: {}", info.0);
}

#[test]
fn a_full_map_is_reported_and_leaves_entries_intact() {
    require_root();
    let pins = PinDir::new();
    let config = DataplaneConfig {
        pin_dir: pins.path().to_path_buf(),
        capacities: Capacities { endpoints: 4, policies: 2, ..Capacities::default() },
        events: Default::default(),
        deny: Default::default(),
        overlay: None,
    };
    let mut dataplane = Dataplane::open(&config).unwrap();
    let tables = dataplane.maps_mut();
    for i in 1..=4 {
        tables.set_endpoint(Ipv4Addr::new(10, 255, 0, i), 1).unwrap();
    }
    match tables.set_endpoint(Ipv4Addr::new(10, 255, 0, 5), 1) {
        Err(DataplaneError::MapFull { name: "ENDPOINTS", capacity: 4 }) => {}
        other => panic!("expected ENDPOINTS full, got {other:?}"),
    }
    assert_eq!(tables.endpoints().len(), 4);
    let allow = |port| Allowance { start: port, end: port, policy_id: 1 };
    tables.allow(PairKey::new(1, 2, proto::TCP), allow(1)).unwrap();
    tables.allow(PairKey::new(1, 3, proto::TCP), allow(1)).unwrap();
    // A third pair does not fit; a new range on an existing pair does.
    let err = tables.allow(PairKey::new(1, 4, proto::TCP), allow(1)).unwrap_err();
    assert!(err.to_string().contains("POLICIES is full"), "{err}");
    tables.allow(PairKey::new(1, 2, proto::TCP), allow(2)).unwrap();
    assert_eq!(tables.pairs().len(), 2);
}

#[test]
fn more_ranges_than_a_pair_holds_are_refused_whole() {
    require_root();
    let pins = PinDir::new();
    let mut dataplane = pins.open();
    let tables = dataplane.maps_mut();
    let key = PairKey::new(1, 2, proto::UDP);
    for i in 0..MAX_PORT_RANGES as u16 {
        tables
            .allow(key, Allowance { start: 100 + i * 10, end: 100 + i * 10, policy_id: 1 })
            .unwrap();
    }
    let err = tables.allow(key, Allowance { start: 5000, end: 5000, policy_id: 1 }).unwrap_err();
    assert!(
        matches!(err, DataplaneError::Ports(PortsError::TooManyRanges { limit: MAX_PORT_RANGES })),
        "{err}"
    );
    assert_eq!(tables.pair(&key).len(), MAX_PORT_RANGES, "the pair is unchanged");
    let bad = tables.allow(key, Allowance { start: 9, end: 8, policy_id: 1 }).unwrap_err();
    assert!(bad.to_string().contains("invalid port range 9-8"), "{bad}");
}

/// A new namespace with a veth pair `v0` / `v1` in it.
fn veth_namespace() -> NetNs {
    let ns = NetNs::new(unique_name("ld"));
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    ns
}

#[test]
fn state_survives_reopening_and_remove_all_cleans_up() {
    require_root();
    let ns = veth_namespace();
    ns.ip(&["link", "set", "v0", "up"]);
    let _in_ns = ns.enter();
    let pins = PinDir::new();
    let key = PairKey::new(1, 2, proto::TCP);
    {
        let mut dataplane = pins.open();
        dataplane.maps_mut().set_endpoint(Ipv4Addr::new(10, 255, 0, 1), 1).unwrap();
        dataplane.maps_mut().allow(key, Allowance { start: 80, end: 80, policy_id: 9 }).unwrap();
        dataplane.maps_mut().bump_epoch().unwrap();
        dataplane.attach_veth("v0").unwrap();
        // Attaching again is a no-op.
        dataplane.attach_veth("v0").unwrap();
    }
    let attached = |hook| ns.tc_bpf_filters("v0", hook);
    let names =
        |hook| attached(hook).into_iter().map(|(pref, name, _)| (pref, name)).collect::<Vec<_>>();
    let want = |name: &str| vec![(1, name.to_owned())];
    assert_eq!(names("ingress"), want("tc_from_container"));
    assert_eq!(names("egress"), want("tc_to_container"));
    let no_tcx = |t| SchedClassifier::query_tcx("v0", t).unwrap().1.is_empty();
    assert!(no_tcx(TcAttachType::Ingress) && no_tcx(TcAttachType::Egress));
    // Another tool's filter on the same hook, at another priority: left alone.
    // (`tc` run from this thread, in the namespace: `ip netns exec` would
    // remount /sys and lose the bpffs.)
    let other = Command::new("tc")
        .args(["filter", "add", "dev", "v0", "ingress", "prio", "7"])
        .args(["handle", "7", "bpf", "da", "pinned"])
        .arg(pins.path().join("links/tc-v0-ingress"))
        .output()
        .unwrap();
    assert!(other.status.success(), "{}", String::from_utf8_lossy(&other.stderr));
    let mut dataplane = pins.open();
    assert_eq!(dataplane.maps().endpoints().len(), 1);
    assert_eq!(dataplane.maps().pair(&key), vec![Allowance { start: 80, end: 80, policy_id: 9 }]);
    assert_eq!(dataplane.maps().epoch().unwrap(), 1);
    assert_eq!(dataplane.attachments().unwrap(), vec!["tc-v0-egress", "tc-v0-ingress"]);

    match dataplane.attach_veth("nosuchif") {
        Err(DataplaneError::NoInterface { ifname }) => assert_eq!(ifname, "nosuchif"),
        other => panic!("expected NoInterface, got {other:?}"),
    }

    // Reopening took the filters over with its own programs.
    let ours = attached("ingress").into_iter().find(|(pref, _, _)| *pref == 1).map(|f| f.2);
    let ingress_id = dataplane.tc_program(Direction::FromContainer).info().unwrap().id();
    assert_eq!(ours, Some(ingress_id));

    dataplane.detach_veth("v0").unwrap();
    drop(dataplane);
    let prefs = |hook| attached(hook).into_iter().map(|(pref, _, _)| pref).collect::<Vec<_>>();
    assert_eq!(prefs("ingress"), vec![7], "only the other tool's filter is left");
    assert_eq!(prefs("egress"), Vec::<u64>::new());
    Dataplane::remove_all(pins.path()).unwrap();
    assert!(!pins.path().exists());
}

/// An upgrade from a version that kept the per-packet settings in
/// single-value arrays: their values move into `CONFIG` (the epoch above
/// all: connections tracked under the old programs keep their re-checks)
/// and the old pins go.
#[test]
fn settings_pinned_by_an_older_version_move_into_config() {
    require_root();
    let pins = PinDir::new();
    let maps = pins.path().join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    // What the older version pinned: (name, value size, value bytes).
    let legacy: [(&str, usize, &[u8]); 6] = [
        ("EPOCH", 4, &[7, 0, 0, 0]),
        ("NETIN_STATE", 4, &[2, 0, 0, 0]),
        ("NETOUT_STATE", 4, &[1, 0, 0, 0]),
        ("TUNNEL", 8, &[9, 0, 0, 0, 0xb5, 0x12, 0, 0]),
        ("OVERLAY", 8, &[0, 0, 0, 0, 0, 0, 0, 0]),
        ("SETTINGS", 16, &[0; 16]),
    ];
    for (name, size, value) in legacy {
        let pin = maps.join(name);
        let pin = pin.to_str().unwrap();
        let size = size.to_string();
        let create = ["map", "create", pin, "type", "array", "key", "4", "value", &size];
        let create: Vec<&str> = create.into_iter().chain(["entries", "1", "name", name]).collect();
        bpftool_json(&create);
        let bytes: Vec<String> = value.iter().map(u8::to_string).collect();
        let mut update = vec!["map", "update", "pinned", pin, "key", "0", "0", "0", "0", "value"];
        update.extend(bytes.iter().map(String::as_str));
        bpftool_json(&update);
    }
    let dataplane = pins.open();
    let config = dataplane.maps().config().unwrap();
    assert_eq!(config.epoch, 7, "the epoch is carried over");
    assert_eq!((config.netin_mappings, config.netout_apps), (2, 1));
    assert_eq!((config.tunnel.ifindex, config.tunnel.port), (9, 4789));
    assert_eq!(config.settings, pins.config().kernel_settings(), "settings are written anew");
    for (name, _, _) in legacy {
        assert!(!maps.join(name).exists(), "{name} is still pinned");
    }
    assert!(maps.join("CONFIG").exists());
    drop(dataplane);
    // Opening again finds nothing to carry over and keeps the values.
    let dataplane = pins.open();
    assert_eq!(dataplane.maps().config().unwrap().epoch, 7);
}

/// An older version counted per policy in a per-CPU hash; this one keeps
/// one value for all CPUs. Loading over the old pin carries each policy's
/// counts over, summed, and pins the new map in its place.
#[test]
fn per_cpu_policy_counters_of_an_older_version_are_carried_over() {
    require_root();
    let pins = PinDir::new();
    let maps = pins.path().join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    let pin = maps.join("POLICY_STATS");
    let pin = pin.to_str().unwrap();
    let create = ["map", "create", pin, "type", "percpu_hash", "key", "4", "value", "16"];
    let create: Vec<&str> =
        create.into_iter().chain(["entries", "16", "name", "POLICY_STATS"]).collect();
    bpftool_json(&create);
    // Policy 7: 5 packets and 500 bytes on every CPU (bpftool writes the
    // one value given to each).
    let mut update = vec!["map", "update", "pinned", pin, "key", "7", "0", "0", "0", "value"];
    let value = ["5", "0", "0", "0", "0", "0", "0", "0", "244", "1", "0", "0", "0", "0", "0", "0"];
    update.extend(value);
    bpftool_json(&update);
    let cpus = aya::util::nr_cpus().unwrap() as u64;
    let dataplane = pins.open();
    let counters = dataplane.maps().policy_counters(7);
    assert_eq!((counters.packets, counters.bytes), (5 * cpus, 500 * cpus), "summed over CPUs");
    let shown = bpftool_json(&["map", "show", "pinned", pin]);
    assert!(shown.has("\"type\":\"hash\""), "not the shared map: {}", shown.0);
    drop(dataplane);
    // Opening again finds nothing to carry over and keeps the counts.
    let dataplane = pins.open();
    assert_eq!(dataplane.maps().policy_counters(7).packets, 5 * cpus);
}

#[test]
fn a_recreated_interface_gets_attached_again() {
    require_root();
    let ns = NetNs::new(unique_name("ld"));
    let _in_ns = ns.enter();
    let pins = PinDir::new();
    let mut dataplane = pins.open();
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    dataplane.attach_veth("v0").unwrap();
    // The container goes away and a new one gets a veth of the same name:
    // the pinned link is stale and must not count as attached.
    ns.ip(&["link", "del", "v0"]);
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    dataplane.attach_veth("v0").unwrap();
    let names = |hook| ns.tc_bpf_filters("v0", hook).into_iter().map(|f| f.1).collect::<Vec<_>>();
    assert_eq!(
        (names("ingress"), names("egress")),
        (vec!["tc_from_container".to_owned()], vec!["tc_to_container".to_owned()])
    );
}

#[test]
fn bpffs_is_mounted_when_missing() {
    require_root();
    // A private mount namespace without bpffs, as on a fresh Debian host.
    let pins = PinDir::new();
    let pin_dir = pins.path().display().to_string();
    let agent = integration_tests::agent::agent_bin();
    let script = format!(
        "umount /sys/fs/bpf 2>/dev/null; \
         if grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts; then echo still-mounted; exit 1; fi; \
         {agent} dataplane --pin-dir {pin_dir}/inner load && \
         grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts && \
         {agent} dataplane --pin-dir {pin_dir}/inner unload",
        agent = agent.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("run unshare");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whole maps are read in batches of 4,096 entries (`BPF_MAP_LOOKUP_BATCH`):
/// a map of several batches is read whole and exactly, as the restart's
/// reconcile and `status` read it.
#[test]
fn maps_larger_than_a_batch_are_read_whole() {
    require_root();
    let pins = PinDir::new();
    let mut dataplane = pins.open_for(20_000);
    let n = 10_000u32;
    for i in 0..n {
        let key = PairKey::new(100 + i, 7, proto::TCP);
        let port = 1000 + (i % 50_000) as u16;
        let allowance = Allowance { start: port, end: port, policy_id: i + 1 };
        dataplane.maps_mut().set_pair(key, &[allowance]).unwrap();
        dataplane.maps_mut().add_policy_counters(i + 1).unwrap();
    }
    let pairs = dataplane.maps().pairs();
    assert_eq!(pairs.len(), n as usize);
    let distinct: std::collections::BTreeSet<_> = pairs.iter().map(|(k, _)| *k).collect();
    assert_eq!(distinct.len(), n as usize, "every pair once");
    for (key, allowances) in &pairs {
        let i = key.src_tag - 100;
        let port = 1000 + (i % 50_000) as u16;
        assert_eq!(allowances, &[Allowance { start: port, end: port, policy_id: i + 1 }]);
    }
    assert_eq!(dataplane.maps().policy_counter_ids().unwrap().len(), n as usize);
    let occupancy = dataplane.maps().occupancy();
    let policies = occupancy.iter().find(|(name, ..)| *name == "POLICIES").unwrap();
    assert_eq!(policies.1, n as usize);
}

/// A veth an earlier version attached through TCX (a pinned link under
/// `links/tc-*`) stays on its link: taken over with the new programs,
/// counted as attached, detached as a link.
#[test]
fn a_veth_an_earlier_version_attached_through_tcx_is_taken_over_as_it_is() {
    require_root();
    let ns = veth_namespace();
    ns.ip(&["link", "set", "v0", "up"]);
    let _in_ns = ns.enter();
    let pins = PinDir::new();
    let hooks = [("ingress", TcAttachType::Ingress), ("egress", TcAttachType::Egress)];
    {
        // The earlier version's layout: the same programs, TCX links
        // pinned where the filters' records now go.
        let mut dataplane = pins.open();
        dataplane.attach_veth("v0").unwrap();
        let mut programs: Vec<SchedClassifier> = hooks
            .iter()
            .map(|(hook, _)| {
                SchedClassifier::from_pin(pins.path().join(format!("links/tc-v0-{hook}"))).unwrap()
            })
            .collect();
        dataplane.detach_veth("v0").unwrap();
        for ((hook, attach_type), program) in hooks.iter().zip(&mut programs) {
            let id = program.attach("v0", *attach_type).unwrap();
            let link = FdLink::try_from(program.take_link(id).unwrap()).unwrap();
            link.pin(pins.path().join(format!("links/tc-v0-{hook}"))).unwrap();
        }
    }
    let mut dataplane = pins.open();
    dataplane.attach_veth("v0").unwrap();
    for ((hook, attach_type), direction) in hooks.iter().zip(Direction::BOTH) {
        let tcx: Vec<u32> = SchedClassifier::query_tcx("v0", *attach_type)
            .unwrap()
            .1
            .iter()
            .map(|p| p.id())
            .collect();
        let now = dataplane.tc_program(direction).info().unwrap().id();
        assert_eq!(tcx, vec![now], "{hook}: the link runs this load's program");
        assert!(ns.tc_bpf_filters("v0", hook).is_empty(), "{hook}: no filter added beside it");
    }
    assert_eq!(dataplane.attachments().unwrap(), vec!["tc-v0-egress", "tc-v0-ingress"]);
    dataplane.detach_veth("v0").unwrap();
    for (hook, attach_type) in hooks {
        let left = SchedClassifier::query_tcx("v0", attach_type).unwrap().1;
        assert!(left.is_empty(), "{hook}: the link is detached");
    }
    assert!(dataplane.attachments().unwrap().is_empty());
}

/// A veth whose clsact slot another tool's `ingress` qdisc holds (filters
/// there would all run on ingress) is attached through TCX, both ways, and
/// the other tool's qdisc is left alone.
#[test]
fn a_veth_with_another_tools_ingress_qdisc_is_attached_through_tcx() {
    require_root();
    let ns = veth_namespace();
    let tc = ns.command("tc").args(["qdisc", "add", "dev", "v0", "ingress"]).output().unwrap();
    assert!(tc.status.success(), "{}", String::from_utf8_lossy(&tc.stderr));
    let _in_ns = ns.enter();
    let pins = PinDir::new();
    let mut dataplane = pins.open();
    dataplane.attach_veth("v0").unwrap();
    dataplane.attach_veth("v0").unwrap();
    let tcx = |t| SchedClassifier::query_tcx("v0", t).unwrap().1.len();
    assert_eq!((tcx(TcAttachType::Ingress), tcx(TcAttachType::Egress)), (1, 1));
    assert!(ns.tc_bpf_filters("v0", "ingress").is_empty());
    let qdiscs = ns.command("tc").args(["qdisc", "show", "dev", "v0"]).output().unwrap();
    assert!(String::from_utf8_lossy(&qdiscs.stdout).contains("qdisc ingress"));
    assert_eq!(dataplane.attachments().unwrap(), vec!["tc-v0-egress", "tc-v0-ingress"]);
    dataplane.detach_veth("v0").unwrap();
    assert_eq!((tcx(TcAttachType::Ingress), tcx(TcAttachType::Egress)), (0, 0));
    assert!(dataplane.attachments().unwrap().is_empty());
}
