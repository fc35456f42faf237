//! The client's commands: their arguments (clap) and what each one sends.
//!
//! Request bodies are built by small pure functions (`*_body`) so the unit tests can check each
//! one against the API's own request type, which refuses unknown fields: a body the CLI builds
//! and the server would reject fails here first.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use drover_api::views::{
    BootBody, DiskBody, FirmwareBody, NetworkMappingBody, NicBody, PlanActionView, PlanView, ReplicationJobView,
    ScheduleBody, SessionView,
};
use drover_engine::saga::ContinueOption;
use serde_json::{Value, json};
use uuid::Uuid;

use super::api::{Api, Connection, Request, credentials_from};
use super::credentials::CredentialStore;
use super::render;
use super::{ClientCommand, Ctx, Expect, OutputFormat, WaitArgs, emit, prompt_password, read_input_file};

// ------------------------------------------------------------------------------------------------
// Arguments

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The user to log in as.
    #[arg(long)]
    pub user: String,
    /// The password; asked for on the terminal when absent. Visible to other local users in the
    /// process list: prefer the prompt or DROVER_PASSWORD.
    #[arg(long, env = "DROVER_PASSWORD", hide_env_values = true, allow_hyphen_values = true)]
    pub password: Option<String>,
}

// An object's id. (A `//` comment: clap would show a doc comment as every command's help.)
#[derive(Debug, Args)]
pub struct IdArg {
    pub id: Uuid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SiteKindArg {
    Production,
    /// Disaster recovery.
    #[value(alias = "disaster-recovery")]
    Dr,
}

#[derive(Debug, Subcommand)]
pub enum SiteCommand {
    /// Lists the sites.
    List,
    /// Creates a site.
    Create {
        name: String,
        #[arg(long, value_enum)]
        kind: SiteKindArg,
    },
    /// Shows a site.
    Get(IdArg),
    /// Renames a site.
    Update(RenameArgs),
    /// Deletes a site.
    Delete(IdArg),
}

// An id and a new name (sites, datastores).
#[derive(Debug, Args)]
pub struct RenameArgs {
    pub id: Uuid,
    #[arg(long)]
    pub name: String,
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Lists the hosts.
    List,
    /// Adds a host.
    Create {
        name: String,
        /// The site the host belongs to.
        #[arg(long)]
        site: Uuid,
        /// How the server reaches the host's agent; `local` is the agent inside `drover serve`.
        #[arg(long, default_value = "local")]
        address: String,
    },
    /// Shows a host.
    Get(IdArg),
    /// Renames a host or changes how it is reached.
    #[command(group(ArgGroup::new("change").required(true).multiple(true).args(["name", "address"])))]
    Update {
        id: Uuid,
        #[arg(long)]
        name: Option<String>,
        /// How the server reaches the host's agent; `local` is the agent inside `drover serve`.
        #[arg(long)]
        address: Option<String>,
    },
    /// Removes a host.
    Delete(IdArg),
    /// A one-time enrolment token for the host's `drover agent` (printed once, with the command
    /// to run on the host).
    Enrol {
        id: Uuid,
        /// Seconds the token is good for (60 to 604800).
        #[arg(long)]
        ttl_secs: Option<u64>,
    },
    /// How the control plane last saw the host's agent: state, enrolled, last seen, last error.
    Agent(IdArg),
    /// Renews the host's agent certificate now, from a new key (the control plane also does it
    /// by itself in the certificate's last month). The agent must be reachable.
    RenewCertificate(IdArg),
    /// The host's libvirt domains (its agent runs `--hypervisor libvirt`): which can be imported
    /// with `drover vm import`, and which are.
    Domains(IdArg),
    /// The networks VMs may be connected to on the host (its agent's `--network`): what a
    /// replication job's `--network FROM=TO` may map to.
    Networks(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum DatastoreCommand {
    /// Lists the datastores.
    List,
    /// Adds a datastore.
    Create {
        name: String,
        #[arg(long)]
        host: Uuid,
        /// An absolute directory on the host (not on this machine), inside one of the host's
        /// datastore roots (`drover serve --datastore-root`); created when missing.
        #[arg(long)]
        path: String,
    },
    /// Shows a datastore.
    Get(IdArg),
    /// Renames a datastore (its path cannot change).
    Update(RenameArgs),
    /// Removes a datastore.
    Delete(IdArg),
    /// Lets a tenant place VMs, replicas and recovery locations on a datastore (system administrators).
    Grant {
        id: Uuid,
        #[arg(long)]
        tenant: Uuid,
    },
    /// Takes a grant back (refused while the tenant has something on the datastore).
    Revoke {
        id: Uuid,
        #[arg(long)]
        tenant: Uuid,
    },
    /// The tenants a datastore is granted to.
    Grants(IdArg),
}

/// A `--disk` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub name: String,
    pub size_bytes: u64,
    pub import_from: Option<String>,
}

#[derive(Debug, Args)]
pub struct VmCreateArgs {
    pub name: String,
    #[arg(long)]
    pub host: Uuid,
    #[arg(long)]
    pub datastore: Uuid,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    #[arg(long, default_value_t = 96)]
    pub memory_mib: u32,
    /// `NAME:SIZE` for an empty disk (SIZE like 64MiB, 1GiB), or `NAME:import=/path` to copy an
    /// existing image on the host. Repeat for more disks; the first one boots.
    #[arg(long = "disk", value_name = "NAME:SIZE", value_parser = parse_disk)]
    pub disks: Vec<DiskSpec>,
    /// A network to attach a NIC to; repeat for more NICs.
    #[arg(long = "nic", value_name = "NETWORK")]
    pub nics: Vec<String>,
    /// A `category:name` tag; repeat for more.
    #[arg(long = "tag", value_name = "CATEGORY:NAME")]
    pub tags: Vec<String>,
    /// Direct kernel boot: a kernel image on the host.
    #[arg(long, requires = "initrd")]
    pub kernel: Option<String>,
    #[arg(long, requires = "kernel")]
    pub initrd: Option<String>,
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
    /// The firmware the VM boots its disk with: `bios` (SeaBIOS) or `uefi` (OVMF).
    #[arg(long, default_value = "bios", value_parser = ["bios", "uefi"])]
    pub firmware: String,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct VmImportArgs {
    /// The host whose agent runs beside its libvirt.
    #[arg(long)]
    pub host: Uuid,
    /// The domain's name or UUID.
    #[arg(long)]
    pub domain: String,
    /// Where drover keeps the VM's work files; default: the host's only datastore.
    #[arg(long)]
    pub datastore: Option<Uuid>,
    /// The VM's name in drover; default: the domain's.
    #[arg(long)]
    pub name: Option<String>,
    /// A `category:name` tag; repeat for more.
    #[arg(long = "tag", value_name = "CATEGORY:NAME")]
    pub tags: Vec<String>,
}

#[derive(Debug, Args)]
pub struct VmUpdateArgs {
    pub id: Uuid,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub vcpus: Option<u32>,
    #[arg(long)]
    pub memory_mib: Option<u32>,
    /// Replaces all tags with these (`category:name`, repeatable).
    #[arg(long = "tag", value_name = "CATEGORY:NAME", conflicts_with = "clear_tags")]
    pub tags: Vec<String>,
    /// Removes all tags.
    #[arg(long)]
    pub clear_tags: bool,
}

// An id for an operation that runs as a session.
#[derive(Debug, Args)]
pub struct OpArgs {
    pub id: Uuid,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Lists the VMs.
    List,
    /// Shows a VM.
    Get(IdArg),
    /// Records the VM and creates its disks.
    Create(VmCreateArgs),
    /// Takes an existing libvirt domain of a host into the inventory, as it is (see `drover host
    /// domains`). Nothing on the host changes; drover never redefines it.
    Import(VmImportArgs),
    /// Changes the name, the tags, or (while powered off) vCPUs and memory.
    Update(VmUpdateArgs),
    /// Deletes a powered-off VM with its disks.
    Delete(OpArgs),
    /// Powers the VM on and waits for its first heartbeat.
    PowerOn(OpArgs),
    /// Graceful shutdown (ACPI); powered off if it takes longer than the server allows.
    Shutdown(OpArgs),
    /// Powers the VM off at once, like pulling the plug.
    PowerOff(OpArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("schedule").required(true).args(["interval", "manual", "continuous"])))]
pub struct JobCreateArgs {
    pub name: String,
    /// A VM to replicate; repeat for more.
    #[arg(long = "vm", required = true)]
    pub vms: Vec<Uuid>,
    #[arg(long)]
    pub target_host: Uuid,
    #[arg(long)]
    pub target_datastore: Uuid,
    /// Replicate every SECS seconds.
    #[arg(long, value_name = "SECS")]
    pub interval: Option<u32>,
    /// Replicate only when asked.
    #[arg(long)]
    pub manual: bool,
    /// Replicate continuously.
    #[arg(long)]
    pub continuous: bool,
    /// Restore points to keep.
    #[arg(long, value_name = "N")]
    pub retention: u32,
    /// The most each of the job's transfers sends between agents per second (`100MiB`, `1GiB`,
    /// or bytes; at least 64KiB). Default: no limit.
    #[arg(long, value_name = "RATE", value_parser = crate::agent::parse_rate)]
    pub bandwidth_limit: Option<u64>,
    /// Application-consistent points: `require` (a running VM whose guest agent cannot freeze
    /// its file systems gets no point), `try` (crash-consistent then, with a warning) or `off`.
    #[arg(long, value_name = "MODE", default_value = "try", value_parser = consistency_mode)]
    pub consistency: drover_types::ConsistencyMode,
    /// At failover, connect the replicas' NICs on production network FROM to the target host's
    /// network TO (`drover host networks`); repeatable. A network not mapped goes to the target
    /// host's network of the same name when it has one; any other NIC is isolated.
    #[arg(long = "network", value_name = "FROM=TO", value_parser = parse_mapping)]
    pub networks: Vec<(String, String)>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("schedule").args(["interval", "manual", "continuous"])))]
