//! The EM representations, built from drover's domain values (wire shapes apart from domain types).
//!
//! Element and attribute order follows the documented examples, and every document validates
//! against Veeam's `RestAPI.xsd` (`tests/em_schema.rs`) but for the schema's two known gaps (see
//! `tests/golden/em/README.md`): an entity reference is `Type, Href, Name, UID` then `Links`; a
//! link is `Rel, Type, Href, Name`. Every `Href` is absolute, from the request's authority or the
//! configured external URL (`EmConfig::external_base_url`), and resolves with GET.

use drover_types::{
    Plan, PlanId, Replica, RestorePoint, RestorePointId, Session, SessionId, SessionResult, SessionState, Task, TaskId,
    Timestamp, VmId,
};
use uuid::Uuid;

use super::render::Element;
use super::tasks::{EmTask, TaskState};

/// The drover control plane as the EM "backup server" every `Up` link points to.
#[derive(Debug, Clone)]
pub struct BackupServer {
    pub id: Uuid,
    pub name: String,
    /// The port of the control plane's native API (`BackupServer/Port`).
    pub port: u16,
}

/// What every representation needs beside its value: where it is served from.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// `http://host:port` (from the request's authority), or the configured external base URL
    /// (which may end in a path), without a trailing slash; `Href`s are this plus `/api/...`.
    pub base: String,
    pub server: BackupServer,
}

/// `YYYY-MM-DDThh:mm:ssZ`: UTC, no fractions.
pub fn utc(t: Timestamp) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub fn uid(kind: &str, id: impl std::fmt::Display) -> String {
    format!("urn:veeam:{kind}:{id}")
}

impl Ctx {
    pub fn href(&self, path: &str) -> String {
        format!("{}/api{}", self.base, path)
    }

    pub fn link(&self, rel: &str, kind: Option<&str>, path: &str, name: Option<&str>) -> Element {
        let mut l = Element::new("Link").attr("Rel", rel);
        if let Some(k) = kind {
            l = l.attr("Type", k);
        }
        l = l.attr("Href", self.href(path));
        if let Some(n) = name {
            l = l.attr("Name", n);
        }
        l
    }

    fn up(&self) -> Element {
        self.link("Up", Some("BackupServerReference"), &server_path(&self.server), Some(&self.server.name))
    }

    /// An `EntityRef` (the root of a reference) or a `Ref` (one of a collection).
    fn reference(
        &self,
        element: &'static str,
        kind: &str,
        path: &str,
        name: &str,
        id: &str,
        links: Vec<Element>,
    ) -> Element {
        Element::new(element)
            .attr("Type", format!("{kind}Reference"))
            .attr("Href", self.href(path))
            .attr("Name", name)
            .attr("UID", uid(kind, id))
            .child(Element::list("Links", "Links", links))
    }

    /// The head of an entity: its attributes and links; the caller appends the fields.
    fn entity(
        &self,
        element: &'static str,
        kind: &str,
        path: &str,
        name: &str,
        id: &str,
        links: Vec<Element>,
    ) -> Element {
        Element::new(element)
            .attr("Type", kind.to_string())
            .attr("Href", self.href(&format!("{path}?format=Entity")))
            .attr("Name", name)
            .attr("UID", uid(kind, id))
            .child(Element::list("Links", "Links", links))
    }
}

/// Whether a resource is shown as a reference or as the entity (`?format=Entity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// The root `EntityRef`.
    EntityRef,
    /// A `Ref` inside `EntityReferences` or a query's `Refs`.
    Ref,
    Entity,
}

impl Shape {
    fn element(self) -> &'static str {
        match self {
            Shape::EntityRef => "EntityRef",
            _ => "Ref",
        }
    }
}

// -------------------------------------------------------------------------------------------------
// Logon

pub const VERSIONS: [&str; 5] = ["v1_4", "v1_5", "v1_6", "v1_7", "latest"];

pub fn enterprise_manager(ctx: &Ctx) -> Element {
    let versions = VERSIONS
        .iter()
        .map(|v| {
            let link = ctx.link("Create", Some("LogonSession"), &format!("/sessionMngr/?v={v}"), None);
            Element::new("SupportedVersion").attr("Name", *v).child(Element::list("Links", "Links", vec![link]))
        })
        .collect();
    Element::new("EnterpriseManager")
        .attr("Href", ctx.href("/"))
        .attr("Type", "EnterpriseManager")
        .child(Element::list("SupportedVersions", "SupportedVersions", versions))
}

