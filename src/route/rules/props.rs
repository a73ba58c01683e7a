//! Property tests: evaluation never panics and is deterministic; arbitrary conditions
//! compile or are refused, never panic; sampling is fixed.

use proptest::prelude::*;
use serde_json::{Map, Value};

use super::testkit::{PAYLOAD, b, event};
use super::{Decision, RouteSpec, Rules, RulesFile, TargetSpec, TransformSpec, sample_point};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1.0e6f64..1.0e6).prop_map(Value::from),
        "[a-z0-9 .{}$]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((arb_key(), inner), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("price".to_string()),
        Just("customer".to_string()),
        Just("tags".to_string()),
        Just("0".to_string()),
        Just("a".to_string()),
        "[a-z]{1,3}",
    ]
}

/// Condition tables mixing paths, operators and logic: the compiler refuses or
/// accepts, evaluation then never panics.
fn arb_conditions() -> impl Strategy<Value = Map<String, Value>> {
    let key = prop_oneof![
        Just("payload".to_string()),
        Just("payload.price".to_string()),
        Just("payload.customer.tier".to_string()),
        Just("payload.tags.0".to_string()),
        Just("metadata.region".to_string()),
        Just("tenant_id".to_string()),
        Just("schema_version".to_string()),
        Just("$and".to_string()),
        Just("$or".to_string()),
        Just("$gt".to_string()),
        Just("$in".to_string()),
        Just("$exists".to_string()),
        Just("$nin".to_string()),
        Just("$lte".to_string()),
        Just("$ne".to_string()),
    ];
    let value = arb_json().prop_recursive(2, 16, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("$gt".to_string()),
                        Just("$in".to_string()),
                        Just("$exists".to_string()),
                        Just("$eq".to_string()),
                        Just("payload.price".to_string()),
                    ],
                    inner
                ),
                1..3
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    });
    prop::collection::vec((key, value), 0..4).prop_map(|kv| kv.into_iter().collect())
}

fn fixed_rules() -> Rules {
    let text = r#"
[[route]]
name = "everything"
fallback = { subject = "fb", transform = { add_fields = { x = "{payload.price}" } } }
[[route.targets]]
subject = "a.{tenant_id}"
conditions = { "$or" = [ { "payload.price" = { "$gt" = 10 } }, { "payload.customer.tier" = { "$in" = ["gold", 1, true] } } ], "payload.tags" = { "$exists" = true } }
transform = { include_fields = ["price", "customer.tier", "tags"], exclude_fields = ["tags.0"], field_mapping = { price = "amount.value", "customer.tier" = "tier" }, add_fields = { t = "{tenant_id}-{payload.a}" } }
sampling_rate = 0.7
headers = { "X-P" = "{payload.price}" }
[[route.targets]]
subject = "b"
conditions = { "payload" = { "$ne" = 1 }, "payload.0" = { "$lte" = "m" } }
transform = { exclude_fields = ["a", "customer.id"] }
[[route.targets]]
subject = "c"
conditions = { "payload.a" = { "$nin" = [1, "x"] } }
sampling_rate = 0.2
"#;
    match Rules::from_toml(text) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn evaluation_never_panics_and_is_deterministic(
        payload in prop_oneof![
            arb_json().prop_map(|v| v.to_string().into_bytes()),
            prop::collection::vec(any::<u8>(), 0..64),
        ],
        metadata in prop::option::of(arb_json().prop_map(|v| v.to_string())),
        tenant in prop::option::of(".{0,12}"),
        id in "[ -~]{0,40}",
    ) {
        let rules = fixed_rules();
        let mut ev = event(PAYLOAD);
        ev.payload = payload.into();
        ev.metadata = metadata.map(|m| b(&m));
        ev.tenant_id = tenant.map(|t| b(&t));
        ev.id = b(&id);
        let first = rules.decide(&ev);
        prop_assert_eq!(&first, &rules.decide(&ev));
        prop_assert_eq!(&first, &fixed_rules().decide(&ev));
        let Decision::Routed { targets, .. } = first else {
            return Err(TestCaseError::fail("the catch-all route must match"));
        };
        prop_assert!(!targets.is_empty());
        for t in &targets {
            // Target c has no transform: the payload is the input, byte for byte.
            if t.subject.as_deref() == Ok("c") {
                prop_assert_eq!(&t.payload, &ev.payload);
            }
        }
    }

    #[test]
    fn arbitrary_conditions_compile_or_refuse_never_panic(
        conditions in arb_conditions(),
        payload in arb_json(),
        id in "[a-z0-9-]{0,20}",
    ) {
        let file = RulesFile {
            routes: vec![RouteSpec {
                name: "p".into(),
                matches: Default::default(),
                targets: vec![TargetSpec {
                    subject: "s".into(),
                    conditions: Some(conditions),
                    transform: Some(TransformSpec {
                        include_fields: None,
                        exclude_fields: vec!["price".into()],
                        field_mapping: [("customer".to_string(), "c.d".to_string())].into(),
                        add_fields: [("x.y".to_string(), Value::from("{payload.price}"))].into(),
                    }),
                    sampling_rate: Some(0.5),
                    headers: Default::default(),
                    delay_seconds: 0,
                }],
                strategy: Default::default(),
                fallback: None,
            }],
        };
        if let Ok(rules) = file.compile() {
            let mut ev = event(PAYLOAD);
            ev.payload = payload.to_string().into_bytes().into();
            ev.id = b(&id);
            prop_assert_eq!(rules.decide(&ev), rules.decide(&ev));
        }
    }

    #[test]
    fn sampling_is_deterministic(
        id in prop::collection::vec(any::<u8>(), 0..64),
        route in ".{0,16}",
        target in 0usize..64,
    ) {
        let p = sample_point(&id, &route, target);
        prop_assert!((0.0..1.0).contains(&p));
        prop_assert_eq!(p.to_bits(), sample_point(&id, &route, target).to_bits());
    }
}
