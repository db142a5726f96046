//! One client connection, from accept to close: whether a request is in
//! flight on it, and how long it may sit without one.
//!
//! A connection that has not made a request within `header_read_timeout` of
//! being accepted is closed, whether it sent nothing, part of a header or
//! only the HTTP/2 preface; one that has answered its requests is closed
//! once it has been idle for `keepalive_timeout` (HTTP/2: a GOAWAY). This is
//! tracked here, at the service, because hyper cannot: hyper-util's `auto`
//! connection reads the first bytes to choose the protocol with no timer at
//! all, and hyper 1.12's HTTP/1.1 `header_read_timeout` starts only after
//! that, is re-armed for the wait between requests (so it would cut idle
//! keep-alive connections at the header timeout), and HTTP/2 has neither.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker, ready};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ClientAddr, HttpFuture, HttpService};
use crate::Body;

/// What one connection is doing; its clones are handed to its requests.
#[derive(Clone)]
pub struct Activity {
    shared: Arc<Shared>,
}

struct Shared {
    phase: Mutex<Phase>,
    /// Told when the last request in flight finishes.
    idle: Notify,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// This many requests are in flight.
    Busy(usize),
    /// No request in flight since `since`; `served`: not since accept, but
    /// since the last answer.
    Idle { since: Instant, served: bool },
}

/// How long a connection may be idle: before its first request, and
/// between requests; and how long it then has to finish closing.
#[derive(Clone, Copy, Debug)]
pub struct IdleLimits {
    pub first_request: Duration,
    pub between_requests: Duration,
    pub close: Duration,
}

impl Activity {
    /// A connection accepted at `accepted`, with no request yet.
    pub fn new(accepted: Instant) -> Activity {
        Activity {
            shared: Arc::new(Shared {
                phase: Mutex::new(Phase::Idle {
                    since: accepted,
                    served: false,
                }),
                idle: Notify::new(),
            }),
        }
    }

