//! The client half of the `allot` command: commands that talk to a running node over gRPC.
//!
//! This module holds the options shared by every client command, the command list, and the
//! dispatch. Each group of commands lives in its own module ([`enforce`], [`admin`],
//! [`tenant`], [`billing`]); answers are printed as tables ([`render`]) or JSON ([`json`]).
//!
//! Errors come back as `anyhow` errors whose `Display` is the whole line to print, such as
//! `error: invalid argument: amount: must be positive`. `allot check` is the exception: it
//! sets its own exit status (see [`ClientCommand::Check`]).

mod admin;
mod billing;
mod convert;
mod enforce;
mod json;
mod output;
mod parse;
mod reconcile;
mod render;
mod rpc;
mod tenant;

use std::io::Write;

use output::Output;

/// Options shared by every client command.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientOptions {
    /// Node to talk to.
    #[arg(
        long,
        global = true,
        env = "ALLOT_ENDPOINT",
        default_value = "http://127.0.0.1:7411"
    )]
    pub endpoint: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// API token sent with every call (`allot serve` prints the first admin token; make
    /// others with `allot token create`).
    #[arg(long, global = true, env = "ALLOT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Exit status of `allot check` when it could not decide, set apart from 1 (denied) so that
/// scripts never mistake a failure for a denial. Clap also exits with 2 on bad usage.
const CHECK_FAILED: i32 = 2;

/// The commands that talk to a node.
///
/// The largest option sets are boxed to keep this enum small, so that the enum main.rs
/// flattens it into stays clear of clippy's `large_enum_variant`.
#[derive(Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// Ask whether a tenant may use a feature, or N more units of a metric, right now.
    ///
    /// Consumes nothing: quotas are not counted and rate limits are only peeked at. A
    /// denial is printed like any other decision.
    #[command(
        after_help = "Exit status: 0 when allowed (with or without a warning), \
                            1 when denied, 2 when no decision could be made (bad \
                            arguments, node unreachable, unknown tenant...)."
    )]
    Check(enforce::CheckArgs),
    /// Hold units of a metric until they are committed, released, or the hold expires.
    ///
    /// The units are held in every applicable window or in none. Prints the reservation
    /// id to pass to `allot commit` or `allot release`, and the idempotency key to retry
    /// with.
    Reserve(enforce::ReserveArgs),
    /// Settle a reservation with the amount actually used; the rest is returned.
    Commit(enforce::CommitArgs),
    /// Return all of a reservation's units.
    Release(enforce::ReleaseArgs),
    /// Count usage at once, without a reservation (the same limits apply).
    ///
    /// A denied record counts nothing; it is printed, not reported as an error.
    Record(enforce::RecordArgs),
    /// Show every window of a tenant's metric: limit, used, reserved, remaining, reset.
    Usage(enforce::UsageArgs),
    /// Inspect tenants.
    #[command(subcommand)]
    Tenant(tenant::TenantCommand),
    /// Create or replace a tenant's subscription.
    Subscribe(Box<admin::SubscribeArgs>),
    /// Change or cancel an existing subscription.
    #[command(subcommand)]
    Subscription(Box<admin::SubscriptionCommand>),
    /// Install or print the catalog of plans, add-ons, features and metrics.
    #[command(subcommand)]
    Catalog(admin::CatalogCommand),
    /// Give one tenant a time-boxed exception: a feature, a config value, a limit or
    /// extra units.
    ///
    /// --kind says which other options apply (see below). The override shows in `allot
    /// tenant show` with its id, actor and reason until it expires or is revoked.
    Grant(Box<admin::GrantArgs>),
    /// Remove an override before it expires.
    Revoke(admin::RevokeArgs),
    /// Show this node's peers and how far its view of their soft-limit counts may lag
    /// (age of the last merge from each).
    Peers,
    /// Overage per tenant × metric × billing period, and exports (the node needs
    /// --clickhouse).
    #[command(subcommand)]
    Billing(billing::BillingCommand),
    /// Compare a billing provider's subscriptions (a file or API response) with the
    /// tenants' subscriptions, report drift, and with --repair make Allot match (the node
    /// needs the provider configured, e.g. --stripe-config).
    Reconcile(reconcile::ReconcileArgs),
}

