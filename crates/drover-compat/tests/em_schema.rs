//! Every document the EM dialect serves validates against Veeam's own schema, `RestAPI.xsd`
//! (`tests/schema/`, verbatim; the copy validated against has the one mechanical fix of
//! `../shared/spec/em/README.md`: `\:` → `:` in two patterns libxml2 cannot compile).
//!
//! A whole story is played with the simulated hypervisor: a test failover and a failover through
//! the dialect, a failback through the native API (the simulated hypervisor copies no disks, so it
//! halts) and its undo, a successful failback and its commit as the engine records them (session
//! and VM tasks stored directly, as the simulated hypervisor cannot run them), and an undo of the
//! failover through the dialect. Then every `Href` reachable from `GET /api/` is crawled (GET only,
//! this listener only, breadth first, at most 2000 documents), together with the query service for
//! every type in both formats and every collection with `?format=Entity`, and each document is
//! validated with `xmllint` (from libxml2-utils, installed by `scripts/install-deps`; missing, it
//! fails the test).
//!
//! The schema is older than some of what EM serves, so exactly two gaps are allowed, each matched
//! by the element and the child it concerns, never by skipping a document:
//! - `QueryResult/Entities` has no choice for `CloudFailoverSessions`, `CloudFailoverPlans` or
//!   `Tasks`;
//! - a `CloudFailoverSession` entity, shaped as seed 002 (Veeam's own example) shapes it, has no
//!   `JobUid` and `JobName`, and no `FailureMessage` when nothing failed.
//!
//! libxml2 stops checking an element's children at its first unexpected one, so an allowed gap
//! could hide a real error behind it. Each document is therefore checked twice: as served, where
//! every error must be one of the allowed gaps; and repaired, where exactly those gaps are filled
//! (the three session elements inserted where they belong; a query's list replaced by an empty
//! `FailoverPlans` in the `QueryResult` and validated as a document of its own), and which must
//! validate with no error at all.

#[path = "../../drover-api/tests/common/mod.rs"]
mod common;
mod em_common;

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Server;
use drover_types::*;
use em_common::*;
use quick_xml::events::{BytesStart, Event};
use reqwest::{Method, StatusCode};
use serde_json::json;

/// The schema as Veeam ships it.
const SCHEMA: &str = include_str!("schema/RestAPI.xsd");

/// The most documents the crawl reads.
const MAX_DOCUMENTS: usize = 2000;

/// The query service's types and the collections that take `?format=Entity`.
const QUERY_TYPES: [&str; 4] = ["CloudFailoverSession", "CloudFailoverPlan", "FailoverPlan", "Task"];
const COLLECTIONS: [&str; 6] = [
    "/api/backupServers",
    "/api/cloud/failoverSessions",
    "/api/cloud/cloudFailoverPlans",
    "/api/failoverPlans",
    "/api/tasks",
    "/api/logonSessions",
];

/// The lists the schema's `QueryResult/Entities` has no choice for.
const LISTS_MISSING_FROM_ENTITIES: [&str; 3] = ["CloudFailoverSessions", "CloudFailoverPlans", "Tasks"];

/// The schema with the README's fix, in a directory of its own.
struct Validator {
    dir: tempfile::TempDir,
    schema: PathBuf,
}

impl Validator {
    fn new() -> Validator {
        let dir = tempfile::tempdir().unwrap();
        let schema = dir.path().join("RestAPI.fixed.xsd");
        std::fs::write(&schema, SCHEMA.replace("\\:", ":")).unwrap();
        Validator { dir, schema }
    }

    /// xmllint's errors for each document (empty: valid), in one run.
    fn errors(&self, documents: &[String]) -> Vec<Vec<String>> {
        if documents.is_empty() {
            return Vec::new();
        }
        let files: Vec<PathBuf> = documents
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let f = self.dir.path().join(format!("doc-{i:05}.xml"));
                std::fs::write(&f, d).unwrap();
                f
            })
            .collect();
        let out = std::process::Command::new("xmllint")
            .arg("--noout")
            .arg("--schema")
            .arg(&self.schema)
            .args(&files)
            .output()
            .unwrap_or_else(|e| {
                panic!("xmllint cannot run ({e}): install libxml2-utils (scripts/install-deps installs it)")
            });
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("failed to compile"), "the schema does not compile: {stderr}");
        files
            .iter()
            .map(|f| {
                let prefix = format!("{}:", f.display());
                let summary = format!("{} fails to validate", f.display());
                stderr.lines().filter(|l| l.starts_with(&prefix) && *l != summary).map(|l| l.to_string()).collect()
            })
            .collect()
    }
}

