//! The riders of one view version: a restored checkpoint's (see [`CheckpointRiders`]) under a
//! persistent overlay of what changed since.
//!
//! A restarting process's stale view takes a whole checkpoint at once (a million riders), then a
//! trickle of changelog records: the checkpoint stays as it was loaded, and the changes go to the
//! overlay, which every version shares structurally. A view that never takes a checkpoint (the
//! live one) has an empty base and works on the overlay alone.

use std::sync::Arc;

use dongflow_connectors::Id;
use dongflow_dataflow::districts::DistrictId;
use dongflow_dataflow::types::Snapshot;

use super::seed::CheckpointRiders;
use super::FastMap;

/// The riders on shift of one view version. Cloning is O(1).
#[derive(Clone, Debug, Default)]
pub(super) struct Riders {
    base: Arc<CheckpointRiders>,
    /// Riders changed since the base: their snapshot, or `None` for a base rider gone. A B-tree,
    /// not a hash trie: its nodes are full arrays of entries, where the trie's are mostly empty
    /// slots, so it holds a rider in about a third of the bytes (docs/bench/README.md).
    overlay: imbl::OrdMap<Id, Option<Arc<Snapshot>>>,
    /// The overlay's riders on shift by district, sorted by id.
    overlay_by_district: FastMap<DistrictId, imbl::OrdSet<Id>>,
    /// Riders on shift in all.
    len: usize,
}

impl Riders {
    /// Whether there is no rider at all, in the base or the overlay.
    pub(super) fn is_blank(&self) -> bool {
        self.base.len() == 0 && self.overlay.is_empty()
    }

    /// Takes a checkpoint's riders as the base; only into blank riders.
    pub(super) fn fill(&mut self, riders: CheckpointRiders) {
        debug_assert!(self.is_blank());
        self.len = riders.len();
        self.base = Arc::new(riders);
    }

    /// Riders on shift.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// A rider's snapshot, if on shift.
    pub(super) fn get(&self, id: &Id) -> Option<Arc<Snapshot>> {
        match self.overlay.get(id) {
            Some(changed) => changed.clone(),
            None => self.base.get(id),
        }
    }

    /// Sets a rider's snapshot (`None`: off shift); returns the district it was on shift in. One
    /// overlay operation (and one for its district's list when the district changes): this is the
    /// live view's path for every change.
    pub(super) fn set(&mut self, id: Id, value: Option<Arc<Snapshot>>) -> Option<DistrictId> {
        let new_district = value.as_ref().map(|s| s.rider.district);
        let in_base = match self.base.len() {
            0 => None,
            _ => self.base.district_of(&id),
        };
        self.len += usize::from(value.is_some());
        let previous = match (value, in_base) {
            // Gone, and not in the base: nothing to hide.
            (None, None) => self.overlay.remove(&id),
            (value, _) => self.overlay.insert(id.clone(), value),
        };
        let old_overlay_district = previous
            .as_ref()
            .and_then(|p| Some(p.as_ref()?.rider.district));
        let old = match previous {
            Some(_) => old_overlay_district,
            None => in_base,
        };
        self.len -= usize::from(old.is_some());
        if old_overlay_district != new_district {
            if let Some(district) = old_overlay_district {
                if let Some(set) = self.overlay_by_district.get_mut(&district) {
                    set.remove(&id);
                    if set.is_empty() {
                        self.overlay_by_district.remove(&district);
                    }
                }
            }
            if let Some(district) = new_district {
                self.overlay_by_district
                    .entry(district)
                    .or_default()
                    .insert(id);
            }
        }
        old
    }

