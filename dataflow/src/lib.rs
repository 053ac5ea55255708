//! The dongflow dataflow: from rider and delivery events to rider snapshots and district counts.
//!
//! This crate owns the pure dataflow (no I/O): the records, the district index, the stages, their
//! wiring, and the code that reads the resulting arrangements.
//!
//! - [`types`]: `Time`, `Diff` and the records (rider rows, delivery rows, snapshots, counts).
//! - [`districts`]: the district index (GeoJSON, R-tree, exact point-in-polygon).
//! - [`seoul_map`]: the default map, Seoul's 425 dongs, shipped compressed in the binary.
//! - [`builtin_map`]: a small coarse map of Seoul's 25 gu, for tests and examples.
//! - [`upsert`]: the upsert operator that applies events per id in `ts` order (and a second
//!   input's updates to the same states).
//! - [`table`]: the upsert's map of states by id, in shards, copied for a checkpoint in steps.
//! - [`tombstones`]: the ids whose state is terminal, remembered by id and expiry alone.
//! - [`idle`]: idle states (riders off shift), forgotten after a time to live of their own.
//! - [`stages`]: one function per stage (enrich, the upsert rules, the rider stage that holds each
//!   rider as its snapshot, waiting deliveries, counts, changes per time).
//! - [`build`](mod@build): the one place that wires the stages.
//! - [`trace_size`]: how many updates a trace holds, for metrics.
//! - [`error`]: this crate's errors.
//!
//! ```text
//! riders ─────► enrich ─► rider upsert: one snapshot per rider (seeds) ─┬─► rider changes per time
//!                              ▲                                        └─► contributions ─┐
//!                              │ active deliveries, by rider                               │
//! deliveries ─► enrich ─► delivery upsert (seeds) ─► waiting deliveries ─► contributions ──┴─► counts by district ─► changes per time
//! ```
//!
//! The per-time changes feed the changelog topics and each process's serving view.

pub mod build;
pub mod builtin_map;
pub mod districts;
pub mod error;
pub mod idle;
pub mod seoul_map;
pub mod stages;
pub mod table;
pub mod tombstones;
pub mod trace_size;
pub mod types;
pub mod upsert;

pub use build::{build, changelogs, Changelogs, DataflowCounters, Outputs, WorkerState};
pub use error::DistrictError;
