use policy_common::maps::proto;

use super::*;

fn policy(src: &str, dst: &str, protocol: Protocol, start: u16, end: u16) -> Policy {
    Policy { source: src.into(), destination: dst.into(), protocol, start, end, tls_only: false }
}

#[test]
fn undo_takes_a_change_back_exactly() {
    let mut s = State::default();
    s.add_endpoint(Endpoint {
        ip: Ipv4Addr::new(10, 255, 0, 1).into(),
        ipv6: None,
        app: "web".into(),
        ifname: "hv0".into(),
        netns: None,
        host: None,
        port_mappings: Vec::new(),
        space_id: None,
        workload: None,
    });
    let kept = policy("web", "api", Protocol::Tcp, 8080, 8080);
    s.add_policies(&[kept.clone(), policy("api", "db", Protocol::Udp, 53, 53)], None).unwrap();
    let before = s.clone();
    // Adding: new apps get tags, duplicates in the request count once.
    let new = policy("new", "api", Protocol::Tcp, 1, 2);
    let undo = s.add_policies_undoable(&[new.clone(), kept.clone(), new], None).unwrap();
    assert!(undo.changes_anything());
    assert_ne!(s, before);
    s.undo(undo);
    assert_eq!(s, before);
    // Removing: db loses its tag, then gets the same one back.
    let undo = s.remove_policies_undoable(&[policy("api", "db", Protocol::Udp, 53, 53)]);
    assert_eq!(s.tag("db"), None);
    s.undo(undo);
    assert_eq!(s, before);
    // An endpoint re-registered for a new app, and unregistered: the old
    // app's tag comes back with it.
    let ip = Ipv4Addr::new(10, 255, 0, 1);
    let moved = Endpoint {
        ip: ip.into(),
        ipv6: None,
        app: "fresh".into(),
        ifname: "hv0".into(),
        netns: None,
        host: None,
        port_mappings: Vec::new(),
        space_id: None,
        workload: None,
    };
    let undo = s.add_endpoint_undoable(moved);
    assert!(s.tag("fresh").is_some());
    s.undo(undo);
    assert_eq!(s, before);
    let undo = s.remove_endpoint_undoable(ip.into());
    assert!(undo.changes_anything());
    s.undo(undo);
    assert_eq!(s, before);
    // Routes: mapped, and unmapped.
    let undo = s.map_route_undoable("api", "api").unwrap();
    assert!(undo.changes_anything());
    s.undo(undo);
    assert_eq!(s, before);
    s.map_route("api", "api").unwrap();
    let mapped = s.clone();
    assert!(!s.map_route_undoable("api", "api").unwrap().changes_anything());
    let undo = s.unmap_route_undoable("api", "api").unwrap();
    s.undo(undo);
    assert_eq!(s, mapped);
    s.unmap_route("api", "api").unwrap();
    assert!(!s.remove_endpoint_undoable(Ipv4Addr::new(10, 0, 0, 9).into()).changes_anything());
    // Nothing to do: nothing recorded.
    assert!(!s.add_policies_undoable(&[kept], None).unwrap().changes_anything());
    assert!(
        !s.remove_policies_undoable(&[policy("x", "y", Protocol::Tcp, 1, 1)]).changes_anything()
    );
    assert_eq!(s, before);
}

#[test]
fn tags_are_allocated_in_id_order_like_cloud_foundry() {
    // shared/fixtures/cf-policy-server: the POST body's apps get tags
    // 0001.. in id order.
    let mut s = State::default();
    s.add_policies(
        &[
            policy("1081ceac", "38f08df0", Protocol::Tcp, 1234, 1235),
            policy("308e7ef1", "308e7ef1", Protocol::Tcp, 1234, 1235),
        ],
        None,
    )
    .unwrap();
    let tags: Vec<(&str, String)> =
        s.tags().iter().map(|(a, t)| (a.as_str(), tag_text(*t))).collect();
    assert_eq!(
        tags,
        [("1081ceac", "0001".into()), ("308e7ef1", "0002".into()), ("38f08df0", "0003".into())]
    );
}

#[test]
fn adding_twice_and_removing_missing_are_no_ops() {
    let mut s = State::default();
    let p = policy("a", "b", Protocol::Udp, 53, 53);
    s.add_policies(std::slice::from_ref(&p), None).unwrap();
    let before = s.clone();
    s.add_policies(std::slice::from_ref(&p), None).unwrap();
    assert_eq!(s, before);
    s.remove_policies(&[policy("a", "b", Protocol::Tcp, 53, 53)]);
    assert_eq!(s, before);
    s.remove_policies(&[p]);
    assert!(s.tags().is_empty(), "unused apps are forgotten");
    // Tags are not reused.
    s.add_policies(&[policy("c", "d", Protocol::Udp, 1, 1)], None).unwrap();
    assert_eq!(s.tag("c"), Some(3));
}

