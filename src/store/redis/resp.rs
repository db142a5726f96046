//! RESP2, as much of it as the store's own script calls need: a command
//! written straight into a reused buffer, and one reply read from the front
//! of another. Pure, so that every reply Redis (or anything pretending to
//! be Redis) can send is tested without a server.
//!
//! Hand-written because the crate's command, pipeline and codec path cost
//! some 6,000 instructions a reservation (callgrind, benchmark case 5: a
//! channel to the multiplexer's driver task, a `Value` per reply, and a
//! `Vec<u8>` per key and argument), where this writes each key once, into
//! the buffer that is sent.

use std::ops::Range;

/// The longest reply taken: the largest a script of ours writes (64
/// reservations of three counters) is some 20 KB.
pub const MAX_REPLY: usize = 1 << 20;

/// The most digits a bulk string's length may have: more is garbage.
const MAX_LENGTH_DIGITS: usize = 20;

/// Room kept in front of a command for its array header, written last,
/// once the count of its items is known: `*` and up to 20 digits, `\r\n`.
const HEADER_ROOM: usize = 23;

/// "00" to "99", each pair of digits at twice its value.
const DIGIT_PAIRS: &[u8; 200] = b"\
      0001020304050607080910111213141516171819\
      2021222324252627282930313233343536373839\
      4041424344454647484950515253545556575859\
      6061626364656667686970717273747576777879\
      8081828384858687888990919293949596979899";

/// One command being written at the end of a buffer: bulk strings after
/// room for the array header, which [`Command::finish`] writes once every
/// item is in, so that the count is always the items written.
pub struct Command<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
    items: usize,
}

impl<'a> Command<'a> {
    /// Starts a command at the end of `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Command<'a> {
        let start = out.len();
        out.resize(start + HEADER_ROOM, 0);
        Command {
            out,
            start,
            items: 0,
        }
    }

    /// A bulk string of `bytes`.
    pub fn bulk(&mut self, bytes: &[u8]) -> &mut Self {
        self.joined(&[bytes])
    }

    /// A bulk string of `parts` one after another: its header, then each
    /// part, once room for all of it is made.
    pub fn joined(&mut self, parts: &[&[u8]]) -> &mut Self {
        let length = parts.iter().map(|part| part.len()).sum::<usize>();
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(length).as_bytes();
        self.out.reserve(digits.len() + length + 5);
        self.out.push(b'$');
        self.out.extend_from_slice(digits);
        self.out.extend_from_slice(b"\r\n");
        for part in parts {
            self.out.extend_from_slice(part);
        }
        self.out.extend_from_slice(b"\r\n");
        self.items += 1;
        self
    }

    /// A bulk string of `value`'s decimal digits. Most are one digit (a
    /// count, a unit of cost): seven bytes of one shape. Any other is built
    /// from its end in a buffer on the stack and copied in once: with
    /// itoa, the nine integers of a reservation and its settlement cost
    /// 1,200 instructions more (case 16, callgrind).
    pub fn int(&mut self, value: i64) -> &mut Self {
        self.items += 1;
        if let Ok(digit @ 0..=9) = u8::try_from(value) {
            self.out
                .extend_from_slice(&[b'$', b'1', b'\r', b'\n', b'0' + digit, b'\r', b'\n']);
            return self;
        }
        // `$`, two digits of length, CRLF, a sign and 19 digits, CRLF.
        let mut item = [b'\n'; 27];
        let mut at = item.len() - 2;
        item[at] = b'\r';
        // Two digits a step, as itoa does.
        let mut rest = value.unsigned_abs();
        while rest >= 100 {
            let pair = (rest % 100) as usize * 2;
            rest /= 100;
            at -= 2;
            item[at..at + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
        }
        if rest >= 10 {
            let pair = rest as usize * 2;
            at -= 2;
            item[at..at + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
        } else {
            at -= 1;
            item[at] = b'0' + rest as u8;
        }
        if value < 0 {
            at -= 1;
            item[at] = b'-';
        }
        let length = (item.len() - 2 - at) as u8;
        at -= 2;
        item[at] = b'\r';
        if length >= 10 {
            at -= 2;
            item[at] = b'0' + length / 10;
            item[at + 1] = b'0' + length % 10;
        } else {
            at -= 1;
            item[at] = b'0' + length;
        }
        at -= 1;
        item[at] = b'$';
        self.out.extend_from_slice(&item[at..]);
        self
    }

    /// `items` items already in RESP (see [`encoded`]), as they are.
    pub fn encoded(&mut self, encoded: &[u8], items: usize) -> &mut Self {
        self.out.extend_from_slice(encoded);
        self.items += items;
        self
    }

    /// Writes the array header; where in the buffer the command begins.
    pub fn finish(self) -> usize {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(self.items).as_bytes();
        let begin = self.start + HEADER_ROOM - digits.len() - 3;
        let header = &mut self.out[begin..self.start + HEADER_ROOM];
        header[0] = b'*';
        header[1..=digits.len()].copy_from_slice(digits);
        header[digits.len() + 1..].copy_from_slice(b"\r\n");
        begin
    }
}

/// `bytes` as one bulk string, for an item sent in every command, encoded
/// once.
pub fn encoded(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Command::new(&mut out).bulk(bytes);
    out.split_off(HEADER_ROOM)
}

/// What a reply is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `+OK`.
    Simple,
    /// `-ERR ...`, `-NOSCRIPT ...`.
    Error,
    Bulk,
    /// `$-1`.
    Nil,
}

