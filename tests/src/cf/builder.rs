//! A policy server started other than as [`PolicyServer::start`] does: its
//! internal API on an address other cells reach, RSA keys, more names in
//! its certificate.

use std::net::Ipv4Addr;

use super::PolicyServer;
use crate::netns::NetNs;

/// What [`PolicyServer::builder`] returns; by default it starts what
/// [`PolicyServer::start`] does.
#[derive(Clone, Debug)]
pub struct PolicyServerBuilder {
    pub(super) internal_host: Ipv4Addr,
    pub(super) keys: Keys,
    pub(super) server_names: Vec<String>,
}

/// The certificates' key type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Keys {
    P256,
    Rsa,
}

impl Default for PolicyServerBuilder {
    fn default() -> Self {
        Self { internal_host: Ipv4Addr::LOCALHOST, keys: Keys::P256, server_names: Vec::new() }
    }
}

impl PolicyServerBuilder {
    /// Where `policy-server-internal` listens (`listen_host`; default
    /// 127.0.0.1): an address of the namespace it starts in, which other
    /// namespaces reach. The server certificate names it, and
    /// [`PolicyServer::internal_url`] says it.
    pub fn internal_host(mut self, host: Ipv4Addr) -> Self {
        self.internal_host = host;
        self
    }

    /// RSA keys (2048 bits) for every certificate, instead of P-256: for
    /// clients that speak TLS 1.2 to CF's servers, whose only 1.2 suites
    /// are ECDHE-RSA.
    pub fn rsa_keys(mut self) -> Self {
        self.keys = Keys::Rsa;
        self
    }

    /// One more subjectAltName of the server certificate (`DNS:NAME` or
    /// `IP:ADDRESS`), e.g. for another server given the same certificate
    /// ([`PolicyServer::server_identity`]).
    pub fn server_name(mut self, san: &str) -> Self {
        self.server_names.push(san.to_owned());
        self
    }

    /// As [`PolicyServer::start`].
    pub fn start(self) -> PolicyServer {
        PolicyServer::start_on(None, self)
    }

    /// As [`PolicyServer::start_in`].
    pub fn start_in(self, ns: &NetNs) -> PolicyServer {
        PolicyServer::start_on(Some(ns.path()), self)
    }
}