pub struct JobUpdateArgs {
    pub id: Uuid,
    #[arg(long)]
    pub name: Option<String>,
    /// Replicate every SECS seconds.
    #[arg(long, value_name = "SECS")]
    pub interval: Option<u32>,
    /// Replicate only when asked.
    #[arg(long)]
    pub manual: bool,
    /// Replicate continuously.
    #[arg(long)]
    pub continuous: bool,
    /// Restore points to keep; older ones are merged away by the next run.
    #[arg(long, value_name = "N")]
    pub retention: Option<u32>,
    /// Lets the job run again (on its schedule and when asked).
    #[arg(long, conflicts_with = "disable")]
    pub enable: bool,
    /// Stops the job from running; its replicas and restore points stay.
    #[arg(long)]
    pub disable: bool,
    /// The most each transfer sends between agents per second (`100MiB`, `1GiB`, or bytes), or
    /// `none` to remove the limit.
    #[arg(long, value_name = "RATE|none", value_parser = rate_or_none)]
    pub bandwidth_limit: Option<u64>,
    /// Application-consistent points: `require`, `try` or `off`.
    #[arg(long, value_name = "MODE", value_parser = consistency_mode)]
    pub consistency: Option<drover_types::ConsistencyMode>,
    /// Replaces the job's network mappings with these (`FROM=TO`, repeatable).
    #[arg(long = "network", value_name = "FROM=TO", value_parser = parse_mapping, conflicts_with = "clear_networks")]
    pub networks: Vec<(String, String)>,
    /// Removes all of the job's network mappings.
    #[arg(long)]
    pub clear_networks: bool,
}

fn consistency_mode(s: &str) -> Result<drover_types::ConsistencyMode, String> {
    s.parse().map_err(|e: drover_types::Error| e.to_string())
}

