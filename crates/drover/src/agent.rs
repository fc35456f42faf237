//! `drover agent`: the agent of one hypervisor host. It owns the host's datastores and serves
//! the agent API (`drover_agent::server`) to the control plane over HTTPS with mutual TLS.
//!
//! First start: `drover agent --enroll <url> <token>` with the one-time token the administrator
//! got from `POST /v1/hosts/{id}/enrolment`. The agent makes its key, sends a certificate request
//! with the token to the control plane (trusting it only if its CA has the fingerprint the token
//! pins), and installs the certificate it gets back in `<data-dir>/identity`. Later starts load
//! that identity; `--enroll` is then refused unless `--re-enroll` says to replace it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use drover_agent::LocalAgent;
use drover_agent::host_paths::HostPaths;
use drover_agent::identity::IdentityKeeper;
use drover_agent::peer::DataListener;
use drover_hv::Hypervisor;
use drover_hv::qemu::{Accel, QemuConfig, QemuDriver};
use drover_pki::{AgentIdentity, PresentedToken};

use crate::serve::{AccelArg, HypervisorArgs, HypervisorKind};

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Where the agent keeps its identity (key and certificate), work files and, by default,
    /// its datastores.
    #[arg(long, env = "DROVER_AGENT_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// Address of the agent API (HTTPS, mutual TLS: only the control plane that enrolled the
    /// agent may call).
    #[arg(long, env = "DROVER_AGENT_LISTEN", default_value = "127.0.0.1:8445")]
    pub listen: SocketAddr,
    /// Enrol with the control plane first: its agent URL (`https://host:port`) and the one-time
    /// token from `POST /v1/hosts/{id}/enrolment` (or `drover host enrol`).
    #[arg(long, num_args = 2, value_names = ["URL", "TOKEN"])]
    pub enroll: Option<Vec<String>>,
    /// With `--enroll`: replace an identity this agent already has.
    #[arg(long, requires = "enroll")]
    pub re_enroll: bool,
    /// Enrol, then exit instead of serving.
    #[arg(long, requires = "enroll")]
    pub enroll_only: bool,
    #[command(flatten)]
    pub hv: HypervisorArgs,
    /// A directory under which the control plane may create datastores on this host (repeat
    /// it, or separate with commas). Default: `<data-dir>/datastores`.
    #[arg(long = "datastore-root", env = "DROVER_AGENT_DATASTORE_ROOTS", value_delimiter = ',')]
    pub datastore_roots: Vec<PathBuf>,
    /// A directory of this host that disk images to import and boot files (kernel, initrd) of
    /// its VMs may come from (repeat it, or separate with commas). Default: none, so VMs on
    /// this host start with empty disks and boot from them.
    #[arg(long = "import-dir", env = "DROVER_AGENT_IMPORT_DIRS", value_delimiter = ',')]
    pub import_dirs: Vec<PathBuf>,
    /// Address of the agent-to-agent data listener (mutual TLS: only agents enrolled with the
    /// same control plane may pull this host's cuts). Without it, cuts are read on this host only.
    #[arg(long, env = "DROVER_AGENT_DATA_LISTEN")]
    pub data_listen: Option<SocketAddr>,
    /// `host:port` other agents reach the data listener at. Default: `--data-listen`.
    #[arg(long, env = "DROVER_AGENT_DATA_ADVERTISE", requires = "data_listen")]
    pub data_advertise: Option<String>,
    /// The most this agent sends to other agents, all transfers together, per second
    /// (`100MiB`, `1GiB`, or bytes). Default: no cap.
    #[arg(long, env = "DROVER_AGENT_BANDWIDTH_CAP", value_parser = parse_rate, requires = "data_listen")]
    pub bandwidth_cap: Option<u64>,
    /// How many connections a transfer from another agent is pulled over at most (a small disk
    /// gets fewer).
    #[arg(long, env = "DROVER_AGENT_DATA_STREAMS", default_value_t = 8,
        value_parser = clap::value_parser!(u16).range(1..=drover_agent::peer::MAX_STREAMS as i64))]
    pub data_streams: u16,
}

/// A rate in bytes per second: a number with an optional KiB/MiB/GiB suffix.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("/s");
    let (num, mult) = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        .iter()
        .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n, *m)))
        .unwrap_or((t, 1));
    let n: u64 = num.trim().parse().map_err(|_| format!("{s:?} is not a rate like 100MiB or 1GiB (per second)"))?;
    match n.checked_mul(mult) {
        Some(0) => Err("a bandwidth cap must be more than 0".into()),
        Some(v) => Ok(v),
        None => Err(format!("{s:?} is too large")),
    }
}

pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(h) => std::path::Path::new(&h).join(".local/share/drover-agent"),
        None => PathBuf::from("/var/lib/drover-agent"),
    }
}

