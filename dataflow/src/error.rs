//! The errors of this crate.

use thiserror::Error;

/// Why a district map could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DistrictError {
    /// The file could not be read.
    #[error("cannot read district file {path}: {message}")]
    Io {
        /// The path given.
        path: String,
        /// The operating system's reason.
        message: String,
    },
    /// The file is not JSON.
    #[error("district file is not valid JSON: {0}")]
    Json(String),
    /// The JSON is not a GeoJSON FeatureCollection.
    #[error("district file is not a GeoJSON FeatureCollection")]
    NotFeatureCollection,
    /// A feature lacks the code property.
    #[error("feature {feature} has no property `{property}` (set the property with --district-code-prop)")]
    MissingProperty {
        /// Position of the feature in the file.
        feature: usize,
        /// The property looked for.
        property: String,
    },
    /// A feature's geometry is not a Polygon or MultiPolygon.
    #[error(
        "feature {feature} has a {kind} geometry; only Polygon and MultiPolygon are supported"
    )]
    UnsupportedGeometry {
        /// Position of the feature in the file.
        feature: usize,
        /// The geometry type found.
        kind: String,
    },
    /// A feature's coordinates are not rings of `[lon, lat]` positions.
    #[error("feature {feature} has malformed coordinates")]
    BadCoordinates {
        /// Position of the feature in the file.
        feature: usize,
    },
    /// Two features share a code (or a feature uses the reserved code `unassigned`).
    #[error("duplicate district code {0}")]
    DuplicateCode(String),
    /// The collection has no features.
    #[error("district file has no features")]
    Empty,
    /// More districts than a district number can tell apart.
    #[error("{0} districts, more than the {max} a map may have", max = crate::districts::MAX_DISTRICTS)]
    TooMany(usize),
}
