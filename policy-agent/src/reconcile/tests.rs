//! The reconciler against the in-memory kernel: the full reconcile, and
//! [`apply`] of every kind of change — its result is what a full reconcile
//! to the new state gives, and a failure at any write, or an undo after
//! the fact, leaves every map exactly as before.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::{fake::FakeKernel, *};
use crate::{
    state::{AddressRange, Endpoint, NetOutProtocol, NetOutRule, Policy, Protocol, ServerPolicies},
    store::Change,
};

fn policy(src: &str, dst: &str, port: u16) -> Policy {
    Policy::tcp(src, dst, port)
}

#[test]
fn full_reconcile_adds_before_it_removes_and_keeps_what_matches() {
    let mut kernel = FakeKernel::new(100);
    kernel.interfaces.insert("hv0".into());
    let mut old = State::default();
    old.add_policies(&[policy("a", "b", 80), policy("c", "d", 81)], None).unwrap();
    full(&mut kernel, &old).unwrap();
    let mut new = old.clone();
    new.remove_policies(&[policy("c", "d", 81)]);
    new.add_policies(&[policy("a", "b", 82)], None).unwrap();
    new.add_endpoint(Endpoint {
        ip: Ipv4Addr::new(10, 0, 0, 1).into(),
        ipv6: None,
        app: "b".into(),
        ifname: "hv0".into(),
        netns: None,
        host: None,
        port_mappings: Vec::new(),
        space_id: None,
        workload: None,
    });
    kernel.log.clear();
    full(&mut kernel, &new).unwrap();
    let first_remove = kernel.log.iter().position(|l| l.starts_with("remove")).unwrap();
    let last_add =
        kernel.log.iter().rposition(|l| l.starts_with("set") || l.starts_with("attach")).unwrap();
    assert!(last_add < first_remove, "adds before removes: {:?}", kernel.log);
    assert_eq!(kernel.pairs, new.pairs());
    // Reconciling again writes nothing.
    kernel.log.clear();
    full(&mut kernel, &new).unwrap();
    assert_eq!(kernel.log, ["attach hv0"], "only the idempotent attach");
}

#[test]
fn a_missing_interface_is_a_warning_at_start() {
    let mut kernel = FakeKernel::new(10);
    let mut state = State::default();
    state.add_endpoint(Endpoint {
        ip: Ipv4Addr::new(10, 0, 0, 1).into(),
        ipv6: None,
        app: "b".into(),
        ifname: "gone".into(),
        netns: None,
        host: None,
        port_mappings: Vec::new(),
        space_id: None,
        workload: None,
    });
    let warnings = full(&mut kernel, &state).unwrap();
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("gone"));
    assert_eq!(kernel.endpoints.len(), 1);
}

#[test]
fn a_full_map_rolls_the_change_back() {
    let mut kernel = FakeKernel::new(2);
    let mut old = State::default();
    old.add_policies(&[policy("a", "b", 80)], None).unwrap();
    pairs(&mut kernel, &State::default(), &old).unwrap();
    let mut new = old.clone();
    new.add_policies(&[policy("a", "b", 81), policy("a", "c", 80), policy("a", "d", 80)], None)
        .unwrap();
    let err = pairs(&mut kernel, &old, &new).unwrap_err();
    assert!(matches!(err, DataplaneError::MapFull { .. }));
    assert_eq!(kernel.pairs, old.pairs(), "kernel back to the old state");
}

/// An endpoint of `app` on veth `hv{last}` at 10.255.0.`last`, dual-stack,
/// on `host`.
fn dual(last: u8, app: &str, host: Option<&str>) -> Endpoint {
    Endpoint {
        ip: Ipv4Addr::new(10, 255, 0, last).into(),
        ipv6: Some(Ipv6Addr::new(0xfd00, 0x255, 0, 0, 0, 0, 0, u16::from(last))),
        app: app.into(),
        ifname: format!("hv{last}"),
        netns: None,
        host: host.map(str::to_owned),
        port_mappings: vec![PortMapping {
            host_port: 8000 + u16::from(last),
            container_port: 8080,
            protocol: Protocol::Tcp,
        }],
        space_id: None,
        workload: None,
    }
}

fn egress_to(network: &str) -> NetOutRule {
    let net: Ipv4Addr = network.parse().unwrap();
    NetOutRule {
        protocol: NetOutProtocol::All,
        networks: vec![AddressRange { start: net, end: net }],
        ports: Vec::new(),
        icmps: None,
        log: false,
    }
}

