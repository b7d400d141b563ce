//! `policy-agent run`: load, reconcile, serve the API until SIGTERM/SIGINT.
//! Enforcement stays in place when the daemon stops (pinned maps and links).

use std::{
    os::unix::fs::PermissionsExt as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context as _, Result};
use tokio::{net::UnixListener, sync::watch};
use tracing::{info, warn};

use crate::{
    Dataplane, DataplaneConfig,
    agent::Agent,
    api::{Api, SharedAgent, router},
    config::Config,
    flows::{self, FlowHub, FlowLog},
    metrics::Metrics,
    store::Store,
};

pub fn run(config: Config) -> Result<()> {
    let overlay = config.overlay().map_err(|e| anyhow::anyhow!("overlay_network: {e}"))?;
    let mut dataplane = Dataplane::open(&DataplaneConfig {
        pin_dir: config.pin_dir.clone(),
        capacities: config.capacities.clone(),
        events: config.flow_events.clone(),
        overlay,
    })
    .with_context(|| {
        format!(
            "failed to load the dataplane with pins under {} - are we root?",
            config.pin_dir.display()
        )
    })?;
    let ring = dataplane.take_flow_events().context("the flow event ring buffer is missing")?;
    let store = Store::open(&config.state_dir)?;
    let started = std::time::Instant::now();
    let tls_ports = config.tls.then(|| crate::state::TlsPorts {
        default: crate::state::TlsFront {
            app_port: config.tls_upstream_port,
            tls_port: crate::tls::TLS_PORT,
        },
        per_app: config.tls_app_ports.clone(),
    });
    let (agent, warnings) = Agent::start(dataplane, store, config.policy_limit(), tls_ports)
        .context("failed to reconcile the kernel to the stored state")?;
    let reconcile_time = started.elapsed();
    for w in warnings {
        warn!("{w}");
    }
    let agent: SharedAgent = Arc::new(Mutex::new(agent));
    let metrics = Arc::new(Metrics::new(agent.clone()));
    metrics.reconcile_duration.observe(reconcile_time.as_secs_f64());
    let hub = Arc::new(FlowHub::default());
    let reader_stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (agent, hub, stop) = (agent.clone(), hub.clone(), reader_stop.clone());
        let log =
            FlowLog::new(config.flow_log.clone(), config.flow_log_max_bytes, config.flow_log_keep);
        std::thread::Builder::new()
            .name("flow-events".into())
            .spawn(move || flows::run_reader(ring, agent, hub, log, stop))
            .context("cannot start the flow event reader")?
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let tls = if config.tls {
        let ca = crate::tls::PlatformCa::load_or_create(&config.state_dir)
            .context("failed to set up the platform CA")?;
        info!(bundle = %ca.bundle().display(), "platform CA bundle");
        let instances = config.state_dir.join("instances");
        let authorize = {
            let agent = agent.clone();
            // Asked inside a handshake on the async runtime: waiting for
            // the agent (a write may hold it for milliseconds) must not
            // hold up the other tasks on this worker.
            crate::tls::Authorizer::new(move |source, destination| {
                tokio::task::block_in_place(|| {
                    agent.lock().unwrap_or_else(|p| p.into_inner()).state().allows(
                        source,
                        destination,
                        crate::state::Protocol::Tcp,
                        crate::tls::TLS_PORT,
                    )
                })
            })
        };
        let client_auth = crate::tls::ClientAuth { apps: config.mtls_apps.clone(), authorize };
        Some(Arc::new(crate::tls::TlsProxies::new(ca, instances, client_auth)))
    } else {
        None
    };
    let api = Api {
        agent,
        max_body_bytes: config.max_body_bytes,
        hub,
        metrics: metrics.clone(),
        stopping: stop_rx,
        tls,
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the async runtime")?
        .block_on(serve(config, api, metrics, stop_tx));
    reader_stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    result
}

async fn serve(
    config: Config,
    api: Api,
    metrics: Arc<Metrics>,
    stop_tx: watch::Sender<bool>,
) -> Result<()> {
    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // A socket file left by a previous run that was killed.
    let _ = std::fs::remove_file(&config.socket);
    let unix = UnixListener::bind(&config.socket)
        .with_context(|| format!("cannot listen on {}", config.socket.display()))?;
    std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o660))?;
    let stop_rx = stop_tx.subscribe();
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let api_agent = api.agent.clone();
    if let Some(tls) = api.tls.clone() {
        let agent = api.agent.clone();
        // Listeners for the endpoints already registered.
        tokio::task::spawn_blocking(move || {
            tls.sync(agent.lock().unwrap_or_else(|p| p.into_inner()).state())
        })
        .await
        .context("starting the TLS listeners")?;
    }
    let app = router(api);
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(
        axum::serve(unix, app.clone())
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
    );
    if let Some(addr) = config.listen {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        info!(%addr, "API also on TCP");
        servers.spawn(
            axum::serve(tcp, app).with_graceful_shutdown(stopped(stop_rx.clone())).into_future(),
        );
    }
    if let Some(addr) = config.dns_addr().context("dns_listen is not an address:port")? {
        let agent = api_agent.clone();
        let lookup: crate::dns::Lookup = Arc::new(move |host: &str| {
            agent.lock().unwrap_or_else(|p| p.into_inner()).state().resolve(host)
        });
        let (udp, tcp) = crate::dns::bind(addr).with_context(|| {
            format!("cannot serve DNS on {addr} - is another DNS server on that port? set dns_listen (\"\" turns DNS off)")
        })?;
        let stop = stop_rx.clone();
        servers.spawn(async move {
            crate::dns::run(udp, tcp, lookup, stop).await;
            Ok(())
        });
    }
    if let Some(addr) = config.metrics_listen {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        info!(%addr, "metrics on /metrics");
        let metrics_app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        );
        servers.spawn(
            axum::serve(tcp, metrics_app)
                .with_graceful_shutdown(stopped(stop_rx.clone()))
                .into_future(),
        );
    }
    info!(socket = %config.socket.display(), "policy-agent ready");
    shutdown_signal().await;
    info!("shutting down; enforcement stays in place");
    let _ = stop_tx.send(true);
    while let Some(result) = servers.join_next().await {
        result.context("API server task failed")?.context("API server failed")?;
    }
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

/// SIGINT and SIGTERM, as one signal.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
