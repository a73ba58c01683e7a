//! One route of a checked rules file and its targets, compiled into the evaluator's
//! [`Route`] and [`Target`]s; every problem found is pushed, not just the first.

use super::condition::{Cond, compile_table};
use super::spec::{OneOrMany, Problem, RouteSpec, TargetSpec, problem};
use super::text::TextTemplate;
use super::transform::compile_transform;
use super::{Matcher, Route, Target};
use crate::route::{Field, Template};

/// Longest header name accepted (same limit as the metadata → header mapping).
const MAX_HEADER_NAME_LEN: usize = 128;

pub(super) fn compile_route(spec: &RouteSpec, problems: &mut Vec<Problem>) -> Option<Route> {
    let before = problems.len();
    let m = &spec.matches;
    let mut list = |value: &Option<OneOrMany>, key: &str| -> Option<Vec<String>> {
        let v = value.as_ref()?;
        if v.0.is_empty() {
            problems.push(problem(
                format!("match.{key}"),
                "empty list matches nothing; remove the key to match any value",
            ));
        }
        Some(v.0.clone())
    };
    let matcher = Matcher {
        event_topic: list(&m.event_topic, "event_topic"),
        aggregate_type: list(&m.aggregate_type, "aggregate_type"),
        tenant_id: list(&m.tenant_id, "tenant_id"),
        source_bc: list(&m.source_bc, "source_bc"),
    };
    if spec.targets.is_empty() {
        problems.push(problem(
            "targets",
            "a route needs at least one [[route.targets]]",
        ));
    }
    let targets: Vec<Option<Target>> = spec
        .targets
        .iter()
        .enumerate()
        .map(|(i, t)| compile_target(t, &format!("targets[{i}]"), problems))
        .collect();
    let fallback = spec.fallback.as_ref().map(|f| {
        if f.conditions.is_some() {
            problems.push(problem(
                "fallback.conditions",
                "a fallback has no conditions: it applies when no target does",
            ));
        }
        if f.sampling_rate.is_some() {
            problems.push(problem(
                "fallback.sampling_rate",
                "a fallback is not sampled: it applies when no target does",
            ));
        }
        compile_target(f, "fallback", problems)
    });
    if problems.len() != before {
        return None;
    }
    Some(Route {
        name: spec.name.clone(),
        matcher,
        targets: targets.into_iter().collect::<Option<Vec<_>>>()?,
        strategy: spec.strategy,
        fallback: match fallback {
            Some(f) => Some(f?),
            None => None,
        },
    })
}

/// Ten years: beyond it a schedule is surely a mistake (and its time must stay a valid
/// RFC 3339 date for the server).
pub const MAX_DELAY_SECONDS: u64 = 10 * 365 * 24 * 3600;

fn compile_target(spec: &TargetSpec, at: &str, problems: &mut Vec<Problem>) -> Option<Target> {
    let before = problems.len();
    let subject = match Template::parse(&spec.subject) {
        Ok(t) => Some(t),
        Err(e) => {
            problems.push(problem(format!("{at}.subject"), e));
            None
        }
    };
    let condition = match &spec.conditions {
        None => None,
        Some(m) if m.is_empty() => None,
        Some(m) => match compile_table(m, None, &format!("{at}.conditions")) {
            Ok(cs) => Some(Cond::All(cs)),
            Err(p) => {
                problems.push(p);
                None
            }
        },
    };
    let transform = match &spec.transform {
        None => None,
        Some(t) => match compile_transform(t, &format!("{at}.transform")) {
            Ok(t) => Some(t),
            Err(p) => {
                problems.push(p);
                None
            }
        },
    };
    if let Some(rate) = spec.sampling_rate
        && !(0.0..=1.0).contains(&rate)
    {
        problems.push(problem(
            format!("{at}.sampling_rate"),
            format!("{rate} is outside 0.0..=1.0"),
        ));
    }
    if spec.delay_seconds > MAX_DELAY_SECONDS {
        problems.push(problem(
            format!("{at}.delay_seconds"),
            format!(
                "{} is more than {MAX_DELAY_SECONDS} (ten years)",
                spec.delay_seconds
            ),
        ));
    }
    let mut headers = Vec::with_capacity(spec.headers.len());
    for (name, value) in &spec.headers {
        let here = format!("{at}.headers.{name}");
        if let Err(e) = check_header_name(name) {
            problems.push(problem(&here, e));
            continue;
        }
        match TextTemplate::parse(value) {
            Ok(t) if t.literals().any(|l| l.chars().any(char::is_control)) => {
                problems.push(problem(&here, "header value contains a control character"));
            }
            Ok(t) => headers.push((name.clone(), t)),
            Err(e) => problems.push(problem(&here, e)),
        }
    }
    if problems.len() != before {
        return None;
    }
    Some(Target {
        subject_fields: template_fields(&spec.subject),
        subject_text: spec.subject.clone(),
        subject: subject?,
        condition,
        transform,
        sampling_rate: spec.sampling_rate.filter(|r| *r < 1.0),
        headers,
        delay_seconds: spec.delay_seconds,
    })
}

