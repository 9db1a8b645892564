//! End to end without Redis: gRPC traffic on an embedded node → its spool → `allot
//! aggregate --spool` → ClickHouse 18.16. The monthly rollup equals the client's ledger,
//! no event is there twice, and the spool is empty afterwards; a crash between insert and
//! acknowledgement counts nothing twice; a second aggregator waits while the first holds
//! the node's spool and takes over after it stops; bad entries (served by a small Spool
//! server in the test) go to `dead_letters` and the rest flows.

mod harness;

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allot_proto::v1 as pb;
use harness::warehouse::{usage_rows, wait_rollup, ClickHouseServer, Totals};
use harness::{record, reserve, subscribe, Node};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tonic::{Request, Response, Status};

const CATALOG: &str = "version: 1
metrics:
  calls: { unit: call }
plans:
  p:
    versions:
      1:
        limits:
          calls:
            - { window: day, amount: 100000 }
";

/// Reserve/commit and a record per tenant and round, into `ledger`; returns the events
/// spooled (two per tenant and round).
async fn traffic(node: &Node, rounds: i64, tag: &str, ledger: &mut Totals) -> u64 {
    let mut e = node.enforcer().await;
    let mut events = 0;
    for i in 0..rounds {
        for t in ["acme", "globex"] {
            let r = e
                .reserve(reserve(t, "calls", 10 + i % 7, &format!("{t}-{tag}-r{i}")))
                .await
                .unwrap()
                .into_inner();
            let c = e
                .commit(pb::CommitRequest {
                    tenant: t.into(),
                    reservation_id: r.reservation_id,
                    actual_amount: i % 9,
                })
                .await
                .unwrap()
                .into_inner();
            *ledger.entry((t.into(), "calls".into())).or_default() += c.committed as i64;
            let r = e
                .record(record(t, "calls", 1 + i % 4, &format!("{t}-{tag}-e{i}")))
                .await
                .unwrap()
                .into_inner();
            assert!(r.recorded);
            *ledger.entry((t.into(), "calls".into())).or_default() += 1 + i % 4;
            events += 2;
        }
    }
    events
}

/// An embedded node with two subscribed tenants.
async fn node() -> Node {
    let node = Node::builder().catalog(CATALOG).start().await;
    let mut admin = node.admin().await;
    for t in ["acme", "globex"] {
        subscribe(&mut admin, t, "p").await;
    }
    node
}

/// `allot aggregate --spool <spool>` as `id`, its stderr lines collected.
fn aggregate(ch: &ClickHouseServer, spool: &str, id: &str, extra: &[&str]) -> (Child, Log) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_allot"))
        .args(["aggregate", "--clickhouse", &ch.url, "--spool", spool])
        .args([
            "--database",
            "allot",
            "--batch-interval",
            "200ms",
            "--id",
            id,
        ])
        .args(extra)
        .env("RUST_LOG", "info,aggregator=debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = Log::default();
    let lines = log.0.clone();
    let stderr = child.stderr.take().unwrap();
    tokio::spawn(async move {
        let mut r = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = r.next_line().await {
            lines.lock().unwrap().push(line);
        }
    });
    (child, log)
}

/// An aggregator's stderr.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn count(&self, needle: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }

    /// Waits (up to a minute) for a line containing `needle`.
    async fn wait_for(&self, needle: &str) {
        for _ in 0..600 {
            if self.count(needle) > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no {needle:?} in the log:\n{}", self.text());
    }
}

/// Stops an aggregator (SIGKILL: it has nothing to give back, the node's lease lapses).
async fn stop(mut child: Child) {
    child.start_kill().unwrap();
    let _ = child.wait().await;
}

