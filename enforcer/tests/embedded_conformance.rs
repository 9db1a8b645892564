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
