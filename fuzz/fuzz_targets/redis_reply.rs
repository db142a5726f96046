//! Any text as a reserve or settle script's reply: read without panic, and
//! whatever is taken holds no amount beyond what the store may hold, and
//! counters only of the dimensions the cost names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::org::OrgId;
use tollgate::period::Period;
use tollgate::quota::{Amounts, Decided, Decision, Dimension, Limits, MAX_AMOUNT, Mode};
use tollgate::store::redis_reply;
use tollgate::store::{ReservationId, ReserveRequest, Settlement};

fuzz_target!(|input: (u8, &str)| {
    let (count, text) = input;
    let count = usize::from(count % 4) + 1;
    let org = OrgId::parse("org_fuzz").expect("a valid org id");
    let period = Period::containing(chrono::DateTime::UNIX_EPOCH, 1);
    let cost = Amounts::ZERO
        .with(Dimension::Tokens, 10)
        .with(Dimension::Seats, -1);
    let request = ReserveRequest {
        id: ReservationId::next(),
        org: org.clone(),
        period,
        limits: Limits::UNLIMITED.with(Dimension::Tokens, 100),
        cost,
        mode: Mode::Enforce,
    };
    if let Ok(decisions) = redis_reply::reserve(text, &vec![request; count]) {
        assert_eq!(decisions.len(), count);
        for Decided { decision, counters } in decisions.into_iter().flatten() {
            if let Decision::Admit { applied, .. } = decision {
                assert!(applied.iter().all(|(_, amount)| amount.abs() <= MAX_AMOUNT));
            }
            // Counters only of the cost's dimensions, within what a counter holds.
            assert!(counters.iter().all(|(d, amount)| {
                cost.get(d) != 0 && amount.abs() <= MAX_AMOUNT
            }));
        }
    }
    let settlement = Settlement::new(ReservationId::next(), org, period, cost);
    if let Ok(outcomes) = redis_reply::settle(text, &vec![settlement; count]) {
        assert_eq!(outcomes.len(), count);
    }
});
