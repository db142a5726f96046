//! A body may pause, but not stall: the timer of one side's silence, shared
//! by the client's request body and the upstream's response body.
//!
//! The timer is armed only when the body has to wait, so a body that is
//! ready whenever it is polled (most small messages) never touches it.
//! (tower-http's `TimeoutBody` arms a timer for every frame, and does not
//! pass on `is_end_stream` or `size_hint`, so an empty request would be
//! forwarded chunked.)

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

pub struct SilenceTimer {
    limit: Duration,
    /// Allocated on the first wait, then re-armed for each later one.
    deadline: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl SilenceTimer {
    pub fn new(limit: Duration) -> SilenceTimer {
        SilenceTimer {
            limit,
            deadline: None,
            armed: false,
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// The body gave a frame: its next wait is timed afresh.
    pub fn moved(&mut self) {
        self.armed = false;
    }

    /// The body has to wait: ready once it has sent nothing for the limit
    /// since it last moved.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let until = Instant::now() + self.limit;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
        if !self.armed {
            deadline.as_mut().reset(until);
            self.armed = true;
        }
        deadline.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn expired(timer: &mut SilenceTimer) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(timer.poll_expired(cx).is_ready())).await
    }

    #[tokio::test(start_paused = true)]
    async fn silence_counts_from_the_first_wait_after_the_body_last_moved() {
        let mut timer = SilenceTimer::new(Duration::from_secs(1));
        assert!(!expired(&mut timer).await);
        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(!expired(&mut timer).await);
        timer.moved();
        assert!(!expired(&mut timer).await);
        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(!expired(&mut timer).await, "the frame restarted the timer");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(expired(&mut timer).await);
    }
}
