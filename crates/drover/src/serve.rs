//! `drover serve`: the control plane with its in-process agent.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use drover_api::Tls;
use drover_engine::app::App;
use drover_engine::{Engine, EngineConfig};
use drover_hv::Hypervisor;
use drover_store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HypervisorKind {
    /// Real VMs: qemu-system-x86_64 processes controlled over QMP.
    Qemu,
    /// The host's libvirt (`--libvirt-uri`): its existing domains are imported and protected.
    Libvirt,
    /// A SIMULATION for tests and demos without QEMU: no VM really runs.
    Simulated,
}

/// The hypervisor driver `drover serve` and `drover agent` run VMs with.
#[derive(Debug, Clone, clap::Args)]
pub struct HypervisorArgs {
    #[arg(long, value_enum, default_value = "qemu")]
    pub hypervisor: HypervisorKind,
    /// The libvirt daemon of `--hypervisor libvirt` (the agent runs beside it).
    #[arg(long, env = "DROVER_LIBVIRT_URI", default_value = "qemu:///system")]
    pub libvirt_uri: String,
    /// CPU acceleration for QEMU. `auto` uses KVM only when /dev/kvm opens and a probe boot of
    /// the tiny guest under KVM reaches the guest in time (some hosts hang normal guests under
    /// KVM); otherwise, and without the tiny guest to probe with, TCG.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelArg,
    /// The tiny guest (`scripts/build-guest` output), used to probe KVM with `--accel auto`.
    #[arg(long, env = "DROVER_GUEST_DIR")]
    pub guest_dir: Option<PathBuf>,
    /// A network VMs on this host may be connected to, `NAME=TARGET` (repeat it, or separate
    /// with commas): a NIC on network NAME of a VM drover runs here, and a replica's NIC whose
    /// source network maps to NAME (the replication job's network mapping, else the same name),
    /// is connected to TARGET, a libvirt network with
    /// `--hypervisor libvirt` (a host bridge through a libvirt network with `<forward
    /// mode='bridge'/>`), a bridge with `--hypervisor qemu` (allowed in qemu-bridge-helper's
    /// bridge.conf). `NAME` alone means `NAME=NAME`. Requests never name host networks: any
    /// NIC that maps to none of these is isolated (the guest keeps it and reaches nothing).
    #[arg(long = "network", env = "DROVER_NETWORKS", value_delimiter = ',', value_parser = parse_network)]
    pub networks: Vec<(String, String)>,
}

