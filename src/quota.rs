//! The admission decision: pure and synchronous, so that every store backend
//! applies the same rule and the rule is tested without I/O.
//!
//! A request is admitted when, for every dimension it asks for, `current +
//! requested <= limit`; a dimension without a limit is unlimited. Admission
//! is all or nothing: one short dimension denies the whole request.

use std::fmt;

/// The largest amount a cost, limit or estimate may hold: every amount stays
/// exact in a double, as Redis's Lua computes with doubles.
pub const MAX_AMOUNT: i64 = (1 << 53) - 1;

/// A JSON number as a whole amount, as JSON Schema counts one: `3` and
/// `3.0`, not `3.5`; within ±[`MAX_AMOUNT`], where a double holds every whole
/// number exactly.
pub fn whole(number: &serde_json::Number) -> Option<i64> {
    if let Some(whole) = number.as_i64() {
        return (whole.abs() <= MAX_AMOUNT).then_some(whole);
    }
    let x = number.as_f64()?;
    (x.fract() == 0.0 && x.abs() <= MAX_AMOUNT as f64).then_some(x as i64)
}

/// A quota type an org is billed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    Tokens,
    PlaybookRuns,
    Seats,
}

impl Dimension {
    pub const ALL: [Dimension; 3] = [Dimension::Tokens, Dimension::PlaybookRuns, Dimension::Seats];

    /// The name used in config keys, store keys and the 402 body.
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Tokens => "tokens",
            Dimension::PlaybookRuns => "playbook_runs",
            Dimension::Seats => "seats",
        }
    }

    pub fn parse(name: &str) -> Option<Dimension> {
        Dimension::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Gauges count what is held now (seats); the others count what was used
    /// in the billing period and start again at zero with each period.
    pub fn is_gauge(self) -> bool {
        matches!(self, Dimension::Seats)
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Singular noun for messages ("Token quota exceeded").
    fn noun(self) -> &'static str {
        match self {
            Dimension::Tokens => "Token",
            Dimension::PlaybookRuns => "Playbook run",
            Dimension::Seats => "Seat",
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One signed amount per dimension: a cost, a usage or a correction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Amounts([i64; 3]);

impl Amounts {
    pub const ZERO: Amounts = Amounts([0; 3]);

    pub fn get(&self, dimension: Dimension) -> i64 {
        self.0[dimension.index()]
    }

    pub fn set(&mut self, dimension: Dimension, amount: i64) {
        self.0[dimension.index()] = amount;
    }

    pub fn with(mut self, dimension: Dimension, amount: i64) -> Amounts {
        self.set(dimension, amount);
        self
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 3]
    }

    /// The non-zero entries, in [`Dimension::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Dimension, i64)> + '_ {
        Dimension::ALL
            .into_iter()
            .map(|d| (d, self.get(d)))
            .filter(|&(_, amount)| amount != 0)
    }

    /// `self - other`, per dimension, saturating.
    pub fn minus(&self, other: &Amounts) -> Amounts {
        let mut out = Amounts::ZERO;
        for d in Dimension::ALL {
            out.set(d, self.get(d).saturating_sub(other.get(d)));
        }
        out
    }

    /// `self + other`, per dimension, saturating.
    pub fn plus(&self, other: &Amounts) -> Amounts {
        let mut out = Amounts::ZERO;
        for d in Dimension::ALL {
            out.set(d, self.get(d).saturating_add(other.get(d)));
        }
        out
    }

    pub fn negated(&self) -> Amounts {
        Amounts::ZERO.minus(self)
    }
}

/// Per-dimension limits; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits([Option<i64>; 3]);

impl Limits {
    pub const UNLIMITED: Limits = Limits([None; 3]);

    pub fn get(&self, dimension: Dimension) -> Option<i64> {
        self.0[dimension.index()]
    }

    pub fn set(&mut self, dimension: Dimension, limit: Option<i64>) {
        self.0[dimension.index()] = limit;
    }

    pub fn with(mut self, dimension: Dimension, limit: i64) -> Limits {
        self.set(dimension, Some(limit));
        self
    }

    /// `self` with every limit that `overrides` names replaced.
    pub fn overridden_by(mut self, overrides: &Limits) -> Limits {
        for d in Dimension::ALL {
            if let Some(limit) = overrides.get(d) {
                self.set(d, Some(limit));
            }
        }
        self
    }
}

/// How hard a limit bites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Deny what exceeds a limit.
    Enforce,
    /// Count everything, deny nothing, report what would have been denied.
    Shadow,
    /// Count nothing: the store is never asked.
    Off,
}

impl Mode {
    pub fn parse(word: &str) -> Option<Mode> {
        match word {
            "enforce" => Some(Mode::Enforce),
            "shadow" => Some(Mode::Shadow),
            "off" => Some(Mode::Off),
            _ => None,
        }
    }

