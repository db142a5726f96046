//! A pass over JSON bytes written by hand, for the estimate's pass over a
//! request body ([`super::estimate`]) and the usage of a JSON answer
//! ([`super::usage`]): the readers build no tree and copy nothing.
//!
//! It reads only what it is sure of: integers, strings (a key with escapes
//! has no [`Text::name`]), the literals, nesting to a depth of 100. On
//! anything else, valid or not, it gives up (`None`), and its caller reads
//! the body with serde_json, so that a refusal is always serde_json's, word
//! for word. What it does read, it reads exactly as serde_json does: the
//! callers' tests compare the two.

/// Of a string, this many bytes are looked at a word at a time before the
/// runs take over.
const SHORT_STRING: usize = 32;

/// Deeper than this, serde_json's limit (128) is near: given up.
const MAX_DEPTH: usize = 100;

pub(super) struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
    depth: usize,
}

/// A string as read.
pub(super) struct Text<'a> {
    /// Its bytes between the quotes.
    pub(super) raw: &'a [u8],
    /// It has no escapes: `raw` is its text.
    pub(super) plain: bool,
    pub(super) chars: usize,
    /// Its characters as serde_json writes it, quotes included.
    pub(super) compact: usize,
}

impl<'a> Text<'a> {
    /// The text's bytes, where they may be compared to a name's.
    pub(super) fn name(&self) -> Option<&'a [u8]> {
        self.plain.then_some(self.raw)
    }
}

pub(super) enum Scalar<'a> {
    Null,
    Bool(bool),
    /// An integer, and the characters of its literal (which are serde_json's).
    Integer(i64, usize),
    Text(Text<'a>),
}

impl<'a> Scanner<'a> {
    /// Reads all of `body` with `read`, which starts at its first value:
    /// `None` if `read` gives up or bytes other than white space follow.
    pub(super) fn whole<T>(body: &'a [u8], read: impl FnOnce(&mut Self) -> Option<T>) -> Option<T> {
        let mut scanner = Scanner {
            bytes: body,
            at: 0,
            depth: 0,
        };
        scanner.space();
        let read = read(&mut scanner)?;
        scanner.space();
        (scanner.at == body.len()).then_some(read)
    }

