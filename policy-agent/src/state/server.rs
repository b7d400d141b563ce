//! Policies and tags from Cloud Foundry's policy server (the `[cf]`
//! section): the server decides both, so that every cell — this agent's
//! and vxlan-policy-agent's alike — puts the same tag on an app's packets
//! and judges the others' by it.
//!
//! Tags: an app the server names has the server's tag (1 to
//! [`crate::cf::wire::MAX_SERVER_TAG`]). Any other app (its containers run
//! here, no policy names it) gets a tag of the agent's own, from
//! [`LOCAL_TAG_BASE`] up: no pair names it, and it cannot travel in the
//! 16-bit VXLAN GBP field (it goes as "no identity"), so no cell mistakes
//! it for a server tag — as Cloud Foundry leaves such apps unmarked.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Policy, State, Undo};

/// The first of the agent's own tags once the policy server gives tags:
/// above every tag it can hand out (3-byte `tag_length` included).
pub const LOCAL_TAG_BASE: u32 = 1 << 24;

/// A change of the policies the policy server serves for this host's apps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerPolicies {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<Policy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<Policy>,
    /// Apps whose server tag is new or changed (Some), or that the server
    /// no longer names (None).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, Option<u32>>,
}

impl State {
    /// The policy server's tags of the apps its policies name.
    pub fn server_tags(&self) -> &BTreeMap<String, u32> {
        &self.server_tags
    }

    /// What makes the state's policies exactly `policies`, with the
    /// server's `tags`. Every policy the state holds is replaced: with the
    /// policy server as the source, there are no others.
    pub fn server_change(
        &self,
        policies: &BTreeSet<Policy>,
        tags: &BTreeMap<String, u32>,
    ) -> ServerPolicies {
        let add = policies.iter().filter(|p| self.policies.get(p).is_none()).cloned().collect();
        let remove = self
            .policies
            .sorted()
            .map(|r| r.to_policy())
            .filter(|p| !policies.contains(p))
            .collect();
        let mut changed: BTreeMap<String, Option<u32>> = tags
            .iter()
            .filter(|(app, tag)| self.server_tags.get(*app) != Some(tag))
            .map(|(app, tag)| (app.clone(), Some(*tag)))
            .collect();
        for app in self.server_tags.keys().filter(|app| !tags.contains_key(*app)) {
            changed.insert(app.clone(), None);
        }
        ServerPolicies { add, remove, tags: changed }
    }

    /// Whether following `change` gives some app that has a tag another
    /// one (the kernel then needs a full reconcile: endpoints and veths
    /// carry the tag).
    pub fn retags(&self, change: &ServerPolicies) -> bool {
        let named = change.tags.iter().any(|(app, new)| match (self.tags.get(app), new) {
            (Some(old), Some(new)) => old != new,
            (Some(_), None) => true,
            (None, _) => false,
        });
        named || self.next_tag < LOCAL_TAG_BASE || self.foreign_tags().next().is_some()
    }

    /// Apps whose tag is below [`LOCAL_TAG_BASE`] yet not the server's:
    /// tags the agent handed out before the policy server was its source.
    fn foreign_tags(&self) -> impl Iterator<Item = &str> {
        self.tags
            .iter()
            .filter(|(app, tag)| **tag < LOCAL_TAG_BASE && self.server_tags.get(*app) != Some(tag))
            .map(|(app, _)| app.as_str())
    }

    /// Follows a change from the policy server (replaying it gives the same
    /// state: tags and ids included).
    pub fn follow_server(&mut self, change: &ServerPolicies) {
        let _ = self.follow_server_undoable(change);
    }

