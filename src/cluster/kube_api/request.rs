//! The one way every API request is made ([`KubeCluster::request`]): timed (the request
//! deadline and the retry policy of [`KubeCluster::call`], or once for a watch's start),
//! its failure mapped to a [`ClusterError`], its answer counted once in the request hook.

use std::time::Duration;

use super::KubeCluster;
use crate::cluster::ClusterError;

impl KubeCluster {
    /// Runs one API request with the reconciler's retry policy, the whole within the request
    /// deadline (`cluster.request_timeout_seconds`): 429, 503 and 504 answers are retried up to
    /// `cluster.retries` times, after the server's `Retry-After` (its Status'
    /// `details.retryAfterSeconds`) when it gives one and it fits the deadline, else after an
    /// exponential backoff from 100 ms. Nothing else is retried: any other failure aborts
    /// the sweep. Each retried answer is counted in `kube_requests_total` here; the final
    /// answer is counted by [`Self::request`], the only caller. (kube's own retry layer is
    /// off, see `client`.)
    async fn call<T, Fut>(
        &self,
        verb: &'static str,
        attempt: impl Fn() -> Fut,
    ) -> Result<kube::Result<T>, tokio::time::error::Elapsed>
    where
        Fut: std::future::Future<Output = kube::Result<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut backoff = Duration::from_millis(100);
        let mut retries = 0;
        loop {
            let answer = tokio::time::timeout_at(deadline, attempt()).await?;
            let status = match &answer {
                Err(kube::Error::Api(status))
                    if matches!(status.code, 429 | 503 | 504) && retries < self.retries =>
                {
                    status
                }
                _ => return Ok(answer),
            };
            let delay = status
                .details
                .as_ref()
                .map(|d| Duration::from_secs(u64::from(d.retry_after_seconds)))
                .filter(|d| !d.is_zero())
                .unwrap_or(backoff);
            if tokio::time::Instant::now() + delay >= deadline {
                return Ok(answer);
            }
            self.note_code(verb, status.code);
            tracing::debug!(
                code = status.code,
                delay_ms = delay.as_millis() as u64,
                "retrying an API request"
            );
            retries += 1;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            tokio::time::sleep(delay).await;
        }
    }

    /// Every API request goes through here: timed (within the request deadline and with the
    /// retry policy of [`Self::call`], or, for a watch's start, once and without a deadline),
    /// its final answer counted once in the request hook, and its failure mapped to a
    /// [`ClusterError`] naming `what` and, for a 403 or a 404 on a listing or GET, `verb` on
    /// `resource`. A success is counted as `counted_as` says: 200, or 404 for a GET whose
    /// not-found answer the attempt turned into a value.
    pub(super) async fn request<T, Fut>(
        &self,
        verb: &'static str,
        what: &str,
        resource: &str,
        timing: Timing,
        attempt: impl Fn() -> Fut,
        counted_as: impl FnOnce(&T) -> u16,
    ) -> Result<T, ClusterError>
    where
        Fut: std::future::Future<Output = kube::Result<T>>,
    {
        let answer = match timing {
            Timing::Deadline => self.call(verb, attempt).await,
            Timing::Unbounded => Ok(attempt().await),
        };
        match answer {
            Err(_) => {
                self.note_code(verb, 0);
                Err(ClusterError::Timeout {
                    what: what.to_string(),
                    seconds: self.timeout.as_secs(),
                })
            }
            Ok(Err(e)) => {
                let err = map_error(what, verb, resource, e);
                self.note_code(verb, api_code(&err));
                Err(err)
            }
            Ok(Ok(value)) => {
                self.note_code(verb, counted_as(&value));
                Ok(value)
            }
        }
    }

    /// Counts one request's answer in the request hook (`code` 0: no answer).
    fn note_code(&self, verb: &'static str, code: u16) {
        if let Some(hook) = &self.hook {
            hook(verb, code);
        }
    }
}

/// How [`KubeCluster::request`] times a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timing {
    /// Within the request deadline, 429, 503 and 504 retried ([`KubeCluster::call`]).
    Deadline,
    /// Once, without a deadline: a watch's start, which the cache's own freshness check
    /// bounds (a watch that does not start is as stale as a frozen one).
    Unbounded,
}

fn api_code(err: &ClusterError) -> u16 {
    match err {
        ClusterError::Api { code, .. } => *code,
        ClusterError::Forbidden { .. } => 403,
        ClusterError::NotServed { .. } => 404,
        _ => 0,
    }
}

fn map_error(what: &str, verb: &'static str, resource: &str, e: kube::Error) -> ClusterError {
    match e {
        kube::Error::Api(status) if status.code == 403 => ClusterError::Forbidden {
            what: what.to_string(),
            verb,
            resource: resource.to_string(),
            message: status.message.clone(),
        },
        // A 404 that reached here names no object (a listing's never does; a GET's that names
        // its object is absence, decided by the caller): the path is not served.
        kube::Error::Api(status) if status.code == 404 && matches!(verb, "list" | "get") => {
            ClusterError::NotServed {
                what: what.to_string(),
                resource: resource.to_string(),
            }
        }
        kube::Error::Api(status) => ClusterError::Api {
            what: what.to_string(),
            code: status.code,
            reason: status.reason.clone(),
            message: truncate(&status.message, 300),
        },
        kube::Error::SerdeError(e) => ClusterError::Malformed {
            what: what.to_string(),
            message: e.to_string(),
        },
        other => ClusterError::Transport {
            what: what.to_string(),
            message: other.to_string(),
        },
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A copy of a built request (an `http::Request<Vec<u8>>` is not `Clone`), for retries.
pub(super) fn clone_request(request: &http::Request<Vec<u8>>) -> http::Request<Vec<u8>> {
    let mut copy = http::Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    copy
}
