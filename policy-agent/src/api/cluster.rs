//! `GET /v1/cluster`: this host, every registered host, and how far each
//! has applied the cluster's change log.

use axum::extract::State;
use serde_json::{Value, json};

use super::{Api, Reply, ok, with_agent};
use crate::cluster::hosts;

pub async fn status(State(api): State<Api>) -> Reply {
    let cluster = api.cluster.clone();
    let (position, age) = with_agent(&api, |agent| (agent.position(), agent.state_age())).await;
    let Some(cluster) = cluster else {
        return ok(json!({"mode": "single-host", "applied": position}));
    };
    let etcd = cluster.etcd();
    let prefix = cluster.prefix.clone();
    let read = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::cluster::etcd::EtcdError>((
            hosts::newest(&etcd, &prefix)?,
            hosts::list(&etcd, &prefix)?,
        ))
    })
    .await
    .expect("etcd read panicked");
    let mut answer = json!({
        "mode": "cluster",
        "host": cluster.host,
        "underlay_address": cluster.underlay_address,
        "etcd_endpoints": cluster.etcd_endpoints,
        "applied": position,
        "state_age_seconds": age.as_secs_f64(),
    });
    match read {
        Ok(((newest_seq, revision), hosts)) => {
            answer["newest"] = json!({"seq": newest_seq, "revision": revision});
            answer["lag"] = json!(newest_seq.saturating_sub(position.seq));
            let hosts: Vec<Value> = hosts
                .into_iter()
                .map(|h| {
                    let lag = newest_seq.saturating_sub(h.applied_seq);
                    let mut v = json!(h);
                    v["lag"] = json!(lag);
                    v
                })
                .collect();
            answer["hosts"] = json!(hosts);
        }
        Err(e) => answer["error"] = json!(e.to_string()),
    }
    ok(answer)
}
