//! Recorded Stripe deliveries (tests/fixtures/stripe/) through the adapter and the
//! provider fold, as a webhook endpoint would run them: valid, bad signature, expired
//! timestamp, duplicate, out of order (updated before created, canceled before paid),
//! unknown type. Each ends in the state the adapter's docs promise, and the outcome says
//! why.
//!
//! The story of `acme` (subscription sub_1QhAcmePro0001), in Stripe's order: created
//! incomplete on 2026-01-01 with pro@1 and two extra_seats_10; first invoice paid; active.
//! A month later a renewal fails (past_due), collection gives up two weeks later (unpaid),
//! the invoice is paid 25 days in; an upgrade to enterprise (mapped by product); the first
//! charge is refunded in full, the second partly and then disputed; deleted on day 90.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use enforcer::webhook::stripe::{
    sign, IgnoreReason, Ignored, Parsed, SignatureError, StripeAdapter, StripeConfig, Unlinked,
    WebhookError,
};
use meter::lifecycle::{Status, Subscription};
use meter::provider::{NoEffect, Outcome, Rejection, SyncState, Verdict};
use meter::status_machine::{Cause, StatusMachine, Why};

const SECRET: &str = "whsec_test_allot_0123456789";

const CONFIG: &str = r#"
signing_secret = "whsec_test_allot_0123456789"
[prices]
price_1QhProMonthly = { plan = "pro", version = 1 }
price_1QhSeats10 = { addon = "extra_seats_10" }
[products]
prod_QhEnterprise = { plan = "enterprise", version = 1 }
"#;

const ACME: &str = "sub_1QhAcmePro0001";

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/stripe/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The event's `created`, which Stripe also signs deliveries with when it first sends.
fn created(payload: &[u8]) -> i64 {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    v["created"].as_i64().unwrap()
}

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap()
}

/// What a delivery came to.
#[derive(Debug)]
enum Delivery {
    Applied(Box<Outcome>),
    Ignored(Ignored),
    /// A refund or dispute whose payment is not known yet: the endpoint answers non-2xx
    /// and Stripe redelivers later.
    Unlinked(Unlinked),
}

impl Delivery {
    fn outcome(self) -> Outcome {
        match self {
            Delivery::Applied(o) => *o,
            d => panic!("expected an applied event, got {d:?}"),
        }
    }
}

/// A webhook endpoint without HTTP: the adapter, the machine, one sync state per Stripe
/// subscription and the payment links learned from invoices.
struct Endpoint {
    adapter: StripeAdapter,
    machine: StatusMachine,
    states: BTreeMap<String, SyncState>,
    links: BTreeMap<String, String>,
}

impl Endpoint {
    fn new() -> Self {
        let catalog = meter::catalog::parse(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../examples/catalog.yaml"
            ))
            .unwrap(),
            "examples/catalog.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let config: StripeConfig = toml::from_str(CONFIG).unwrap();
        Endpoint {
            adapter: StripeAdapter::new(&config, &catalog).unwrap(),
            machine: StatusMachine::default(),
            states: BTreeMap::new(),
            links: BTreeMap::new(),
        }
    }

    /// Delivers a fixture as Stripe does: signed at the event's creation, received two
    /// seconds later.
    fn deliver(&mut self, name: &str) -> Result<Delivery, WebhookError> {
        let payload = fixture(name);
        let t = created(&payload);
        self.deliver_bytes(&payload, &sign(&payload, SECRET.as_bytes(), t), at(t + 2))
    }

    fn deliver_bytes(
        &mut self,
        payload: &[u8],
        header: &str,
        now: DateTime<Utc>,
    ) -> Result<Delivery, WebhookError> {
        let event = match self.adapter.receive(header, payload, now)? {
            Parsed::Ignored(i) => return Ok(Delivery::Ignored(i)),
            Parsed::Event(r) => {
                for id in r.links {
                    self.links.insert(id, r.event.object_id.clone());
                }
                r.event
            }
            Parsed::NeedsSubscription(u) => {
                match u.payments.iter().find_map(|p| self.links.get(p)).cloned() {
                    Some(sub) => u.link(sub),
                    None => return Ok(Delivery::Unlinked(u)),
                }
            }
        };
        let state = self
            .states
            .entry(event.object_id.clone())
            .or_insert_with(|| SyncState::new(event.object_id.clone()));
        let outcome = state.apply(&self.machine, event).unwrap();
        Ok(Delivery::Applied(Box::new(outcome)))
    }

    fn deliver_all(&mut self, names: &[&str]) -> Vec<Outcome> {
        names
            .iter()
            .map(|n| {
                self.deliver(n)
                    .unwrap_or_else(|e| panic!("{n}: {e}"))
                    .outcome()
            })
            .collect()
    }

    fn acme(&self) -> &Subscription {
        self.states[ACME].subscription().unwrap()
    }
}

