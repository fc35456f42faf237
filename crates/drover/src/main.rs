//! The `drover` binary: `drover serve` runs the control plane; every other command is a client
//! of its API.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod agent;
mod bench;
mod client;
mod config;
mod lab;
mod serve;

#[derive(Debug, Parser)]
#[command(name = "drover", version, about = "Disaster recovery for KVM/QEMU virtual machines")]
struct Cli {
    #[command(flatten)]
    global: client::GlobalOpts,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane (API, store, session engine) with its local agent.
    Serve(serve::ServeArgs),
    /// Run the agent of a hypervisor host (enrol it first with --enroll URL TOKEN).
    Agent(agent::AgentArgs),
    /// The embedded default on one machine: serve, plus a production and a DR site and small
    /// real VMs running the tiny guest.
    Lab(lab::LabArgs),
    /// Measure the data path against baselines, and the Veeam dialects at scale.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Internal: the detached watchdog an agent starts before it freezes a guest (thaws it a
    /// while after the freeze's bound unless the agent thawed it first).
    #[command(hide = true)]
    ThawWatchdog(ThawWatchdogArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
}

#[derive(Debug, clap::Args)]
struct ThawWatchdogArgs {
    /// The guest agent's socket on the host.
    #[arg(long)]
    socket: std::path::PathBuf,
    /// The agent's record of the freeze; nothing is done unless it still names `--id`.
    #[arg(long)]
    record: std::path::PathBuf,
    #[arg(long)]
    id: String,
    /// How long to wait first, in milliseconds.
    #[arg(long, value_parser = clap::value_parser!(u64).range(..=24 * 3600 * 1000))]
    after_ms: u64,
}

/// The command line, with the defaults of a config file when `serve` or `lab` names one.
fn parse_cli() -> anyhow::Result<Cli> {
    let matches = Cli::command().get_matches();
    for sub in ["serve", "lab"] {
        if let Some(file) = config::named(&matches, sub) {
            let settings = config::read(&file)?;
            let command = config::with_defaults(Cli::command(), sub, &settings, &file)?;
            return Cli::from_arg_matches(&command.get_matches()).map_err(|e| e.exit());
        }
    }
    Cli::from_arg_matches(&matches).map_err(|e| e.exit())
}

fn main() -> std::process::ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG").unwrap_or_else(|_| "warn".into()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Agent(args) => agent::run(args).await,
            Command::Lab(args) => lab::run(args).await,
            Command::Bench(cmd) => bench::run(cmd).await,
            Command::ThawWatchdog(a) => {
                let after = std::time::Duration::from_millis(a.after_ms);
                drover_agent::freeze::run_detached_watchdog(&a.socket, &a.record, &a.id, after)
                    .await
                    .map(drop)
                    .map_err(anyhow::Error::msg)
            }
            Command::Client(cmd) => client::run(cmd, &cli.global).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
