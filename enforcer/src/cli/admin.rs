//! The Admin commands that change things: `subscribe`, `subscription change|cancel`,
//! `catalog apply|show`, `grant` and `revoke`, their options and the calls they make.
//! (`tenant show`, which only reads, has its own module.)

use std::path::PathBuf;
use std::time::Duration;

use super::rpc::Conn;
use allot_proto::v1::admin_client::AdminClient;
use allot_proto::v1::{
    AddonItem, ApplyCatalogRequest, CancelSubscriptionRequest, ChangeSubscriptionRequest,
    ChangeTiming, GetCatalogRequest, GrantOverrideRequest, PutSubscriptionRequest,
    RevokeOverrideRequest, Value,
};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand, ValueEnum};

use super::output::{write_stdout, Output};
use super::parse::{self, PlanRef};
use super::rpc::{fail, status_error};
use super::{convert, json, render};

/// Options of `allot subscribe`.
#[derive(Debug, Clone, Args)]
pub struct SubscribeArgs {
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// Plan code, or PLAN@VERSION to pin a version.
    #[arg(long, value_name = "PLAN[@VERSION]", value_parser = parse::plan_ref)]
    pub plan: PlanRef,
    /// Plan version. Default: the newest published one.
    #[arg(long)]
    pub version: Option<u32>,
    /// An add-on as CODE or CODE:QUANTITY (its quotas multiply by the quantity); repeat
    /// for several.
    #[arg(long = "addon", value_name = "CODE[:QTY]", value_parser = parse::addon)]
    pub addons: Vec<AddonItem>,
    /// Status: pending, trialing, active, past_due, grace, suspended, canceled, refunded
    /// or chargeback. Default: active, or trialing when the trial end is given.
    #[arg(long)]
    pub status: Option<String>,
    /// IANA time zone of the hour, day and month windows, e.g. Europe/Paris. Default: UTC.
    #[arg(long)]
    pub time_zone: Option<String>,
    /// Billing periods start at this instant's day of month and time of day (in the time
    /// zone): RFC 3339 or now[+-DURATION]. Default: now.
    #[arg(long, value_name = "INSTANT", value_parser = parse::instant)]
    pub billing_anchor: Option<DateTime<Utc>>,
    /// End of the trial: RFC 3339 or now+DURATION.
    #[arg(long, value_name = "INSTANT", value_parser = parse::instant, conflicts_with = "trial_days")]
    pub trial_ends: Option<DateTime<Utc>>,
    /// Trial length in days from now; short for --trial-ends now+<N>days.
    #[arg(long, value_name = "N")]
    pub trial_days: Option<u32>,
    /// Plan after the trial, as PLAN or PLAN@VERSION (default: its newest version).
    /// Without one, the subscription is canceled when the trial ends.
    #[arg(long, value_name = "PLAN[@VERSION]", value_parser = parse::plan_ref)]
    pub post_trial_plan: Option<PlanRef>,
    /// Who makes the change, for the audit trail.
    #[arg(long, env = "ALLOT_ACTOR")]
    pub actor: Option<String>,
    /// Why, for the audit trail (`allot tenant history`).
    #[arg(long)]
    pub reason: Option<String>,
}

/// `allot subscription` commands.
#[derive(Debug, Clone, Subcommand)]
pub enum SubscriptionCommand {
    /// Change the plan, add-ons or status of an existing subscription. Options left out
    /// are left as they are.
    Change(ChangeArgs),
    /// Cancel a subscription, now or at the end of the billing period.
    Cancel(CancelArgs),
}

/// When a plan change applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Timing {
    /// Upgrades (to a higher tier) now, downgrades at the end of the billing period.
    Auto,
    /// Now.
    Now,
    /// At the end of the current billing period.
    PeriodEnd,
}

impl From<Timing> for ChangeTiming {
    fn from(t: Timing) -> Self {
        match t {
            Timing::Auto => ChangeTiming::Auto,
            Timing::Now => ChangeTiming::Immediately,
            Timing::PeriodEnd => ChangeTiming::PeriodEnd,
        }
    }
}