/// A rate, or `none` (0 on the wire: no limit).
fn rate_or_none(s: &str) -> Result<u64, String> {
    if s.eq_ignore_ascii_case("none") { Ok(0) } else { crate::agent::parse_rate(s) }
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Lists the replication jobs.
    List,
    /// Creates a replication job.
    Create(JobCreateArgs),
    /// Shows a replication job.
    Get(IdArg),
    /// Changes the name, schedule, retention, or enables/disables the job.
    Update(JobUpdateArgs),
    /// Runs the job now and follows the run (one task per VM).
    Run(OpArgs),
    /// Deletes a replication job.
    Delete(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// Lists the replicas (made by the first run of their job).
    List,
    /// Shows a replica.
    Get(IdArg),
    /// Lists a replica's restore points, oldest first.
    Points(IdArg),
}

#[derive(Debug, Args)]
pub struct LocationCreateArgs {
    pub name: String,
    #[arg(long, default_value = "")]
    pub description: String,
    #[arg(long)]
    pub host: Uuid,
    #[arg(long)]
    pub datastore: Uuid,
    /// Map a production network to a recovery one, `FROM=TO`; repeatable.
    #[arg(long = "network", value_name = "FROM=TO", value_parser = parse_mapping)]
    pub networks: Vec<(String, String)>,
}

#[derive(Debug, Args)]
pub struct LocationUpdateArgs {
    pub id: Uuid,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    /// Replaces all network mappings with these (`FROM=TO`, repeatable).
    #[arg(long = "network", value_name = "FROM=TO", value_parser = parse_mapping, conflicts_with = "clear_networks")]
    pub networks: Vec<(String, String)>,
    /// Removes all network mappings.
    #[arg(long)]
    pub clear_networks: bool,
}

#[derive(Debug, Subcommand)]
pub enum LocationCommand {
    /// Lists the recovery locations.
    List,
    /// Creates a recovery location.
    Create(LocationCreateArgs),
    /// Shows a recovery location.
    Get(IdArg),
    /// Changes the name, description or network mappings.
    Update(LocationUpdateArgs),
    /// Deletes a recovery location.
    Delete(IdArg),
}

#[derive(Debug, Args)]
pub struct PlanFileArgs {
    /// A plan definition (the API's PlanBody) as JSON; `-` reads stdin.
    #[arg(long)]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct PlanActionArgs {
    pub id: Uuid,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct FailoverArgs {
    pub id: Uuid,
    /// Use the newest restore point at or before this time (RFC 3339, e.g. 2026-11-22T18:00:00Z);
    /// default: the newest point.
    #[arg(long)]
    pub at: Option<chrono::DateTime<chrono::Utc>>,
    /// A planned failover (not with test-failover): production, which must be reachable, is
    /// shut down and its last changes replicated first, so nothing written before is lost.
    #[arg(long, conflicts_with = "at")]
    pub planned: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct FailbackArgs {
    pub id: Uuid,
    /// Fail back into new VMs at this recovery location (default: the plan's location, normally
    /// the original VMs).
    #[arg(long)]
    pub location: Option<Uuid>,
    /// With --location: give the new VMs the original VMs' tags.
    #[arg(long, requires = "location")]
    pub restore_tags: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

fn failover_body(at: Option<chrono::DateTime<chrono::Utc>>, planned: bool) -> Option<Value> {
    match (at, planned) {
        (_, true) => Some(json!({ "planned": true })),
        (Some(t), false) => Some(json!({ "restore_point_date": t })),
        (None, false) => None,
    }
}

fn failback_body(a: &FailbackArgs) -> Option<Value> {
    a.location.map(|l| json!({ "recovery_location_id": l, "restore_tags": a.restore_tags }))
}

const CONTINUE_OPTIONS: &str = "RetryFailedStep (default), ProceedToNextStep, RetryFailedVm, ProceedToNextVm, \
                                RetryFailedGroup or ProceedToNextGroup";

#[derive(Debug, Args)]
pub struct ContinueArgs {
    pub id: Uuid,
    /// How to go on: RetryFailedStep (default), ProceedToNextStep, RetryFailedVm, ProceedToNextVm,
    /// RetryFailedGroup or ProceedToNextGroup.
    #[arg(long, value_parser = parse_continue_option)]
    pub option: Option<ContinueOption>,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Lists the plans.
    List,
    /// Shows a plan with its groups and steps.
    Get(IdArg),
    /// Creates a plan from a JSON definition.
    Create(PlanFileArgs),
    /// Replaces a plan's definition (not while it is in use).
    Update {
        id: Uuid,
        #[command(flatten)]
        file: PlanFileArgs,
    },
    /// Deletes a plan.
    Delete(IdArg),
    /// Enables the plan.
    Enable(PlanActionArgs),
    /// Disables the plan.
    Disable(PlanActionArgs),
    /// Checks that every VM of the plan could be recovered now.
    ReadinessCheck(PlanActionArgs),
    /// Fails over to the recovery site.
    Failover(FailoverArgs),
    /// Boots the plan's VMs from their restore points as throwaway VMs with no uplink, runs the
    /// plan's steps, and discards them; nothing else changes.
    TestFailover(FailoverArgs),
    /// Makes the failover permanent.
    PermanentFailover(PlanActionArgs),
    /// Prepares the failback: syncs the original VMs while the replicas keep running (an original
    /// VM that still runs is shut down first).
    PrepareFailback(PlanActionArgs),
    /// Fails back to production (the original VMs, or new VMs at another recovery location).
    /// An original VM that still runs is shut down first (powered off after the shutdown
    /// timeout); only what changed travels back.
    Failback(FailbackArgs),
    /// Switches over to production.
    Switchover(PlanActionArgs),
    /// Commits the failback.
    CommitFailback(PlanActionArgs),
    /// Undoes the plan's failover or failback.
    Undo(PlanActionArgs),
    /// Halts the running action after its current step.
    Halt(PlanActionArgs),
    /// Goes on with a halted action.
    Continue(ContinueArgs),
    /// Puts the plan back in its default state (and disables it).
    Reset(PlanActionArgs),
}

#[derive(Debug, Args)]
pub struct SessionListArgs {
    /// Session kind, e.g. VmPowerOn, PlanFailover.
    #[arg(long)]
    pub kind: Option<String>,
    /// Starting, Working, Stopping or Stopped.
    #[arg(long)]
    pub state: Option<String>,
    /// None, Success, Warning or Failed.
    #[arg(long)]
    pub result: Option<String>,
    /// Only sessions of this VM, plan or replication job.
    #[arg(long)]
    pub target: Option<Uuid>,
    /// At most this many (1-1000; the server's default is 100).
    #[arg(long)]
    pub limit: Option<u64>,
    #[arg(long)]
    pub offset: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Lists sessions, newest first.
    List(SessionListArgs),
    /// Shows a session with its tasks.
    Get(IdArg),
    /// Prints a session's log.
    Log(IdArg),
    /// Follows a session until it stops or halts.
    Watch(IdArg),
    /// Halts a session after its running step.
    Halt(OpArgs),
    /// Goes on with a halted session.
    Continue(ContinueArgs),
    /// Undoes what a halted session did.
    Undo(OpArgs),
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Lists the users.
    List,
    /// Creates a user.
    Create {
        name: String,
        /// Viewer, PlanOperator, PlanAuthor or Administrator.
        #[arg(long)]
        role: String,
        /// At least 8 characters; asked for on the terminal when absent.
        #[arg(long, allow_hyphen_values = true)]
        password: Option<String>,
        /// Another tenant (administrators of the system tenant only).
        #[arg(long)]
        tenant: Option<Uuid>,
    },
    /// Changes a user's password or role (users may change their own password).
    #[command(group(ArgGroup::new("change").required(true).multiple(true).args(["password", "role"])))]
    Update {
        id: Uuid,
        /// The new password, at least 8 characters. Visible to other local users in the process
        /// list: prefer DROVER_NEW_PASSWORD.
        #[arg(long, env = "DROVER_NEW_PASSWORD", hide_env_values = true, allow_hyphen_values = true)]
        password: Option<String>,
        /// Viewer, PlanOperator, PlanAuthor or Administrator.
        #[arg(long)]
        role: Option<String>,
    },
    /// Deletes a user.
    Delete(IdArg),
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Lists the tenants.
    List,
    /// Creates a tenant.
    Create { name: String },
}

// ------------------------------------------------------------------------------------------------
// Argument parsers

/// `64MiB`, `1GiB`, `512M`, `1.5G` is refused (sizes are whole units), `1000000` is bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size: expected a whole number and a unit, e.g. 64MiB"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => return Err(format!("unknown size unit {other:?} in {text:?}: use B, KiB, MiB, GiB or TiB")),
    };
    number.checked_mul(multiplier).ok_or_else(|| format!("{text:?} is too large"))
}

pub fn parse_disk(text: &str) -> Result<DiskSpec, String> {
    let usage = || format!("--disk expects NAME:SIZE (e.g. root:1GiB) or NAME:import=/path/to/image, not {text:?}");
    let (name, rest) = text.split_once(':').ok_or_else(usage)?;
    if name.is_empty() || rest.is_empty() {
        return Err(usage());
    }
    if let Some(path) = rest.strip_prefix("import=") {
        if !path.starts_with('/') {
            return Err(format!(
                "--disk {name}: the image to import must be an absolute path on the host, not {path:?}"
            ));
        }
        return Ok(DiskSpec { name: name.to_string(), size_bytes: 0, import_from: Some(path.to_string()) });
    }
    let size_bytes = parse_size(rest).map_err(|e| format!("--disk {name}: {e}"))?;
    if size_bytes == 0 {
        return Err(format!("--disk {name}: the size must be more than zero"));
    }
    Ok(DiskSpec { name: name.to_string(), size_bytes, import_from: None })
}

fn parse_mapping(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((from, to)) if !from.is_empty() && !to.is_empty() => Ok((from.to_string(), to.to_string())),
        _ => Err(format!("--network expects FROM=TO, not {text:?}")),
    }
}

/// Accepts the API's names (`RetryFailedStep`) and kebab case (`retry-failed-step`).
pub fn parse_continue_option(text: &str) -> Result<ContinueOption, String> {
    use ContinueOption as C;
    let key: String = text.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase();
    let all = [
        C::RetryFailedStep,
        C::ProceedToNextStep,
        C::RetryFailedVm,
        C::ProceedToNextVm,
        C::RetryFailedGroup,
        C::ProceedToNextGroup,
    ];
    all.into_iter()
        .find(|o| render::wire_name(o).to_ascii_lowercase() == key)
        .ok_or_else(|| format!("unknown continue option {text:?}: use {CONTINUE_OPTIONS}"))
}

// ------------------------------------------------------------------------------------------------
// Request bodies

fn site_body(name: &str, kind: SiteKindArg) -> Value {
    let kind = match kind {
        SiteKindArg::Production => "Production",
        SiteKindArg::Dr => "DisasterRecovery",
    };
    json!({ "name": name, "kind": kind })
}

fn vm_create_body(a: &VmCreateArgs) -> Value {
    let disks: Vec<DiskBody> = a
        .disks
        .iter()
        .map(|d| DiskBody { name: d.name.clone(), size_bytes: d.size_bytes, import_from: d.import_from.clone() })
        .collect();
    let nics: Vec<NicBody> = a.nics.iter().map(|n| NicBody { network: n.clone(), mac: None }).collect();
    let firmware = if a.firmware == "uefi" { FirmwareBody::Uefi } else { FirmwareBody::Bios };
    let boot = BootBody { kernel: a.kernel.clone(), initrd: a.initrd.clone(), cmdline: a.cmdline.clone(), firmware };
    json!({
        "name": a.name,
        "host_id": a.host,
        "datastore_id": a.datastore,
        "vcpus": a.vcpus,
        "memory_mib": a.memory_mib,
        "disks": disks,
        "nics": nics,
        "tags": a.tags,
        "boot": boot,
    })
}

fn vm_update_body(a: &VmUpdateArgs) -> anyhow::Result<Value> {
    let mut body = serde_json::Map::new();
    if let Some(n) = &a.name {
        body.insert("name".into(), json!(n));
    }
    if let Some(v) = a.vcpus {
        body.insert("vcpus".into(), json!(v));
    }
    if let Some(m) = a.memory_mib {
        body.insert("memory_mib".into(), json!(m));
    }
    if a.clear_tags || !a.tags.is_empty() {
        body.insert("tags".into(), json!(a.tags));
    }
    if body.is_empty() {
        bail!("nothing to update: give --name, --vcpus, --memory-mib, --tag or --clear-tags");
    }
    Ok(Value::Object(body))
}

/// The schedule of `--interval`, `--manual` or `--continuous` (clap lets at most one through).
fn schedule_arg(interval: Option<u32>, manual: bool, continuous: bool) -> Option<ScheduleBody> {
    match (interval, manual, continuous) {
        (Some(secs), _, _) => Some(ScheduleBody::Interval { secs }),
        (None, _, true) => Some(ScheduleBody::Continuous),
        (None, true, false) => Some(ScheduleBody::Manual),
        (None, false, false) => None,
    }
}

fn job_body(a: &JobCreateArgs) -> Value {
    // clap's group makes exactly one of the three present.
    let schedule = schedule_arg(a.interval, a.manual, a.continuous).unwrap_or(ScheduleBody::Manual);
    json!({
        "name": a.name,
        "vm_ids": a.vms,
        "target_host_id": a.target_host,
        "target_datastore_id": a.target_datastore,
        "schedule": schedule,
        "retention_points": a.retention,
        "bandwidth_limit": a.bandwidth_limit,
        "consistency": a.consistency,
        "network_mappings": mappings_body(&a.networks),
    })
}

fn job_update_body(a: &JobUpdateArgs) -> anyhow::Result<Value> {
    let mut body = serde_json::Map::new();
    if let Some(n) = &a.name {
        body.insert("name".into(), json!(n));
    }
    if let Some(s) = schedule_arg(a.interval, a.manual, a.continuous) {
        body.insert("schedule".into(), json!(s));
    }
    if let Some(r) = a.retention {
        body.insert("retention_points".into(), json!(r));
    }
    if a.enable || a.disable {
        body.insert("enabled".into(), json!(a.enable));
    }
    if let Some(b) = a.bandwidth_limit {
        body.insert("bandwidth_limit".into(), json!(b));
    }
    if let Some(c) = a.consistency {
        body.insert("consistency".into(), json!(c));
    }
    if !a.networks.is_empty() || a.clear_networks {
        body.insert("network_mappings".into(), json!(mappings_body(&a.networks)));
    }
    if body.is_empty() {
        bail!(
            "nothing to update: give --name, --interval, --manual, --continuous, --retention, --enable, --disable, \
             --bandwidth-limit, --consistency, --network or --clear-networks"
        );
    }
    Ok(Value::Object(body))
}

fn mappings_body(networks: &[(String, String)]) -> Vec<NetworkMappingBody> {
    networks.iter().map(|(from, to)| NetworkMappingBody { from: from.clone(), to: to.clone() }).collect()
}

fn location_update_body(a: &LocationUpdateArgs) -> anyhow::Result<Value> {
    let mut body = serde_json::Map::new();
    if let Some(n) = &a.name {
        body.insert("name".into(), json!(n));
    }
    if let Some(d) = &a.description {
        body.insert("description".into(), json!(d));
    }
    if a.clear_networks || !a.networks.is_empty() {
        body.insert("network_mappings".into(), json!(mappings_body(&a.networks)));
    }
    if body.is_empty() {
        bail!("nothing to update: give --name, --description, --network or --clear-networks");
    }
    Ok(Value::Object(body))
}

/// A PATCH body of the given fields, leaving out the absent ones.
fn patch_body(fields: &[(&str, Option<&str>)]) -> Value {
    Value::Object(fields.iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), json!(v)))).collect())
}