    /// The word config and the admin API write it as.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Shadow => "shadow",
            Mode::Off => "off",
        }
    }
}

/// The first dimension a request would push past its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exceeded {
    pub dimension: Dimension,
    pub current: i64,
    pub limit: i64,
    pub requested: i64,
}

impl Exceeded {
    /// The sentence a caller reads in a 402. Pieced together rather than
    /// formatted: a client past its limit hammers this path, and `format!`
    /// costs some 1,500 instructions here (callgrind), this a fifth of it.
    pub fn message(&self) -> String {
        let Exceeded {
            dimension,
            current,
            limit,
            requested,
        } = *self;
        let held = if dimension.is_gauge() {
            " in use, "
        } else {
            " used this period, "
        };
        let mut numbers = itoa::Buffer::new();
        let mut text = String::with_capacity(80);
        text.push_str(dimension.noun());
        text.push_str(" quota exceeded: ");
        text.push_str(numbers.format(current));
        text.push_str(" of ");
        text.push_str(numbers.format(limit));
        text.push_str(held);
        text.push_str(numbers.format(requested));
        text.push_str(" requested");
        text
    }
}

/// What the store does with a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Apply `applied` to the counters. `over` is set in shadow mode when the
    /// request would have been denied.
    Admit {
        applied: Amounts,
        over: Option<Exceeded>,
    },
    /// Change nothing.
    Deny(Exceeded),
}

/// A reservation's decision and the counters it leaves, as one store call
/// answers both: what the RateLimit headers report needs no second look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decided {
    pub decision: Decision,
    /// The counters of the requested dimensions after the reservation:
    /// with what was applied added when admitted, as found when denied.
    /// Dimensions not requested are 0 (not read).
    pub counters: Amounts,
}

/// Decides one reservation of `requested` against `limits`, given the
/// counters' `current` values.
///
/// Negative amounts (a seat released) are always admitted and never take a
/// counter below zero, so `applied` can be smaller in magnitude than
/// `requested`; the store records what it applied so that a refund undoes
/// exactly that.
pub fn decide(limits: &Limits, current: &Amounts, requested: &Amounts, mode: Mode) -> Decided {
    let decision = decision(limits, current, requested, mode);
    let applied = match decision {
        Decision::Admit { applied, .. } => applied,
        Decision::Deny(_) => Amounts::ZERO,
    };
    let mut counters = Amounts::ZERO;
    for (d, _) in requested.iter() {
        counters.set(d, current.get(d).saturating_add(applied.get(d)));
    }
    Decided { decision, counters }
}

fn decision(limits: &Limits, current: &Amounts, requested: &Amounts, mode: Mode) -> Decision {
    let exceeded = Dimension::ALL.into_iter().find_map(|d| {
        let (want, have) = (requested.get(d), current.get(d));
        let limit = limits.get(d)?;
        (want > 0 && have.saturating_add(want) > limit).then_some(Exceeded {
            dimension: d,
            current: have,
            limit,
            requested: want,
        })
    });
    match (exceeded, mode) {
        (Some(exceeded), Mode::Enforce) => Decision::Deny(exceeded),
        (over, _) => Decision::Admit {
            applied: clamp_releases(current, requested),
            over,
        },
    }
}

