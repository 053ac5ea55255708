//! Recovery: checkpoints in the state dir and how a restart chooses the one it restores.
//!
//! - [`checkpoint`]: the files (written atomically, checked by manifest), pruning, the marks of a
//!   clean stop whose changelog is complete, and loading a checkpoint whole or one process's part.
//! - [`agree`]: in a cluster whose processes keep their own state dirs, the newest checkpoint time
//!   every process can restore, agreed through a small timely dataflow before the engine starts.

pub mod agree;
pub mod checkpoint;

pub use agree::{agree, restore, AgreeError};
pub use checkpoint::*;
