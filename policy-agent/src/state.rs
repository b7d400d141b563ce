//! Desired state: apps and their tags, policies, endpoints. Pure data and
//! rules; no kernel, no I/O. The agent changes it only through the methods
//! here, which validate first and change nothing on error.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
};

use policy_common::{
    maps::{PairKey, proto},
    ports::Allowance,
};
use serde::{Deserialize, Serialize};

/// Longest app id accepted (CF's are UUIDs, 36 characters).
pub const MAX_ID_LEN: usize = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proto::TCP,
            Protocol::Udp => proto::UDP,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            _ => None,
        }
    }
}

/// One policy: `source` app may reach `destination` app on `protocol`,
/// destination ports `start..=end`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Policy {
    pub source: String,
    pub destination: String,
    pub protocol: Protocol,
    pub start: u16,
    pub end: u16,
    /// Allow only the TLS port fronting the app port, not the port itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_only: bool,
}

/// A container instance, as a CNI plugin reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub app: String,
    /// Host-side veth.
    pub ifname: String,
    /// The container's network namespace (a path such as /var/run/netns/X).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
}

/// Why a change was refused. `field` names the offending input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Checks an app id: non-empty, at most [`MAX_ID_LEN`] bytes, printable, no
/// whitespace, no commas (ids are comma-separated in API filters).
pub fn check_app_id(field: &str, id: &str) -> Result<(), Invalid> {
    if id.is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(Invalid::new(field, format!("longer than {MAX_ID_LEN} bytes")));
    }
    if id.chars().any(|c| c.is_control() || c.is_whitespace() || c == ',') {
        return Err(Invalid::new(
            field,
            "must not contain whitespace, control characters or commas",
        ));
    }
    Ok(())
}

/// Checks a port range (1-65535, start <= end).
pub fn check_ports(field: &str, start: i64, end: i64) -> Result<(u16, u16), Invalid> {
    for (name, port) in [("start", start), ("end", end)] {
        if !(1..=65535).contains(&port) {
            return Err(Invalid::new(
                format!("{field}.{name}"),
                format!("{port} is not a port in 1-65535"),
            ));
        }
    }
    if start > end {
        return Err(Invalid::new(field, format!("start {start} is greater than end {end}")));
    }
    Ok((start as u16, end as u16))
}

/// The whole desired state, as stored on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Stored", into = "Stored")]
pub struct State {
    next_tag: u32,
    next_policy_id: u32,
    tags: BTreeMap<String, u32>,
    /// Ordered by (source, destination, protocol, ports): the policies of one
    /// app pair and protocol are contiguous.
    policies: BTreeMap<Policy, u32>,
    endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    /// Internal routes: hostname (under [`INTERNAL_DOMAIN`]) → app.
    routes: BTreeMap<String, String>,
    /// Platform TLS: which TLS port fronts which app port (configuration,
    /// not stored).
    tls_ports: Option<TlsPorts>,
    /// How many policy ends and endpoints name each app (derived, not
    /// stored): an app whose count drops to zero loses its tag.
    refs: BTreeMap<String, usize>,
}

/// What takes a change made in place back exactly — ids and tags included
/// (see the `_undoable` methods of [`State`]): changes cost what they
/// touch, not a copy of the whole state.
#[derive(Debug)]
#[must_use]
pub struct Undo {
    added: Vec<Policy>,
    removed: Vec<(Policy, u32)>,
    /// An endpoint address and what it held before.
    endpoint: Option<(Ipv4Addr, Option<Endpoint>)>,
    /// A route hostname and the app it was mapped to before.
    route: Option<(String, Option<String>)>,
    /// Tags of the apps the change touched (it may take them away).
    tags: BTreeMap<String, u32>,
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
    }
}

/// The on-disk shape, borrowed from a state: serializes exactly like
/// [`State`] (through `Stored`) without copying it, for snapshots of
/// large states.
#[derive(Serialize)]
pub struct StoredRef<'a> {
    version: u32,
    next_tag: u32,
    next_policy_id: u32,
    tags: &'a BTreeMap<String, u32>,
    #[serde(serialize_with = "policies_as_list")]
    policies: &'a BTreeMap<Policy, u32>,
    #[serde(serialize_with = "endpoints_as_list")]
    endpoints: &'a BTreeMap<Ipv4Addr, Endpoint>,
    routes: &'a BTreeMap<String, String>,
}

