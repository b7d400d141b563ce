//! The policy server's internal API as a cell reads it, and its policies
//! turned into ours: `GET /networking/v1/internal/policies?id=...`
//! answers
//! `{"total_policies":N,"policies":[{"source":{"id","tag"},"destination":{"id","tag","protocol","ports":{"start","end"}}}]}`,
//! tags upper-case hex (`tag_length` bytes).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::state::{Policy, Protocol, check_app_id, check_ports};

#[derive(Debug, Deserialize)]
pub struct PoliciesResponse {
    #[serde(default)]
    pub total_policies: Option<usize>,
    pub policies: Vec<ServerPolicy>,
}

#[derive(Debug, Deserialize)]
pub struct ServerPolicy {
    pub source: Source,
    pub destination: Destination,
}

#[derive(Debug, Deserialize)]
pub struct Source {
    pub id: String,
    #[serde(default)]
    pub tag: String,
}

#[derive(Debug, Deserialize)]
pub struct Destination {
    pub id: String,
    #[serde(default)]
    pub tag: String,
    pub protocol: String,
    #[serde(default)]
    pub ports: Option<Ports>,
    /// The single port of old policy servers (before `ports`).
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Deserialize)]
pub struct Ports {
    pub start: u16,
    pub end: u16,
}

/// What the server's policies say, as the agent enforces it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ServerSet {
    pub policies: BTreeSet<Policy>,
    /// Every app the policies name → its tag.
    pub tags: BTreeMap<String, u32>,
    /// Policies left out, and why (a protocol or port this agent does not
    /// take, a tag that is not hex, two tags for one app).
    pub skipped: Vec<String>,
}

/// The largest tag the agent takes from the server: `tag_length` 3 (24
/// bits). Only 16 bits travel in the VXLAN GBP field (tag_length 2, what
/// Cloud Foundry's cells use); larger ones are judged on this host only.
pub const MAX_SERVER_TAG: u32 = 0xFF_FFFF;

/// A tag as the server writes it: hex digits (`"0001"`).
pub fn parse_tag(text: &str) -> Option<u32> {
    if text.is_empty() || text.len() > 8 || !text.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(text, 16).ok().filter(|t| (1..=MAX_SERVER_TAG).contains(t))
}

impl PoliciesResponse {
    /// The policies the agent can enforce, and the tags of their apps. A
    /// policy that cannot be taken is left out and named in `skipped`
    /// rather than failing the whole set: the others still hold.
    pub fn into_set(self) -> ServerSet {
        let mut set = ServerSet::default();
        for p in self.policies {
            match policy_of(&p) {
                Ok((policy, source_tag, destination_tag)) => {
                    let mut tagged = |app: &str, tag: u32| match set.tags.get(app) {
                        Some(&known) if known != tag => {
                            Err(format!("app {app} has two tags, {known:04X} and {tag:04X}"))
                        }
                        _ => {
                            set.tags.insert(app.to_owned(), tag);
                            Ok(())
                        }
                    };
                    if let Err(why) = tagged(&policy.source, source_tag)
                        .and_then(|()| tagged(&policy.destination, destination_tag))
                    {
                        set.skipped.push(why);
                        continue;
                    }
                    set.policies.insert(policy);
                }
                Err(why) => set.skipped.push(why),
            }
        }
        set.limit_ranges();
        set
    }
}

impl ServerSet {
    /// Keeps each app pair's distinct TCP or UDP port ranges within what
    /// one kernel entry holds ([`policy_common::maps::MAX_PORT_RANGES`];
    /// one fewer for TCP, whose pair may also hold the platform TLS port):
    /// the lowest ranges are kept, the rest left out and named. The policy
    /// server has no such limit; refusing the whole set instead would
    /// leave every policy of the cell stale.
    fn limit_ranges(&mut self) {
        type Pair<'a> = (&'a str, &'a str, Protocol);
        let mut ranges: BTreeMap<Pair, BTreeSet<(u16, u16)>> = BTreeMap::new();
        let mut over = Vec::new();
        for p in &self.policies {
            let limit =
                policy_common::maps::MAX_PORT_RANGES - usize::from(p.protocol == Protocol::Tcp);
            let seen = ranges.entry((&p.source, &p.destination, p.protocol)).or_default();
            if seen.contains(&(p.start, p.end)) || seen.len() < limit {
                seen.insert((p.start, p.end));
            } else {
                over.push(p.clone());
            }
        }
        for p in over {
            self.skipped.push(format!(
                "{} -> {} {} {}-{}: the pair already has the {} distinct port ranges one kernel entry holds",
                p.source,
                p.destination,
                p.protocol.name(),
                p.start,
                p.end,
                policy_common::maps::MAX_PORT_RANGES - usize::from(p.protocol == Protocol::Tcp)
            ));
            self.policies.remove(&p);
        }
    }
}

