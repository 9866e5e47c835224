//! The Mongo-style metadata filter language, compiled once per query.
//!
//! Supported: implicit equality, `$eq $ne $gt $gte $lt $lte $in $nin $exists $contains $regex
//! $type`
//! on fields; `$and $or $nor $not` to combine; dotted paths into nested objects; a field holding
//! an array matches an operand equal to any of its elements (`{"tags": "x"}` matches
//! `{"tags": ["x", "y"]}`). Several keys in one object are ANDed. Numbers compare as f64,
//! strings lexicographically; comparing a number with a string is simply false.
//!
//! Which values a field has follows the original service (observed on cyborgdb-service
//! 0.18.0): only leaves count. A field whose value is `null`, an object, or a list with no
//! non-null element does not exist (`$exists: false`), so it matches no condition but the
//! negative ones (`$nin`, `$not`, `$nor`); `null` inside a list is skipped; a `null`, list or
//! object operand of `$eq`/`$in` matches nothing; `$ne` needs the field to exist (`{"f": {"$ne":
//! null}}` is "f exists", `{"f": {"$ne": 1}}` does not match an item without `f`).

use serde_json::{Map, Value};

/// A compiled filter.
#[derive(Debug, Clone)]
pub enum Filter {
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Not(Box<Filter>),
    Field { path: String, cond: Cond },
}

/// A condition on one field's value.
#[derive(Debug, Clone)]
pub enum Cond {
    Eq(Value),
    Ne(Value),
    Cmp(std::cmp::Ordering, bool, Value),
    In(Vec<Value>),
    Nin(Vec<Value>),
    Exists(bool),
    Contains(Value),
    Regex(regex::Regex),
    /// `$type`: the field's stored value (before the rules above) has one of these types.
    Type(Vec<JsonType>),
    All(Vec<Cond>),
    Not(Box<Cond>),
}

/// A JSON type name of `$type` (MongoDB's names for JSON's types, and their aliases).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonType {
    String,
    Number,
    Bool,
    Array,
    Object,
    Null,
}

impl JsonType {
    fn parse(field: &str, v: &Value) -> Result<Vec<JsonType>, FilterError> {
        let one = |v: &Value| -> Result<JsonType, FilterError> {
            Ok(match v.as_str() {
                Some("string") => JsonType::String,
                Some("number" | "int" | "long" | "double" | "decimal") => JsonType::Number,
                Some("bool" | "boolean") => JsonType::Bool,
                Some("array" | "list") => JsonType::Array,
                Some("object") => JsonType::Object,
                Some("null") => JsonType::Null,
                _ => {
                    return err(format!(
                        "$type on '{field}' takes a type name (string, number, bool, array, object, null) or a list of them"
                    ))
                }
            })
        };
        match v {
            Value::Array(items) if !items.is_empty() => items.iter().map(one).collect(),
            Value::Array(_) => err(format!("$type on '{field}' needs at least one type name")),
            v => Ok(vec![one(v)?]),
        }
    }

    fn of(v: &Value) -> JsonType {
        match v {
            Value::String(_) => JsonType::String,
            Value::Number(_) => JsonType::Number,
            Value::Bool(_) => JsonType::Bool,
            Value::Array(_) => JsonType::Array,
            Value::Object(_) => JsonType::Object,
            Value::Null => JsonType::Null,
        }
    }
}

/// Why a filter was rejected; the text names the offending part.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid filter: {0}")]
pub struct FilterError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, FilterError> {
    Err(FilterError(msg.into()))
}

impl Filter {
    /// Compile a filter object. An empty object matches everything (`None`).
    pub fn compile(obj: &Map<String, Value>) -> Result<Option<Filter>, FilterError> {
        if obj.is_empty() {
            return Ok(None);
        }
        Ok(Some(compile_obj(obj)?))
    }

    /// Whether `metadata` (absent = `{}`) satisfies the filter.
    pub fn matches(&self, metadata: Option<&Value>) -> bool {
        match self {
            Filter::All(fs) => fs.iter().all(|f| f.matches(metadata)),
            Filter::Any(fs) => fs.iter().any(|f| f.matches(metadata)),
            Filter::Not(f) => !f.matches(metadata),
            Filter::Field { path, cond } => {
                let raw = metadata.and_then(|m| resolve(m, path));
                cond.eval(raw, leaf(raw))
            }
        }
    }
}