/// `NAME=TARGET` or `NAME` of `--network`: a network name as the inventory allows it, and a host
/// network (libvirt network or bridge) name of letters, digits, `-`, `_` and `.`, at most 64
/// bytes (a bridge's is at most 15, which the kernel checks).
pub fn parse_network(s: &str) -> Result<(String, String), String> {
    let (name, target) = s.split_once('=').unwrap_or((s, s));
    let (name, target) = (name.trim(), target.trim());
    drover_types::validate_name("network", name).map_err(|e| e.to_string())?;
    if target.is_empty()
        || target.len() > 64
        || target.starts_with('.')
        || !target.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "host network {target:?}: letters, digits, '-', '_' and '.', at most 64, not starting with '.'"
        ));
    }
    Ok((name.to_string(), target.to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelArg {
    Tcg,
    Kvm,
    /// KVM if a probe boot of the tiny guest succeeds, else TCG.
    Auto,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML file of settings: its keys are these long options (`listen = "0.0.0.0:8443"`,
    /// `em-http-listen = "0.0.0.0:9399"`, ...). The command line and the environment win over it.
    #[arg(long, env = "DROVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where drover keeps its database, certificates and VM runtime files.
    #[arg(long, env = "DROVER_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// Address of the native API.
    #[arg(long, env = "DROVER_LISTEN", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Address of the Veeam Recovery Orchestrator dialect (JSON under `/api/v3`), or `off`.
    #[arg(long, env = "DROVER_VRO_LISTEN", default_value = "127.0.0.1:9898")]
    pub vro_listen: Endpoint,
    /// Address of the Veeam Enterprise Manager dialect (XML/JSON under `/api`), or `off`.
    #[arg(long, env = "DROVER_EM_LISTEN", default_value = "127.0.0.1:9398")]
    pub em_listen: Endpoint,
    /// Also serve the Enterprise Manager dialect over plain HTTP here (the legacy port 9399 of the
    /// product), sharing its logon sessions with the HTTPS listener. Off unless given.
    #[arg(long, env = "DROVER_EM_HTTP_LISTEN", default_value = "off")]
    pub em_http_listen: Endpoint,
    /// The Enterprise Manager dialect's address as its clients see it behind a proxy
    /// (`https://dr.example.com`, or with a path: `https://proxy.example.com/em`): every `Href`
    /// then starts with it instead of the request's scheme, host and port. Absolute http or https,
    /// without query or fragment.
    #[arg(long = "em-external-url", env = "DROVER_EM_EXTERNAL_URL")]
    pub em_external_url: Option<drover_compat::em::ExternalBaseUrl>,
    /// Serve plain HTTP instead of HTTPS (every listener). Only for a trusted loopback or a
    /// TLS-terminating proxy.
    #[arg(long)]
    pub plain_http: bool,
    /// PEM certificate; a self-signed one is generated in the data directory when absent.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub hv: HypervisorArgs,
    /// A directory under which datastores may be created (repeat it, or separate with commas).
    /// Requests can name no datastore path outside these. Default: `<data-dir>/datastores`.
    #[arg(long = "datastore-root", env = "DROVER_DATASTORE_ROOTS", value_delimiter = ',')]
    pub datastore_roots: Vec<PathBuf>,
    /// A directory that disk images to import and boot files (kernel, initrd) may come from
    /// (repeat it, or separate with commas). Default: `<data-dir>/imports`.
    #[arg(long = "import-dir", env = "DROVER_IMPORT_DIRS", value_delimiter = ',')]
    pub import_dirs: Vec<PathBuf>,
    /// Address of the listener `drover agent`s enrol at (HTTPS with a certificate from the
    /// control plane's own CA, kept in `<data-dir>/ca`), or `off`: without it, hosts can only
    /// be `local`.
    #[arg(long, env = "DROVER_AGENT_LISTEN", default_value = "off")]
    pub agent_listen: Endpoint,
    /// The agent listener's URL as agents reach it (`https://dr-cp.example.com:8444`): shown
    /// in enrolment commands, and a name of the control plane's certificate. Default: from
    /// `--agent-listen` (the machine's name when it listens on every address).
    #[arg(long, env = "DROVER_AGENT_URL")]
    pub agent_url: Option<String>,
    /// Address where this machine's own agent serves its cuts to other hosts' agents (mutual
    /// TLS with the certificate the control plane's CA issued it): what lets a `drover agent`
    /// on a DR host replicate this machine's VMs. Needs `--agent-listen`.
    #[arg(long, env = "DROVER_DATA_LISTEN", requires = "agent_listen")]
    pub data_listen: Option<SocketAddr>,
    /// `host:port` other agents reach `--data-listen` at. Default: `--data-listen`.
    #[arg(long, env = "DROVER_DATA_ADVERTISE", requires = "data_listen")]
    pub data_advertise: Option<String>,
    /// The most this machine's agent sends to other agents, all transfers together, per second
    /// (`100MiB`, `1GiB`, or bytes). Default: no cap.
    #[arg(long, env = "DROVER_DATA_BANDWIDTH_CAP", value_parser = crate::agent::parse_rate, requires = "data_listen")]
    pub data_bandwidth_cap: Option<u64>,
    /// Seconds to wait for a guest's first heartbeat after power-on.
    #[arg(long, default_value_t = 120)]
    pub heartbeat_timeout_secs: u64,
    /// Seconds a graceful shutdown may take before the VM is powered off.
    #[arg(long, default_value_t = 60)]
    pub shutdown_timeout_secs: u64,
}

/// A listener's address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint(pub Option<SocketAddr>);

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Endpoint(None));
        }
        s.parse()
            .map(|a| Endpoint(Some(a)))
            .map_err(|e| format!("{s:?} is neither an address (host:port) nor `off`: {e}"))
    }
}

pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(h) => Path::new(&h).join(".local/share/drover"),
        None => PathBuf::from("/var/lib/drover"),
    }
}

/// Takes group and other permissions away from a file or directory (0600 / 0700).
fn make_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))
            .with_context(|| format!("cannot make {} private", path.display()))?;
    }
    Ok(())
}

