//! Keeps VM power states true to what the hypervisor shows.
//!
//! On start, [`reconcile`] re-attaches to QEMU processes that outlived the last drover process and
//! corrects every VM whose recorded state no session is about to change. While drover runs,
//! [`run`] notices VMs that died (crashed, killed from outside) and records `Died`.

use std::collections::{HashMap, HashSet};

use drover_hv::PowerState;
use drover_types::{SessionTarget, Vm, VmPowerState};

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
