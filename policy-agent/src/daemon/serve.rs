//! The daemon's listeners: the API (Unix socket, optional TCP), DNS and
//! metrics, until SIGTERM or SIGINT.

use std::{os::unix::fs::PermissionsExt as _, sync::Arc};

use anyhow::{Context as _, Result, bail};
use policy_agent::{
    agent,
    api::{Api, auth::Mtls, router},
    config::Config,
    dns,
    limits::{Gate, Plain, serve_http},
    metrics::Metrics,
};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::watch,
    task::JoinSet,
};
use tracing::{info, warn};

pub(super) type Servers = JoinSet<std::io::Result<()>>;

pub async fn serve(
    config: Config,
    api: Api,
    metrics: Arc<Metrics>,
    stop_tx: watch::Sender<bool>,
    pki: Option<super::Pki>,
) -> Result<()> {
    let stop = stop_tx.subscribe();
    let policy_server = api.policy_server.clone();
    if let Some(tls) = api.tls.clone() {
        let (agent, starting) = (api.agent.clone(), tls.clone());
        // Listeners for the endpoints already registered.
        tokio::task::spawn_blocking(move || {
            let wants = starting.wanted(agent::lock(&agent).state());
            starting.apply(wants);
        })
        .await
        .context("starting the TLS listeners")?;
        // Certificates and instance identities re-issued before they expire.
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let every = tls.rotation_check_every();
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return,
                }
                let tls = tls.clone();
                let _ = tokio::task::spawn_blocking(move || tls.rotate_due()).await;
            }
        });
    }
    watch_veths(&config, &api, &metrics, &stop);
    let mut servers = JoinSet::new();
    serve_dns(&config, &api, &stop, &mut servers)?;
    serve_api(&config, api, pki, &stop, &mut servers).await?;
    serve_metrics(&config, metrics, &stop, &mut servers).await?;
    if let (Some(cf), Some(server)) = (&config.cf, policy_server) {
        super::force::serve(&config, cf, server, &stop, &mut servers).await?;
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

/// How often the veths' TC filters are checked (`watch_veths`).
const VETH_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Every `VETH_CHECK_EVERY`, attaches again to this host's veths whose
/// programs another tool removed (their filters or `clsact` qdisc deleted):
/// without them the container's packets would go unchecked, its source
/// address unverified. The check reads netlink without the agent's lock;
/// only a repair takes it.
fn watch_veths(config: &Config, api: &Api, metrics: &Arc<Metrics>, stop: &watch::Receiver<bool>) {
    let (agent, pin_dir, metrics) = (api.agent.clone(), config.pin_dir.clone(), metrics.clone());
    let mut stop = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(VETH_CHECK_EVERY) => {}
                _ = stop.changed() => return,
            }
            let (agent, pin_dir) = (agent.clone(), pin_dir.clone());
            let repaired = tokio::task::spawn_blocking(move || {
                let detached = policy_agent::Dataplane::detached_veths(&pin_dir);
                if detached.is_empty() {
                    return Ok(Vec::new());
                }
                agent::lock(&agent).reattach_veths(&detached)
            })
            .await;
            match repaired {
                Ok(Ok(ifnames)) => {
                    for ifname in ifnames {
                        metrics.veths_reattached.inc();
                        warn!(
                            ifname,
                            "a veth's TC filters or qdisc were removed by another tool: attached again"
                        );
                    }
                }
                Ok(Err(e)) => warn!(error = %e, "cannot attach again to a veth found detached"),
                Err(e) => warn!(error = %e, "the veth check stopped"),
            }
        }
    });
}

/// The API on the Unix socket (mode 0660) and, if configured, on TCP.
async fn serve_api(
    config: &Config,
    api: Api,
    pki: Option<super::Pki>,
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
    let timeout = limits.header_timeout();
    let serve = serve_http("api", unix, Plain, app.clone(), gate.clone(), timeout, stop.clone());
    servers.spawn(async move {
        serve.await;
        Ok(())
    });
    let Some(addr) = config.listen else { return Ok(()) };
    if config.listen_plaintext && !addr.ip().is_loopback() {
        bail!(
            "listen = \"{addr}\" with listen_plaintext = true would let anyone who reaches \
             {addr} write policies: plain HTTP is allowed on loopback only (without \
             listen_plaintext the TCP API requires client certificates from the platform CA)"
        );
    }
    let tcp = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let serve = if config.listen_plaintext {
        info!(%addr, "API also on TCP, plain HTTP (loopback)");
        tokio::spawn(serve_http("api-tcp", tcp, Plain, app, gate, timeout, stop.clone()))
    } else {
        let pki = pki.context("the TCP API needs the platform CA")?;
        let mtls = Mtls::new(&pki.ca, &pki.trust, addr).context("the TCP API's TLS")?;
        info!(%addr, "API also on TCP, HTTPS with client certificates (policy-agent api-identity)");
        tokio::spawn(serve_http("api-tcp", tcp, mtls, app, gate, timeout, stop.clone()))
    };
    servers.spawn(async move {
        let _ = serve.await;
        Ok(())
    });
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
    let serve = serve_http("metrics", tcp, Plain, app, gate, limits.header_timeout(), stop.clone());
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
