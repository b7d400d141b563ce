//! Seeing what the dataplane does: status, flow events, explain.

use std::{collections::HashMap, convert::Infallible, net::IpAddr};

use axum::{
    body::Body,
    extract::{Query, State},
    http::header,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::{Api, Reply, failure, invalid, ok, wire, with_agent};
use crate::{
    explain::{Explanation, FlowQuery, Outcome, Side, Verdict},
    state::{Invalid, Policy, Protocol, check_icmp_types, check_ports, parse_protocol, tag_text},
};

/// `GET /v1/status`, with where the platform CA is kept (`platform_ca`:
/// `certificate`, `key`, `bundle`; null without one).
pub async fn status(State(api): State<Api>) -> Reply {
    match with_agent(&api, |agent| agent.status()).await {
        Ok(status) => {
            let mut status = json!(status);
            status["platform_ca"] = json!(api.platform_ca);
            if let Some(server) = &api.policy_server {
                let follow = server.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let mut shown = json!(follow);
                shown["set_age_seconds"] = json!(follow.set_age().map(|a| a.round()));
                if let Some(asgs) = &server.asgs {
                    shown["security_groups"] =
                        json!(asgs.status.lock().unwrap_or_else(|p| p.into_inner()).clone());
                }
                status["policy_server"] = shown;
            }
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
        Ok(q) => ok(with_agent(&api, move |agent| explanation_json(&q, &agent.explain(&q))).await),
        Err(e) => invalid(&e),
    }
}

/// An explanation as `GET /v1/explain` answers it: `source`,
/// `destination` (`ip`, `registered`, `app`, `tag`), `protocol`, `port`
/// (ICMP: `icmp_type`, `icmp_code`), the `policies` between the two apps
/// (their destinations, with ids), `policy_id` when one allows it, a
/// `note`, and `verdict`, `reason` and a `message` that says why.
fn explanation_json(query: &FlowQuery, e: &Explanation) -> Value {
    let FlowQuery { src, protocol, port, .. } = *query;
    let side = |s: &Side| {
        json!({
            "ip": s.ip.to_string(),
            "registered": s.registered,
            "app": s.app,
            "tag": s.tag.map(tag_text),
        })
    };
    let mut answer = json!({
        "source": side(&e.source),
        "destination": side(&e.destination),
        "protocol": protocol.name(),
    });
    let what = if protocol.has_ports() {
        answer["port"] = json!(port);
        port.to_string()
    } else {
        let [icmp_type, code] = port.to_be_bytes();
        answer["icmp_type"] = json!(icmp_type);
        answer["icmp_code"] = json!(code);
        format!("type {icmp_type} code {code}")
    };
    let (source, destination) = (e.source.name(), e.destination.name());
    // What a policy allows, as the CLI prints it (`8080-8090`, `type 8`).
    let allows = |p: &Policy| wire::destination_text(&wire::policy_json(p)["destination"]);
    let message = match &e.outcome {
        Outcome::Spoofed { sender, sender_app } => format!(
            "denied: spoofed source - {sender}'s veth only lets {sender} out (app {}), not {src}",
            sender_app.clone().unwrap_or_default()
        ),
        Outcome::Checked { unchecked_sender, policies, verdict } => {
            if let Some(sender) = unchecked_sender {
                answer["note"] = json!(format!(
                    "{sender} is not a registered endpoint: its packets are not checked for spoofing"
                ));
            }
            let between: Vec<Value> = policies
                .iter()
                .map(|(p, id)| {
                    // The policy's destination in the API's shape, its id the
                    // policy's.
                    let mut v = wire::policy_json(p)["destination"].take();
                    v["id"] = json!(id);
                    v
                })
                .collect();
            answer["policies"] = json!(between);
            match verdict {
                Verdict::Unmanaged { unregistered, source_spoofed } => format!(
                    "allowed: {unregistered} is not a registered endpoint, so this is not container-to-container traffic and no policy applies{}",
                    if *source_spoofed {
                        format!(
                            " (a container sending with source {src} would be dropped as spoofed at its own veth)"
                        )
                    } else {
                        String::new()
                    }
                ),
                Verdict::Allowed { policy_id, policy } => {
                    let ports = policy
                        .as_ref()
                        .map_or(String::new(), |p| format!(" {} {}", p.protocol.name(), allows(p)));
                    answer["policy_id"] = json!(policy_id);
                    format!("allowed: {destination} allows {source}{ports} (policy {policy_id})")
                }
                Verdict::Denied { on_protocol }
                    if on_protocol.is_empty() && policies.is_empty() =>
                {
                    format!("denied: no policy lets {source} reach {destination}")
                }
                Verdict::Denied { on_protocol } if on_protocol.is_empty() => format!(
                    "denied: {destination} allows {source} only on other protocols, not {}",
                    protocol.name()
                ),
                Verdict::Denied { on_protocol } => format!(
                    "denied: {destination} allows {source} on {} {}, not {what}",
                    protocol.name(),
                    on_protocol.iter().map(allows).collect::<Vec<_>>().join(", ")
                ),
            }
        }
    };
    answer["verdict"] = json!(if e.outcome.allowed() { "allowed" } else { "denied" });
    answer["reason"] = json!(e.outcome.reason());
    answer["message"] = json!(message);
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(port: u16, from: Option<&str>) -> FlowQuery {
        FlowQuery {
            src: "10.255.0.1".parse().unwrap(),
            dst: "10.255.0.2".parse().unwrap(),
            protocol: Protocol::Tcp,
            port,
            from: from.map(|f| f.parse().unwrap()),
        }
    }

    fn side(ip: &str, app: Option<&str>, tag: Option<u32>) -> Side {
        Side { ip: ip.parse().unwrap(), registered: tag.is_some(), app: app.map(Into::into), tag }
    }

    fn explained(outcome: Outcome) -> Explanation {
        Explanation {
            source: side("10.255.0.1", Some("frontend"), Some(1)),
            destination: side("10.255.0.2", Some("backend"), Some(2)),
            outcome,
        }
    }

    fn checked(policies: Vec<(Policy, u32)>, verdict: Verdict) -> Outcome {
        Outcome::Checked { unchecked_sender: None, policies, verdict }
    }

    fn range(start: u16, end: u16) -> Policy {
        Policy { start, end, ..Policy::tcp("frontend", "backend", start) }
    }

    #[test]
    fn every_outcome_renders_its_verdict_reason_and_message() {
        let sides = json!({
            "source": {"ip": "10.255.0.1", "registered": true, "app": "frontend", "tag": tag_text(1)},
            "destination": {"ip": "10.255.0.2", "registered": true, "app": "backend", "tag": tag_text(2)},
            "protocol": "tcp",
        });
        let with = |port: u16, fields: Value| {
            let mut v = sides.clone();
            v["port"] = json!(port);
            for (k, f) in fields.as_object().unwrap() {
                v[k] = f.clone();
            }
            v
        };
        let spoofed = Outcome::Spoofed {
            sender: "10.255.0.3".parse().unwrap(),
            sender_app: Some("w".into()),
        };
        assert_eq!(
            explanation_json(&query(8080, Some("10.255.0.3")), &explained(spoofed)),
            with(
                8080,
                json!({"verdict": "denied", "reason": "spoofed",
                "message": "denied: spoofed source - 10.255.0.3's veth only lets 10.255.0.3 out (app w), not 10.255.0.1"})
            )
        );

        let policy = range(8080, 8090);
        let allowed = checked(
            vec![(policy.clone(), 7)],
            Verdict::Allowed { policy_id: 7, policy: Some(policy.clone()) },
        );
        let listed = json!([{"id": 7, "protocol": "tcp", "ports": {"start": 8080, "end": 8090}}]);
        assert_eq!(
            explanation_json(&query(8085, None), &explained(allowed)),
            with(
                8085,
                json!({"verdict": "allowed", "reason": "policy", "policy_id": 7,
                "policies": listed,
                "message": "allowed: backend allows frontend tcp 8080-8090 (policy 7)"})
            )
        );

        let wrong_port = checked(
            vec![(policy.clone(), 7), (Policy::tcp("frontend", "backend", 22), 8)],
            Verdict::Denied {
                on_protocol: vec![policy.clone(), Policy::tcp("frontend", "backend", 22)],
            },
        );
        let json = explanation_json(&query(9000, None), &explained(wrong_port));
        assert_eq!((&json["reason"], &json["verdict"]), (&json!("wrong_port"), &json!("denied")));
        assert_eq!(
            json["message"],
            "denied: backend allows frontend on tcp 8080-8090, 22, not 9000"
        );

        let udp = Policy { protocol: Protocol::Udp, ..policy.clone() };
        let other_protocol = checked(vec![(udp, 9)], Verdict::Denied { on_protocol: vec![] });
        let json = explanation_json(&query(9000, None), &explained(other_protocol));
        assert_eq!(json["reason"], "no_policy");
        assert_eq!(
            json["message"],
            "denied: backend allows frontend only on other protocols, not tcp"
        );

        let none = checked(vec![], Verdict::Denied { on_protocol: vec![] });
        let json = explanation_json(&query(9000, None), &explained(none));
        assert_eq!(
            (&json["reason"], &json["message"], &json["policies"]),
            (
                &json!("no_policy"),
                &json!("denied: no policy lets frontend reach backend"),
                &json!([])
            )
        );
    }

    #[test]
    fn an_unmanaged_flow_says_which_end_is_no_endpoint_and_notes_an_unchecked_sender() {
        let unmanaged = Outcome::Checked {
            unchecked_sender: Some("10.255.0.9".parse().unwrap()),
            policies: vec![],
            verdict: Verdict::Unmanaged {
                unregistered: "10.255.0.1".parse().unwrap(),
                source_spoofed: true,
            },
        };
        let json = explanation_json(&query(80, Some("10.255.0.9")), &explained(unmanaged));
        assert_eq!((&json["verdict"], &json["reason"]), (&json!("allowed"), &json!("unmanaged")));
        assert_eq!(
            json["note"],
            "10.255.0.9 is not a registered endpoint: its packets are not checked for spoofing"
        );
        assert_eq!(
            json["message"],
            "allowed: 10.255.0.1 is not a registered endpoint, so this is not container-to-container \
             traffic and no policy applies (a container sending with source 10.255.0.1 would be \
             dropped as spoofed at its own veth)"
        );
        let icmp = FlowQuery { protocol: Protocol::Icmp, port: 8 << 8, ..query(0, None) };
        let json = explanation_json(
            &icmp,
            &explained(checked(vec![], Verdict::Denied { on_protocol: vec![] })),
        );
        assert_eq!(
            (&json["icmp_type"], &json["icmp_code"], &json["port"]),
            (&json!(8), &json!(0), &Value::Null)
        );
    }
}
