//! Cloud Foundry's real policy server, as the tests run it
//! (`integration_tests::cf`): a policy written through the external API
//! shows up on the internal mutual-TLS API the cells poll, with the
//! policy server's tags, and goes when deleted; the internal API refuses
//! clients without a certificate of its CA.

use integration_tests::cf::PolicyServer;

fn last_updated(server: &PolicyServer) -> u64 {
    let value = server.internal_get("policies_last_updated");
    value.as_u64().unwrap_or_else(|| panic!("policies_last_updated is not an integer: {value}"))
}

fn is_tag(value: &serde_json::Value) -> bool {
    value.as_str().is_some_and(|t| {
        t.len() == 4 && t.chars().all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c))
    })
}

#[test]
fn policy_written_externally_is_served_internally() {
    integration_tests::require_root();
    let server = PolicyServer::start();
    println!("policy server started in {:.1?}", server.startup);

    let before = last_updated(&server);
    let policy = ("app-a", "app-b", "tcp", 8080, 8080);
    server.add_policies(&[policy]);

    let listed = server.internal_get("policies?id=app-a");
    assert_eq!(listed["total_policies"], 1, "{listed}");
    let served = &listed["policies"][0];
    assert_eq!(served["source"]["id"], "app-a", "{listed}");
    assert_eq!(served["destination"]["id"], "app-b", "{listed}");
    assert_eq!(served["destination"]["protocol"], "tcp", "{listed}");
    assert_eq!(served["destination"]["ports"]["start"], 8080, "{listed}");
    assert_eq!(served["destination"]["ports"]["end"], 8080, "{listed}");
    assert!(is_tag(&served["source"]["tag"]), "source tag: {listed}");
    assert!(is_tag(&served["destination"]["tag"]), "destination tag: {listed}");
    assert_ne!(served["source"]["tag"], served["destination"]["tag"], "{listed}");
    // The destination's side too: a cell hosting only app-b asks for it.
    let by_destination = server.internal_get("policies?id=app-b");
    assert_eq!(by_destination["total_policies"], 1, "{by_destination}");
    let after_add = last_updated(&server);
    assert!(after_add > before, "policies_last_updated did not grow: {before} -> {after_add}");

    let refused = server.internal_get_as("policies", None);
    assert!(refused.is_err(), "no client certificate, yet answered: {refused:?}");
    let stranger = server.internal_get_as("policies", Some(server.stranger_identity()));
    assert!(stranger.is_err(), "a certificate from another CA, yet answered: {stranger:?}");
    println!("refused without a certificate: {}", refused.unwrap_err());
    println!("refused from another CA: {}", stranger.unwrap_err());

    server.delete_policies(&[policy]);
    let listed = server.internal_get("policies?id=app-a");
    assert_eq!(listed["total_policies"], 0, "{listed}");
    let after_delete = last_updated(&server);
    assert!(after_delete > after_add, "policies_last_updated did not grow on delete");
}
