//! The HTTP API: Cloud Foundry's policy-server external API (request and
//! response bodies unchanged) plus endpoints, routes and observability.
//! One file per resource; the JSON shapes are in `wire`.
//!
//! - `GET  /networking/v1/external/policies[?id=&source_id=&dest_id=]`
//! - `POST /networking/v1/external/policies`
//! - `POST /networking/v1/external/policies/delete`
//! - `GET  /networking/v1/external/tags`
//! - `GET  /v1/policies/stats`
//! - `GET  /v1/endpoints`, `POST /v1/endpoints`, `DELETE /v1/endpoints/{ip}`
//! - `GET  /v1/routes`, `POST /v1/routes`, `POST /v1/routes/delete`
//! - `GET  /v1/status`, `GET /v1/flows`, `GET /v1/explain`
//! - `GET  /v1/cluster`, `POST /v1/cluster/republish`
//!
//! Errors are JSON: `{"error": "...", "field": "...", "reason": "..."}` with
//! 400 for bad input (nothing of the request applied), 507 when a kernel
//! map is full, 503 in cluster mode when etcd cannot take the write
//! (unreachable, a concurrent write, a log that diverged from this host's:
//! then with its `"cause"`), 500 otherwise.

mod asgs;
pub mod auth;
mod cluster;
mod endpoints;
mod observe;
mod policies;
mod routes;
pub mod wire;

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Body,
    extract::{DefaultBodyLimit, MatchedPath, Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse as _, Response},
    routing::{delete, get, post, put},
};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{
    Dataplane, DataplaneError,
    agent::{self, Agent, AgentError, SharedAgent},
    cluster::ClusterConfig,
    etcd::EtcdError,
    flows::FlowHub,
    metrics::{ApiLabels, Metrics},
    state::Invalid,
    store::StoreError,
    tls::TlsProxies,
};

#[derive(Clone)]
pub struct Api {
    pub agent: SharedAgent,
    pub max_body_bytes: usize,
    /// Request bodies in memory at once, in KiB (`body_budget_bytes`).
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// Time to receive a request body.
    pub request_timeout: std::time::Duration,
    pub hub: Arc<FlowHub>,
    pub metrics: Arc<Metrics>,
    /// Becomes true at shutdown: ends `flows --follow` streams.
    pub stopping: watch::Receiver<bool>,
    /// Platform TLS listeners (None: off).
    pub tls: Option<Arc<TlsProxies>>,
    /// Cluster mode (None: a single host).
    pub cluster: Option<ClusterConfig>,
    /// Addresses for containers on this host (`GET /v1/ipam`).
    pub ipam: Ipam,
    /// Where this host's platform CA is kept (None: the agent has none,
    /// neither TLS listeners nor an HTTPS API), for `api-identity`.
    pub platform_ca: Option<crate::tls::CaFiles>,
    /// Cloud Foundry's policy server as the source of policies (`[cf]`):
    /// its follower's status, and forced polls on registration.
    pub policy_server: Option<PolicyServer>,
}

/// The policy server follower as the API reaches it.
#[derive(Clone)]
pub struct PolicyServer {
    pub status: crate::cf::SharedStatus,
    pub poll: crate::cf::PollHandle,
    /// How long a registration waits for its forced poll.
    pub timeout: std::time::Duration,
    /// Dynamic security groups (`enable_asg_syncing`): their poller.
    pub asgs: Option<AsgPoller>,
}

/// The security groups' poller as the API reaches it.
#[derive(Clone)]
pub struct AsgPoller {
    pub status: crate::cf::SharedStatus,
    pub poll: crate::cf::PollHandle,
    /// The apps whose NetOut rules are the server's groups.
    pub managed: crate::cf::asg_follow::ManagedApps,
}

impl AsgPoller {
    /// Whether `app`'s NetOut rules are the policy server's groups.
    pub fn manages(&self, app: &str) -> bool {
        self.managed.lock().unwrap_or_else(|p| p.into_inner()).contains(app)
    }
}

/// Where this host's containers get addresses: what a CNI plugin asks for.
#[derive(Clone, Debug)]
pub struct Ipam {
    /// This host's part of the overlay (None: the overlay is off).
    pub subnet: Option<(std::net::Ipv4Addr, u8)>,
    pub gateway: std::net::Ipv4Addr,
    /// The containers' MTU when traffic leaves through the VXLAN device.
    pub mtu: Option<u32>,
}