fn steps(o: &Outcome) -> Vec<(Status, Status)> {
    match &o.verdict {
        Verdict::Applied { steps } => steps.iter().map(|s| (s.from, s.to)).collect(),
        v => panic!("expected applied, got {v:?}"),
    }
}

#[test]
fn valid_deliveries_make_an_active_subscription_with_mapped_items() {
    let mut ep = Endpoint::new();
    let o = ep.deliver_all(&[
        "subscription_created",
        "invoice_paid",
        "subscription_updated_active",
    ]);

    assert!(o[0].before.is_none() && o[0].after.as_ref().unwrap().status == Status::Pending);
    assert_eq!(steps(&o[1]), vec![(Status::Pending, Status::Active)]);
    assert_eq!(
        o[2].verdict,
        Verdict::NoEffect {
            why: NoEffect::Unchanged
        }
    );

    let sub = ep.acme();
    assert_eq!((sub.tenant.as_str(), sub.status), ("acme", Status::Active));
    assert_eq!(sub.plan.to_string(), "pro@1");
    let addons: Vec<_> = sub
        .addons
        .iter()
        .map(|a| (a.code.as_str(), a.quantity))
        .collect();
    assert_eq!(addons, vec![("extra_seats_10", 2)]);
    assert_eq!(sub.status_since, at(1_767_225_605), "since the payment");
    assert_eq!(
        ep.links.get("ch_1QhAcme0001").map(String::as_str),
        Some(ACME)
    );
}

