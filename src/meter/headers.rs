//! The RateLimit headers of a metered answer
//! (draft-ietf-httpapi-ratelimit-headers): one list item per dimension of
//! the cost that has a limit, named by the dimension.
//!
//! `RateLimit-Policy: "tokens";q=100000;w=2592000` is the limit and the
//! period's length in seconds; `RateLimit: "tokens";r=4000;t=86400` what
//! remains after this request and the seconds to the period's end. Seats
//! are a gauge, held until released rather than reset when a period ends:
//! their policy has no window (`w`) and their state no reset time (`t`),
//! as nothing frees a seat at a time the gateway could name.
//!
//! Built digit by digit into one buffer each: this runs on every metered
//! answer, and the formatting machinery would cost more than the rest.

use bytes::Bytes;
use chrono::{DateTime, TimeDelta, Utc};
use http::HeaderValue;

use crate::error::RateLimitHeaders;
use crate::period::Period;
use crate::quota::{Amounts, Limits};

/// The headers for a reservation of `cost` against `limits` that left the
/// store's `counters` (after it when admitted, as found when denied), in
/// `period` at `now`. `None` when no dimension of the cost has a limit.
pub fn rate_limit(
    limits: &Limits,
    cost: &Amounts,
    counters: &Amounts,
    period: &Period,
    now: DateTime<Utc>,
) -> Option<RateLimitHeaders> {
    let window = (period.end - period.start).num_seconds().max(0);
    let ends_in = seconds_rounded_up(period.end - now);
    let mut policy = Vec::with_capacity(48);
    let mut state = Vec::with_capacity(48);
    for (dimension, _) in cost.iter() {
        let Some(limit) = limits.get(dimension) else {
            continue;
        };
        let remaining = limit.saturating_sub(counters.get(dimension)).max(0);
        let period_dimension = !dimension.is_gauge();
        item(&mut policy, dimension.as_str());
        number(&mut policy, b";q=", limit);
        item(&mut state, dimension.as_str());
        number(&mut state, b";r=", remaining);
        if period_dimension {
            number(&mut policy, b";w=", window);
            number(&mut state, b";t=", ends_in);
        }
    }
    if policy.is_empty() {
        return None;
    }
    Some(RateLimitHeaders {
        policy: HeaderValue::from_maybe_shared(Bytes::from(policy)).ok()?,
        state: HeaderValue::from_maybe_shared(Bytes::from(state)).ok()?,
        period_ends_in: u64::try_from(ends_in).unwrap_or(0),
    })
}

/// Starts a list item named `name` (a structured-field string), after a
/// comma if one came before.
fn item(buffer: &mut Vec<u8>, name: &str) {
    if !buffer.is_empty() {
        buffer.push(b',');
    }
    buffer.push(b'"');
    buffer.extend_from_slice(name.as_bytes());
    buffer.push(b'"');
}

fn number(buffer: &mut Vec<u8>, key: &[u8], value: i64) {
    buffer.extend_from_slice(key);
    buffer.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// Whole seconds in `delta`, any part of one counting as one; 0 if it is
/// not positive.
fn seconds_rounded_up(delta: TimeDelta) -> i64 {
    let whole = delta.num_seconds();
    let part = delta.subsec_nanos() > 0;
    (whole + i64::from(part)).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Dimension;

    const TOKENS: Dimension = Dimension::Tokens;
    const RUNS: Dimension = Dimension::PlaybookRuns;
    const SEATS: Dimension = Dimension::Seats;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    /// November 2026 (30 days, 2592000 s), a day before its end.
    fn november() -> (Period, DateTime<Utc>) {
        let now = at("2026-11-30T00:00:00Z");
        (Period::containing(now, 1), now)
    }

    fn texts(headers: &RateLimitHeaders) -> (&str, &str) {
        (
            headers.policy.to_str().unwrap(),
            headers.state.to_str().unwrap(),
        )
    }

    #[test]
    fn a_period_dimension_gives_its_limit_window_remaining_and_reset() {
        let (period, now) = november();
        let limits = Limits::UNLIMITED.with(TOKENS, 100000);
        let cost = Amounts::ZERO.with(TOKENS, 10000);
        let counters = Amounts::ZERO.with(TOKENS, 96000);
        let headers = rate_limit(&limits, &cost, &counters, &period, now).unwrap();
        assert_eq!(
            texts(&headers),
            ("\"tokens\";q=100000;w=2592000", "\"tokens\";r=4000;t=86400")
        );
        assert_eq!(headers.period_ends_in, 86400);
    }

    #[test]
    fn several_limited_dimensions_give_one_item_each_and_unlimited_ones_none() {
        let (period, now) = november();
        let limits = Limits::UNLIMITED.with(TOKENS, 100).with(RUNS, 10);
        let cost = Amounts::ZERO.with(TOKENS, 5).with(RUNS, 1);
        let counters = Amounts::ZERO.with(TOKENS, 5).with(RUNS, 1);
        let headers = rate_limit(&limits, &cost, &counters, &period, now).unwrap();
        assert_eq!(
            texts(&headers),
            (
                "\"tokens\";q=100;w=2592000,\"playbook_runs\";q=10;w=2592000",
                "\"tokens\";r=95;t=86400,\"playbook_runs\";r=9;t=86400"
            )
        );
        let unlimited_runs = Limits::UNLIMITED.with(TOKENS, 100);
        let headers = rate_limit(&unlimited_runs, &cost, &counters, &period, now).unwrap();
        assert_eq!(texts(&headers).1, "\"tokens\";r=95;t=86400");
    }

    #[test]
    fn remaining_never_goes_below_zero() {
        let (period, now) = november();
        let limits = Limits::UNLIMITED.with(RUNS, 10);
        let cost = Amounts::ZERO.with(RUNS, 1);
        let over = Amounts::ZERO.with(RUNS, 11);
        let headers = rate_limit(&limits, &cost, &over, &period, now).unwrap();
        assert_eq!(texts(&headers).1, "\"playbook_runs\";r=0;t=86400");
    }

    #[test]
    fn seats_have_no_window_and_no_reset() {
        let (period, now) = november();
        let limits = Limits::UNLIMITED.with(SEATS, 5);
        let cost = Amounts::ZERO.with(SEATS, 1);
        let counters = Amounts::ZERO.with(SEATS, 3);
        let headers = rate_limit(&limits, &cost, &counters, &period, now).unwrap();
        assert_eq!(texts(&headers), ("\"seats\";q=5", "\"seats\";r=2"));
    }

    #[test]
    fn a_part_of_a_second_to_the_end_counts_as_a_second() {
        let (period, _) = november();
        let limits = Limits::UNLIMITED.with(TOKENS, 10);
        let cost = Amounts::ZERO.with(TOKENS, 1);
        let now = at("2026-11-30T23:59:58.250Z");
        let headers = rate_limit(&limits, &cost, &cost, &period, now).unwrap();
        assert_eq!(headers.period_ends_in, 2);
        assert_eq!(texts(&headers).1, "\"tokens\";r=9;t=2");
    }

    #[test]
    fn a_cost_without_a_limited_dimension_has_no_headers() {
        let (period, now) = november();
        let limits = Limits::UNLIMITED.with(RUNS, 10);
        let cost = Amounts::ZERO.with(TOKENS, 1);
        assert_eq!(rate_limit(&limits, &cost, &cost, &period, now), None);
    }
}
