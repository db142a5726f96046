//! Deadlines of one length on one coarse clock: the timer of every request
//! a worker has waiting on its upstreams, and of every call it has waiting
//! on the store.
//!
//! A tokio `Sleep` per request costs its registration in the runtime's
//! timer wheel and its removal when the upstream answers first, which it
//! nearly always does: some 1,000 instructions a request (callgrind). Here a
//! request takes a slot in a slab and gives it back, and one task ticks for
//! all of them while any is waiting, waking those whose time is up.
//!
//! The clock counts ticks of a twentieth of the limit (at most 50 ms, at
//! least 1 ms). A deadline taken between two ticks expires at the
//! tick that makes the limit certain, so it never fires early, and fires at
//! most two ticks late: within a tenth of the limit, and 100 ms, after it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use slab::Slab;
use tokio::time::{Instant, MissedTickBehavior};

/// The longest tick, whatever the limit.
const MAX_TICK: Duration = Duration::from_millis(50);
/// The shortest: tokio's timer counts whole milliseconds.
const MIN_TICK: Duration = Duration::from_millis(1);
/// Ticks to a limit, where the limit allows.
const TICKS_PER_LIMIT: u32 = 20;

/// Deadlines of `limit` from when each is first polled. A clone shares the
/// clock.
#[derive(Clone)]
pub struct Deadlines {
    shared: Arc<Mutex<Wheel>>,
    tick: Duration,
    /// Whole ticks that add up to at least the limit.
    ticks: u64,
    limit: Duration,
}

struct Wheel {
    /// Ticks counted so far.
    now: u64,
    waiting: Slab<Waiting>,
    /// Whether a task is counting ticks.
    ticking: bool,
}

struct Waiting {
    /// The tick at which this deadline has certainly passed.
    due: u64,
    waker: Waker,
    expired: bool,
}

impl Deadlines {
    pub fn new(limit: Duration) -> Deadlines {
        let tick = (limit / TICKS_PER_LIMIT).clamp(MIN_TICK, MAX_TICK);
        let ticks = limit.as_nanos().div_ceil(tick.as_nanos());
        Deadlines {
            shared: Arc::new(Mutex::new(Wheel {
                now: 0,
                waiting: Slab::new(),
                ticking: false,
            })),
            tick,
            ticks: u64::try_from(ticks).unwrap_or(u64::MAX),
            limit,
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// `future`'s output, or `None` if the limit passes first (from when
    /// this is first polled).
    pub async fn bound<F: Future>(&self, future: F) -> Option<F::Output> {
        let mut future = std::pin::pin!(future);
        let mut deadline = self.start();
        std::future::poll_fn(|cx| match future.as_mut().poll(cx) {
            Poll::Ready(output) => Poll::Ready(Some(output)),
            Poll::Pending => deadline.poll_expired(cx).map(|()| None),
        })
        .await
    }

    /// A deadline that starts when first polled.
    pub fn start(&self) -> Deadline<'_> {
        Deadline {
            deadlines: self,
            key: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Wheel> {
        lock(&self.shared)
    }

    /// Takes a slot for `waker`, starting the ticks if none are counted.
    fn register(&self, waker: &Waker) -> usize {
        let mut wheel = self.lock();
        // The tick under way may be nearly over: one more makes the limit
        // certain.
        let due = wheel.now.saturating_add(self.ticks).saturating_add(1);
        let key = wheel.waiting.insert(Waiting {
            due,
            waker: waker.clone(),
            expired: false,
        });
        if !wheel.ticking
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            wheel.ticking = true;
            // Timed from now, however long the task waits to run.
            let first = Instant::now() + self.tick;
            runtime.spawn(count_ticks(self.shared.clone(), first, self.tick));
        }
        key
    }
}

fn lock(shared: &Mutex<Wheel>) -> MutexGuard<'_, Wheel> {
    // The wheel is whole whatever a panicking holder was doing.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts ticks while any deadline is waiting, waking each as it expires.
async fn count_ticks(shared: Arc<Mutex<Wheel>>, first: Instant, tick: Duration) {
    let _stopped = Stopped(shared.clone());
    let mut ticks = tokio::time::interval_at(first, tick);
    // A late tick is counted when it comes, and the ones missed at once
    // after it: the count follows the time that has passed.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    loop {
        ticks.tick().await;
        let mut wheel = lock(&shared);
        if wheel.waiting.is_empty() {
            // Dropping `_stopped` says so; the next deadline starts again.
            return;
        }
        wheel.now += 1;
        let now = wheel.now;
        for (_, waiting) in wheel.waiting.iter_mut() {
            if !waiting.expired && waiting.due <= now {
                waiting.expired = true;
                waiting.waker.wake_by_ref();
            }
        }
    }
}

/// Marks the ticks stopped when their task ends, also when its runtime
/// drops it.
struct Stopped(Arc<Mutex<Wheel>>);

impl Drop for Stopped {
    fn drop(&mut self) {
        lock(&self.0).ticking = false;
    }
}

/// One request's deadline: ready once its limit has passed.
pub struct Deadline<'d> {
    deadlines: &'d Deadlines,
    key: Option<usize>,
}

