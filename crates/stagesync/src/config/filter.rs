//! `[[collections]] filter`: a MongoDB query on the production document, written as a TOML
//! table — checked here (only the operators stagesync can also evaluate itself are accepted)
//! and turned into BSON.

use mongodb::bson::{Bson, DateTime, Document};

use super::error::KeyPath;
use super::{key_error, KeyError};

/// Operators a filter may use on a field (`amount = { "$gte" = 100 }`). stagesync evaluates
/// the filter itself for update events (to see a document leave the subset) and lets the
/// server evaluate it for snapshots and inserts, so both must mean the same: only operators
/// whose meaning does not depend on the server are accepted.
pub const FIELD_OPERATORS: &[&str] = &[
    "$eq",
    "$ne",
    "$gt",
    "$gte",
    "$lt",
    "$lte",
    "$in",
    "$nin",
    "$exists",
    "$not",
    "$all",
    "$size",
    "$elemMatch",
];

/// Operators combining whole queries (`"$or" = [{ region = "eu" }, { vip = true }]`).
pub const LOGICAL_OPERATORS: &[&str] = &["$and", "$or", "$nor"];

fn operator_list() -> String {
    LOGICAL_OPERATORS
        .iter()
        .chain(FIELD_OPERATORS)
        .map(|o| format!("`{o}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks a filter table; `at` is its key path (`collections[0].filter`).
pub(super) fn check(at: &KeyPath, table: &toml::Table) -> Result<(), KeyError> {
    for (key, value) in table {
        let here = at.key(key);
        if key.starts_with('$') {
            if !LOGICAL_OPERATORS.contains(&key.as_str()) {
                return Err(unsupported(here, key));
            }
            check_query_list(&here, value)?;
            continue;
        }
        if key.is_empty() || key.split('.').any(|s| s.is_empty() || s.starts_with('$')) {
            return Err(key_error(
                here,
                format!("\"{key}\" is not a field path: use names separated by dots, e.g. \"shipping.country\""),
            ));
        }
        check_condition(&here, value)?;
    }
    Ok(())
}

fn unsupported(at: KeyPath, op: &str) -> KeyError {
    key_error(
        at,
        format!(
            "operator `{op}` is not supported in a filter; supported: {}",
            operator_list()
        ),
    )
}

fn check_query_list(at: &KeyPath, value: &toml::Value) -> Result<(), KeyError> {
    match value {
        toml::Value::Array(items) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                match item {
                    toml::Value::Table(t) => check(&at.index(i), t)?,
                    _ => {
                        return Err(key_error(
                            at.index(i),
                            "expected a table (a query), e.g. { region = \"eu\" }",
                        ))
                    }
                }
            }
            Ok(())
        }
        _ => Err(key_error(
            at.clone(),
            "expected a non-empty array of queries, e.g. [{ region = \"eu\" }, { vip = true }]",
        )),
    }
}

/// The condition on one field: a plain value (equality) or a table of operators.
fn check_condition(at: &KeyPath, value: &toml::Value) -> Result<(), KeyError> {
    check_value(at, value)?;
    let toml::Value::Table(t) = value else {
        return Ok(());
    };
    let operators = t.keys().filter(|k| k.starts_with('$')).count();
    if operators == 0 {
        return Ok(()); // an embedded document compared as a whole
    }
    if operators != t.len() {
        return Err(key_error(
            at.clone(),
            "mixes operators (`$…`) and field names: write either { \"$gte\" = 1 } or an embedded document",
        ));
    }
    for (op, v) in t {
        let here = at.key(op);
        match op.as_str() {
            "$eq" | "$ne" | "$gt" | "$gte" | "$lt" | "$lte" => {}
            "$in" | "$nin" | "$all" => {
                if !matches!(v, toml::Value::Array(_)) {
                    return Err(key_error(
                        here,
                        format!("`{op}` needs an array, e.g. [\"eu\", \"us\"]"),
                    ));
                }
            }
            "$exists" => {
                if !matches!(v, toml::Value::Boolean(_)) {
                    return Err(key_error(here, "`$exists` needs true or false"));
                }
            }
            "$size" => {
                if !matches!(v, toml::Value::Integer(n) if *n >= 0) {
                    return Err(key_error(here, "`$size` needs a whole number of 0 or more"));
                }
            }
            "$not" => match v {
                toml::Value::Table(inner)
                    if !inner.is_empty() && inner.keys().all(|k| k.starts_with('$')) =>
                {
                    check_condition(&here, v)?
                }
                _ => {
                    return Err(key_error(
                        here,
                        "`$not` needs a table of operators, e.g. { \"$in\" = [\"eu\"] }",
                    ))
                }
            },
            "$elemMatch" => match v {
                toml::Value::Table(inner) if !inner.is_empty() => {
                    if inner.keys().all(|k| k.starts_with('$')) {
                        check_condition(&here, v)?
                    } else {
                        check(&here, inner)?
                    }
                }
                _ => {
                    return Err(key_error(
                        here,
                        "`$elemMatch` needs a table: operators or a query on the elements",
                    ))
                }
            },
            other => return Err(unsupported(here, other)),
        }
    }
    Ok(())
}

/// Values must have a BSON form: offset date-times only (a date without a time zone means
/// different instants on different hosts).
fn check_value(at: &KeyPath, value: &toml::Value) -> Result<(), KeyError> {
    match value {
        toml::Value::Datetime(d) => {
            if to_bson(value).is_none() {
                return Err(key_error(
                    at.clone(),
                    format!("{d} has no time zone: write an instant such as 2024-01-31T00:00:00Z"),
                ));
            }
            Ok(())
        }
        toml::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                check_value(&at.index(i), v)?;
            }
            Ok(())
        }
        toml::Value::Table(t) => {
            for (k, v) in t {
                check_value(&at.key(k), v)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The BSON form of a checked TOML value: integers as Int32 when they fit (else Int64),
/// offset date-times as dates.
pub fn to_bson(value: &toml::Value) -> Option<Bson> {
    Some(match value {
        toml::Value::String(s) => Bson::String(s.clone()),
        toml::Value::Integer(n) => match i32::try_from(*n) {
            Ok(small) => Bson::Int32(small),
            Err(_) => Bson::Int64(*n),
        },
        toml::Value::Float(f) => Bson::Double(*f),
        toml::Value::Boolean(b) => Bson::Boolean(*b),
        toml::Value::Datetime(d) => {
            d.date.as_ref()?;
            d.time.as_ref()?;
            d.offset.as_ref()?;
            Bson::DateTime(DateTime::parse_rfc3339_str(d.to_string()).ok()?)
        }
        toml::Value::Array(items) => {
            Bson::Array(items.iter().map(to_bson).collect::<Option<Vec<_>>>()?)
        }
        toml::Value::Table(t) => Bson::Document(table_to_document(t)?),
    })
}

/// The BSON document of a checked filter table.
pub fn table_to_document(t: &toml::Table) -> Option<Document> {
    t.iter()
        .map(|(k, v)| Some((k.clone(), to_bson(v)?)))
        .collect()
}
