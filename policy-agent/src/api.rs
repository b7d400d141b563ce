//! The HTTP API: Cloud Foundry's policy-server external API (request and
//! response bodies unchanged) plus endpoints and status.
//!
//! - `GET  /networking/v1/external/policies[?id=&source_id=&dest_id=]`
//! - `POST /networking/v1/external/policies`
//! - `POST /networking/v1/external/policies/delete`
//! - `GET  /networking/v1/external/tags`
//! - `GET  /v1/endpoints`, `POST /v1/endpoints`, `DELETE /v1/endpoints/{ip}`
//! - `GET  /v1/status`
//!
//! Errors are JSON: `{"error": "...", "field": "...", "reason": "..."}` with
//! 400 for bad input (nothing of the request applied), 507 when a kernel
//! map is full, 500 otherwise.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    body::Body,
    extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use serde_json::{Value, json};
use tokio::sync::{broadcast::error::RecvError, watch};

use crate::{
    Dataplane, Error,
    agent::{Agent, AgentError},
    flows::FlowHub,
    metrics::{ApiLabels, Metrics},
    state::{Endpoint, Invalid, Policy, Protocol, check_app_id, check_ports, tag_text},
};

pub type SharedAgent = Arc<Mutex<Agent<Dataplane>>>;

#[derive(Clone)]
pub struct Api {
    pub agent: SharedAgent,
    pub max_body_bytes: usize,
    pub hub: Arc<FlowHub>,
    pub metrics: Arc<Metrics>,
    /// Becomes true at shutdown: ends `flows --follow` streams.
    pub stopping: watch::Receiver<bool>,
    /// Platform TLS listeners (None: off).
    pub tls: Option<Arc<crate::tls::TlsProxies>>,
}

/// Brings the TLS listeners in line after a change to endpoints or routes.
fn sync_tls(tls: &Option<Arc<crate::tls::TlsProxies>>, agent: &Agent<Dataplane>) {
    if let Some(tls) = tls {
        tls.sync(agent.state());
    }
}

type Reply = (StatusCode, Json<Value>);

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/networking/v1/external/policies", get(list_policies).post(create_policies))
        .route("/networking/v1/external/policies/delete", post(delete_policies))
        .route("/networking/v1/external/tags", get(list_tags))
        .route("/v1/endpoints", get(list_endpoints).post(add_endpoint))
        .route("/v1/endpoints/{ip}", delete(remove_endpoint))
        .route("/v1/status", get(status))
        .route("/v1/flows", get(flows))
        .route("/v1/explain", get(explain))
        .route("/v1/policies/stats", get(policy_stats))
        .route("/v1/routes", get(list_routes).post(map_route))
        .route("/v1/routes/delete", post(unmap_route))
        .layer(middleware::from_fn_with_state(api.clone(), record_request))
        // Bodies are read with our own limit, to answer 400 in JSON.
        .layer(DefaultBodyLimit::disable())
        .with_state(api)
}

fn invalid(e: &Invalid) -> Reply {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": e.to_string(), "field": e.field, "reason": e.reason})),
    )
}

fn failure(e: AgentError) -> Reply {
    match e {
        AgentError::Invalid(e) => invalid(&e),
        AgentError::Kernel(e @ Error::MapFull { .. }) => {
            (StatusCode::INSUFFICIENT_STORAGE, Json(json!({"error": e.to_string()})))
        }
        // Valid policies the dataplane cannot hold for one app pair: the
        // request as a whole is refused.
        AgentError::Kernel(Error::Ports(e)) => invalid(&Invalid::new("policies", e.to_string())),
        e => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": e.to_string()}))),
    }
}

fn ok(value: Value) -> Reply {
    (StatusCode::OK, Json(value))
}

async fn read_json(api: &Api, body: Body) -> Result<Value, Invalid> {
    let bytes = axum::body::to_bytes(body, api.max_body_bytes)
        .await
        .map_err(|_| Invalid::new("body", format!("larger than {} bytes", api.max_body_bytes)))?;
    serde_json::from_slice(&bytes).map_err(|e| Invalid::new("body", format!("invalid JSON: {e}")))
}