/// Options of `allot subscription change`.
#[derive(Debug, Clone, Args)]
pub struct ChangeArgs {
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// New plan code, or PLAN@VERSION to pin a version.
    #[arg(long, value_name = "PLAN[@VERSION]", value_parser = parse::plan_ref)]
    pub plan: Option<PlanRef>,
    /// Version of the new plan. Default: the newest published one.
    #[arg(long, requires = "plan")]
    pub version: Option<u32>,
    /// When the plan change applies.
    #[arg(long, value_enum, default_value_t = Timing::Auto)]
    pub timing: Timing,
    /// An add-on to add, or whose quantity to set, as CODE or CODE:QUANTITY; repeat for
    /// several.
    #[arg(long = "add-addon", value_name = "CODE[:QTY]", value_parser = parse::addon)]
    pub add_addons: Vec<AddonItem>,
    /// Code of an add-on to remove; repeat for several.
    #[arg(long = "remove-addon", value_name = "CODE")]
    pub remove_addons: Vec<String>,
    /// New status: pending, trialing, active, past_due, grace, suspended, canceled,
    /// refunded or chargeback. Only the state machine's steps are allowed (active →
    /// past_due → grace → suspended, back to active when paid, …); another is refused,
    /// naming the statuses allowed next, and recorded in the tenant's history.
    #[arg(long)]
    pub status: Option<String>,
    /// Who makes the change, for the audit trail.
    #[arg(long, env = "ALLOT_ACTOR")]
    pub actor: Option<String>,
    /// Why, for the audit trail (`allot tenant history`).
    #[arg(long)]
    pub reason: Option<String>,
}

/// Options of `allot subscription cancel`.
#[derive(Debug, Clone, Args)]
pub struct CancelArgs {
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// Cancel at the end of the current billing period instead of now.
    #[arg(long)]
    pub at_period_end: bool,
    /// Who makes the change, for the audit trail.
    #[arg(long, env = "ALLOT_ACTOR")]
    pub actor: Option<String>,
    /// Why, for the audit trail (`allot tenant history`).
    #[arg(long)]
    pub reason: Option<String>,
}

/// `allot catalog` commands.
#[derive(Debug, Clone, Subcommand)]
pub enum CatalogCommand {
    /// Validate a catalog file and install it.
    ///
    /// Published plan versions are immutable: a catalog that changes or removes one is
    /// refused and nothing changes. Add a new version instead.
    Apply(ApplyArgs),
    /// Print the catalog in force, as YAML.
    Show,
}

/// Options of `allot catalog apply`.
#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    /// Catalog file, YAML or JSON (the format of examples/catalog.yaml); - reads standard
    /// input.
    pub file: PathBuf,
    /// Validate only; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Who applies it, for the audit trail.
    #[arg(long, env = "ALLOT_ACTOR")]
    pub actor: Option<String>,
    /// Why, for the audit trail (`allot tenant history`).
    #[arg(long)]
    pub reason: Option<String>,
}

/// What an override changes; it decides which other options apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum OverrideKind {
    /// Turn a feature on (--feature).
    EnableFeature,
    /// Turn a feature off (--feature).
    DisableFeature,
    /// Set a config feature's value (--feature, --value).
    SetConfig,
    /// Replace a limit (--metric, --window, --amount).
    SetLimit,
    /// Raise a limit to at least an amount (--metric, --window, --amount).
    RaiseLimit,
    /// Add units to every quota window of a metric (--metric, --amount).
    ExtraUnits,
}

impl OverrideKind {
    fn wire_name(self) -> &'static str {
        match self {
            OverrideKind::EnableFeature => "enable_feature",
            OverrideKind::DisableFeature => "disable_feature",
            OverrideKind::SetConfig => "set_config",
            OverrideKind::SetLimit => "set_limit",
            OverrideKind::RaiseLimit => "raise_limit",
            OverrideKind::ExtraUnits => "extra_units",
        }
    }
}

/// Options of `allot grant`.
#[derive(Debug, Clone, Args)]
pub struct GrantArgs {
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// What the override changes.
    #[arg(long, value_enum)]
    pub kind: OverrideKind,
    /// Feature code (enable_feature, disable_feature, set_config).
    #[arg(long)]
    pub feature: Option<String>,
    /// Metric code (set_limit, raise_limit, extra_units).
    #[arg(long)]
    pub metric: Option<String>,
    /// Window of the limit (set_limit, raise_limit): second, minute, hour, day, month,
    /// billing_period or none.
    #[arg(long)]
    pub window: Option<String>,
    /// Units (set_limit, raise_limit, extra_units); not negative.
    #[arg(long, allow_negative_numbers = true)]
    pub amount: Option<i64>,
    /// The value (set_config), as JSON: true, 123, '"gold"' or '["a","b"]'.
    #[arg(long, value_name = "JSON", value_parser = parse::feature_value, allow_hyphen_values = true)]
    pub value: Option<Value>,
    /// First instant it applies: RFC 3339 or now[+-DURATION]. Default: now.
    #[arg(long, value_name = "INSTANT", value_parser = parse::instant)]
    pub from: Option<DateTime<Utc>>,
    /// How long it applies from --from, e.g. 48h or 7days. Without --for or --until it
    /// lasts until revoked.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse::duration, conflicts_with = "until")]
    pub duration: Option<Duration>,
    /// First instant it no longer applies: RFC 3339 or now+DURATION.
    #[arg(long, value_name = "INSTANT", value_parser = parse::instant)]
    pub until: Option<DateTime<Utc>>,
    /// Who grants it, for the audit trail (required).
    #[arg(long, env = "ALLOT_ACTOR")]
    pub actor: String,
    /// Why, for the audit trail (required), e.g. a ticket reference.
    #[arg(long)]
    pub reason: String,
    /// Id for the override. Default: one made by the node. An existing id is refused.
    #[arg(long)]
    pub id: Option<String>,
}

