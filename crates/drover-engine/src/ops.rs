//! The sagas of the VM operations.
//!
//! | operation | steps |
//! |---|---|
//! | create    | `reserve` (undo: remove the VM record) → `create_disks` (undo: remove them) → `mark_provisioned` |
//! | power on  | `begin_start` (undo: back to Off) → `power_on` (undo: power off) → `wait_heartbeat` → `mark_running` |
//! | shutdown  | `begin_stop` (undo: state from the hypervisor) → `shutdown_guest` → `mark_off` |
//! | power off | `begin_stop` → `power_off` → `mark_off` |
//! | delete    | `power_off` → `check_unreferenced` → `forget_runtime` → `delete_disks` → `remove_record` |
//!
//! The API layer moves the VM's power state to `Starting`/`Stopping` before it submits the
//! session, so a second request is refused at once (409); the first step of each saga checks that
//! state and its undo puts the VM back as it really is.
//!
//! Deleting is not undone. Its record goes last, so a delete that fails half-way leaves a VM
//! record (marked not provisioned once its disks are going) that a second delete finishes;
//! nothing is ever left on disk without a record that points at it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_hv::{BootSpec, DiskSpec, NicSpec, VmSpec};
use drover_qemu::image;
use drover_types::{
    Datastore, LogLevel, Session, SessionKind, SessionTarget, Task, TenantId, Vm, VmId, VmPowerEvent, VmPowerState,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::saga::{Saga, SagaStep, Step, StepCtx};
use crate::{Engine, Error, Result};

/// What the VM sessions carry in `params`: enough to finish even after the VM record is gone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmOpParams {
    pub vm_id: VmId,
    pub tenant_id: TenantId,
    /// `<datastore>/<vm id>`: where the VM's disk images live.
    pub disk_dir: PathBuf,
    #[serde(default)]
    pub wait_heartbeat: bool,
}

pub(crate) fn register(engine: &Engine) {
    engine.register_saga(SessionKind::VmCreate, Arc::new(vm_saga));
    engine.register_saga(SessionKind::VmPowerOn, Arc::new(vm_saga));
    engine.register_saga(SessionKind::VmShutdown, Arc::new(vm_saga));
    engine.register_saga(SessionKind::VmPowerOff, Arc::new(vm_saga));
    engine.register_saga(SessionKind::VmDelete, Arc::new(vm_saga));
}

pub fn disk_dir(datastore: &Datastore, vm: VmId) -> PathBuf {
    Path::new(&datastore.path).join(vm.to_string())
}

pub fn disk_path(dir: &Path, disk: &str) -> PathBuf {
    dir.join(format!("{disk}.qcow2"))
}

fn params(session: &Session) -> Result<VmOpParams> {
    serde_json::from_value(session.params.clone())
        .map_err(|e| Error::internal(format!("session {} has unreadable parameters: {e}", session.id)))
}

fn vm_saga(session: &Session, tasks: &[Task]) -> Result<Saga> {
    let SessionTarget::Vm(_) = session.target else {
        return Err(Error::internal("a VM operation needs a VM target"));
    };
    let p = params(session)?;
    if tasks.len() != 1 {
        return Err(Error::internal("a VM operation has exactly one task"));
    }
    let step = |weight: u32, step: Box<dyn Step>| SagaStep { task: Some(0), group: None, weight, critical: true, step };
    let steps = match session.kind {
        SessionKind::VmCreate => vec![
            step(1, Box::new(Reserve(p.clone()))),
            step(8, Box::new(CreateDisks(p.clone()))),
            step(1, Box::new(MarkProvisioned(p))),
        ],
        SessionKind::VmPowerOn => {
            let mut s = vec![
                step(1, Box::new(BeginPower { p: p.clone(), expect: VmPowerState::Starting })),
                step(4, Box::new(PowerOn(p.clone()))),
            ];
            if p.wait_heartbeat {
                s.push(step(4, Box::new(WaitHeartbeat(p.clone()))));
            }
            s.push(step(1, Box::new(MarkPower { p, event: VmPowerEvent::CameUp })));
            s
        }
        SessionKind::VmShutdown | SessionKind::VmPowerOff => vec![
            step(1, Box::new(BeginPower { p: p.clone(), expect: VmPowerState::Stopping })),
            step(8, Box::new(Stop { p: p.clone(), graceful: session.kind == SessionKind::VmShutdown })),
            step(1, Box::new(MarkPower { p, event: VmPowerEvent::WentDown })),
        ],
        SessionKind::VmDelete => vec![
            step(3, Box::new(Stop { p: p.clone(), graceful: false })),
            step(1, Box::new(CheckUnreferenced(p.clone()))),
            step(1, Box::new(ForgetRuntime(p.clone()))),
            step(3, Box::new(DeleteDisks(p.clone()))),
            step(1, Box::new(RemoveRecord(p))),
        ],
        other => return Err(Error::internal(format!("{} is not a VM operation", other.as_str()))),
    };
    Ok(Saga::unwinding(steps))
}

