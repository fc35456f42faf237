//! The session engine and the application layer.
//!
//! - [`Engine`] runs operations as sagas ([`saga`]), persists every state change before it is
//!   reported, and on start resumes or unwinds every unfinished session.
//! - [`app::App`] is the application layer every API dialect calls: authentication, roles and
//!   tenants, inventory, and starting operations. Handlers never reach past it.
//! - [`ops`] holds the sagas of the VM operations; [`monitor`] notices VMs that died.
//!
//! The engine knows no HTTP and no SQL: it talks to the store through its facade and to VMs
//! through the [`drover_hv::Hypervisor`] trait.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_agent_api::{AgentError, DatastoreSpec, ErrorKind, HostAgent};
use drover_hv::Hypervisor;
use drover_store::{SessionWrite, Store};
use drover_types::{
    Datastore, Host, LogLevel, Plan, PlanAction, PlanEvent, PlanId, Session, SessionId, SessionKind, SessionState,
    Task, TaskId, TenantId,
};
use tokio::sync::broadcast;

pub mod agents;
pub mod app;
pub mod auth;
mod failback;
mod failover;
mod networks;
pub use drover_agent::host_paths;
pub mod login_guard;
pub mod monitor;
pub mod ops;
mod plan_ops;
mod plan_state;
pub mod replication;
pub mod saga;
pub mod scheduler;
#[cfg(feature = "test-support")]
pub mod testing;

pub use drover_types::{Error, Result};

/// An error of the hypervisor or the data path as a step reports it: unavailable, with its whole
/// chain of causes.
/// An agent's error as the engine's, by its class.
pub(crate) fn agent_error(e: AgentError) -> Error {
    match e.kind {
        ErrorKind::Conflict | ErrorKind::Unsupported => Error::Conflict(e.message),
        ErrorKind::Invalid => Error::InvalidRequest(e.message),
        ErrorKind::Retry | ErrorKind::Gone | ErrorKind::Internal | ErrorKind::Busy => Error::Unavailable(e.message),
    }
}

pub(crate) fn unavailable(e: impl std::error::Error + 'static) -> Error {
    Error::Unavailable(drover_types::error_chain(&e))
}

/// The hypervisor's change tracking (see [`drover_hv::ChangeTracking`]); a conflict naming
/// `what` when it has none.
pub(crate) fn change_tracking<'a>(engine: &'a Engine, what: &str) -> Result<&'a dyn drover_hv::ChangeTracking> {
    engine
        .hv()
        .change_tracking()
        .ok_or_else(|| Error::conflict(format!("{what} needs change tracking, which this hypervisor does not have")))
}
use saga::{ContinueOption, RunOutcome, Saga, TestHooks};

/// Builds a session's saga from its record. Must give the same steps every time for the same
/// session, because a restart rebuilds the saga to resume it.
pub type SagaBuilder = Arc<dyn Fn(&Session, &[Task]) -> Result<Saga> + Send + Sync>;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How long power-on waits for the guest's first heartbeat.
    pub heartbeat_timeout: Duration,
    /// How long a graceful shutdown may take before the VM is powered off.
    pub shutdown_timeout: Duration,
    /// The first wait before a failed step of a task that stands alone (a VM of a replication
    /// run) runs again; each further attempt waits twice as long.
    pub retry_backoff: Duration,
    /// How often the monitor compares VM power states with the hypervisor.
    pub monitor_interval: Duration,
    /// How often the scheduler looks for replication jobs that are due.
    pub scheduler_interval: Duration,
    /// Where replication runs keep their sockets and daemons. Keep it short: unix socket paths
    /// are limited to 107 bytes.
    pub work_dir: std::path::PathBuf,
    /// The host directories requests may reach (datastore roots, import directories). The
    /// default allows none.
    pub host_paths: host_paths::HostPaths,
    /// How long a running transfer waits for an agent that cannot be reached (a restarting
    /// agent, a cut link) before its step fails.
    pub agent_wait: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            heartbeat_timeout: Duration::from_secs(120),
            shutdown_timeout: Duration::from_secs(60),
            retry_backoff: Duration::from_secs(2),
            monitor_interval: Duration::from_secs(5),
            scheduler_interval: Duration::from_secs(5),
            work_dir: std::env::temp_dir().join("drover-work"),
            host_paths: host_paths::HostPaths::default(),
            agent_wait: Duration::from_secs(600),
        }
    }
}

