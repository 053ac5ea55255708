//! A restored checkpoint as the stale view's base: the snapshots and counts the dataflow computes
//! from the same upsert state, through the same rules (`DeliveryRow::active_for`,
//! `DeliveryRow::waiting_in`, `Contribution::of_rider`, `DistrictCounts::add`), so that a stale view
//! seeded from a checkpoint answers what the live state will.
//!
//! Nothing per rider is built at a restart: a rider's snapshot is made from its checkpoint row
//! when an answer asks for it. Building a million snapshots and inserting them into maps cost most
//! of the time to the first answer, and letting them go again as long; this costs one pass over
//! the checkpoint for the counts and two indexes (the riders on shift, sorted by id and by
//! district, as positions in the checkpoint).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use dongflow_connectors::Id;
use dongflow_dataflow::districts::DistrictId;
use dongflow_dataflow::stages::DeliveryState;
use dongflow_dataflow::types::{
    Change, Contribution, DeliveryBrief, DistrictCounts, RiderRow, Snapshot,
};
use rustc_hash::FxBuildHasher;

use super::ViewChange;
use crate::recovery::Restored;

/// The riders on shift of a restored checkpoint (by default, of an empty one).
#[derive(Debug, Default)]
pub(super) struct CheckpointRiders {
    restored: Arc<Restored>,
    /// Positions in the checkpoint's rider entries of the riders on shift, sorted by id (each id
    /// once).
    on_shift: Vec<u32>,
    /// The same by district, each sorted by id.
    by_district: HashMap<DistrictId, Vec<u32>, FxBuildHasher>,
    /// Each rider's active deliveries, sorted by delivery id.
    active: HashMap<Id, Vec<DeliveryBrief>, FxBuildHasher>,
}

impl CheckpointRiders {
    /// The riders of `restored`, and the counts of every district with a nonzero count as changes
    /// at its time.
    pub(super) fn of(restored: &Arc<Restored>) -> (CheckpointRiders, Vec<ViewChange>) {
        let time = restored.time;
        let mut counts: BTreeMap<DistrictId, DistrictCounts> = BTreeMap::new();
        let mut active: HashMap<Id, Vec<DeliveryBrief>, FxBuildHasher> = HashMap::default();
        for (id, state) in &restored.deliveries.entries {
            let DeliveryState::Live(row) = state else {
                continue;
            };
            if let Some(district) = row.waiting_in() {
                counts
                    .entry(district)
                    .or_default()
                    .add(Contribution::Waiting, 1);
            }
            if let Some(rider) = row.active_for() {
                active
                    .entry(rider.clone())
                    .or_default()
                    .push(row.brief(id.clone()));
            }
        }
        for deliveries in active.values_mut() {
            deliveries.sort_by(|a, b| a.delivery_id.cmp(&b.delivery_id));
        }
        let entries = &restored.riders.entries;
        // Loading sorts the entries by id; sorted here all the same (linear when they are), and
        // of an id given twice the later entry counts.
        let mut on_shift: Vec<u32> = (0..entries.len() as u32).collect();
        on_shift.sort_by(|a, b| entries[*a as usize].0.cmp(&entries[*b as usize].0));
        let mut kept: Vec<u32> = Vec::with_capacity(on_shift.len());
        for i in on_shift {
            match kept.last_mut() {
                Some(last) if entries[*last as usize].0 == entries[i as usize].0 => *last = i,
                _ => kept.push(i),
            }
        }
        kept.retain(|i| entries[*i as usize].1.status.on_shift());
        let mut by_district: HashMap<DistrictId, Vec<u32>, FxBuildHasher> = HashMap::default();
        for &i in &kept {
            let (id, row) = &entries[i as usize];
            by_district.entry(row.district).or_default().push(i);
            let delivering = active.get(id).map_or(0, Vec::len);
            for ((district, kind), n) in Contribution::of_rider(row.district, delivering) {
                counts.entry(district).or_default().add(kind, n);
            }
        }
        // Deliveries of riders who are not on shift count nowhere, as in the dataflow's snapshot
        // stage.
        let districts = counts
            .into_iter()
            .filter(|(_, c)| !c.is_zero())
            .map(|(key, value)| {
                ViewChange::District(Change {
                    key,
                    value: Some(value),
                    time,
                })
            })
            .collect();
        let riders = CheckpointRiders {
            restored: restored.clone(),
            on_shift: kept,
            by_district,
            active,
        };
        (riders, districts)
    }

    fn entry(&self, i: u32) -> &(Id, RiderRow) {
        &self.restored.riders.entries[i as usize]
    }

    /// The snapshot of the rider at position `i`.
    pub(super) fn snapshot(&self, i: u32) -> Arc<Snapshot> {
        let (id, row) = self.entry(i);
        let snapshot = Snapshot {
            rider: row.clone(),
            deliveries: self.active.get(id).cloned().unwrap_or_default().into(),
        };
        Arc::new(snapshot)
    }

    fn position(&self, id: &Id) -> Option<u32> {
        let at = self
            .on_shift
            .binary_search_by(|i| self.entry(*i).0.cmp(id))
            .ok()?;
        Some(self.on_shift[at])
    }

    /// Riders on shift.
    pub(super) fn len(&self) -> usize {
        self.on_shift.len()
    }

    /// A rider's snapshot, if on shift.
    pub(super) fn get(&self, id: &Id) -> Option<Arc<Snapshot>> {
        Some(self.snapshot(self.position(id)?))
    }

    /// A rider's district, if on shift.
    pub(super) fn district_of(&self, id: &Id) -> Option<DistrictId> {
        Some(self.entry(self.position(id)?).1.district)
    }

    /// Every rider on shift, sorted by id, with its position (for [`CheckpointRiders::snapshot`]).
    pub(super) fn iter(&self) -> impl Iterator<Item = (&Id, u32)> {
        self.on_shift.iter().map(|i| (&self.entry(*i).0, *i))
    }

    /// The riders on shift in `district`, sorted by id, with their positions.
    pub(super) fn of_district(&self, district: DistrictId) -> impl Iterator<Item = (&Id, u32)> {
        self.by_district
            .get(&district)
            .into_iter()
            .flatten()
            .map(|i| (&self.entry(*i).0, *i))
    }
}

/// Every rider on shift of `riders` as a change at `time` (a view that already holds riders takes
/// a checkpoint this way).
pub(super) fn rider_changes(riders: &CheckpointRiders, time: u64) -> Vec<ViewChange> {
    riders
        .iter()
        .map(|(id, i)| {
            ViewChange::Rider(Change {
                key: id.clone(),
                value: Some(riders.snapshot(i)),
                time,
            })
        })
        .collect()
}
