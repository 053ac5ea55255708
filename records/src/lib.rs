//! dongflow's records: what an input event is, independent of where it comes from.
//!
//! The dataflow (`dongflow-dataflow`) and the edges (`dongflow-connectors`: Kafka, the simulator)
//! both depend on this crate and not on each other, so the dataflow builds without librdkafka.
//!
//! - [`events`]: the rider and delivery events of CONTRACT section 2, their JSON decoding (pure,
//!   with a typed error for each bad input of section 4) and encoding; the wall clock in ms.
//! - [`label`]: [`Label`], the short free-form labels (rider type, delivery type, vehicle): a
//!   4-byte number on one shared copy per distinct value.
//! - [`error`]: [`DecodeError`], one variant per kind of bad input.

pub mod error;
pub mod events;
pub mod label;

pub use error::DecodeError;
pub use events::{
    now_ms, Coord, DeliveryEvent, DeliveryStatus, Id, Millis, RiderEvent, RiderStatus,
};
pub use label::Label;
