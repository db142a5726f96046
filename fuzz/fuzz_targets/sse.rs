//! Any bytes as an event stream, cut anywhere: the scanner never panics,
//! passes a stream it need not rewrite through byte for byte, and hides
//! nothing from a stream whose usage it was not asked to hide.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tollgate::llm::sse::SseScanner;

fuzz_target!(|input: (bool, Vec<u8>, &[u8])| {
    let (hide, cuts, stream) = input;
    let mut scanner = SseScanner::new(hide);
    let mut out = Vec::new();
    let mut rest = stream;
    for cut in cuts {
        let (piece, after) = rest.split_at(usize::from(cut).min(rest.len()));
        out.extend_from_slice(&scanner.feed(Bytes::copy_from_slice(piece)));
        rest = after;
    }
    out.extend_from_slice(&scanner.feed(Bytes::copy_from_slice(rest)));
    out.extend_from_slice(&scanner.finish());
    if !hide {
        assert_eq!(out, stream);
    }
    if let Some(tally) = scanner.tally() {
        assert!(tally.so_far().is_none_or(|tokens| tokens >= 0));
    }
});
