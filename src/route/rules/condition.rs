//! Conditions: a table of field path → value or operator table, `$and` / `$or`; compiled
//! once, evaluated per event; the comparisons (numbers by value, strings by bytes, columns
//! read as numbers or booleans when compared with one).

use std::cmp::Ordering;

use serde_json::{Map, Number, Value};

use super::spec::{Problem, problem};
use super::view::{FieldPath, Val, View};

/// The key toml uses to pass a datetime through serde; it shows up when a rules file
/// writes an unquoted date as a condition value.
const TOML_DATETIME_KEY: &str = "$__toml_private_datetime";

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Cond {
    All(Vec<Cond>),
    Any(Vec<Cond>),
    Test(FieldPath, Op),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Op {
    Eq(Value),
    Ne(Value),
    Gt(Value),
    Gte(Value),
    Lt(Value),
    Lte(Value),
    In(Vec<Value>),
    Nin(Vec<Value>),
    Exists(bool),
}

const OPERATORS: &str = "$eq, $ne, $gt, $gte, $lt, $lte, $in, $nin, $exists";

impl Cond {
    pub(super) fn holds(&self, view: &View<'_>) -> bool {
        match self {
            Cond::All(cs) => cs.iter().all(|c| c.holds(view)),
            Cond::Any(cs) => cs.iter().any(|c| c.holds(view)),
            Cond::Test(path, op) => op.holds(view.resolve(path)),
        }
    }
}

impl Op {
    fn holds(&self, actual: Option<Val<'_>>) -> bool {
        let Some(v) = actual else {
            return matches!(self, Op::Ne(_) | Op::Nin(_) | Op::Exists(false));
        };
        match self {
            Op::Exists(want) => *want,
            Op::Eq(x) => val_eq(v, x),
            Op::Ne(x) => !val_eq(v, x),
            Op::Gt(x) => val_cmp(v, x) == Some(Ordering::Greater),
            Op::Gte(x) => matches!(val_cmp(v, x), Some(Ordering::Greater | Ordering::Equal)),
            Op::Lt(x) => val_cmp(v, x) == Some(Ordering::Less),
            Op::Lte(x) => matches!(val_cmp(v, x), Some(Ordering::Less | Ordering::Equal)),
            Op::In(xs) => xs.iter().any(|x| val_eq(v, x)),
            Op::Nin(xs) => !xs.iter().any(|x| val_eq(v, x)),
        }
    }
}

/// Numbers compare by value: exactly as integers when both are, else as f64.
fn num_cmp(a: &Number, b: &Number) -> Option<Ordering> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return Some(x.cmp(&y));
    }
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        return Some(x.cmp(&y));
    }
    a.as_f64()?.partial_cmp(&b.as_f64()?)
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => num_cmp(x, y) == Some(Ordering::Equal),
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Null, Value::Null) => true,
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => false,
    }
}

fn text_number(s: &str) -> Option<Number> {
    s.trim().parse::<Number>().ok()
}

fn text_bool(s: &str) -> Option<bool> {
    match s {
        "t" | "true" => Some(true),
        "f" | "false" => Some(false),
        _ => None,
    }
}

fn val_eq(actual: Val<'_>, expected: &Value) -> bool {
    match actual {
        Val::Json(v) => json_eq(v, expected),
        Val::Text(s) => match expected {
            Value::String(e) => s == e,
            Value::Number(n) => {
                text_number(s).is_some_and(|m| num_cmp(&m, n) == Some(Ordering::Equal))
            }
            Value::Bool(b) => text_bool(s) == Some(*b),
            _ => false,
        },
    }
}

fn val_cmp(actual: Val<'_>, expected: &Value) -> Option<Ordering> {
    match (actual, expected) {
        (Val::Json(Value::Number(a)), Value::Number(b)) => num_cmp(a, b),
        (Val::Json(Value::String(a)), Value::String(b)) => Some(a.as_str().cmp(b.as_str())),
        (Val::Text(s), Value::Number(b)) => num_cmp(&text_number(s)?, b),
        (Val::Text(s), Value::String(b)) => Some(s.cmp(b.as_str())),
        _ => None,
    }
}

