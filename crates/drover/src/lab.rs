//! `drover lab`: the embedded default on one machine, in the real topology. Starts the control
//! plane on SQLite with its agent listener on loopback, and two `drover agent` processes (this
//! same binary), one per site, each with its own data directory (`<data-dir>/agents/prod` and
//! `/dr`) and listeners on loopback, enrolled by the lab with one-time tokens. Lays out a
//! production and a DR site with a host (its agent) and a datastore each, creates two small real
//! VMs running the tiny guest (or, with `--guest debian`, the Debian guest with the QEMU guest
//! agent and PostgreSQL) on the production agent, powers them on (waiting for their
//! heartbeats), replicates them agent to agent, and serves the API.
//!
//! It is idempotent: run it again on the same data directory and it reuses what is there (the
//! agents keep their identities), powering on the lab VMs that are off. `--scenario` then runs the
//! whole story over the agents' wire, with the production site lost (its agent and VMs killed)
//! before the failover.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use drover_engine::app::{App, Caller, NewDatastore, NewHost, NewVm, PowerAction};
use drover_types::{
    Datastore, Host, Plan, RecoveryLocationId, Session, SessionResult, Site, SiteKind, Vm, VmPowerState,
};

use crate::serve::{self, ServeArgs};

/// A `drover agent` the lab runs (this binary), killed when dropped; its VMs outlive it.
struct LabAgent {
    child: tokio::process::Child,
    url: String,
}

impl LabAgent {
    /// Starts the agent of `dir`, enrolling it at `enroll` (URL, token) when it has no identity
    /// yet, and waits for it to serve.
    async fn start(
        dir: &Path,
        args: &ServeArgs,
        guests: &LabGuests,
        enroll: Option<(&str, &str)>,
    ) -> anyhow::Result<LabAgent> {
        use clap::ValueEnum as _;
        use tokio::io::AsyncBufReadExt as _;
        let name = |v: Option<clap::builder::PossibleValue>| v.map(|p| p.get_name().to_string()).unwrap_or_default();
        drover_agent::host_paths::create_private_dir_all(dir)
            .with_context(|| format!("cannot make {}", dir.display()))?;
        let log = std::fs::File::create(dir.join("agent.log")).context("the agent's log")?;
        let mut cmd = tokio::process::Command::new(std::env::current_exe().context("this binary")?);
        cmd.arg("agent")
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--data-listen", "127.0.0.1:0"])
            .args(["--hypervisor", &name(args.hv.hypervisor.to_possible_value())])
            .args(["--accel", &name(args.hv.accel.to_possible_value())])
            .arg("--import-dir")
            .arg(&guests.tiny)
            .arg("--guest-dir")
            .arg(&guests.tiny)
            .env_remove("DROVER_AGENT_LISTEN")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        if let Some(debian) = &guests.debian {
            cmd.arg("--import-dir").arg(&debian.dir);
        }
        if let Some((url, token)) = enroll {
            cmd.args(["--enroll", url, token]);
        }
        let mut child = cmd.spawn().context("cannot start drover agent")?;
        let stdout = child.stdout.take().context("the agent's output")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(line) = lines.next_line().await? {
                if let Some((_, url)) =
                    line.trim().strip_prefix("drover agent for host ").and_then(|r| r.split_once(" serving on "))
                {
                    return Ok(url.to_string());
                }
            }
            anyhow::bail!("drover agent stopped before it served")
        })
        .await
        .map_err(|_| anyhow::anyhow!("drover agent did not serve within 120 s"))?
        .with_context(|| format!("the agent in {} (its log: {})", dir.display(), dir.join("agent.log").display()))?;
        // Keep reading what it prints, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(LabAgent { child, url })
    }

    async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The lab's agents, by site name.
struct Agents {
    prod: LabAgent,
    dr: LabAgent,
}

