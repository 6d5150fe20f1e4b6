//! Logging set-up: human lines on a terminal, JSON lines otherwise; `RUST_LOG` wins over
//! `--log-level`; colours only on a terminal.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
}

const LEVELS: &str = "error, warn, info, debug, trace (or a filter like `stagesync=debug,info`)";

/// Installs the global subscriber. An unusable level or `RUST_LOG` is the user's mistake: the
/// error names the allowed values.
pub fn init(format: LogFormat, level: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => parse_filter(&v).map_err(|e| {
            format!("RUST_LOG=\"{v}\" is not a log filter ({e}); allowed: {LEVELS}")
        })?,
        _ => parse_filter(level).map_err(|e| {
            format!("--log-level \"{level}\" is not a log level ({e}); allowed: {LEVELS}")
        })?,
    };
    let on_terminal = std::io::stderr().is_terminal();
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !on_terminal,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(on_terminal);
    if json {
        let _ = builder.json().flatten_event(true).try_init();
    } else {
        let _ = builder.with_target(false).try_init();
    }
    Ok(())
}

/// A strict parse: every directive must be a known level or `target=level`.
fn parse_filter(text: &str) -> Result<EnvFilter, String> {
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit('=').next().unwrap_or(directive);
        let known = ["error", "warn", "info", "debug", "trace", "off"];
        if directive.contains('=') || known.contains(&level.to_ascii_lowercase().as_str()) {
            if !known.contains(&level.to_ascii_lowercase().as_str()) {
                return Err(format!("unknown level `{level}`"));
            }
        } else if !directive
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(format!("`{directive}` is neither a level nor a target"));
        } else {
            // A bare word that is not a level would silently mean "this target at trace":
            // almost always a typo of a level.
            return Err(format!("unknown level `{directive}`"));
        }
    }
    EnvFilter::try_new(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_filter;

    #[test]
    fn levels_and_filters_are_accepted_and_typos_refused() {
        for ok in [
            "info",
            "DEBUG",
            "stagesync=debug,info",
            "warn,mongodb=error",
            "off",
        ] {
            assert!(parse_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["loud", "infoo", "stagesync=verbose", "a b"] {
            let e = parse_filter(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }
}
