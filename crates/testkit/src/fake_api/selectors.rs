//! Label and field selectors, parsed and matched like the apiserver's.

use serde_json::Value;

use super::routing::param;
use super::status::{bad_request, Reply};
use super::Kind;

/// The `labelSelector` and `fieldSelector` of a list or watch request (empty when absent); a
/// malformed one is the apiserver's 400 answer.
pub(super) fn selectors_of(
    params: &[(String, String)],
    kind: Kind,
) -> Result<(LabelSelector, FieldSelector), Reply> {
    let labels = match param(params, "labelSelector").map(LabelSelector::parse) {
        None => LabelSelector::default(),
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            return Err(bad_request(&format!(
                "unable to parse requested label selector: {e}"
            )))
        }
    };
    let fields = match param(params, "fieldSelector").map(|s| FieldSelector::parse(s, kind)) {
        None => FieldSelector::default(),
        Some(Ok(s)) => s,
        Some(Err(e)) => return Err(bad_request(&e)),
    };
    Ok((labels, fields))
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

/// A parsed `labelSelector`: requirements ANDed.
#[derive(Debug, Clone, Default)]
pub(super) struct LabelSelector(pub(super) Vec<Requirement>);

impl LabelSelector {
    pub(super) fn parse(text: &str) -> Result<LabelSelector, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text)? {
            let part = part.trim();
            if part.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(format!("found '', expected: identifier in {text:?}"));
            }
            requirements.push(parse_requirement(part)?);
        }
        Ok(LabelSelector(requirements))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::DoesNotExist(k) => get(k).is_none(),
            Requirement::GreaterThan(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x > *n),
            Requirement::LessThan(k, n) => get(k)
                .and_then(|x| x.parse::<i64>().ok())
                .is_some_and(|x| x < *n),
        })
    }
}

/// Splits on commas outside parentheses.
pub(super) fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("found ')', expected: identifier in {text:?}"));
                }
            }
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("found end of string, expected: ')' in {text:?}"));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

pub(super) fn parse_requirement(part: &str) -> Result<Requirement, String> {
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        validate_key(key)?;
        return Ok(Requirement::DoesNotExist(key.to_string()));
    }
    let key_len = part
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')))
        .unwrap_or(part.len());
    let key = &part[..key_len];
    validate_key(key)?;
    let rest = part[key_len..].trim_start();
    let key = key.to_string();
    if rest.is_empty() {
        return Ok(Requirement::Exists(key));
    }
    let value = |v: &str| -> Result<String, String> {
        let v = v.trim();
        validate_value(v)?;
        Ok(v.to_string())
    };
    let number = |v: &str| -> Result<i64, String> {
        v.trim()
            .parse::<i64>()
            .map_err(|_| format!("for 'Gt', 'Lt' operators, the value must be an integer: {v:?}"))
    };
    if let Some(v) = rest.strip_prefix("!=") {
        return Ok(Requirement::NotEquals(key, value(v)?));
    }
    if let Some(v) = rest.strip_prefix("==") {
        return Ok(Requirement::Equals(key, value(v)?));
    }
    if let Some(v) = rest.strip_prefix('=') {
        return Ok(Requirement::Equals(key, value(v)?));
    }
    if let Some(v) = rest.strip_prefix('>') {
        return Ok(Requirement::GreaterThan(key, number(v)?));
    }
    if let Some(v) = rest.strip_prefix('<') {
        return Ok(Requirement::LessThan(key, number(v)?));
    }
    let set = |v: &str| -> Result<Vec<String>, String> {
        let inner = v
            .trim()
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(|| format!("found {v:?}, expected: '(' ... ')'"))?;
        let values = inner
            .split(',')
            .map(&value)
            .collect::<Result<Vec<_>, _>>()?;
        if inner.trim().is_empty() {
            return Err("for 'in', 'notin' operators, values set can't be empty".to_string());
        }
        Ok(values)
    };
    if let Some(v) = rest.strip_prefix("notin") {
        if v.starts_with([' ', '(']) {
            return Ok(Requirement::NotIn(key, set(v)?));
        }
    }
    if let Some(v) = rest.strip_prefix("in") {
        if v.starts_with([' ', '(']) {
            return Ok(Requirement::In(key, set(v)?));
        }
    }
    Err(format!(
        "found '{rest}', expected: in, notin, =, ==, !=, gt, lt"
    ))
}

pub(super) fn is_name_part(s: &str, max: usize) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= max
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub(super) fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|label| {
                is_name_part(label, 63)
                    && label.bytes().all(|b| b != b'_' && !b.is_ascii_uppercase())
            })
    });
    if prefix_ok && is_name_part(name, 63) {
        Ok(())
    } else {
        Err(format!("invalid label key {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"))
    }
}

pub(super) fn validate_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_name_part(value, 63) {
        Ok(())
    } else {
        Err(format!("invalid label value: {value:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"))
    }
}

/// A parsed `fieldSelector`: (JSON pointer, value, negated) requirements ANDed.
#[derive(Debug, Clone, Default)]
pub(super) struct FieldSelector(pub(super) Vec<(&'static str, String, bool)>);

impl FieldSelector {
    pub(super) fn parse(text: &str, kind: Kind) -> Result<FieldSelector, String> {
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, value, negated) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, false)
            } else {
                return Err(format!(
                    "invalid selector: '{part}'; can't understand '{part}'"
                ));
            };
            let field = field.trim();
            let pointer = match (field, kind) {
                ("metadata.name", _) => "/metadata/name",
                // Cluster-scoped kinds have no metadata.namespace field to select on.
                ("metadata.namespace", Kind::Pod | Kind::Sandbox) => "/metadata/namespace",
                ("status.phase", Kind::Namespace) => "/status/phase",
                ("spec.nodeName", Kind::Pod) => "/spec/nodeName",
                ("spec.restartPolicy", Kind::Pod) => "/spec/restartPolicy",
                ("status.phase", Kind::Pod) => "/status/phase",
                _ => return Err(format!("field label not supported: {field}")),
            };
            requirements.push((pointer, value.trim().to_string(), negated));
        }
        Ok(FieldSelector(requirements))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(pointer, value, negated)| {
            let actual = object
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or_default();
            (actual == value) != *negated
        })
    }
}
