//! The estimate read straight off the body's bytes, with no tree.
//!
//! serde_json's parser drives visitors that apply the estimate's rules as
//! each value arrives, keeping only counts. Parsing the load benchmark's
//! 1 KB chat body (case 16) into a [`Json`] tree and walking it cost 9,900
//! instructions, this 8,800 (the whole request, 96,708 against 94,710).
//! [`super::fast`] reads most bodies for less; this pass reads the rest,
//! and gives every refusal.
//!
//! Every value goes through `deserialize_any`, as the tree's does, never
//! `IgnoredAny`: serde_json skips an ignored value without reading its
//! numbers or UTF-8 or counting its depth, which would let a body the tree
//! refuses through here. The two are compared on random bodies, valid and
//! not, in the tests.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Number;

use super::{IMAGE_TYPES, Piece, is_label, is_schema, is_setting, text_tokens};
use crate::llm::json::{Json, Skip};

/// The members read for the completion bound and the choices, in this
/// order: [`super::BOUND_KEYS`], then [`super::CHOICE_KEYS`].
pub(super) const AMOUNT_KEYS: [&str; 5] = [
    "max_completion_tokens",
    "max_tokens",
    "max_output_tokens",
    "n",
    "best_of",
];

/// What one pass over an object body found.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Found<'a> {
    pub prompt_tokens: i64,
    /// The last value of each of [`AMOUNT_KEYS`] the body names.
    pub amounts: [Option<Json<'a>>; 5],
    /// The last `stream` is `true`.
    pub streams: bool,
    /// The last `stream_options` is an object whose last `include_usage`
    /// is `true`.
    pub usage_asked: bool,
}

/// Reads `body`: `None` when it is valid JSON but not an object.
pub(super) fn read(body: &[u8], image_tokens: i64) -> serde_json::Result<Option<Found<'_>>> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let found = Top { image_tokens }.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(found)
}

/// A value that is neither an array nor an object.
enum Scalar<'s> {
    Null,
    Bool(bool),
    Number(Number),
    Text(&'s str),
}

/// A seed that hands its value to `deserialize_any`, itself the visitor.
macro_rules! seed {
    ($seed:ty) => {
        impl<'de> DeserializeSeed<'de> for $seed {
            type Value = <Self as Visitor<'de>>::Value;

            fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
                de.deserialize_any(self)
            }
        }
    };
}

/// The scalar visits of a visitor whose type has `fn scalar(self, Scalar)
/// -> Self::Value`.
macro_rules! visit_scalars {
    () => {
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(self.scalar(Scalar::Null))
        }

        fn visit_bool<E>(self, value: bool) -> Result<Self::Value, E> {
            Ok(self.scalar(Scalar::Bool(value)))
        }

        fn visit_i64<E>(self, value: i64) -> Result<Self::Value, E> {
            Ok(self.scalar(Scalar::Number(value.into())))
        }

        fn visit_u64<E>(self, value: u64) -> Result<Self::Value, E> {
            Ok(self.scalar(Scalar::Number(value.into())))
        }

        fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Self::Value, E> {
            // The tree's refusal, word for word.
            match Number::from_f64(value) {
                Some(number) => Ok(self.scalar(Scalar::Number(number))),
                None => Err(E::custom("a number JSON cannot hold")),
            }
        }

        fn visit_str<E>(self, value: &str) -> Result<Self::Value, E> {
            Ok(self.scalar(Scalar::Text(value)))
        }
    };
}

/// The body itself: an object, or `None`.
struct Top {
    image_tokens: i64,
}

impl Top {
    fn scalar<'a>(self, _: Scalar<'_>) -> Option<Found<'a>> {
        None
    }
}

seed!(Top);

impl<'de> Visitor<'de> for Top {
    type Value = Option<Found<'de>>;

    visit_scalars!();

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Skip.visit_seq(seq)?;
        Ok(None)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = Found::default();
        while let Some(key) = map.next_key_seed(Key)? {
            let key = key.as_ref();
            if let Some(slot) = AMOUNT_KEYS.iter().position(|k| *k == key) {
                found.amounts[slot] = Some(map.next_value()?);
                continue;
            }
            let tokens = match key {
                "stream" => {
                    found.streams = map.next_value::<Json<'de>>()? == Json::Bool(true);
                    0
                }
                "stream_options" => {
                    let options: Json<'de> = map.next_value()?;
                    found.usage_asked = options.get("include_usage") == Some(&Json::Bool(true));
                    0
                }
                key if is_setting(key.as_bytes()) => {
                    map.next_value_seed(Skip)?;
                    0
                }
                key if is_schema(key.as_bytes()) => {
                    text_tokens(map.next_value_seed(Compact { top: true })?)
                }
                _ => map.next_value_seed(Prompt {
                    image_tokens: self.image_tokens,
                    in_list: false,
                })?,
            };
            found.prompt_tokens = found.prompt_tokens.saturating_add(tokens);
        }
        Ok(Some(found))
    }
}

/// An object key, borrowed from the body unless it has escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, value: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(value))
    }

    fn visit_str<E>(self, value: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(value))
    }
}

/// A prompt-like top-level member, in tokens: a list is one piece per
/// entry (a number in a list is a token id, one token), anything else one
/// piece.
#[derive(Clone, Copy)]
struct Prompt {
    image_tokens: i64,
    in_list: bool,
}

