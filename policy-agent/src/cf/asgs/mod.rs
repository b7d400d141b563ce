//! Cloud Foundry's dynamic Application Security Groups, as
//! vxlan-policy-agent reads them from the policy server and turns them
//! into a container's egress rules:
//!
//! - here: the groups as the server serves them (`GET
//!   /networking/v1/internal/security_groups`) and the paged fetch;
//! - `rules`: which groups hold for a container (its space and workload)
//!   and their rules as the agent's NetOut rules;
//! - `destination`: a rule's destination list (IP, CIDR, range).
//!
//! What the server takes (policy-server `handlers/asgs_index.go`,
//! `store/security_groups_store.go`, v3.53.0):
//!
//! - `space_guids=S1,S2`: the groups bound to one of the spaces, for
//!   staging or running, and every staging or running default. Without
//!   it the server returns the **default groups only**, not all groups.
//! - `limit=N`: at most N groups, ordered by their row id; `next` is the
//!   row id of the first group left out (0: none). `limit` absent or 0:
//!   all groups in one answer.
//! - `from=ID`: groups from row id ID on (`id >= ID`), so the next page
//!   is asked with `from=next`.
//! - `per_page`, which vxlan-policy-agent sends (5000), is not read: CF's
//!   own cells get every group in one answer and never page.

mod destination;
mod rules;

use serde::{Deserialize, Deserializer};

pub use self::rules::{BadDestination, RulesFor, Workload, rules_for};
use super::{
    PolicyServerClient, ServerError,
    client::{INTERNAL_API, query_escape},
};

/// Groups asked for per request: what vxlan-policy-agent means to ask
/// (its `per_page`), sent as the `limit` the server reads.
pub const PAGE_SIZE: u32 = 5000;

/// One security group as the internal API serves it. A value the server
/// leaves `null` or out reads as Go's zero value, as vxlan-policy-agent
/// reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct SecurityGroup {
    #[serde(default, deserialize_with = "null_is_default")]
    pub guid: String,
    #[serde(default, deserialize_with = "null_is_default")]
    pub name: String,
    /// Served as a JSON string holding the JSON array Cloud Controller
    /// stored.
    #[serde(default, deserialize_with = "rules_in_a_string")]
    pub rules: Vec<AsgRule>,
    /// Holds for every staging container on every cell.
    #[serde(default, deserialize_with = "null_is_default")]
    pub staging_default: bool,
    /// Holds for every app and task container on every cell.
    #[serde(default, deserialize_with = "null_is_default")]
    pub running_default: bool,
    /// Spaces whose staging containers it holds for.
    #[serde(default, deserialize_with = "null_is_default")]
    pub staging_space_guids: Vec<String>,
    /// Spaces whose app and task containers it holds for.
    #[serde(default, deserialize_with = "null_is_default")]
    pub running_space_guids: Vec<String>,
}

/// One rule of a group, as Cloud Controller stores it (the fields of
/// `cf create-security-group`'s JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct AsgRule {
    /// `tcp`, `udp`, `icmp` or `all`.
    #[serde(default, deserialize_with = "null_is_default")]
    pub protocol: String,
    /// Comma-separated IPs, CIDRs and `A-B` ranges.
    #[serde(default, deserialize_with = "null_is_default")]
    pub destination: String,
    /// Comma-separated ports and `A-B` port ranges (tcp and udp).
    #[serde(default, deserialize_with = "null_is_default")]
    pub ports: String,
    /// ICMP type (-1: any).
    #[serde(rename = "type", default, deserialize_with = "null_is_default")]
    pub icmp_type: i64,
    /// ICMP code (-1: any).
    #[serde(default, deserialize_with = "null_is_default")]
    pub code: i64,
    #[serde(default, deserialize_with = "null_is_default")]
    pub log: bool,
    #[serde(default, deserialize_with = "null_is_default")]
    pub description: String,
}

/// One answer: `{"next": ID, "security_groups": [...]}`.
#[derive(Debug, Deserialize)]
struct SecurityGroupsPage {
    #[serde(default, deserialize_with = "null_is_default")]
    next: u64,
    #[serde(default, deserialize_with = "null_is_default")]
    security_groups: Vec<SecurityGroup>,
}

impl PolicyServerClient {
    /// The security groups that can hold for containers in
    /// `space_guids`: the groups bound to those spaces and the defaults
    /// (only the defaults when `space_guids` is empty). Pages of
    /// [`PAGE_SIZE`]; any page failing fails the fetch, as in
    /// vxlan-policy-agent, so a caller keeps what it had.
    pub fn security_groups(
        &self,
        space_guids: &[String],
    ) -> Result<Vec<SecurityGroup>, ServerError> {
        self.security_groups_in_pages(space_guids, PAGE_SIZE)
    }

