//! The query service (spec 2.4): `GET /api/query?type=...` with `format`, `sortAsc`/`sortDesc`,
//! `pageSize`/`page` and `filter`.
//!
//! Every parameter is checked before anything is read, so a bad query is a 400 whatever the data.
//! Every result is paged: Enterprise Manager puts all results on one page when `pageSize` is not
//! given, drover pages by [`DEFAULT_PAGE_SIZE`] (the `PagingInfo` links go on), so an answer's
//! size is bounded however many sessions are stored.
//!
//! Sessions can be tens of thousands: the filter and the sort go to the store as a
//! [`SessionCondition`] and a [`SessionOrder`] when they mean exactly the same there
//! ([`session_condition`]), and only the page is read, as summaries; entities are read for the
//! page's sessions only. A filter or sort the store cannot express (`FailureMessage`) reads the
//! summaries that the rest of the filter narrows to and filters, sorts and pages them here.
//! Plans and tasks are few (a control plane's, not a backup catalogue's) and are filtered,
//! sorted and paged here.

use std::cmp::Ordering;

use drover_engine::app::{Caller, SESSION_SUMMARIES_MAX};
use drover_types::{
    CompareOp, Error, SessionCondition, SessionOrder, SessionResult, SessionState, SessionSummary, Timestamp,
};

use super::EmState;
use super::filter::{self, Compiled, FieldType, Op, Value};
use super::handlers::{Params, plan_sessions_query, plan_views, session_elements, with_vm_names};
use super::render::{Element, EmResult};
use super::tasks::EmTask;
use super::views::{self, Ctx, PlanKind, PlanView, Shape};

/// The page size of a query that names none.
pub const DEFAULT_PAGE_SIZE: u64 = 1000;

const STATES: &[&str] = &["Starting", "Working", "Stopping", "Stopped"];
const RESULTS: &[&str] = &["None", "Success", "Warning", "Failed"];
const TASK_STATES: &[&str] = &["Running", "OperationFinished", "Finished"];

const SESSION_FIELDS: &[(&str, FieldType)] = &[
    ("UID", FieldType::Text),
    ("Name", FieldType::Text),
    ("Type", FieldType::Text),
    ("CreationTime", FieldType::Time),
    ("EndTime", FieldType::Time),
    ("State", FieldType::Enum(STATES)),
    ("Result", FieldType::Enum(RESULTS)),
    ("FailureMessage", FieldType::Text),
    ("BackupServerUid", FieldType::Text),
    ("BackupServerName", FieldType::Text),
];

const PLAN_FIELDS: &[(&str, FieldType)] = &[
    ("UID", FieldType::Text),
    ("Name", FieldType::Text),
    ("Description", FieldType::Text),
    ("TenantUid", FieldType::Text),
    ("TenantName", FieldType::Text),
];

const TASK_FIELDS: &[(&str, FieldType)] =
    &[("TaskId", FieldType::Text), ("State", FieldType::Enum(TASK_STATES)), ("Operation", FieldType::Text)];

/// What can be queried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueryType {
    CloudFailoverSession,
    CloudFailoverPlan,
    FailoverPlan,
    Task,
}

impl QueryType {
    const ALL: [QueryType; 4] =
        [QueryType::CloudFailoverSession, QueryType::CloudFailoverPlan, QueryType::FailoverPlan, QueryType::Task];

    fn name(self) -> &'static str {
        match self {
            QueryType::CloudFailoverSession => "CloudFailoverSession",
            QueryType::CloudFailoverPlan => "CloudFailoverPlan",
            QueryType::FailoverPlan => "FailoverPlan",
            QueryType::Task => "Task",
        }
    }
    fn plural(self) -> &'static str {
        match self {
            QueryType::CloudFailoverSession => "CloudFailoverSessions",
            QueryType::CloudFailoverPlan => "CloudFailoverPlans",
            QueryType::FailoverPlan => "FailoverPlans",
            QueryType::Task => "Tasks",
        }
    }
    fn fields(self) -> &'static [(&'static str, FieldType)] {
        match self {
            QueryType::CloudFailoverSession => SESSION_FIELDS,
            QueryType::CloudFailoverPlan | QueryType::FailoverPlan => PLAN_FIELDS,
            QueryType::Task => TASK_FIELDS,
        }
    }
}

enum Record {
    Session(SessionSummary),
    Plan(PlanView),
    Task(EmTask),
}