/// Whether an error of the document as served is one of the schema's known gaps.
fn allowed(error: &str) -> bool {
    let ns = NS;
    let element =
        |name: &str| format!("Schemas validity error : Element '{{{ns}}}{name}': This element is not expected.");
    // A session entity without JobUid (and JobName) before its JobType.
    if error.contains(&element("JobType")) && error.ends_with(&format!("Expected is ( {{{ns}}}JobUid ).")) {
        return true;
    }
    // A list QueryResult/Entities has no choice for.
    LISTS_MISSING_FROM_ENTITIES.iter().any(|list| {
        error.contains(&element(list))
            && error.contains(&format!("Expected is one of ( {{{ns}}}Jobs, {{{ns}}}FailoverPlans"))
    })
}

/// A document with the schema's gaps filled, and the query lists taken out of it as documents of
/// their own; and how many gaps were filled.
struct Repaired {
    documents: Vec<String>,
    gaps: usize,
}

fn repair(xml: &str) -> Repaired {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut main = quick_xml::Writer::new(Vec::new());
    // A query list being copied out: its writer and its depth.
    let mut extracted: Option<(quick_xml::Writer<Vec<u8>>, usize)> = None;
    let mut documents = Vec::new();
    let mut gaps = 0;
    // The open elements, with the names of the children each has had.
    let mut stack: Vec<(String, Vec<String>)> = Vec::new();
    let text = |name: &str, value: &str| {
        vec![
            Event::Start(BytesStart::new(name.to_string())),
            Event::Text(quick_xml::events::BytesText::new(value).into_owned()),
            Event::End(quick_xml::events::BytesEnd::new(name.to_string())),
        ]
    };
    loop {
        let event = reader.read_event().unwrap().into_owned();
        if let Event::Eof = event {
            break;
        }
        let (name, opens, closes) = match &event {
            Event::Start(e) => (String::from_utf8_lossy(e.name().as_ref()).into_owned(), true, false),
            Event::Empty(e) => (String::from_utf8_lossy(e.name().as_ref()).into_owned(), true, true),
            Event::End(e) => (String::from_utf8_lossy(e.name().as_ref()).into_owned(), false, true),
            _ => (String::new(), false, false),
        };
        if let Some((writer, depth)) = &mut extracted {
            writer.write_event(event.clone()).unwrap();
            if opens && !closes {
                *depth += 1;
            }
            if closes && !opens {
                *depth -= 1;
            }
            if *depth == 0 {
                // The list is a document of its own, with its own gaps (its sessions').
                let (writer, _) = extracted.take().unwrap();
                let inner = repair(&String::from_utf8(writer.into_inner()).unwrap());
                documents.extend(inner.documents);
                gaps += inner.gaps;
            }
            if closes && !opens {
                stack.pop();
            }
            continue;
        }
        let mut before = Vec::new();
        if opens {
            let parent = stack.last().map(|(n, _)| n.as_str()).unwrap_or("");
            let grandparent = stack.len().checked_sub(2).map(|i| stack[i].0.as_str()).unwrap_or("");
            if parent == "CloudFailoverSession" {
                let seen = &stack.last().unwrap().1;
                if name == "JobType" && !seen.iter().any(|c| c == "JobUid") {
                    before.extend(text("JobUid", "urn:veeam:FailoverPlan:00000000-0000-0000-0000-000000000000"));
                    before.extend(text("JobName", "filled in by the schema test"));
                    gaps += 1;
                }
                if name == "CloudFailoverTasks" && !seen.iter().any(|c| c == "FailureMessage") {
                    before.extend(text("FailureMessage", ""));
                    gaps += 1;
                }
            }
            if parent == "Entities"
                && grandparent == "QueryResult"
                && LISTS_MISSING_FROM_ENTITIES.contains(&name.as_str())
            {
                let mut root = match &event {
                    Event::Start(e) | Event::Empty(e) => e.clone(),
                    _ => unreachable!(),
                };
                root.push_attribute(("xmlns", NS));
                let mut writer = quick_xml::Writer::new(Vec::new());
                gaps += 1;
                main.write_event(Event::Empty(BytesStart::new("FailoverPlans"))).unwrap();
                if closes {
                    writer.write_event(Event::Empty(root)).unwrap();
                    documents.push(String::from_utf8(writer.into_inner()).unwrap());
                } else {
                    writer.write_event(Event::Start(root)).unwrap();
                    extracted = Some((writer, 1));
                    stack.last_mut().unwrap().1.push(name.clone());
                    stack.push((name, Vec::new()));
                }
                continue;
            }
            if let Some((_, children)) = stack.last_mut() {
                children.push(name.clone());
            }
        }
        for e in before {
            main.write_event(e).unwrap();
        }
        main.write_event(event).unwrap();
        if opens && !closes {
            stack.push((name, Vec::new()));
        } else if closes && !opens {
            stack.pop();
        }
    }
    documents.insert(0, String::from_utf8(main.into_inner()).unwrap());
    Repaired { documents, gaps }
}

