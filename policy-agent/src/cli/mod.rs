//! Command line: one file per group of subcommands.

mod cluster;
mod dataplane;
mod endpoint;
mod identity;
mod observe;
mod policy;
mod remote;
mod route;
mod run;
mod state;
mod status;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};
use policy_agent::config::DEFAULT_SOCKET;
use policy_api::client::{Client, Response};
use serde_json::Value;

/// eBPF network policy dataplane for containers: the agent daemon and the
/// `cf`-style verbs that talk to it — on this host's socket, or a remote
/// agent's HTTPS API with `--server` and an API identity.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, env = "POLICY_AGENT_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(flatten)]
    remote: remote::RemoteArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent daemon (in the network namespace whose veths it manages).
    Run(run::RunArgs),
    /// Detach everything the agent attached and remove every pin
    /// (enforcement stops). Stored policies are kept.
    Teardown(run::TeardownArgs),
    /// Register or remove a container endpoint (what a CNI plugin calls).
    #[command(subcommand)]
    Endpoint(endpoint::EndpointCommand),
    /// List registered endpoints.
    Endpoints(JsonArgs),
    /// Allow SOURCE_APP to reach DEST_APP on a protocol and port (range).
    AddNetworkPolicy(policy::PolicyArgs),
    /// Remove a policy added with add-network-policy.
    RemoveNetworkPolicy(policy::PolicyArgs),
    /// List policies.
    NetworkPolicies(policy::ListArgs),
    /// Programs attached, endpoints, apps and tags, policies, map occupancy.
    Status(JsonArgs),
    /// Map HOST.apps.internal to APP: `map-route APP apps.internal --hostname HOST`.
    MapRoute(route::RouteArgs),
    /// Unmap a route: `unmap-route APP apps.internal --hostname HOST`.
    UnmapRoute(route::RouteArgs),
    /// List internal routes.
    Routes(JsonArgs),
    /// Flow events: denied packets and new allowed connections.
    Flows(observe::FlowsArgs),
    /// Why a flow is allowed or denied: SRC_IP DST_IP tcp|udp PORT.
    Explain(observe::ExplainArgs),
    /// Cluster mode: the hosts and how far each has applied the change log.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// A client certificate for the TCP API (`listen`), from the platform
    /// CA of this host's agent (`--config`, or the one on the socket):
    /// `api-identity --role admin|read-only --name NAME`.
    ApiIdentity(identity::ApiIdentityArgs),
    /// The stored state (agent stopped): `state rebuild --from snapshot`.
    #[command(subcommand)]
    State(state::StateCommand),
    /// Low-level control of the kernel dataplane, without the daemon.
    Dataplane(dataplane::DataplaneArgs),
}

impl Cli {
    pub fn run(self) -> Result<()> {
        // What acts on this host itself: never through --server.
        let local = match &self.command {
            Command::Run(_) => Some("run"),
            Command::Teardown(_) => Some("teardown"),
            Command::State(_) => Some("state"),
            Command::Dataplane(_) => Some("dataplane"),
            Command::ApiIdentity(_) => Some("api-identity"),
            _ => None,
        };
        if let Some(verb) = local {
            self.remote.local_only(verb)?;
        }
        let client = || self.remote.client(&self.socket);
        match self.command {
            Command::Run(args) => args.run(),
            Command::Teardown(args) => args.run(),
            Command::Endpoint(cmd) => cmd.run(&client()?),
            Command::Endpoints(args) => endpoint::list(&args, &client()?),
            Command::AddNetworkPolicy(args) => args.add(&client()?),
            Command::RemoveNetworkPolicy(args) => args.remove(&client()?),
            Command::NetworkPolicies(args) => args.run(&client()?),
            Command::Status(args) => status::show(&args, &client()?),
            Command::Flows(args) => args.run(&client()?),
            Command::MapRoute(args) => args.map(&client()?),
            Command::UnmapRoute(args) => args.unmap(&client()?),
            Command::Routes(args) => route::list(&args, &client()?),
            Command::Explain(args) => args.run(&client()?),
            Command::Cluster(cmd) => cmd.run(&client()?),
            Command::State(cmd) => cmd.run(),
            // Its own CA files: the socket's agent says where they are.
            Command::ApiIdentity(args) => args.run(&Client::new(&self.socket)),
            Command::Dataplane(args) => {
                init_logging("warn");
                args.run()
            }
        }
    }
}

/// Logs to stderr; `RUST_LOG` overrides `default`.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal as _;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Sends a request and turns an error reply into an error naming the
/// problem (the agent's JSON `error`).
pub fn call(client: &Client, method: &str, path: &str, body: Option<&Value>) -> Result<Response> {
    let response = client.request(method, path, body)?;
    if !response.is_success() {
        bail!("{} (HTTP {})", response.error(), response.status);
    }
    Ok(response)
}

/// `--json` on a listing.
#[derive(Args)]
pub struct JsonArgs {
    /// Print the API's JSON.
    #[arg(long)]
    json: bool,
}

impl JsonArgs {
    /// GETs `path`: with `--json` prints the API's JSON and returns None;
    /// otherwise returns the body, for a table.
    pub fn get(&self, client: &Client, path: &str) -> Result<Option<Value>> {
        let body = call(client, "GET", path, None)?.body;
        if self.json {
            println!("{body}");
            return Ok(None);
        }
        Ok(Some(body))
    }
}
