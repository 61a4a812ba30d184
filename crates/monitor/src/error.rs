//! Errors. [`CommandError`] is what a command answers (QMP sends it as
//! `{"error": {"class": .., "desc": ..}}`, HMP prints `desc` on one line); [`MonitorError`]
//! covers setting up the monitor itself (bad chardev spec, socket errors).

use serde::Serialize;
use std::fmt;

/// QMP error classes (QEMU's `QapiErrorClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command failed: a class and a human-readable description (one line, no trailing period,
/// as QEMU writes them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct CommandError {
    pub class: ErrorClass,
    pub desc: String,
}

impl CommandError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        CommandError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`, the class of almost every QEMU error.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// The backend does not implement this command (yet). `command` is the QMP name.
    pub fn unsupported(command: &str) -> Self {
        Self::generic(format!(
            "Command '{command}' is not supported by this VM yet"
        ))
    }

    /// QEMU's answer to a command name it does not know.
    pub fn command_not_found(command: &str) -> Self {
        Self::new(
            ErrorClass::CommandNotFound,
            format!("The command {command} has not been found"),
        )
    }
}

/// Failure to set up or run a monitor transport.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("invalid chardev '{spec}': {reason}")]
    BadChardev { spec: String, reason: String },
    #[error("cannot listen on {what}: {source}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("monitor I/O error on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
