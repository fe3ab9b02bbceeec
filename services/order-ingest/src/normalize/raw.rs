//! A typed, lenient view of a Magento order: only the fields Elo reads, borrowed from the
//! request body where the JSON has no escapes.
//!
//! Why not `serde_json::Value`: the push path paid for a whole tree per webhook (a `String`
//! per key, a `BTreeMap` per object, every unread field kept, then all of it dropped), most of
//! what order-ingest spent per request. Why not plain derived structs: Magento is loose with
//! types (ids as numbers or strings, `region` as text or an object, amounts omitted), and a
//! payload with a wrong type must still give the same [`NormalizeError`] naming the field as
//! before, so every leaf is a [`Scalar`] judged by the normaliser, and every object that could
//! be something else is [`Lenient`]. The same view reads a parsed `Value` (poll, refetch), so
//! every path shares one normaliser and one event id per fact.
//!
//! [`NormalizeError`]: super::NormalizeError

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, de::value::MapAccessDeserializer};

/// One JSON leaf, whatever its type; containers are only noted.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) enum Scalar<'a> {
    /// Absent fields read as null.
    #[default]
    Null,
    Str(Cow<'a, str>),
    Int(i64),
    /// An integer beyond `i64`.
    BigUint(u64),
    /// Only from callers that did not read the JSON losslessly (fractions arrive as text).
    Float(f64),
    Bool(bool),
    /// An object or an array where a leaf was expected.
    Compound,
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for ScalarVisitor<'a> {
            type Value = Scalar<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Scalar::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(i64::try_from(v).map_or(Scalar::BigUint(v), Scalar::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar::Compound)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar::Compound)
            }
        }
        deserializer.deserialize_any(ScalarVisitor(PhantomData))
    }
}

impl Scalar<'_> {
    /// Non-empty text.
    pub(crate) fn text(&self) -> Option<&str> {
        match self {
            Self::Str(s) if !s.is_empty() => Some(s),
            _ => None,
        }
    }

    /// An integer given as a number or as its text.
    pub(crate) fn int(&self) -> Option<i64> {
        match self {
            Self::Int(i) => Some(*i),
            Self::Str(s) => s.parse().ok(),
            _ => None,
        }
    }
}

/// An object of type `T`, or nothing when the JSON holds anything else there.
#[derive(Debug)]
pub(crate) struct Lenient<T>(pub Option<T>);

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LenientVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for LenientVisitor<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(|t| Lenient(Some(t)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Lenient(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                Lenient::deserialize(d)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
        }
        deserializer.deserialize_any(LenientVisitor(PhantomData))
    }
}

/// A list of `T`, or nothing when the JSON holds anything else there.
#[derive(Debug)]
pub(crate) struct LenientList<T>(pub Option<Vec<T>>);