fn enum_value(list: &[&str], name: &str) -> Option<Value> {
    list.iter().position(|v| *v == name).map(Value::Enum)
}

impl Record {
    fn field(&self, ctx: &Ctx, name: &str) -> Option<Value> {
        let text = |s: &str| Some(Value::Text(s.to_string()));
        match self {
            Record::Session(s) => match name {
                "UID" => text(&views::uid("CloudFailoverSession", s.id)),
                "Name" => text(&s.name),
                "Type" => text("FailoverPlan"),
                "CreationTime" => Some(Value::Time(s.created_at)),
                "EndTime" => s.ended_at.map(Value::Time),
                "State" => enum_value(STATES, views::state_name(s.state)),
                "Result" => enum_value(RESULTS, views::result_name(s.result)),
                "FailureMessage" => s.failure_message.as_deref().and_then(text),
                "BackupServerUid" => text(&views::uid("BackupServer", ctx.server.id)),
                "BackupServerName" => text(&ctx.server.name),
                _ => None,
            },
            Record::Plan(v) => match name {
                "UID" => text(&views::uid("CloudFailoverPlan", v.plan.id)),
                "Name" => text(&v.plan.name),
                "Description" => text(&v.plan.description),
                "TenantUid" => text(&views::uid("Tenant", v.plan.tenant_id)),
                "TenantName" => text(&v.tenant_name),
                _ => None,
            },
            Record::Task(t) => match name {
                "TaskId" => text(&t.task_id()),
                "State" => enum_value(TASK_STATES, t.state.as_str()),
                "Operation" => text(t.operation),
                _ => None,
            },
        }
    }
}

fn compare(a: &Option<Value>, b: &Option<Value>) -> Ordering {
    match (a, b) {
        (Some(Value::Text(a)), Some(Value::Text(b))) => a.to_lowercase().cmp(&b.to_lowercase()),
        (Some(Value::Time(a)), Some(Value::Time(b))) => a.cmp(b),
        (Some(Value::Number(a)), Some(Value::Number(b))) => a.cmp(b),
        (Some(Value::Enum(a)), Some(Value::Enum(b))) => a.cmp(b),
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        _ => Ordering::Equal,
    }
}

/// A checked query.
#[derive(Debug)]
struct Query {
    kind: QueryType,
    shape: Shape,
    sort: Option<(&'static str, bool)>,
    /// `(pageSize, page)`, [`DEFAULT_PAGE_SIZE`] and 1 when not given.
    paging: (u64, u64),
    filter: Option<(String, Compiled)>,
}

fn number(params: &Params, key: &str) -> Result<Option<u64>, Error> {
    params
        .get(key)
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .ok()
                .filter(|n| *n >= 1 && *n <= 10_000)
                .ok_or_else(|| Error::invalid(format!("{key} must be a whole number from 1 to 10000, not {v:?}")))
        })
        .transpose()
}

fn check(params: &Params) -> Result<Query, Error> {
    let kind = match params.get("type") {
        None => {
            return Err(Error::invalid(
                "type is required: CloudFailoverSession, CloudFailoverPlan, FailoverPlan or Task",
            ));
        }
        Some(t) => QueryType::ALL.into_iter().find(|k| k.name().eq_ignore_ascii_case(t)).ok_or_else(|| {
            Error::invalid(format!(
                "unknown type {t:?}: expected CloudFailoverSession, CloudFailoverPlan, FailoverPlan or Task"
            ))
        })?,
    };
    let shape = match params.get("format") {
        None => Shape::Ref,
        Some(f) if f.eq_ignore_ascii_case("References") => Shape::Ref,
        Some(f) if f.eq_ignore_ascii_case("Entities") => Shape::Entity,
        Some(f) => return Err(Error::invalid(format!("format must be Entities or References, not {f:?}"))),
    };
    let field = |f: &str| {
        kind.fields()
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(f))
            .map(|(n, _)| *n)
            .ok_or_else(|| Error::invalid(format!("cannot sort {} by {f:?}", kind.name())))
    };
    let sort = match (params.get("sortAsc"), params.get("sortDesc")) {
        (Some(_), Some(_)) => return Err(Error::invalid("give sortAsc or sortDesc, not both")),
        (Some(f), None) => Some((field(f)?, true)),
        (None, Some(f)) => Some((field(f)?, false)),
        (None, None) => None,
    };
    let paging = match (number(params, "pageSize")?, number(params, "page")?) {
        (Some(size), page) => (size, page.unwrap_or(1)),
        (None, Some(_)) => return Err(Error::invalid("page needs pageSize")),
        (None, None) => (DEFAULT_PAGE_SIZE, 1),
    };
    let filter = match params.get("filter") {
        None => None,
        Some(text) => {
            let compiled = filter::parse(text)
                .and_then(|e| filter::compile(&e, kind.fields()))
                .map_err(|e| Error::invalid(e.to_string()))?;
            Some((text.to_string(), compiled))
        }
    };
    Ok(Query { kind, shape, sort, paging, filter })
}

