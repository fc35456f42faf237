//! Collections of the dialect: `{"total": N, "data": [...]}` with the query parameters `start`,
//! `limit`, `filter` and `sort` (spec 1.2).
//!
//! Filter and sort work on the wire representation (the camelCase property names a client sees),
//! so every collection supports them the same way. They apply before `start` and `limit`;
//! `total` counts what the filter let through, before paging.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::error::{VroError, VroResult};

/// The envelope of every collection.
#[derive(Debug, Serialize, ToSchema)]
pub struct Collection<T> {
    /// How many items matched the filter (before `start` and `limit`).
    pub total: u64,
    pub data: Vec<T>,
}

/// The query parameters every collection takes.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct CollectionQuery {
    /// Skip this many items.
    pub start: Option<u64>,
    /// Return at most this many items.
    pub limit: Option<u64>,
    /// A JSON array of `{"property", "operator": "==", "value"}`; all must match.
    pub filter: Option<String>,
    /// A JSON array of `{"property", "direction": "ASC" | "DESC"}`, first key first.
    pub sort: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterTerm {
    property: String,
    operator: String,
    value: Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SortKey {
    property: String,
    #[serde(default = "asc")]
    direction: String,
}

fn asc() -> String {
    "ASC".into()
}

/// One property of an item, found case-insensitively (clients spell `Name` and `name`).
fn property<'a>(item: &'a Value, name: &str) -> Option<&'a Value> {
    let obj = item.as_object()?;
    obj.get(name).or_else(|| obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
}

fn matches(actual: Option<&Value>, wanted: &Value) -> bool {
    match (actual, wanted) {
        (Some(Value::String(a)), Value::String(w)) => a.eq_ignore_ascii_case(w),
        // A query string cannot say whether `true` or `5` is a string; compare the text.
        (Some(a @ (Value::Bool(_) | Value::Number(_))), Value::String(w)) => {
            serde_json::from_str::<Value>(w).is_ok_and(|parsed| parsed == *a)
        }
        (Some(a), w) => a == w,
        (None, Value::Null) => true,
        (None, _) => false,
    }
}

fn compare(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    fn rank(v: Option<&Value>) -> u8 {
        match v {
            None | Some(Value::Null) => 0,
            Some(Value::Bool(_)) => 1,
            Some(Value::Number(_)) => 2,
            Some(Value::String(_)) => 3,
            Some(_) => 4,
        }
    }
    match (a, b) {
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        (Some(Value::Number(x)), Some(Value::Number(y))) => {
            x.as_f64().unwrap_or(0.0).partial_cmp(&y.as_f64().unwrap_or(0.0)).unwrap_or(Ordering::Equal)
        }
        (Some(Value::String(x)), Some(Value::String(y))) => {
            x.to_lowercase().cmp(&y.to_lowercase()).then_with(|| x.cmp(y))
        }
        _ => rank(a).cmp(&rank(b)),
    }
}

impl CollectionQuery {
    /// Filters, sorts and pages `items`. A malformed `filter` or `sort` is a 400 (`InvalidURI`).
    pub fn apply<T: Serialize>(&self, items: Vec<T>) -> VroResult<Collection<Value>> {
        let filter: Vec<FilterTerm> = parse_param("filter", self.filter.as_deref())?;
        let sort: Vec<SortKey> = parse_param("sort", self.sort.as_deref())?;
        for f in &filter {
            if f.operator != "==" {
                return Err(VroError::Uri(format!(
                    "filter on {:?}: operator {:?} is not supported (use \"==\")",
                    f.property, f.operator
                )));
            }
        }
        let mut descending = Vec::with_capacity(sort.len());
        for s in &sort {
            descending.push(match s.direction.to_ascii_uppercase().as_str() {
                "ASC" => false,
                "DESC" => true,
                other => {
                    return Err(VroError::Uri(format!(
                        "sort on {:?}: direction {other:?} is not ASC or DESC",
                        s.property
                    )));
                }
            });
        }
        let mut data = Vec::with_capacity(items.len());
        for item in items {
            let v = serde_json::to_value(item).map_err(|e| drover_types::Error::internal(e.to_string()))?;
            if filter.iter().all(|f| matches(property(&v, &f.property), &f.value)) {
                data.push(v);
            }
        }
        data.sort_by(|a, b| {
            sort.iter()
                .zip(&descending)
                .map(|(s, desc)| {
                    let o = compare(property(a, &s.property), property(b, &s.property));
                    if *desc { o.reverse() } else { o }
                })
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
        });
        let total = data.len() as u64;
        let start = usize::try_from(self.start.unwrap_or(0)).unwrap_or(usize::MAX);
        let limit = usize::try_from(self.limit.unwrap_or(u64::MAX)).unwrap_or(usize::MAX);
        let data = data.into_iter().skip(start).take(limit).collect();
        Ok(Collection { total, data })
    }
}

