//! Internal routes: `HOST.apps.internal` → app.

use axum::{body::Body, extract::State};
use serde_json::{Value, json};

use super::{Api, Reply, invalid, ok, read_json, tracked_write, wire, with_agent, written};
use crate::state::INTERNAL_DOMAIN;

/// `GET /v1/routes`: `{"routes":[{"app","domain","hostname"}]}`.
pub async fn list(State(api): State<Api>) -> Reply {
    let routes: Vec<Value> = with_agent(&api, |agent| {
        agent
            .state()
            .routes()
            .iter()
            .map(|(hostname, app)| {
                wire::route_json(&wire::Route {
                    app: app.clone(),
                    domain: INTERNAL_DOMAIN.to_owned(),
                    hostname: hostname.clone(),
                })
            })
            .collect()
    })
    .await;
    ok(json!({"routes": routes}))
}

/// `POST /v1/routes`.
pub async fn map(State(api): State<Api>, body: Body) -> Reply {
    write(api, body, true).await
}

/// `POST /v1/routes/delete`.
pub async fn unmap(State(api): State<Api>, body: Body) -> Reply {
    write(api, body, false).await
}

async fn write(api: Api, body: Body, map: bool) -> Reply {
    let route = match read_json(&api, body).await.and_then(|v| wire::parse_route(&v)) {
        Ok(r) => r,
        Err(e) => return invalid(&e),
    };
    written(
        tracked_write(&api, move |agent| {
            if map {
                agent.map_route(&route.app, &route.domain, &route.hostname)
            } else {
                agent.unmap_route(&route.app, &route.domain, &route.hostname)
            }
        })
        .await,
    )
}
