//! The one place Tandem encodes and decodes the records it stores.
//!
//! Every record is `[FORMAT_VERSION] ++ bincode(record)` with bincode 2's standard
//! configuration. The version byte lets a later release read what an earlier one wrote (or
//! refuse it by name instead of misreading it); bump it whenever a stored type changes shape.
//! bincode is pinned at 2.0.x: 3.0 is an empty tombstone release.

use serde::{de::DeserializeOwned, Serialize};

/// The format of every stored record written by this build.
pub const FORMAT_VERSION: u8 = 1;

/// A stored record could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("stored record is empty")]
    Empty,
    #[error("stored record has format version {found}; this build reads version {FORMAT_VERSION}")]
    UnknownVersion { found: u8 },
    #[error("stored record is corrupt: {0}")]
    Corrupt(#[from] bincode::error::DecodeError),
    #[error("record could not be encoded: {0}")]
    Encode(#[from] bincode::error::EncodeError),
}

/// Encodes `record` behind the format version byte.
pub fn encode<T: Serialize>(record: &T) -> Result<Vec<u8>, CodecError> {
    let mut bytes = vec![FORMAT_VERSION];
    bincode::serde::encode_into_std_write(record, &mut bytes, bincode::config::standard())?;
    Ok(bytes)
}

/// Decodes a record written by [`encode`], refusing other format versions and trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::UnknownVersion { found: version });
    }
    let (record, read) = bincode::serde::decode_from_slice(body, bincode::config::standard())?;
    if read != body.len() {
        return Err(CodecError::Corrupt(
            bincode::error::DecodeError::OtherString(format!(
                "{} trailing bytes after the record",
                body.len() - read
            )),
        ));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Sample {
        A { id: String, n: u64 },
        B(Vec<u8>),
    }

    #[test]
    fn records_round_trip_behind_the_version_byte() {
        for record in [
            Sample::A {
                id: "x".into(),
                n: 7,
            },
            Sample::B(vec![1, 2, 3]),
        ] {
            let bytes = encode(&record).unwrap();
            assert_eq!(bytes[0], FORMAT_VERSION);
            assert_eq!(decode::<Sample>(&bytes).unwrap(), record);
        }
    }

    #[test]
    fn unknown_versions_empty_and_corrupt_records_are_refused() {
        let mut bytes = encode(&Sample::B(vec![9])).unwrap();
        assert!(matches!(decode::<Sample>(&[]), Err(CodecError::Empty)));
        bytes[0] = 99;
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(CodecError::UnknownVersion { found: 99 })
        ));
        assert!(matches!(
            decode::<Sample>(&[FORMAT_VERSION, 200]),
            Err(CodecError::Corrupt(_))
        ));
        let mut trailing = encode(&Sample::B(vec![9])).unwrap();
        trailing.push(0);
        assert!(matches!(
            decode::<Sample>(&trailing),
            Err(CodecError::Corrupt(_))
        ));
    }
}
