//! Provider sync across a crash: a delivery whose sync state was stored but whose tenant
//! write was not (the node died between the two) is completed by whoever touches the
//! object next, once, without undoing what came after.

use std::sync::Arc;

use enforcer::embedded::EmbeddedStore;
use enforcer::engine::admin::Who;
use enforcer::engine::{Engine, SystemClock};
use enforcer::webhook::stripe::{Parsed, StripeAdapter, StripeConfig};
use enforcer::webhook::sync::{ObjectRecord, Owed, ProviderSync};
use meter::lifecycle::Status;
use meter::provider::ProviderEvent;
use meter::status_machine::StatusMachine;
use meter::store::ControlStore;

const CONFIG: &str = r#"
signing_secret = "whsec_test_allot_0123456789"
[prices]
price_1QhProMonthly = { plan = "pro", version = 1 }
price_1QhSeats10 = { addon = "extra_seats_10" }
"#;

fn event(adapter: &StripeAdapter, name: &str) -> ProviderEvent {
    let path = format!(
        "{}/tests/fixtures/stripe/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    match adapter.parse(&std::fs::read(&path).unwrap()).unwrap() {
        Parsed::Event(r) => r.event,
        p => panic!("{name}: {p:?}"),
    }
}

#[tokio::test]
async fn a_tenant_write_lost_in_a_crash_is_made_once_by_the_next_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let engine = Arc::new(
        Engine::new(
            store.clone(),
            store.clone(),
            Arc::new(SystemClock::default()),
            std::time::Duration::from_secs(30),
        )
        .await
        .unwrap(),
    );
    let catalog = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/catalog.yaml"
    ))
    .unwrap();
    engine
        .apply_catalog(&catalog, "catalog.yaml", false, &Who::admin("t", "setup"))
        .await
        .unwrap();
    let config: StripeConfig = toml::from_str(CONFIG).unwrap();
    let adapter = StripeAdapter::new(&config, &engine.catalog().unwrap().1).unwrap();
    let sync = ProviderSync::new(engine.clone(), "stripe");

    // The creation is applied normally.
    let created = event(&adapter, "subscription_created");
    let object = created.object_id.clone();
    sync.apply(created).await.unwrap();
    assert_eq!(
        store.subscription("acme").await.unwrap().unwrap().status,
        Status::Pending
    );

    // The payment: its sync state is stored with the write it owes, and the node dies
    // before making it (as `apply` does, stopped after its first write).
    let paid = event(&adapter, "invoice_paid");
    let (rev, mut record) = sync.record(&object).await.unwrap();
    let outcome = record
        .state
        .apply(&StatusMachine::default(), paid.clone())
        .unwrap();
    let mut after = store.subscription("acme").await.unwrap().unwrap();
    after.status = outcome.after.as_ref().unwrap().status;
    after.status_since = outcome.after.as_ref().unwrap().status_since;
    let entry = meter::ledger::LedgerEntry {
        id: format!("stripe:{}", paid.id),
        at: engine.now(),
        tenant: "acme".into(),
        source: meter::ledger::Source::Webhook,
        action: "stripe.applied".into(),
        actor: "stripe".into(),
        reason: "test".into(),
        correlation_id: paid.id.clone(),
        before: String::new(),
        after: String::new(),
        applied: true,
    };
    record.owed = Some(Owed {
        subscription: Some(after),
        entry,
    });
    let text = serde_json::to_string::<ObjectRecord>(&record).unwrap();
    assert!(store
        .put_provider_record("stripe", &object, rev, &text)
        .await
        .unwrap());
    assert_eq!(
        store.subscription("acme").await.unwrap().unwrap().status,
        Status::Pending,
        "the tenant write was lost"
    );

    // Stripe redelivers the payment (it was never answered): a duplicate for the sync
    // state, but the owed write is made first.
    let report = sync.apply(paid.clone()).await.unwrap();
    assert_eq!(report.verdict, "duplicate");
    assert_eq!(
        store.subscription("acme").await.unwrap().unwrap().status,
        Status::Active
    );
    let (_, record) = sync.record(&object).await.unwrap();
    assert!(record.owed.is_none());

    // The failure that follows applies over it, and a second replay of the owed write
    // (another node finishing the same record) changes nothing.
    let failed = event(&adapter, "invoice_payment_failed");
    sync.apply(failed).await.unwrap();
    assert_eq!(
        store.subscription("acme").await.unwrap().unwrap().status,
        Status::PastDue
    );
    let mut stale = store.subscription("acme").await.unwrap().unwrap();
    stale.status = Status::Active;
    let replay = store.ledger("acme", 100).await.unwrap();
    let owed_entry = replay
        .iter()
        .find(|e| e.correlation_id == paid.id && e.applied)
        .unwrap()
        .clone();
    store.save_subscription(&stale, &owed_entry).await.unwrap();
    assert_eq!(
        store.subscription("acme").await.unwrap().unwrap().status,
        Status::PastDue
    );
    let applied: Vec<String> = store
        .ledger("acme", 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.applied)
        .map(|e| e.correlation_id)
        .collect();
    assert_eq!(
        applied,
        [
            "evt_1QhCreated000001",
            "evt_1QhInvPaid000001",
            "evt_1QhInvFail000002"
        ]
    );
}
