//! `policy-agent run`: the process wiring of the daemon. Load the
//! dataplane, reconcile it to the stored state, start the flow reader and
//! the TLS listeners, serve the API, DNS and metrics until SIGTERM/SIGINT.
//! Enforcement stays in place when the daemon stops (pinned maps and links).

mod force;
mod serve;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, Result};
use policy_agent::{
    Dataplane, DataplaneConfig,
    agent::{self, Agent, SharedAgent},
    api::{Api, AsgPoller, Ipam, PolicyServer},
    cf::{CfConfig, Follower, asg_follow::AsgFollower},
    cluster::{
        ClusterConfig,
        cas::HostCas,
        follow::{self, OnChange},
        hosts::{self, Membership},
        overlay::{self, Overlay},
    },
    config::Config,
    flows::{self, FlowHub, FlowLog},
    metrics::Metrics,
    state::{Endpoint, Protocol, TlsFront, TlsPorts},
    store::{Journal, Store, etcd::EtcdStore},
    tls::{self, Authorizer, ClientAuth, PlatformCa, Sharing, TlsProxies, Trust},
};
use tokio::sync::watch;
use tracing::{info, warn};

pub fn run(config: Config) -> Result<()> {
    // Blocks of 256 KiB and more come from mmap and go back when freed. By
    // default glibc raises that threshold to the largest block freed so
    // far, after which whole-map reads (each status call reads every map in
    // batches of up to a few MiB) stay in the heap freed but held: the
    // agent's RSS grew 12 MiB at a time over a soak's first minute.
    // SAFETY: mallopt only sets malloc's own parameters; no thread runs yet.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10) };
    // Before the store rewrites the local copy: this host's endpoints as
    // it last knew them.
    let known_here = config.cluster.as_ref().map(|c| known_here(&config, c)).unwrap_or_default();
    // The stored state is read while the kernel verifies the programs:
    // at a million policies each takes about a second.
    let opening = std::time::Instant::now();
    let (dataplane, loaded) = std::thread::scope(|s| {
        let loading = std::thread::Builder::new()
            .name("state-load".into())
            .spawn_scoped(s, || {
                let loaded = load_store(&config);
                info!(ms = opening.elapsed().as_millis(), "read the stored state");
                loaded
            })
            .context("cannot start the thread that reads the stored state");
        let dataplane = open_dataplane(&config);
        info!(ms = opening.elapsed().as_millis(), "loaded the programs and maps");
        let loaded = loading.and_then(|l| l.join().expect("reading the stored state panicked"));
        (dataplane, loaded)
    });
    let mut dataplane = dataplane?;
    let (store, state) = loaded?;
    let ring = dataplane.take_flow_events().context("the flow event ring buffer is missing")?;
    let started = std::time::Instant::now();
    let settings = agent::Settings {
        limit: config.policy_limit(),
        tls_ports: config.tls.then(|| TlsPorts {
            default: TlsFront { app_port: config.tls_upstream_port, tls_port: tls::TLS_PORT },
            per_app: config.tls_app_ports.clone(),
        }),
        host: config.cluster.as_ref().map(|c| c.host.clone()),
        known_here,
        held_file: config.cluster.as_ref().map(|_| config.state_dir.join(HELD_FILE)),
        policy_server: config.cf.as_ref().map(|cf| cf.policy_server_url.clone()),
    };
    let (agent, warnings) = Agent::start_loaded(dataplane, store, state, settings)
        .context("failed to reconcile the kernel to the stored state")?;
    let reconcile_time = started.elapsed();
    // Reading a large state and the kernel's maps leaves most of the heap
    // free but held; give it back (at a million policies, about half of
    // the agent's RSS).
    // SAFETY: malloc_trim only releases memory malloc holds and no one uses.
    unsafe { libc::malloc_trim(0) };
    for w in warnings {
        warn!("{w}");
    }
    let mut agent = agent;
    for ifname in &config.netin_interfaces {
        let addrs = agent
            .attach_netin(ifname)
            .with_context(|| format!("cannot serve NetIn on netin_interfaces entry {ifname:?}"))?;
        info!(ifname, addresses = ?addrs, "NetIn port mappings listen here");
    }
    let agent: SharedAgent = Arc::new(Mutex::new(agent));
    let follower = match &config.cf {
        Some(cf) => Some(
            Follower::new(cf, agent.clone(), &config.state_dir)
                .context("cannot follow Cloud Foundry's policy server ([cf])")?,
        ),
        None => None,
    };
    let metrics = Arc::new(Metrics::new(agent.clone(), follower.as_ref().map(Follower::status)));
    let policy_server = match (follower, &config.cf) {
        (Some(follower), Some(cf)) => Some(start_following(follower, cf, &agent, &metrics)?),
        _ => None,
    };
    metrics.reconcile_duration.observe(reconcile_time.as_secs_f64());
    let hub = Arc::new(FlowHub::default());
    let reader_stop = Arc::new(AtomicBool::new(false));
    let reader = spawn_flow_reader(&config, ring, &agent, &hub, &reader_stop)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let pki = platform_ca(&config)?;
    let tls = match (&pki, config.tls) {
        (Some(pki), true) => Some(start_tls(&config, &agent, pki)),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    // What a CNI plugin hands out: the whole overlay on one host, this
    // host's leased /24 in a cluster (at the VXLAN device's MTU).
    let mut ipam = Ipam {
        subnet: config.overlay_network.map(|o| (o.network, o.prefix)),
        gateway: policy_api::GATEWAY,
        mtu: None,
    };
    if let Some(cluster) = &config.cluster {
        let membership = join_overlay(&config, cluster, &agent, runtime.handle())?;
        ipam.subnet = Some((membership.subnet, 24));
        ipam.mtu = policy_agent::dataplane::interface_mtu(overlay::DEVICE);
        follow_cluster(cluster, &agent, tls.clone(), runtime.handle(), membership)?;
    }
    let api = Api {
        agent,
        max_body_bytes: config.max_body_bytes,
        body_budget: Arc::new(tokio::sync::Semaphore::new(
            (config.limits.body_budget_bytes.max(config.max_body_bytes) / 1024).max(1),
        )),
        request_timeout: config.limits.request_timeout(),
        hub,
        metrics: metrics.clone(),
        stopping: stop_rx,
        tls,
        cluster: config.cluster.clone(),
        ipam,
        platform_ca: pki.as_ref().map(|p| p.ca.files().clone()),
        policy_server: policy_server.clone(),
    };
    let result = runtime.block_on(serve::serve(config, api, metrics, stop_tx, pki));
    if let Some(server) = policy_server {
        server.poll.stop();
        if let Some(asgs) = server.asgs {
            asgs.poll.stop();
        }
    }
    reader_stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    result
}

/// Starts the policy server's poll loop on a thread of its own.
fn start_following(
    mut follower: Follower,
    cf: &CfConfig,
    agent: &SharedAgent,
    metrics: &Metrics,
) -> Result<PolicyServer> {
    follower.time_polls(metrics.policy_server_poll_time.clone());
    let asgs = match cf.enable_asg_syncing {
        true => {
            let asgs = AsgFollower::new(cf, agent.clone(), follower.accept_chain())
                .context("cannot follow the policy server's security groups")?;
            let shared =
                AsgPoller { status: asgs.status(), poll: asgs.handle(), managed: asgs.managed() };
            info!(asg_poll_interval = ?cf.asg_poll_interval, "security groups come from the policy server");
            std::thread::Builder::new()
                .name("cf-security-groups".into())
                .spawn(move || asgs.run())
                .context("cannot start the security groups follower")?;
            Some(shared)
        }
        false => None,
    };
    let server = PolicyServer {
        status: follower.status(),
        poll: follower.handle(),
        timeout: cf.client_timeout.saturating_mul(2),
        asgs,
    };
    info!(
        url = cf.policy_server_url,
        poll_interval = ?cf.poll_interval,
        "policies and tags come from Cloud Foundry's policy server"
    );
    std::thread::Builder::new()
        .name("cf-policy-server".into())
        .spawn(move || follower.run())
        .context("cannot start the policy server follower")?;
    Ok(server)
}

/// Cluster mode: this host's endpoints the agent held (see
/// `agent::returning`), kept across restarts.
const HELD_FILE: &str = "cluster-held.json";

/// Cluster mode: the local copy of the cluster state.
const LOCAL_COPY: &str = "cluster-state.json";

/// This host's endpoints as the agent last knew them: those it held, and
/// those of its local copy of the cluster state.
fn known_here(config: &Config, cluster: &ClusterConfig) -> Vec<Endpoint> {
    let mut known = agent::read_held(&config.state_dir.join(HELD_FILE));
    if let Some(copy) = EtcdStore::local_state(config.state_dir.join(LOCAL_COPY)) {
        let mine = copy.endpoints().filter(|e| e.host.as_deref() == Some(&cluster.host));
        known.extend(mine.cloned());
    }
    known
}

/// The desired state: etcd in cluster mode, else the local journal.
/// Opens the store and reads the desired state from it.
fn load_store(config: &Config) -> Result<(Box<dyn Store>, policy_agent::state::State)> {
    let mut store = open_store(config)?;
    let state = store.load().context("cannot read the stored state")?;
    Ok((store, state))
}

fn open_store(config: &Config) -> Result<Box<dyn Store>> {
    if let Some(cluster) = &config.cluster {
        info!(etcd = ?cluster.etcd_endpoints, host = cluster.host, "cluster mode");
        if cluster.plaintext() {
            warn!(
                "etcd is reached in plain text (etcd_allow_plaintext): anyone on its network \
                 can read and rewrite every host's policies; use https:// endpoints with \
                 etcd_ca_file, etcd_cert_file and etcd_key_file"
            );
        }
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("cannot create {}", config.state_dir.display()))?;
        let cache = config.state_dir.join(LOCAL_COPY);
        let store = EtcdStore::new(cluster.etcd(), &cluster.prefix)
            .with_host(&cluster.host)
            .with_cache(cache);
        return Ok(Box::new(store));
    }
    let journal = Journal::open(&config.state_dir)
        .with_context(|| format!("cannot open the state in {}", config.state_dir.display()))?;
    Ok(Box::new(journal))
}