/// A condition table → the conjunction of its entries. `prefix` is the path so far when
/// TOML dotted keys nested the table (`payload.price = …` is `{payload = {price = …}}`).
pub(super) fn compile_table(
    map: &Map<String, Value>,
    prefix: Option<&str>,
    at: &str,
) -> Result<Vec<Cond>, Problem> {
    let mut out = Vec::new();
    for (key, value) in map {
        let here = format!("{at}.{key}");
        if key == TOML_DATETIME_KEY {
            return Err(problem(
                at,
                "toml dates are not supported; quote the value as a string",
            ));
        }
        if prefix.is_none() && (key == "$and" || key == "$or") {
            let Value::Array(items) = value else {
                return Err(problem(
                    here,
                    format!("{key} takes an array of condition tables"),
                ));
            };
            if items.is_empty() {
                return Err(problem(
                    here,
                    format!("{key} needs at least one condition table"),
                ));
            }
            let mut subs = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let item_at = format!("{here}[{i}]");
                let Value::Object(m) = item else {
                    return Err(problem(item_at, "expected a condition table"));
                };
                if m.is_empty() {
                    return Err(problem(item_at, "empty condition table"));
                }
                subs.push(Cond::All(compile_table(m, None, &item_at)?));
            }
            out.push(if key == "$and" {
                Cond::All(subs)
            } else {
                Cond::Any(subs)
            });
            continue;
        }
        if key.starts_with('$') {
            return Err(problem(
                here,
                format!("unknown operator {key:?} here: expected a field path, $and or $or"),
            ));
        }
        if key.is_empty() {
            return Err(problem(here, "empty field name"));
        }
        let path_text = match prefix {
            Some(p) => format!("{p}.{key}"),
            None => key.clone(),
        };
        match value {
            Value::Object(m) if m.is_empty() => {
                return Err(problem(here, "empty condition"));
            }
            Value::Object(m) if m.contains_key(TOML_DATETIME_KEY) => {
                return Err(problem(
                    here,
                    "toml dates are not supported; quote the value as a string",
                ));
            }
            Value::Object(m) => {
                let ops = m.keys().filter(|k| k.starts_with('$')).count();
                if ops == m.len() {
                    let path = FieldPath::parse(&path_text).map_err(|e| problem(&here, e))?;
                    for (op, operand) in m {
                        let op = compile_op(op, operand)
                            .map_err(|e| problem(format!("{here}.{op}"), e))?;
                        out.push(Cond::Test(path.clone(), op));
                    }
                } else if ops == 0 {
                    out.extend(compile_table(m, Some(&path_text), &here)?);
                } else {
                    return Err(problem(
                        here,
                        "table mixes operators ($…) and field names; to compare with an object use { \"$eq\" = { … } }",
                    ));
                }
            }
            other => {
                let path = FieldPath::parse(&path_text).map_err(|e| problem(&here, e))?;
                plain_value(other).map_err(|e| problem(&here, e))?;
                out.push(Cond::Test(path, Op::Eq(other.clone())));
            }
        }
    }
    Ok(out)
}

fn compile_op(op: &str, operand: &Value) -> Result<Op, String> {
    if op != "$exists" {
        plain_value(operand)?;
    }
    let ordered = |v: &Value| match v {
        Value::Number(_) | Value::String(_) => Ok(v.clone()),
        _ => Err(format!("{op} takes a number or a string")),
    };
    let list = |v: &Value| match v {
        Value::Array(items) => Ok(items.clone()),
        _ => Err(format!("{op} takes an array of values")),
    };
    Ok(match op {
        "$eq" => Op::Eq(operand.clone()),
        "$ne" => Op::Ne(operand.clone()),
        "$gt" => Op::Gt(ordered(operand)?),
        "$gte" => Op::Gte(ordered(operand)?),
        "$lt" => Op::Lt(ordered(operand)?),
        "$lte" => Op::Lte(ordered(operand)?),
        "$in" => Op::In(list(operand)?),
        "$nin" => Op::Nin(list(operand)?),
        "$exists" => match operand {
            Value::Bool(b) => Op::Exists(*b),
            _ => return Err("$exists takes true or false".into()),
        },
        _ => return Err(format!("unknown operator {op:?}; known: {OPERATORS}")),
    })
}

