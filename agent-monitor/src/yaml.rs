//! YAML for the config and policy files: serde-saphyr, bounded, with errors that name the
//! field path and the position.
//!
//! serde-saphyr parses with a budget checked as events stream in: nesting deeper than
//! [`MAX_NESTING`] stops the parse at the first collection past the cap (in microseconds,
//! however deep the rest goes), and node, alias and document counts are capped too. Its
//! errors carry a position but no field path; [`serde_path_to_error`] adds the path
//! (`spec.egress.allow[1].cidr`).

use std::fmt;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde_saphyr::{budget::BudgetBreach, Error, Options};

use crate::boundedfile::{TooDeep, MAX_NESTING};

/// A YAML text could not be deserialized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum YamlError {
    /// Sequences and mappings nested deeper than [`MAX_NESTING`].
    TooDeep(TooDeep),
    /// Not YAML, or a field unknown, missing or of the wrong type.
    Parse {
        /// The field path (`spec.egress.allow[0].ports`), when the problem is in a field.
        field: Option<String>,
        /// What is wrong.
        message: String,
        /// Line and column, counting from 1, when known.
        position: Option<(usize, usize)>,
    },
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooDeep(e) => write!(f, "{e}"),
            Self::Parse {
                field,
                message,
                position,
            } => {
                if let Some(field) = field {
                    write!(f, "{field}: ")?;
                }
                write!(f, "{message}")?;
                if let Some((line, column)) = position {
                    write!(f, " at line {line} column {column}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for YamlError {}

/// How far the scanner looks ahead for an implicit key: YAML's own limit, and
/// serde-saphyr's default.
const LOOKAHEAD: usize = 1024;

/// The parser's options: plain messages (no source snippets), the nesting cap, YAML 1.2
/// booleans only (`yes` is a string, as in serde_yaml), duplicate keys refused.
fn options() -> Options {
    serde_saphyr::options! {
        with_snippet: false,
        strict_booleans: true,
        budget: serde_saphyr::budget! {
            max_depth: MAX_NESTING,
            // The scanner looks up to 1,024 characters ahead for an implicit key (a flow
            // collection can be one: `{a: 1}: b`), and has its own cap on open flow
            // collections, checked while scanning ahead. Set past anything that lookahead
            // can open, so that the depth budget, checked on the parsed events, is always
            // what stops a deep text, at the first collection past the cap.
            flow_nesting_limit: MAX_NESTING + LOOKAHEAD + 1,
            simple_key_max_lookahead: LOOKAHEAD,
        },
    }
}

/// Deserializes one YAML document. An empty (or comment-only) text is YAML's null.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    check_nesting(text)?;
    let mut path = None;
    serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = Some(e.path().to_string());
            e.into_inner()
        })
    })
    .map_err(|e| error(text, path.as_deref(), &e))
}

/// Checks the nesting of the whole text before it is deserialized into a type, so that a
/// too-deep text is reported as such even where a field of the wrong type comes first
/// (`watch: [[[...` is a sequence where a mapping is expected, and 100,000 levels deep).
/// Skipping every node still streams every event through the budget, which stops at the
/// first collection past the cap. Other errors are left to the typed parse, which reports
/// them with their field path.
fn check_nesting(text: &str) -> Result<(), YamlError> {
    match serde_saphyr::from_str_with_options::<IgnoredAny>(text, options()) {
        Err(e) => match e.without_snippet() {
            Error::Budget {
                breach: BudgetBreach::Depth { .. },
                location,
            } => Err(YamlError::TooDeep(TooDeep {
                limit: MAX_NESTING,
                line: usize::try_from(location.line()).unwrap_or(usize::MAX),
                column: usize::try_from(location.column()).unwrap_or(usize::MAX),
            })),
            _ => Ok(()),
        },
        Ok(_) => Ok(()),
    }
}

/// The documents of a YAML stream: each one's text and the number of lines before it.
/// A document starts at a `---` line (the YAML spec forbids such a line inside content);
/// comments and blank lines before the first `---` are not a document of their own.
pub fn documents(text: &str) -> Vec<(&str, usize)> {
    let is_marker = |line: &str| {
        line.strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
    };
    let mut docs = Vec::new();
    let (mut start, mut start_line) = (0usize, 0usize);
    let mut offset = 0usize;
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        if is_marker(line) {
            let before = &text[start..offset];
            // The first chunk counts only when it holds content.
            if start > 0 || has_content(before) {
                docs.push((before, start_line));
            }
            (start, start_line) = (offset, line_no);
        }
        offset += line.len();
    }
    let last = &text[start..];
    if start > 0 || has_content(last) {
        docs.push((last, start_line));
    }
    docs
}

