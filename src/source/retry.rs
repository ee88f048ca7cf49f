//! Retrying remote reads: backoff, resumption, and when to give up.
//!
//! Design:
//! - Every error says whether trying again can help ([`Transient::verdict`]), and only what
//!   transport can cause is retried. An outage (a refused or reset connection, a stall, a
//!   truncated body, a 5xx, a 408 or 429) is [`Verdict::Retry`]: it ends by itself, so it costs
//!   a reader latency, not an error. Bytes that arrived damaged (they fail their digest, or do
//!   not decode and had no digest to check first: a broken proxy flips bits) are
//!   [`Verdict::Damaged`]: worth a second look, but every look downloads them again and a blob
//!   that is broken at its source stays broken, so only [`DAMAGED_ATTEMPTS`] are made. A 404, a
//!   refused credential, a malformed request, or content that is wrong although its digest
//!   matched is [`Verdict::Fatal`] and returned at once. A 401 is not retried here: the
//!   registry client already renews its token once.
//! - Waits grow exponentially from [`RetryPolicy::initial_backoff`] to
//!   [`RetryPolicy::max_backoff`] with "full jitter" (a uniformly random wait below the cap), so
//!   many readers hitting one failure do not come back in lock step. A `Retry-After` from the
//!   server wins when it fits in the time left.
//! - By default a read retries an outage until it has gone [`RetryPolicy::read_timeout`]
//!   without receiving a byte: for a container's root filesystem a registry restart of a few
//!   seconds must not fail reads. [`RetryPolicy::max_attempts`], when set, also ends it after
//!   that many failures in a row, for those who prefer to fail fast. Both reset when bytes
//!   arrive: a large transfer that keeps making progress through a flaky link is never cut
//!   off, while a dead source fails a read within a bounded time. A read that keeps failing
//!   says so once in the log (at most every few seconds for the process), so a user watching a
//!   slow start learns why. A single attempt that
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
    /// Attempts per read before it fails (the first try included), or `None` for no limit but
    /// [`RetryPolicy::read_timeout`]. `None` by default: a count of attempts says nothing about
    /// how long an outage lasted (five attempts with backoff are over in 1-3 s, less than a
    /// registry restart), and a missing blob is not retried anyway.
    pub max_attempts: Option<u32>,
    /// The longest a read may go without receiving a byte, retries and waits included, before
    /// it fails with EIO. 60 s: an outage of a registry restart or a load balancer shuffle
    /// (seconds to tens of seconds) costs a reader latency, not an error, and a dead source
    /// still fails reads before a user or an orchestrator gives up on a container start.
    pub read_timeout: Duration,
    /// First wait between attempts. 200 ms: a round trip or two on a slow link; shorter waits
    /// mostly hit the same failure again.
    pub initial_backoff: Duration,
    /// Largest wait between attempts. 5 s: keeps a reader from sleeping through a recovery.
    pub max_backoff: Duration,
}

/// Attempts at bytes that keep arriving damaged ([`Verdict::Damaged`]) before a read fails
/// (fewer if [`RetryPolicy::max_attempts`] says so). 3: a proxy that flips bits now and then is
/// outlasted, while a blob broken in the registry's storage is not downloaded more than three
/// times. Chunk fetches count only damage that repeats ([`retry_repeated_damage`]): bits flipped
/// on the way differ from one transfer to the next.
pub const DAMAGED_ATTEMPTS: u32 = 3;

