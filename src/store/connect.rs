//! Connecting: the vetted `database.url`, one dedicated connection with the reconciler's
//! timeouts and keepalives, secrets kept out of messages, and the two cheapest questions a
//! connection answers (is it alive, what time is it on the server).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection};

use super::{within, StoreError, TableMapping};
use crate::config::Settings;

/// Connection settings derived from configuration.
#[derive(Clone)]
pub struct Database {
    options: PgConnectOptions,
    target: String,
    connect_timeout: Duration,
    statement_timeout: Duration,
    lock_timeout: Duration,
}

impl Database {
    pub fn new(settings: &Settings) -> Result<Database, StoreError> {
        let d = &settings.database;
        let url = vet_url(&d.url)?;
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e: sqlx::Error| StoreError::Url(redact(&e.to_string(), &d.url)))?;
        let options = options
            .application_name("sandbox-reconciler")
            .log_statements(tracing::log::LevelFilter::Debug);
        let target = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("")
        );
        Ok(Database {
            options,
            target,
            connect_timeout: d.connect_timeout.max(Duration::from_secs(1)),
            statement_timeout: d.statement_timeout,
            lock_timeout: d.lock_timeout,
        })
    }

    /// `host:port/database`, for messages (never the password).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Opens one dedicated connection with the reconciler's timeouts.
    pub async fn connect(&self) -> Result<PgConnection, StoreError> {
        let connecting = PgConnection::connect_with(&self.options);
        let mut conn = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| StoreError::Connect {
                target: self.target.clone(),
                message: format!("no answer within {}s", self.connect_timeout.as_secs()),
            })?
            .map_err(|e| StoreError::Connect {
                target: self.target.clone(),
                message: e.to_string(),
            })?;
        // Keepalives and tcp_user_timeout make the server notice a vanished client within
        // about a minute, ending its session and releasing any advisory lock it held. On a
        // Unix socket the server ignores them.
        let setup = format!(
            "SET statement_timeout = {}; SET lock_timeout = {}; \
             SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; \
             SET tcp_keepalives_count = 3; SET tcp_user_timeout = 60000",
            self.statement_timeout.as_millis(),
            self.lock_timeout.as_millis()
        );
        within(
            self.connect_timeout,
            "setting session parameters",
            sqlx::raw_sql(AssertSqlSafe(setup)).execute(&mut conn),
        )
        .await?;
        Ok(conn)
    }
}

/// The query parameters sqlx's PostgreSQL URL parser understands (besides `options[...]`).
const DRIVER_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// libpq parameters sqlx does not know that change nothing the reconciler relies on (it sets
/// its own connect timeout, keepalives and application name): removed, with a log line that
/// names only the parameter.
const IGNORED_LIBPQ_PARAMETERS: &[&str] = &[
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "fallback_application_name",
];

/// Decodes `%XX` escapes (and `+` as a space, as in a query string); invalid escapes stay.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'%' => match (
                bytes.get(i + 1).and_then(|&b| hex(b)),
                bytes.get(i + 2).and_then(|&b| hex(b)),
            ) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `key=value` pairs of a URL's query string, raw.
fn query_pairs(url: &str) -> Vec<(&str, &str)> {
    let Some((_, query)) = url.split_once('?') else {
        return Vec::new();
    };
    let query = query.split('#').next().unwrap_or_default();
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect()
}

/// Checks the query parameters of `database.url` before sqlx sees them: sqlx logs a parameter
/// it does not know *with its value* (a libpq `sslpassword` would be printed in clear) and then
/// ignores it (a `target_session_attrs` ignored could connect to a standby). Parameters sqlx
/// understands are kept; harmless libpq-only ones are removed with a log line naming only the
/// parameter; anything else is a configuration error naming the parameter, never its value.
fn vet_url(url: &str) -> Result<String, StoreError> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok(url.to_string());
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let key = percent_decode(pair.split_once('=').map_or(pair, |(k, _)| k));
        if DRIVER_PARAMETERS.contains(&key.as_str()) || key.starts_with("options[") {
            kept.push(pair);
        } else if IGNORED_LIBPQ_PARAMETERS.contains(&key.as_str()) {
            tracing::info!(
                parameter = %key,
                "database.url: ignoring a libpq parameter the PostgreSQL driver does not support (the reconciler sets its own timeouts and keepalives)"
            );
        } else if key == "sslpassword" {
            return Err(StoreError::Url(
                "the parameter sslpassword (the passphrase of an encrypted client key) is not supported by the PostgreSQL driver (its value is not shown); decrypt the key (openssl pkey -in client.key -out client.plain.key), point sslkey at it and remove sslpassword".into(),
            ));
        } else {
            return Err(StoreError::Url(format!(
                "the parameter {key} is not supported by the PostgreSQL driver (its value is not shown); remove it. Supported: {}",
                DRIVER_PARAMETERS.join(", ")
            )));
        }
    }
    let mut vetted = base.to_string();
    if !kept.is_empty() {
        vetted.push('?');
        vetted.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        vetted.push('#');
        vetted.push_str(f);
    }
    Ok(vetted)
}

