//! The agent's API as the benchmarks drive it: policies in Cloud Foundry's
//! JSON, posted in batches.

use policy_api::Client;
use serde_json::{Value, json};

/// One policy `src → dst` on `protocol` port `port`.
pub fn policy(src: &str, dst: &str, protocol: &str, port: u16) -> Value {
    json!({"source": {"id": src}, "destination": {"id": dst, "protocol": protocol, "ports": {"start": port, "end": port}}})
}

/// Posts `policies` to `path` (a write or a delete); panics unless 200.
pub fn post(client: &Client, path: &str, policies: Vec<Value>) {
    let reply =
        client.request("POST", path, Some(&json!({"policies": policies}))).expect("API request");
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// [`post`] of a request body already written out.
pub fn post_bytes(client: &Client, path: &str, body: &[u8]) {
    let reply = client.request_bytes("POST", path, body).expect("API request");
    assert_eq!(reply.status, 200, "{}", reply.body);
}