#[test]
fn the_per_source_limit_applies_to_the_whole_batch() {
    let mut s = State::default();
    s.add_policies(&[policy("a", "b", Protocol::Tcp, 1, 1)], Some(2)).unwrap();
    let batch = [policy("a", "b", Protocol::Tcp, 2, 2), policy("a", "c", Protocol::Tcp, 3, 3)];
    let before = s.clone();
    let err = s.add_policies(&batch, Some(2)).unwrap_err();
    assert!(err.reason.contains("limit per source app is 2"), "{err}");
    assert_eq!(s, before, "nothing applied");
    // Re-adding an existing policy does not count twice.
    s.add_policies(
        &[policy("a", "b", Protocol::Tcp, 1, 1), policy("a", "b", Protocol::Tcp, 2, 2)],
        Some(2),
    )
    .unwrap();
}

#[test]
fn pairs_group_policies_by_app_pair_and_protocol() {
    let mut s = State::default();
    s.add_policies(
        &[
            policy("a", "b", Protocol::Tcp, 80, 80),
            policy("a", "b", Protocol::Tcp, 8080, 8090),
            policy("a", "b", Protocol::Udp, 53, 53),
        ],
        None,
    )
    .unwrap();
    let pairs = s.pairs();
    assert_eq!(pairs.len(), 2);
    let tcp = &pairs[&PairKey::new(1, 2, proto::TCP)];
    assert_eq!(tcp.len(), 2);
}

#[test]
fn endpoints_keep_their_app_tagged() {
    let mut s = State::default();
    let ep = Endpoint {
        ip: Ipv4Addr::new(10, 255, 0, 1).into(),
        ipv6: None,
        app: "web".into(),
        ifname: "hv0".into(),
        netns: None,
        host: None,
        port_mappings: Vec::new(),
        space_id: None,
        workload: None,
    };
    assert!(s.add_endpoint(ep.clone()).is_none());
    assert_eq!(s.endpoint_values()[&ep.ipv4().unwrap()].tag, 1);
    s.remove_endpoint(ep.ip);
    assert!(s.tags().is_empty());
}

#[test]
fn validation_names_the_field() {
    assert_eq!(check_ports("ports", 0, 5).unwrap_err().field, "ports.start");
    assert_eq!(check_ports("ports", 5, 70000).unwrap_err().field, "ports.end");
    assert!(check_ports("ports", 9, 8).unwrap_err().reason.contains("greater"));
    assert_eq!(check_ports("ports", 1, 65535).unwrap(), (1, 65535));
    assert!(check_app_id("source.id", "").is_err());
    assert!(check_app_id("source.id", &"x".repeat(256)).is_err());
    assert!(check_app_id("source.id", "a,b").is_err());
    // Invisible and text-direction characters: "db\u{200B}" looks like "db".
    for id in ["db\u{200B}", "\u{202E}bd", "a\u{2066}b", "\u{FEFF}db", "a\u{00AD}b", "a\u{E0041}"] {
        let e = check_app_id("source.id", id).unwrap_err();
        assert!(e.reason.contains("invisible or text-direction"), "{id:?}: {e}");
    }
    assert!(check_app_id("source.id", "café-ünïcode").is_ok());
    assert!(check_app_id("source.id", "1081ceac-f5c4-47a8-95e8-88e1e302efb5").is_ok());
}

#[test]
fn state_round_trips_through_json() {
    let mut s = State::default();
    s.add_policies(&[policy("a", "b", Protocol::Tcp, 80, 90)], None).unwrap();
    s.add_endpoint(Endpoint {
        ip: Ipv4Addr::new(10, 0, 0, 1).into(),
        ipv6: None,
        app: "b".into(),
        ifname: "v".into(),
        netns: Some("/run/netns/x".into()),
        host: None,
        port_mappings: Vec::new(),
        space_id: None,
        workload: None,
    });
    let json = serde_json::to_string(&s).unwrap();
    let back: State = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
}

