//! The command-line client: every command except `serve` talks to a drover server over its
//! native API (`/v1`).
//!
//! Output is either human (tables, `key: value` blocks) or, with `--output json`, the JSON the
//! API answered, byte for byte, on stdout. Anything else a command says (progress, warnings,
//! errors) goes to stderr, so a pipe only ever sees data. Operations that run as sessions are
//! followed to their end unless `--no-wait` is given; see [`follow`].

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use drover_api::views::{Accepted, Page, SessionView};
use drover_types::{SessionResult, SessionState};
use serde::de::DeserializeOwned;
use serde_json::Value;
use uuid::Uuid;

mod api;
mod commands;
mod credentials;
mod follow;
mod render;

use api::{Api, ApiResponse, Connection, Request};
use credentials::CredentialStore;
use render::Table;

const DEFAULT_SERVER: &str = "https://127.0.0.1:8443";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned tables and `key: value` blocks.
    Table,
    /// The JSON the API answered, unchanged.
    Json,
}

/// Options of every client command; they may come before or after the subcommand.
#[derive(Debug, Args)]
pub struct GlobalOpts {
    /// The drover server [default: the server of the saved login, else https://127.0.0.1:8443].
    #[arg(long, env = "DROVER_URL", global = true, help_heading = "Global options", value_name = "URL")]
    pub server: Option<String>,
    /// Accept any server certificate, e.g. a self-signed one. Prefer --ca-cert.
    // Falsey parsing so that DROVER_INSECURE=1/yes/on work, and 0/no/off/false mean no.
    #[arg(long, env = "DROVER_INSECURE", global = true, help_heading = "Global options",
          value_parser = clap::builder::FalseyValueParser::new())]
    pub insecure: bool,
    /// Trust this PEM certificate, e.g. `<data-dir>/tls-cert.pem` made by `drover serve`.
    #[arg(long, env = "DROVER_CA_CERT", global = true, help_heading = "Global options", value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
    /// How results are printed.
    #[arg(
        long,
        env = "DROVER_OUTPUT",
        global = true,
        help_heading = "Global options",
        value_enum,
        default_value = "table"
    )]
    pub output: OutputFormat,
    /// An access token to use instead of the saved login (it is not refreshed).
    #[arg(
        long,
        env = "DROVER_TOKEN",
        global = true,
        help_heading = "Global options",
        value_name = "ACCESS_TOKEN",
        hide_env_values = true,
        // An access token is base64url: one in 64 starts with '-'.
        allow_hyphen_values = true
    )]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Log in and save the tokens for the following commands.
    Login(commands::LoginArgs),
    /// Forget the saved login.
    Logout,
    /// Sites: production or disaster recovery.
    #[command(subcommand)]
    Site(commands::SiteCommand),
    /// Hosts that run VMs.
    #[command(subcommand)]
    Host(commands::HostCommand),
    /// Datastores: directories on a host that hold disk images.
    #[command(subcommand)]
    Datastore(commands::DatastoreCommand),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(commands::VmCommand),
    /// Replication jobs.
    #[command(subcommand)]
    Job(commands::JobCommand),
    /// Replicas on the recovery side and their restore points.
    #[command(subcommand)]
    Replica(commands::ReplicaCommand),
    /// Recovery locations for plans.
    #[command(subcommand)]
    Location(commands::LocationCommand),
    /// Failover plans and their actions.
    #[command(subcommand)]
    Plan(commands::PlanCommand),
    /// Sessions: the record and progress of every operation.
    #[command(subcommand)]
    Session(commands::SessionCommand),
    /// Users of this tenant (administrators).
    #[command(subcommand)]
    User(commands::UserCommand),
    /// Tenants (administrators of the system tenant).
    #[command(subcommand)]
    Tenant(commands::TenantCommand),
    /// The audit log, newest first: logins, lockouts and every change (administrators).
    Audit(commands::AuditArgs),
}

// `--no-wait` for commands that start a session. (A `//` comment: clap would show a doc comment
// as the help of the commands that flatten it.)
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Return at once with the session id instead of following the session.
    #[arg(long)]
    pub no_wait: bool,
}

pub async fn run(cmd: ClientCommand, global: &GlobalOpts) -> anyhow::Result<()> {
    let store = CredentialStore::from_env()?;
    let conn = connection(global, &store)?;
    match cmd {
        ClientCommand::Login(args) => commands::login(args, &conn, &store, global.output).await,
        ClientCommand::Logout => commands::logout(&store, global.output),
        cmd => {
            let ctx = Ctx { api: Api::new(&conn, global.token.clone(), store)?, output: global.output };
            commands::dispatch(&ctx, cmd).await
        }
    }
}

/// The server to talk to: `--server`, else the saved login's, else the default.
fn connection(global: &GlobalOpts, store: &CredentialStore) -> anyhow::Result<Connection> {
    let server = match &global.server {
        Some(s) => s.clone(),
        // A damaged credentials file is reported when it is used, not here.
        None => store.load().ok().flatten().map(|c| c.server).unwrap_or_else(|| DEFAULT_SERVER.to_string()),
    };
    Ok(Connection {
        server: api::normalize_server(&server)?,
        insecure: global.insecure,
        ca_cert: global.ca_cert.clone(),
    })
}

/// Writes to stdout. A closed pipe (`drover vm list | head -1`) ends the output quietly instead
/// of panicking the way `print!` does.
fn emit(text: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let result = out.write_all(text).and_then(|()| {
        if !text.ends_with(b"\n") {
            out.write_all(b"\n")?;
        }
        out.flush()
    });
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to stdout"),
    }
}

