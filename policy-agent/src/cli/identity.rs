//! `api-identity`: client certificates for the TCP API.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use policy_agent::{api::auth::Role, tls::PlatformCa};

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
    /// the platform CA there).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl ApiIdentityArgs {
    pub fn run(self) -> Result<()> {
        if self.name.is_empty()
            || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!("--name must be letters, digits, '-', '_' or '.', got {:?}", self.name);
        }
        let config = super::run::load_config(self.config.as_ref())?;
        let ca = PlatformCa::load_or_create(&config.state_dir).with_context(|| {
            format!("cannot load the platform CA in {}", config.state_dir.display())
        })?;
        let identity = ca.issue_api_identity(self.role.as_str(), &self.name, self.days)?;
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("cannot create {}", self.out.display()))?;
        let cert = self.out.join(format!("{}.pem", self.name));
        let key = self.out.join(format!("{}-key.pem", self.name));
        policy_agent::files::replace(&key, identity.key_pem.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", key.display()))?;
        policy_agent::files::replace(&cert, identity.cert_pem.as_bytes(), 0o644)
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
        if let Some(listen) = config.listen {
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
}
