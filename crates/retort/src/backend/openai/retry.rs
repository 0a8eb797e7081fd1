//! One HTTP POST with retries: [`RetryPolicy`] (exponential backoff with jitter, `Retry-After`)
//! and the classification of failures into retryable and permanent ([`AttemptError`]).
//!
//! Retried: HTTP 408, 429 and 5xx, timeouts, connection errors (refused, reset, closed
//! mid-response) and bodies that are not the expected JSON. Not retried: other 4xx (a bad
//! request or a wrong key does not get better by asking again) and responses that parse but
//! lack what the caller needs.

use std::time::Duration;

use rand::Rng;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};

use super::breaker::Breaker;

/// Longest `Retry-After` honoured; a larger value is treated as this (and said so in the error).
const RETRY_AFTER_CAP: Duration = Duration::from_secs(600);
/// How much of an error body is quoted in messages.
const SNIPPET_CHARS: usize = 300;

/// Why one attempt failed and whether another may succeed.
#[derive(Debug, Clone)]
pub(crate) struct AttemptError {
    pub retryable: bool,
    /// The server's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
    /// The HTTP status of a non-2xx answer.
    pub status: Option<u16>,
    pub message: String,
}

impl AttemptError {
    pub(crate) fn retryable(message: String) -> Self {
        Self {
            retryable: true,
            retry_after: None,
            status: None,
            message,
        }
    }

    pub(crate) fn fatal(message: String) -> Self {
        Self {
            retryable: false,
            retry_after: None,
            status: None,
            message,
        }
    }
}

/// How often and how long to wait between attempts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    pub max_retries: usize,
    pub base: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// Delay after failed attempt number `attempt` (1-based): the server's `Retry-After` when
    /// given (plus up to `base` of jitter so a crowd of clients does not return at once), else
    /// "equal jitter" exponential backoff, uniform in `[d/2, d]` with `d = min(max, base * 2^(attempt-1))`.
    pub(crate) fn delay(&self, attempt: usize, retry_after: Option<Duration>) -> Duration {
        let mut rng = rand::rng();
        if let Some(after) = retry_after {
            let jitter = self.base.mul_f64(rng.random_range(0.0..=1.0));
            return after.min(RETRY_AFTER_CAP) + jitter;
        }
        let exponent = i32::try_from(attempt.saturating_sub(1).min(30)).unwrap_or(30);
        let ceiling = self.base.mul_f64(2f64.powi(exponent)).min(self.max);
        ceiling.mul_f64(rng.random_range(0.5..=1.0))
    }
}

/// Parses `Retry-After` given in seconds (integer or decimal); HTTP dates are ignored.
fn retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let seconds: f64 = value?.to_str().ok()?.trim().parse().ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .chars()
        .take(SNIPPET_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > SNIPPET_CHARS {
        out.push_str("...");
    }
    out
}

/// One POST of `body` to `url`, parsed by `parse` on HTTP 2xx.
async fn attempt<T>(
    client: &reqwest::Client,
    url: &str,
    auth: Option<&HeaderValue>,
    body: &[u8],
    parse: &impl Fn(&[u8]) -> Result<T, AttemptError>,
) -> Result<T, AttemptError> {
    let mut request = client
        .post(url)
        .header(CONTENT_TYPE, "application/json")
        .body(body.to_vec());
    if let Some(auth) = auth {
        request = request.header(AUTHORIZATION, auth.clone());
    }
    let transport = |e: reqwest::Error| {
        // Everything below HTTP (connect, timeout, reset, truncated body) may succeed next time.
        let kind = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "connection failed"
        } else {
            "transport error"
        };
        AttemptError::retryable(format!("{kind} on `{url}`: {}", error_chain(&e)))
    };
    let response = request.send().await.map_err(transport)?;
    let status = response.status();
    let after = retry_after(response.headers().get(RETRY_AFTER));
    let bytes = response.bytes().await.map_err(transport)?;
    if status.is_success() {
        return parse(&bytes);
    }
    let code = status.as_u16();
    Err(AttemptError {
        retryable: code == 408 || code == 429 || status.is_server_error(),
        retry_after: after,
        status: Some(code),
        message: format!("HTTP {status} from `{url}`: {}", snippet(&bytes)),
    })
}

/// reqwest's Display hides the cause ("error sending request"); show the whole chain.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// POSTs `body` until it succeeds, fails permanently or runs out of retries. Returns the
/// result (the last error's description on failure) and the number of attempts made.
pub(crate) async fn post_with_retries<T>(
    client: &reqwest::Client,
    url: &str,
    auth: Option<&HeaderValue>,
    body: &[u8],
    policy: RetryPolicy,
    parse: impl Fn(&[u8]) -> Result<T, AttemptError>,
) -> (Result<T, String>, usize) {
    post_watched(client, url, auth, body, policy, parse, None).await
}

/// [`post_with_retries`], showing each attempt's result to `breaker` when given.
pub(crate) async fn post_watched<T>(
    client: &reqwest::Client,
    url: &str,
    auth: Option<&HeaderValue>,
    body: &[u8],
    policy: RetryPolicy,
    parse: impl Fn(&[u8]) -> Result<T, AttemptError>,
    breaker: Option<&Breaker>,
) -> (Result<T, String>, usize) {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let result = attempt(client, url, auth, body, &parse).await;
        if let Some(breaker) = breaker {
            breaker.record(&result);
        }
        match result {
            Ok(value) => return (Ok(value), attempts),
            Err(error) if !error.retryable => {
                return (Err(format!("{} (not retried)", error.message)), attempts);
            }
            Err(error) if attempts > policy.max_retries => {
                return (
                    Err(format!(
                        "{} (gave up after {attempts} attempts)",
                        error.message
                    )),
                    attempts,
                );
            }
            Err(error) => {
                let delay = policy.delay(attempts, error.retry_after);
                tracing::debug!(url, attempts, ?delay, error = %error.message, "retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let policy = RetryPolicy {
            max_retries: 5,
            base: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        };
        for _ in 0..50 {
            let first = policy.delay(1, None);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let fourth = policy.delay(4, None);
            assert!(fourth >= Duration::from_millis(400) && fourth <= Duration::from_millis(800));
            assert!(policy.delay(40, None) <= Duration::from_millis(1000));
            let after = policy.delay(1, Some(Duration::from_secs(2)));
            assert!(after >= Duration::from_secs(2) && after <= Duration::from_millis(2100));
        }
        assert_eq!(
            retry_after(Some(&HeaderValue::from_static("3"))),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            retry_after(Some(&HeaderValue::from_static(
                "Wed, 21 Oct 2015 07:28:00 GMT"
            ))),
            None
        );
        assert_eq!(snippet(b"a\nb"), "a b");
    }
}
