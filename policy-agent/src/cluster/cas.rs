//! Every host's platform CA certificate in etcd, and never a key:
//! `cas/HOST` holds host HOST's CA certificate (PEM, without a lease, so a
//! host that is gone for a while stays trusted). Each agent has a CA of its
//! own (`tls::Sharing::Cluster`: `STATE_DIR/host-ca.pem` and
//! `host-ca-key.pem`, made once and kept); it publishes the certificate at
//! start, and a thread (`cluster-cas`) watches `cas/` and keeps what this
//! host trusts in step with it:
//!
//! - the trust bundle `STATE_DIR/ca.pem`, every host's CA certificate
//!   (sorted by host), replaced whole when the set changes: what clients
//!   use with `--cacert`, so an instance certificate issued on host A
//!   verifies with the bundle of any host;
//! - the verifiers of the TCP API and of the `mtls_apps` listeners
//!   ([`Trust`]), so an identity issued on host A is accepted on host B.
//!
//! Reading every key in etcd gives nothing that mints a certificate a host
//! trusts. What etcd holds is trusted as far as etcd's writers are: whoever
//! may write `cas/` may add a CA, as whoever may write the log may add a
//! policy; etcd's authentication and role-based access keep them out.
//!
//! Older agents kept one CA for the whole cluster in etcd at `ca`, its key
//! included, and wrote it into the state directory (`ca-key.pem`). A `ca`
//! key found in etcd is deleted with a warning and neither trusted nor
//! used; a `ca-key.pem` in a cluster host's state directory is removed at
//! start, and the bundle kept beside it is not trusted.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::pki_types::{
    CertificateDer,
    pem::{PemObject as _, SectionKind},
};
use tracing::{info, warn};

use super::follow::read_and_watch;
use crate::{
    etcd::{Etcd, EtcdError, ModRevisionIs, keys::Keys, prefix_end},
    tls::{PlatformCa, TlsError, Trust, pem_of},
};

/// This host's part in the cluster's trust.
pub struct HostCas {
    etcd: Etcd,
    /// `cas/` (one key per host) and the legacy `ca`.
    keys: Keys,
    host: String,
    own: CertificateDer<'static>,
    bundle: PathBuf,
    trust: Arc<Trust>,
}

impl HostCas {
    /// At start, before any listener: trusts this host's CA and the bundle
    /// kept from the last run, then publishes this host's CA in etcd and
    /// trusts every host's there. Where etcd cannot be reached, the agent
    /// starts on what it kept (the thread of [`HostCas::follow`] catches up).
    pub fn start(
        etcd: Etcd,
        keys: Keys,
        host: &str,
        ca: &PlatformCa,
        state_dir: &Path,
    ) -> Result<Self, TlsError> {
        let bundle = ca.bundle().to_path_buf();
        let mut kept = Vec::new();
        let legacy_key = state_dir.join("ca-key.pem");
        if legacy_key.exists() {
            fs::remove_file(&legacy_key).map_err(crate::tls::io("remove", &legacy_key))?;
            warn!(
                key = %legacy_key.display(),
                "removed the key of the CA the whole cluster shared (older agents kept it in \
                 etcd, where anyone who read etcd could take it); this host issues from its own \
                 CA now, and the bundle beside it is rebuilt from the hosts' certificates"
            );
        } else {
            kept = fs::read(&bundle).map(|pem| bundle_cas(&pem)).unwrap_or_default();
        }
        let own = ca.ca_der().clone();
        let mut trusted = vec![own.clone()];
        trusted.extend(kept.into_iter().filter(|c| *c != own));
        let cas = Self {
            etcd,
            keys,
            host: host.to_owned(),
            own,
            bundle,
            trust: Trust::new(trusted.clone())?,
        };
        cas.write_bundle(&trusted)?;
        let joined = cas.publish().and_then(|()| cas.sync());
        if let Err(e) = joined {
            warn!(
                error = %e,
                trusted = trusted.len(),
                "cannot publish this host's CA in etcd or read the others' (retrying): trusting \
                 the CAs this host knew, its own and its last bundle's"
            );
        }
        Ok(cas)
    }

    /// The CAs client certificates may come from, kept in step with etcd.
    pub fn trust(&self) -> Arc<Trust> {
        self.trust.clone()
    }

    /// Follows `cas/` in etcd; runs forever on its own thread.
    pub fn follow(self) {
        // `ca` up to `cas0`: the legacy key and every host's.
        let end = prefix_end(&self.keys.cas());
        read_and_watch(&self.etcd, &self.keys.legacy_ca(), &end, "the hosts' CAs", || self.sync());
    }

    /// Puts this host's CA certificate in etcd (at start: a host that was
    /// reinstalled replaces its old one).
    fn publish(&self) -> Result<(), EtcdError> {
        let key = self.keys.ca(&self.host);
        self.etcd.put_if(&[], &[(&key, pem_of(&self.own).as_bytes(), 0)])?;
        Ok(())
    }