/// The collections a logged-on client goes down to.
pub const COLLECTIONS: [(&str, &str); 6] = [
    ("/backupServers", "BackupServerReferenceList"),
    ("/cloud/failoverSessions", "CloudFailoverSessionReferenceList"),
    ("/cloud/cloudFailoverPlans", "CloudFailoverPlanReferenceList"),
    ("/failoverPlans", "FailoverPlanReferenceList"),
    ("/tasks", "TaskList"),
    ("/logonSessions", "LogonSessionList"),
];

pub fn logon_session(ctx: &Ctx, id: Uuid, user_name: &str) -> Element {
    let path = format!("/logonSessions/{id}");
    let mut links = vec![ctx.link("Up", Some("EnterpriseManager"), "/", None)];
    links.extend(COLLECTIONS.iter().map(|(p, k)| ctx.link("Down", Some(k), p, None)));
    links.push(ctx.link("Delete", Some("LogonSession"), &path, None));
    Element::new("LogonSession")
        .attr("Type", "LogonSession")
        .attr("Href", ctx.href(&path))
        .child(Element::list("Links", "Links", links))
        .child(Element::text("UserName", user_name))
        .child(Element::text("SessionId", id.to_string()))
}

pub fn logon_sessions(ctx: &Ctx, sessions: &[(Uuid, String)]) -> Element {
    let items = sessions.iter().map(|(id, user)| logon_session(ctx, *id, user)).collect();
    Element::list("LogonSessions", "LogonSessions", items)
}

// -------------------------------------------------------------------------------------------------
// Backup servers

pub fn server_path(s: &BackupServer) -> String {
    format!("/backupServers/{}", s.id)
}

pub fn backup_server(ctx: &Ctx, shape: Shape) -> Element {
    let s = &ctx.server;
    let path = server_path(s);
    let id = s.id.to_string();
    match shape {
        Shape::Entity => {
            let links = vec![ctx.link("Alternate", Some("BackupServerReference"), &path, Some(&s.name))];
            ctx.entity("BackupServer", "BackupServer", &path, &s.name, &id, links)
                .child(Element::text("Description", "drover control plane"))
                .child(Element::text("Port", i64::from(s.port)))
                .child(Element::text("Version", env!("CARGO_PKG_VERSION")))
        }
        _ => {
            let entity = format!("{path}?format=Entity");
            let links = vec![ctx.link("Alternate", Some("BackupServer"), &entity, Some(&s.name))];
            ctx.reference(shape.element(), "BackupServer", &path, &s.name, &id, links)
        }
    }
}

// -------------------------------------------------------------------------------------------------
// Failover sessions (seed 002)

pub fn session_path(id: impl std::fmt::Display) -> String {
    format!("/cloud/failoverSessions/{id}")
}

pub fn state_name(s: SessionState) -> &'static str {
    match s {
        SessionState::Starting => "Starting",
        SessionState::Working => "Working",
        SessionState::Stopping => "Stopping",
        SessionState::Stopped => "Stopped",
    }
}

pub fn result_name(r: SessionResult) -> &'static str {
    match r {
        SessionResult::None => "None",
        SessionResult::Success => "Success",
        SessionResult::Warning => "Warning",
        SessionResult::Failed => "Failed",
    }
}

/// A session's reference: all it needs is the id and the name (lists build it from summaries).
pub fn cloud_failover_session_ref(ctx: &Ctx, id: SessionId, name: &str, shape: Shape) -> Element {
    let path = session_path(id);
    let entity = format!("{path}?format=Entity");
    let links = vec![ctx.up(), ctx.link("Alternate", Some("CloudFailoverSession"), &entity, Some(name))];
    ctx.reference(shape.element(), "CloudFailoverSession", &path, name, &id.to_string(), links)
}

/// The restore point a VM's task is about, as its `VmReplicaPointLink` names it: the point the VM
/// booted from (failover, test failover), or for the plan's later sessions (undo, failback,
/// commit, permanent failover) the point of the failover they follow.
#[derive(Debug, Clone)]
pub struct PointLink {
    pub task_id: TaskId,
    pub point_id: RestorePointId,
    /// The replica's name.
    pub name: String,
}

