//! Any bytes as a request path, under both ambiguity rules: normalizing
//! never panics, is idempotent, and what it forwards holds no empty or dot
//! segment and no escaped unreserved character.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::route::path::{AmbiguousPaths, normalize};

fuzz_target!(|input: (bool, &str)| {
    let (forward, path) = input;
    let rule = if forward {
        AmbiguousPaths::Forward
    } else {
        AmbiguousPaths::Reject
    };
    let Ok(normal) = normalize(path, rule) else {
        return;
    };
    let once = normal.forwarded.to_string();
    let twice = normalize(&once, rule).expect("a normal path normalizes");
    assert_eq!(twice.forwarded, once, "not idempotent");
    if once.starts_with('/') {
        let inner = once[1..].strip_suffix('/').unwrap_or(&once[1..]);
        for segment in inner.split('/').filter(|_| !inner.is_empty()) {
            assert!(!segment.is_empty(), "an empty segment in {once:?}");
            assert!(segment != "." && segment != "..", "a dot segment in {once:?}");
        }
        let bytes = once.as_bytes();
        for at in memchr_iter(bytes) {
            let hex = bytes.get(at + 1..at + 3).and_then(|h| std::str::from_utf8(h).ok());
            let decoded = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
            assert!(
                !decoded.is_some_and(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)),
                "an escaped unreserved character in {once:?}"
            );
        }
    }
});

fn memchr_iter(bytes: &[u8]) -> impl Iterator<Item = usize> + '_ {
    bytes.iter().enumerate().filter(|&(_, &b)| b == b'%').map(|(i, _)| i)
}
