//! The request path in one canonical form (RFC 3986 section 6.2.2), the
//! form routes are matched on and the form the upstream is sent, so that the
//! route metered is the route the backend runs.
//!
//! Backends read a path after decoding it: Werkzeug, uvicorn and nginx
//! percent-decode every escape, and nginx also resolves `.` and `..` and
//! merges slashes. Routing on the path as sent would let `/%61pi/...`,
//! `//api/...` or `/x/../api/...` reach a metered handler through an
//! unmetered route. Once the path is normalized and forwarded so, nothing is
//! left for a backend to read differently, except the escapes that backends
//! disagree on, each an [`Ambiguity`].

use std::borrow::Cow;
use std::fmt;

/// What the gateway does with a path holding an [`Ambiguity`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AmbiguousPaths {
    /// Refuse it (400).
    #[default]
    Reject,
    /// Forward it with those escapes kept, routed as decoded.
    Forward,
}

/// Something in a path that backends read in different ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ambiguity {
    /// `%2F`: a slash to Werkzeug, uvicorn and nginx, part of a segment to
    /// Express and to RFC 3986.
    EncodedSlash,
    /// `%5C`: a separator to IIS and some servlet containers.
    EncodedBackslash,
    /// A raw `\`, which is not a URI character; some servers take it for `/`.
    Backslash,
    /// `%00`, which ends the path for code written in C.
    EncodedNul,
    /// A segment such as `%2e%2e`: `..` to nginx, a name to Express.
    EncodedDotSegment,
}

impl fmt::Display for Ambiguity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ambiguity::EncodedSlash => "an encoded slash (%2F)",
            Ambiguity::EncodedBackslash => "an encoded backslash (%5C)",
            Ambiguity::Backslash => "a backslash",
            Ambiguity::EncodedNul => "an encoded NUL (%00)",
            Ambiguity::EncodedDotSegment => "an encoded dot segment (%2E)",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path holds {0}, which backends read in different ways; send the path without it")]
    Ambiguous(Ambiguity),
    #[error("the path holds a `%` that is not followed by two hex digits")]
    BadEscape,
}

/// A path in canonical form.
#[derive(Debug, PartialEq, Eq)]
pub struct Normal<'a> {
    /// What the upstream is sent; borrowed when the path was normal already.
    pub forwarded: Cow<'a, str>,
    /// What routes are matched on, where that is not `forwarded`: under
    /// [`AmbiguousPaths::Forward`], the path with its ambiguous escapes decoded.
    routed: Option<String>,
}

impl Normal<'_> {
    pub fn routed(&self) -> &str {
        self.routed.as_deref().unwrap_or(&self.forwarded)
    }
}

/// `path` with its unreserved escapes (`ALPHA DIGIT - . _ ~`) decoded, every
/// other escape's hex in upper case, `.` and `..` segments removed (RFC 3986
/// section 5.2.4, a trailing slash kept) and repeated slashes merged; an
/// [`Ambiguity`] refused or kept as `ambiguous` says.
pub fn normalize(path: &str, ambiguous: AmbiguousPaths) -> Result<Normal<'_>, PathError> {
    // One not starting with `/` is `*` or a CONNECT's authority, which no
    // route matches: it stays as it is.
    if !path.starts_with('/') {
        return Ok(Normal {
            forwarded: Cow::Borrowed(path),
            routed: None,
        });
    }
    let forwarded = if is_normal(path.as_bytes(), ambiguous) {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(resolve(path, ambiguous)?)
    };
    let routed = match ambiguous {
        AmbiguousPaths::Reject => None,
        AmbiguousPaths::Forward => match decode_ambiguous(&forwarded) {
            Some(decoded) => Some(resolve(&decoded, AmbiguousPaths::Forward)?),
            None => None,
        },
    };
    Ok(Normal { forwarded, routed })
}

/// The bytes [`is_normal`] looks at; any other leaves a path as it is.
const NOTABLE: [bool; 256] = {
    let mut notable = [false; 256];
    notable[b'/' as usize] = true;
    notable[b'%' as usize] = true;
    notable[b'\\' as usize] = true;
    notable[b'.' as usize] = true;
    notable
};

