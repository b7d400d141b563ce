//! The daemon's listeners: the API (Unix socket, optional TCP), DNS and
//! metrics, until SIGTERM or SIGINT.

use std::{os::unix::fs::PermissionsExt as _, sync::Arc};

use anyhow::{Context as _, Result};
use policy_agent::{
    agent,
    api::{Api, router},
    config::Config,
    dns,
    limits::{Gate, serve_http},
    metrics::Metrics,
};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::watch,
    task::JoinSet,
};
use tracing::{info, warn};

type Servers = JoinSet<std::io::Result<()>>;

pub async fn serve(
    config: Config,
    api: Api,
    metrics: Arc<Metrics>,
    stop_tx: watch::Sender<bool>,
) -> Result<()> {
    let stop = stop_tx.subscribe();
    if let Some(tls) = api.tls.clone() {
        let agent = api.agent.clone();
        // Listeners for the endpoints already registered.
        tokio::task::spawn_blocking(move || {
            let wants = tls.wanted(agent::lock(&agent).state());
            tls.apply(wants);
        })
        .await
        .context("starting the TLS listeners")?;
    }
    let mut servers = JoinSet::new();
    serve_dns(&config, &api, &stop, &mut servers)?;
    serve_api(&config, api, &stop, &mut servers).await?;
    serve_metrics(&config, metrics, &stop, &mut servers).await?;
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

/// The API on the Unix socket (mode 0660) and, if configured, on TCP.
async fn serve_api(
    config: &Config,
    api: Api,
    stop: &watch::Receiver<bool>,
    servers: &mut Servers,
) -> Result<()> {
    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // A socket file left by a previous run that was killed.
    let _ = std::fs::remove_file(&config.socket);
    let unix = UnixListener::bind(&config.socket)
        .with_context(|| format!("cannot listen on {}", config.socket.display()))?;
    std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o660))?;
    let app = router(api);
    let limits = &config.limits;
    // One budget of connections for the API, whichever listener they use.
    let gate = Gate::new("api", limits.api_connections, limits.per_source_connections);
    let serve =
        serve_http("api", unix, app.clone(), gate.clone(), limits.header_timeout(), stop.clone());
    servers.spawn(async move {
        serve.await;
        Ok(())
    });
    if let Some(addr) = config.listen {
        let tcp =
            TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        info!(%addr, "API also on TCP");
        let serve = serve_http("api-tcp", tcp, app, gate, limits.header_timeout(), stop.clone());
        servers.spawn(async move {
            serve.await;
            Ok(())
        });
    }
    Ok(())
}

/// `apps.internal` DNS over UDP and TCP.
fn serve_dns(
    config: &Config,
    api: &Api,
    stop: &watch::Receiver<bool>,
    servers: &mut Servers,
) -> Result<()> {
    let Some(addr) = config.dns_listen else { return Ok(()) };
    let agent = api.agent.clone();
    let lookup: dns::Lookup = Arc::new(move |host: &str| agent::lock(&agent).state().resolve(host));
    let (udp, tcp) = dns::bind(addr).with_context(|| {
        format!("cannot serve DNS on {addr} - is another DNS server on that port? set dns_listen (\"\" turns DNS off)")
    })?;
    let stop = stop.clone();
    let limits = &config.limits;
    let gate = Gate::new("dns-tcp", limits.dns_tcp_connections, limits.per_source_connections);
    servers.spawn(async move {
        dns::run(udp, tcp, lookup, gate, stop).await;
        Ok(())
    });
    Ok(())
}

/// Prometheus `/metrics`.
async fn serve_metrics(
    config: &Config,
    metrics: Arc<Metrics>,
    stop: &watch::Receiver<bool>,
    servers: &mut Servers,
) -> Result<()> {
    let Some(addr) = config.metrics_listen else { return Ok(()) };
    let tcp = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    info!(%addr, "metrics on /metrics");
    let app = axum::Router::new().route(
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
    let limits = &config.limits;
    let gate = Gate::new("metrics", limits.metrics_connections, limits.per_source_connections);
    let serve = serve_http("metrics", tcp, app, gate, limits.header_timeout(), stop.clone());
    servers.spawn(async move {
        serve.await;
        Ok(())
    });
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