fn compile_obj(obj: &Map<String, Value>) -> Result<Filter, FilterError> {
    let mut parts = Vec::with_capacity(obj.len());
    for (k, v) in obj {
        parts.push(match k.as_str() {
            "$and" | "$or" | "$nor" => {
                let Value::Array(items) = v else {
                    return err(format!("{k} takes an array of filter objects"));
                };
                if items.is_empty() {
                    return err(format!("{k} needs at least one filter object"));
                }
                let subs = items
                    .iter()
                    .map(|i| match i {
                        Value::Object(o) => compile_obj(o),
                        _ => err(format!("{k} takes an array of filter objects")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                match k.as_str() {
                    "$and" => Filter::All(subs),
                    "$or" => Filter::Any(subs),
                    _ => Filter::Not(Box::new(Filter::Any(subs))),
                }
            }
            "$not" => match v {
                Value::Object(o) => Filter::Not(Box::new(compile_obj(o)?)),
                _ => return err("$not takes a filter object"),
            },
            op if op.starts_with('$') => {
                return err(format!(
                    "unknown top-level operator {op}; use $and, $or, $nor, $not or a field name"
                ))
            }
            "" => return err("field names must not be empty"),
            field => Filter::Field {
                path: field.to_owned(),
                cond: compile_cond(field, v)?,
            },
        });
    }
    Ok(if parts.len() == 1 {
        parts.pop().expect("one element")
    } else {
        Filter::All(parts)
    })
}

fn scalar_operand(field: &str, op: &str, v: &Value) -> Result<Value, FilterError> {
    match v {
        Value::Bool(_) | Value::Number(_) | Value::String(_) | Value::Null => Ok(v.clone()),
        Value::Array(_) | Value::Object(_) if op == "$eq" || op == "$ne" => Ok(v.clone()),
        _ => err(format!(
            "{op} on '{field}' takes a number, string or boolean"
        )),
    }
}

fn compile_cond(field: &str, v: &Value) -> Result<Cond, FilterError> {
    let Value::Object(ops) = v else {
        return Ok(Cond::Eq(v.clone()));
    };
    if ops.is_empty() || !ops.keys().any(|k| k.starts_with('$')) {
        // A plain object: equality with that object.
        return Ok(Cond::Eq(v.clone()));
    }
    let mut conds = Vec::with_capacity(ops.len());
    for (op, operand) in ops {
        use std::cmp::Ordering::*;
        conds.push(match op.as_str() {
            "$eq" => Cond::Eq(scalar_operand(field, op, operand)?),
            "$ne" => Cond::Ne(scalar_operand(field, op, operand)?),
            "$gt" | "$gte" | "$lt" | "$lte" => {
                if !(operand.is_number() || operand.is_string()) {
                    return err(format!("{op} on '{field}' takes a number or a string"));
                }
                let (ord, or_equal) = match op.as_str() {
                    "$gt" => (Greater, false),
                    "$gte" => (Greater, true),
                    "$lt" => (Less, false),
                    _ => (Less, true),
                };
                Cond::Cmp(ord, or_equal, operand.clone())
            }
            "$in" | "$nin" => {
                let Value::Array(items) = operand else {
                    return err(format!("{op} on '{field}' takes an array"));
                };
                if op == "$in" {
                    Cond::In(items.clone())
                } else {
                    Cond::Nin(items.clone())
                }
            }
            "$exists" => match operand {
                Value::Bool(b) => Cond::Exists(*b),
                _ => return err(format!("$exists on '{field}' takes true or false")),
            },
            "$contains" => Cond::Contains(scalar_operand(field, op, operand)?),
            "$regex" => {
                let Value::String(pat) = operand else {
                    return err(format!("$regex on '{field}' takes a string pattern"));
                };
                let ci = matches!(ops.get("$options"), Some(Value::String(o)) if o.contains('i'));
                let re = regex::RegexBuilder::new(pat)
                    .case_insensitive(ci)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| FilterError(format!("$regex on '{field}': {e}")))?;
                Cond::Regex(re)
            }
            "$options" => continue,
            "$type" => Cond::Type(JsonType::parse(field, operand)?),
            "$not" => match operand {
                Value::Object(_) => Cond::Not(Box::new(compile_cond(field, operand)?)),
                _ => return err(format!("$not on '{field}' takes an operator object")),
            },
            other => {
                return err(format!(
                    "unknown operator {other} on '{field}'; supported: $eq $ne $gt $gte $lt $lte $in $nin $exists $contains $regex $type $not"
                ))
            }
        });
    }
    Ok(if conds.len() == 1 {
        conds.pop().expect("one element")
    } else {
        Cond::All(conds)
    })
}

/// The value of a dotted path for filtering and sorting, if it has one (see [`leaf`]).
pub(crate) fn value_at<'a>(metadata: Option<&'a Value>, path: &str) -> Option<&'a Value> {
    leaf(metadata.and_then(|m| resolve(m, path)))
}