fn parse_param<T: serde::de::DeserializeOwned>(name: &str, text: Option<&str>) -> VroResult<Vec<T>> {
    match text.map(str::trim) {
        None | Some("") => Ok(Vec::new()),
        Some(t) => serde_json::from_str(t)
            .map_err(|e| VroError::Uri(format!("{name} must be a JSON array of {name} terms: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn items() -> Vec<Value> {
        vec![
            json!({"name": "b", "n": 2, "on": true}),
            json!({"name": "A", "n": 10, "on": false}),
            json!({"name": "c", "n": 1, "on": true}),
        ]
    }

    fn names(c: &Collection<Value>) -> Vec<&str> {
        c.data.iter().map(|v| v["name"].as_str().unwrap()).collect()
    }

    fn query(start: Option<u64>, limit: Option<u64>, filter: Option<&str>, sort: Option<&str>) -> CollectionQuery {
        CollectionQuery { start, limit, filter: filter.map(Into::into), sort: sort.map(Into::into) }
    }

    #[test]
    fn filter_and_sort_apply_before_start_and_limit() {
        let q = query(Some(1), Some(1), Some(r#"[{"property":"on","operator":"==","value":true}]"#), None);
        let c = q.apply(items()).unwrap();
        assert_eq!((c.total, names(&c)), (2, vec!["c"]));
        let q = query(None, Some(2), None, Some(r#"[{"property":"n","direction":"DESC"}]"#));
        let c = q.apply(items()).unwrap();
        assert_eq!((c.total, names(&c)), (3, vec!["A", "b"]));
        let q = query(None, None, None, Some(r#"[{"property":"Name","direction":"asc"}]"#));
        assert_eq!(names(&q.apply(items()).unwrap()), vec!["A", "b", "c"]);
        // Strings compare without regard to case; booleans given as text still match.
        let q = query(None, None, Some(r#"[{"property":"name","operator":"==","value":"a"}]"#), None);
        assert_eq!(names(&q.apply(items()).unwrap()), vec!["A"]);
        let q = query(None, None, Some(r#"[{"property":"on","operator":"==","value":"false"}]"#), None);
        assert_eq!(names(&q.apply(items()).unwrap()), vec!["A"]);
        // Past the end: nothing, but the total still counts.
        let c = query(Some(5), None, None, None).apply(items()).unwrap();
        assert_eq!((c.total, c.data.len()), (3, 0));
    }

    #[test]
    fn malformed_parameters_are_invalid_uri() {
        for (filter, sort) in [
            (Some("not json"), None),
            (Some(r#"[{"property":"n","operator":">","value":1}]"#), None),
            (Some(r#"{"property":"n"}"#), None),
            (None, Some(r#"[{"property":"n","direction":"UP"}]"#)),
        ] {
            let err = query(None, None, filter, sort).apply(items()).unwrap_err();
            let (status, code, ..) = err.parts();
            assert_eq!(
                (status.as_u16(), code),
                (400, super::super::error::ErrorCode::InvalidUri),
                "{filter:?} {sort:?}"
            );
        }
    }
}
