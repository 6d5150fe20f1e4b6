//! Where each key of a config file is: its 1-based line, by key path.
//!
//! Environment interpolation and deserialization work on a `toml::Value`, which keeps no
//! positions. So the text is parsed a second time with `toml_edit` (the parser behind `toml`),
//! which does, and every key path is mapped to its line once; an error found later at some path
//! is given the line of that path, or of the nearest enclosing key or table that the file has
//! (a missing key gets the line of the table it is missing from).

use std::collections::HashMap;

use toml_edit::{ImDocument, Item, Table, Value};

use super::error::KeyPath;

#[derive(Debug, Default)]
pub(super) struct Lines {
    by_path: HashMap<KeyPath, usize>,
}

impl Lines {
    pub(super) fn new(doc: &ImDocument<&str>) -> Lines {
        let mut lines = Lines::default();
        let text = doc.raw();
        lines.table(text, doc.as_table(), &KeyPath::default());
        lines
    }

    /// The line of `path`, or of its nearest ancestor that has one.
    pub(super) fn of(&self, path: &KeyPath) -> Option<usize> {
        let mut at = Some(path.clone());
        while let Some(p) = at {
            if p.is_root() {
                return None;
            }
            if let Some(line) = self.by_path.get(&p) {
                return Some(*line);
            }
            at = p.parent();
        }
        None
    }

    fn record(&mut self, text: &str, path: KeyPath, span: Option<std::ops::Range<usize>>) {
        if let Some(span) = span {
            self.by_path
                .entry(path)
                .or_insert_with(|| line_of_offset(text, span.start));
        }
    }

    fn table(&mut self, text: &str, table: &Table, at: &KeyPath) {
        for (key, item) in table.iter() {
            let path = at.key(key);
            // The key's own span; a table header's key, or failing that the table itself.
            let span = table
                .key(key)
                .and_then(|k| k.span())
                .or_else(|| item.span());
            self.record(text, path.clone(), span);
            self.item(text, item, &path);
        }
    }

    fn item(&mut self, text: &str, item: &Item, path: &KeyPath) {
        match item {
            Item::None => {}
            Item::Value(v) => self.value(text, v, path),
            Item::Table(t) => self.table(text, t, path),
            Item::ArrayOfTables(tables) => {
                for (i, t) in tables.iter().enumerate() {
                    let entry = path.index(i);
                    self.record(text, entry.clone(), t.span());
                    self.table(text, t, &entry);
                }
            }
        }
    }

    fn value(&mut self, text: &str, value: &Value, path: &KeyPath) {
        match value {
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    let entry = path.index(i);
                    self.record(text, entry.clone(), v.span());
                    self.value(text, v, &entry);
                }
            }
            Value::InlineTable(t) => {
                for (key, v) in t.iter() {
                    let entry = path.key(key);
                    let span = t.key(key).and_then(|k| k.span()).or_else(|| v.span());
                    self.record(text, entry.clone(), span);
                    self.value(text, v, &entry);
                }
            }
            _ => {}
        }
    }
}

/// The 1-based line holding byte `offset` of `text`.
pub(super) fn line_of_offset(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
pub(super) fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        line_of_offset(text, end),
        before[line_start..].chars().count() + 1,
    )
}
