//! `allot billing`: a period's overage, and exports, as a table, CSV or JSON.

use super::rpc::Conn;
use allot_proto::v1::billing_client::BillingClient;
use allot_proto::v1::{BillingLine, BillingLineKind, ExportRequest, OverageRequest};

use super::output::{write_stdout, Output};
use super::rpc::{fail, status_error};

/// Billing commands (the node needs --clickhouse).
#[derive(Debug, clap::Subcommand)]
pub enum BillingCommand {
    /// Each tenant × metric's included units, use, overage and amount for a billing
    /// period, as the usage events in ClickHouse say now.
    ///
    /// Overage is counted event by event against the allowance in force at each event,
    /// so a plan change mid-period acts from then on (see docs/billing.md).
    Overage(OverageArgs),
    /// Freeze a billing period's lines, with adjustments of earlier exported periods.
    ///
    /// A period can be exported once it has ended everywhere (12:00 UTC on the 1st of
    /// the next month). Exporting it again prints the same lines. Usage that reaches an
    /// exported period later appears as an adjustment line in the next export.
    Export(ExportArgs),
}

/// How lines are printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table for people.
    #[default]
    Table,
    /// CSV with a header row, amounts as decimals and in millionths.
    Csv,
    /// A JSON document (the same as --json).
    Json,
}