    /// Every rider on shift, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&Id, Arc<Snapshot>)> {
        let base = self
            .base
            .iter()
            .filter(|(id, _)| !self.overlay.contains_key(*id))
            .map(|(id, i)| (id, self.base.snapshot(i)));
        let overlay = self
            .overlay
            .iter()
            .filter_map(|(id, s)| Some((id, s.clone()?)));
        base.chain(overlay)
    }

    /// The riders on shift in `district`, sorted by id.
    pub(super) fn of_district(
        &self,
        district: DistrictId,
    ) -> impl Iterator<Item = (&Id, Arc<Snapshot>)> {
        let mut base = self
            .base
            .of_district(district)
            .filter(|(id, _)| !self.overlay.contains_key(*id))
            .map(|(id, i)| (id, self.base.snapshot(i)))
            .peekable();
        let mut overlay = self
            .overlay_by_district
            .get(&district)
            .into_iter()
            .flatten()
            .filter_map(|id| {
                let (id, s) = self.overlay.get_key_value(id)?;
                Some((id, s.clone()?))
            })
            .peekable();
        // Both sorted by id, and no id in both: merged.
        std::iter::from_fn(move || match (base.peek(), overlay.peek()) {
            (Some(b), Some(o)) if b.0 < o.0 => base.next(),
            (Some(_), Some(_)) => overlay.next(),
            (Some(_), None) => base.next(),
            (None, _) => overlay.next(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use dongflow_connectors::RiderStatus;
    use dongflow_dataflow::types::RiderRow;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::recovery::Restored;

    fn row(status: RiderStatus, district: DistrictId) -> RiderRow {
        RiderRow {
            status,
            rider_type: None,
            location: None.into(),
            district,
            ts: 1,
        }
    }

    fn snapshot(district: DistrictId) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            rider: row(RiderStatus::OnShift, district),
            deliveries: Box::default(),
        })
    }

    /// The same answers as a plain map of what was set.
    fn agrees(riders: &Riders, model: &BTreeMap<String, DistrictId>) {
        assert_eq!(riders.len(), model.len());
        let mut all: Vec<(String, DistrictId)> = riders
            .iter()
            .map(|(id, s)| (id.to_string(), s.rider.district))
            .collect();
        all.sort();
        let expected: Vec<(String, DistrictId)> =
            model.iter().map(|(id, d)| (id.clone(), *d)).collect();
        assert_eq!(all, expected);
        for district in 0..4 {
            let listed: Vec<String> = riders
                .of_district(district)
                .map(|(id, _)| id.to_string())
                .collect();
            let expected: Vec<String> = model
                .iter()
                .filter(|(_, d)| **d == district)
                .map(|(id, _)| id.clone())
                .collect();
            assert_eq!(listed, expected, "district {district}");
        }
        for id in 0..40 {
            let id = format!("r-{id:02}");
            let got = riders.get(&Id::from(id.as_str())).map(|s| s.rider.district);
            assert_eq!(got, model.get(&id).copied(), "{id}");
        }
    }

    /// A random rider id of 40, and a district of 4 or off shift.
    fn change(rng: &mut SmallRng) -> (String, Option<DistrictId>) {
        let id = format!("r-{:02}", rng.random_range(0..40));
        (id, rng.random_bool(0.8).then(|| rng.random_range(0..4)))
    }

    /// A checkpoint's riders (ids given out of order, twice, and off shift) and later changes (moves, ends,
    /// new riders, ends of riders not there) answer as a plain map would, and an older version
    /// keeps its answers: 500 random cases.
    #[test]
    fn a_base_under_an_overlay_answers_as_a_plain_map() {
        let mut rng = SmallRng::seed_from_u64(14);
        for _ in 0..500 {
            let mut model = BTreeMap::new();
            let mut riders = Riders::default();
            let set = |model: &mut BTreeMap<String, DistrictId>, id: String, d| match d {
                Some(d) => model.insert(id, d),
                None => model.remove(&id),
            };
            let (n_bulk, n_changes) = (rng.random_range(0..60), rng.random_range(0..80));
            let mut restored = Restored::default();
            for _ in 0..n_bulk {
                let (id, d) = change(&mut rng);
                set(&mut model, id.clone(), d);
                let row = match d {
                    Some(d) => row(RiderStatus::OnShift, d),
                    None => row(RiderStatus::ShiftEnded, 0),
                };
                restored.riders.entries.push((Id::from(id.as_str()), row));
            }
            riders.fill(CheckpointRiders::of(&Arc::new(restored)).0);
            agrees(&riders, &model);
            let before = (riders.clone(), model.clone());
            for _ in 0..n_changes {
                let (id, d) = change(&mut rng);
                let old = riders.set(Id::from(id.as_str()), d.map(snapshot));
                let expected_old = set(&mut model, id, d);
                assert_eq!(old, expected_old);
            }
            agrees(&riders, &model);
            agrees(&before.0, &before.1);
        }
    }
}
