//! Sagas: operations as named, idempotent steps with undo, recorded in the store as they run.
//!
//! A saga is rebuilt from its session record (kind + params + tasks) whenever it runs, so the same
//! step list comes back after a restart. The runner's protocol for step `i`:
//!
//! ```text
//!  record Started (attempts+1) ─▶ run ─ok──▶ record Done(output) ─▶ task progress ─▶ next step
//!                                    └─err─▶ record Failed(error) ─▶ policy: Unwind | Halt
//!  Unwind: for every step that may have had effects, newest first:
//!          record UndoStarted ─▶ undo(output) ─▶ record Undone;  then the session stops Failed.
//!  Halt:   the session stays Working with `halted`; Continue retries or skips, Undo unwinds.
//! ```
//!
//! Every record is written before the effect it describes is reported, so after a crash the runner
//! knows which steps may have run: a step found `Started` is run again (steps are idempotent), a
//! saga found unwinding keeps unwinding. Steps never touch the store themselves except through
//! [`StepCtx`], and report progress through it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;

use async_trait::async_trait;
use drover_types::{
    LogLevel, Session, SessionId, SessionResult, SessionState, StepRecord, StepState, Task, TaskId, weighted_progress,
};
use serde_json::Value;

use crate::{Engine, Error, Result};

/// What a failed step means for the saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Undo everything done so far and stop `Failed` (single-object operations).
    Unwind,
    /// Stop between steps and wait for Continue or Undo (plans: a critical failure halts).
    Halt,
    /// Tasks stand alone (replication: one VM's restore point does not depend on another's). A
    /// critical step that fails is run again up to `retries` times, waiting the engine's
    /// `retry_backoff`, then twice that, and so on; a task whose step still fails has its own steps undone and ends `Failed`,
    /// and the other tasks go on. The session ends `Warning` when some tasks failed, `Failed` when
    /// every task did. A restart finishes an isolation that was under way.
    IsolateTasks { retries: u32 },
}

/// How a halted saga goes on (the options of the Recovery Orchestrator's Continue).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ContinueOption {
    RetryFailedStep,
    ProceedToNextStep,
    RetryFailedVm,
    ProceedToNextVm,
    RetryFailedGroup,
    ProceedToNextGroup,
}

#[async_trait]
pub trait Step: Send + Sync {
    /// Unique within its saga; shown in logs.
    fn name(&self) -> String;

    /// Does the work. Must be idempotent: it may run again after a crash, or after it succeeded.
    /// Returns what later steps and the undo need.
    async fn run(&self, ctx: &StepCtx) -> Result<Value>;

    /// Reverses the work, given what `run` returned (`Null` when it never finished). Idempotent.
    async fn undo(&self, ctx: &StepCtx, output: &Value) -> Result<()>;
}

/// One step in a saga and where it belongs.
pub struct SagaStep {
    /// Index into the session's tasks; `None` for session-wide steps.
    pub task: Option<usize>,
    /// Plan group number, for the group-wide continue options.
    pub group: Option<u32>,
    /// Share of its task's progress.
    pub weight: u32,
    /// A failed non-critical step gives a warning and the saga goes on.
    pub critical: bool,
    pub step: Box<dyn Step>,
}

impl std::fmt::Debug for SagaStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaStep").field("name", &self.step.name()).field("task", &self.task).finish()
    }
}

pub struct Saga {
    pub steps: Vec<SagaStep>,
    pub on_failure: FailurePolicy,
    /// Told when the saga halts (on request or by a critical failure), after the session
    /// records it: e.g. a plan moves to HALTED.
    pub on_halt: Option<Box<dyn HaltHook>>,
    /// Plan group → how many of its tasks run at once. The consecutive steps of such a group
    /// that belong to a task form a parallel block; every other step runs alone, in order.
    pub parallel: HashMap<u32, usize>,
}

impl std::fmt::Debug for Saga {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saga").field("steps", &self.steps).field("on_failure", &self.on_failure).finish()
    }
}

#[async_trait]
pub trait HaltHook: Send + Sync {
    async fn halted(&self, engine: &Engine, session: &Session) -> Result<()>;
}

impl Saga {
    pub fn unwinding(steps: Vec<SagaStep>) -> Saga {
        Saga { steps, on_failure: FailurePolicy::Unwind, on_halt: None, parallel: HashMap::new() }
    }