    /// A request has arrived; it is in flight until the guard is dropped,
    /// which its response body does once it is sent or abandoned.
    pub fn begin(&self) -> InFlight {
        let mut phase = self.lock();
        *phase = match *phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Idle { .. } => Phase::Busy(1),
        };
        InFlight(self.clone())
    }

    /// Completes once the connection has been idle longer than `limits`
    /// allow.
    pub async fn idle_too_long(&self, limits: IdleLimits) {
        loop {
            let phase = *self.lock();
            match phase {
                // A permit left by an earlier finish only makes this look again.
                Phase::Busy(_) => self.shared.idle.notified().await,
                Phase::Idle { since, served } => {
                    let limit = match served {
                        false => limits.first_request,
                        true => limits.between_requests,
                    };
                    tokio::time::sleep_until(since + limit).await;
                    if *self.lock() == phase {
                        return;
                    }
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Phase> {
        // A phase is valid whatever a panicking holder was doing.
        self.shared
            .phase
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// A request in flight on its connection.
pub struct InFlight(Activity);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut phase = self.0.lock();
        *phase = match *phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => {
                self.0.shared.idle.notify_one();
                Phase::Idle {
                    since: Instant::now(),
                    served: true,
                }
            }
        };
    }
}

/// A response body that keeps its request in flight until it is done.
pub struct Answer<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Answer<B> {
    pub fn new(body: B, in_flight: InFlight) -> Answer<B> {
        Answer {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: HttpBody + Unpin> HttpBody for Answer<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The gateway's service on one connection: each request carries the
/// client's address, and is in flight until its answer has been sent.
#[derive(Clone)]
pub struct ConnectionService {
    pub service: HttpService,
    pub client: ClientAddr,
    pub activity: Activity,
}

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<Answer<Body>>;
    type Error = Infallible;
    type Future = Answering;

    fn call(&self, request: Request<Incoming>) -> Answering {
        Answering {
            answer: self.service.call(request, self.client.clone()),
            in_flight: Some(self.activity.begin()),
        }
    }
}

/// A request on its way to its answer.
pub struct Answering {
    answer: HttpFuture,
    in_flight: Option<InFlight>,
}

impl Future for Answering {
    type Output = Result<Response<Answer<Body>>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = ready!(self.answer.as_mut().poll(cx));
        // Not polled again once ready; if it were, it would wait forever
        // rather than panic.
        let Some(in_flight) = self.in_flight.take() else {
            return Poll::Pending;
        };
        Poll::Ready(Ok(response.map(|body| Answer::new(body, in_flight))))
    }
}

/// Why a connection is being closed.
enum Closing {
    Idle,
    Shutdown,
}

/// Drives `connection` to its end. On `shutdown`, or once it has been idle
/// too long, it is asked to close (`close`: hyper's graceful shutdown, which
/// finishes what is in flight); after an idle close, a client that has not
/// let it finish within `limits.close` (an HTTP/2 client that never answers
/// the GOAWAY's ping) is dropped. After a shutdown, the worker's grace
/// period bounds the wait.
pub async fn drive<C, E>(
    connection: C,
    close: impl FnOnce(Pin<&mut C>),
    activity: Activity,
    limits: IdleLimits,
    shutdown: CancellationToken,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut connection = std::pin::pin!(connection);
    let watch = std::pin::pin!(async {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => Closing::Shutdown,
            () = activity.idle_too_long(limits) => Closing::Idle,
        }
    });
    let mut watch = Watched::new(watch);
    let closing = std::future::poll_fn(|cx| {
        if let Poll::Ready(ended) = connection.as_mut().poll(cx) {
            return Poll::Ready(Err(ended));
        }
        watch.poll(cx).map(Ok)
    })
    .await;
    let closing = match closing {
        Ok(closing) => closing,
        Err(ended) => return ended,
    };
    close(connection.as_mut());
    match closing {
        Closing::Idle => tokio::time::timeout(limits.close, connection)
            .await
            .unwrap_or(Ok(())),
        Closing::Shutdown => connection.await,
    }
}

/// A future polled only once something it waits on has woken it, not at
/// every wake-up of the task it shares: the connection's watches (the idle
/// timer, the shutdown) were polled at each of the several a request
/// makes, some 900 instructions a request (callgrind).
struct Watched<F> {
    future: F,
    woken: Arc<Woken>,
    waker: Waker,
}

/// Whether the watched future has been woken since it was last polled, and
/// the task to wake with it.
struct Woken {
    flag: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.flag.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = &*task {
            task.wake_by_ref();
        }
    }
}

impl<F: Future + Unpin> Watched<F> {
    fn new(future: F) -> Watched<F> {
        let woken = Arc::new(Woken {
            // The first poll starts what it waits on.
            flag: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Watched {
            future,
            waker: Waker::from(woken.clone()),
            woken,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<F::Output> {
        if !self.woken.flag.swap(false, Ordering::Acquire) {
            return Poll::Pending;
        }
        {
            let mut task = self
                .woken
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        Pin::new(&mut self.future).poll(&mut Context::from_waker(&self.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: IdleLimits = IdleLimits {
        first_request: Duration::from_secs(1),
        between_requests: Duration::from_secs(5),
        close: Duration::from_secs(1),
    };

    /// Whether the connection counts as idle too long after `advance` more.
    async fn too_long_after(activity: &Activity, advance: Duration) -> bool {
        tokio::time::advance(advance).await;
        let idle = activity.idle_too_long(LIMITS);
        tokio::time::timeout(Duration::ZERO, idle).await.is_ok()
    }

    #[tokio::test]
    async fn a_watched_future_is_polled_again_only_once_it_has_been_woken() {
        let polls = std::sync::atomic::AtomicUsize::new(0);
        let notify = Arc::new(Notify::new());
        let woken = notify.clone();
        let counted = std::pin::pin!(async {
            polls.fetch_add(1, Ordering::Relaxed);
            woken.notified().await;
            polls.fetch_add(1, Ordering::Relaxed);
        });
        let mut watched = Watched::new(counted);
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..3 {
            assert!(watched.poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        notify.notify_one();
        assert!(watched.poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_is_idle_too_long_at_the_first_limit_from_accept() {
        let activity = Activity::new(Instant::now());
        assert!(!too_long_after(&activity, Duration::from_millis(999)).await);
        assert!(too_long_after(&activity, Duration::from_millis(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_keeps_the_connection_and_its_answer_starts_the_second_limit() {
        let activity = Activity::new(Instant::now());
        let first = activity.begin();
        let second = activity.begin();
        assert!(!too_long_after(&activity, Duration::from_secs(60)).await);
        drop(first);
        assert!(!too_long_after(&activity, Duration::from_secs(60)).await);
        drop(second);
        assert!(!too_long_after(&activity, Duration::from_millis(4999)).await);
        assert!(too_long_after(&activity, Duration::from_millis(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_already_waiting_follows_requests_that_come_and_go() {
        let activity = Activity::new(Instant::now());
        let watching = activity.clone();
        let watch = tokio::spawn(async move { watching.idle_too_long(LIMITS).await });
        tokio::time::advance(Duration::from_millis(500)).await;
        drop(activity.begin());
        tokio::time::advance(Duration::from_millis(4000)).await;
        tokio::task::yield_now().await;
        assert!(!watch.is_finished(), "the answer restarted the idle time");
        let finished = tokio::time::timeout(Duration::from_millis(1001), watch).await;
        assert!(finished.is_ok());
    }
}
