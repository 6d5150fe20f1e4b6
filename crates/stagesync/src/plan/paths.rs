//! Dotted field paths: reading values and matching `preserve` patterns (`*` = any one segment).

use mongodb::bson::{Bson, Document};

/// Reads the value at a dotted path (`"shipping.city"`); descends through documents only.
pub fn get_path<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut segments = path.split('.');
    let mut value = doc.get(segments.next()?)?;
    for segment in segments {
        value = match value {
            Bson::Document(d) => d.get(segment)?,
            Bson::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

/// A set of field path patterns, e.g. `["qa", "experiments.*"]`.
#[derive(Debug, Clone, Default)]
pub struct PathPatterns {
    patterns: Vec<Vec<String>>,
}

impl PathPatterns {
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn new<S: AsRef<str>>(patterns: &[S]) -> PathPatterns {
        PathPatterns {
            patterns: patterns
                .iter()
                .map(|p| p.as_ref().split('.').map(String::from).collect())
                .collect(),
        }
    }

    /// True when `path` (given as segments) is matched by a pattern or lies under a match.
    pub fn covers<S: AsRef<str>>(&self, path: &[S]) -> bool {
        self.patterns
            .iter()
            .any(|p| p.len() <= path.len() && segments_match(p, &path[..p.len()]))
    }

    /// True when some pattern matches a path strictly below `path`: the value at `path` is
    /// partly production's and partly staging's, so it must be merged key by key.
    pub fn has_below<S: AsRef<str>>(&self, path: &[S]) -> bool {
        self.patterns
            .iter()
            .any(|p| p.len() > path.len() && segments_match(&p[..path.len()], path))
    }
}

fn segments_match<S: AsRef<str>>(pattern: &[String], path: &[S]) -> bool {
    pattern
        .iter()
        .zip(path)
        .all(|(p, s)| p == "*" || p == s.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    #[test]
    fn reads_dotted_paths() {
        let d = doc! {"a": {"b": {"c": 1}}, "list": [{"x": 2}]};
        assert_eq!(get_path(&d, "a.b.c"), Some(&Bson::Int32(1)));
        assert_eq!(get_path(&d, "list.0.x"), Some(&Bson::Int32(2)));
        assert_eq!(get_path(&d, "a.missing"), None);
        assert_eq!(get_path(&d, "a.b.c.d"), None);
    }

    #[test]
    fn patterns_cover_and_reach_below() {
        let p = PathPatterns::new(&["qa", "experiments.*", "profile.notes"]);
        assert!(p.covers(&["qa"]));
        assert!(p.covers(&["qa", "deep"]));
        assert!(!p.covers(&["experiments"]));
        assert!(p.covers(&["experiments", "flagA"]));
        assert!(p.has_below(&["experiments"]));
        assert!(p.has_below(&["profile"]));
        assert!(!p.has_below(&["profile", "name"]));
        assert!(!p.covers(&["profile", "name"]));
        assert!(!p.has_below(&["qa"]));
    }
}
