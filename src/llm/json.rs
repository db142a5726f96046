//! A JSON value that borrows its strings from the body it was parsed from.
//!
//! The tree of a request body the gateway writes into (a completion bound,
//! a request for stream usage) before writing it back, and the reference
//! the estimate's one pass is checked against; the small values a pass
//! keeps (a bound, a usage count) too. Built as a `serde_json::Value`,
//! each string would be copied into an allocation of its own and every
//! object into a map. Here a string without escapes is a slice of the body
//! and an object is one vector of pairs. Objects keep their keys in body
//! order, and write them back in it; of a key given twice, the last
//! counts, as with `serde_json`.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{
    Deserialize, DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor,
};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Number;

#[derive(Clone, Debug, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Object<'a>),
}

/// A JSON object's members, in body order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Object<'a>(Vec<(Cow<'a, str>, Json<'a>)>);

impl<'a> Json<'a> {
    /// The member `key` of an object; `None` for anything else.
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(object) => object.get(key),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(text) => Some(text),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Json::Number(number) => number.as_i64(),
            _ => None,
        }
    }
}

impl<'a> Object<'a> {
    pub fn get(&self, key: &str) -> Option<&Json<'a>> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The members in body order, a key given twice twice.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Json<'a>)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v))
    }

    /// Sets `key` to `value`, replacing every member of that name.
    pub fn insert(&mut self, key: &'a str, value: Json<'a>) {
        self.0.retain(|(k, _)| k != key);
        self.0.push((Cow::Borrowed(key), value));
    }

    /// The member `key`, added as `value` first if the object has none.
    pub fn entry_or_insert(&mut self, key: &'a str, value: Json<'a>) -> &mut Json<'a> {
        let index = match self.0.iter().rposition(|(k, _)| k == key) {
            Some(index) => index,
            None => {
                self.0.push((Cow::Borrowed(key), value));
                self.0.len() - 1
            }
        };
        &mut self.0[index].1
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Json<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor(PhantomData))
    }
}

/// Builds a [`Json`] that borrows from input living at least as long.
struct JsonVisitor<'a>(PhantomData<Json<'a>>);

impl<'de: 'a, 'a> Visitor<'de> for JsonVisitor<'a> {
    type Value = Json<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Json<'a>, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E>(self, value: bool) -> Result<Json<'a>, E> {
        Ok(Json::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Json<'a>, E> {
        Ok(Json::Number(value.into()))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Json<'a>, E> {
        Ok(Json::Number(value.into()))
    }

    fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Json<'a>, E> {
        Number::from_f64(value)
            .map(Json::Number)
            .ok_or_else(|| E::custom("a number JSON cannot hold"))
    }

    fn visit_borrowed_str<E>(self, value: &'de str) -> Result<Json<'a>, E> {
        Ok(Json::String(Cow::Borrowed(value)))
    }

    fn visit_str<E>(self, value: &str) -> Result<Json<'a>, E> {
        Ok(Json::String(Cow::Owned(value.to_owned())))
    }

    fn visit_string<E>(self, value: String) -> Result<Json<'a>, E> {
        Ok(Json::String(Cow::Owned(value)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'a>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'a>, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(key) = map.next_key::<Json<'a>>()? {
            let Json::String(key) = key else {
                return Err(A::Error::custom("an object key must be a string"));
            };
            members.push((key, map.next_value()?));
        }
        Ok(Json::Object(Object(members)))
    }
}

/// Any value, read (and so checked as the tree would be) and forgotten.
/// Unlike `serde::de::IgnoredAny`, which serde_json skips without reading
/// its numbers or UTF-8 or counting its depth.
pub struct Skip;

impl<'de> DeserializeSeed<'de> for Skip {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Skip, D::Error> {
        deserializer.deserialize_any(Skip).map(|()| Skip)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<(), E> {
        JsonVisitor(PhantomData).visit_f64(value).map(drop)
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Skip)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Skip)?.is_some() {
            map.next_value_seed(Skip)?;
        }
        Ok(())
    }
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => serializer.serialize_unit(),
            Json::Bool(value) => serializer.serialize_bool(*value),
            Json::Number(number) => number.serialize(serializer),
            Json::String(text) => serializer.serialize_str(text),
            Json::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(object) => object.serialize(serializer),
        }
    }
}

impl Serialize for Object<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_strings_are_borrowed_and_escaped_ones_decoded() {
        let body = br#"{"plain":"abc","escaped":"a\"b\u00e9"}"#;
        let json: Json<'_> = serde_json::from_slice(body).unwrap();
        assert!(matches!(
            json.get("plain"),
            Some(Json::String(Cow::Borrowed("abc")))
        ));
        assert_eq!(json.get("escaped").and_then(Json::as_str), Some("a\"bé"));
    }

    #[test]
    fn it_writes_what_serde_json_writes() {
        let body = r#"{"a":[1,-2,3.5,true,null,{"b":"c\nd"}],"e":{}}"#;
        let json: Json<'_> = serde_json::from_str(body).unwrap();
        assert_eq!(serde_json::to_string(&json).unwrap(), body);
    }

    #[test]
    fn of_a_key_given_twice_the_last_counts() {
        let json: Json<'_> = serde_json::from_str(r#"{"n":1,"n":2}"#).unwrap();
        assert_eq!(json.get("n").and_then(Json::as_i64), Some(2));
    }

    #[test]
    fn a_rewritten_body_keeps_every_number_it_read() {
        // Without exact float parsing the first of these read back as
        // another double, so a body the gateway rewrote (to add a bound, say)
        // would reach the provider with numbers the client never sent.
        let body = r#"{"big":1111000000001319935345,"tiny":2.2250738585072014e-308,"t":0.7}"#;
        let once: Json<'_> = serde_json::from_str(body).unwrap();
        let written = serde_json::to_string(&once).unwrap();
        let twice: Json<'_> = serde_json::from_str(&written).unwrap();
        assert_eq!(once, twice);
        assert_eq!(serde_json::to_string(&twice).unwrap(), written);
        assert!(written.ends_with(r#""t":0.7}"#), "{written}");
    }
}
