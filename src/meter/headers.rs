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
//! Built digit by digit into a buffer on the stack, copied once into its
//! header value: this runs on every metered answer, and the formatting
//! machinery, or a growing heap buffer, would cost more than the rest.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use chrono::{DateTime, Utc};
use http::HeaderValue;

use crate::error::RateLimitHeaders;
use crate::period::Period;
use crate::quota::{Amounts, Dimension, Limits};

/// The headers for a reservation of `cost` against `limits` that left the
/// store's `counters` (after it when admitted, as found when denied), in
/// `period` at `now`. `None` when no dimension of the cost has a limit.
/// The policy's value comes from `policies` when it was made before.
pub fn rate_limit(
    limits: &Limits,
    cost: &Amounts,
    counters: &Amounts,
    period: &Period,
    now: DateTime<Utc>,
    policies: &PolicyCache,
) -> Option<RateLimitHeaders> {
    // In timestamps: chrono's TimeDelta arithmetic costs twice as much.
    let window = (period.end.timestamp() - period.start.timestamp()).max(0);
    let ends_in = seconds_until(period.end, now);
    let mut policy = PolicyKey {
        limits: Limits::UNLIMITED,
        window,
    };
    let mut state = Line::new();
    for (dimension, _) in cost.iter() {
        let Some(limit) = limits.get(dimension) else {
            continue;
        };
        policy.limits.set(dimension, Some(limit));
        let remaining = limit.saturating_sub(counters.get(dimension)).max(0);
        item(&mut state, dimension.as_str());
        number(&mut state, b";r=", remaining);
        if !dimension.is_gauge() {
            number(&mut state, b";t=", ends_in);
        }
    }
    if state.is_empty() {
        return None;
    }
    Some(RateLimitHeaders {
        policy: policies.value(&policy)?,
        state: state.value()?,
        period_ends_in: u64::try_from(ends_in).unwrap_or(0),
    })
}

/// What a `RateLimit-Policy` value says: the limits of the cost's limited
/// dimensions, and the period's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PolicyKey {
    limits: Limits,
    window: i64,
}

impl PolicyKey {
    fn value(&self) -> Option<HeaderValue> {
        let mut line = Line::new();
        for dimension in Dimension::ALL {
            let Some(limit) = self.limits.get(dimension) else {
                continue;
            };
            item(&mut line, dimension.as_str());
            number(&mut line, b";q=", limit);
            if !dimension.is_gauge() {
                number(&mut line, b";w=", self.window);
            }
        }
        line.value()
    }
}

/// The `RateLimit-Policy` value made last. It changes only with an org's
/// limits and the length of its period, so one worker's requests nearly
/// always find it here: each saves a third of the headers' cost (some 600
/// instructions of formatting, checking and allocating, by callgrind).
#[derive(Debug, Default)]
pub struct PolicyCache(ArcSwapOption<(PolicyKey, HeaderValue)>);

impl PolicyCache {
    fn value(&self, key: &PolicyKey) -> Option<HeaderValue> {
        if let Some(cached) = &*self.0.load()
            && cached.0 == *key
        {
            return Some(cached.1.clone());
        }
        let value = key.value()?;
        self.0.store(Some(Arc::new((*key, value.clone()))));
        Some(value)
    }
}

/// The most a header's text takes: three items of the longest dimension
/// name, and numbers of 19 digits, come to well under this.
const LINE: usize = 256;

/// A header's text as it is written.
struct Line {
    bytes: [u8; LINE],
    len: usize,
    /// Set if the text did not fit: the header is not sent.
    overflowed: bool,
}

