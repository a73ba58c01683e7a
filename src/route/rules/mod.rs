//! Declarative routing rules (issue 5, the smart-routing guide of seed 002). Pure: no I/O,
//! no async, deterministic (a replay routes every event exactly as the first pass did).
//!
//! A rules file is an ordered list of routes. The first route whose `match` fits an event
//! decides; its targets whose `conditions` hold and whose sampling passes are selected;
//! when none is selected the route's `fallback` (if any) is used.
//!
//! ```toml
//! [[route]]
//! name = "orders"
//! match = { event_topic = ["order.created", "order.paid"], tenant_id = "acme" }
//! strategy = "all_or_nothing"          # default "best_effort"
//! fallback = { subject = "orders.other" }
//!
//! [[route.targets]]
//! subject = "orders.{tenant_id}.{event_topic}"
//!
//! [[route.targets]]
//! subject = "orders.vip"
//! conditions = { "payload.price" = { "$gt" = 1000 }, "payload.visible" = true }
//! transform = { include_fields = ["id", "name", "price"], add_fields = { tenant = "{tenant_id}" } }
//! headers = { "X-Priority" = "high" }
//! delay_seconds = 0
//!
//! [[route.targets]]
//! subject = "analytics.orders"
//! sampling_rate = 0.1
//! ```
//!
//! **Match** (`match`): `event_topic`, `aggregate_type`, `tenant_id`, `source_bc`, each a
//! string or a list of strings compared exactly with the column; a missing key matches
//! anything, a NULL column matches no constrained key. No `match` table = every event.
//!
//! **Field paths** (conditions and `{…}` placeholders in header values and `add_fields`):
//! a column (`id`, `event_topic`, `aggregate_type`, `aggregate_id`, `tenant_id`,
//! `source_bc`, `schema_id`, `schema_version`, `occurred_at`, `created_at`), the parsed
//! `payload` or `metadata` JSON, or a path below them: `payload.customer.address.city`,
//! `payload.items.0.sku` (a numeric segment indexes an array), `metadata.user_id`.
//!
//! **Conditions**: a table of field path → value (plain equality) or operator table
//! (`$eq $ne $gt $gte $lt $lte $in $nin $exists`, several in one table must all hold),
//! plus `$and` / `$or` taking arrays of condition tables. All entries of a table must hold.
//! Quote dotted paths (`"payload.price" = …`); unquoted TOML dotted keys
//! (`payload.price = …`) nest tables, which is read as the same path. Semantics:
//! numbers compare as numbers (`1 == 1.0`), strings as strings (byte order), anything
//! else or a type mismatch is false, never an error. Columns arrive as text from
//! pgoutput, so a column compared with a number is read as a number when its text is one
//! (`schema_version = { "$gte" = 2 }`), and with a boolean when it is `t`/`f`/`true`/
//! `false`. A missing path (NULL column, absent key, payload not JSON) fails every test
//! except `$ne`, `$nin` and `$exists = false`; a JSON `null` value is present.
//!
//! **Transforms** act on a JSON object payload, in this order: `include_fields` (keep
//! only these paths), `exclude_fields` (drop these), `field_mapping` (move `from` path to
//! `to` path; all sources are taken before any is written, so swaps work), `add_fields`
//! (set a path to a constant, or to a string template like `"{tenant_id}"`; a template
//! whose placeholder is missing sets `null`). Transform paths are payload-relative object
//! keys (`customer.id`). Without a transform the payload bytes pass through untouched;
//! with one they are re-serialised. A transform on a payload that is not a JSON object, or
//! one that must write below a non-object value, fails that target with a reason.
//!
//! **Sampling**: `sampling_rate` in `0.0..=1.0` keeps a target for that fraction of
//! events, decided by [`sample_point`] (a fixed hash of event id, route name and target
//! index), so a replay selects the same targets.
//!
//! **Files**:
//! - `mod.rs` (this one): the compiled [`Rules`], their evaluation and what it returns
//!   ([`Decision`], [`RoutedTarget`], [`TargetRef`]).
//! - `spec.rs`: the file as written (serde types), [`RulesFile::from_toml`] and
//!   [`RulesFile::compile`], and the errors ([`RulesError`], [`RuleIssue`]).
//! - `compile.rs`: one route and its targets, checked and compiled.
//! - `view.rs`: the event as rules see it: field paths, columns as text, payload and
//!   metadata parsed on first use.
//! - `condition.rs`: conditions: compile, evaluation, comparisons.
//! - `transform.rs`: payload transforms: compile and apply.
//! - `text.rs`: `{path}` string templates for header values and `add_fields`.
//! - `sample.rs`: [`sample_point`], the fixed sampling hash.
//! - `tests.rs` (end-to-end evaluation), `props.rs` (property tests) and `testkit.rs`
//!   (their shared fixtures); every other file tests itself in its own `mod tests`.