    /// Where the unit of steps starting at `i` ends (exclusive), and how many of its chains run
    /// at once: a parallel block, or step `i` alone.
    fn block_at(&self, i: usize) -> (usize, usize) {
        let first = &self.steps[i];
        let max = match (first.group, first.task) {
            (Some(g), Some(_)) => self.parallel.get(&g).copied(),
            _ => None,
        };
        let Some(max) = max else { return (i + 1, 1) };
        let end = (i..self.steps.len())
            .find(|&j| self.steps[j].group != first.group || self.steps[j].task.is_none())
            .unwrap_or(self.steps.len());
        (end, max)
    }
}

/// What a step sees while it runs.
pub struct StepCtx {
    pub engine: Engine,
    pub session: Session,
    pub task_id: Option<TaskId>,
    /// Outputs of the steps that are done, by step name.
    pub outputs: HashMap<String, Value>,
}

impl std::fmt::Debug for StepCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepCtx").field("session", &self.session.id).field("task", &self.task_id).finish()
    }
}

impl StepCtx {
    pub async fn log(&self, level: LogLevel, message: impl AsRef<str>) {
        self.engine.log(self.session.id, self.task_id, level, message.as_ref()).await;
    }
}

/// Hooks for the saga tests: make a step fail or "crash" (stop the runner as a killed process
/// would, leaving the step `Started`), and run every step twice to prove idempotence. All off in
/// the product.
pub struct TestHooks {
    pub fail_step: std::sync::Mutex<Option<(String, u32)>>,
    /// Like `fail_step`, but the step runs first: its effects happen and its output is lost.
    pub fail_after_step: std::sync::Mutex<Option<(String, u32)>>,
    pub crash_before_record: std::sync::Mutex<Option<String>>,
    pub run_each_step_twice: std::sync::atomic::AtomicBool,
    /// From `DROVER_TEST_KILL_AFTER_STEP`: the process kills itself with SIGKILL right after this
    /// step ran, before its outcome is recorded — what the fault tests of the real server use.
    pub kill_after: Option<String>,
    /// From `DROVER_TEST_KILL_AT`: the process kills itself with SIGKILL when it reaches this
    /// named point outside a saga step (see [`TestHooks::kill_point`]).
    pub kill_at: Option<String>,
}

impl std::fmt::Debug for TestHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestHooks")
    }
}

impl Default for TestHooks {
    fn default() -> Self {
        TestHooks {
            fail_step: Default::default(),
            fail_after_step: Default::default(),
            crash_before_record: Default::default(),
            run_each_step_twice: Default::default(),
            kill_after: std::env::var("DROVER_TEST_KILL_AFTER_STEP").ok().filter(|s| !s.is_empty()),
            kill_at: std::env::var("DROVER_TEST_KILL_AT").ok().filter(|s| !s.is_empty()),
        }
    }
}

impl TestHooks {
    /// Kills the process (SIGKILL) if `DROVER_TEST_KILL_AT` names this point: the fault tests of
    /// the real server use it for the moments between two writes that a saga step does not cover,
    /// such as `before-commit:PlanFailover` (see [`crate::Engine::submit_with`]).
    pub fn kill_point(&self, point: &str) {
        if self.kill_at.as_deref() == Some(point) {
            eprintln!("DROVER_TEST_KILL_AT: killing this process at {point}");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }
    /// Fails the named step on its `attempt`-th attempt (1-based; 0: every attempt).
    pub fn fail(&self, step: &str, attempt: u32) {
        *self.fail_step.lock().unwrap_or_else(|e| e.into_inner()) = Some((step.to_string(), attempt));
    }
    /// Lets the named step run on its `attempt`-th attempt, then reports it failed.
    pub fn fail_after(&self, step: &str, attempt: u32) {
        *self.fail_after_step.lock().unwrap_or_else(|e| e.into_inner()) = Some((step.to_string(), attempt));
    }
    /// Fails the named step on every attempt.
    pub fn fail_every(&self, step: &str) {
        self.fail(step, 0);
    }
    /// Lets the named step run on every attempt, then reports it failed.
    pub fn fail_after_every(&self, step: &str) {
        self.fail_after(step, 0);
    }
    fn should_fail_after(&self, step: &str, attempt: u32) -> bool {
        let g = self.fail_after_step.lock().unwrap_or_else(|e| e.into_inner());
        matches!(&*g, Some((s, a)) if s == step && (*a == attempt || *a == 0))
    }
    /// Stops the runner right after the named step ran, before its outcome is recorded.
    pub fn crash_after(&self, step: &str) {
        *self.crash_before_record.lock().unwrap_or_else(|e| e.into_inner()) = Some(step.to_string());
    }
    fn should_fail(&self, step: &str, attempt: u32) -> bool {
        let g = self.fail_step.lock().unwrap_or_else(|e| e.into_inner());
        matches!(&*g, Some((s, a)) if s == step && (*a == attempt || *a == 0))
    }
    fn take_crash(&self, step: &str) -> bool {
        let mut g = self.crash_before_record.lock().unwrap_or_else(|e| e.into_inner());
        if g.as_deref() == Some(step) {
            *g = None;
            true
        } else {
            false
        }
    }
}

/// Why the runner returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Finished(SessionResult),
    Halted,
    /// The test hook stopped it as a crash would.
    Crashed,
}

