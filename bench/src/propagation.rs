//! The propagation scenario: how long a plan change made through one node takes to show on
//! two other nodes that share its Redis.
//!
//! One redis-server and three nodes (`--redis … --cache-ttl 1h`: within the run, only the
//! nodes' change announcements on pub/sub can refresh a cached tenant). A tenant starts
//! on `bench_plain` (no `reports`) and nodes 2 and 3 cache that with a Check of `reports`.
//! Then, `--changes` times, node 1's Admin.ChangeSubscription (timing IMMEDIATELY) flips
//! the tenant between `bench` and `bench_plain`; from the moment that call returns, nodes
//! 2 and 3 are each polled with back-to-back Checks (no sleeps), concurrently, until they
//! give the new answer. The delay runs to the arrival of that answer, so it is accurate to
//! about one Check (the `poll p50` column); when the first Check already shows the change
//! (the `1st poll` column), the delay is only an upper bound. A wait is capped at 5 s and
//! then counts as an error.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use allot_proto::v1::admin_client::AdminClient;
use allot_proto::v1::enforcer_client::EnforcerClient;
use allot_proto::v1::{
    ChangeSubscriptionRequest, ChangeTiming, CheckRequest, PutSubscriptionRequest,
};
use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use tonic::transport::Channel;

use crate::cli::{RunArgs, Scenario};
use crate::node::{self, ServerProcess};
use crate::report::{Row, RunInfo};
use crate::scenario::{allowed, MAX_NANOS};
use crate::setup::{self, status_error, FEATURE, PLAN, PLAN_PLAIN};

/// The tenant whose plan is flipped.
const TENANT: &str = "bench-propagation";
/// Longest wait for one node to show one change.
const CAP: Duration = Duration::from_secs(5);
/// A node that misses this many changes in a row is not going to catch up: stop early.
const MAX_CAPPED_IN_A_ROW: u32 = 3;

/// What one node showed over the run.
struct NodeDelays {
    label: &'static str,
    /// Delays, nanoseconds.
    delays: Histogram<u64>,
    /// Time of each polling Check, nanoseconds.
    polls: Histogram<u64>,
    errors: BTreeMap<String, (u64, String)>,
    capped_in_a_row: u32,
    /// Changes whose very first Check already gave the new answer.
    first_poll: u64,
}

impl NodeDelays {
    fn new(label: &'static str) -> anyhow::Result<Self> {
        Ok(NodeDelays {
            label,
            delays: Histogram::new_with_bounds(1, MAX_NANOS, 3)?,
            polls: Histogram::new_with_bounds(1, MAX_NANOS, 3)?,
            errors: BTreeMap::new(),
            capped_in_a_row: 0,
            first_poll: 0,
        })
    }

    fn add(&mut self, wait: Wait) -> anyhow::Result<()> {
        self.polls.add(&wait.polls)?;
        match wait.result {
            Ok(delay) => {
                if wait.polls.len() == 1 {
                    self.first_poll += 1;
                }
                self.delays
                    .saturating_record(u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX).max(1));
                self.capped_in_a_row = 0;
            }
            Err((kind, detail)) => {
                if kind == "timeout" {
                    self.capped_in_a_row += 1;
                }
                let e = self.errors.entry(kind).or_insert((0, detail));
                e.0 += 1;
            }
        }
        Ok(())
    }

    fn row(&self, changes_per_sec: f64, info: &RunInfo) -> Row {
        let mut row = Row::of_histogram(Scenario::Propagation, &self.delays, changes_per_sec, info);
        row.errors = self.errors.values().map(|e| e.0).sum();
        let total = row.ops + row.errors;
        row.error_rate = if total == 0 {
            0.0
        } else {
            row.errors as f64 / total as f64
        };
        row.error_kinds = self.errors.iter().map(|(k, v)| (k.clone(), v.0)).collect();
        row.target = Some(self.label.to_owned());
        row.poll_p50_us =
            (!self.polls.is_empty()).then(|| self.polls.value_at_quantile(0.5) as f64 / 1000.0);
        row.seen_by_first_poll = Some(self.first_poll);
        row
    }
}

/// One node's wait for one change.
struct Wait {
    result: Result<Duration, (String, String)>,
    polls: Histogram<u64>,
}