fn policies_as_list<S: serde::Serializer>(
    policies: &&BTreeMap<Policy, u32>,
    s: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Item<'a> {
        id: u32,
        #[serde(flatten)]
        policy: &'a Policy,
    }
    s.collect_seq(policies.iter().map(|(policy, &id)| Item { id, policy }))
}

fn endpoints_as_list<S: serde::Serializer>(
    endpoints: &&BTreeMap<Ipv4Addr, Endpoint>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(endpoints.values())
}

impl State {
    /// The state in its stored shape, borrowed.
    pub fn stored(&self) -> StoredRef<'_> {
        StoredRef {
            version: 1,
            next_tag: self.next_tag,
            next_policy_id: self.next_policy_id,
            tags: &self.tags,
            policies: &self.policies,
            endpoints: &self.endpoints,
            routes: &self.routes,
        }
    }
}

/// On-disk shape (JSON): lists instead of maps keyed by structs.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stored {
    version: u32,
    next_tag: u32,
    next_policy_id: u32,
    tags: BTreeMap<String, u32>,
    policies: Vec<StoredPolicy>,
    endpoints: Vec<Endpoint>,
    #[serde(default)]
    routes: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredPolicy {
    id: u32,
    #[serde(flatten)]
    policy: Policy,
}

impl From<Stored> for State {
    fn from(s: Stored) -> Self {
        let mut state = Self {
            next_tag: s.next_tag,
            next_policy_id: s.next_policy_id,
            tags: s.tags,
            policies: s.policies.into_iter().map(|p| (p.policy, p.id)).collect(),
            endpoints: s.endpoints.into_iter().map(|e| (e.ip, e)).collect(),
            routes: s.routes,
            tls_ports: None,
            refs: BTreeMap::new(),
        };
        let named: Vec<String> = state
            .policies
            .keys()
            .flat_map(|p| [p.source.clone(), p.destination.clone()])
            .chain(state.endpoints.values().map(|e| e.app.clone()))
            .collect();
        for app in named {
            *state.refs.entry(app).or_default() += 1;
        }
        state
    }
}

impl From<State> for Stored {
    fn from(s: State) -> Self {
        Self {
            version: 1,
            next_tag: s.next_tag,
            next_policy_id: s.next_policy_id,
            tags: s.tags,
            policies: s
                .policies
                .into_iter()
                .map(|(policy, id)| StoredPolicy { id, policy })
                .collect(),
            endpoints: s.endpoints.into_values().collect(),
            routes: s.routes,
        }
    }
}

impl Default for State {
    fn default() -> Self {
        Self {
            next_tag: 1,
            next_policy_id: 1,
            tags: BTreeMap::new(),
            policies: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            routes: BTreeMap::new(),
            tls_ports: None,
            refs: BTreeMap::new(),
        }
    }
}

/// A TLS port fronting an app port on every instance (Cloud Foundry's
/// `internal_tls_proxy` for `internal`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsFront {
    pub app_port: u16,
    pub tls_port: u16,
}

/// Platform TLS ports: the default front and per-app app ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPorts {
    pub default: TlsFront,
    /// App id → the app port its TLS listener forwards to, if not the default.
    pub per_app: BTreeMap<String, u16>,
}

/// The one domain internal routes live under.
pub const INTERNAL_DOMAIN: &str = "apps.internal";