/// Runs (or resumes) a session's saga until it finishes, halts or unwinds.
///
/// Steps run in order, except a parallel block (see [`Saga::parallel`]): the steps of each of its
/// tasks run in order as one chain, and up to the block's maximum chains run at once. A critical
/// failure or a halt request in one chain lets the running steps of the others finish and
/// starts nothing new; the block then fails or halts as one.
pub(crate) async fn run(engine: &Engine, session_id: SessionId, saga: Saga) -> Result<RunOutcome> {
    let mut session = engine.store().session_get(None, session_id).await?;
    if session.state == SessionState::Stopped {
        return Ok(RunOutcome::Finished(session.result));
    }
    let tasks = engine.store().tasks_of(session_id).await?;
    let records = load_records(engine, session_id, &saga).await?;

    if session.state == SessionState::Starting {
        session.state = session.state.apply(drover_types::SessionEvent::Began)?;
        engine.session_save(&session).await?;
        engine.log(session_id, None, LogLevel::Info, &format!("{} started", session.kind.as_str())).await;
    }
    // A session found unwinding (after a crash, or asked to by Undo) keeps unwinding. With
    // isolated tasks, undone steps belong to a task's isolation, not to the session's unwinding.
    let isolating = matches!(saga.on_failure, FailurePolicy::IsolateTasks { .. });
    let unwinding = (!isolating
        && records.iter().any(|r| matches!(r.state, StepState::UndoStarted | StepState::Undone)))
        || session.params.get("_undo").and_then(Value::as_bool) == Some(true);
    if unwinding {
        return unwind(engine, &saga, session, tasks, records, None).await;
    }
    let state = tokio::sync::Mutex::new(RunState { session, tasks, records, warnings: 0 });
    if isolating {
        resume_isolation(engine, &saga, &state).await?;
    }
    let mut i = 0;
    while i < saga.steps.len() {
        let start = i;
        let (end, max) = saga.block_at(i);
        let stop = AtomicBool::new(false);
        let outcome = if end - i == 1 {
            run_chain(engine, &saga, &state, &[i], &stop).await?
        } else {
            run_parallel(engine, &saga, &state, i..end, max, &stop).await?
        };
        i = end;
        let failed_at = match outcome {
            StepEnd::Next => continue,
            StepEnd::Crashed => return Ok(RunOutcome::Crashed),
            StepEnd::HaltRequested => None,
            StepEnd::Failed(at) => Some(at),
        };
        if let (Some(at), FailurePolicy::IsolateTasks { retries }) = (failed_at, saga.on_failure) {
            let backoff = engine.config().retry_backoff;
            let task = saga.steps[at].task;
            let attempts = state.lock().await.records[at].attempts;
            if let Some(t) = task {
                if attempts <= retries {
                    let wait = backoff.saturating_mul(1 << (attempts.saturating_sub(1)).min(16));
                    let name = saga.steps[at].step.name();
                    let (id, task_id) = {
                        let s = state.lock().await;
                        (s.session.id, s.records[at].task_id)
                    };
                    let msg = format!(
                        "step {name} failed (attempt {attempts} of {}): trying again in {} s",
                        retries + 1,
                        wait.as_secs_f64()
                    );
                    engine.log(id, task_id, LogLevel::Warning, &msg).await;
                    tokio::time::sleep(wait).await;
                    let mut s = state.lock().await;
                    let RunState { session, tasks, .. } = &mut *s;
                    session.failure_message = None;
                    retry_task(engine, &mut tasks[t]).await?;
                    i = start;
                    continue;
                }
                isolate_task(engine, &saga, &state, t).await?;
                // The block again: in a parallel block the other tasks' chains stopped early.
                i = start;
                continue;
            }
        }
        let RunState { mut session, tasks, records, .. } = state.into_inner();
        if let (Some(at), FailurePolicy::Unwind | FailurePolicy::IsolateTasks { .. }) = (failed_at, saga.on_failure) {
            return unwind(engine, &saga, session, tasks, records, Some(at)).await;
        }
        // Halt, on request or after a critical failure. Log and tell the hook first, record the
        // halt last: whoever sees the session halted sees its log and its plan complete.
        let task_id = failed_at.and_then(|at| records[at].task_id);
        let why = if failed_at.is_some() {
            "halted after a critical failure; waiting for Continue or Undo"
        } else {
            engine.store().session_clear_halt_request(session_id).await?;
            "halted on request; waiting for Continue or Undo"
        };
        engine.log(session_id, task_id, LogLevel::Warning, why).await;
        if let Some(h) = &saga.on_halt {
            h.halted(engine, &session).await?;
        }
        session.halted = true;
        engine.session_save(&session).await?;
        return Ok(RunOutcome::Halted);
    }
    // Every step is done or skipped. Skipped critical steps (Continue with a proceed option) and
    // failed non-critical ones make a warning.
    let RunState { session, mut tasks, records, warnings } = state.into_inner();
    let skipped = records.iter().filter(|r| r.state == StepState::Skipped).count() as u32;
    let isolated = if isolating { tasks.iter().filter(|t| is_isolated(t)).count() } else { 0 };
    let result = if isolated > 0 && isolated == tasks.len() {
        SessionResult::Failed
    } else if warnings > 0 || skipped > 0 || isolated > 0 {
        SessionResult::Warning
    } else {
        SessionResult::Success
    };
    for t in tasks.iter_mut() {
        if t.state != SessionState::Stopped {
            t.state = SessionState::Stopped;
            if t.result == SessionResult::None {
                t.result = if t.failure_message.is_some() { SessionResult::Warning } else { SessionResult::Success };
            }
            t.progress = 100;
            t.ended_at = Some(drover_types::now());
            engine.store().task_update(t).await?;
        }
    }
    finish(engine, session, result, &tasks).await?;
    Ok(RunOutcome::Finished(result))
}