/// Percent-encodes a query value (everything but the unreserved characters).
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Query {
    /// The path of this query at another page.
    fn path_at(&self, page: u64) -> String {
        let mut parts = vec![format!("type={}", self.kind.name())];
        parts.push(format!("format={}", if self.shape == Shape::Entity { "Entities" } else { "References" }));
        if let Some((text, _)) = &self.filter {
            parts.push(format!("filter={}", encode(text)));
        }
        if let Some((field, asc)) = self.sort {
            parts.push(format!("{}={field}", if asc { "sortAsc" } else { "sortDesc" }));
        }
        parts.push(format!("pageSize={}&page={page}", self.paging.0));
        format!("/query?{}", parts.join("&"))
    }
}

pub async fn run(state: &EmState, caller: &Caller, ctx: &Ctx, params: &Params) -> EmResult<Element> {
    let q = check(params)?;
    let app = &state.app;
    let (items, total) = match q.kind {
        QueryType::CloudFailoverSession => sessions(state, caller, ctx, &q).await?,
        QueryType::CloudFailoverPlan | QueryType::FailoverPlan => {
            let records = plan_views(app, caller, Shape::Ref).await?.into_iter().map(Record::Plan).collect();
            let (page, total) = filter_sort_page(records, &q, |r, name| r.field(ctx, name));
            let kind = if q.kind == QueryType::FailoverPlan { PlanKind::Plain } else { PlanKind::Cloud };
            let mut items = Vec::with_capacity(page.len());
            for r in page {
                let Record::Plan(view) = r else { continue };
                let view = if q.shape == Shape::Entity { with_vm_names(app, caller, view).await } else { view };
                items.push(views::plan(ctx, &view, kind, q.shape));
            }
            (items, total)
        }
        QueryType::Task => {
            let records = state.tasks.list(caller.tenant_id).into_iter().map(Record::Task).collect();
            let (page, total) = filter_sort_page(records, &q, |r, name| r.field(ctx, name));
            let items = page
                .iter()
                .filter_map(|r| match r {
                    Record::Task(t) if q.shape == Shape::Entity => Some(views::task(ctx, t)),
                    Record::Task(t) => Some(views::task_ref(ctx, t)),
                    _ => None,
                })
                .collect();
            (items, total)
        }
    };
    let (size, page) = q.paging;
    let pages = total.div_ceil(size).max(1);
    let paging_info = views::paging_info(ctx, page, size, pages, |n| q.path_at(n));
    Ok(views::query_result(q.shape, q.kind.plural(), items, paging_info))
}

/// Filters, sorts (stably: ties keep the records' order) and pages records in memory; returns the
/// page and how many passed the filter.
fn filter_sort_page<T>(mut records: Vec<T>, q: &Query, field: impl Fn(&T, &str) -> Option<Value>) -> (Vec<T>, u64) {
    if let Some((_, f)) = &q.filter {
        records.retain(|r| f.matches(&|name: &str| field(r, name)));
    }
    if let Some((name, asc)) = q.sort {
        records.sort_by(|a, b| {
            let o = compare(&field(a, name), &field(b, name));
            if asc { o } else { o.reverse() }
        });
    }
    let total = records.len() as u64;
    let (size, page) = q.paging;
    let start = (page - 1).saturating_mul(size).min(total) as usize;
    let end = (start as u64 + size).min(total) as usize;
    (records.drain(start..end).collect(), total)
}

