//! Payload transforms: `include_fields`, `exclude_fields`, `field_mapping`, `add_fields`,
//! in that order, on a JSON object payload; compiled once, applied per selected target.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::condition::plain_value;
use super::spec::{Problem, TransformSpec, problem};
use super::text::TextTemplate;
use super::view::{View, split_path};

#[derive(Debug, Clone)]
pub(super) struct Transform {
    include: Option<Vec<Vec<String>>>,
    exclude: Vec<Vec<String>>,
    mapping: Vec<(Vec<String>, Vec<String>)>,
    add: Vec<(Vec<String>, AddValue)>,
}

#[derive(Debug, Clone)]
enum AddValue {
    Constant(Value),
    Template(TextTemplate),
}

impl Transform {
    pub(super) fn apply(&self, view: &View<'_>) -> Result<Bytes, String> {
        let Some(Value::Object(source)) = view.payload() else {
            return Err("the payload is not a json object".into());
        };
        let mut obj = match &self.include {
            Some(paths) => {
                let mut kept = Map::new();
                for path in paths {
                    if let Some(v) = get_path(source, path) {
                        // Cannot fail: everything in `kept` below a key came from an object.
                        insert_path(&mut kept, path, v.clone())?;
                    }
                }
                kept
            }
            None => source.clone(),
        };
        for path in &self.exclude {
            remove_path(&mut obj, path);
        }
        let moved: Vec<_> = self
            .mapping
            .iter()
            .map(|(from, to)| (remove_path(&mut obj, from), to))
            .collect();
        for (value, to) in moved {
            if let Some(v) = value {
                insert_path(&mut obj, to, v)
                    .map_err(|e| format!("field_mapping to {:?}: {e}", to.join(".")))?;
            }
        }
        for (path, add) in &self.add {
            let v = match add {
                AddValue::Constant(v) => v.clone(),
                AddValue::Template(t) => t.render(view).map_or(Value::Null, Value::String),
            };
            insert_path(&mut obj, path, v)
                .map_err(|e| format!("add_fields {:?}: {e}", path.join(".")))?;
        }
        serde_json::to_vec(&Value::Object(obj))
            .map(Bytes::from)
            .map_err(|e| format!("cannot serialise the transformed payload: {e}"))
    }
}

fn get_path<'v>(obj: &'v Map<String, Value>, path: &[String]) -> Option<&'v Value> {
    let (last, parents) = path.split_last()?;
    let mut cur = obj;
    for seg in parents {
        cur = cur.get(seg)?.as_object()?;
    }
    cur.get(last)
}

fn remove_path(obj: &mut Map<String, Value>, path: &[String]) -> Option<Value> {
    let (last, parents) = path.split_last()?;
    let mut cur = obj;
    for seg in parents {
        cur = cur.get_mut(seg)?.as_object_mut()?;
    }
    cur.remove(last)
}

/// Set `path`, creating missing objects on the way; refuses to go below a non-object.
fn insert_path(obj: &mut Map<String, Value>, path: &[String], value: Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty path".into());
    };
    let mut cur = obj;
    for (i, seg) in parents.iter().enumerate() {
        let slot = cur
            .entry(seg.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = match slot {
            Value::Object(m) => m,
            _ => {
                return Err(format!("{:?} is not an object", parents[..=i].join(".")));
            }
        };
    }
    cur.insert(last.clone(), value);
    Ok(())
}

fn is_prefix(a: &[String], b: &[String]) -> bool {
    a.len() < b.len() && b.starts_with(a)
}

