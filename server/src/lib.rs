//! The dongflow engine and server: the worker loop, queries, HTTP and metrics.
//!
//! - [`engine`]: starts the timely workers, feeds them from their sources, publishes their state sizes,
//!   compacts; answers from the live serving view; other outputs are attached to it.
//! - [`view`]: the serving view every process keeps, fed by the dataflow one complete time at a time,
//!   and the stale view of the same type (the checkpoint and the changelog) that answers until the
//!   live one is ready; HTTP answers are reads of one of them.
//! - [`query`]: typed queries and answers; what the workers share with the query side.
//! - [`recovery`]: checkpoint files: writing them atomically, finding the newest usable one (in a
//!   cluster, the newest every process can restore, agreed through the dataflow), and the marks of
//!   a clean stop whose changelog is complete.
//! - [`changelog`]: the changelog topics of CONTRACT section 5, an output attached to every worker,
//!   written as times complete; after a restart that cannot trust them, reconciled with the
//!   caught-up state (only what differs written, the keys earlier runs left that the state lacks
//!   tombstoned).
//! - [`render`]: the JSON of CONTRACT section 6 (district objects, rider snapshots).
//! - [`http`]: the HTTP API of CONTRACT section 6 (hyper), metrics, health.
//! - [`cli`]: the command line of CONTRACT section 1.
//! - [`pipeline`]: the one composition root: the engine wired to Kafka sources, dead letters,
//!   changelog outputs, the stale view, checkpoints and marks; whether the changelog holds a
//!   restored state or is reconciled with it.
//! - [`cluster`]: the connections between a cluster's processes (timely's handshake, retried
//!   with a short retry, rather than timely's one a second).
//! - [`failstop`]: a cluster process that loses a peer says so and stops (timely has no fault
//!   tolerance: recovery is a restart of every process from its checkpoint).
//! - [`memory`]: the memory the allocator holds free, given back to the system once the engine has
//!   caught up (the only `unsafe` of the workspace: one call of glibc's `malloc_trim`).
//! - [`report`]: an error and its causes on one line, for logs.
//! - [`demo`]: simulator settings, the stop signal, and the by-id partitioning rule of in-process feeds.
//! - `priority`: the workers' lower thread priority.
//!
//! Dependencies run one way: `render` ← `changelog` ← `view` ← `engine` ← `pipeline` ← `http` ←
//! `main`, with `query`, `recovery` and `cluster` below the engine.

pub mod changelog;
pub mod cli;
pub mod cluster;
pub mod demo;
pub mod engine;
pub mod failstop;
pub mod http;
pub mod memory;
pub mod pipeline;
mod priority;
pub mod query;
pub mod recovery;
pub mod render;
pub mod report;
pub mod view;

pub use engine::{Engine, EngineConfig, EngineHandle};
pub use query::{Answer, AnswerBody, Query, QueryError, StateSizes};