/// Whether a YAML text holds anything but blank lines and comments.
fn has_content(text: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim();
        !l.is_empty() && !l.starts_with('#')
    })
}

/// Joins a parent path and a field name.
fn join_path(parent: Option<&str>, child: &str) -> String {
    match parent {
        Some(p) if !p.is_empty() && p != "." => format!("{p}.{child}"),
        _ => child.to_owned(),
    }
}

/// `expected `a`, `b` or `c``, as serde words it.
fn one_of(what: &str, expected: &[&str]) -> String {
    let quoted: Vec<String> = expected.iter().map(|e| format!("`{e}`")).collect();
    match quoted.as_slice() {
        [] => format!("there are no {what}s"),
        [one] => format!("expected {one}"),
        [a, b] => format!("expected {a} or {b}"),
        _ => format!("expected one of {}", quoted.join(", ")),
    }
}

/// The source text an error points at, up to the end of its line.
fn source_at<'t>(text: &'t str, e: &Error) -> Option<&'t str> {
    let span = e.location()?.span();
    let start = usize::try_from(span.byte_offset()?).ok()?;
    let len = usize::try_from(span.byte_len()?).ok()?;
    let rest = text.get(start..)?;
    let s = if len > 0 {
        rest.get(..len)?
    } else {
        rest.split(['\n', '#']).next()?
    };
    Some(s.trim())
}

