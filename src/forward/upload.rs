//! The upstream's clock while a request goes up: `upstream_timeout` runs
//! only while the gateway waits on the upstream, never while it waits on
//! the client's body.
//!
//! The clock starts when the request is sent and restarts each time the
//! upstream takes a frame of the body (the time it then takes to ask for the
//! next is its own: an upstream that stops reading is timed, like nginx's
//! `proxy_send_timeout`). While the body has nothing ready the clock stops;
//! the body's own silence limit bounds the client. Once the body has ended,
//! the upstream has `upstream_timeout` to answer. A body that fails is
//! recorded, so that the failed send is answered as the client's fault.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::accept::ClientFault;
use crate::{Body, BoxError};

/// Whose move it is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Turn {
    /// The upstream's, since this instant.
    Upstream(Instant),
    /// The client's: its body has nothing ready.
    Client,
    /// The client's body failed, and the send with it.
    ClientFailed(ClientFault),
}

/// The forward step's side: when the upstream has run out of time.
pub struct UpstreamClock {
    turn: watch::Receiver<Turn>,
    timeout: Duration,
}

/// The body's side: the request body, telling the clock whose turn it is.
struct TimedUpload {
    inner: Body,
    turn: watch::Sender<Turn>,
}

/// Starts the clock for a request about to be sent with `body`.
pub fn start(body: Body, timeout: Duration) -> (Body, UpstreamClock) {
    let (turn, watched) = watch::channel(Turn::Upstream(Instant::now()));
    let upload = TimedUpload { inner: body, turn };
    let clock = UpstreamClock {
        turn: watched,
        timeout,
    };
    (Body::new(upload), clock)
}

impl UpstreamClock {
    /// Completes once the upstream has had its turn for the whole timeout.
    pub async fn expired(&mut self) {
        loop {
            let turn = *self.turn.borrow_and_update();
            let Turn::Upstream(since) = turn else {
                if self.turn.changed().await.is_err() {
                    // The body is gone while it was the client's turn; the
                    // send ends on its own.
                    std::future::pending::<()>().await;
                }
                continue;
            };
            tokio::select! {
                () = tokio::time::sleep_until(since + self.timeout) => {
                    // The turn may have moved on without a notice (another
                    // frame taken); then time it from there.
                    if *self.turn.borrow() == turn {
                        return;
                    }
                }
                changed = self.turn.changed() => {
                    if changed.is_err() {
                        // The body is done with: nothing moves the clock now.
                        tokio::time::sleep_until(since + self.timeout).await;
                        return;
                    }
                }
            }
        }
    }

    /// Whether the client's body failed, and how.
    pub fn client_fault(&self) -> Option<ClientFault> {
        match *self.turn.borrow() {
            Turn::ClientFailed(fault) => Some(fault),
            _ => None,
        }
    }
}

impl TimedUpload {
    fn pass_to(&self, turn: Turn) {
        // The upstream taking frame after frame moves the instant without
        // waking the clock, which reads it when its sleep ends.
        self.turn.send_if_modified(|current| {
            let notify = !matches!((*current, turn), (Turn::Upstream(_), Turn::Upstream(_)));
            *current = turn;
            notify
        });
    }
}

impl HttpBody for TimedUpload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Pending => self.pass_to(Turn::Client),
            Poll::Ready(Some(Err(error))) => match ClientFault::of(&**error) {
                Some(fault) => self.pass_to(Turn::ClientFailed(fault)),
                None => self.pass_to(Turn::Upstream(Instant::now())),
            },
            Poll::Ready(_) => self.pass_to(Turn::Upstream(Instant::now())),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TimedUpload {
    fn drop(&mut self) {
        // The upload is over, whatever the client still had: the rest is
        // the upstream's.
        if matches!(*self.turn.borrow(), Turn::Client) {
            self.pass_to(Turn::Upstream(Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accept::ClientBodyError;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::sync::mpsc;

    const TIMEOUT: Duration = Duration::from_secs(1);

    type Frames = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

    /// A body the test feeds frame by frame, with its clock.
    fn upload() -> (Frames, Body, UpstreamClock) {
        let (frames, received) = mpsc::channel(4);
        let stream = futures_util::stream::unfold(received, |mut received| async {
            received.recv().await.map(|frame| (frame, received))
        });
        let (body, clock) = start(Body::new(StreamBody::new(stream)), TIMEOUT);
        (frames, body, clock)
    }

    /// Whether the clock has run out by now.
    async fn has_expired(clock: &mut UpstreamClock) -> bool {
        tokio::time::timeout(Duration::ZERO, clock.expired())
            .await
            .is_ok()
    }

    /// Polls `body` once, as an upstream connection asking for a frame.
    async fn ask(body: &mut Body) {
        let _ = tokio::time::timeout(Duration::ZERO, body.frame()).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_stops_while_the_client_has_nothing_to_send() {
        let (frames, mut body, mut clock) = upload();
        ask(&mut body).await;
        tokio::time::advance(TIMEOUT * 10).await;
        assert!(!has_expired(&mut clock).await);

        frames
            .send(Ok(Frame::data(Bytes::from("a"))))
            .await
            .unwrap();
        ask(&mut body).await;
        drop(frames);
        ask(&mut body).await;
        tokio::time::advance(TIMEOUT - Duration::from_millis(1)).await;
        assert!(!has_expired(&mut clock).await);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            has_expired(&mut clock).await,
            "after the body's end it is the upstream's time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_that_stops_taking_the_body_runs_out_of_time() {
        let (frames, mut body, mut clock) = upload();
        frames
            .send(Ok(Frame::data(Bytes::from("a"))))
            .await
            .unwrap();
        ask(&mut body).await;
        frames
            .send(Ok(Frame::data(Bytes::from("b"))))
            .await
            .unwrap();
        tokio::time::advance(TIMEOUT).await;
        assert!(has_expired(&mut clock).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_body_that_fails_is_recorded_as_the_clients_fault() {
        let (frames, mut body, clock) = upload();
        let silent = ClientBodyError::Silent(TIMEOUT);
        frames.send(Err(silent.into())).await.unwrap();
        ask(&mut body).await;
        assert_eq!(clock.client_fault(), Some(ClientFault::Silent));
    }
}