/// Runs `f` on the agent off the async runtime (it makes syscalls and
/// fsyncs).
async fn with_agent<T: Send + 'static>(
    api: &Api,
    f: impl FnOnce(&mut Agent<Dataplane>) -> T + Send + 'static,
) -> T {
    let agent = api.agent.clone();
    tokio::task::spawn_blocking(move || {
        let mut guard = agent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    })
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
        Err(AgentError::Invalid(_)) => {}
    }
    result
}

/// A write to endpoints or routes: the TLS listeners follow it.
async fn tracked_write<T: Send + 'static>(
    api: &Api,
    f: impl FnOnce(&mut Agent<Dataplane>) -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    let tls = api.tls.clone();
    timed_write(api, move |agent| {
        let result = f(agent);
        sync_tls(&tls, agent);
        result
    })
    .await
}

/// Counts and times every request by method, route and status.
async fn record_request(State(api): State<Api>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let path = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let labels = ApiLabels { method, path, status: response.status().as_u16() };
    api.metrics.api_requests.get_or_create(&labels).inc();
    api.metrics.api_latency.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    response
}

fn flag(query: &HashMap<String, String>, key: &str) -> bool {
    query.get(key).is_some_and(|v| !matches!(v.as_str(), "false" | "0" | "no"))
}

/// `GET /v1/flows[?follow=true][&denied=true][&app=ID]`: JSON lines; with
/// `follow`, a stream of new events until the client or the agent goes.
async fn flows(State(api): State<Api>, Query(query): Query<HashMap<String, String>>) -> Response {
    let (denied, app) = (flag(&query, "denied"), query.get("app").cloned());
    let ndjson = [(header::CONTENT_TYPE, "application/x-ndjson")];
    if !flag(&query, "follow") {
        let body: String = api
            .hub
            .recent()
            .iter()
            .filter(|l| l.matches(denied, app.as_deref()))
            .map(|l| format!("{}\n", l.json))
            .collect();
        return (ndjson, body).into_response();
    }
    let state = (api.hub.subscribe(), api.stopping.clone(), app);
    let stream = futures_util::stream::unfold(
        state,
        move |(mut rx, mut stopping, app)| async move {
            loop {
                if *stopping.borrow() {
                    return None;
                }
                tokio::select! {
                    received = rx.recv() => match received {
                        Ok(line) if line.matches(denied, app.as_deref()) => {
                            return Some((Ok::<_, std::convert::Infallible>(format!("{}\n", line.json)), (rx, stopping, app)));
                        }
                        Ok(_) => {}
                        Err(RecvError::Lagged(n)) => {
                            return Some((Ok(format!("{{\"lagged\":{n}}}\n")), (rx, stopping, app)));
                        }
                        Err(RecvError::Closed) => return None,
                    },
                    _ = stopping.changed() => return None,
                }
            }
        },
    );
    (ndjson, Body::from_stream(stream)).into_response()
}

