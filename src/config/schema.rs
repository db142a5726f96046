//! The keys each table of the file accepts, read from the raw structs' own
//! `Deserialize` impls rather than from a second list kept by hand, so that an
//! unknown key can be answered with the key it was probably meant to be.
//!
//! [`Schema::of`] drives a type's `Deserialize` with a deserializer that
//! invents one value of every shape asked for: each field of a struct, one
//! entry of a map, one element of a sequence. Every struct met on the way
//! reports its field names, which serde passes to `deserialize_struct`.

use std::cell::RefCell;

use serde::de::value::{Error, StrDeserializer};
use serde::de::{self, DeserializeOwned, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use super::Segment;

/// Deeper than any config table; stops a recursive type from walking forever.
const MAX_DEPTH: usize = 16;

/// Where a struct sits: a named field, or any key of a map or element of an array.
#[derive(Clone, Copy)]
enum Step {
    Field(&'static str),
    Any,
}

pub(super) struct Schema {
    tables: Vec<(Vec<Step>, &'static [&'static str])>,
}

impl Schema {
    pub(super) fn of<T: DeserializeOwned>() -> Schema {
        let found = RefCell::new(Vec::new());
        // The walk ends in an error only where a shape has no invented value
        // (an enum, say); the tables found up to there are still right.
        let _ = T::deserialize(Walker {
            path: Vec::new(),
            found: &found,
        });
        Schema {
            tables: found.into_inner(),
        }
    }

    /// The keys the table at `table` accepts, when it is a struct.
    pub(super) fn keys_at(&self, table: &[Segment]) -> Option<&'static [&'static str]> {
        self.tables
            .iter()
            .find(|(steps, _)| {
                steps.len() == table.len()
                    && steps.iter().zip(table).all(|(step, segment)| match step {
                        Step::Field(field) => matches!(segment, Segment::Key(k) if k == field),
                        Step::Any => true,
                    })
            })
            .map(|&(_, keys)| keys)
    }
}

/// The message for `key`, unknown in a table accepting `known`.
pub(super) fn unknown_key(key: &str, known: Option<&[&str]>) -> String {
    let Some(known) = known.filter(|k| !k.is_empty()) else {
        return format!("unknown field `{key}`");
    };
    let close = known
        .iter()
        .map(|candidate| (edit_distance(key, candidate), candidate))
        .min()
        .filter(|&(distance, _)| distance <= (key.chars().count() / 3).max(1));
    match close {
        Some((_, candidate)) => format!("unknown field `{key}`; did you mean `{candidate}`?"),
        None => {
            let listed: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
            format!(
                "unknown field `{key}`, expected one of {}",
                listed.join(", ")
            )
        }
    }
}

/// Levenshtein distance: the fewest one-character edits from `a` to `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = i;
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

type Found = RefCell<Vec<(Vec<Step>, &'static [&'static str])>>;

struct Walker<'a> {
    path: Vec<Step>,
    found: &'a Found,
}

impl<'a> Walker<'a> {
    fn child(&self, step: Step) -> Result<Walker<'a>, Error> {
        if self.path.len() >= MAX_DEPTH {
            return Err(de::Error::custom("nested too deep"));
        }
        let mut path = self.path.clone();
        path.push(step);
        Ok(Walker {
            path,
            found: self.found,
        })
    }

    fn entries(self, keys: Vec<(&'static str, Step)>) -> Entries<'a> {
        Entries {
            parent: self,
            keys: keys.into_iter(),
            next: None,
        }
    }
}

impl<'de> de::Deserializer<'de> for Walker<'_> {
    type Error = Error;

    // An integer: what numbers and untagged enums of numbers accept.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_i64(0)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_bool(false)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_str("")
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_str("")
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let element = self.child(Step::Any)?;
        visitor.visit_seq(One(Some(element)))
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_map(self.entries(vec![("*", Step::Any)]))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.found.borrow_mut().push((self.path.clone(), fields));
        let keys = fields.iter().map(|&f| (f, Step::Field(f))).collect();
        visitor.visit_map(self.entries(keys))
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf
        unit unit_struct tuple tuple_struct enum identifier ignored_any
    }
}

/// A sequence of one invented element.
struct One<'a>(Option<Walker<'a>>);

impl<'de> SeqAccess<'de> for One<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        self.0.take().map(|w| seed.deserialize(w)).transpose()
    }
}

/// A struct's fields, or a map's one invented key, each with an invented value.
struct Entries<'a> {
    parent: Walker<'a>,
    keys: std::vec::IntoIter<(&'static str, Step)>,
    next: Option<Step>,
}

impl<'de> MapAccess<'de> for Entries<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((key, step)) = self.keys.next() else {
            return Ok(None);
        };
        self.next = Some(step);
        seed.deserialize(StrDeserializer::new(key)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let step = self
            .next
            .take()
            .ok_or_else(|| de::Error::custom("a value before its key"))?;
        seed.deserialize(self.parent.child(step)?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::raw::RawConfig;
    use super::*;

    fn keys(path: &[&str]) -> Option<&'static [&'static str]> {
        let segments: Vec<Segment> = path
            .iter()
            .map(|&s| match s.parse() {
                Ok(index) => Segment::Index(index),
                Err(_) => Segment::Key(s.to_string()),
            })
            .collect();
        Schema::of::<RawConfig>().keys_at(&segments)
    }

    #[test]
    fn finds_the_keys_of_tables_in_structs_maps_and_arrays() {
        assert!(keys(&[]).unwrap().contains(&"server"));
        assert!(keys(&["server"]).unwrap().contains(&"max_body_bytes"));
        assert!(keys(&["server", "tls"]).unwrap().contains(&"cert"));
        assert!(
            keys(&["server", "tls"])
                .unwrap()
                .contains(&"handshake_timeout")
        );
        assert!(keys(&["upstreams", "openai"]).unwrap().contains(&"url"));
        assert!(keys(&["routes", "3"]).unwrap().contains(&"upstream"));
        assert!(
            keys(&["identity", "api_key", "keys", "0"])
                .unwrap()
                .contains(&"sha256")
        );
        assert!(keys(&["orgs", "org_x"]).unwrap().contains(&"limits"));
    }

    #[test]
    fn free_form_tables_have_no_known_keys() {
        assert_eq!(keys(&["plans", "free"]), None);
        assert_eq!(keys(&["upstreams", "openai", "headers"]), None);
        assert_eq!(keys(&["routes", "0", "cost"]), None);
    }

    #[test]
    fn a_close_known_key_is_suggested() {
        assert_eq!(
            unknown_key("max_body_byte", Some(&["listen", "max_body_bytes"])),
            "unknown field `max_body_byte`; did you mean `max_body_bytes`?"
        );
        assert_eq!(
            unknown_key("methd", Some(&["method", "path"])),
            "unknown field `methd`; did you mean `method`?"
        );
    }

    #[test]
    fn without_a_close_key_every_known_key_is_listed() {
        assert_eq!(
            unknown_key("colour", Some(&["listen", "workers"])),
            "unknown field `colour`, expected one of `listen`, `workers`"
        );
        assert_eq!(unknown_key("colour", None), "unknown field `colour`");
    }

    #[test]
    fn edit_distance_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edit_distance("listen", "listen"), 0);
        assert_eq!(edit_distance("lisen", "listen"), 1);
        assert_eq!(edit_distance("uri", "url"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