pub(super) fn compile_transform(spec: &TransformSpec, at: &str) -> Result<Transform, Problem> {
    let paths = |list: &[String], name: &str| -> Result<Vec<Vec<String>>, Problem> {
        list.iter()
            .enumerate()
            .map(|(i, p)| split_path(p).map_err(|e| problem(format!("{at}.{name}[{i}]"), e)))
            .collect()
    };
    let include = match &spec.include_fields {
        Some(list) if list.is_empty() => {
            return Err(problem(
                format!("{at}.include_fields"),
                "include_fields is empty: it would drop every field",
            ));
        }
        Some(list) => Some(paths(list, "include_fields")?),
        None => None,
    };
    let exclude = paths(&spec.exclude_fields, "exclude_fields")?;
    let mut mapping: Vec<(Vec<String>, Vec<String>)> = Vec::with_capacity(spec.field_mapping.len());
    for (from, to) in &spec.field_mapping {
        let here = format!("{at}.field_mapping.{from}");
        let f = split_path(from).map_err(|e| problem(&here, e))?;
        let t = split_path(to).map_err(|e| problem(&here, e))?;
        for (_, other) in &mapping {
            if *other == t {
                return Err(problem(
                    &here,
                    format!("another field_mapping also writes {to:?}"),
                ));
            }
            if is_prefix(other, &t) || is_prefix(&t, other) {
                return Err(problem(
                    &here,
                    format!(
                        "destination {to:?} overlaps destination {:?}",
                        other.join(".")
                    ),
                ));
            }
        }
        mapping.push((f, t));
    }
    let mut add = Vec::with_capacity(spec.add_fields.len());
    for (name, value) in &spec.add_fields {
        let here = format!("{at}.add_fields.{name}");
        let path = split_path(name).map_err(|e| problem(&here, e))?;
        let value = match value {
            Value::String(s) => {
                AddValue::Template(TextTemplate::parse(s).map_err(|e| problem(&here, e))?)
            }
            other => {
                plain_value(other).map_err(|e| problem(&here, e))?;
                AddValue::Constant(other.clone())
            }
        };
        add.push((path, value));
    }
    Ok(Transform {
        include,
        exclude,
        mapping,
        add,
    })
}

#[cfg(test)]
mod tests {
    use crate::route::rules::testkit::{PAYLOAD, event, one_target, payload_json, rules};