/// How often, at most, the process logs that reads keep failing: an outage seen by sixty
/// readers is one line every few seconds, not sixty.
const OUTAGE_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Failures in a row after which a read says in the log that it is still retrying (about a
/// second into an outage with the default backoff).
const OUTAGE_LOG_AFTER: u32 = 3;

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: None,
            read_timeout: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Whether an error is worth another attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Trying again cannot help (not found, refused credentials, a malformed request, content
    /// that is wrong although it matched its digest).
    Fatal,
    /// The source could not be reached or broke off: try again until the read's deadline,
    /// after the server's `Retry-After` if it sent one.
    Retry(Option<Duration>),
    /// Bytes arrived but were damaged: try again, at most [`DAMAGED_ATTEMPTS`] times.
    Damaged,
}

/// Errors that know whether they are transient.
pub trait Transient {
    fn verdict(&self) -> Verdict;
}

static RETRIES: AtomicU64 = AtomicU64::new(0);
static EXHAUSTED: AtomicU64 = AtomicU64::new(0);
/// When the process last logged a read that keeps failing (ms since [`epoch`]), 0 for never.
static OUTAGE_LOGGED_MS: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Whether a read that keeps failing should say so now (at most once per
/// [`OUTAGE_LOG_INTERVAL`] for the process).
fn outage_log_due() -> bool {
    let now = epoch().elapsed().as_millis() as u64 + 1;
    let last = OUTAGE_LOGGED_MS.load(Ordering::Relaxed);
    let due = last == 0 || now.saturating_sub(last) >= OUTAGE_LOG_INTERVAL.as_millis() as u64;
    due && OUTAGE_LOGGED_MS
        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
}

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
    /// Damaged answers over the whole read: progress does not reset them, since the damage is
    /// found after the bytes arrived.
    damaged: u32,
    /// When the read last received bytes (or started).
    since: Instant,
}

impl<'a> Backoff<'a> {
    pub fn new(policy: &'a RetryPolicy) -> Self {
        Backoff {
            policy,
            failures: 0,
            damaged: 0,
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

    /// Whether this read, failing with `error`, should tell the log it is still retrying: once
    /// it has failed a few times in a row, and only if no read said so in the last seconds.
    fn should_report(&self) -> bool {
        self.failures == OUTAGE_LOG_AFTER && outage_log_due()
    }

    /// Logs, rarely, that `what` keeps failing with `error` and is being retried.
    pub fn report(&self, what: impl FnOnce() -> String, error: &dyn std::fmt::Display) {
        if self.should_report() {
            tracing::warn!(
                "{}: {error}; still retrying, for up to {:.0} s without a byte (--read-timeout)",
                what(),
                self.remaining().as_secs_f64()
            );
        }
    }

    /// Records a failure; returns how long to wait before the next attempt, or `None` when the
    /// read must give up (the error is fatal, or the budget is spent).
    pub fn failed(&mut self, verdict: Verdict) -> Option<Duration> {
        self.failures += 1;
        let retry_after = match verdict {
            Verdict::Fatal => return None,
            Verdict::Retry(retry_after) => retry_after,
            Verdict::Damaged => {
                self.damaged += 1;
                if self.damaged >= DAMAGED_ATTEMPTS {
                    EXHAUSTED.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                None
            }
        };
        if self
            .policy
            .max_attempts
            .is_some_and(|max| self.failures >= max.max(1))
        {
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
    attempt: F,
) -> Result<T, E>
where
    E: Transient + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    run(policy, what, attempt, false).await
}

/// As [`retry`], but only damage that repeats counts against [`DAMAGED_ATTEMPTS`]: data broken
/// where it is stored comes back with the same damage (the same error) each time, while bytes
/// damaged on the way are damaged differently each time, and a transfer of many chunks through
/// a link that flips bits now and then could otherwise meet three unrelated flips and fail.
/// Different damage is retried as a transport failure is, within the policy's attempts and
/// deadline.
pub async fn retry_repeated_damage<T, E, F, Fut>(
    policy: &RetryPolicy,
    what: impl Fn() -> String,
    attempt: F,
) -> Result<T, E>
where
    E: Transient + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    run(policy, what, attempt, true).await
}

async fn run<T, E, F, Fut>(
    policy: &RetryPolicy,
    what: impl Fn() -> String,
    mut attempt: F,
    only_repeated_damage: bool,
) -> Result<T, E>
where
    E: Transient + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(policy);
    let mut last_damage: Option<String> = None;
    loop {
        let err = match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let mut verdict = err.verdict();
        if only_repeated_damage && verdict == Verdict::Damaged {
            // The message names what was damaged and how (a chunk's actual digest).
            let damage = err.to_string();
            if last_damage.as_ref().is_some_and(|last| *last != damage) {
                verdict = Verdict::Retry(None);
            }
            last_damage = Some(damage);
        }
        match backoff.failed(verdict) {
            Some(wait) => {
                tracing::debug!(what = %what(), error = %err, attempt = backoff.failures(), ?wait, "retrying");
                backoff.report(&what, &err);
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
            max_attempts: Some(4),
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
    fn by_default_an_outage_is_retried_until_the_deadline_and_damage_three_times() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            ..RetryPolicy::default()
        };
        assert_eq!(policy.max_attempts, None);
        let mut b = Backoff::new(&policy);
        for n in 1..=1000 {
            assert!(
                b.failed(Verdict::Retry(None)).is_some(),
                "outage failure {n}"
            );
        }
        let mut b = Backoff::new(&policy);
        for _ in 1..DAMAGED_ATTEMPTS {
            assert!(b.failed(Verdict::Damaged).is_some());
            b.progress();
        }
        assert_eq!(
            b.failed(Verdict::Damaged),
            None,
            "damage is not retried forever, progress or not"
        );
        let short = RetryPolicy {
            read_timeout: Duration::from_millis(30),
            ..policy.clone()
        };
        let mut b = Backoff::new(&short);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(
            b.failed(Verdict::Retry(None)),
            None,
            "the deadline ends an outage's retries"
        );
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