pub fn cloud_failover_session(
    ctx: &Ctx,
    session: &Session,
    tasks: &[Task],
    points: &[PointLink],
    shape: Shape,
) -> Element {
    let path = session_path(session.id);
    let id = session.id.to_string();
    let name = session.name.as_str();
    if shape != Shape::Entity {
        return cloud_failover_session_ref(ctx, session.id, name, shape);
    }
    let links = vec![ctx.up(), ctx.link("Alternate", Some("CloudFailoverSessionReference"), &path, Some(name))];
    let tasks = tasks
        .iter()
        .map(|t| {
            let link = match points.iter().find(|p| p.task_id == t.id) {
                Some(p) => ctx.link("Related", Some("VmReplicaPointReference"), &point_path(p.point_id), Some(&p.name)),
                // No point to name (the VM has not booted yet, or booted from none, or its point
                // is gone): the schema requires the link and every link resolves, so it names
                // the session itself, and its Type says so.
                None => ctx.link("Related", Some("CloudFailoverSession"), &format!("{path}?format=Entity"), Some(name)),
            };
            cloud_failover_task(t, Element { name: "VmReplicaPointLink", ..link })
        })
        .collect();
    // Seed 002 is Veeam's own example of this entity: it has no `JobUid` and `JobName`, and no
    // `FailureMessage` when nothing failed, though `JobSessionEntityType` requires all three.
    ctx.entity("CloudFailoverSession", "CloudFailoverSession", &path, name, &id, links)
        .child(Element::text("JobType", "FailoverPlan"))
        .child(Element::text("CreationTimeUTC", utc(session.created_at)))
        .child_opt(session.ended_at.map(|t| Element::text("EndTimeUTC", utc(t))))
        .child(Element::text("State", state_name(session.state)))
        .child(Element::text("Result", result_name(session.result)))
        .child(Element::text("Progress", i64::from(session.progress)))
        .child_opt(session.failure_message.clone().map(|m| Element::text("FailureMessage", m)))
        .child(Element::list("CloudFailoverTasks", "CloudFailoverTasks", tasks))
}

/// One VM of a session (`CloudFailoverTaskSessionInfoType`: each item is itself named
/// `CloudFailoverTasks`). `FailureMessage` is required there: empty when nothing failed.
fn cloud_failover_task(t: &Task, point: Element) -> Element {
    Element::new("CloudFailoverTasks")
        .attr("VmName", t.name.as_str())
        .child(point)
        .child(Element::text("CreationTimeUTC", utc(t.created_at)))
        .child_opt(t.ended_at.map(|e| Element::text("EndTimeUTC", utc(e))))
        .child(Element::text("State", state_name(t.state)))
        .child(Element::text("Result", result_name(t.result)))
        .child(Element::text("Progress", i64::from(t.progress)))
        .child(Element::text("FailureMessage", t.failure_message.clone().unwrap_or_default()))
}

// -------------------------------------------------------------------------------------------------
// Replica restore points

pub fn point_path(id: RestorePointId) -> String {
    format!("/vmReplicaPoints/{id}")
}

/// A restore point of a VM replica: where a failover VM booted from. `oldest`: the replica's
/// oldest point, the one its qcow2 chain starts from, which holds the whole disk (`Full`); every
/// later point is an overlay of the blocks that changed since the point before it (`Increment`,
/// made by changed-block replication: `Incremental`).
pub fn vm_replica_point(ctx: &Ctx, replica: &Replica, point: &RestorePoint, oldest: bool, shape: Shape) -> Element {
    let path = point_path(point.id);
    let id = point.id.to_string();
    let name = replica.name.as_str();
    if shape != Shape::Entity {
        let links =
            vec![ctx.up(), ctx.link("Alternate", Some("VmReplicaPoint"), &format!("{path}?format=Entity"), Some(name))];
        return ctx.reference(shape.element(), "VmReplicaPoint", &path, name, &id, links);
    }
    let links = vec![ctx.up(), ctx.link("Alternate", Some("VmReplicaPointReference"), &path, Some(name))];
    ctx.entity("VmReplicaPoint", "VmReplicaPoint", &path, name, &id, links)
        .child(Element::text("CreationTimeUTC", utc(point.created_at)))
        .child(Element::text("VmName", name))
        .child(Element::text("Algorithm", if oldest { "Full" } else { "Incremental" }))
        .child(Element::text("PointType", if oldest { "Full" } else { "Increment" }))
}

// -------------------------------------------------------------------------------------------------
// Plans, as CloudFailoverPlan and as FailoverPlan

/// A plan with what its representation names: its tenant and its VMs (in order).
#[derive(Debug, Clone)]
pub struct PlanView {
    pub plan: Plan,
    pub tenant_name: String,
    pub vms: Vec<(VmId, String)>,
}

/// The two ways EM sees a replica plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanKind {
    Cloud,
    Plain,
}