/// A page of plan sessions: filter, sort and page in the store when they mean the same there;
/// otherwise what the store can narrow, then the rest over summaries here.
async fn sessions(state: &EmState, caller: &Caller, ctx: &Ctx, q: &Query) -> Result<(Vec<Element>, u64), Error> {
    let app = &state.app;
    let (size, page) = q.paging;
    let condition = match &q.filter {
        None => Some(SessionCondition::TRUE),
        Some((_, f)) => session_condition(f, ctx),
    };
    let order = match q.sort {
        None => Some(None),
        Some((field, asc)) => session_order(field).map(|o| o.map(|o| (o, asc))),
    };
    let (summaries, total) = match (condition, order) {
        (Some(condition), Some(order)) => {
            let offset = (page - 1).saturating_mul(size);
            app.session_summaries(caller, &plan_sessions_query(condition, order, offset, size)).await?
        }
        _ => {
            let narrowed = q.filter.as_ref().map_or(SessionCondition::TRUE, |(_, f)| prefilter(f, ctx));
            let query = plan_sessions_query(narrowed, None, 0, SESSION_SUMMARIES_MAX);
            let (all, count) = app.session_summaries(caller, &query).await?;
            if count > SESSION_SUMMARIES_MAX {
                return Err(Error::invalid(format!(
                    "this filter or sort is checked session by session, and {count} sessions would need it \
                     (at most {SESSION_SUMMARIES_MAX}): narrow the filter by Name, State, Result or CreationTime"
                )));
            }
            let records = all.into_iter().map(Record::Session).collect();
            let (page, total) = filter_sort_page(records, q, |r, name| r.field(ctx, name));
            let page = page
                .into_iter()
                .filter_map(|r| match r {
                    Record::Session(s) => Some(s),
                    _ => None,
                })
                .collect();
            (page, total)
        }
    };
    let shape = if q.shape == Shape::Entity { Shape::Entity } else { Shape::Ref };
    Ok((session_elements(app, caller, ctx, &summaries, shape).await?, total))
}

fn compare_op(op: Op) -> CompareOp {
    match op {
        Op::Eq => CompareOp::Eq,
        Op::Ne => CompareOp::Ne,
        Op::Lt => CompareOp::Lt,
        Op::Gt => CompareOp::Gt,
        Op::Le => CompareOp::Le,
        Op::Ge => CompareOp::Ge,
    }
}

/// Whether `op` holds for a value that compares to the filter's value as `ordering`.
fn holds(op: Op, ordering: Ordering) -> bool {
    match op {
        Op::Eq => ordering == Ordering::Equal,
        Op::Ne => ordering != Ordering::Equal,
        Op::Lt => ordering == Ordering::Less,
        Op::Gt => ordering == Ordering::Greater,
        Op::Le => ordering != Ordering::Greater,
        Op::Ge => ordering != Ordering::Less,
    }
}

fn constant(holds: bool) -> SessionCondition {
    if holds { SessionCondition::TRUE } else { SessionCondition::FALSE }
}

/// A time comparison at the store's millisecond precision: a filter time between two
/// milliseconds compares as the millisecond before it does, so the meaning stays exact.
fn time_condition(make: fn(CompareOp, Timestamp) -> SessionCondition, op: Op, t: Timestamp) -> SessionCondition {
    let Some(floor) = chrono::DateTime::from_timestamp_millis(t.timestamp_millis()) else {
        return make(compare_op(op), t);
    };
    if floor == t {
        return make(compare_op(op), t);
    }
    match op {
        Op::Eq => SessionCondition::FALSE,
        Op::Ne => SessionCondition::TRUE,
        Op::Lt | Op::Le => make(CompareOp::Le, floor),
        Op::Gt | Op::Ge => make(CompareOp::Gt, floor),
    }
}

const SESSION_UID_PREFIX: &str = "urn:veeam:cloudfailoversession:";

