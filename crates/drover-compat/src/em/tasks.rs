//! EM tasks: the dialect's handle on an asynchronous start (`POST ...?action=start` → 202 + `Task`).
//!
//! A task finishes when the application layer has created the session (or refused to); the
//! session itself runs on and is followed through its `Related` link. Tasks live in memory, in
//! the dialect (the spec allows it: they are handles, not state of the plan); a restart forgets
//! them, while the sessions they point to persist. Deleting a task forgets it: its work (creating
//! the session) is already done, and stopping a session is that session's business.
//!
//! ```text
//!  Running ─▶ Finished(Success=true, session)      (the app created the session)
//!     └─────▶ Finished(Success=false, message)     (never reached today: refusals are HTTP errors)
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use drover_types::{SessionId, TenantId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TaskState {
    Running,
    OperationFinished,
    Finished,
}

impl TaskState {
    pub const ALL: [TaskState; 3] = [TaskState::Running, TaskState::OperationFinished, TaskState::Finished];
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Running => "Running",
            TaskState::OperationFinished => "OperationFinished",
            TaskState::Finished => "Finished",
        }
    }
}

#[derive(Debug, Clone)]
pub struct EmTask {
    pub number: u64,
    pub tenant_id: TenantId,
    /// `StartCloudFailoverPlan`, `UndoFailoverPlan`, ...
    pub operation: &'static str,
    /// The plan's name, for the `Related` link.
    pub name: String,
    pub state: TaskState,
    pub success: bool,
    pub message: String,
    pub session_id: Option<SessionId>,
}

impl EmTask {
    pub fn task_id(&self) -> String {
        format!("task-{}", self.number)
    }
}

/// The most tasks kept, of all tenants together.
pub const MAX_TASKS: usize = 10_000;

/// The tasks of every tenant, numbered from 1.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    inner: Arc<Mutex<(u64, BTreeMap<u64, EmTask>)>>,
}

impl Tasks {
    /// Records a finished task for a session the app has created.
    pub fn finished(&self, tenant_id: TenantId, operation: &'static str, name: &str, session: SessionId) -> EmTask {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.0 += 1;
        let task = EmTask {
            number: inner.0,
            tenant_id,
            operation,
            name: name.to_string(),
            state: TaskState::Finished,
            success: true,
            message: format!("session {session} started"),
            session_id: Some(session),
        };
        inner.1.insert(task.number, task.clone());
        // Bounded: the oldest tasks go first (a client reads its task right after the action).
        while inner.1.len() > MAX_TASKS {
            inner.1.pop_first();
        }
        task
    }

    pub fn list(&self, tenant_id: TenantId) -> Vec<EmTask> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.1.values().filter(|t| t.tenant_id == tenant_id).cloned().collect()
    }

    /// `task-N` of this tenant; another tenant's task is not found.
    pub fn get(&self, tenant_id: TenantId, task_id: &str) -> Option<EmTask> {
        let number = parse_task_id(task_id)?;
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.1.get(&number).filter(|t| t.tenant_id == tenant_id).cloned()
    }

    pub fn remove(&self, tenant_id: TenantId, task_id: &str) -> Option<EmTask> {
        let number = parse_task_id(task_id)?;
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.1.get(&number).is_some_and(|t| t.tenant_id == tenant_id) { inner.1.remove(&number) } else { None }
    }
}

fn parse_task_id(s: &str) -> Option<u64> {
    s.strip_prefix("task-")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_are_numbered_and_confined_to_their_tenant() {
        let tasks = Tasks::default();
        let (a, b) = (TenantId::new(), TenantId::new());
        let t1 = tasks.finished(a, "StartCloudFailoverPlan", "p", SessionId::new());
        let t2 = tasks.finished(b, "UndoFailoverPlan", "q", SessionId::new());
        assert_eq!((t1.task_id().as_str(), t2.task_id().as_str()), ("task-1", "task-2"));
        assert!(tasks.get(a, "task-1").is_some());
        assert!(tasks.get(a, "task-2").is_none());
        assert!(tasks.get(a, "task-x").is_none() && tasks.get(a, "1").is_none());
        assert!(tasks.remove(a, "task-2").is_none());
        assert_eq!(tasks.list(b).len(), 1);
        assert!(tasks.remove(a, "task-1").is_some());
        assert!(tasks.get(a, "task-1").is_none());
    }

    #[test]
    fn only_the_newest_tasks_are_kept() {
        let tasks = Tasks::default();
        let tenant = TenantId::new();
        for _ in 0..MAX_TASKS + 3 {
            tasks.finished(tenant, "StartCloudFailoverPlan", "p", SessionId::new());
        }
        let list = tasks.list(tenant);
        assert_eq!(list.len(), MAX_TASKS);
        assert_eq!(list[0].task_id(), "task-4");
        assert!(
            tasks.get(tenant, "task-3").is_none() && tasks.get(tenant, &format!("task-{}", MAX_TASKS + 3)).is_some()
        );
    }
}
