//! libvirt for drover: one connection to a libvirt daemon (`qemu:///system` beside the agent),
//! every call run off the async runtime and bounded in time, the calls of libvirt's backup API
//! that the `virt` crate does not wrap ([`ffi`]), and the domain XML drover reads and writes
//! ([`xml`]), parsed with bounds (a domain is defined by the host's administrator, not by a
//! tenant, but a parser is bounded all the same).
//!
//! No trait and no drover vocabulary: the libvirt hypervisor driver in `drover-hv` is built on it.

pub mod ffi;
pub mod xml;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;

pub use virt;

/// What went wrong, in the classes drover acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// No domain with that UUID or name.
    NoDomain,
    /// No checkpoint of that name.
    NoCheckpoint,
    /// No backup job runs.
    NoBackup,
    /// A checkpoint's bitmap is missing or broken in a disk image (QEMU did not close it cleanly).
    CheckpointInconsistent,
    /// Not in this state (e.g. a backup of a domain that is shut off, a second backup job).
    OperationInvalid,
    /// The guest agent does not answer, or there is none.
    AgentUnresponsive,
    /// libvirt or the hypervisor cannot do this.
    Unsupported,
    /// The daemon cannot be reached, or the call did not end in time.
    Unreachable,
    Other,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{what}: {message}")]
pub struct LibvirtError {
    pub class: ErrorClass,
    /// What drover was doing.
    pub what: String,
    /// libvirt's own message.
    pub message: String,
}

impl LibvirtError {
    pub fn new(class: ErrorClass, what: impl Into<String>, message: impl Into<String>) -> Self {
        LibvirtError { class, what: what.into(), message: message.into() }
    }

    fn from_virt(what: &str, e: &virt::error::Error) -> Self {
        let class = match e.code() {
            ErrorNumber::NoDomain => ErrorClass::NoDomain,
            ErrorNumber::NoDomainCheckpoint => ErrorClass::NoCheckpoint,
            ErrorNumber::NoDomainBackup => ErrorClass::NoBackup,
            ErrorNumber::CheckpointInconsistent => ErrorClass::CheckpointInconsistent,
            ErrorNumber::OperationInvalid => ErrorClass::OperationInvalid,
            ErrorNumber::AgentUnresponsive => ErrorClass::AgentUnresponsive,
            ErrorNumber::NoSupport | ErrorNumber::OperationUnsupported | ErrorNumber::ArgumentUnsupported => {
                ErrorClass::Unsupported
            }
            ErrorNumber::SystemError | ErrorNumber::Rpc | ErrorNumber::NoConnect => ErrorClass::Unreachable,
            _ => ErrorClass::Other,
        };
        LibvirtError::new(class, what, e.message().to_string())
    }
}

pub type LibvirtResult<T> = Result<T, LibvirtError>;

/// A call that has not ended in this time is given up (its thread is left to finish): libvirt
/// calls take milliseconds, a pull-mode backup begins in well under a second.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection to one libvirt daemon, opened on first use and again when it breaks (the daemon
/// restarted). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Libvirt {
    uri: String,
    conn: Arc<Mutex<Option<Arc<Connect>>>>,
}

