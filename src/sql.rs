//! SQL identifiers that come from configuration.
//!
//! Table and column names cannot be bound as query parameters, so they are spliced into SQL
//! text. Every such name is validated here (a plain PostgreSQL identifier: letters, digits and
//! underscores, not starting with a digit, at most 63 bytes) and always emitted double-quoted,
//! so configuration can never inject SQL.

use std::fmt;

/// A validated identifier, optionally schema-qualified; `Display` renders it quoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identifier {
    schema: Option<String>,
    name: String,
}

fn check(part: &str) -> Result<(), String> {
    let ok_start = part
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if part.is_empty() {
        return Err("is empty; give a table or column name".into());
    }
    if !ok_start || !part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "{part:?} is not a plain SQL identifier (letters, digits and _, not starting with a digit)"
        ));
    }
    if part.len() > 63 {
        return Err(format!(
            "{part:?} is longer than PostgreSQL's 63-byte identifier limit"
        ));
    }
    Ok(())
}

impl Identifier {
    /// A single identifier such as a column name.
    pub fn parse(s: &str) -> Result<Identifier, String> {
        check(s)?;
        Ok(Identifier {
            schema: None,
            name: s.to_string(),
        })
    }

    /// A table name, optionally `schema.table`.
    pub fn parse_qualified(s: &str) -> Result<Identifier, String> {
        match s.split_once('.') {
            Some((schema, name)) => {
                check(schema)?;
                check(name)?;
                Ok(Identifier {
                    schema: Some(schema.to_string()),
                    name: name.to_string(),
                })
            }
            None => Identifier::parse(s),
        }
    }

    /// A name read from the catalog (`pg_namespace.nspname`, `pg_class.relname`): not
    /// validated, since it is what PostgreSQL itself holds; quoted (with `"` doubled) on output.
    pub fn from_catalog(schema: &str, name: &str) -> Identifier {
        Identifier {
            schema: Some(schema.to_string()),
            name: name.to_string(),
        }
    }

    /// The unqualified name, unquoted.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The schema, unquoted, if one was given.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// A new identifier in the same schema with `suffix` appended to the name.
    pub fn with_suffix(&self, suffix: &str) -> Identifier {
        let mut name = format!("{}{}", self.name, suffix);
        name.truncate(63);
        Identifier {
            schema: self.schema.clone(),
            name,
        }
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(schema) = &self.schema {
            write!(f, "\"{}\".", schema.replace('"', "\"\""))?;
        }
        write!(f, "\"{}\"", self.name.replace('"', "\"\""))
    }
}

/// Quotes a string as an SQL literal (used only for constant values in DDL comments).
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_and_rejects() {
        assert_eq!(Identifier::parse("state").unwrap().to_string(), "\"state\"");
        assert_eq!(
            Identifier::parse_qualified("app.sessions")
                .unwrap()
                .to_string(),
            "\"app\".\"sessions\""
        );
        for bad in [
            "",
            "1x",
            "a-b",
            "a\"b",
            "x; drop table t",
            "a.b.c",
            &"x".repeat(64),
        ] {
            assert!(Identifier::parse_qualified(bad).is_err(), "{bad}");
        }
        assert_eq!(literal("it's"), "'it''s'");
    }
}
