//! Config errors as a user sees them: each class names the file, the key path and the line.
//! Pure tests: each writes a config file to a temporary directory and calls `Config::load`.

use std::path::PathBuf;
use std::time::Duration;

use stagesync::config::{Config, ConfigError};

/// A valid config; each test breaks one thing in it.
const BASE: &str = r#"# stagesync test config
[source]
uri = "mongodb://prod.invalid:27017"
database = "production"

[target]
uri = "mongodb://staging.invalid:27017"
database = "staging"

[sync]
name = "config-errors"
batch_max_events = 500
checkpoint_interval = "1s"

[[collections]]
name = "orders"
business_key = ["userEmail", "accountId"]
deletes = "soft"
"#;

struct Written {
    _dir: tempfile::TempDir,
    path: PathBuf,
    text: String,
}

fn write(text: &str) -> Written {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stagesync.toml");
    std::fs::write(&path, text).unwrap();
    Written {
        _dir: dir,
        path,
        text: text.to_string(),
    }
}

/// `BASE` with `from` replaced by `to` (which must be there).
fn base_with(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from:?} is not in BASE");
    BASE.replacen(from, to, 1)
}

impl Written {
    fn refused(&self) -> (ConfigError, String) {
        let e = Config::load(&self.path).expect_err("the config should be refused");
        let shown = e.to_string();
        (e, shown)
    }

    /// The 1-based line of the first line of the file containing `needle`.
    fn line_of(&self, needle: &str) -> usize {
        self.text
            .lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} is not in the file"))
            + 1
    }

    /// Asserts the message names the file, the line and the key, and returns it.
    fn assert_refused_at(&self, key: &str, line: usize) -> String {
        let (e, shown) = self.refused();
        let file = self.path.display().to_string();
        let prefix = format!("config error in {file} line {line}: {key}: ");
        assert!(
            shown.starts_with(&prefix),
            "expected {prefix:?}… got {shown:?}"
        );
        assert!(shown.contains("stagesync.toml"), "{shown}");
        assert!(shown.contains(&format!("line {line}")), "{shown}");
        assert!(shown.contains(key), "{shown}");
        assert_eq!(e.file, file);
        assert_eq!(e.key.as_deref(), Some(key));
        assert_eq!(e.line, Some(line));
        shown
    }
}

#[test]
fn the_base_config_loads() {
    let w = write(BASE);
    let c = Config::load(&w.path).unwrap();
    assert_eq!(c.sync.batch_max_events, 500);
    assert_eq!(c.path, w.path);
}

#[test]
fn wrong_type_names_key_and_line() {
    let w = write(&base_with(
        "batch_max_events = 500",
        "batch_max_events = \"many\"",
    ));
    let line = w.line_of("batch_max_events");
    let shown = w.assert_refused_at("sync.batch_max_events", line);
    assert_eq!(
        shown,
        format!(
            "config error in {} line {line}: sync.batch_max_events: expected an integer, found \"many\"",
            w.path.display()
        )
    );
}

#[test]
fn unknown_enum_value_lists_the_allowed_values() {
    let w = write(&base_with("deletes = \"soft\"", "deletes = \"sometimes\""));
    let shown = w.assert_refused_at("collections[0].deletes", w.line_of("deletes"));
    assert!(shown.contains("\"sometimes\""), "{shown}");
    for allowed in ["\"soft\"", "\"hard\"", "\"ignore\""] {
        assert!(shown.contains(allowed), "{shown}");
    }
}

#[test]
fn unknown_key_names_its_table_and_the_allowed_keys() {
    let w = write(&base_with(
        "batch_max_events = 500",
        "batch_max_events = 500\nbatch_max_event = 5",
    ));
    let shown = w.assert_refused_at("sync.batch_max_event", w.line_of("batch_max_event ="));
    assert!(
        shown.contains("unknown field `batch_max_event` in [sync]"),
        "{shown}"
    );
    assert!(shown.contains("; allowed: "), "{shown}");
    for allowed in [
        "`batch_max_events`",
        "`stall_after`",
        "`startup_timeout`",
        "`lease_ttl`",
    ] {
        assert!(shown.contains(allowed), "{shown}");
    }
}

#[test]
fn bad_duration_shows_the_allowed_forms() {
    let w = write(&base_with(
        "checkpoint_interval = \"1s\"",
        "checkpoint_interval = \"soon\"",
    ));
    let shown = w.assert_refused_at("sync.checkpoint_interval", w.line_of("checkpoint_interval"));
    assert!(shown.contains("found \"soon\""), "{shown}");
    for form in ["\"500ms\"", "\"30s\"", "\"1h\"", "number of seconds"] {
        assert!(shown.contains(form), "{shown}");
    }
}