/// `GET /v1/explain?src=IP&dst=IP&protocol=tcp&port=N[&from=IP]`.
async fn explain(State(api): State<Api>, Query(query): Query<HashMap<String, String>>) -> Reply {
    let ip = |key: &str| -> Result<Option<Ipv4Addr>, Invalid> {
        match query.get(key) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| Invalid::new(key, format!("{v:?} is not an IPv4 address"))),
        }
    };
    let parsed = (|| {
        let src = ip("src")?.ok_or_else(|| Invalid::new("src", "missing"))?;
        let dst = ip("dst")?.ok_or_else(|| Invalid::new("dst", "missing"))?;
        let from = ip("from")?;
        let protocol_text =
            query.get("protocol").ok_or_else(|| Invalid::new("protocol", "missing"))?;
        let protocol = Protocol::parse(protocol_text).ok_or_else(|| {
            Invalid::new("protocol", format!("{protocol_text:?} is not tcp or udp"))
        })?;
        let port_text = query.get("port").ok_or_else(|| Invalid::new("port", "missing"))?;
        let port: i64 = port_text
            .parse()
            .map_err(|_| Invalid::new("port", format!("{port_text:?} is not a number")))?;
        let (port, _) = check_ports("port", port, port)?;
        Ok::<_, Invalid>((src, dst, protocol, port, from))
    })();
    let (src, dst, protocol, port, from) = match parsed {
        Ok(p) => p,
        Err(e) => return invalid(&e),
    };
    ok(with_agent(&api, move |agent| {
        crate::explain::explain(
            agent.kernel().tables_ref(),
            agent.state(),
            src,
            dst,
            protocol,
            port,
            from,
        )
    })
    .await)
}

fn parse_route(v: &Value) -> Result<(String, String, String), Invalid> {
    let app = str_field(v, "app", "app")?;
    let domain = match v.get("domain") {
        None | Some(Value::Null) => crate::state::INTERNAL_DOMAIN,
        Some(Value::String(d)) => d.as_str(),
        Some(_) => return Err(Invalid::new("domain", "must be a string")),
    };
    let hostname = str_field(v, "hostname", "hostname")?;
    Ok((app.to_owned(), domain.to_owned(), hostname.to_owned()))
}

/// `GET /v1/routes`: `{"routes":[{"app","domain","hostname"}]}`.
async fn list_routes(State(api): State<Api>) -> Reply {
    let routes: Vec<Value> = with_agent(&api, |agent| {
        agent
            .state()
            .routes()
            .iter()
            .map(|(host, app)| json!({"app": app, "domain": crate::state::INTERNAL_DOMAIN, "hostname": host}))
            .collect()
    })
    .await;
    ok(json!({"routes": routes}))
}

async fn map_route(State(api): State<Api>, body: Body) -> Reply {
    route_write(api, body, true).await
}

async fn unmap_route(State(api): State<Api>, body: Body) -> Reply {
    route_write(api, body, false).await
}

async fn route_write(api: Api, body: Body, map: bool) -> Reply {
    let (app, domain, hostname) = match read_json(&api, body).await.and_then(|v| parse_route(&v)) {
        Ok(r) => r,
        Err(e) => return invalid(&e),
    };
    let write = move |agent: &mut Agent<Dataplane>| {
        if map {
            agent.map_route(&app, &domain, &hostname)
        } else {
            agent.unmap_route(&app, &domain, &hostname)
        }
    };
    match tracked_write(&api, write).await {
        Ok(()) => ok(json!({})),
        Err(e) => failure(e),
    }
}

/// `GET /v1/policies/stats`: every policy with its packet and byte counts.
async fn policy_stats(State(api): State<Api>) -> Reply {
    let policies: Vec<Value> = with_agent(&api, |agent| {
        let counters = agent.kernel().tables_ref().policy_counters_all();
        agent
            .state()
            .policies()
            .map(|(p, id)| {
                let counters = counters.get(&id).copied().unwrap_or_default();
                let mut v = policy_json(p);
                v["id"] = json!(id);
                v["packets"] = json!(counters.packets);
                v["bytes"] = json!(counters.bytes);
                v
            })
            .collect()
    })
    .await;
    ok(json!({"total_policies": policies.len(), "policies": policies}))
}

fn str_field<'a>(value: &'a Value, key: &str, field: &str) -> Result<&'a str, Invalid> {
    match value.get(key) {
        None | Some(Value::Null) => Err(Invalid::new(field, "missing")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Invalid::new(field, "must be a string")),
    }
}

fn port_field(value: &Value, field: &str) -> Result<i64, Invalid> {
    match value {
        Value::Number(n) => n.as_i64().ok_or_else(|| Invalid::new(field, "must be an integer")),
        Value::Null => Err(Invalid::new(field, "missing")),
        _ => Err(Invalid::new(field, "must be an integer")),
    }
}

