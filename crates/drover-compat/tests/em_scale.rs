//! The EM dialect's session lists over a long history (50,000 stored sessions, written through
//! the store in one transaction): the shape of the pages, their links, their order, filters
//! pushed to the store and filters over summaries, the collection's bound, and another tenant
//! seeing none. Shape only: `drover bench em-sessions` measures the time.

#[path = "../../drover-api/tests/common/mod.rs"]
mod common;
mod em_common;

use std::time::Duration;

use common::Server;
use drover_compat::em::handlers::{COLLECTION_MAX, PLAN_SESSION_KINDS};
use drover_compat::em::query::DEFAULT_PAGE_SIZE;
use drover_types::*;
use em_common::*;
use quick_xml::events::Event;
use reqwest::{Method, StatusCode};
use serde_json::json;

const SESSIONS: usize = 50_000;

/// The `UID`s of the `Ref`s of a document, in order, as session ids.
fn ref_ids(xml: &str) -> Vec<SessionId> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut out = Vec::new();
    loop {
        match reader.read_event().unwrap() {
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == b"Ref" => {
                let uid = e.attributes().map(|a| a.unwrap()).find(|a| a.key.as_ref() == b"UID").unwrap();
                let uid = uid.unescape_value().unwrap().into_owned();
                out.push(uid.strip_prefix("urn:veeam:CloudFailoverSession:").unwrap().parse().unwrap());
            }
            Event::Eof => return out,
            _ => {}
        }
    }
}

/// The page number in a `PagingInfo` link, if the link is there.
fn link_page(xml: &str, rel: &str) -> Option<u64> {
    let href = attr(xml, "Link", Some(rel), "Href")?;
    assert!(href.contains("pageSize="), "{href}");
    href.rsplit("page=").next()?.parse().ok()
}