/// Runs one client command against the node named in `opts`.
pub async fn run(opts: &ClientOptions, cmd: ClientCommand) -> anyhow::Result<()> {
    let out = Output::new(opts.json);
    if let ClientCommand::Check(args) = cmd {
        // Scripts branch on check's exit status, so it is set here rather than left to the
        // generic error path, whose status could be the 1 that means "denied".
        let status = match check(opts, out, args).await {
            Ok(true) => 1,
            Ok(false) => return Ok(()),
            Err(e) => {
                eprintln!("{e}");
                CHECK_FAILED
            }
        };
        let _ = std::io::stdout().flush();
        std::process::exit(status);
    }
    let channel = rpc::connect(&opts.endpoint, opts.token.as_deref()).await?;
    let channel = &channel;
    match cmd {
        ClientCommand::Check(_) => unreachable!("handled above"),
        ClientCommand::Reserve(args) => enforce::reserve(channel, out, args).await,
        ClientCommand::Commit(args) => enforce::commit(channel, out, args).await,
        ClientCommand::Release(args) => enforce::release(channel, out, args).await,
        ClientCommand::Record(args) => enforce::record(channel, out, args).await,
        ClientCommand::Usage(args) => enforce::usage(channel, out, args).await,
        ClientCommand::Tenant(cmd) => tenant::run(channel, out, cmd).await,
        ClientCommand::Subscribe(args) => admin::subscribe(channel, out, *args).await,
        ClientCommand::Subscription(cmd) => admin::subscription(channel, out, *cmd).await,
        ClientCommand::Catalog(cmd) => admin::catalog(channel, out, cmd).await,
        ClientCommand::Grant(args) => admin::grant(channel, out, *args).await,
        ClientCommand::Revoke(args) => admin::revoke(channel, out, args).await,
        ClientCommand::Peers => admin::peers(channel, out).await,
        ClientCommand::Billing(cmd) => billing::run(channel, out, cmd).await,
        ClientCommand::Reconcile(args) => reconcile::run(channel, out, args).await,
    }
}