impl Prompt {
    fn scalar(self, value: Scalar<'_>) -> i64 {
        match value {
            Scalar::Number(_) if self.in_list => 1,
            Scalar::Text(text) => text_tokens(text.chars().count()),
            _ => 0,
        }
    }
}

seed!(Prompt);

impl<'de> Visitor<'de> for Prompt {
    type Value = i64;

    visit_scalars!();

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<i64, A::Error> {
        let mut tokens = 0i64;
        let entry = || Prompt {
            in_list: true,
            ..self
        };
        while let Some(more) = seq.next_element_seed(entry())? {
            tokens = tokens.saturating_add(more);
        }
        Ok(tokens)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<i64, A::Error> {
        let piece = PieceOf { input: false }.visit_map(map)?;
        Ok(piece.tokens(self.image_tokens))
    }
}

/// The text and images of a value inside a piece of prompt: every string
/// but labels; an image block is one image, a tool's `input` object its
/// JSON text.
#[derive(Clone, Copy)]
struct PieceOf {
    /// The value is a block's `input`.
    input: bool,
}

impl PieceOf {
    fn scalar(self, value: Scalar<'_>) -> Piece {
        match value {
            Scalar::Text(text) => Piece {
                chars: text.chars().count(),
                images: 0,
            },
            _ => Piece::default(),
        }
    }
}

seed!(PieceOf);

impl Piece {
    pub(super) fn add(&mut self, other: Piece) {
        self.chars = self.chars.saturating_add(other.chars);
        self.images = self.images.saturating_add(other.images);
    }
}

impl<'de> Visitor<'de> for PieceOf {
    type Value = Piece;

    visit_scalars!();

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Piece, A::Error> {
        let mut piece = Piece::default();
        while let Some(item) = seq.next_element_seed(PieceOf { input: false })? {
            piece.add(item);
        }
        Ok(piece)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Piece, A::Error> {
        if self.input {
            return Ok(Piece {
                chars: Compact { top: false }.visit_map(map)?,
                images: 0,
            });
        }
        let mut piece = Piece::default();
        // Whether the last `type` names an image; known only at the end.
        let mut image = false;
        while let Some(key) = map.next_key_seed(Key)? {
            match key.as_ref() {
                "type" => image = map.next_value_seed(IsImage)?,
                label if is_label(label.as_bytes()) => map.next_value_seed(Skip)?,
                member => piece.add(map.next_value_seed(PieceOf {
                    input: member == "input",
                })?),
            }
        }
        Ok(if image {
            Piece {
                chars: 0,
                images: 1,
            }
        } else {
            piece
        })
    }
}

/// Whether a block's `type` names an image.
struct IsImage;

impl IsImage {
    fn scalar(self, value: Scalar<'_>) -> bool {
        matches!(value, Scalar::Text(kind) if IMAGE_TYPES.contains(&kind))
    }
}

seed!(IsImage);

impl<'de> Visitor<'de> for IsImage {
    type Value = bool;

    visit_scalars!();

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<bool, A::Error> {
        Skip.visit_seq(seq).map(|()| false)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<bool, A::Error> {
        Skip.visit_map(map).map(|()| false)
    }
}

/// The characters of a value as serde_json writes it compactly, counted
/// without writing it.
#[derive(Clone, Copy)]
struct Compact {
    /// A top-level schema, where null counts nothing.
    top: bool,
}

impl Compact {
    fn scalar(self, value: Scalar<'_>) -> usize {
        match value {
            Scalar::Null if self.top => 0,
            Scalar::Null | Scalar::Bool(true) => 4,
            Scalar::Bool(false) => 5,
            Scalar::Number(number) => number_chars(&number),
            Scalar::Text(text) => string_chars(text),
        }
    }
}

seed!(Compact);

impl<'de> Visitor<'de> for Compact {
    type Value = usize;

    visit_scalars!();

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let (mut chars, mut items) = (0usize, 0usize);
        while let Some(item) = seq.next_element_seed(Compact { top: false })? {
            chars = chars.saturating_add(item);
            items += 1;
        }
        // Brackets and commas.
        Ok(chars.saturating_add(2 + items.saturating_sub(1)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
        let (mut chars, mut members) = (0usize, 0usize);
        while let Some(key) = map.next_key_seed(Key)? {
            let value = map.next_value_seed(Compact { top: false })?;
            // The key, its colon, the value.
            chars = chars.saturating_add(string_chars(&key) + 1 + value);
            members += 1;
        }
        // Braces and commas.
        Ok(chars.saturating_add(2 + members.saturating_sub(1)))
    }
}

/// Characters of `text` as a JSON string with serde_json's escapes: `"`
/// and `\` and the control characters that have a short form take two, the
/// other control characters six (`\u001f`), the rest one.
fn string_chars(text: &str) -> usize {
    let escapes: usize = text
        .bytes()
        .map(|byte| match byte {
            b'"' | b'\\' | 0x08 | 0x09 | 0x0A | 0x0C | 0x0D => 1,
            0x00..=0x1F => 5,
            _ => 0,
        })
        .sum();
    2 + text.chars().count() + escapes
}

/// Characters of `number` as serde_json writes it (ASCII, so its length).
fn number_chars(number: &Number) -> usize {
    if let Some(n) = number.as_u64() {
        return decimal_digits(n);
    }
    if let Some(n) = number.as_i64() {
        return 1 + decimal_digits(n.unsigned_abs());
    }
    number.to_string().len()
}

fn decimal_digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |log| log as usize + 1)
}
