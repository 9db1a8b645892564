//! Turning catalog text into a validated [`Catalog`].

use std::fmt;

use super::model::Catalog;
use super::validate::validate;

/// A catalog that could not be loaded: where (file and path inside it) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct CatalogError {
    /// The file (or other source) the catalog came from.
    pub source_name: String,
    /// Every problem found; never empty.
    pub problems: Vec<Problem>,
}

/// One problem in a catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path inside the document (`plans.pro.versions.2.limits.api_calls[0].amount`).
    pub path: String,
    /// Why it is wrong.
    pub reason: String,
}

impl fmt::Display for CatalogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {}: {}", self.source_name, p.path, p.reason)?;
        }
        Ok(())
    }
}

/// Parses and validates catalog text; `source_name` is used in errors (a file path).
pub fn parse(text: &str, source_name: &str) -> Result<Catalog, CatalogError> {
    let fail = |path: String, reason: String| CatalogError {
        source_name: source_name.to_string(),
        problems: vec![Problem { path, reason }],
    };
    if text.trim().is_empty() {
        return Err(fail(".".into(), "the catalog is empty".into()));
    }
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let catalog: Catalog = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let reason = friendly(&e.inner().to_string(), &path);
        fail(path, reason)
    })?;
    validate(&catalog).map_err(|problems| CatalogError {
        source_name: source_name.to_string(),
        problems,
    })?;
    Ok(catalog)
}

/// Rewrites the parser's wording for the mistakes people make most (negative or huge
/// amounts) and drops the path prefix the YAML parser repeats.
fn friendly(message: &str, path: &str) -> String {
    let message = message
        .strip_prefix(&format!("{path}: "))
        .unwrap_or(message);
    if message.contains("expected u64") || message.contains("expected u32") {
        if message.contains("integer `-") {
            return format!("must not be negative ({message})");
        }
        if message.contains("as u128") || message.contains("out of range") {
            return format!("is too large ({message})");
        }
    }
    message.to_string()
}
