//! Who gets to send the next request: a counting semaphore whose waiters are served by priority.
//!
//! Every ranged GET to an image's source takes a [`Permit`] first. There are a few permits per
//! source (registries and slow links do worst with many parallel streams; moby settled on 3 for
//! layer downloads), and when one is released it goes to the most urgent waiter: a reader
//! blocked on a chunk before read-ahead, read-ahead before background filling. A reader
//! therefore waits for at most the requests already in flight, never for queued background work.
//!
//! Priority alone does not keep background work out of a reader's way: slots are shared, and a
//! background request that holds one shares the link's bandwidth with the reader's request next
//! to it (with a 32 MB/s background fill on a 25 MB/s link, a python start fetched 4-5 times
//! what it read and took 10% longer). So background requests also wait for quiet: none may
//! start while any reader or prefetch request waits or runs, nor within [`QUIET`] after the last
//! one ended; a mount counts its opening as such an end ([`RequestScheduler::hold_background`]),
//! since its first reads and prioritised prefetch follow at once. A start, whose misses come
//! tens of milliseconds apart, thus runs without background traffic, while an idle mount fills
//! at link rate; the background requests already
//! running when a reader arrives are small (the filler's job, see `fs`), so the reader shares the
//! link with them for a few tens of milliseconds at most. The alternatives were weaker: a
//! bandwidth cap is either too low for an idle mount or too high for a busy one, and a link-rate
//! estimate needs foreground traffic to measure, which is exactly when background must not run.
//!
//! Waiters are async tasks, so a waiter is a tokio `oneshot` (it wakes a task without blocking a
//! thread); crossbeam's channels block threads, which the fetch runtime must not do.

use std::cmp::Reverse;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

/// How long background requests keep waiting after the last reader or prefetch request ended.
/// Longer than the gaps between a starting application's misses (python's imports miss every
/// 20-60 ms through a 20 ms link) and than the stretch of computing a start does once its
/// prefetched files are in: with 300 ms, background fill began while python-app was still
/// starting from its learned profile and cost it CPU and link (5 starts each, 20 ms / 200
/// Mbit/s: 300 ms median 1.89 s, 1.5 s 1.70 s, no background fill 1.65 s). Short next to the
/// time an idle mount has to fill itself.
pub const QUIET: Duration = Duration::from_millis(1500);

/// How urgent a request is; higher runs first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Priority {
    /// Filling the cache with the rest of an image while nobody waits.
    Background = 0,
    /// Read-ahead for a sequential reader, prioritised files.
    Prefetch = 1,
    /// A reader is blocked on this.
    Reader = 2,
}

impl Priority {
    fn from_u8(v: u8) -> Priority {
        match v {
            0 => Priority::Background,
            1 => Priority::Prefetch,
            _ => Priority::Reader,
        }
    }
}

/// A priority that can be raised while its request waits: when a reader starts waiting on a
/// chunk that read-ahead or background filling has already queued, the queued request is
/// boosted to the reader's priority instead of the reader queueing a second request.
#[derive(Clone, Debug)]
pub struct SharedPriority(Arc<(AtomicU8, Notify)>);

impl SharedPriority {
    pub fn new(priority: Priority) -> SharedPriority {
        SharedPriority(Arc::new((AtomicU8::new(priority as u8), Notify::new())))
    }

    pub fn get(&self) -> Priority {
        Priority::from_u8(self.0.0.load(Ordering::Relaxed))
    }

    /// Raises the priority to at least `priority`.
    pub fn raise(&self, priority: Priority) {
        if self.0.0.fetch_max(priority as u8, Ordering::Relaxed) < priority as u8 {
            self.0.1.notify_waiters();
        }
    }

    /// Waits up to `wait`, or less if the priority rises above background meanwhile.
    async fn sleep_unless_raised(&self, wait: Duration) {
        let raised = self.0.1.notified();
        tokio::pin!(raised);
        // Registered before the check, so a raise between the two is not missed.
        raised.as_mut().enable();
        if self.get() > Priority::Background {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = raised => {}
        }
    }
}

struct Waiter {
    priority: SharedPriority,
    /// Earlier waiters first among equals.
    order: Reverse<u64>,
    wake: oneshot::Sender<()>,
}

struct State {
    available: usize,
    /// Few at a time (bounded by the readers and batches in flight), so a scan on release is
    /// cheaper than keeping a heap ordered under priorities that change.
    waiters: Vec<Waiter>,
    next_order: u64,
    /// Reader and prefetch requests waiting for a slot or holding one.
    foreground: usize,
    /// When the last of them ended.
    foreground_ended: Option<Instant>,
}

/// Request slots for one source.
pub struct RequestScheduler {
    state: Mutex<State>,
}

/// A slot to send one request; the slot passes on when this is dropped.
pub struct Permit {
    scheduler: Arc<RequestScheduler>,
    _foreground: Option<Foreground>,
}

/// A reader or prefetch request from the moment it asks for a slot until its permit is dropped
/// (or its wait cancelled): background requests wait while any exists.
struct Foreground(Arc<RequestScheduler>);

