//! Monthly billing periods, anchored on a day of the month at 00:00 UTC.
//!
//! An anchor past the end of a short month falls on that month's last day
//! (an org anchored on the 31st starts February's period on the 28th or 29th).

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use chrono::{DateTime, Datelike, Months, NaiveDate, Timelike, Utc};

/// `[start, end)` of one billing period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// A moment as the 402 body and the admin API write it: RFC 3339, whole
/// seconds, `Z`. Into a fixed buffer: chrono's formatter costs some 400
/// instructions a call (callgrind), and each 402 writes two.
pub fn rfc3339(time: DateTime<Utc>) -> String {
    let (date, clock) = (time.date_naive(), time.time());
    let mut text = *b"0000-00-00T00:00:00Z";
    let year = u32::try_from(date.year()).unwrap_or(0);
    for (range, value) in [
        (0..4, year),
        (5..7, date.month()),
        (8..10, date.day()),
        (11..13, clock.hour()),
        (14..16, clock.minute()),
        (17..19, clock.second()),
    ] {
        let mut rest = value;
        for byte in text[range].iter_mut().rev() {
            *byte = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// The period last computed, kept for the requests that fall in it: a
/// period is the same for a month, and computing it (chrono's month
/// arithmetic) costs some 900 instructions (callgrind), where this costs a
/// load and two comparisons.
#[derive(Debug, Default)]
pub struct PeriodCache(ArcSwapOption<(u32, Period)>);

impl PeriodCache {
    /// [`Period::containing`], from the cache when it holds it.
    pub fn containing(&self, now: DateTime<Utc>, anchor_day: u32) -> Period {
        if let Some(cached) = &*self.0.load()
            && cached.0 == anchor_day
            && cached.1.start <= now
            && now < cached.1.end
        {
            return cached.1;
        }
        let period = Period::containing(now, anchor_day);
        self.0.store(Some(Arc::new((anchor_day, period))));
        period
    }
}

impl Period {
    /// The period that contains `now` for an org anchored on `anchor_day`
    /// (1 to 31).
    pub fn containing(now: DateTime<Utc>, anchor_day: u32) -> Period {
        let this_month = first_of_month(now.date_naive());
        let anchored_this_month = anchored(this_month, anchor_day);
        let start_month = if now.date_naive() >= anchored_this_month {
            this_month
        } else {
            this_month - Months::new(1)
        };
        Period {
            start: midnight(anchored(start_month, anchor_day)),
            end: midnight(anchored(start_month + Months::new(1), anchor_day)),
        }
    }

    /// The period's name in store keys: its first day, `2026-11-05`.
    pub fn key(&self) -> String {
        String::from_utf8_lossy(&self.key_bytes()).into_owned()
    }

    /// [`Period::key`] without a `String`, for keys written straight into
    /// a buffer. Digit by digit: this is on every store call's path, and
    /// the formatting machinery costs more than the rest of the key.
    pub fn key_bytes(&self) -> [u8; 10] {
        // UTC's own date, without converting to a local time first.
        let day = self.start.naive_utc().date();
        let mut key = *b"0000-00-00";
        let year = u32::try_from(day.year()).unwrap_or(0);
        for (range, value) in [(0..4, year), (5..7, day.month()), (8..10, day.day())] {
            let mut rest = value;
            for byte in key[range].iter_mut().rev() {
                *byte = b'0' + (rest % 10) as u8;
                rest /= 10;
            }
        }
        key
    }
}

fn first_of_month(date: NaiveDate) -> NaiveDate {
    date.with_day(1).unwrap_or(date)
}

/// `anchor_day` in the month of `first`, clamped to the month's last day.
fn anchored(first: NaiveDate, anchor_day: u32) -> NaiveDate {
    let last_day = (first + Months::new(1)).pred_opt().map_or(28, |d| d.day());
    first
        .with_day(anchor_day.clamp(1, last_day))
        .unwrap_or(first)
}

fn midnight(date: NaiveDate) -> DateTime<Utc> {
    date.and_time(chrono::NaiveTime::MIN).and_utc()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    fn period(now: &str, anchor: u32) -> (String, String) {
        let p = Period::containing(at(now), anchor);
        (p.start.to_rfc3339(), p.end.to_rfc3339())
    }

    #[test]
    fn a_period_anchored_on_the_first_is_the_calendar_month() {
        assert_eq!(
            period("2026-11-27T20:46:00Z", 1),
            (
                "2026-11-01T00:00:00+00:00".into(),
                "2026-12-01T00:00:00+00:00".into()
            )
        );
    }

    #[test]
    fn before_the_anchor_day_the_period_began_last_month() {
        assert_eq!(
            period("2026-11-04T23:59:59Z", 5),
            (
                "2026-10-05T00:00:00+00:00".into(),
                "2026-11-05T00:00:00+00:00".into()
            )
        );
    }

    #[test]
    fn the_anchor_instant_opens_the_new_period() {
        assert_eq!(
            period("2026-11-05T00:00:00Z", 5),
            (
                "2026-11-05T00:00:00+00:00".into(),
                "2026-12-05T00:00:00+00:00".into()
            )
        );
    }

    #[test]
    fn an_anchor_past_the_month_end_clamps_to_the_last_day() {
        assert_eq!(
            period("2026-02-28T12:00:00Z", 31),
            (
                "2026-02-28T00:00:00+00:00".into(),
                "2026-03-31T00:00:00+00:00".into()
            )
        );
        assert_eq!(
            period("2028-02-28T12:00:00Z", 31),
            (
                "2028-01-31T00:00:00+00:00".into(),
                "2028-02-29T00:00:00+00:00".into()
            )
        );
    }

    #[test]
    fn periods_cross_the_year_end() {
        assert_eq!(
            period("2027-01-03T00:00:00Z", 15),
            (
                "2026-12-15T00:00:00+00:00".into(),
                "2027-01-15T00:00:00+00:00".into()
            )
        );
    }

    #[test]
    fn the_key_is_the_first_day() {
        assert_eq!(
            Period::containing(at("2026-11-27T20:46:00Z"), 5).key(),
            "2026-11-05"
        );
    }

    #[test]
    fn moments_are_written_as_rfc3339_in_whole_seconds() {
        for text in [
            "2026-11-01T00:00:00Z",
            "0999-02-28T23:59:07Z",
            "2027-12-31T09:05:59Z",
        ] {
            let time: DateTime<Utc> = text.parse().unwrap();
            assert_eq!(rfc3339(time), text);
            assert_eq!(
                rfc3339(time),
                time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
        }
    }

    #[test]
    fn the_cached_period_is_the_computed_one_across_an_anchor_and_a_month_end() {
        let cache = PeriodCache::default();
        for (now, anchor) in [
            ("2026-11-27T12:00:00Z", 1),
            ("2026-11-30T23:59:59Z", 1),
            ("2026-12-01T00:00:00Z", 1),
            ("2026-12-01T00:00:00Z", 5),
            ("2026-12-04T23:59:59Z", 5),
            ("2026-12-05T00:00:00Z", 5),
            ("2026-12-05T00:00:00Z", 1),
        ] {
            let now: DateTime<Utc> = now.parse().unwrap();
            assert_eq!(
                cache.containing(now, anchor),
                Period::containing(now, anchor),
                "{now} {anchor}"
            );
        }
    }
}
