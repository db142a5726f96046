//! The response body of an estimate route, passed through as it streams and
//! read on the way for the usage the provider reports.
//!
//! The reservation is settled to the provider's final report as soon as it
//! has passed (a stream's usage chunk, `message_stop`, `response.completed`;
//! a JSON answer's end), whatever the client does next: the official SDKs
//! close a stream at `[DONE]`, before the body's end arrives. A body cut
//! before the final report (the client left, the upstream failed) is
//! charged the larger of the estimate and the usage reported so far.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::gathered::Gathered;
use crate::ledger::Reservation;
use crate::llm::Reading;
use crate::llm::sse::{SseScanner, concat};
use crate::llm::usage::{Tally, tokens_in_json};
use crate::{Body, BoxError};

/// A JSON body larger than this is passed on unread, and its estimate stands.
const MAX_JSON_READ: usize = 4 << 20;

enum Reader {
    /// `None` once the body is past `MAX_JSON_READ`.
    Json(Option<Gathered>),
    Stream(SseScanner),
    /// A compressed body, which the gateway does not decode: passed on as it
    /// is, and its estimate stands.
    Blind,
}

/// See the module documentation.
pub struct UsageTap {
    inner: Body,
    reader: Reader,
    reservation: Option<Reservation>,
    done: bool,
    /// Trailers held while the bytes held back before them go out.
    trailers: Option<Frame<Bytes>>,
}

impl UsageTap {
    /// Wraps `body`, whose response `headers` say whether it is a stream.
    pub fn new(
        body: Body,
        headers: &HeaderMap,
        reading: Reading,
        reservation: Reservation,
    ) -> UsageTap {
        let header = |name| {
            headers
                .get(name)
                .and_then(|v: &http::HeaderValue| v.to_str().ok())
        };
        let compressed = header(http::header::CONTENT_ENCODING)
            .is_some_and(|e| !e.eq_ignore_ascii_case("identity"));
        let is_stream =
            header(http::header::CONTENT_TYPE).is_some_and(|v| v.starts_with("text/event-stream"));
        let reader = if compressed {
            Reader::Blind
        } else if is_stream {
            Reader::Stream(SseScanner::new(reading.hide_requested_usage))
        } else {
            Reader::Json(Some(Gathered::default()))
        };
        UsageTap {
            inner: body,
            reader,
            reservation: Some(reservation),
            done: false,
            trailers: None,
        }
    }

    /// Whether the tap may change the bytes (so no length can be promised).
    pub fn rewrites(reading: Reading) -> bool {
        reading.hide_requested_usage
    }

    fn feed(&mut self, data: Bytes) -> Bytes {
        match &mut self.reader {
            Reader::Json(read) => {
                if let Some(gathered) = read
                    && gathered.push(data.clone(), MAX_JSON_READ).is_err()
                {
                    *read = None;
                }
                data
            }
            Reader::Stream(scanner) => {
                let out = scanner.feed(data);
                let last = scanner.tally().and_then(Tally::final_tokens);
                if let Some(tokens) = last
                    && let Some(reservation) = self.reservation.take()
                {
                    reservation.reconcile(tokens);
                }
                out
            }
            Reader::Blind => data,
        }
    }

    /// The body ended: returns its last bytes, and settles to what it
    /// reported (the body's end closes a stream's report too).
    fn finish(&mut self) -> Bytes {
        let (rest, tokens) = match &mut self.reader {
            Reader::Json(read) => (
                Bytes::new(),
                read.take()
                    .and_then(|gathered| tokens_in_json(&gathered.into_bytes())),
            ),
            Reader::Stream(scanner) => (scanner.finish(), scanner.tally().and_then(Tally::so_far)),
            Reader::Blind => (Bytes::new(), None),
        };
        if let Some(reservation) = self.reservation.take() {
            match tokens {
                Some(tokens) => reservation.reconcile(tokens),
                // No usage reported: the estimate stands.
                None => reservation.stand(),
            }
        }
        rest
    }

    /// The body was cut before its end: the estimate stands, unless the
    /// provider had already reported more.
    fn abandon(&mut self) {
        let so_far = match &self.reader {
            Reader::Stream(scanner) => scanner.tally().and_then(Tally::so_far),
            Reader::Json(_) | Reader::Blind => None,
        };
        if let Some(reservation) = self.reservation.take() {
            match so_far {
                Some(tokens) => reservation.charge_at_least(tokens),
                None => reservation.stand(),
            }
        }
    }
}

impl HttpBody for UsageTap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(this.trailers.take().map(Ok));
        }
        loop {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let mut out = this.feed(data);
                        // A body of known length is done with its last byte:
                        // hyper will not poll for the end, so settle now.
                        if this.inner.is_end_stream() {
                            this.done = true;
                            out = concat(out, this.finish());
                        }
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                        if this.done {
                            return Poll::Ready(None);
                        }
                        // Everything so far was held back or hidden: read on.
                    }
                    Err(trailers) => {
                        // Trailers end the body: settle, and send what was
                        // held back before them.
                        this.done = true;
                        let rest = this.finish();
                        if rest.is_empty() {
                            return Poll::Ready(Some(Ok(trailers)));
                        }
                        this.trailers = Some(trailers);
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                },
                Some(Err(error)) => {
                    this.done = true;
                    this.abandon();
                    return Poll::Ready(Some(Err(error)));
                }
                None => {
                    this.done = true;
                    let rest = this.finish();
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Never claimed early: the end must be polled for, to reconcile.
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.reader {
            Reader::Stream(_) => SizeHint::default(),
            Reader::Json(_) | Reader::Blind => self.inner.size_hint(),
        }
    }
}

impl Drop for UsageTap {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Dropped once its last byte went out, before the end was polled
        // for; or the client left midway.
        if self.inner.is_end_stream() {
            self.finish();
        } else {
            self.abandon();
        }
    }
}
