//! A small QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! Hand-written on purpose: QMP is line-delimited JSON with three message shapes (a greeting,
//! a command reply carrying our `id`, and asynchronous events), and drover needs a handful of
//! commands. The generated-bindings crates pull in the whole QAPI schema as Rust types, which is
//! a large dependency to keep in step with the QEMU version on the host; here a command is a name
//! and a `serde_json::Value`, so new commands (dirty bitmaps, blockdev, NBD export) need no code.
//!
//! Protocol, as this client drives it:
//! ```text
//!   server: {"QMP": {"version": ..., "capabilities": [...]}}      greeting
//!   client: {"execute": "qmp_capabilities"}                       leave negotiation mode
//!   server: {"return": {}}
//!   client: {"execute": C, "arguments": A, "id": N}
//!   server: {"event": E, "data": D, "timestamp": T}  *            any number, any time
//!   server: {"return": R, "id": N} | {"error": {"class", "desc"}, "id": N}
//! ```
//! Events that arrive while we wait for a reply are kept (bounded) for [`QmpClient::take_events`]
//! and [`QmpClient::wait_event`]; e.g. `POWERDOWN` arrives before the reply to `system_powerdown`.
//!
//! QEMU serves one QMP client per socket at a time: hold a client only as long as needed.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::{ToolError, ToolResult};

/// How many unread events are kept; older ones are dropped. Events are informational for drover
/// (the state of record comes from commands), so a bound is better than unbounded growth on a
/// long-lived connection nobody drains.
const MAX_BUFFERED_EVENTS: usize = 256;

/// The longest QMP line read. QEMU is a host process, not the guest, but a line is still bounded
/// before it is held: the largest answers drover asks for (`query-named-block-nodes` of a VM with
/// a few disks and their bitmaps) are tens of KiB.
const MAX_QMP_LINE: usize = 16 << 20;

/// An asynchronous QMP event, e.g. `SHUTDOWN` or `BLOCK_JOB_COMPLETED`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    /// `{"seconds": .., "microseconds": ..}` as QEMU sends it.
    #[serde(default)]
    pub timestamp: Value,
}

/// One line from the server, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    Greeting(Value),
    Return { id: Option<Value>, value: Value },
    Error { id: Option<Value>, class: String, desc: String },
    Event(QmpEvent),
}

/// Classifies one line of server output. Pure, so the protocol handling is unit-tested without
/// a QEMU.
pub fn parse_message(line: &str) -> ToolResult<QmpMessage> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| ToolError::QmpProtocol(format!("invalid JSON from QEMU ({e}): {line}")))?;
    let Value::Object(mut obj) = value else {
        return Err(ToolError::QmpProtocol(format!("expected a JSON object: {line}")));
    };
    let id = obj.remove("id");
    if let Some(greeting) = obj.remove("QMP") {
        return Ok(QmpMessage::Greeting(greeting));
    }
    if let Some(value) = obj.remove("return") {
        return Ok(QmpMessage::Return { id, value });
    }
    if let Some(error) = obj.remove("error") {
        let field = |name: &str| error.get(name).and_then(Value::as_str).unwrap_or("").to_owned();
        return Ok(QmpMessage::Error { id, class: field("class"), desc: field("desc") });
    }
    if obj.contains_key("event") {
        let event: QmpEvent = serde_json::from_value(Value::Object(obj))
            .map_err(|e| ToolError::QmpProtocol(format!("malformed event ({e}): {line}")))?;
        return Ok(QmpMessage::Event(event));
    }
    Err(ToolError::QmpProtocol(format!("unrecognised message: {line}")))
}

/// Builds the request line for `command`. `args` of `null` or `{}` sends no `arguments` member,
/// which QEMU requires for commands that take none.
fn request_line(command: &str, args: &Value, id: u64) -> ToolResult<String> {
    let mut request = json!({ "execute": command, "id": id });
    let empty = args.is_null() || args.as_object().is_some_and(|o| o.is_empty());
    if !empty {
        if !args.is_object() {
            return Err(ToolError::QmpProtocol(format!("arguments of {command} must be a JSON object, got {args}")));
        }
        request["arguments"] = args.clone();
    }
    let mut line = request.to_string();
    line.push('\n');
    Ok(line)
}

/// A negotiated QMP connection.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    greeting: Value,
    next_id: u64,
    events: VecDeque<QmpEvent>,
}