/// Checks and normalises a route hostname: one DNS label (RFC 1035: 1-63
/// letters, digits and hyphens, not starting or ending with a hyphen),
/// lower-cased.
pub fn check_hostname(field: &str, hostname: &str) -> Result<String, Invalid> {
    let label = hostname.to_ascii_lowercase();
    if label.is_empty() || label.len() > 63 {
        return Err(Invalid::new(field, "must be 1 to 63 characters (one DNS label)"));
    }
    if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(Invalid::new(
            field,
            format!("{hostname:?} may hold only letters, digits and hyphens"),
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(Invalid::new(
            field,
            format!("{hostname:?} must not start or end with a hyphen"),
        ));
    }
    Ok(label)
}

/// Checks the domain of a route: only [`INTERNAL_DOMAIN`].
pub fn check_domain(field: &str, domain: &str) -> Result<(), Invalid> {
    if domain.trim_end_matches('.').eq_ignore_ascii_case(INTERNAL_DOMAIN) {
        Ok(())
    } else {
        Err(Invalid::new(field, format!("{domain:?}: only the {INTERNAL_DOMAIN} domain is served")))
    }
}

/// Tags as the API shows them: zero-padded upper-case hex ("0001").
pub fn tag_text(tag: u32) -> String {
    format!("{tag:04X}")
}

impl State {
    pub fn tags(&self) -> &BTreeMap<String, u32> {
        &self.tags
    }

    pub fn tag(&self, app: &str) -> Option<u32> {
        self.tags.get(app).copied()
    }

    pub fn policies(&self) -> impl Iterator<Item = (&Policy, u32)> {
        self.policies.iter().map(|(p, id)| (p, *id))
    }

    pub fn policy_id(&self, policy: &Policy) -> Option<u32> {
        self.policies.get(policy).copied()
    }

    pub fn policy_count(&self) -> usize {
        self.policies.len()
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }

    pub fn endpoint(&self, ip: Ipv4Addr) -> Option<&Endpoint> {
        self.endpoints.get(&ip)
    }

    /// Gives every app in `apps` that has none a tag, in id order (as Cloud
    /// Foundry's policy server does within one request).
    fn allocate_tags<'a>(&mut self, apps: impl IntoIterator<Item = &'a str>) {
        let new: BTreeSet<&str> =
            apps.into_iter().filter(|a| !self.tags.contains_key(*a)).collect();
        for app in new {
            self.tags.insert(app.to_owned(), self.next_tag);
            self.next_tag += 1;
        }
    }

    fn reference(&mut self, app: &str) {
        *self.refs.entry(app.to_owned()).or_default() += 1;
    }

    /// Drops one reference to `app`; with none left it loses its tag. Tags
    /// are never handed out again (`next_tag` only grows), so a forgotten tag
    /// cannot be confused with a new app's.
    fn unreference(&mut self, app: &str) {
        if let Some(n) = self.refs.get_mut(app) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(app);
                self.tags.remove(app);
            }
        }
    }

    /// Adds policies (existing ones are not an error). `limit` caps the
    /// policies of one source app. All or nothing.
    pub fn add_policies(
        &mut self,
        policies: &[Policy],
        limit: Option<usize>,
    ) -> Result<(), Invalid> {
        self.check_add(policies, limit)?;
        self.insert_policies(policies);
        Ok(())
    }

    /// [`Self::add_policies`], returning what [`Self::undo`] needs to take
    /// the change back exactly (ids and tags included).
    pub fn add_policies_undoable(
        &mut self,
        policies: &[Policy],
        limit: Option<usize>,
    ) -> Result<Undo, Invalid> {
        self.check_add(policies, limit)?;
        let mut undo = self.undo_record([]);
        let mut seen = BTreeSet::new();
        for p in policies {
            if !self.policies.contains_key(p) && seen.insert(p) {
                undo.added.push(p.clone());
            }
        }
        self.insert_policies(policies);
        Ok(undo)
    }

    /// [`Self::remove_policies`], returning what [`Self::undo`] needs.
    pub fn remove_policies_undoable(&mut self, policies: &[Policy]) -> Undo {
        let mut removed: Vec<(Policy, u32)> = Vec::new();
        let mut seen = BTreeSet::new();
        for p in policies {
            if let Some(&id) = self.policies.get(p)
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
    pub fn remove_endpoint_undoable(&mut self, ip: Ipv4Addr) -> Undo {
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
    fn undo_record<'a>(&self, apps: impl IntoIterator<Item = &'a str>) -> Undo {
        Undo {
            added: Vec::new(),
            removed: Vec::new(),
            endpoint: None,
            route: None,
            tags: apps
                .into_iter()
                .filter_map(|app| Some((app.to_owned(), *self.tags.get(app)?)))
                .collect(),
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
            self.reference(&p.source);
            self.reference(&p.destination);
            self.policies.insert(p, id);
        }
        for (app, tag) in undo.tags {
            if self.refs.contains_key(&app) {
                self.tags.entry(app).or_insert(tag);
            }
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

    /// The read-only checks of [`Self::add_policies`].
    fn check_add(&self, policies: &[Policy], limit: Option<usize>) -> Result<(), Invalid> {
        for (i, p) in policies.iter().enumerate().filter(|(_, p)| p.tls_only) {
            let field = format!("policies[{i}].tls_only");
            let Some(front) = self.tls_front(&p.destination) else {
                return Err(Invalid::new(field, "platform TLS is off on this agent"));
            };
            if p.protocol != Protocol::Tcp || p.start > front.app_port || front.app_port > p.end {
                return Err(Invalid::new(
                    field,
                    format!(
                        "a TLS-only policy must be tcp and cover port {}, the port platform TLS fronts",
                        front.app_port
                    ),
                ));
            }
        }
        if let Some(limit) = limit {
            let mut new_per_source: BTreeMap<&str, BTreeSet<&Policy>> = BTreeMap::new();
            for p in policies.iter().filter(|p| !self.policies.contains_key(*p)) {
                new_per_source.entry(p.source.as_str()).or_default().insert(p);
            }
            for (source, new) in new_per_source {
                let total = self.policies_of(source) + new.len();
                if total > limit {
                    return Err(Invalid::new(
                        "policies",
                        format!(
                            "source app {source} would have {total} policies; the limit per source app is {limit}"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Adds policies without the checks of [`Self::add_policies`]: for
    /// replaying changes that were checked when they were accepted.
    pub fn insert_policies(&mut self, policies: &[Policy]) {
        self.allocate_tags(
            policies.iter().flat_map(|p| [p.source.as_str(), p.destination.as_str()]),
        );
        for p in policies {
            if !self.policies.contains_key(p) {
                self.policies.insert(p.clone(), self.next_policy_id);
                self.next_policy_id += 1;
                self.reference(&p.source);
                self.reference(&p.destination);
            }
        }
    }

    /// Removes policies (missing ones are not an error).
    pub fn remove_policies(&mut self, policies: &[Policy]) {
        for p in policies {
            if self.policies.remove(p).is_some() {
                self.unreference(&p.source);
                self.unreference(&p.destination);
            }
        }
    }

    /// Adds or replaces the endpoint at `endpoint.ip`. Returns the endpoint
    /// it replaced.
    pub fn add_endpoint(&mut self, endpoint: Endpoint) -> Option<Endpoint> {
        self.allocate_tags([endpoint.app.as_str()]);
        self.reference(&endpoint.app);
        let old = self.endpoints.insert(endpoint.ip, endpoint);
        if let Some(old) = &old {
            self.unreference(&old.app);
        }
        old
    }

    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Option<Endpoint> {
        let old = self.endpoints.remove(&ip);
        if let Some(old) = &old {
            self.unreference(&old.app);
        }
        old
    }

    /// Declares that TLS port `tls` fronts app port `app_port` on every
    /// instance (the agent's platform TLS); None: no TLS. Not stored: the
    /// agent sets it from its configuration.
    pub fn set_tls_ports(&mut self, ports: Option<TlsPorts>) {
        self.tls_ports = ports;
    }

    /// The TLS front of `app`'s instances (None: platform TLS is off).
    pub fn tls_front(&self, app: &str) -> Option<TlsFront> {
        self.tls_ports.as_ref().map(|t| TlsFront {
            app_port: t.per_app.get(app).copied().unwrap_or(t.default.app_port),
            tls_port: t.default.tls_port,
        })
    }

    /// The port ranges one policy allows: its own ports (unless TLS-only),
    /// and the TLS port fronting the app port if the policy covers it.
    fn allowances_of(&self, p: &Policy, policy_id: u32) -> Vec<Allowance> {
        let mut out = Vec::with_capacity(2);
        if !p.tls_only {
            out.push(Allowance { start: p.start, end: p.end, policy_id });
        }
        if let Some(front) = self
            .tls_front(&p.destination)
            .filter(|f| p.protocol == Protocol::Tcp && p.start <= f.app_port && f.app_port <= p.end)
        {
            out.push(Allowance { start: front.tls_port, end: front.tls_port, policy_id });
        }
        out
    }

    /// What `POLICIES` must hold: the allowances of every app pair.
    pub fn pairs(&self) -> BTreeMap<PairKey, Vec<Allowance>> {
        let mut pairs: BTreeMap<PairKey, Vec<Allowance>> = BTreeMap::new();
        for (p, &id) in &self.policies {
            let (Some(src), Some(dst)) = (self.tag(&p.source), self.tag(&p.destination)) else {
                continue; // unreachable: policies always have tags
            };
            pairs
                .entry(PairKey::new(src, dst, p.protocol.number()))
                .or_default()
                .extend(self.allowances_of(p, id));
        }
        pairs
    }

    /// The allowances of one app pair and protocol (a range query: the
    /// policies are ordered by source, destination, protocol).
    pub fn pair_allowances(
        &self,
        source: &str,
        destination: &str,
        protocol: Protocol,
    ) -> Vec<Allowance> {
        let bound = |port, tls_only| Policy {
            source: source.to_owned(),
            destination: destination.to_owned(),
            protocol,
            start: port,
            end: port,
            tls_only,
        };
        self.policies
            .range(bound(0, false)..=bound(u16::MAX, true))
            .flat_map(|(p, &id)| self.allowances_of(p, id))
            .collect()
    }

    /// Whether a policy lets `source` reach `port` of `destination`'s
    /// instances (the policy's own ports or the TLS port fronting them).
    pub fn allows(&self, source: &str, destination: &str, protocol: Protocol, port: u16) -> bool {
        self.pair_allowances(source, destination, protocol)
            .iter()
            .any(|a| a.start <= port && port <= a.end)
    }

    /// Maps `hostname.apps.internal` to `app`. A hostname belongs to one
    /// app at a time; mapping it again to the same app is not an error.
    pub fn map_route(&mut self, app: &str, hostname: &str) -> Result<(), Invalid> {
        match self.routes.get(hostname) {
            Some(owner) if owner != app => Err(Invalid::new(
                "hostname",
                format!("{hostname}.{INTERNAL_DOMAIN} is mapped to app {owner}; unmap it first"),
            )),
            _ => {
                self.routes.insert(hostname.to_owned(), app.to_owned());
                Ok(())
            }
        }
    }

    /// Unmaps a route; a route that is not mapped is not an error, one
    /// mapped to another app is.
    pub fn unmap_route(&mut self, app: &str, hostname: &str) -> Result<(), Invalid> {
        match self.routes.get(hostname) {
            Some(owner) if owner != app => Err(Invalid::new(
                "hostname",
                format!("{hostname}.{INTERNAL_DOMAIN} is mapped to app {owner}, not {app}"),
            )),
            Some(_) => {
                self.routes.remove(hostname);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// hostname → app.
    pub fn routes(&self) -> &BTreeMap<String, String> {
        &self.routes
    }

    /// The addresses of the instances of the app `hostname` names, or None
    /// if no app has that route.
    pub fn resolve(&self, hostname: &str) -> Option<Vec<Ipv4Addr>> {
        let app = self.routes.get(hostname)?;
        Some(self.endpoints.values().filter(|e| &e.app == app).map(|e| e.ip).collect())
    }

    /// What `ENDPOINTS` must hold: address → app tag.
    pub fn endpoint_tags(&self) -> BTreeMap<Ipv4Addr, u32> {
        self.endpoints.values().filter_map(|e| Some((e.ip, self.tag(&e.app)?))).collect()
    }

    /// Policies per source app (for the per-source limit and status).
    pub fn policies_of(&self, source: &str) -> usize {
        // Policies are ordered by source first: a range, not a scan.
        let first = Policy {
            source: source.to_owned(),
            destination: String::new(),
            protocol: Protocol::Tcp,
            start: 0,
            end: 0,
            tls_only: false,
        };
        self.policies.range(first..).take_while(|(p, _)| p.source == source).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(src: &str, dst: &str, protocol: Protocol, start: u16, end: u16) -> Policy {
        Policy {
            source: src.into(),
            destination: dst.into(),
            protocol,
            start,
            end,
            tls_only: false,
        }
    }

    #[test]
    fn undo_takes_a_change_back_exactly() {
        let mut s = State::default();
        s.add_endpoint(Endpoint {
            ip: Ipv4Addr::new(10, 255, 0, 1),
            app: "web".into(),
            ifname: "hv0".into(),
            netns: None,
        });
        let kept = policy("web", "api", Protocol::Tcp, 8080, 8080);
        s.add_policies(&[kept.clone(), policy("api", "db", Protocol::Udp, 53, 53)], None).unwrap();
        let before = s.clone();
        // Adding: new apps get tags, duplicates in the request count once.
        let new = policy("new", "api", Protocol::Tcp, 1, 2);
        let undo = s.add_policies_undoable(&[new.clone(), kept.clone(), new], None).unwrap();
        assert!(undo.changes_anything());
        assert_ne!(s, before);
        s.undo(undo);
        assert_eq!(s, before);
        // Removing: db loses its tag, then gets the same one back.
        let undo = s.remove_policies_undoable(&[policy("api", "db", Protocol::Udp, 53, 53)]);
        assert_eq!(s.tag("db"), None);
        s.undo(undo);
        assert_eq!(s, before);
        // An endpoint re-registered for a new app, and unregistered: the old
        // app's tag comes back with it.
        let ip = Ipv4Addr::new(10, 255, 0, 1);
        let moved = Endpoint { ip, app: "fresh".into(), ifname: "hv0".into(), netns: None };
        let undo = s.add_endpoint_undoable(moved);
        assert!(s.tag("fresh").is_some());
        s.undo(undo);
        assert_eq!(s, before);
        let undo = s.remove_endpoint_undoable(ip);
        assert!(undo.changes_anything());
        s.undo(undo);
        assert_eq!(s, before);
        // Routes: mapped, and unmapped.
        let undo = s.map_route_undoable("api", "api").unwrap();
        assert!(undo.changes_anything());
        s.undo(undo);
        assert_eq!(s, before);
        s.map_route("api", "api").unwrap();
        let mapped = s.clone();
        assert!(!s.map_route_undoable("api", "api").unwrap().changes_anything());
        let undo = s.unmap_route_undoable("api", "api").unwrap();
        s.undo(undo);
        assert_eq!(s, mapped);
        s.unmap_route("api", "api").unwrap();
        assert!(!s.remove_endpoint_undoable(Ipv4Addr::new(10, 0, 0, 9)).changes_anything());
        // Nothing to do: nothing recorded.
        assert!(!s.add_policies_undoable(&[kept], None).unwrap().changes_anything());
        assert!(
            !s.remove_policies_undoable(&[policy("x", "y", Protocol::Tcp, 1, 1)])
                .changes_anything()
        );
        assert_eq!(s, before);
    }

    #[test]
    fn tags_are_allocated_in_id_order_like_cloud_foundry() {
        // shared/fixtures/cf-policy-server: the POST body's apps get tags
        // 0001.. in id order.
        let mut s = State::default();
        s.add_policies(
            &[
                policy("1081ceac", "38f08df0", Protocol::Tcp, 1234, 1235),
                policy("308e7ef1", "308e7ef1", Protocol::Tcp, 1234, 1235),
            ],
            None,
        )
        .unwrap();
        let tags: Vec<(&str, String)> =
            s.tags().iter().map(|(a, t)| (a.as_str(), tag_text(*t))).collect();
        assert_eq!(
            tags,
            [("1081ceac", "0001".into()), ("308e7ef1", "0002".into()), ("38f08df0", "0003".into())]
        );
    }

    #[test]
    fn adding_twice_and_removing_missing_are_no_ops() {
        let mut s = State::default();
        let p = policy("a", "b", Protocol::Udp, 53, 53);
        s.add_policies(std::slice::from_ref(&p), None).unwrap();
        let before = s.clone();
        s.add_policies(std::slice::from_ref(&p), None).unwrap();
        assert_eq!(s, before);
        s.remove_policies(&[policy("a", "b", Protocol::Tcp, 53, 53)]);
        assert_eq!(s, before);
        s.remove_policies(&[p]);
        assert!(s.tags().is_empty(), "unused apps are forgotten");
        // Tags are not reused.
        s.add_policies(&[policy("c", "d", Protocol::Udp, 1, 1)], None).unwrap();
        assert_eq!(s.tag("c"), Some(3));
    }

    #[test]
    fn the_per_source_limit_applies_to_the_whole_batch() {
        let mut s = State::default();
        s.add_policies(&[policy("a", "b", Protocol::Tcp, 1, 1)], Some(2)).unwrap();
        let batch = [policy("a", "b", Protocol::Tcp, 2, 2), policy("a", "c", Protocol::Tcp, 3, 3)];
        let before = s.clone();
        let err = s.add_policies(&batch, Some(2)).unwrap_err();
        assert!(err.reason.contains("limit per source app is 2"), "{err}");
        assert_eq!(s, before, "nothing applied");
        // Re-adding an existing policy does not count twice.
        s.add_policies(
            &[policy("a", "b", Protocol::Tcp, 1, 1), policy("a", "b", Protocol::Tcp, 2, 2)],
            Some(2),
        )
        .unwrap();
    }

    #[test]
    fn pairs_group_policies_by_app_pair_and_protocol() {
        let mut s = State::default();
        s.add_policies(
            &[
                policy("a", "b", Protocol::Tcp, 80, 80),
                policy("a", "b", Protocol::Tcp, 8080, 8090),
                policy("a", "b", Protocol::Udp, 53, 53),
            ],
            None,
        )
        .unwrap();
        let pairs = s.pairs();
        assert_eq!(pairs.len(), 2);
        let tcp = &pairs[&PairKey::new(1, 2, proto::TCP)];
        assert_eq!(tcp.len(), 2);
    }

    #[test]
    fn endpoints_keep_their_app_tagged() {
        let mut s = State::default();
        let ep = Endpoint {
            ip: Ipv4Addr::new(10, 255, 0, 1),
            app: "web".into(),
            ifname: "hv0".into(),
            netns: None,
        };
        assert!(s.add_endpoint(ep.clone()).is_none());
        assert_eq!(s.endpoint_tags()[&ep.ip], 1);
        s.remove_endpoint(ep.ip);
        assert!(s.tags().is_empty());
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(check_ports("ports", 0, 5).unwrap_err().field, "ports.start");
        assert_eq!(check_ports("ports", 5, 70000).unwrap_err().field, "ports.end");
        assert!(check_ports("ports", 9, 8).unwrap_err().reason.contains("greater"));
        assert_eq!(check_ports("ports", 1, 65535).unwrap(), (1, 65535));
        assert!(check_app_id("source.id", "").is_err());
        assert!(check_app_id("source.id", &"x".repeat(256)).is_err());
        assert!(check_app_id("source.id", "a,b").is_err());
        assert!(check_app_id("source.id", "1081ceac-f5c4-47a8-95e8-88e1e302efb5").is_ok());
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = State::default();
        s.add_policies(&[policy("a", "b", Protocol::Tcp, 80, 90)], None).unwrap();
        s.add_endpoint(Endpoint {
            ip: Ipv4Addr::new(10, 0, 0, 1),
            app: "b".into(),
            ifname: "v".into(),
            netns: Some("/run/netns/x".into()),
        });
        let json = serde_json::to_string(&s).unwrap();
        let back: State = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }
}
