//! Policy errors: where in the policy files a problem is, and what the field must hold.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use crate::{
    boundedfile::{ReadError, TooDeep},
    yaml::YamlError,
};

use super::load::KIND;

/// Where in the policy files a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The policy file.
    pub file: PathBuf,
    /// The YAML document, counting from 1; only when the file holds several.
    pub document: Option<usize>,
    /// Line and column, counting from 1, when known.
    pub position: Option<(usize, usize)>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(d) = self.document {
            write!(f, ", document {d}")?;
        }
        if let Some((line, column)) = self.position {
            write!(f, ", line {line} column {column}")?;
        }
        Ok(())
    }
}

/// A value that has the right type but is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: expected {expected}, got {got}")]
pub struct FieldError {
    /// The field path, as in the YAML: `spec.egress.allow[1].cidr`.
    pub field: String,
    /// What the field must hold.
    pub expected: String,
    /// What it holds.
    pub got: String,
}

impl FieldError {
    pub(super) fn new(
        field: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
}

/// Policies could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A policy file or directory could not be read: missing, unreadable, neither a
    /// regular file nor a directory, or a file larger than
    /// [`MAX_POLICY_FILE_BYTES`](super::load::MAX_POLICY_FILE_BYTES).
    #[error("policy {path}: {source}", path = path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: ReadError,
    },
    /// A document nests sequences and mappings deeper than
    /// [`MAX_NESTING`](crate::boundedfile::MAX_NESTING) levels.
    #[error("policy {path}: {source}", path = path.display())]
    TooDeep {
        /// The policy file.
        path: PathBuf,
        /// The cap and where it was passed.
        #[source]
        source: TooDeep,
    },
    /// The text is not YAML, or a field is unknown, missing or of the wrong type.
    #[error("policy {at}: {}{message}", field_prefix(field.as_deref()))]
    Parse {
        /// Where.
        at: Origin,
        /// The field path (`spec.egress.allow[0].ports`), when the problem is in a field.
        field: Option<String>,
        /// The YAML parser's description.
        message: String,
    },
    /// A document is not an `AgentPolicy` (a mapping).
    #[error("policy {at}: expected an {KIND} (a mapping with apiVersion, kind, metadata and spec), got {got}")]
    NotAPolicy {
        /// Where.
        at: Origin,
        /// What the document is instead.
        got: String,
    },
    /// A value has the right type but is not acceptable.
    #[error("policy {at}: {error}")]
    Invalid {
        /// Where.
        at: Origin,
        /// The field, what it must hold and what it holds (boxed: errors stay small).
        error: Box<FieldError>,
    },
    /// Two policies have the same namespace and name.
    #[error("policy {at}: {KIND} `{name}` is already defined in {first}", first = first.display())]
    Duplicate {
        /// Where the second definition is.
        at: Origin,
        /// `namespace/name`, or `name` without a namespace.
        name: String,
        /// The file of the first definition.
        first: PathBuf,
    },
}

fn field_prefix(field: Option<&str>) -> String {
    field.map_or_else(String::new, |f| format!("field `{f}`: "))
}

/// A value as messages show it: in backquotes.
pub(super) fn quoted(s: &str) -> String {
    format!("`{s}`")
}

/// A YAML error as a [`PolicyError::Parse`] (or [`PolicyError::TooDeep`]): its path is the
/// field, its position the origin's. `lines_before` is the number of lines of the file
/// before the document, added to the document's own line numbers.
pub(super) fn parse_error(
    file: &Path,
    document: Option<usize>,
    lines_before: usize,
    e: YamlError,
) -> PolicyError {
    match e {
        YamlError::TooDeep(mut source) => {
            source.line += lines_before;
            PolicyError::TooDeep {
                path: file.to_owned(),
                source,
            }
        }
        YamlError::Parse {
            field,
            message,
            position,
        } => PolicyError::Parse {
            at: Origin {
                file: file.to_owned(),
                document,
                position: position.map(|(line, column)| (line + lines_before, column)),
            },
            field,
            message,
        },
    }
}