/// Options of `allot revoke`.
#[derive(Debug, Clone, Args)]
pub struct RevokeArgs {
    /// Tenant id.
    #[arg(long)]
    pub tenant: String,
    /// Id of the override, as shown by `allot grant` or `allot tenant show`.
    #[arg(long)]
    pub id: String,
    /// Who revokes it, for the audit trail (required).
    #[arg(long, env = "ALLOT_ACTOR")]
    pub actor: String,
    /// Why, for the audit trail (required).
    #[arg(long)]
    pub reason: String,
}

fn client(channel: &Conn) -> AdminClient<Conn> {
    AdminClient::new(channel.clone())
}

/// Merges `--plan P[@V]` with `--version V` into the wire's code and version (0: newest).
fn plan_and_version(plan: PlanRef, version: Option<u32>) -> anyhow::Result<(String, u32)> {
    match (plan.version, version) {
        (Some(a), Some(b)) if a != b => Err(fail(format!(
            "--plan {}@{a} and --version {b} disagree; give the version once",
            plan.code
        ))),
        (a, b) => Ok((plan.code, a.or(b).unwrap_or(0))),
    }
}

/// Runs `allot subscribe`.
pub async fn subscribe(channel: &Conn, out: Output, args: SubscribeArgs) -> anyhow::Result<()> {
    let (plan, plan_version) = plan_and_version(args.plan, args.version)?;
    let trial_ends = match (args.trial_ends, args.trial_days) {
        (Some(at), _) => Some(at),
        (None, Some(days)) => Some(parse::now() + chrono::Duration::days(i64::from(days))),
        (None, None) => None,
    };
    let (post_trial_plan, post_trial_plan_version) = args
        .post_trial_plan
        .map(|p| (p.code, p.version.unwrap_or(0)))
        .unwrap_or_default();
    let request = PutSubscriptionRequest {
        tenant: args.tenant,
        plan,
        plan_version,
        addons: args.addons,
        status: args.status.unwrap_or_default(),
        time_zone: args.time_zone.unwrap_or_default(),
        billing_anchor: args.billing_anchor.map(convert::to_timestamp),
        trial_ends_at: trial_ends.map(convert::to_timestamp),
        post_trial_plan,
        post_trial_plan_version,
        actor: args.actor.unwrap_or_default(),
        reason: args.reason.unwrap_or_default(),
    };
    let response = client(channel)
        .put_subscription(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let sub = response.subscription.as_ref();
    out.emit(|| json::subscription(sub), || render::subscription(sub))
}

/// Runs `allot subscription change|cancel`.
pub async fn subscription(
    channel: &Conn,
    out: Output,
    cmd: SubscriptionCommand,
) -> anyhow::Result<()> {
    let response = match cmd {
        SubscriptionCommand::Change(args) => {
            let (plan, plan_version) = match args.plan {
                Some(p) => plan_and_version(p, args.version)?,
                None => (String::new(), 0),
            };
            let request = ChangeSubscriptionRequest {
                tenant: args.tenant,
                plan,
                plan_version,
                timing: ChangeTiming::from(args.timing).into(),
                add_addons: args.add_addons,
                remove_addons: args.remove_addons,
                status: args.status.unwrap_or_default(),
                actor: args.actor.unwrap_or_default(),
                reason: args.reason.unwrap_or_default(),
            };
            client(channel).change_subscription(request).await
        }
        SubscriptionCommand::Cancel(args) => {
            let request = CancelSubscriptionRequest {
                tenant: args.tenant,
                at_period_end: args.at_period_end,
                actor: args.actor.unwrap_or_default(),
                reason: args.reason.unwrap_or_default(),
            };
            client(channel).cancel_subscription(request).await
        }
    }
    .map_err(status_error)?
    .into_inner();
    let sub = response.subscription.as_ref();
    out.emit(|| json::subscription(sub), || render::subscription(sub))
}

/// Runs `allot catalog apply|show`.
pub async fn catalog(channel: &Conn, out: Output, cmd: CatalogCommand) -> anyhow::Result<()> {
    match cmd {
        CatalogCommand::Apply(args) => {
            let (yaml, source_name) = read_catalog(&args.file).await?;
            let request = ApplyCatalogRequest {
                yaml,
                source_name,
                dry_run: args.dry_run,
                actor: args.actor.unwrap_or_default(),
                reason: args.reason.unwrap_or_default(),
            };
            let response = client(channel)
                .apply_catalog(request)
                .await
                .map_err(status_error)?
                .into_inner();
            out.emit(
                || json::apply_catalog(&response),
                || render::apply_catalog(&response),
            )
        }
        CatalogCommand::Show => {
            let response = client(channel)
                .get_catalog(GetCatalogRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if out.is_json() {
                out.emit(|| serde_json::json!({ "yaml": response.yaml }), String::new)
            } else if response.yaml.is_empty() {
                // Nothing on stdout, so `allot catalog show > backup.yaml` saves no noise.
                eprintln!("no catalog has been applied yet");
                Ok(())
            } else {
                write_stdout(&response.yaml)
            }
        }
    }
}

/// The catalog text and the name errors will cite: the path, or `<stdin>` for `-`.
async fn read_catalog(file: &std::path::Path) -> anyhow::Result<(String, String)> {
    if file.as_os_str() == "-" {
        let text = tokio::task::spawn_blocking(|| std::io::read_to_string(std::io::stdin()))
            .await
            .map_err(|e| fail(format!("cannot read standard input: {e}")))?
            .map_err(|e| fail(format!("cannot read standard input: {e}")))?;
        return Ok((text, "<stdin>".into()));
    }
    let name = file.display().to_string();
    let text = tokio::fs::read_to_string(file)
        .await
        .map_err(|e| fail(format!("cannot read catalog {name}: {e}")))?;
    Ok((text, name))
}

/// Runs `allot grant`.
pub async fn grant(channel: &Conn, out: Output, args: GrantArgs) -> anyhow::Result<()> {
    let request = GrantOverrideRequest {
        tenant: args.tenant,
        kind: args.kind.wire_name().into(),
        feature: args.feature.unwrap_or_default(),
        metric: args.metric.unwrap_or_default(),
        window: args.window.unwrap_or_default(),
        amount: args.amount.unwrap_or(0),
        value: args.value,
        valid_from: args.from.map(convert::to_timestamp),
        valid_to: args.until.map(convert::to_timestamp),
        duration: args.duration.map(convert::to_duration),
        actor: args.actor,
        reason: args.reason,
        id: args.id.unwrap_or_default(),
    };
    let response = client(channel)
        .grant_override(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let o = response.r#override.as_ref();
    out.emit(|| json::override_(o), || render::override_(o))
}

/// Runs `allot revoke`.
pub async fn revoke(channel: &Conn, out: Output, args: RevokeArgs) -> anyhow::Result<()> {
    let id = args.id.clone();
    let request = RevokeOverrideRequest {
        tenant: args.tenant,
        id: args.id,
        actor: args.actor,
        reason: args.reason,
    };
    let response = client(channel)
        .revoke_override(request)
        .await
        .map_err(status_error)?
        .into_inner();
    out.emit(
        || serde_json::json!({ "id": id, "revoked": response.revoked }),
        || {
            if response.revoked {
                format!("override {id} revoked")
            } else {
                format!("override {id} was already gone; nothing changed")
            }
        },
    )
}

/// `allot peers`.
pub async fn peers(channel: &Conn, out: Output) -> anyhow::Result<()> {
    let p = client(channel)
        .get_peers(allot_proto::v1::GetPeersRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    out.emit(
        || {
            serde_json::json!({
                "node": p.node,
                "slots": p.slots,
                "live_nodes": p.live_nodes,
                "peers": p.peers.iter().map(|x| serde_json::json!({
                    "node": x.node,
                    "address": x.address,
                    "source": x.source,
                    "live": x.live,
                    "last_merge_age_ms": x.last_merge_age.as_ref().map(|d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000),
                    "error": x.error,
                })).collect::<Vec<_>>(),
            })
        },
        || render::peers(&p),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(code: &str, version: Option<u32>) -> PlanRef {
        PlanRef {
            code: code.into(),
            version,
        }
    }

    #[test]
    fn plan_version_comes_from_either_option() {
        assert_eq!(
            plan_and_version(plan("pro", None), None).unwrap(),
            ("pro".into(), 0)
        );
        assert_eq!(
            plan_and_version(plan("pro", Some(2)), None).unwrap(),
            ("pro".into(), 2)
        );
        assert_eq!(
            plan_and_version(plan("pro", None), Some(3)).unwrap(),
            ("pro".into(), 3)
        );
        assert_eq!(
            plan_and_version(plan("pro", Some(3)), Some(3)).unwrap(),
            ("pro".into(), 3)
        );
        let e = plan_and_version(plan("pro", Some(2)), Some(3)).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("error: --plan pro@2 and --version 3"));
    }

    #[test]
    fn override_kinds_use_the_wire_names() {
        for kind in OverrideKind::value_variants() {
            let shown = kind.to_possible_value().unwrap();
            assert_eq!(shown.get_name(), kind.wire_name());
        }
    }
}