/// Parses `{"policies": [...]}` in Cloud Foundry's shape. The first problem
/// found is reported with the path of the field.
pub fn parse_policies(body: &Value) -> Result<Vec<Policy>, Invalid> {
    let list = match body.get("policies") {
        Some(Value::Array(list)) if !list.is_empty() => list,
        Some(Value::Array(_)) => return Err(Invalid::new("policies", "must not be empty")),
        Some(_) => return Err(Invalid::new("policies", "must be an array")),
        None => return Err(Invalid::new("policies", "missing")),
    };
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            let at = |f: &str| format!("policies[{i}].{f}");
            let source = p
                .get("source")
                .filter(|s| s.is_object())
                .ok_or_else(|| Invalid::new(at("source"), "missing or not an object"))?;
            let dest = p
                .get("destination")
                .filter(|d| d.is_object())
                .ok_or_else(|| Invalid::new(at("destination"), "missing or not an object"))?;
            for (side, name) in [(source, "source"), (dest, "destination")] {
                if side.get("tag").is_some() {
                    return Err(Invalid::new(
                        at(&format!("{name}.tag")),
                        "tags are assigned by the agent, not by clients",
                    ));
                }
            }
            let source_id = str_field(source, "id", &at("source.id"))?;
            check_app_id(&at("source.id"), source_id)?;
            let dest_id = str_field(dest, "id", &at("destination.id"))?;
            check_app_id(&at("destination.id"), dest_id)?;
            let protocol_text = str_field(dest, "protocol", &at("destination.protocol"))?;
            let protocol = Protocol::parse(protocol_text).ok_or_else(|| {
                Invalid::new(
                    at("destination.protocol"),
                    format!("{protocol_text:?} is not tcp or udp"),
                )
            })?;
            let (start, end) = match (dest.get("ports"), dest.get("port")) {
                (Some(ports @ Value::Object(_)), _) => {
                    let start = port_field(
                        ports.get("start").unwrap_or(&Value::Null),
                        &at("destination.ports.start"),
                    )?;
                    let end = port_field(
                        ports.get("end").unwrap_or(&Value::Null),
                        &at("destination.ports.end"),
                    )?;
                    check_ports(&at("destination.ports"), start, end)?
                }
                (Some(_), _) => {
                    return Err(Invalid::new(
                        at("destination.ports"),
                        "must be an object with start and end",
                    ));
                }
                // The older single-port form.
                (None, Some(port)) => {
                    let port = port_field(port, &at("destination.port"))?;
                    check_ports(&at("destination.port"), port, port)?
                }
                (None, None) => return Err(Invalid::new(at("destination.ports"), "missing")),
            };
            let tls_only = match p.get("tls_only") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(Invalid::new(at("tls_only"), "must be true or false")),
            };
            Ok(Policy {
                source: source_id.to_owned(),
                destination: dest_id.to_owned(),
                protocol,
                start,
                end,
                tls_only,
            })
        })
        .collect()
}

pub fn policy_json(p: &Policy) -> Value {
    let mut v = json!({
        "source": {"id": p.source},
        "destination": {"id": p.destination, "protocol": p.protocol.name(), "ports": {"start": p.start, "end": p.end}},
    });
    if p.tls_only {
        v["tls_only"] = json!(true);
    }
    v
}

async fn create_policies(State(api): State<Api>, body: Body) -> Reply {
    let policies = match read_json(&api, body).await.and_then(|v| parse_policies(&v)) {
        Ok(p) => p,
        Err(e) => return invalid(&e),
    };
    let result = timed_write(&api, move |agent| agent.add_policies(&policies)).await;
    match result {
        Ok(()) => ok(json!({})),
        Err(e) => failure(e),
    }
}

