//! Failing fast on a dead server: a [`preflight`] request before a run, and a [`Breaker`] that
//! stops a run once every attempt has failed for a while.
//!
//! Retries make one request patient (up to `max_retries` with backoff, minutes in all), which is
//! right for a server that is slow or sometimes fails, and wrong for one that is down: 200 problems
//! against a refused port used to take more than ten minutes to fail. So:
//!
//! - [`preflight`] sends `GET URL/models` before the run, a few quick tries (at most 4, per-attempt
//!   timeout at most 10 s). A connection error or 5xx on every try is an error naming the server.
//!   Any other answer (a 404 from a server without `/models`, a 429) shows the server is up; a
//!   401/403 is an error about the API key.
//! - [`Breaker`] watches every generation attempt of one [`Backend::generate`] call. A success, a
//!   429 (rate limited: alive) or a non-retryable 4xx (alive, the request is wrong) resets it; a
//!   connection error, timeout, 5xx or malformed body counts. It trips when at least `window`
//!   attempts in a row failed (`2 × min(concurrency, requests)`: every request in flight failed,
//!   twice) *and* the streak has lasted `dead_after` (30 s by default). The count alone would trip
//!   on a server restarting for two seconds, when 64 requests fail at once and again 1 s later; the
//!   duration alone would trip on one slow request. A server that answers some requests never
//!   trips it: each success starts the count again.
//!
//! When it trips, the requests in flight are cancelled (not reported: they did not fail for good,
//! they were stopped) and [`Backend::generate`] returns an error; what succeeded has reached the
//! sink, so the journal is intact and a rerun resumes.
//!
//! [`Backend::generate`]: crate::backend::Backend::generate

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, HeaderValue};

use super::retry::{AttemptError, RetryPolicy, error_chain};

/// Longest wait for one preflight attempt.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);
/// Preflight retries after the first attempt (fewer when `max_retries` is lower).
const PREFLIGHT_RETRIES: usize = 3;

/// The failure streak of one generate call; see the module docs.
#[derive(Debug)]
pub(crate) struct Breaker {
    window: usize,
    dead_after: Option<Duration>,
    streak: Mutex<Streak>,
}

#[derive(Debug, Default)]
struct Streak {
    failures: usize,
    since: Option<Instant>,
    last_error: String,
}

impl Breaker {
    /// Trips after `window` failed attempts in a row spanning `dead_after`; never when `None`.
    pub(crate) fn new(window: usize, dead_after: Option<Duration>) -> Self {
        Self {
            window: window.max(1),
            dead_after,
            streak: Mutex::new(Streak::default()),
        }
    }

    /// Whether it can trip at all.
    pub(crate) fn armed(&self) -> bool {
        self.dead_after.is_some()
    }

    /// Records one attempt's result.
    pub(crate) fn record<T>(&self, result: &Result<T, AttemptError>) {
        let mut streak = self.streak.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Err(error) if error.retryable && error.status != Some(429) => {
                streak.failures += 1;
                streak.since.get_or_insert_with(Instant::now);
                streak.last_error.clone_from(&error.message);
            }
            _ => *streak = Streak::default(),
        }
    }

    /// The reason to stop, once the streak is long enough at `now`.
    pub(crate) fn tripped(&self, now: Instant) -> Option<String> {
        let dead_after = self.dead_after?;
        let streak = self.streak.lock().unwrap_or_else(PoisonError::into_inner);
        let since = streak.since?;
        let lasted = now.saturating_duration_since(since);
        (streak.failures >= self.window && lasted >= dead_after).then(|| {
            format!(
                "the server looks down: every request failed for {:.0} s ({} attempts in a row, \
                 none succeeded), so the run stops here; last error: {}",
                lasted.as_secs_f64(),
                streak.failures,
                streak.last_error
            )
        })
    }
}

/// `GET models_url` until the server answers (see the module docs); the error says why not.
pub(crate) async fn preflight(
    client: &reqwest::Client,
    models_url: &str,
    auth: Option<&HeaderValue>,
    policy: RetryPolicy,
    timeout: Duration,
) -> Result<(), String> {
    let started = Instant::now();
    let retries = policy.max_retries.min(PREFLIGHT_RETRIES);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut request = client
            .get(models_url)
            .timeout(timeout.min(PREFLIGHT_TIMEOUT));
        if let Some(auth) = auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let error = match request.send().await {
            Ok(response) => {
                let status = response.status();
                match status.as_u16() {
                    401 | 403 => {
                        return Err(format!(
                            "the server refused the API key (HTTP {status} from `GET /models`); \
                             set `RETORT_API_KEY` or `OPENAI_API_KEY` to a key it accepts"
                        ));
                    }
                    code if status.is_server_error() || code == 408 => {
                        format!("HTTP {status} from `GET /models`")
                    }
                    code => {
                        tracing::debug!(code, "preflight: the server answers");
                        return Ok(());
                    }
                }
            }
            Err(e) if e.is_timeout() => {
                format!("no answer within {timeout:?}: {}", error_chain(&e))
            }
            Err(e) => format!("cannot connect: {}", error_chain(&e)),
        };
        if attempts > retries {
            return Err(format!(
                "the server is not answering ({attempts} attempts over {:.1} s; last: {error}); \
                 is it running at this address?",
                started.elapsed().as_secs_f64()
            ));
        }
        tracing::debug!(attempts, error, "preflight failed, retrying");
        tokio::time::sleep(policy.delay(attempts, None)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(status: Option<u16>) -> Result<(), AttemptError> {
        Err(AttemptError {
            retryable: true,
            retry_after: None,
            status,
            message: format!("HTTP {status:?}"),
        })
    }

    #[test]
    fn trips_only_on_a_long_enough_streak_of_failures() {
        let breaker = Breaker::new(4, Some(Duration::from_millis(50)));
        let start = Instant::now();
        for _ in 0..10 {
            breaker.record(&failure(Some(500)));
        }
        assert!(breaker.tripped(start).is_none(), "not for long enough yet");
        let later = Instant::now() + Duration::from_millis(60);
        let message = breaker.tripped(later).expect("trips");
        assert!(message.contains("10 attempts in a row"), "{message}");
        assert!(message.contains("HTTP Some(500)"), "{message}");
        // One success (or a sign of life: 429, a 4xx) starts over.
        breaker.record::<()>(&Ok(()));
        assert!(breaker.tripped(later).is_none());
        for _ in 0..10 {
            breaker.record(&failure(Some(429)));
        }
        assert!(breaker.tripped(later).is_none(), "rate limits are alive");
        for _ in 0..3 {
            breaker.record(&failure(None));
        }
        assert!(
            breaker
                .tripped(Instant::now() + Duration::from_secs(1))
                .is_none(),
            "3 < window"
        );
        assert!(Breaker::new(1, None).tripped(later).is_none());
    }
}
