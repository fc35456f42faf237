//! Keeps recorded states true: VM power states to what the hypervisor shows, and on start every
//! in-progress state to the sessions that carry it.
//!
//! On start, [`reconcile`] re-attaches to QEMU processes that outlived the last drover process and
//! corrects every VM whose recorded state no session is about to change (a VM left `Starting` or
//! `Stopping` takes what the hypervisor shows). [`reconcile_plans`] and [`reconcile_replicas`]
//! land plans and replicas whose in-progress state no unfinished session will move, so a user can
//! act on them again. While drover runs, [`run`] notices VMs that died (crashed, killed from
//! outside) and records `Died`.

use std::collections::{HashMap, HashSet};

use drover_hv::PowerState;
use drover_store::SessionFilter;
use drover_types::{
    Plan, Replica, ReplicaEvent, ReplicaState, Session, SessionResult, SessionState, SessionTarget, Vm, VmPowerState,
};

use crate::plan_state::carried_by;
use crate::{Engine, Result};

fn recorded_for(observed: Option<PowerState>, recorded: VmPowerState) -> VmPowerState {
    match (observed, recorded) {
        (Some(PowerState::Running | PowerState::Paused), _) => VmPowerState::Running,
        // drover believed it up and nothing stopped it: it died.
        (Some(PowerState::Died), _) => VmPowerState::Died,
        (Some(PowerState::Off) | None, VmPowerState::Running | VmPowerState::Starting | VmPowerState::Stopping) => {
            if recorded == VmPowerState::Running {
                VmPowerState::Died
            } else {
                VmPowerState::Off
            }
        }
        (Some(PowerState::Off) | None, other) => other,
    }
}

/// Re-attaches and corrects VM states. VMs that an unfinished session works on are left to it.
pub async fn reconcile(engine: &Engine) -> Result<()> {
    let observed: HashMap<uuid::Uuid, PowerState> = match engine.hv().reattach().await {
        Ok(v) => v.into_iter().collect(),
        Err(e) => {
            tracing::error!(error = %e, "cannot re-attach to running VMs; their states are left as recorded");
            return Ok(());
        }
    };
    let busy: HashSet<uuid::Uuid> = engine
        .store()
        .sessions_unfinished()
        .await?
        .into_iter()
        .filter_map(|s| match s.target {
            SessionTarget::Vm(v) => Some(v.0),
            _ => None,
        })
        .collect();
    for vm in engine.store().object_list_all::<Vm>().await? {
        if busy.contains(&vm.id.0) {
            continue;
        }
        let want = recorded_for(observed.get(&vm.id.0).copied(), vm.power_state);
        if want != vm.power_state {
            tracing::warn!(vm = %vm.id, name = %vm.name, from = ?vm.power_state, to = ?want, "correcting VM power state");
            set_state(engine, &vm, want).await?;
        } else if want == VmPowerState::Running {
            tracing::info!(vm = %vm.id, name = %vm.name, "re-attached to running VM");
        }
    }
    Ok(())
}

/// Lands every running plan that no unfinished session will move. Since the plan's move and its
/// session commit together this finds nothing in a database this build wrote, except after a
/// halt that came while the session ran its last step; it repairs databases of older builds.
/// Runs before the sessions resume, and with the session list read once: a session that starts
/// meanwhile comes from a request that found the plan at rest.
pub async fn reconcile_plans(engine: &Engine) -> Result<()> {
    let unfinished = engine.store().sessions_unfinished().await?;
    for plan in engine.store().object_list_all::<Plan>().await? {
        let before = plan.lifecycle;
        if !before.state.is_running() {
            continue;
        }
        let session = unfinished.iter().find(|s| s.target == SessionTarget::Plan(plan.id));
        let (after, why) = match session {
            // Its runner moves the plan (a halt request included).
            Some(s) if !s.halted => continue,
            Some(s) => match carried_by(s.kind).and_then(|action| before.halted_on(action)) {
                Some(after) => (after, format!("its session {} is halted", s.id)),
                None => continue,
            },
            None => {
                let newest = newest_session_of(engine, &plan).await?;
                let completed = newest.as_ref().is_some_and(|s| {
                    s.state == SessionState::Stopped
                        && matches!(s.result, SessionResult::Success | SessionResult::Warning)
                        && carried_by(s.kind).is_some()
                        && carried_by(s.kind) == before.running_action()
                });
                let Some(after) = before.abandoned(completed) else { continue };
                let why = match newest {
                    Some(s) if completed => format!("its session {} completed the action", s.id),
                    _ => "no session carries its action; nothing of the action is in effect".to_string(),
                };
                (after, why)
            }
        };
        // Only if nobody moved the plan since it was read.
        let (_, moved) = engine
            .store()
            .object_modify::<Plan, _, _>(plan.tenant_id, plan.id.0, |p| {
                if p.lifecycle != before {
                    return Ok(false);
                }
                p.lifecycle = after;
                p.updated_at = drover_types::now();
                Ok(true)
            })
            .await?;
        if moved {
            tracing::warn!(
                plan = %plan.id,
                name = %plan.name,
                from = before.state.display_name(),
                to = after.state.display_name(),
                "plan was {} with no running session ({why}); landed it",
                before.state.display_name()
            );
        }
    }
    Ok(())
}

