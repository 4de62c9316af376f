//! A layer between serde_json and the types it reads, so that a reading error says what kind it is.
//!
//! serde_json's error is fixed: the types it reads raise `missing_field`, `unknown_field`,
//! `invalid_type`… on it, and it keeps only the text. Here every visitor, seed and access
//! serde_json hands out is wrapped, and the wrapped ones see an error type of ours, [`Raised`]:
//! serde_json's own error (so the text, and what Envoy logs, is exactly serde_json's), made by the
//! constructor of the same name, which also notes a [`Tag`] saying which constructor it was. (The
//! pattern of `serde_path_to_error` and `serde_ignored`, with error kinds instead of paths.)
//!
//! The tag is noted aside rather than carried in the error: a `Raised` is its error and nothing
//! else, so wrapping and unwrapping compile to nothing, and the layer adds about 4 KB to the
//! filter (an error that carried its tag made every `Result` of the derived code larger: 19 KB).
//! The note is the tag of the last error made, which is the one reported as long as no type read
//! here makes an error and then recovers from it (serde's untagged enums would; `Expiry` and the
//! manifest's version are read by type for that reason too). [`begin`] clears it before a reading.
//!
//! An error serde_json raises itself, with no tag noted, is a wrong JSON type (serde_json checks
//! the next token against what the visitor expects), or bad JSON, which its category tells.

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use std::cell::Cell;
use std::fmt;

/// Which constructor made an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tag {
    Type,
    Invalid,
    Missing(&'static str),
    Unknown(&'static [&'static str]),
    /// serde's own: a struct field given twice (the error is the object's).
    DuplicateField,
    /// [`super::repeated_name`]: a name given twice in a map (the error is the name's).
    RepeatedName,
}

thread_local! {
    static LAST: Cell<Option<Tag>> = const { Cell::new(None) };
}

/// Before a reading: no tag is noted.
pub(crate) fn begin() {
    LAST.with(|last| last.set(None));
}

/// The tag of the last error made since [`begin`], if any was.
pub(crate) fn last_tag() -> Option<Tag> {
    LAST.with(Cell::take)
}

/// Notes `tag` as the last error's (for an error made by a constructor that cannot say it).
pub(crate) fn note(tag: Tag) {
    LAST.with(|last| last.set(Some(tag)));
}

/// The reader's error, seen by the types read as an error of ours.
#[repr(transparent)]
pub(crate) struct Raised<E>(E);

impl<E> Raised<E> {
    pub(crate) fn into_inner(self) -> E {
        self.0
    }
}

#[cold]
fn raised<E>(tag: Tag, error: E) -> Raised<E> {
    note(tag);
    Raised(error)
}

#[inline(always)]
fn lift<E>(error: E) -> Raised<E> {
    Raised(error)
}

#[inline(always)]
fn lower<E>(r: Raised<E>) -> E {
    r.0
}

impl<E: fmt::Debug> fmt::Debug for Raised<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: fmt::Display> fmt::Display for Raised<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: std::error::Error> std::error::Error for Raised<E> {}

/// Each constructor makes the reader's own error (so the text is the reader's) and tags it.
impl<E: de::Error> de::Error for Raised<E> {
    #[cold]
    fn custom<T: fmt::Display>(msg: T) -> Self {
        raised(Tag::Invalid, E::custom(msg))
    }

    #[cold]
    fn invalid_type(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        raised(Tag::Type, E::invalid_type(unexp, exp))
    }

    #[cold]
    fn invalid_value(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        raised(Tag::Invalid, E::invalid_value(unexp, exp))
    }

    #[cold]
    fn invalid_length(len: usize, exp: &dyn de::Expected) -> Self {
        raised(Tag::Invalid, E::invalid_length(len, exp))
    }

    #[cold]
    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        raised(Tag::Unknown(expected), E::unknown_variant(variant, expected))
    }

    #[cold]
    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        raised(Tag::Unknown(expected), E::unknown_field(field, expected))
    }

    #[cold]
    fn missing_field(field: &'static str) -> Self {
        raised(Tag::Missing(field), E::missing_field(field))
    }

    #[cold]
    fn duplicate_field(field: &'static str) -> Self {
        raised(Tag::DuplicateField, E::duplicate_field(field))
    }
}