/// The amounts that applying `requested` to `current` really changes, given
/// that no counter goes below zero.
pub fn clamp_releases(current: &Amounts, requested: &Amounts) -> Amounts {
    let mut applied = *requested;
    for d in Dimension::ALL {
        let (want, have) = (requested.get(d), current.get(d));
        if want < 0 {
            applied.set(d, want.max(-have.max(0)));
        }
    }
    applied
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNS: Dimension = Dimension::PlaybookRuns;

    fn runs(n: i64) -> Amounts {
        Amounts::ZERO.with(RUNS, n)
    }

    #[test]
    fn admits_the_run_that_reaches_the_limit() {
        let limits = Limits::UNLIMITED.with(RUNS, 10);
        assert_eq!(
            decide(&limits, &runs(9), &runs(1), Mode::Enforce).decision,
            Decision::Admit {
                applied: runs(1),
                over: None
            }
        );
    }

    #[test]
    fn denies_the_run_after_the_limit() {
        let limits = Limits::UNLIMITED.with(RUNS, 10);
        assert_eq!(
            decide(&limits, &runs(10), &runs(1), Mode::Enforce).decision,
            Decision::Deny(Exceeded {
                dimension: RUNS,
                current: 10,
                limit: 10,
                requested: 1
            })
        );
    }

    #[test]
    fn a_missing_limit_is_unlimited() {
        let decision = decide(
            &Limits::UNLIMITED,
            &runs(i64::MAX - 1),
            &runs(5),
            Mode::Enforce,
        )
        .decision;
        assert!(matches!(decision, Decision::Admit { over: None, .. }));
    }

    #[test]
    fn denies_every_dimension_when_one_is_short() {
        let limits = Limits::UNLIMITED
            .with(Dimension::Tokens, 100)
            .with(RUNS, 10);
        let current = Amounts::ZERO.with(Dimension::Tokens, 95);
        let requested = Amounts::ZERO.with(Dimension::Tokens, 10).with(RUNS, 1);
        let decision = decide(&limits, &current, &requested, Mode::Enforce).decision;
        assert_eq!(
            decision,
            Decision::Deny(Exceeded {
                dimension: Dimension::Tokens,
                current: 95,
                limit: 100,
                requested: 10
            })
        );
    }

    #[test]
    fn shadow_mode_admits_and_names_the_quota_it_would_have_denied() {
        let limits = Limits::UNLIMITED.with(RUNS, 10);
        let decision = decide(&limits, &runs(10), &runs(1), Mode::Shadow).decision;
        assert_eq!(
            decision,
            Decision::Admit {
                applied: runs(1),
                over: Some(Exceeded {
                    dimension: RUNS,
                    current: 10,
                    limit: 10,
                    requested: 1
                })
            }
        );
    }

    #[test]
    fn a_released_seat_is_admitted_past_the_limit_and_never_goes_below_zero() {
        let seats = |n| Amounts::ZERO.with(Dimension::Seats, n);
        let limits = Limits::UNLIMITED.with(Dimension::Seats, 3);
        assert_eq!(
            decide(&limits, &seats(5), &seats(-1), Mode::Enforce).decision,
            Decision::Admit {
                applied: seats(-1),
                over: None
            }
        );
        assert_eq!(
            decide(&limits, &seats(0), &seats(-1), Mode::Enforce).decision,
            Decision::Admit {
                applied: seats(0),
                over: None
            }
        );
    }

    #[test]
    fn a_zero_limit_denies_any_use() {
        let limits = Limits::UNLIMITED.with(Dimension::Tokens, 0);
        let requested = Amounts::ZERO.with(Dimension::Tokens, 1);
        assert!(matches!(
            decide(&limits, &Amounts::ZERO, &requested, Mode::Enforce).decision,
            Decision::Deny(_)
        ));
    }

    #[test]
    fn messages_read_as_the_source_wrote_them() {
        let exceeded = Exceeded {
            dimension: Dimension::Tokens,
            current: 95000,
            limit: 100000,
            requested: 10000,
        };
        assert_eq!(
            exceeded.message(),
            "Token quota exceeded: 95000 of 100000 used this period, 10000 requested"
        );
        let seats = Exceeded {
            dimension: Dimension::Seats,
            current: 3,
            limit: 3,
            requested: 1,
        };
        assert_eq!(
            seats.message(),
            "Seat quota exceeded: 3 of 3 in use, 1 requested"
        );
    }

    #[test]
    fn org_limits_override_only_the_dimensions_they_name() {
        let plan = Limits::UNLIMITED.with(Dimension::Tokens, 10).with(RUNS, 5);
        let org = Limits::UNLIMITED.with(Dimension::Tokens, 99);
        let merged = plan.overridden_by(&org);
        assert_eq!(merged.get(Dimension::Tokens), Some(99));
        assert_eq!(merged.get(RUNS), Some(5));
        assert_eq!(merged.get(Dimension::Seats), None);
    }

    #[test]
    fn an_admission_reports_the_counters_with_the_cost_applied() {
        let limits = Limits::UNLIMITED.with(Dimension::Tokens, 100);
        let current = Amounts::ZERO
            .with(Dimension::Tokens, 40)
            .with(RUNS, 7)
            .with(Dimension::Seats, 2);
        let requested = Amounts::ZERO.with(Dimension::Tokens, 10).with(RUNS, 1);
        let decided = decide(&limits, &current, &requested, Mode::Enforce);
        assert_eq!(
            decided.counters,
            Amounts::ZERO.with(Dimension::Tokens, 50).with(RUNS, 8)
        );
    }

    #[test]
    fn a_denial_reports_the_counters_as_found() {
        let limits = Limits::UNLIMITED.with(RUNS, 10);
        let decided = decide(&limits, &runs(10), &runs(1), Mode::Enforce);
        assert!(matches!(decided.decision, Decision::Deny(_)));
        assert_eq!(decided.counters, runs(10));
    }

    #[test]
    fn a_shadow_admission_reports_the_counters_past_the_limit() {
        let limits = Limits::UNLIMITED.with(RUNS, 10);
        let decided = decide(&limits, &runs(10), &runs(1), Mode::Shadow);
        assert_eq!(decided.counters, runs(11));
    }

    #[test]
    fn a_release_at_zero_reports_the_counter_at_zero() {
        let seats = |n| Amounts::ZERO.with(Dimension::Seats, n);
        let decided = decide(&Limits::UNLIMITED, &seats(0), &seats(-1), Mode::Enforce);
        assert_eq!(decided.counters, seats(0));
    }
}
