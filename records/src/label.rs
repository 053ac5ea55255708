//! Short free-form labels (`rider_type`, `delivery_type`, `vehicle`): one shared copy per distinct
//! value, held by a 4-byte number.
//!
//! A million rows that name a handful of rider types and vehicles hold a handful of strings: each
//! row holds a [`Label`], the number of its value in a process-wide table. The first
//! [`TABLE_LIMIT`] distinct values are kept for the life of the process and read without a lock.
//! A value past them (only free strings in the input make so many) is counted by the labels that
//! hold it and freed with the last, so that such input cannot grow the table without end.
//!
//! Either way the table holds one number per text at any moment, so two labels are equal exactly
//! when their numbers are. A label is its text everywhere outside the process: it is ordered and
//! hashed by its text, and serialized as a string (a checkpoint holds the text, and a label
//! exchanged between the processes of a cluster is looked up again in the receiving process's
//! table).

use std::cell::RefCell;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How many distinct values the table keeps for the life of the process.
pub const TABLE_LIMIT: usize = 4096;

/// A short free-form label; see the [module](self).
pub struct Label(NonZeroU32);

/// The kept values, by number (the value of number `n` at `n - 1`): set once, under the table's
/// lock, and read without it.
static KEPT: [OnceLock<Box<str>>; TABLE_LIMIT] = [const { OnceLock::new() }; TABLE_LIMIT];

/// The numbers of the values, and the counted values past the kept ones.
#[derive(Debug, Default)]
struct Table {
    /// The kept values' numbers.
    kept: HashMap<&'static str, NonZeroU32>,
    /// The counted values' numbers.
    counted_by_text: HashMap<Arc<str>, NonZeroU32>,
    /// The counted values and how many labels hold each, by number (past [`TABLE_LIMIT`]).
    counted: Vec<Option<(Arc<str>, usize)>>,
    /// Places in `counted` that a freed value left.
    free: Vec<usize>,
}

/// The number of the `i`-th counted value.
fn counted_number(i: usize) -> NonZeroU32 {
    let n = u32::try_from(TABLE_LIMIT + 1 + i).expect("fewer than 4 billion labels are held");
    NonZeroU32::new(n).expect("past the kept values")
}

impl Table {
    /// The number of `text`, found or added; a counted value's count goes up by one.
    fn number(&mut self, text: &str) -> NonZeroU32 {
        if let Some(&n) = self.kept.get(text) {
            return n;
        }
        if self.kept.len() < TABLE_LIMIT {
            let i = self.kept.len();
            let kept: &'static str = KEPT[i].get_or_init(|| text.into());
            let n = NonZeroU32::new(i as u32 + 1).expect("numbers start at 1");
            self.kept.insert(kept, n);
            return n;
        }
        if let Some(&n) = self.counted_by_text.get(text) {
            self.hold(n);
            return n;
        }
        let text: Arc<str> = text.into();
        let i = match self.free.pop() {
            Some(i) => {
                self.counted[i] = Some((text.clone(), 1));
                i
            }
            None => {
                self.counted.push(Some((text.clone(), 1)));
                self.counted.len() - 1
            }
        };
        let n = counted_number(i);
        self.counted_by_text.insert(text, n);
        n
    }

    /// The place of counted number `n`.
    fn place(n: NonZeroU32) -> usize {
        n.get() as usize - TABLE_LIMIT - 1
    }

    /// One more label holds counted number `n`.
    fn hold(&mut self, n: NonZeroU32) {
        if let Some((_, holders)) = &mut self.counted[Self::place(n)] {
            *holders += 1;
        }
    }

    /// One label fewer holds counted number `n`; the last frees it.
    fn let_go(&mut self, n: NonZeroU32) {
        let i = Self::place(n);
        let Some((text, holders)) = &mut self.counted[i] else {
            return;
        };
        *holders -= 1;
        if *holders == 0 {
            self.counted_by_text.remove(text);
            self.counted[i] = None;
            self.free.push(i);
        }
    }

    /// The counted value of number `n`.
    fn counted_text(&self, n: NonZeroU32) -> Arc<str> {
        match &self.counted[Self::place(n)] {
            Some((text, _)) => text.clone(),
            None => unreachable!("a counted value is held while a label has its number"),
        }
    }

    /// How many counted values are held.
    fn counted_len(&self) -> usize {
        self.counted_by_text.len()
    }
}

/// The process-wide table.
fn table() -> MutexGuard<'static, Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// This thread's copy of the kept values' numbers: decoding finds a label without the lock.
    static NEAR: RefCell<HashMap<&'static str, NonZeroU32>> = RefCell::new(HashMap::new());
}

