//! The network front: pgwire (simple and extended protocol, COPY, cancel) and
//! HTTP (`/health`, `/metrics`), both over one [`Weir`] engine.
//!
//! The server owns sockets and tasks, nothing else: statements go to the
//! engine, and [`WeirError`]s come back as PostgreSQL `ErrorResponse`s. It
//! must never hold data of its own or decide what a statement means.

mod http;
mod pgwire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use crate::engine::TaskHandle;
use crate::engine::{Weir, WeirConfig};
use crate::types::{SqlState, WeirError, WeirResult};

/// Where to listen and where the data lives.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub pg_addr: String,
    pub http_addr: String,
    pub data_dir: PathBuf,
    /// The default checkpoint interval of views and sinks.
    pub checkpoint_interval: Duration,
}

/// How long a shutdown waits for in-flight statements before closing anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A running server; dropping it aborts its tasks, [`RunningServer::shutdown`]
/// stops it gracefully.
pub struct RunningServer {
    weir: Weir,
    pg_addr: SocketAddr,
    http_addr: SocketAddr,
    /// Statements hold a read guard while they run; shutdown takes the write
    /// guard, so it waits for in-flight statements and lets no new one start.
    gate: Arc<tokio::sync::RwLock<()>>,
    /// The pgwire accept loop (it owns the per-connection tasks).
    pg_task: TaskHandle,
    /// The HTTP server task.
    http_task: TaskHandle,
    /// Applies topic retention every [`RETENTION_INTERVAL`].
    retention_task: TaskHandle,
}

/// How often topic retention runs.
const RETENTION_INTERVAL: Duration = Duration::from_secs(10);

async fn bind(addr: &str, what: &str) -> WeirResult<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            format!("another process listens on {addr}; stop it or pass a free address with --{what}-addr")
        } else {
            format!("pass a valid address with --{what}-addr")
        };
        WeirError::new(SqlState::IO_ERROR, format!("cannot listen on {addr} ({what}): {e}"))
            .with_hint(hint)
    })
}

impl RunningServer {
    /// Opens the data directory, recovers, binds both ports and starts serving.
    pub async fn start(config: ServerConfig) -> WeirResult<RunningServer> {
        let pg_listener = bind(&config.pg_addr, "pg").await?;
        let http_listener = bind(&config.http_addr, "http").await?;
        let mut weir_config = WeirConfig::new(&config.data_dir);
        weir_config.checkpoint_interval = config.checkpoint_interval;
        let weir = Weir::open(weir_config).await?;
        let local = |l: &TcpListener| {
            l.local_addr()
                .map_err(|e| WeirError::io("reading listener address", e))
        };
        let pg_addr = local(&pg_listener)?;
        let http_addr = local(&http_listener)?;
        let gate = Arc::new(tokio::sync::RwLock::new(()));
        let pg_task = pgwire::serve(pg_listener, weir.clone(), gate.clone());
        let http_task = http::serve(http_listener, weir.clone());
        let retention_weir = weir.clone();
        let retention_task = TaskHandle::spawn("retention", async move {
            let mut tick = tokio::time::interval(RETENTION_INTERVAL);
            loop {
                tick.tick().await;
                match retention_weir.apply_retention().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(segments = n, "retention deleted segments"),
                    Err(e) => tracing::warn!(error = %e, "applying retention failed"),
                }
            }
        });
        tracing::info!(%pg_addr, %http_addr, data_dir = %config.data_dir.display(), "weir is serving");
        Ok(RunningServer {
            weir,
            pg_addr,
            http_addr,
            gate,
            pg_task,
            http_task,
            retention_task,
        })
    }

    pub fn pg_addr(&self) -> SocketAddr {
        self.pg_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn weir(&self) -> &Weir {
        &self.weir
    }

    /// Graceful stop: no new statements, in-flight ones finish (up to a
    /// grace period), logs are synced, then sockets close.
    pub async fn shutdown(self) {
        match tokio::time::timeout(SHUTDOWN_GRACE, self.gate.write()).await {
            Ok(_guard) => tracing::info!("in-flight statements finished"),
            Err(_) => {
                tracing::warn!("statements still running after the grace period; stopping anyway")
            }
        }
        self.pg_task.abort();
        self.http_task.abort();
        self.retention_task.abort();
        if let Err(e) = self.weir.sync() {
            tracing::error!(error = %e, "syncing logs at shutdown failed");
        }
        // A last checkpoint: the next start resumes here, and sinks commit what they hold.
        match tokio::time::timeout(SHUTDOWN_GRACE, self.weir.checkpoint()).await {
            Ok(Ok(())) => tracing::info!("checkpointed views and sinks"),
            Ok(Err(e)) => tracing::warn!(error = %e, "checkpoint at shutdown failed"),
            Err(_) => tracing::warn!("checkpoint at shutdown took too long; stopping anyway"),
        }
        tracing::info!("weir stopped");
    }
}
