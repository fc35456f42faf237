//! Following a session until it stops or halts.
//!
//! The server pushes `GET /v1/sessions/{id}/events` as `text/event-stream`: a `session` event
//! (the session with its tasks) whenever it changes and a `log` event per log line, ending when
//! the session stops or halts. The stream is parsed here by hand (the format is a few line
//! rules). When it breaks, or goes silent for longer than the server's keep-alive allows, the
//! client falls back to polling the session and its log every 500 ms; the log's sequence numbers
//! make the switch lose or repeat nothing. `DROVER_FOLLOW=poll` skips the stream altogether, for
//! proxies that buffer event streams. At the end the session is fetched once more, and that
//! answer is what `--output json` prints.

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::{Context, anyhow};
use drover_api::views::{LogEntryView, SessionView};
use drover_types::{LogLevel, SessionState};
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

use super::api::{Api, Request};
use super::render::{local_time, wire_name};

/// The server sends a keep-alive comment every 15 s; three missed ones mean the stream is dead.
const STREAM_IDLE_LIMIT: Duration = Duration::from_secs(45);
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Consecutive failed polls tolerated (a server restart takes a few seconds) before giving up.
const POLL_FAILURES_TOLERATED: u32 = 20;

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Incremental `text/event-stream` parser: feed it bytes as they arrive, take whole events out.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    event: String,
    data: Vec<String>,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buffer.extend_from_slice(bytes);
        let mut out = Vec::new();
        // Lines end with \n (or \r\n); a partial line waits for the next chunk, since a chunk can
        // split anywhere, even inside a UTF-8 character.
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw[..raw.len() - 1]);
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if line.is_empty() {
                // A blank line dispatches; an event without data is nothing (the spec says so).
                let event = std::mem::take(&mut self.event);
                if !self.data.is_empty() {
                    let data = std::mem::take(&mut self.data).join("\n");
                    out.push(SseEvent { event: if event.is_empty() { "message".into() } else { event }, data });
                }
                continue;
            }
            if line.starts_with(':') {
                continue; // a comment: the keep-alive
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "event" => self.event = value.to_string(),
                "data" => self.data.push(value.to_string()),
                _ => {} // id, retry: not used by drover
            }
        }
        out
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// A progress bar on a terminal.
    Bar,
    /// Log lines on stderr (not a terminal, e.g. CI logs).
    Lines,
    /// Nothing: stdout carries JSON and stderr stays clean for the caller.
    Quiet,
}

impl Display {
    pub fn choose(json: bool) -> Self {
        if json {
            Display::Quiet
        } else if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            Display::Bar
        } else {
            Display::Lines
        }
    }
}

/// Where a followed session ended.
#[derive(Debug)]
pub struct Outcome {
    pub session: SessionView,
    /// `GET /v1/sessions/{id}` as the server sent it.
    pub raw: Vec<u8>,
}

struct Progress {
    display: Display,
    bar: Option<ProgressBar>,
    last_seq: i64,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress").field("display", &self.display).field("last_seq", &self.last_seq).finish()
    }
}