/// One reply at the front of a buffer: its kind, where its text is, and
/// how many bytes it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub text: Range<usize>,
    pub length: usize,
}

/// Why a reply was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("Redis sent a reply longer than {MAX_REPLY} bytes")]
    TooLong,
    #[error("Redis sent a reply of a kind the store never asks for")]
    UnexpectedKind,
    #[error("Redis sent a reply that is not RESP")]
    Garbage,
}

/// The reply at the front of `input`: `None` while it is incomplete.
pub fn parse(input: &[u8]) -> Result<Option<Frame>, Malformed> {
    let Some(&first) = input.first() else {
        return Ok(None);
    };
    let kind = match first {
        b'+' => Kind::Simple,
        b'-' => Kind::Error,
        b'$' => return bulk(input),
        b':' | b'*' | b'_' | b',' | b'#' | b'%' | b'~' | b'>' | b'=' | b'(' | b'!' | b'|' => {
            return Err(Malformed::UnexpectedKind);
        }
        _ => return Err(Malformed::Garbage),
    };
    let Some(end) = line_end(input, MAX_REPLY)? else {
        return Ok(None);
    };
    Ok(Some(Frame {
        kind,
        text: 1..end,
        length: end + 2,
    }))
}

/// A bulk string (or nil) at the front of `input`.
fn bulk(input: &[u8]) -> Result<Option<Frame>, Malformed> {
    let Some(end) = line_end(input, 1 + MAX_LENGTH_DIGITS)? else {
        return Ok(None);
    };
    let digits = &input[1..end];
    if digits == b"-1" {
        return Ok(Some(Frame {
            kind: Kind::Nil,
            text: end..end,
            length: end + 2,
        }));
    }
    let length = decimal(digits)?;
    if length > MAX_REPLY {
        return Err(Malformed::TooLong);
    }
    let text = end + 2..end + 2 + length;
    if input.len() < text.end + 2 {
        return Ok(None);
    }
    if &input[text.end..text.end + 2] != b"\r\n" {
        return Err(Malformed::Garbage);
    }
    Ok(Some(Frame {
        kind: Kind::Bulk,
        length: text.end + 2,
        text,
    }))
}

