//! Endpoints: what a CNI plugin registers and removes.

use std::net::IpAddr;

use axum::{
    body::Body,
    extract::{Path, State},
};
use serde_json::{Value, json};

use crate::state::Invalid;

use super::{Api, Reply, failure, invalid, ok, read_json, tracked_write, wire, with_agent};

/// `GET /v1/endpoints`: each with its TLS ports (Cloud Foundry's
/// `CF_INSTANCE_PORTS` shape) and identity files where platform TLS serves it.
pub async fn list(State(api): State<Api>) -> Reply {
    let tls = api.tls.clone();
    let endpoints: Vec<Value> = with_agent(&api, move |agent| {
        let state = agent.state();
        state
            .endpoints()
            .map(|e| {
                let mut v = wire::endpoint_json(e);
                if let (Some(front), Some(_)) = (state.tls_front(&e.app), &e.netns) {
                    v["ports"] =
                        json!([{"internal": front.app_port, "internal_tls_proxy": front.tls_port}]);
                    if let Some(tls) = &tls {
                        let (cert, key) = tls.identity_files(e.ip);
                        v["instance_cert"] = json!(cert);
                        v["instance_key"] = json!(key);
                    }
                }
                v
            })
            .collect()
    })
    .await;
    ok(json!({"endpoints": endpoints}))
}

/// `POST /v1/endpoints`.
pub async fn add(State(api): State<Api>, body: Body) -> Reply {
    let endpoint = match read_json(&api, body).await.and_then(|v| wire::parse_endpoint(&v)) {
        Ok(e) => e,
        Err(e) => return invalid(&e),
    };
    // Checked before the agent's lock is taken: a FIFO or any file that is
    // not a network namespace is refused without blocking anything.
    if let Some(Err(reason)) = endpoint.netns.as_deref().map(crate::netns::open) {
        return invalid(&Invalid::new("netns", reason));
    }
    let reply = wire::endpoint_json(&endpoint);
    match tracked_write(&api, move |agent| agent.add_endpoint(endpoint)).await {
        Ok(()) => ok(reply),
        Err(e) => failure(e),
    }
}

/// `DELETE /v1/endpoints/{ip}`: either of the endpoint's addresses.
pub async fn remove(State(api): State<Api>, Path(ip): Path<String>) -> Reply {
    let ip = match ip.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => return invalid(&Invalid::new("ip", format!("{ip:?} is not an IP address"))),
    };
    match tracked_write(&api, move |agent| agent.remove_endpoint(ip)).await {
        Ok(removed) => ok(json!({"removed": removed})),
        Err(e) => failure(e),
    }
}