#[test]
fn the_whole_story_ends_in_chargeback_and_every_outcome_says_why() {
    let mut ep = Endpoint::new();
    ep.deliver_all(&[
        "subscription_created",
        "invoice_paid",
        "subscription_updated_active",
    ]);

    let failed = ep.deliver("invoice_payment_failed").unwrap().outcome();
    assert_eq!(steps(&failed), vec![(Status::Active, Status::PastDue)]);
    let past_due = ep
        .deliver("subscription_updated_past_due")
        .unwrap()
        .outcome();
    assert_eq!(
        past_due.verdict,
        Verdict::NoEffect {
            why: NoEffect::Unchanged
        }
    );
    let unpaid = ep.deliver("subscription_updated_unpaid").unwrap().outcome();
    assert_eq!(steps(&unpaid), vec![(Status::PastDue, Status::Grace)]);

    // Paid ten days into grace (seven by default): suspended on day 7, active again now.
    let paid = ep.deliver("invoice_paid_late").unwrap().outcome();
    let Verdict::Applied { steps: s } = &paid.verdict else {
        panic!("{paid:?}")
    };
    assert_eq!(
        s.iter()
            .map(|s| (s.cause, s.from, s.to))
            .collect::<Vec<_>>(),
        vec![
            (Cause::GraceEnd, Status::Grace, Status::Suspended),
            (Cause::Requested, Status::Suspended, Status::Active)
        ]
    );
    assert_eq!(
        s[0].at - unpaid.after.unwrap().status_since,
        Duration::days(7)
    );

    let upgrade = ep
        .deliver("subscription_updated_enterprise")
        .unwrap()
        .outcome();
    assert_eq!(
        ep.acme().plan.to_string(),
        "enterprise@1",
        "mapped by product"
    );
    assert!(ep.acme().addons.is_empty());
    assert!(upgrade.changed());

    let refund = ep.deliver("charge_refunded").unwrap().outcome();
    assert_eq!(steps(&refund), vec![(Status::Active, Status::Refunded)]);

    match ep.deliver("charge_refunded_partial").unwrap() {
        Delivery::Ignored(i) => {
            assert_eq!(
                i.reason,
                IgnoreReason::PartialRefund {
                    amount: 6900,
                    refunded: 1000
                }
            );
            assert_eq!(i.reason.to_string(), "partial refund: 1000 of 6900");
        }
        d => panic!("{d:?}"),
    }

    let dispute = ep.deliver("charge_dispute_created").unwrap().outcome();
    assert_eq!(
        steps(&dispute),
        vec![(Status::Refunded, Status::Chargeback)]
    );

    // Stripe ends the subscription; a chargeback is more serious than a cancellation.
    let deleted = ep.deliver("subscription_deleted").unwrap().outcome();
    let Verdict::Rejected {
        why: Rejection::Illegal(e),
    } = &deleted.verdict
    else {
        panic!("{deleted:?}")
    };
    assert_eq!(
        (e.from, e.to, e.why.clone()),
        (Status::Chargeback, Status::Canceled, Why::Unreachable)
    );
    assert!(
        e.to_string()
            .contains("an ended subscription does not come back or become less serious"),
        "{e}"
    );
    assert!(!deleted.changed());
    assert_eq!(ep.acme().status, Status::Chargeback);
    assert_eq!(ep.states[ACME].history().len(), 11);
}

#[test]
fn a_bad_signature_is_refused_and_nothing_is_applied() {
    let mut ep = Endpoint::new();
    ep.deliver("subscription_created").unwrap();
    let before = ep.states.clone();

    let payload = fixture("invoice_paid");
    let t = created(&payload);
    let forged = sign(&payload, b"whsec_someone_else", t);
    let e = ep.deliver_bytes(&payload, &forged, at(t + 2)).unwrap_err();
    assert_eq!(e, WebhookError::Signature(SignatureError::Mismatch));
    assert!(
        e.to_string()
            .starts_with("Stripe-Signature: no v1 signature matches"),
        "{e}"
    );

    // The right signature over a body changed in transit.
    let good = sign(&payload, SECRET.as_bytes(), t);
    let tampered = String::from_utf8(payload.clone())
        .unwrap()
        .replace("6900", "1");
    let e = ep
        .deliver_bytes(tampered.as_bytes(), &good, at(t + 2))
        .unwrap_err();
    assert_eq!(e, WebhookError::Signature(SignatureError::Mismatch));

    let e = ep.deliver_bytes(&payload, "", at(t + 2)).unwrap_err();
    assert!(
        matches!(e, WebhookError::Signature(SignatureError::Malformed { .. })),
        "{e}"
    );
    assert_eq!(ep.states, before);
    assert_eq!(ep.acme().status, Status::Pending);
}

#[test]
fn an_expired_or_future_timestamp_is_refused_and_nothing_is_applied() {
    let mut ep = Endpoint::new();
    ep.deliver("subscription_created").unwrap();
    let before = ep.states.clone();
    let payload = fixture("invoice_paid");
    let t = created(&payload);
    let header = sign(&payload, SECRET.as_bytes(), t);

    // A replay six minutes later, and a receiver whose clock is six minutes behind.
    for now in [at(t + 301), at(t - 301)] {
        let e = ep.deliver_bytes(&payload, &header, now).unwrap_err();
        match &e {
            WebhookError::Signature(SignatureError::OutsideTolerance {
                skew_secs,
                tolerance_secs,
                ..
            }) => {
                assert_eq!((*skew_secs, *tolerance_secs), (301, 300));
            }
            e => panic!("{e}"),
        }
        assert!(e.to_string().contains("at most 300 s either way"), "{e}");
    }
    assert_eq!(ep.states, before);

    // At the edge of the window it is accepted.
    let o = ep
        .deliver_bytes(&payload, &header, at(t + 300))
        .unwrap()
        .outcome();
    assert_eq!(steps(&o), vec![(Status::Pending, Status::Active)]);
}