/// What a run's steps share while they run (several at once in a parallel block).
struct RunState {
    session: Session,
    tasks: Vec<Task>,
    records: Vec<StepRecord>,
    /// Non-critical steps that failed.
    warnings: u32,
}

/// How a step, a chain of steps or a block ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepEnd {
    /// Done, already done, or failed without being critical: go on.
    Next,
    /// A halt was requested; the step did not start.
    HaltRequested,
    /// This critical step failed.
    Failed(usize),
    /// The test hook stopped the run as a crash would.
    Crashed,
}

/// Runs the steps `indices` in order until one does not end [`StepEnd::Next`], or until `stop`
/// says another chain of the block ended so (then nothing new starts here).
async fn run_chain(
    engine: &Engine,
    saga: &Saga,
    state: &tokio::sync::Mutex<RunState>,
    indices: &[usize],
    stop: &AtomicBool,
) -> Result<StepEnd> {
    for &i in indices {
        if stop.load(Ordering::SeqCst) {
            return Ok(StepEnd::Next);
        }
        let end = run_step(engine, saga, state, i).await?;
        if end != StepEnd::Next {
            stop.store(true, Ordering::SeqCst);
            return Ok(end);
        }
    }
    Ok(StepEnd::Next)
}

/// Runs the block `range`: one chain per task, in the order the tasks first appear, up to `max`
/// at once. The block ends as its worst chain: a crash, else the first critical failure in saga
/// order, else a halt request.
async fn run_parallel(
    engine: &Engine,
    saga: &Saga,
    state: &tokio::sync::Mutex<RunState>,
    range: std::ops::Range<usize>,
    max: usize,
    stop: &AtomicBool,
) -> Result<StepEnd> {
    let mut chains: Vec<(Option<usize>, Vec<usize>)> = Vec::new();
    for i in range {
        let task = saga.steps[i].task;
        match chains.iter_mut().find(|(t, _)| *t == task) {
            Some((_, chain)) => chain.push(i),
            None => chains.push((task, vec![i])),
        }
    }
    // Collected first: a lazy iterator of borrowing futures would not be `Send`.
    let runs: Vec<_> = chains.iter().map(|(_, chain)| run_chain(engine, saga, state, chain, stop)).collect();
    let ends: Vec<Result<StepEnd>> = futures::stream::iter(runs).buffer_unordered(max.max(1)).collect().await;
    let ends = ends.into_iter().collect::<Result<Vec<_>>>()?;
    let first_failure = ends.iter().filter_map(|e| if let StepEnd::Failed(i) = e { Some(*i) } else { None }).min();
    Ok(if ends.contains(&StepEnd::Crashed) {
        StepEnd::Crashed
    } else if let Some(i) = first_failure {
        StepEnd::Failed(i)
    } else if ends.contains(&StepEnd::HaltRequested) {
        StepEnd::HaltRequested
    } else {
        StepEnd::Next
    })
}