/// Whether [`resolve`] would leave `path` as it is: the fast path, which
/// nearly every request takes, and which allocates nothing. One pass over
/// the bytes, a table telling the few that need a look: a path is tens of
/// bytes, where memchr's and memmem's searchers cost more to start than
/// this loop to finish (case 3's `/unmetered`: the route step took some
/// 1,230 instructions a request with them, 940 with a loop that matched
/// every byte, and 890 this way, under callgrind).
fn is_normal(path: &[u8], ambiguous: AmbiguousPaths) -> bool {
    let keeps_ambiguous = ambiguous == AmbiguousPaths::Forward;
    let mut notable = path
        .iter()
        .enumerate()
        .filter(|&(_, &byte)| NOTABLE[usize::from(byte)]);
    notable.all(|(at, &byte)| match byte {
        b'/' => path.get(at + 1) != Some(&b'/'),
        b'%' => escape_at(path, at).is_some_and(|value| {
            (stays_escaped(value) || keeps_ambiguous && ambiguity_of(value).is_some())
                && is_upper_hex(&path[at + 1..at + 3])
        }),
        b'\\' => keeps_ambiguous,
        _ => !(at > 0 && path[at - 1] == b'/' && is_dot_segment(&path[at..])),
    })
}

/// Whether the segment that `rest`, starting with a `.`, begins is `.` or `..`.
fn is_dot_segment(rest: &[u8]) -> bool {
    matches!(
        rest,
        [b'.'] | [b'.', b'/', ..] | [b'.', b'.'] | [b'.', b'.', b'/', ..]
    )
}

/// The normal form of `path`, which starts with `/`.
fn resolve(path: &str, ambiguous: AmbiguousPaths) -> Result<String, PathError> {
    // Holds the segments kept so far, each after its `/`.
    let mut out = String::with_capacity(path.len());
    let mut trailing_slash = false;
    let mut segments = path.strip_prefix('/').unwrap_or(path).split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        let start = out.len();
        out.push('/');
        let escaped = push_segment(&mut out, segment, ambiguous)?;
        let decoded = &out[start + 1..];
        let dots = matches!(decoded, "." | "..");
        if dots && escaped {
            refuse_or_keep(ambiguous, Ambiguity::EncodedDotSegment)?;
        }
        if !dots && !decoded.is_empty() {
            trailing_slash = false;
            continue;
        }
        // `..` takes the segment before it away too.
        let end = match decoded {
            ".." => out[..start].rfind('/').unwrap_or(0),
            _ => start,
        };
        out.truncate(end);
        trailing_slash = last;
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

/// Appends `segment` to `out` with its unreserved escapes decoded and the
/// others in upper case; whether it held an escape.
fn push_segment(
    out: &mut String,
    segment: &str,
    ambiguous: AmbiguousPaths,
) -> Result<bool, PathError> {
    let bytes = segment.as_bytes();
    let mut escaped = false;
    let mut from = 0;
    while let Some(at) = memchr::memchr2(b'%', b'\\', &bytes[from..]).map(|n| from + n) {
        out.push_str(&segment[from..at]);
        if bytes[at] == b'\\' {
            refuse_or_keep(ambiguous, Ambiguity::Backslash)?;
            out.push('\\');
            from = at + 1;
            continue;
        }
        let value = escape_at(bytes, at).ok_or(PathError::BadEscape)?;
        escaped = true;
        if is_unreserved(value) {
            out.push(char::from(value));
        } else {
            if let Some(ambiguity) = ambiguity_of(value) {
                refuse_or_keep(ambiguous, ambiguity)?;
            }
            push_escape(out, value);
        }
        from = at + 3;
    }
    out.push_str(&segment[from..]);
    Ok(escaped)
}

fn refuse_or_keep(ambiguous: AmbiguousPaths, ambiguity: Ambiguity) -> Result<(), PathError> {
    match ambiguous {
        AmbiguousPaths::Reject => Err(PathError::Ambiguous(ambiguity)),
        AmbiguousPaths::Forward => Ok(()),
    }
}

/// A normal path with `%2F`, `%5C` and `%00` decoded, the reading of the
/// backends that decode every escape; `None` when it holds none of them.
fn decode_ambiguous(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let holds = |at: &usize| escape_at(bytes, *at).is_some_and(|v| ambiguity_of(v).is_some());
    let first = memchr::memchr_iter(b'%', bytes).find(holds)?;
    let mut out = String::with_capacity(path.len());
    let mut from = 0;
    for at in memchr::memchr_iter(b'%', &bytes[first..]).map(|n| first + n) {
        if let Some(value) = escape_at(bytes, at).filter(|&v| ambiguity_of(v).is_some()) {
            out.push_str(&path[from..at]);
            out.push(char::from(value));
            from = at + 3;
        }
    }
    out.push_str(&path[from..]);
    Some(out)
}

/// The byte that the escape at `at` (a `%`) stands for.
fn escape_at(bytes: &[u8], at: usize) -> Option<u8> {
    let hex = |i: usize| char::from(*bytes.get(i)?).to_digit(16);
    let value = hex(at + 1)? * 16 + hex(at + 2)?;
    u8::try_from(value).ok()
}

fn is_upper_hex(digits: &[u8]) -> bool {
    digits
        .iter()
        .all(|d| d.is_ascii_digit() || (b'A'..=b'F').contains(d))
}

fn push_escape(out: &mut String, value: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(value >> 4)]));
    out.push(char::from(HEX[usize::from(value & 0xF)]));
}