/// What is wrong with each document (by its URL): errors of the document as served that are not
/// an allowed gap, and any error at all of its repaired form.
fn problems(validator: &Validator, documents: &[(String, String)]) -> Vec<String> {
    let served = validator.errors(&documents.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>());
    let repaired: Vec<Repaired> = documents.iter().map(|(_, d)| repair(d)).collect();
    let flat: Vec<String> = repaired.iter().flat_map(|r| r.documents.clone()).collect();
    let mut repaired_errors = validator.errors(&flat).into_iter();
    let mut out = Vec::new();
    for (((url, document), errors), repaired) in documents.iter().zip(served).zip(&repaired) {
        for e in errors.iter().filter(|e| !allowed(e)) {
            out.push(format!("{url}: {e}\n{document}"));
        }
        if !errors.is_empty() && repaired.gaps == 0 {
            out.push(format!("{url}: errors without a known gap to explain them: {errors:?}"));
        }
        for part in &repaired.documents {
            for e in repaired_errors.next().unwrap() {
                out.push(format!("{url} (with the schema's known gaps filled): {e}\n{part}"));
            }
        }
    }
    out
}

/// The story's state: two plans, and every kind of session EM shows.
async fn story(server: &Server, em: &Em, token: &str) {
    let t = server.admin().await;
    let (host, ds) = server.infrastructure(&t).await;
    let web = replicated_vm(server, &t, &host, &ds, "web").await;
    let db = replicated_vm(server, &t, &host, &ds, "db").await;
    let plan_id = plan(server, &t, "ABC Company Failover Plan", &[&web, &db]).await;
    plan(server, &t, "Idle Plan", &[&web]).await;
    let spec = format!(
        r#"<CloudFailoverPlanManagementSpec xmlns="{NS}"><StartNow>true</StartNow></CloudFailoverPlanManagementSpec>"#
    );
    let act = |path: String| {
        let spec = spec.clone();
        async move {
            let task = em.send(Method::POST, &path, Token::Header(token), false, Some(("application/xml", spec))).await;
            assert_eq!(task.status, StatusCode::ACCEPTED, "POST {path}: {}", task.body);
            let session = attr(&task.body, "Link", Some("Related"), "Href").unwrap();
            let done = until_stopped(em, &session, token).await;
            assert_eq!(text(&done, "Result").as_deref(), Some("Success"), "{done}");
            done
        }
    };

    // A test failover, then the failover, through the dialect.
    act(format!("/api/cloud/cloudFailoverPlans/{plan_id}?action=test")).await;
    let failover = act(format!("/api/cloud/cloudFailoverPlans/{plan_id}?action=start")).await;
    let booted = sorted(vm_tasks(&failover));
    assert_eq!(booted.len(), 2, "{failover}");
    assert!(booted.iter().all(|t| t.point_type == "VmReplicaPointReference"), "{failover}");

    // Failback through the native API: the simulated hypervisor copies no disks, so it halts;
    // its undo takes the plan back to FAILOVER.
    let failback = server.ok(&t, Method::POST, &format!("/v1/plans/{plan_id}/failback"), Some(json!({}))).await;
    let failback = failback["session_id"].as_str().unwrap().to_string();
    let halted = server.wait_session(&t, &failback, Duration::from_secs(60)).await;
    assert_eq!(halted["halted"], true, "{halted}");
    let undo = server.ok(&t, Method::POST, &format!("/v1/plans/{plan_id}/undo"), Some(json!({}))).await;
    server.wait_session(&t, undo["session_id"].as_str().unwrap(), Duration::from_secs(60)).await;

    // A failback that succeeded and its commit, as the engine records them.
    let store = server.app.engine().store();
    let tenant = store.user_by_name("admin").await.unwrap().unwrap().0.tenant_id;
    let plan_uuid: uuid::Uuid = plan_id.parse().unwrap();
    for kind in [SessionKind::PlanFailback, SessionKind::PlanCommitFailback] {
        let mut s =
            Session::new(tenant, kind, "ABC Company Failover Plan", SessionTarget::Plan(PlanId(plan_uuid)), json!({}));
        s.state = SessionState::Stopped;
        s.result = SessionResult::Success;
        s.progress = 100;
        s.ended_at = Some(drover_types::now());
        let tasks: Vec<Task> = [(&web, "web"), (&db, "db")]
            .into_iter()
            .map(|(vm, name)| {
                let mut task = s.task(Some(VmId(vm.parse().unwrap())), name);
                task.state = SessionState::Stopped;
                task.result = SessionResult::Success;
                task.progress = 100;
                task.ended_at = s.ended_at;
                task
            })
            .collect();
        store.session_insert(&s, &tasks).await.unwrap();
        // Each VM names the point the failover booted it from.
        let entity = em.ok(&format!("/api/cloud/failoverSessions/{}?format=Entity", s.id), token).await;
        assert_eq!(sorted(vm_tasks(&entity)), booted, "{entity}");
    }

    // Undo of the failover through the non-cloud view of the plan.
    let undone = act(format!("/api/failoverPlans/{plan_id}?action=undo")).await;
    assert_eq!(sorted(vm_tasks(&undone)), booted, "{undone}");
}

