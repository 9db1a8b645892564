//! `allot reconcile`: compare a billing provider's subscriptions with Allot's, and repair
//! on request.

use std::path::PathBuf;

use allot_proto::v1::admin_client::AdminClient;
use allot_proto::v1::ReconcileProviderRequest;

use super::output::Output;
use super::render::table;
use super::rpc::{fail, status_error, Conn};
use enforcer::grpc::admin::MAX_MESSAGE;

/// Options of `allot reconcile`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit status: 0 when Allot matches the provider (or every \
                        difference was repaired), 1 when differences remain, 2 when the \
                        comparison could not be made."
)]
pub struct ReconcileArgs {
    /// The provider.
    #[arg(long, default_value = "stripe")]
    pub provider: String,
    /// The provider's current subscriptions: for Stripe, the JSON of `GET
    /// /v1/subscriptions?status=all` (every page's `data` in one list) or a JSON array of
    /// subscription objects, at most 64 MiB. `-` reads standard input.
    #[arg(long)]
    pub file: PathBuf,
    /// Make Allot match the provider where they differ (recorded in each tenant's ledger
    /// as `reconcile.repair`). Without it, only report.
    #[arg(long)]
    pub repair: bool,
    /// Why, for the audit trail (`allot tenant history`).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// On whose behalf (the token's principal is recorded in any case).
    #[arg(long, default_value = "")]
    pub actor: String,
}

/// Runs `allot reconcile`; exits 1 when differences remain, 2 when it failed (scripts
/// branch on the status, so a failure must not read as "differences").
pub async fn run(channel: &Conn, out: Output, a: ReconcileArgs) -> anyhow::Result<()> {
    match compare(channel, out, a).await {
        Ok(0) => Ok(()),
        Ok(_) => std::process::exit(1),
        Err(e) => {
            // Client errors arrive already worded as `error: …`.
            let text = e.to_string();
            match text.starts_with("error: ") {
                true => eprintln!("{text}"),
                false => eprintln!("error: {text}"),
            }
            std::process::exit(2);
        }
    }
}

/// Prints the comparison; returns how many subscriptions still differ.
async fn compare(channel: &Conn, out: Output, a: ReconcileArgs) -> anyhow::Result<usize> {
    let state = if a.file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .map_err(|e| fail(format!("--file -: cannot read standard input: {e}")))?;
        buf
    } else {
        std::fs::read(&a.file).map_err(|e| fail(format!("--file {}: {e}", a.file.display())))?
    };
    // The request carries a few fields besides the file.
    let most = MAX_MESSAGE - 64 * 1024;
    if state.len() > most {
        return Err(fail(format!(
            "--file {}: {:.1} MiB is more than the {} MiB one reconciliation takes; split \
             the list by customer (each part then lists the others' subscriptions as not \
             in the file)",
            a.file.display(),
            state.len() as f64 / (1 << 20) as f64,
            MAX_MESSAGE >> 20,
        )));
    }
    let r = AdminClient::new(channel.clone())
        .max_encoding_message_size(MAX_MESSAGE)
        .max_decoding_message_size(MAX_MESSAGE)
        .reconcile_provider(ReconcileProviderRequest {
            provider: a.provider,
            state,
            repair: a.repair,
            reason: a.reason,
            actor: a.actor,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let remaining = r.drift.iter().filter(|d| !d.repaired).count();
    out.emit(
        || {
            serde_json::json!({
                "checked": r.checked,
                "drift": r.drift.iter().map(|d| serde_json::json!({
                    "object_id": d.object_id,
                    "tenant": d.tenant,
                    "differences": d.differences.iter().map(|f| serde_json::json!({
                        "field": f.field, "allot": f.allot, "provider": f.provider,
                    })).collect::<Vec<_>>(),
                    "repaired": d.repaired,
                    "note": d.note,
                })).collect::<Vec<_>>(),
                "not_in_provider": r.not_in_provider,
            })
        },
        || {
            let mut text = format!(
                "{} provider subscriptions checked, {} differ, {} repaired\n",
                r.checked,
                r.drift.len(),
                r.drift.len() - remaining
            );
            if !r.drift.is_empty() {
                let mut t = table(&[
                    "subscription",
                    "tenant",
                    "field",
                    "allot",
                    "provider",
                    "repaired",
                ]);
                for d in &r.drift {
                    for f in &d.differences {
                        t.add_row(vec![
                            d.object_id.clone(),
                            d.tenant.clone(),
                            f.field.clone(),
                            f.allot.clone(),
                            f.provider.clone(),
                            if d.repaired {
                                "yes".into()
                            } else {
                                "no".into()
                            },
                        ]);
                    }
                }
                text.push_str(&t.to_string());
                text.push('\n');
                for d in r.drift.iter().filter(|d| !d.note.is_empty()) {
                    text.push_str(&format!("{} ({}): {}\n", d.object_id, d.tenant, d.note));
                }
            }
            if !r.not_in_provider.is_empty() {
                text.push_str(&format!(
                    "known to Allot but not in the file: {}\n",
                    r.not_in_provider.join(", ")
                ));
            }
            text
        },
    )?;
    Ok(remaining)
}
