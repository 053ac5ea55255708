//! The default map: Seoul's 425 administrative dongs (행정동), boundaries as of 2021-04-01,
//! shipped gzip-compressed in the binary.
//!
//! The file is `seoul-admdong.geojson` (derived from Statistics Korea SGIS boundaries by
//! vuski/admdongkor, CC BY 4.0; provenance, licence and attribution in the NOTICE file), compressed
//! with `gzip -9 -n`. Codes are the 10-digit 행정기관코드 (`adm_cd2`), names the full `adm_nm`.

use std::io::Read;

use crate::districts::DistrictIndex;
use crate::error::DistrictError;

/// The compressed GeoJSON.
const SEOUL_GZ: &[u8] = include_bytes!("../data/seoul-admdong.geojson.gz");

/// The property that holds each dong's code.
pub const CODE_PROPERTY: &str = "adm_cd2";
/// The property that holds each dong's name.
pub const NAME_PROPERTY: &str = "adm_nm";

/// The shipped GeoJSON, decompressed.
pub fn seoul_geojson() -> Result<Vec<u8>, DistrictError> {
    let mut bytes = Vec::with_capacity(1 << 20);
    flate2::read::GzDecoder::new(SEOUL_GZ)
        .read_to_end(&mut bytes)
        .map_err(|e| DistrictError::Io {
            path: "the built-in Seoul map".into(),
            message: e.to_string(),
        })?;
    Ok(bytes)
}

impl DistrictIndex {
    /// Seoul's 425 dongs, from the map shipped in the binary.
    ///
    /// ```
    /// use dongflow_dataflow::districts::DistrictIndex;
    /// use dongflow_records::Coord;
    /// let index = DistrictIndex::seoul_dongs().unwrap();
    /// assert_eq!(index.len(), 425);
    /// let yeoksam = index.lookup(Coord { lat: 37.5007, lon: 127.0363 }); // 역삼역
    /// assert_eq!(index.name(yeoksam), "서울특별시 강남구 역삼1동");
    /// ```
    pub fn seoul_dongs() -> Result<Self, DistrictError> {
        Self::from_geojson(&seoul_geojson()?, CODE_PROPERTY, NAME_PROPERTY)
    }
}