/// This host's state before each change: a policy web → api, web's
/// security groups, and two endpoints here (one per app), dual-stack with
/// NetIn mappings; `host` Some: cluster mode.
fn state_before(host: Option<&str>) -> State {
    let mut state = State::default();
    state.set_local_host(host.map(str::to_owned));
    state.add_policies(&[Policy::tcp("web", "api", 8080)], None).unwrap();
    state.set_netout("web", Some(vec![egress_to("192.0.2.1")]));
    state.add_endpoint(dual(1, "web", host));
    state.add_endpoint(dual(2, "api", host));
    state
}

/// The kernel reconciled to `state`, with veths hv0..hv9.
fn kernel_at(state: &State) -> FakeKernel {
    let mut kernel = FakeKernel::new(100);
    kernel.interfaces.extend((0..10).map(|i| format!("hv{i}")));
    assert!(full(&mut kernel, state).unwrap().is_empty());
    kernel.log.clear();
    kernel
}

/// Applies `change` to `state` failing at each write in turn — each time
/// the kernel is left exactly as before — then without a failure: the
/// kernel is then as a full reconcile to the new state makes it (but for
/// the counters of removed policies, which go once the change is kept), and
/// an undo (the store refused the change) puts it back as before. Returns
/// the kernel after the change and how many writes it took.
fn applies_whole_or_not_at_all(state: &State, change: &Change) -> (FakeKernel, usize) {
    let base = kernel_at(state);
    let mut after = state.clone();
    change.replay(&mut after);
    let mut expected = base.clone();
    full(&mut expected, &after).unwrap();
    for fail_after in 0.. {
        let mut kernel = base.clone();
        kernel.fail_after = Some(fail_after);
        match apply(&mut kernel, &after, before(state, change), &BTreeMap::new()) {
            Err(e) => {
                assert!(matches!(e, DataplaneError::MapFull { capacity: 0, .. }), "{e}");
                assert_eq!(
                    kernel.maps(),
                    base.maps(),
                    "failing after {fail_after} writes of {change:?} is taken back: {:?}",
                    kernel.log
                );
            }
            Ok(applied) => {
                assert!(kernel.fail_after.is_some(), "no write failed unnoticed");
                let counters = expected.counters.clone();
                assert_eq!(
                    FakeKernel { counters, ..kernel.maps() },
                    expected.maps(),
                    "{change:?}: {:?}",
                    kernel.log
                );
                assert!(kernel.counters.is_superset(&expected.counters), "{change:?}");
                let mut undone = kernel.maps();
                applied.undo(&mut undone);
                assert_eq!(undone.maps(), base.maps(), "{change:?} undone after the fact");
                let mut kept = base.clone();
                apply(&mut kept, &after, before(state, change), &BTreeMap::new())
                    .unwrap()
                    .keep(&mut kept);
                assert_eq!(kept.maps(), expected.maps(), "{change:?} kept");
                return (kernel, fail_after);
            }
        }
    }
    unreachable!("the loop returns once no write fails")
}

#[test]
fn policies_added_and_removed_apply_whole_or_not_at_all() {
    let state = state_before(None);
    // A new pair, and an app with security groups gaining a tag: the
    // NetOut trie follows.
    let mut grown = state.clone();
    grown.set_netout("db", Some(vec![egress_to("192.0.2.2")]));
    let add =
        Change::AddPolicies(vec![Policy::tcp("api", "web", 9000), Policy::tcp("db", "web", 5432)]);
    let (kernel, writes) = applies_whole_or_not_at_all(&grown, &add);
    assert!(writes >= 3, "two pairs and the trie: {:?}", kernel.log);
    assert_eq!(
        kernel.netout,
        crate::netout::trie(&{
            let mut s = grown.clone();
            add.replay(&mut s);
            s
        })
    );
    let remove = Change::RemovePolicies(vec![Policy::tcp("web", "api", 8080)]);
    applies_whole_or_not_at_all(&state, &remove);
}

#[test]
fn removed_policies_forget_their_counters_only_when_kept() {
    let state = state_before(None);
    let id = state.policy_id(&Policy::tcp("web", "api", 8080)).unwrap();
    let change = Change::RemovePolicies(vec![Policy::tcp("web", "api", 8080)]);
    let mut after = state.clone();
    change.replay(&mut after);
    let mut kernel = kernel_at(&state);
    assert_eq!(kernel.counters, [id].into());
    let applied = apply(&mut kernel, &after, before(&state, &change), &BTreeMap::new()).unwrap();
    assert!(kernel.forgotten.is_empty() && kernel.pairs.is_empty());
    assert_eq!(kernel.counters, [id].into(), "kept until the change is");
    applied.keep(&mut kernel);
    assert_eq!(kernel.forgotten, [id]);
    assert!(kernel.counters.is_empty());
}

