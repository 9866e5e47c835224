//! The Mongo-style metadata filter language, compiled once per query.
//!
//! Supported: implicit equality, `$eq $ne $gt $gte $lt $lte $in $nin $exists $contains $regex`
//! on fields; `$and $or $nor $not` to combine; dotted paths into nested objects; a field holding
//! an array matches an operand equal to any of its elements (`{"tags": "x"}` matches
//! `{"tags": ["x", "y"]}`). Several keys in one object are ANDed. Numbers compare as f64,
//! strings lexicographically; comparing a number with a string is simply false.

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
    All(Vec<Cond>),
    Not(Box<Cond>),
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
            Filter::Field { path, cond } => cond.eval(metadata.and_then(|m| resolve(m, path))),
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
            "$not" => match operand {
                Value::Object(_) => Cond::Not(Box::new(compile_cond(field, operand)?)),
                _ => return err(format!("$not on '{field}' takes an operator object")),
            },
            other => {
                return err(format!(
                    "unknown operator {other} on '{field}'; supported: $eq $ne $gt $gte $lt $lte $in $nin $exists $contains $regex $not"
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

/// Look a dotted path up: a literal key wins, then nested objects.
fn resolve<'a>(root: &'a Value, path: &str) -> Option<&'a Value> {
    let obj = root.as_object()?;
    if let Some(v) = obj.get(path) {
        return Some(v);
    }
    let (head, tail) = path.split_once('.')?;
    resolve(obj.get(head)?, tail)
}

fn scalar_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// Equality with array membership: `[x, y] == x`.
fn eq_member(field: &Value, operand: &Value) -> bool {
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
    fn eval(&self, field: Option<&Value>) -> bool {
        match self {
            Cond::Eq(v) => field.is_some_and(|f| eq_member(f, v)),
            Cond::Ne(v) => !field.is_some_and(|f| eq_member(f, v)),
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
            Cond::All(cs) => cs.iter().all(|c| c.eval(field)),
            Cond::Not(c) => !c.eval(field),
        }
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
        assert!(m(json!({"missing": {"$ne": "pop"}})));
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
        ] {
            let e = Filter::compile(v.as_object().unwrap()).unwrap_err();
            assert!(e.0.contains(needle), "{e}");
        }
        assert!(Filter::compile(&Map::new()).unwrap().is_none());
    }
}
