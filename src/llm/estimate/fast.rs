//! The estimate's pass over the bodies clients send, written by hand.
//!
//! [`super::pass`] spends most of its time in serde_json's string parser,
//! which looks at the bytes of a string three times (for its end, for
//! UTF-8, then to count its characters): 8,800 instructions for the load
//! benchmark's 1 KB chat body (case 16). Here a string's end is found by
//! `memchr` and its characters are counted in the same look that checks
//! them: 4,600 (the whole request, 94,710 against 89,525; case 6, with a
//! 4 KB body, 117,558 against 101,478).
//!
//! It reads only what it is sure of: integers, strings (with escapes, but
//! not in a key or a block's `type`), the literals, nesting to a depth of
//! 100. On anything else, valid or not, it gives up, and `pass` reads the
//! body, so that a refusal is always serde_json's, word for word. What it
//! does read, it reads exactly as `pass` does: the tests compare the two.

use super::pass::{AMOUNT_KEYS, Found};
use super::{IMAGE_TYPES, Piece, is_label, is_schema, is_setting, text_tokens};
use crate::llm::json::Json;

/// Reads `body` as [`super::pass::read`] does; `None` where it gives up.
pub(super) fn read(body: &[u8], image_tokens: i64) -> Option<Found<'static>> {
    let mut scanner = Scanner {
        bytes: body,
        at: 0,
        depth: 0,
        image_tokens,
    };
    scanner.space();
    let found = scanner.top()?;
    scanner.space();
    (scanner.at == body.len()).then_some(found)
}

/// Deeper than this, serde_json's limit (128) is near: given up.
const MAX_DEPTH: usize = 100;

struct Scanner<'a> {
    bytes: &'a [u8],
    at: usize,
    depth: usize,
    image_tokens: i64,
}

/// A string as read.
struct Text<'a> {
    /// Its bytes between the quotes.
    raw: &'a [u8],
    /// It has no escapes: `raw` is its text.
    plain: bool,
    chars: usize,
    /// Its characters as serde_json writes it, quotes included.
    compact: usize,
}

impl<'a> Text<'a> {
    /// The text's bytes, where they may be compared to a name's.
    fn name(&self) -> Option<&'a [u8]> {
        self.plain.then_some(self.raw)
    }
}

