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
use drover_hv::qemu::{Accel, QemuConfig, QemuDriver};
use drover_store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HypervisorKind {
    /// Real VMs: qemu-system-x86_64 processes controlled over QMP.
    Qemu,
    /// A SIMULATION for tests and demos without QEMU: no VM really runs.
    Simulated,
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
    /// Where drover keeps its database, certificates and VM runtime files.
    #[arg(long, env = "DROVER_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// Address of the native API.
    #[arg(long, env = "DROVER_LISTEN", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Serve plain HTTP instead of HTTPS. Only for a trusted loopback or a TLS-terminating proxy.
    #[arg(long)]
    pub plain_http: bool,
    /// PEM certificate; a self-signed one is generated in the data directory when absent.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "qemu")]
    pub hypervisor: HypervisorKind,
    /// CPU acceleration for QEMU. `auto` uses KVM only when /dev/kvm opens and a probe boot of
    /// the tiny guest under KVM reaches the guest in time (some hosts hang normal guests under
    /// KVM); otherwise, and without the tiny guest to probe with, TCG.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelArg,
    /// The tiny guest (`scripts/build-guest` output), used to probe KVM with `--accel auto`.
    #[arg(long, env = "DROVER_GUEST_DIR")]
    pub guest_dir: Option<PathBuf>,
    /// Seconds to wait for a guest's first heartbeat after power-on.
    #[arg(long, default_value_t = 120)]
    pub heartbeat_timeout_secs: u64,
    /// Seconds a graceful shutdown may take before the VM is powered off.
    #[arg(long, default_value_t = 60)]
    pub shutdown_timeout_secs: u64,
}

pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(h) => Path::new(&h).join(".local/share/drover"),
        None => PathBuf::from("/var/lib/drover"),
    }
}

/// A running control plane.
#[derive(Debug)]
pub struct Server {
    pub app: App,
    pub listener: drover_api::Listener,
    /// The admin password when it was generated on this start.
    pub generated_admin_password: Option<String>,
}

pub async fn start(args: &ServeArgs) -> anyhow::Result<Server> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create the data directory {}", args.data_dir.display()))?;
    let db = args.data_dir.join("drover.db");
    let store = Store::open_sqlite(&db).await.map_err(|e| anyhow::anyhow!("cannot open {}: {e}", db.display()))?;
    let hv: Arc<dyn Hypervisor> = match args.hypervisor {
        HypervisorKind::Qemu => {
            let mut config = QemuConfig::new(args.data_dir.join("run"));
            config.accel = match args.accel {
                AccelArg::Tcg => Accel::Tcg,
                AccelArg::Kvm => Accel::Kvm,
                AccelArg::Auto => Accel::Auto,
            };
            if let Some(dir) = &args.guest_dir {
                config.kvm_probe_guest = drover_hv::qemu::TinyGuest::load(dir).ok().map(|g| g.boot_spec());
            }
            if which("qemu-system-x86_64").is_none() {
                bail!(
                    "qemu-system-x86_64 is not installed: run scripts/install-deps (or use --hypervisor simulated for a demo without VMs)"
                );
            }
            Arc::new(QemuDriver::new(config))
        }
        HypervisorKind::Simulated => {
            tracing::warn!("SIMULATED hypervisor: no VM really runs; for tests and demos only");
            Arc::new(drover_hv::sim::SimulatedHypervisor::new())
        }
    };
    let config = EngineConfig {
        heartbeat_timeout: std::time::Duration::from_secs(args.heartbeat_timeout_secs),
        shutdown_timeout: std::time::Duration::from_secs(args.shutdown_timeout_secs),
        work_dir: args.data_dir.join("work"),
        ..EngineConfig::default()
    };
    let engine = Engine::new(store, hv, config);
    let app = App::new(engine.clone());
    let admin_password = std::env::var("DROVER_ADMIN_PASSWORD").ok();
    let generated_admin_password = app.bootstrap(admin_password).await?;
    engine.start().await?;
    let tls = if args.plain_http {
        Tls::Plain
    } else if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        Tls::Files { cert: cert.clone(), key: key.clone() }
    } else {
        let (cert, key) = drover_api::self_signed(&args.data_dir).context("cannot make a self-signed certificate")?;
        Tls::Files { cert, key }
    };
    let listener = drover_api::listen(drover_api::router(app.clone()), args.listen, tls)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    Ok(Server { app, listener, generated_admin_password })
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
    let engine = server.app.engine().clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = server.listener.wait() => r.context("the API listener failed")?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // VMs keep running; unfinished sessions resume on the next start.
    engine.shutdown();
    println!("drover stopped; running VMs keep running and are re-attached on the next start");
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}