fn location_body(a: &LocationCreateArgs) -> Value {
    let mappings = mappings_body(&a.networks);
    json!({
        "name": a.name,
        "description": a.description,
        "host_id": a.host,
        "datastore_id": a.datastore,
        "network_mappings": mappings,
    })
}

fn continue_body(option: Option<ContinueOption>) -> Value {
    json!({ "option": option })
}

/// Reads a plan file and checks it is a plan before sending it, so a typo is reported with its
/// line and column rather than as a bare 400. The JSON is sent as written.
fn plan_body(file: &std::path::Path) -> anyhow::Result<Value> {
    let text = read_input_file(file)?;
    let name = if file.as_os_str() == "-" { "the plan on stdin".to_string() } else { file.display().to_string() };
    serde_json::from_str::<drover_api::views::PlanBody>(&text)
        .with_context(|| format!("{name} is not a plan definition"))?;
    serde_json::from_str(&text).with_context(|| format!("{name} is not JSON"))
}

// ------------------------------------------------------------------------------------------------
// Login

pub async fn login(
    args: LoginArgs,
    conn: &Connection,
    store: &CredentialStore,
    output: OutputFormat,
) -> anyhow::Result<()> {
    let password = match args.password {
        Some(p) => p,
        None => prompt_password(
            &format!("Password for {} at {}: ", args.user, conn.server),
            "pass --password or set DROVER_PASSWORD",
        )?,
    };
    let api = Api::anonymous(conn)?;
    let pair =
        api.token_request(&[("grant_type", "password"), ("username", &args.user), ("password", &password)]).await?;
    let creds = credentials_from(api.server(), pair);
    store.save(&creds)?;
    let path = store.path();
    if output == OutputFormat::Json {
        // Not the token answer: secrets stay in the 0600 file, out of terminals and logs.
        let summary = json!({
            "server": creds.server,
            "user": args.user,
            "expires_at": creds.expires_at,
            "credentials_file": path,
        });
        emit(summary.to_string().as_bytes())
    } else {
        emit(
            format!("logged in to {} as {}; credentials saved in {}", creds.server, args.user, path.display())
                .as_bytes(),
        )
    }
}