/// The store's condition that means exactly what the filter means for a session, or `None` when
/// the store cannot say it (`FailureMessage`: the store keeps no lower-cased copy of it).
fn session_condition(c: &Compiled, ctx: &Ctx) -> Option<SessionCondition> {
    let (field, op, value) = match c {
        Compiled::And(v) => {
            return Some(SessionCondition::And(v.iter().map(|c| session_condition(c, ctx)).collect::<Option<_>>()?));
        }
        Compiled::Or(v) => {
            return Some(SessionCondition::Or(v.iter().map(|c| session_condition(c, ctx)).collect::<Option<_>>()?));
        }
        Compiled::Compare { field, op, value } => (*field, *op, value),
    };
    // Text is compared lower-cased on both sides (the filter's value already is).
    let fixed = |actual: String| match value {
        Value::Text(v) => Some(constant(holds(op, actual.to_lowercase().as_str().cmp(v.as_str())))),
        _ => None,
    };
    match (field, value) {
        // `urn:veeam:CloudFailoverSession:<id>`: past the prefix, the id decides; a value that
        // does not start with the prefix differs from every UID within the prefix (or is a
        // proper prefix of it, so smaller), whatever the id.
        ("UID", Value::Text(v)) => Some(match v.strip_prefix(SESSION_UID_PREFIX) {
            Some(id) => SessionCondition::Id(compare_op(op), id.to_string()),
            None => constant(holds(op, SESSION_UID_PREFIX.cmp(v.as_str()))),
        }),
        ("Name", Value::Text(v)) => Some(SessionCondition::NameLowercase(compare_op(op), v.clone())),
        ("Type", _) => fixed("FailoverPlan".into()),
        ("BackupServerUid", _) => fixed(views::uid("BackupServer", ctx.server.id)),
        ("BackupServerName", _) => fixed(ctx.server.name.clone()),
        ("CreationTime", Value::Time(t)) => Some(time_condition(SessionCondition::CreatedAt, op, *t)),
        ("EndTime", Value::Time(t)) => Some(time_condition(SessionCondition::EndedAt, op, *t)),
        ("State", Value::Enum(p)) => Some(SessionCondition::StateIn(
            SESSION_STATES.into_iter().enumerate().filter(|(i, _)| holds(op, i.cmp(p))).map(|(_, s)| s).collect(),
        )),
        ("Result", Value::Enum(p)) => Some(SessionCondition::ResultIn(
            SESSION_RESULTS.into_iter().enumerate().filter(|(i, _)| holds(op, i.cmp(p))).map(|(_, r)| r).collect(),
        )),
        _ => None,
    }
}

/// A condition the store can check that every session the filter passes meets (the filter's
/// parts the store can say exactly; the others are left out, so the store returns more).
fn prefilter(c: &Compiled, ctx: &Ctx) -> SessionCondition {
    if let Some(exact) = session_condition(c, ctx) {
        return exact;
    }
    match c {
        Compiled::And(v) => SessionCondition::And(v.iter().map(|c| prefilter(c, ctx)).collect()),
        Compiled::Or(v) => SessionCondition::Or(v.iter().map(|c| prefilter(c, ctx)).collect()),
        Compiled::Compare { .. } => SessionCondition::TRUE,
    }
}

/// The store's order for a sort field: `Some(None)` when the field is the same for every session
/// (the order stays newest first), `None` when the store cannot sort by it.
fn session_order(field: &str) -> Option<Option<SessionOrder>> {
    Some(Some(match field {
        "UID" => SessionOrder::Id,
        "Name" => SessionOrder::NameLowercase,
        "CreationTime" => SessionOrder::CreatedAt,
        "EndTime" => SessionOrder::EndedAt,
        "State" => SessionOrder::State,
        "Result" => SessionOrder::Result,
        "Type" | "BackupServerUid" | "BackupServerName" => return Some(None),
        _ => return None,
    }))
}

/// The domain values in the order of [`STATES`] and [`RESULTS`].
const SESSION_STATES: [SessionState; 4] =
    [SessionState::Starting, SessionState::Working, SessionState::Stopping, SessionState::Stopped];
const SESSION_RESULTS: [SessionResult; 4] =
    [SessionResult::None, SessionResult::Success, SessionResult::Warning, SessionResult::Failed];

#[cfg(test)]
mod tests {
    use super::super::tasks::TaskState;
    use super::*;
    use drover_types::{SessionResult, SessionState};