mod compile;
mod condition;
mod sample;
mod spec;
mod text;
mod transform;
mod view;

#[cfg(test)]
mod props;
#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;

pub use sample::sample_point;
pub use spec::{
    MatchSpec, OneOrMany, RouteSpec, RuleIssue, RulesError, RulesFile, Strategy, TargetSpec,
    TransformSpec,
};

use std::fmt;

use bytes::Bytes;

use super::{Field, Template};
use crate::decode::OutboxEvent;
use condition::Cond;
use text::TextTemplate;
use transform::Transform;
use view::View;

// ---------------------------------------------------------------------------------------
// Compiled rules and evaluation.
// ---------------------------------------------------------------------------------------

/// Validated, compiled rules: cheap to evaluate per event.
#[derive(Debug, Clone)]
pub struct Rules {
    routes: Vec<Route>,
}

#[derive(Debug, Clone)]
struct Route {
    name: String,
    matcher: Matcher,
    targets: Vec<Target>,
    strategy: Strategy,
    fallback: Option<Target>,
}

#[derive(Debug, Clone, Default)]
struct Matcher {
    event_topic: Option<Vec<String>>,
    aggregate_type: Option<Vec<String>>,
    tenant_id: Option<Vec<String>>,
    source_bc: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
struct Target {
    subject: Template,
    subject_fields: Vec<Field>,
    /// The template as written (for `check`).
    subject_text: String,
    condition: Option<Cond>,
    transform: Option<Transform>,
    sampling_rate: Option<f64>,
    headers: Vec<(String, TextTemplate)>,
    delay_seconds: u64,
}

/// Which target of a route produced a [`RoutedTarget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetRef {
    /// `targets[i]` of the route.
    Target(usize),
    /// The route's `fallback`.
    Fallback,
}

impl fmt::Display for TargetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetRef::Target(i) => write!(f, "targets[{i}]"),
            TargetRef::Fallback => f.write_str("fallback"),
        }
    }
}

/// One selected target of one event.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutedTarget {
    /// Index of the route in the file.
    pub route: usize,
    pub target: TargetRef,
    /// The rendered subject, or why this target cannot be published (a dead-letter reason
    /// naming route, target and field: a NULL field the subject needs, a transform that
    /// does not fit the payload). Not prefix-checked: multi-tenancy is the pipeline's.
    pub subject: Result<String, String>,
    /// The input bytes untouched when the target has no transform (or it failed);
    /// re-serialised JSON when a transform applied.
    pub payload: Bytes,
    /// Extra headers of the target (names validated; values rendered, CR/LF → space).
    pub headers: Vec<(String, String)>,
    pub delay_seconds: u64,
    pub strategy: Strategy,
    /// The aggregate id's partition when the subject has `{partition:N}` and rendered
    /// (the `Outbox-Partition` header).
    pub partition: Option<u32>,
}

/// What the rules decided for one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// No route matched: the default router applies.
    Unmatched,
    /// Route `route` matched. `targets` may be empty (every target filtered out or not
    /// sampled and no fallback): then the event is deliberately published nowhere.
    Routed {
        route: usize,
        targets: Vec<RoutedTarget>,
    },
}