#[test]
fn a_duplicate_delivery_changes_nothing() {
    let mut ep = Endpoint::new();
    ep.deliver_all(&["subscription_created", "invoice_paid"]);
    let before = ep.states.clone();
    // Stripe redelivers the same event with a fresh signature.
    let payload = fixture("invoice_paid");
    let t = created(&payload) + 3600;
    let o = ep
        .deliver_bytes(&payload, &sign(&payload, SECRET.as_bytes(), t), at(t))
        .unwrap()
        .outcome();
    assert_eq!(o.verdict, Verdict::Duplicate { differs: false });
    assert!(!o.changed());
    assert_eq!(ep.states, before);
}

#[test]
fn updated_before_created_ends_as_in_order() {
    let mut in_order = Endpoint::new();
    in_order.deliver_all(&[
        "subscription_created",
        "invoice_paid",
        "subscription_updated_active",
    ]);

    let mut ep = Endpoint::new();
    let first = ep.deliver("subscription_updated_active").unwrap().outcome();
    assert_eq!(first.after.as_ref().unwrap().status, Status::Active);
    let created = ep.deliver("subscription_created").unwrap().outcome();
    assert!(created.late);
    let paid = ep.deliver("invoice_paid").unwrap().outcome();
    assert!(paid.late);
    // The payment now reads as what made it active; the update found it so.
    assert_eq!(steps(&paid), vec![(Status::Pending, Status::Active)]);
    assert_eq!(
        ep.states[ACME].history()[2].verdict,
        Verdict::NoEffect {
            why: NoEffect::Unchanged
        }
    );

    assert_eq!(ep.states, in_order.states);
    assert_eq!(ep.acme().status, Status::Active);
}

#[test]
fn canceled_before_paid_stays_canceled() {
    let before_cancel = [
        "subscription_created",
        "invoice_paid",
        "subscription_updated_active",
        "invoice_payment_failed",
        "subscription_updated_past_due",
        "subscription_updated_unpaid",
    ];
    let mut in_order = Endpoint::new();
    in_order.deliver_all(&before_cancel);
    in_order.deliver_all(&[
        "invoice_paid_late",
        "subscription_updated_enterprise",
        "subscription_deleted",
    ]);

    let mut ep = Endpoint::new();
    ep.deliver_all(&before_cancel);
    let deleted = ep.deliver("subscription_deleted").unwrap().outcome();
    assert_eq!(deleted.after.as_ref().unwrap().status, Status::Canceled);
    let paid = ep.deliver("invoice_paid_late").unwrap().outcome();
    // In its place the payment reactivated the subscription; the deletion, later, still
    // ends it. The subscription is as it was, and the outcome says so.
    assert!(paid.late);
    assert!(
        matches!(paid.verdict, Verdict::Stale { ref newest } if newest.id == "evt_1QhDeleted00001"),
        "{paid:?}"
    );
    assert_eq!(
        paid.revised.len(),
        1,
        "the deletion now ends an active subscription"
    );
    assert_eq!(ep.acme().status, Status::Canceled);
    ep.deliver("subscription_updated_enterprise").unwrap();

    assert_eq!(ep.states, in_order.states);
    assert_eq!(ep.acme().cancel_at, Some(at(1_767_225_600 + 90 * 86_400)));
}