/// What the text an error points at is, as serde words it: `string "x"`, `integer `7``,
/// `a sequence`, `a mapping`.
fn describe(found: &str) -> String {
    if found.starts_with('[') || found.starts_with("- ") || found == "-" {
        "sequence".to_owned()
    } else if found.starts_with('{') {
        "map".to_owned()
    } else if found.parse::<i128>().is_ok() {
        format!("integer `{found}`")
    } else if found.parse::<f64>().is_ok() {
        format!("floating point `{found}`")
    } else {
        let unquoted = found
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .or_else(|| found.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
            .unwrap_or(found);
        format!("string {unquoted:?}")
    }
}

/// What serde-saphyr names a node kind, as serde names it.
fn expected_kind(expected: &str) -> String {
    match expected {
        "sequence start" | "sequence" => "a sequence".to_owned(),
        "mapping start" | "mapping" | "map" | "struct mapping" => "a mapping".to_owned(),
        "string scalar" | "string" => "a string".to_owned(),
        other => other.to_owned(),
    }
}

/// A serde-saphyr error (and the path serde_path_to_error tracked) as a [`YamlError`].
fn error(text: &str, path: Option<&str>, e: &Error) -> YamlError {
    let e = e.without_snippet();
    let position = e.location().map(|l| {
        (
            usize::try_from(l.line()).unwrap_or(usize::MAX),
            usize::try_from(l.column()).unwrap_or(usize::MAX),
        )
    });
    if let Error::Budget {
        breach: BudgetBreach::Depth { .. },
        ..
    } = e
    {
        let (line, column) = position.unwrap_or((0, 0));
        return YamlError::TooDeep(TooDeep {
            limit: MAX_NESTING,
            line,
            column,
        });
    }
    // `.` is the root, `?` a mapping key.
    let mut field = path
        .map(|p| p.trim_end_matches("?").trim_end_matches('.'))
        .filter(|p| !p.is_empty())
        .map(str::to_owned);
    let message = match e {
        Error::SerdeUnknownField {
            field: name,
            expected,
            ..
        } => format!(
            "unknown field `{name}`, {}",
            one_of("field", expected.as_slice())
        ),
        Error::SerdeUnknownVariant {
            variant, expected, ..
        } => format!(
            "unknown variant `{variant}`, {}",
            one_of("variant", expected.as_slice())
        ),
        Error::SerdeMissingField { field: name, .. } => {
            field = Some(join_path(field.as_deref(), name));
            format!("missing field `{name}`")
        }
        Error::DuplicateMappingKey { key: Some(key), .. } => {
            field = Some(join_path(field.as_deref(), key));
            format!("duplicate field `{key}`")
        }
        Error::InvalidScalar { ty, .. } => match source_at(text, e) {
            Some(found) if found.parse::<i128>().is_ok() => {
                format!("invalid value: integer `{found}`, expected {ty}")
            }
            Some(found) => format!("invalid type: {}, expected {ty}", describe(found)),
            None => format!("invalid {ty}"),
        },
        Error::Unexpected { expected, .. } => {
            let expected = expected_kind(expected);
            match source_at(text, e) {
                Some(found) if !found.is_empty() => {
                    format!("invalid type: {}, expected {expected}", describe(found))
                }
                _ => format!("expected {expected}"),
            }
        }
        _ => {
            // The rendered message, without the position serde-saphyr appends.
            let rendered = e.to_string();
            match e.location() {
                Some(l) => rendered
                    .strip_suffix(&format!(" at line {}, column {}", l.line(), l.column()))
                    .map_or_else(|| rendered.clone(), str::to_owned),
                None => rendered,
            }
        }
    };
    YamlError::Parse {
        field,
        message,
        position,
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        time::{Duration, Instant},
    };

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Rule {
        class: Option<String>,
        #[serde(default)]
        ports: Vec<u16>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        allow: Vec<Rule>,
        on: Option<bool>,
    }

    fn err(text: &str) -> String {
        from_str::<Doc>(text).expect_err("invalid").to_string()
    }

    #[test]
    fn errors_name_the_field_and_the_position() {
        assert_eq!(
            err("allow:\n  - class: dns\n    port: [53]\n"),
            "allow[0].port: unknown field `port`, expected `class` or `ports` at line 3 column 5"
        );
        assert_eq!(
            err("allow:\n  - ports: [53, https]\n"),
            "allow[0].ports[1]: invalid type: string \"https\", expected u16 at line 2 column 17"
        );
        assert_eq!(
            err("allow:\n  - ports: [70000]\n"),
            "allow[0].ports[0]: invalid value: integer `70000`, expected u16 at line 2 column 13"
        );
        assert!(
            err("allow:\n  - ports: fifty-three\n").starts_with(
                "allow[0].ports: invalid type: string \"fifty-three\", expected a sequence"
            ),
            "{}",
            err("allow:\n  - ports: fifty-three\n")
        );
        assert_eq!(
            err("on: true\n"),
            "allow: missing field `allow` at line 1 column 1"
        );
        assert!(
            err("allow: []\non: yes\n").starts_with("on: "),
            "YAML 1.2 booleans only"
        );
        assert!(err("allow: []\nallow: []\n").contains("duplicate"));
        assert!(err("allow: [\n").contains("line 1"));
    }

    #[test]
    fn nesting_is_capped_early_and_positioned() {
        let nested = |n: usize| format!("{}1{}", "{a: ".repeat(n), "}".repeat(n));
        assert!(from_str::<serde_json::Value>(&nested(MAX_NESTING)).is_ok());
        assert_eq!(
            from_str::<serde_json::Value>(&nested(MAX_NESTING + 1)),
            Err(YamlError::TooDeep(TooDeep {
                limit: MAX_NESTING,
                line: 1,
                column: 4 * MAX_NESTING + 1
            }))
        );
        // Block nesting counts the same way.
        let mut block = String::new();
        for i in 0..=MAX_NESTING {
            block.push_str(&format!("{}a:\n", "  ".repeat(i)));
        }
        assert!(matches!(
            from_str::<serde_json::Value>(&block),
            Err(YamlError::TooDeep(TooDeep { line: 65, .. }))
        ));
        // 200,000 levels stop at level 65, at once.
        let start = Instant::now();
        let deep = from_str::<BTreeMap<String, serde_json::Value>>(&nested(200_000));
        assert!(matches!(deep, Err(YamlError::TooDeep(_))), "{deep:?}");
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn documents_split_at_markers() {
        let text = "# head\na: 1\n---\n---\nb: 2\n--- c: 3\n";
        assert_eq!(
            documents(text),
            vec![
                ("# head\na: 1\n", 0),
                ("---\n", 2),
                ("---\nb: 2\n", 3),
                ("--- c: 3\n", 5)
            ]
        );
        assert_eq!(documents("# only\n---\na: 1\n"), vec![("---\na: 1\n", 1)]);
        assert!(documents("").is_empty());
        assert!(documents("# nothing\n").is_empty());
        // `---x` is not a marker; block scalars cannot hold a `---` line.
        assert_eq!(documents("a: ---x\n").len(), 1);
    }
}