/// Rule 6: a new policy's counters are made before any pair names it, and
/// a removed one's forgotten after no pair does; a policy already in force
/// keeps its counters when added again, and loses them only with the
/// removal that is kept.
#[test]
fn counters_come_before_the_pairs_that_name_their_policy_and_go_after() {
    let state = state_before(None);
    let old = state.policy_id(&Policy::tcp("web", "api", 8080)).unwrap();
    let add =
        Change::AddPolicies(vec![Policy::tcp("web", "api", 8080), policy("api", "web", 9000)]);
    let mut after = state.clone();
    add.replay(&mut after);
    let new = after.policy_id(&policy("api", "web", 9000)).unwrap();
    let mut kernel = kernel_at(&state);
    let applied = apply(&mut kernel, &after, before(&state, &add), &BTreeMap::new()).unwrap();
    let counters = kernel.log.iter().position(|l| l.starts_with("add_policy_counters")).unwrap();
    let pair = kernel.log.iter().position(|l| l.starts_with("set_pair")).unwrap();
    assert!(counters < pair, "{:?}", kernel.log);
    assert_eq!(kernel.log[counters], format!("add_policy_counters [{new}]"), "only the new one");
    assert_eq!(kernel.counters, [old, new].into());
    // Taken back (the store refused it): the pair first, then the counters.
    applied.undo(&mut kernel);
    assert_eq!(kernel.counters, [old].into());
    let log = &kernel.log;
    let forgot = log.iter().rposition(|l| l.starts_with("forget_policies")).unwrap();
    let unpaired = log.iter().rposition(|l| l.starts_with("remove_pair")).unwrap();
    assert!(unpaired < forgot, "{log:?}");

    // Following the policy server: one removed, a new one in the same change.
    let tags = [("web", 1), ("api", 2)].map(|(app, tag)| (app.to_owned(), Some(tag)));
    let mut state = State::default();
    Change::PolicyServer(ServerPolicies {
        add: vec![Policy::tcp("web", "api", 8080)],
        remove: Vec::new(),
        tags: tags.into(),
    })
    .replay(&mut state);
    let old = state.policy_id(&Policy::tcp("web", "api", 8080)).unwrap();
    let change = Change::PolicyServer(ServerPolicies {
        add: vec![policy("web", "api", 8081)],
        remove: vec![Policy::tcp("web", "api", 8080)],
        tags: BTreeMap::new(),
    });
    let mut after = state.clone();
    change.replay(&mut after);
    let added = after.policy_id(&policy("web", "api", 8081)).unwrap();
    let mut kernel = kernel_at(&state);
    let steps = before(&state, &change);
    assert!(format!("{steps:?}").contains("Pairs"), "a change of pairs, not in full: {steps:?}");
    let applied = apply(&mut kernel, &after, steps, &BTreeMap::new()).unwrap();
    assert_eq!(kernel.counters, [old, added].into());
    applied.keep(&mut kernel);
    assert_eq!(kernel.counters, [added].into());
    let forgot = kernel.log.iter().position(|l| l.starts_with("forget_policies")).unwrap();
    assert_eq!(forgot, kernel.log.len() - 1, "after every pair write: {:?}", kernel.log);
}

/// A full reconcile (the agent's start) makes the counters of every policy
/// in force and forgets every other: those an older version left behind
/// for removed policies. With per-policy counting off there are none.
#[test]
fn a_full_reconcile_leaves_counters_for_exactly_the_policies_in_force() {
    let state = state_before(None);
    let id = state.policy_id(&Policy::tcp("web", "api", 8080)).unwrap();
    let mut kernel = FakeKernel::new(100);
    kernel.interfaces.extend((0..10).map(|i| format!("hv{i}")));
    kernel.counters = [id + 1, id + 7].into();
    full(&mut kernel, &state).unwrap();
    assert_eq!(kernel.counters, [id].into());
    let made = kernel.log.iter().position(|l| l.starts_with("add_policy_counters")).unwrap();
    let paired = kernel.log.iter().position(|l| l.starts_with("set_pair")).unwrap();
    let forgot = kernel.log.iter().position(|l| l.starts_with("forget_policies")).unwrap();
    assert!(made < paired && paired < forgot, "{:?}", kernel.log);
    // Again: nothing to do.
    kernel.log.clear();
    full(&mut kernel, &state).unwrap();
    assert!(!kernel.log.iter().any(|l| l.contains("counters") || l.contains("forget")));
    // Counting off: no counters.
    kernel.counting = false;
    full(&mut kernel, &state).unwrap();
    assert!(kernel.counters.is_empty());
    // Every policy gone: none.
    kernel.counting = true;
    full(&mut kernel, &state).unwrap();
    let mut empty = state.clone();
    empty.remove_policies(&[Policy::tcp("web", "api", 8080)]);
    full(&mut kernel, &empty).unwrap();
    assert!(kernel.counters.is_empty() && kernel.pairs.is_empty());
}

