//! `--server https://HOST:PORT --cert FILE --key FILE --cacert FILE`: the
//! verbs against a remote agent's TCP API (`listen`) with an API identity
//! (`policy-agent api-identity`), as they work on the local socket. Verbs
//! that act on this host itself (`run`, `teardown`, `dataplane`, `state`,
//! `api-identity`) refuse `--server`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;
use policy_api::client::{
    Client, Transport,
    https::{Https, Identity},
};

#[derive(Args)]
pub struct RemoteArgs {
    /// A remote agent's HTTPS API (its `listen` address) instead of the
    /// socket; needs --cert, --key and --cacert.
    #[arg(long, global = true, env = "POLICY_AGENT_SERVER", value_name = "https://HOST:PORT")]
    server: Option<String>,
    /// With --server: the API identity's certificate (`policy-agent
    /// api-identity` writes NAME.pem).
    #[arg(long, global = true, env = "POLICY_AGENT_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// With --server: the API identity's key (NAME-key.pem).
    #[arg(long, global = true, env = "POLICY_AGENT_KEY", value_name = "FILE")]
    key: Option<PathBuf>,
    /// With --server: the agent's platform CA bundle (the `ca.pem` that
    /// `api-identity` names), which its certificate must chain to.
    #[arg(long, global = true, env = "POLICY_AGENT_CACERT", value_name = "FILE")]
    cacert: Option<PathBuf>,
}

impl RemoteArgs {
    /// The client the verbs use: the remote agent's HTTPS API with
    /// `--server`, else the socket.
    pub fn client(&self, socket: &Path) -> Result<Client> {
        let files = [("--cert", &self.cert), ("--key", &self.key), ("--cacert", &self.cacert)];
        let Some(server) = &self.server else {
            let given: Vec<&str> =
                files.iter().filter(|(_, f)| f.is_some()).map(|(flag, _)| *flag).collect();
            if !given.is_empty() {
                bail!(
                    "{} {} for a remote agent: give --server https://HOST:PORT (or \
                     POLICY_AGENT_SERVER) too, or leave them out to use the socket {}",
                    given.join(", "),
                    if given.len() == 1 { "is" } else { "are" },
                    socket.display()
                );
            }
            return Ok(Client::new(socket));
        };
        let missing: Vec<&str> =
            files.iter().filter(|(_, f)| f.is_none()).map(|(flag, _)| *flag).collect();
        let (Some(cert), Some(key), Some(cacert)) = (&self.cert, &self.key, &self.cacert) else {
            bail!(
                "--server {server} needs {}: an API identity (`policy-agent api-identity --role \
                 admin|read-only --name NAME` on the agent's host mints one) and the agent's \
                 platform CA bundle (or POLICY_AGENT_CERT, POLICY_AGENT_KEY, POLICY_AGENT_CACERT)",
                missing.join(", ")
            );
        };
        let identity = Identity { cert: cert.clone(), key: key.clone(), cacert: cacert.clone() };
        Ok(Client::with_transport(Transport::Https(Https::new(server, &identity)?)))
    }

    /// Refuses `--server` for a verb that acts on this host itself.
    pub fn local_only(&self, verb: &str) -> Result<()> {
        if let Some(server) = &self.server {
            bail!(
                "`{verb}` acts on this host itself and does not take --server {server}: run it \
                 on the agent's host (unset POLICY_AGENT_SERVER to run it here)"
            );
        }
        Ok(())
    }
}