/// Where the first line of `input` ends (its `\r`), if it is all there;
/// refused if it runs past `most` bytes, or holds a lone `\r` or `\n`.
fn line_end(input: &[u8], most: usize) -> Result<Option<usize>, Malformed> {
    let searched = &input[..input.len().min(most + 1)];
    match memchr::memchr2(b'\r', b'\n', searched) {
        Some(end) if input[end] == b'\r' => match input.get(end + 1) {
            Some(b'\n') => Ok(Some(end)),
            Some(_) => Err(Malformed::Garbage),
            None => Ok(None),
        },
        Some(_) => Err(Malformed::Garbage),
        None if searched.len() <= most => Ok(None),
        None if most == MAX_REPLY => Err(Malformed::TooLong),
        None => Err(Malformed::Garbage),
    }
}

/// A length: decimal digits only, no sign, no leading zero.
fn decimal(digits: &[u8]) -> Result<usize, Malformed> {
    if digits.is_empty() || (digits[0] == b'0' && digits.len() > 1) {
        return Err(Malformed::Garbage);
    }
    digits.iter().try_fold(0usize, |value, &digit| {
        if !digit.is_ascii_digit() {
            return Err(Malformed::Garbage);
        }
        value
            .checked_mul(10)
            .and_then(|value| value.checked_add(usize::from(digit - b'0')))
            .ok_or(Malformed::TooLong)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(write: impl FnOnce(&mut Command<'_>)) -> Vec<u8> {
        let mut out = b"kept".to_vec();
        let mut command = Command::new(&mut out);
        write(&mut command);
        let start = command.finish();
        assert_eq!(&out[..4], b"kept");
        out[start..].to_vec()
    }

    #[test]
    fn a_command_is_an_array_of_bulk_strings_counted_as_written() {
        let written = command(|command| {
            command
                .bulk(b"EVALSHA")
                .int(-42)
                .joined(&[b"t:{", b"org", b"}:tokens"])
                .bulk(b"");
        });
        assert_eq!(
            written,
            b"*4\r\n$7\r\nEVALSHA\r\n$3\r\n-42\r\n$14\r\nt:{org}:tokens\r\n$0\r\n\r\n"
        );
    }

    #[test]
    fn integers_of_every_width_are_bulk_strings_of_their_digits() {
        let powers = (0..19).map(|exponent| 10i64.pow(exponent));
        let around = powers.flat_map(|power| [power - 1, power, power + 1, -power, 1 - power]);
        for value in around.chain([0, -1, 1234567890, i64::MAX, i64::MIN]) {
            let text = value.to_string();
            let expected = format!("*1\r\n${}\r\n{text}\r\n", text.len());
            assert_eq!(
                command(|command| {
                    command.int(value);
                }),
                expected.as_bytes()
            );
        }
    }

    #[test]
    fn an_item_encoded_once_counts_as_the_items_it_holds() {
        let evalsha = [encoded(b"EVALSHA"), encoded(b"abc")].concat();
        assert_eq!(evalsha, b"$7\r\nEVALSHA\r\n$3\r\nabc\r\n");
        let written = command(|command| {
            command.encoded(&evalsha, 2).int(1);
        });
        assert_eq!(written, b"*3\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n1\r\n");
    }

    #[test]
    fn a_command_of_many_items_counts_them_all() {
        let written = command(|command| {
            for i in 0..1234 {
                command.int(i);
            }
        });
        assert!(written.starts_with(b"*1234\r\n$1\r\n0\r\n"));
    }

    fn whole(input: &[u8]) -> (Kind, Vec<u8>) {
        let frame = parse(input).unwrap().unwrap();
        assert_eq!(frame.length, input.len());
        (frame.kind, input[frame.text].to_vec())
    }

    #[test]
    fn reads_each_kind_of_reply_the_store_asks_for() {
        assert_eq!(whole(b"+OK\r\n"), (Kind::Simple, b"OK".to_vec()));
        assert_eq!(
            whole(b"-NOSCRIPT No matching script\r\n"),
            (Kind::Error, b"NOSCRIPT No matching script".to_vec())
        );
        assert_eq!(whole(b"$5\r\n1 2;3\r\n"), (Kind::Bulk, b"1 2;3".to_vec()));
        assert_eq!(whole(b"$0\r\n\r\n"), (Kind::Bulk, Vec::new()));
        assert_eq!(whole(b"$-1\r\n"), (Kind::Nil, Vec::new()));
    }

    #[test]
    fn a_bulk_string_may_hold_line_breaks() {
        assert_eq!(whole(b"$4\r\na\r\nb\r\n"), (Kind::Bulk, b"a\r\nb".to_vec()));
    }

    #[test]
    fn a_reply_split_anywhere_waits_for_the_rest() {
        for reply in [
            &b"$11\r\n10 20;30 40\r\n"[..],
            b"+OK\r\n",
            b"-ERR x\r\n",
            b"$-1\r\n",
        ] {
            for cut in 0..reply.len() {
                assert_eq!(parse(&reply[..cut]), Ok(None), "{reply:?} cut at {cut}");
            }
            assert_eq!(parse(reply).unwrap().unwrap().length, reply.len());
        }
    }

    #[test]
    fn only_the_first_reply_is_read() {
        let frame = parse(b"$1\r\n7\r\n+OK\r\n").unwrap().unwrap();
        assert_eq!(
            (frame.kind, frame.text, frame.length),
            (Kind::Bulk, 4..5, 7)
        );
    }

    #[test]
    fn refuses_lengths_that_are_negative_huge_or_not_numbers() {
        for reply in [
            &b"$-2\r\n"[..],
            b"$-0\r\n",
            b"$+5\r\n",
            b"$05\r\n",
            b"$\r\n",
            b"$ 5\r\n",
            b"$5x\r\n",
            b"$1\r\nab\r\n",
            b"$1\r\na\n\n",
            b"$99999999999999999999999\r\n",
        ] {
            assert!(parse(reply).is_err(), "{reply:?} was taken");
        }
        assert_eq!(parse(b"$1048577\r\n"), Err(Malformed::TooLong));
        assert_eq!(
            parse(b"$184467440737095516160\r\n"),
            Err(Malformed::Garbage),
            "a length of more digits than any size"
        );
    }

    #[test]
    fn refuses_replies_the_store_never_asks_for() {
        for reply in [
            &b":1\r\n"[..],
            b"*1\r\n$1\r\na\r\n",
            b"_\r\n",
            b">2\r\n",
            b"%1\r\n",
        ] {
            assert_eq!(parse(reply), Err(Malformed::UnexpectedKind), "{reply:?}");
        }
    }

    #[test]
    fn refuses_garbage() {
        for reply in [
            &b"HTTP/1.1 400\r\n"[..],
            b"\0",
            b"OK\r\n",
            b"+OK\n",
            b"+O\rK\r\n",
        ] {
            assert_eq!(parse(reply), Err(Malformed::Garbage), "{reply:?}");
        }
    }

    #[test]
    fn refuses_a_line_that_never_ends() {
        assert_eq!(parse(&[b'$'; 30]), Err(Malformed::Garbage));
        let mut status = vec![b'+'; MAX_REPLY + 2];
        assert_eq!(parse(&status), Err(Malformed::TooLong));
        status.truncate(1000);
        assert_eq!(parse(&status), Ok(None));
    }

    #[test]
    fn never_panics_on_any_short_input() {
        let alphabet = [b'$', b'-', b'+', b'1', b'0', b'\r', b'\n', b'x', b':'];
        let mut input = Vec::new();
        for n in 0..alphabet.len().pow(5) {
            input.clear();
            let mut rest = n;
            for _ in 0..5 {
                input.push(alphabet[rest % alphabet.len()]);
                rest /= alphabet.len();
            }
            if let Ok(Some(frame)) = parse(&input) {
                assert!(frame.text.end <= frame.length && frame.length <= input.len());
            }
        }
    }
}