fn paging(xml: &str, name: &str) -> u64 {
    attr(xml, "PagingInfo", None, name).unwrap_or_else(|| panic!("no PagingInfo {name}: {xml:.300}")).parse().unwrap()
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The history: every 7th session is a replication run (not a plan session), one in 97 is named
/// `ÄRGER`, the others `Plan-<i mod 50>`; one in ten failed; spread over the last 40 days, so
/// the newest quarter are inside the collection's 30 days... and more than its bound.
fn history(tenant: TenantId) -> Vec<Session> {
    let now = now();
    (0..SESSIONS)
        .map(|i| {
            let kind =
                if i % 7 == 0 { SessionKind::Replication } else { PLAN_SESSION_KINDS[i % PLAN_SESSION_KINDS.len()] };
            let name = if i % 97 == 0 { "ÄRGER".to_string() } else { format!("Plan-{}", i % 50) };
            let mut s = Session::new(tenant, kind, name, SessionTarget::Plan(PlanId::new()), json!({}));
            // Two sessions share each millisecond: the id breaks the tie.
            s.created_at = now - chrono::Duration::milliseconds(((SESSIONS - i) / 2) as i64 * 138_000);
            s.state = SessionState::Stopped;
            s.ended_at = Some(s.created_at + chrono::Duration::seconds(60));
            if i % 10 == 3 {
                s.result = SessionResult::Failed;
                s.failure_message = Some(format!("check {} failed", i % 3));
            } else {
                s.result = SessionResult::Success;
            }
            s
        })
        .collect()
}

#[tokio::test]
async fn fifty_thousand_sessions_page_filter_and_stay_in_their_tenant() {
    let server = Server::simulated().await;
    let store = server.app.engine().store();
    let tenant = store.user_by_name("admin").await.unwrap().unwrap().0.tenant_id;
    let all = history(tenant);
    let with_tasks: Vec<(Session, Vec<Task>)> = all.iter().map(|s| (s.clone(), Vec::new())).collect();
    store.session_insert_many(&with_tasks).await.unwrap();
    drop(with_tasks);

    // What EM shows: plan sessions, newest first (ties by id, descending).
    let mut plan: Vec<&Session> = all.iter().filter(|s| s.kind != SessionKind::Replication).collect();
    plan.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
    let ids = |list: &[&Session]| list.iter().map(|s| s.id).collect::<Vec<_>>();

    let em = Em::start(&server, Duration::from_secs(900)).await;
    let token = em.logon().await;

    // Pages of 100: count, links, and the right ids in the right order on the first, a middle
    // and the last page.
    let pages = (plan.len() as u64).div_ceil(100);
    let page = |k: u64| format!("/api/query?type=CloudFailoverSession&pageSize=100&page={k}");
    for k in [1, pages / 2, pages] {
        let xml = em.ok(&page(k), &token).await;
        let start = (k as usize - 1) * 100;
        let end = (start + 100).min(plan.len());
        assert_eq!(ref_ids(&xml), ids(&plan[start..end]), "page {k}");
        assert_eq!((paging(&xml, "PageNum"), paging(&xml, "PageSize"), paging(&xml, "PagesCount")), (k, 100, pages));
        assert_eq!(link_page(&xml, "First"), Some(1));
        assert_eq!(link_page(&xml, "Last"), Some(pages));
        assert_eq!(link_page(&xml, "Previous"), (k > 1).then(|| k - 1));
        assert_eq!(link_page(&xml, "Next"), (k < pages).then(|| k + 1));
    }
    // A Next link resolves to the next page.
    let first = em.ok(&page(1), &token).await;
    let next = em.ok(&attr(&first, "Link", Some("Next"), "Href").unwrap(), &token).await;
    assert_eq!(ref_ids(&next), ids(&plan[100..200]));
    // Past the last page: no items, the same page count.
    let beyond = em.ok(&page(pages + 1), &token).await;
    assert_eq!((ref_ids(&beyond).len() as u64, paging(&beyond, "PagesCount")), (0, pages));

    // No pageSize: the default page, with its PagingInfo.
    let default = em.ok("/api/query?type=CloudFailoverSession", &token).await;
    assert_eq!(ref_ids(&default), ids(&plan[..DEFAULT_PAGE_SIZE as usize]));
    assert_eq!(paging(&default, "PageSize"), DEFAULT_PAGE_SIZE);
    assert_eq!(paging(&default, "PagesCount"), (plan.len() as u64).div_ceil(DEFAULT_PAGE_SIZE));

    // A filter the store evaluates (name without case, a creation-time range, a state): exactly
    // the expected sessions, in order.
    let since = plan[plan.len() / 3].created_at;
    let filter = format!("Name==plan-7;CreationTime>={};State==Stopped", since.format("%Y-%m-%dT%H:%M:%SZ"));
    let xml =
        em.ok(&format!("/api/query?type=CloudFailoverSession&pageSize=10000&filter={}", encode(&filter)), &token).await;
    let since_s = since.timestamp();
    let want: Vec<&Session> =
        plan.iter().copied().filter(|s| s.name == "Plan-7" && s.created_at.timestamp() >= since_s).collect();
    assert!(want.len() > 100, "{}", want.len());
    assert_eq!(ref_ids(&xml), ids(&want));
    assert_eq!(paging(&xml, "PagesCount"), 1);

    // Unicode names compare without case too; Result by severity; an OR of them.
    let filter = "Name==ärger,Result>=Warning";
    let xml =
        em.ok(&format!("/api/query?type=CloudFailoverSession&pageSize=10000&filter={}", encode(filter)), &token).await;
    let want: Vec<&Session> =
        plan.iter().copied().filter(|s| s.name == "ÄRGER" || s.result == SessionResult::Failed).collect();
    assert_eq!(ref_ids(&xml), ids(&want));

    // A filter the store cannot say (FailureMessage) is checked over summaries, after what it
    // can say narrowed them; sorted by name (stable: ties stay newest first), one page of it.
    let filter = "FailureMessage==\"CHECK 2 FAILED\";Name!=ärger";
    let xml = em
        .ok(
            &format!("/api/query?type=CloudFailoverSession&sortAsc=Name&pageSize=50&page=3&filter={}", encode(filter)),
            &token,
        )
        .await;
    let mut want: Vec<&Session> = plan
        .iter()
        .copied()
        .filter(|s| s.failure_message.as_deref() == Some("check 2 failed") && s.name != "ÄRGER")
        .collect();
    want.sort_by_key(|s| s.name.to_lowercase());
    assert_eq!(ref_ids(&xml), ids(&want[100..150]));
    assert_eq!(paging(&xml, "PagesCount"), (want.len() as u64).div_ceil(50));

    // The store's sort equals the stable sort: the last page sorted by name, descending.
    let mut by_name = plan.clone();
    by_name.sort_by_key(|s| std::cmp::Reverse(s.name.to_lowercase()));
    let xml =
        em.ok(&format!("/api/query?type=CloudFailoverSession&sortDesc=Name&pageSize=100&page={pages}"), &token).await;
    assert_eq!(ref_ids(&xml), ids(&by_name[(pages as usize - 1) * 100..]));

    // Entities for one page: the page's sessions, each in full.
    let xml = em.ok("/api/query?type=CloudFailoverSession&format=Entities&pageSize=5&page=2", &token).await;
    assert_eq!(count(&xml, "CloudFailoverSession"), 5, "{xml}");
    assert!(xml.contains(&plan[5].id.to_string()) && xml.contains(&plan[9].id.to_string()));

    // The collection: the newest plan sessions of the last 30 days, up to its bound.
    let month_ago = drover_types::now() - chrono::Duration::days(30);
    let recent: Vec<&Session> = plan.iter().copied().filter(|s| s.created_at >= month_ago).collect();
    assert!(recent.len() > COLLECTION_MAX as usize, "the history must exceed the bound");
    let xml = em.ok("/api/cloud/failoverSessions", &token).await;
    assert_eq!(ref_ids(&xml), ids(&recent[..COLLECTION_MAX as usize]));

    // Another tenant sees none of them.
    let native = server.admin().await;
    let acme = server.ok(&native, Method::POST, "/v1/tenants", Some(json!({"name": "acme"}))).await;
    let user = json!({"name": "acme-admin", "password": "password1", "role": "Administrator", "tenant_id": acme["id"]});
    server.ok(&native, Method::POST, "/v1/users", Some(user)).await;
    let other = em.logon_as("acme-admin", "password1").await;
    assert_eq!(other.status, StatusCode::CREATED, "{}", other.body);
    let other = other.headers["X-RestSvcSessionId"].to_str().unwrap().to_string();
    let xml = em.ok("/api/query?type=CloudFailoverSession&pageSize=100", &other).await;
    assert_eq!((ref_ids(&xml).len(), paging(&xml, "PagesCount")), (0, 1));
    let xml = em.ok("/api/query?type=CloudFailoverSession&filter=Name%3D%3Dplan-7", &other).await;
    assert!(ref_ids(&xml).is_empty());
    assert!(ref_ids(&em.ok("/api/cloud/failoverSessions", &other).await).is_empty());
    let a = em.get(&format!("/api/cloud/failoverSessions/{}", plan[0].id), &other).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);

    em.listener.stop().await;
    server.stop().await;
}
