//! Changes made in place with an undo record: a change costs what it
//! touches, not a copy of the state, and a failed write (kernel or store)
//! takes it back exactly, ids and tags included.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::{Endpoint, Invalid, Policy, State};

/// What takes a change made in place back exactly — ids and tags included
/// (see the `_undoable` methods of [`State`]): changes cost what they
/// touch, not a copy of the whole state.
#[derive(Debug)]
#[must_use]
pub struct Undo {
    pub(super) added: Vec<Policy>,
    pub(super) removed: Vec<(Policy, u32)>,
    /// An endpoint address and what it held before.
    endpoint: Option<(IpAddr, Option<Endpoint>)>,
    /// A route hostname and the app it was mapped to before.
    route: Option<(String, Option<String>)>,
    /// An app and the security group rules it had before.
    netout: Option<(String, Option<Vec<super::NetOutRule>>)>,
    /// Tags of the apps the change touched (it may take them away).
    tags: BTreeMap<String, u32>,
    /// Apps the change gave another tag, with the tag they had.
    pub(super) retagged: Vec<(String, u32)>,
    /// The policy server's tags before a change from it (None: the
    /// change did not touch them).
    pub(super) server_tags: Option<BTreeMap<String, u32>>,
    /// A change from the policy server changed its tags or `next_tag`.
    pub(super) server_changed: bool,
    next_tag: u32,
    next_policy_id: u32,
}

impl Undo {
    /// Whether the change changed anything.
    pub fn changes_anything(&self) -> bool {
        !self.added.is_empty()
            || !self.removed.is_empty()
            || self.endpoint.is_some()
            || self.route.is_some()
            || self.netout.is_some()
            || !self.retagged.is_empty()
            || self.server_changed
    }
}

impl State {
    /// [`Self::add_policies`], returning what [`Self::undo`] needs to take
    /// the change back exactly (ids and tags included).
    pub fn add_policies_undoable(
        &mut self,
        policies: &[Policy],
        limit: Option<usize>,
    ) -> Result<Undo, Invalid> {
        self.check_add(policies, limit)?;
        let mut undo = self.undo_record([]);
        let mut added = Vec::new();
        self.insert_new_policies(policies, |p| added.push(p.clone()));
        undo.added = added;
        Ok(undo)
    }

    /// [`Self::remove_policies`], returning what [`Self::undo`] needs.
    pub fn remove_policies_undoable(&mut self, policies: &[Policy]) -> Undo {
        let mut removed: Vec<(Policy, u32)> = Vec::new();
        let mut seen = BTreeSet::new();
        for p in policies {
            if let Some(id) = self.policies.get(p)
                && seen.insert(p)
            {
                removed.push((p.clone(), id));
            }
        }
        let apps = removed.iter().flat_map(|(p, _)| [p.source.as_str(), p.destination.as_str()]);
        let mut undo = self.undo_record(apps);
        undo.removed = removed;
        self.remove_policies(policies);
        undo
    }

    /// [`Self::add_endpoint`], returning what [`Self::undo`] needs.
    pub fn add_endpoint_undoable(&mut self, endpoint: Endpoint) -> Undo {
        let before = self.endpoints.get(&endpoint.ip).cloned();
        let mut undo = self.undo_record(before.iter().map(|e| e.app.as_str()));
        undo.endpoint = Some((endpoint.ip, before));
        self.add_endpoint(endpoint);
        undo
    }

    /// [`Self::remove_endpoint`], returning what [`Self::undo`] needs.
    pub fn remove_endpoint_undoable(&mut self, ip: IpAddr) -> Undo {
        let before = self.endpoints.get(&ip).cloned();
        let mut undo = self.undo_record(before.iter().map(|e| e.app.as_str()));
        if self.remove_endpoint(ip).is_some() {
            undo.endpoint = Some((ip, before));
        }
        undo
    }

    /// [`Self::map_route`], returning what [`Self::undo`] needs.
    pub fn map_route_undoable(&mut self, app: &str, hostname: &str) -> Result<Undo, Invalid> {
        let mut undo = self.undo_record([]);
        let before = self.routes.get(hostname).cloned();
        self.map_route(app, hostname)?;
        if before.as_deref() != Some(app) {
            undo.route = Some((hostname.to_owned(), before));
        }
        Ok(undo)
    }

    /// [`Self::set_netout`], returning what [`Self::undo`] needs.
    pub fn set_netout_undoable(
        &mut self,
        app: &str,
        rules: Option<Vec<super::NetOutRule>>,
    ) -> Undo {
        let mut undo = self.undo_record([]);
        let before = self.netout.get(app).cloned();
        if before != rules {
            undo.netout = Some((app.to_owned(), before));
            self.set_netout(app, rules);
        }
        undo
    }

    /// [`Self::unmap_route`], returning what [`Self::undo`] needs.
    pub fn unmap_route_undoable(&mut self, app: &str, hostname: &str) -> Result<Undo, Invalid> {
        let mut undo = self.undo_record([]);
        let before = self.routes.get(hostname).cloned();
        self.unmap_route(app, hostname)?;
        if before.is_some() {
            undo.route = Some((hostname.to_owned(), before));
        }
        Ok(undo)
    }

    /// An empty undo record holding the counters and the tags of `apps`.
    pub(super) fn undo_record<'a>(&self, apps: impl IntoIterator<Item = &'a str>) -> Undo {
        Undo {
            added: Vec::new(),
            removed: Vec::new(),
            endpoint: None,
            route: None,
            netout: None,
            tags: apps
                .into_iter()
                .filter_map(|app| Some((app.to_owned(), *self.tags.get(app)?)))
                .collect(),
            retagged: Vec::new(),
            server_tags: None,
            server_changed: false,
            next_tag: self.next_tag,
            next_policy_id: self.next_policy_id,
        }
    }

    /// Takes back a change made by one of the `_undoable` methods (the last
    /// change made): what it added goes (taking new apps' tags with it),
    /// what it took away comes back with its old tags and ids.
    pub fn undo(&mut self, undo: Undo) {
        self.remove_policies(&undo.added);
        if let Some((ip, before)) = undo.endpoint {
            self.remove_endpoint(ip);
            if let Some(e) = before {
                self.reference(&e.app);
                self.endpoints.insert(ip, e);
            }
        }
        for (p, id) in undo.removed {
            let p = self.interned(&p);
            if self.policies.insert(&p, id) {
                self.reference(&p.source);
                self.reference(&p.destination);
            }
        }
        for (app, tag) in undo.tags {
            if self.refs.contains_key(app.as_str()) {
                self.tags.entry(app).or_insert(tag);
            }
        }
        for (app, tag) in undo.retagged {
            if self.refs.contains_key(app.as_str()) {
                self.tags.insert(app, tag);
            }
        }
        if let Some(before) = undo.server_tags {
            self.server_tags = before;
        }
        if let Some((app, before)) = undo.netout {
            self.set_netout(&app, before);
        }
        if let Some((hostname, before)) = undo.route {
            match before {
                Some(app) => self.routes.insert(hostname, app),
                None => self.routes.remove(&hostname),
            };
        }
        self.next_tag = undo.next_tag;
        self.next_policy_id = undo.next_policy_id;
    }
}