#[test]
fn more_ranges_than_a_pair_holds_are_refused_before_any_change() {
    let mut s = State::default();
    let limit = policy_common::maps::MAX_PORT_RANGES as u16;
    let one_short: Vec<Policy> =
        (0..limit - 1).map(|i| policy("a", "b", Protocol::Tcp, 1000 + i, 1000 + i)).collect();
    s.add_policies(&one_short, None).unwrap();
    let before = s.clone();
    // The same range again shares an entry; another protocol is another pair.
    s.add_policies(&[policy("a", "b", Protocol::Udp, 1000, 1000)], None).unwrap();
    let two_more =
        [policy("a", "b", Protocol::Tcp, 3000, 3000), policy("a", "b", Protocol::Tcp, 3001, 3001)];
    let mut refused = s.clone();
    let err = refused.add_policies(&two_more, None).unwrap_err();
    assert_eq!(err.field, "policies");
    let reason = format!("more than {limit} distinct port ranges");
    assert!(err.reason.contains(&reason), "{err}");
    assert!(err.reason.contains("a to b, tcp"), "{err}");
    assert_eq!(refused, s, "nothing applied");
    s.add_policies(&two_more[..1], None).unwrap();
    assert_ne!(s, before);
}

#[test]
fn the_cli_port_form_is_parsed_once() {
    assert_eq!(parse_port_range("port", "8080").unwrap(), (8080, 8080));
    assert_eq!(parse_port_range("port", "8080-8090").unwrap(), (8080, 8090));
    assert_eq!(parse_port_range("port", "1-65535").unwrap(), (1, 65535));
    for bad in ["0", "65536", "90-80", "x", "1-", "-5", ""] {
        assert!(parse_port_range("port", bad).is_err(), "{bad:?} must be rejected");
    }
    assert!(check_ifname("ifname", "veth0").is_ok());
    for bad in ["", "a/b", "sixteen-chars-xx", "a b"] {
        assert!(check_ifname("ifname", bad).is_err(), "{bad:?}");
    }
}

#[test]
fn app_names_are_held_once_however_many_policies_name_them() {
    let mut s = State::default();
    let policies: Vec<Policy> =
        (1..=50).map(|port| policy("web", "api", Protocol::Tcp, port, port)).collect();
    s.add_policies(&policies, None).unwrap();
    s.add_endpoint(Endpoint::test(1, "api"));
    let shared = |s: &State| {
        let (first, _) = s.policies().next().unwrap();
        let all_policies = s
            .policies()
            .all(|(p, _)| p.source.same(&first.source) && p.destination.same(&first.destination));
        let endpoint = s.endpoints().all(|e| e.app.same(&first.destination));
        all_policies && endpoint
    };
    assert!(shared(&s), "every policy and endpoint holds the state's one copy of each name");
    // The same from a stored state read back.
    let stored = serde_json::to_string(&s).unwrap();
    let back: State = serde_json::from_str(&stored).unwrap();
    assert_eq!(back, s);
    assert!(shared(&back));
    // A name with no policy or endpoint left is no longer held.
    let web = s.policies().next().unwrap().0.source.clone();
    s.remove_policies(&policies);
    assert_eq!(s.tag("web"), None);
    s.add_policies(&[policy("web", "db", Protocol::Udp, 53, 53)], None).unwrap();
    assert!(!s.policies().next().unwrap().0.source.same(&web));
}

#[test]
fn app_names_order_as_their_text() {
    let texts = [
        "",
        "a",
        "ab",
        "ab\0",
        "ab\u{1}",
        "abcdefgh",
        "abcdefgh\0",
        "abcdefghi",
        "abcdefgz",
        "abcdefg",
        "b",
        "é",
        "e\u{301}",
        "frontend",
        "frontend-2",
        "f0c3a1e2-aaaa-bbbb",
        "f0c3a1e2-aaaa-bbbc",
        "zzzzzzzzzzzz",
    ];
    for a in texts {
        for b in texts {
            let (x, y) = (AppName::from(a), AppName::from(b));
            assert_eq!(x.cmp(&y), a.cmp(b), "{a:?} against {b:?}");
            assert_eq!(x == y, a == b, "{a:?} against {b:?}");
        }
    }
}

#[test]
fn the_policies_between_two_apps_and_one_by_id() {
    let mut s = State::default();
    let (tcp, udp, back, other) = (
        policy("a", "b", Protocol::Tcp, 80, 80),
        policy("a", "b", Protocol::Udp, 53, 53),
        policy("b", "a", Protocol::Tcp, 80, 80),
        policy("a", "c", Protocol::Tcp, 80, 80),
    );
    let more = policy("a", "b", Protocol::Tcp, 8000, 8999);
    s.add_policies(&[more.clone(), udp.clone(), back.clone(), tcp.clone(), other], None).unwrap();
    let between: Vec<Policy> = s.policies_between("a", "b").into_iter().map(|(p, _)| p).collect();
    assert_eq!(between, [tcp.clone(), more, udp], "in order, every protocol, one direction");
    assert_eq!(s.policies_between("a", "nobody"), []);
    let id = s.policy_id(&back).unwrap();
    assert_eq!(s.policy_by_id(id), Some(back));
    assert_eq!(s.policy_by_id(id + 100), None);
}
