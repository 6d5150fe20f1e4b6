//! The configuration file: TOML, with `${VAR}` / `${VAR:-default}` taken from the environment.
//!
//! Everything a user can get wrong is checked here, once, at start-up, so that the engine can trust
//! its input. Every error names the file, the key path, the line of that key and what is allowed
//! (see [`ConfigError`]).
//!
//! This module is a leaf: it depends on nothing else in the crate (the masking rule names,
//! [`MaskRule`], are part of its vocabulary and live here).

mod duration;
mod error;
pub mod filter;
mod mask_rule;
mod spans;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Unexpected, Visitor};
use serde::{Deserialize, Deserializer};

pub use duration::parse_duration;
pub use error::ConfigError;
pub use mask_rule::MaskRule;

use duration::{de_duration, de_millis};
use error::KeyPath;
use spans::Lines;

/// The name used as [`ConfigError::file`] for text given to [`Config::parse`].
const TEXT_FILE: &str = "<text>";

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialSync {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    ProductionWins,
    LastWriteWins,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnHistoryLost {
    Resync,
    Fail,
}

/// The `_id` of a staging document created for a production document no staging document
/// matches: `new_document_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NewDocumentId {
    /// The (masked, when a rule names `_id`) production `_id`, unless a staging document
    /// already holds it; then a fresh ObjectId.
    #[default]
    Production,
    /// Always a fresh ObjectId.
    Generate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteMode {
    Soft,
    Hard,
    Ignore,
}

/// `write_concern = "majority"` or `write_concern = 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// How often the resume position is saved: "1s", "500ms", "2m 30s" or a number of seconds.
    #[serde(deserialize_with = "de_duration")]
    pub checkpoint_interval: Duration,
    pub batch_max_events: usize,
    /// A number of milliseconds, or a duration such as "100ms".
    #[serde(deserialize_with = "de_millis")]
    pub batch_max_wait_ms: u64,
    /// The most bulk-write commands of a batch in flight at once. A batch sends each kind of
    /// write (insert, update, delete) in as few commands of up to 500 statements as it can.
    pub apply_concurrency: usize,
    /// Token bucket on staging writes (documents per second); none by default.
    pub max_writes_per_second: Option<u32>,
    /// Collections snapshotted at once.
    pub snapshot_concurrency: usize,
    /// Documents per snapshot read batch.
    pub snapshot_batch_size: usize,
    /// Readiness turns false when a collection has made no progress for this long (default 30s).
    #[serde(deserialize_with = "de_duration")]
    pub stall_after: Duration,
    /// How long `run` waits for servers and stores unreachable at start before giving up with
    /// exit code 3 (default 10m; never zero).
    #[serde(deserialize_with = "de_duration")]
    pub startup_timeout: Duration,
    /// The lifetime of the sync lease (default 10s; at least 1s).
    #[serde(deserialize_with = "de_duration")]
    pub lease_ttl: Duration,
    /// The `_id` of new staging documents (default "production"; collections may override it).
    pub new_document_id: NewDocumentId,
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
            stall_after: Duration::from_secs(30),
            startup_timeout: Duration::from_secs(600),
            lease_ttl: Duration::from_secs(10),
            new_document_id: NewDocumentId::Production,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
    /// Overrides `sync.new_document_id` for this collection.
    #[serde(default)]
    pub new_document_id: Option<NewDocumentId>,
    /// A MongoDB query on the production document: only the documents it matches are synced.
    #[serde(default)]
    pub filter: Option<toml::Table>,
    /// Field path → the configured collection whose production `_id` it holds.
    #[serde(default)]
    pub references: BTreeMap<String, String>,
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

    /// The `filter` as a BSON query (checked at load time); `None` without one.
    pub fn filter_document(&self) -> Option<mongodb::bson::Document> {
        self.filter
            .as_ref()
            .filter(|t| !t.is_empty())
            .and_then(filter::table_to_document)
    }

    /// `new_document_id` for this collection: its own setting, else `[sync]`'s.
    pub fn new_document_id(&self, sync: &SyncSettings) -> NewDocumentId {
        self.new_document_id.unwrap_or(sync.new_document_id)
    }
}

// ---- keyword values ---------------------------------------------------------------------------

