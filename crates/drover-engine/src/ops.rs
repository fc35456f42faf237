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
//! Every step acts through the agent of the host the VM's datastore is on
//! ([`crate::Engine::datastore_agent`]): the agent inside `drover serve` for a `local` host, a
//! `drover agent` for another; the engine never names a disk's path.
//!
//! Deleting is not undone. Its record goes last, so a delete that fails half-way leaves a VM
//! record (marked not provisioned once its disks are going) that a second delete finishes;
//! nothing is ever left on disk without a record that points at it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_agent_api::{
    AgentError, DiskRef, ErrorKind, HostAgent, NewDisk, VmBoot, VmDisk, VmDisksSpec, VmNic, VmRunSpec,
};
use drover_types::{
    Datastore, DatastoreId, LogLevel, Session, SessionKind, SessionTarget, Task, TenantId, Vm, VmId, VmPowerEvent,
    VmPowerState,
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
    /// `<datastore>/<vm id>`: where the VM's disk images live, as recorded by sessions before
    /// VMs ran through agents; steps now name disks by datastore (below) and the agent finds them.
    pub disk_dir: PathBuf,
    #[serde(default)]
    pub wait_heartbeat: bool,
    /// The VM's datastore, so a step finds its agent even after the VM record is gone. `None`
    /// in sessions recorded before it existed: the VM record says.
    #[serde(default)]
    pub datastore_id: Option<DatastoreId>,
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

/// What the agent runs for a VM of the inventory: its own disks, by reference.
pub fn run_spec(vm: &Vm) -> VmRunSpec {
    VmRunSpec {
        id: vm.id.0,
        name: vm.name.clone(),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        disks: vm
            .disks
            .iter()
            .enumerate()
            .map(|(index, d)| {
                VmDisk::Image(DiskRef { datastore: vm.datastore_id.0, vm: vm.id.0, disk: d.name.clone(), index })
            })
            .collect(),
        nics: vm
            .nics
            .iter()
            .map(|n| VmNic { network: n.network.clone(), mac: n.mac.clone(), no_uplink: false })
            .collect(),
        boot: vm_boot(vm),
        hardware: vm_hardware(vm),
    }
}

/// The VM's hardware as the agent contract says it.
pub(crate) fn vm_hardware(vm: &Vm) -> drover_agent_api::Hardware {
    use drover_agent_api::{DiskBus as B, Machine as M, NicModel as N};
    let h = &vm.hardware;
    drover_agent_api::Hardware {
        machine: match h.machine {
            drover_types::MachineType::Pc => M::Pc,
            drover_types::MachineType::Q35 => M::Q35,
        },
        disk_buses: h
            .disk_buses
            .iter()
            .map(|b| match b {
                drover_types::DiskBus::Virtio => B::Virtio,
                drover_types::DiskBus::Sata => B::Sata,
                drover_types::DiskBus::Scsi => B::Scsi,
                drover_types::DiskBus::Ide => B::Ide,
            })
            .collect(),
        nic_models: h
            .nic_models
            .iter()
            .map(|n| match n {
                drover_types::NicModel::Virtio => N::Virtio,
                drover_types::NicModel::E1000 => N::E1000,
                drover_types::NicModel::E1000e => N::E1000e,
                drover_types::NicModel::Rtl8139 => N::Rtl8139,
            })
            .collect(),
    }
}

/// The hardware an agent found on a domain, as the inventory keeps it.
pub(crate) fn hardware_of(h: &drover_agent_api::Hardware) -> drover_types::VmHardware {
    use drover_types::{DiskBus as B, MachineType as M, NicModel as N};
    drover_types::VmHardware {
        machine: match h.machine {
            drover_agent_api::Machine::Pc => M::Pc,
            drover_agent_api::Machine::Q35 => M::Q35,
        },
        disk_buses: h
            .disk_buses
            .iter()
            .map(|b| match b {
                drover_agent_api::DiskBus::Virtio => B::Virtio,
                drover_agent_api::DiskBus::Sata => B::Sata,
                drover_agent_api::DiskBus::Scsi => B::Scsi,
                drover_agent_api::DiskBus::Ide => B::Ide,
            })
            .collect(),
        nic_models: h
            .nic_models
            .iter()
            .map(|n| match n {
                drover_agent_api::NicModel::Virtio => N::Virtio,
                drover_agent_api::NicModel::E1000 => N::E1000,
                drover_agent_api::NicModel::E1000e => N::E1000e,
                drover_agent_api::NicModel::Rtl8139 => N::Rtl8139,
            })
            .collect(),
    }
}

/// The NICs of a test VM made from `vm`: the same networks and MACs, isolated. The host still
/// reaches them to check a port.
pub(crate) fn no_uplink_vm_nics(vm: &Vm) -> Vec<VmNic> {
    vm.nics.iter().map(|n| VmNic { network: n.network.clone(), mac: n.mac.clone(), no_uplink: true }).collect()
}

/// How the agent boots a VM (or a replica or test VM made from it).
pub(crate) fn vm_boot(vm: &Vm) -> VmBoot {
    VmBoot {
        kernel: vm.boot.kernel.clone(),
        initrd: vm.boot.initrd.clone(),
        cmdline: vm.boot.cmdline.clone(),
        firmware: match vm.boot.firmware {
            drover_types::Firmware::Bios => drover_agent_api::Firmware::Bios,
            drover_types::Firmware::Uefi => drover_agent_api::Firmware::Uefi,
        },
    }
}

/// The agent of the host a datastore is on, with the datastore registered there.
pub(crate) async fn datastore_agent_of(engine: &Engine, datastore: DatastoreId) -> Result<Arc<dyn HostAgent>> {
    let ds = engine.store().object_get_any_tenant::<Datastore>(datastore.0).await?;
    engine.datastore_agent(&ds).await
}

/// The agent that runs a VM (the host of its datastore).
pub(crate) async fn vm_agent(engine: &Engine, vm: &Vm) -> Result<Arc<dyn HostAgent>> {
    datastore_agent_of(engine, vm.datastore_id).await
}

/// An agent's error about a VM, as a step reports it.
pub(crate) fn vm_err(e: AgentError) -> Error {
    match e.kind {
        ErrorKind::Invalid => Error::invalid(e.message),
        _ => Error::Unavailable(e.message),
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

/// The agent of the VM a session acts on.
async fn op_agent(ctx: &StepCtx, p: &VmOpParams) -> Result<Arc<dyn HostAgent>> {
    let datastore = match p.datastore_id {
        Some(d) => d,
        None => vm_get(ctx, p).await?.datastore_id,
    };
    datastore_agent_of(&ctx.engine, datastore).await
}

/// The VM state that matches what its host says now.
async fn observed_state(ctx: &StepCtx, p: &VmOpParams) -> Result<VmPowerState> {
    let agent = op_agent(ctx, p).await?;
    Ok(match agent.vm_status(p.vm_id.0).await.map_err(vm_err)? {
        drover_hv::PowerState::Running | drover_hv::PowerState::Paused => VmPowerState::Running,
        drover_hv::PowerState::Died => VmPowerState::Died,
        drover_hv::PowerState::Off => VmPowerState::Off,
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
        let agent = vm_agent(&ctx.engine, &vm).await?;
        for d in &vm.disks {
            match &d.import_from {
                Some(src) => ctx.log(LogLevel::Info, format!("importing disk {} from {src}", d.name)).await,
                None => ctx.log(LogLevel::Info, format!("creating disk {} ({} bytes)", d.name, d.size_bytes)).await,
            }
        }
        let spec = VmDisksSpec {
            datastore: vm.datastore_id.0,
            vm: vm.id.0,
            disks: vm
                .disks
                .iter()
                .map(|d| NewDisk { name: d.name.clone(), size: d.size_bytes, import_from: d.import_from.clone() })
                .collect(),
        };
        agent.vm_disks_ensure(&spec).await.map_err(vm_err)?;
        Ok(json!({ "disks": vm.disks.iter().map(|d| &d.name).collect::<Vec<_>>() }))
    }
    async fn undo(&self, ctx: &StepCtx, _: &Value) -> Result<()> {
        remove_disks(ctx, &self.0).await
    }
}

/// Removes the VM's disks through its agent. Idempotent; nothing to do once the VM record and
/// the session's datastore are both unknown (a session of before agents whose VM is gone).
async fn remove_disks(ctx: &StepCtx, p: &VmOpParams) -> Result<()> {
    let datastore = match p.datastore_id {
        Some(d) => d,
        None => match vm_get(ctx, p).await {
            Ok(vm) => vm.datastore_id,
            Err(Error::NotFound { .. }) => return remove_dir(&p.disk_dir).await,
            Err(e) => return Err(e),
        },
    };
    let agent = datastore_agent_of(&ctx.engine, datastore).await?;
    agent.vm_disks_remove(datastore.0, p.vm_id.0).await.map_err(vm_err)
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

/// Asks the guest of `vm` to shut down through its agent, powers it off after the engine's
/// shutdown timeout, and records it off. How it went.
pub(crate) async fn shut_down(engine: &Engine, agent: &dyn HostAgent, vm: &Vm) -> Result<drover_hv::ShutdownOutcome> {
    let outcome = agent.vm_shutdown(vm.id.0, engine.config().shutdown_timeout).await.map_err(vm_err)?;
    set_vm_power(engine, vm.tenant_id, vm.id, VmPowerState::Off).await?;
    Ok(outcome)
}

/// Powers a VM on through `agent`; while one of its disk images is held by another process,
/// waits for it (up to [`IMAGE_LOCK_WAIT`]) and says so in the session's log once.
pub(crate) async fn power_on(ctx: &StepCtx, agent: &dyn HostAgent, spec: &VmRunSpec) -> Result<()> {
    let deadline = tokio::time::Instant::now() + IMAGE_LOCK_WAIT;
    let mut told = false;
    loop {
        match agent.vm_power_on(spec).await {
            Err(e) if e.kind == ErrorKind::Busy && tokio::time::Instant::now() < deadline => {
                let why = e.message;
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
            Err(e) => return Err(vm_err(e)),
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
        let agent = vm_agent(&ctx.engine, &vm).await?;
        power_on(ctx, agent.as_ref(), &run_spec(&vm)).await?;
        ctx.log(LogLevel::Info, format!("VM {} powered on ({})", vm.name, agent.info().hypervisor)).await;
        Ok(Value::Null)
    }
    async fn undo(&self, ctx: &StepCtx, _: &Value) -> Result<()> {
        op_agent(ctx, &self.0).await?.vm_power_off(self.0.vm_id.0).await.map_err(vm_err)
    }
}

struct WaitHeartbeat(VmOpParams);

/// `, at 10.0.2.15, ...` when the guest said where it is (its guest agent), else nothing.
pub(crate) fn at_addresses(hb: &drover_agent_api::Heartbeat) -> String {
    if hb.addresses.is_empty() { String::new() } else { format!(", at {}", hb.addresses.join(", ")) }
}

#[async_trait]
impl Step for WaitHeartbeat {
    fn name(&self) -> String {
        "wait_heartbeat".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let timeout = ctx.engine.config().heartbeat_timeout;
        let hb = op_agent(ctx, &self.0).await?.vm_wait_heartbeat(self.0.vm_id.0, timeout).await.map_err(vm_err)?;
        ctx.log(LogLevel::Info, format!("heartbeat: guest up {:.1} s{}", hb.uptime_secs, at_addresses(&hb))).await;
        // The VM's view shows where its guest is; a remote agent's list is bounded here too.
        let addresses: Vec<String> = hb.addresses.iter().take(32).cloned().collect();
        vm_set_state(ctx, &self.0, |vm| {
            vm.guest_addresses = addresses.clone();
            Ok(())
        })
        .await?;
        Ok(json!({ "uptime_secs": hb.uptime_secs, "marker": hb.marker, "addresses": hb.addresses }))
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
        let agent = op_agent(ctx, &self.p).await?;
        if self.graceful {
            let outcome =
                agent.vm_shutdown(self.p.vm_id.0, ctx.engine.config().shutdown_timeout).await.map_err(vm_err)?;
            let level =
                if outcome == drover_hv::ShutdownOutcome::ForcedOff { LogLevel::Warning } else { LogLevel::Info };
            ctx.log(level, format!("shutdown: {outcome:?}")).await;
            Ok(json!({ "outcome": outcome }))
        } else {
            agent.vm_power_off(self.p.vm_id.0).await.map_err(vm_err)?;
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
        op_agent(ctx, &self.0).await?.vm_forget(self.0.vm_id.0, false).await.map_err(vm_err)?;
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
        remove_disks(ctx, &self.0).await?;
        ctx.log(LogLevel::Info, "removed the VM's disks").await;
        Ok(Value::Null)
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}
