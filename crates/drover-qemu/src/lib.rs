//! The QEMU tools drover drives, and nothing else: a QMP client ([`qmp`]), a guest agent client
//! ([`qga`]), `qemu-img`
//! ([`image`]), `qemu-storage-daemon` ([`qsd`]) and durable file publishing ([`durable`]).
//!
//! No trait and no store: this is the toolbox under both the hypervisor driver (`drover-hv`) and
//! the data path (`drover-block`), so that the data path does not depend on the hypervisor seam
//! (see `ARCHITECTURE.md`). Errors keep their class ([`ToolError`]): a timeout, a QMP error with
//! QEMU's class, a tool's stderr, an invalid argument, an I/O error with its context.

use std::time::Duration;

pub mod durable;
pub mod image;
pub mod qga;
pub mod qmp;
pub mod qsd;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Qmp { command: String, class: String, desc: String },
    #[error("QMP protocol: {0}")]
    QmpProtocol(String),
    /// The guest agent refused a command (its class: `CommandNotFound`, `GenericError`...).
    #[error("guest agent command {command} failed: {class}: {desc}")]
    GuestAgent { command: String, class: String, desc: String },
    /// The guest agent (the guest: untrusted) answered something that is not its protocol.
    #[error("guest agent: {0}")]
    GuestAgentProtocol(String),
    #[error("{program} failed: {stderr}")]
    Tool { program: String, stderr: String },
    /// What the caller asked for cannot be done as asked (a node name, an export, a size).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl ToolError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ToolError::Io { context: context.into(), source }
    }
}

pub type ToolResult<T> = Result<T, ToolError>;
