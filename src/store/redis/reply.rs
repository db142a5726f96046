//! The scripts' replies, read: pure functions, so that every shape a reply
//! can take (including what no script of ours writes) is tested and fuzzed
//! without a Redis. A reply that is not what the call asked for is an error
//! for the whole call; an item answered `E` is [`StoreError::DamagedKey`]
//! for that item alone.

use super::super::{ReserveRequest, Settlement, StoreError};
use crate::quota::{Amounts, Decided, Decision, Dimension, Exceeded, MAX_AMOUNT};

/// The decision for each of `requests`, with the counters it left, in the
/// reserve script's reply `text` (see reserve.lua).
pub fn reserve(
    text: &str,
    requests: &[ReserveRequest],
) -> Result<Vec<Result<Decided, StoreError>>, StoreError> {
    let unexpected = || {
        StoreError::Backend(format!(
            "unexpected reply from the reserve script: {text:?}"
        ))
    };
    // Bytes, not chars: the reply is ASCII, and `str::split`'s searcher
    // and `i64`'s parser cost this function half its instructions
    // (callgrind, benchmark case 5: 500 a reservation).
    let mut parts = text.as_bytes().split(|&byte| byte == b';');
    let mut decisions = Vec::with_capacity(requests.len());
    for request in requests {
        let part = parts.next().ok_or_else(unexpected)?;
        decisions.push(match part {
            b"E" => Err(StoreError::DamagedKey(request.org.clone())),
            _ => Ok(reserve_outcome(part, request).ok_or_else(unexpected)?),
        });
    }
    if parts.next().is_some() {
        return Err(unexpected());
    }
    Ok(decisions)
}

/// The most counters a reservation has: one per dimension.
const MOST_COUNTERS: usize = Dimension::ALL.len();

/// One reservation's reply other than `E`: either the usual one, each
/// counter's value after it, or admitted (1 or 0), the index of its first
/// exceeded counter or 0, that counter's value, the amount applied to each
/// counter of its cost, then each counter's value after it. `None` if it is
/// neither.
fn reserve_outcome(part: &[u8], request: &ReserveRequest) -> Option<Decided> {
    let mut cost = [(Dimension::Tokens, 0); MOST_COUNTERS];
    let mut n = 0;
    for entry in request.cost.iter() {
        cost[n] = entry;
        n += 1;
    }
    let cost = &cost[..n];
    let mut reply = [0i64; 3 + 2 * MOST_COUNTERS];
    let mut length = 0;
    if !part.is_empty() {
        for number in part.split(|&byte| byte == b' ') {
            *reply.get_mut(length)? = integer(number)?;
            length += 1;
        }
    }
    let reply = &reply[..length];
    if reply.iter().any(|amount| amount.abs() > MAX_AMOUNT) {
        return None;
    }
    if length == n {
        return Some(Decided {
            decision: Decision::Admit {
                applied: request.cost,
                over: None,
            },
            counters: amounts(cost, reply),
        });
    }
    let (&[admitted, exceeded_at, current], rest) = reply.split_first_chunk::<3>()?;
    if rest.len() != 2 * n || !(0..=1).contains(&admitted) {
        return None;
    }
    let (applied, after) = rest.split_at(n);
    let exceeded = match usize::try_from(exceeded_at).ok()? {
        0 => None,
        position => {
            let &(dimension, requested) = cost.get(position - 1)?;
            Some(Exceeded {
                dimension,
                current,
                limit: request.limits.get(dimension)?,
                requested,
            })
        }
    };
    let decision = if admitted == 0 {
        Decision::Deny(exceeded?)
    } else {
        Decision::Admit {
            applied: amounts(cost, applied),
            over: exceeded,
        }
    };
    Some(Decided {
        decision,
        counters: amounts(cost, after),
    })
}

/// A decimal integer as the scripts write one: an optional `-`, then
/// digits; `None` for anything else, or past `i64`.
fn integer(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', digits)) => (true, digits),
        _ => (false, text),
    };
    if digits.is_empty() {
        return None;
    }
    let mut value: i64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        let digit = i64::from(digit - b'0');
        value = value.checked_mul(10)?;
        value = if negative {
            value.checked_sub(digit)?
        } else {
            value.checked_add(digit)?
        };
    }
    Some(value)
}

/// `values`, one per dimension of `cost`, as amounts.
fn amounts(cost: &[(Dimension, i64)], values: &[i64]) -> Amounts {
    let mut amounts = Amounts::ZERO;
    for (&(dimension, _), &value) in cost.iter().zip(values) {
        amounts.set(dimension, value);
    }
    amounts
}