/// A user's request that moves a plan's lifecycle (halt, continue, undo of a halted action),
/// committed together with the write to the session that carries it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanMove {
    pub tenant: TenantId,
    pub plan: PlanId,
    pub action: PlanAction,
}

impl PlanMove {
    async fn commit_with(self, engine: &Engine, write: SessionWrite<'_>) -> Result<()> {
        let noop = || {};
        let change = |p: &mut Plan| {
            p.lifecycle = p.lifecycle.apply(PlanEvent::Requested(self.action), true)?;
            p.updated_at = drover_types::now();
            Ok(())
        };
        engine.store().object_modify_with_session::<Plan, _, _>(self.tenant, self.plan.0, change, write, &noop).await?;
        Ok(())
    }
}

/// A change worth telling watchers about (server-sent events read it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionChanged {
    pub session_id: SessionId,
    pub tenant_id: TenantId,
}

/// A cheap handle; clones share one engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    hv: Arc<dyn Hypervisor>,
    /// The agent of this process's own host (hosts with address `local`).
    local_agent: Arc<dyn HostAgent>,
    agent_pki: std::sync::OnceLock<Arc<agents::AgentPki>>,
    remote: agents::Remote,
    config: EngineConfig,
    changes: broadcast::Sender<SessionChanged>,
    running: Mutex<HashSet<SessionId>>,
    builders: Mutex<HashMap<SessionKind, SagaBuilder>>,
    hooks: TestHooks,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("hypervisor", &self.inner.hv.kind()).finish()
    }
}

impl Engine {
    pub fn new(store: Store, hv: Arc<dyn Hypervisor>, config: EngineConfig) -> Engine {
        let local_agent = Arc::new(drover_agent::LocalAgent::new(hv.clone(), config.work_dir.clone()));
        Engine::with_local_agent(store, hv, config, local_agent)
    }

    /// An engine whose `local` hosts are served by `local_agent` (a `LocalAgent` over `hv` set up
    /// by the caller, e.g. with a data listener; or, in tests, one wrapped to inject faults).
    pub fn with_local_agent(
        store: Store,
        hv: Arc<dyn Hypervisor>,
        config: EngineConfig,
        local_agent: Arc<dyn HostAgent>,
    ) -> Engine {
        let (changes, _) = broadcast::channel(1024);
        let engine = Engine {
            inner: Arc::new(Inner {
                store,
                local_agent,
                agent_pki: std::sync::OnceLock::new(),
                remote: agents::Remote::default(),
                hv,
                config,
                changes,
                running: Mutex::new(HashSet::new()),
                builders: Mutex::new(HashMap::new()),
                hooks: TestHooks::default(),
                tasks: Mutex::new(Vec::new()),
            }),
        };
        ops::register(&engine);
        plan_ops::register(&engine);
        replication::register(&engine);
        failover::register(&engine);
        failback::register(&engine);
        engine
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }
    pub fn hv(&self) -> &Arc<dyn Hypervisor> {
        &self.inner.hv
    }
    /// The agent of the host a datastore is on, with the datastore registered there.
    pub async fn datastore_agent(&self, datastore: &Datastore) -> Result<Arc<dyn HostAgent>> {
        let host = self.store().object_get_any_tenant::<Host>(datastore.host_id.0).await?;
        let agent = self.agent(&host).await?;
        agent
            .datastore_ensure(&DatastoreSpec { id: datastore.id.0, path: datastore.path.clone() })
            .await
            .map_err(agent_error)?;
        Ok(agent)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }
    /// Fault injection for tests; inert unless a test sets it.
    pub fn hooks(&self) -> &TestHooks {
        &self.inner.hooks
    }
    pub fn subscribe(&self) -> broadcast::Receiver<SessionChanged> {
        self.inner.changes.subscribe()
    }