    #[test]
    fn payload_passes_through_untouched_without_transform() {
        let raw = r#"{ "b" :2,  "a":1.50 }"#;
        let ev = event(raw);
        let out = one_target(r#"headers = { "X-Tenant" = "{tenant_id}" }"#).evaluate(&ev);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].payload.as_ref(), raw.as_bytes());
        // Shared, not copied.
        assert_eq!(out[0].payload.as_ptr(), ev.payload.as_ptr());
        // Even when the payload is not JSON at all.
        let ev = event("\u{1}binary?");
        assert_eq!(one_target("").evaluate(&ev)[0].payload, ev.payload);
    }

    #[test]
    fn transform_include_nested() {
        let out = one_target(
            r#"transform = { include_fields = ["id", "customer.tier", "customer.address.city", "missing", "price.x"] }"#,
        )
        .evaluate(&event(PAYLOAD));
        assert_eq!(
            payload_json(&out[0]),
            serde_json::json!({"id": "p-1", "customer": {"tier": "gold", "address": {"city": "Oslo"}}})
        );
        // Overlapping paths in either order keep the whole parent.
        for order in [
            r#"["customer", "customer.id"]"#,
            r#"["customer.id", "customer"]"#,
        ] {
            let out = one_target(&format!("transform = {{ include_fields = {order} }}"))
                .evaluate(&event(PAYLOAD));
            assert_eq!(
                payload_json(&out[0]),
                serde_json::json!({"customer": {"id": 7, "tier": "gold", "address": {"city": "Oslo"}}}),
                "{order}"
            );
        }
    }

    #[test]
    fn transform_exclude_nested() {
        let out = one_target(
            r#"transform = { exclude_fields = ["internal_notes", "customer.address", "items", "nope.x"] }"#,
        )
        .evaluate(&event(PAYLOAD));
        let p = payload_json(&out[0]);
        assert!(p.get("internal_notes").is_none());
        assert!(p.get("items").is_none());
        assert_eq!(p["customer"], serde_json::json!({"id": 7, "tier": "gold"}));
        assert_eq!(p["price"], 1500);
    }

    #[test]
    fn transform_field_mapping_renames_nested_and_swaps() {
        let out = one_target(
            r#"transform = { field_mapping = { total = "order_value", "customer.id" = "buyer.id", "customer.address.city" = "city", missing = "x" } }"#,
        )
        .evaluate(&event(PAYLOAD));
        let p = payload_json(&out[0]);
        assert_eq!(p["order_value"], 99);
        assert!(p.get("total").is_none());
        assert_eq!(p["buyer"], serde_json::json!({"id": 7}));
        assert_eq!(p["city"], "Oslo");
        assert_eq!(
            p["customer"],
            serde_json::json!({"tier": "gold", "address": {}})
        );
        assert!(p.get("x").is_none());

        let out = one_target(r#"transform = { field_mapping = { a = "b", b = "a" } }"#)
            .evaluate(&event(r#"{"a": 1, "b": 2}"#));
        assert_eq!(payload_json(&out[0]), serde_json::json!({"a": 2, "b": 1}));

        // Writing below a non-object fails the target, with the reason.
        let out = one_target(r#"transform = { field_mapping = { total = "price.amount" } }"#)
            .evaluate(&event(PAYLOAD));
        let e = out[0].subject.clone().unwrap_err();
        assert!(
            e.contains("route \"r\" targets[0]: transform: field_mapping to \"price.amount\""),
            "{e}"
        );
        assert!(e.contains("\"price\" is not an object"), "{e}");
        assert_eq!(out[0].payload, event(PAYLOAD).payload);
    }

    #[test]
    fn transform_add_fields_constants_and_templates() {
        let out = one_target(
            r#"transform = { add_fields = { source = "outbox", tenant = "{tenant_id}", "meta.version" = 3, flags = [true, 1.5], label = "{event_topic}/{payload.customer.id}/{metadata.region}", braces = "{{x}}", gone = "{schema_id}", obj = "{payload.tags}" } }"#,
        )
        .evaluate(&event(r#"{"meta": {"keep": 1}, "source": "app", "customer": {"id": 7}, "tags": ["a"]}"#));
        assert_eq!(
            payload_json(&out[0]),
            serde_json::json!({
                "meta": {"keep": 1, "version": 3},
                "source": "outbox",
                "tenant": "acme",
                "flags": [true, 1.5],
                "label": "order.created/7/eu",
                "braces": "{x}",
                "gone": null,
                "obj": "[\"a\"]",
                "customer": {"id": 7},
                "tags": ["a"],
            })
        );
    }

    #[test]
    fn transform_order_include_exclude_map_add() {
        let out = one_target(
            r#"transform = { include_fields = ["id", "total", "customer"], exclude_fields = ["customer.address"], field_mapping = { total = "order_value" }, add_fields = { source = "outbox" } }"#,
        )
        .evaluate(&event(PAYLOAD));
        assert_eq!(
            payload_json(&out[0]),
            serde_json::json!({"id": "p-1", "order_value": 99, "customer": {"id": 7, "tier": "gold"}, "source": "outbox"})
        );
    }

    #[test]
    fn transform_on_non_object_payload_fails_the_target_only() {
        let r = rules(
            r#"
[[route]]
name = "r"
[[route.targets]]
subject = "plain"
[[route.targets]]
subject = "shaped"
transform = { add_fields = { a = 1 } }
"#,
        );
        for bad in ["[1]", "not json", "\"s\""] {
            let out = r.evaluate(&event(bad));
            assert_eq!(out.len(), 2);
            assert_eq!(out[0].subject, Ok("plain".to_string()));
            assert_eq!(
                out[1].subject,
                Err(
                    "route \"r\" targets[1]: transform: the payload is not a json object"
                        .to_string()
                )
            );
            assert_eq!(out[1].payload.as_ref(), bad.as_bytes());
        }
    }
}