/// Whether each of `settlements` is settled, from the settle script's
/// reply `text`: a character each, `1` if applied, `0` if settled before
/// (either way, settled), `E` if not (see settle.lua).
pub fn settle(
    text: &str,
    settlements: &[Settlement],
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let unexpected =
        || StoreError::Backend(format!("unexpected reply from the settle script: {text:?}"));
    if text.len() != settlements.len() {
        return Err(unexpected());
    }
    settlements
        .iter()
        .zip(text.chars())
        .map(|(settlement, outcome)| match outcome {
            '0' | '1' => Ok(Ok(())),
            'E' => Ok(Err(StoreError::DamagedKey(settlement.org.clone()))),
            _ => Err(unexpected()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::org::OrgId;
    use crate::period::Period;
    use crate::quota::{Limits, Mode};
    use crate::store::ReservationId;

    fn request(cost: Amounts, limits: Limits) -> ReserveRequest {
        ReserveRequest {
            id: ReservationId::next(),
            org: OrgId::parse("org_r").unwrap(),
            period: Period::containing("2026-11-27T12:00:00Z".parse().unwrap(), 1),
            limits,
            cost,
            mode: Mode::Enforce,
        }
    }

    fn settlement() -> Settlement {
        Settlement::new(
            ReservationId::next(),
            OrgId::parse("org_r").unwrap(),
            Period::containing("2026-11-27T12:00:00Z".parse().unwrap(), 1),
            Amounts::ZERO.with(Dimension::Tokens, -5),
        )
    }

    const TOKENS: Dimension = Dimension::Tokens;
    const RUNS: Dimension = Dimension::PlaybookRuns;

    #[test]
    fn the_usual_reply_admits_every_cost_as_asked_and_gives_the_counters() {
        let cost = Amounts::ZERO.with(TOKENS, 10).with(RUNS, 1);
        let decisions = reserve("10 1;20 2", &vec![request(cost, Limits::UNLIMITED); 2]).unwrap();
        let counters: Vec<Amounts> = decisions
            .into_iter()
            .map(|decided| {
                let decided = decided.unwrap();
                assert_eq!(
                    decided.decision,
                    Decision::Admit {
                        applied: cost,
                        over: None
                    }
                );
                decided.counters
            })
            .collect();
        assert_eq!(
            counters,
            [
                Amounts::ZERO.with(TOKENS, 10).with(RUNS, 1),
                Amounts::ZERO.with(TOKENS, 20).with(RUNS, 2)
            ]
        );
    }

    #[test]
    fn a_refusal_names_the_counter_its_value_and_its_limit() {
        let cost = Amounts::ZERO.with(TOKENS, 10).with(RUNS, 1);
        let limits = Limits::UNLIMITED.with(RUNS, 3);
        let decisions = reserve("0 2 3 0 0 500 3", &[request(cost, limits)]).unwrap();
        assert_eq!(
            decisions[0].as_ref().unwrap(),
            &Decided {
                decision: Decision::Deny(Exceeded {
                    dimension: RUNS,
                    current: 3,
                    limit: 3,
                    requested: 1
                }),
                counters: Amounts::ZERO.with(TOKENS, 500).with(RUNS, 3),
            }
        );
    }

    #[test]
    fn an_admission_reports_what_it_really_applied() {
        // A seat released at zero applies nothing.
        let cost = Amounts::ZERO.with(Dimension::Seats, -1);
        let limits = Limits::UNLIMITED.with(Dimension::Seats, 3);
        let decision = reserve("1 0 0 0 0", &[request(cost, limits)]).unwrap();
        assert_eq!(
            decision[0].as_ref().unwrap().decision,
            Decision::Admit {
                applied: Amounts::ZERO,
                over: None
            }
        );
    }

    #[test]
    fn a_shadow_admission_reports_the_limit_it_passed() {
        let cost = Amounts::ZERO.with(TOKENS, 10);
        let limits = Limits::UNLIMITED.with(TOKENS, 5);
        let decision = reserve("1 1 0 10 10", &[request(cost, limits)]).unwrap();
        assert_eq!(
            decision[0].as_ref().unwrap(),
            &Decided {
                decision: Decision::Admit {
                    applied: cost,
                    over: Some(Exceeded {
                        dimension: TOKENS,
                        current: 0,
                        limit: 5,
                        requested: 10
                    })
                },
                counters: Amounts::ZERO.with(TOKENS, 10),
            }
        );
    }

    #[test]
    fn a_damaged_item_fails_alone() {
        let cost = Amounts::ZERO.with(TOKENS, 1);
        let decisions = reserve("E;1", &vec![request(cost, Limits::UNLIMITED); 2]).unwrap();
        assert!(matches!(decisions[0], Err(StoreError::DamagedKey(_))));
        assert!(decisions[1].is_ok());
    }

    #[test]
    fn a_reply_that_is_not_what_was_asked_fails_the_call() {
        let cost = Amounts::ZERO.with(TOKENS, 10);
        let limited = Limits::UNLIMITED.with(TOKENS, 5);
        for text in [
            "",
            "1;1",
            "2 0 0 10 10",
            "1 0",
            "1 0 0",
            "1 0 0 10",
            "1 0 0 10 10 10",
            "1 2 0 10 10",
            "0 0 0 0 0",
            "1 0 0 9007199254740992 0",
            "9007199254740992",
            "1 0 0 x 0",
            "1 -1 0 10 10",
            "1 0 0 10 10 10 10 10 10 10 10 10 10",
            " 1",
            "1 ",
            "1;",
            "+1",
            "-",
            "1-",
            "--1",
            "99999999999999999999",
        ] {
            assert!(
                reserve(text, &[request(cost, limited)]).is_err(),
                "{text:?} was taken"
            );
        }
        // Exceeded on a counter without a limit: no 402 can be made of it.
        assert!(reserve("0 1 0 0 0", &[request(cost, Limits::UNLIMITED)]).is_err());
    }

    #[test]
    fn integers_are_read_to_the_limits_of_i64_and_no_further() {
        for (text, value) in [
            ("0", Some(0)),
            ("-0", Some(0)),
            ("-12", Some(-12)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("-9223372036854775809", None),
            ("", None),
            ("1x", None),
            ("+1", None),
        ] {
            assert_eq!(integer(text.as_bytes()), value, "{text:?}");
        }
    }

    #[test]
    fn settle_replies_are_a_character_per_settlement() {
        let settlements = [settlement(), settlement(), settlement()];
        let outcomes = settle("10E", &settlements).unwrap();
        assert!(outcomes[0].is_ok() && outcomes[1].is_ok());
        assert!(matches!(outcomes[2], Err(StoreError::DamagedKey(_))));
        for text in ["10", "1000", "1x0", "é0"] {
            assert!(settle(text, &settlements).is_err(), "{text:?} was taken");
        }
    }
}
