//! Loopback networking: free ports and a raw HTTP/1.0 client.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port on 127.0.0.1")
        .port()
}

/// A raw HTTP/1.0 request to `127.0.0.1:port`, answered within 5 s; returns (status, body).
pub async fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    http_within(Duration::from_secs(5), port, method, path).await
}

/// [`http`] with its own deadline for the whole exchange.
pub async fn http_within(
    deadline: Duration,
    port: u16,
    method: &str,
    path: &str,
) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let req = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(deadline, exchange)
        .await
        .ok()
        .flatten()
}