type Reply = (StatusCode, Json<Value>);

/// On reads in cluster mode: seconds since this agent's state last matched
/// etcd.
pub const STATE_AGE_HEADER: &str = "x-state-age-seconds";

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/networking/v1/external/policies", get(policies::list).post(policies::create))
        .route("/networking/v1/external/policies/delete", post(policies::delete))
        .route("/networking/v1/external/tags", get(policies::tags))
        .route("/v1/policies/stats", get(policies::stats))
        .route("/v1/endpoints", get(endpoints::list).post(endpoints::add))
        .route("/v1/endpoints/{ip}", delete(endpoints::remove))
        .route("/v1/routes", get(routes::list).post(routes::map))
        .route("/v1/routes/delete", post(routes::unmap))
        .route("/v1/status", get(observe::status))
        .route("/v1/flows", get(observe::flows))
        .route("/v1/explain", get(observe::explain))
        .route("/v1/cluster", get(cluster::status))
        .route("/v1/cluster/republish", post(cluster::republish))
        .route("/v1/ipam", get(ipam))
        .route("/v1/asgs", get(asgs::list))
        .route("/v1/asgs/{app}", put(asgs::set).delete(asgs::remove))
        .layer(middleware::from_fn_with_state(api.clone(), within_budget))
        .layer(middleware::from_fn(auth::authorize))
        .layer(middleware::from_fn_with_state(api.clone(), record_request))
        // Bodies are read with our own limit, to answer 400 in JSON.
        .layer(DefaultBodyLimit::disable())
        .with_state(api)
}

/// `GET /v1/ipam`: `{"subnet": "10.255.3.0/24", "gateway": "169.254.0.1",
/// "mtu": 1450}` (`subnet` and `mtu` null when unknown).
async fn ipam(State(api): State<Api>) -> Reply {
    let ipam = &api.ipam;
    ok(wire::to_json(&policy_api::wire::Ipam {
        subnet: ipam.subnet.map(|(net, prefix)| format!("{net}/{prefix}")),
        gateway: ipam.gateway.to_string(),
        mtu: ipam.mtu,
    }))
}

fn invalid(e: &Invalid) -> Reply {
    (
        StatusCode::BAD_REQUEST,
        Json(wire::to_json(&policy_api::wire::ErrorReply {
            error: e.to_string(),
            field: Some(e.field.clone()),
            reason: Some(e.reason.clone()),
        })),
    )
}

fn failure(e: AgentError) -> Reply {
    match e {
        AgentError::Invalid(e) => invalid(&e),
        e @ AgentError::PolicyServer { .. } => {
            (StatusCode::CONFLICT, Json(json!({"error": e.to_string()})))
        }
        AgentError::Kernel(e @ DataplaneError::MapFull { .. }) => {
            (StatusCode::INSUFFICIENT_STORAGE, Json(json!({"error": e.to_string()})))
        }
        AgentError::Store(e) if e.no_space().is_some() => {
            let dir = e.no_space().unwrap_or(std::path::Path::new("")).display().to_string();
            let error =
                format!("no space left in the state directory {dir}: nothing was applied ({e})");
            (StatusCode::INSUFFICIENT_STORAGE, Json(json!({"error": error})))
        }
        // Cluster mode: nothing was applied; enforcement is as it was. A
        // refusal by etcd (its role does not reach the prefix, say) is the
        // operator's to fix, as an outage is.
        AgentError::Store(
            e @ (StoreError::Etcd(EtcdError::Unreachable { .. } | EtcdError::Refused { .. })
            | StoreError::Conflict),
        ) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": e.to_string()}))),
        // Enforcement stays as this host last applied it.
        AgentError::Store(StoreError::Diverged(d)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": format!("writes are refused: {d}"), "cause": d.cause()})),
        ),
        e => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": e.to_string()}))),
    }
}

fn ok(value: Value) -> Reply {
    (StatusCode::OK, Json(value))
}

/// `{}` for a write, or its failure.
fn written<T>(result: Result<T, AgentError>) -> Reply {
    match result {
        Ok(_) => ok(json!({})),
        Err(e) => failure(e),
    }
}

async fn read_json(api: &Api, body: Body) -> Result<Value, Invalid> {
    let bytes = read_body(api, body).await?;
    serde_json::from_slice(&bytes).map_err(|e| Invalid::new("body", format!("invalid JSON: {e}")))
}

