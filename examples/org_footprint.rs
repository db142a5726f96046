//! What each org costs the memory store: reserves one playbook run for
//! 500,000 distinct orgs (as a month of a large tenant base would) and
//! prints the growth of the process's resident memory per org.
//!
//!   cargo run --release --example org_footprint [-- ORGS]

use std::sync::Arc;

use tollgate::org::OrgId;
use tollgate::period::Period;
use tollgate::quota::{Amounts, Dimension, Limits, Mode};
use tollgate::store::MemoryStore;
use tollgate::store::{QuotaStore, ReservationId, ReserveRequest};

// As the gateway's binary does.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Resident memory in bytes, from /proc/self/statm (pages of 4 KiB).
fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let orgs: usize = std::env::args().nth(1).map_or(Ok(500_000), |n| n.parse())?;
    let store = Arc::new(MemoryStore::default());
    let period = Period::containing(chrono::Utc::now(), 1);
    let limits = Limits::UNLIMITED.with(Dimension::PlaybookRuns, 500);
    let cost = Amounts::ZERO.with(Dimension::PlaybookRuns, 1);
    // The names are made before the first reading, so only what the store
    // keeps is counted; in a vector of their final size, and through one
    // buffer, so that nothing freed before that reading (still resident)
    // is handed to the store and left uncounted.
    let mut names: Vec<OrgId> = Vec::with_capacity(orgs);
    let mut name = String::new();
    for i in 0..orgs {
        use std::fmt::Write;
        name.clear();
        write!(name, "org_{i:08}")?;
        names.push(OrgId::parse(&name).ok_or("an org id the gateway would refuse")?);
    }
    let before = resident();
    for org in &names {
        let request = ReserveRequest {
            id: ReservationId::next(),
            org: org.clone(),
            period,
            limits,
            cost,
            mode: Mode::Enforce,
        };
        store.reserve(&request).await?;
    }
    let after = resident();
    drop(names);
    let per_org = (after.saturating_sub(before)) as f64 / orgs as f64;
    println!(
        "{orgs} orgs, one reservation each: resident memory {:.1} MB -> {:.1} MB, {per_org:.0} bytes per org",
        before as f64 / 1e6,
        after as f64 / 1e6
    );
    Ok(())
}
