//! Replication jobs, replicas and restore points, and the replica lifecycle (DESIGN.md).
//!
//! ```text
//!  Ready ─replication─▶ Processing ─done─▶ Ready
//!  Ready ─failover ok─▶ Failover          Ready ─failover failed─▶ FailedFailover
//!  Failover, FailedFailover ─undo─▶ Ready
//!  Failover ─permanent─▶ PermanentFailover
//!  Failover ─failback synced─▶ ReadyToSwitch ─switchover─▶ Failback
//!  Failover ─switchover (one-shot failback)─▶ Failback
//!  Failback ─commit─▶ Ready          Failback, ReadyToSwitch ─undo failback─▶ Failover
//! ```

use serde::{Deserialize, Serialize};

use crate::{
    DatastoreId, Error, HostId, ReplicaId, ReplicationJobId, RestorePointId, Result, TenantId, Timestamp, VmId,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplicaState {
    Ready,
    Processing,
    Failover,
    FailedFailover,
    PermanentFailover,
    ReadyToSwitch,
    Failback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplicaEvent {
    ReplicationStarted,
    ReplicationFinished,
    FailedOver,
    FailoverFailed,
    FailoverUndone,
    MadePermanent,
    FailbackSynced,
    SwitchedOver,
    FailbackCommitted,
    FailbackUndone,
}

impl ReplicaState {
    pub fn apply(self, event: ReplicaEvent) -> Result<ReplicaState> {
        use ReplicaEvent as E;
        use ReplicaState as S;
        Ok(match (self, event) {
            (S::Ready, E::ReplicationStarted) => S::Processing,
            (S::Processing, E::ReplicationFinished) => S::Ready,
            (S::Ready, E::FailedOver) => S::Failover,
            (S::Ready, E::FailoverFailed) => S::FailedFailover,
            (S::Failover | S::FailedFailover, E::FailoverUndone) => S::Ready,
            (S::Failover, E::MadePermanent) => S::PermanentFailover,
            (S::Failover, E::FailbackSynced) => S::ReadyToSwitch,
            (S::Failover | S::ReadyToSwitch, E::SwitchedOver) => S::Failback,
            (S::Failback, E::FailbackCommitted) => S::Ready,
            (S::Failback | S::ReadyToSwitch, E::FailbackUndone) => S::Failover,
            (s, e) => return Err(Error::conflict(format!("a replica that is {s:?} cannot take {e:?}"))),
        })
    }

    /// Replication may write restore points only in these states.
    pub fn accepts_replication(self) -> bool {
        self == ReplicaState::Ready
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Schedule {
    /// Only on demand.
    Manual,
    Interval {
        secs: u32,
    },
    /// Start the next cycle as soon as one ends.
    Continuous,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationJob {
    pub id: ReplicationJobId,
    pub tenant_id: TenantId,
    pub name: String,
    pub vm_ids: Vec<VmId>,
    pub target_host_id: HostId,
    pub target_datastore_id: DatastoreId,
    pub schedule: Schedule,
    /// Restore points to keep per replica.
    pub retention_points: u32,
    /// The most this job's transfers send between agents, in bytes per second (each disk's
    /// transfer on its own; a source agent's global cap applies too). `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<u64>,
    /// Whether each VM's point is taken with the guest's file systems frozen through its guest
    /// agent (application-consistent). Jobs made before this setting existed `try`.
    #[serde(default)]
    pub consistency: ConsistencyMode,
    /// Source network → network of the target host, for the replicas' NICs when they fail over
    /// (Veeam's network mapping table). A source network not listed goes to the target host's
    /// network of the same name when it has one; otherwise the NIC is isolated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_mappings: Vec<crate::NetworkMapping>,
    pub enabled: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// How a replication job takes each running VM's point in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsistencyMode {
    /// Application-consistent or nothing: a VM whose guest agent cannot freeze its file systems
    /// (not running, not installed, the freeze failed or outlasted its bound) gets no point in
    /// this run; its task fails and says why, and its changes stay tracked for the next run.
    Require,
    /// Application-consistent when the guest agent answers; otherwise crash-consistent, with a
    /// warning in the session log and the reason on the point.
    #[default]
    Try,
    /// Crash-consistent always: the guest is never frozen.
    Off,
}

impl std::fmt::Display for ConsistencyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConsistencyMode::Require => "require",
            ConsistencyMode::Try => "try",
            ConsistencyMode::Off => "off",
        })
    }
}

impl std::str::FromStr for ConsistencyMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "require" => Ok(ConsistencyMode::Require),
            "try" => Ok(ConsistencyMode::Try),
            "off" => Ok(ConsistencyMode::Off),
            other => Err(Error::invalid(format!("consistency {other:?}: expected require, try or off"))),
        }
    }
}

