//! `bench`: a load generator for an Allot node.
//!
//! Drives the node over gRPC on loopback at chosen concurrencies for a bounded time,
//! records latencies in HDR histograms, and compares every throughput with a no-op gRPC
//! ceiling measured in the same run. See `bench/README.md`.

mod cli;
mod clickhouse;
mod cluster;
mod ingest;
mod lag;
mod node;
mod noop;
mod propagation;
mod redis;
mod report;
mod resources;
mod run;
mod scenario;
mod setup;
mod targets;

use clap::Parser as _;

use cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(dispatch(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::NoopServer(args)) => noop::serve(args).await,
        // On Ctrl-C or SIGTERM the run is dropped, which kills the child processes.
        None => tokio::select! {
            result = run::run(cli.run) => result,
            signal = interrupted() => {
                signal?;
                anyhow::bail!("interrupted; child processes killed")
            }
        },
    }
}

/// Resolves on Ctrl-C, or SIGTERM on Unix.
async fn interrupted() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}
