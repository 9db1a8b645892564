//! The embedded store passes the storage conformance suite, and keeps what it
//! acknowledged across a reopen.

use enforcer::embedded::EmbeddedStore;
use meter::store::{ControlStore, ReserveOp, SlotSpec, UsageStore};

#[tokio::test]
async fn embedded_store_conforms() {
    let dirs = std::sync::Mutex::new(Vec::new());
    meter::conformance::run_all(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        dirs.lock().unwrap().push(dir);
        async move { store }
    })
    .await;
}

#[tokio::test]
async fn acknowledged_state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let now = chrono::Utc::now();
    {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let op = ReserveOp {
            tenant: "acme".into(),
            metric: "api_calls".into(),
            amount: 4,
            reservation_id: "r1".into(),
            idempotency_key: "k1".into(),
            slots: vec![SlotSpec {
                key: "m".into(),
                cap: Some(10),
                ends_at: None,
            }],
            expires_at: now + chrono::Duration::seconds(60),
            at: now,
            context: String::new(),
        };
        assert!(s.reserve(op).await.unwrap().granted);
        s.commit("acme", "r1", 3, now).await.unwrap();
    }
    let s = EmbeddedStore::open(dir.path()).unwrap();
    let u = s.usage("acme", &["m".into()]).await.unwrap()[0];
    assert_eq!((u.used, u.reserved), (3, 0));
    assert!(s.commit("acme", "r1", 3, now).await.unwrap().replayed);
    assert_eq!(s.catalog().await.unwrap(), None);
}

#[tokio::test]
async fn every_change_spools_its_event_in_the_same_write_and_acks_forget_them() {
    use meter::event::{EventKind, Spooled};
    use meter::store::RecordOp;
    let dir = tempfile::tempdir().unwrap();
    let now = chrono::Utc::now();
    let slot = |cap| SlotSpec {
        key: "m".into(),
        cap: Some(cap),
        ends_at: None,
    };
    let kinds = |rows: &[(u64, Vec<(String, String)>)]| -> Vec<(EventKind, String, i64, bool)> {
        rows.iter()
            .map(|(_, f)| {
                let e =
                    Spooled::from_fields(f.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
                (e.kind, e.id, e.amount, e.granted)
            })
            .collect()
    };
    {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        let reserve = |id: &str, amount| ReserveOp {
            tenant: "acme".into(),
            metric: "calls".into(),
            amount,
            reservation_id: id.into(),
            idempotency_key: id.into(),
            slots: vec![slot(10)],
            expires_at: now + chrono::Duration::seconds(60),
            at: now,
            context: "ctx".into(),
        };
        assert!(s.reserve(reserve("r1", 4)).await.unwrap().granted);
        assert!(!s.reserve(reserve("r2", 40)).await.unwrap().granted);
        s.commit("acme", "r1", 3, now).await.unwrap();
        // A replay writes nothing more.
        s.commit("acme", "r1", 3, now).await.unwrap();
        let rec = RecordOp {
            tenant: "acme".into(),
            metric: "calls".into(),
            amount: 2,
            event_id: "e1".into(),
            slots: vec![slot(10)],
            at: now,
            context: "ctx".into(),
        };
        assert!(s.record(rec.clone()).await.unwrap().granted);
        assert!(s.record(rec).await.unwrap().replayed);
        let rows = s.spool_read(0, 100).unwrap();
        assert_eq!(
            kinds(&rows),
            vec![
                (EventKind::Denial, "r2/denied".into(), 40, false),
                (EventKind::Commit, "r1/commit".into(), 3, true),
                (EventKind::Record, "e1".into(), 2, true),
            ]
        );
        // Sequence numbers grow; reading after one skips it.
        assert!(rows.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(s.spool_read(rows[0].0, 100).unwrap().len(), 2);
        s.spool_ack(rows[0].0).await.unwrap();
        assert_eq!(s.spool_read(0, 100).unwrap().len(), 2);
    }
    // Unacknowledged events survive a reopen, and numbering goes on after them.
    let s = EmbeddedStore::open(dir.path()).unwrap();
    let left = s.spool_read(0, 100).unwrap();
    assert_eq!(left.len(), 2);
    s.release("acme", "r1", now).await.ok();
    let r = ReserveOp {
        tenant: "acme".into(),
        metric: "calls".into(),
        amount: 1,
        reservation_id: "r3".into(),
        idempotency_key: "r3".into(),
        slots: vec![slot(10)],
        expires_at: now,
        at: now,
        context: "ctx".into(),
    };
    assert!(s.reserve(r).await.unwrap().granted);
    s.expire_due(now + chrono::Duration::seconds(1), 10)
        .await
        .unwrap();
    let all = s.spool_read(0, 100).unwrap();
    assert_eq!(all.len(), 3);
    assert!(all[2].0 > left[1].0);
    assert_eq!(
        kinds(&all[2..]),
        vec![(EventKind::Expire, "r3/expire".into(), 1, true)]
    );
}
