//! A serving view's recent versions, for push feeds: what each version changed, key by key, kept
//! once a feed has asked for them and for a bounded while, so that a feed client reads the changes
//! after its last `as_of` from this one shared list (one fan-out per process, nothing per client),
//! and a client that falls behind what is held gets a fresh snapshot instead.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use dongflow_connectors::Id;
use dongflow_dataflow::districts::DistrictId;
use dongflow_dataflow::types::{DistrictCounts, Snapshot, Time};

/// How many changes (keys of all held versions) are held at most.
pub const HELD_CHANGES: usize = 100_000;
/// How long (dataflow ms) a version is held at most.
pub const HELD_MS: Time = 300_000;

/// A change as a version records it: the key's value after it (`None`: gone).
#[derive(Clone, Debug, PartialEq)]
pub enum Recorded {
    /// A district's counts.
    District(DistrictId, Option<DistrictCounts>),
    /// A rider's snapshot.
    Rider(Id, Option<Arc<Snapshot>>),
}

/// What one version of the view changed: each key once, with its value after it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Version {
    /// The version's `as_of`.
    pub as_of: Time,
    /// Districts whose counts changed (`None`: all zero now).
    pub districts: Vec<(DistrictId, Option<DistrictCounts>)>,
    /// Riders whose snapshot changed (`None`: off shift now).
    pub riders: Vec<(Id, Option<Arc<Snapshot>>)>,
}

impl Version {
    /// The version of `changes` (in the order applied: the last of a key wins) at `as_of`.
    pub fn of(changes: Vec<Recorded>, as_of: Time) -> Version {
        let mut districts: HashMap<DistrictId, Option<DistrictCounts>> = HashMap::new();
        let mut riders: HashMap<Id, Option<Arc<Snapshot>>> = HashMap::new();
        for change in changes {
            match change {
                Recorded::District(k, v) => {
                    districts.insert(k, v);
                }
                Recorded::Rider(k, v) => {
                    riders.insert(k, v);
                }
            }
        }
        Version {
            as_of,
            districts: districts.into_iter().collect(),
            riders: riders.into_iter().collect(),
        }
    }

    fn len(&self) -> usize {
        self.districts.len() + self.riders.len()
    }

    /// Several consecutive versions as one: each key's latest value, at the last one's `as_of`
    /// (what a client that fell behind receives: the same state as if it had applied each).
    pub fn fold(versions: &[Arc<Version>]) -> Version {
        let mut districts: HashMap<DistrictId, Option<DistrictCounts>> = HashMap::new();
        let mut riders: HashMap<Id, Option<Arc<Snapshot>>> = HashMap::new();
        for v in versions {
            districts.extend(v.districts.iter().cloned());
            riders.extend(v.riders.iter().cloned());
        }
        Version {
            as_of: versions.last().map_or(0, |v| v.as_of),
            districts: districts.into_iter().collect(),
            riders: riders.into_iter().collect(),
        }
    }
}

/// The held versions.
#[derive(Debug, Default)]
pub struct History {
    /// Whether versions are recorded (from the first feed on).
    recording: bool,
    versions: VecDeque<Arc<Version>>,
    /// Changes in `versions`.
    held: usize,
    /// Every version after this `as_of` is held.
    complete_after: Time,
}

impl History {
    /// Starts recording, if not yet, from the view's current `as_of`.
    pub fn record_from(&mut self, as_of: Time) {
        if !self.recording {
            self.recording = true;
            self.complete_after = as_of;
        }
    }

    /// Whether versions are recorded.
    pub fn recording(&self) -> bool {
        self.recording
    }

    /// Adds a version (when it changed anything) and forgets the oldest beyond the bounds.
    pub fn push(&mut self, version: Version) {
        if !self.recording || version.len() == 0 {
            return;
        }
        let newest = version.as_of;
        self.held += version.len();
        self.versions.push_back(Arc::new(version));
        while let Some(oldest) = self.versions.front() {
            let too_many = self.held > HELD_CHANGES && self.versions.len() > 1;
            if !(too_many || oldest.as_of + HELD_MS < newest) {
                break;
            }
            self.held -= oldest.len();
            self.complete_after = oldest.as_of;
            self.versions.pop_front();
        }
    }

    /// The versions after `as_of`, oldest first; `None` when some of them are no longer held
    /// (or were never recorded).
    pub fn since(&self, as_of: Time) -> Option<Vec<Arc<Version>>> {
        if !self.recording || as_of < self.complete_after {
            return None;
        }
        let start = self.versions.partition_point(|v| v.as_of <= as_of);
        Some(self.versions.range(start..).cloned().collect())
    }

    /// Versions and changes held, for `/metrics`.
    pub fn held(&self) -> (usize, usize) {
        (self.versions.len(), self.held)
    }

    /// Forgets every version (the view let its contents go): nothing before now can be resumed.
    pub fn clear(&mut self, as_of: Time) {
        self.versions.clear();
        self.held = 0;
        self.complete_after = as_of;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn district(as_of: Time, keys: &[(DistrictId, u64)]) -> Version {
        let changes = keys
            .iter()
            .map(|&(k, n)| {
                let counts = DistrictCounts {
                    riders_on_shift: n,
                    ..DistrictCounts::default()
                };
                Recorded::District(k, (n > 0).then_some(counts))
            })
            .collect();
        Version::of(changes, as_of)
    }

    #[test]
    fn versions_are_held_from_the_first_feed_and_bounded() {
        let mut h = History::default();
        h.push(district(5, &[(1, 1)]));
        assert_eq!(h.since(0), None, "nothing recorded before a feed asked");
        h.record_from(5);
        h.push(district(6, &[(1, 2), (1, 3)]));
        h.push(district(7, &[]));
        h.push(district(8, &[(2, 1)]));
        let since = h.since(5).expect("held");
        assert_eq!(since.iter().map(|v| v.as_of).collect::<Vec<_>>(), [6, 8]);
        assert_eq!(
            since[0].districts.len(),
            1,
            "one change per key and version"
        );
        assert_eq!(h.since(4), None, "before recording began");
        let folded = Version::fold(&since);
        assert_eq!(folded.as_of, 8);
        assert_eq!(folded.districts.len(), 2);
        // Held for HELD_MS at most.
        h.push(district(8 + HELD_MS + 1, &[(3, 1)]));
        assert_eq!(h.since(5), None, "6 and 8 are forgotten");
        assert_eq!(h.since(8).map(|v| v.len()), Some(1));
        assert_eq!(h.held(), (1, 1));
    }

    #[test]
    fn at_most_held_changes_are_held() {
        let mut h = History::default();
        h.record_from(0);
        let many: Vec<(DistrictId, u64)> = (0..1_000).map(|k| (k, 1)).collect();
        for t in 1..=(HELD_CHANGES / 1_000 + 5) as Time {
            h.push(district(t, &many));
        }
        let (versions, changes) = h.held();
        assert!(changes <= HELD_CHANGES, "{changes}");
        assert_eq!(versions, HELD_CHANGES / 1_000);
        assert_eq!(h.since(1), None);
    }
}
