//! A counting proxy in front of PostgreSQL: completed round trips are the ReadyForQuery
//! messages from the server (pg_stat_statements is not loaded on these servers).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default)]
pub(crate) struct ProxyCounters {
    pub(crate) ready_for_query: AtomicU64,
    pub(crate) connections: AtomicU64,
    pub(crate) bytes_to_server: AtomicU64,
    pub(crate) bytes_to_client: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct ProxyFigures {
    pub(crate) round_trips: u64,
    pub(crate) connections: u64,
    pub(crate) bytes_to_server: u64,
    pub(crate) bytes_to_client: u64,
}

impl ProxyCounters {
    pub(crate) fn figures(&self) -> ProxyFigures {
        ProxyFigures {
            round_trips: self.ready_for_query.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            bytes_to_server: self.bytes_to_server.load(Ordering::Relaxed),
            bytes_to_client: self.bytes_to_client.load(Ordering::Relaxed),
        }
    }
}

impl std::ops::Sub for ProxyFigures {
    type Output = ProxyFigures;
    fn sub(self, o: ProxyFigures) -> ProxyFigures {
        ProxyFigures {
            round_trips: self.round_trips - o.round_trips,
            connections: self.connections - o.connections,
            bytes_to_server: self.bytes_to_server - o.bytes_to_server,
            bytes_to_client: self.bytes_to_client - o.bytes_to_client,
        }
    }
}

/// Starts the proxy in front of `upstream`; needs `sslmode=disable` on the client side so the
/// server's first byte already is a framed message.
pub(crate) async fn start_proxy(upstream: SocketAddr) -> Result<(SocketAddr, Arc<ProxyCounters>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let counters = Arc::new(ProxyCounters::default());
    let shared = counters.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let counters = shared.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                counters.connections.fetch_add(1, Ordering::Relaxed);
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up_counters = counters.clone();
                let up = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        up_counters
                            .bytes_to_server
                            .fetch_add(n as u64, Ordering::Relaxed);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                };
                let down = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let (mut header, mut have, mut skip) = ([0u8; 5], 0usize, 0usize);
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut i = 0;
                        while i < n {
                            if skip > 0 {
                                let take = skip.min(n - i);
                                skip -= take;
                                i += take;
                                continue;
                            }
                            header[have] = buf[i];
                            have += 1;
                            i += 1;
                            if have == 5 {
                                let len = u32::from_be_bytes([
                                    header[1], header[2], header[3], header[4],
                                ]) as usize;
                                if header[0] == b'Z' {
                                    counters.ready_for_query.fetch_add(1, Ordering::Relaxed);
                                }
                                skip = len.saturating_sub(4);
                                have = 0;
                            }
                        }
                        counters
                            .bytes_to_client
                            .fetch_add(n as u64, Ordering::Relaxed);
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    Ok((addr, counters))
}
