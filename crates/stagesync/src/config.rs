//! The configuration file: TOML, with `${VAR}` / `${VAR:-default}` taken from the environment.
//!
//! Everything a user can get wrong is checked here, once, at start-up, so that the engine can trust
//! its input. Every error names the file, the key and what is allowed (see [`ConfigError`]).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::transform::MaskRule;

/// A configuration error: always printed with the file it came from; exits with code 2.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Production: where changes are read.
    pub source: Endpoint,
    /// Staging: where changes are merged.
    pub target: Endpoint,
    #[serde(default)]
    pub sync: SyncSettings,
    #[serde(default)]
    pub checkpoint: CheckpointSettings,
    #[serde(default)]
    pub masking: Option<MaskingSettings>,
    #[serde(default)]
    pub collections: Vec<CollectionConfig>,
    /// The file this was read from (for error messages); not a config key.
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub uri: String,
    pub database: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InitialSync {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Conflict {
    ProductionWins,
    LastWriteWins,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnHistoryLost {
    Resync,
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeleteMode {
    Soft,
    Hard,
    Ignore,
}

/// `write_concern = "majority"` or `write_concern = 1`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum WriteConcernSetting {
    Nodes(u32),
    Tag(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSettings {
    pub name: String,
    pub metadata_database: String,
    pub metadata_field: String,
    pub initial_sync: InitialSync,
    pub write_concern: WriteConcernSetting,
    pub conflict: Conflict,
    /// With `conflict = "last-write-wins"`: the staging field holding the staging edit time.
    pub staging_updated_field: Option<String>,
    pub on_history_lost: OnHistoryLost,
    /// How often the resume position is saved, e.g. "1s", "500ms" or a number of seconds.
    #[serde(deserialize_with = "de_duration")]
    pub checkpoint_interval: Duration,
    pub batch_max_events: usize,
    pub batch_max_wait_ms: u64,
    /// Concurrent bulk-write commands per batch.
    pub apply_concurrency: usize,
    /// Token bucket on staging writes (documents per second); none by default.
    pub max_writes_per_second: Option<u32>,
    /// Collections snapshotted at once.
    pub snapshot_concurrency: usize,
    /// Documents per snapshot read batch.
    pub snapshot_batch_size: usize,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            name: "default".into(),
            metadata_database: "stagesync".into(),
            metadata_field: "_sync".into(),
            initial_sync: InitialSync::Auto,
            write_concern: WriteConcernSetting::Tag("majority".into()),
            conflict: Conflict::ProductionWins,
            staging_updated_field: None,
            on_history_lost: OnHistoryLost::Resync,
            checkpoint_interval: Duration::from_secs(1),
            batch_max_events: 1000,
            batch_max_wait_ms: 100,
            apply_concurrency: 4,
            max_writes_per_second: None,
            snapshot_concurrency: 2,
            snapshot_batch_size: 1000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointStoreKind {
    #[default]
    Mongodb,
    Redis,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSettings {
    pub store: CheckpointStoreKind,
    /// `redis://host:port/db` when `store = "redis"`.
    pub url: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskingSettings {
    /// The secret for keyed masking; required as soon as any rule exists.
    pub key: String,
    #[serde(default = "default_email_domain")]
    pub email_domain: String,
    #[serde(default = "default_redact_text")]
    pub redact_text: String,
}

fn default_email_domain() -> String {
    "example.com".into()
}
fn default_redact_text() -> String {
    "[redacted]".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectionConfig {
    /// Production collection.
    pub name: String,
    /// Staging collection; defaults to `name`.
    pub target: Option<String>,
    pub business_key: Vec<String>,
    #[serde(default)]
    pub preserve: Vec<String>,
    #[serde(default = "default_deletes")]
    pub deletes: DeleteMode,
    #[serde(default = "default_soft_delete_field")]
    pub soft_delete_field: String,
    #[serde(default = "default_deleted_at_field")]
    pub deleted_at_field: String,
    pub schema_version_field: Option<String>,
    pub max_schema_version: Option<i64>,
    /// Field path → masking rule name.
    #[serde(default)]
    pub mask: BTreeMap<String, String>,
}

fn default_deletes() -> DeleteMode {
    DeleteMode::Soft
}
fn default_soft_delete_field() -> String {
    "deleted".into()
}
fn default_deleted_at_field() -> String {
    "deletedAt".into()
}

impl CollectionConfig {
    pub fn target_name(&self) -> &str {
        self.target.as_deref().unwrap_or(&self.name)
    }
}

impl Config {
    /// Reads, interpolates, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let err = |message: String| ConfigError {
            file: file.clone(),
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("cannot read the config file: {e}")))?;
        let mut config = Config::parse(&text, &|name| std::env::var(name).ok()).map_err(err)?;
        config.path = path.to_path_buf();
        Ok(config)
    }

    /// Parses and validates config text; `env` looks up variables for `${VAR}`.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, String> {
        let mut value: toml::Value =
            toml::from_str(text).map_err(|e| format!("invalid TOML: {e}"))?;
        interpolate(&mut value, "", env)?;
        let config: Config = value
            .try_into()
            .map_err(|e: toml::de::Error| e.message().trim().to_string())
            .map_err(|m| format!("{m} (see the configuration reference in README.md)"))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        fn non_empty(key: &str, v: &str) -> Result<(), String> {
            if v.trim().is_empty() {
                return Err(format!("`{key}` must not be empty"));
            }
            Ok(())
        }
        non_empty("source.uri", &self.source.uri)?;
        non_empty("source.database", &self.source.database)?;
        non_empty("target.uri", &self.target.uri)?;
        non_empty("target.database", &self.target.database)?;
        non_empty("sync.name", &self.sync.name)?;
        non_empty("sync.metadata_database", &self.sync.metadata_database)?;
        check_field_name("sync.metadata_field", &self.sync.metadata_field)?;
        if self.sync.batch_max_events == 0 {
            return Err("`sync.batch_max_events` must be at least 1".into());
        }
        if self.sync.apply_concurrency == 0 || self.sync.snapshot_concurrency == 0 {
            return Err(
                "`sync.apply_concurrency` and `sync.snapshot_concurrency` must be at least 1"
                    .into(),
            );
        }
        if self.sync.snapshot_batch_size == 0 {
            return Err("`sync.snapshot_batch_size` must be at least 1".into());
        }
        if self.sync.max_writes_per_second == Some(0) {
            return Err(
                "`sync.max_writes_per_second` must be at least 1 (leave it out for no limit)"
                    .into(),
            );
        }
        if self.sync.target_database_is_metadata(&self.target.database) {
            return Err(format!(
                "`sync.metadata_database` (\"{}\") must differ from `target.database`",
                self.sync.metadata_database
            ));
        }
        if self.sync.conflict == Conflict::LastWriteWins
            && self.sync.staging_updated_field.is_none()
        {
            return Err("`sync.conflict = \"last-write-wins\"` needs `sync.staging_updated_field` (the staging field holding the time of a staging edit, e.g. \"updatedAt\")".into());
        }
        if self.checkpoint.store == CheckpointStoreKind::Redis && self.checkpoint.url.is_none() {
            return Err("`checkpoint.store = \"redis\"` needs `checkpoint.url` (e.g. \"redis://127.0.0.1:6379/0\")".into());
        }
        if self.collections.is_empty() {
            return Err(
                "no `[[collections]]` configured: add at least one with `name` and `business_key`"
                    .into(),
            );
        }
        let mut seen = HashSet::new();
        let mut seen_targets = HashSet::new();
        let mut any_mask = false;
        for (i, c) in self.collections.iter().enumerate() {
            let at = format!("collections[{i}]");
            non_empty(&format!("{at}.name"), &c.name)?;
            if !seen.insert(c.name.clone()) {
                return Err(format!(
                    "`{at}.name`: collection \"{}\" is listed twice",
                    c.name
                ));
            }
            if !seen_targets.insert(c.target_name().to_string()) {
                return Err(format!(
                    "`{at}.target`: staging collection \"{}\" is the target of two entries",
                    c.target_name()
                ));
            }
            if c.business_key.is_empty() {
                return Err(format!(
                    "`{at}.business_key` (\"{}\") is empty: list one or more fields, e.g. [\"userEmail\", \"accountId\"]",
                    c.name
                ));
            }
            for k in &c.business_key {
                check_path(&format!("{at}.business_key"), k, false)?;
                if k == "_id"
                    || k.starts_with(&format!("{}.", self.sync.metadata_field))
                    || *k == self.sync.metadata_field
                {
                    return Err(format!("`{at}.business_key`: \"{k}\" cannot be a business key (production and staging `_id`s differ; the metadata field is stagesync's)"));
                }
            }
            for p in &c.preserve {
                check_path(&format!("{at}.preserve"), p, true)?;
                if c.business_key.iter().any(|k| path_overlaps(k, p)) {
                    return Err(format!("`{at}.preserve`: \"{p}\" overlaps the business key; production must own its key fields"));
                }
            }
            check_field_name(&format!("{at}.soft_delete_field"), &c.soft_delete_field)?;
            check_field_name(&format!("{at}.deleted_at_field"), &c.deleted_at_field)?;
            match (&c.schema_version_field, c.max_schema_version) {
                (Some(_), None) => {
                    return Err(format!(
                        "`{at}.schema_version_field` needs `{at}.max_schema_version`"
                    ))
                }
                (None, Some(_)) => {
                    return Err(format!(
                        "`{at}.max_schema_version` needs `{at}.schema_version_field`"
                    ))
                }
                _ => {}
            }
            for (path, rule) in &c.mask {
                check_path(&format!("{at}.mask"), path, true)?;
                if MaskRule::parse(rule).is_none() {
                    return Err(format!(
                        "`{at}.mask.\"{path}\"`: unknown masking rule \"{rule}\"; allowed: {}",
                        MaskRule::NAMES.join(", ")
                    ));
                }
                any_mask = true;
            }
        }
        if any_mask {
            match &self.masking {
                None => return Err("masking rules are configured but `[masking] key` is missing: set `key = \"${STAGESYNC_MASK_KEY}\"` and export that variable".into()),
                Some(m) if m.key.len() < 16 => return Err("`masking.key` is shorter than 16 characters: use a long random secret (e.g. `openssl rand -hex 32`)".into()),
                Some(_) => {}
            }
        }
        Ok(())
    }

    pub fn collection(&self, name: &str) -> Option<&CollectionConfig> {
        self.collections.iter().find(|c| c.name == name)
    }
}

impl SyncSettings {
    fn target_database_is_metadata(&self, target_db: &str) -> bool {
        self.metadata_database == target_db
    }
}

fn check_field_name(key: &str, v: &str) -> Result<(), String> {
    if v.is_empty() || v.contains('.') || v.starts_with('$') {
        return Err(format!("`{key}` (\"{v}\") must be a plain top-level field name (no dots, not starting with `$`)"));
    }
    Ok(())
}

fn check_path(key: &str, p: &str, wildcard: bool) -> Result<(), String> {
    let bad = p.is_empty()
        || p.split('.')
            .any(|s| s.is_empty() || s.starts_with('$') || (!wildcard && s == "*"))
        || (p == "_id" && !key.ends_with(".mask"));
    if bad {
        let also = if wildcard {
            " (`*` matches any one segment)"
        } else {
            ""
        };
        return Err(format!(
            "`{key}`: \"{p}\" is not a field path: use names separated by dots, e.g. \"shipping.street\"{also}"
        ));
    }
    Ok(())
}

/// True when one path is the other or lies under it (wildcards match any segment).
fn path_overlaps(a: &str, b: &str) -> bool {
    a.split('.')
        .zip(b.split('.'))
        .all(|(x, y)| x == y || x == "*" || y == "*")
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string value.
fn interpolate(
    value: &mut toml::Value,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), String> {
    match value {
        toml::Value::String(s) => *s = substitute(s, at, env)?,
        toml::Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                interpolate(v, &format!("{at}[{i}]"), env)?;
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                let key = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                interpolate(v, &key, env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn substitute(s: &str, at: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("`{at}`: unterminated `${{` in \"{s}\""))?;
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "`{at}`: \"${{{expr}}}\" is not a variable reference"
            ));
        }
        match (env(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "`{at}` uses the environment variable {name}, which is not set: export it, or write `${{{name}:-default}}`"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(f64),
        Text(String),
    }
    let parsed = match Raw::deserialize(d)? {
        Raw::Secs(s) if s > 0.0 && s.is_finite() => Some(Duration::from_secs_f64(s)),
        Raw::Secs(_) => None,
        Raw::Text(t) => parse_duration(&t),
    };
    parsed.ok_or_else(|| {
        serde::de::Error::custom("expected a positive duration such as \"1s\", \"500ms\" or 2")
    })
}

/// "1s", "500ms", "2m", or a bare number of seconds.
pub fn parse_duration(t: &str) -> Option<Duration> {
    let t = t.trim();
    let (num, unit) = t
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| t.split_at(i))
        .unwrap_or((t, "s"));
    let n: f64 = num
        .trim()
        .parse()
        .ok()
        .filter(|n: &f64| *n > 0.0 && n.is_finite())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[source]
uri = "${PROD_URI}"
database = "production"
[target]
uri = "${STAGING_URI:-mongodb://localhost:27018}"
database = "staging"
[[collections]]
name = "orders"
business_key = ["userEmail", "accountId"]
preserve = ["qa", "experiments.*"]
"#;

    fn env(name: &str) -> Option<String> {
        (name == "PROD_URI").then(|| "mongodb://prod:27017".to_string())
    }

    #[test]
    fn parses_with_defaults_and_env() {
        let c = Config::parse(MINIMAL, &env).unwrap();
        assert_eq!(c.source.uri, "mongodb://prod:27017");
        assert_eq!(c.target.uri, "mongodb://localhost:27018");
        assert_eq!(c.sync.name, "default");
        assert_eq!(c.sync.metadata_field, "_sync");
        assert_eq!(c.sync.batch_max_events, 1000);
        assert_eq!(c.collections[0].target_name(), "orders");
        assert_eq!(c.collections[0].deletes, DeleteMode::Soft);
        assert_eq!(c.collections[0].soft_delete_field, "deleted");
    }

    fn refused(text: &str) -> String {
        Config::parse(text, &env).unwrap_err()
    }

    #[test]
    fn refuses_bad_input_naming_the_key() {
        let e = refused(&MINIMAL.replace("[source]", "[source]\nbogus = 1"));
        assert!(e.contains("unknown field `bogus`"), "{e}");
        let e = refused(&MINIMAL.replace(
            "business_key = [\"userEmail\", \"accountId\"]",
            "business_key = []",
        ));
        assert!(e.contains("collections[0].business_key"), "{e}");
        let e = refused(&MINIMAL.replace("business_key = [\"userEmail\", \"accountId\"]\n", ""));
        assert!(e.contains("business_key"), "{e}");
        let e = refused(&format!(
            "{MINIMAL}\n[[collections]]\nname = \"orders\"\nbusiness_key = [\"x\"]\n"
        ));
        assert!(e.contains("listed twice"), "{e}");
        let e = refused(&MINIMAL.replace("preserve", "deletes = \"sometimes\"\npreserve"));
        assert!(e.contains("sometimes") && e.contains("soft"), "{e}");
        let e = refused(&MINIMAL.replace("${PROD_URI}", "${NOT_SET_ANYWHERE}"));
        assert!(e.contains("NOT_SET_ANYWHERE"), "{e}");
        let e = refused(&format!(
            "{MINIMAL}[sync]\ncheckpoint_interval = \"soon\"\n"
        ));
        assert!(e.contains("duration"), "{e}");
    }

    #[test]
    fn masking_rules_need_a_key_and_known_names() {
        let with_rule = format!("{MINIMAL}[collections.mask]\nuserEmail = \"email\"\n");
        assert!(refused(&with_rule).contains("STAGESYNC_MASK_KEY"));
        let keyed = format!("{with_rule}[masking]\nkey = \"0123456789abcdef0123\"\n");
        Config::parse(&keyed, &env).unwrap();
        let e = refused(&keyed.replace("\"email\"", "\"scramble\""));
        assert!(e.contains("scramble") && e.contains("hash"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("0"), None);
        assert_eq!(parse_duration("1h"), None);
    }
}