async fn delete_policies(State(api): State<Api>, body: Body) -> Reply {
    let policies = match read_json(&api, body).await.and_then(|v| parse_policies(&v)) {
        Ok(p) => p,
        Err(e) => return invalid(&e),
    };
    match timed_write(&api, move |agent| agent.remove_policies(&policies)).await {
        Ok(()) => ok(json!({})),
        Err(e) => failure(e),
    }
}

async fn list_policies(
    State(api): State<Api>,
    Query(query): Query<HashMap<String, String>>,
) -> Reply {
    let filter = |key: &str| -> Option<Vec<String>> {
        query.get(key).map(|v| v.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect())
    };
    let (ids, sources, dests) = (filter("id"), filter("source_id"), filter("dest_id"));
    let policies: Vec<Value> = with_agent(&api, move |agent| {
        agent
            .state()
            .policies()
            .map(|(p, _)| p)
            .filter(|p| {
                ids.as_ref()
                    .is_none_or(|ids| ids.contains(&p.source) || ids.contains(&p.destination))
            })
            .filter(|p| sources.as_ref().is_none_or(|s| s.contains(&p.source)))
            .filter(|p| dests.as_ref().is_none_or(|d| d.contains(&p.destination)))
            .map(policy_json)
            .collect()
    })
    .await;
    ok(json!({"total_policies": policies.len(), "policies": policies}))
}

async fn list_tags(State(api): State<Api>) -> Reply {
    let tags: Vec<Value> = with_agent(&api, |agent| {
        agent
            .state()
            .tags()
            .iter()
            .map(|(id, tag)| json!({"id": id, "tag": tag_text(*tag)}))
            .collect()
    })
    .await;
    ok(json!({"tags": tags}))
}

pub fn endpoint_json(e: &Endpoint) -> Value {
    json!({"ip": e.ip.to_string(), "app": e.app, "ifname": e.ifname, "netns": e.netns})
}