/// Options of `allot billing overage`.
#[derive(Debug, clap::Args)]
pub struct OverageArgs {
    /// The billing period, YYYY-MM (periods are named by the month they start in).
    #[arg(long)]
    pub period: String,
    /// Only this tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

/// Options of `allot billing export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The billing period, YYYY-MM.
    #[arg(long)]
    pub period: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

/// Runs a billing command.
pub async fn run(channel: &Conn, out: Output, cmd: BillingCommand) -> anyhow::Result<()> {
    let mut client = BillingClient::new(channel.clone());
    let json_flag = |f: Format| if out.is_json() { Format::Json } else { f };
    match cmd {
        BillingCommand::Overage(a) => {
            let r = client
                .overage(OverageRequest {
                    period: a.period,
                    tenant: a.tenant.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let head = serde_json::json!({"period": r.period, "currency": r.currency});
            print(json_flag(a.format), head, &r.currency, &r.lines, false)
        }
        BillingCommand::Export(a) => {
            let r = client
                .export(ExportRequest { period: a.period })
                .await
                .map_err(status_error)?
                .into_inner();
            let exported_at = r.exported_at.as_ref().map_or(String::new(), |t| {
                chrono::DateTime::from_timestamp(t.seconds, 0)
                    .map_or(String::new(), |d| d.to_rfc3339())
            });
            if r.already_exported && !matches!(json_flag(a.format), Format::Json) {
                eprintln!(
                    "period {} was already exported at {exported_at}: these are the lines sent then",
                    r.period
                );
            }
            let head = serde_json::json!({
                "period": r.period,
                "currency": r.currency,
                "exported_at": exported_at,
                "already_exported": r.already_exported,
            });
            print(json_flag(a.format), head, &r.currency, &r.lines, true)
        }
    }
}

fn kind(l: &BillingLine) -> &'static str {
    if l.kind == BillingLineKind::Adjustment as i32 {
        "adjustment"
    } else {
        "period"
    }
}

fn included(l: &BillingLine) -> String {
    l.included.map_or("unlimited".into(), |i| i.to_string())
}

fn print(
    format: Format,
    mut head: serde_json::Value,
    currency: &str,
    lines: &[BillingLine],
    export: bool,
) -> anyhow::Result<()> {
    match format {
        Format::Json => {
            head["lines"] = lines.iter().map(line_json).collect();
            let doc = serde_json::to_string_pretty(&head)
                .map_err(|e| fail(format!("cannot encode the answer as JSON: {e}")))?;
            write_stdout(&doc)
        }
        Format::Csv => write_stdout(&csv(currency, lines)?),
        Format::Table => write_stdout(&table(currency, lines, export)),
    }
}

fn line_json(l: &BillingLine) -> serde_json::Value {
    serde_json::json!({
        "kind": kind(l),
        "period": l.period,
        "tenant": l.tenant,
        "metric": l.metric,
        "plan": (!l.plan.is_empty()).then(|| format!("{}@{}", l.plan, l.plan_version)),
        "included": l.included,
        "used": l.used,
        "overage": l.overage,
        "amount": l.amount,
        "amount_micros": l.amount_micros,
        "unpriced": l.unpriced,
    })
}

fn csv(currency: &str, lines: &[BillingLine]) -> anyhow::Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let head = [
        "kind",
        "period",
        "tenant",
        "metric",
        "plan",
        "included",
        "used",
        "overage",
        "amount",
        "amount_micros",
        "unpriced",
        "currency",
    ];
    let encode = |e: csv::Error| fail(format!("cannot write CSV: {e}"));
    w.write_record(head).map_err(encode)?;
    for l in lines {
        let plan = if l.plan.is_empty() {
            String::new()
        } else {
            format!("{}@{}", l.plan, l.plan_version)
        };
        w.write_record([
            kind(l).to_string(),
            l.period.clone(),
            l.tenant.clone(),
            l.metric.clone(),
            plan,
            l.included.map_or(String::new(), |i| i.to_string()),
            l.used.to_string(),
            l.overage.to_string(),
            l.amount.clone(),
            l.amount_micros.to_string(),
            l.unpriced.to_string(),
            currency.to_string(),
        ])
        .map_err(encode)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| fail(format!("cannot write CSV: {e}")))?;
    String::from_utf8(bytes).map_err(|e| fail(format!("cannot write CSV: {e}")))
}

fn table(currency: &str, lines: &[BillingLine], export: bool) -> String {
    if lines.is_empty() {
        return "no usage in this period".into();
    }
    let amount = if currency.is_empty() {
        "amount".to_string()
    } else {
        format!("amount ({currency})")
    };
    let mut head = if export { vec!["kind"] } else { vec![] };
    head.extend(["period", "tenant", "metric"]);
    if !export {
        head.push("plan");
    }
    head.extend(["included", "used", "overage", amount.as_str(), "unpriced"]);
    let mut t = super::render::table(&head);
    for l in lines {
        let mut row = vec![l.period.clone(), l.tenant.clone(), l.metric.clone()];
        if export {
            row.insert(0, kind(l).to_string());
        } else {
            row.push(format!("{}@{}", l.plan, l.plan_version));
        }
        row.extend([
            included(l),
            l.used.to_string(),
            l.overage.to_string(),
            l.amount.clone(),
            l.unpriced.to_string(),
        ]);
        t.add_row(row);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(tenant: &str, adjustment: bool) -> BillingLine {
        BillingLine {
            kind: if adjustment {
                BillingLineKind::Adjustment
            } else {
                BillingLineKind::Period
            } as i32,
            period: "2026-10".into(),
            tenant: tenant.into(),
            metric: "api_calls".into(),
            plan: "pro".into(),
            plan_version: 2,
            included: Some(1000),
            used: 1200,
            overage: 200,
            amount_micros: 80_000,
            amount: "0.08".into(),
            unpriced: 0,
        }
    }

    #[test]
    fn csv_has_a_header_and_one_record_per_line() {
        let text = csv("USD", &[line("acme", false), line("o'brien,inc", true)]).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "kind,period,tenant,metric,plan,included,used,overage,amount,amount_micros,unpriced,currency");
        assert_eq!(
            lines[1],
            "period,2026-10,acme,api_calls,pro@2,1000,1200,200,0.08,80000,0,USD"
        );
        // A value with a comma is quoted, not split.
        assert!(
            lines[2].starts_with("adjustment,2026-10,\"o'brien,inc\","),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn tables_name_the_currency_and_say_when_there_is_nothing() {
        let t = table("EUR", &[line("acme", false)], false);
        assert!(
            t.contains("amount (EUR)") && t.contains("pro@2") && t.contains("0.08"),
            "{t}"
        );
        assert!(!t.contains("adjustment"));
        let t = table("EUR", &[line("acme", true)], true);
        assert!(t.contains("adjustment") && !t.contains("pro@2"), "{t}");
        assert_eq!(table("", &[], false), "no usage in this period");
    }
}
