//! Retrying remote reads: backoff, resumption, and when to give up.
//!
//! Design:
//! - Every error says whether trying again can help ([`Transient::verdict`]): a reset
//!   connection, a stall, a truncated body, a 5xx, a 408 or 429, or bytes that failed their
//!   digest (a broken proxy flips bits) can; a 404, a refused credential or a malformed request
//!   cannot, and is returned at once. A 401 is not retried here: the registry client already
//!   renews its token once.
//! - Waits grow exponentially from [`RetryPolicy::initial_backoff`] to
//!   [`RetryPolicy::max_backoff`] with "full jitter" (a uniformly random wait below the cap), so
//!   many readers hitting one failure do not come back in lock step. A `Retry-After` from the
//!   server wins when it fits in the time left.
//! - A read gives up after [`RetryPolicy::max_attempts`] failures in a row, or when it has gone
//!   [`RetryPolicy::read_timeout`] without receiving a byte, whichever comes first. Both reset
//!   when bytes arrive: a large transfer that keeps making progress through a flaky link is never
//!   cut off, while a dead source fails a read within a bounded time. A single attempt that
//!   hangs is ended by the transfer's stall timeout (no byte for `--stall-timeout`), never by
//!   a deadline on the whole transfer.
//!
//! This module is the policy alone, for any operation whose error says [`Transient::verdict`];
//! [`crate::source::retrying::RetryingSource`] applies it to every read of a source.
//!
//! Counters of retries and exhausted reads are process-wide (one daemon serves one mount), so
//! `stats` and the metrics endpoint can report them without threading a handle everywhere.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How remote reads are retried. Defaults suit a registry across the internet.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per read before it fails (the first try included). 5: four retries cover a
    /// registry restart or a load balancer shuffle (a few seconds with the default backoff)
    /// without making a reader of a truly missing blob wait long.
    pub max_attempts: u32,
    /// The longest a read may go without receiving a byte, retries and waits included, before
    /// it fails with EIO. 60 s: above the default stall timeout plus a few backoffs, and below
    /// the point where a user or an orchestrator gives up on a container start.
    pub read_timeout: Duration,
    /// First wait between attempts. 200 ms: a round trip or two on a slow link; shorter waits
    /// mostly hit the same failure again.
    pub initial_backoff: Duration,
    /// Largest wait between attempts. 5 s: keeps a reader from sleeping through a recovery.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            read_timeout: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Whether an error is worth another attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Trying again cannot help (not found, refused credentials, a malformed request).
    Fatal,
    /// Try again, after the server's `Retry-After` if it sent one.
    Retry(Option<Duration>),
}

/// Errors that know whether they are transient.
pub trait Transient {
    fn verdict(&self) -> Verdict;
}

static RETRIES: AtomicU64 = AtomicU64::new(0);
static EXHAUSTED: AtomicU64 = AtomicU64::new(0);

/// Process-wide counts: attempts that failed and were retried, and reads that failed after
/// their retry budget.
pub fn counters() -> (u64, u64) {
    (
        RETRIES.load(Ordering::Relaxed),
        EXHAUSTED.load(Ordering::Relaxed),
    )
}

/// The retry state of one read.
pub struct Backoff<'a> {
    policy: &'a RetryPolicy,
    /// Failures since the last progress.
    failures: u32,
    /// When the read last received bytes (or started).
    since: Instant,
}

impl<'a> Backoff<'a> {
    pub fn new(policy: &'a RetryPolicy) -> Self {
        Backoff {
            policy,
            failures: 0,
            since: Instant::now(),
        }
    }

    /// Bytes arrived: the budget starts over.
    pub fn progress(&mut self) {
        self.failures = 0;
        self.since = Instant::now();
    }

    /// Time left before the read gives up for lack of progress.
    pub fn remaining(&self) -> Duration {
        self.policy
            .read_timeout
            .saturating_sub(self.since.elapsed())
    }