impl<T> Default for LenientList<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for LenientList<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ListVisitor<T> {
            type Value = LenientList<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(4));
                while let Some(item) = seq.next_element::<T>()? {
                    out.push(item);
                }
                Ok(LenientList(Some(out)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(LenientList(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                LenientList::deserialize(d)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(LenientList(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(LenientList(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(LenientList(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(LenientList(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(LenientList(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(LenientList(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(LenientList(None))
            }
        }
        deserializer.deserialize_any(ListVisitor(PhantomData))
    }
}

/// An object of type `T`, or `T`'s default (no fields) when the JSON holds anything else: list
/// elements that are not objects then fail on the field the normaliser needs, by name.
#[derive(Debug, Default)]
pub(crate) struct OrEmpty<T>(pub T);

impl<'de, T: Deserialize<'de> + Default> Deserialize<'de> for OrEmpty<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Lenient::<T>::deserialize(deserializer).map(|l| OrEmpty(l.0.unwrap_or_default()))
    }
}

/// The fields of a Magento sales order Elo reads (`GET /V1/orders/{id}`, a search page's
/// item, an Adobe Commerce webhook's `order`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawOrder<'a> {
    #[serde(borrow)]
    pub entity_id: Scalar<'a>,
    #[serde(borrow)]
    pub increment_id: Scalar<'a>,
    #[serde(borrow)]
    pub created_at: Scalar<'a>,
    #[serde(borrow)]
    pub updated_at: Scalar<'a>,
    #[serde(borrow)]
    pub state: Scalar<'a>,
    #[serde(borrow)]
    pub status: Scalar<'a>,
    #[serde(borrow)]
    pub store_id: Scalar<'a>,
    #[serde(borrow)]
    pub order_currency_code: Scalar<'a>,
    #[serde(borrow)]
    pub customer_email: Scalar<'a>,
    #[serde(borrow)]
    pub customer_is_guest: Scalar<'a>,
    #[serde(borrow)]
    pub customer_id: Scalar<'a>,
    #[serde(borrow)]
    pub customer_firstname: Scalar<'a>,
    #[serde(borrow)]
    pub customer_lastname: Scalar<'a>,
    #[serde(borrow)]
    pub customer_group_id: Scalar<'a>,
    #[serde(borrow)]
    pub grand_total: Scalar<'a>,
    #[serde(borrow)]
    pub subtotal: Scalar<'a>,
    #[serde(borrow)]
    pub tax_amount: Scalar<'a>,
    #[serde(borrow)]
    pub shipping_amount: Scalar<'a>,
    #[serde(borrow)]
    pub discount_amount: Scalar<'a>,
    #[serde(borrow)]
    pub items: LenientList<OrEmpty<RawItem<'a>>>,
    #[serde(borrow)]
    pub billing_address: Lenient<RawAddress<'a>>,
    #[serde(borrow)]
    pub payment: Lenient<RawPayment<'a>>,
    #[serde(borrow)]
    pub extension_attributes: Lenient<RawExtension<'a>>,
}

/// One order line.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawItem<'a> {
    #[serde(borrow)]
    pub item_id: Scalar<'a>,
    #[serde(borrow)]
    pub parent_item_id: Scalar<'a>,
    #[serde(borrow)]
    pub product_id: Scalar<'a>,
    #[serde(borrow)]
    pub product_type: Scalar<'a>,
    #[serde(borrow)]
    pub sku: Scalar<'a>,
    #[serde(borrow)]
    pub name: Scalar<'a>,
    #[serde(borrow)]
    pub qty_ordered: Scalar<'a>,
    #[serde(borrow)]
    pub price: Scalar<'a>,
    #[serde(borrow)]
    pub row_total: Scalar<'a>,
    #[serde(borrow)]
    pub tax_amount: Scalar<'a>,
    #[serde(borrow)]
    pub discount_amount: Scalar<'a>,
}

/// A billing or shipping address.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawAddress<'a> {
    #[serde(borrow)]
    pub firstname: Scalar<'a>,
    #[serde(borrow)]
    pub lastname: Scalar<'a>,
    #[serde(borrow)]
    pub street: LenientList<Scalar<'a>>,
    #[serde(borrow)]
    pub city: Scalar<'a>,
    /// Text, or an object `{"region": ...}` (Magento's region data object).
    #[serde(borrow)]
    pub region: RegionField<'a>,
    #[serde(borrow)]
    pub region_code: Scalar<'a>,
    #[serde(borrow)]
    pub postcode: Scalar<'a>,
    #[serde(borrow)]
    pub country_id: Scalar<'a>,
    #[serde(borrow)]
    pub telephone: Scalar<'a>,
}

/// `region`: a plain string or Magento's `{"region": "...", "region_code": ...}` object.
#[derive(Debug, Default)]
pub(crate) struct RegionField<'a>(pub Option<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for RegionField<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either<'b> {
            #[serde(borrow)]
            Object(RegionObject<'b>),
            #[serde(borrow)]
            Leaf(Scalar<'b>),
        }
        #[derive(Default, Deserialize)]
        #[serde(default)]
        struct RegionObject<'b> {
            #[serde(borrow)]
            region: Scalar<'b>,
        }
        // Untagged buffers the value; a region is a few bytes, so that costs nothing.
        Ok(match Either::<'a>::deserialize(deserializer)? {
            Either::Leaf(Scalar::Str(s)) => RegionField(Some(s)),
            Either::Object(RegionObject { region: Scalar::Str(s) }) if !s.is_empty() => RegionField(Some(s)),
            _ => RegionField(None),
        })
    }
}

/// `payment.method`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawPayment<'a> {
    #[serde(borrow)]
    pub method: Scalar<'a>,
}

/// `extension_attributes.shipping_assignments[0].shipping`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawExtension<'a> {
    #[serde(borrow)]
    pub shipping_assignments: LenientList<OrEmpty<RawAssignment<'a>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawAssignment<'a> {
    #[serde(borrow)]
    pub shipping: Lenient<RawShipping<'a>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawShipping<'a> {
    #[serde(borrow)]
    pub address: Lenient<RawAddress<'a>>,
    #[serde(borrow)]
    pub method: Scalar<'a>,
}

impl<'a> RawOrder<'a> {
    /// The view of an already parsed order (poll pages, refetches); anything that is not an
    /// object reads as an order without fields.
    pub(crate) fn of_value(value: &'a serde_json::Value) -> Self {
        Lenient::<RawOrder<'a>>::deserialize(value).ok().and_then(|l| l.0).unwrap_or_default()
    }

    /// The first shipping assignment's shipping, when there is one.
    pub(crate) fn shipping(&self) -> Option<&RawShipping<'a>> {
        let assignments = self.extension_attributes.0.as_ref()?.shipping_assignments.0.as_ref()?;
        assignments.first()?.0.shipping.0.as_ref()
    }
}