/// What the node's spool still holds, read once no aggregator holds it any more.
async fn spool_left(endpoint: &str) -> usize {
    let mut spool = pb::spool_client::SpoolClient::connect(endpoint.to_string())
        .await
        .unwrap();
    for _ in 0..600 {
        match spool
            .read(pb::ReadSpoolRequest {
                after: 0,
                max: 10_000,
                consumer: "test-checker".into(),
            })
            .await
        {
            Ok(r) => return r.into_inner().entries.len(),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(s) => panic!("spool read: {s}"),
        }
    }
    panic!("the spool stayed held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_usage_reaches_the_monthly_rollup_and_leaves_the_spool_empty() {
    let ch = ClickHouseServer::start().await;
    let node = node().await;
    let mut ledger = Totals::new();
    let events = traffic(&node, 60, "a", &mut ledger).await;
    // Refused by the day cap: a denial, not usage.
    let mut e = node.enforcer().await;
    let r = e
        .record(record("acme", "calls", 1_000_000, "too-much"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.recorded);

    let (agg, log) = aggregate(&ch, &node.endpoint, "one", &[]);
    wait_rollup(&ch, &ledger).await;
    // More while it runs.
    let events = events + traffic(&node, 20, "b", &mut ledger).await;
    wait_rollup(&ch, &ledger).await;
    assert_eq!(usage_rows(&ch).await, (events, events), "every event, once");
    let client = ch.client("allot");
    let refused: u64 = client
        .query("SELECT count() FROM denials WHERE reason = 'limit_exceeded'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(refused, 1, "the denial, once");
    let srcs: Vec<String> = client
        .query("SELECT DISTINCT src FROM usage_events")
        .fetch_all()
        .await
        .unwrap();
    let port = node.endpoint.rsplit(':').next().unwrap();
    assert_eq!(srcs, vec![format!("spool:127.0.0.1:{port}")]);
    assert_eq!(log.count("entry moved to the dead letters"), 0);
    terminate(agg).await;
    assert_eq!(spool_left(&node.endpoint).await, 0, "the spool is empty");
}

/// Stops an aggregator the ordinary way (SIGTERM) and waits for it: each partition's
/// last batch is inserted and acknowledged (an insert is always acknowledged before the
/// worker goes on), so once ClickHouse has everything, the spool has nothing left.
async fn terminate(mut agg: Child) {
    let pid = agg.id().unwrap().to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = agg.wait().await.unwrap();
    assert!(status.success(), "the aggregator stops cleanly: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_insert_and_ack_counts_nothing_twice() {
    let ch = ClickHouseServer::start().await;
    let node = node().await;
    let mut ledger = Totals::new();
    let events = traffic(&node, 100, "a", &mut ledger).await;

    let (mut crashy, log) = aggregate(
        &ch,
        &node.endpoint,
        "crashy",
        &["--batch-size", "50", "--exit-after-insert", "2"],
    );
    let status = crashy.wait().await.unwrap();
    assert!(!status.success(), "the failpoint aborts: {status}");
    assert_eq!(log.count("failpoint"), 1, "{}", log.text());
    let (rows, _) = usage_rows(&ch).await;
    assert_eq!(rows, 100, "two inserts of 50 landed, unacknowledged");

    let (agg, log) = aggregate(&ch, &node.endpoint, "after", &["--batch-size", "50"]);
    wait_rollup(&ch, &ledger).await;
    assert_eq!(usage_rows(&ch).await, (events, events), "every event, once");
    log.wait_for("acknowledged entries clickhouse already had")
        .await;
    terminate(agg).await;
    assert_eq!(spool_left(&node.endpoint).await, 0, "the spool is empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_aggregator_waits_for_the_spool_and_takes_over() {
    let ch = ClickHouseServer::start().await;
    let node = node().await;
    let mut ledger = Totals::new();
    let mut events = traffic(&node, 30, "a", &mut ledger).await;

    let (first, first_log) = aggregate(&ch, &node.endpoint, "first", &[]);
    wait_rollup(&ch, &ledger).await;
    first_log.wait_for("partition taken").await;

    let (second, second_log) = aggregate(&ch, &node.endpoint, "second", &[]);
    second_log.wait_for("spool held by another consumer").await;
    assert!(
        second_log.text().contains("first/"),
        "the refusal names the holder:\n{}",
        second_log.text()
    );
    events += traffic(&node, 30, "b", &mut ledger).await;
    wait_rollup(&ch, &ledger).await;
    // Two more refusals: still refused after the new events were inserted.
    let refused = second_log.count("spool held by another consumer");
    for _ in 0..600 {
        if second_log.count("spool held by another consumer") >= refused + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        second_log.count("partition taken"),
        0,
        "{}",
        second_log.text()
    );
    assert_eq!(usage_rows(&ch).await, (events, events));

    stop(first).await;
    events += traffic(&node, 30, "c", &mut ledger).await;
    second_log.wait_for("partition taken").await;
    wait_rollup(&ch, &ledger).await;
    assert_eq!(usage_rows(&ch).await, (events, events), "every event, once");
    terminate(second).await;
    assert_eq!(spool_left(&node.endpoint).await, 0, "the spool is empty");
}

/// A node's Spool service serving fixed entries (the node has no way to spool a bad one),
/// with the node's lease left out: one aggregator reads it.
#[derive(Default)]
struct FixedSpool {
    entries: Mutex<BTreeMap<u64, HashMap<String, String>>>,
    acks: Mutex<Vec<u64>>,
}

/// The service over a shared [`FixedSpool`].
struct FixedSpoolService(Arc<FixedSpool>);

#[tonic::async_trait]
impl pb::spool_server::Spool for FixedSpoolService {
    async fn read(
        &self,
        req: Request<pb::ReadSpoolRequest>,
    ) -> Result<Response<pb::ReadSpoolResponse>, Status> {
        let r = req.into_inner();
        let max = if r.max == 0 { 1000 } else { r.max as usize };
        let entries = self
            .0
            .entries
            .lock()
            .unwrap()
            .range(r.after + 1..)
            .take(max)
            .map(|(seq, fields)| pb::SpoolEntry {
                seq: *seq,
                fields: fields.clone(),
            })
            .collect();
        Ok(Response::new(pb::ReadSpoolResponse { entries }))
    }

    async fn ack(
        &self,
        req: Request<pb::AckSpoolRequest>,
    ) -> Result<Response<pb::AckSpoolResponse>, Status> {
        let upto = req.into_inner().upto;
        self.0.acks.lock().unwrap().push(upto);
        self.0.entries.lock().unwrap().retain(|seq, _| *seq > upto);
        Ok(Response::new(pb::AckSpoolResponse {}))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_entries_are_dead_lettered_and_the_rest_flows() {
    let ch = ClickHouseServer::start().await;
    // Real entries, from a node's spool.
    let node = node().await;
    let mut ledger = Totals::new();
    let events = traffic(&node, 40, "a", &mut ledger).await;
    let real = pb::spool_client::SpoolClient::connect(node.endpoint.clone())
        .await
        .unwrap()
        .read(pb::ReadSpoolRequest {
            after: 0,
            max: 10_000,
            consumer: "copier".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(real.len() as u64, events);
    // Served with gaps in the sequence numbers, and two bad entries in the middle: one
    // that does not parse, one that ClickHouse refuses (a column added below throws for
    // its event id).
    let spool = Arc::new(FixedSpool::default());
    {
        let mut entries = spool.entries.lock().unwrap();
        let mut seq = 0;
        for (i, e) in real.iter().enumerate() {
            seq += 1 + (i as u64 % 3);
            entries.insert(seq, e.fields.clone());
            if i == 30 {
                let mut bad = e.fields.clone();
                bad.insert("a".into(), "lots".into());
                seq += 1;
                entries.insert(seq, bad);
            }
            if i == 55 {
                let mut poison = e.fields.clone();
                poison.insert("i".into(), "poison-1".into());
                seq += 1;
                entries.insert(seq, poison);
            }
        }
    }
    let last = *spool.entries.lock().unwrap().keys().last().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::spool_server::SpoolServer::new(FixedSpoolService(
                spool.clone(),
            )))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // The schema first, to add the poison column.
    let mut opts = aggregator::AggregateOptions::spool(&ch.url, &[]);
    opts.database = "allot".into();
    let cfg = opts.clickhouse();
    aggregator::sink::ClickHouse::create_database(&cfg)
        .await
        .unwrap();
    aggregator::schema::migrate(&aggregator::sink::ClickHouse::new(&cfg))
        .await
        .unwrap();
    ch.client("allot")
        .query("ALTER TABLE usage_events ADD COLUMN poison UInt8 DEFAULT throwIf(event_id = 'poison-1')")
        .execute()
        .await
        .unwrap();

    let (agg, log) = aggregate(&ch, &format!("http://{addr}"), "dl", &[]);
    wait_rollup(&ch, &ledger).await;
    assert_eq!(
        usage_rows(&ch).await,
        (events, events),
        "every good event, once"
    );
    for _ in 0..600 {
        if spool.acks.lock().unwrap().last() == Some(&last) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(agg).await;
    assert!(spool.entries.lock().unwrap().is_empty(), "all acknowledged");
    let acks = spool.acks.lock().unwrap().clone();
    assert!(
        acks.windows(2).all(|w| w[0] < w[1]),
        "acks in order: {acks:?}"
    );
    assert_eq!(
        log.count("entry moved to the dead letters"),
        2,
        "{}",
        log.text()
    );
    let dead: Vec<(String, String, String)> = ch
        .client("allot")
        .query("SELECT src, fields, error FROM dead_letters FINAL ORDER BY src_offset")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].0, format!("spool:{addr}"));
    assert!(dead[0].1.contains(r#""a":"lots""#), "{}", dead[0].1);
    assert!(
        dead[0].2.contains("field a"),
        "the field at fault: {}",
        dead[0].2
    );
    assert!(dead[1].1.contains("poison-1"), "{}", dead[1].1);
    assert!(!dead[1].2.is_empty(), "clickhouse's reason");
}
