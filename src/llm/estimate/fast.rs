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
//! It reads with [`crate::llm::scan`], so it gives up where that does (and
//! on escapes in a block's `type`), and `pass` reads the body, so that a
//! refusal is always serde_json's, word for word. What it does read, it
//! reads exactly as `pass` does: the tests compare the two.

use super::pass::{AMOUNT_KEYS, Found};
use super::{IMAGE_TYPES, Piece, is_label, is_schema, is_setting, text_tokens};
use crate::llm::json::Json;
use crate::llm::scan::{Scalar, Scanner};

/// Reads `body` as [`super::pass::read`] does; `None` where it gives up.
pub(super) fn read(body: &[u8], image_tokens: i64) -> Option<Found<'static>> {
    Scanner::whole(body, |scanner| scanner.top(image_tokens))
}

impl Scanner<'_> {
    fn top(&mut self, image_tokens: i64) -> Option<Found<'static>> {
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
                _ => s.prompt(false, image_tokens)?,
            };
            found.prompt_tokens = found.prompt_tokens.saturating_add(tokens);
            Some(())
        })?;
        Some(found)
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
    fn prompt(&mut self, in_list: bool, image_tokens: i64) -> Option<i64> {
        match self.peek()? {
            b'[' => {
                let mut tokens = 0i64;
                self.items(|s| {
                    tokens = tokens.saturating_add(s.prompt(true, image_tokens)?);
                    Some(())
                })?;
                Some(tokens)
            }
            b'{' => Some(self.block()?.tokens(image_tokens)),
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
