//! The rules file as written (serde types), its parsing, validation and compilation into
//! [`Rules`], and the errors that name route, target and field.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::Rules;
use super::compile::compile_route;

/// A rules file as written. [`RulesFile::compile`] checks it and builds [`Rules`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    /// `[[route]]`, in priority order: the first that matches decides.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub name: String,
    #[serde(default, rename = "match")]
    pub matches: MatchSpec,
    #[serde(default)]
    pub targets: Vec<TargetSpec>,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub fallback: Option<TargetSpec>,
}

/// Which events a route takes. Each key: a string or a list of strings; missing = any.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    #[serde(default)]
    pub event_topic: Option<OneOrMany>,
    #[serde(default)]
    pub aggregate_type: Option<OneOrMany>,
    #[serde(default)]
    pub tenant_id: Option<OneOrMany>,
    #[serde(default)]
    pub source_bc: Option<OneOrMany>,
}

/// A string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// How a route's targets are published together (carried through to the pipeline).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Every target is checked before any is published; if one would fail permanently,
    /// none is published and the event goes to the dead-letter subject.
    AllOrNothing,
    /// The valid targets are published; each failing one goes to the dead-letter subject.
    #[default]
    BestEffort,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// A subject template (`orders.{tenant_id}.{event_topic}`), see
    /// [`Template`](crate::route::Template).
    pub subject: String,
    /// Field path → value or operator table; `$and` / `$or` → arrays of such tables.
    #[serde(default)]
    pub conditions: Option<Map<String, Value>>,
    #[serde(default)]
    pub transform: Option<TransformSpec>,
    /// `0.0..=1.0`; missing = every event.
    #[serde(default)]
    pub sampling_rate: Option<f64>,
    /// Header name → value; the value may hold `{field}` placeholders (`{{` and `}}`
    /// for literal braces); a header whose placeholder is missing is left out.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Carried through to the publisher (JetStream scheduled delivery); 0 = now.
    #[serde(default)]
    pub delay_seconds: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformSpec {
    #[serde(default)]
    pub include_fields: Option<Vec<String>>,
    #[serde(default)]
    pub exclude_fields: Vec<String>,
    /// From path → to path.
    #[serde(default)]
    pub field_mapping: BTreeMap<String, String>,
    /// Path → constant JSON value, or a string template (`"{tenant_id}"`).
    #[serde(default)]
    pub add_fields: BTreeMap<String, Value>,
}

// ---------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    /// The file is not valid TOML or does not have the rules shape.
    #[error("rules file: {0}")]
    Parse(String),
    /// The file parses but some rules are invalid; every problem found is listed.
    #[error("{}", join_issues(.0))]
    Invalid(Vec<RuleIssue>),
}

/// One problem in one route, e.g. route 0 `"orders"`, field
/// `targets[1].conditions.payload.price.$gtt`, message `unknown operator …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleIssue {
    pub route: usize,
    pub route_name: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for RuleIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rules: route {} ({:?}) {}: {}",
            self.route, self.route_name, self.field, self.message
        )
    }
}

fn join_issues(issues: &[RuleIssue]) -> String {
    issues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A problem inside one route, before the route is known.
pub(super) struct Problem {
    field: String,
    message: String,
}

pub(super) fn problem(field: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        field: field.into(),
        message: message.into(),
    }
}

impl RulesFile {
    /// Parse a rules file. Unknown keys are refused; errors give the line.
    pub fn from_toml(text: &str) -> Result<RulesFile, RulesError> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text.get(..s.start).unwrap_or(text).matches('\n').count() + 1);
            let msg = e.message().trim_end().to_string();
            RulesError::Parse(match line {
                Some(l) => format!("line {l}: {msg}"),
                None => msg,
            })
        })
    }

    /// Check everything that can be checked without an event.
    pub fn validate(&self) -> Result<(), RulesError> {
        self.compile().map(drop)
    }

    /// Validate and build the evaluator. Collects every problem, not just the first.
    pub fn compile(&self) -> Result<Rules, RulesError> {
        let mut issues = Vec::new();
        let mut routes = Vec::with_capacity(self.routes.len());
        let mut names = HashSet::new();
        for (index, spec) in self.routes.iter().enumerate() {
            let mut problems = Vec::new();
            if spec.name.trim().is_empty() {
                problems.push(problem("name", "route name is empty"));
            } else if !names.insert(spec.name.as_str()) {
                problems.push(problem(
                    "name",
                    format!("route name {:?} is used by an earlier route", spec.name),
                ));
            }
            let route = compile_route(spec, &mut problems);
            issues.extend(problems.into_iter().map(|p| RuleIssue {
                route: index,
                route_name: spec.name.clone(),
                field: p.field,
                message: p.message,
            }));
            routes.extend(route);
        }
        if issues.is_empty() {
            Ok(Rules { routes })
        } else {
            Err(RulesError::Invalid(issues))
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::route::rules::testkit::err;

    #[test]
    fn parse_errors_name_the_line_and_key() {
        let e =
            err("[[route]]\nname = \"x\"\n[[route.targets]]\nsubject = \"s\"\nsubjet = \"t\"\n");
        assert!(
            e.starts_with("rules file: line 5: unknown field `subjet`"),
            "{e}"
        );
        let e = err(
            "[[route]]\nname = \"x\"\nstrategy = \"sometimes\"\n[[route.targets]]\nsubject = \"s\"\n",
        );
        assert!(e.contains("line 3") && e.contains("all_or_nothing"), "{e}");
        let e = err("[[route]]\nname = \"x\"\nmatch = { tenant = \"a\" }\n");
        assert!(e.contains("unknown field `tenant`"), "{e}");
        let e = err("[[route]]\nname = \"x\"\nmatch = { tenant_id = 1 }\n");
        assert!(e.contains("a string or a list of strings"), "{e}");
        let e = err(
            "[[route]]\nname = \"x\"\n[[route.targets]]\nsubject = \"s\"\ndelay_seconds = -1\n",
        );
        assert!(e.contains("line 5"), "{e}");
        let e = err("routes = []\n");
        assert!(e.contains("unknown field `routes`"), "{e}");
        assert!(err("[[route]\n").starts_with("rules file: line 1"));
    }
}