/// Deserializes one of a fixed set of strings; anything else is refused with the allowed list.
fn de_keyword<'de, D: Deserializer<'de>, T: Copy>(
    d: D,
    choices: &'static [(&'static str, T)],
) -> Result<T, D::Error> {
    struct Keyword<T: 'static>(&'static [(&'static str, T)]);

    impl<T: 'static> Keyword<T> {
        fn allowed(&self) -> String {
            let names: Vec<String> = self.0.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            names.join(", ")
        }
    }

    impl<'de, T: Copy + 'static> Visitor<'de> for Keyword<T> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "one of {}", self.allowed())
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            match self.0.iter().find(|(name, _)| *name == v) {
                Some((_, value)) => Ok(*value),
                None => Err(E::custom(format!(
                    "unknown value {v:?}; allowed values: {}",
                    self.allowed()
                ))),
            }
        }
    }

    d.deserialize_any(Keyword(choices))
}

impl<'de> Deserialize<'de> for InitialSync {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use InitialSync::*;
        de_keyword(d, &[("auto", Auto), ("always", Always), ("never", Never)])
    }
}

impl<'de> Deserialize<'de> for Conflict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use Conflict::*;
        de_keyword(
            d,
            &[
                ("production-wins", ProductionWins),
                ("last-write-wins", LastWriteWins),
            ],
        )
    }
}

impl<'de> Deserialize<'de> for OnHistoryLost {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use OnHistoryLost::*;
        de_keyword(d, &[("resync", Resync), ("fail", Fail)])
    }
}

impl<'de> Deserialize<'de> for NewDocumentId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use NewDocumentId::*;
        de_keyword(d, &[("production", Production), ("generate", Generate)])
    }
}

impl<'de> Deserialize<'de> for DeleteMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use DeleteMode::*;
        de_keyword(d, &[("soft", Soft), ("hard", Hard), ("ignore", Ignore)])
    }
}

impl<'de> Deserialize<'de> for CheckpointStoreKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use CheckpointStoreKind::*;
        de_keyword(d, &[("mongodb", Mongodb), ("redis", Redis)])
    }
}

impl<'de> Deserialize<'de> for WriteConcernSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct WriteConcern;

        impl Visitor<'_> for WriteConcern {
            type Value = WriteConcernSetting;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of nodes such as 1, or a tag such as \"majority\"")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u32::try_from(v)
                    .map(WriteConcernSetting::Nodes)
                    .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                u32::try_from(v)
                    .map(WriteConcernSetting::Nodes)
                    .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(WriteConcernSetting::Tag(v.to_string()))
            }
        }

        d.deserialize_any(WriteConcern)
    }
}

// ---- loading ----------------------------------------------------------------------------------

/// A problem found at a key, before the file name and line are attached.
#[derive(Debug)]
struct KeyError {
    key: KeyPath,
    message: String,
}

fn key_error(key: KeyPath, message: impl Into<String>) -> KeyError {
    KeyError {
        key,
        message: message.into(),
    }
}

