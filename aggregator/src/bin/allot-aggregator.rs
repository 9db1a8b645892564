//! `allot-aggregator`: the aggregator alone (the same as `allot aggregate`), for
//! deployments and tests that do not need the whole `allot` binary.

use clap::Parser;

/// Move usage events from Redis or embedded nodes' spools into ClickHouse, exactly once.
#[derive(Parser)]
#[command(name = "allot-aggregator", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    args: aggregator::AggregateArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match aggregator::main(cli.args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
