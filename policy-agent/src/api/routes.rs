//! Internal routes: `HOST.apps.internal` → app.

use axum::{body::Body, extract::State};
use policy_api::wire as shapes;

use super::{Api, Reply, invalid, ok, read_json, tracked_write, wire, with_agent, written};
use crate::state::INTERNAL_DOMAIN;

/// `GET /v1/routes`: `{"routes":[{"app","domain","hostname"}]}`.
pub async fn list(State(api): State<Api>) -> Reply {
    let routes = with_agent(&api, |agent| {
        agent
            .state()
            .routes()
            .iter()
            .map(|(hostname, app)| shapes::Route {
                app: app.clone(),
                domain: Some(INTERNAL_DOMAIN.to_owned()),
                hostname: hostname.clone(),
            })
            .collect()
    })
    .await;
    ok(wire::to_json(&shapes::Routes { routes }))
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
                agent.map_route(&route.app, route.domain(), &route.hostname)
            } else {
                agent.unmap_route(&route.app, route.domain(), &route.hostname)
            }
        })
        .await,
    )
}