/// A label's text: a kept value, or a counted one held for as long as this is.
#[derive(Debug)]
pub enum Text {
    /// A kept value.
    Kept(&'static str),
    /// A counted value.
    Counted(Arc<str>),
}

impl std::ops::Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            Text::Kept(text) => text,
            Text::Counted(text) => text,
        }
    }
}

impl Label {
    /// The label of `text`.
    pub fn new(text: &str) -> Label {
        if let Some(n) = NEAR.with(|near| near.borrow().get(text).copied()) {
            return Label(n);
        }
        let n = table().number(text);
        if let Some(kept) = Self::kept(n) {
            NEAR.with(|near| near.borrow_mut().insert(kept, n));
        }
        Label(n)
    }

    /// The kept value of number `n`, if it is a kept one.
    fn kept(n: NonZeroU32) -> Option<&'static str> {
        let kept = KEPT.get(n.get() as usize - 1)?;
        Some(kept.get().expect("a kept number has its value"))
    }

    /// The text.
    pub fn text(&self) -> Text {
        match Self::kept(self.0) {
            Some(text) => Text::Kept(text),
            None => Text::Counted(table().counted_text(self.0)),
        }
    }

    /// Whether the value is one the table keeps for the life of the process.
    pub fn is_kept(&self) -> bool {
        self.0.get() as usize <= TABLE_LIMIT
    }

    /// How many values past the kept ones labels hold now, in this process.
    pub fn counted_values() -> usize {
        table().counted_len()
    }
}

impl Clone for Label {
    fn clone(&self) -> Label {
        if !self.is_kept() {
            table().hold(self.0);
        }
        Label(self.0)
    }
}

impl Drop for Label {
    fn drop(&mut self) {
        if !self.is_kept() {
            table().let_go(self.0);
        }
    }
}

impl From<&str> for Label {
    fn from(text: &str) -> Label {
        Label::new(text)
    }
}

/// One number per text: equal numbers, equal texts.
impl PartialEq for Label {
    fn eq(&self, other: &Label) -> bool {
        self.0 == other.0
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
        if self.0 == other.0 {
            return std::cmp::Ordering::Equal;
        }
        (*self.text()).cmp(&*other.text())
    }
}

impl std::hash::Hash for Label {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (*self.text()).hash(state);
    }
}

impl std::fmt::Debug for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.text(), f)
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

impl Serialize for Label {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text())
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
    fn one_number_per_value_and_ordered_by_text() {
        let (a, b) = (Label::new("CONNECT"), Label::from("CONNECT"));
        assert_eq!(a.0, b.0);
        let other = std::thread::spawn(|| Label::new("CONNECT"))
            .join()
            .expect("thread");
        assert_eq!(a.0, other.0, "one number across threads");
        assert_eq!(std::mem::size_of::<Option<Label>>(), 4);
        assert!(Label::new("B") > Label::new("A"), "by text, not by number");
        assert_ne!(Label::new("A"), Label::new("B"));
        assert_eq!(&*a.text(), "CONNECT");
        assert_eq!(a.to_string(), "CONNECT");
    }

    #[test]
    fn serialized_as_its_text() {
        let label = Label::new("MOTORCYCLE");
        let json = serde_json::to_string(&label).expect("json");
        assert_eq!(json, "\"MOTORCYCLE\"");
        let back: Label = serde_json::from_str(&json).expect("back");
        assert_eq!(back, label);
        assert_eq!(back.0, label.0);
    }

    /// The counted values, on a table of their own (the process-wide one keeps its first
    /// [`TABLE_LIMIT`] values for good: `tests/labels.rs` fills it in a process of its own).
    #[test]
    fn a_counted_value_is_freed_with_its_last_holder_and_its_place_reused() {
        let mut table = Table::default();
        // As if full: every later value is counted.
        for i in 0..TABLE_LIMIT {
            table.kept.insert(
                Box::leak(format!("k-{i}").into_boxed_str()),
                counted_number(0),
            );
        }
        let a = table.number("free-1");
        assert_eq!(table.number("free-1"), a, "one number per text");
        let b = table.number("free-2");
        assert_ne!(a, b);
        assert_eq!(&*table.counted_text(a), "free-1");
        table.let_go(a);
        assert_eq!(table.counted_len(), 2, "one holder left");
        table.let_go(a);
        assert_eq!(table.counted_len(), 1, "freed with its last holder");
        let c = table.number("free-3");
        assert_eq!(c, a, "the freed place is reused");
        assert_eq!(&*table.counted_text(c), "free-3");
        assert_eq!(&*table.counted_text(b), "free-2");
    }
}