/// What a restore point's data is consistent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsistencyKind {
    /// Cut while the guest's file systems were frozen by its guest agent (whose fsfreeze hooks
    /// let applications flush first): it boots as after a clean freeze, with no file-system
    /// recovery.
    Application,
    /// Cut of a running guest without its cooperation (or of a stopped VM's disks, which is as
    /// good as a clean one when it was shut down cleanly): it boots as after a power cut.
    Crash,
}

/// A point's consistency and why it is what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointConsistency {
    pub kind: ConsistencyKind,
    /// Why a point is crash-consistent, or what froze an application-consistent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl PointConsistency {
    pub fn crash(reason: impl Into<String>) -> Self {
        PointConsistency { kind: ConsistencyKind::Crash, reason: Some(reason.into()) }
    }
    pub fn application(reason: impl Into<String>) -> Self {
        PointConsistency { kind: ConsistencyKind::Application, reason: Some(reason.into()) }
    }

    /// `application-consistent` or `crash-consistent: <why>`, for logs and tables.
    pub fn describe(&self) -> String {
        match (self.kind, &self.reason) {
            (ConsistencyKind::Application, _) => "application-consistent".into(),
            (ConsistencyKind::Crash, Some(why)) => format!("crash-consistent: {why}"),
            (ConsistencyKind::Crash, None) => "crash-consistent".into(),
        }
    }
}

impl Default for PointConsistency {
    /// What a point recorded before drover recorded consistency was.
    fn default() -> Self {
        PointConsistency::crash("taken before drover recorded consistency")
    }
}

pub const MIN_INTERVAL_SECS: u32 = 10;
pub const MAX_RETENTION_POINTS: u32 = 10_000;
/// The lowest bandwidth limit a job may have, in bytes per second: below it a disk would take
/// days, which is a typo more often than a wish.
pub const MIN_BANDWIDTH_LIMIT: u64 = 64 << 10;

impl ReplicationJob {
    pub fn validate(&self) -> Result<()> {
        crate::validate_name("replication job", &self.name)?;
        if self.vm_ids.is_empty() {
            return Err(Error::invalid("a replication job needs at least one VM"));
        }
        let unique: std::collections::HashSet<_> = self.vm_ids.iter().collect();
        if unique.len() != self.vm_ids.len() {
            return Err(Error::invalid("a VM appears twice in the replication job"));
        }
        if let Schedule::Interval { secs } = self.schedule
            && secs < MIN_INTERVAL_SECS
        {
            return Err(Error::invalid(format!("schedule interval must be at least {MIN_INTERVAL_SECS} s")));
        }
        if self.retention_points == 0 || self.retention_points > MAX_RETENTION_POINTS {
            return Err(Error::invalid(format!("retention_points must be between 1 and {MAX_RETENTION_POINTS}")));
        }
        if self.bandwidth_limit.is_some_and(|b| b < MIN_BANDWIDTH_LIMIT) {
            return Err(Error::invalid(format!(
                "bandwidth_limit must be at least {MIN_BANDWIDTH_LIMIT} bytes per second (64 KiB/s), or none"
            )));
        }
        crate::validate_network_mappings(&self.network_mappings)?;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub id: ReplicaId,
    pub tenant_id: TenantId,
    /// `<source VM name>_replica`, as the Veeam products name replicas.
    pub name: String,
    pub job_id: ReplicationJobId,
    pub source_vm_id: VmId,
    pub target_datastore_id: DatastoreId,
    pub state: ReplicaState,
    /// The point a failed-over replica booted from.
    pub failover_point_id: Option<RestorePointId>,
    /// The VM production runs on since the last switchover of a failback: the source VM, or the
    /// new VM of a failback to another recovery location. Cleared by commit and undo.
    #[serde(default)]
    pub switched_to_vm_id: Option<VmId>,
    /// The VM this replica protected before a committed failback to another location made a new
    /// VM its source.
    #[serde(default)]
    pub replaced_source_vm_id: Option<VmId>,
    /// The source's host could not be reached when the replica failed over (a lost production
    /// site): while the replica is failed over, the source VM is fenced (powered off whenever
    /// its host shows it running). Cleared with the failover (undo, failback's commit).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fence_source: bool,
    /// The bitmap ledger: per source disk, the bitmaps that cover every change since the newest
    /// point, in order (the newest point's `next`; once a cycle has cut from it, that cut's
    /// `current` then its `next`: whichever the cut's end leaves covers everything, as a failed
    /// cut folds into `next` or keeps `current`). Only these may carry an incremental cycle.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tracking_bitmaps: std::collections::BTreeMap<String, Vec<String>>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl Replica {
    /// A new replica of `source` (named `<source name>_replica`), `Ready`, with no points yet.
    pub fn new(tenant_id: TenantId, job_id: ReplicationJobId, source: (VmId, &str), target: DatastoreId) -> Replica {
        let t = crate::now();
        Replica {
            id: ReplicaId::new(),
            tenant_id,
            name: format!("{}_replica", source.1),
            job_id,
            source_vm_id: source.0,
            target_datastore_id: target,
            state: ReplicaState::Ready,
            failover_point_id: None,
            tracking_bitmaps: Default::default(),
            switched_to_vm_id: None,
            replaced_source_vm_id: None,
            fence_source: false,
            created_at: t,
            updated_at: t,
        }
    }
}

/// A restore point is offered for failover only while `Published`. Retention marks the oldest
/// point `Retiring` before it starts merging it away, so a crash in the middle never leaves a
/// half-merged point on offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RestorePointState {
    Published,
    Retiring,
}