fn policy_of(p: &ServerPolicy) -> Result<(Policy, u32, u32), String> {
    let (s, d) = (&p.source, &p.destination);
    let name = || format!("{} -> {} {}", s.id, d.id, d.protocol);
    check_app_id("source.id", &s.id).map_err(|e| format!("{}: {e}", name()))?;
    check_app_id("destination.id", &d.id).map_err(|e| format!("{}: {e}", name()))?;
    let protocol = match Protocol::parse(&d.protocol) {
        Some(p @ (Protocol::Tcp | Protocol::Udp)) => p,
        _ => return Err(format!("{}: protocol {:?} is not tcp or udp", name(), d.protocol)),
    };
    let (start, end) = match (&d.ports, d.port) {
        (Some(ports), _) => (ports.start, ports.end),
        (None, Some(port)) => (port, port),
        (None, None) => return Err(format!("{}: no ports", name())),
    };
    check_ports("ports", start.into(), end.into()).map_err(|e| format!("{}: {e}", name()))?;
    let tag = |text: &str, end: &str| {
        parse_tag(text)
            .ok_or_else(|| format!("{}: {end} tag {text:?} is not 1-6 hex digits", name()))
    };
    let policy = Policy {
        source: s.id.as_str().into(),
        destination: d.id.as_str().into(),
        protocol,
        start,
        end,
        tls_only: false,
    };
    Ok((policy, tag(&s.tag, "source")?, tag(&d.tag, "destination")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_response_becomes_policies_and_tags() {
        // shared/fixtures/cf-policy-server/internal-policies-response.json
        let text = r#"{
  "policies": [
    {
      "destination": {
        "id": "eb95ff20-cba8-4edc-8f4a-cf80d0669faf",
        "ports": { "end": 8090, "start": 8080 },
        "protocol": "tcp",
        "tag": "0002"
      },
      "source": { "id": "4a2d3627-0b8c-42d1-9563-22696eedc05d", "tag": "0001" }
    },
    {
      "destination": {
        "id": "d5bbc5ed-886a-44e6-945d-67df1013fa16",
        "ports": { "end": 6666, "start": 5555 },
        "protocol": "tcp",
        "tag": "0006"
      },
      "source": { "id": "d5bbc5ed-886a-44e6-945d-67df1013fa16", "tag": "0006" }
    }
  ]
}"#;
        let set = serde_json::from_str::<PoliciesResponse>(text).unwrap().into_set();
        assert!(set.skipped.is_empty(), "{:?}", set.skipped);
        assert_eq!(set.policies.len(), 2);
        let first = set.policies.iter().find(|p| p.start == 8080).unwrap();
        assert_eq!((first.end, first.protocol), (8090, Protocol::Tcp));
        assert_eq!(set.tags["4a2d3627-0b8c-42d1-9563-22696eedc05d"], 1);
        assert_eq!(set.tags["eb95ff20-cba8-4edc-8f4a-cf80d0669faf"], 2);
        assert_eq!(set.tags["d5bbc5ed-886a-44e6-945d-67df1013fa16"], 6);
    }

    #[test]
    fn what_cannot_be_enforced_is_left_out_and_named() {
        let text = r#"{"policies":[
            {"source":{"id":"a","tag":"0001"},"destination":{"id":"b","tag":"0002","protocol":"tcp","ports":{"start":80,"end":80}}},
            {"source":{"id":"a","tag":"0001"},"destination":{"id":"c","tag":"zz","protocol":"tcp","ports":{"start":80,"end":80}}},
            {"source":{"id":"a","tag":"0001"},"destination":{"id":"b","tag":"0002","protocol":"sctp","ports":{"start":80,"end":80}}},
            {"source":{"id":"a","tag":"0001"},"destination":{"id":"b","tag":"0002","protocol":"udp","ports":{"start":90,"end":80}}},
            {"source":{"id":"a","tag":"0009"},"destination":{"id":"b","tag":"0002","protocol":"udp","ports":{"start":53,"end":53}}},
            {"source":{"id":"b","tag":"0002"},"destination":{"id":"a","tag":"0001","protocol":"udp","port":53}}
        ]}"#;
        let set = serde_json::from_str::<PoliciesResponse>(text).unwrap().into_set();
        assert_eq!(set.policies.len(), 2, "{set:?}");
        assert_eq!(set.skipped.len(), 4, "{:?}", set.skipped);
        assert!(set.skipped[0].contains("\"zz\""), "{:?}", set.skipped);
        assert!(set.skipped[1].contains("sctp"), "{:?}", set.skipped);
        assert!(set.skipped[3].contains("two tags"), "{:?}", set.skipped);
        assert_eq!(set.tags, BTreeMap::from([("a".into(), 1), ("b".into(), 2)]));
    }

    #[test]
    fn a_pair_keeps_the_ranges_one_kernel_entry_holds() {
        let policy = |port: u16, protocol: &str| {
            format!(
                r#"{{"source":{{"id":"a","tag":"0001"}},"destination":{{"id":"b","tag":"0002","protocol":"{protocol}","ports":{{"start":{port},"end":{port}}}}}}}"#
            )
        };
        let limit = policy_common::maps::MAX_PORT_RANGES;
        let all: Vec<String> = (1..=limit as u16 + 4)
            .map(|p| policy(1000 + p, "tcp"))
            .chain((1..=limit as u16 + 4).map(|p| policy(2000 + p, "udp")))
            .collect();
        let text = format!(r#"{{"policies":[{}]}}"#, all.join(","));
        let set = serde_json::from_str::<PoliciesResponse>(&text).unwrap().into_set();
        let count = |p: Protocol| set.policies.iter().filter(|x| x.protocol == p).count();
        assert_eq!(count(Protocol::Tcp), limit - 1, "one range left for the TLS port");
        assert_eq!(count(Protocol::Udp), limit);
        assert_eq!(set.skipped.len(), 9, "{:?}", set.skipped);
        assert!(set.policies.iter().any(|p| p.start == 1001), "the lowest kept");
        assert!(set.skipped[0].contains("distinct port ranges"), "{:?}", set.skipped);
    }

    #[test]
    fn tags_are_hex() {
        assert_eq!(parse_tag("0001"), Some(1));
        assert_eq!(parse_tag("FFFF"), Some(0xFFFF));
        assert_eq!(parse_tag("00ffff"), Some(0xFFFF));
        assert_eq!(parse_tag("0000"), None);
        assert_eq!(parse_tag("1000000"), None);
        assert_eq!(parse_tag("-1"), None);
        assert_eq!(parse_tag(""), None);
    }
}