/// Cluster mode: a thread follows the change log in etcd, another keeps
/// this host registered. Both apply what other agents commit; the TLS
/// listeners follow.
fn follow_cluster(
    cluster: &ClusterConfig,
    agent: &SharedAgent,
    tls: Option<Arc<TlsProxies>>,
    runtime: &tokio::runtime::Handle,
    membership: Membership,
) -> Result<()> {
    let on_change = || -> OnChange {
        let (tls, runtime) = (tls.clone(), runtime.clone());
        Box::new(move |state| {
            let Some(tls) = tls.clone() else { return Box::new(|| {}) };
            let (wants, runtime) = (tls.wanted(state), runtime.clone());
            Box::new(move || {
                // The listeners are tasks of the runtime.
                let _entered = runtime.enter();
                tls.apply(wants);
            })
        })
    };
    let watched = cluster.keys().head();
    let (follower, etcd, changed) = (agent.clone(), cluster.etcd(), on_change());
    std::thread::Builder::new()
        .name("cluster-follow".into())
        .spawn(move || follow::follow(follower, etcd, watched, changed))
        .context("cannot start the cluster follower")?;
    let (registrar, config, changed) = (agent.clone(), cluster.clone(), on_change());
    std::thread::Builder::new()
        .name("cluster-hosts".into())
        .spawn(move || hosts::register(registrar, config, changed, membership))
        .context("cannot start the host registration")?;
    Ok(())
}

