//! Who gets to send the next request: a counting semaphore whose waiters are served by priority.
//!
//! Every ranged GET to an image's source takes a [`Permit`] first. There are a few permits per
//! source (registries and slow links do worst with many parallel streams; moby settled on 3 for
//! layer downloads), and when one is released it goes to the most urgent waiter: a reader
//! blocked on a chunk before read-ahead, read-ahead before background filling. A reader
//! therefore waits for at most the requests already in flight, never for queued background work.

use std::cmp::Reverse;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

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
pub struct SharedPriority(Arc<AtomicU8>);

impl SharedPriority {
    pub fn new(priority: Priority) -> SharedPriority {
        SharedPriority(Arc::new(AtomicU8::new(priority as u8)))
    }

    pub fn get(&self) -> Priority {
        Priority::from_u8(self.0.load(Ordering::Relaxed))
    }

    /// Raises the priority to at least `priority`.
    pub fn raise(&self, priority: Priority) {
        self.0.fetch_max(priority as u8, Ordering::Relaxed);
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
}

/// Request slots for one source.
pub struct RequestScheduler {
    state: Mutex<State>,
}

/// A slot to send one request; the slot passes on when this is dropped.
pub struct Permit {
    scheduler: Arc<RequestScheduler>,
}

impl RequestScheduler {
    pub fn new(slots: usize) -> Arc<RequestScheduler> {
        Arc::new(RequestScheduler {
            state: Mutex::new(State {
                available: slots.max(1),
                waiters: Vec::new(),
                next_order: 0,
            }),
        })
    }

    /// Waits for a slot; more urgent waiters are served first.
    pub async fn acquire(self: &Arc<Self>, priority: Priority) -> Permit {
        self.acquire_shared(&SharedPriority::new(priority)).await
    }

    /// As [`RequestScheduler::acquire`], with a priority that may be raised while waiting.
    pub async fn acquire_shared(self: &Arc<Self>, priority: &SharedPriority) -> Permit {
        let priority = priority.clone();
        let rx = {
            let mut state = self.state.lock().unwrap();
            if state.available > 0 && state.waiters.is_empty() {
                state.available -= 1;
                return Permit {
                    scheduler: self.clone(),
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
        let held = scheduler.acquire(Priority::Reader).await;
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