impl Filter {
    /// Why the metadata-only path cannot answer this filter, if it cannot, as the original
    /// enforces an index's `metadata_schema` there: a field declared `filterable: false`
    /// cannot be filtered on, `$regex` / `$contains` need a `pattern` field, and `$type` is
    /// refused.
    pub fn metadata_only_refusal(
        &self,
        schema: &dyn Fn(&str) -> Option<super::FieldSchema>,
    ) -> Option<String> {
        match self {
            Filter::All(fs) | Filter::Any(fs) => {
                fs.iter().find_map(|f| f.metadata_only_refusal(schema))
            }
            Filter::Not(f) => f.metadata_only_refusal(schema),
            Filter::Field { path, cond } => {
                let field = schema(path);
                if field.is_some_and(|f| !f.filterable) {
                    return Some(format!(
                        "query_metadata cannot filter on '{path}': metadata_schema makes it not filterable; use /v1/vectors/query with a vector"
                    ));
                }
                cond.metadata_only_refusal(path, field.is_some_and(|f| f.pattern))
            }
        }
    }
}

impl Cond {
    fn metadata_only_refusal(&self, path: &str, pattern: bool) -> Option<String> {
        match self {
            Cond::Regex(_) | Cond::Contains(_) if !pattern => Some(format!(
                "$regex and $contains on '{path}' need a pattern field (metadata_schema {{\"{path}\": {{\"pattern\": true}}}} at create); use /v1/vectors/query with a vector for them"
            )),
            Cond::Type(_) => Some(format!(
                "$type on '{path}' is not supported by query_metadata; use /v1/vectors/query with a vector"
            )),
            Cond::All(cs) => cs.iter().find_map(|c| c.metadata_only_refusal(path, pattern)),
            Cond::Not(c) => c.metadata_only_refusal(path, pattern),
            _ => None,
        }
    }
}

/// Look a dotted path up: a literal key wins, then nested objects.
fn resolve<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    let obj = root.as_object()?;
    if let Some(v) = obj.get(path) {
        return Some(v);
    }
    let (head, tail) = path.split_once('.')?;
    resolve(obj.get(head)?, tail)
}

/// The value a field has for filtering, if it has one: `null`, objects and lists without a
/// non-null element are not values (see the module documentation).
fn leaf(v: Option<&Value>) -> Option<&Value> {
    match v? {
        Value::Null | Value::Object(_) => None,
        Value::Array(items) if items.iter().all(Value::is_null) => None,
        v => Some(v),
    }
}