impl QmpClient {
    /// Connects, reads the greeting and leaves capabilities-negotiation mode.
    pub async fn connect(socket: &Path) -> ToolResult<Self> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| ToolError::io(format!("connecting to QMP socket {}", socket.display()), e))?;
        let (read, writer) = stream.into_split();
        let mut client = QmpClient {
            reader: BufReader::new(read),
            writer,
            greeting: Value::Null,
            next_id: 1,
            events: VecDeque::new(),
        };
        loop {
            match client.read_message().await? {
                QmpMessage::Greeting(g) => {
                    client.greeting = g;
                    break;
                }
                QmpMessage::Event(e) => client.push_event(e),
                other => {
                    return Err(ToolError::QmpProtocol(format!("expected a greeting, got {other:?}")));
                }
            }
        }
        client.execute("qmp_capabilities", Value::Null).await?;
        Ok(client)
    }

    /// Like [`QmpClient::connect`], bounded in time: a wedged QEMU must not hang drover.
    pub async fn connect_timeout(socket: &Path, timeout: Duration) -> ToolResult<Self> {
        tokio::time::timeout(timeout, Self::connect(socket))
            .await
            .map_err(|_| ToolError::Timeout(timeout, "QMP connection"))?
    }

    /// The `QMP` member of the greeting (QEMU version and capabilities).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Runs one command and returns its `return` value. A QMP error reply becomes
    /// [`ToolError::Qmp`]; events received meanwhile are buffered.
    pub async fn execute(&mut self, command: &str, args: Value) -> ToolResult<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let line = request_line(command, &args, id)?;
        tracing::debug!(command, id, "QMP execute");
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| ToolError::io(format!("sending QMP command {command}"), e))?;
        loop {
            match self.read_message().await? {
                QmpMessage::Event(e) => self.push_event(e),
                QmpMessage::Return { id: reply_id, value } if Self::matches(&reply_id, id) => {
                    return Ok(value);
                }
                QmpMessage::Error { id: reply_id, class, desc } if Self::matches(&reply_id, id) => {
                    return Err(ToolError::Qmp { command: command.to_owned(), class, desc });
                }
                // A reply to an earlier command whose caller gave up (timeout): not ours.
                other => tracing::warn!(command, id, ?other, "skipping unexpected QMP message"),
            }
        }
    }

    /// [`QmpClient::execute`] bounded in time.
    pub async fn execute_timeout(&mut self, command: &str, args: Value, timeout: Duration) -> ToolResult<Value> {
        tokio::time::timeout(timeout, self.execute(command, args))
            .await
            .map_err(|_| ToolError::Timeout(timeout, "QMP reply"))?
    }

    /// Returns and clears the events received so far.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Waits for the event named `name` (already buffered or arriving within `timeout`) and
    /// removes it from the buffer. Other events stay buffered.
    pub async fn wait_event(&mut self, name: &str, timeout: Duration) -> ToolResult<QmpEvent> {
        if let Some(pos) = self.events.iter().position(|e| e.event == name)
            && let Some(event) = self.events.remove(pos)
        {
            return Ok(event);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, self.read_message())
                .await
                .map_err(|_| ToolError::Timeout(timeout, "QMP event"))??;
            match message {
                QmpMessage::Event(e) if e.event == name => return Ok(e),
                QmpMessage::Event(e) => self.push_event(e),
                other => tracing::warn!(?other, "skipping unexpected QMP message"),
            }
        }
    }

    fn matches(reply_id: &Option<Value>, id: u64) -> bool {
        reply_id.as_ref().and_then(Value::as_u64) == Some(id)
    }

    fn push_event(&mut self, event: QmpEvent) {
        tracing::debug!(event = %event.event, "QMP event");
        if self.events.len() == MAX_BUFFERED_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    async fn read_message(&mut self) -> ToolResult<QmpMessage> {
        loop {
            let line = match crate::qga::read_line_bounded(&mut self.reader, MAX_QMP_LINE).await {
                Ok(Some(line)) => line,
                Ok(None) => return Err(ToolError::QmpProtocol("QEMU closed the QMP connection".into())),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Err(ToolError::QmpProtocol(e.to_string()));
                }
                Err(e) => return Err(ToolError::io("reading from QMP socket", e)),
            };
            let line = std::str::from_utf8(&line)
                .map_err(|_| ToolError::QmpProtocol("a QMP line that is not UTF-8".into()))?;
            if !line.trim().is_empty() {
                return parse_message(line.trim_end());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    #[test]
    fn parses_each_message_shape() {
        let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;
        assert!(matches!(parse_message(greeting).unwrap(), QmpMessage::Greeting(g) if g["capabilities"][0] == "oob"));
        assert_eq!(
            parse_message(r#"{"return": {"status": "running", "running": true}, "id": 3}"#).unwrap(),
            QmpMessage::Return { id: Some(json!(3)), value: json!({"status": "running", "running": true}) }
        );
        assert_eq!(
            parse_message(r#"{"error": {"class": "GenericError", "desc": "no such node"}, "id": 4}"#).unwrap(),
            QmpMessage::Error { id: Some(json!(4)), class: "GenericError".into(), desc: "no such node".into() }
        );
        let event = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#;
        match parse_message(event).unwrap() {
            QmpMessage::Event(e) => {
                assert_eq!(e.event, "SHUTDOWN");
                assert_eq!(e.data["reason"], "guest-shutdown");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(parse_message("{\"event\": \"POWERDOWN\"}").unwrap(), QmpMessage::Event(e) if e.data.is_null())
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(parse_message("not json"), Err(ToolError::QmpProtocol(_))));
        assert!(matches!(parse_message("[1]"), Err(ToolError::QmpProtocol(_))));
        assert!(matches!(parse_message("{\"foo\": 1}"), Err(ToolError::QmpProtocol(_))));
    }

    #[test]
    fn request_lines_omit_empty_arguments() {
        assert_eq!(request_line("query-status", &Value::Null, 7).unwrap(), "{\"execute\":\"query-status\",\"id\":7}\n");
        assert_eq!(request_line("query-status", &json!({}), 7).unwrap(), "{\"execute\":\"query-status\",\"id\":7}\n");
        assert_eq!(
            request_line("set_link", &json!({"name": "nic0", "up": false}), 8).unwrap(),
            "{\"arguments\":{\"name\":\"nic0\",\"up\":false},\"execute\":\"set_link\",\"id\":8}\n"
        );
        assert!(request_line("x", &json!([1]), 1).is_err());
    }

    /// A scripted fake QEMU: greeting, capabilities, then an event before a reply, an error,
    /// and a stale reply with a foreign id.
    #[tokio::test]
    async fn client_against_a_fake_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            write.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").await.unwrap();
            let caps: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(caps["execute"], "qmp_capabilities");
            write.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", caps["id"]).as_bytes()).await.unwrap();

            let req: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(req["execute"], "system_powerdown");
            write.write_all(b"{\"event\": \"POWERDOWN\", \"data\": {}, \"timestamp\": {}}\n").await.unwrap();
            write.write_all(b"{\"return\": {}, \"id\": 999}\n").await.unwrap();
            write.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", req["id"]).as_bytes()).await.unwrap();

            let req: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(req["arguments"]["node-name"], "nope");
            write
                .write_all(
                    format!(
                        "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"Cannot find node nope\"}}, \"id\": {}}}\n",
                        req["id"]
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
            write
                .write_all(b"{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": true}, \"timestamp\": {}}\n")
                .await
                .unwrap();
            // Keep the connection open until the client is done.
            let _ = lines.next_line().await;
        });

        let mut client = QmpClient::connect_timeout(&path, Duration::from_secs(5)).await.unwrap();
        assert_eq!(client.execute("system_powerdown", Value::Null).await.unwrap(), json!({}));
        let err =
            client.execute("block-dirty-bitmap-add", json!({"node-name": "nope", "name": "bm"})).await.unwrap_err();
        match err {
            ToolError::Qmp { command, class, desc } => {
                assert_eq!(command, "block-dirty-bitmap-add");
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "Cannot find node nope");
            }
            other => panic!("{other:?}"),
        }
        let shutdown = client.wait_event("SHUTDOWN", Duration::from_secs(5)).await.unwrap();
        assert_eq!(shutdown.data["guest"], true);
        let events: Vec<_> = client.take_events().into_iter().map(|e| e.event).collect();
        assert_eq!(events, vec!["POWERDOWN"]);
        drop(client);
        server.await.unwrap();
    }
}