/// One disk of a restore point: the qcow2 file whose chain reads as the disk at that point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePointDisk {
    /// The VM disk's name.
    pub disk: String,
    /// Absolute path of the point's file on the target datastore.
    pub file: String,
    pub size_bytes: u64,
    /// Digest of the disk's block manifest at this point.
    pub manifest_digest: String,
    /// The bitmap on the source disk that records its changes since this point (the cut's
    /// `next`): the ledger the next cycle checks the disk's bitmaps against. Absent on points
    /// made before drover kept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_bitmap: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePoint {
    pub id: RestorePointId,
    pub replica_id: ReplicaId,
    /// Increases by one per published point of a replica.
    pub sequence: u64,
    /// The replication session that made it; publishing twice from one session is a no-op.
    pub session_id: crate::SessionId,
    pub state: RestorePointState,
    pub created_at: Timestamp,
    /// Bytes written into this point's files by its cycle.
    pub bytes_written: u64,
    pub disks: Vec<RestorePointDisk>,
    /// Set when a check found the target's data equal to the manifests.
    pub verified: bool,
    #[serde(default)]
    pub consistency: PointConsistency,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_event() -> impl Strategy<Value = ReplicaEvent> {
        use ReplicaEvent as E;
        prop_oneof![
            Just(E::ReplicationStarted),
            Just(E::ReplicationFinished),
            Just(E::FailedOver),
            Just(E::FailoverFailed),
            Just(E::FailoverUndone),
            Just(E::MadePermanent),
            Just(E::FailbackSynced),
            Just(E::SwitchedOver),
            Just(E::FailbackCommitted),
            Just(E::FailbackUndone),
        ]
    }

    proptest! {
        #[test]
        fn permanent_failover_is_final(events in proptest::collection::vec(any_event(), 0..50)) {
            let mut s = ReplicaState::Ready;
            let mut permanent = false;
            for e in events {
                if let Ok(next) = s.apply(e) {
                    prop_assert!(!permanent, "left PermanentFailover with {:?}", e);
                    permanent = next == ReplicaState::PermanentFailover;
                    s = next;
                }
            }
        }

        #[test]
        fn replication_never_touches_a_failed_over_replica(events in proptest::collection::vec(any_event(), 0..50)) {
            let mut s = ReplicaState::Ready;
            for e in events {
                let r = s.apply(e);
                if e == ReplicaEvent::ReplicationStarted {
                    prop_assert_eq!(r.is_ok(), s == ReplicaState::Ready);
                }
                if let Ok(next) = r { s = next; }
            }
        }
    }

    #[test]
    fn the_failback_story() {
        use ReplicaEvent as E;
        let s = [E::FailedOver, E::FailbackSynced, E::SwitchedOver, E::FailbackCommitted]
            .into_iter()
            .try_fold(ReplicaState::Ready, |s, e| s.apply(e))
            .unwrap();
        assert_eq!(s, ReplicaState::Ready);
        assert!(ReplicaState::Ready.apply(E::FailbackCommitted).is_err());
    }
}
