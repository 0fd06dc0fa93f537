//! The `weir` command: `weir serve` runs the server until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weir::server::{RunningServer, ServerConfig};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "Streaming SQL database over the PostgreSQL wire protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (pgwire and HTTP) over a data directory.
    Serve {
        /// Where topics, tables and the catalog live.
        #[arg(long, env = "WEIR_DATA_DIR", default_value = "./weir-data")]
        data_dir: PathBuf,
        /// PostgreSQL wire protocol address.
        #[arg(long, env = "WEIR_PG_ADDR", default_value = "127.0.0.1:5488")]
        pg_addr: String,
        /// HTTP address (/health, /metrics).
        #[arg(long, env = "WEIR_HTTP_ADDR", default_value = "127.0.0.1:8488")]
        http_addr: String,
        /// How often materialized views and sinks checkpoint (e.g. 10s, 500ms, 1min);
        /// a session's `SET checkpoint_interval` overrides it for the views it creates.
        #[arg(long, env = "WEIR_CHECKPOINT_INTERVAL", default_value = "10s")]
        checkpoint_interval: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weir: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve {
            data_dir,
            pg_addr,
            http_addr,
            checkpoint_interval,
        } => {
            let checkpoint_interval = match weir::sql::parse_duration_ms(&checkpoint_interval) {
                Ok(ms) if ms > 0 => std::time::Duration::from_millis(ms),
                _ => {
                    eprintln!(
                        "weir: invalid --checkpoint-interval \"{checkpoint_interval}\"; write e.g. 10s, 500ms or 1min"
                    );
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(serve(ServerConfig {
                pg_addr,
                http_addr,
                data_dir,
                checkpoint_interval,
            }))
        }
    }
}

async fn serve(config: ServerConfig) -> ExitCode {
    let server = match RunningServer::start(config).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("weir: {}", e.message);
            if let Some(hint) = &e.hint {
                eprintln!("hint: {hint}");
            }
            return ExitCode::FAILURE;
        }
    };
    // Scripts and tests read this line to learn the (possibly random) ports.
    println!(
        "weir: listening pg={} http={}",
        server.pg_addr(),
        server.http_addr()
    );
    if let Err(e) = shutdown_signal().await {
        eprintln!("weir: cannot listen for signals: {e}");
    }
    tracing::info!("shutting down");
    server.shutdown().await;
    ExitCode::SUCCESS
}

async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}
