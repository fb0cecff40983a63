//! Device state that moves with the guest (live migration, save and restore): every
//! device with guest-visible state implements [`Snapshottable`], and its state travels as
//! one named section of the migration stream, encoded with postcard.

use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot encode the state of {what}: {message}")]
    Encode { what: &'static str, message: String },
    #[error("the saved state of {what} is not valid: {message}")]
    Decode { what: &'static str, message: String },
}

/// A device whose guest-visible state is saved on the source and restored on the
/// destination, where the same device was built from the same configuration.
pub trait Snapshottable: Send {
    /// The state, while the vCPUs are stopped.
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError>;
    /// Take the state [`Snapshottable::save`] gave, before the vCPUs run.
    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError>;
}

/// `value` as a section's bytes.
pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_stdvec(value).map_err(|e| SnapshotError::Encode {
        what,
        message: e.to_string(),
    })
}

/// A section's bytes back as `T`.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, SnapshotError> {
    postcard::from_bytes(bytes).map_err(|e| SnapshotError::Decode {
        what,
        message: e.to_string(),
    })
}