impl Rules {
    /// Parse, validate and compile a rules file.
    pub fn from_toml(text: &str) -> Result<Rules, RulesError> {
        RulesFile::from_toml(text)?.compile()
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn route_name(&self, route: usize) -> Option<&str> {
        self.routes.get(route).map(|r| r.name.as_str())
    }

    /// The largest `delay_seconds` of any target or fallback (0: no rule delays), so
    /// start-up can refuse delays the connected server cannot schedule.
    pub fn max_delay_seconds(&self) -> u64 {
        self.routes
            .iter()
            .flat_map(|r| r.targets.iter().chain(&r.fallback))
            .map(|t| t.delay_seconds)
            .max()
            .unwrap_or(0)
    }

    /// Every target or fallback with a delay: `(route "name" targets[i], subject
    /// template, delay_seconds)`, so `check` can see which streams must hold schedules.
    pub fn delayed_targets(&self) -> Vec<(String, &str, u64)> {
        let mut out = Vec::new();
        for r in &self.routes {
            let all = r
                .targets
                .iter()
                .enumerate()
                .map(|(i, t)| (TargetRef::Target(i), t))
                .chain(r.fallback.iter().map(|t| (TargetRef::Fallback, t)));
            for (which, t) in all.filter(|(_, t)| t.delay_seconds > 0) {
                out.push((
                    format!("route {:?} {which}", r.name),
                    t.subject_text.as_str(),
                    t.delay_seconds,
                ));
            }
        }
        out
    }

    /// The selected targets of `ev`: empty when no route matched or the matched route
    /// selected nothing (use [`Rules::decide`] to tell the two apart).
    pub fn evaluate(&self, ev: &OutboxEvent) -> Vec<RoutedTarget> {
        match self.decide(ev) {
            Decision::Unmatched => Vec::new(),
            Decision::Routed { targets, .. } => targets,
        }
    }

    /// First matching route; its targets whose sampling passes and whose conditions hold;
    /// the fallback when none does.
    pub fn decide(&self, ev: &OutboxEvent) -> Decision {
        let Some((ri, route)) = self
            .routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.matcher.matches(ev))
        else {
            return Decision::Unmatched;
        };
        let view = View::new(ev);
        let mut targets = Vec::new();
        for (ti, target) in route.targets.iter().enumerate() {
            // Sampling first: it needs no JSON.
            if let Some(rate) = target.sampling_rate
                && sample_point(&ev.id, &route.name, ti) >= rate
            {
                continue;
            }
            if let Some(cond) = &target.condition
                && !cond.holds(&view)
            {
                continue;
            }
            targets.push(target.route(&view, route, ri, TargetRef::Target(ti)));
        }
        if targets.is_empty()
            && let Some(fallback) = &route.fallback
        {
            targets.push(fallback.route(&view, route, ri, TargetRef::Fallback));
        }
        Decision::Routed { route: ri, targets }
    }

    /// The fallback of route `route` for `ev`, for a target that fails permanently later
    /// (at publish time). `None` when the route has no fallback.
    pub fn fallback(&self, route: usize, ev: &OutboxEvent) -> Option<RoutedTarget> {
        let r = self.routes.get(route)?;
        let fallback = r.fallback.as_ref()?;
        Some(fallback.route(&View::new(ev), r, route, TargetRef::Fallback))
    }
}

impl Matcher {
    fn matches(&self, ev: &OutboxEvent) -> bool {
        fn fits(allowed: &Option<Vec<String>>, value: Option<&Bytes>) -> bool {
            match allowed {
                None => true,
                Some(list) => {
                    value.is_some_and(|v| list.iter().any(|a| a.as_bytes() == v.as_ref()))
                }
            }
        }
        fits(&self.event_topic, Some(&ev.event_topic))
            && fits(&self.aggregate_type, ev.aggregate_type.as_ref())
            && fits(&self.tenant_id, ev.tenant_id.as_ref())
            && fits(&self.source_bc, ev.source_bc.as_ref())
    }
}

impl Target {
    fn route(&self, view: &View<'_>, route: &Route, ri: usize, which: TargetRef) -> RoutedTarget {
        let ev = view.ev;
        let mut payload = ev.payload.clone();
        let mut subject = self.render_subject(ev, &route.name, which);
        if subject.is_ok()
            && let Some(transform) = &self.transform
        {
            match transform.apply(view) {
                Ok(p) => payload = p,
                Err(e) => subject = Err(format!("route {:?} {which}: transform: {e}", route.name)),
            }
        }
        let headers = self
            .headers
            .iter()
            .filter_map(|(name, value)| {
                let v = value.render(view)?;
                Some((name.clone(), super::headers::sanitize(&v).into_owned()))
            })
            .collect();
        let partition = subject
            .is_ok()
            .then(|| self.subject.partition_of(ev))
            .flatten();
        RoutedTarget {
            route: ri,
            target: which,
            partition,
            subject,
            payload,
            headers,
            delay_seconds: self.delay_seconds,
            strategy: route.strategy,
        }
    }

    fn render_subject(
        &self,
        ev: &OutboxEvent,
        route: &str,
        which: TargetRef,
    ) -> Result<String, String> {
        for f in &self.subject_fields {
            if f.value(ev).is_none_or(str::is_empty) {
                return Err(format!(
                    "route {route:?} {which}: subject needs field {} but it is null or empty",
                    f.name()
                ));
            }
        }
        self.subject
            .render(ev)
            .map_err(|e| format!("route {route:?} {which}: subject: {e}"))
    }
}
