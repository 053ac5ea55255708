//! The errors of this crate.

use thiserror::Error;

/// Why an input record was rejected (CONTRACT section 4). The record goes to the dead-letter topic with
/// this error's `Display` as its `error` header, and is counted under [`DecodeError::reason`].
#[derive(Debug, Clone, PartialEq, Error)]
pub enum DecodeError {
    /// Not a JSON object of the expected shape.
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// A required field (id, status or ts) is missing or null.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field has the wrong JSON type (e.g. a number where a string belongs).
    #[error("wrong type for field `{0}`")]
    WrongType(&'static str),
    /// An id is the empty string.
    #[error("empty id in field `{0}`")]
    EmptyId(&'static str),
    /// The status is not one of the contract's.
    #[error("unknown status `{0}`")]
    UnknownStatus(String),
    /// A latitude or longitude outside -90..90 or -180..180.
    #[error("`{field}` out of range: {value}")]
    OutOfRange {
        /// The field, e.g. `location.lat`.
        field: &'static str,
        /// The value found.
        value: f64,
    },
}

impl DecodeError {
    /// Every reason label, for metrics that should show zeros before the first error.
    pub const REASONS: [&'static str; 6] = [
        "malformed_json",
        "missing_field",
        "wrong_type",
        "empty_id",
        "unknown_status",
        "out_of_range",
    ];

    /// A short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed_json",
            Self::MissingField(_) => "missing_field",
            Self::WrongType(_) => "wrong_type",
            Self::EmptyId(_) => "empty_id",
            Self::UnknownStatus(_) => "unknown_status",
            Self::OutOfRange { .. } => "out_of_range",
        }
    }
}
