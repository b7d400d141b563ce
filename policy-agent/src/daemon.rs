//! `policy-agent run`: load, reconcile, serve the API until SIGTERM/SIGINT.
//! Enforcement stays in place when the daemon stops (pinned maps and links).

use std::{
    os::unix::fs::PermissionsExt as _,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use tokio::{net::UnixListener, sync::watch};
use tracing::{info, warn};

use crate::{
    Dataplane, DataplaneConfig,
    agent::Agent,
    api::{Api, router},
    config::Config,
    store::Store,
};

pub fn run(config: Config) -> Result<()> {
    let dataplane = Dataplane::open(&DataplaneConfig {
        pin_dir: config.pin_dir.clone(),
        capacities: config.capacities.clone(),
        events: config.flow_events.clone(),
    })
    .with_context(|| {
        format!(
            "failed to load the dataplane with pins under {} - are we root?",
            config.pin_dir.display()
        )
    })?;
    let store = Store::open(&config.state_dir)?;
    let (agent, warnings) = Agent::start(dataplane, store, config.policy_limit())
        .context("failed to reconcile the kernel to the stored state")?;
    for w in warnings {
        warn!("{w}");
    }
    let api = Api { agent: Arc::new(Mutex::new(agent)), max_body_bytes: config.max_body_bytes };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the async runtime")?
        .block_on(serve(config, api))
}

async fn serve(config: Config, api: Api) -> Result<()> {
    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // A socket file left by a previous run that was killed.
    let _ = std::fs::remove_file(&config.socket);
    let unix = UnixListener::bind(&config.socket)
        .with_context(|| format!("cannot listen on {}", config.socket.display()))?;
    std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o660))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
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
