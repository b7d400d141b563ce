//! One platform CA for the whole cluster: the first agent to start puts its
//! CA (certificate and key) in etcd under `ca`, in a transaction that fails
//! if another agent got there first; every agent writes etcd's CA into its
//! state directory (`ca.pem`, and `ca-key.pem` mode 0600) before the TLS
//! listeners start. So a certificate issued on any host verifies with the
//! bundle of every host. The key in etcd is as secret as etcd itself: run
//! etcd with client TLS and authentication where untrusted parties reach it.

use std::{fs, path::Path};

use serde::{Deserialize, Serialize};

use super::etcd::{Etcd, EtcdError, ModRevisionIs, prefix_end};
use crate::tls::{PlatformCa, TlsError};

#[derive(Serialize, Deserialize)]
struct SharedCa {
    cert_pem: String,
    key_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SharedCaError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("the platform CA in etcd is damaged: {0}")]
    Damaged(serde_json::Error),
}

/// Makes `state_dir`'s CA the cluster's: etcd's if it has one, else this
/// host's (created if need be) published to etcd.
pub fn share(etcd: &Etcd, prefix: &str, state_dir: &Path) -> Result<(), SharedCaError> {
    let key = format!("{}/ca", prefix.trim_end_matches('/'));
    loop {
        let range = etcd.range(&key, &prefix_end(&key))?;
        if let Some(kv) = range.kvs.iter().find(|kv| kv.key == key) {
            let shared: SharedCa =
                serde_json::from_slice(&kv.value).map_err(SharedCaError::Damaged)?;
            write(&state_dir.join("ca-key.pem"), &shared.key_pem, 0o600)?;
            write(&state_dir.join("ca.pem"), &shared.cert_pem, 0o644)?;
            return Ok(());
        }
        // None yet: offer this host's.
        PlatformCa::load_or_create(state_dir)?;
        let read = |name: &str| {
            fs::read_to_string(state_dir.join(name)).map_err(|source| SharedCaError::Write {
                path: state_dir.join(name).display().to_string(),
                source,
            })
        };
        let offer = SharedCa { cert_pem: read("ca.pem")?, key_pem: read("ca-key.pem")? };
        let value = serde_json::to_vec(&offer).expect("the CA serializes");
        let (won, _) = etcd
            .put_if(&[ModRevisionIs { key: key.clone(), mod_revision: 0 }], &[(&key, &value, 0)])?;
        if won {
            return Ok(());
        }
    }
}

/// Replaces `path` with `text` (mode `mode`) unless it holds it already.
fn write(path: &Path, text: &str, mode: u32) -> Result<(), SharedCaError> {
    if fs::read_to_string(path).is_ok_and(|now| now == text) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)
            .map_err(|source| SharedCaError::Write { path: dir.display().to_string(), source })?;
    }
    crate::files::replace(path, text.as_bytes(), mode)
        .map_err(|source| SharedCaError::Write { path: path.display().to_string(), source })
}
