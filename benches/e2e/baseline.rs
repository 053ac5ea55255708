//! The compute baseline: the same job (CONTRACT section 3: district lookup, per-id upsert in `ts`
//! order, riders joined with their active deliveries, counts per district) as plain single-threaded
//! Rust over `HashMap`s, kept up to date event by event. No timely, no differential.
//!
//! It applies events with the engine's own rules (`RiderRule`, `DeliveryRule`), so both do the same
//! work per event; what differs is everything around it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use dongflow_connectors::simulator::SimEvent;
use dongflow_connectors::{DeliveryEvent, Id, RiderEvent};
use dongflow_dataflow::districts::{DistrictId, DistrictIndex};
use dongflow_dataflow::stages::{DeliveryRule, DeliveryState, Enriched, RiderRule};
use dongflow_dataflow::types::{DeliveryBrief, DeliveryRow, DistrictCounts, RiderRow, Snapshot};
use dongflow_dataflow::upsert::UpsertRule;

/// The whole state of the job.
pub struct Baseline {
    index: Arc<DistrictIndex>,
    riders: HashMap<Id, RiderRow>,
    deliveries: HashMap<Id, DeliveryState>,
    /// Active deliveries per rider id (whether or not the rider is on shift), by delivery id.
    active: HashMap<Id, BTreeMap<Id, DeliveryBrief>>,
    counts: HashMap<DistrictId, DistrictCounts>,
    /// Events ignored (stale or after a terminal state).
    pub ignored: u64,
}

impl Baseline {
    pub fn new(index: Arc<DistrictIndex>) -> Self {
        Self {
            index,
            riders: HashMap::new(),
            deliveries: HashMap::new(),
            active: HashMap::new(),
            counts: HashMap::new(),
            ignored: 0,
        }
    }

    pub fn apply(&mut self, event: &SimEvent) {
        match event {
            SimEvent::Rider(e) => self.rider(e.clone()),
            SimEvent::Delivery(e) => self.delivery(e.clone()),
        }
    }

    /// Adds (`sign` 1) or takes away (`sign` -1) what an on-shift rider counts in its district.
    fn count_rider(&mut self, row: &RiderRow, active: u64, sign: i64) {
        if !row.status.on_shift() {
            return;
        }
        let c = self.counts.entry(row.district).or_default();
        let add = |v: &mut u64, n: u64| *v = v.wrapping_add_signed(sign * n as i64);
        add(&mut c.riders_on_shift, 1);
        add(&mut c.riders_delivering, u64::from(active > 0));
        add(&mut c.active_deliveries, active);
    }

    fn active_of(&self, rider: &Id) -> u64 {
        self.active.get(rider).map_or(0, |a| a.len() as u64)
    }

    fn rider(&mut self, event: RiderEvent) {
        let district = event.location.map(|p| self.index.lookup(p));
        let id = event.rider_id.clone();
        let old = self.riders.get(&id);
        let new = match RiderRule::apply_row(old, Enriched { event, district }) {
            Ok(new) => new,
            Err(_) => {
                self.ignored += 1;
                return;
            }
        };
        let active = self.active_of(&id);
        if let Some(old) = self.riders.insert(id, new.clone()) {
            self.count_rider(&old, active, -1);
        }
        self.count_rider(&new, active, 1);
    }

    fn delivery(&mut self, event: DeliveryEvent) {
        let district = event.pickup.map(|p| self.index.lookup(p));
        let id = event.delivery_id.clone();
        let old = self.deliveries.get(&id);
        let new = match DeliveryRule::apply(old, Enriched { event, district }) {
            Ok(new) => new,
            Err(_) => {
                self.ignored += 1;
                return;
            }
        };
        let before = old.and_then(DeliveryState::visible).cloned();
        let after = new.visible().cloned();
        self.deliveries.insert(id.clone(), new);
        if let Some(row) = before {
            self.show(&id, &row, -1);
        }
        if let Some(row) = after {
            self.show(&id, &row, 1);
        }
    }

    /// Adds or takes away a visible delivery: waiting where it is picked up, active with its rider.
    fn show(&mut self, id: &Id, row: &DeliveryRow, sign: i64) {
        if row.is_waiting() {
            let c = self.counts.entry(row.pickup_district).or_default();
            c.waiting_deliveries = c.waiting_deliveries.wrapping_add_signed(sign);
        }
        let Some(rider) = row.active_for() else {
            return;
        };
        // The rider's counts move from "with n active" to "with n ± 1 active".
        let before = self.active_of(rider);
        let rider_row = self.riders.get(rider).cloned();
        if let Some(r) = &rider_row {
            self.count_rider(r, before, -1);
        }
        let list = self.active.entry(rider.clone()).or_default();
        if sign > 0 {
            list.insert(
                id.clone(),
                DeliveryBrief {
                    delivery_id: id.clone(),
                    status: row.status,
                    vehicle: row.vehicle.clone(),
                    ts: row.ts,
                },
            );
        } else {
            list.remove(id);
            if list.is_empty() {
                self.active.remove(rider);
            }
        }
        if let Some(r) = &rider_row {
            let after = self.active_of(rider);
            self.count_rider(r, after, 1);
        }
    }

    /// Districts with any nonzero count, sorted by district.
    pub fn districts(&self) -> Vec<(DistrictId, DistrictCounts)> {
        let mut out: Vec<_> = self
            .counts
            .iter()
            .filter(|(_, c)| !c.is_zero())
            .map(|(d, c)| (*d, *c))
            .collect();
        out.sort_by_key(|(d, _)| *d);
        out
    }

    /// A rider's snapshot, when on shift.
    pub fn snapshot(&self, rider: &Id) -> Option<Snapshot> {
        let row = self.riders.get(rider).filter(|r| r.status.on_shift())?;
        Some(Snapshot {
            rider: row.clone(),
            deliveries: self
                .active
                .get(rider)
                .map(|a| a.values().cloned().collect())
                .unwrap_or_default(),
        })
    }
}