    /// Failures since the last progress.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records a failure; returns how long to wait before the next attempt, or `None` when the
    /// read must give up (the error is fatal, or the budget is spent).
    pub fn failed(&mut self, verdict: Verdict) -> Option<Duration> {
        self.failures += 1;
        let Verdict::Retry(retry_after) = verdict else {
            return None;
        };
        if self.failures >= self.policy.max_attempts.max(1) {
            EXHAUSTED.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let cap = self
            .policy
            .initial_backoff
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(self.policy.max_backoff);
        let wait = retry_after.unwrap_or_else(|| cap.mul_f64(fastrand::f64()));
        if wait >= self.remaining() {
            EXHAUSTED.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        RETRIES.fetch_add(1, Ordering::Relaxed);
        Some(wait)
    }

    /// The read ran out of time waiting on an attempt: counts it as exhausted and returns the
    /// read timeout and the attempts made, for the caller's error.
    pub fn give_up(&self) -> (Duration, u32) {
        EXHAUSTED.fetch_add(1, Ordering::Relaxed);
        (self.policy.read_timeout, self.failures + 1)
    }
}

/// Runs `attempt` until it succeeds, fails fatally, or the policy gives up. An attempt is not
/// cut off here: a whole-object fetch or a layer stream that keeps receiving bytes may take as
/// long as it needs, and one that stops receiving them is ended below by the stall timeout of
/// its transfer. The read's deadline is checked between attempts.
pub async fn retry<T, E, F, Fut>(
    policy: &RetryPolicy,
    what: impl Fn() -> String,
    mut attempt: F,
) -> Result<T, E>
where
    E: Transient + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(policy);
    loop {
        let err = match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        match backoff.failed(err.verdict()) {
            Some(wait) => {
                tracing::debug!(what = %what(), error = %err, attempt = backoff.failures(), ?wait, "retrying");
                tokio::time::sleep(wait).await;
            }
            None => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            read_timeout: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(250),
        }
    }

    /// The waits after the `nth` failure in a row, over many reads (waits are jittered).
    fn waits_after(nth: u32) -> Vec<Duration> {
        let policy = policy();
        (0..300)
            .map(|_| {
                let mut b = Backoff::new(&policy);
                for _ in 1..nth {
                    b.failed(Verdict::Retry(None)).unwrap();
                }
                b.failed(Verdict::Retry(None)).unwrap()
            })
            .collect()
    }

    #[test]
    fn backoff_waits_grow_up_to_their_cap() {
        let ms = Duration::from_millis;
        // Full jitter: each wait is drawn below a cap that doubles per failure; the largest of
        // 300 draws comes close to the cap (all below 3/4 of it: chance 0.75^300).
        for (nth, cap) in [(1, ms(100)), (2, ms(200)), (3, ms(250))] {
            let waits = waits_after(nth);
            let longest = *waits.iter().max().unwrap();
            assert!(longest <= cap, "failure {nth}: {longest:?} over {cap:?}");
            assert!(
                longest > cap * 3 / 4,
                "failure {nth}: {longest:?} never near {cap:?}"
            );
        }
        let mean = |w: Vec<Duration>| w.iter().sum::<Duration>() / w.len() as u32;
        assert!(mean(waits_after(2)) > mean(waits_after(1)));
    }

    #[test]
    fn backoff_gives_up_after_max_attempts_until_progress() {
        let policy = policy();
        let mut b = Backoff::new(&policy);
        let retry = Verdict::Retry(None);
        for _ in 0..3 {
            assert!(b.failed(retry).is_some());
        }
        assert_eq!(b.failed(retry), None, "fourth failure ends the read");
        b.progress();
        assert!(b.failed(retry).is_some(), "progress restores the budget");
        assert_eq!(b.failed(Verdict::Fatal), None);
    }

    #[test]
    fn retry_after_is_honoured_unless_it_outlasts_the_read() {
        let policy = policy();
        let mut b = Backoff::new(&policy);
        assert_eq!(
            b.failed(Verdict::Retry(Some(Duration::from_secs(2)))),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            b.failed(Verdict::Retry(Some(Duration::from_secs(120)))),
            None
        );
    }
}
