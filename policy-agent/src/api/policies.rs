//! Policies and tags: Cloud Foundry's policy-server external API.

use std::collections::HashMap;

use axum::{
    body::Body,
    extract::{Query, State},
};
use policy_api::wire as shapes;

use super::{Api, Reply, invalid, ok, read_body, timed_write, wire, with_agent, written};
use crate::state::{AppName, tag_text};

/// `POST /networking/v1/external/policies`.
pub async fn create(State(api): State<Api>, body: Body) -> Reply {
    let policies = match read_body(&api, body).await.and_then(|b| wire::parse_policies_json(&b)) {
        Ok(p) => p,
        Err(e) => return invalid(&e),
    };
    written(timed_write(&api, move |agent| agent.add_policies(&policies)).await)
}

/// `POST /networking/v1/external/policies/delete`.
pub async fn delete(State(api): State<Api>, body: Body) -> Reply {
    let policies = match read_body(&api, body).await.and_then(|b| wire::parse_policies_json(&b)) {
        Ok(p) => p,
        Err(e) => return invalid(&e),
    };
    written(timed_write(&api, move |agent| agent.remove_policies(&policies)).await)
}

/// `GET /networking/v1/external/policies[?id=A,B&source_id=..&dest_id=..]`.
pub async fn list(State(api): State<Api>, Query(query): Query<HashMap<String, String>>) -> Reply {
    let filter = |key: &str| -> Option<Vec<AppName>> {
        query.get(key).map(|v| v.split(',').filter(|s| !s.is_empty()).map(AppName::from).collect())
    };
    let (ids, sources, dests) = (filter("id"), filter("source_id"), filter("dest_id"));
    let policies: Vec<shapes::Policy> = with_agent(&api, move |agent| {
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
            .map(|p| wire::policy_shape(&p))
            .collect()
    })
    .await;
    ok(wire::to_json(&shapes::PolicyList::from(policies)))
}

/// `GET /networking/v1/external/tags`.
pub async fn tags(State(api): State<Api>) -> Reply {
    let tags = with_agent(&api, |agent| {
        agent
            .state()
            .tags()
            .iter()
            .map(|(id, tag)| shapes::Tag { id: id.clone(), tag: tag_text(*tag) })
            .collect()
    })
    .await;
    ok(wire::to_json(&shapes::Tags { tags }))
}

/// `GET /v1/policies/stats`: every policy with its packet and byte counts.
pub async fn stats(State(api): State<Api>) -> Reply {
    let policies: Vec<shapes::CountedPolicy> = with_agent(&api, |agent| {
        agent
            .policy_stats()
            .into_iter()
            .map(|s| shapes::CountedPolicy {
                policy: wire::policy_shape(&s.policy),
                id: s.id,
                packets: s.counters.packets,
                bytes: s.counters.bytes,
            })
            .collect()
    })
    .await;
    ok(wire::to_json(&shapes::PolicyList::from(policies)))
}
