//! NetOut, Application Security Groups per app: `GET /v1/asgs`,
//! `PUT /v1/asgs/{app}` (garden's NetOutRule list), `DELETE /v1/asgs/{app}`.
//! Running containers of the app follow a change at once.
//!
//! With the policy server's security groups synced (`enable_asg_syncing`),
//! an app whose containers name a space has the server's groups as its
//! rules: writing them here is refused (409), as policies are.

use axum::{
    Json,
    body::Body,
    extract::{Path, State},
    http::StatusCode,
};
use std::collections::BTreeMap;

use serde_json::json;

use super::{Api, Reply, failure, invalid, ok, read_json, timed_write, wire, with_agent};
use crate::state::check_app_id;

/// `GET /v1/asgs`: `{"asgs": {"APP": [rules]}}`.
pub async fn list(State(api): State<Api>) -> Reply {
    let asgs: BTreeMap<String, Vec<policy_api::wire::NetOutRule>> = with_agent(&api, |agent| {
        let asgs = agent.state().netout().iter();
        asgs.map(|(app, rules)| (app.clone(), rules.iter().map(wire::net_out_rule_shape).collect()))
            .collect()
    })
    .await;
    ok(json!({ "asgs": asgs }))
}

/// `PUT /v1/asgs/{app}`: `{"rules": [...]}` or the list itself.
pub async fn set(State(api): State<Api>, Path(app): Path<String>, body: Body) -> Reply {
    if let Err(e) = check_app_id("app", &app) {
        return invalid(&e);
    }
    let rules = match read_json(&api, body).await.and_then(|v| wire::parse_net_out_rules(&v)) {
        Ok(r) => r,
        Err(e) => return invalid(&e),
    };
    if let Some(refused) = from_policy_server(&api, &app) {
        return refused;
    }
    let count = rules.len();
    let name = app.clone();
    match timed_write(&api, move |agent| agent.set_netout(&name, Some(rules))).await {
        Ok(()) => ok(json!({"app": app, "rules": count})),
        Err(e) => failure(e),
    }
}

/// `DELETE /v1/asgs/{app}`: the app's egress out of the overlay is no
/// longer checked.
pub async fn remove(State(api): State<Api>, Path(app): Path<String>) -> Reply {
    if let Err(e) = check_app_id("app", &app) {
        return invalid(&e);
    }
    if let Some(refused) = from_policy_server(&api, &app) {
        return refused;
    }
    let name = app.clone();
    let had = with_agent(&api, move |agent| agent.state().netout().contains_key(&name)).await;
    let name = app.clone();
    match timed_write(&api, move |agent| agent.set_netout(&name, None)).await {
        Ok(()) => ok(json!({"app": app, "removed": had})),
        Err(e) => failure(e),
    }
}

/// 409 when `app`'s rules are the policy server's security groups.
fn from_policy_server(api: &Api, app: &str) -> Option<Reply> {
    let server = api.policy_server.as_ref()?;
    server.asgs.as_ref().filter(|asgs| asgs.manages(app))?;
    let error = format!(
        "the security groups of {app} come from Cloud Foundry's policy server ({}; \
         enable_asg_syncing), not from this agent: bind them to its space there \
         (cf bind-security-group)",
        server.status.lock().unwrap_or_else(|p| p.into_inner()).url
    );
    Some((StatusCode::CONFLICT, Json(json!({ "error": error }))))
}
