//! The one save/restore contract of Godwit.
//!
//! Every stateful component (a vCPU, the VM's interrupt controllers and clock, each device)
//! implements [`Stateful`]: it describes itself as a [`Section`] — a stable id, a per-component
//! version and an opaque payload — and restores itself from one. `savevm` and live migration
//! are the same act with different sinks: both write sections and guest RAM records through
//! the [`stream`] format, one into the qcow2 VM-state area, the other over a socket.
//!
//! Payloads are serde structures encoded with `postcard` (compact, little-endian varints).
//! A section whose id is not the one asked for, or whose version is newer than the reader
//! knows, is a clear error, never a half-applied state.

pub mod pagemap;
pub mod ram;
pub mod snapfile;
pub mod stream;

use serde::{de::DeserializeOwned, Serialize};

/// Errors of the state layer.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state section '{id}': version {found} is newer than this Godwit understands (max {max})")]
    NewerVersion { id: String, found: u32, max: u32 },
    #[error("expected state section '{expected}', found '{found}'")]
    WrongSection { expected: String, found: String },
    #[error("state section '{id}' is malformed: {reason}")]
    Malformed { id: String, reason: String },
    #[error("state section '{0}' is missing from the saved state")]
    Missing(String),
    #[error("saved state does not match this VM: {0}")]
    Mismatch(String),
    #[error("cannot apply state section '{id}': {reason}")]
    Apply { id: String, reason: String },
    #[error("state stream: {0}")]
    Stream(String),
    #[error("state stream I/O: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, StateError>;

/// One component's saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Stable identifier, e.g. `vcpu.0`, `vm.irqchip`, `dev.serial0`.
    pub id: String,
    /// Version of the payload layout for this component.
    pub version: u32,
    /// The encoded payload.
    pub data: Vec<u8>,
}

impl Section {
    /// Encodes `value` as the payload of section `id` at `version`.
    pub fn encode<T: Serialize>(id: impl Into<String>, version: u32, value: &T) -> Result<Self> {
        let id = id.into();
        let data = postcard::to_stdvec(value).map_err(|e| StateError::Malformed {
            id: id.clone(),
            reason: e.to_string(),
        })?;
        Ok(Section { id, version, data })
    }

    /// Checks id and version, then decodes the payload.
    pub fn decode<T: DeserializeOwned>(&self, id: &str, max_version: u32) -> Result<T> {
        if self.id != id {
            return Err(StateError::WrongSection { expected: id.into(), found: self.id.clone() });
        }
        if self.version > max_version {
            return Err(StateError::NewerVersion { id: self.id.clone(), found: self.version, max: max_version });
        }
        postcard::from_bytes(&self.data).map_err(|e| StateError::Malformed {
            id: self.id.clone(),
            reason: e.to_string(),
        })
    }
}

/// The contract every stateful component implements.
pub trait Stateful {
    /// The stable section id of this component instance.
    fn state_id(&self) -> String;
    /// Describes the component. Called only while the VM is paused.
    fn save_state(&self) -> Result<Section>;
    /// Restores the component from `section`. On error the component must be unchanged
    /// or the caller must discard the whole VM (the VM layer validates before applying).
    fn restore_state(&mut self, section: &Section) -> Result<()>;
}

/// Finds the section with `id` in a list, or reports it missing.
pub fn find<'a>(sections: &'a [Section], id: &str) -> Result<&'a Section> {
    sections.iter().find(|s| s.id == id).ok_or_else(|| StateError::Missing(id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Demo {
        a: u64,
        b: Vec<u8>,
    }

    #[test]
    fn roundtrip_and_checks() {
        let d = Demo { a: 7, b: vec![1, 2, 3] };
        let s = Section::encode("demo", 2, &d).unwrap();
        assert_eq!(s.decode::<Demo>("demo", 2).unwrap(), d);
        assert!(matches!(s.decode::<Demo>("demo", 1), Err(StateError::NewerVersion { .. })));
        assert!(matches!(s.decode::<Demo>("other", 2), Err(StateError::WrongSection { .. })));
        let bad = Section { id: "demo".into(), version: 1, data: vec![0xff; 3] };
        assert!(matches!(bad.decode::<Demo>("demo", 2), Err(StateError::Malformed { .. })));
    }
}
