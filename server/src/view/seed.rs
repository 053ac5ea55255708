//! A restored checkpoint as view changes: the snapshots and counts the dataflow computes from the
//! same upsert state, through the same rules (`DeliveryRow::active_for`, `DeliveryRow::waiting_in`,
//! `Contribution::of_rider`, `DistrictCounts::add`), so that a stale view seeded from a checkpoint
//! answers what the live state will.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use dongflow_connectors::Id;
use dongflow_dataflow::districts::DistrictId;
use dongflow_dataflow::stages::DeliveryState;
use dongflow_dataflow::types::{Change, Contribution, DeliveryBrief, DistrictCounts, Snapshot};

use super::ViewChange;
use crate::recovery::Restored;

/// Every district with a nonzero count and every rider on shift of `restored`, at its time.
pub fn seed_changes(restored: &Restored) -> Vec<ViewChange> {
    let time = restored.time;
    let mut counts: BTreeMap<DistrictId, DistrictCounts> = BTreeMap::new();
    let mut active: HashMap<&Id, Vec<DeliveryBrief>> = HashMap::new();
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
            active.entry(rider).or_default().push(row.brief(id.clone()));
        }
    }
    let mut changes = Vec::new();
    for (id, row) in &restored.riders.entries {
        if !row.status.on_shift() {
            continue;
        }
        let mut deliveries = active.remove(id).unwrap_or_default();
        deliveries.sort_by(|a, b| a.delivery_id.cmp(&b.delivery_id));
        for ((district, kind), n) in Contribution::of_rider(row.district, deliveries.len()) {
            counts.entry(district).or_default().add(kind, n);
        }
        let snapshot = Snapshot {
            rider: row.clone(),
            deliveries,
        };
        changes.push(ViewChange::Rider(Change {
            key: id.clone(),
            value: Some(Arc::new(snapshot)),
            time,
        }));
    }
    // Deliveries of riders who are not on shift count nowhere, as in the dataflow's snapshot stage.
    changes.extend(
        counts
            .into_iter()
            .filter(|(_, c)| !c.is_zero())
            .map(|(key, value)| {
                ViewChange::District(Change {
                    key,
                    value: Some(value),
                    time,
                })
            }),
    );
    changes
}