/// A comparison value: no toml date, no nan/inf (serde_json turns those into null).
pub(super) fn plain_value(v: &Value) -> Result<(), String> {
    match v {
        Value::Null => Err("nan and inf are not comparable values".into()),
        Value::Array(items) => items.iter().try_for_each(plain_value),
        Value::Object(m) if m.contains_key(TOML_DATETIME_KEY) => {
            Err("toml dates are not supported; quote the value as a string".into())
        }
        Value::Object(m) => m.values().try_for_each(plain_value),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use crate::route::rules::testkit::{PAYLOAD, event, holds_on};

    #[test]
    fn operators_table() {
        let cases: &[(&str, bool)] = &[
            // plain equality
            (r#"{ "payload.price" = 1500 }"#, true),
            (r#"{ "payload.price" = 1500.0 }"#, true),
            (r#"{ "payload.price" = 1501 }"#, false),
            (r#"{ "payload.price" = "1500" }"#, false),
            (r#"{ "payload.name" = "widget" }"#, true),
            (r#"{ "payload.name" = "Widget" }"#, false),
            (r#"{ "payload.visible" = true }"#, true),
            (r#"{ "payload.visible" = "true" }"#, false),
            (r#"{ "payload.tags" = ["a", "b"] }"#, true),
            (r#"{ "payload.tags" = ["b", "a"] }"#, false),
            (r#"{ "payload.customer.address.city" = "Oslo" }"#, true),
            (r#"{ "payload.items.0.sku" = "x" }"#, true),
            (r#"{ "payload.items.1.sku" = "x" }"#, false),
            (r#"{ "payload.items.x.sku" = "x" }"#, false),
            (r#"{ "payload.missing" = 1 }"#, false),
            (r#"{ "payload.nothing" = 0 }"#, false),
            // TOML dotted keys nest tables: read as the same path.
            (r#"{ payload = { customer = { tier = "gold" } } }"#, true),
            (r#"{ payload.customer.tier = "silver" }"#, false),
            // $eq
            (r#"{ "payload.price" = { "$eq" = 1500 } }"#, true),
            (
                r#"{ "payload.customer.address" = { "$eq" = { city = "Oslo" } } }"#,
                true,
            ),
            (
                r#"{ "payload.customer.address" = { "$eq" = { city = "Bergen" } } }"#,
                false,
            ),
            (r#"{ "payload.ratio" = { "$eq" = 0.5 } }"#, true),
            // $ne: the negation of $eq, true on a type mismatch and on a missing field
            (r#"{ "payload.price" = { "$ne" = 1500 } }"#, false),
            (r#"{ "payload.price" = { "$ne" = 1 } }"#, true),
            (r#"{ "payload.price" = { "$ne" = "1500" } }"#, true),
            (r#"{ "payload.missing" = { "$ne" = 1 } }"#, true),
            // $gt $gte $lt $lte
            (r#"{ "payload.price" = { "$gt" = 1000 } }"#, true),
            (r#"{ "payload.price" = { "$gt" = 1500 } }"#, false),
            (r#"{ "payload.price" = { "$gt" = 1499.5 } }"#, true),
            (r#"{ "payload.price" = { "$gte" = 1500 } }"#, true),
            (r#"{ "payload.price" = { "$gte" = 1501 } }"#, false),
            (r#"{ "payload.price" = { "$lt" = 2000 } }"#, true),
            (r#"{ "payload.price" = { "$lt" = 1500 } }"#, false),
            (r#"{ "payload.price" = { "$lte" = 1500 } }"#, true),
            (r#"{ "payload.price" = { "$lte" = 1499 } }"#, false),
            (r#"{ "payload.ratio" = { "$lt" = 1 } }"#, true),
            (r#"{ "payload.neg" = { "$lt" = 0 } }"#, true),
            (r#"{ "payload.neg" = { "$gt" = -3.5 } }"#, true),
            (
                r#"{ "payload.big" = { "$gt" = 9223372036854775807 } }"#,
                true,
            ),
            (r#"{ "payload.big" = { "$gt" = 1.0e19 } }"#, true),
            (r#"{ "payload.big" = { "$lt" = -1 } }"#, false),
            (r#"{ "payload.name" = { "$gt" = "a" } }"#, true),
            (r#"{ "payload.name" = { "$lt" = "a" } }"#, false),
            (r#"{ "payload.name" = { "$gte" = "widget" } }"#, true),
            // type mismatch: false both ways
            (r#"{ "payload.price" = { "$gt" = "1000" } }"#, false),
            (r#"{ "payload.price" = { "$lt" = "9999" } }"#, false),
            (r#"{ "payload.name" = { "$gt" = 1 } }"#, false),
            (r#"{ "payload.visible" = { "$gt" = 0 } }"#, false),
            (r#"{ "payload.nothing" = { "$lt" = 1 } }"#, false),
            (r#"{ "payload.tags" = { "$gte" = "a" } }"#, false),
            (r#"{ "payload.customer" = { "$gt" = 0 } }"#, false),
            // missing: false
            (r#"{ "payload.missing" = { "$gt" = 0 } }"#, false),
            (r#"{ "payload.missing" = { "$lte" = 0 } }"#, false),
            // ranges: several operators in one table all hold
            (
                r#"{ "payload.price" = { "$gte" = 1000, "$lt" = 2000 } }"#,
                true,
            ),
            (
                r#"{ "payload.price" = { "$gte" = 1000, "$lt" = 1500 } }"#,
                false,
            ),
            // $in / $nin
            (
                r#"{ "payload.name" = { "$in" = ["books", "widget"] } }"#,
                true,
            ),
            (r#"{ "payload.name" = { "$in" = ["books"] } }"#, false),
            (r#"{ "payload.name" = { "$in" = [] } }"#, false),
            (r#"{ "payload.price" = { "$in" = [1, 1500.0] } }"#, true),
            (r#"{ "payload.price" = { "$in" = ["1500"] } }"#, false),
            (r#"{ "payload.missing" = { "$in" = [1] } }"#, false),
            (
                r#"{ "payload.name" = { "$nin" = ["books", "widget"] } }"#,
                false,
            ),
            (r#"{ "payload.name" = { "$nin" = ["books"] } }"#, true),
            (r#"{ "payload.price" = { "$nin" = ["1500"] } }"#, true),
            (r#"{ "payload.missing" = { "$nin" = [1] } }"#, true),
            // $exists
            (r#"{ "payload.price" = { "$exists" = true } }"#, true),
            (r#"{ "payload.price" = { "$exists" = false } }"#, false),
            (r#"{ "payload.missing" = { "$exists" = true } }"#, false),
            (r#"{ "payload.missing" = { "$exists" = false } }"#, true),
            (r#"{ "payload.nothing" = { "$exists" = true } }"#, true),
            (
                r#"{ "payload.price.deeper" = { "$exists" = false } }"#,
                true,
            ),
            (r#"{ "payload" = { "$exists" = true } }"#, true),
            // columns (text from pgoutput; numbers and booleans read from the text)
            (r#"{ tenant_id = "acme" }"#, true),
            (r#"{ tenant_id = "other" }"#, false),
            (
                r#"{ event_topic = { "$in" = ["order.created", "order.paid"] } }"#,
                true,
            ),
            (r#"{ event_topic = { "$gt" = "order" } }"#, true),
            (r#"{ schema_version = 2 }"#, true),
            (r#"{ schema_version = "2" }"#, true),
            (r#"{ schema_version = { "$gte" = 2 } }"#, true),
            (r#"{ schema_version = { "$gt" = 2 } }"#, false),
            (r#"{ aggregate_id = { "$in" = [41, 42] } }"#, true),
            (r#"{ aggregate_type = { "$gt" = 1 } }"#, false),
            (r#"{ aggregate_type = true }"#, false),
            (r#"{ schema_id = { "$exists" = false } }"#, true),
            (r#"{ schema_id = { "$exists" = true } }"#, false),
            (r#"{ schema_id = { "$ne" = "x" } }"#, true),
            (r#"{ schema_id = "x" }"#, false),
            (r#"{ created_at = { "$nin" = ["x"] } }"#, true),
            (r#"{ id = "0b0c9d2e-0000-4000-8000-000000000001" }"#, true),
            (r#"{ occurred_at = { "$gte" = "2026-01-01" } }"#, true),
            (r#"{ occurred_at = { "$lt" = "2026-01-01" } }"#, false),
            // metadata
            (r#"{ "metadata.region" = "eu" }"#, true),
            (r#"{ "metadata.user_id" = { "$gt" = 5 } }"#, true),
            (r#"{ "metadata.missing" = { "$exists" = false } }"#, true),
            // $and / $or, nested, beside plain keys
            (
                r#"{ "$or" = [ { "payload.price" = { "$lt" = 10 } }, { "payload.customer.tier" = "gold" } ] }"#,
                true,
            ),
            (
                r#"{ "$or" = [ { "payload.price" = { "$lt" = 10 } }, { "payload.customer.tier" = "silver" } ] }"#,
                false,
            ),
            (
                r#"{ "$and" = [ { "payload.price" = { "$gt" = 10 } }, { "payload.visible" = true } ] }"#,
                true,
            ),
            (
                r#"{ "$and" = [ { "payload.price" = { "$gt" = 10 } }, { "payload.visible" = false } ] }"#,
                false,
            ),
            (
                r#"{ "$and" = [ { "$or" = [ { tenant_id = "x" }, { tenant_id = "acme" } ] }, { "$or" = [ { "payload.neg" = { "$gt" = 0 } }, { "payload.name" = "widget" } ] } ] }"#,
                true,
            ),
            (
                r#"{ "$or" = [ { "$and" = [ { tenant_id = "acme" }, { "payload.price" = 1 } ] }, { "$and" = [ { tenant_id = "x" } ] } ] }"#,
                false,
            ),
            (
                r#"{ tenant_id = "acme", "$or" = [ { "payload.name" = "widget" } ] }"#,
                true,
            ),
            (
                r#"{ tenant_id = "other", "$or" = [ { "payload.name" = "widget" } ] }"#,
                false,
            ),
            // entries of a table: all must hold
            (r#"{ tenant_id = "acme", "payload.price" = 1500 }"#, true),
            (r#"{ tenant_id = "acme", "payload.price" = 1 }"#, false),
        ];
        let ev = event(PAYLOAD);
        let mut failures = Vec::new();
        for (cond, want) in cases {
            if holds_on(cond, &ev) != *want {
                failures.push(format!("{cond} should be {want}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// A payload that is not JSON (a `bytea` column's raw bytes): payload fields are
    /// missing, as for any other miss; the columns still route.
    #[test]
    fn a_binary_payload_has_no_payload_fields() {
        let mut ev = event(PAYLOAD);
        ev.payload = bytes::Bytes::from_static(&[0x89, b'P', b'N', b'G', 0, 0xff]);
        for (cond, want) in [
            (r#"{ "payload.price" = 1500 }"#, false),
            (r#"{ "payload.price" = { "$exists" = false } }"#, true),
            (r#"{ "payload.price" = { "$ne" = 1500 } }"#, true),
            (r#"{ tenant_id = "acme" }"#, true),
        ] {
            assert_eq!(holds_on(cond, &ev), want, "{cond}");
        }
    }
}