/// `allot check`, connection included; returns whether it was denied.
async fn check(
    opts: &ClientOptions,
    out: Output,
    args: enforce::CheckArgs,
) -> anyhow::Result<bool> {
    let channel = rpc::connect(&opts.endpoint, opts.token.as_deref()).await?;
    enforce::check(&channel, out, args).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// The shape main.rs gives the client commands: flattened options and commands next
    /// to its own (`serve`).
    #[derive(Debug, Parser)]
    #[command(name = "allot", version)]
    struct Cli {
        #[command(flatten)]
        client: ClientOptions,
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Command {
        /// Run a node.
        Serve,
        #[command(flatten)]
        Client(ClientCommand),
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("allot").chain(args.iter().copied()))
    }

    fn client(args: &[&str]) -> ClientCommand {
        match parse(args).unwrap().command {
            Command::Client(c) => c,
            Command::Serve => panic!("parsed as serve"),
        }
    }

    #[test]
    fn the_command_tree_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn check_takes_a_feature_or_a_metric() {
        assert!(parse(&["check", "--tenant", "t"]).is_err());
        assert!(parse(&["check", "--tenant", "t", "--feature", "f", "--metric", "m"]).is_err());
        assert!(parse(&["check", "--tenant", "t", "--feature", "f", "--amount", "3"]).is_err());
        let ClientCommand::Check(a) = client(&["check", "--tenant", "t", "--feature", "sso"])
        else {
            panic!()
        };
        assert_eq!(a.amount, None);
        let ClientCommand::Check(a) = client(&[
            "check", "--tenant", "t", "--metric", "calls", "--amount", "5", "--dim", "k=v",
        ]) else {
            panic!()
        };
        assert_eq!((a.metric.as_deref(), a.amount), (Some("calls"), Some(5)));
        assert_eq!(a.dims.dims, [("k".to_string(), "v".to_string())]);
    }

    #[test]
    fn record_takes_negative_amounts() {
        let ClientCommand::Record(a) = client(&[
            "record", "--tenant", "t", "--metric", "seats", "--amount", "-2",
        ]) else {
            panic!()
        };
        assert_eq!(a.amount, -2);
        assert!(a.event_id.is_none());
    }

    #[test]
    fn global_options_go_anywhere() {
        let cli = parse(&[
            "usage",
            "--tenant",
            "t",
            "--metric",
            "m",
            "--json",
            "--endpoint",
            "http://node:1",
        ])
        .unwrap();
        assert!(cli.client.json);
        assert_eq!(cli.client.endpoint, "http://node:1");
    }

    #[test]
    fn nested_commands_parse() {
        assert!(matches!(
            client(&["tenant", "show", "acme", "--at", "now+30d"]),
            ClientCommand::Tenant(_)
        ));
        assert!(matches!(
            client(&["catalog", "apply", "c.yaml", "--dry-run"]),
            ClientCommand::Catalog(admin::CatalogCommand::Apply(_))
        ));
        assert!(matches!(
            client(&["catalog", "show"]),
            ClientCommand::Catalog(admin::CatalogCommand::Show)
        ));
        let ClientCommand::Subscription(sub) = client(&[
            "subscription",
            "change",
            "--tenant",
            "t",
            "--plan",
            "pro@2",
            "--timing",
            "period-end",
            "--add-addon",
            "seats:3",
            "--remove-addon",
            "sso",
        ]) else {
            panic!()
        };
        let admin::SubscriptionCommand::Change(a) = *sub else {
            panic!()
        };
        assert_eq!(a.timing, admin::Timing::PeriodEnd);
        assert_eq!(a.add_addons[0].quantity, 3);
        assert!(parse(&["subscription", "change", "--tenant", "t", "--version", "2"]).is_err());
        let ClientCommand::Billing(billing::BillingCommand::Overage(o)) = client(&[
            "billing", "overage", "--period", "2026-11", "--tenant", "acme", "--format", "csv",
        ]) else {
            panic!()
        };
        assert_eq!(
            (o.period.as_str(), o.format),
            ("2026-11", billing::Format::Csv)
        );
        assert!(parse(&["billing", "export"]).is_err());
        assert!(parse(&["billing", "overage", "--period", "2026-11", "--format", "xml"]).is_err());
    }

    #[test]
    fn subscribe_takes_one_kind_of_trial_end() {
        let base = ["subscribe", "--tenant", "t", "--plan", "pro"];
        let with = |extra: &[&str]| parse(&[&base[..], extra].concat());
        assert!(with(&["--trial-days", "14"]).is_ok());
        assert!(with(&["--trial-ends", "2025-01-01T00:00:00Z"]).is_ok());
        assert!(with(&["--trial-days", "14", "--trial-ends", "now+14d"]).is_err());
        assert!(with(&["--addon", "seats:0"]).is_err());
    }

    #[test]
    fn grant_needs_actor_and_reason_and_one_end() {
        let base = ["grant", "--tenant", "t", "--kind", "extra_units"];
        let with = |extra: &[&str]| parse(&[&base[..], extra].concat());
        // The environment may name an actor; only run the missing-actor case without it.
        if std::env::var_os("ALLOT_ACTOR").is_none() {
            assert!(with(&["--reason", "r"]).is_err());
        }
        assert!(with(&["--actor", "a"]).is_err());
        assert!(with(&["--actor", "a", "--reason", "r", "--for", "48h"]).is_ok());
        assert!(
            with(&["--actor", "a", "--reason", "r", "--for", "48h", "--until", "now+1d"]).is_err()
        );
        assert!(with(&["--actor", "a", "--reason", "r", "--value", "nope"]).is_err());
        assert!(parse(&["grant", "--tenant", "t", "--kind", "enable-feature"]).is_err());
    }
}