    #[test]
    fn enum_positions_follow_the_domain_order() {
        for (i, s) in [SessionState::Starting, SessionState::Working, SessionState::Stopping, SessionState::Stopped]
            .into_iter()
            .enumerate()
        {
            assert_eq!(enum_value(STATES, views::state_name(s)), Some(Value::Enum(i)));
        }
        // Success < Warning < Failed, as the spec orders them and the domain type does.
        let order = [SessionResult::None, SessionResult::Success, SessionResult::Warning, SessionResult::Failed];
        for w in order.windows(2) {
            assert!(w[0] < w[1]);
            let (a, b) = (enum_value(RESULTS, views::result_name(w[0])), enum_value(RESULTS, views::result_name(w[1])));
            assert_eq!(compare(&a, &b), Ordering::Less);
        }
        for (i, t) in TaskState::ALL.into_iter().enumerate() {
            assert_eq!(enum_value(TASK_STATES, t.as_str()), Some(Value::Enum(i)));
        }
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode(r#"Name=="a b";State<=Working"#), "Name%3D%3D%22a%20b%22%3BState%3C%3DWorking");
    }

    #[test]
    fn bad_parameters_are_refused_before_anything_is_read() {
        let params =
            |pairs: &[(&str, &str)]| Params(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        assert!(check(&params(&[])).is_err());
        assert!(check(&params(&[("type", "Vm")])).is_err());
        assert!(check(&params(&[("type", "Task"), ("format", "Everything")])).is_err());
        assert!(check(&params(&[("type", "Task"), ("sortAsc", "Colour")])).is_err());
        assert!(check(&params(&[("type", "Task"), ("pageSize", "0")])).is_err());
        assert!(check(&params(&[("type", "Task"), ("page", "2")])).is_err());
        let e = check(&params(&[("type", "CloudFailoverSession"), ("filter", "State==Working;(Name==x")])).unwrap_err();
        assert!(e.to_string().contains("character 24"), "{e}");
        let q = check(&params(&[("type", "cloudfailoversession"), ("sortDesc", "creationtime"), ("pageSize", "2")]))
            .unwrap();
        assert_eq!(q.sort, Some(("CreationTime", false)));
        assert_eq!(
            q.path_at(3),
            "/query?type=CloudFailoverSession&format=References&sortDesc=CreationTime&pageSize=2&page=3"
        );
    }

    fn ctx() -> Ctx {
        Ctx {
            base: "http://localhost".into(),
            server: views::BackupServer { id: uuid::Uuid::nil(), name: "drover".into(), port: 9419 },
        }
    }

    fn condition(f: &str) -> Option<SessionCondition> {
        session_condition(&filter::compile(&filter::parse(f).unwrap(), SESSION_FIELDS).unwrap(), &ctx())
    }

    #[test]
    fn filters_go_to_the_store_only_where_they_mean_the_same() {
        use SessionCondition as C;
        let id = uuid::Uuid::new_v4();
        // A UID names the id past its prefix; other values compare with the prefix alone.
        assert_eq!(
            condition(&format!("UID==urn:veeam:CloudFailoverSession:{id}")),
            Some(C::Id(CompareOp::Eq, id.to_string()))
        );
        assert_eq!(condition("UID==urn:veeam:Other:x"), Some(C::FALSE));
        assert_eq!(condition("UID>urn:veeam:c"), Some(C::TRUE), "a proper prefix is smaller than every UID");
        assert_eq!(condition("UID<urn:veeam:d"), Some(C::TRUE));
        // Fields that are the same for every session are decided here.
        assert_eq!(condition("Type==failoverplan;BackupServerName==DROVER"), Some(C::And(vec![C::TRUE, C::TRUE])));
        assert_eq!(condition("Type!=FailoverPlan"), Some(C::FALSE));
        // Enums become the values whose position passes.
        assert_eq!(condition("State<Stopping"), Some(C::StateIn(vec![SessionState::Starting, SessionState::Working])));
        assert_eq!(condition("Result>Failed"), Some(C::ResultIn(vec![])));
        // A time between two milliseconds compares as the millisecond before it.
        let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&chrono::Utc);
        assert_eq!(
            condition("CreationTime<2024-01-01T00:00:00.0005Z"),
            Some(C::CreatedAt(CompareOp::Le, t("2024-01-01T00:00:00Z")))
        );
        assert_eq!(condition("EndTime==2024-01-01T00:00:00.0005Z"), Some(C::FALSE));
        assert_eq!(
            condition("EndTime>=2024-01-01T00:00:01Z"),
            Some(C::EndedAt(CompareOp::Ge, t("2024-01-01T00:00:01Z")))
        );
        // FailureMessage is not in the store lower-cased: the whole filter is checked here, after
        // the store narrowed by the parts it can say.
        assert_eq!(condition("Name==a,FailureMessage==x"), None);
        let f = filter::compile(&filter::parse("Name==a;(FailureMessage==x,State==Working)").unwrap(), SESSION_FIELDS)
            .unwrap();
        assert_eq!(
            prefilter(&f, &ctx()),
            C::And(vec![
                C::NameLowercase(CompareOp::Eq, "a".into()),
                C::Or(vec![C::TRUE, C::StateIn(vec![SessionState::Working])])
            ])
        );
    }
}
