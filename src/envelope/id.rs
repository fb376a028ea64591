//! The message id: text shared, not copied.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::Serialize;

/// A message id: the record key, as text.
///
/// It reads like a `&str` (it dereferences to one, compares with `&str` and
/// `String`, prints as itself) and clones without copying the text: a
/// consumed message's id and the `key` of its ref are one allocation, and a
/// message derived from it shares that too.
///
/// ```
/// use kafka_batch::{Message, MessageId};
///
/// let input = Message::new("event-1", 1);
/// assert_eq!(input.id, "event-1");
/// assert!(input.id.starts_with("event"));
///
/// let id: MessageId = format!("event-{}", 2).into();
/// let ids: std::collections::HashSet<MessageId> = [id.clone()].into();
/// assert!(ids.contains("event-2"));
/// assert_eq!(id.to_string(), "event-2");
/// ```
#[derive(Clone, Default)]
pub struct MessageId(
    /// `None` for the empty id: no allocation, and no reference count shared
    /// by every empty id (`Arc<str>::default()` is one static), which the
    /// poller and the handler's thread would both write for every message.
    Option<Arc<str>>,
);

impl MessageId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or("")
    }
}

impl Deref for MessageId {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for MessageId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for MessageId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

// Compared, hashed and ordered as its text (as `Borrow<str>` requires).
impl PartialEq for MessageId {
    fn eq(&self, other: &MessageId) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for MessageId {}

impl std::hash::Hash for MessageId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for MessageId {
    fn partial_cmp(&self, other: &MessageId) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for MessageId {
    fn cmp(&self, other: &MessageId) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<&str> for MessageId {
    fn from(id: &str) -> Self {
        MessageId((!id.is_empty()).then(|| id.into()))
    }
}

impl From<&String> for MessageId {
    fn from(id: &String) -> Self {
        MessageId::from(id.as_str())
    }
}

impl From<String> for MessageId {
    fn from(id: String) -> Self {
        MessageId((!id.is_empty()).then(|| id.into()))
    }
}

impl From<&MessageId> for MessageId {
    fn from(id: &MessageId) -> Self {
        id.clone()
    }
}

impl From<Arc<str>> for MessageId {
    fn from(id: Arc<str>) -> Self {
        MessageId((!id.is_empty()).then_some(id))
    }
}

impl From<MessageId> for String {
    fn from(id: MessageId) -> Self {
        id.as_str().to_owned()
    }
}

impl PartialEq<str> for MessageId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for MessageId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for MessageId {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<MessageId> for str {
    fn eq(&self, other: &MessageId) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<MessageId> for &str {
    fn eq(&self, other: &MessageId) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<MessageId> for String {
    fn eq(&self, other: &MessageId) -> bool {
        self == other.as_str()
    }
}

impl Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(IdVisitor)
    }
}

/// Builds the id straight from the text the deserializer has, with no
/// `String` in between.
struct IdVisitor;

impl serde::de::Visitor<'_> for IdVisitor {
    type Value = MessageId;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a message id (a string)")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<MessageId, E> {
        Ok(MessageId::from(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_compares_hashes_and_orders_as_its_text() {
        let id = MessageId::from("b");
        assert_eq!(id, "b");
        assert_eq!("b", id);
        assert_eq!(id, String::from("b"));
        assert_ne!(id, "a");
        let mut sorted = [id.clone(), "c".into(), "a".into()];
        sorted.sort();
        assert_eq!(sorted, ["a", "b", "c"]);
        assert_eq!(format!("{id} {id:?}"), r#"b "b""#);
        let set: std::collections::HashSet<MessageId> = [id.clone()].into();
        assert!(set.contains("b"));
        assert_eq!(String::from(id), "b");
        let empty = [MessageId::default(), "".into(), String::new().into()];
        assert!(empty.iter().all(|e| e.is_empty() && *e == empty[0]));
        assert_eq!(empty[0].as_str(), "");
        assert!(empty[0] < sorted[0], "the empty id sorts first");
    }

    #[test]
    fn an_id_is_a_json_string() {
        let id: MessageId = serde_json::from_str(r#""a\"b""#).unwrap();
        assert_eq!(id, "a\"b");
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""a\"b""#);
        let not_text = serde_json::from_str::<MessageId>("1").unwrap_err();
        assert!(not_text.to_string().contains("a message id"), "{not_text}");
    }
}