#[test]
fn endpoints_added_replaced_and_removed_apply_whole_or_not_at_all() {
    for host in [None, Some("me")] {
        let state = state_before(host);
        // New, dual-stack, with a mapping, of an app with security groups.
        let (kernel, _) =
            applies_whole_or_not_at_all(&state, &Change::AddEndpoint(dual(3, "web", host)));
        assert_eq!(kernel.veths6["hv3"], dual(3, "web", host).ipv6.unwrap());
        assert_eq!(kernel.port_mappings.len(), 3);
        // Replaced on its veth: another app, another IPv6 address, no mapping.
        let moved_app = Endpoint {
            app: "api".into(),
            ipv6: Some("fd00:255::99".parse().unwrap()),
            port_mappings: Vec::new(),
            space_id: None,
            workload: None,
            ..dual(1, "web", host)
        };
        let (kernel, _) = applies_whole_or_not_at_all(&state, &Change::AddEndpoint(moved_app));
        assert_eq!(kernel.veths["hv1"].1, state.tag("api").unwrap());
        // Replaced on another veth, IPv4 only.
        let moved_veth = Endpoint { ifname: "hv7".into(), ipv6: None, ..dual(1, "web", host) };
        let (kernel, _) = applies_whole_or_not_at_all(&state, &Change::AddEndpoint(moved_veth));
        assert!(!kernel.attached.contains_key("hv1") && kernel.attached.contains_key("hv7"));
        // Removed: its app keeps its tag (a policy names it) …
        let ip = IpAddr::from([10, 255, 0, 1]);
        applies_whole_or_not_at_all(&state, &Change::RemoveEndpoint(ip));
        // … or loses it, and its security groups leave the trie.
        let mut alone = state.clone();
        alone.remove_policies(&[Policy::tcp("web", "api", 8080)]);
        let (kernel, _) = applies_whole_or_not_at_all(&alone, &Change::RemoveEndpoint(ip));
        assert!(kernel.netout.is_empty());
    }
}

#[test]
fn endpoints_of_other_hosts_are_addresses_only() {
    let state = state_before(Some("me"));
    let there = dual(4, "api", Some("other"));
    let (kernel, _) = applies_whole_or_not_at_all(&state, &Change::AddEndpoint(there.clone()));
    let value = kernel.endpoints[&Ipv4Addr::new(10, 255, 0, 4)];
    assert_eq!(value.flags, policy_common::maps::endpoint_flags::REMOTE);
    assert!(!kernel.attached.contains_key("hv4"), "no veth here");
    assert_eq!(kernel.port_mappings.len(), 2, "its NetIn is its host's");
    // Moved here from the other host, and from here to it.
    let mut with_there = state.clone();
    with_there.add_endpoint(there.clone());
    let here = Endpoint { host: Some("me".into()), ..there.clone() };
    applies_whole_or_not_at_all(&with_there, &Change::AddEndpoint(here));
    let gone = Endpoint { host: Some("other".into()), ..dual(2, "api", Some("me")) };
    let (kernel, _) = applies_whole_or_not_at_all(&state, &Change::AddEndpoint(gone));
    assert!(!kernel.attached.contains_key("hv2"));
    applies_whole_or_not_at_all(&with_there, &Change::RemoveEndpoint(there.ip));
}

