//! Endpoints: what a CNI plugin registers and removes.

use std::{net::IpAddr, path::PathBuf};

use axum::{
    body::Body,
    extract::{Path, State},
};
use policy_api::wire as shapes;
use serde_json::json;

use crate::{agent::AgentError, state::Invalid, store::StoreError, tls::TlsError};

use super::{Api, Reply, failure, invalid, ok, read_json, tracked_write, wire, with_agent};

/// `GET /v1/endpoints`: each with its TLS ports (Cloud Foundry's
/// `CF_INSTANCE_PORTS` shape) and identity files where platform TLS serves it.
pub async fn list(State(api): State<Api>) -> Reply {
    let tls = api.tls.clone();
    let endpoints = with_agent(&api, move |agent| {
        let state = agent.state();
        state
            .endpoints()
            .map(|e| {
                let mut shape = wire::endpoint_shape(e);
                if let (Some(front), Some(_)) = (state.tls_front(&e.app), &e.netns) {
                    shape.ports = Some(vec![shapes::InstancePorts {
                        internal: front.app_port,
                        internal_tls_proxy: front.tls_port,
                    }]);
                    if let Some(tls) = &tls {
                        let (cert, key) = tls.identity_files(e.ip);
                        (shape.instance_cert, shape.instance_key) = (Some(cert), Some(key));
                    }
                }
                shape
            })
            .collect()
    })
    .await;
    ok(wire::to_json(&shapes::Endpoints { endpoints }))
}

/// `POST /v1/endpoints`.
pub async fn add(State(api): State<Api>, body: Body) -> Reply {
    let endpoint = match read_json(&api, body).await.and_then(|v| wire::parse_endpoint(&v)) {
        Ok(e) => e,
        Err(e) => return invalid(&e),
    };
    // Checked before the agent's lock is taken: a FIFO or any file that is
    // not a network namespace is refused without blocking anything.
    if let Some(Err(e)) = endpoint.netns.as_deref().map(policy_api::netns::open) {
        return invalid(&Invalid::new("netns", e.to_string()));
    }
    let mut reply = wire::endpoint_json(&endpoint);
    let (app, in_a_space) = (endpoint.app.clone(), endpoint.space_id.is_some());
    let tls = api.tls.clone();
    let registered = tracked_write(&api, move |agent| {
        // Its identity is stored before it is registered: a full disk
        // refuses the registration (507) with nothing changed.
        if let Some(tls) = &tls {
            tls.prepare(&endpoint, agent.state()).map_err(identity_not_stored)?;
        }
        let ip = endpoint.ip;
        agent.add_endpoint(endpoint).inspect_err(|_| {
            if let Some(tls) = &tls {
                tls.unprepare(ip);
            }
        })
    });
    match registered.await {
        Ok(()) => {
            force_policy_poll(&api).await;
            if in_a_space && force_asg_poll(&api, &app).await {
                // Its security groups hold already: a CNI plugin does not
                // set the runtime's static ones (policy-cni reads this).
                reply["security_groups"] = json!("policy_server");
            }
            ok(reply)
        }
        Err(e) => failure(e),
    }
}

/// With a policy server as the source: polls it at once for the new
/// container's policies (as cni-wrapper-plugin forces vxlan-policy-agent's
/// poll), so they hold before the registration is answered. A server
/// that does not answer in time delays nothing further: the regular poll
/// follows, and `status` says why.
async fn force_policy_poll(api: &Api) {
    if let Some(server) = &api.policy_server {
        let (poll, timeout) = (server.poll.clone(), server.timeout);
        let _ = tokio::task::spawn_blocking(move || poll.force(timeout)).await;
    }
}

/// With the policy server's security groups synced: polls them at once
/// for a container in a space, so its app's groups hold before the
/// registration is answered. Whether they do.
async fn force_asg_poll(api: &Api, app: &str) -> bool {
    let Some((server, asgs)) = api.policy_server.as_ref().and_then(|s| Some((s, s.asgs.clone()?)))
    else {
        return false;
    };
    let (poll, timeout) = (asgs.poll.clone(), server.timeout);
    let _ = tokio::task::spawn_blocking(move || poll.force(timeout)).await;
    asgs.manages(app)
}

/// A registration refused because its instance identity could not be
/// written: as the store's own failures (507 when the disk is full).
fn identity_not_stored(e: TlsError) -> AgentError {
    let (what, path, source) = match e {
        TlsError::Io { what, path, source } => (what, path, source),
        other => ("issue the instance identity for", PathBuf::new(), std::io::Error::other(other)),
    };
    AgentError::Store(StoreError::Io { what, path, source })
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