/// What the control plane answers an enrolment with (`drover_api::agents::EnrolResponse`).
#[derive(Debug, serde::Deserialize)]
struct EnrolResponse {
    certificate_pem: String,
    ca_pem: String,
}

/// Enrols the agent whose identity lives in `dir` with the control plane at `url`.
pub async fn enrol(dir: &std::path::Path, url: &str, token: &str) -> anyhow::Result<AgentIdentity> {
    let url = url.trim_end_matches('/');
    if !url.starts_with("https://") {
        bail!("the control plane's agent URL must be https://host:port, not {url:?}");
    }
    let presented = PresentedToken::parse(token).context("the enrolment token")?;
    let pending = AgentIdentity::generate(dir).context("cannot make the agent's key")?;
    let tls = drover_pki::enrolment_client_config(&presented.ca_fingerprint())?;
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .context("enrolment client")?;
    let response = http
        .post(format!("{url}/agent/v1/enrol"))
        .json(&serde_json::json!({ "token": token.trim(), "csr_pem": pending.csr_pem() }))
        .send()
        .await
        .with_context(|| {
            format!("cannot reach the control plane at {url} (or its certificate is not from the CA the token names)")
        })?;
    let status = response.status();
    let body = bounded_body(response).await?;
    if !status.is_success() {
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let message = body["message"].as_str().unwrap_or("no message").to_string();
        bail!("the control plane refused the enrolment ({status}): {message}");
    }
    let answer: EnrolResponse = serde_json::from_slice(&body).context("the control plane's enrolment answer")?;
    // The CA we were pinned to must be the one that signed us.
    drover_pki::TrustedCa::from_pem_pinned(&answer.ca_pem, &presented.ca_fingerprint())
        .context("the control plane answered with another CA than its token names")?;
    Ok(pending.install(&answer.certificate_pem, &answer.ca_pem)?)
}

/// The largest enrolment answer read: a certificate and a CA are a few KiB.
const MAX_ENROL_ANSWER: usize = 256 << 10;