fn sorted(mut tasks: Vec<VmTask>) -> Vec<VmTask> {
    tasks.sort_by(|a, b| a.vm_name.cmp(&b.vm_name));
    tasks
}

/// Breadth first from `start`, GET only, this listener only: every document, by URL.
async fn crawl(em: &Em, token: &str, start: Vec<String>) -> Vec<(String, String)> {
    let mut seen = BTreeSet::new();
    let mut queue: VecDeque<String> = start.into_iter().map(|p| em.url(&p)).collect();
    let mut documents = Vec::new();
    while let Some(url) = queue.pop_front() {
        assert!(url.starts_with(&format!("{}/api", em.base)), "{url} is not on this listener ({})", em.base);
        if !seen.insert(url.clone()) {
            continue;
        }
        assert!(documents.len() < MAX_DOCUMENTS, "more than {MAX_DOCUMENTS} documents: {url}");
        let a = em.get(&url, token).await;
        assert_eq!(a.status, StatusCode::OK, "GET {url}: {}", a.body);
        queue.extend(hrefs(&a.body));
        documents.push((url, a.body));
    }
    documents
}

#[tokio::test]
async fn every_document_reachable_after_a_whole_story_validates_against_the_schema() {
    let validator = Validator::new();
    let server = Server::simulated().await;
    let em = Em::start(&server, Duration::from_secs(900)).await;
    let token = em.logon().await;
    story(&server, &em, &token).await;

    let mut start = vec!["/api/".to_string()];
    for kind in QUERY_TYPES {
        for format in ["References", "Entities"] {
            start.push(format!("/api/query?type={kind}&format={format}"));
            start.push(format!("/api/query?type={kind}&format={format}&pageSize=1&page=2"));
        }
    }
    start.extend(COLLECTIONS.iter().map(|c| format!("{c}?format=Entity")));
    let mut documents = crawl(&em, &token, start).await;

    // What the crawl must have reached: every kind of document of the story.
    let reached = |needle: &str| documents.iter().filter(|(u, _)| u.contains(needle)).count();
    assert!(documents.len() >= 60, "only {} documents", documents.len());
    for needle in ["/includes/", "/vmReplicaPoints/", "/tasks/task-", "/logonSessions/", "/backupServers/"] {
        assert!(reached(needle) > 0, "no document under {needle}");
    }
    // Every session of the story (test failover, failover, the halted failback undone, the
    // stored failback and commit, the undo of the failover), as a reference and as an entity.
    let sessions = em.ok("/api/cloud/failoverSessions", &token).await;
    let refs: Vec<String> =
        hrefs(&sessions).into_iter().filter(|h| !h.contains('?') && h.contains("/failoverSessions/")).collect();
    assert_eq!(refs.len(), 6, "{sessions}");
    for r in refs {
        assert!(documents.iter().any(|(u, _)| *u == r), "{r} not reached");
        assert!(documents.iter().any(|(u, _)| *u == format!("{r}?format=Entity")), "{r}?format=Entity not reached");
    }
    // Documents that are answers to other methods: a POST's Task, errors.
    let task = em.send(Method::POST, "/api/sessionMngr/?v=latest", Token::None, false, None).await;
    assert_eq!(task.status, StatusCode::UNAUTHORIZED);
    documents.push(("POST /api/sessionMngr/ without credentials".into(), task.body));
    let missing = em.get("/api/failoverPlans/00000000-0000-0000-0000-000000000000", &token).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    documents.push(("GET a plan that does not exist".into(), missing.body));
    let bad = em.get("/api/query?type=CloudFailoverSession&filter=(Name", &token).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    documents.push(("GET a malformed query".into(), bad.body));

    let problems = problems(&validator, &documents);
    assert!(
        problems.is_empty(),
        "{} problems in {} documents:\n\n{}",
        problems.len(),
        documents.len(),
        problems.join("\n\n")
    );

    em.listener.stop().await;
    server.stop().await;
}