    /// [`Self::follow_server`], returning what [`Self::undo`] needs.
    pub fn follow_server_undoable(&mut self, change: &ServerPolicies) -> Undo {
        let mut removed = Vec::new();
        for p in &change.remove {
            if let Some(id) = self.policies.get(p) {
                removed.push((p.clone(), id));
            }
        }
        let mut undo = self.undo_record(self.tags.keys().map(String::as_str).collect::<Vec<_>>());
        undo.removed = removed;
        undo.added =
            change.add.iter().filter(|p| self.policies.get(p).is_none()).cloned().collect();
        let next_tag = self.next_tag;
        undo.server_tags = Some(self.server_tags.clone());
        for (app, tag) in &change.tags {
            match tag {
                Some(tag) => self.server_tags.insert(app.clone(), *tag),
                None => self.server_tags.remove(app),
            };
        }
        self.next_tag = self.next_tag.max(LOCAL_TAG_BASE);
        self.remove_policies(&change.remove);
        self.insert_policies(&change.add);
        // Every tagged app: the server's tag, else its own one if it has
        // one, else a new one of its own (in name order, so a replay
        // hands out the same).
        let retag: Vec<(String, u32)> = self
            .tags
            .iter()
            .filter_map(|(app, &tag)| {
                let wanted = match self.server_tags.get(app) {
                    Some(&server) => Some(server),
                    None if tag >= LOCAL_TAG_BASE => Some(tag),
                    None => None,
                };
                (wanted != Some(tag)).then(|| (app.clone(), wanted.unwrap_or(0)))
            })
            .collect();
        for (app, wanted) in retag {
            let tag = if wanted == 0 {
                let tag = self.next_tag;
                self.next_tag += 1;
                tag
            } else {
                wanted
            };
            if let Some(old) = self.tags.insert(app.clone(), tag) {
                undo.retagged.push((app, old));
            }
        }
        undo.server_changed =
            undo.server_tags.as_ref() != Some(&self.server_tags) || next_tag != self.next_tag;
        undo
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::state::Endpoint;

    fn set(policies: &[Policy]) -> BTreeSet<Policy> {
        policies.iter().cloned().collect()
    }

    fn tags(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        pairs.iter().map(|(a, t)| ((*a).to_owned(), *t)).collect()
    }

    /// Follows a server answer the way the agent does; returns the change.
    fn follow(state: &mut State, policies: &[Policy], server: &[(&str, u32)]) -> ServerPolicies {
        let change = state.server_change(&set(policies), &tags(server));
        state.follow_server(&change);
        change
    }

    #[test]
    fn server_tags_replace_the_agents_own() {
        let mut state = State::default();
        // Registered before the policy server was the source: tag 1.
        state.add_endpoint(Endpoint::test(1, "web"));
        state.add_endpoint(Endpoint::test(2, "lonely"));
        assert_eq!(state.tag("web"), Some(1));
        let policy = Policy::tcp("web", "api", 8080);
        let change =
            follow(&mut state, std::slice::from_ref(&policy), &[("web", 7), ("api", 0x12)]);
        assert_eq!(change.add, vec![policy.clone()]);
        assert_eq!(state.tag("web"), Some(7));
        assert_eq!(state.tag("api"), Some(0x12));
        // An app no policy names: a tag of the agent's own, that cannot
        // travel in GBP's 16 bits.
        assert!(state.tag("lonely").unwrap() >= LOCAL_TAG_BASE);
        assert_eq!(
            state
                .endpoint_value(state.endpoint(IpAddr::from([10, 255, 0, 1])).unwrap())
                .unwrap()
                .tag,
            7
        );
        // Nothing new: no change.
        let again = state.server_change(
            &set(std::slice::from_ref(&policy)),
            &tags(&[("web", 7), ("api", 0x12)]),
        );
        assert_eq!(again, ServerPolicies::default());
        assert!(!state.retags(&again));
        let mut copy = state.clone();
        assert!(!copy.follow_server_undoable(&again).changes_anything());
        // The policy deleted at the server: web keeps its endpoint, loses
        // the server's tag and gets one of the agent's own.
        let change = follow(&mut state, &[], &[]);
        assert_eq!(change.remove, vec![policy]);
        assert_eq!(change.tags, BTreeMap::from([("api".into(), None), ("web".into(), None)]));
        assert!(state.tag("web").unwrap() >= LOCAL_TAG_BASE);
        assert_eq!(state.tag("api"), None);
        assert!(state.server_tags().is_empty());
    }

    #[test]
    fn a_tag_the_server_hands_to_another_app_moves() {
        let mut state = State::default();
        state.add_endpoint(Endpoint::test(1, "x"));
        state.add_endpoint(Endpoint::test(2, "y"));
        follow(&mut state, &[Policy::tcp("x", "z", 80)], &[("x", 5), ("z", 6)]);
        assert_eq!(state.tag("x"), Some(5));
        // x's policies gone, its tag 5 now y's (the server reuses rows).
        follow(&mut state, &[Policy::tcp("y", "z", 80)], &[("y", 5), ("z", 6)]);
        assert_eq!(state.tag("y"), Some(5));
        assert!(state.tag("x").unwrap() >= LOCAL_TAG_BASE);
        let pairs = state.pairs();
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs.keys().next().unwrap().src_tag, 5);
    }

    #[test]
    fn undo_and_replay_are_exact() {
        let mut state = State::default();
        state.add_endpoint(Endpoint::test(1, "web"));
        state.insert_policies(&[Policy::tcp("old", "web", 1)]);
        let before = state.clone();
        let change = state.server_change(
            &set(&[Policy::tcp("web", "api", 8080), Policy::tcp("api", "web", 9000)]),
            &tags(&[("web", 3), ("api", 4)]),
        );
        let undo = state.follow_server_undoable(&change);
        assert!(undo.changes_anything());
        let after = state.clone();
        state.undo(undo);
        assert_eq!(state, before);
        // Replayed from the journal record (JSON), the same state.
        let record: ServerPolicies =
            serde_json::from_str(&serde_json::to_string(&change).unwrap()).unwrap();
        let mut replayed = before.clone();
        replayed.follow_server(&record);
        assert_eq!(replayed, after);
        // And stored and loaded, the server's tags kept.
        let stored: State = serde_json::from_str(&serde_json::to_string(&after).unwrap()).unwrap();
        assert_eq!(stored, after);
        assert_eq!(stored.server_tags(), &tags(&[("api", 4), ("web", 3)]));
    }
}