impl PlanKind {
    pub fn kind(self) -> &'static str {
        match self {
            PlanKind::Cloud => "CloudFailoverPlan",
            PlanKind::Plain => "FailoverPlan",
        }
    }
    pub fn collection(self) -> &'static str {
        match self {
            PlanKind::Cloud => "/cloud/cloudFailoverPlans",
            PlanKind::Plain => "/failoverPlans",
        }
    }
    pub fn path(self, id: impl std::fmt::Display) -> String {
        format!("{}/{id}", self.collection())
    }
}

pub fn plan(ctx: &Ctx, view: &PlanView, kind: PlanKind, shape: Shape) -> Element {
    let p = &view.plan;
    let path = kind.path(p.id);
    let id = p.id.to_string();
    let name = p.name.as_str();
    let k = kind.kind();
    if shape != Shape::Entity {
        let links = vec![ctx.up(), ctx.link("Alternate", Some(k), &format!("{path}?format=Entity"), Some(name))];
        return ctx.reference(shape.element(), k, &path, name, &id, links);
    }
    let reference = format!("{k}Reference");
    // Edit: a PUT of the entity (its description; for a cloud plan, its plan commands) on the
    // plan's own URL.
    let mut links = vec![
        ctx.up(),
        ctx.link("Alternate", Some(&reference), &path, Some(name)),
        ctx.link("Edit", Some(k), &path, Some(name)),
    ];
    let actions: &[(&str, &str)] = match kind {
        PlanKind::Cloud => &[("Start", "start"), ("Test", "test"), ("Undo", "undo")],
        PlanKind::Plain => &[("Start", "start"), ("Undo", "undo")],
    };
    for (rel, action) in actions {
        links.push(ctx.link(rel, Some("Task"), &format!("{path}?action={action}"), Some(name)));
    }
    links.push(ctx.link("Delete", Some(&reference), &path, Some(name)));
    let vms =
        view.vms.iter().enumerate().map(|(i, (vm_id, vm_name))| plan_vm(ctx, p.id, kind, i, *vm_id, vm_name)).collect();
    let head = ctx.entity(k, k, &path, name, &id, links);
    match kind {
        PlanKind::Cloud => head
            .child(Element::text("TenantUid", uid("Tenant", p.tenant_id)))
            .child(Element::text("TenantName", view.tenant_name.as_str()))
            .child(Element::text("Description", p.description.as_str()))
            // drover runs no commands around a whole plan (its steps are per VM): always off.
            // The schema puts the two Post... elements before the two Pre... ones.
            .child(
                Element::new("CloudFailoverPlanOptions")
                    .child(Element::text("PostFailoverPlanCommandEnabled", false))
                    .child(Element::text("PostFailoverPlanCommand", ""))
                    .child(Element::text("PreFailoverPlanCommandEnabled", false))
                    .child(Element::text("PreFailoverPlanCommand", "")),
            )
            .child(Element::new("CloudFailoverPlanInfo").child(Element::list("Includes", "Includes", vms))),
        PlanKind::Plain => head
            .child(Element::text("Description", p.description.as_str()))
            .child(Element::new("FailoverPlanInfo").child(Element::list("Includes", "Includes", vms))),
    }
}

/// `/cloud/cloudFailoverPlans/{plan}/includes/{vm}` or `/failoverPlans/{plan}/includes/{vm}`.
pub fn plan_vm_path(plan: PlanId, kind: PlanKind, vm: VmId) -> String {
    format!("{}/includes/{vm}", kind.path(plan))
}

/// A VM of a plan, `order` counted from 0 as the product counts it: a `CloudFailoveredVm`
/// (`FailoverPlanVMId`, `Name`, `Order`) or a `FailoveredVm` (`FailoveredVmId`, `HierarchyObjRef`,
/// `Name`, `DisplayName`, `Order`, `GuestProcessingOptions`: drover does no guest processing, so
/// the options are empty). Its `Href` is its own resource under the plan's `includes`.
pub fn plan_vm(ctx: &Ctx, plan: PlanId, kind: PlanKind, order: usize, vm: VmId, name: &str) -> Element {
    let href = ctx.href(&plan_vm_path(plan, kind, vm));
    match kind {
        PlanKind::Cloud => Element::new("CloudFailoveredVm")
            .attr("Href", href)
            .attr("Type", "CloudFailoveredVm")
            .child(Element::text("FailoverPlanVMId", vm.to_string()))
            .child(Element::text("Name", name))
            .child(Element::text("Order", order as i64)),
        PlanKind::Plain => Element::new("FailoveredVm")
            .attr("Href", href)
            .attr("Type", "FailoveredVm")
            .child(Element::text("FailoveredVmId", vm.to_string()))
            .child(Element::text("HierarchyObjRef", format!("urn:drover:Vm:{vm}")))
            .child(Element::text("Name", name))
            .child(Element::text("DisplayName", name))
            .child(Element::text("Order", order as i64))
            .child(Element::new("GuestProcessingOptions")),
    }
}