impl Deadline<'_> {
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(key) = self.key else {
            self.key = Some(self.deadlines.register(cx.waker()));
            return Poll::Pending;
        };
        let mut wheel = self.deadlines.lock();
        let Some(waiting) = wheel.waiting.get_mut(key) else {
            return Poll::Pending;
        };
        if waiting.expired {
            return Poll::Ready(());
        }
        if !waiting.waker.will_wake(cx.waker()) {
            waiting.waker.clone_from(cx.waker());
        }
        Poll::Pending
    }
}

impl Future for Deadline<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.poll_expired(cx)
    }
}

impl Drop for Deadline<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.deadlines.lock().waiting.try_remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `deadline` has expired, polling it once.
    fn expired(deadline: &mut Deadline<'_>) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        deadline.poll_expired(&mut cx).is_ready()
    }

    /// Lets the ticking task run at the current (paused) time.
    async fn settle() {
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_never_expires_before_its_limit() {
        let deadlines = Deadlines::new(Duration::from_millis(500));
        let mut deadline = deadlines.start();
        assert!(!expired(&mut deadline));
        tokio::time::advance(Duration::from_millis(499)).await;
        settle().await;
        assert!(!expired(&mut deadline));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_expires_within_two_ticks_of_its_limit() {
        let deadlines = Deadlines::new(Duration::from_millis(500));
        let started = Instant::now();
        tokio::time::advance(Duration::from_millis(7)).await;
        let mut first = deadlines.start();
        assert!(!expired(&mut first));
        // A second one taken mid-tick, while the ticks are already counted.
        tokio::time::advance(Duration::from_millis(13)).await;
        let mut second = deadlines.start();
        assert!(!expired(&mut second));
        tokio::time::timeout(Duration::from_millis(550), &mut second)
            .await
            .expect("expired within a tenth of the limit");
        assert!(started.elapsed() >= Duration::from_millis(520));
        assert!(expired(&mut first));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_deadline_is_woken_when_it_expires() {
        let deadlines = Arc::new(Deadlines::new(Duration::from_secs(2)));
        let waiting = deadlines.clone();
        let started = Instant::now();
        let expiry = tokio::spawn(async move {
            waiting.start().await;
            started.elapsed()
        });
        let took = expiry.await.unwrap();
        assert!(took >= Duration::from_secs(2), "{took:?}");
        assert!(took <= Duration::from_millis(2100), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_ticks_stop_when_nothing_waits_and_start_again_for_the_next() {
        let deadlines = Deadlines::new(Duration::from_millis(100));
        let mut first = deadlines.start();
        assert!(!expired(&mut first));
        settle().await;
        drop(first);
        tokio::time::advance(Duration::from_millis(20)).await;
        settle().await;
        assert!(!deadlines.lock().ticking);

        let started = Instant::now();
        let mut next = deadlines.start();
        assert!(!expired(&mut next));
        assert!(deadlines.lock().ticking);
        tokio::time::advance(Duration::from_millis(99)).await;
        settle().await;
        assert!(!expired(&mut next));
        (&mut next).await;
        assert!(started.elapsed() <= Duration::from_millis(110));
    }

    #[test]
    fn a_tick_is_a_twentieth_of_the_limit_within_its_bounds() {
        let tick = |limit| Deadlines::new(limit).tick;
        assert_eq!(tick(Duration::from_millis(500)), Duration::from_millis(25));
        assert_eq!(tick(Duration::from_secs(120)), MAX_TICK);
        assert_eq!(tick(Duration::from_millis(5)), MIN_TICK);
        assert_eq!(Deadlines::new(Duration::from_millis(2010)).ticks, 41);
    }
}
