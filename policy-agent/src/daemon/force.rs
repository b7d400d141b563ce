//! vxlan-policy-agent's force endpoints (`force_policy_poll_cycle_listen`,
//! or `force_policy_poll_cycle_host/port` of its config), as
//! cni-wrapper-plugin calls them on a Diego cell: plain HTTP, any method,
//! answered when the work is done, text bodies.
//!
//! - `/force-policy-poll-cycle`: a poll now (the metadata store read, the
//!   policies fetched and in force); 200 with an empty body, or 500
//!   `failed to force policy poll cycle: ...`.
//! - `/force-asgs-for-container?container=HANDLE` and
//!   `/force-orphaned-asgs-cleanup?container=HANDLE`: 405 `ASG syncing has
//!   been disabled administratively` when it is off (cni-wrapper-plugin
//!   then applies the container's static rules itself), 400 `no container
//!   specified`; else a policy poll (the store read) and a security
//!   groups poll now, 200 `updated container H` / `cleaned up ASGs for
//!   container H`, or 500 naming the failure.

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use axum::{extract::Query, http::StatusCode, routing::any};
use policy_agent::{
    api::PolicyServer,
    cf::CfConfig,
    config::Config,
    limits::{Gate, Plain, serve_http},
};
use tokio::{net::TcpListener, sync::watch};
use tracing::info;

use super::serve::Servers;

type Answer = (StatusCode, String);

pub async fn serve(
    config: &Config,
    cf: &CfConfig,
    server: PolicyServer,
    stop: &watch::Receiver<bool>,
    servers: &mut Servers,
) -> Result<()> {
    let Some(addr) = cf.force_policy_poll_cycle_listen else { return Ok(()) };
    let tcp = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve the force endpoints on {addr} - is vxlan-policy-agent still running there?"))?;
    info!(%addr, "vxlan-policy-agent's force endpoints (force-policy-poll-cycle, force-asgs-for-container)");
    let (poll, for_asgs, for_cleanup) = (server.clone(), server.clone(), server);
    let app = axum::Router::new()
        .route("/force-policy-poll-cycle", any(move || force_cycle(poll.clone())))
        .route(
            "/force-asgs-for-container",
            any(move |query| for_container(for_asgs.clone(), query, "updated container")),
        )
        .route(
            "/force-orphaned-asgs-cleanup",
            any(move |query| {
                for_container(for_cleanup.clone(), query, "cleaned up ASGs for container")
            }),
        );
    let limits = &config.limits;
    let gate = Gate::new("force", limits.api_connections, limits.per_source_connections);
    let serve = serve_http("force", tcp, Plain, app, gate, limits.header_timeout(), stop.clone());
    servers.spawn(async move {
        serve.await;
        Ok(())
    });
    Ok(())
}

/// A policy poll now, waited for; the error of the last try if it failed.
async fn poll_now(server: &PolicyServer) -> Result<(), String> {
    forced(&server.poll, &server.status, server.timeout).await
}

/// A poll of `poll` now, waited for; the error of the last try (in
/// `status`) if it failed.
async fn forced(
    poll: &policy_agent::cf::PollHandle,
    status: &policy_agent::cf::SharedStatus,
    timeout: std::time::Duration,
) -> Result<(), String> {
    let poll = poll.clone();
    let finished = tokio::task::spawn_blocking(move || poll.force(timeout)).await.unwrap_or(false);
    let status = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match (finished, status.consecutive_failures, status.last_error) {
        (true, 0, _) => Ok(()),
        (false, _, _) => Err(format!("no answer within {} s", timeout.as_secs())),
        (true, _, Some(e)) => Err(e.message),
        (true, _, None) => Err("the poll failed".into()),
    }
}

async fn force_cycle(server: PolicyServer) -> Answer {
    match poll_now(&server).await {
        Ok(()) => (StatusCode::OK, String::new()),
        Err(e) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("failed to force policy poll cycle: {e}"))
        }
    }
}

async fn for_container(
    server: PolicyServer,
    Query(query): Query<HashMap<String, String>>,
    done: &'static str,
) -> Answer {
    let Some(policy_agent::api::AsgPoller { status: asg_status, poll: asg_poll, .. }) =
        server.asgs.clone()
    else {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            "ASG syncing has been disabled administratively".into(),
        );
    };
    let Some(handle) = query.get("container").filter(|h| !h.is_empty()) else {
        return (StatusCode::BAD_REQUEST, "no container specified".into());
    };
    // The store first (the container's space), then its groups.
    let synced = match poll_now(&server).await {
        Ok(()) => forced(&asg_poll, &asg_status, server.timeout).await,
        Err(e) => Err(e),
    };
    match synced {
        Ok(()) => (StatusCode::OK, format!("{done} {handle}")),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("failed to update asgs for container {handle}: {e}"),
        ),
    }
}
