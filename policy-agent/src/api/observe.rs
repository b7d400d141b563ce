//! Seeing what the dataplane does: status, flow events, explain.

use std::{collections::HashMap, convert::Infallible, net::IpAddr};

use axum::{
    body::Body,
    extract::{Query, State},
    http::header,
    response::{IntoResponse, Response},
};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::{Api, Reply, failure, invalid, ok, with_agent};
use crate::{
    agent::FlowQuery,
    state::{Invalid, Protocol, check_icmp_types, check_ports, parse_protocol},
};

/// `GET /v1/status`, with where the platform CA is kept (`platform_ca`:
/// `certificate`, `key`, `bundle`; null without one).
pub async fn status(State(api): State<Api>) -> Reply {
    match with_agent(&api, |agent| agent.status()).await {
        Ok(status) => {
            let mut status = json!(status);
            status["platform_ca"] = json!(api.platform_ca);
            ok(status)
        }
        Err(e) => failure(e.into()),
    }
}

/// A boolean query parameter: absent is false; `true` or `false`, nothing
/// else (`follow=maybe` is a 400, not a guess).
fn flag(query: &HashMap<String, String>, key: &str) -> Result<bool, Invalid> {
    match query.get(key).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(Invalid::new(key, format!("must be true or false, not {other:?}"))),
    }
}

/// `GET /v1/flows[?follow=true][&denied=true][&app=ID]`: JSON lines; with
/// `follow`, a stream of new events until the client or the agent goes.
pub async fn flows(
    State(api): State<Api>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (denied, follow) = match (flag(&query, "denied"), flag(&query, "follow")) {
        (Ok(denied), Ok(follow)) => (denied, follow),
        (Err(e), _) | (_, Err(e)) => return invalid(&e).into_response(),
    };
    let app = query.get("app").cloned();
    let ndjson = [(header::CONTENT_TYPE, "application/x-ndjson")];
    if !follow {
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
                            return Some((Ok::<_, Infallible>(format!("{}\n", line.json)), (rx, stopping, app)));
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

fn parse_flow_query(query: &HashMap<String, String>) -> Result<FlowQuery, Invalid> {
    let required =
        |key: &str| query.get(key).map(String::as_str).ok_or_else(|| Invalid::new(key, "missing"));
    let address = |key: &str, text: &str| -> Result<IpAddr, Invalid> {
        text.parse().map_err(|_| Invalid::new(key, format!("{text:?} is not an IP address")))
    };
    let src = address("src", required("src")?)?;
    let dst = address("dst", required("dst")?)?;
    let from = query.get("from").map(|v| address("from", v)).transpose()?;
    let family = |ip: &IpAddr| if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    for (key, ip) in [("dst", Some(dst)), ("from", from)] {
        if let Some(ip) = ip
            && ip.is_ipv4() != src.is_ipv4()
        {
            return Err(Invalid::new(
                key,
                format!("{ip} is an {} address but src {src} is {}", family(&ip), family(&src)),
            ));
        }
    }
    let protocol = parse_protocol("protocol", required("protocol")?)?;
    let wrong_icmp = match protocol {
        Protocol::Icmp => src.is_ipv6().then_some("icmp is IPv4's; IPv6 flows use icmpv6"),
        Protocol::Icmpv6 => src.is_ipv4().then_some("icmpv6 is IPv6's; IPv4 flows use icmp"),
        _ => None,
    };
    if let Some(wrong) = wrong_icmp {
        return Err(Invalid::new("protocol", wrong));
    }
    let number = |key: &str, text: &str| -> Result<i64, Invalid> {
        text.parse().map_err(|_| Invalid::new(key, format!("{text:?} is not a number")))
    };
    // An ICMP message's "port" is its type and code, as the programs match it.
    let port = if protocol.has_ports() {
        let port = number("port", required("port")?)?;
        check_ports("port", port, port)?.0
    } else {
        let icmp_type = number("icmp_type", required("icmp_type")?)?;
        let code = query.get("icmp_code").map(|c| number("icmp_code", c)).transpose()?;
        let types = check_icmp_types("query", Some(icmp_type), Some(code.unwrap_or(0)))?;
        types.range().0
    };
    Ok(FlowQuery { src, dst, protocol, port, from })
}

/// `GET /v1/explain?src=IP&dst=IP&protocol=tcp&port=N[&from=IP]`; for
/// icmp `icmp_type=T[&icmp_code=C]` (code 0 if absent) in place of `port`.
pub async fn explain(
    State(api): State<Api>,
    Query(query): Query<HashMap<String, String>>,
) -> Reply {
    match parse_flow_query(&query) {
        Ok(q) => ok(with_agent(&api, move |agent| agent.explain(&q)).await),
        Err(e) => invalid(&e),
    }
}