/// What every command that talks to the server needs.
#[derive(Debug)]
pub struct Ctx {
    api: Api,
    output: OutputFormat,
}

impl Ctx {
    fn json(&self) -> bool {
        self.output == OutputFormat::Json
    }

    /// Prints an answer: raw in JSON mode, else parsed and rendered.
    fn show<T: DeserializeOwned>(&self, resp: &ApiResponse, render: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
        if self.json() {
            return emit(&resp.body);
        }
        emit(render(&resp.parse::<T>()?).as_bytes())
    }

    async fn get<T: DeserializeOwned>(&self, path: &str, render: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
        let resp = self.api.send(Request::get(path)).await?;
        self.show(&resp, render)
    }

    async fn list<T: DeserializeOwned>(
        &self,
        req: Request<'_>,
        what: &str,
        table: impl FnOnce(&Page<T>) -> Table,
    ) -> anyhow::Result<()> {
        let resp = self.api.send(req).await?;
        if self.json() {
            return emit(&resp.body);
        }
        let t = table(&resp.parse::<Page<T>>()?);
        if t.is_empty() {
            eprintln!("no {what}");
            Ok(())
        } else {
            emit(t.render().as_bytes())
        }
    }

    async fn create<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Value,
        render: impl FnOnce(&T) -> String,
    ) -> anyhow::Result<()> {
        let resp = self.api.send(Request::post(path).json(body)).await?;
        self.show(&resp, render)
    }

    /// `PATCH path` with `body`; prints the updated object.
    async fn update<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Value,
        render: impl FnOnce(&T) -> String,
    ) -> anyhow::Result<()> {
        let resp = self.api.send(Request::new(reqwest::Method::PATCH, path).json(body)).await?;
        self.show(&resp, render)
    }

    /// A delete answered with 204: nothing to print in JSON mode, a confirmation otherwise.
    async fn delete(&self, path: &str, what: &str, id: Uuid) -> anyhow::Result<()> {
        self.api.send(Request::delete(path)).await?;
        if !self.json() {
            emit(format!("deleted {what} {id}").as_bytes())?;
        }
        Ok(())
    }

    /// Sends a request answered by `202 {"session_id": ...}` and follows that session.
    async fn start(&self, req: Request<'_>, wait: &WaitArgs) -> anyhow::Result<Option<SessionView>> {
        let resp = self.api.send(req).await?;
        self.started(&resp, wait).await
    }

    /// Follows the session named by a `202 {"session_id": ...}` answer, or with `--no-wait`
    /// prints it.
    async fn started(&self, resp: &ApiResponse, wait: &WaitArgs) -> anyhow::Result<Option<SessionView>> {
        let accepted: Accepted = resp.parse()?;
        if wait.no_wait {
            if self.json() {
                emit(&resp.body)?;
            } else {
                let id = accepted.session_id;
                emit(format!("session {id} started; follow it with `drover session watch {id}`").as_bytes())?;
            }
            return Ok(None);
        }
        self.follow(accepted.session_id, Expect::Completion).await.map(Some)
    }

    /// Follows a session to its end, prints it, and fails when it failed (or halted, unless a
    /// halt is what was asked for).
    async fn follow(&self, id: Uuid, expect: Expect) -> anyhow::Result<SessionView> {
        let outcome = follow::follow(&self.api, id, follow::Display::choose(self.json())).await?;
        let s = outcome.session;
        if self.json() {
            emit(&outcome.raw)?;
        } else {
            let result = if s.halted { "Halted".to_string() } else { render::wire_name(&s.result) };
            let kind = render::wire_name(&s.kind);
            emit(format!("{kind} {}: {result} ({}%), session {}", s.name, s.progress, s.id).as_bytes())?;
        }
        let why = s.failure_message.as_deref().unwrap_or("no reason given");
        if s.state == SessionState::Stopped && s.result == SessionResult::Failed {
            bail!("session {} ({}) failed: {why}", s.id, s.name);
        }
        if s.halted && expect != Expect::Halt {
            bail!(
                "session {} ({}) halted: {why}; go on with `drover session continue {}` or undo with `drover session undo {}`",
                s.id,
                s.name,
                s.id,
                s.id
            );
        }
        if s.result == SessionResult::Warning {
            eprintln!(
                "warning: session {} finished with warnings{}",
                s.id,
                match &s.failure_message {
                    Some(m) => format!(": {m}"),
                    None => String::new(),
                }
            );
        }
        Ok(s)
    }
}

/// What a followed session is meant to reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Completion,
    Halt,
}

/// Reads a password from the terminal without echo; refuses when there is no terminal to ask.
fn prompt_password(prompt: &str, hint: &str) -> anyhow::Result<String> {
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        bail!("no password given and no terminal to ask on: {hint}");
    }
    let term = console::Term::stderr();
    term.write_str(prompt).context("cannot write the password prompt")?;
    let password = term.read_secure_line().context("cannot read the password")?;
    if password.is_empty() {
        bail!("the password is empty");
    }
    Ok(password)
}

/// Reads a file, or stdin for `-` (for `plan create/update --file`).
fn read_input_file(path: &std::path::Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read stdin")
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        global: super::GlobalOpts,
    }

    /// A token is base64url: it may start with '-' and is still the token's value.
    #[test]
    fn a_token_may_start_with_a_hyphen() {
        let cli = Cli::try_parse_from(["drover", "--token", "-3lgesqbvcsnH5HjGZ9"]).unwrap();
        assert_eq!(cli.global.token.as_deref(), Some("-3lgesqbvcsnH5HjGZ9"));
    }
}