    pub(super) fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    pub(super) fn space(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.at += 1;
        }
    }

    pub(super) fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// The members of the object here, each value left to `member`.
    pub(super) fn members(
        &mut self,
        mut member: impl FnMut(&mut Self, Text<'a>) -> Option<()>,
    ) -> Option<usize> {
        self.eat(b'{')?;
        self.listed(b'}', |s| {
            s.eat(b'"')?;
            let key = s.string()?;
            s.space();
            s.eat(b':')?;
            s.space();
            member(s, key)
        })
    }

    /// The items of the array here, each left to `item`.
    pub(super) fn items(&mut self, item: impl FnMut(&mut Self) -> Option<()>) -> Option<usize> {
        self.eat(b'[')?;
        self.listed(b']', item)
    }

    /// After an opening bracket: entries, each read by `entry`, separated
    /// by commas up to `close`; how many there were.
    pub(super) fn listed(
        &mut self,
        close: u8,
        mut entry: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<usize> {
        self.nest()?;
        self.space();
        let mut count = 0;
        if self.eat(close).is_none() {
            loop {
                entry(self)?;
                count += 1;
                self.space();
                match self.peek()? {
                    b',' => {
                        self.at += 1;
                        self.space();
                    }
                    byte if byte == close => {
                        self.at += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        self.depth -= 1;
        Some(count)
    }

    pub(super) fn nest(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    pub(super) fn scalar(&mut self) -> Option<Scalar<'a>> {
        let literal = |s: &mut Self, text: &[u8], value| {
            let end = s.at + text.len();
            (s.bytes.get(s.at..end)? == text).then(|| {
                s.at = end;
                value
            })
        };
        match self.peek()? {
            b'"' => {
                self.at += 1;
                self.string().map(Scalar::Text)
            }
            b'n' => literal(self, b"null", Scalar::Null),
            b't' => literal(self, b"true", Scalar::Bool(true)),
            b'f' => literal(self, b"false", Scalar::Bool(false)),
            b'-' | b'0'..=b'9' => self.integer(),
            _ => None,
        }
    }

    /// An integer of at most 18 digits, not `-0` (which serde_json reads
    /// as a float); a fraction or exponent gives up.
    pub(super) fn integer(&mut self) -> Option<Scalar<'a>> {
        let start = self.at;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.at += 1;
        }
        let digits_at = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        let digits = &self.bytes[digits_at..self.at];
        let leading_zero = digits.first() == Some(&b'0');
        if digits.is_empty()
            || digits.len() > 18
            || (leading_zero && (digits.len() > 1 || negative))
            || matches!(self.peek(), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        // At most 18 digits: no overflow.
        let magnitude = digits
            .iter()
            .fold(0i64, |n, digit| n * 10 + i64::from(digit - b'0'));
        let value = if negative { -magnitude } else { magnitude };
        Some(Scalar::Integer(value, self.at - start))
    }

    /// The string after its opening quote, through its closing one.
    pub(super) fn string(&mut self) -> Option<Text<'a>> {
        // Most strings are keys and names, short and ASCII: looked at eight
        // bytes at a time, they end before memchr's set-up would, at about
        // 2.5 instructions a byte (a byte loop took 9, memchr and the count
        // 60 to set up). A string longer than a few words, or with anything
        // but plain ASCII, goes on to the runs.
        let start = self.at;
        let mut at = start;
        while at - start < SHORT_STRING
            && let Some(&word) = self
                .bytes
                .get(at..)
                .and_then(|rest| rest.first_chunk::<8>())
        {
            let special = special_bytes(u64::from_le_bytes(word));
            if special == 0 {
                at += 8;
                continue;
            }
            let end = at + (special.trailing_zeros() / 8) as usize;
            if self.bytes[end] != b'"' {
                break;
            }
            self.at = end + 1;
            let length = end - start;
            return Some(Text {
                raw: &self.bytes[start..end],
                plain: true,
                chars: length,
                compact: length + 2,
            });
        }
        self.long_string(start, at)
    }

    /// [`Self::string`] for any string, of which the plain ASCII from
    /// `start` to `at` was read: runs found by memchr, their characters
    /// counted eight bytes at a time. Kept out of line, so that the short
    /// strings' path saves no registers it does not use.
    #[inline(never)]
    fn long_string(&mut self, start: usize, at: usize) -> Option<Text<'a>> {
        self.at = at;
        let (mut chars, mut escapes) = (at - start, 0usize);
        let mut plain = true;
        loop {
            let rest = &self.bytes[self.at..];
            let run = memchr::memchr2(b'"', b'\\', rest)?;
            chars += run_chars(&rest[..run])?;
            self.at += run;
            if self.bytes[self.at] == b'"' {
                self.at += 1;
                break;
            }
            plain = false;
            let (length, written) = escape(self.bytes.get(self.at + 1..)?)?;
            self.at += length;
            chars += 1;
            escapes += written - 1;
        }
        Some(Text {
            raw: &self.bytes[start..self.at - 1],
            plain,
            chars,
            compact: chars + escapes + 2,
        })
    }

    pub(super) fn skip(&mut self) -> Option<()> {
        match self.peek()? {
            b'[' => self.items(Self::skip).map(drop),
            b'{' => self.members(|s, _| s.skip()).map(drop),
            _ => self.scalar().map(drop),
        }
    }

    /// Whether the value here is `true`.
    pub(super) fn is_true(&mut self) -> Option<bool> {
        match self.peek()? {
            b't' => self.scalar().map(|_| true),
            _ => self.skip().map(|()| false),
        }
    }
}

/// A word of string bytes with the high bit of each byte that is a quote,
/// a backslash, a control character or not ASCII set; of those, the lowest
/// is exact (a borrow can only mark a byte above one that is marked).
fn special_bytes(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |w: u64| w.wrapping_sub(ONES) & !w;
    let quote = zero_byte(word ^ (ONES * u64::from(b'"')));
    let backslash = zero_byte(word ^ (ONES * u64::from(b'\\')));
    let control = word.wrapping_sub(ONES * 0x20) & !word;
    (quote | backslash | control | word) & HIGH
}

/// The characters of a run of string bytes with no quote or backslash;
/// `None` if it holds a control character or is not UTF-8.
fn run_chars(run: &[u8]) -> Option<usize> {
    // Eight bytes at a time: a byte's high bit says it is not ASCII, and
    // subtracting 0x20 from each byte borrows from the high bit of the
    // first one below 0x20 (a borrow out of a byte that is not below 0x20
    // only follows one that is). A byte at a time cost 2.2 instructions a
    // byte.
    const SPACES: u64 = 0x2020_2020_2020_2020;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let (mut high, mut control) = (0u64, 0u64);
    let mut take = |word: u64| {
        high |= word;
        control |= word.wrapping_sub(SPACES) & !word;
    };
    let mut chunks = run.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        take(u64::from_le_bytes(word));
    }
    // The last few a byte at a time: a copy into a word would call memcpy.
    let mut last = u64::from_le_bytes([b' '; 8]);
    for (i, &byte) in chunks.remainder().iter().enumerate() {
        last = (last & !(0xFF << (8 * i))) | (u64::from(byte) << (8 * i));
    }
    take(last);
    if control & HIGH != 0 {
        return None;
    }
    if high & HIGH == 0 {
        return Some(run.len());
    }
    std::str::from_utf8(run)
        .ok()
        .map(|text| text.chars().count())
}

/// The escape after a backslash: the bytes it takes, backslash included,
/// and the characters serde_json writes for what it stands for. A `\u`
/// escape of a surrogate gives up.
fn escape(after: &[u8]) -> Option<(usize, usize)> {
    let code = match *after.first()? {
        b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't' => return Some((2, 2)),
        b'/' => return Some((2, 1)),
        b'u' => {
            let hex = std::str::from_utf8(after.get(1..5)?).ok()?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            u32::from_str_radix(hex, 16).ok()?
        }
        _ => return None,
    };
    let written = match code {
        0xD800..=0xDFFF => return None,
        0x08 | 0x09 | 0x0A | 0x0C | 0x0D | 0x22 | 0x5C => 2,
        0x00..=0x1F => 6,
        _ => 1,
    };
    Some((6, written))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_special(byte: u8) -> bool {
        matches!(byte, b'"' | b'\\' | 0x00..=0x1F | 0x80..=0xFF)
    }

    #[test]
    fn the_word_test_finds_the_first_byte_that_ends_a_plain_run() {
        for first in 0..8 {
            for byte in 0..=255u8 {
                for later in [b'a', b'"', 0x00, 0xFF] {
                    let mut word = [b'a'; 8];
                    word[first] = byte;
                    if first < 7 {
                        word[first + 1..].fill(later);
                    }
                    let marked = special_bytes(u64::from_le_bytes(word));
                    let expected = word.iter().position(|&b| is_special(b));
                    let found = (marked != 0).then(|| (marked.trailing_zeros() / 8) as usize);
                    assert_eq!(found, expected, "{word:?}");
                }
            }
        }
    }

    #[test]
    fn strings_of_every_length_are_read_to_their_quote() {
        for length in 0..80 {
            for tail in ["", "}", ",\"k\":1}"] {
                let text = "x".repeat(length);
                let body = format!("\"{text}\"{tail}");
                let mut scanner = Scanner {
                    bytes: body.as_bytes(),
                    at: 1,
                    depth: 0,
                };
                let read = scanner.string().expect("a plain string");
                assert_eq!(
                    (read.raw, read.chars, read.compact),
                    (text.as_bytes(), length, length + 2)
                );
                assert!(read.plain);
                assert_eq!(scanner.at, length + 2);
                let escaped = format!("\"{text}\\n\u{e9}\"{tail}");
                let mut scanner = Scanner {
                    bytes: escaped.as_bytes(),
                    at: 1,
                    depth: 0,
                };
                let read = scanner.string().expect("a string with an escape");
                assert_eq!((read.chars, read.plain), (length + 2, false));
            }
        }
    }
}

/// Bodies for the callers' property tests: JSON written out by hand, so
/// that members may repeat, strings carry escapes and numbers take any form.
#[cfg(test)]
pub(super) mod arbitrary {
    use proptest::prelude::*;

    /// A JSON value, written out as text by [`write`]: members may repeat,
    /// strings may be written with escapes, numbers in any form.
    #[derive(Clone, Debug)]
    pub enum Node {
        Null,
        Bool(bool),
        Number(String),
        Text(String, bool),
        List(Vec<Node>),
        Object(Vec<(String, Node)>),
    }

    /// Mostly one of `keys`, else anything, escapes included.
    fn key(keys: Vec<&'static str>) -> impl Strategy<Value = String> {
        prop_oneof![
            4 => proptest::sample::select(keys).prop_map(str::to_owned),
            1 => "[a-z_\"\\\\\\x00-\\x1f\u{e9}\u{1F600}]{0,6}",
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(vec![
                "image",
                "image_url",
                "input_image",
                "text",
                "tool_use"
            ])
            .prop_map(str::to_owned),
            "[a-z \"\\\\\\x00-\\x1f\u{e9}\u{7f}\u{1F600}]{0,12}",
        ]
    }

    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => (-3i64..5000).prop_map(|n| n.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            1 => "-?(0|[1-9][0-9]{0,24})(\\.[0-9]{1,5})?([eE][+-]?[0-9]{1,3})?",
        ]
    }

    pub fn node(keys: Vec<&'static str>) -> impl Strategy<Value = Node> {
        let leaf = prop_oneof![
            Just(Node::Null),
            any::<bool>().prop_map(Node::Bool),
            number().prop_map(Node::Number),
            (text(), proptest::bool::weighted(0.2))
                .prop_map(|(text, escaped)| Node::Text(text, escaped)),
        ];
        leaf.prop_recursive(5, 48, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Node::List),
                proptest::collection::vec((key(keys.clone()), inner), 0..6).prop_map(Node::Object),
            ]
        })
    }

    /// A body: mostly an object, of `keys`.
    pub fn body(keys: Vec<&'static str>) -> impl Strategy<Value = Vec<u8>> {
        let object = proptest::collection::vec((key(keys.clone()), node(keys.clone())), 0..10)
            .prop_map(Node::Object);
        (prop_oneof![9 => object, 1 => node(keys)], any::<bool>()).prop_map(|(node, spaced)| {
            let mut out = String::new();
            write(&node, spaced, &mut out);
            out.into_bytes()
        })
    }

    fn write_text(text: &str, escaped: bool, out: &mut String) {
        if !escaped {
            out.push_str(&serde_json::to_string(text).unwrap());
            return;
        }
        out.push('"');
        for unit in text.encode_utf16() {
            out.push_str(&format!("\\u{unit:04x}"));
        }
        out.push('"');
    }

    pub fn write(node: &Node, spaced: bool, out: &mut String) {
        let gap = if spaced { " \n" } else { "" };
        match node {
            Node::Null => out.push_str("null"),
            Node::Bool(value) => out.push_str(&value.to_string()),
            Node::Number(number) => out.push_str(number),
            Node::Text(text, escaped) => write_text(text, *escaped, out),
            Node::List(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(gap);
                    write(item, spaced, out);
                }
                out.push(']');
            }
            Node::Object(members) => {
                out.push('{');
                for (i, (key, value)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    // Some keys with escapes, where the hand-written pass gives up.
                    write_text(key, spaced && key.len() % 4 == 1, out);
                    out.push(':');
                    out.push_str(gap);
                    write(value, spaced, out);
                }
                out.push('}');
            }
        }
    }

    /// A byte that breaks JSON where it lands.
    pub fn byte() -> impl Strategy<Value = u8> {
        proptest::sample::select(b"{}[],:\"\\ 0-e.xn\xff".to_vec())
    }

    /// `body` broken at `at`: cut there (`how` 0), `byte` put in (1), or
    /// put in place of the byte there.
    pub fn broken(mut body: Vec<u8>, at: prop::sample::Index, how: u8, byte: u8) -> Vec<u8> {
        let at = at.index(body.len() + 1);
        match how {
            0 => body.truncate(at),
            1 => body.insert(at, byte),
            _ if at < body.len() => body[at] = byte,
            _ => body.push(byte),
        }
        body
    }
}