/// A running control plane.
#[derive(Debug)]
pub struct Server {
    pub app: App,
    /// The native API.
    pub listener: drover_api::Listener,
    /// The Veeam dialects that are on: Recovery Orchestrator, Enterprise Manager, and its legacy
    /// plain-HTTP listener.
    pub vro: Option<drover_api::Listener>,
    pub em: Option<drover_api::Listener>,
    pub em_http: Option<drover_api::Listener>,
    /// The listener agents enrol at, when on.
    pub agents: Option<drover_api::Listener>,
    /// Where this machine's agent serves its cuts to other agents, when on.
    pub data: Option<drover_agent::peer::DataListener>,
    /// The admin password when it was generated on this start.
    pub generated_admin_password: Option<String>,
}

pub async fn start(args: &ServeArgs) -> anyhow::Result<Server> {
    // Everything drover and its QEMU children create (database, WAL, images, keys, sockets) is
    // the service user's alone, whatever umask it was started with.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    drover_engine::host_paths::create_private_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create the data directory {}", args.data_dir.display()))?;
    make_private(&args.data_dir)?;
    let or_default = |dirs: &[PathBuf], default: &str| {
        if dirs.is_empty() { vec![args.data_dir.join(default)] } else { dirs.to_vec() }
    };
    let host_paths = drover_engine::host_paths::HostPaths::new(
        &or_default(&args.datastore_roots, "datastores"),
        &or_default(&args.import_dirs, "imports"),
    )
    .context("bad --datastore-root or --import-dir")?;
    let db = args.data_dir.join("drover.db");
    let store = Store::open_sqlite(&db).await.map_err(|e| anyhow::anyhow!("cannot open {}: {e}", db.display()))?;
    // Made by an older build, they may be world-readable: every tenant's password hashes are in there.
    for file in ["drover.db", "drover.db-wal", "drover.db-shm", "tls-key.pem"] {
        let path = args.data_dir.join(file);
        if path.exists() {
            make_private(&path)?;
        }
    }
    let hv: Arc<dyn Hypervisor> = crate::agent::hypervisor(&args.hv, args.data_dir.join("run"))?;
    let config = EngineConfig {
        heartbeat_timeout: std::time::Duration::from_secs(args.heartbeat_timeout_secs),
        shutdown_timeout: std::time::Duration::from_secs(args.shutdown_timeout_secs),
        work_dir: args.data_dir.join("work"),
        host_paths,
        ..EngineConfig::default()
    };
    // With agents, this machine's agent has an identity of its own from the control plane's CA:
    // it pulls from other agents with it, and serves its cuts to them with it.
    let pki = match args.agent_listen.0 {
        Some(_) => Some(AgentPkiFiles::create_or_load(args)?),
        None => None,
    };
    let mut local_agent = drover_agent::LocalAgent::new(hv.clone(), config.work_dir.clone());
    // The thaw watchdog outlives this process: it is this very binary.
    if let Ok(exe) = std::env::current_exe() {
        local_agent = local_agent.with_thaw_watchdog(exe);
    }
    // A guest a killed earlier run left frozen is thawed before anything else happens.
    let thawed = local_agent.thaw_leftover_freezes().await;
    if thawed > 0 {
        tracing::warn!(thawed, "thawed guests frozen when drover last stopped");
    }
    let mut data = None;
    if let Some(pki) = &pki {
        let local = &pki.local;
        local_agent = local_agent.with_peer_tls(drover_pki::client_config(local.tls_identity(), local.trusted_ca())?);
        if let Some(bind) = args.data_listen {
            if bind.ip().is_unspecified() && args.data_advertise.is_none() {
                bail!(
                    "--data-listen {bind} is a wildcard address: say where other agents reach it with --data-advertise"
                );
            }
            let tls = drover_pki::server_config_requiring_client_cert(local.tls_identity(), local.trusted_ca())?;
            let name = drover_pki::agent_dns_name(local.host_id());
            let listener = local_agent
                .serve_data(bind, args.data_advertise.clone(), name, Some(tls))
                .await
                .with_context(|| format!("cannot listen for other agents on {bind}"))?;
            data = Some(listener);
        }
    }
    let engine = Engine::with_local_agent(store, hv, config, Arc::new(local_agent));
    let app = App::new(engine.clone());
    let admin_password = std::env::var("DROVER_ADMIN_PASSWORD").ok();
    let generated_admin_password = app.bootstrap(admin_password).await?;
    // Before the engine starts: sessions it resumes may need hosts' agents.
    let agents = match (args.agent_listen.0, pki) {
        (Some(addr), Some(pki)) => Some(agent_listener(args, &app, addr, pki).await?),
        _ => None,
    };
    engine.start().await?;
    let tls = if args.plain_http {
        Tls::Plain
    } else if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        Tls::Files { cert: cert.clone(), key: key.clone() }
    } else {
        let (cert, key) = drover_api::self_signed(&args.data_dir).context("cannot make a self-signed certificate")?;
        Tls::Files { cert, key }
    };
    let listener = drover_api::listen(drover_api::router(app.clone()), args.listen, tls.clone())
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let listen = |what: &'static str, router: axum::Router, addr: SocketAddr, tls: Tls| async move {
        drover_api::listen(router, addr, tls).await.with_context(|| format!("cannot listen on {addr} ({what})"))
    };
    let vro = match args.vro_listen.0 {
        Some(addr) => Some(
            listen("Recovery Orchestrator dialect", drover_compat::vro::router(app.clone()), addr, tls.clone()).await?,
        ),
        None => None,
    };
    let em_config = drover_compat::em::EmConfig {
        backup_server_port: args.listen.port(),
        external_base_url: args.em_external_url.clone(),
        ..Default::default()
    };
    let em_state = drover_compat::em::EmState::new(app.clone(), em_config);
    let em = match args.em_listen.0 {
        Some(addr) => {
            let scheme = if matches!(tls, Tls::Plain) { "http" } else { "https" };
            Some(listen("Enterprise Manager dialect", em_state.router_for_scheme(scheme), addr, tls.clone()).await?)
        }
        None => None,
    };
    let em_http = match args.em_http_listen.0 {
        Some(addr) => Some(
            listen("Enterprise Manager dialect, plain HTTP", em_state.router_for_scheme("http"), addr, Tls::Plain)
                .await?,
        ),
        None => None,
    };
    Ok(Server { app, listener, vro, em, em_http, agents, data, generated_admin_password })
}

