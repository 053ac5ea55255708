//! The riders of one view version: a restored checkpoint's (see [`CheckpointRiders`]) under what
//! changed since ([`Versions`], shared by every version, each value marked with the version that
//! wrote it).
//!
//! A restarting process's stale view takes a whole checkpoint at once (a million riders), then a
//! trickle of changelog records: the checkpoint stays as it was loaded, and the changes go over it.
//! A view that never takes a checkpoint (the live one) has an empty base and works on the changes
//! alone.

use std::sync::Arc;

use dongflow_connectors::Id;
use dongflow_dataflow::districts::DistrictId;
use dongflow_dataflow::types::Snapshot;

use super::seed::CheckpointRiders;
use super::versions::{Pin, Versions};
use super::FastMap;

/// The riders on shift of one view version. Cloning is O(1) and gives the same version; the writer
/// makes the next one with [`Riders::next_version`].
#[derive(Clone, Debug)]
pub(super) struct Riders {
    base: Arc<CheckpointRiders>,
    /// Riders changed since the base, in every version: their snapshot, or `None` for a rider
    /// gone (a base rider hidden, or one that was changed since). Shared by all versions.
    changed: Arc<Versions>,
    /// The version this is, held while it is.
    pin: Arc<Pin>,
    /// The oldest version held when this one was made: what no version from it on reads may go.
    floor: u64,
    /// The changed riders on shift, by district, sorted by id.
    overlay_by_district: FastMap<DistrictId, imbl::OrdSet<Id>>,
    /// Riders on shift in all.
    len: usize,
}

impl Default for Riders {
    fn default() -> Self {
        let changed = Arc::new(Versions::default());
        let pin = changed.pin(0);
        Self {
            base: Arc::default(),
            changed,
            pin,
            floor: 0,
            overlay_by_district: FastMap::default(),
            len: 0,
        }
    }
}

impl Riders {
    /// Whether there is no rider at all, in the base or changed.
    pub(super) fn is_blank(&self) -> bool {
        self.base.len() == 0 && self.changed.is_empty()
    }

    /// Takes a checkpoint's riders as the base; only into blank riders.
    pub(super) fn fill(&mut self, riders: CheckpointRiders) {
        debug_assert!(self.is_blank());
        self.len = riders.len();
        self.base = Arc::new(riders);
    }

    /// The next version, to write to: what this one reads, until changed. Making it also forgets,
    /// a shard at a time, the riders gone that hide nothing (see [`Versions::forget_gone`]).
    pub(super) fn next_version(&self) -> Riders {
        let version = self.pin.version() + 1;
        let pin = self.changed.pin(version);
        let floor = self.changed.floor().unwrap_or(version);
        let base = &self.base;
        self.changed.forget_gone(floor, |id| {
            base.len() == 0 || base.district_of(id).is_none()
        });
        Riders {
            base: self.base.clone(),
            changed: self.changed.clone(),
            pin,
            floor,
            overlay_by_district: self.overlay_by_district.clone(),
            len: self.len,
        }
    }

    /// Drops the values that no version still held reads, once this version is the one shown (the
    /// one before may have been let go with it).
    pub(super) fn let_go(&self) {
        let floor = self.changed.floor().unwrap_or(self.pin.version());
        self.changed.prune(floor);
    }

    /// Riders on shift.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// A rider's snapshot, if on shift.
    pub(super) fn get(&self, id: &Id) -> Option<Arc<Snapshot>> {
        match self.changed.get(id, self.pin.version()) {
            Some(changed) => changed,
            None => self.base.get(id),
        }
    }

    /// Sets a rider's snapshot (`None`: off shift); returns the district it was on shift in. One
    /// write of one entry (and one change of its district's list when the district changes): this
    /// is the live view's path for every change.
    pub(super) fn set(&mut self, id: Id, value: Option<Arc<Snapshot>>) -> Option<DistrictId> {
        let new_district = value.as_ref().map(|s| s.rider.district);
        let in_base = match self.base.len() {
            0 => None,
            _ => self.base.district_of(&id),
        };
        self.len += usize::from(value.is_some());
        let latest = self.changed.latest(&id);
        // Gone, never changed and not in the base: nothing to write.
        if value.is_some() || in_base.is_some() || latest.is_some() {
            self.changed
                .write(&id, value, self.pin.version(), self.floor);
        }
        // The value changed before, if any: a rider gone that hides no base rider is as if never
        // changed.
        let previous = latest.filter(|p| p.is_some() || in_base.is_some());
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
    pub(super) fn iter(&self) -> impl Iterator<Item = (Id, Arc<Snapshot>)> + '_ {
        let at = self.pin.version();
        let base = self
            .base
            .iter()
            .filter(move |(id, _)| !self.changed.has(id, at))
            .map(|(id, i)| (id.clone(), self.base.snapshot(i)));
        base.chain(self.changed.all_at(at))
    }

    /// The riders on shift in `district`, sorted by id.
    pub(super) fn of_district(
        &self,
        district: DistrictId,
    ) -> impl Iterator<Item = (&Id, Arc<Snapshot>)> {
        let at = self.pin.version();
        let mut base = self
            .base
            .of_district(district)
            .filter(move |(id, _)| !self.changed.has(id, at))
            .map(|(id, i)| (id, self.base.snapshot(i)))
            .peekable();
        let mut overlay = self
            .overlay_by_district
            .get(&district)
            .into_iter()
            .flatten()
            .filter_map(move |id| Some((id, self.changed.get(id, at)??)))
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
    /// keeps its answers while it is held, whatever later versions change and whichever
    /// versions are let go: 500 random cases.
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
            // Versions held by readers, some dropped along the way (so values are swept and pruned).
            let mut held = vec![(riders.clone(), model.clone())];
            let mut riders = riders.next_version();
            for _ in 0..n_changes {
                let (id, d) = change(&mut rng);
                let old = riders.set(Id::from(id.as_str()), d.map(snapshot));
                let expected_old = set(&mut model, id, d);
                assert_eq!(old, expected_old);
                if rng.random_bool(0.2) {
                    held.push((riders.clone(), model.clone()));
                    riders = riders.next_version();
                }
                if rng.random_bool(0.1) && !held.is_empty() {
                    held.remove(rng.random_range(0..held.len()));
                }
            }
            agrees(&riders, &model);
            for (version, model) in &held {
                agrees(version, model);
            }
        }
    }
}