/// Leases this host's /24 of the overlay network in etcd, sets up the
/// VXLAN device and points the programs at it.
fn join_overlay(
    config: &Config,
    cluster: &ClusterConfig,
    agent: &SharedAgent,
    runtime: &tokio::runtime::Handle,
) -> Result<Membership> {
    let base = config.overlay_network.unwrap_or_default().network;
    // The lease is kept in etcd; a copy here lets the host start while etcd
    // is unreachable, and keep its /24 when etcd lost the lease (wiped,
    // restored).
    let kept = config.state_dir.join("cluster-subnet");
    let remembered = std::fs::read_to_string(&kept).ok().and_then(|t| t.trim().parse().ok());
    let leased = overlay::lease_subnet(&cluster.etcd(), &cluster.keys(), &cluster.host, remembered);
    let index = match leased {
        Ok(index) => {
            let _ = policy_api::files::replace(&kept, index.to_string().as_bytes(), 0o600);
            index
        }
        Err(e) => match remembered {
            Some(index) => {
                warn!(error = %e, index, "cannot reach etcd: using the subnet this host leased before");
                index
            }
            None => {
                return Err(e).context("cannot lease this host's subnet of the overlay in etcd");
            }
        },
    };
    let subnet = overlay::subnet(base, index);
    let opened = Overlay::open(cluster.underlay_address, cluster.ipv6_prefix);
    let overlay = runtime.block_on(opened).with_context(|| {
        format!("cannot set up the VXLAN device {} on the underlay", overlay::DEVICE)
    })?;
    {
        let mut agent = agent::lock(agent);
        agent
            .set_tunnel(overlay.ifindex, overlay::PORT, 0, &overlay.underlay_ifname)
            .and_then(|()| agent.attach_netin(&overlay.underlay_ifname).map(|_| ()))
            .with_context(|| {
                format!("cannot guard the underlay interface {}", overlay.underlay_ifname)
            })?;
    }
    info!(%subnet, device = overlay::DEVICE, underlay = overlay.underlay_ifname, "joined the overlay");
    Ok(Membership { subnet, index, overlay, runtime: runtime.clone() })
}

