//! Names that enter the agent (users, IdPs, policy names) and end up in logs, metric
//! labels, HTML and terminals: bounded, and free of control and invisible characters,
//! so that none can break a line, reorder text (U+202E) or pass for another name
//! (U+200B, U+FEFF). Outputs escape what they print all the same; `printable` is that
//! escaping for plain text.

use std::borrow::Cow;

use icu_properties::{CodePointMapData, props::GeneralCategory};
use thiserror::Error;

/// Longest user, IdP or policy name, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 256;

/// What a name may hold besides visible characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spaces {
    /// Users and IdPs: one word.
    Refused,
    /// Policy names ("Company Wiki"): spaces between visible characters.
    Allowed,
}

/// Why a name was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum NameProblem {
    #[error("it is empty")]
    Empty,
    #[error("it is {len} bytes long; the limit is {MAX_NAME_LEN}")]
    TooLong { len: usize },
    #[error("it contains whitespace (at byte {at}); write it as one word")]
    Whitespace { at: usize },
    #[error("it starts or ends with whitespace")]
    OuterWhitespace,
    #[error(
        "it contains U+{code:04X} (at byte {at}), a control or invisible character; names may hold only visible characters"
    )]
    Invisible { code: u32, at: usize },
}

/// Checks a name against the rules above.
pub fn check_name(value: &str, spaces: Spaces) -> Result<(), NameProblem> {
    if value.is_empty() {
        return Err(NameProblem::Empty);
    }
    if value.len() > MAX_NAME_LEN {
        return Err(NameProblem::TooLong { len: value.len() });
    }
    for (at, c) in value.char_indices() {
        if is_invisible(c) {
            return Err(NameProblem::Invisible {
                code: u32::from(c),
                at,
            });
        }
        if c.is_whitespace() && spaces == Spaces::Refused {
            return Err(NameProblem::Whitespace { at });
        }
    }
    if value.trim() != value {
        return Err(NameProblem::OuterWhitespace);
    }
    Ok(())
}

/// A name as error messages show it: quoted and escaped, and cut short when long.
pub fn preview(value: &str) -> String {
    const SHOWN: usize = 64;
    match value.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}...", &value[..cut]),
        None => format!("{value:?}"),
    }
}

/// `text` with every control or invisible character written as `\u{...}`, for plain
/// text output (tables in a terminal).
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_invisible) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_invisible(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Unicode categories Cc (controls, newline and ESC among them), Cf (format: bidi
/// overrides, zero-width characters, the BOM), Zl and Zp (line and paragraph
/// separators).
fn is_invisible(c: char) -> bool {
    matches!(
        CodePointMapData::<GeneralCategory>::new().get(c),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_invisible_characters_are_refused_and_named() {
        for (value, code) in [
            ("a\nb", 0x0a),
            ("a\rb", 0x0d),
            ("a\tb", 0x09),
            ("a\u{1b}[31mb", 0x1b),
            ("a\u{7f}", 0x7f),
            ("a\u{85}b", 0x85),
            ("evil\u{202e}moc.elpmaxe", 0x202e),
            ("al\u{200b}ice", 0x200b),
            ("\u{feff}alice", 0xfeff),
            ("a\u{2028}b", 0x2028),
            ("a\u{2029}b", 0x2029),
            ("a\u{ad}b", 0xad),
            ("a\u{e0041}", 0xe0041),
        ] {
            for spaces in [Spaces::Refused, Spaces::Allowed] {
                let problem = check_name(value, spaces).unwrap_err();
                assert!(
                    matches!(problem, NameProblem::Invisible { code: c, .. } if c == code),
                    "{value:?}: {problem:?}"
                );
            }
        }
        assert!(
            check_name("a\u{202e}b", Spaces::Allowed)
                .unwrap_err()
                .to_string()
                .contains("U+202E (at byte 1)")
        );
    }

    #[test]
    fn length_is_bounded_in_bytes() {
        assert_eq!(
            check_name(&"a".repeat(MAX_NAME_LEN), Spaces::Refused),
            Ok(())
        );
        assert_eq!(
            check_name(&"a".repeat(MAX_NAME_LEN + 1), Spaces::Refused),
            Err(NameProblem::TooLong { len: 257 })
        );
        // 86 three-byte characters: 258 bytes.
        assert!(check_name(&"\u{20ac}".repeat(86), Spaces::Refused).is_err());
        assert_eq!(check_name("", Spaces::Allowed), Err(NameProblem::Empty));
    }

    #[test]
    fn spaces_only_inside_policy_names() {
        assert_eq!(check_name("Company Wiki", Spaces::Allowed), Ok(()));
        assert_eq!(
            check_name("alice smith", Spaces::Refused),
            Err(NameProblem::Whitespace { at: 5 })
        );
        assert!(check_name("a\u{3000}b", Spaces::Refused).is_err());
        assert_eq!(
            check_name(" Wiki", Spaces::Allowed),
            Err(NameProblem::OuterWhitespace)
        );
        assert_eq!(
            check_name("Wiki ", Spaces::Allowed),
            Err(NameProblem::OuterWhitespace)
        );
    }

    #[test]
    fn ordinary_names_pass() {
        for name in [
            "alice@example.com",
            "okta",
            "Ünïcødé-名前",
            "o'brien+tag@example.com",
            "Wiki\"}",
            "emoji-\u{1f600}",
        ] {
            assert_eq!(check_name(name, Spaces::Refused), Ok(()), "{name}");
        }
    }

    #[test]
    fn printable_escapes_only_what_is_invisible() {
        assert!(matches!(printable("alice"), Cow::Borrowed("alice")));
        assert_eq!(printable("a\nb\u{202e}c"), "a\\u{a}b\\u{202e}c");
        assert_eq!(printable("Wiki \"x\""), "Wiki \"x\"");
    }

    #[test]
    fn previews_are_escaped_and_short() {
        assert_eq!(preview("a\nb"), "\"a\\nb\"");
        let long = preview(&"x".repeat(1000));
        assert!(long.len() < 80 && long.ends_with("..."), "{long}");
    }
}
