//! What the processes of a run used over a window: CPU time per process (from
//! `/proc/PID/stat`, every thread), the whole machine's busy CPU time (`/proc/stat`, so
//! that other work on the machine shows), and ClickHouse's own counters of inserts and
//! merges (`system.events`). On a machine whose cores are shared by the load generator
//! and every server, this says where the CPU went and what ClickHouse did with it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

/// Takes [`Sample`]s of a set of processes and of one ClickHouse server.
pub struct Meter {
    pids: Vec<(&'static str, Option<u32>)>,
    ticks_per_sec: f64,
    clickhouse: Option<SocketAddr>,
}

/// What had been used at one instant.
pub struct Sample {
    at: Instant,
    /// CPU seconds per process.
    cpu: BTreeMap<String, f64>,
    /// ClickHouse's counters (empty when they could not be read).
    counters: BTreeMap<String, u64>,
}

/// What was used between two samples.
#[derive(Debug, Default)]
pub struct Usage {
    /// CPU seconds per second (cores) of each process, and of the whole machine
    /// ([`MACHINE`]).
    pub cpu_cores: BTreeMap<String, f64>,
    /// ClickHouse's inserts and merges.
    pub inserts: InsertRates,
}

/// ClickHouse's inserts over a window (none where a count is zero or unknown).
#[derive(Debug, Default, PartialEq)]
pub struct InsertRates {
    /// INSERT queries per second.
    pub per_sec: Option<f64>,
    /// Rows per INSERT, on average.
    pub rows_per_insert: Option<f64>,
    /// Rows rewritten by background merges per row inserted.
    pub merged_per_inserted: Option<f64>,
}

impl Meter {
    /// A meter of the processes `pids` (by name; `None`: not running; several processes
    /// under one name are added up) and of the ClickHouse server at `clickhouse` (HTTP),
    /// if any.
    pub fn new(pids: Vec<(&'static str, Option<u32>)>, clickhouse: Option<SocketAddr>) -> Meter {
        Meter {
            pids,
            ticks_per_sec: ticks_per_sec(),
            clickhouse,
        }
    }

    /// What has been used so far.
    pub async fn sample(&self) -> Sample {
        let mut cpu = cpu_seconds(&self.pids, self.ticks_per_sec);
        if let Some(busy) = machine_busy_seconds(self.ticks_per_sec) {
            cpu.insert(MACHINE.to_owned(), busy);
        }
        Sample {
            at: Instant::now(),
            cpu,
            counters: match self.clickhouse {
                Some(addr) => server_counters(addr).await.unwrap_or_default(),
                None => BTreeMap::new(),
            },
        }
    }
}

impl Sample {
    /// What was used from this sample to `later`.
    pub fn until(&self, later: &Sample) -> Usage {
        let secs = later.at.saturating_duration_since(self.at).as_secs_f64();
        Usage {
            cpu_cores: cores(&self.cpu, &later.cpu, secs),
            inserts: insert_rates(&self.counters, &later.counters, secs),
        }
    }
}

/// CPU time used so far by each of `pids`, in seconds, added up by name (those `/proc`
/// cannot tell are left out).
fn cpu_seconds(pids: &[(&'static str, Option<u32>)], ticks_per_sec: f64) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (name, pid) in pids {
        let Some(pid) = pid else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(ticks) = cpu_ticks(&stat) {
            *out.entry((*name).to_owned()).or_insert(0.0) += ticks as f64 / ticks_per_sec;
        }
    }
    out
}

/// utime + stime (clock ticks, every thread) of a `/proc/PID/stat` line. The command
/// name, in parentheses, may hold spaces: fields are counted after its closing one.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the line, utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second of `/proc` times (`getconf CLK_TCK`; 100, Linux's, when it
/// cannot be asked).
fn ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|t: &f64| *t > 0.0)
        .unwrap_or(100.0)
}

/// The name under which [`Usage::cpu_cores`] gives the whole machine's busy cores.
pub const MACHINE: &str = "machine";

/// Busy CPU time of the whole machine so far, in seconds: the first line of `/proc/stat`
/// (clock ticks per state) less idle and iowait.
fn machine_busy_seconds(ticks_per_sec: f64) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    busy_ticks(stat.lines().next()?).map(|t| t as f64 / ticks_per_sec)
}

/// Busy ticks of a `cpu  user nice system idle iowait irq softirq steal …` line.
fn busy_ticks(line: &str) -> Option<u64> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = ticks.iter().take(8).sum();
    Some(total - ticks.get(3)? - ticks.get(4).unwrap_or(&0))
}

