//! [`ConfigError`], key paths, and the translation of serde's messages into the config's words.

use std::fmt;

/// A configuration error; the command line prints it and exits with code 2.
///
/// Printed as `config error in FILE line N: KEY: MESSAGE`, where ` line N` is left out when the
/// line is unknown and `KEY: ` when the error concerns no key (an unreadable file, a TOML syntax
/// error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config error in {file}{}: {}{message}", at_line(*.line), key_prefix(.key))]
pub struct ConfigError {
    /// The file as given to [`Config::load`](super::Config::load), or `<text>` for
    /// [`Config::parse`](super::Config::parse).
    pub file: String,
    /// The key path, e.g. `sync.batch_max_events` or `collections[0].deletes`.
    pub key: Option<String>,
    /// The 1-based line of the key (or of the table it is missing from), when known.
    pub line: Option<usize>,
    /// What is wrong and what is allowed.
    pub message: String,
}

fn at_line(line: Option<usize>) -> String {
    line.map(|n| format!(" line {n}")).unwrap_or_default()
}

fn key_prefix(key: &Option<String>) -> String {
    key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default()
}

/// A path of keys and array indexes from the top of the document, printed as
/// `collections[0].mask."user.email"` (keys quoted the way TOML would need them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(super) struct KeyPath(Vec<Seg>);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

impl KeyPath {
    /// `a.b.c` for plain keys (no quoting, no indexes).
    pub(super) fn dotted(path: &str) -> KeyPath {
        KeyPath(path.split('.').map(|k| Seg::Key(k.to_string())).collect())
    }

    pub(super) fn key(&self, key: &str) -> KeyPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(key.to_string()));
        p
    }

    pub(super) fn index(&self, i: usize) -> KeyPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    pub(super) fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn parent(&self) -> Option<KeyPath> {
        let mut p = self.clone();
        p.0.pop()?;
        Some(p)
    }

    pub(super) fn last_key(&self) -> Option<&str> {
        match self.0.last() {
            Some(Seg::Key(k)) => Some(k),
            _ => None,
        }
    }

    pub(super) fn from_serde(path: &serde_path_to_error::Path) -> KeyPath {
        use serde_path_to_error::Segment;
        KeyPath(
            path.iter()
                .filter_map(|s| match s {
                    Segment::Seq { index } => Some(Seg::Index(*index)),
                    Segment::Map { key } => Some(Seg::Key(key.clone())),
                    Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
                    Segment::Unknown => None,
                })
                .collect(),
        )
    }

    /// How a table at this path is written in a file: `[sync]`, `[[collections]]`, or `None` for
    /// the document itself.
    pub(super) fn table_name(&self) -> Option<String> {
        match self.0.split_last() {
            None => None,
            Some((Seg::Index(_), parent)) => Some(format!("[[{}]]", KeyPath(parent.to_vec()))),
            Some(_) => Some(format!("[{self}]")),
        }
    }

    /// The value at this path in a parsed document.
    pub(super) fn lookup<'v>(&self, mut value: &'v toml::Value) -> Option<&'v toml::Value> {
        for seg in &self.0 {
            value = match (seg, value) {
                (Seg::Key(k), toml::Value::Table(t)) => t.get(k)?,
                (Seg::Index(i), toml::Value::Array(a)) => a.get(*i)?,
                _ => return None,
            };
        }
        Some(value)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Index(n) => write!(f, "[{n}]")?,
                Seg::Key(k) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if bare {
                        f.write_str(k)?;
                    } else {
                        write!(f, "\"{}\"", k.replace('\\', "\\\\").replace('"', "\\\""))?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Rewrites a deserialization error (`message` at `path`, `document` being what was deserialized)
/// into the key it concerns and a message in the config's words: unknown keys name their table
/// and the allowed keys, missing keys their table, type errors what was expected and found.
pub(super) fn explain(message: &str, path: KeyPath, document: &toml::Value) -> (KeyPath, String) {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once('`') {
            let allowed = backticked(expected);
            let allowed = if allowed.is_empty() {
                "none".to_string()
            } else {
                allowed.join(", ")
            };
            // serde_path_to_error may or may not have pushed the unknown key itself.
            let table = if path.last_key() == Some(field) {
                path.parent().unwrap_or_default()
            } else {
                path
            };
            let place = match table.table_name() {
                Some(name) => format!("in {name}"),
                None => "at the top level".to_string(),
            };
            let message = format!("unknown field `{field}` {place}; allowed: {allowed}");
            return (table.key(field), message);
        }
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        if let Some((field, _)) = rest.split_once('`') {
            let from = path
                .table_name()
                .unwrap_or_else(|| "the top level".to_string());
            let message = format!("required key `{field}` is missing from {from}");
            return (path.key(field), message);
        }
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        let Some(rest) = message.strip_prefix(prefix) else {
            continue;
        };
        let Some((unexpected, expected)) = rest.rsplit_once(", expected ") else {
            continue;
        };
        let found = path
            .lookup(document)
            .map(describe_value)
            .unwrap_or_else(|| describe_unexpected(unexpected));
        let expected = describe_expected(expected, prefix == "invalid value: ");
        return (path, format!("expected {expected}, found {found}"));
    }
    (path, message.to_string())
}

/// The names between backticks in "expected `a`, `b` or `c`".
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(|s| format!("`{s}`"))
        .collect()
}

/// A value as it would be written in the file (tables and arrays by kind only).
fn describe_value(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("{s:?}"),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => format!("the date-time {d}"),
        toml::Value::Array(_) => "an array".to_string(),
        toml::Value::Table(_) => "a table".to_string(),
    }
}

/// serde's `Unexpected` text (`string "x"`, ``integer `5` ``, `map`) when the value was not found.
fn describe_unexpected(text: &str) -> String {
    let text = text.trim();
    if let Some(s) = text.strip_prefix("string ") {
        return s.to_string();
    }
    for kind in ["integer ", "floating point ", "boolean "] {
        if let Some(v) = text.strip_prefix(kind) {
            return v.trim_matches('`').to_string();
        }
    }
    match text {
        "map" => "a table".into(),
        "sequence" => "an array".into(),
        other => other.into(),
    }
}

/// serde's "expected" text in the config's words.
fn describe_expected(expected: &str, out_of_range: bool) -> String {
    let expected = expected.trim();
    let unsigned_max = match expected {
        "u8" => Some(u64::from(u8::MAX)),
        "u16" => Some(u64::from(u16::MAX)),
        "u32" => Some(u64::from(u32::MAX)),
        "u64" | "usize" => Some(u64::MAX),
        _ => None,
    };
    if let Some(max) = unsigned_max {
        return match (out_of_range, max) {
            (false, _) => "an integer".into(),
            (true, u64::MAX) => "an integer of 0 or more".into(),
            (true, max) => format!("an integer from 0 to {max}"),
        };
    }
    match expected {
        "i8" | "i16" | "i32" | "i64" | "isize" => "an integer".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a sequence" => "an array".into(),
        "a map" => "a table".into(),
        s if s.starts_with("struct ") => "a table".into(),
        other => other.into(),
    }
}