/// `GET .../includes`: the plan's VMs (`CloudFailoveredVms` or `FailoveredVms`).
pub fn plan_vms(ctx: &Ctx, view: &PlanView, kind: PlanKind) -> Element {
    let items =
        view.vms.iter().enumerate().map(|(i, (vm, name))| plan_vm(ctx, view.plan.id, kind, i, *vm, name)).collect();
    match kind {
        PlanKind::Cloud => Element::list("CloudFailoveredVms", "CloudFailoveredVms", items),
        PlanKind::Plain => Element::list("FailoveredVms", "FailoveredVms", items),
    }
}

// -------------------------------------------------------------------------------------------------
// Tasks

pub fn task_path(t: &EmTask) -> String {
    format!("/tasks/{}", t.task_id())
}

pub fn task(ctx: &Ctx, t: &EmTask) -> Element {
    let path = task_path(t);
    let mut links = vec![ctx.link("Delete", Some("Task"), &path, None)];
    if t.state != TaskState::Running
        && let Some(s) = t.session_id
    {
        let entity = format!("{}?format=Entity", session_path(s));
        links.push(ctx.link("Related", Some("CloudFailoverSession"), &entity, Some(&t.name)));
    }
    let mut e = Element::new("Task")
        .attr("Type", "Task")
        .attr("Href", ctx.href(&path))
        .child(Element::list("Links", "Links", links))
        .child(Element::text("TaskId", t.task_id()))
        .child(Element::text("State", t.state.as_str()))
        .child(Element::text("Operation", t.operation));
    if t.state != TaskState::Running {
        // `TaskResultInfoType`: `Success` is an attribute, `Message` a child element.
        let result = Element::new("Result").attr("Success", t.success);
        let message = (!t.message.is_empty()).then(|| Element::text("Message", t.message.as_str()));
        e = e.child(result.child_opt(message));
    }
    e
}

/// A task as a query's `Ref` (tasks have no reference form of their own).
pub fn task_ref(ctx: &Ctx, t: &EmTask) -> Element {
    let path = task_path(t);
    let id = t.task_id();
    let links = vec![ctx.link("Alternate", Some("Task"), &path, Some(&id))];
    ctx.reference("Ref", "Task", &path, &id, &id, links)
}

pub fn tasks(ctx: &Ctx, list: &[EmTask]) -> Element {
    Element::list("Tasks", "Tasks", list.iter().map(|t| task(ctx, t)).collect())
}

// -------------------------------------------------------------------------------------------------
// Collections

/// `EntityReferences` of `Ref`s, or with `?format=Entity` the plural root of entities.
pub fn collection(shape: Shape, plural: &'static str, items: Vec<Element>) -> Element {
    match shape {
        Shape::Entity => Element::list(plural, plural, items),
        _ => Element::list("EntityReferences", "Refs", items),
    }
}

// -------------------------------------------------------------------------------------------------
// The query service

/// `PagingInfo` with its First, Previous, Next and Last links; `path_at` gives the query's path
/// at another page.
pub fn paging_info(ctx: &Ctx, page: u64, size: u64, pages: u64, path_at: impl Fn(u64) -> String) -> Element {
    let mut links = vec![ctx.link("First", Some("QueryResult"), &path_at(1), None)];
    if page > 1 {
        links.push(ctx.link("Previous", Some("QueryResult"), &path_at((page - 1).min(pages)), None));
    }
    if page < pages {
        links.push(ctx.link("Next", Some("QueryResult"), &path_at(page + 1), None));
    }
    links.push(ctx.link("Last", Some("QueryResult"), &path_at(pages), None));
    Element::new("PagingInfo")
        .attr("PageNum", page as i64)
        .attr("PageSize", size as i64)
        .attr("PagesCount", pages as i64)
        .child(Element::list("Links", "Links", links))
}

/// `QueryResult`: `Refs` of references, or `Entities` holding the plural root of entities, then
/// `PagingInfo`, which the schema requires even when no page was asked for.
pub fn query_result(shape: Shape, plural: &'static str, items: Vec<Element>, paging: Element) -> Element {
    let body = match shape {
        Shape::Entity => Element::new("Entities").child(Element::list(plural, plural, items)),
        _ => Element::list("Refs", "Refs", items),
    };
    Element::new("QueryResult").child(body).child(paging)
}