/// Starts Redis and three nodes, makes the changes, and returns one row per observing node.
pub async fn run(args: &RunArgs, info: &RunInfo) -> anyhow::Result<Vec<Row>> {
    let server = crate::redis::start_server(&args.redis_server).await?;
    let url = crate::redis::url(&server);
    eprintln!("propagation: redis-server on {}", server.addr());
    let bin = node::allot_bin(args.allot_bin.as_deref())?;
    let mut node_args: Vec<String> = ["--redis", &url, "--cache-ttl", "1h"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    node_args.extend(args.node_args.iter().cloned());
    let mut nodes: Vec<ServerProcess> = Vec::new();
    for i in 1..=3 {
        let n = node::start_allot(&bin, &format!("allot node {i}"), &node_args).await?;
        eprintln!("propagation: node {i} on {}", n.addr());
        nodes.push(n);
    }
    let mut channels = Vec::new();
    for n in &nodes {
        channels.push(setup::connect(&n.url(), 1).await?.remove(0));
    }
    let mut children: Vec<ServerProcess> = nodes;
    children.push(server);

    let result = measure(args, info, &channels, &mut children).await;
    // Nodes first, then the Redis they use.
    for child in children {
        child.stop().await;
    }
    result
}

async fn measure(
    args: &RunArgs,
    info: &RunInfo,
    channels: &[Channel],
    children: &mut [ServerProcess],
) -> anyhow::Result<Vec<Row>> {
    setup::prepare(channels[0].clone(), 0, true, None)
        .await
        .context("preparing node 1")?;
    let mut admin = AdminClient::new(channels[0].clone());
    admin
        .put_subscription(PutSubscriptionRequest {
            tenant: TENANT.to_owned(),
            plan: PLAN_PLAIN.to_owned(),
            actor: "bench".to_owned(),
            ..Default::default()
        })
        .await
        .map_err(|s| {
            status_error(
                &format!("Admin.PutSubscription({TENANT}, {PLAN_PLAIN})"),
                &s,
            )
        })?;
    let enforcers: Vec<EnforcerClient<Channel>> =
        channels.iter().cloned().map(EnforcerClient::new).collect();
    for (i, e) in enforcers.iter().enumerate() {
        let now = feature_allowed(&mut e.clone()).await?;
        if now {
            bail!(
                "node {}: {TENANT} on plan {PLAN_PLAIN} was allowed `{FEATURE}`; the bench \
                 catalog is wrong",
                i + 1
            );
        }
    }
    eprintln!(
        "propagation: {TENANT} on {PLAN_PLAIN} on node 1, caches of nodes 2 and 3 warm \
         (DENY); {} changes",
        args.changes
    );

    let mut observed = [NodeDelays::new("node2")?, NodeDelays::new("node3")?];
    let mut writer_stale = 0u64;
    let mut done = 0u64;
    let begin = Instant::now();
    for i in 0..args.changes {
        let to_full = i % 2 == 0;
        let plan = if to_full { PLAN } else { PLAN_PLAIN };
        admin
            .change_subscription(ChangeSubscriptionRequest {
                tenant: TENANT.to_owned(),
                plan: plan.to_owned(),
                timing: ChangeTiming::Immediately as i32,
                actor: "bench".to_owned(),
                ..Default::default()
            })
            .await
            .map_err(|s| status_error(&format!("Admin.ChangeSubscription(to {plan})"), &s))?;
        let t0 = Instant::now();
        let waits: Vec<_> = enforcers[1..]
            .iter()
            .map(|e| tokio::spawn(wait_for(e.clone(), to_full, t0)))
            .collect();
        for (slot, handle) in observed.iter_mut().zip(waits) {
            slot.add(handle.await.context("a polling task panicked")??)?;
        }
        done += 1;
        // The node that made the change must answer it at once.
        if feature_allowed(&mut enforcers[0].clone()).await? != to_full {
            writer_stale += 1;
        }
        for child in children.iter_mut() {
            child.ensure_running()?;
        }
        if observed
            .iter()
            .any(|o| o.capped_in_a_row >= MAX_CAPPED_IN_A_ROW)
        {
            eprintln!(
                "propagation: stopped after {done} changes: a node missed \
                 {MAX_CAPPED_IN_A_ROW} in a row"
            );
            break;
        }
    }
    let elapsed = begin.elapsed();
    if writer_stale > 0 {
        eprintln!(
            "propagation: node 1, which made the changes, answered the old outcome right \
             after {writer_stale} of them"
        );
    }
    let per_sec = done as f64 / elapsed.as_secs_f64().max(1e-9);
    let mut rows = Vec::new();
    for o in &observed {
        for (kind, (count, example)) in &o.errors {
            eprintln!(
                "  {}: {count} errors of kind {kind}, e.g.: {example}",
                o.label
            );
        }
        let row = o.row(per_sec, info);
        eprintln!(
            "  {}: {} changes seen, p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs, {} errors; \
             {} seen by the first Check sent",
            o.label,
            row.ops,
            row.p50_us.unwrap_or(f64::NAN),
            row.p99_us.unwrap_or(f64::NAN),
            row.max_us.unwrap_or(f64::NAN),
            row.errors,
            o.first_poll
        );
        rows.push(row);
    }
    Ok(rows)
}

fn feature_request() -> CheckRequest {
    CheckRequest {
        tenant: TENANT.to_owned(),
        feature: FEATURE.to_owned(),
        ..Default::default()
    }
}

/// Whether the node now allows the feature to the tenant.
async fn feature_allowed(client: &mut EnforcerClient<Channel>) -> anyhow::Result<bool> {
    let r = client
        .check(feature_request())
        .await
        .map_err(|s| status_error("Enforcer.Check(reports)", &s))?
        .into_inner();
    Ok(allowed(r.decision.as_ref()).is_ok())
}

/// Polls `client` with back-to-back Checks until it answers `want`, or until [`CAP`]
/// after `t0`; the delay is from `t0` to the arrival of the first such answer.
async fn wait_for(
    mut client: EnforcerClient<Channel>,
    want: bool,
    t0: Instant,
) -> anyhow::Result<Wait> {
    let mut polls = Histogram::new_with_bounds(1, MAX_NANOS, 3)?;
    let request = feature_request();
    let poll = async {
        loop {
            let sent = Instant::now();
            let answer = client.check(request.clone()).await;
            let arrived = Instant::now();
            polls.saturating_record(
                u64::try_from((arrived - sent).as_nanos())
                    .unwrap_or(u64::MAX)
                    .max(1),
            );
            match answer {
                Ok(r) => {
                    if allowed(r.into_inner().decision.as_ref()).is_ok() == want {
                        return Ok(arrived - t0);
                    }
                }
                Err(s) => return Err((format!("{:?}", s.code()), s.message().to_owned())),
            }
        }
    };
    let result = match tokio::time::timeout_at((t0 + CAP).into(), poll).await {
        Ok(r) => r,
        Err(_) => Err((
            "timeout".to_owned(),
            format!("the new outcome did not show within {}s", CAP.as_secs()),
        )),
    };
    Ok(Wait { result, polls })
}