pub fn logout(store: &CredentialStore, output: OutputFormat) -> anyhow::Result<()> {
    let removed = store.delete()?;
    if output == OutputFormat::Json {
        return emit(json!({ "logged_out": removed }).to_string().as_bytes());
    }
    if removed {
        emit(format!("logged out; removed {}", store.path().display()).as_bytes())
    } else {
        eprintln!("not logged in (no {})", store.path().display());
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// Dispatch

pub async fn dispatch(ctx: &Ctx, cmd: ClientCommand) -> anyhow::Result<()> {
    match cmd {
        ClientCommand::Login(_) | ClientCommand::Logout => bail!("login and logout are handled before dispatch"),
        ClientCommand::Site(c) => site(ctx, c).await,
        ClientCommand::Host(c) => host(ctx, c).await,
        ClientCommand::Datastore(c) => datastore(ctx, c).await,
        ClientCommand::Vm(c) => vm(ctx, c).await,
        ClientCommand::Job(c) => job(ctx, c).await,
        ClientCommand::Replica(c) => replica(ctx, c).await,
        ClientCommand::Location(c) => location(ctx, c).await,
        ClientCommand::Plan(c) => plan(ctx, c).await,
        ClientCommand::Session(c) => session(ctx, c).await,
        ClientCommand::User(c) => user(ctx, c).await,
        ClientCommand::Tenant(c) => tenant(ctx, c).await,
        ClientCommand::Audit(a) => {
            let mut req = Request::get("/audit").query("limit", a.limit);
            if let Some(b) = a.before {
                req = req.query("before_seq", b);
            }
            if let Some(action) = a.action {
                req = req.query("action", action);
            }
            ctx.list(req, "audit entries", render::audit).await
        }
    }
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// At most this many entries (1 to 1000).
    #[arg(long, default_value_t = 50)]
    pub limit: u64,
    /// Only entries older than this position (the SEQ column), to page back.
    #[arg(long)]
    pub before: Option<i64>,
    /// Only this action: `login`, `login_lockout`, or a request such as `POST /v1/vms`.
    #[arg(long)]
    pub action: Option<String>,
}

async fn site(ctx: &Ctx, cmd: SiteCommand) -> anyhow::Result<()> {
    match cmd {
        SiteCommand::List => ctx.list(Request::get("/sites"), "sites", render::sites).await,
        SiteCommand::Create { name, kind } => ctx.create("/sites", site_body(&name, kind), render::site).await,
        SiteCommand::Get(a) => ctx.get(&format!("/sites/{}", a.id), render::site).await,
        SiteCommand::Update(a) => {
            let body = patch_body(&[("name", Some(&a.name))]);
            ctx.update(&format!("/sites/{}", a.id), body, render::site).await
        }
        SiteCommand::Delete(a) => ctx.delete(&format!("/sites/{}", a.id), "site", a.id).await,
    }
}

async fn host(ctx: &Ctx, cmd: HostCommand) -> anyhow::Result<()> {
    match cmd {
        HostCommand::List => ctx.list(Request::get("/hosts"), "hosts", render::hosts).await,
        HostCommand::Create { name, site, address } => {
            let body = json!({ "site_id": site, "name": name, "address": address });
            ctx.create("/hosts", body, render::host).await
        }
        HostCommand::Get(a) => ctx.get(&format!("/hosts/{}", a.id), render::host).await,
        HostCommand::Update { id, name, address } => {
            let body = patch_body(&[("name", name.as_deref()), ("address", address.as_deref())]);
            ctx.update(&format!("/hosts/{id}"), body, render::host).await
        }
        HostCommand::Delete(a) => ctx.delete(&format!("/hosts/{}", a.id), "host", a.id).await,
        HostCommand::Enrol { id, ttl_secs } => {
            let body = match ttl_secs {
                Some(t) => json!({ "ttl_secs": t }),
                None => json!({}),
            };
            ctx.create(&format!("/hosts/{id}/enrolment"), body, render::enrolment).await
        }
        HostCommand::Agent(a) => ctx.get(&format!("/hosts/{}/agent", a.id), render::host_agent).await,
        HostCommand::RenewCertificate(a) => {
            ctx.create(&format!("/hosts/{}/agent/certificate", a.id), json!({}), render::host_agent).await
        }
        HostCommand::Domains(a) => {
            ctx.get(&format!("/hosts/{}/domains", a.id), |d: &Vec<drover_api::views::HostDomainView>| {
                render::host_domains(d).render()
            })
            .await
        }
        HostCommand::Networks(a) => {
            ctx.get(&format!("/hosts/{}/networks", a.id), |n: &Vec<drover_api::views::HostNetworkView>| {
                render::host_networks(n).render()
            })
            .await
        }
    }
}

async fn datastore(ctx: &Ctx, cmd: DatastoreCommand) -> anyhow::Result<()> {
    match cmd {
        DatastoreCommand::List => ctx.list(Request::get("/datastores"), "datastores", render::datastores).await,
        DatastoreCommand::Create { name, host, path } => {
            if !path.starts_with('/') {
                bail!("--path must be an absolute directory on the host, not {path:?}");
            }
            let body = json!({ "host_id": host, "name": name, "path": path });
            ctx.create("/datastores", body, render::datastore).await
        }
        DatastoreCommand::Get(a) => ctx.get(&format!("/datastores/{}", a.id), render::datastore).await,
        DatastoreCommand::Update(a) => {
            let body = patch_body(&[("name", Some(&a.name))]);
            ctx.update(&format!("/datastores/{}", a.id), body, render::datastore).await
        }
        DatastoreCommand::Delete(a) => ctx.delete(&format!("/datastores/{}", a.id), "datastore", a.id).await,
        DatastoreCommand::Grant { id, tenant } => {
            ctx.create(&format!("/datastores/{id}/grants"), json!({ "tenant_id": tenant }), render::grants).await
        }
        DatastoreCommand::Revoke { id, tenant } => {
            ctx.delete(&format!("/datastores/{id}/grants/{tenant}"), "the grant to tenant", tenant).await
        }
        DatastoreCommand::Grants(a) => ctx.get(&format!("/datastores/{}/grants", a.id), render::grants).await,
    }
}

async fn vm(ctx: &Ctx, cmd: VmCommand) -> anyhow::Result<()> {
    match cmd {
        VmCommand::List => ctx.list(Request::get("/vms"), "VMs", render::vms).await,
        VmCommand::Get(a) => ctx.get(&format!("/vms/{}", a.id), render::vm).await,
        VmCommand::Create(a) => {
            let resp = ctx.api.send(Request::post("/vms").json(vm_create_body(&a))).await?;
            // The VM's id is only in the Location header; say it before the (long) follow.
            let vm_id = resp.location.as_deref().and_then(|l| l.rsplit('/').next()).map(str::to_string);
            if let (false, Some(id)) = (ctx.json(), &vm_id) {
                emit(format!("vm {} has id {id}", a.name).as_bytes())?;
            }
            ctx.started(&resp, &a.wait).await.map(drop)
        }
        VmCommand::Import(a) => ctx.create("/vms/import", vm_import_body(&a), render::vm).await,
        VmCommand::Update(a) => {
            let body = vm_update_body(&a)?;
            ctx.update(&format!("/vms/{}", a.id), body, render::vm).await
        }
        VmCommand::Delete(a) => ctx.start(Request::delete(&format!("/vms/{}", a.id)), &a.wait).await.map(drop),
        VmCommand::PowerOn(a) => ctx.start(Request::post(&format!("/vms/{}/power-on", a.id)), &a.wait).await.map(drop),
        VmCommand::Shutdown(a) => ctx.start(Request::post(&format!("/vms/{}/shutdown", a.id)), &a.wait).await.map(drop),
        VmCommand::PowerOff(a) => {
            ctx.start(Request::post(&format!("/vms/{}/power-off", a.id)), &a.wait).await.map(drop)
        }
    }
}

fn vm_import_body(a: &VmImportArgs) -> Value {
    let mut body = json!({ "host_id": a.host, "domain": a.domain, "tags": a.tags });
    if let Some(ds) = a.datastore {
        body["datastore_id"] = json!(ds);
    }
    if let Some(n) = &a.name {
        body["name"] = json!(n);
    }
    body
}

async fn job(ctx: &Ctx, cmd: JobCommand) -> anyhow::Result<()> {
    match cmd {
        JobCommand::List => ctx.list(Request::get("/replication-jobs"), "replication jobs", render::jobs).await,
        JobCommand::Create(a) => ctx.create("/replication-jobs", job_body(&a), render::job).await,
        JobCommand::Get(a) => ctx.get(&format!("/replication-jobs/{}", a.id), render::job).await,
        JobCommand::Update(a) => {
            let body = job_update_body(&a)?;
            ctx.update(&format!("/replication-jobs/{}", a.id), body, render::job).await
        }
        JobCommand::Run(a) => job_run(ctx, a).await,
        JobCommand::Delete(a) => ctx.delete(&format!("/replication-jobs/{}", a.id), "replication job", a.id).await,
    }
}

/// `POST /v1/replication-jobs/{id}/run`, followed like any session. The human summary ends with
/// where each VM's restore points stand, which is what a run is for.
async fn job_run(ctx: &Ctx, a: OpArgs) -> anyhow::Result<()> {
    let session = ctx.start(Request::post(&format!("/replication-jobs/{}/run", a.id)), &a.wait).await?;
    if ctx.json() || session.is_none() {
        return Ok(());
    }
    // Best effort: the run succeeded, so a failure to list its results is not the command's.
    if let Ok(lines) = replica_summary(ctx, a.id).await {
        for line in lines {
            emit(line.as_bytes())?;
        }
    }
    Ok(())
}

/// `replica <name>: N restore point(s), newest #S` for each replica of job `job`.
async fn replica_summary(ctx: &Ctx, job: Uuid) -> anyhow::Result<Vec<String>> {
    use drover_api::views::{Page, ReplicaView, RestorePointView};
    let job: ReplicationJobView = ctx.api.send(Request::get(&format!("/replication-jobs/{job}"))).await?.parse()?;
    let replicas: Page<ReplicaView> = ctx.api.send(Request::get("/replicas")).await?.parse()?;
    let mut lines = Vec::new();
    for r in replicas.items.iter().filter(|r| r.job_id == job.id) {
        let points: Page<RestorePointView> =
            ctx.api.send(Request::get(&format!("/replicas/{}/restore-points", r.id))).await?.parse()?;
        let newest = points.items.iter().map(|p| p.sequence).max();
        let count = points.items.len();
        let plural = if count == 1 { "" } else { "s" };
        lines.push(match newest {
            Some(seq) => format!("replica {} ({}): {count} restore point{plural}, newest #{seq}", r.name, r.id),
            None => format!("replica {} ({}): no restore points", r.name, r.id),
        });
    }
    Ok(lines)
}

async fn replica(ctx: &Ctx, cmd: ReplicaCommand) -> anyhow::Result<()> {
    match cmd {
        ReplicaCommand::List => ctx.list(Request::get("/replicas"), "replicas", render::replicas).await,
        ReplicaCommand::Get(a) => ctx.get(&format!("/replicas/{}", a.id), render::replica).await,
        ReplicaCommand::Points(a) => {
            let path = format!("/replicas/{}/restore-points", a.id);
            ctx.list(Request::get(&path), "restore points", render::restore_points).await
        }
    }
}

async fn location(ctx: &Ctx, cmd: LocationCommand) -> anyhow::Result<()> {
    match cmd {
        LocationCommand::List => {
            ctx.list(Request::get("/recovery-locations"), "recovery locations", render::locations).await
        }
        LocationCommand::Create(a) => ctx.create("/recovery-locations", location_body(&a), render::location).await,
        LocationCommand::Get(a) => ctx.get(&format!("/recovery-locations/{}", a.id), render::location).await,
        LocationCommand::Update(a) => {
            let body = location_update_body(&a)?;
            ctx.update(&format!("/recovery-locations/{}", a.id), body, render::location).await
        }
        LocationCommand::Delete(a) => {
            ctx.delete(&format!("/recovery-locations/{}", a.id), "recovery location", a.id).await
        }
    }
}

async fn plan(ctx: &Ctx, cmd: PlanCommand) -> anyhow::Result<()> {
    let action = |name: &'static str, a: PlanActionArgs| (name, a.id, None, a.wait);
    let (name, id, body, wait) = match cmd {
        PlanCommand::List => return ctx.list(Request::get("/plans"), "plans", render::plans).await,
        PlanCommand::Get(a) => return ctx.get(&format!("/plans/{}", a.id), render::plan).await,
        PlanCommand::Create(f) => return ctx.create("/plans", plan_body(&f.file)?, render::plan).await,
        PlanCommand::Update { id, file } => {
            let path = format!("/plans/{id}");
            let req = Request::new(reqwest::Method::PUT, &path).json(plan_body(&file.file)?);
            let resp = ctx.api.send(req).await?;
            return ctx.show(&resp, render::plan);
        }
        PlanCommand::Delete(a) => return ctx.delete(&format!("/plans/{}", a.id), "plan", a.id).await,
        PlanCommand::Enable(a) => action("enable", a),
        PlanCommand::Disable(a) => action("disable", a),
        PlanCommand::ReadinessCheck(a) => action("readiness-check", a),
        PlanCommand::Failover(a) => ("failover", a.id, failover_body(a.at, a.planned), a.wait),
        PlanCommand::TestFailover(a) => {
            if a.planned {
                anyhow::bail!("--planned is for failover: a test failover leaves production as it is");
            }
            ("test-failover", a.id, failover_body(a.at, false), a.wait)
        }
        PlanCommand::PermanentFailover(a) => action("permanent-failover", a),
        PlanCommand::PrepareFailback(a) => action("prepare-failback", a),
        PlanCommand::Failback(a) => ("failback", a.id, failback_body(&a), a.wait),
        PlanCommand::Switchover(a) => action("switchover", a),
        PlanCommand::CommitFailback(a) => action("commit-failback", a),
        PlanCommand::Undo(a) => action("undo", a),
        PlanCommand::Halt(a) => action("halt", a),
        PlanCommand::Continue(a) => ("continue", a.id, Some(continue_body(a.option)), a.wait),
        PlanCommand::Reset(a) => action("reset", a),
    };
    plan_action(ctx, id, name, body, &wait).await
}

/// `POST /v1/plans/{id}/{action}`. The API answers with the plan and the session the action
/// started or acted on (halt, continue and undo act on the running one), which is followed.
async fn plan_action(ctx: &Ctx, id: Uuid, action: &str, body: Option<Value>, wait: &WaitArgs) -> anyhow::Result<()> {
    let path = format!("/plans/{id}/{action}");
    let mut req = Request::post(&path);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = ctx.api.send(req).await?;
    let started: Option<Uuid> = resp.parse::<PlanActionView>()?.session_id;
    let session = match started {
        Some(s) => Some(ctx.api.send(Request::get(&format!("/sessions/{s}"))).await?.parse::<SessionView>()?),
        None => None,
    };
    let session = match session {
        Some(s) if !wait.no_wait => s,
        other => {
            ctx.show(&resp, render::plan)?;
            if let (false, Some(s)) = (ctx.json(), other) {
                emit(format!("session {} started; follow it with `drover session watch {}`", s.id, s.id).as_bytes())?;
            }
            return Ok(());
        }
    };
    let expect = if action == "halt" { Expect::Halt } else { Expect::Completion };
    let result = ctx.follow(session.id, expect).await;
    if !ctx.json() {
        // Where the plan landed matters even (especially) when the session failed.
        if let Ok(p) = ctx.api.send(Request::get(&format!("/plans/{id}"))).await.and_then(|r| r.parse::<PlanView>()) {
            emit(format!("plan {}: {}", p.name, p.state_name).as_bytes())?;
        }
    }
    result.map(drop)
}

async fn session(ctx: &Ctx, cmd: SessionCommand) -> anyhow::Result<()> {
    match cmd {
        SessionCommand::List(a) => {
            let mut req = Request::get("/sessions");
            for (key, value) in [("kind", a.kind), ("state", a.state), ("result", a.result)] {
                if let Some(v) = value {
                    req = req.query(key, v);
                }
            }
            if let Some(t) = a.target {
                req = req.query("target_id", t);
            }
            if let Some(l) = a.limit {
                req = req.query("limit", l);
            }
            if let Some(o) = a.offset {
                req = req.query("offset", o);
            }
            ctx.list(req, "sessions", render::sessions).await
        }
        SessionCommand::Get(a) => ctx.get(&format!("/sessions/{}", a.id), render::session).await,
        SessionCommand::Log(a) => ctx.get(&format!("/sessions/{}/log", a.id), render::log).await,
        SessionCommand::Watch(a) => ctx.follow(a.id, Expect::Completion).await.map(drop),
        SessionCommand::Halt(a) => session_op(ctx, a.id, "halt", None, &a.wait, Expect::Halt).await,
        SessionCommand::Continue(a) => {
            session_op(ctx, a.id, "continue", Some(continue_body(a.option)), &a.wait, Expect::Completion).await
        }
        SessionCommand::Undo(a) => session_op(ctx, a.id, "undo", None, &a.wait, Expect::Completion).await,
    }
}

/// halt, continue, undo: answered with 202 and no body; then the session is followed.
async fn session_op(
    ctx: &Ctx,
    id: Uuid,
    op: &str,
    body: Option<Value>,
    wait: &WaitArgs,
    expect: Expect,
) -> anyhow::Result<()> {
    let path = format!("/sessions/{id}/{op}");
    let mut req = Request::post(&path);
    if let Some(b) = body {
        req = req.json(b);
    }
    ctx.api.send(req).await?;
    if wait.no_wait {
        if !ctx.json() {
            emit(format!("{op} requested for session {id}").as_bytes())?;
        }
        return Ok(());
    }
    ctx.follow(id, expect).await.map(drop)
}

async fn user(ctx: &Ctx, cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::List => ctx.list(Request::get("/users"), "users", render::users).await,
        UserCommand::Create { name, role, password, tenant } => {
            let password = match password {
                Some(p) => p,
                None => {
                    let first = prompt_password(&format!("Password for the new user {name}: "), "pass --password")?;
                    let second = prompt_password("Repeat it: ", "pass --password")?;
                    if first != second {
                        bail!("the two passwords differ");
                    }
                    first
                }
            };
            let body = json!({ "name": name, "password": password, "role": role, "tenant_id": tenant });
            ctx.create("/users", body, render::user).await
        }
        UserCommand::Update { id, password, role } => {
            let body = patch_body(&[("password", password.as_deref()), ("role", role.as_deref())]);
            ctx.update(&format!("/users/{id}"), body, render::user).await
        }
        UserCommand::Delete(a) => ctx.delete(&format!("/users/{}", a.id), "user", a.id).await,
    }
}

async fn tenant(ctx: &Ctx, cmd: TenantCommand) -> anyhow::Result<()> {
    match cmd {
        TenantCommand::List => ctx.list(Request::get("/tenants"), "tenants", render::tenants).await,
        TenantCommand::Create { name } => ctx.create("/tenants", json!({ "name": name }), render::tenant).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use drover_api::views as v;

    use super::*;

    /// Parses `args` as the real binary would, minus the program name.
    fn try_parse(args: &[&str]) -> Result<ClientCommand, clap::Error> {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            command: ClientCommand,
        }
        let mut argv = vec!["drover"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|c| c.command)
    }

    fn parse(args: &[&str]) -> ClientCommand {
        try_parse(args).unwrap_or_else(|e| panic!("{e}"))
    }

    const A: &str = "00000000-0000-0000-0000-00000000000a";
    const B: &str = "00000000-0000-0000-0000-00000000000b";

    #[test]
    fn failover_and_failback_bodies_are_what_the_api_takes() {
        let ClientCommand::Plan(PlanCommand::Failback(a)) =
            parse(&["plan", "failback", A, "--location", B, "--restore-tags", "--no-wait"])
        else {
            panic!("not a failback")
        };
        let body = failback_body(&a).unwrap();
        let parsed: v::PlanActionBody = serde_json::from_value(body).unwrap();
        assert_eq!(parsed.recovery_location_id.map(|u| u.to_string()).as_deref(), Some(B));
        assert!(parsed.restore_tags);
        assert!(try_parse(&["plan", "failback", A, "--restore-tags"]).is_err(), "--restore-tags needs --location");
        let ClientCommand::Plan(PlanCommand::Failover(a)) =
            parse(&["plan", "failover", A, "--at", "2026-11-22T18:00:00Z"])
        else {
            panic!("not a failover")
        };
        let parsed: v::PlanActionBody = serde_json::from_value(failover_body(a.at, a.planned).unwrap()).unwrap();
        assert_eq!(parsed.restore_point_date.unwrap().to_rfc3339(), "2026-11-22T18:00:00+00:00");
        assert!(!parsed.planned);
        let ClientCommand::Plan(PlanCommand::Failover(a)) = parse(&["plan", "failover", A, "--planned"]) else {
            panic!("not a failover")
        };
        let parsed: v::PlanActionBody = serde_json::from_value(failover_body(a.at, a.planned).unwrap()).unwrap();
        assert!(parsed.planned && parsed.restore_point_date.is_none());
        assert!(try_parse(&["plan", "failover", A, "--planned", "--at", "2026-11-22T18:00:00Z"]).is_err());
        assert!(try_parse(&["plan", "failover", A, "--at", "yesterday"]).is_err());
        assert!(matches!(parse(&["plan", "test-failover", A]), ClientCommand::Plan(PlanCommand::TestFailover(_))));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1.5GiB").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("5XB").unwrap_err().contains("unknown size unit"));
        assert!(parse_size("99999999999TiB").unwrap_err().contains("too large"));
    }

    #[test]
    fn disks() {
        assert_eq!(
            parse_disk("root:64MiB"),
            Ok(DiskSpec { name: "root".into(), size_bytes: 64 << 20, import_from: None })
        );
        assert_eq!(
            parse_disk("root:import=/var/lib/images/a.qcow2"),
            Ok(DiskSpec { name: "root".into(), size_bytes: 0, import_from: Some("/var/lib/images/a.qcow2".into()) })
        );
        assert!(parse_disk("root").is_err());
        assert!(parse_disk(":1GiB").is_err());
        assert!(parse_disk("root:0").is_err());
        assert!(parse_disk("root:import=relative.qcow2").is_err());
    }

    #[test]
    fn continue_options_accept_both_spellings() {
        assert_eq!(parse_continue_option("RetryFailedStep"), Ok(ContinueOption::RetryFailedStep));
        assert_eq!(parse_continue_option("proceed-to-next-vm"), Ok(ContinueOption::ProceedToNextVm));
        assert!(parse_continue_option("skip").unwrap_err().contains("RetryFailedStep"));
    }

    #[test]
    fn vm_create_body_is_a_create_vm() {
        let cmd = parse(&[
            "vm",
            "create",
            "web",
            "--host",
            A,
            "--datastore",
            B,
            "--disk",
            "root:64MiB",
            "--disk",
            "data:import=/srv/data.qcow2",
            "--nic",
            "lan",
            "--tag",
            "tier:web",
            "--kernel",
            "/k",
            "--initrd",
            "/i",
        ]);
        let ClientCommand::Vm(VmCommand::Create(a)) = cmd else { panic!("{cmd:?}") };
        let body: v::CreateVm = serde_json::from_value(vm_create_body(&a)).unwrap();
        assert_eq!((body.vcpus, body.memory_mib), (1, 96));
        assert_eq!(body.disks.len(), 2);
        assert_eq!(body.disks[0].size_bytes, 64 << 20);
        assert_eq!(body.nics[0].network, "lan");
        assert_eq!(body.boot.kernel.as_deref(), Some("/k"));
    }

    #[test]
    fn vm_update_body_is_a_patch_vm() {
        let ClientCommand::Vm(VmCommand::Update(a)) = parse(&["vm", "update", A, "--vcpus", "2", "--clear-tags"])
        else {
            panic!()
        };
        let body = vm_update_body(&a).unwrap();
        let patch: v::PatchVm = serde_json::from_value(body).unwrap();
        assert_eq!(patch.vcpus, Some(2));
        assert_eq!(patch.tags, Some(vec![]));
        assert_eq!(patch.name, None);
        let ClientCommand::Vm(VmCommand::Update(a)) = parse(&["vm", "update", A]) else { panic!() };
        assert!(vm_update_body(&a).is_err());
    }

    #[test]
    fn vm_import_names_a_host_and_a_domain() {
        let cmd = parse(&["vm", "import", "--host", A, "--domain", "web-1", "--tag", "tier:gold"]);
        let ClientCommand::Vm(VmCommand::Import(a)) = cmd else { panic!("{cmd:?}") };
        let body = vm_import_body(&a);
        let _: v::ImportVm = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(body, json!({"host_id": A, "domain": "web-1", "tags": ["tier:gold"]}));
        let cmd = parse(&["vm", "import", "--host", A, "--domain", "web-1", "--datastore", A, "--name", "web"]);
        let ClientCommand::Vm(VmCommand::Import(a)) = cmd else { panic!("{cmd:?}") };
        let body = vm_import_body(&a);
        let _: v::ImportVm = serde_json::from_value(body.clone()).unwrap();
        assert_eq!((body["datastore_id"].as_str(), body["name"].as_str()), (Some(A), Some("web")));
        assert!(try_parse(&["vm", "import", "--host", A]).is_err(), "the domain is required");
        let ClientCommand::Host(HostCommand::Domains(h)) = parse(&["host", "domains", A]) else { panic!() };
        assert_eq!(h.id.to_string(), A);
    }

    #[test]
    fn inventory_bodies_match_the_api() {
        let _: v::CreateSite = serde_json::from_value(site_body("dr", SiteKindArg::Dr)).unwrap();
        let ClientCommand::Location(LocationCommand::Create(a)) =
            parse(&["location", "create", "far", "--host", A, "--datastore", B, "--network", "lan=dr-lan"])
        else {
            panic!()
        };
        let loc: v::CreateRecoveryLocation = serde_json::from_value(location_body(&a)).unwrap();
        assert_eq!(loc.network_mappings[0].to, "dr-lan");
        let _: v::ContinueBody = serde_json::from_value(continue_body(None)).unwrap();
        let _: v::ContinueBody = serde_json::from_value(continue_body(Some(ContinueOption::RetryFailedVm))).unwrap();
    }

    #[test]
    fn job_schedules() {
        for (flags, expected) in [
            (vec!["--interval", "300"], "Interval"),
            (vec!["--manual"], "Manual"),
            (vec!["--continuous"], "Continuous"),
        ] {
            let mut args = vec!["job", "create", "j", "--vm", A, "--target-host", A, "--target-datastore", B];
            args.extend(flags);
            args.extend(["--retention", "3"]);
            let ClientCommand::Job(JobCommand::Create(a)) = parse(&args) else { panic!() };
            let body = job_body(&a);
            assert_eq!(body["schedule"]["type"], expected);
            assert_eq!(body["consistency"], "try", "the default");
            let _: v::CreateReplicationJob = serde_json::from_value(body).unwrap();
        }
    }

    #[test]
    fn job_consistency() {
        let args = ["job", "create", "j", "--vm", A, "--target-host", A, "--target-datastore", B, "--manual"];
        let mut with = args.to_vec();
        with.extend(["--retention", "3", "--consistency", "require"]);
        let ClientCommand::Job(JobCommand::Create(a)) = parse(&with) else { panic!() };
        let create: v::CreateReplicationJob = serde_json::from_value(job_body(&a)).unwrap();
        assert_eq!(create.consistency, drover_types::ConsistencyMode::Require);
        let ClientCommand::Job(JobCommand::Update(a)) = parse(&["job", "update", A, "--consistency", "off"]) else {
            panic!()
        };
        assert_eq!(job_update_body(&a).unwrap(), json!({"consistency": "off"}));
        let e = try_parse(&["job", "update", A, "--consistency", "sometimes"]).unwrap_err();
        assert!(e.to_string().contains("expected require, try or off"), "{e}");
    }

    /// A password may start with '-': it is the password, not an option.
    #[test]
    fn passwords_may_start_with_a_hyphen() {
        let ClientCommand::Login(l) = parse(&["login", "--user", "admin", "--password", "-secret-1"]) else { panic!() };
        assert_eq!(l.password.as_deref(), Some("-secret-1"));
        let ClientCommand::User(UserCommand::Update { password, .. }) =
            parse(&["user", "update", A, "--password", "--long-one"])
        else {
            panic!()
        };
        assert_eq!(password.as_deref(), Some("--long-one"));
    }

    #[test]
    fn job_network_mappings() {
        let args = ["job", "create", "j", "--vm", A, "--target-host", A, "--target-datastore", B, "--manual"];
        let mut with = args.to_vec();
        with.extend(["--retention", "3", "--network", "lan=dr-lan", "--network", "dmz=dr-dmz"]);
        let ClientCommand::Job(JobCommand::Create(a)) = parse(&with) else { panic!() };
        let create: v::CreateReplicationJob = serde_json::from_value(job_body(&a)).unwrap();
        let pairs: Vec<(&str, &str)> =
            create.network_mappings.iter().map(|m| (m.from.as_str(), m.to.as_str())).collect();
        assert_eq!(pairs, [("lan", "dr-lan"), ("dmz", "dr-dmz")]);
        let ClientCommand::Job(JobCommand::Update(a)) = parse(&["job", "update", A, "--network", "lan=dr-lan"]) else {
            panic!()
        };
        assert_eq!(job_update_body(&a).unwrap(), json!({"network_mappings": [{"from": "lan", "to": "dr-lan"}]}));
        let ClientCommand::Job(JobCommand::Update(a)) = parse(&["job", "update", A, "--clear-networks"]) else {
            panic!()
        };
        assert_eq!(job_update_body(&a).unwrap(), json!({"network_mappings": []}));
        assert!(try_parse(&["job", "update", A, "--network", "lan=x", "--clear-networks"]).is_err());
        assert!(try_parse(&["job", "update", A, "--network", "lan"]).is_err(), "FROM=TO");
        let ClientCommand::Host(HostCommand::Networks(h)) = parse(&["host", "networks", A]) else { panic!() };
        assert_eq!(h.id.to_string(), A);
    }

    #[test]
    fn job_update_bodies_are_patches() {
        let ClientCommand::Job(JobCommand::Update(a)) =
            parse(&["job", "update", A, "--retention", "1", "--continuous", "--disable"])
        else {
            panic!()
        };
        let body = job_update_body(&a).unwrap();
        assert_eq!(body, json!({"schedule": {"type": "Continuous"}, "retention_points": 1, "enabled": false}));
        let patch: v::PatchReplicationJob = serde_json::from_value(body).unwrap();
        assert_eq!(patch.retention_points, Some(1));
        let ClientCommand::Job(JobCommand::Update(a)) = parse(&["job", "update", A, "--name", "n", "--enable"]) else {
            panic!()
        };
        assert_eq!(job_update_body(&a).unwrap(), json!({"name": "n", "enabled": true}));
        let ClientCommand::Job(JobCommand::Update(a)) = parse(&["job", "update", A, "--bandwidth-limit", "none"])
        else {
            panic!()
        };
        assert_eq!(job_update_body(&a).unwrap(), json!({"bandwidth_limit": 0}));
        let ClientCommand::Job(JobCommand::Update(a)) = parse(&["job", "update", A, "--bandwidth-limit", "4MiB"])
        else {
            panic!()
        };
        let patch: v::PatchReplicationJob = serde_json::from_value(job_update_body(&a).unwrap()).unwrap();
        assert_eq!(patch.bandwidth_limit, Some(4 << 20));
        let ClientCommand::Job(JobCommand::Update(a)) = parse(&["job", "update", A, "--interval", "60"]) else {
            panic!()
        };
        let _: v::PatchReplicationJob = serde_json::from_value(job_update_body(&a).unwrap()).unwrap();
        let ClientCommand::Job(JobCommand::Update(a)) = parse(&["job", "update", A]) else { panic!() };
        assert!(job_update_body(&a).unwrap_err().to_string().contains("nothing to update"));
    }

    #[test]
    fn conflicting_flags_are_refused() {
        for args in [
            vec!["job", "update", A, "--manual", "--interval", "5"],
            vec!["job", "update", A, "--enable", "--disable"],
            vec!["location", "update", A, "--network", "a=b", "--clear-networks"],
            vec!["host", "update", A],
            vec!["site", "update", A],
        ] {
            assert!(try_parse(&args).is_err(), "{args:?} should be refused");
        }
    }

    #[test]
    fn update_bodies_match_the_api() {
        let ClientCommand::Host(HostCommand::Update { name, address, .. }) =
            parse(&["host", "update", A, "--address", "10.0.0.2:7000"])
        else {
            panic!()
        };
        let body = patch_body(&[("name", name.as_deref()), ("address", address.as_deref())]);
        assert_eq!(body, json!({"address": "10.0.0.2:7000"}));
        let _: v::PatchHost = serde_json::from_value(body).unwrap();
        let ClientCommand::Site(SiteCommand::Update(a)) = parse(&["site", "update", A, "--name", "s"]) else {
            panic!()
        };
        let _: v::PatchName = serde_json::from_value(patch_body(&[("name", Some(&a.name))])).unwrap();
        let ClientCommand::User(UserCommand::Update { password, role, .. }) =
            parse(&["user", "update", A, "--role", "Viewer"])
        else {
            panic!()
        };
        let body = patch_body(&[("password", password.as_deref()), ("role", role.as_deref())]);
        assert_eq!(body, json!({"role": "Viewer"}));
        let _: v::PatchUser = serde_json::from_value(body).unwrap();

        let ClientCommand::Location(LocationCommand::Update(a)) =
            parse(&["location", "update", A, "--description", "d", "--network", "lan=dr-lan"])
        else {
            panic!()
        };
        let patch: v::PatchRecoveryLocation = serde_json::from_value(location_update_body(&a).unwrap()).unwrap();
        assert_eq!(patch.network_mappings.unwrap()[0].to, "dr-lan");
        assert_eq!(patch.name, None);
        let ClientCommand::Location(LocationCommand::Update(a)) = parse(&["location", "update", A, "--clear-networks"])
        else {
            panic!()
        };
        assert_eq!(location_update_body(&a).unwrap(), json!({"network_mappings": []}));
        let ClientCommand::Location(LocationCommand::Update(a)) = parse(&["location", "update", A]) else { panic!() };
        assert!(location_update_body(&a).is_err());
    }

    #[test]
    fn plan_files_are_checked_locally() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.json");
        std::fs::write(&good, r#"{"name": "p", "groups": [{"name": "g", "vms": []}]}"#).unwrap();
        assert_eq!(plan_body(&good).unwrap()["name"], "p");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"name": "p", "grups": []}"#).unwrap();
        let e = format!("{:#}", plan_body(&bad).unwrap_err());
        assert!(e.contains("not a plan definition") && e.contains("grups"), "{e}");
        let e = format!("{:#}", plan_body(&dir.path().join("missing.json")).unwrap_err());
        assert!(e.contains("cannot read"), "{e}");
    }
}
