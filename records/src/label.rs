//! Short free-form labels (`rider_type`, `delivery_type`, `vehicle`): one shared allocation per
//! distinct value, held by an 8-byte handle.
//!
//! A million rows that name a handful of rider types and vehicles hold a handful of strings: each
//! row holds a [`Label`], a pointer to the one copy of its value that the process-wide table keeps.
//! The table keeps at most [`TABLE_LIMIT`] values, so that free strings in the input cannot grow it
//! without end: a value past that gets an allocation of its own, freed with its last row, and is
//! equal to any other label of the same text all the same.
//!
//! A label is its text everywhere outside the process: it is compared, ordered and hashed by its text,
//! and serialized as a string (a checkpoint holds the text, and a label exchanged between the
//! processes of a cluster is looked up again in the receiving process's table).

use std::borrow::Borrow;
use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How many distinct values the table keeps.
pub const TABLE_LIMIT: usize = 4096;

/// A short free-form label; see the [module](self).
#[derive(Clone)]
pub struct Label(Arc<Box<str>>);

/// The one shared copy of each value, up to a limit (found by its text: see `Borrow<str>`).
#[derive(Debug)]
struct Table {
    limit: usize,
    values: HashSet<Label>,
}

impl Table {
    /// The label of `text`, and whether the table keeps it (it does while it has room).
    fn label(&mut self, text: &str) -> (Label, bool) {
        if let Some(found) = self.values.get(text) {
            return (found.clone(), true);
        }
        let label = Label(Arc::new(text.into()));
        if self.values.len() >= self.limit {
            return (label, false);
        }
        self.values.insert(label.clone());
        (label, true)
    }
}

/// The process-wide table.
fn table() -> &'static Mutex<Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE.get_or_init(|| {
        Mutex::new(Table {
            limit: TABLE_LIMIT,
            values: HashSet::new(),
        })
    })
}

thread_local! {
    /// This thread's copies of the table's handles: decoding looks a label up without the lock.
    static NEAR: RefCell<HashSet<Label>> = RefCell::new(HashSet::new());
}

impl Label {
    /// The label of `text`: the table's shared copy, added if the table has room.
    pub fn new(text: &str) -> Label {
        if let Some(found) = NEAR.with(|near| near.borrow().get(text).cloned()) {
            return found;
        }
        let (label, kept) = table()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .label(text);
        if kept {
            NEAR.with(|near| near.borrow_mut().insert(label.clone()));
        }
        label
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Label {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

/// A label is found by its text in a set of labels: it hashes and compares as its text.
impl Borrow<str> for Label {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Label {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Label {
    fn from(text: &str) -> Label {
        Label::new(text)
    }
}

impl PartialEq for Label {
    fn eq(&self, other: &Label) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.as_str() == other.as_str()
    }
}

impl Eq for Label {}

impl PartialOrd for Label {
    fn partial_cmp(&self, other: &Label) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Label {
    fn cmp(&self, other: &Label) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl std::hash::Hash for Label {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl std::fmt::Debug for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Label {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Label {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Label, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Label;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Label, E> {
                Ok(Label::new(text))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_value_and_equal_by_text() {
        let (a, b) = (Label::new("CONNECT"), Label::from("CONNECT"));
        assert!(Arc::ptr_eq(&a.0, &b.0));
        let other = std::thread::spawn(|| Label::new("CONNECT"))
            .join()
            .expect("thread");
        assert!(Arc::ptr_eq(&a.0, &other.0), "one copy across threads");
        assert_eq!(std::mem::size_of::<Option<Label>>(), 8);
        assert!(Label::new("A") < Label::new("B"));
        assert_ne!(Label::new("A"), Label::new("B"));
    }

    #[test]
    fn a_full_table_still_gives_labels_equal_by_text() {
        let mut table = Table {
            limit: 2,
            values: HashSet::new(),
        };
        let (a, kept_a) = table.label("A");
        let (_, kept_b) = table.label("B");
        let (past, kept_past) = table.label("past-the-limit");
        let (again, kept_again) = table.label("past-the-limit");
        assert_eq!(
            (kept_a, kept_b, kept_past, kept_again),
            (true, true, false, false)
        );
        assert!(
            Arc::ptr_eq(&a.0, &table.label("A").0 .0),
            "kept values stay shared"
        );
        assert!(!Arc::ptr_eq(&past.0, &again.0), "not kept once full");
        assert_eq!(past, again);
        assert_eq!(past.cmp(&again), std::cmp::Ordering::Equal);
        assert_eq!(&*past, "past-the-limit");
        assert_eq!(table.values.len(), 2);
    }

    #[test]
    fn serialized_as_its_text() {
        let label = Label::new("MOTORCYCLE");
        let json = serde_json::to_string(&label).expect("json");
        assert_eq!(json, "\"MOTORCYCLE\"");
        let back: Label = serde_json::from_str(&json).expect("back");
        assert_eq!(back, label);
        assert!(Arc::ptr_eq(&back.0, &label.0));
    }
}