/// Cores used by each process between two samples `secs` apart (two decimals).
fn cores(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    secs: f64,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter_map(|(name, a)| {
            let b = before.get(name)?;
            Some((
                name.clone(),
                ((a - b) / secs.max(1e-9) * 100.0).round() / 100.0,
            ))
        })
        .collect()
}

/// ClickHouse's own counters of inserts and merges (`system.events`), by name.
async fn server_counters(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, u64>> {
    let text = crate::clickhouse::query(
        addr,
        "SELECT event, value FROM system.events \
         WHERE event IN ('InsertQuery', 'InsertedRows', 'MergedRows') FORMAT TabSeparated",
    )
    .await?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('\t')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect())
}

/// Inserts per second, rows per insert and merged rows per inserted row between two
/// samples of [`server_counters`] `secs` apart (nothing when a sample failed: it is
/// empty). The server lists only counters that have moved, so one missing from the first
/// sample was zero.
fn insert_rates(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    secs: f64,
) -> InsertRates {
    if before.is_empty() || after.is_empty() {
        return InsertRates::default();
    }
    let delta = |k: &str| {
        Some(after.get(k)?.saturating_sub(*before.get(k).unwrap_or(&0)) as f64).filter(|d| *d > 0.0)
    };
    let (inserts, rows) = (delta("InsertQuery"), delta("InsertedRows"));
    InsertRates {
        per_sec: inserts.map(|i| i / secs.max(1e-9)),
        rows_per_insert: inserts.zip(rows).map(|(i, r)| r / i),
        merged_per_inserted: rows.zip(delta("MergedRows")).map(|(r, m)| m / r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_busy_time() {
        // user 100, nice 5, system 50, idle 800, iowait 40, irq 1, softirq 2, steal 2,
        // guest 30 (already in user), guest_nice 0.
        let line = "cpu  100 5 50 800 40 1 2 2 30 0";
        assert_eq!(busy_ticks(line), Some(160));
        assert_eq!(busy_ticks("cpu0 100 5 50 800 40 1 2 2 0 0"), None);
        assert_eq!(busy_ticks("cpu  100 x"), None);
    }

    #[test]
    fn proc_stat_times() {
        // A command name with spaces and parentheses; utime 1500, stime 250.
        let stat = "4242 (clickhouse (x) y) S 1 4242 4242 0 -1 4194560 9 0 0 0 1500 250 0 0 \
                    20 0 40 0 100 200 300";
        assert_eq!(cpu_ticks(stat), Some(1750));
        assert_eq!(cpu_ticks("4242 (short) S 1 2"), None);
        let before = BTreeMap::from([("node".to_owned(), 1.0), ("redis".to_owned(), 2.0)]);
        let after = BTreeMap::from([("node".to_owned(), 2.5), ("bench".to_owned(), 9.0)]);
        // Over 2 s: the node used 0.75 of a core; a process not in both is left out.
        assert_eq!(
            cores(&before, &after, 2.0),
            BTreeMap::from([("node".to_owned(), 0.75)])
        );
    }

    #[test]
    fn insert_counters() {
        let c = |i: u64, r: u64, m: u64| {
            BTreeMap::from([
                ("InsertQuery".to_owned(), i),
                ("InsertedRows".to_owned(), r),
                ("MergedRows".to_owned(), m),
            ])
        };
        // 128 inserts of 6,400 rows over 2 s, 32,000 rows merged.
        assert_eq!(
            insert_rates(&c(10, 1_000, 0), &c(138, 7_400, 32_000), 2.0),
            InsertRates {
                per_sec: Some(64.0),
                rows_per_insert: Some(50.0),
                merged_per_inserted: Some(5.0)
            }
        );
        // No insert in the window: nothing to say per insert.
        assert_eq!(
            insert_rates(&c(10, 1_000, 5), &c(10, 1_000, 5), 2.0),
            InsertRates::default()
        );
        // A failed first sample is not a server that counted from zero.
        assert_eq!(
            insert_rates(&BTreeMap::new(), &c(138, 7_400, 32_000), 1.0),
            InsertRates::default()
        );
        // No merge before the window: MergedRows is not listed yet.
        let before = BTreeMap::from([
            ("InsertQuery".to_owned(), 10),
            ("InsertedRows".to_owned(), 1_000),
        ]);
        assert_eq!(
            insert_rates(&before, &c(138, 7_400, 32_000), 2.0),
            InsertRates {
                per_sec: Some(64.0),
                rows_per_insert: Some(50.0),
                merged_per_inserted: Some(5.0)
            }
        );
    }
}
