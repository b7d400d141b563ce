//! The agent following the policy server, against the in-memory kernel:
//! policies and tags as the server says, only what differs written, the
//! agent's own writes refused, a failed kernel write changing nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use super::*;
use crate::{reconcile::fake::FakeKernel, state::LOCAL_TAG_BASE, store::Journal};

fn store(name: &str) -> Box<dyn Store> {
    let dir = std::env::temp_dir().join(format!("policy-agent-ps-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    Box::new(Journal::open(&dir).unwrap())
}

fn following(name: &str, kernel: FakeKernel) -> Agent<FakeKernel> {
    let settings = Settings {
        policy_server: Some("https://policy-server.service.cf.internal:4003".into()),
        ..Settings::default()
    };
    Agent::start(kernel, store(name), settings).unwrap().0
}

#[test]
fn the_kernel_holds_what_the_server_says() {
    let mut kernel = FakeKernel::new(100);
    kernel.interfaces.extend(["hv1".to_owned(), "hv2".to_owned()]);
    let mut agent = following("holds", kernel);
    agent.add_endpoint(Endpoint::test(1, "web")).unwrap();
    agent.add_endpoint(Endpoint::test(2, "api")).unwrap();
    let policies = BTreeSet::from([Policy::tcp("web", "api", 8080)]);
    let tags = BTreeMap::from([("web".to_owned(), 1), ("api".to_owned(), 2)]);
    assert_eq!(agent.follow_policy_server(&policies, &tags).unwrap(), (1, 0));
    let k = agent.kernel();
    assert_eq!(k.endpoints[&Ipv4Addr::new(10, 255, 0, 1)].tag, 1, "the server's tag");
    assert_eq!(k.veths["hv1"].1, 1, "the veth binding carries it too");
    assert_eq!(k.pairs, agent.state().pairs());
    assert_eq!(k.pairs.keys().next().map(|p| (p.src_tag, p.dst_tag)), Some((1, 2)));
    // Nothing new: no write at all.
    let writes = agent.kernel().log.len();
    assert_eq!(agent.follow_policy_server(&policies, &tags).unwrap(), (0, 0));
    assert_eq!(agent.kernel().log.len(), writes);
    // The agent's own writes are the server's.
    assert!(matches!(
        agent.add_policies(&[Policy::tcp("api", "web", 1)]),
        Err(AgentError::PolicyServer { .. })
    ));
    assert!(matches!(agent.remove_policies(&[]), Err(AgentError::PolicyServer { .. })));
    // Deleted at the server: the pair goes, web keeps its endpoint with a
    // tag of the agent's own.
    assert_eq!(agent.follow_policy_server(&BTreeSet::new(), &BTreeMap::new()).unwrap(), (0, 1));
    assert!(agent.kernel().pairs.is_empty());
    assert!(agent.kernel().endpoints[&Ipv4Addr::new(10, 255, 0, 1)].tag >= LOCAL_TAG_BASE);
}

#[test]
fn a_kernel_that_refuses_changes_nothing() {
    let mut kernel = FakeKernel::new(100);
    kernel.interfaces.insert("hv1".to_owned());
    let mut agent = following("refuses", kernel);
    agent.add_endpoint(Endpoint::test(1, "web")).unwrap();
    let one = BTreeSet::from([Policy::tcp("web", "api", 8080)]);
    let tags = BTreeMap::from([("web".to_owned(), 1), ("api".to_owned(), 2)]);
    agent.follow_policy_server(&one, &tags).unwrap();
    let (state, maps) = (agent.state().clone(), agent.kernel().maps());
    // A second pair does not fit.
    agent.kernel.pair_capacity = 1;
    let two = BTreeSet::from([Policy::tcp("web", "api", 8080), Policy::tcp("web", "db", 5432)]);
    let more = BTreeMap::from([("web".to_owned(), 1), ("api".to_owned(), 2), ("db".to_owned(), 3)]);
    assert!(matches!(
        agent.follow_policy_server(&two, &more),
        Err(AgentError::Kernel(DataplaneError::MapFull { .. }))
    ));
    assert_eq!(agent.state(), &state);
    agent.kernel.pair_capacity = 100;
    assert_eq!(agent.kernel().maps(), maps);
}
