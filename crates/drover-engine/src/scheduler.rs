//! Runs replication jobs on their schedule.
//!
//! Every tick, for each enabled job: `Interval { secs }` starts a run when the last run of the
//! job started `secs` ago or more (or never ran); `Continuous` starts one as soon as the last run
//! has stopped; `Manual` never starts one. A job with an unfinished run is skipped, so runs of
//! one job never overlap. The decision reads only the store, so after a restart the schedule
//! picks up where it was.

use chrono::Duration as ChronoDuration;
use drover_types::{ReplicationJob, Schedule, SessionState, Timestamp};

use crate::{Engine, Result};

/// Whether a job is due, given when its newest run started and whether that run has stopped.
pub fn due(job: &ReplicationJob, newest_run: Option<(Timestamp, bool)>, now: Timestamp) -> bool {
    if !job.enabled {
        return false;
    }
    match (&job.schedule, newest_run) {
        (Schedule::Manual, _) => false,
        (_, Some((_, false))) => false,
        (Schedule::Continuous, _) => true,
        (Schedule::Interval { .. }, None) => true,
        (Schedule::Interval { secs }, Some((started, true))) => {
            now - started >= ChronoDuration::seconds(i64::from(*secs))
        }
    }
}

/// One pass over every tenant's jobs; returns how many runs it started.
pub async fn tick(engine: &Engine) -> Result<usize> {
    let mut started = 0;
    for job in engine.store().object_list_all::<ReplicationJob>().await? {
        let newest = crate::replication::newest_run(engine, &job)
            .await?
            .map(|s| (s.created_at, s.state == SessionState::Stopped));
        if due(&job, newest, drover_types::now()) {
            match crate::replication::submit(engine, &job).await {
                Ok(id) => {
                    tracing::info!(job = %job.id, session = %id, "scheduled replication run started");
                    started += 1;
                }
                Err(e) => tracing::warn!(job = %job.id, error = %e, "scheduled replication run not started"),
            }
        }
    }
    Ok(started)
}

/// Ticks until the engine stops.
pub async fn run(engine: Engine) {
    let mut tick_every = tokio::time::interval(engine.config().scheduler_interval);
    tick_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick_every.tick().await;
        if let Err(e) = tick(&engine).await {
            tracing::warn!(error = %e, "scheduler pass failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_types::*;

    fn job(schedule: Schedule, enabled: bool) -> ReplicationJob {
        ReplicationJob {
            bandwidth_limit: None,
            consistency: ConsistencyMode::Try,
            network_mappings: Vec::new(),
            id: ReplicationJobId::new(),
            tenant_id: TenantId::new(),
            name: "j".into(),
            vm_ids: vec![VmId::new()],
            target_host_id: HostId::new(),
            target_datastore_id: DatastoreId::new(),
            schedule,
            retention_points: 3,
            enabled,
            created_at: now(),
            updated_at: now(),
        }
    }

    #[test]
    fn schedules_decide_when_a_run_is_due() {
        let t = now();
        let ago = |s: i64| t - ChronoDuration::seconds(s);
        let every_minute = job(Schedule::Interval { secs: 60 }, true);
        assert!(due(&every_minute, None, t), "never ran");
        assert!(!due(&every_minute, Some((ago(30), true)), t));
        assert!(due(&every_minute, Some((ago(61), true)), t));
        assert!(!due(&every_minute, Some((ago(600), false)), t), "the last run is still going");
        assert!(!due(&job(Schedule::Interval { secs: 60 }, false), None, t), "disabled");
        assert!(!due(&job(Schedule::Manual, true), None, t));
        assert!(due(&job(Schedule::Continuous, true), Some((ago(1), true)), t));
        assert!(!due(&job(Schedule::Continuous, true), Some((ago(1), false)), t));
    }
}