/// The control plane's CA, and the identity of this machine's own agent (a host certificate
/// from that CA, for a host id of its own, kept in `<data-dir>/local-agent`).
struct AgentPkiFiles {
    ca: drover_pki::ControlPlaneCa,
    local: drover_pki::AgentIdentity,
}

impl AgentPkiFiles {
    fn create_or_load(args: &ServeArgs) -> anyhow::Result<AgentPkiFiles> {
        let ca = drover_pki::ControlPlaneCa::create_or_load(&args.data_dir.join("ca"))
            .context("cannot set up the control plane's CA")?;
        let dir = args.data_dir.join("local-agent");
        let local = match drover_pki::AgentIdentity::load(&dir) {
            Ok(identity) if identity.trusted_ca().fingerprint() == ca.fingerprint() => identity,
            _ => {
                let pending = drover_pki::AgentIdentity::generate(&dir).context("cannot make the local agent's key")?;
                let issued = ca.sign_agent_csr(drover_types::HostId::new(), pending.csr_pem(), &[])?;
                pending.install(&issued.certificate_pem, &issued.ca_pem)?
            }
        };
        Ok(AgentPkiFiles { ca, local })
    }
}

/// The listener agents enrol at (see `--agent-listen`), with a certificate from the CA.
async fn agent_listener(
    args: &ServeArgs,
    app: &App,
    addr: SocketAddr,
    pki: AgentPkiFiles,
) -> anyhow::Result<drover_api::Listener> {
    use drover_pki::SubjectName;
    let ca = pki.ca;
    let host_of_url = |url: &str| -> anyhow::Result<String> {
        let rest = url.strip_prefix("https://").context("--agent-url must start with https://")?;
        let authority = rest.split('/').next().unwrap_or_default();
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => h,
            _ => bail!("--agent-url {url:?} must name a port: https://host:port"),
        };
        Ok(host.trim_start_matches('[').trim_end_matches(']').to_string())
    };
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    let machine = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    if !machine.is_empty() {
        names.push(machine.clone());
    }
    if !addr.ip().is_unspecified() {
        names.push(addr.ip().to_string());
    }
    if let Some(url) = &args.agent_url {
        names.push(host_of_url(url)?);
    }
    names.sort();
    names.dedup();
    let names = names
        .iter()
        .map(|n| n.parse::<SubjectName>().with_context(|| format!("{n:?} cannot name the control plane's certificate")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let identity = ca.control_plane_identity(&names).context("cannot issue the control plane's certificate")?;
    // Presented through a live identity: the engine reissues it in its last month, and this
    // listener and the connections to agents present the new one without a restart.
    let identity = drover_pki::LiveIdentity::new(&identity)?;
    let config = drover_pki::server_config_optional_client_cert_live(&identity, ca.trusted_ca())?;
    let listener = drover_api::listen(drover_api::agents::router(app.clone()), addr, Tls::Config(Arc::new(config)))
        .await
        .with_context(|| format!("cannot listen on {addr} (agents)"))?;
    let url = match &args.agent_url {
        Some(url) => url.trim_end_matches('/').to_string(),
        None if listener.addr.ip().is_unspecified() && !machine.is_empty() => {
            format!("https://{machine}:{}", listener.addr.port())
        }
        None => format!("https://{}", listener.addr),
    };
    app.engine().set_agent_pki(drover_engine::agents::AgentPki::new(ca, identity, names, url)?);
    Ok(listener)
}

impl Server {
    /// Each listener that is on, with what it serves.
    pub fn endpoints(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![("API", format!("{}/v1", self.listener.url()))];
        if let Some(l) = &self.vro {
            out.push(("VRO", format!("{}/api/v3   (token: POST {}/api/token)", l.url(), l.url())));
        }
        for l in [&self.em, &self.em_http].into_iter().flatten() {
            out.push(("EM", format!("{}/api/   (logon: POST {}/api/sessionMngr/?v=latest, Basic)", l.url(), l.url())));
        }
        if self.agents.is_some()
            && let Some(pki) = self.app.engine().agent_pki()
        {
            out.push((
                "agents",
                format!("{}   (enrolment: drover agent --enroll {} <token>)", pki.enrol_url, pki.enrol_url),
            ));
        }
        if let Some(d) = &self.data {
            out.push(("data", format!("{}   (this machine's cuts, to other agents)", d.local_addr())));
        }
        out
    }

    /// Stops every listener.
    pub async fn stop_listeners(self) {
        for l in [Some(self.listener), self.vro, self.em, self.em_http, self.agents].into_iter().flatten() {
            l.stop().await;
        }
    }

    /// Serves until a listener fails.
    async fn wait(self) -> anyhow::Result<()> {
        let waits =
            [Some(self.listener), self.vro, self.em, self.em_http, self.agents].into_iter().flatten().map(|l| {
                let url = l.url();
                Box::pin(async move { l.wait().await.with_context(|| format!("the listener on {url} failed")) })
            });
        futures::future::select_all(waits).await.0
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let server = start(&args).await?;
    let kind = server.app.engine().hv().kind();
    println!(
        "drover serving on {} (hypervisor: {kind}, store: sqlite at {})",
        server.listener.url(),
        args.data_dir.join("drover.db").display()
    );
    if let Some(p) = &server.generated_admin_password {
        println!("admin password (shown once; set DROVER_ADMIN_PASSWORD to choose it): {p}");
    }
    for (what, url) in server.endpoints().into_iter().skip(1) {
        println!("  {what}: {url}");
    }
    let engine = server.app.engine().clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = server.wait() => r?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // VMs keep running; unfinished sessions resume on the next start.
    engine.shutdown();
    println!("drover stopped; running VMs keep running and are re-attached on the next start");
    Ok(())
}

pub(crate) fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::parse_network;

    #[test]
    fn a_network_declaration_names_a_host_network_safely() {
        assert_eq!(parse_network("lan=br0"), Ok(("lan".into(), "br0".into())));
        assert_eq!(parse_network(" dr lan = virbr-dr.1 "), Ok(("dr lan".into(), "virbr-dr.1".into())));
        assert_eq!(parse_network("default"), Ok(("default".into(), "default".into())));
        for bad in
            ["lan=", "=br0", "lan=../etc", "lan=br 0", "lan=.hidden", "lan=a/b", &format!("lan={}", "x".repeat(65))]
        {
            assert!(parse_network(bad).is_err(), "{bad:?}");
        }
    }
}