#[test]
fn unknown_types_and_one_off_payments_are_acknowledged_and_ignored() {
    let mut ep = Endpoint::new();
    match ep.deliver("customer_created").unwrap() {
        Delivery::Ignored(i) => {
            assert_eq!(
                (i.event_type.as_str(), i.reason.clone()),
                ("customer.created", IgnoreReason::UnhandledType)
            );
            assert_eq!(i.event_id, "evt_1QhCustomer0001");
        }
        d => panic!("{d:?}"),
    }
    match ep.deliver("invoice_paid_one_off").unwrap() {
        Delivery::Ignored(i) => assert_eq!(i.reason, IgnoreReason::NotForSubscription),
        d => panic!("{d:?}"),
    }
    assert!(ep.states.is_empty());
}

#[test]
fn a_refund_before_its_invoice_waits_for_redelivery() {
    let mut ep = Endpoint::new();
    ep.deliver("subscription_created").unwrap();
    match ep.deliver("charge_refunded").unwrap() {
        Delivery::Unlinked(u) => {
            assert_eq!(
                u.payments,
                vec!["in_1QhAcme0001", "ch_1QhAcme0001", "pi_1QhAcme0001"]
            );
        }
        d => panic!("{d:?}"),
    }
    assert_eq!(ep.acme().status, Status::Pending, "nothing applied");
    ep.deliver("invoice_paid").unwrap();
    let o = ep.deliver("charge_refunded").unwrap().outcome();
    assert_eq!(steps(&o), vec![(Status::Active, Status::Refunded)]);
}

#[test]
fn a_trial_reminder_creates_a_trialing_subscription_with_its_end() {
    let mut ep = Endpoint::new();
    let o = ep.deliver("subscription_trial_will_end").unwrap().outcome();
    let sub = o.after.unwrap();
    assert_eq!(
        (sub.tenant.as_str(), sub.status),
        ("globex", Status::Trialing)
    );
    assert_eq!(sub.trial_ends_at, Some(at(1_767_225_600 + 14 * 86_400)));
    assert_eq!(
        sub.post_trial_plan.map(|p| p.to_string()).as_deref(),
        Some("pro@1")
    );
    let state = &ep.states["sub_1QhGlobexTrial1"];
    assert_eq!(
        ep.machine
            .next_due(state.subscription().unwrap())
            .map(|d| (d.at, d.cause)),
        Some((at(1_767_225_600 + 14 * 86_400), Cause::TrialEnd))
    );
}

#[test]
fn payloads_that_do_not_map_name_the_field() {
    let mut ep = Endpoint::new();
    let text = String::from_utf8(fixture("subscription_created")).unwrap();
    let cases = [
        (
            text.replacen("price_1QhProMonthly", "price_unknown", 1).replacen("\"prod_QhPro\"", "\"prod_unknown\"", 1),
            "data.object.items.data[0].price: price price_unknown (product prod_unknown) is in neither prices nor products",
        ),
        (
            text.replace("\"tenant\": \"acme\"", "\"customer_ref\": \"acme\""),
            "data.object.metadata.tenant: missing",
        ),
        (
            text.replace("\"tenant\": \"acme\"", "\"tenant\": \"acme corp\""),
            "data.object.metadata.tenant: \"acme corp\" is not a tenant id: it contains the character ' '",
        ),
        (
            text.replace("\"status\": \"incomplete\"", "\"status\": \"frozen\""),
            "data.object.status: Stripe status \"frozen\"",
        ),
        (
            text.replace("\"billing_cycle_anchor\": 1767225600", "\"billing_cycle_anchor\": \"soon\""),
            "data.object.billing_cycle_anchor: invalid type",
        ),
        ("not json".to_string(), "payload: expected ident"),
    ];
    for (payload, want) in cases {
        let t = 1_767_225_600;
        let e = ep
            .deliver_bytes(
                payload.as_bytes(),
                &sign(payload.as_bytes(), SECRET.as_bytes(), t),
                at(t),
            )
            .unwrap_err();
        assert!(matches!(e, WebhookError::Parse(_)), "{e}");
        assert!(e.to_string().starts_with(want), "want {want:?}, got {e}");
    }
    assert!(ep.states.is_empty());
}