#[test]
fn zero_durations_are_refused_where_they_make_no_sense() {
    for key in ["checkpoint_interval", "startup_timeout", "stall_after"] {
        let setting = format!("{key} = \"0s\"");
        let w = write(&match key {
            "checkpoint_interval" => base_with("checkpoint_interval = \"1s\"", &setting),
            _ => base_with(
                "batch_max_events = 500",
                &format!("batch_max_events = 500\n{setting}"),
            ),
        });
        let line = w.line_of(&format!("{key} = \"0s\""));
        let shown = w.assert_refused_at(&format!("sync.{key}"), line);
        assert!(shown.contains("must be longer than 0"), "{shown}");
    }
    let w = write(&base_with(
        "checkpoint_interval = \"1s\"",
        "checkpoint_interval = \"1s\"\nlease_ttl = \"500ms\"",
    ));
    let shown = w.assert_refused_at("sync.lease_ttl", w.line_of("lease_ttl"));
    assert!(shown.contains("at least \"1s\""), "{shown}");
}

#[test]
fn missing_required_key_points_at_its_table() {
    let w = write(&base_with(
        "business_key = [\"userEmail\", \"accountId\"]\n",
        "",
    ));
    let shown = w.assert_refused_at("collections[0].business_key", w.line_of("[[collections]]"));
    assert!(
        shown.contains("required key `business_key` is missing from [[collections]]"),
        "{shown}"
    );
}

#[test]
fn missing_file_names_the_path_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stagesync.toml");
    let e = Config::load(&path).expect_err("no file");
    let shown = e.to_string();
    assert_eq!(e.file, path.display().to_string());
    assert_eq!((e.key.as_deref(), e.line), (None, None));
    assert!(
        shown.starts_with(&format!("config error in {}: ", path.display())),
        "{shown}"
    );
    assert!(shown.contains("cannot read the config file"), "{shown}");
    assert!(shown.contains("--config"), "{shown}");
    assert!(shown.contains("create the file"), "{shown}");
}

#[test]
fn validation_error_gets_the_line_of_its_key() {
    let w = write(&base_with(
        "name = \"config-errors\"",
        "name = \"config-errors\"\nmetadata_database = \"staging\"",
    ));
    let shown = w.assert_refused_at("sync.metadata_database", w.line_of("metadata_database"));
    assert!(
        shown.contains("must differ from `target.database`"),
        "{shown}"
    );

    let w = write(&base_with(
        "business_key = [\"userEmail\", \"accountId\"]",
        "business_key = []",
    ));
    let shown = w.assert_refused_at("collections[0].business_key", w.line_of("business_key"));
    assert!(shown.contains("is empty"), "{shown}");
}

#[test]
fn unset_environment_variable_names_the_variable_and_key() {
    let var = "STAGESYNC_CONFIG_ERRORS_TEST_NEVER_SET";
    assert!(std::env::var_os(var).is_none());
    let w = write(&base_with(
        "uri = \"mongodb://prod.invalid:27017\"",
        &format!("uri = \"${{{var}}}\""),
    ));
    let shown = w.assert_refused_at("source.uri", w.line_of(var));
    assert!(shown.contains(var), "{shown}");
    // With a default it loads.
    let w = write(&base_with(
        "uri = \"mongodb://prod.invalid:27017\"",
        &format!("uri = \"${{{var}:-mongodb://prod.invalid:27017}}\""),
    ));
    let c = Config::load(&w.path).unwrap();
    assert_eq!(c.source.uri, "mongodb://prod.invalid:27017");
}

#[test]
fn toml_syntax_error_names_the_line() {
    let w = write(&base_with("[target]", "[target"));
    let (e, shown) = w.refused();
    assert_eq!(e.line, Some(w.line_of("[target")));
    assert_eq!(e.key, None);
    assert!(
        shown.starts_with(&format!(
            "config error in {} line {}: invalid TOML",
            w.path.display(),
            w.line_of("[target")
        )),
        "{shown}"
    );
}

#[test]
fn humantime_durations_parse() {
    for (text, expected) in [
        ("\"1h\"", Duration::from_secs(3600)),
        ("\"500ms\"", Duration::from_millis(500)),
        ("\"30s\"", Duration::from_secs(30)),
        ("\"2m 30s\"", Duration::from_secs(150)),
        ("2", Duration::from_secs(2)),
    ] {
        let w = write(&base_with(
            "checkpoint_interval = \"1s\"",
            &format!(
                "checkpoint_interval = {text}\nstall_after = {text}\nstartup_timeout = {text}"
            ),
        ));
        let c = Config::load(&w.path).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(c.sync.checkpoint_interval, expected, "{text}");
        assert_eq!(c.sync.stall_after, expected, "{text}");
        assert_eq!(c.sync.startup_timeout, expected, "{text}");
    }
    let w = write(&base_with(
        "checkpoint_interval = \"1s\"",
        "lease_ttl = \"1m\"\nbatch_max_wait_ms = \"250ms\"",
    ));
    let c = Config::load(&w.path).unwrap();
    assert_eq!(c.sync.lease_ttl, Duration::from_secs(60));
    assert_eq!(c.sync.batch_max_wait_ms, 250);
    assert_eq!(c.sync.checkpoint_interval, Duration::from_secs(1));
}
