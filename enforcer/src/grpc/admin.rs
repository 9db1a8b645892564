//! The `allot.v1.Admin` service: proto in, engine call, proto out.

use std::sync::Arc;

use allot_proto::v1 as pb;
use meter::grant::{Change, Override};
use meter::lifecycle::ChangeTiming;
use meter::window::Window;
use pb::admin_server::Admin;
use tonic::{Request, Response, Status};

use super::convert::{self, from_ts, ts};
use super::status::invalid;
use crate::engine::admin::{NewSubscription, SubscriptionChange, Who};
use crate::engine::Engine;
use crate::webhook::http::StripeEndpoint;

/// Largest Admin request or answer. gRPC's default of 4 MiB would cap a reconciliation,
/// whose file travels in one message (the comparison needs the provider's whole list), at
/// about a thousand Stripe subscriptions.
pub const MAX_MESSAGE: usize = 64 << 20;

/// The Admin service over an engine.
pub struct AdminService {
    engine: Arc<Engine>,
    /// The Stripe endpoint, for reconciliation.
    stripe: Option<Arc<StripeEndpoint>>,
}

impl AdminService {
    /// A service over `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        AdminService {
            engine,
            stripe: None,
        }
    }

    /// Reconciles with Stripe through `stripe`'s mapping and sync state.
    pub fn with_stripe(mut self, stripe: Option<Arc<StripeEndpoint>>) -> Self {
        self.stripe = stripe;
        self
    }
}

/// Metadata key of a caller's correlation id, recorded with its changes.
pub const CORRELATION_ID: &str = "x-correlation-id";