    /// Sets (or replaces, in tests) how sessions of a kind are built.
    pub fn register_saga(&self, kind: SessionKind, builder: SagaBuilder) {
        self.inner.builders.lock().unwrap_or_else(|e| e.into_inner()).insert(kind, builder);
    }

    fn builder(&self, kind: SessionKind) -> Result<SagaBuilder> {
        self.inner
            .builders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&kind)
            .cloned()
            .ok_or_else(|| Error::internal(format!("no saga is registered for {}", kind.as_str())))
    }

    /// Recovers after a start: re-attaches to VMs that outlived the last process, reconciles VM
    /// power states, lands plans and replicas whose in-progress state no unfinished session
    /// carries, and resumes or unwinds every unfinished session. Then starts the monitor.
    pub async fn start(&self) -> Result<()> {
        monitor::reconcile(self).await?;
        monitor::reconcile_plans(self).await?;
        monitor::reconcile_replicas(self).await?;
        let unfinished = self.store().sessions_unfinished().await?;
        for s in unfinished {
            if s.halted {
                tracing::info!(session = %s.id, "session is halted; it waits for Continue or Undo");
                continue;
            }
            tracing::info!(session = %s.id, kind = s.kind.as_str(), "resuming unfinished session");
            self.log(s.id, None, LogLevel::Warning, "resumed after a restart of drover").await;
            self.spawn(s.id, s.kind);
        }
        let engine = self.clone();
        let monitor = tokio::spawn(async move { monitor::run(engine).await });
        let engine = self.clone();
        let scheduler = tokio::spawn(async move { scheduler::run(engine).await });
        let renewals = tokio::spawn(monitor::renew_certificates(self.clone()));
        self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()).extend([monitor, scheduler, renewals]);
        Ok(())
    }

    /// Stops background work (the monitor, the scheduler and certificate renewals). Running sessions are left to finish or to be resumed.
    pub fn shutdown(&self) {
        for h in self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            h.abort();
        }
    }

    /// Records a new session with its tasks and starts running it. Returns at once.
    pub async fn submit(&self, session: Session, tasks: Vec<Task>) -> Result<SessionId> {
        // Build first, so a session whose saga cannot be built is never recorded.
        self.builder(session.kind)?(&session, &tasks)?;
        self.store().session_insert(&session, &tasks).await?;
        self.notify(&session);
        self.spawn(session.id, session.kind);
        Ok(session.id)
    }

    /// Records a new session together with a change of the object it works on (the plan's move
    /// into its in-progress state, the VM's into `Starting`) in one transaction, then starts
    /// running it. A crash at any moment leaves both or neither: never a plan that waits for a
    /// session nobody recorded. `change` may refuse; then nothing is recorded.
    pub async fn submit_with<T, F, R>(
        &self,
        session: Session,
        tasks: Vec<Task>,
        tenant: TenantId,
        object: uuid::Uuid,
        change: F,
    ) -> Result<(T, R)>
    where
        T: drover_store::Entity,
        F: FnMut(&mut T) -> Result<R>,
    {
        self.builder(session.kind)?(&session, &tasks)?;
        let before_commit = self.kill_point_fn(format!("before-commit:{}", session.kind.as_str()));
        let out = self
            .store()
            .object_modify_with_session(tenant, object, change, SessionWrite::Insert(&session, &tasks), &before_commit)
            .await?;
        self.started(&session);
        Ok(out)
    }

    /// Records a new object and the session that works on it (a VM and its create session) in
    /// one transaction, then starts running the session.
    pub async fn submit_with_new<T: drover_store::Entity>(
        &self,
        session: Session,
        tasks: Vec<Task>,
        object: &T,
    ) -> Result<()> {
        self.builder(session.kind)?(&session, &tasks)?;
        let before_commit = self.kill_point_fn(format!("before-commit:{}", session.kind.as_str()));
        self.store().object_insert_with_session(object, &session, &tasks, &before_commit).await?;
        self.started(&session);
        Ok(())
    }

    /// After a session's record committed: tells watchers and starts its runner. A crash before
    /// the runner starts is covered by the resume on the next start.
    fn started(&self, session: &Session) {
        self.hooks().kill_point(&format!("after-commit:{}", session.kind.as_str()));
        self.notify(session);
        self.spawn(session.id, session.kind);
    }

    /// The fault-injection point run inside a transaction just before it commits.
    fn kill_point_fn(&self, point: String) -> impl Fn() + Send + Sync + use<> {
        let engine = self.clone();
        move || engine.hooks().kill_point(&point)
    }

    /// Runs a session's saga in the background unless it already runs.
    fn spawn(&self, id: SessionId, kind: SessionKind) {
        {
            let mut running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
            if !running.insert(id) {
                return;
            }
        }
        let engine = self.clone();
        tokio::spawn(async move {
            let outcome = engine.run_now(id, kind).await;
            engine.inner.running.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            match outcome {
                Ok(o) => tracing::debug!(session = %id, ?o, "session runner returned"),
                Err(e) => {
                    // The store failed under us; the session stays unfinished and is resumed on
                    // the next start.
                    tracing::error!(session = %id, error = %e, "session runner stopped");
                }
            }
        });
    }

    async fn run_now(&self, id: SessionId, kind: SessionKind) -> Result<RunOutcome> {
        let session = self.store().session_get(None, id).await?;
        let tasks = self.store().tasks_of(id).await?;
        let saga = self.builder(kind)?(&session, &tasks)?;
        saga::run(self, id, saga).await
    }

    /// Runs a session in the caller's task and waits for it (tests, and the CLI's lab).
    pub async fn run_to_end(&self, id: SessionId) -> Result<RunOutcome> {
        let session = self.store().session_get(None, id).await?;
        self.run_now(id, session.kind).await
    }

    pub fn is_running(&self, id: SessionId) -> bool {
        self.inner.running.lock().unwrap_or_else(|e| e.into_inner()).contains(&id)
    }

    /// Waits until a session stops or halts, or the timeout passes. Returns the last record.
    pub async fn wait(&self, id: SessionId, timeout: Duration) -> Result<Session> {
        let mut rx = self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = self.store().session_get(None, id).await?;
            if s.state == SessionState::Stopped || (s.halted && !self.is_running(id)) {
                return Ok(s);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(Error::Unavailable(format!("session {id} did not finish within {timeout:?}")));
            }
            // Wake on any change, and poll now and then in case a notification was missed.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(250)), rx.recv()).await;
        }
    }

    /// Asks a running session to halt after its running step.
    pub async fn halt(&self, id: SessionId) -> Result<()> {
        self.halt_moving(id, None).await
    }

    /// [`Engine::halt`] of a plan's session, with the plan's move to `Halting` in the same
    /// transaction as the halt request (a crash between the two would leave a plan `Halting`
    /// whose session never hears of the halt, finishes, and leaves the plan stuck).
    pub async fn plan_halt(&self, id: SessionId, plan: PlanMove) -> Result<()> {
        self.halt_moving(id, Some(plan)).await
    }

    async fn halt_moving(&self, id: SessionId, plan: Option<PlanMove>) -> Result<()> {
        match plan {
            Some(m) => {
                m.commit_with(self, SessionWrite::RequestHalt(id)).await?;
            }
            None => {
                if !self.store().session_request_halt(id).await? {
                    return Err(Error::conflict(format!("session {id} has already stopped")));
                }
            }
        }
        let s = self.store().session_get(None, id).await?;
        self.log(id, None, LogLevel::Warning, "halt requested: the running step finishes first").await;
        self.notify(&s);
        Ok(())
    }

    /// Goes on with a halted session.
    pub async fn resume(&self, id: SessionId, option: ContinueOption) -> Result<()> {
        self.resume_moving(id, option, None).await
    }

    /// [`Engine::resume`] of a plan's session, with the plan's move back to the interrupted
    /// action committed together with the session's `halted = false`, before the runner starts
    /// (the runner's last step expects the plan in that state).
    pub async fn plan_resume(&self, id: SessionId, option: ContinueOption, plan: PlanMove) -> Result<()> {
        self.resume_moving(id, option, Some(plan)).await
    }

    async fn resume_moving(&self, id: SessionId, option: ContinueOption, plan: Option<PlanMove>) -> Result<()> {
        let mut s = self.store().session_get(None, id).await?;
        if !s.halted || s.state == SessionState::Stopped || self.is_running(id) {
            return Err(Error::conflict(format!("session {id} is not halted")));
        }
        let tasks = self.store().tasks_of(id).await?;
        let saga = self.builder(s.kind)?(&s, &tasks)?;
        saga::apply_continue(self, id, &saga, option).await?;
        s.halted = false;
        s.failure_message = None;
        self.session_save_moving(&s, plan).await?;
        self.log(id, None, LogLevel::Info, &format!("continuing: {option:?}")).await;
        self.spawn(id, s.kind);
        Ok(())
    }

    /// Unwinds a halted session: every step that had effects is undone.
    pub async fn undo(&self, id: SessionId) -> Result<()> {
        self.undo_moving(id, None).await
    }

    /// [`Engine::undo`] of a plan's session, with the plan's move to the undo of the interrupted
    /// action in the same transaction as the session's undo request.
    pub async fn plan_undo(&self, id: SessionId, plan: PlanMove) -> Result<()> {
        self.undo_moving(id, Some(plan)).await
    }

    async fn undo_moving(&self, id: SessionId, plan: Option<PlanMove>) -> Result<()> {
        let mut s = self.store().session_get(None, id).await?;
        if !s.halted || s.state == SessionState::Stopped || self.is_running(id) {
            return Err(Error::conflict(format!("session {id} is not halted")));
        }
        if let Some(obj) = s.params.as_object_mut() {
            obj.insert("_undo".into(), serde_json::Value::Bool(true));
        }
        s.halted = false;
        self.session_save_moving(&s, plan).await?;
        self.log(id, None, LogLevel::Warning, "undo requested").await;
        self.spawn(id, s.kind);
        Ok(())
    }

    /// Persists a session, then tells watchers. The order is the invariant: nobody hears of a
    /// state that is not stored.
    pub async fn session_save(&self, s: &Session) -> Result<()> {
        self.store().session_update(s).await?;
        self.notify(s);
        Ok(())
    }

    /// [`Engine::session_save`], with a plan's move in the same transaction when there is one.
    async fn session_save_moving(&self, s: &Session, plan: Option<PlanMove>) -> Result<()> {
        match plan {
            Some(m) => m.commit_with(self, SessionWrite::Update(s)).await?,
            None => self.store().session_update(s).await?,
        }
        self.notify(s);
        Ok(())
    }

    fn notify(&self, s: &Session) {
        let _ = self.inner.changes.send(SessionChanged { session_id: s.id, tenant_id: s.tenant_id });
    }

    /// Appends to a session's log. A log write that fails is reported in the process log but does
    /// not fail the operation.
    pub async fn log(&self, session: SessionId, task: Option<TaskId>, level: LogLevel, message: &str) {
        match level {
            LogLevel::Error => tracing::warn!(%session, "{message}"),
            _ => tracing::info!(%session, "{message}"),
        }
        if let Err(e) = self.store().log_append(session, task, level, message).await {
            tracing::error!(%session, error = %e, "cannot write the session log");
        }
        if let Ok(s) = self.store().session_get(None, session).await {
            self.notify(&s);
        }
    }
}