async fn newest_session_of(engine: &Engine, plan: &Plan) -> Result<Option<Session>> {
    let filter = SessionFilter { target_id: Some(plan.id.0), limit: 1, ..Default::default() };
    let (sessions, _) = engine.store().session_list(plan.tenant_id, &filter).await?;
    Ok(sessions.into_iter().next())
}

/// Lands every replica left `Processing` with no unfinished run of its job: back to `Ready`.
/// Nothing is lost: a point is offered only once published, and the next run finds its bitmaps
/// on the disk (or compares hashes), whatever the abandoned run had done.
pub async fn reconcile_replicas(engine: &Engine) -> Result<()> {
    let running_jobs: HashSet<uuid::Uuid> = engine
        .store()
        .sessions_unfinished()
        .await?
        .into_iter()
        .filter_map(|s| match s.target {
            SessionTarget::ReplicationJob(j) => Some(j.0),
            _ => None,
        })
        .collect();
    for replica in engine.store().object_list_all::<Replica>().await? {
        if replica.state != ReplicaState::Processing || running_jobs.contains(&replica.job_id.0) {
            continue;
        }
        let (_, moved) = engine
            .store()
            .object_modify::<Replica, _, _>(replica.tenant_id, replica.id.0, |r| {
                if r.state != ReplicaState::Processing {
                    return Ok(false);
                }
                r.state = r.state.apply(ReplicaEvent::ReplicationFinished)?;
                r.updated_at = drover_types::now();
                Ok(true)
            })
            .await?;
        if moved {
            tracing::warn!(
                replica = %replica.id,
                name = %replica.name,
                "replica was Processing with no replication run under way; it is Ready again"
            );
        }
    }
    Ok(())
}

async fn set_state(engine: &Engine, vm: &Vm, state: VmPowerState) -> Result<()> {
    engine
        .store()
        .object_modify::<Vm, _, _>(vm.tenant_id, vm.id.0, |v| {
            v.power_state = state;
            v.updated_at = drover_types::now();
            Ok(())
        })
        .await?;
    Ok(())
}

/// How often expired tokens are deleted (each login leaves two rows behind).
/// How long audit entries are kept: a year and a bit, so a yearly review finds last year's.
pub const AUDIT_KEEP_DAYS: i64 = 400;

const TOKEN_PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Polls running VMs and records the ones that died; now and then deletes expired tokens.
pub async fn run(engine: Engine) {
    let mut tick = tokio::time::interval(engine.config().monitor_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_purge: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        if let Err(e) = check_running(&engine).await {
            tracing::warn!(error = %e, "VM monitor pass failed");
        }
        if last_purge.is_none_or(|t| t.elapsed() >= TOKEN_PURGE_EVERY) {
            last_purge = Some(tokio::time::Instant::now());
            match engine.store().tokens_purge_expired(drover_types::now()).await {
                Ok(n) if n > 0 => tracing::info!(tokens = n, "deleted expired tokens"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot delete expired tokens"),
            }
            let keep_from = drover_types::now() - chrono::Duration::days(AUDIT_KEEP_DAYS);
            match engine.store().audit_purge_before(keep_from).await {
                Ok(n) if n > 0 => {
                    tracing::info!(entries = n, "deleted audit entries older than {AUDIT_KEEP_DAYS} days")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot delete old audit entries"),
            }
        }
    }
}

async fn check_running(engine: &Engine) -> Result<()> {
    for vm in engine.store().object_list_all::<Vm>().await? {
        if vm.power_state != VmPowerState::Running {
            continue;
        }
        if let Ok(PowerState::Died | PowerState::Off) = engine.hv().status(vm.id.0).await {
            // Re-read under the version guard: a session may have changed it meanwhile.
            engine
                .store()
                .object_modify::<Vm, _, _>(vm.tenant_id, vm.id.0, |v| {
                    if v.power_state == VmPowerState::Running {
                        v.power_state = v.power_state.apply(drover_types::VmPowerEvent::DiedUnexpectedly)?;
                        v.updated_at = drover_types::now();
                    }
                    Ok(())
                })
                .await?;
            tracing::warn!(vm = %vm.id, name = %vm.name, "VM died");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_state_follows_the_hypervisor() {
        assert_eq!(recorded_for(Some(PowerState::Running), VmPowerState::Off), VmPowerState::Running);
        assert_eq!(recorded_for(None, VmPowerState::Running), VmPowerState::Died);
        assert_eq!(recorded_for(Some(PowerState::Off), VmPowerState::Starting), VmPowerState::Off);
        assert_eq!(recorded_for(None, VmPowerState::Off), VmPowerState::Off);
        assert_eq!(recorded_for(Some(PowerState::Died), VmPowerState::Running), VmPowerState::Died);
    }
}