/// Who a request comes from, and why: the token's principal (the `actor` field, when it
/// names someone else, says on whose behalf), the `reason` field, and the correlation id.
fn who<T>(req: &Request<T>, fields: impl Fn(&T) -> (&String, &String)) -> Who {
    let (named, reason) = fields(req.get_ref());
    let actor = match req.extensions().get::<crate::auth::Principal>() {
        Some(p) if named.is_empty() || *named == p.0 => p.0.clone(),
        Some(p) => format!("{} (for {named})", p.0),
        None => named.clone(),
    };
    let mut w = Who::admin(&actor, reason);
    if let Some(id) = req
        .metadata()
        .get(CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
    {
        w.correlation_id = id.chars().take(256).collect();
    }
    w
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn version(v: u32) -> Option<u32> {
    (v != 0).then_some(v)
}

fn addons(items: Vec<pb::AddonItem>) -> Vec<(String, u32)> {
    items
        .into_iter()
        .map(|a| (a.code, a.quantity.max(1)))
        .collect()
}

fn window(field: &str, w: &str) -> Result<Window, Status> {
    w.parse::<Window>().map_err(|e| invalid(field, e))
}

fn amount(a: i64) -> Result<u64, Status> {
    u64::try_from(a).map_err(|_| invalid("amount", "must not be negative"))
}

fn change_of(r: &pb::GrantOverrideRequest) -> Result<Change, Status> {
    let need = |field: &str, v: &str| -> Result<String, Status> {
        if v.is_empty() {
            Err(invalid(field, format!("required for kind {}", r.kind)))
        } else {
            Ok(v.to_string())
        }
    };
    Ok(match r.kind.as_str() {
        "enable_feature" => Change::EnableFeature { feature: need("feature", &r.feature)? },
        "disable_feature" => Change::DisableFeature { feature: need("feature", &r.feature)? },
        "set_config" => Change::SetConfig {
            feature: need("feature", &r.feature)?,
            value: convert::from_value("value", r.value.clone())?,
        },
        "set_limit" => Change::SetLimit {
            metric: need("metric", &r.metric)?,
            window: window("window", &need("window", &r.window)?)?,
            amount: amount(r.amount)?,
        },
        "raise_limit" => Change::RaiseLimit {
            metric: need("metric", &r.metric)?,
            window: window("window", &need("window", &r.window)?)?,
            by: amount(r.amount)?,
        },
        "extra_units" => Change::ExtraUnits { metric: need("metric", &r.metric)?, amount: amount(r.amount)? },
        "" => return Err(invalid("kind", "required")),
        other => {
            return Err(invalid(
                "kind",
                format!("unknown kind {other:?}; one of enable_feature, disable_feature, set_config, set_limit, raise_limit, extra_units"),
            ))
        }
    })
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn apply_catalog(
        &self,
        req: Request<pb::ApplyCatalogRequest>,
    ) -> Result<Response<pb::ApplyCatalogResponse>, Status> {
        let who = who(&req, |r| (&r.actor, &r.reason));
        let r = req.into_inner();
        let out = self
            .engine
            .apply_catalog(&r.yaml, &r.source_name, r.dry_run, &who)
            .await?;
        if out.applied {
            tracing::info!(actor = %r.actor, "catalog applied through the Admin API");
        }
        Ok(Response::new(pb::ApplyCatalogResponse {
            changed: out.changed,
            plans: out.plans,
            applied: out.applied,
        }))
    }

    async fn get_catalog(
        &self,
        _req: Request<pb::GetCatalogRequest>,
    ) -> Result<Response<pb::GetCatalogResponse>, Status> {
        Ok(Response::new(pb::GetCatalogResponse {
            yaml: self.engine.catalog_yaml()?.unwrap_or_default(),
        }))
    }

    async fn put_subscription(
        &self,
        req: Request<pb::PutSubscriptionRequest>,
    ) -> Result<Response<pb::SubscriptionResponse>, Status> {
        let who = who(&req, |r| (&r.actor, &r.reason));
        let r = req.into_inner();
        if r.plan.is_empty() {
            return Err(invalid("plan", "required"));
        }
        let new = NewSubscription {
            tenant: r.tenant,
            plan: r.plan,
            version: version(r.plan_version),
            addons: addons(r.addons),
            status: non_empty(r.status),
            time_zone: non_empty(r.time_zone),
            billing_anchor: from_ts("billing_anchor", r.billing_anchor)?,
            trial_ends_at: from_ts("trial_ends_at", r.trial_ends_at)?,
            post_trial_plan: non_empty(r.post_trial_plan)
                .map(|p| (p, version(r.post_trial_plan_version))),
        };
        let sub = self.engine.put_subscription(new, &who).await?;
        tracing::info!(tenant = %sub.tenant, plan = %sub.plan, actor = %r.actor, "subscription put");
        Ok(Response::new(pb::SubscriptionResponse {
            subscription: Some(convert::subscription(&sub)),
        }))
    }

    async fn change_subscription(
        &self,
        req: Request<pb::ChangeSubscriptionRequest>,
    ) -> Result<Response<pb::SubscriptionResponse>, Status> {
        let who = who(&req, |r| (&r.actor, &r.reason));
        let r = req.into_inner();
        let timing = match pb::ChangeTiming::try_from(r.timing) {
            Ok(pb::ChangeTiming::Auto) => None,
            Ok(pb::ChangeTiming::Immediately) => Some(ChangeTiming::Immediately),
            Ok(pb::ChangeTiming::PeriodEnd) => Some(ChangeTiming::PeriodEnd),
            Err(_) => return Err(invalid("timing", format!("unknown value {}", r.timing))),
        };
        let change = SubscriptionChange {
            plan: non_empty(r.plan).map(|p| (p, version(r.plan_version))),
            timing,
            add_addons: addons(r.add_addons),
            remove_addons: r.remove_addons,
            status: non_empty(r.status),
        };
        let sub = self
            .engine
            .change_subscription(&r.tenant, change, &who)
            .await?;
        tracing::info!(tenant = %sub.tenant, plan = %sub.plan, actor = %r.actor, "subscription changed");
        Ok(Response::new(pb::SubscriptionResponse {
            subscription: Some(convert::subscription(&sub)),
        }))
    }

    async fn cancel_subscription(
        &self,
        req: Request<pb::CancelSubscriptionRequest>,
    ) -> Result<Response<pb::SubscriptionResponse>, Status> {
        let who = who(&req, |r| (&r.actor, &r.reason));
        let r = req.into_inner();
        let sub = self
            .engine
            .cancel_subscription(&r.tenant, r.at_period_end, &who)
            .await?;
        tracing::info!(tenant = %sub.tenant, at_period_end = r.at_period_end, actor = %r.actor, "subscription canceled");
        Ok(Response::new(pb::SubscriptionResponse {
            subscription: Some(convert::subscription(&sub)),
        }))
    }

    async fn grant_override(
        &self,
        req: Request<pb::GrantOverrideRequest>,
    ) -> Result<Response<pb::GrantOverrideResponse>, Status> {
        let who = who(&req, |r| (&r.actor, &r.reason));
        let r = req.into_inner();
        let now = self.engine.now();
        let change = change_of(&r)?;
        let valid_from = from_ts("valid_from", r.valid_from)?.unwrap_or(now);
        let duration = convert::from_duration("duration", r.duration)?;
        let valid_to = match (from_ts("valid_to", r.valid_to)?, duration) {
            (Some(_), Some(_)) => {
                return Err(invalid("duration", "give valid_to or duration, not both"))
            }
            (Some(t), None) => Some(t),
            (None, Some(d)) => Some(
                chrono::Duration::from_std(d)
                    .ok()
                    .and_then(|d| valid_from.checked_add_signed(d))
                    .ok_or_else(|| invalid("duration", "too long"))?,
            ),
            (None, None) => None,
        };
        let o = Override {
            id: non_empty(r.id).unwrap_or_else(|| format!("ovr-{}", uuid::Uuid::now_v7().simple())),
            tenant: r.tenant,
            change,
            valid_from,
            valid_to,
            actor: r.actor,
            reason: r.reason,
            created_at: now,
        };
        let o = self.engine.grant(o, &who).await?;
        Ok(Response::new(pb::GrantOverrideResponse {
            r#override: Some(convert::override_(&o, now)),
        }))
    }

    async fn revoke_override(
        &self,
        req: Request<pb::RevokeOverrideRequest>,
    ) -> Result<Response<pb::RevokeOverrideResponse>, Status> {
        let who = who(&req, |r| (&r.actor, &r.reason));
        let r = req.into_inner();
        let revoked = self.engine.revoke(&r.tenant, &r.id, &who).await?;
        Ok(Response::new(pb::RevokeOverrideResponse { revoked }))
    }

    async fn get_peers(
        &self,
        _req: Request<pb::GetPeersRequest>,
    ) -> Result<Response<pb::GetPeersResponse>, Status> {
        let peers = self
            .engine
            .peers()
            .map(|p| p.status())
            .unwrap_or_default()
            .into_iter()
            .map(|p| pb::PeerStatus {
                node: p.node,
                address: p.address,
                live: p.live,
                last_merge_age: p.last_merge_age.map(super::convert::duration),
                source: p.source.to_string(),
                error: p.error.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::GetPeersResponse {
            node: self.engine.node_id().to_string(),
            peers,
            slots: self.engine.soft().len() as u64,
            live_nodes: u32::try_from(self.engine.live_nodes()).unwrap_or(u32::MAX),
        }))
    }

    async fn get_tenant_history(
        &self,
        req: Request<pb::GetTenantHistoryRequest>,
    ) -> Result<Response<pb::GetTenantHistoryResponse>, Status> {
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 100,
            n @ 1..=10_000 => n as usize,
            n => return Err(invalid("limit", format!("{n} is more than 10000"))),
        };
        let entries = self.engine.history(&r.tenant, limit).await?;
        Ok(Response::new(pb::GetTenantHistoryResponse {
            entries: entries.into_iter().map(convert::ledger_entry).collect(),
        }))
    }

    async fn get_tenant(
        &self,
        req: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::GetTenantResponse>, Status> {
        let r = req.into_inner();
        let at = from_ts("at", r.at)?;
        let v = self.engine.tenant_view(&r.tenant, at).await?;
        let e = &v.entitlements;
        let (_, catalog) = self.engine.catalog()?;
        let features = e
            .features
            .iter()
            .map(|(code, g)| pb::FeatureEntitlement {
                feature: code.clone(),
                kind: catalog
                    .features
                    .get(code)
                    .map(|f| convert::enum_name(&f.kind))
                    .unwrap_or_default(),
                enabled: g.enabled(),
                value: Some(convert::value(&g.value)),
                sources: g.sources.iter().map(convert::provenance).collect(),
                since: (!g.sources.is_empty()).then(|| ts(g.since)),
            })
            .collect();
        let mut limits = Vec::new();
        for (metric, list) in &e.limits {
            let closed_by = e.closed.get(metric).map(|c| convert::provenance(&c.rule));
            if list.is_empty() {
                limits.push(pb::LimitEntitlement {
                    metric: metric.clone(),
                    window: "unlimited".into(),
                    closed_by: closed_by.clone(),
                    ..Default::default()
                });
            }
            limits.extend(list.iter().map(|l| pb::LimitEntitlement {
                closed_by: closed_by.clone(),
                ..convert::limit(metric, l)
            }));
        }
        Ok(Response::new(pb::GetTenantResponse {
            subscription: Some(convert::subscription(&v.subscription)),
            at: Some(ts(e.at)),
            plan: e.plan.to_string(),
            plan_since: Some(ts(e.plan_since)),
            status: e.status.as_str().into(),
            status_since: Some(ts(e.status_since)),
            access: e.access.as_str().into(),
            features,
            limits,
            overrides: v
                .overrides
                .iter()
                .map(|o| convert::override_(o, e.at))
                .collect(),
            valid_until: e.valid_until.map(ts),
            version: e.version,
            recent_denials: self
                .engine
                .denials
                .of(&r.tenant)
                .into_iter()
                .map(|d| pb::RecentDenial {
                    at: Some(ts(d.at)),
                    request: d.request.to_string(),
                    metric: d.metric,
                    amount: d.amount,
                    reason: d.reason,
                    message: d.message,
                })
                .collect(),
        }))
    }

    async fn reconcile_provider(
        &self,
        req: Request<pb::ReconcileProviderRequest>,
    ) -> Result<Response<pb::ReconcileProviderResponse>, Status> {
        let who = who(&req, |r| (&r.actor, &r.reason));
        let r = req.into_inner();
        if r.provider != "stripe" {
            return Err(invalid(
                "provider",
                format!("{:?} is not a provider Allot knows (stripe)", r.provider),
            ));
        }
        let Some(stripe) = &self.stripe else {
            return Err(Status::failed_precondition(
                "provider: this node has no Stripe configuration; start it with --stripe-config",
            ));
        };
        let current = stripe
            .adapter
            .current_subscriptions(&r.state)
            .map_err(|e| invalid("state", e.to_string()))?;
        let done = stripe.sync.reconcile(current, r.repair, &who).await?;
        Ok(Response::new(pb::ReconcileProviderResponse {
            checked: u32::try_from(done.checked).unwrap_or(u32::MAX),
            drift: done
                .drift
                .into_iter()
                .map(|d| pb::ProviderDrift {
                    object_id: d.object_id,
                    tenant: d.tenant,
                    differences: d
                        .differences
                        .into_iter()
                        .map(|f| pb::FieldDifference {
                            field: f.field.into(),
                            allot: f.allot,
                            provider: f.provider,
                        })
                        .collect(),
                    repaired: d.repaired,
                    note: d.note,
                })
                .collect(),
            not_in_provider: done.not_in_provider,
        }))
    }
}