fn scalar_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// Equality with array membership: `[x, y] == x`. Only scalar operands ever match.
fn eq_member(field: &Value, operand: &Value) -> bool {
    if matches!(operand, Value::Null | Value::Array(_) | Value::Object(_)) {
        return false;
    }
    scalar_eq(field, operand)
        || matches!(field, Value::Array(items) if items.iter().any(|i| scalar_eq(i, operand)))
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

impl Cond {
    /// `raw`: the value stored at the path; `field`: its value for filtering ([`leaf`]).
    fn eval(&self, raw: Option<&Value>, field: Option<&Value>) -> bool {
        match self {
            Cond::Eq(v) => field.is_some_and(|f| eq_member(f, v)),
            Cond::Ne(v) => field.is_some_and(|f| !eq_member(f, v)),
            Cond::Cmp(ord, or_equal, v) => field.is_some_and(|f| {
                let test = |x: &Value| {
                    compare(x, v).is_some_and(|o| o == *ord || (*or_equal && o.is_eq()))
                };
                match f {
                    Value::Array(items) => items.iter().any(test),
                    _ => test(f),
                }
            }),
            Cond::In(vs) => field.is_some_and(|f| vs.iter().any(|v| eq_member(f, v))),
            Cond::Nin(vs) => !field.is_some_and(|f| vs.iter().any(|v| eq_member(f, v))),
            Cond::Exists(want) => field.is_some() == *want,
            Cond::Contains(v) => field.is_some_and(|f| match (f, v) {
                (Value::String(s), Value::String(sub)) => s.contains(sub.as_str()),
                (Value::Array(items), _) => items.iter().any(|i| scalar_eq(i, v)),
                _ => false,
            }),
            Cond::Regex(re) => field.is_some_and(|f| match f {
                Value::String(s) => re.is_match(s),
                Value::Array(items) => items
                    .iter()
                    .any(|i| i.as_str().is_some_and(|s| re.is_match(s))),
                _ => false,
            }),
            // A list also has the types of its elements (as in MongoDB).
            Cond::Type(ts) => raw.is_some_and(|v| {
                ts.contains(&JsonType::of(v))
                    || matches!(v, Value::Array(items) if items.iter().any(|i| ts.contains(&JsonType::of(i))))
            }),
            Cond::All(cs) => cs.iter().all(|c| c.eval(raw, field)),
            Cond::Not(c) => !c.eval(raw, field),
        }
    }
}

/// A scalar as the value index keys it: a type byte and its bytes (`1 || UTF-8` for a
/// string, `2 || f64 LE` for a number, `-0` as `0`, since numbers compare as f64; `3 || 0|1`
/// for a boolean). Two values are equal under the filter's `$eq` exactly when these are.
pub type IndexValue = Vec<u8>;

fn index_value(v: &Value) -> Option<IndexValue> {
    match v {
        Value::String(s) => {
            let mut out = Vec::with_capacity(1 + s.len());
            out.push(1);
            out.extend_from_slice(s.as_bytes());
            Some(out)
        }
        Value::Number(n) => {
            let x = n.as_f64()?;
            let x = if x == 0.0 { 0.0 } else { x };
            let mut out = vec![2];
            out.extend_from_slice(&x.to_le_bytes());
            Some(out)
        }
        Value::Bool(b) => Some(vec![3, u8::from(*b)]),
        _ => None,
    }
}

/// The values an item has at `path` for the value index: those an `$eq` operand can match
/// (the leaf, or each scalar element of a list leaf).
pub fn index_values(
    metadata: Option<&Value>,
    path: &str,
) -> std::collections::BTreeSet<IndexValue> {
    match value_at(metadata, path) {
        Some(Value::Array(items)) => items.iter().filter_map(index_value).collect(),
        Some(v) => index_value(v).into_iter().collect(),
        None => Default::default(),
    }
}

/// The values a condition needs one of, if the value index can answer it: `$eq` and `$in`
/// (an operand that can match nothing, such as `null`, contributes no value), or a
/// conjunction holding one of them. `None`: the index cannot narrow this condition down.
pub fn indexed_operands(cond: &Cond) -> Option<Vec<IndexValue>> {
    match cond {
        Cond::Eq(v) => Some(index_value(v).into_iter().collect()),
        Cond::In(vs) => Some(vs.iter().filter_map(index_value).collect()),
        Cond::All(cs) => cs.iter().find_map(indexed_operands),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn f(v: Value) -> Filter {
        Filter::compile(v.as_object().unwrap()).unwrap().unwrap()
    }

    fn doc() -> Value {
        json!({"year": 2021, "genre": "rock", "tags": ["a", "b"], "nested": {"v": 3},
               "flag": true, "score": 0.5})
    }

    #[test]
    fn operators() {
        let d = doc();
        let m = |v: Value| f(v).matches(Some(&d));
        assert!(m(json!({"genre": "rock"})));
        assert!(!m(json!({"genre": "jazz"})));
        assert!(m(json!({"year": {"$gte": 2020, "$lte": 2021}})));
        assert!(!m(json!({"year": {"$gt": 2021}})));
        assert!(m(json!({"year": {"$lt": 2022.5}})));
        assert!(m(json!({"year": {"$eq": 2021.0}})));
        assert!(m(json!({"genre": {"$ne": "pop"}})));
        assert!(
            !m(json!({"missing": {"$ne": "pop"}})),
            "$ne needs the field"
        );
        assert!(m(json!({"genre": {"$in": ["pop", "rock"]}})));
        assert!(m(json!({"genre": {"$nin": ["pop"]}})));
        assert!(m(json!({"tags": "a"})));
        assert!(!m(json!({"tags": {"$nin": ["b"]}})));
        assert!(m(json!({"tags": {"$in": ["z", "b"]}})));
        assert!(m(json!({"nested.v": 3})));
        assert!(m(json!({"nested.v": {"$gt": 2}})));
        assert!(m(
            json!({"missing": {"$exists": false}, "genre": {"$exists": true}})
        ));
        assert!(m(json!({"$or": [{"genre": "pop"}, {"flag": true}]})));
        assert!(!m(json!({"$and": [{"genre": "rock"}, {"flag": false}]})));
        assert!(m(json!({"$not": {"genre": "pop"}})));
        assert!(m(json!({"year": {"$not": {"$gt": 2022}}})));
        assert!(m(json!({"$nor": [{"genre": "pop"}]})));
        assert!(m(json!({"genre": {"$regex": "^RO", "$options": "i"}})));
        assert!(m(json!({"genre": {"$contains": "oc"}})));
        assert!(m(json!({"tags": {"$contains": "b"}})));
        assert!(
            !m(json!({"year": {"$gt": "2000"}})),
            "number vs string never matches"
        );
        // No metadata behaves like {}.
        assert!(f(json!({"x": {"$exists": false}})).matches(None));
        assert!(!f(json!({"x": 1})).matches(None));
    }

    /// What cyborgdb-service 0.18.0 answers for nulls, objects and lists (probed on the
    /// same items; the expected sets are its answers).
    #[test]
    fn nulls_objects_and_lists_as_the_original() {
        let items = [
            (
                "a",
                json!({"alpha": 2, "mid": {"y": 1, "b": null}, "n": null, "l": ["x", null]}),
            ),
            ("b", json!({"alpha": 3, "n": 5, "l": ["y", "x"]})),
            ("c", json!({"other": true, "l": [], "mid": {"y": 2}})),
            (
                "d",
                json!({"n": "str", "alpha": null, "mid": null, "l": [null]}),
            ),
        ];
        let hits = |v: Value| -> String {
            let flt = f(v);
            items
                .iter()
                .filter(|(_, m)| flt.matches(Some(m)))
                .map(|(id, _)| *id)
                .collect()
        };
        for (filter, want) in [
            (json!({"n": null}), ""),
            (json!({"n": {"$eq": null}}), ""),
            (json!({"n": {"$ne": null}}), "bd"),
            (json!({"n": {"$exists": true}}), "bd"),
            (json!({"n": {"$exists": false}}), "ac"),
            (json!({"n": {"$in": [null, 5]}}), "b"),
            (json!({"n": {"$nin": [null]}}), "abcd"),
            (json!({"alpha": {"$ne": null}}), "ab"),
            (json!({"alpha": {"$ne": 2}}), "b"),
            (json!({"alpha": {"$nin": [2]}}), "bcd"),
            (json!({"$not": {"n": {"$eq": 5}}}), "acd"),
            (json!({"$nor": [{"n": null}]}), "abcd"),
            (json!({"$or": [{"n": null}, {"alpha": 3}]}), "b"),
            (json!({"mid": {"$exists": true}}), ""),
            (json!({"mid.b": {"$exists": true}}), ""),
            (json!({"mid.y": {"$exists": true}}), "ac"),
            (json!({"mid.y": {"$ne": 1}}), "c"),
            (json!({"l": "x"}), "ab"),
            (json!({"l": {"$ne": "x"}}), ""),
            (json!({"l": {"$nin": ["x"]}}), "cd"),
            (json!({"l": {"$exists": true}}), "ab"),
            (json!({"l": {"$ne": null}}), "ab"),
            (json!({"l": {"$eq": ["x"]}}), ""),
            (json!({"l": ["y", "x"]}), ""),
            (json!({"l": []}), ""),
            // `$type` sees the stored value, nulls and objects included (the original
            // refuses `$type`; these are our choices).
            (json!({"n": {"$type": "null"}}), "a"),
            (json!({"n": {"$type": ["string", "number"]}}), "bd"),
            (json!({"mid": {"$type": "object"}}), "ac"),
            (json!({"l": {"$type": "array"}}), "abcd"),
            (json!({"l": {"$type": "string"}}), "ab"),
            (json!({"other": {"$type": "bool"}}), "c"),
            (json!({"alpha": {"$type": "number", "$gt": 2}}), "b"),
        ] {
            assert_eq!(hits(filter.clone()), want, "{filter}");
        }
    }

    #[test]
    fn bad_filters_are_rejected_with_a_reason() {
        for (v, needle) in [
            (json!({"$or": {}}), "$or"),
            (json!({"$bogus": 1}), "$bogus"),
            (json!({"a": {"$gt": [1]}}), "$gt"),
            (json!({"a": {"$in": 3}}), "$in"),
            (json!({"a": {"$exists": 1}}), "$exists"),
            (json!({"a": {"$regex": "("}}), "$regex"),
            (json!({"a": {"$weird": 1}}), "$weird"),
            (json!({"a": {"$type": "date"}}), "$type"),
            (json!({"a": {"$type": []}}), "$type"),
        ] {
            let e = Filter::compile(v.as_object().unwrap()).unwrap_err();
            assert!(e.0.contains(needle), "{e}");
        }
        assert!(Filter::compile(&Map::new()).unwrap().is_none());
    }
}