#[test]
fn security_groups_and_routes_apply_whole_or_not_at_all() {
    let state = state_before(None);
    let set = Change::SetNetOut { app: "api".into(), rules: Some(vec![egress_to("198.51.100.1")]) };
    let (kernel, writes) = applies_whole_or_not_at_all(&state, &set);
    assert_eq!((writes, kernel.log.len()), (1, 1), "{:?}", kernel.log);
    let removed = Change::SetNetOut { app: "web".into(), rules: None };
    let (kernel, _) = applies_whole_or_not_at_all(&state, &removed);
    assert!(kernel.netout.is_empty());
    let route = Change::MapRoute { app: "web".into(), hostname: "www".into() };
    let (kernel, writes) = applies_whole_or_not_at_all(&state, &route);
    assert_eq!((writes, kernel.log.len()), (0, 0), "routes are names, not kernel state");
}

#[test]
fn a_state_replaced_whole_is_the_full_reconcile() {
    let state = state_before(None);
    let mut kernel = kernel_at(&State::default());
    let change = Change::Reset(Box::new(state.clone()));
    let mut after = State::default();
    change.replay(&mut after);
    let applied =
        apply(&mut kernel, &after, before(&State::default(), &change), &BTreeMap::new()).unwrap();
    assert!(applied.warnings.is_empty());
    applied.keep(&mut kernel);
    assert_eq!(kernel.maps(), kernel_at(&state).maps());
}

/// The rate-limit keys of an endpoint's addresses (IPv4, IPv6).
fn limit_keys(endpoint: &Endpoint) -> (u32, u32) {
    (address_key(endpoint.ip), address_key(IpAddr::V6(endpoint.ipv6.unwrap())))
}

/// Rule 7: a removed endpoint's rate limits (both addresses, windows
/// running) go once the removal is kept, after its `ENDPOINTS` entries, and
/// every ended window with them (an address that is no endpoint has no
/// other end); a running window of another address stays. Taken back, the
/// removal forgets nothing.
#[test]
fn a_removed_endpoints_rate_limits_go_after_it_once_the_removal_is_kept() {
    let state = state_before(None);
    let (gone, other) = (dual(1, "web", None), dual(2, "api", None));
    let ((gone4, gone6), (other4, other6)) = (limit_keys(&gone), limit_keys(&other));
    let outside = |a: [u8; 4]| address_key(IpAddr::from(a));
    let limits = BTreeMap::from([
        (gone4, false),
        (gone6, false),
        (other4, false),
        (other6, true),
        (outside([203, 0, 113, 9]), false),
        (outside([198, 51, 100, 7]), true),
    ]);
    let change = Change::RemoveEndpoint(gone.ip);
    let mut after = state.clone();
    change.replay(&mut after);

    let mut kernel = kernel_at(&state);
    kernel.limits = limits.clone();
    let applied = apply(&mut kernel, &after, before(&state, &change), &BTreeMap::new()).unwrap();
    assert_eq!(kernel.limits, limits, "kept until the change is");
    applied.undo(&mut kernel);
    assert_eq!(kernel.limits, limits, "a removal taken back forgets nothing");

    let mut kernel = kernel_at(&state);
    kernel.limits = limits;
    apply(&mut kernel, &after, before(&state, &change), &BTreeMap::new())
        .unwrap()
        .keep(&mut kernel);
    assert_eq!(
        kernel.limits,
        BTreeMap::from([(other4, false), (outside([203, 0, 113, 9]), false)]),
        "the running windows of other addresses stay"
    );
    let log = &kernel.log;
    let forgot = log.iter().position(|l| l.starts_with("forget_limits")).unwrap();
    assert_eq!(log[forgot], format!("forget_limits {:?}", BTreeSet::from([gone4, gone6])));
    assert_eq!(forgot, log.len() - 1, "after the endpoint's entries went: {log:?}");
    assert!(log.iter().any(|l| l.starts_with("remove_endpoint6")), "{log:?}");
}

/// An endpoint registered again with another IPv6 address loses the old
/// address's rate limit only; one added (nothing removed) sweeps nothing.
#[test]
fn a_replaced_endpoint_forgets_the_rate_limits_of_the_address_it_lost() {
    let state = state_before(None);
    let old = dual(1, "web", None);
    let (old4, old6) = limit_keys(&old);
    let renumbered = Endpoint { ipv6: Some("fd00:255::99".parse().unwrap()), ..old.clone() };
    let mut kernel = kernel_at(&state);
    kernel.limits = BTreeMap::from([(old4, false), (old6, false)]);
    let change = Change::AddEndpoint(renumbered);
    let mut after = state.clone();
    change.replay(&mut after);
    apply(&mut kernel, &after, before(&state, &change), &BTreeMap::new())
        .unwrap()
        .keep(&mut kernel);
    assert_eq!(kernel.limits, BTreeMap::from([(old4, false)]), "its IPv4 address is still its own");

    let ended = address_key(IpAddr::from([198, 51, 100, 7]));
    let mut kernel = kernel_at(&state);
    kernel.limits = BTreeMap::from([(ended, true)]);
    let change = Change::AddEndpoint(dual(3, "web", None));
    let mut after = state.clone();
    change.replay(&mut after);
    apply(&mut kernel, &after, before(&state, &change), &BTreeMap::new())
        .unwrap()
        .keep(&mut kernel);
    assert_eq!(kernel.limits.len(), 1, "{:?}", kernel.log);
}