impl Progress {
    fn new(display: Display, id: Uuid) -> Self {
        let bar = (display == Display::Bar).then(|| {
            let bar = ProgressBar::new(100);
            let style = ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos:>3}% {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(format!("session {}", short(id)));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Progress { display, bar, last_seq: 0 }
    }

    fn log(&mut self, e: &LogEntryView) {
        // Replays after a reconnect or a switch to polling are skipped by sequence number.
        if e.seq <= self.last_seq {
            return;
        }
        self.last_seq = e.seq;
        let line = format!("{} {:<7} {}", local_time(&e.at), wire_name(&e.level), e.message);
        match (&self.bar, self.display) {
            (Some(bar), _) => {
                // Warnings and errors stay on screen above the bar; the rest only as its message.
                if e.level != LogLevel::Info {
                    bar.println(&line);
                }
                bar.set_message(e.message.clone());
            }
            (None, Display::Lines) => eprintln!("{line}"),
            _ => {}
        }
    }

    fn session(&mut self, s: &SessionView) {
        if let Some(bar) = &self.bar {
            bar.set_prefix(s.name.clone());
            bar.set_position(u64::from(s.progress.min(100)));
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn short(id: Uuid) -> String {
    id.to_string()[..8].to_string()
}

fn is_done(s: &SessionView) -> bool {
    s.state == SessionState::Stopped || s.halted
}

/// Follows session `id` until it stops or halts. Ctrl-C stops following, not the session.
pub async fn follow(api: &Api, id: Uuid, display: Display) -> anyhow::Result<Outcome> {
    let mut progress = Progress::new(display, id);
    let poll_only = std::env::var("DROVER_FOLLOW").is_ok_and(|v| v == "poll");
    let watched = async {
        let end = if poll_only {
            StreamEnd::Broken("DROVER_FOLLOW=poll".into())
        } else {
            stream(api, id, &mut progress).await?
        };
        match end {
            StreamEnd::Done => {}
            StreamEnd::Broken(why) => {
                tracing::debug!(%why, "event stream ended early; polling instead");
                poll(api, id, &mut progress).await?;
            }
        }
        anyhow::Ok(())
    };
    let result = tokio::select! {
        r = watched => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!(
            "stopped following session {id}; it goes on on the server (`drover session watch {id}` to follow it again)"
        )),
    };
    if result.is_ok() {
        // The last lines (e.g. "finished") may be written just after the state that ended the
        // stream; pick them up. Only a nicety, so a failure here is ignored.
        let _ = catch_up_log(api, id, &mut progress).await;
    }
    progress.finish();
    result?;
    let resp = api.send(Request::get(&format!("/sessions/{id}"))).await?;
    Ok(Outcome { session: resp.parse()?, raw: resp.body })
}

enum StreamEnd {
    Done,
    Broken(String),
}

/// Reads the event stream. An API error (unknown session, no right to it) is fatal; a broken
/// or stalled stream is not, the caller polls instead.
async fn stream(api: &Api, id: Uuid, progress: &mut Progress) -> anyhow::Result<StreamEnd> {
    let path = format!("/sessions/{id}/events");
    let resp = match api.send_raw(Request::get(&path).no_timeout()).await {
        Ok(r) => r,
        Err(e) if e.downcast_ref::<super::api::ApiError>().is_some() => return Err(e),
        Err(e) => return Ok(StreamEnd::Broken(format!("{e:#}"))),
    };
    let mut bytes = resp.bytes_stream();
    let mut parser = SseParser::default();
    loop {
        let chunk = match tokio::time::timeout(STREAM_IDLE_LIMIT, bytes.next()).await {
            Err(_) => return Ok(StreamEnd::Broken("no data or keep-alive for 45 s".into())),
            Ok(None) => return Ok(StreamEnd::Broken("the server closed the stream".into())),
            Ok(Some(Err(e))) => return Ok(StreamEnd::Broken(e.to_string())),
            Ok(Some(Ok(c))) => c,
        };
        for event in parser.push(&chunk) {
            match event.event.as_str() {
                "log" => match serde_json::from_str::<LogEntryView>(&event.data) {
                    Ok(e) => progress.log(&e),
                    Err(e) => tracing::debug!(%e, "unreadable log event"),
                },
                "session" => {
                    let s: SessionView = serde_json::from_str(&event.data).context("unreadable session event")?;
                    progress.session(&s);
                    if is_done(&s) {
                        return Ok(StreamEnd::Done);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Polls the session and its log until it stops or halts.
async fn poll(api: &Api, id: Uuid, progress: &mut Progress) -> anyhow::Result<()> {
    let mut failures = 0u32;
    loop {
        match poll_once(api, id, progress).await {
            Ok(true) => return Ok(()),
            Ok(false) => failures = 0,
            Err(e) if e.downcast_ref::<super::api::ApiError>().is_some() => return Err(e),
            Err(e) => {
                failures += 1;
                if failures > POLL_FAILURES_TOLERATED {
                    return Err(e.context(format!(
                        "lost contact while following session {id}; it goes on on the server (`drover session watch {id}`)"
                    )));
                }
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn catch_up_log(api: &Api, id: Uuid, progress: &mut Progress) -> anyhow::Result<()> {
    let log_path = format!("/sessions/{id}/log");
    let page: drover_api::views::Page<LogEntryView> =
        api.send(Request::get(&log_path).query("after", progress.last_seq)).await?.parse()?;
    for e in &page.items {
        progress.log(e);
    }
    Ok(())
}

async fn poll_once(api: &Api, id: Uuid, progress: &mut Progress) -> anyhow::Result<bool> {
    catch_up_log(api, id, progress).await?;
    let s: SessionView = api.send(Request::get(&format!("/sessions/{id}"))).await?.parse()?;
    progress.session(&s);
    Ok(is_done(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_anywhere() {
        let text = ": keep-alive\n\nevent: log\ndata: {\"a\":1}\n\nevent: session\r\ndata: x\r\ndata: y\r\n\r\ndata: plain\n\n";
        let expected = vec![
            SseEvent { event: "log".into(), data: "{\"a\":1}".into() },
            SseEvent { event: "session".into(), data: "x\ny".into() },
            SseEvent { event: "message".into(), data: "plain".into() },
        ];
        // Whole, and byte by byte: the result must not depend on how the network chunks it.
        assert_eq!(SseParser::default().push(text.as_bytes()), expected);
        let mut p = SseParser::default();
        let mut got = Vec::new();
        for b in text.as_bytes() {
            got.extend(p.push(std::slice::from_ref(b)));
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn multibyte_characters_survive_a_split() {
        let text = "event: log\ndata: café\n\n".as_bytes();
        let cut = text.iter().position(|&b| b == 0xc3).unwrap() + 1;
        let mut p = SseParser::default();
        assert!(p.push(&text[..cut]).is_empty());
        assert_eq!(p.push(&text[cut..]), vec![SseEvent { event: "log".into(), data: "café".into() }]);
    }

    #[test]
    fn events_without_data_are_dropped() {
        assert!(SseParser::default().push(b"event: session\n\n").is_empty());
    }
}