/// The secrets a PostgreSQL URL can carry, raw and percent-decoded: the password in its
/// userinfo and the values of its `password` and `sslpassword` parameters.
fn url_secrets(url: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let authority = url.split_once("://").map_or("", |(_, rest)| {
        rest.split(['/', '?', '#']).next().unwrap_or_default()
    });
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if let Some((_, pw)) = userinfo.split_once(':') {
            secrets.push(pw.to_string());
            secrets.push(percent_decode(pw));
        }
    }
    for (key, value) in query_pairs(url) {
        if percent_decode(key).contains("password") {
            secrets.push(value.to_string());
            secrets.push(percent_decode(value));
        }
    }
    secrets.retain(|s| !s.is_empty());
    // Longest first, so a secret containing another is hidden whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    secrets
}

/// Hides what `url` carries in secret from `text`: the userinfo password and the values of the
/// `password` and `sslpassword` parameters (raw and percent-decoded), and, where the URL's
/// query string appears whole, every parameter's value.
pub fn redact(text: &str, url: &str) -> String {
    let mut out = text.to_string();
    if let Some((_, query)) = url.split_once('?') {
        if !query.is_empty() && out.contains(query) {
            let hidden: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) => format!("{k}=****"),
                    None => p.to_string(),
                })
                .collect();
            out = out.replace(query, &hidden.join("&"));
        }
    }
    for secret in url_secrets(url) {
        out = out.replace(&secret, "****");
    }
    out
}

/// The database server's clock (`clock_timestamp()`, not the transaction start).
pub async fn database_now(
    conn: &mut PgConnection,
    mapping: &TableMapping,
) -> Result<DateTime<Utc>, StoreError> {
    within(
        mapping.deadline,
        "reading the database clock",
        sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(conn),
    )
    .await
}

/// Checks that `conn` still answers (the writer connection, before each sweep).
pub async fn ping(conn: &mut PgConnection, mapping: &TableMapping) -> bool {
    within(
        mapping.deadline,
        "checking the connection",
        sqlx::query("SELECT 1").execute(conn),
    )
    .await
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "p@ss w/rd";
    const ENCODED: &str = "p%40ss%20w%2Frd";

    #[test]
    fn redact_hides_every_secret_a_url_carries() {
        for url in [
            format!("postgres://u:{ENCODED}@h:5432/db"),
            format!("postgres://u@h/db?sslmode=require&password={ENCODED}"),
            format!("postgres://u@h/db?sslkey=/keys/client.key&sslpassword={ENCODED}"),
        ] {
            let text = format!("failed: {SECRET} / {ENCODED} / {url}");
            let hidden = redact(&text, &url);
            assert!(!hidden.contains(SECRET), "{hidden}");
            assert!(!hidden.contains(ENCODED), "{hidden}");
            assert!(!hidden.contains("p@ss"), "{hidden}");
        }
        // A key path is not a secret; the host and database stay readable.
        let url = "postgres://u@h/db?sslkey=/keys/client.key";
        assert_eq!(redact("at h/db", url), "at h/db");
        assert_eq!(redact("key /keys/client.key", url), "key /keys/client.key");
    }

    #[test]
    fn url_parameters_the_driver_does_not_know_are_refused_without_their_value() {
        let err = vet_url(&format!("postgres://u@h/db?sslpassword={ENCODED}")).unwrap_err();
        let message = err.to_string();
        assert!(message.starts_with("database.url: "), "{message}");
        assert!(message.contains("sslpassword"), "{message}");
        assert!(
            !message.contains(ENCODED) && !message.contains(SECRET),
            "{message}"
        );
        assert!(err.is_configuration());
        let err = vet_url("postgres://u@h/db?target_session_attrs=read-write").unwrap_err();
        assert!(err.to_string().contains("target_session_attrs"), "{err}");
        assert!(!err.to_string().contains("read-write"), "{err}");
        // Harmless libpq-only parameters are dropped, the driver's own kept in order.
        assert_eq!(
            vet_url("postgres://u@h/db?connect_timeout=5&sslmode=require&keepalives=1&sslkey=/k")
                .unwrap(),
            "postgres://u@h/db?sslmode=require&sslkey=/k"
        );
        assert_eq!(
            vet_url("postgres://u@h/db?connect_timeout=5").unwrap(),
            "postgres://u@h/db"
        );
        assert_eq!(vet_url("postgres://u@h/db").unwrap(), "postgres://u@h/db");
        assert_eq!(percent_decode("a%2Fb%zz+c"), "a/b%zz c");
    }
}