/// RFC 3986's unreserved characters, whose escapes mean the character itself.
fn is_unreserved(value: u8) -> bool {
    value.is_ascii_alphanumeric() || matches!(value, b'-' | b'.' | b'_' | b'~')
}

fn ambiguity_of(value: u8) -> Option<Ambiguity> {
    match value {
        b'/' => Some(Ambiguity::EncodedSlash),
        b'\\' => Some(Ambiguity::EncodedBackslash),
        0 => Some(Ambiguity::EncodedNul),
        _ => None,
    }
}

/// Whether an escape of `value` is in its normal form whatever the mode.
fn stays_escaped(value: u8) -> bool {
    !is_unreserved(value) && ambiguity_of(value).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_not_starting_with_a_slash_is_left_as_it_is_under_either_rule() {
        for rule in [AmbiguousPaths::Reject, AmbiguousPaths::Forward] {
            for path in ["*", "", "\u{45c}%2F", "example.com:443"] {
                let normal = normalize(path, rule).unwrap();
                assert_eq!((&*normal.forwarded, normal.routed()), (path, path));
            }
        }
    }
    use proptest::prelude::*;

    fn normal(path: &str) -> Result<String, PathError> {
        normalize(path, AmbiguousPaths::Reject).map(|n| n.forwarded.into_owned())
    }

    #[test]
    fn an_already_normal_path_is_returned_as_it_is_without_allocating() {
        for path in [
            "/",
            "/api/v1/playbooks/pb_1/execute",
            "/a/b/",
            "/a%20b/%C3%A9",
            "/...",
            "/a.b/.c/..d",
            "*",
            "",
        ] {
            let normal = normalize(path, AmbiguousPaths::Reject).unwrap();
            assert!(
                matches!(normal.forwarded, Cow::Borrowed(p) if p == path),
                "{path}"
            );
            assert_eq!(normal.routed(), path);
        }
    }

    #[test]
    fn escaped_unreserved_characters_are_decoded_and_other_escapes_uppercased() {
        assert_eq!(
            normal("/%61pi/pb1/%65xecut%65").unwrap(),
            "/api/pb1/execute"
        );
        assert_eq!(normal("/%41%5a%30%2D%2e%5F%7e").unwrap(), "/AZ0-._~");
        assert_eq!(normal("/a%20b/%c3%a9/%3f").unwrap(), "/a%20b/%C3%A9/%3F");
        // Decoded once: `%2541` is an escaped `%` followed by `41`.
        assert_eq!(normal("/%2541").unwrap(), "/%2541");
    }

    #[test]
    fn dot_segments_are_removed_and_repeated_slashes_merged() {
        for (path, expected) in [
            ("//api/v1", "/api/v1"),
            ("/api/v1//playbooks///x", "/api/v1/playbooks/x"),
            ("/./api/./v1", "/api/v1"),
            ("/x/../api", "/api"),
            ("/a/b/../../../c", "/c"),
            ("/..", "/"),
            ("//", "/"),
            ("/a/.", "/a/"),
            ("/a/b/..", "/a/"),
            ("/a//", "/a/"),
        ] {
            assert_eq!(normal(path).unwrap(), expected, "{path}");
        }
    }

    #[test]
    fn a_trailing_slash_is_kept() {
        assert_eq!(normal("/api/v1/x/").unwrap(), "/api/v1/x/");
        assert_eq!(normal("/api//v1/x//").unwrap(), "/api/v1/x/");
    }

    #[test]
    fn encodings_that_backends_read_differently_are_refused() {
        for (path, ambiguity) in [
            ("/playbooks/pb1%2Fexecute", Ambiguity::EncodedSlash),
            ("/playbooks/pb1%2fexecute", Ambiguity::EncodedSlash),
            ("/playbooks/pb1%5Cexecute", Ambiguity::EncodedBackslash),
            ("/playbooks/pb1\\execute", Ambiguity::Backslash),
            ("/playbooks/pb1%00", Ambiguity::EncodedNul),
            ("/x/%2e%2e/playbooks", Ambiguity::EncodedDotSegment),
            ("/x/.%2E/playbooks", Ambiguity::EncodedDotSegment),
            ("/%2e/playbooks", Ambiguity::EncodedDotSegment),
        ] {
            assert_eq!(normal(path), Err(PathError::Ambiguous(ambiguity)), "{path}");
        }
    }

    #[test]
    fn a_percent_sign_without_two_hex_digits_is_refused() {
        for path in ["/100%", "/a%2", "/a%zz", "/a%%41"] {
            assert_eq!(normal(path), Err(PathError::BadEscape), "{path}");
        }
    }

    #[test]
    fn forwarded_ambiguous_escapes_are_kept_and_routed_as_decoded() {
        let normal = normalize("/files/a%2fb/./c", AmbiguousPaths::Forward).unwrap();
        assert_eq!(normal.forwarded, "/files/a%2Fb/c");
        assert_eq!(normal.routed(), "/files/a/b/c");

        let normal = normalize("/a/..%2F..%2Fplaybooks", AmbiguousPaths::Forward).unwrap();
        assert_eq!(normal.forwarded, "/a/..%2F..%2Fplaybooks");
        assert_eq!(normal.routed(), "/playbooks");

        // A backslash is a character to the backends that decode.
        let normal = normalize("/a\\b%5c", AmbiguousPaths::Forward).unwrap();
        assert_eq!(normal.forwarded, "/a\\b%5C");
        assert_eq!(normal.routed(), "/a\\b\\");
    }

    #[test]
    fn forwarded_encoded_dot_segments_are_resolved_like_any_dot_segment() {
        let normal = normalize("/x/%2e%2e/api/%2E/v1", AmbiguousPaths::Forward).unwrap();
        assert_eq!(normal.forwarded, "/api/v1");
        assert_eq!(normal.routed(), "/api/v1");
    }

    /// Pieces of hostile and ordinary paths.
    const PIECES: &[&str] = &[
        "/", "//", ".", "..", "a", "B", "pb1", "execute", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C",
        "%00", "%41", "%61", "%7e", "%7E", "%20", "%25", "%c3%a9", "é", "%zz", "%", "\\", "~", "-",
        "_", ";", "%3b",
    ];

    fn paths() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(PIECES), 0..14)
            .prop_map(|pieces| format!("/{}", pieces.concat()))
    }

    fn modes() -> impl Strategy<Value = AmbiguousPaths> {
        prop_oneof![Just(AmbiguousPaths::Reject), Just(AmbiguousPaths::Forward)]
    }

    /// What nginx matches a path on: every escape decoded, then dot
    /// segments resolved and slashes merged.
    fn nginx_reading(path: &str) -> Vec<u8> {
        let bytes = path.as_bytes();
        let mut decoded = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            match escape_at(bytes, at).filter(|_| bytes[at] == b'%') {
                Some(value) => {
                    decoded.push(value);
                    at += 3;
                }
                None => {
                    decoded.push(bytes[at]);
                    at += 1;
                }
            }
        }
        let mut kept: Vec<&[u8]> = Vec::new();
        let segments: Vec<&[u8]> = decoded.split(|&b| b == b'/').skip(1).collect();
        for segment in &segments {
            match *segment {
                b"" | b"." => {}
                b".." => {
                    kept.pop();
                }
                other => kept.push(other),
            }
        }
        let mut out = Vec::new();
        for segment in &kept {
            out.push(b'/');
            out.extend_from_slice(segment);
        }
        let trailing = matches!(segments.last(), Some(&(b"" | b"." | b"..")));
        if out.is_empty() || trailing {
            out.push(b'/');
        }
        out
    }

    proptest! {
        #[test]
        fn normalizing_twice_changes_nothing_and_allocates_nothing(path in paths(), mode in modes()) {
            if let Ok(once) = normalize(&path, mode) {
                let twice = normalize(&once.forwarded, mode).unwrap();
                prop_assert!(matches!(twice.forwarded, Cow::Borrowed(_)), "{path} -> {}", once.forwarded);
                prop_assert_eq!(twice.routed(), once.routed());
            }
        }

        #[test]
        fn a_normal_path_has_no_empty_or_dot_segment_and_no_escaped_unreserved_character(
            path in paths(),
            mode in modes(),
        ) {
            let Ok(normal) = normalize(&path, mode) else { return Ok(()) };
            for form in [&*normal.forwarded, normal.routed()] {
                prop_assert!(!form.contains("//"), "{path} -> {form}");
                let segments: Vec<&str> = form.split('/').collect();
                prop_assert!(!segments.iter().any(|s| *s == "." || *s == ".."), "{path} -> {form}");
                let bytes = form.as_bytes();
                for at in memchr::memchr_iter(b'%', bytes) {
                    let value = escape_at(bytes, at);
                    prop_assert!(value.is_some_and(|v| !is_unreserved(v)), "{path} -> {form}");
                    prop_assert!(is_upper_hex(&bytes[at + 1..at + 3]), "{path} -> {form}");
                }
            }
            if mode == AmbiguousPaths::Reject {
                prop_assert!(normal.routed.is_none());
                prop_assert!(decode_ambiguous(&normal.forwarded).is_none(), "{path}");
                prop_assert!(!normal.forwarded.contains('\\'), "{path}");
            }
        }

        #[test]
        fn the_fast_path_passes_only_paths_the_full_normalizer_keeps(path in paths(), mode in modes()) {
            if is_normal(path.as_bytes(), mode) {
                prop_assert_eq!(resolve(&path, mode), Ok(path.clone()));
            }
        }

        #[test]
        fn a_backend_that_decodes_everything_runs_the_path_that_was_routed(
            path in paths(),
            mode in modes(),
        ) {
            let Ok(normal) = normalize(&path, mode) else { return Ok(()) };
            let runs = nginx_reading(&normal.forwarded);
            prop_assert_eq!(&nginx_reading(normal.routed()), &runs, "{} -> {}", path, normal.routed());
            // Without the escapes that backends disagree on, normalizing
            // changes nothing such a backend can see.
            if mode == AmbiguousPaths::Reject {
                prop_assert_eq!(&nginx_reading(&path), &runs, "{} -> {}", path, normal.forwarded);
            }
        }
    }
}