fn golden(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/em").join(name)).unwrap()
}

/// The checker itself: the golden documents pass (the two gaps only where they are), and an
/// error next to a gap, or hidden behind it, is still reported.
#[test]
fn the_allowed_gaps_are_matched_precisely() {
    let validator = Validator::new();
    let doc = |name: &str| (name.to_string(), golden(name));
    let good: Vec<_> = [
        "cloud_failover_session_seed.xml",
        "cloud_failover_session_running.xml",
        "cloud_failover_session_failed.xml",
        "cloud_failover_sessions_entities.xml",
        "query_result_entities.xml",
        "query_result.xml",
        "cloud_failover_plan.xml",
        "failover_plan.xml",
        "task.xml",
    ]
    .into_iter()
    .map(doc)
    .collect();
    assert_eq!(problems(&validator, &good), Vec::<String>::new());
    assert_eq!(repair(&golden("cloud_failover_session_seed.xml")).gaps, 2, "JobUid+JobName, FailureMessage");
    assert_eq!(repair(&golden("cloud_failover_session_failed.xml")).gaps, 1, "it has its FailureMessage");
    assert_eq!(repair(&golden("query_result.xml")).gaps, 0, "Refs are in the schema");

    let running = golden("cloud_failover_session_running.xml");
    let bad = [
        // Behind the session's gap: the per-VM items under the name the schema does not have.
        (
            "old task name",
            running
                .replace("<CloudFailoverTasks VmName", "<CloudFailoverTask VmName")
                .replace("</FailureMessage>\n    </CloudFailoverTasks>", "</FailureMessage>\n    </CloudFailoverTask>"),
        ),
        // A VM without its VmReplicaPointLink.
        ("no point link", {
            let start = running.find("<VmReplicaPointLink").unwrap();
            let end = start + running[start..].find("/>").unwrap() + 2;
            format!("{}{}", &running[..start], &running[end..])
        }),
        // A query result without PagingInfo, whose list is a gap.
        ("no paging", {
            let q = golden("query_result_entities.xml");
            let start = q.find("<PagingInfo").unwrap();
            let end = q.find("</PagingInfo>").unwrap() + "</PagingInfo>".len();
            format!("{}{}", &q[..start], &q[end..])
        }),
        // A session that has JobUid but no JobName is not the seed's shape.
        ("half a job", running.replace("<JobType>", "<JobUid>urn:veeam:FailoverPlan:x</JobUid>\n  <JobType>")),
    ];
    for (what, xml) in bad {
        let p = problems(&validator, &[(what.to_string(), xml)]);
        assert!(!p.is_empty(), "{what}: not reported");
    }
}