    /// Reads every host's CA from etcd and trusts them (and this host's);
    /// deletes a legacy shared CA. Returns etcd's revision read at.
    fn sync(&self) -> Result<i64, EtcdError> {
        let (legacy, dir) = (self.keys.legacy_ca(), self.keys.cas());
        let range = self.etcd.range(&legacy, &prefix_end(&dir))?;
        let mut by_host = BTreeMap::new();
        let mut published = false;
        for kv in &range.kvs {
            if kv.key == legacy {
                let unchanged =
                    ModRevisionIs { key: kv.key.clone(), mod_revision: kv.mod_revision };
                if !self.etcd.delete_if(&[unchanged], &kv.key)? {
                    // Another agent deleted it first, or it was written
                    // again (its watch event brings this back here).
                    continue;
                }
                warn!(
                    key = kv.key,
                    "deleted a platform CA shared through etcd (written by an older agent): \
                     its private key was readable by anyone who can read etcd, so it is \
                     neither trusted nor used; mint API identities again (api-identity) \
                     and consider every certificate it issued compromised"
                );
                continue;
            }
            let Some(host) = kv.key.strip_prefix(&dir) else { continue };
            published |= host == self.host;
            match parse_ca(&kv.value) {
                Ok(ca) => {
                    if host == self.host && ca != self.own {
                        warn!(
                            key = kv.key,
                            "etcd holds another CA than this host's under its name: is \
                             another agent configured with host = {host:?}? Trusting both",
                        );
                    }
                    by_host.insert(host.to_owned(), ca);
                }
                Err(reason) => warn!(key = kv.key, "not trusted: {reason}"),
            }
        }
        if !published {
            // Deleted while this agent runs (by an operator, a wipe):
            // offered again, unless another agent put one meanwhile.
            let key = self.keys.ca(&self.host);
            let absent = ModRevisionIs { key: key.clone(), mod_revision: 0 };
            if self.etcd.put_if(&[absent], &[(&key, pem_of(&self.own).as_bytes(), 0)])?.0 {
                info!(key, "published this host's CA certificate again");
            }
        }
        let mut trusted: Vec<CertificateDer<'static>> = Vec::new();
        by_host.entry(self.host.clone()).or_insert_with(|| self.own.clone());
        if by_host.get(&self.host) != Some(&self.own) {
            trusted.push(self.own.clone());
        }
        for ca in by_host.into_values() {
            if !trusted.contains(&ca) {
                trusted.push(ca);
            }
        }
        match self.trust.replace(trusted.clone()) {
            Ok(false) => {}
            Ok(true) => info!(cas = trusted.len(), "trusting the CAs of every host"),
            Err(e) => warn!(error = %e, "cannot trust the hosts' CAs; keeping the ones before"),
        }
        if let Err(e) = self.write_bundle(&self.trust.cas()) {
            warn!(error = %e, "cannot write the trust bundle");
        }
        Ok(range.revision)
    }

    /// Replaces the bundle unless it holds `cas` already.
    fn write_bundle(&self, cas: &[CertificateDer<'static>]) -> Result<(), TlsError> {
        let text: String = cas.iter().map(pem_of).collect();
        if fs::read(&self.bundle).is_ok_and(|now| now == text.as_bytes()) {
            return Ok(());
        }
        policy_api::files::replace(&self.bundle, text.as_bytes(), 0o644)
            .map_err(crate::tls::io("write", &self.bundle))
    }
}

/// A host's CA certificate as published: one PEM certificate, of a CA,
/// and nothing else (no key above all).
pub fn parse_ca(value: &[u8]) -> Result<CertificateDer<'static>, String> {
    let text = std::str::from_utf8(value).map_err(|_| "not PEM text".to_owned())?;
    if text.contains("PRIVATE KEY") {
        return Err("it holds a private key: a CA whose key is in etcd mints for anyone".into());
    }
    let mut sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(value);
    let der = match (sections.next(), sections.next()) {
        (Some(Ok((SectionKind::Certificate, der))), None) => CertificateDer::from(der),
        _ => return Err("not exactly one PEM certificate".into()),
    };
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| format!("not a certificate: {e}"))?;
    if !cert.is_ca() {
        return Err(format!("{} is not a CA certificate", cert.subject()));
    }
    Ok(der)
}

/// The CA certificates in a bundle kept from before (anything else in it
/// ignored).
fn bundle_cas(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .filter(|der| parse_ca(pem_of(der).as_bytes()).is_ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::Sharing;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cas-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn only_a_lone_ca_certificate_is_taken_from_etcd() {
        let dir = scratch("parse");
        let ca = PlatformCa::load_or_create(&dir, &Sharing::Cluster { host: "a".into() }).unwrap();
        let pem = ca.ca_pem().to_owned();
        assert_eq!(parse_ca(pem.as_bytes()).unwrap(), *ca.ca_der());
        let key = fs::read_to_string(dir.join("host-ca-key.pem")).unwrap();
        let with_key = format!("{pem}{key}");
        assert!(parse_ca(with_key.as_bytes()).unwrap_err().contains("private key"));
        assert!(parse_ca(format!("{pem}{pem}").as_bytes()).is_err(), "two certificates");
        assert!(parse_ca(b"{\"cert_pem\":\"...\"}").is_err());
        assert!(parse_ca(&[0xff, 0xfe]).is_err());
        // An instance identity is no CA.
        let leaf = ca.issue_identity("app", &[[10, 255, 0, 2].into()]).unwrap();
        assert!(parse_ca(leaf.cert_pem.as_bytes()).unwrap_err().contains("not a CA"));
        // A kept bundle: its CAs, nothing else.
        let bundle = format!("{pem}{}{key}", leaf.cert_pem);
        assert_eq!(bundle_cas(bundle.as_bytes()), vec![ca.ca_der().clone()]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