/// The fields a (valid) subject template names, for a precise error on a NULL one.
fn template_fields(text: &str) -> Vec<Field> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let name = &rest[open + 1..open + close];
        if let Some((_, f)) = Field::ALL.iter().find(|(n, _)| *n == name) {
            out.push(*f);
        }
        rest = &rest[open + close + 1..];
    }
    out
}

/// NATS header names: printable ASCII without `:` or spaces. `Nats-*` and `Outbox-*` are
/// the server's and the relay's own (dedup id, position): a rule cannot set them.
fn check_header_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("header name is empty".into());
    }
    if name.len() > MAX_HEADER_NAME_LEN {
        return Err(format!(
            "header name is longer than {MAX_HEADER_NAME_LEN} bytes"
        ));
    }
    if name.contains(':') {
        return Err(format!("header name {name:?} contains ':'"));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "header name {name:?} contains whitespace, a control or a non-ascii character"
        ));
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with("nats-") || lower.starts_with("outbox-") {
        return Err(format!(
            "header name {name:?} is reserved (nats-* and outbox-* are set by the server and the relay)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::route::rules::testkit::{err, target_err};
    use crate::route::rules::{RulesError, RulesFile};

    #[test]
    fn validation_errors_name_route_target_and_field() {
        let cases: &[(&str, &str)] = &[
            (
                r#"conditions = { "payload.price" = { "$gtt" = 1000 } }"#,
                r#"rules: route 0 ("r") targets[0].conditions.payload.price.$gtt: unknown operator "$gtt"; known: $eq"#,
            ),
            (
                r#"conditions = { "paylod.price" = 1 }"#,
                r#"targets[0].conditions.paylod.price: unknown field "paylod.price": use a column"#,
            ),
            (
                r#"conditions = { "tenant_id.x" = 1 }"#,
                "targets[0].conditions.tenant_id.x: field path \"tenant_id.x\": column tenant_id is text and has no sub-fields",
            ),
            (
                r#"conditions = { "payload..x" = 1 }"#,
                "has an empty segment",
            ),
            (
                r#"conditions = { "payload.x" = { "$in" = 1 } }"#,
                "targets[0].conditions.payload.x.$in: $in takes an array of values",
            ),
            (
                r#"conditions = { "payload.x" = { "$exists" = "yes" } }"#,
                "targets[0].conditions.payload.x.$exists: $exists takes true or false",
            ),
            (
                r#"conditions = { "payload.x" = { "$gt" = true } }"#,
                "$gt takes a number or a string",
            ),
            (
                r#"conditions = { "payload.x" = { "$gt" = nan } }"#,
                "targets[0].conditions.payload.x.$gt: nan and inf are not comparable values",
            ),
            (
                r#"conditions = { "payload.x" = { "$eq" = inf } }"#,
                "targets[0].conditions.payload.x.$eq: nan and inf are not comparable values",
            ),
            (
                r#"conditions = { "payload.x" = { "$and" = [] } }"#,
                "targets[0].conditions.payload.x.$and: unknown operator \"$and\"",
            ),
            (
                r#"conditions = { "$and" = { a = 1 } }"#,
                "targets[0].conditions.$and: $and takes an array of condition tables",
            ),
            (
                r#"conditions = { "$or" = [] }"#,
                "$or needs at least one condition table",
            ),
            (
                r#"conditions = { "$or" = [1] }"#,
                "targets[0].conditions.$or[0]: expected a condition table",
            ),
            (
                r#"conditions = { "$or" = [{}] }"#,
                "targets[0].conditions.$or[0]: empty condition table",
            ),
            (
                r#"conditions = { "$or" = [{ "payload.x" = { "$nope" = 1 } }] }"#,
                "targets[0].conditions.$or[0].payload.x.$nope: unknown operator",
            ),
            (
                r#"conditions = { "$not" = [] }"#,
                "targets[0].conditions.$not: unknown operator \"$not\" here",
            ),
            (
                r#"conditions = { "payload.x" = {} }"#,
                "targets[0].conditions.payload.x: empty condition",
            ),
            (
                r#"conditions = { "payload.x" = { "$gt" = 1, y = 2 } }"#,
                "targets[0].conditions.payload.x: table mixes operators",
            ),
            (
                r#"conditions = { "payload.day" = 2026-01-01 }"#,
                "toml dates are not supported",
            ),
            (
                r#"conditions = { "payload.day" = { "$gt" = 2026-01-01T00:00:00Z } }"#,
                "toml dates are not supported",
            ),
            (
                "sampling_rate = 1.5",
                "targets[0].sampling_rate: 1.5 is outside 0.0..=1.0",
            ),
            (
                "delay_seconds = 315360001",
                "targets[0].delay_seconds: 315360001 is more than 315360000 (ten years)",
            ),
            (
                "sampling_rate = -0.1",
                "targets[0].sampling_rate: -0.1 is outside",
            ),
            (
                "sampling_rate = nan",
                "targets[0].sampling_rate: NaN is outside",
            ),
            (
                r#"headers = { "Bad:Name" = "x" }"#,
                r#"targets[0].headers.Bad:Name: header name "Bad:Name" contains ':'"#,
            ),
            (
                r#"headers = { "X Y" = "x" }"#,
                "targets[0].headers.X Y: header name \"X Y\" contains whitespace",
            ),
            (r#"headers = { "X-\u00e9" = "x" }"#, "non-ascii"),
            (r#"headers = { "" = "x" }"#, "header name is empty"),
            (
                r#"headers = { "Nats-Msg-Id" = "x" }"#,
                "header name \"Nats-Msg-Id\" is reserved",
            ),
            (r#"headers = { "outbox-event-id" = "x" }"#, "is reserved"),
            (
                r#"headers = { "X-A" = "a\nb" }"#,
                "targets[0].headers.X-A: header value contains a control character",
            ),
            (
                r#"headers = { "X-A" = "{nope}" }"#,
                "targets[0].headers.X-A: placeholder {nope}: unknown field",
            ),
            (r#"headers = { "X-A" = "{tenant_id" }"#, "unclosed {"),
            (r#"headers = { "X-A" = "a}" }"#, "unmatched }"),
            (
                r#"transform = { include_fields = [] }"#,
                "targets[0].transform.include_fields: include_fields is empty",
            ),
            (
                r#"transform = { include_fields = ["a", "b..c"] }"#,
                "targets[0].transform.include_fields[1]: path \"b..c\" has an empty segment",
            ),
            (
                r#"transform = { exclude_fields = [""] }"#,
                "targets[0].transform.exclude_fields[0]: path is empty",
            ),
            (
                r#"transform = { field_mapping = { a = "x", b = "x" } }"#,
                "targets[0].transform.field_mapping.b: another field_mapping also writes \"x\"",
            ),
            (
                r#"transform = { field_mapping = { a = "x", b = "x.y" } }"#,
                "targets[0].transform.field_mapping.b: destination \"x.y\" overlaps destination \"x\"",
            ),
            (
                r#"transform = { add_fields = { a = "{nope}" } }"#,
                "targets[0].transform.add_fields.a: placeholder {nope}",
            ),
            (
                r#"transform = { add_fields = { when = 2026-01-01 } }"#,
                "targets[0].transform.add_fields.when: toml dates are not supported",
            ),
        ];
        let mut failures = Vec::new();
        for (body, want) in cases {
            let got = target_err(body);
            if !got.contains(want) {
                failures.push(format!("{body}\n  want: {want}\n  got:  {got}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn validation_of_routes_subjects_and_fallbacks() {
        let e = err(r#"
[[route]]
name = "a"
fallback = { subject = "fb", conditions = { tenant_id = "x" }, sampling_rate = 0.5 }
[[route.targets]]
subject = "orders.{nope}"
[[route.targets]]
subject = "orders.*"
[[route.targets]]
subject = "$JS.API.x"

[[route]]
name = "a"
match = { tenant_id = [] }

[[route]]
name = " "
[[route.targets]]
subject = "ok"
"#);
        for want in [
            r#"rules: route 0 ("a") targets[0].subject: unknown field {nope}"#,
            r#"route 0 ("a") targets[1].subject: subject contains a wildcard"#,
            r#"route 0 ("a") targets[2].subject: subject starts with $"#,
            r#"route 0 ("a") fallback.conditions: a fallback has no conditions"#,
            r#"route 0 ("a") fallback.sampling_rate: a fallback is not sampled"#,
            r#"route 1 ("a") name: route name "a" is used by an earlier route"#,
            r#"route 1 ("a") match.tenant_id: empty list matches nothing"#,
            r#"route 1 ("a") targets: a route needs at least one [[route.targets]]"#,
            r#"route 2 (" ") name: route name is empty"#,
        ] {
            assert!(e.contains(want), "missing {want:?} in\n{e}");
        }
        match RulesFile::from_toml(
            "[[route]]\nname = \"x\"\n[[route.targets]]\nsubject = \"a.{nope}\"\n",
        )
        .unwrap()
        .validate()
        {
            Err(RulesError::Invalid(issues)) => {
                assert_eq!(issues.len(), 1);
                assert_eq!(issues[0].route, 0);
                assert_eq!(issues[0].route_name, "x");
                assert_eq!(issues[0].field, "targets[0].subject");
            }
            other => panic!("{other:?}"),
        }
    }
}
