//! Any body on an estimate route: parsed, estimated, given a bound and a
//! request for stream usage, written back. Nothing panics, the one-pass
//! scan agrees with the tree, a written body parses and estimates again,
//! and writing it once more changes nothing.
//! (Its estimate may differ a little from the original's: a number such as
//! 1111000000001319935345 is written back as 1.111e21, shortening a schema's
//! text, so the original, what was reserved, is the larger.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::llm::estimate::{self, EstimateRules};
use tollgate::llm::{Api, request};

const RULES: EstimateRules = EstimateRules {
    default_max_tokens: 4096,
    image_tokens: 1600,
};

fuzz_target!(|input: (u8, &[u8])| {
    let (which, body) = input;
    let api = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/messages",
        "/v1/other",
    ][usize::from(which) % 6];
    let api = Api::of_path(api);
    let Ok(mut json) = estimate::parse(body) else {
        return;
    };
    let scanned = estimate::scan(api, body, &RULES);
    let Ok(before) = estimate::estimate(api, &json, &RULES) else {
        assert!(scanned.is_err(), "the scan took a body the tree refuses");
        return;
    };
    assert_eq!(
        scanned.map(|scan| scan.estimate),
        Ok(before),
        "the scan and the tree differ"
    );
    assert!(before.total() >= 0 && before.prompt_tokens >= 0);
    request::set_completion_bound(api, &mut json, 256);
    request::ask_for_stream_usage(api, &mut json);
    let written = serde_json::to_vec(&json).expect("a parsed body is written back");
    let again = estimate::parse(&written).expect("a written body parses");
    estimate::estimate(api, &again, &RULES).expect("a written body estimates");
    let rewritten = serde_json::to_vec(&again).expect("a parsed body is written back");
    assert_eq!(rewritten, written, "writing a body back is not a fixed point");
});
