//! The masking rule names of `[collections.mask]`: part of the configuration's vocabulary (the
//! config validates them; `transform` applies them).

use std::fmt;

/// One masking rule, as named in `[collections.mask]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskRule {
    Hash,
    Email,
    Name,
    Phone,
    Redact,
    Null,
    Remove,
    Keep,
}

impl MaskRule {
    pub const NAMES: &'static [&'static str] = &[
        "hash", "email", "name", "phone", "redact", "null", "remove", "keep",
    ];

    pub fn parse(s: &str) -> Option<MaskRule> {
        Some(match s {
            "hash" => MaskRule::Hash,
            "email" => MaskRule::Email,
            "name" => MaskRule::Name,
            "phone" => MaskRule::Phone,
            "redact" => MaskRule::Redact,
            "null" => MaskRule::Null,
            "remove" => MaskRule::Remove,
            "keep" => MaskRule::Keep,
            _ => return None,
        })
    }

    /// The rule's name in the configuration (the inverse of [`MaskRule::parse`]).
    pub fn as_str(self) -> &'static str {
        match self {
            MaskRule::Hash => "hash",
            MaskRule::Email => "email",
            MaskRule::Name => "name",
            MaskRule::Phone => "phone",
            MaskRule::Redact => "redact",
            MaskRule::Null => "null",
            MaskRule::Remove => "remove",
            MaskRule::Keep => "keep",
        }
    }

    /// True for the rules that rewrite each scalar leaf (and recurse into documents and arrays);
    /// false for `null`, `remove` and `keep`, which act on a value as a whole.
    pub fn is_per_leaf(self) -> bool {
        matches!(
            self,
            MaskRule::Hash | MaskRule::Email | MaskRule::Name | MaskRule::Phone | MaskRule::Redact
        )
    }
}

impl fmt::Display for MaskRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_names_parse_and_round_trip() {
        assert_eq!(MaskRule::NAMES.len(), 8);
        for name in MaskRule::NAMES {
            let rule = MaskRule::parse(name).expect("every listed name parses");
            assert_eq!(rule.as_str(), *name);
            assert_eq!(rule.to_string(), *name);
        }
        assert_eq!(MaskRule::parse("Hash"), None);
        assert_eq!(MaskRule::parse("drop"), None);
        assert_eq!(MaskRule::parse(""), None);
    }
}