impl Drop for Foreground {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap();
        state.foreground -= 1;
        if state.foreground == 0 {
            state.foreground_ended = Some(Instant::now());
        }
    }
}

impl RequestScheduler {
    pub fn new(slots: usize) -> Arc<RequestScheduler> {
        Arc::new(RequestScheduler {
            state: Mutex::new(State {
                available: slots.max(1),
                waiters: Vec::new(),
                next_order: 0,
                foreground: 0,
                foreground_ended: None,
            }),
        })
    }

    /// How long a background request must still wait for quiet (zero: it may go).
    fn quiet_remaining(&self) -> Duration {
        let state = self.state.lock().unwrap();
        if state.foreground > 0 {
            return QUIET;
        }
        state.foreground_ended.map_or(Duration::ZERO, |ended| {
            QUIET.saturating_sub(ended.elapsed())
        })
    }

    /// Holds background requests back for [`QUIET`] from now, as if foreground work had just
    /// ended. A mount calls this when it opens: its first reads and its prioritised prefetch
    /// are moments away, and a background request sent before them would take the link from
    /// them (two 1 MiB background requests went out before python-app's profile prefetch did).
    pub fn hold_background(&self) {
        let mut state = self.state.lock().unwrap();
        state.foreground_ended = Some(Instant::now());
    }

    /// Whether background requests are held back now.
    pub fn busy(&self) -> bool {
        !self.quiet_remaining().is_zero()
    }

    /// Waits for a slot; more urgent waiters are served first.
    pub async fn acquire(self: &Arc<Self>, priority: Priority) -> Permit {
        self.acquire_shared(&SharedPriority::new(priority)).await
    }

    /// As [`RequestScheduler::acquire`], with a priority that may be raised while waiting.
    /// Background requests first wait for quiet (see the module doc); a background request
    /// raised while waiting for quiet goes at once.
    pub async fn acquire_shared(self: &Arc<Self>, priority: &SharedPriority) -> Permit {
        if priority.get() > Priority::Background {
            self.state.lock().unwrap().foreground += 1;
            let foreground = Foreground(self.clone());
            let mut permit = self.slot(priority).await;
            permit._foreground = Some(foreground);
            return permit;
        }
        loop {
            // Polled rather than woken when readers finish: a wait is at most QUIET, and the
            // background filler's few requests are the only ones waiting here.
            loop {
                let wait = self.quiet_remaining();
                if wait.is_zero() || priority.get() > Priority::Background {
                    break;
                }
                priority.sleep_unless_raised(wait).await;
            }
            let permit = self.slot(priority).await;
            // A reader may have come while this waited for a slot.
            if !self.busy() || priority.get() > Priority::Background {
                return permit;
            }
        }
    }

    async fn slot(self: &Arc<Self>, priority: &SharedPriority) -> Permit {
        let priority = priority.clone();
        let rx = {
            let mut state = self.state.lock().unwrap();
            if state.available > 0 && state.waiters.is_empty() {
                state.available -= 1;
                return Permit {
                    scheduler: self.clone(),
                    _foreground: None,
                };
            }
            let (tx, rx) = oneshot::channel();
            let order = Reverse(state.next_order);
            state.next_order += 1;
            state.waiters.push(Waiter {
                priority,
                order,
                wake: tx,
            });
            rx
        };
        let mut pending = Pending {
            scheduler: self.clone(),
            rx: Some(rx),
        };
        let rx = pending.rx.as_mut().expect("set above");
        // The sender is only dropped after handing us the slot, or with the scheduler.
        let _ = rx.await;
        pending.rx = None;
        Permit {
            scheduler: self.clone(),
            _foreground: None,
        }
    }

    fn release(&self) {
        let mut state = self.state.lock().unwrap();
        // Hand the slot to the most urgent waiter still waiting (a cancelled waiter's receiver
        // is gone; skip it).
        while let Some(best) = state
            .waiters
            .iter()
            .enumerate()
            .max_by_key(|(_, w)| (w.priority.get(), w.order))
            .map(|(i, _)| i)
        {
            let waiter = state.waiters.swap_remove(best);
            if waiter.wake.send(()).is_ok() {
                return;
            }
        }
        state.available += 1;
    }

    /// Requests waiting for a slot, per priority (background, prefetch, reader).
    pub fn queued(&self) -> [usize; 3] {
        let state = self.state.lock().unwrap();
        let mut out = [0; 3];
        for w in state.waiters.iter() {
            out[w.priority.get() as usize] += 1;
        }
        out
    }
}