#[derive(Debug, Args)]
pub struct LabArgs {
    /// Lab VMs to create.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub vms: u32,
    /// Start, report, and stop instead of serving (for scripts and CI).
    #[arg(long)]
    pub exit: bool,
    /// Then run the whole story: write in production, replicate, fail over, write in the replica,
    /// fail back, commit, replicate; print each session's result, bytes moved and time.
    #[arg(long)]
    pub scenario: bool,
    /// The lab VMs' guest: `tiny` (a busybox initramfs with drover's channel, 3 s to boot) or
    /// `debian` (the real guest of scripts/build-debian-guest: systemd, the QEMU guest agent,
    /// PostgreSQL; 512 MiB each, about 20 s to boot under TCG, application-consistent points).
    #[arg(long, value_enum, default_value_t = LabGuest::Tiny)]
    pub guest: LabGuest,
    /// Where the Debian guest is (default: $DROVER_DEBIAN_GUEST_DIR, else guest/debian).
    #[arg(long, value_name = "DIR")]
    pub debian_guest_dir: Option<PathBuf>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LabGuest {
    Tiny,
    Debian,
}

/// The guests the lab uses: the tiny one always (the agents' KVM probe boots it), the Debian one
/// when asked for.
struct LabGuests {
    tiny: PathBuf,
    debian: Option<drover_hv::qemu::DebianGuest>,
}

/// What the lab's objects are called: the Debian lab's are its own, so both kinds of lab can
/// live in one data directory.
struct LabNames {
    vm_prefix: &'static str,
    job: &'static str,
    plan: &'static str,
}

const LAB_PASSWORD_ENV: &str = "DROVER_ADMIN_PASSWORD";

pub async fn run(mut args: LabArgs) -> anyhow::Result<()> {
    // The tiny guest built by scripts/build-guest (`--guest-dir`, default guest/out).
    let dir = args.serve.hv.guest_dir.clone().unwrap_or_else(|| PathBuf::from("guest/out"));
    let dir = std::fs::canonicalize(&dir)
        .map_err(|e| anyhow::anyhow!("the tiny guest is not in {} ({e}): run scripts/build-guest", dir.display()))?;
    let guest = drover_hv::qemu::TinyGuest::load(&dir)
        .map_err(|e| anyhow::anyhow!("the tiny guest is not in {} ({e}): run scripts/build-guest", dir.display()))?;
    let debian = match args.guest {
        LabGuest::Tiny => None,
        LabGuest::Debian => {
            let dir = args.debian_guest_dir.clone().unwrap_or_else(|| {
                std::env::var_os("DROVER_DEBIAN_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| "guest/debian".into())
            });
            let guest = drover_hv::qemu::DebianGuest::load(&dir).map_err(|e| {
                anyhow::anyhow!("the Debian guest is not in {} ({e}): run scripts/build-debian-guest", dir.display())
            })?;
            Some(guest)
        }
    };
    let names = match args.guest {
        LabGuest::Tiny => LabNames { vm_prefix: "lab-vm", job: "lab-replication", plan: "lab-plan" },
        LabGuest::Debian => {
            LabNames { vm_prefix: "lab-debian", job: "lab-debian-replication", plan: "lab-debian-plan" }
        }
    };
    if args.serve.data_dir == serve::default_data_dir() {
        args.serve.data_dir = args.serve.data_dir.with_file_name("drover-lab");
    }
    // The lab's VMs boot the tiny guest's kernel and initrd: its directory is an import directory.
    if args.serve.import_dirs.is_empty() {
        args.serve.import_dirs.push(args.serve.data_dir.join("imports"));
    }
    args.serve.import_dirs.push(dir.clone());
    if let Some(d) = &debian {
        args.serve.import_dirs.push(d.dir.clone());
    }
    args.serve.hv.guest_dir = Some(dir.clone());
    let guests = LabGuests { tiny: dir.clone(), debian };
    // Agents enrol with the control plane over its agent listener, on loopback.
    if args.serve.agent_listen.0.is_none() {
        args.serve.agent_listen = serve::Endpoint(Some("127.0.0.1:0".parse()?));
    }
    let started = Instant::now();
    let server = serve::start(&args.serve).await?;
    let app = server.app.clone();
    let admin = admin_caller(&app).await?;
    let (prod_ds, dr_ds, agents) = layout(&app, &admin, &args.serve, &guests).await?;

    let mut vms = Vec::new();
    for i in 1..=args.vms {
        let name = format!("{}{i}", names.vm_prefix);
        let vm = match app.list::<Vm>(&admin).await?.into_iter().find(|v| v.name == name) {
            Some(vm) => vm,
            None => {
                let path = |p: &Path| Some(p.to_string_lossy().into_owned());
                let (memory_mib, disk, tag, boot) = match &guests.debian {
                    None => (
                        128,
                        drover_types::VmDisk { name: "data".into(), size_bytes: 256 << 20, import_from: None },
                        "lab:web",
                        drover_types::VmBoot {
                            kernel: path(&guest.vmlinux),
                            initrd: path(&guest.initramfs),
                            // The guest listens on port 22, which the plan's port check probes.
                            cmdline: Some(guest.cmdline_listening(&[22])),
                            firmware: Default::default(),
                        },
                    ),
                    Some(d) => (
                        512,
                        // Imported from the built image: the guest's root file system.
                        drover_types::VmDisk { name: "root".into(), size_bytes: 0, import_from: path(&d.disk) },
                        "lab:db",
                        drover_types::VmBoot {
                            kernel: path(&d.kernel),
                            initrd: path(&d.initrd),
                            cmdline: Some(d.cmdline.clone()),
                            firmware: Default::default(),
                        },
                    ),
                };
                let new = NewVm {
                    name: name.clone(),
                    host_id: prod_ds.host_id,
                    datastore_id: prod_ds.id,
                    vcpus: 1,
                    memory_mib,
                    disks: vec![disk],
                    nics: vec![("lan".into(), None)],
                    tags: vec![tag.parse()?],
                    boot,
                };
                let (vm, session) = app.vm_create(&admin, new).await?;
                expect_success(&app, session, "create", &name).await?;
                vm
            }
        };
        vms.push(vm);
    }
    for vm in &vms {
        let vm = app.get::<Vm>(&admin, vm.id.0).await?;
        if matches!(vm.power_state, VmPowerState::Off | VmPowerState::Died) {
            let s = app.vm_power(&admin, vm.id, PowerAction::PowerOn).await?;
            expect_success(&app, s, "power on", &vm.name).await?;
        }
    }
    // Replication of the lab VMs to the DR site, every 5 minutes, and its first run now.
    let job =
        match app.list::<drover_types::ReplicationJob>(&admin).await?.into_iter().find(|j| j.name == "lab-replication")
        {
            Some(j) => j,
            None => {
                let new = drover_engine::app::NewReplicationJob {
                    name: names.job.into(),
                    vm_ids: vms.iter().map(|v| v.id).collect(),
                    target_host_id: dr_ds.host_id,
                    target_datastore_id: dr_ds.id,
                    schedule: drover_types::Schedule::Interval { secs: 300 },
                    retention_points: 7,
                    bandwidth_limit: None,
                    consistency: Default::default(),
                    network_mappings: Vec::new(),
                };
                app.replication_job_create(&admin, new).await?
            }
        };
    match app.replication_job_run(&admin, job.id).await {
        Ok(s) => {
            let done = expect_success(&app, s, "replicate", "the lab VMs").await?;
            let log = app.session_log(&admin, done.id, 0, 1000).await?;
            for line in log.iter().filter(|e| e.message.starts_with("disk ")) {
                println!("    {}", line.message);
            }
        }
        // The scheduler got there first; that run is as good.
        Err(drover_types::Error::Conflict(m)) => println!("  replicate: {m}"),
        Err(e) => return Err(e.into()),
    }
    // A plan over the lab VMs, ready to fail over and back.
    if !app.list::<Plan>(&admin).await?.iter().any(|p| p.name == names.plan) {
        let steps = || {
            let mut steps = vec![
                drover_types::PlanStep {
                    id: Default::default(),
                    name: "Power on".into(),
                    kind: drover_types::PlanStepKind::PowerOn,
                    critical: true,
                },
                drover_types::PlanStep {
                    id: Default::default(),
                    name: "Wait for heartbeat".into(),
                    kind: drover_types::PlanStepKind::WaitHeartbeat { timeout_secs: 240 },
                    critical: true,
                },
            ];
            // The tiny guest listens on port 22; the Debian guest's PostgreSQL only on loopback.
            if guests.debian.is_none() {
                steps.push(drover_types::PlanStep {
                    id: Default::default(),
                    name: "Check port 22".into(),
                    kind: drover_types::PlanStepKind::CheckTcpPort { port: 22, timeout_secs: 60 },
                    critical: true,
                });
            }
            steps
        };
        let groups = vec![drover_types::PlanGroup {
            id: Default::default(),
            name: "web".into(),
            mode: drover_types::GroupMode::Parallel { max: 2 },
            delay_secs: 0,
            critical: true,
            restore_tags: true,
            vms: vms.iter().map(|v| drover_types::PlanVm { vm_id: v.id, steps: steps() }).collect(),
        }];
        let input = drover_engine::app::PlanInput {
            name: names.plan.into(),
            description: "The lab VMs, in one group".into(),
            recovery_location_id: RecoveryLocationId::ORIGINAL,
            groups,
        };
        app.plan_create(&admin, input).await?;
    }

    let url = server.listener.url();
    println!("drover lab is up in {:.1} s", started.elapsed().as_secs_f64());
    println!("  API:        {url}/v1   (OpenAPI: {url}/v1/openapi.json)");
    for (what, endpoint) in server.endpoints().into_iter().skip(1) {
        println!("  {what}:{:width$}{endpoint}", "", width = 11 - what.len());
    }
    println!("  data:       {} (SQLite: drover.db)", args.serve.data_dir.display());
    match (&server.generated_admin_password, std::env::var(LAB_PASSWORD_ENV)) {
        (Some(p), _) => println!("  login:      admin / {p}   (shown once)"),
        (None, Ok(_)) => println!("  login:      admin / ${LAB_PASSWORD_ENV}"),
        (None, Err(_)) => println!("  login:      admin / the password shown on the lab's first start"),
    }
    println!("              (the Veeam dialects take the same credentials)");
    if server.listener.tls {
        println!(
            "  CLI:        drover --server {url} --ca-cert {} login --user admin",
            args.serve.data_dir.join("tls-cert.pem").display()
        );
    } else {
        println!("  CLI:        drover --server {url} login --user admin");
    }
    println!("  production: datastore {} on site prod; DR: datastore {} on site dr", prod_ds.path, dr_ds.path);
    for r in app.list::<drover_types::Replica>(&admin).await? {
        let points = app.restore_points(&admin, r.id).await?;
        let newest = points.last().map(|p| format!(", the newest {}", p.consistency.describe())).unwrap_or_default();
        println!("  replica {:<16} {:?}, {} restore point(s){newest}", r.name, r.state, points.len());
    }
    let prod_host = app.get::<Host>(&admin, prod_ds.host_id.0).await?;
    let prod_agent = app.engine().agent(&prod_host).await?;
    for vm in &vms {
        let vm = app.get::<Vm>(&admin, vm.id.0).await?;
        let hb = prod_agent.vm_wait_heartbeat(vm.id.0, Duration::from_secs(5)).await;
        let beat = hb
            .map(|h| format!("heartbeat, guest up {:.1} s", h.uptime_secs))
            .unwrap_or_else(|e| format!("no heartbeat: {e}"));
        println!("  VM {:<10} {:?}, {beat}", vm.name, vm.power_state);
    }
    println!(
        "  agents:     production {}, DR {} (data in {})",
        agents.prod.url,
        agents.dr.url,
        args.serve.data_dir.join("agents").display()
    );
    let agents =
        if args.scenario { scenario(&app, &admin, &vms, &args.serve, &guests, &names, agents).await? } else { agents };
    if args.exit {
        app.engine().shutdown();
        server.stop_listeners().await;
        agents.prod.kill().await;
        agents.dr.kill().await;
        println!("lab stopped (--exit); the VMs keep running and are re-attached on the next start");
        return Ok(());
    }
    println!("Ctrl-C stops drover and its agents; the VMs keep running and are re-attached on the next start.");
    tokio::signal::ctrl_c().await?;
    app.engine().shutdown();
    agents.prod.kill().await;
    agents.dr.kill().await;
    Ok(())
}

async fn admin_caller(app: &App) -> anyhow::Result<Caller> {
    let (user, _) = app.engine().store().user_by_name("admin").await?.context("the admin user is missing")?;
    Ok(app.caller_for(user.id).await?)
}

/// The directory of a site's agent.
fn agent_dir(args: &ServeArgs, site: &str) -> PathBuf {
    args.data_dir.join("agents").join(site)
}

/// Starts a site's agent (enrolling it on its first start) and points its host at it.
async fn site_agent(
    app: &App,
    admin: &Caller,
    args: &ServeArgs,
    guests: &LabGuests,
    host: &Host,
    site: &str,
) -> anyhow::Result<LabAgent> {
    let dir = agent_dir(args, site);
    let agent = if dir.join("identity/agent.cert.pem").exists() {
        LabAgent::start(&dir, args, guests, None).await?
    } else {
        let e = app.host_enrolment(admin, host.id, None).await?;
        LabAgent::start(&dir, args, guests, Some((&e.enrol_url, &e.token))).await?
    };
    app.host_update(admin, host.id, None, Some(agent.url.clone())).await?;
    app.engine().agent_disconnect(host.id).await;
    Ok(agent)
}

/// The production and DR sites with a host (run by its own agent) and a datastore each. Returns
/// the datastores and the running agents.
async fn layout(
    app: &App,
    admin: &Caller,
    args: &ServeArgs,
    guests: &LabGuests,
) -> anyhow::Result<(Datastore, Datastore, Agents)> {
    let mut out = Vec::new();
    let mut agents = Vec::new();
    for (site_name, kind) in [("prod", SiteKind::Production), ("dr", SiteKind::DisasterRecovery)] {
        let site = match app.list::<Site>(admin).await?.into_iter().find(|s| s.name == site_name) {
            Some(s) => s,
            None => app.site_create(admin, site_name, kind).await?,
        };
        let host_name = format!("{site_name}-host");
        let host = match app.list::<Host>(admin).await?.into_iter().find(|h| h.name == host_name) {
            Some(h) if h.address == "local" => bail!(
                "{} holds a lab from before the lab ran its sites on agents: remove it, or use another --data-dir",
                args.data_dir.display()
            ),
            Some(h) => h,
            None => {
                // Its address is set once its agent serves.
                let new = NewHost { site_id: site.id, name: host_name, address: "https://127.0.0.1:1".into() };
                app.host_create(admin, new).await?
            }
        };
        let agent = site_agent(app, admin, args, guests, &host, site_name).await?;
        let ds_name = format!("{site_name}-ds");
        let ds = match app.list::<Datastore>(admin).await?.into_iter().find(|d| d.name == ds_name) {
            Some(d) => d,
            None => {
                let path = agent_dir(args, site_name).join("datastores").join(site_name).to_string_lossy().to_string();
                app.datastore_create(admin, NewDatastore { host_id: host.id, name: ds_name, path }).await?
            }
        };
        out.push(ds);
        agents.push(agent);
    }
    let dr = out.pop().context("no DR datastore")?;
    let prod = out.pop().context("no production datastore")?;
    let dr_agent = agents.pop().context("no DR agent")?;
    let prod_agent = agents.pop().context("no production agent")?;
    Ok((prod, dr, Agents { prod: prod_agent, dr: dr_agent }))
}

/// Kills a VM's QEMU process the way a lost site does (SIGKILL): the pid from its pidfile under
/// the agent's runtime directory, checked to be that VM's QEMU.
fn kill_vm(agent_dir: &Path, vm: uuid::Uuid) {
    let Ok(pid) = std::fs::read_to_string(agent_dir.join("run").join(vm.to_string()).join("qemu.pid")) else { return };
    let Ok(pid) = pid.trim().parse::<i32>() else { return };
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&vm.to_string()));
    if ours {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

async fn expect_success(app: &App, session: drover_types::SessionId, what: &str, vm: &str) -> anyhow::Result<Session> {
    print!("  {what} {vm} ... ");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let t = Instant::now();
    let s = app.engine().wait(session, Duration::from_secs(300)).await?;
    if s.result != SessionResult::Success {
        println!("{:?}", s.result);
        bail!("{what} {vm} failed: {}", s.failure_message.unwrap_or_default());
    }
    println!("ok ({:.1} s)", t.elapsed().as_secs_f64());
    Ok(s)
}

/// Bytes a session moved, as its log lines report them ("sent N bytes").
async fn bytes_sent(app: &App, caller: &Caller, s: drover_types::SessionId) -> anyhow::Result<u64> {
    Ok(app
        .session_log(caller, s, 0, 10_000)
        .await?
        .iter()
        .filter_map(|e| e.message.split("sent ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// The whole story on the lab, each step a session, with what it did: over the agents' wire,
/// and with the production site lost before the failover. Returns the agents as they run after.
async fn scenario(
    app: &App,
    admin: &Caller,
    vms: &[Vm],
    args: &ServeArgs,
    guests: &LabGuests,
    names: &LabNames,
    agents: Agents,
) -> anyhow::Result<Agents> {
    use drover_agent_api::HostAgent;
    use drover_types::{PlanAction, Replica};
    let hosts = app.list::<Host>(admin).await?;
    let host = |name: &str| hosts.iter().find(|h| h.name == name).cloned().context("a lab host is missing");
    let (prod_host, dr_host) = (host("prod-host")?, host("dr-host")?);
    let dr: Arc<dyn HostAgent> = app.engine().agent(&dr_host).await?;
    let prod: Arc<dyn HostAgent> = app.engine().agent(&prod_host).await?;
    let plan =
        app.list::<Plan>(admin).await?.into_iter().find(|p| p.name == names.plan).context("the plan is missing")?;
    let job = app
        .list::<drover_types::ReplicationJob>(admin)
        .await?
        .into_iter()
        .find(|j| j.name == names.job)
        .context("the replication job is missing")?;
    println!("\nscenario (production and DR each on a drover agent):");
    println!("  {:<34} {:<8} {:>12} {:>8}", "step", "result", "bytes sent", "seconds");
    let report = |what: &str, s: &Session, bytes: u64, t: Instant| {
        println!("  {what:<34} {:<8} {bytes:>12} {:>8.1}", format!("{:?}", s.result), t.elapsed().as_secs_f64());
    };
    let check = |s: &Session, what: &str| -> anyhow::Result<()> {
        if s.result == SessionResult::Success {
            Ok(())
        } else {
            bail!("{what} failed: {}", s.failure_message.clone().unwrap_or_default())
        }
    };
    let replicate = |what: &'static str| async move {
        let t = Instant::now();
        let s = app.engine().wait(app.replication_job_run(admin, job.id).await?, Duration::from_secs(600)).await?;
        report(what, &s, bytes_sent(app, admin, s.id).await?, t);
        for line in app.session_log(admin, s.id, 0, 1000).await?.iter().filter(|e| e.message.contains("consistent cut"))
        {
            println!("    {}", line.message);
        }
        check(&s, what)?;
        Ok::<_, anyhow::Error>(s)
    };
    let plan_action = |what: &'static str, action: PlanAction| async move {
        let t = Instant::now();
        let (_, s) = app.plan_action(admin, plan.id, action, Default::default()).await?;
        let s = app.engine().wait(s.context("no session")?, Duration::from_secs(600)).await?;
        report(what, &s, bytes_sent(app, admin, s.id).await?, t);
        check(&s, what)?;
        Ok::<_, anyhow::Error>(s)
    };

    for vm in vms {
        prod.vm_write_marker(vm.id.0, &format!("{} in production", vm.name)).await?;
    }
    replicate("replicate (marker in production)").await?;
    // The production site is lost: its agent and its VMs die at once.
    let t = Instant::now();
    agents.prod.kill().await;
    for vm in vms {
        kill_vm(&agent_dir(args, "prod"), vm.id.0);
    }
    println!("  {:<34} {:<8} {:>12} {:>8.1}", "production site lost", "-", 0, t.elapsed().as_secs_f64());
    let s = plan_action("fail over to DR", PlanAction::Failover).await?;
    let log = app.session_log(admin, s.id, 0, 1000).await?;
    if let Some(line) = log.iter().find(|e| e.message.contains("cannot be reached")) {
        println!("    {}", line.message);
    }
    let replicas = app.list::<Replica>(admin).await?;
    for vm in vms {
        let r = replicas.iter().find(|r| r.source_vm_id == vm.id).context("no replica")?;
        let hb = dr.vm_wait_heartbeat(r.id.0, Duration::from_secs(120)).await?;
        let want = format!("{} in production", vm.name);
        if hb.marker.as_deref() != Some(want.as_str()) {
            bail!("{} at DR shows {:?}, expected {want:?}", r.name, hb.marker);
        }
        dr.vm_write_marker(r.id.0, &format!("{} written at DR", vm.name)).await?;
    }
    println!("  replicas show production's markers; each writes its own at DR");
    // Production comes back: its agent re-attaches (the VMs it ran are dead and stay off).
    let t = Instant::now();
    let prod_agent = site_agent(app, admin, args, guests, &prod_host, "prod").await?;
    let prod: Arc<dyn HostAgent> = app.engine().agent(&app.get::<Host>(admin, prod_host.id.0).await?).await?;
    println!("  {:<34} {:<8} {:>12} {:>8.1}", "production site returns (fenced)", "-", 0, t.elapsed().as_secs_f64());
    plan_action("fail back to production", PlanAction::FailbackToProduction).await?;
    for vm in vms {
        let hb = prod.vm_wait_heartbeat(vm.id.0, Duration::from_secs(240)).await?;
        let want = format!("{} written at DR", vm.name);
        if hb.marker.as_deref() != Some(want.as_str()) {
            bail!("{} shows {:?} after failback, expected {want:?}", vm.name, hb.marker);
        }
    }
    println!("  production shows the markers written at DR");
    plan_action("commit failback", PlanAction::CommitFailback).await?;
    replicate("replicate again (production -> DR)").await?;
    println!("scenario complete");
    Ok(Agents { prod: prod_agent, dr: agents.dr })
}