impl Libvirt {
    pub fn new(uri: impl Into<String>) -> Self {
        // libvirt prints every error to stderr by default; drover reports them itself.
        virt::error::clear_error_callback();
        Libvirt { uri: uri.into(), conn: Arc::new(Mutex::new(None)) }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The open connection, or a new one when there is none or it is dead. Blocking.
    fn connection(&self) -> LibvirtResult<Arc<Connect>> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref()
            && c.is_alive().unwrap_or(false)
        {
            return Ok(c.clone());
        }
        let c = Connect::open(Some(&self.uri)).map_err(|e| {
            LibvirtError::new(ErrorClass::Unreachable, format!("connecting to libvirt at {}", self.uri), e.message())
        })?;
        let c = Arc::new(c);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs `f` with the connection on a blocking thread, bounded by [`CALL_TIMEOUT`]. `what` says
    /// what drover was doing, for the error. libvirt keeps its last error per thread, so `f`
    /// turns libvirt's errors into [`LibvirtError`]s itself (see [`virt_err`]).
    pub async fn call<T, F>(&self, what: &str, f: F) -> LibvirtResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> LibvirtResult<T> + Send + 'static,
    {
        let this = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            let conn = this.connection()?;
            f(&conn)
        });
        match tokio::time::timeout(CALL_TIMEOUT, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => {
                Err(LibvirtError::new(ErrorClass::Other, what, format!("the libvirt call failed: {join}")))
            }
            Err(_) => Err(LibvirtError::new(
                ErrorClass::Unreachable,
                what,
                format!("libvirt did not answer within {CALL_TIMEOUT:?}"),
            )),
        }
    }

    /// Runs `f` with the domain of UUID `uuid` (see [`Libvirt::call`]).
    pub async fn with_domain<T, F>(&self, uuid: Uuid, what: &str, f: F) -> LibvirtResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Domain) -> LibvirtResult<T> + Send + 'static,
    {
        let what_owned = what.to_string();
        self.call(what, move |conn| {
            let dom = Domain::lookup_by_uuid_string(conn, &uuid.to_string()).map_err(virt_err(&what_owned))?;
            f(&dom)
        })
        .await
    }

    /// Every domain the daemon knows (running or defined), with its XML and state.
    pub async fn list_domains(&self) -> LibvirtResult<Vec<(xml::DomainDescription, DomainState)>> {
        self.call("listing the domains", |conn| {
            let what = "listing the domains";
            let domains = conn.list_all_domains(0).map_err(virt_err(what))?;
            let mut out = Vec::with_capacity(domains.len());
            for dom in domains {
                // A domain undefined between the list and the read is simply not listed.
                let Ok(text) = dom.get_xml_desc(0) else { continue };
                let Ok(state) = domain_state(&dom) else { continue };
                out.push((xml::DomainDescription::parse(&text)?, state));
            }
            Ok(out)
        })
        .await
    }

    /// The domain's description (its live XML when it runs) and state.
    pub async fn describe(&self, uuid: Uuid) -> LibvirtResult<(xml::DomainDescription, DomainState)> {
        self.with_domain(uuid, "reading the domain", |dom| {
            let text = dom.get_xml_desc(0).map_err(virt_err("reading the domain's XML"))?;
            Ok((xml::DomainDescription::parse(&text)?, domain_state(dom)?))
        })
        .await
    }
}

/// A domain's state as drover needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    Running,
    Paused,
    ShutOff,
    /// Shut off because its QEMU died (killed, crashed).
    Crashed,
    /// Shutting down, being created, pmsuspended: running in every sense drover uses.
    Other,
}

impl DomainState {
    pub fn is_active(self) -> bool {
        !matches!(self, DomainState::ShutOff | DomainState::Crashed)
    }
}

/// The domain's state. Blocking.
pub fn domain_state(dom: &Domain) -> LibvirtResult<DomainState> {
    let (state, reason) = dom.get_state().map_err(virt_err("reading the domain's state"))?;
    Ok(match state {
        virt::sys::VIR_DOMAIN_RUNNING => DomainState::Running,
        virt::sys::VIR_DOMAIN_PAUSED => DomainState::Paused,
        virt::sys::VIR_DOMAIN_CRASHED => DomainState::Crashed,
        virt::sys::VIR_DOMAIN_SHUTOFF if reason == virt::sys::VIR_DOMAIN_SHUTOFF_CRASHED as i32 => DomainState::Crashed,
        virt::sys::VIR_DOMAIN_SHUTOFF => DomainState::ShutOff,
        _ => DomainState::Other,
    })
}

/// Turns a `virt` error into a [`LibvirtError`] saying what drover was doing.
pub fn virt_err(what: &str) -> impl Fn(virt::error::Error) -> LibvirtError + '_ {
    move |e| LibvirtError::from_virt(what, &e)
}
