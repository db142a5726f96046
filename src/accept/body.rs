//! The client's request body, as every step reads it: a failure to read it
//! is typed as the client's, and a body that sends nothing for
//! `body_read_timeout` is cut. A body that is slow but keeps moving may take
//! as long as it needs.
//!
//! The forward step streams this body to the upstream, so its failure
//! surfaces there as a failed upstream call; the type is what lets that
//! step answer 400 or 408 rather than blame the upstream.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use crate::silence::SilenceTimer;
use crate::{Body, BoxError};

/// `body` as the steps see it, cut after `silence` without a frame.
pub fn client_body(body: Incoming, silence: Duration) -> Body {
    Body::new(ClientBody {
        inner: body,
        silence: SilenceTimer::new(silence),
    })
}

/// Why the client's body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// Malformed framing (chunking, a length it did not keep to), or the
    /// client went away mid-body.
    #[error("the client's request body could not be read")]
    Unreadable(#[source] hyper::Error),
    #[error("the client's request body sent nothing for {0:?}")]
    Silent(Duration),
}

/// What a client did wrong with its body, for the answer and the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientFault {
    Unreadable,
    Silent,
    /// A metered body that kept moving but did not arrive in time.
    Late,
}

impl ClientBodyError {
    pub fn fault(&self) -> ClientFault {
        match self {
            ClientBodyError::Unreadable(_) => ClientFault::Unreadable,
            ClientBodyError::Silent(_) => ClientFault::Silent,
        }
    }
}

impl ClientFault {
    /// The client's fault behind `error`, itself or one of its sources.
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Option<ClientFault> {
        let mut cause = Some(error);
        while let Some(error) = cause {
            if let Some(client) = error.downcast_ref::<ClientBodyError>() {
                return Some(client.fault());
            }
            cause = error.source();
        }
        None
    }
}

impl std::fmt::Display for ClientFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientFault::Unreadable => "unreadable (malformed, or cut off)",
            ClientFault::Silent => "silent",
            ClientFault::Late => "too slow",
        })
    }
}

struct ClientBody {
    inner: Incoming,
    silence: SilenceTimer,
}

impl HttpBody for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.silence.moved();
            let frame = frame.map(|f| f.map_err(ClientBodyError::Unreadable));
            return Poll::Ready(frame.map(|f| f.map_err(BoxError::from)));
        }
        match this.silence.poll_expired(cx) {
            Poll::Ready(()) => {
                let silent = ClientBodyError::Silent(this.silence.limit());
                Poll::Ready(Some(Err(silent.into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_fault_is_found_under_the_errors_that_wrap_it() {
        #[derive(Debug, thiserror::Error)]
        #[error("sending to the upstream failed")]
        struct Wrapper(#[source] BoxError);

        let wrapped = Wrapper(Box::new(ClientBodyError::Silent(Duration::from_secs(1))));
        assert_eq!(ClientFault::of(&wrapped), Some(ClientFault::Silent));
        let unrelated = std::io::Error::other("connection refused");
        assert_eq!(ClientFault::of(&unrelated), None);
    }
}
