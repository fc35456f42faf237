//! Keeps recorded states true: VM power states to what the hypervisor shows, and on start every
//! in-progress state to the sessions that carry it.
//!
//! On start, [`reconcile`] re-attaches to QEMU processes that outlived the last drover process and
//! corrects every VM whose recorded state no session is about to change (a VM left `Starting` or
//! `Stopping` takes what the hypervisor shows). [`reconcile_plans`] and [`reconcile_replicas`]
//! land plans and replicas whose in-progress state no unfinished session will move, so a user can
//! act on them again. While drover runs, [`run`] notices VMs that died (crashed, killed from
//! outside) and records `Died`, and VMs recorded `Died` that their host shows running again (an
//! agent that was unreachable came back).
//!
//! VMs are asked of the agent of their host. A host whose agent cannot be reached keeps its VMs'
//! recorded states (they are unknown, not dead); its host record says it is unreachable.
//!
//! **Fencing.** A production VM whose replica failed over while production could not be reached
//! (`Replica::fence_source`) must not run: it would write to a disk whose changes no longer
//! count, and a later replication from it would overwrite what users did at DR (split brain).
//! When its host comes back and shows it running (started by the host, or never stopped behind
//! a cut link), the monitor powers it off, says so in the log and records it `Off`. A failover
//! with production reachable leaves production as it is (a drill may keep it running; failback
//! powers it off first). Replication from it is refused
//! while the replica is failed over; failback is what brings production back.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use drover_agent_api::HostAgent;
use drover_hv::PowerState;
use drover_store::SessionFilter;
use drover_types::{
    DatastoreId, Plan, Replica, ReplicaEvent, ReplicaState, Session, SessionResult, SessionState, SessionTarget, Vm,
    VmId, VmPowerState,
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

/// The agents of the hosts VMs run on, asked once per pass: `None` for a host whose agent
/// cannot be reached (its VMs keep their recorded states).
#[derive(Default)]
struct Agents {
    by_datastore: HashMap<DatastoreId, Option<Arc<dyn HostAgent>>>,
}

impl Agents {
    async fn of(&mut self, engine: &Engine, vm: &Vm) -> Option<Arc<dyn HostAgent>> {
        if let Some(a) = self.by_datastore.get(&vm.datastore_id) {
            return a.clone();
        }
        let agent = match crate::ops::vm_agent(engine, vm).await {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(vm = %vm.id, name = %vm.name, error = %e, "cannot reach the VM's host; its state is left as recorded");
                None
            }
        };
        self.by_datastore.insert(vm.datastore_id, agent.clone());
        agent
    }
}

/// The VMs an unfinished session works on: their states are the session's to set.
async fn busy_vms(engine: &Engine) -> Result<HashSet<uuid::Uuid>> {
    let unfinished = engine.store().sessions_unfinished().await?;
    Ok(unfinished
        .into_iter()
        .filter_map(|s| match s.target {
            SessionTarget::Vm(v) => Some(v.0),
            _ => None,
        })
        .collect())
}

/// Re-attaches and corrects VM states. VMs that an unfinished session works on are left to it.
pub async fn reconcile(engine: &Engine) -> Result<()> {
    let mut agents = Agents::default();
    // Each agent's VMs, listed once (the local agent re-attaches to its QEMU processes so).
    let mut observed_by_agent: HashMap<DatastoreId, Option<HashMap<uuid::Uuid, PowerState>>> = HashMap::new();
    let busy = busy_vms(engine).await?;
    for vm in engine.store().object_list_all::<Vm>().await? {
        if busy.contains(&vm.id.0) {
            continue;
        }
        if let std::collections::hash_map::Entry::Vacant(entry) = observed_by_agent.entry(vm.datastore_id) {
            let listed = match agents.of(engine, &vm).await {
                Some(agent) => match agent.vm_list().await {
                    Ok(v) => Some(v.into_iter().map(|p| (p.vm, p.power)).collect()),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot re-attach to a host's running VMs; their states are left as recorded");
                        None
                    }
                },
                None => None,
            };
            entry.insert(listed);
        }
        let Some(Some(observed)) = observed_by_agent.get(&vm.datastore_id) else { continue };
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

/// How often agents' certificates are checked for renewal (they are renewed in their last
/// [`drover_pki::RENEW_BEFORE_DAYS`] days, so an hour is plenty; the first check is at start).
const CERTIFICATE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Renews the control plane's own certificate and the agents' that are due, now and every
/// [`CERTIFICATE_CHECK_EVERY`].
/// Renewals wait on agents (up to a connection timeout each): this runs as a task of its own, so
/// an unreachable agent never delays the VM monitor.
pub async fn renew_certificates(engine: Engine) {
    let mut tick = tokio::time::interval(CERTIFICATE_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A few KiB of files read (and, once a year, written and fsynced).
        let own = engine.clone();
        match tokio::task::spawn_blocking(move || own.renew_own_certificate()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot renew the control plane's own certificate"),
            Err(e) => tracing::warn!(error = %e, "the control plane's certificate check failed"),
        }
        match engine.renew_due_agent_certificates().await {
            Ok(hosts) if !hosts.is_empty() => tracing::info!(hosts = hosts.len(), "renewed agents' certificates"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot check the agents' certificates"),
        }
    }
}

async fn check_running(engine: &Engine) -> Result<()> {
    let mut agents = Agents::default();
    let failed_over: HashSet<VmId> = engine
        .store()
        .object_list_all::<Replica>()
        .await?
        .into_iter()
        .filter(|r| r.fence_source && matches!(r.state, ReplicaState::Failover | ReplicaState::FailedFailover))
        .map(|r| r.source_vm_id)
        .collect();
    let busy = busy_vms(engine).await?;
    for vm in engine.store().object_list_all::<Vm>().await? {
        let fence = failed_over.contains(&vm.id);
        let watched = matches!(vm.power_state, VmPowerState::Running | VmPowerState::Died) || fence;
        if !watched || busy.contains(&vm.id.0) {
            continue;
        }
        let Some(agent) = agents.of(engine, &vm).await else { continue };
        let Ok(observed) = agent.vm_status(vm.id.0).await else { continue };
        let running = matches!(observed, PowerState::Running | PowerState::Paused);
        if fence && running {
            fence_vm(engine, agent.as_ref(), &vm).await?;
            continue;
        }
        if vm.power_state == VmPowerState::Died && running {
            engine
                .store()
                .object_modify::<Vm, _, _>(vm.tenant_id, vm.id.0, |v| {
                    if v.power_state == VmPowerState::Died {
                        v.power_state = VmPowerState::Running;
                        v.updated_at = drover_types::now();
                    }
                    Ok(())
                })
                .await?;
            tracing::info!(vm = %vm.id, name = %vm.name, "VM recorded as died runs on its host: recorded running");
            continue;
        }
        if vm.power_state == VmPowerState::Running && matches!(observed, PowerState::Died | PowerState::Off) {
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

/// Powers off a production VM whose replica is failed over (see the module documentation).
async fn fence_vm(engine: &Engine, agent: &dyn HostAgent, vm: &Vm) -> Result<()> {
    tracing::warn!(
        vm = %vm.id,
        name = %vm.name,
        "fencing: production VM runs while its replica is failed over; powering it off"
    );
    agent.vm_power_off(vm.id.0).await.map_err(crate::ops::vm_err)?;
    set_state(engine, vm, VmPowerState::Off).await?;
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
