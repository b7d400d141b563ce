//! `api-identity`: client certificates for the TCP API, from the platform
//! CA of the agent that runs on this host — the one its `--config` names,
//! or else the one answering on the socket (which says where its CA is:
//! `platform_ca` in `GET /v1/status`). It never makes a CA: an identity
//! from a CA no agent uses would be refused everywhere.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use policy_agent::{
    api::auth::Role,
    config::Config,
    tls::{CaFiles, PlatformCa, Sharing},
};
use policy_api::client::{Client, ClientError};

#[derive(Args)]
pub struct ApiIdentityArgs {
    /// What the identity may do: every read and write, or reads only.
    #[arg(long, value_enum)]
    role: Role,
    /// Who it is for (the certificate's common name; logged and named in
    /// refusals).
    #[arg(long)]
    name: String,
    /// Days it is valid.
    #[arg(long, default_value_t = 30)]
    days: u32,
    /// Where to write NAME.pem and NAME-key.pem.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// The configuration the agent runs with (for its state directory and
    /// the platform CA there). Without it, the agent answering on the
    /// socket says where its CA is.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Whose CA mints, and where it is kept.
struct Source {
    files: CaFiles,
    /// The TCP API's address, when known (for the example printed).
    listen: Option<String>,
    whose: String,
}

impl ApiIdentityArgs {
    pub fn run(self, client: &Client) -> Result<()> {
        if self.name.is_empty()
            || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!("--name must be letters, digits, '-', '_' or '.', got {:?}", self.name);
        }
        let source = self.source(client)?;
        let ca = PlatformCa::load(source.files.clone())
            .with_context(|| format!("cannot load the platform CA of {}", source.whose))?;
        let identity = ca.issue_api_identity(self.role.as_str(), &self.name, self.days)?;
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("cannot create {}", self.out.display()))?;
        let cert = self.out.join(format!("{}.pem", self.name));
        let key = self.out.join(format!("{}-key.pem", self.name));
        policy_api::files::replace(&key, identity.key_pem.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", key.display()))?;
        policy_api::files::replace(&cert, identity.cert_pem.as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", cert.display()))?;
        println!(
            "{} identity {:?}, valid {} days:\n  certificate {}\n  key         {}\n  CA bundle   {}",
            self.role.as_str(),
            self.name,
            self.days,
            cert.display(),
            key.display(),
            ca.bundle().display()
        );
        if let Some(listen) = source.listen {
            println!(
                "e.g. curl --cacert {} --cert {} --key {} https://{}/v1/status",
                ca.bundle().display(),
                cert.display(),
                key.display(),
                listen
            );
        }
        Ok(())
    }

    /// The CA to mint from: `--config`'s agent's, else the running agent's.
    fn source(&self, client: &Client) -> Result<Source> {
        if let Some(path) = &self.config {
            let config = super::run::load_config(Some(path))?;
            let sharing = match &config.cluster {
                Some(cluster) => Sharing::Cluster { host: cluster.host.clone() },
                None => Sharing::SingleHost,
            };
            return Ok(Source {
                files: CaFiles::new(&config.state_dir, &sharing),
                listen: https_listen(&config),
                whose: format!("the agent configured by {}", path.display()),
            });
        }
        let status = match client.request("GET", "/v1/status", None) {
            Ok(response) if response.is_success() => response.body,
            Ok(response) => bail!("the agent refused GET /v1/status: {}", response.error()),
            Err(ClientError::Connect { socket, cause }) => bail!(
                "no agent answers at {} ({cause}) and no --config was given: start the \
                 agent, name its socket (--socket) or its configuration (--config FILE). \
                 api-identity uses the agent's own CA and never makes one",
                socket.display()
            ),
            Err(e) => return Err(e).context("cannot ask the agent where its platform CA is"),
        };
        let Some(files) = status.get("platform_ca").filter(|v| !v.is_null()) else {
            bail!(
                "the agent at {} has no platform CA (tls = false and no HTTPS listen): \
                 its TCP API takes no client certificates",
                client.transport()
            );
        };
        let files: CaFiles = serde_json::from_value(files.clone())
            .context("the agent sent a platform_ca this command does not understand")?;
        Ok(Source { files, listen: None, whose: format!("the agent at {}", client.transport()) })
    }
}

/// The TCP API's address if it takes client certificates.
fn https_listen(config: &Config) -> Option<String> {
    config.listen.filter(|_| !config.listen_plaintext).map(|a| a.to_string())
}