async fn list_endpoints(State(api): State<Api>) -> Reply {
    let tls = api.tls.clone();
    let endpoints: Vec<Value> = with_agent(&api, move |agent| {
        let state = agent.state();
        state
            .endpoints()
            .map(|e| {
                let mut v = endpoint_json(e);
                // Cloud Foundry's CF_INSTANCE_PORTS shape.
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

fn parse_endpoint(v: &Value) -> Result<Endpoint, Invalid> {
    let app = str_field(v, "app", "app")?;
    check_app_id("app", app)?;
    let ip_text = str_field(v, "ip", "ip")?;
    let ip: Ipv4Addr = ip_text
        .parse()
        .map_err(|_| Invalid::new("ip", format!("{ip_text:?} is not an IPv4 address")))?;
    let ifname = str_field(v, "ifname", "ifname")?;
    let netns = match v.get("netns") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(PathBuf::from(s)),
        Some(_) => return Err(Invalid::new("netns", "must be a path")),
    };
    Ok(Endpoint { ip, app: app.to_owned(), ifname: ifname.to_owned(), netns })
}

async fn add_endpoint(State(api): State<Api>, body: Body) -> Reply {
    let endpoint = match read_json(&api, body).await.and_then(|v| parse_endpoint(&v)) {
        Ok(e) => e,
        Err(e) => return invalid(&e),
    };
    let reply = endpoint_json(&endpoint);
    match tracked_write(&api, move |agent| agent.add_endpoint(endpoint)).await {
        Ok(()) => ok(reply),
        Err(e) => failure(e),
    }
}

async fn remove_endpoint(State(api): State<Api>, Path(ip): Path<String>) -> Reply {
    let Ok(ip) = ip.parse::<Ipv4Addr>() else {
        return invalid(&Invalid::new("ip", format!("{ip:?} is not an IPv4 address")));
    };
    match tracked_write(&api, move |agent| agent.remove_endpoint(ip)).await {
        Ok(removed) => ok(json!({"removed": removed})),
        Err(e) => failure(e),
    }
}

/// The overlay network whose endpoints have array slots (null: none).
fn overlay_json(o: policy_common::maps::Overlay) -> Value {
    if o.slots == 0 {
        return Value::Null;
    }
    json!({"network": Ipv4Addr::from(o.base).to_string(), "slots": o.slots})
}

async fn status(State(api): State<Api>) -> Reply {
    let result = with_agent(&api, |agent| -> Result<Value, Error> {
        let state = agent.state();
        let dataplane = agent.kernel();
        let tables = dataplane.tables_ref();
        let maps: Vec<Value> = tables
            .occupancy()
            .into_iter()
            .map(|(name, entries, capacity)| json!({"name": name, "entries": entries, "capacity": capacity}))
            .collect();
        let verdicts: Vec<Value> = tables
            .verdicts()?
            .into_iter()
            .map(|(r, n)| json!({"reason": r.name(), "verdict": if r.passes() { "pass" } else { "drop" }, "packets": n}))
            .collect();
        Ok(json!({
            "pin_dir": dataplane.pin_dir().display().to_string(),
            "attached": dataplane.attachments()?,
            "endpoints": state.endpoints().count(),
            "apps": state.tags().iter().map(|(id, tag)| json!({"id": id, "tag": tag_text(*tag)})).collect::<Vec<_>>(),
            "policies": state.policy_count(),
            "epoch": tables.epoch()?,
            "overlay": overlay_json(tables.overlay()),
            "maps": maps,
            "verdicts": verdicts,
        }))
    })
    .await;
    match result {
        Ok(v) => ok(v),
        Err(e) => failure(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_cloud_foundrys_documented_body_unchanged() {
        let body: Value = serde_json::from_str(include_str!(
            "../../fixtures/cf-policy-server/external-policies-post.json"
        ))
        .unwrap();
        let policies = parse_policies(&body).unwrap();
        assert_eq!(policies.len(), 2);
        assert_eq!(policies[0].source, "1081ceac-f5c4-47a8-95e8-88e1e302efb5");
        assert_eq!(
            (policies[0].protocol, policies[0].start, policies[0].end),
            (Protocol::Tcp, 1234, 1235)
        );
        // And renders policies in the documented GET shape.
        let listed: Value = serde_json::from_str(include_str!(
            "../../fixtures/cf-policy-server/external-policies-get-response.json"
        ))
        .unwrap();
        assert_eq!(listed["policies"][0], policy_json(&policies[0]));
    }

    #[test]
    fn bad_policies_name_the_field() {
        let cases = [
            (json!({}), "policies"),
            (json!({"policies": []}), "policies"),
            (
                json!({"policies": [{"destination": {"id": "b", "protocol": "tcp", "ports": {"start": 1, "end": 1}}}]}),
                "policies[0].source",
            ),
            (
                json!({"policies": [{"source": {"id": ""}, "destination": {"id": "b", "protocol": "tcp", "ports": {"start": 1, "end": 1}}}]}),
                "policies[0].source.id",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "icmp", "ports": {"start": 1, "end": 1}}}]}),
                "policies[0].destination.protocol",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "tcp", "ports": {"start": 0, "end": 1}}}]}),
                "policies[0].destination.ports.start",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "tcp", "ports": {"start": 9, "end": 8}}}]}),
                "policies[0].destination.ports",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "tcp", "ports": {"start": 1, "end": 65536}}}]}),
                "policies[0].destination.ports.end",
            ),
            (
                json!({"policies": [{"source": {"id": "a", "tag": "0001"}, "destination": {"id": "b", "protocol": "tcp", "ports": {"start": 1, "end": 1}}}]}),
                "policies[0].source.tag",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "tcp"}}]}),
                "policies[0].destination.ports",
            ),
        ];
        for (body, field) in cases {
            assert_eq!(parse_policies(&body).unwrap_err().field, field, "{body}");
        }
        let single = json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "udp", "port": 53}}]});
        assert_eq!(parse_policies(&single).unwrap()[0].start, 53);
    }
}
