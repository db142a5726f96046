//! Step 6: settling a reservation once the upstream has answered.
//!
//! What the gateway saw decides it, in [`settle`]:
//!
//! - the upstream failed (no answer, timeout, non-2xx): refund all of it;
//! - the upstream succeeded: the reservation stands, except on estimate
//!   routes, where the [`tap`] replaces the estimate with the usage the
//!   response reports, as soon as the final report has passed (no usage
//!   reported: it stands);
//! - the client went away first: it stands too, since the upstream may
//!   already have done the work (a refund here would let a client have any
//!   amount of work for free by hanging up just before the answer); on an
//!   estimate route it grows to the usage reported so far, if that is more.

pub mod tap;

use http::Response;

use crate::Body;
use crate::error::GatewayError;
use crate::ledger::Reservation;
use crate::llm::Reading;
use crate::route::Route;
use tap::UsageTap;

/// Settles `reservation` (none: nothing was counted) on what the upstream
/// answered, and returns the answer for the client. Refunds go on in the
/// background: an upstream failure is passed on at once, whatever state
/// the store is in.
pub fn settle(
    route: &Route,
    reservation: Option<Reservation>,
    reading: Option<Reading>,
    forwarded: Result<Response<Body>, GatewayError>,
) -> Result<Response<Body>, GatewayError> {
    let Some(reservation) = reservation else {
        return forwarded;
    };
    let response = match forwarded {
        Ok(response) => response,
        Err(error) => {
            reservation.refund();
            return Err(error);
        }
    };
    if route.refunds(response.status()) {
        reservation.refund();
        return Ok(response);
    }
    let Some(reading) = reading else {
        reservation.stand();
        return Ok(response);
    };
    // The settlement waits for the usage the body reports.
    let (mut head, body) = response.into_parts();
    if UsageTap::rewrites(reading) {
        head.headers.remove(http::header::CONTENT_LENGTH);
    }
    let tap = UsageTap::new(body, &head.headers, reading, reservation);
    Ok(Response::from_parts(head, Body::new(tap)))
}