/// A response's body, read chunk by chunk and refused past [`MAX_ENROL_ANSWER`] before it is
/// held whole.
async fn bounded_body(mut response: reqwest::Response) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.context("reading the enrolment answer")? {
        if body.len() + chunk.len() > MAX_ENROL_ANSWER {
            bail!("the control plane's enrolment answer is larger than {MAX_ENROL_ANSWER} bytes");
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The hypervisor driver an agent (or `drover serve`) runs VMs with.
pub fn hypervisor(args: &HypervisorArgs, run_dir: PathBuf) -> anyhow::Result<Arc<dyn Hypervisor>> {
    let accel = args.accel;
    Ok(match args.hypervisor {
        HypervisorKind::Qemu => {
            let mut config = QemuConfig::new(run_dir);
            config.accel = match accel {
                AccelArg::Tcg => Accel::Tcg,
                AccelArg::Kvm => Accel::Kvm,
                AccelArg::Auto => Accel::Auto,
            };
            if let Some(dir) = &args.guest_dir {
                config.kvm_probe_guest = drover_hv::qemu::TinyGuest::load(dir).ok().map(|g| g.boot_spec());
            }
            if crate::serve::which("qemu-system-x86_64").is_none() {
                bail!(
                    "qemu-system-x86_64 is not installed: run scripts/install-deps (or use --hypervisor simulated for a demo without VMs)"
                );
            }
            config.bridges = args.networks.iter().cloned().collect();
            Arc::new(QemuDriver::new(config))
        }
        HypervisorKind::Libvirt => {
            let mut driver = drover_hv::libvirt::LibvirtDriver::new(&args.libvirt_uri, run_dir);
            // The domains drover defines (replicas) run under KVM only when asked: `auto` is TCG
            // here, as KVM is not probed through libvirt.
            driver.set_kvm(accel == AccelArg::Kvm);
            driver.set_networks(args.networks.iter().cloned().collect());
            Arc::new(driver)
        }
        HypervisorKind::Simulated => {
            tracing::warn!("SIMULATED hypervisor: no VM really runs; for tests and demos only");
            let sim = drover_hv::sim::SimulatedHypervisor::new();
            let names: Vec<(&str, bool)> = args.networks.iter().map(|(n, _)| (n.as_str(), true)).collect();
            sim.set_networks(&names);
            Arc::new(sim)
        }
    })
}

/// A running agent.
#[derive(Debug)]
pub struct RunningAgent {
    pub identity: AgentIdentity,
    pub addr: SocketAddr,
    /// The agent-to-agent data listener, when the agent serves one.
    pub data: Option<DataListener>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningAgent {
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
    pub async fn wait(self) -> anyhow::Result<()> {
        // The data listener serves as long as the agent API does.
        let _data = self.data;
        self.task.await.context("the agent listener")?.context("the agent listener failed")
    }
}

/// The agent's identity: enrolled now when `--enroll` says so (refused over an existing one
/// unless `--re-enroll`), else the one enrolled before. Sets the umask and makes the data
/// directory first: everything the agent writes is private.
async fn identity(args: &AgentArgs) -> anyhow::Result<AgentIdentity> {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    drover_agent::host_paths::create_private_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create the data directory {}", args.data_dir.display()))?;
    let identity_dir = args.data_dir.join("identity");
    match &args.enroll {
        Some(v) => {
            let [url, token] = v.as_slice() else { bail!("--enroll takes the control plane's URL and a token") };
            if AgentIdentity::load(&identity_dir).is_ok() && !args.re_enroll {
                bail!(
                    "this agent is already enrolled ({}); add --re-enroll to replace its identity",
                    identity_dir.display()
                );
            }
            let identity = enrol(&identity_dir, url, token).await?;
            println!("enrolled as host {}", identity.host_id());
            Ok(identity)
        }
        None => AgentIdentity::load(&identity_dir).with_context(|| {
            format!(
                "this agent has no identity in {}: enrol it first (drover agent --enroll <url> <token>)",
                identity_dir.display()
            )
        }),
    }
}

/// Enrols if asked, then serves the agent API.
pub async fn start(args: &AgentArgs) -> anyhow::Result<RunningAgent> {
    let identity = identity(args).await?;
    let roots = if args.datastore_roots.is_empty() {
        vec![args.data_dir.join("datastores")]
    } else {
        args.datastore_roots.clone()
    };
    let roots = HostPaths::new(&roots, &args.import_dirs).context("bad --datastore-root or --import-dir")?;
    let hv = hypervisor(&args.hv, args.data_dir.join("run"))?;
    // Every TLS config presents the identity the keeper holds, so a certificate the control
    // plane renews is presented from the next handshake on, on every listener and connection.
    let keeper = Arc::new(IdentityKeeper::new(identity.clone())?);
    // Other agents are dialled (to pull their cuts) with this agent's identity, and trusted only
    // with a certificate from the same CA.
    let peer_tls = drover_pki::client_config_live(keeper.live(), identity.trusted_ca())?;
    let mut agent = LocalAgent::new(hv, args.data_dir.join("work"));
    // The thaw watchdog outlives this process: it is this very binary.
    if let Ok(exe) = std::env::current_exe() {
        agent = agent.with_thaw_watchdog(exe);
    }
    let agent = agent
        .with_datastore_roots(roots)
        .with_peer_tls(peer_tls)
        .with_global_bandwidth_cap(args.bandwidth_cap)
        .with_peer_streams(drover_agent::peer::PeerStreams {
            streams: args.data_streams,
            ..drover_agent::peer::PeerStreams::default()
        });
    // A guest a killed earlier run left frozen is thawed before anything else happens.
    let thawed = agent.thaw_leftover_freezes().await;
    if thawed > 0 {
        tracing::warn!(thawed, "thawed guests frozen when the agent last stopped");
    }
    let config = drover_pki::server_config_requiring_client_cert_live(keeper.live(), identity.trusted_ca())?;
    let data = match args.data_listen {
        Some(bind) => {
            if bind.ip().is_unspecified() && args.data_advertise.is_none() {
                bail!(
                    "--data-listen {bind} is a wildcard address: say where other agents reach it with --data-advertise"
                );
            }
            let name = drover_pki::agent_dns_name(identity.host_id());
            let listener = agent
                .serve_data(bind, args.data_advertise.clone(), name, Some(config.clone()))
                .await
                .with_context(|| format!("cannot listen for other agents on {bind}"))?;
            println!("serving cuts to other agents on {}", listener.local_addr());
            Some(listener)
        }
        None => None,
    };
    let listener =
        std::net::TcpListener::bind(args.listen).with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(drover_agent::server::serve_tls(listener, Arc::new(agent), Arc::new(config), Some(keeper)));
    Ok(RunningAgent { identity, addr, data, task })
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    if args.enroll_only {
        identity(&args).await?;
        println!("start the agent with: drover agent --data-dir {}", args.data_dir.display());
        return Ok(());
    }
    let agent = start(&args).await?;
    println!("drover agent for host {} serving on {}", agent.identity.host_id(), agent.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = agent.wait() => r?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("drover agent stopped; running VMs keep running");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates_read_with_binary_suffixes_and_refuse_nonsense() {
        assert_eq!(parse_rate("100MiB"), Ok(100 << 20));
        assert_eq!(parse_rate("1GiB/s"), Ok(1 << 30));
        assert_eq!(parse_rate("4096"), Ok(4096));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("99999999999GiB").is_err());
    }
}
