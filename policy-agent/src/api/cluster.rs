//! `GET /v1/cluster`: this host, every registered host, how far each has
//! applied the cluster's change log, and whether the log in etcd diverged
//! from this host's. `POST /v1/cluster/republish`: this host's state made
//! the newest after it did.

use axum::{Json, body::Body, extract::State, http::StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Api, Reply, failure, invalid, ok, read_json, with_agent};
use crate::{
    cluster::{hosts, republish},
    state::Invalid,
    store::lineage::Divergence,
};

/// `lag` (how far behind `newest`) and `ahead` (how far past it) of a host
/// that applied `applied`: `lag` is null for a host ahead of etcd.
fn lag_and_ahead(value: &mut Value, newest: u64, applied: u64) {
    value["lag"] = if applied <= newest { json!(newest - applied) } else { Value::Null };
    value["ahead"] = json!(applied.saturating_sub(newest));
}

fn divergence(d: Option<&Divergence>) -> Value {
    d.map_or(Value::Null, |d| json!({"cause": d.cause(), "message": d.to_string()}))
}

pub async fn status(State(api): State<Api>) -> Reply {
    let cluster = api.cluster.clone();
    let (position, age, log_id, diverged) = with_agent(&api, |agent| {
        let log_id = agent.log_id().map(str::to_owned);
        (agent.position(), agent.state_age(), log_id, divergence(agent.diverged()))
    })
    .await;
    let Some(cluster) = cluster else {
        return ok(json!({"mode": "single-host", "applied": position}));
    };
    let (etcd, keys) = (cluster.etcd(), cluster.keys());
    let read = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::etcd::EtcdError>((hosts::newest(&etcd, &keys)?, hosts::list(&etcd, &keys)?))
    })
    .await
    .expect("etcd read panicked");
    let mut answer = json!({
        "mode": "cluster",
        "host": cluster.host,
        "underlay_address": cluster.underlay_address,
        "etcd_endpoints": cluster.etcd_endpoints,
        "applied": position,
        "log_id": log_id,
        "diverged": diverged,
        "state_age_seconds": age.as_secs_f64(),
    });
    match read {
        Ok((newest, hosts)) => {
            let log_id = newest.log.as_ref().map(|l| l.id.clone());
            answer["newest"] =
                json!({"seq": newest.seq, "revision": newest.revision, "log_id": log_id});
            lag_and_ahead(&mut answer, newest.seq, position.seq);
            let hosts: Vec<Value> = hosts
                .into_iter()
                .map(|h| {
                    let applied = h.applied_seq;
                    let mut v = json!(h);
                    lag_and_ahead(&mut v, newest.seq, applied);
                    v
                })
                .collect();
            answer["hosts"] = json!(hosts);
        }
        Err(e) => answer["error"] = json!(e.to_string()),
    }
    ok(answer)
}

/// The body of `POST /v1/cluster/republish`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RepublishRequest {
    /// Republish even if another registered host applied newer changes.
    #[serde(default)]
    force: bool,
}

/// `POST /v1/cluster/republish {"force": false}`: 200 with the new log
/// (`{"seq","log":{"id","base","host"},"previous":{"seq","log_id",...}}`);
/// 409 when another registered host is ahead of this one (or this one is
/// behind etcd's own log); 503 when etcd is unreachable or the log moved
/// meanwhile.
pub async fn republish(State(api): State<Api>, body: Body) -> Reply {
    let Some(cluster) = api.cluster.clone() else {
        return invalid(&Invalid::new("mode", "a single host has no cluster log to republish"));
    };
    let request = match read_json(&api, body).await.and_then(|v| {
        serde_json::from_value::<RepublishRequest>(v)
            .map_err(|e| Invalid::new("body", e.to_string()))
    }) {
        Ok(request) => request,
        Err(e) => return invalid(&e),
    };
    let unavailable = |e: &dyn std::fmt::Display| {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": e.to_string()})))
    };
    let done = with_agent(&api, move |agent| {
        let (etcd, keys) = (cluster.etcd(), cluster.keys());
        let newest = hosts::newest(&etcd, &keys).map_err(|e| unavailable(&e))?;
        let hosts = hosts::list(&etcd, &keys).map_err(|e| unavailable(&e))?;
        let floor = republish::floor(
            &cluster.host,
            agent.position().seq,
            agent.diverged().is_some(),
            newest.seq,
            &hosts,
            request.force,
        )
        .map_err(|refused| (StatusCode::CONFLICT, Json(json!({"error": refused}))))?;
        agent.republish(floor, newest.seq).map_err(failure)
    })
    .await;
    match done {
        Ok(republished) => ok(json!(republished)),
        Err(reply) => reply,
    }
}