    /// As [`Self::security_groups`], `page_size` groups per request.
    pub fn security_groups_in_pages(
        &self,
        space_guids: &[String],
        page_size: u32,
    ) -> Result<Vec<SecurityGroup>, ServerError> {
        let mut query = format!("{INTERNAL_API}/security_groups?limit={page_size}");
        if !space_guids.is_empty() {
            // The server splits the decoded value at commas.
            let spaces: Vec<String> = space_guids.iter().map(|s| query_escape(s)).collect();
            query.push_str(&format!("&space_guids={}", spaces.join(",")));
        }
        let mut groups = Vec::new();
        let mut from = 0;
        loop {
            let path = if from == 0 { query.clone() } else { format!("{query}&from={from}") };
            let body = self.get(&path)?;
            let page: SecurityGroupsPage =
                serde_json::from_slice(&body).map_err(|e| self.malformed(&path, e.to_string()))?;
            groups.extend(page.security_groups);
            if page.next == 0 {
                return Ok(groups);
            }
            // `next` is a row id past this page's: one that does not move
            // on would ask for the same page forever.
            if page.next <= from {
                return Err(self.malformed(
                    &path,
                    format!("next {} does not move past from {from}", page.next),
                ));
            }
            from = page.next;
        }
    }
}

/// `null` as the type's zero value (Go's decoding leaves it so).
fn null_is_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `rules`: a JSON string holding a JSON array (`"null"` or absent:
/// none). Anything else, `null` too, fails the fetch, as
/// vxlan-policy-agent's decoding (`strconv.Unquote`, then the array)
/// fails.
fn rules_in_a_string<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<AsgRule>, D::Error> {
    let text = String::deserialize(d)?;
    let rules: Option<Vec<AsgRule>> = serde_json::from_str(&text)
        .map_err(|e| serde::de::Error::custom(format!("rules {text:?}: {e}")))?;
    Ok(rules.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_as_the_server_writes_it() {
        // As policy-server-internal answers (tests/tests/cf_asgs.rs asks
        // the real one).
        let text = r#"{"next":7,"security_groups":[{"guid":"d1a2","name":"public",
            "rules":"[{\"protocol\":\"tcp\",\"destination\":\"0.0.0.0-9.255.255.255\",\"ports\":\"443,80-90\",\"description\":\"web\"},{\"protocol\":\"icmp\",\"destination\":\"10.0.0.0/8\",\"type\":-1,\"code\":-1,\"log\":true}]",
            "staging_default":false,"running_default":true,
            "staging_space_guids":[],"running_space_guids":["space-1"]}]}"#;
        let page: SecurityGroupsPage = serde_json::from_str(text).unwrap();
        assert_eq!(page.next, 7);
        let group = &page.security_groups[0];
        assert_eq!((group.guid.as_str(), group.name.as_str()), ("d1a2", "public"));
        assert!(group.running_default && !group.staging_default);
        assert_eq!(group.running_space_guids, ["space-1"]);
        assert!(group.staging_space_guids.is_empty());
        assert_eq!(
            group.rules,
            [
                AsgRule {
                    protocol: "tcp".into(),
                    destination: "0.0.0.0-9.255.255.255".into(),
                    ports: "443,80-90".into(),
                    description: "web".into(),
                    ..AsgRule::default()
                },
                AsgRule {
                    protocol: "icmp".into(),
                    destination: "10.0.0.0/8".into(),
                    icmp_type: -1,
                    code: -1,
                    log: true,
                    ..AsgRule::default()
                },
            ]
        );
    }

    #[test]
    fn nulls_and_absences_read_as_zero_values() {
        let text = r#"{"next":0,"security_groups":[{"guid":"g","name":"n","rules":"null",
            "staging_space_guids":null}]}"#;
        let page: SecurityGroupsPage = serde_json::from_str(text).unwrap();
        assert_eq!(page.next, 0);
        let group = &page.security_groups[0];
        assert!(group.rules.is_empty() && group.staging_space_guids.is_empty());
        assert!(!group.running_default && !group.staging_default);
        let page: SecurityGroupsPage = serde_json::from_str(r#"{"security_groups":null}"#).unwrap();
        assert!(page.security_groups.is_empty());
        let rule: AsgRule =
            serde_json::from_str(r#"{"destination":"1.2.3.4","ports":null}"#).unwrap();
        assert_eq!(rule, AsgRule { destination: "1.2.3.4".into(), ..AsgRule::default() });
    }

    #[test]
    fn rules_must_be_a_string_holding_an_array() {
        let group = |rules: &str| {
            serde_json::from_str::<SecurityGroup>(&format!(r#"{{"guid":"g","rules":{rules}}}"#))
                .map_err(|e| e.to_string())
        };
        assert!(group(r#""[]""#).unwrap().rules.is_empty());
        // Not a string, no JSON in it, a field of the wrong type: the
        // fetch fails, as vxlan-policy-agent's does.
        assert!(group(r#"[{"protocol":"all"}]"#).is_err());
        assert!(group(r#""""#).unwrap_err().contains("rules"));
        assert!(group(r#""[{\"ports\":80}]""#).is_err());
        assert!(group("null").is_err());
    }
}
