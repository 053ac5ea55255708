//! dongflow's edges: what comes in and how it is made.
//!
//! This crate owns the outside formats and the sources of events. It has no dataflow in it.
//!
//! - [`events`], [`label`], [`error`]: the records (crate `dongflow-records`), re-exported: the
//!   events these sources produce, their labels and the errors of bad input.
//! - [`simulator`]: a seeded generator of realistic Seoul rider and delivery traffic.
//! - [`source`]: the per-worker [`source::EventSource`] trait and in-memory sources.
//! - [`kafka`]: the Kafka source, the producer for dead letters and changelogs, the topic watch and
//!   the embedded broker.

pub use dongflow_records::{error, events, label};
pub mod kafka;
pub mod simulator;
pub mod source;

pub use error::DecodeError;
pub use events::{
    now_ms, Coord, DeliveryEvent, DeliveryStatus, Id, Millis, RiderEvent, RiderStatus,
};
pub use label::Label;