/// A waiter that may be cancelled (its future dropped) after the slot was handed to it but
/// before it ran: the slot must then pass on rather than be lost.
struct Pending {
    scheduler: Arc<RequestScheduler>,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.scheduler.release();
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.scheduler.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_most_urgent_waiter_gets_the_next_slot() {
        let scheduler = RequestScheduler::new(1);
        let held = scheduler.acquire(Priority::Background).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, priority) in [
            ("background", Priority::Background),
            ("prefetch", Priority::Prefetch),
            ("reader", Priority::Reader),
            ("reader2", Priority::Reader),
        ] {
            let (task_scheduler, order) = (scheduler.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = task_scheduler.acquire(priority).await;
                order.lock().unwrap().push(name);
            }));
            // Let each task queue up before the next, so arrival order is known.
            while scheduler.queued().iter().sum::<usize>() < tasks.len() {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(scheduler.queued(), [1, 1, 2]);
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["reader", "reader2", "prefetch", "background"]
        );
    }

    #[tokio::test]
    async fn a_raised_waiter_overtakes() {
        let scheduler = RequestScheduler::new(1);
        // Held by background work, so that the next background request waits for the slot
        // rather than for quiet.
        let held = scheduler.acquire(Priority::Background).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let background = SharedPriority::new(Priority::Background);
        let mut tasks = Vec::new();
        for (name, priority) in [
            ("background", background.clone()),
            ("prefetch", SharedPriority::new(Priority::Prefetch)),
        ] {
            let (task_scheduler, order) = (scheduler.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = task_scheduler.acquire_shared(&priority).await;
                order.lock().unwrap().push(name);
            }));
            while scheduler.queued().iter().sum::<usize>() < tasks.len() {
                tokio::task::yield_now().await;
            }
        }
        // A reader now waits on what the background request will fetch.
        background.raise(Priority::Reader);
        assert_eq!(scheduler.queued(), [0, 1, 1]);
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["background", "prefetch"]);
    }

    /// Polls `task` once without letting paused time move.
    async fn finished<T>(task: &tokio::task::JoinHandle<T>) -> bool {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        task.is_finished()
    }

    #[tokio::test(start_paused = true)]
    async fn background_waits_for_quiet_and_then_resumes() {
        let scheduler = RequestScheduler::new(4);
        // Free slots and no reader yet: background goes at once.
        drop(scheduler.acquire(Priority::Background).await);
        let reader = scheduler.acquire(Priority::Reader).await;
        let background = tokio::spawn({
            let scheduler = scheduler.clone();
            async move {
                let _permit = scheduler.acquire(Priority::Background).await;
                Instant::now()
            }
        });
        // Three slots are free, but a reader runs: the background request holds back however
        // long the reader takes.
        tokio::time::sleep(QUIET * 5).await;
        assert!(
            !finished(&background).await,
            "background ran beside a reader"
        );
        assert!(scheduler.busy());
        let reader_done = Instant::now();
        drop(reader);
        // ... and for the quiet period after it, so a reader's next miss finds the link idle.
        tokio::time::sleep(QUIET / 2).await;
        assert!(
            !finished(&background).await,
            "background ran right after a reader"
        );
        let started = background.await.unwrap();
        assert!(
            started >= reader_done + QUIET,
            "{started:?} {reader_done:?}"
        );
        assert!(!scheduler.busy());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_prefetch_holds_background_back_and_a_raise_lets_it_go() {
        let scheduler = RequestScheduler::new(1);
        let held = scheduler.acquire(Priority::Reader).await;
        // A prefetch that only waits for the slot counts as foreground too.
        let prefetch = tokio::spawn({
            let scheduler = scheduler.clone();
            async move { drop(scheduler.acquire(Priority::Prefetch).await) }
        });
        drop(held);
        let priority = SharedPriority::new(Priority::Background);
        let background = tokio::spawn({
            let (scheduler, priority) = (scheduler.clone(), priority.clone());
            async move { drop(scheduler.acquire_shared(&priority).await) }
        });
        prefetch.await.unwrap();
        assert!(!finished(&background).await);
        // A reader now waits on what this request fetches: it goes without waiting for quiet.
        priority.raise(Priority::Reader);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(finished(&background).await, "a raised request still waited");
    }

    #[tokio::test(start_paused = true)]
    async fn background_held_at_opening_waits_for_quiet() {
        let scheduler = RequestScheduler::new(4);
        scheduler.hold_background();
        let opened = Instant::now();
        let background = tokio::spawn({
            let scheduler = scheduler.clone();
            async move {
                let _permit = scheduler.acquire(Priority::Background).await;
                Instant::now()
            }
        });
        tokio::time::sleep(QUIET / 2).await;
        assert!(!finished(&background).await, "background ran at opening");
        let started = background.await.unwrap();
        assert!(started >= opened + QUIET, "{started:?} {opened:?}");
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_swallow_a_slot() {
        let scheduler = RequestScheduler::new(1);
        let held = scheduler.acquire(Priority::Reader).await;
        let waiting = tokio::spawn({
            let scheduler = scheduler.clone();
            async move { scheduler.acquire(Priority::Reader).await }
        });
        while scheduler.queued()[2] == 0 {
            tokio::task::yield_now().await;
        }
        waiting.abort();
        let _ = waiting.await;
        drop(held);
        // The slot is free again; a swallowed slot would make this wait forever, so it is bounded
        // to turn that bug into a failure instead of a hung test run.
        let again = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            scheduler.acquire(Priority::Background),
        )
        .await;
        assert!(again.is_ok(), "the cancelled waiter kept the only slot");
    }
}