/// A deserializer whose visitors are wrapped.
pub(crate) struct Proxy<D>(pub(crate) D);

macro_rules! deserialize {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {$(
        #[inline]
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, Self::Error> {
            self.0.$method($($arg,)* Wrap(visitor)).map_err(lift)
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Proxy<D> {
    type Error = Raised<D::Error>;

    deserialize! {
        deserialize_any();
        deserialize_bool();
        deserialize_i8();
        deserialize_i16();
        deserialize_i32();
        deserialize_i64();
        deserialize_i128();
        deserialize_u8();
        deserialize_u16();
        deserialize_u32();
        deserialize_u64();
        deserialize_u128();
        deserialize_f32();
        deserialize_f64();
        deserialize_char();
        deserialize_str();
        deserialize_string();
        deserialize_bytes();
        deserialize_byte_buf();
        deserialize_option();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
        deserialize_identifier();
        deserialize_ignored_any();
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

/// A visitor that sees [`Raised`] errors, and hands wrapped accesses on.
struct Wrap<V>(V);

macro_rules! visit {
    ($($method:ident($ty:ty);)*) => {$(
        #[inline]
        fn $method<E: de::Error>(self, v: $ty) -> Result<Self::Value, E> {
            self.0.$method::<Raised<E>>(v).map_err(lower)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    visit! {
        visit_bool(bool);
        visit_i8(i8);
        visit_i16(i16);
        visit_i32(i32);
        visit_i64(i64);
        visit_i128(i128);
        visit_u8(u8);
        visit_u16(u16);
        visit_u32(u32);
        visit_u64(u64);
        visit_u128(u128);
        visit_f32(f32);
        visit_f64(f64);
        visit_char(char);
        visit_str(&str);
        visit_borrowed_str(&'de str);
        visit_string(String);
        visit_bytes(&[u8]);
        visit_borrowed_bytes(&'de [u8]);
        visit_byte_buf(Vec<u8>);
    }

    #[inline]
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_none::<Raised<E>>().map_err(lower)
    }

    #[inline]
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_unit::<Raised<E>>().map_err(lower)
    }

    #[inline]
    fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        self.0.visit_some(Proxy(de)).map_err(lower)
    }

    #[inline]
    fn visit_newtype_struct<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        self.0.visit_newtype_struct(Proxy(de)).map_err(lower)
    }

    #[inline]
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.0.visit_seq(Access(seq)).map_err(lower)
    }

    #[inline]
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.visit_map(Access(map)).map_err(lower)
    }

    #[inline]
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        self.0.visit_enum(Access(data)).map_err(lower)
    }
}

/// A seed whose deserializer is a [`Proxy`].
struct Seed<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
    type Value = S::Value;

    #[inline]
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(Proxy(de)).map_err(lower)
    }
}

/// A sequence, map, enum or variant access whose seeds and visitors are wrapped.
struct Access<A>(A);

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Access<A> {
    type Error = Raised<A::Error>;

    #[inline]
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Self::Error> {
        self.0.next_element_seed(Seed(seed)).map_err(lift)
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Access<A> {
    type Error = Raised<A::Error>;

    #[inline]
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Self::Error> {
        self.0.next_key_seed(Seed(seed)).map_err(lift)
    }

    #[inline]
    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, Self::Error> {
        self.0.next_value_seed(Seed(seed)).map_err(lift)
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Access<A> {
    type Error = Raised<A::Error>;
    type Variant = Access<A::Variant>;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self::Variant), Self::Error> {
        self.0.variant_seed(Seed(seed)).map(|(value, variant)| (value, Access(variant))).map_err(lift)
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Access<A> {
    type Error = Raised<A::Error>;

    fn unit_variant(self) -> Result<(), Self::Error> {
        self.0.unit_variant().map_err(lift)
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Self::Error> {
        self.0.newtype_variant_seed(Seed(seed)).map_err(lift)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Self::Error> {
        self.0.tuple_variant(len, Wrap(visitor)).map_err(lift)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.struct_variant(fields, Wrap(visitor)).map_err(lift)
    }
}