enum Scalar<'a> {
    Null,
    Bool(bool),
    /// An integer, and the characters of its literal (which are serde_json's).
    Integer(i64, usize),
    Text(Text<'a>),
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn space(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    fn top(&mut self) -> Option<Found<'static>> {
        let mut found = Found::default();
        self.members(|s, key| {
            let key = key.name()?;
            if let Some(slot) = AMOUNT_KEYS.iter().position(|k| k.as_bytes() == key) {
                found.amounts[slot] = Some(s.amount()?);
                return Some(());
            }
            let tokens = match key {
                b"stream" => {
                    found.streams = s.is_true()?;
                    0
                }
                b"stream_options" => {
                    found.usage_asked = s.usage_asked()?;
                    0
                }
                key if is_setting(key) => s.skip().map(|()| 0)?,
                key if is_schema(key) => text_tokens(s.compact(true)?),
                _ => s.prompt(false)?,
            };
            found.prompt_tokens = found.prompt_tokens.saturating_add(tokens);
            Some(())
        })?;
        Some(found)
    }

    /// The members of the object here, each value left to `member`.
    fn members(
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
    fn items(&mut self, item: impl FnMut(&mut Self) -> Option<()>) -> Option<usize> {
        self.eat(b'[')?;
        self.listed(b']', item)
    }

    /// After an opening bracket: entries, each read by `entry`, separated
    /// by commas up to `close`; how many there were.
    fn listed(
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

    fn nest(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    fn scalar(&mut self) -> Option<Scalar<'a>> {
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
    fn integer(&mut self) -> Option<Scalar<'a>> {
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
    fn string(&mut self) -> Option<Text<'a>> {
        let start = self.at;
        let (mut chars, mut escapes) = (0usize, 0usize);
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

    fn skip(&mut self) -> Option<()> {
        match self.peek()? {
            b'[' => self.items(Self::skip).map(drop),
            b'{' => self.members(|s, _| s.skip()).map(drop),
            _ => self.scalar().map(drop),
        }
    }

    /// Whether the value here is `true`.
    fn is_true(&mut self) -> Option<bool> {
        match self.peek()? {
            b't' => self.scalar().map(|_| true),
            _ => self.skip().map(|()| false),
        }
    }

    /// A bound or choice count: an integer or null, else given up (the
    /// refusal quotes it, as `pass` reads it).
    fn amount(&mut self) -> Option<Json<'static>> {
        match self.scalar()? {
            Scalar::Null => Some(Json::Null),
            Scalar::Integer(n, _) => Some(Json::Number(n.into())),
            _ => None,
        }
    }

    /// Whether `stream_options` here is an object whose last
    /// `include_usage` is `true`.
    fn usage_asked(&mut self) -> Option<bool> {
        if self.peek()? != b'{' {
            return self.skip().map(|()| false);
        }
        let mut asked = false;
        self.members(|s, key| {
            if key.name()? == b"include_usage" {
                asked = s.is_true()?;
                Some(())
            } else {
                s.skip()
            }
        })?;
        Some(asked)
    }

    /// As `pass::Prompt`.
    fn prompt(&mut self, in_list: bool) -> Option<i64> {
        match self.peek()? {
            b'[' => {
                let mut tokens = 0i64;
                self.items(|s| {
                    tokens = tokens.saturating_add(s.prompt(true)?);
                    Some(())
                })?;
                Some(tokens)
            }
            b'{' => Some(self.block()?.tokens(self.image_tokens)),
            _ => Some(match self.scalar()? {
                Scalar::Integer(..) if in_list => 1,
                Scalar::Text(text) => text_tokens(text.chars),
                _ => 0,
            }),
        }
    }

    /// As `pass::PieceOf`.
    fn piece(&mut self, input: bool) -> Option<Piece> {
        match self.peek()? {
            b'[' => {
                let mut piece = Piece::default();
                self.items(|s| {
                    piece.add(s.piece(false)?);
                    Some(())
                })?;
                Some(piece)
            }
            b'{' if input => Some(Piece {
                chars: self.compact(false)?,
                images: 0,
            }),
            b'{' => self.block(),
            _ => Some(match self.scalar()? {
                Scalar::Text(text) => Piece {
                    chars: text.chars,
                    images: 0,
                },
                _ => Piece::default(),
            }),
        }
    }

    /// A block of prompt: its members' text, or one image.
    fn block(&mut self) -> Option<Piece> {
        let mut piece = Piece::default();
        let mut image = false;
        self.members(|s, key| {
            match key.name()? {
                b"type" => image = s.is_image()?,
                label if is_label(label) => s.skip()?,
                member => piece.add(s.piece(member == b"input")?),
            }
            Some(())
        })?;
        Some(if image {
            Piece {
                chars: 0,
                images: 1,
            }
        } else {
            piece
        })
    }

    fn is_image(&mut self) -> Option<bool> {
        match self.peek()? {
            b'"' => match self.scalar()? {
                Scalar::Text(kind) => {
                    let kind = kind.name()?;
                    Some(IMAGE_TYPES.iter().any(|image| image.as_bytes() == kind))
                }
                _ => None,
            },
            _ => self.skip().map(|()| false),
        }
    }

    /// As `pass::Compact`.
    fn compact(&mut self, top: bool) -> Option<usize> {
        let mut chars = 0usize;
        let count = match self.peek()? {
            b'[' => self.items(|s| {
                chars = chars.saturating_add(s.compact(false)?);
                Some(())
            })?,
            b'{' => self.members(|s, key| {
                let value = s.compact(false)?;
                chars = chars.saturating_add(key.compact + 1 + value);
                Some(())
            })?,
            _ => {
                return Some(match self.scalar()? {
                    Scalar::Null if top => 0,
                    Scalar::Null | Scalar::Bool(true) => 4,
                    Scalar::Bool(false) => 5,
                    Scalar::Integer(_, length) => length,
                    Scalar::Text(text) => text.compact,
                });
            }
        };
        // Brackets or braces, and commas.
        Some(chars.saturating_add(2 + count.saturating_sub(1)))
    }
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
    let mut last = [b' '; 8];
    last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    take(u64::from_le_bytes(last));
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