impl Line {
    fn new() -> Line {
        Line {
            bytes: [0; LINE],
            len: 0,
            overflowed: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, text: &[u8]) {
        match self.bytes.get_mut(self.len..self.len + text.len()) {
            Some(room) => {
                room.copy_from_slice(text);
                self.len += text.len();
            }
            None => self.overflowed = true,
        }
    }

    fn value(&self) -> Option<HeaderValue> {
        let text = self.bytes.get(..self.len).filter(|_| !self.overflowed)?;
        HeaderValue::from_bytes(text).ok()
    }
}

/// Starts a list item named `name` (a structured-field string), after a
/// comma if one came before.
fn item(line: &mut Line, name: &str) {
    if !line.is_empty() {
        line.push(b",");
    }
    line.push(b"\"");
    line.push(name.as_bytes());
    line.push(b"\"");
}

fn number(line: &mut Line, key: &[u8], value: i64) {
    line.push(key);
    line.push(itoa::Buffer::new().format(value).as_bytes());
}

/// Whole seconds from `now` to `end`, any part of one counting as one; 0
/// once `end` has passed.
fn seconds_until(end: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    let whole = end.timestamp() - now.timestamp();
    let part = i64::from(end.timestamp_subsec_nanos()) > i64::from(now.timestamp_subsec_nanos());
    (whole + i64::from(part)).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The headers a day before November's end, with a cold policy cache.
    fn in_november(limits: &Limits, cost: &Amounts, counters: &Amounts) -> RateLimitHeaders {
        let (period, now) = november();
        rate_limit(
            limits,
            cost,
            counters,
            &period,
            now,
            &PolicyCache::default(),
        )
        .unwrap()
    }

    fn texts(headers: &RateLimitHeaders) -> (&str, &str) {
        (
            headers.policy.to_str().unwrap(),
            headers.state.to_str().unwrap(),
        )
    }

    #[test]
    fn a_period_dimension_gives_its_limit_window_remaining_and_reset() {
        let limits = Limits::UNLIMITED.with(TOKENS, 100000);
        let cost = Amounts::ZERO.with(TOKENS, 10000);
        let counters = Amounts::ZERO.with(TOKENS, 96000);
        let headers = in_november(&limits, &cost, &counters);
        assert_eq!(
            texts(&headers),
            ("\"tokens\";q=100000;w=2592000", "\"tokens\";r=4000;t=86400")
        );
        assert_eq!(headers.period_ends_in, 86400);
    }

    #[test]
    fn several_limited_dimensions_give_one_item_each_and_unlimited_ones_none() {
        let limits = Limits::UNLIMITED.with(TOKENS, 100).with(RUNS, 10);
        let cost = Amounts::ZERO.with(TOKENS, 5).with(RUNS, 1);
        let counters = Amounts::ZERO.with(TOKENS, 5).with(RUNS, 1);
        let headers = in_november(&limits, &cost, &counters);
        assert_eq!(
            texts(&headers),
            (
                "\"tokens\";q=100;w=2592000,\"playbook_runs\";q=10;w=2592000",
                "\"tokens\";r=95;t=86400,\"playbook_runs\";r=9;t=86400"
            )
        );
        let unlimited_runs = Limits::UNLIMITED.with(TOKENS, 100);
        let headers = in_november(&unlimited_runs, &cost, &counters);
        assert_eq!(texts(&headers).1, "\"tokens\";r=95;t=86400");
    }

    #[test]
    fn remaining_never_goes_below_zero() {
        let (period, now) = november();
        let limits = Limits::UNLIMITED.with(RUNS, 10);
        let cost = Amounts::ZERO.with(RUNS, 1);
        let over = Amounts::ZERO.with(RUNS, 11);
        let headers =
            rate_limit(&limits, &cost, &over, &period, now, &PolicyCache::default()).unwrap();
        assert_eq!(texts(&headers).1, "\"playbook_runs\";r=0;t=86400");
    }

    #[test]
    fn seats_have_no_window_and_no_reset() {
        let limits = Limits::UNLIMITED.with(SEATS, 5);
        let cost = Amounts::ZERO.with(SEATS, 1);
        let counters = Amounts::ZERO.with(SEATS, 3);
        let headers = in_november(&limits, &cost, &counters);
        assert_eq!(texts(&headers), ("\"seats\";q=5", "\"seats\";r=2"));
    }

    #[test]
    fn a_part_of_a_second_to_the_end_counts_as_a_second() {
        let (period, _) = november();
        let limits = Limits::UNLIMITED.with(TOKENS, 10);
        let cost = Amounts::ZERO.with(TOKENS, 1);
        let now = at("2026-11-30T23:59:58.250Z");
        let headers =
            rate_limit(&limits, &cost, &cost, &period, now, &PolicyCache::default()).unwrap();
        assert_eq!(headers.period_ends_in, 2);
        assert_eq!(texts(&headers).1, "\"tokens\";r=9;t=2");
    }

    #[test]
    fn a_cost_without_a_limited_dimension_has_no_headers() {
        let (period, now) = november();
        let limits = Limits::UNLIMITED.with(RUNS, 10);
        let cost = Amounts::ZERO.with(TOKENS, 1);
        assert_eq!(
            rate_limit(&limits, &cost, &cost, &period, now, &PolicyCache::default()),
            None
        );
    }

    #[test]
    fn the_policy_value_is_made_again_only_when_the_limits_or_the_period_change() {
        let (period, now) = november();
        let cache = PolicyCache::default();
        let cost = Amounts::ZERO.with(TOKENS, 1);
        let policy = |limit: i64, period: &Period| {
            let limits = Limits::UNLIMITED.with(TOKENS, limit);
            let headers = rate_limit(&limits, &cost, &cost, period, now, &cache).unwrap();
            headers.policy.to_str().unwrap().to_string()
        };
        assert_eq!(policy(100, &period), "\"tokens\";q=100;w=2592000");
        assert_eq!(policy(100, &period), "\"tokens\";q=100;w=2592000");
        assert_eq!(policy(7, &period), "\"tokens\";q=7;w=2592000");
        let december = Period::containing(at("2026-12-02T00:00:00Z"), 1);
        assert_eq!(policy(7, &december), "\"tokens\";q=7;w=2678400");
    }
}
