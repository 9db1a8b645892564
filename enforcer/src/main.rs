//! `allot`: run a node (`allot serve`), an aggregator (`allot aggregate`), or talk to a
//! node (every other subcommand).

mod cli;

use anyhow::Context;
use clap::{Parser, Subcommand};
use enforcer::config::{LogFormat, ServeArgs};

/// Allot: usage metering, entitlements and quota enforcement.
#[derive(Parser)]
#[command(name = "allot", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    client: cli::ClientOptions,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: gRPC Enforcer and Admin services over the embedded store in --data-dir,
    /// or over Redis shared with other nodes (--redis).
    Serve(Box<ServeArgs>),
    /// Move usage events from Redis (--redis) or embedded nodes' spools (--spool) into
    /// ClickHouse, exactly once; migrates the schema at
    /// start (see docs/clickhouse.md).
    Aggregate(Box<aggregator::AggregateArgs>),
    /// Manage API tokens in a node's token file (no node needed; a running node picks
    /// the change up within seconds).
    #[command(subcommand)]
    Token(TokenCommand),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; prints it once (the file keeps only its SHA-256).
    Create {
        /// Who calls with it: recorded as the actor of its changes.
        #[arg(long)]
        principal: String,
        /// What it may call: admin, support:read, enforce, billing, spool, peer (repeat
        /// or comma-separate).
        #[arg(long = "scope", required = true, value_delimiter = ',')]
        scopes: Vec<String>,
        /// The token file. [default: <data-dir>/tokens.toml]
        #[arg(long, env = "ALLOT_TOKENS")]
        file: Option<std::path::PathBuf>,
        /// The node's data directory, for the default file.
        #[arg(long, env = "ALLOT_DATA_DIR", default_value = enforcer::config::DEFAULT_DATA_DIR)]
        data_dir: std::path::PathBuf,
    },
}

fn token(cmd: TokenCommand) -> anyhow::Result<()> {
    let TokenCommand::Create {
        principal,
        scopes,
        file,
        data_dir,
    } = cmd;
    if principal.trim().is_empty() {
        anyhow::bail!("--principal: must not be empty");
    }
    let scopes =
        enforcer::auth::parse_scopes(&scopes).map_err(|e| anyhow::anyhow!("--scope: {e}"))?;
    let path = file.unwrap_or_else(|| enforcer::auth::default_path(&data_dir));
    let t = enforcer::auth::TokenFile::add(&path, &principal, &scopes)?;
    eprintln!(
        "token for {principal} ({}) added to {}; it is shown only now:",
        scopes.join(", "),
        path.display()
    );
    println!("{t}");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Aggregate(mut args) => {
                args.token = cli.client.token.clone();
                args.tls = cli.client.tls()?.map(aggregator::options::SpoolTls);
                aggregator::main(*args).await.map_err(Into::into)
            }
            Command::Token(cmd) => token(cmd),
            Command::Client(cmd) => cli::run(&cli.client, cmd).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Client errors arrive already worded as `error: …`.
            let text = format!("{e:#}");
            if text.starts_with("error: ") {
                eprintln!("{text}");
            } else {
                eprintln!("error: {text}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = args.resolve()?;
    init_logs(cfg.log_format);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), "allot node starting");
    // Scripts and tests read the bound address (port 0 picks one) from this line.
    println!("listening on {addr}");
    enforcer::server::run(listener, &cfg, shutdown_signal()).await?;
    tracing::info!("allot node stopped");
    Ok(())
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
    tracing::info!("shutting down");
}
