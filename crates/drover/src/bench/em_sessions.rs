//! `drover bench em-sessions`: the Enterprise Manager dialect's session lists at a long history.
//!
//! `--sessions` plan sessions (two VM tasks each) are written straight through the store in one
//! transaction, spread over the last 60 days, into the tenant of the bootstrapped `admin`. The
//! server is the one `drover serve` runs (SQLite store, application layer, the EM router on a
//! loopback listener, plain HTTP), in this process so its memory can be read from
//! `/proc/self/status`; its engine is not started (no session runs; only reads are measured).
//! Each request type is sent `--runs` times, one after another on one keep-alive connection, after
//! one unmeasured warm-up request.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use drover_engine::Engine;
use drover_engine::app::App;
use drover_store::Store;
use drover_types::{PlanId, Session, SessionResult, SessionState, SessionTarget, VmId};
use serde::Serialize;

#[derive(Debug, Args)]
pub struct EmSessionsArgs {
    /// Plan sessions to store.
    #[arg(long, default_value_t = 50_000)]
    pub sessions: u64,
    /// Requests of each type.
    #[arg(long, default_value_t = 30)]
    pub runs: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct Timing {
    pub request: String,
    pub path: String,
    pub runs: usize,
    pub min_ms: f64,
    pub median_ms: f64,
    pub p99_ms: f64,
    /// Size of the answer's body.
    pub bytes: usize,
    /// The process's resident memory after these requests.
    pub rss_after_kib: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub sessions: u64,
    pub insert_seconds: f64,
    pub timings: Vec<Timing>,
    /// The process's resident memory after the insert, before the first request.
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    /// The process's peak resident memory (VmHWM), at the end.
    pub rss_peak_kib: Option<u64>,
}

const PASSWORD: &str = "bench-password";
const PLAN_NAMES: u64 = 50;

/// A line of `/proc/self/status`, in KiB.
fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The sessions of the history: plan `plan-<i mod 50>`, every kind of plan session in turn,
/// mostly finished (one in ten failed), the newest ten still working.
fn history(tenant: drover_types::TenantId, count: u64) -> Vec<(Session, Vec<drover_types::Task>)> {
    let now = drover_types::now();
    let span_ms = 60 * 24 * 3600 * 1000 / count.max(1) as i64;
    let plans: Vec<PlanId> = (0..PLAN_NAMES).map(|_| PlanId::new()).collect();
    let kinds = drover_compat::em::handlers::PLAN_SESSION_KINDS;
    (0..count)
        .map(|i| {
            let age = chrono::Duration::milliseconds(span_ms * (count - i) as i64);
            let plan = (i % PLAN_NAMES) as usize;
            let mut s = Session::new(
                tenant,
                kinds[i as usize % kinds.len()],
                format!("plan-{plan}"),
                SessionTarget::Plan(plans[plan]),
                serde_json::json!({"plan_id": plans[plan], "point_date": null, "options": {"quick": false}}),
            );
            s.created_at = now - age;
            if i + 10 < count {
                s.state = SessionState::Stopped;
                s.progress = 100;
                s.ended_at = Some(s.created_at + chrono::Duration::minutes(3));
                if i % 10 == 3 {
                    s.result = SessionResult::Failed;
                    s.failure_message = Some(format!("VM app-{plan}-2 did not answer its check {i}"));
                } else {
                    s.result = SessionResult::Success;
                }
            } else {
                s.state = SessionState::Working;
            }
            let tasks = (1..=2)
                .map(|n| {
                    let mut t = s.task(Some(VmId::new()), format!("app-{plan}-{n}"));
                    t.state = s.state;
                    t.result = s.result;
                    t.progress = s.progress;
                    t.ended_at = s.ended_at;
                    t
                })
                .collect();
            (s, tasks)
        })
        .collect()
}

/// Percent-encodes a query value.
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

fn xml_attr(body: &str, name: &str) -> Option<String> {
    let start = body.find(&format!(" {name}=\""))? + name.len() + 3;
    let end = body[start..].find('"')?;
    Some(body[start..start + end].to_string())
}

async fn get(http: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<String> {
    let resp = http.get(url).header("X-RestSvcSessionId", token).send().await?;
    let status = resp.status();
    let body = resp.text().await?;
    if !status.is_success() {
        bail!("GET {url}: {status}: {body}");
    }
    Ok(body)
}

async fn measure(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    request: &str,
    path: &str,
    runs: usize,
) -> anyhow::Result<Timing> {
    let url = format!("{base}{path}");
    let bytes = get(http, &url, token).await?.len();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        get(http, &url, token).await?;
        times.push(start.elapsed());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1];
    Ok(Timing {
        request: request.into(),
        path: path.into(),
        runs,
        min_ms: ms(times[0]),
        median_ms: ms(at(0.5)),
        p99_ms: ms(at(0.99)),
        bytes,
        rss_after_kib: status_kib("VmRSS:"),
    })
}

pub async fn em_sessions(args: &EmSessionsArgs) -> anyhow::Result<Report> {
    if args.runs == 0 || args.sessions == 0 {
        bail!("--runs and --sessions must be at least 1");
    }
    let dir = tempfile::tempdir()?;
    let store = Store::open_sqlite(&dir.path().join("drover.db")).await?;
    let config = drover_engine::EngineConfig { work_dir: dir.path().join("work"), ..Default::default() };
    let engine = Engine::new(store.clone(), std::sync::Arc::new(drover_hv::sim::SimulatedHypervisor::new()), config);
    let app = App::new(engine);
    app.bootstrap(Some(PASSWORD.into())).await?;
    let tenant = store.user_by_name("admin").await?.context("no admin after bootstrap")?.0.tenant_id;

    let sessions = history(tenant, args.sessions);
    let start = Instant::now();
    store.session_insert_many(&sessions).await?;
    let insert_seconds = start.elapsed().as_secs_f64();
    let newest = sessions.last().map(|(s, _)| s.id).context("no sessions")?;
    // The message of the newest failed session: a filter no index serves, matched by one.
    let failure = sessions.iter().rev().find_map(|(s, _)| s.failure_message.clone()).unwrap_or_default();
    let ten_days_ago = (drover_types::now() - chrono::Duration::days(10)).format("%Y-%m-%dT%H:%M:%SZ");
    drop(sessions);

    let em = drover_compat::em::EmConfig { scheme: "http", ..Default::default() };
    let listener = drover_api::listen(
        drover_compat::em::router_with(app.clone(), em),
        "127.0.0.1:0".parse()?,
        drover_api::Tls::Plain,
    )
    .await?;
    let base = format!("{}/api", listener.url());
    let http = reqwest::Client::new();
    let resp = http.post(format!("{base}/sessionMngr/?v=latest")).basic_auth("admin", Some(PASSWORD)).send().await?;
    if resp.status() != reqwest::StatusCode::CREATED {
        bail!("logon: {}", resp.status());
    }
    let token = resp.headers().get("X-RestSvcSessionId").context("no logon token")?.to_str()?.to_string();
    let rss_before_kib = status_kib("VmRSS:");
    // The peak from here on, not the history built for the insert (Linux: 5 resets VmHWM).
    let _ = std::fs::write("/proc/self/clear_refs", "5");

    let first = get(&http, &format!("{base}/query?type=CloudFailoverSession&pageSize=100&page=1"), &token).await?;
    let pages: u64 = xml_attr(&first, "PagesCount").and_then(|p| p.parse().ok()).unwrap_or(1);
    let page = |k: u64| format!("/query?type=CloudFailoverSession&pageSize=100&page={k}");
    let requests = [
        ("collection (30 days)", "/cloud/failoverSessions".to_string()),
        ("query page 1", page(1)),
        ("query middle page", page(pages.div_ceil(2))),
        ("query last page", page(pages)),
        ("query page 1, Entities", format!("{}&format=Entities", page(1))),
        (
            "query by Name and CreationTime",
            format!("{}&filter={}", page(1), encode(&format!("Name==plan-7;CreationTime>={ten_days_ago}"))),
        ),
        (
            "query by FailureMessage (over summaries)",
            format!("{}&filter={}", page(1), encode(&format!("FailureMessage==\"{failure}\""))),
        ),
        ("query sorted by Name, last page", format!("{}&sortAsc=Name", page(pages))),
        ("one session, Entity", format!("/cloud/failoverSessions/{newest}?format=Entity")),
    ];
    let mut timings = Vec::new();
    for (request, path) in &requests {
        timings.push(measure(&http, &base, &token, request, path, args.runs).await?);
    }
    let report = Report {
        sessions: args.sessions,
        insert_seconds,
        timings,
        rss_before_kib,
        rss_after_kib: status_kib("VmRSS:"),
        rss_peak_kib: status_kib("VmHWM:"),
    };
    listener.stop().await;
    Ok(report)
}

fn mib(k: Option<u64>) -> String {
    k.map(|k| format!("{:.1} MiB", k as f64 / 1024.0)).unwrap_or_else(|| "?".into())
}

pub fn print_report(r: &Report) {
    println!("{} plan sessions stored in {:.2} s", r.sessions, r.insert_seconds);
    println!(
        "  {:<42} {:>5} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "request", "runs", "min ms", "median ms", "p99 ms", "bytes", "RSS after"
    );
    for t in &r.timings {
        println!(
            "  {:<42} {:>5} {:>10.2} {:>10.2} {:>10.2} {:>10} {:>12}",
            t.request,
            t.runs,
            t.min_ms,
            t.median_ms,
            t.p99_ms,
            t.bytes,
            mib(t.rss_after_kib)
        );
    }
    println!(
        "  server RSS before the requests {}, after {}, peak {}",
        mib(r.rss_before_kib),
        mib(r.rss_after_kib),
        mib(r.rss_peak_kib)
    );
}
