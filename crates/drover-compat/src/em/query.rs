//! The query service (spec 2.4): `GET /api/query?type=...` with `format`, `sortAsc`/`sortDesc`,
//! `pageSize`/`page` and `filter`.
//!
//! Every parameter is checked before anything is read, so a bad query is a 400 whatever the data.
//! Records are read through the application layer (as the collections are), then filtered,
//! sorted and paged here: the volumes are those of a control plane (plans, a month of plan
//! sessions), not of a backup catalogue.

use std::cmp::Ordering;

use drover_engine::app::Caller;
use drover_types::{Error, Plan, Session};

use super::EmState;
use super::filter::{self, Compiled, FieldType, Value};
use super::handlers::{Params, plan_sessions, plan_view, session_details};
use super::render::{Element, EmResult};
use super::tasks::EmTask;
use super::views::{self, Ctx, PlanKind, PlanView, Shape};

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
    Session(Session),
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
    paging: Option<(u64, u64)>,
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
        (Some(size), page) => Some((size, page.unwrap_or(1))),
        (None, Some(_)) => return Err(Error::invalid("page needs pageSize")),
        (None, None) => None,
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
        if let Some((size, _)) = self.paging {
            parts.push(format!("pageSize={size}&page={page}"));
        }
        format!("/query?{}", parts.join("&"))
    }
}

pub async fn run(state: &EmState, caller: &Caller, ctx: &Ctx, params: &Params) -> EmResult<Element> {
    let q = check(params)?;
    let app = &state.app;
    let mut records: Vec<Record> = match q.kind {
        QueryType::CloudFailoverSession => {
            let since = chrono::DateTime::from_timestamp(0, 0).unwrap_or_default();
            plan_sessions(app, caller, since).await?.into_iter().map(Record::Session).collect()
        }
        QueryType::CloudFailoverPlan | QueryType::FailoverPlan => {
            let mut plans = app.list::<Plan>(caller).await?;
            plans.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
            let mut out = Vec::with_capacity(plans.len());
            for p in plans {
                out.push(Record::Plan(plan_view(app, caller, p).await?));
            }
            out
        }
        QueryType::Task => state.tasks.list(caller.tenant_id).into_iter().map(Record::Task).collect(),
    };
    if let Some((_, f)) = &q.filter {
        records.retain(|r| f.matches(&|name: &str| r.field(ctx, name)));
    }
    if let Some((field, asc)) = q.sort {
        records.sort_by(|a, b| {
            let o = compare(&a.field(ctx, field), &b.field(ctx, field));
            if asc { o } else { o.reverse() }
        });
    }
    let total = records.len() as u64;
    // Without pageSize, everything is one page (`PagingInfo` is always there: the schema says so).
    let mut paging_info = views::paging_info(ctx, 1, total, 1, |n| q.path_at(n));
    if let Some((size, page)) = q.paging {
        let pages = total.div_ceil(size).max(1);
        let start = ((page - 1).saturating_mul(size)).min(total) as usize;
        let end = (start as u64 + size).min(total) as usize;
        records = records.drain(start..end).collect();
        paging_info = views::paging_info(ctx, page, size, pages, |n| q.path_at(n));
    }
    let mut items = Vec::with_capacity(records.len());
    for r in &records {
        items.push(match r {
            Record::Session(s) => {
                let (tasks, points) = if q.shape == Shape::Entity {
                    session_details(app, caller, s.id).await?
                } else {
                    Default::default()
                };
                views::cloud_failover_session(ctx, s, &tasks, &points, q.shape)
            }
            Record::Plan(v) => {
                let kind = if q.kind == QueryType::FailoverPlan { PlanKind::Plain } else { PlanKind::Cloud };
                views::plan(ctx, v, kind, q.shape)
            }
            Record::Task(t) if q.shape == Shape::Entity => views::task(ctx, t),
            Record::Task(t) => views::task_ref(ctx, t),
        });
    }
    Ok(views::query_result(q.shape, q.kind.plural(), items, paging_info))
}

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
}