/// Runs step `i` unless it is done already: records it Started, runs it (outside the lock, so
/// other chains go on meanwhile), records the outcome.
async fn run_step(engine: &Engine, saga: &Saga, state: &tokio::sync::Mutex<RunState>, i: usize) -> Result<StepEnd> {
    let entry = &saga.steps[i];
    let name = entry.step.name();
    let hooks = engine.hooks();
    let (ctx, attempt) = {
        let mut guard = state.lock().await;
        let s = &mut *guard;
        if matches!(s.records[i].state, StepState::Done | StepState::Skipped) {
            return Ok(StepEnd::Next);
        }
        let isolating = matches!(saga.on_failure, FailurePolicy::IsolateTasks { .. });
        if isolating && entry.task.is_some_and(|t| s.tasks.get(t).is_some_and(is_isolated)) {
            return Ok(StepEnd::Next);
        }
        // Halt between steps: the running steps finish, nothing new starts.
        if engine.store().session_get(None, s.session.id).await?.halt_requested {
            return Ok(StepEnd::HaltRequested);
        }
        let task_id = entry.task.and_then(|t| s.tasks.get(t)).map(|t| t.id);
        let rec = &mut s.records[i];
        rec.state = StepState::Started;
        rec.attempts += 1;
        rec.error = None;
        rec.task_id = task_id;
        rec.updated_at = drover_types::now();
        engine.store().step_put(rec).await?;
        if let Some(t) = entry.task {
            task_begin(engine, &mut s.tasks[t]).await?;
        }
        let outputs = outputs_of(saga, &s.records);
        (StepCtx { engine: engine.clone(), session: s.session.clone(), task_id, outputs }, s.records[i].attempts)
    };
    let mut result = if hooks.should_fail(&name, attempt) {
        Err(Error::internal(format!("injected failure in step {name}")))
    } else {
        entry.step.run(&ctx).await
    };
    if result.is_ok() && hooks.run_each_step_twice.load(Ordering::Relaxed) {
        result = entry.step.run(&ctx).await;
    }
    if result.is_ok() && hooks.should_fail_after(&name, attempt) {
        result = Err(Error::internal(format!("injected failure after step {name} ran")));
    }
    if hooks.take_crash(&name) {
        return Ok(StepEnd::Crashed);
    }
    if hooks.kill_after.as_deref() == Some(name.as_str()) {
        eprintln!("DROVER_TEST_KILL_AFTER_STEP: killing this process after step {name}");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    let mut guard = state.lock().await;
    let s = &mut *guard;
    let rec = &mut s.records[i];
    rec.updated_at = drover_types::now();
    let err = match result {
        Ok(output) => {
            rec.state = StepState::Done;
            rec.output = output;
            engine.store().step_put(rec).await?;
            if let Some(t) = entry.task {
                task_progress(engine, saga, &s.records, &mut s.tasks, t).await?;
            }
            session_progress(engine, &mut s.session, &s.tasks).await?;
            return Ok(StepEnd::Next);
        }
        Err(err) => err,
    };
    let msg = err.to_string();
    rec.state = StepState::Failed;
    rec.error = Some(msg.clone());
    engine.store().step_put(rec).await?;
    engine.log(s.session.id, ctx.task_id, LogLevel::Error, &format!("step {name} failed: {msg}")).await;
    if !entry.critical {
        s.warnings += 1;
        rec.state = StepState::Skipped;
        engine.store().step_put(rec).await?;
        if let Some(t) = entry.task {
            s.tasks[t].failure_message = Some(msg);
            task_progress(engine, saga, &s.records, &mut s.tasks, t).await?;
        }
        return Ok(StepEnd::Next);
    }
    if let Some(t) = entry.task {
        s.tasks[t].failure_message = Some(msg.clone());
        s.tasks[t].result = SessionResult::Failed;
        engine.store().task_update(&s.tasks[t]).await?;
    }
    s.session.failure_message = Some(format!("{name}: {msg}"));
    Ok(StepEnd::Failed(i))
}

/// Undoes, newest first, every step that may have had effects, then stops the session `Failed`.
async fn unwind(
    engine: &Engine,
    saga: &Saga,
    mut session: Session,
    mut tasks: Vec<Task>,
    mut records: Vec<StepRecord>,
    failed_at: Option<usize>,
) -> Result<RunOutcome> {
    let hooks = engine.hooks();
    if let Some(i) = failed_at {
        engine
            .log(session.id, None, LogLevel::Warning, &format!("undoing after {} failed", saga.steps[i].step.name()))
            .await;
    }
    let mut undo_errors = Vec::new();
    for i in (0..saga.steps.len()).rev() {
        let state = records[i].state;
        if !matches!(state, StepState::Started | StepState::Done | StepState::Failed | StepState::UndoStarted) {
            continue;
        }
        let entry = &saga.steps[i];
        let name = entry.step.name();
        let rec = &mut records[i];
        rec.state = StepState::UndoStarted;
        rec.updated_at = drover_types::now();
        engine.store().step_put(rec).await?;
        let task_id = rec.task_id;
        let ctx =
            StepCtx { engine: engine.clone(), session: session.clone(), task_id, outputs: outputs_of(saga, &records) };
        let output = records[i].output.clone();
        let mut result = entry.step.undo(&ctx, &output).await;
        if result.is_ok() && hooks.run_each_step_twice.load(std::sync::atomic::Ordering::Relaxed) {
            result = entry.step.undo(&ctx, &output).await;
        }
        if hooks.take_crash(&format!("undo:{name}")) {
            return Ok(RunOutcome::Crashed);
        }
        let rec = &mut records[i];
        rec.updated_at = drover_types::now();
        match result {
            Ok(()) => {
                rec.state = StepState::Undone;
                engine.store().step_put(rec).await?;
                engine.log(session.id, task_id, LogLevel::Info, &format!("undid {name}")).await;
            }
            Err(e) => {
                // Leave it UndoStarted: a later run (restart) tries the undo again.
                rec.error = Some(format!("undo failed: {e}"));
                engine.store().step_put(rec).await?;
                engine.log(session.id, task_id, LogLevel::Error, &format!("undo of {name} failed: {e}")).await;
                undo_errors.push(format!("undo of {name} failed: {e}"));
            }
        }
    }
    if !undo_errors.is_empty() {
        let msg = undo_errors.join("; ");
        session.failure_message = Some(session.failure_message.map(|m| format!("{m}; {msg}")).unwrap_or(msg));
    } else if session.failure_message.is_none() {
        session.failure_message = Some("undone on request".to_string());
    }
    for t in tasks.iter_mut() {
        if t.state != SessionState::Stopped {
            t.state = SessionState::Stopped;
            t.result = SessionResult::Failed;
            t.ended_at = Some(drover_types::now());
            engine.store().task_update(t).await?;
        }
    }
    finish(engine, session, SessionResult::Failed, &tasks).await?;
    Ok(RunOutcome::Finished(SessionResult::Failed))
}

/// A task given up by [`FailurePolicy::IsolateTasks`]: stopped, failed, its steps undone.
fn is_isolated(t: &Task) -> bool {
    t.state == SessionState::Stopped && t.result == SessionResult::Failed
}

/// A task whose failed step is about to run again is no longer failed.
async fn retry_task(engine: &Engine, task: &mut Task) -> Result<()> {
    task.result = SessionResult::None;
    task.failure_message = None;
    task.state = SessionState::Working;
    engine.store().task_update(task).await
}

/// Gives up task `t` ([`FailurePolicy::IsolateTasks`]): undoes its steps that may have had effects,
/// newest first; its steps that never ran are skipped; the task ends `Failed` (its failure
/// message says why). An undo that fails is logged and left `UndoStarted` for a restart to try
/// again; the task still ends, so the others go on.
async fn isolate_task(engine: &Engine, saga: &Saga, state: &tokio::sync::Mutex<RunState>, t: usize) -> Result<()> {
    let hooks = engine.hooks();
    let mut s = state.lock().await;
    let RunState { session, tasks, records, .. } = &mut *s;
    let why = tasks[t].failure_message.clone().unwrap_or_else(|| "a step failed".into());
    let name = tasks[t].name.clone();
    let task_id = Some(tasks[t].id);
    engine
        .log(session.id, task_id, LogLevel::Warning, &format!("{name}: giving up after {why}; undoing its steps"))
        .await;
    for i in (0..saga.steps.len()).rev().filter(|&i| saga.steps[i].task == Some(t)) {
        let entry = &saga.steps[i];
        let step_name = entry.step.name();
        match records[i].state {
            StepState::Pending => {
                records[i].state = StepState::Skipped;
                records[i].updated_at = drover_types::now();
                engine.store().step_put(&records[i]).await?;
                continue;
            }
            StepState::Started | StepState::Done | StepState::Failed | StepState::UndoStarted => {}
            StepState::Skipped | StepState::Undone => continue,
        }
        records[i].state = StepState::UndoStarted;
        records[i].updated_at = drover_types::now();
        engine.store().step_put(&records[i]).await?;
        let ctx =
            StepCtx { engine: engine.clone(), session: session.clone(), task_id, outputs: outputs_of(saga, records) };
        let output = records[i].output.clone();
        let mut result = entry.step.undo(&ctx, &output).await;
        if result.is_ok() && hooks.run_each_step_twice.load(Ordering::Relaxed) {
            result = entry.step.undo(&ctx, &output).await;
        }
        records[i].updated_at = drover_types::now();
        match result {
            Ok(()) => {
                records[i].state = StepState::Undone;
                engine.store().step_put(&records[i]).await?;
                engine.log(session.id, task_id, LogLevel::Info, &format!("undid {step_name}")).await;
            }
            Err(e) => {
                records[i].error = Some(format!("undo failed: {e}"));
                engine.store().step_put(&records[i]).await?;
                engine.log(session.id, task_id, LogLevel::Error, &format!("undo of {step_name} failed: {e}")).await;
            }
        }
    }
    let task = &mut tasks[t];
    task.state = SessionState::Stopped;
    task.result = SessionResult::Failed;
    task.failure_message = Some(why);
    task.ended_at = Some(drover_types::now());
    engine.store().task_update(task).await?;
    Ok(())
}

/// After a restart, under [`FailurePolicy::IsolateTasks`]: a task whose isolation was under way
/// (some of its steps undone) is isolated to the end; a task that had failed and was waiting to
/// run again runs again.
async fn resume_isolation(engine: &Engine, saga: &Saga, state: &tokio::sync::Mutex<RunState>) -> Result<()> {
    let count = state.lock().await.tasks.len();
    for t in 0..count {
        let (undoing, failed) = {
            let s = state.lock().await;
            let undoing = saga
                .steps
                .iter()
                .zip(&s.records)
                .any(|(e, r)| e.task == Some(t) && matches!(r.state, StepState::UndoStarted | StepState::Undone));
            let task = &s.tasks[t];
            (
                undoing && task.state != SessionState::Stopped,
                task.result == SessionResult::Failed && task.state != SessionState::Stopped,
            )
        };
        if undoing {
            isolate_task(engine, saga, state, t).await?;
        } else if failed {
            let mut s = state.lock().await;
            retry_task(engine, &mut s.tasks[t]).await?;
        }
    }
    Ok(())
}

async fn finish(engine: &Engine, mut session: Session, result: SessionResult, tasks: &[Task]) -> Result<()> {
    session.state = SessionState::Stopped;
    session.result = result;
    session.halted = false;
    session.ended_at = Some(drover_types::now());
    if result != SessionResult::Failed {
        session.progress = 100;
    } else {
        let p: Vec<(u32, u8)> = tasks.iter().map(|t| (t.weight, t.progress)).collect();
        session.progress = weighted_progress(&p);
    }
    // The last log line before the stop is recorded: a stopped session's log is complete.
    engine.store().session_clear_halt_request(session.id).await?;
    let level = if result == SessionResult::Failed { LogLevel::Error } else { LogLevel::Info };
    engine.log(session.id, None, level, &format!("{} finished: {result:?}", session.kind.as_str())).await;
    engine.session_save(&session).await?;
    Ok(())
}

async fn load_records(engine: &Engine, session_id: SessionId, saga: &Saga) -> Result<Vec<StepRecord>> {
    let stored = engine.store().steps_of(session_id).await?;
    let mut records = Vec::with_capacity(saga.steps.len());
    for (i, entry) in saga.steps.iter().enumerate() {
        let name = entry.step.name();
        match stored.iter().find(|r| r.index as usize == i) {
            Some(r) if r.name == name => records.push(r.clone()),
            Some(r) => {
                return Err(Error::internal(format!(
                    "session {session_id}: step {i} is recorded as {:?} but the saga has {name:?}",
                    r.name
                )));
            }
            None => records.push(StepRecord {
                session_id,
                task_id: None,
                index: i as u32,
                name,
                state: StepState::Pending,
                attempts: 0,
                output: Value::Null,
                error: None,
                updated_at: drover_types::now(),
            }),
        }
    }
    Ok(records)
}

fn outputs_of(saga: &Saga, records: &[StepRecord]) -> HashMap<String, Value> {
    saga.steps
        .iter()
        .zip(records)
        .filter(|(_, r)| r.state == StepState::Done)
        .map(|(s, r)| (s.step.name(), r.output.clone()))
        .collect()
}

async fn task_begin(engine: &Engine, task: &mut Task) -> Result<()> {
    if task.state == SessionState::Starting {
        task.state = SessionState::Working;
        engine.store().task_update(task).await?;
    }
    Ok(())
}

async fn task_progress(
    engine: &Engine,
    saga: &Saga,
    records: &[StepRecord],
    tasks: &mut [Task],
    t: usize,
) -> Result<()> {
    let (done, total) = saga.steps.iter().zip(records).filter(|(s, _)| s.task == Some(t)).fold(
        (0u64, 0u64),
        |(done, total), (s, r)| {
            let w = u64::from(s.weight);
            let finished = matches!(r.state, StepState::Done | StepState::Skipped);
            (done + if finished { w } else { 0 }, total + w)
        },
    );
    let task = &mut tasks[t];
    task.progress = (done * 100).checked_div(total).map_or(100, |p| p as u8);
    if done == total {
        task.state = SessionState::Stopped;
        if task.result == SessionResult::None {
            task.result = if task.failure_message.is_some() { SessionResult::Warning } else { SessionResult::Success };
        }
        task.ended_at = Some(drover_types::now());
    }
    engine.store().task_update(task).await?;
    Ok(())
}

async fn session_progress(engine: &Engine, session: &mut Session, tasks: &[Task]) -> Result<()> {
    let p: Vec<(u32, u8)> = tasks.iter().map(|t| (t.weight, t.progress)).collect();
    let progress = weighted_progress(&p);
    if progress != session.progress {
        session.progress = progress;
        engine.session_save(session).await?;
    }
    Ok(())
}

/// Prepares a halted session to go on: marks failed steps to run again, or skips them.
pub(crate) async fn apply_continue(
    engine: &Engine,
    session_id: SessionId,
    saga: &Saga,
    option: ContinueOption,
) -> Result<()> {
    let mut records = load_records(engine, session_id, saga).await?;
    let failed = records.iter().position(|r| r.state == StepState::Failed);
    let Some(f) = failed else {
        // Halted on request, not by a failure: nothing to retry or skip.
        return Ok(());
    };
    let (task, group) = (saga.steps[f].task, saga.steps[f].group);
    let same_vm = |i: usize| task.is_some() && saga.steps[i].task == task;
    let same_group = |i: usize| group.is_some() && saga.steps[i].group == group;
    for (i, rec) in records.iter_mut().enumerate() {
        let target = match option {
            ContinueOption::RetryFailedStep if i == f => Some(StepState::Pending),
            ContinueOption::ProceedToNextStep if i == f => Some(StepState::Skipped),
            ContinueOption::RetryFailedVm if same_vm(i) || i == f => Some(StepState::Pending),
            ContinueOption::ProceedToNextVm if (same_vm(i) || i == f) && rec.state != StepState::Done => {
                Some(StepState::Skipped)
            }
            ContinueOption::RetryFailedGroup if same_group(i) || i == f => Some(StepState::Pending),
            ContinueOption::ProceedToNextGroup if (same_group(i) || i == f) && rec.state != StepState::Done => {
                Some(StepState::Skipped)
            }
            _ => None,
        };
        if let Some(state) = target {
            rec.state = state;
            rec.updated_at = drover_types::now();
            engine.store().step_put(rec).await?;
        }
    }
    // A retried task is no longer failed.
    if matches!(
        option,
        ContinueOption::RetryFailedStep | ContinueOption::RetryFailedVm | ContinueOption::RetryFailedGroup
    ) {
        let mut tasks = engine.store().tasks_of(session_id).await?;
        for (i, t) in tasks.iter_mut().enumerate() {
            let retried =
                saga.steps.iter().zip(&records).any(|(s, r)| s.task == Some(i) && r.state == StepState::Pending);
            if retried && t.result == SessionResult::Failed {
                t.result = SessionResult::None;
                t.failure_message = None;
                t.state = SessionState::Working;
                engine.store().task_update(t).await?;
            }
        }
    }
    Ok(())
}