/// A full reconcile (a start after endpoints went while the agent was
/// down, a state replaced whole) forgets the rate limits of the endpoints
/// it removes and every ended window; a held endpoint keeps its own.
#[test]
fn a_full_reconcile_forgets_the_rate_limits_of_the_endpoints_it_removes() {
    let state = state_before(None);
    let mut with_gone = state.clone();
    let (gone, held) = (dual(3, "web", None), dual(4, "api", None));
    with_gone.add_endpoint(gone.clone());
    with_gone.add_endpoint(held.clone());
    let ((gone4, gone6), (held4, held6)) = (limit_keys(&gone), limit_keys(&held));
    let (here4, _) = limit_keys(&dual(1, "web", None));
    let outside = address_key(IpAddr::from([203, 0, 113, 9]));
    let ended = address_key(IpAddr::from([198, 51, 100, 7]));
    let limits = BTreeMap::from([
        (gone4, false),
        (gone6, false),
        (held4, false),
        (held6, false),
        (here4, false),
        (outside, false),
        (ended, true),
    ]);
    let kept = BTreeMap::from([(held4, false), (held6, false), (here4, false), (outside, false)]);

    let mut kernel = kernel_at(&with_gone);
    kernel.limits = limits.clone();
    let holding = BTreeMap::from([(held.ip, held.clone())]);
    full_keeping(&mut kernel, &state, &holding).unwrap();
    assert_eq!(kernel.limits, kept);
    let log = &kernel.log;
    let removed = log.iter().rposition(|l| l.starts_with("remove_endpoint")).unwrap();
    let forgot = log.iter().position(|l| l.starts_with("forget_limits")).unwrap();
    assert!(removed < forgot, "{log:?}");
    // Nothing removed: the ended windows still go.
    kernel.limits.insert(ended, true);
    full(&mut kernel, &state).unwrap();
    assert!(!kernel.limits.contains_key(&ended));

    // The state replaced whole (fell behind the cluster's log): once kept.
    let mut kernel = kernel_at(&with_gone);
    kernel.limits = limits;
    let change = Change::Reset(Box::new(state.clone()));
    let mut after = with_gone.clone();
    change.replay(&mut after);
    let applied = apply(&mut kernel, &after, before(&with_gone, &change), &holding).unwrap();
    assert!(kernel.limits.contains_key(&gone4), "kept until the change is");
    applied.keep(&mut kernel);
    assert_eq!(kernel.limits, kept);
}

#[test]
fn allowances_compare_as_sets_of_ranges_and_ids() {
    let a = |start, end, policy_id| Allowance { start, end, policy_id };
    let same =
        |have: &[Allowance], want: &[Allowance]| pairs::same_allowances(Some(&have.to_vec()), want);
    assert!(!pairs::same_allowances(None, &[a(80, 80, 1)]), "no entry is not the same");
    assert!(same(&[a(80, 80, 1)], &[a(80, 80, 1)]));
    assert!(!same(&[a(80, 80, 1)], &[a(80, 80, 2)]), "another policy id");
    assert!(!same(&[a(80, 80, 1)], &[a(80, 81, 1)]));
    assert!(same(&[a(80, 80, 1), a(90, 99, 2)], &[a(90, 99, 2), a(80, 80, 1)]), "any order");
    assert!(!same(&[a(80, 80, 1), a(90, 99, 2)], &[a(80, 80, 1), a(90, 99, 3)]));
    assert!(!same(&[a(80, 80, 1)], &[a(80, 80, 1), a(80, 80, 1)]), "lengths differ");
    let three = [a(1, 1, 1), a(2, 2, 2), a(3, 3, 3)];
    let shuffled = [a(3, 3, 3), a(1, 1, 1), a(2, 2, 2)];
    assert!(same(&three, &shuffled));
    assert!(!same(&three, &[a(3, 3, 3), a(1, 1, 1), a(2, 2, 9)]));
}