/// A request's body, within the time and size the API allows.
async fn read_body(api: &Api, body: Body) -> Result<axum::body::Bytes, Invalid> {
    let bytes =
        tokio::time::timeout(api.request_timeout, axum::body::to_bytes(body, api.max_body_bytes))
            .await
            .map_err(|_| {
                Invalid::new(
                    "body",
                    format!("not received within {} s", api.request_timeout.as_secs()),
                )
            })?
            .map_err(|_| {
                Invalid::new("body", format!("larger than {} bytes", api.max_body_bytes))
            })?;
    Ok(bytes)
}

/// Runs `f` on the agent off the async runtime (it makes syscalls and
/// fsyncs).
async fn with_agent<T: Send + 'static>(
    api: &Api,
    f: impl FnOnce(&mut Agent<Dataplane>) -> T + Send + 'static,
) -> T {
    let agent = api.agent.clone();
    tokio::task::spawn_blocking(move || f(&mut agent::lock(&agent)))
        .await
        .expect("agent task panicked")
}

/// A write, timed into `enforceTime`; kernel and store failures counted.
async fn timed_write<T: Send + 'static>(
    api: &Api,
    f: impl FnOnce(&mut Agent<Dataplane>) -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    let started = std::time::Instant::now();
    let result = with_agent(api, f).await;
    match &result {
        Ok(_) => api.metrics.enforce_time.observe(started.elapsed().as_secs_f64()),
        Err(AgentError::Kernel(_) | AgentError::Store(_)) => {
            api.metrics.reconcile_errors.inc();
        }
        Err(AgentError::Invalid(_) | AgentError::PolicyServer { .. }) => {}
    }
    result
}

/// A write to endpoints or routes: the TLS listeners follow it (what they
/// want is taken under the agent's lock, namespaces are entered after).
async fn tracked_write<T: Send + 'static>(
    api: &Api,
    f: impl FnOnce(&mut Agent<Dataplane>) -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    let tls = api.tls.clone();
    let wanted = tls.clone();
    let (result, wants) = timed_write(api, move |agent| {
        let result = f(agent);
        Ok((result, wanted.map(|tls| tls.wanted(agent.state()))))
    })
    .await?;
    if let (Some(tls), Some(wants)) = (tls, wants) {
        let _ = tokio::task::spawn_blocking(move || tls.apply(wants)).await;
    }
    result
}

/// Holds a request with a body to the memory budget for bodies: its
/// `Content-Length` (or the largest body allowed, when it does not say) is
/// taken from the budget for as long as the request runs. Past the budget a
/// request waits up to the request timeout, then gets 503.
async fn within_budget(State(api): State<Api>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let has_body = declared.is_some_and(|n| n > 0)
        || request.headers().contains_key(axum::http::header::TRANSFER_ENCODING);
    if !has_body {
        return next.run(request).await;
    }
    let bytes = declared.unwrap_or(api.max_body_bytes).min(api.max_body_bytes);
    let kib = u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    let permit =
        tokio::time::timeout(api.request_timeout, api.body_budget.clone().acquire_many_owned(kib))
            .await;
    let Ok(Ok(_permit)) = permit else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "too many large requests in flight; try again"})),
        )
            .into_response();
    };
    let response = next.run(request).await;
    if bytes >= 1 << 20 {
        // Hand the freed buffers of a large body back to the system.
        // SAFETY: malloc_trim only releases free memory.
        unsafe { libc::malloc_trim(0) };
    }
    response
}

/// Counts and times every request by method, route and status.
async fn record_request(State(api): State<Api>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = std::time::Instant::now();
    let is_read = request.method() == axum::http::Method::GET;
    let mut response = next.run(request).await;
    if is_read && api.cluster.is_some() {
        // Reads are answered from this agent's copy of the cluster state:
        // say how old it is (seconds since it last matched etcd).
        let age = with_agent(&api, |agent| agent.state_age()).await;
        if let Ok(value) = format!("{:.3}", age.as_secs_f64()).parse() {
            response.headers_mut().insert(STATE_AGE_HEADER, value);
        }
    }
    let labels = ApiLabels { method, path, status: response.status().as_u16() };
    api.metrics.api_requests.get_or_create(&labels).inc();
    api.metrics.api_latency.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    response
}