/// The hypervisor's view of a VM, built from the inventory.
pub fn vm_spec(vm: &Vm, disk_dir: &Path) -> VmSpec {
    VmSpec {
        id: vm.id.0,
        name: vm.name.clone(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disks: vm.disks.iter().map(|d| DiskSpec { path: disk_path(disk_dir, &d.name) }).collect(),
        nics: vm
            .nics
            .iter()
            .map(|n| NicSpec { network: n.network.clone(), mac: n.mac.clone(), no_uplink: false })
            .collect(),
        boot: boot_spec(vm),
    }
}

/// The NICs of a replica or test VM made from `vm`: the same networks and MACs, with no uplink
/// until network mapping exists. The host still reaches them to check a port.
pub(crate) fn no_uplink_nics(vm: &Vm) -> Vec<NicSpec> {
    vm.nics.iter().map(|n| NicSpec { network: n.network.clone(), mac: n.mac.clone(), no_uplink: true }).collect()
}

/// How the hypervisor boots a VM (or a replica or test VM made from it).
pub(crate) fn boot_spec(vm: &Vm) -> BootSpec {
    BootSpec {
        kernel: vm.boot.kernel.as_ref().map(PathBuf::from),
        initrd: vm.boot.initrd.as_ref().map(PathBuf::from),
        cmdline: vm.boot.cmdline.clone(),
    }
}

/// Records a VM's power state as drover set it (a VM started or stopped by a plan saga).
pub(crate) async fn set_vm_power(engine: &Engine, tenant: TenantId, vm: VmId, state: VmPowerState) -> Result<()> {
    engine
        .store()
        .object_modify::<Vm, _, _>(tenant, vm.0, |v| {
            v.power_state = state;
            v.updated_at = drover_types::now();
            Ok(())
        })
        .await?;
    Ok(())
}

/// Applies `event` to a replica when it is in one of `only_if` (so a rerun after a crash, or an
/// undo of a step that never moved it, changes nothing).
pub(crate) async fn replica_event(
    engine: &Engine,
    tenant: TenantId,
    replica: drover_types::ReplicaId,
    event: drover_types::ReplicaEvent,
    only_if: &[drover_types::ReplicaState],
) -> Result<()> {
    engine
        .store()
        .object_modify::<drover_types::Replica, _, _>(tenant, replica.0, |r| {
            if only_if.contains(&r.state) {
                r.state = r.state.apply(event)?;
                r.updated_at = drover_types::now();
            }
            Ok(())
        })
        .await?;
    Ok(())
}

/// A tool's error, classed as the driver's.
fn tool_err(e: drover_qemu::ToolError) -> Error {
    hv_err(e.into())
}

fn hv_err(e: drover_hv::HvError) -> Error {
    match e {
        drover_hv::HvError::InvalidSpec(m) => Error::invalid(m),
        drover_hv::HvError::UnknownVm(id) => Error::not_found(VmId::KIND, id),
        other => Error::Unavailable(drover_types::error_chain(&other)),
    }
}

async fn vm_get(ctx: &StepCtx, p: &VmOpParams) -> Result<Vm> {
    ctx.engine.store().object_get::<Vm>(p.tenant_id, p.vm_id.0).await
}

async fn vm_set_state(ctx: &StepCtx, p: &VmOpParams, f: impl Fn(&mut Vm) -> Result<()>) -> Result<Vm> {
    let (vm, ()) = ctx
        .engine
        .store()
        .object_modify::<Vm, _, _>(p.tenant_id, p.vm_id.0, |vm| {
            f(vm)?;
            vm.updated_at = drover_types::now();
            Ok(())
        })
        .await?;
    Ok(vm)
}

/// The VM state that matches what the hypervisor says now.
async fn observed_state(ctx: &StepCtx, p: &VmOpParams) -> Result<VmPowerState> {
    Ok(match ctx.engine.hv().status(p.vm_id.0).await {
        Ok(drover_hv::PowerState::Running | drover_hv::PowerState::Paused) => VmPowerState::Running,
        Ok(drover_hv::PowerState::Died) => VmPowerState::Died,
        Ok(drover_hv::PowerState::Off) | Err(drover_hv::HvError::UnknownVm(_)) => VmPowerState::Off,
        Err(e) => return Err(hv_err(e)),
    })
}

struct Reserve(VmOpParams);

#[async_trait]
impl Step for Reserve {
    fn name(&self) -> String {
        "reserve".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        vm_get(ctx, &self.0).await?;
        Ok(Value::Null)
    }
    async fn undo(&self, ctx: &StepCtx, _: &Value) -> Result<()> {
        match ctx.engine.store().object_delete::<Vm>(self.0.tenant_id, self.0.vm_id.0).await {
            Ok(()) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

struct CreateDisks(VmOpParams);

#[async_trait]
impl Step for CreateDisks {
    fn name(&self) -> String {
        "create_disks".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let vm = vm_get(ctx, &self.0).await?;
        tokio::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.0.disk_dir)
            .await
            .map_err(|e| Error::Unavailable(format!("cannot create {}: {e}", self.0.disk_dir.display())))?;
        let mut paths = Vec::new();
        for d in &vm.disks {
            let path = disk_path(&self.0.disk_dir, &d.name);
            // Idempotent: an image that is there and readable was made by an earlier attempt,
            // which wrote it under a temporary name and renamed it only when complete.
            if image::info(&path).await.is_ok() {
                paths.push(path);
                continue;
            }
            let partial = path.with_extension("qcow2.partial");
            let _ = image::remove(&partial).await;
            match &d.import_from {
                Some(src) => {
                    ctx.log(LogLevel::Info, format!("importing disk {} from {src}", d.name)).await;
                    image::import_qcow2(Path::new(src), &partial).await.map_err(tool_err)?;
                }
                None => {
                    ctx.log(LogLevel::Info, format!("creating disk {} ({} bytes)", d.name, d.size_bytes)).await;
                    image::create_qcow2(&partial, d.size_bytes).await.map_err(tool_err)?;
                }
            }
            // Private whatever the process's umask: a disk image is the tenant's data.
            tokio::fs::set_permissions(&partial, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .await
                .map_err(|e| Error::Unavailable(format!("cannot make {} private: {e}", partial.display())))?;
            drover_qemu::durable::publish(&partial, &path)
                .await
                .map_err(|e| Error::Unavailable(format!("cannot move {} into place: {e}", path.display())))?;
            paths.push(path);
        }
        Ok(json!({ "paths": paths }))
    }
    async fn undo(&self, _ctx: &StepCtx, _: &Value) -> Result<()> {
        remove_dir(&self.0.disk_dir).await
    }
}

async fn remove_dir(dir: &Path) -> Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Unavailable(format!("cannot remove {}: {e}", dir.display()))),
    }
}

struct MarkProvisioned(VmOpParams);

#[async_trait]
impl Step for MarkProvisioned {
    fn name(&self) -> String {
        "mark_provisioned".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        vm_set_state(ctx, &self.0, |vm| {
            vm.provisioned = true;
            Ok(())
        })
        .await?;
        Ok(Value::Null)
    }
    async fn undo(&self, ctx: &StepCtx, _: &Value) -> Result<()> {
        match vm_set_state(ctx, &self.0, |vm| {
            vm.provisioned = false;
            Ok(())
        })
        .await
        {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Checks the state the API layer set; its undo restores the state the hypervisor shows.
struct BeginPower {
    p: VmOpParams,
    expect: VmPowerState,
}

#[async_trait]
impl Step for BeginPower {
    fn name(&self) -> String {
        "begin".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let vm = vm_get(ctx, &self.p).await?;
        if vm.power_state != self.expect {
            return Err(Error::conflict(format!("VM {} is {:?}, expected {:?}", vm.name, vm.power_state, self.expect)));
        }
        Ok(Value::Null)
    }
    async fn undo(&self, ctx: &StepCtx, _: &Value) -> Result<()> {
        let observed = observed_state(ctx, &self.p).await?;
        vm_set_state(ctx, &self.p, |vm| {
            vm.power_state = observed;
            Ok(())
        })
        .await?;
        ctx.log(LogLevel::Info, format!("VM state set to {observed:?} as the hypervisor reports")).await;
        Ok(())
    }
}

/// How long a power-on waits for another process (a replication cut of the powered-off VM,
/// a retention merge) to let go of a disk image before it fails.
pub(crate) const IMAGE_LOCK_WAIT: Duration = Duration::from_secs(120);

/// Powers a VM on; while one of its disk images is held by another process, waits for it (up to
/// [`IMAGE_LOCK_WAIT`]) and says so in the session's log once.
pub(crate) async fn power_on(ctx: &StepCtx, spec: &drover_hv::VmSpec) -> Result<()> {
    let deadline = tokio::time::Instant::now() + IMAGE_LOCK_WAIT;
    let mut told = false;
    loop {
        match ctx.engine.hv().power_on(spec).await {
            Err(drover_hv::HvError::ImageLocked(why)) if tokio::time::Instant::now() < deadline => {
                if !told {
                    let msg = format!(
                        "{}: a disk is in use by another process (a replication run?); waiting: {why}",
                        spec.name
                    );
                    ctx.log(LogLevel::Warning, msg).await;
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(hv_err(e)),
            Ok(()) => {
                if told {
                    ctx.log(LogLevel::Info, format!("{}: the disk was released", spec.name)).await;
                }
                return Ok(());
            }
        }
    }
}

struct PowerOn(VmOpParams);

#[async_trait]
impl Step for PowerOn {
    fn name(&self) -> String {
        "power_on".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let vm = vm_get(ctx, &self.0).await?;
        if !vm.provisioned {
            return Err(Error::conflict(format!("VM {} has no disks yet: its create session did not finish", vm.name)));
        }
        let spec = vm_spec(&vm, &self.0.disk_dir);
        power_on(ctx, &spec).await?;
        ctx.log(LogLevel::Info, format!("VM {} powered on ({})", vm.name, ctx.engine.hv().kind())).await;
        Ok(Value::Null)
    }
    async fn undo(&self, ctx: &StepCtx, _: &Value) -> Result<()> {
        ctx.engine.hv().power_off(self.0.vm_id.0).await.map_err(hv_err)
    }
}

struct WaitHeartbeat(VmOpParams);

#[async_trait]
impl Step for WaitHeartbeat {
    fn name(&self) -> String {
        "wait_heartbeat".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let timeout = ctx.engine.config().heartbeat_timeout;
        let hb = ctx.engine.hv().wait_heartbeat(self.0.vm_id.0, timeout).await.map_err(hv_err)?;
        ctx.log(LogLevel::Info, format!("heartbeat: guest up {:.1} s", hb.uptime_secs)).await;
        Ok(json!({ "uptime_secs": hb.uptime_secs, "marker": hb.marker }))
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

struct MarkPower {
    p: VmOpParams,
    event: VmPowerEvent,
}

#[async_trait]
impl Step for MarkPower {
    fn name(&self) -> String {
        "mark_state".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let event = self.event;
        let vm = vm_set_state(ctx, &self.p, |vm| {
            vm.power_state = vm.power_state.apply(event)?;
            Ok(())
        })
        .await?;
        Ok(json!({ "power_state": vm.power_state }))
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        // The earlier steps' undos restore the real state.
        Ok(())
    }
}

struct Stop {
    p: VmOpParams,
    graceful: bool,
}

#[async_trait]
impl Step for Stop {
    fn name(&self) -> String {
        if self.graceful { "shutdown_guest".into() } else { "power_off".into() }
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let hv = ctx.engine.hv();
        if self.graceful {
            let outcome = hv.shutdown(self.p.vm_id.0, ctx.engine.config().shutdown_timeout).await.map_err(hv_err)?;
            let level =
                if outcome == drover_hv::ShutdownOutcome::ForcedOff { LogLevel::Warning } else { LogLevel::Info };
            ctx.log(level, format!("shutdown: {outcome:?}")).await;
            Ok(json!({ "outcome": outcome }))
        } else {
            hv.power_off(self.p.vm_id.0).await.map_err(hv_err)?;
            Ok(Value::Null)
        }
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        // A stopped VM is not started again by an undo; `begin`'s undo records the real state.
        Ok(())
    }
}

struct CheckUnreferenced(VmOpParams);

#[async_trait]
impl Step for CheckUnreferenced {
    fn name(&self) -> String {
        "check_unreferenced".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        ctx.engine.store().object_check_unreferenced::<Vm>(self.0.tenant_id, self.0.vm_id.0).await?;
        Ok(Value::Null)
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

struct RemoveRecord(VmOpParams);

#[async_trait]
impl Step for RemoveRecord {
    fn name(&self) -> String {
        "remove_record".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        match ctx.engine.store().object_delete::<Vm>(self.0.tenant_id, self.0.vm_id.0).await {
            Ok(()) | Err(Error::NotFound { .. }) => Ok(Value::Null),
            Err(e) => Err(e),
        }
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

struct ForgetRuntime(VmOpParams);

#[async_trait]
impl Step for ForgetRuntime {
    fn name(&self) -> String {
        "forget_runtime".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        ctx.engine.hv().forget(self.0.vm_id.0).await.map_err(hv_err)?;
        Ok(Value::Null)
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

struct DeleteDisks(VmOpParams);

#[async_trait]
impl Step for DeleteDisks {
    fn name(&self) -> String {
        "delete_disks".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        // First say the disks are going, so the record never claims disks that are gone.
        match vm_set_state(ctx, &self.0, |vm| {
            vm.provisioned = false;
            Ok(())
        })
        .await
        {
            Ok(_) | Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        remove_dir(&self.0.disk_dir).await?;
        ctx.log(LogLevel::Info, format!("removed {}", self.0.disk_dir.display())).await;
        Ok(Value::Null)
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}