/// Loads the programs and maps (taking over pinned ones).
fn open_dataplane(config: &Config) -> Result<Dataplane> {
    Dataplane::open(&DataplaneConfig {
        pin_dir: config.pin_dir.clone(),
        capacities: config.capacities.clone(),
        events: config.flow_events.clone(),
        deny: policy_agent::dataplane::DenySettings {
            action: config.deny_action,
            rejects_per_second: config.rejects_per_second,
        },
        overlay: config.overlay_network,
    })
    .with_context(|| {
        format!(
            "failed to load the dataplane with pins under {} - are we root?",
            config.pin_dir.display()
        )
    })
}

/// The thread that turns the programs' flow events into log lines.
fn spawn_flow_reader(
    config: &Config,
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    agent: &SharedAgent,
    hub: &Arc<FlowHub>,
    stop: &Arc<AtomicBool>,
) -> Result<JoinHandle<()>> {
    let (agent, hub, stop) = (agent.clone(), hub.clone(), stop.clone());
    let log =
        FlowLog::new(config.flow_log.clone(), config.flow_log_max_bytes, config.flow_log_keep);
    std::thread::Builder::new()
        .name("flow-events".into())
        .spawn(move || flows::run_reader(ring, agent, hub, log, stop))
        .context("cannot start the flow event reader")
}

/// The platform CA and the CAs client certificates may come from.
#[derive(Clone)]
pub struct Pki {
    pub ca: Arc<PlatformCa>,
    pub trust: Arc<Trust>,
}

/// This host's platform CA, made on first start, if anything needs one
/// (the 61443 listeners, the HTTPS API). On one host it alone is trusted;
/// in a cluster every host's is, as published in etcd (a thread follows
/// them).
fn platform_ca(config: &Config) -> Result<Option<Pki>> {
    let https_api = config.listen.is_some() && !config.listen_plaintext;
    if !config.tls && !https_api {
        return Ok(None);
    }
    let sharing = match &config.cluster {
        Some(cluster) => Sharing::Cluster { host: cluster.host.clone() },
        None => Sharing::SingleHost,
    };
    let ca = PlatformCa::load_or_create(&config.state_dir, &sharing)
        .context("failed to set up the platform CA")?
        .with_validity(config.identity_validity);
    let trust = match &config.cluster {
        None => Trust::new(vec![ca.ca_der().clone()]).context("the platform CA")?,
        Some(cluster) => {
            let cas = HostCas::start(
                cluster.etcd(),
                cluster.keys(),
                &cluster.host,
                &ca,
                &config.state_dir,
            )
            .context("cannot set up the trust in the hosts' CAs")?;
            let trust = cas.trust();
            std::thread::Builder::new()
                .name("cluster-cas".into())
                .spawn(move || cas.follow())
                .context("cannot start following the hosts' CAs")?;
            trust
        }
    };
    info!(
        certificate = %ca.files().certificate.display(),
        bundle = %ca.bundle().display(),
        "platform CA"
    );
    Ok(Some(Pki { ca: Arc::new(ca), trust }))
}

/// The per-instance TLS listeners (started by `serve`).
fn start_tls(config: &Config, agent: &SharedAgent, pki: &Pki) -> Arc<TlsProxies> {
    let instances = config.state_dir.join("instances");
    let authorize = {
        let agent = agent.clone();
        // Asked inside a handshake on the async runtime: waiting for the
        // agent (a write may hold it for milliseconds) must not hold up the
        // other tasks on this worker.
        Authorizer::new(move |source, destination| {
            tokio::task::block_in_place(|| {
                agent::lock(&agent).state().allows(
                    source,
                    destination,
                    Protocol::Tcp,
                    tls::TLS_PORT,
                )
            })
        })
    };
    let client_auth = ClientAuth { apps: config.mtls_apps.clone(), authorize };
    Arc::new(TlsProxies::new(
        pki.ca.clone(),
        pki.trust.clone(),
        instances,
        client_auth,
        &config.limits,
    ))
}