impl Config {
    /// Reads, interpolates, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            let advice = match e.kind() {
                std::io::ErrorKind::NotFound => "check the path given with `-c`/`--config`, or create the file (see the configuration reference in README.md)",
                std::io::ErrorKind::PermissionDenied => "check the file's permissions",
                _ => "check the path given with `-c`/`--config`",
            };
            let message = format!("cannot read the config file ({e}): {advice}");
            ConfigError {
                file: file.clone(),
                key: None,
                line: None,
                message,
            }
        })?;
        let mut config = Config::parse_file(&text, &|name| std::env::var(name).ok(), &file)?;
        config.path = path.to_path_buf();
        Ok(config)
    }

    /// Parses and validates config text; `env` looks up variables for `${VAR}`. Errors name the
    /// file `<text>`.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Config::parse_file(text, env, TEXT_FILE)
    }

    fn parse_file(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        file: &str,
    ) -> Result<Config, ConfigError> {
        let at_key = |lines: &Lines, e: KeyError| ConfigError {
            file: file.to_string(),
            line: lines.of(&e.key),
            key: (!e.key.is_root()).then(|| e.key.to_string()),
            message: e.message,
        };
        let syntax = |message: &str, span: Option<std::ops::Range<usize>>| {
            let message = message.trim().lines().collect::<Vec<_>>().join("; ");
            let at = span.map(|s| spans::position(text, s.start));
            ConfigError {
                file: file.to_string(),
                key: None,
                line: at.map(|(line, _)| line),
                message: match at {
                    Some((_, column)) => format!("invalid TOML at column {column}: {message}"),
                    None => format!("invalid TOML: {message}"),
                },
            }
        };
        let doc = toml_edit::ImDocument::parse(text).map_err(|e| syntax(e.message(), e.span()))?;
        let lines = Lines::new(&doc);
        // The same parser again, for the plain values that interpolation and serde work on.
        let table: toml::Table = toml::from_str(text).map_err(|e| syntax(e.message(), e.span()))?;
        let mut value = toml::Value::Table(table);
        interpolate(&mut value, &KeyPath::default(), env).map_err(|e| at_key(&lines, e))?;
        let mut config: Config = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
            let path = KeyPath::from_serde(e.path());
            let (key, message) = error::explain(e.inner().message(), path, &value);
            at_key(&lines, key_error(key, message))
        })?;
        // Filters as written: serde turns TOML date-times into strings, a filter compares dates.
        let written = value.get("collections").and_then(toml::Value::as_array);
        for (c, v) in config
            .collections
            .iter_mut()
            .zip(written.into_iter().flatten())
        {
            if let Some(toml::Value::Table(f)) = v.get("filter") {
                c.filter = Some(f.clone());
            }
        }
        config.validate().map_err(|e| at_key(&lines, e))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), KeyError> {
        let key = KeyPath::dotted;
        fn non_empty(key: KeyPath, v: &str) -> Result<(), KeyError> {
            if v.trim().is_empty() {
                return Err(key_error(key, "must not be empty"));
            }
            Ok(())
        }
        fn at_least_one(key: KeyPath, n: usize) -> Result<(), KeyError> {
            if n == 0 {
                return Err(key_error(key, "must be at least 1"));
            }
            Ok(())
        }
        non_empty(key("source.uri"), &self.source.uri)?;
        non_empty(key("source.database"), &self.source.database)?;
        non_empty(key("target.uri"), &self.target.uri)?;
        non_empty(key("target.database"), &self.target.database)?;
        let sync = &self.sync;
        non_empty(key("sync.name"), &sync.name)?;
        non_empty(key("sync.metadata_database"), &sync.metadata_database)?;
        check_field_name(key("sync.metadata_field"), &sync.metadata_field)?;
        at_least_one(key("sync.batch_max_events"), sync.batch_max_events)?;
        at_least_one(key("sync.apply_concurrency"), sync.apply_concurrency)?;
        at_least_one(key("sync.snapshot_concurrency"), sync.snapshot_concurrency)?;
        at_least_one(key("sync.snapshot_batch_size"), sync.snapshot_batch_size)?;
        if sync.max_writes_per_second == Some(0) {
            return Err(key_error(
                key("sync.max_writes_per_second"),
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        for (name, value) in [
            ("sync.checkpoint_interval", sync.checkpoint_interval),
            ("sync.stall_after", sync.stall_after),
            ("sync.startup_timeout", sync.startup_timeout),
        ] {
            if value.is_zero() {
                return Err(key_error(
                    key(name),
                    "must be longer than 0, e.g. \"1s\", \"500ms\" or \"10m\"",
                ));
            }
        }
        if sync.lease_ttl < Duration::from_secs(1) {
            return Err(key_error(
                key("sync.lease_ttl"),
                format!(
                    "{} is too short: use at least \"1s\"",
                    humantime::format_duration(sync.lease_ttl)
                ),
            ));
        }
        match &sync.write_concern {
            WriteConcernSetting::Nodes(0) => {
                return Err(key_error(
                    key("sync.write_concern"),
                    "0 (unacknowledged writes) is not allowed: stagesync saves a checkpoint only after \
                     staging acknowledged every write before it. Use \"majority\" (recommended), a \
                     number of nodes such as 1, or a tag",
                ))
            }
            WriteConcernSetting::Tag(t) if t.trim().is_empty() => {
                return Err(key_error(
                    key("sync.write_concern"),
                    "must not be empty: use \"majority\" (recommended), a number of nodes such as 1, or a tag",
                ))
            }
            _ => {}
        }
        if sync.target_database_is_metadata(&self.target.database) {
            return Err(key_error(
                key("sync.metadata_database"),
                format!(
                    "\"{}\" must differ from `target.database`",
                    sync.metadata_database
                ),
            ));
        }
        if sync.conflict == Conflict::LastWriteWins && sync.staging_updated_field.is_none() {
            return Err(key_error(key("sync.conflict"), "\"last-write-wins\" needs `sync.staging_updated_field` (the staging field holding the time of a staging edit, e.g. \"updatedAt\")"));
        }
        if self.checkpoint.store == CheckpointStoreKind::Redis && self.checkpoint.url.is_none() {
            return Err(key_error(
                key("checkpoint.store"),
                "\"redis\" needs `checkpoint.url` (e.g. \"redis://127.0.0.1:6379/0\")",
            ));
        }
        if self.collections.is_empty() {
            return Err(key_error(
                key("collections"),
                "no `[[collections]]` configured: add at least one with `name` and `business_key`",
            ));
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut seen_targets: HashMap<&str, usize> = HashMap::new();
        let mut first_mask: Option<KeyPath> = None;
        for (i, c) in self.collections.iter().enumerate() {
            let at = KeyPath::dotted("collections").index(i);
            non_empty(at.key("name"), &c.name)?;
            if let Some(first) = seen.insert(&c.name, i) {
                return Err(key_error(
                    at.key("name"),
                    format!(
                        "collection \"{}\" is listed twice (also collections[{first}])",
                        c.name
                    ),
                ));
            }
            if let Some(first) = seen_targets.insert(c.target_name(), i) {
                return Err(key_error(
                    at.key("target"),
                    format!(
                        "staging collection \"{}\" is the target of two entries (also collections[{first}])",
                        c.target_name()
                    ),
                ));
            }
            if c.business_key.is_empty() {
                return Err(key_error(
                    at.key("business_key"),
                    format!(
                        "is empty (collection \"{}\"): list one or more fields, e.g. [\"userEmail\", \"accountId\"]",
                        c.name
                    ),
                ));
            }
            for (j, k) in c.business_key.iter().enumerate() {
                let key = at.key("business_key").index(j);
                check_path(key.clone(), k, false)?;
                if k == "_id"
                    || k.starts_with(&format!("{}.", sync.metadata_field))
                    || *k == sync.metadata_field
                {
                    return Err(key_error(key, format!("\"{k}\" cannot be a business key (production and staging `_id`s differ; the metadata field is stagesync's)")));
                }
            }
            for (j, p) in c.preserve.iter().enumerate() {
                let key = at.key("preserve").index(j);
                check_path(key.clone(), p, true)?;
                if c.business_key.iter().any(|k| path_overlaps(k, p)) {
                    return Err(key_error(
                        key,
                        format!(
                            "\"{p}\" overlaps the business key; production must own its key fields"
                        ),
                    ));
                }
            }
            check_field_name(at.key("soft_delete_field"), &c.soft_delete_field)?;
            check_field_name(at.key("deleted_at_field"), &c.deleted_at_field)?;
            match (&c.schema_version_field, c.max_schema_version) {
                (Some(_), None) => {
                    return Err(key_error(
                        at.key("schema_version_field"),
                        format!("needs `{}`", at.key("max_schema_version")),
                    ))
                }
                (None, Some(_)) => {
                    return Err(key_error(
                        at.key("max_schema_version"),
                        format!("needs `{}`", at.key("schema_version_field")),
                    ))
                }
                _ => {}
            }
            if let Some(f) = &c.filter {
                filter::check(&at.key("filter"), f)?;
            }
            for (path, referenced) in &c.references {
                let key = at.key("references").key(path);
                check_path(key.clone(), path, false)?;
                if path == &sync.metadata_field
                    || path.starts_with(&format!("{}.", sync.metadata_field))
                {
                    return Err(key_error(
                        key,
                        format!("\"{path}\" is stagesync's metadata field"),
                    ));
                }
                if c.business_key.iter().any(|k| path_overlaps(k, path)) {
                    return Err(key_error(key, format!("\"{path}\" overlaps the business key; a reference remapped to a staging _id would change the key")));
                }
                if c.preserve.iter().any(|p| path_overlaps(p, path)) {
                    return Err(key_error(key, format!("\"{path}\" is preserved: staging owns it, so stagesync never remaps it")));
                }
                if self.collection(referenced).is_none() {
                    let names: Vec<String> = self
                        .collections
                        .iter()
                        .map(|c| format!("\"{}\"", c.name))
                        .collect();
                    return Err(key_error(key, format!("references collection \"{referenced}\", which is not configured; configured collections: {}", names.join(", "))));
                }
            }
            for (path, rule) in &c.mask {
                let key = at.key("mask").key(path);
                // `_id` may be masked ("_id" = "hash"): it stays deterministic, so matching
                // and references still work.
                if path != "_id" {
                    check_path(key.clone(), path, true)?;
                }
                if MaskRule::parse(rule).is_none() {
                    return Err(key_error(
                        key,
                        format!(
                            "unknown masking rule \"{rule}\"; allowed: {}",
                            MaskRule::NAMES.join(", ")
                        ),
                    ));
                }
                first_mask.get_or_insert(key);
            }
        }
        if let Some(rule) = first_mask {
            match &self.masking {
                // Reported at the first rule: `[masking]` may be missing altogether.
                None => return Err(key_error(rule, "masking rules need `masking.key`, which is missing: add `[masking]` with `key = \"${STAGESYNC_MASK_KEY}\"` and export that variable")),
                Some(m) if m.key.len() < 16 => return Err(key_error(key("masking.key"), "is shorter than 16 characters: use a long random secret (e.g. `openssl rand -hex 32`)")),
                Some(_) => {}
            }
        }
        Ok(())
    }

    pub fn collection(&self, name: &str) -> Option<&CollectionConfig> {
        self.collections.iter().find(|c| c.name == name)
    }

    /// The masking rules of collection `c` as applied: its own, plus — for each reference to a
    /// collection whose `_id` is masked — that collection's `_id` rule on the reference's path
    /// (unless `c` names the path itself), so a reference holds the masked `_id` it refers to.
    pub fn mask_rules(&self, c: &CollectionConfig) -> BTreeMap<String, String> {
        let mut rules = c.mask.clone();
        for (path, referenced) in &c.references {
            let id_rule = self.collection(referenced).and_then(|r| r.mask.get("_id"));
            if let Some(rule) = id_rule {
                rules.entry(path.clone()).or_insert_with(|| rule.clone());
            }
        }
        rules
    }
}

impl SyncSettings {
    fn target_database_is_metadata(&self, target_db: &str) -> bool {
        self.metadata_database == target_db
    }
}

fn check_field_name(key: KeyPath, v: &str) -> Result<(), KeyError> {
    if v.is_empty() || v.contains('.') || v.starts_with('$') {
        return Err(key_error(
            key,
            format!(
                "\"{v}\" must be a plain top-level field name (no dots, not starting with `$`)"
            ),
        ));
    }
    Ok(())
}

fn check_path(key: KeyPath, p: &str, wildcard: bool) -> Result<(), KeyError> {
    let bad = p.is_empty()
        || p.split('.')
            .any(|s| s.is_empty() || s.starts_with('$') || (!wildcard && s == "*"))
        || p == "_id";
    if bad {
        let also = if wildcard {
            " (`*` matches any one segment)"
        } else {
            ""
        };
        return Err(key_error(
            key,
            format!(
                "\"{p}\" is not a field path: use names separated by dots, e.g. \"shipping.street\"{also}"
            ),
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
    at: &KeyPath,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), KeyError> {
    match value {
        toml::Value::String(s) => *s = substitute(s, at, env)?,
        toml::Value::Array(items) => {
            for (i, v) in items.iter_mut().enumerate() {
                interpolate(v, &at.index(i), env)?;
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                interpolate(v, &at.key(k), env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn substitute(
    s: &str,
    at: &KeyPath,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, KeyError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| key_error(at.clone(), format!("unterminated `${{` in \"{s}\"")))?;
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(key_error(
                at.clone(),
                format!("\"${{{expr}}}\" is not a variable reference"),
            ));
        }
        match (env(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(key_error(
                    at.clone(),
                    format!("uses the environment variable {name}, which is not set: export it, or write `${{{name}:-default}}`"),
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
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
        Config::parse(text, &env).unwrap_err().to_string()
    }

    #[test]
    fn refuses_bad_input_naming_the_key() {
        let e = refused(&MINIMAL.replace("[source]", "[source]\nbogus = 1"));
        assert!(e.contains("unknown field `bogus` in [source]"), "{e}");
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

    /// MINIMAL has 13 lines (the first is empty); `[sync]` appended is line 12 and its key 13.
    fn with_sync(key_value: &str) -> String {
        format!("{MINIMAL}[sync]\n{key_value}\n")
    }

    #[test]
    fn messages_name_the_key_and_line() {
        let cases = [
            (
                with_sync("batch_max_events = \"many\""),
                "config error in <text> line 13: sync.batch_max_events: expected an integer, found \"many\"",
            ),
            (
                with_sync("batch_max_events = -3"),
                "config error in <text> line 13: sync.batch_max_events: expected an integer of 0 or more, found -3",
            ),
            (
                with_sync("max_writes_per_second = 99999999999"),
                "config error in <text> line 13: sync.max_writes_per_second: expected an integer from 0 to 4294967295, found 99999999999",
            ),
            (
                with_sync("checkpoint_interval = true"),
                "config error in <text> line 13: sync.checkpoint_interval: expected a duration such as \"500ms\", \"30s\", \"1h\" or \"2m 30s\", or a number of seconds, found true",
            ),
            (
                with_sync("checkpoint_interval = \"0s\""),
                "config error in <text> line 13: sync.checkpoint_interval: must be longer than 0, e.g. \"1s\", \"500ms\" or \"10m\"",
            ),
            (
                with_sync("startup_timeout = \"0s\""),
                "config error in <text> line 13: sync.startup_timeout: must be longer than 0, e.g. \"1s\", \"500ms\" or \"10m\"",
            ),
            (
                with_sync("lease_ttl = \"500ms\""),
                "config error in <text> line 13: sync.lease_ttl: 500ms is too short: use at least \"1s\"",
            ),
            (
                with_sync("batch_max_wait_ms = \"soon\""),
                "config error in <text> line 13: sync.batch_max_wait_ms: expected a number of milliseconds, or a duration such as \"100ms\", \"2s\" or \"1m 30s\", found \"soon\"",
            ),
            (
                with_sync("write_concern = 0"),
                "config error in <text> line 13: sync.write_concern: 0 (unacknowledged writes) is not allowed: stagesync saves a checkpoint only after staging acknowledged every write before it. Use \"majority\" (recommended), a number of nodes such as 1, or a tag",
            ),
            (
                with_sync("write_concern = -1"),
                "config error in <text> line 13: sync.write_concern: expected a number of nodes such as 1, or a tag such as \"majority\", found -1",
            ),
            (
                with_sync("write_concern = \"\""),
                "config error in <text> line 13: sync.write_concern: must not be empty: use \"majority\" (recommended), a number of nodes such as 1, or a tag",
            ),
            (
                with_sync("write_concern = true"),
                "config error in <text> line 13: sync.write_concern: expected a number of nodes such as 1, or a tag such as \"majority\", found true",
            ),
            (
                with_sync("initial_sync = 3"),
                "config error in <text> line 13: sync.initial_sync: expected one of \"auto\", \"always\", \"never\", found 3",
            ),
            (
                with_sync("initial_sync = \"sometimes\""),
                "config error in <text> line 13: sync.initial_sync: unknown value \"sometimes\"; allowed values: \"auto\", \"always\", \"never\"",
            ),
            (
                with_sync("name = { a = 1 }"),
                "config error in <text> line 13: sync.name: expected a string, found a table",
            ),
            (
                format!("{MINIMAL}[sinc]\nname = \"x\"\n"),
                "config error in <text> line 12: sinc: unknown field `sinc` at the top level; allowed: `source`, `target`, `sync`, `checkpoint`, `masking`, `collections`",
            ),
            (
                MINIMAL.replace("preserve", "delete = \"soft\"\npreserve"),
                "config error in <text> line 11: collections[0].delete: unknown field `delete` in [[collections]]; allowed: `name`, `target`, `business_key`, `preserve`, `deletes`, `soft_delete_field`, `deleted_at_field`, `schema_version_field`, `max_schema_version`, `mask`, `new_document_id`, `filter`, `references`",
            ),
            (
                MINIMAL.replace("database = \"production\"\n", ""),
                "config error in <text> line 2: source.database: required key `database` is missing from [source]",
            ),
            (
                MINIMAL.replace("[\"userEmail\", \"accountId\"]", "[\"userEmail\",\n 5]"),
                "config error in <text> line 11: collections[0].business_key[1]: expected a string, found 5",
            ),
            (
                MINIMAL.replace("[\"userEmail\", \"accountId\"]", "[\"userEmail\",\n \"$x\"]"),
                "config error in <text> line 11: collections[0].business_key[1]: \"$x\" is not a field path: use names separated by dots, e.g. \"shipping.street\"",
            ),
            (
                format!("{MINIMAL}[collections.mask]\n\"user.email\" = \"hash\"\n"),
                "config error in <text> line 13: collections[0].mask.\"user.email\": masking rules need `masking.key`, which is missing: add `[masking]` with `key = \"${STAGESYNC_MASK_KEY}\"` and export that variable",
            ),
            (
                format!("{MINIMAL}[checkpoint]\nstore = \"redis\"\n"),
                "config error in <text> line 13: checkpoint.store: \"redis\" needs `checkpoint.url` (e.g. \"redis://127.0.0.1:6379/0\")",
            ),
            (
                MINIMAL.replace("${PROD_URI}", "${NOT_SET_ANYWHERE}"),
                "config error in <text> line 3: source.uri: uses the environment variable NOT_SET_ANYWHERE, which is not set: export it, or write `${NOT_SET_ANYWHERE:-default}`",
            ),
            (
                MINIMAL.replace("[source]", "[source\n"),
                "config error in <text> line 2: invalid TOML at column 8: invalid table header; expected `.`, `]`",
            ),
            (
                // A dotted key before any table header.
                format!("source.bogus = 3\n{}", MINIMAL.replace("[source]\n", "[source0]\n")),
                "config error in <text> line 1: source.bogus: unknown field `bogus` in [source]; allowed: `uri`, `database`",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(refused(&text), expected, "{text}");
        }
        let e = Config::parse(&with_sync("batch_max_events = \"many\""), &env).unwrap_err();
        assert_eq!(e.file, "<text>");
        assert_eq!(e.key.as_deref(), Some("sync.batch_max_events"));
        assert_eq!(e.line, Some(13));
        assert_eq!(e.message, "expected an integer, found \"many\"");
    }

    #[test]
    fn new_document_id_defaults_to_production_and_collections_override_it() {
        let c = Config::parse(MINIMAL, &env).unwrap();
        assert_eq!(c.sync.new_document_id, NewDocumentId::Production);
        assert_eq!(
            c.collections[0].new_document_id(&c.sync),
            NewDocumentId::Production
        );
        let text = MINIMAL.replace("preserve", "new_document_id = \"generate\"\npreserve");
        let c = Config::parse(&text, &env).unwrap();
        assert_eq!(
            c.collections[0].new_document_id(&c.sync),
            NewDocumentId::Generate
        );
        assert_eq!(
            refused(&with_sync("new_document_id = \"random\"")),
            "config error in <text> line 13: sync.new_document_id: unknown value \"random\"; allowed values: \"production\", \"generate\""
        );
    }

    #[test]
    fn filters_parse_into_bson_and_bad_ones_name_the_key_and_line() {
        let with_filter = |f: &str| MINIMAL.replace("preserve", &format!("filter = {f}\npreserve"));
        let c = Config::parse(
            &with_filter(r#"{ region = "eu", amount = { "$gte" = 100 }, "$or" = [{ vip = true }, { at = { "$gt" = 2024-01-01T00:00:00Z } }] }"#),
            &env,
        )
        .unwrap();
        let f = c.collections[0].filter_document().unwrap();
        assert_eq!(f.get_str("region").unwrap(), "eu");
        assert_eq!(
            f.get_document("amount").unwrap().get_i32("$gte").unwrap(),
            100
        );
        assert!(f.get_array("$or").unwrap()[1]
            .as_document()
            .unwrap()
            .get_document("at")
            .unwrap()
            .get_datetime("$gt")
            .is_ok());
        let cases = [
            (
                r#"{ name = { "$regex" = "^a" } }"#,
                "config error in <text> line 11: collections[0].filter.name.\"$regex\": operator `$regex` is not supported in a filter; supported: `$and`, `$or`, `$nor`, `$eq`, `$ne`, `$gt`, `$gte`, `$lt`, `$lte`, `$in`, `$nin`, `$exists`, `$not`, `$all`, `$size`, `$elemMatch`",
            ),
            (
                r#"{ "$where" = "1" }"#,
                "config error in <text> line 11: collections[0].filter.\"$where\": operator `$where` is not supported in a filter; supported: `$and`, `$or`, `$nor`, `$eq`, `$ne`, `$gt`, `$gte`, `$lt`, `$lte`, `$in`, `$nin`, `$exists`, `$not`, `$all`, `$size`, `$elemMatch`",
            ),
            (
                r#"{ region = { "$in" = "eu" } }"#,
                "config error in <text> line 11: collections[0].filter.region.\"$in\": `$in` needs an array, e.g. [\"eu\", \"us\"]",
            ),
            (
                r#"{ "$or" = [] }"#,
                "config error in <text> line 11: collections[0].filter.\"$or\": expected a non-empty array of queries, e.g. [{ region = \"eu\" }, { vip = true }]",
            ),
            (
                r#"{ at = { "$gt" = 2024-01-01 } }"#,
                "config error in <text> line 11: collections[0].filter.at.\"$gt\": 2024-01-01 has no time zone: write an instant such as 2024-01-31T00:00:00Z",
            ),
            (
                r#"{ a = { "$gt" = 1, b = 2 } }"#,
                "config error in <text> line 11: collections[0].filter.a: mixes operators (`$…`) and field names: write either { \"$gte\" = 1 } or an embedded document",
            ),
            (
                r#""region = eu""#,
                "config error in <text> line 11: collections[0].filter: expected a table, found \"region = eu\"",
            ),
        ];
        for (f, expected) in cases {
            assert_eq!(refused(&with_filter(f)), expected, "{f}");
        }
    }

    #[test]
    fn references_name_configured_collections_and_masked_ids_follow_them() {
        let two = format!(
            "{MINIMAL}[collections.references]\ncustomerId = \"customers\"\n\
             [[collections]]\nname = \"customers\"\nbusiness_key = [\"email\"]\n\
             [collections.mask]\n\"_id\" = \"hash\"\n[masking]\nkey = \"0123456789abcdef0123\"\n"
        );
        let c = Config::parse(&two, &env).unwrap();
        assert_eq!(c.collections[0].references["customerId"], "customers");
        // The reference is masked like the `_id` it holds.
        assert_eq!(c.mask_rules(&c.collections[0])["customerId"], "hash");
        assert!(c.mask_rules(&c.collections[1]).contains_key("_id"));
        let e = refused(&two.replace("= \"customers\"\n[[", "= \"clients\"\n[["));
        assert_eq!(e, "config error in <text> line 13: collections[0].references.customerId: references collection \"clients\", which is not configured; configured collections: \"orders\", \"customers\"");
        let e = refused(&two.replace("customerId = ", "userEmail = "));
        assert!(
            e.contains("collections[0].references.userEmail") && e.contains("business key"),
            "{e}"
        );
        let e = refused(&two.replace("customerId = ", "\"qa.x\" = "));
        assert!(e.contains("is preserved"), "{e}");
    }

    #[test]
    fn new_sync_durations_default_and_parse() {
        let c = Config::parse(MINIMAL, &env).unwrap();
        assert_eq!(c.sync.stall_after, Duration::from_secs(30));
        assert_eq!(c.sync.startup_timeout, Duration::from_secs(600));
        assert_eq!(c.sync.lease_ttl, Duration::from_secs(10));
        assert_eq!(c.sync.checkpoint_interval, Duration::from_secs(1));
        let c = Config::parse(
            &format!(
                "{MINIMAL}[sync]\nstall_after = \"1h\"\nstartup_timeout = \"2m 30s\"\nlease_ttl = 3\n\
                 checkpoint_interval = \"500ms\"\nbatch_max_wait_ms = \"2s\"\n"
            ),
            &env,
        )
        .unwrap();
        assert_eq!(c.sync.stall_after, Duration::from_secs(3600));
        assert_eq!(c.sync.startup_timeout, Duration::from_secs(150));
        assert_eq!(c.sync.lease_ttl, Duration::from_secs(3));
        assert_eq!(c.sync.checkpoint_interval, Duration::from_millis(500));
        assert_eq!(c.sync.batch_max_wait_ms, 2000);
        // The integer forms of before.
        let c = Config::parse(
            &with_sync("checkpoint_interval = 2\nbatch_max_wait_ms = 20"),
            &env,
        )
        .unwrap();
        assert_eq!(c.sync.checkpoint_interval, Duration::from_secs(2));
        assert_eq!(c.sync.batch_max_wait_ms, 20);
        let c = Config::parse(&with_sync("checkpoint_interval = 0.25"), &env).unwrap();
        assert_eq!(c.sync.checkpoint_interval, Duration::from_millis(250));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("0"), None);
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
    }
}
