//! A client of the QEMU guest agent (`qemu-ga`, the `org.qemu.guest_agent.0` virtio-serial port),
//! over the unix socket QEMU (or libvirt) exposes for that port on the host.
//!
//! Hand-written for the reason [`crate::qmp`] is, and more: the peer is the guest, which drover
//! does not trust (a tenant's VM, or whatever runs in it). So every line read is bounded
//! ([`MAX_LINE`]), every wait is bounded in time (the caller's timeout, for each command), JSON
//! is parsed by `serde_json` (its nesting limit is 128), and nothing the guest sends can grow
//! drover's memory past one line. A guest that misbehaves costs its own commands a clear error.
//!
//! Protocol, as this client drives it (QEMU's `qga/qapi-schema.json`):
//! ```text
//!   client: 0xFF                                          the agent drops any partial input
//!   client: {"execute": "guest-sync-delimited", "arguments": {"id": N}}
//!   agent:  0xFF {"return": N}                            skip everything before the 0xFF
//!   client: {"execute": C, "arguments": A}
//!   agent:  {"return": R} | {"error": {"class": ..., "desc": ...}}
//! ```
//! There are no ids and no events: one command at a time, each answered in order. The sync at
//! the start skips what an earlier client left unread (a reply it gave up waiting for) and a
//! guest agent that restarted mid-line. A client that times out waiting is dropped, never
//! reused: the late reply would be taken for the next command's.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::{ToolError, ToolResult};

/// The longest line taken from a guest agent: a `guest-network-get-interfaces` answer of a guest
/// with dozens of interfaces fits many times over.
pub const MAX_LINE: usize = 1 << 20;

/// The sentinel byte of `guest-sync-delimited`.
const SENTINEL: u8 = 0xFF;

/// How many stale answers a sync skips before it gives up.
const MAX_STALE: usize = 16;

/// What the guest agent says of itself (`guest-info`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInfo {
    pub version: String,
    /// The commands it has and whether each is enabled (an administrator may block some).
    pub supported_commands: Vec<GuestCommand>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCommand {
    pub name: String,
    pub enabled: bool,
}

impl GuestInfo {
    /// Whether the agent has `command` and it is enabled.
    pub fn can(&self, command: &str) -> bool {
        self.supported_commands.iter().any(|c| c.name == command && c.enabled)
    }
}

/// A network interface as the guest sees it (`guest-network-get-interfaces`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInterface {
    pub name: String,
    #[serde(rename = "hardware-address", default)]
    pub hardware_address: Option<String>,
    #[serde(rename = "ip-addresses", default)]
    pub ip_addresses: Vec<GuestIpAddress>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestIpAddress {
    #[serde(rename = "ip-address-type")]
    pub kind: String,
    #[serde(rename = "ip-address")]
    pub address: String,
    pub prefix: u8,
}

/// Whether the guest's file systems are frozen (`guest-fsfreeze-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeStatus {
    Thawed,
    Frozen,
}

/// Thaws the guest behind the guest agent at `socket` if it is frozen (each step within
/// `timeout`); returns how many file systems were thawed, 0 when none were frozen.
pub async fn thaw(socket: &Path, timeout: Duration) -> ToolResult<u64> {
    let mut agent = GuestAgent::connect(socket, timeout).await?;
    if agent.fsfreeze_status().await? == FreezeStatus::Thawed {
        return Ok(0);
    }
    agent.fsfreeze_thaw().await
}

/// How a process started with `guest-exec` ended (or that it has not yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecStatus {
    pub exited: bool,
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecStatus {
    /// It ended with exit code 0.
    pub fn success(&self) -> bool {
        self.exited && self.exit_code == Some(0)
    }
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A synchronised connection to a guest agent.
#[derive(Debug)]
pub struct GuestAgent {
    stream: BufReader<UnixStream>,
    timeout: Duration,
}

impl GuestAgent {
    /// Connects to the guest agent's socket and synchronises with it, each step within
    /// `timeout` (also the limit of every later command). A guest whose agent is not running
    /// (not installed, not started yet, stopped) does not answer: [`ToolError::Timeout`].
    pub async fn connect(socket: &Path, timeout: Duration) -> ToolResult<GuestAgent> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| ToolError::Timeout(timeout, "the guest agent's socket"))?
            .map_err(|e| ToolError::io(format!("connecting to the guest agent at {}", socket.display()), e))?;
        let mut agent = GuestAgent { stream: BufReader::new(stream), timeout };
        tokio::time::timeout(timeout, agent.sync())
            .await
            .map_err(|_| ToolError::Timeout(timeout, "the guest agent (is it running in the guest?)"))??;
        Ok(agent)
    }

    /// The limit of every later command (a freeze runs the guest's hooks, which may take longer
    /// than a ping).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Runs one command and returns its `return` value, within the connection's timeout.
    pub async fn execute(&mut self, command: &str, args: Value) -> ToolResult<Value> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.execute_unbounded(command, args))
            .await
            .map_err(|_| ToolError::Timeout(timeout, "the guest agent's answer"))?
    }

    /// `guest-ping`: the agent is there and answers.
    pub async fn ping(&mut self) -> ToolResult<()> {
        self.execute("guest-ping", Value::Null).await.map(drop)
    }

    pub async fn info(&mut self) -> ToolResult<GuestInfo> {
        let v = self.execute("guest-info", Value::Null).await?;
        parse_answer("guest-info", v)
    }

    pub async fn network_interfaces(&mut self) -> ToolResult<Vec<GuestInterface>> {
        let v = self.execute("guest-network-get-interfaces", Value::Null).await?;
        parse_answer("guest-network-get-interfaces", v)
    }

    pub async fn fsfreeze_status(&mut self) -> ToolResult<FreezeStatus> {
        let v = self.execute("guest-fsfreeze-status", Value::Null).await?;
        parse_answer("guest-fsfreeze-status", v)
    }

    /// Freezes the guest's file systems (its fsfreeze hooks run first, so databases can flush);
    /// returns how many were frozen. Thaw them soon: writes in the guest wait meanwhile.
    pub async fn fsfreeze_freeze(&mut self) -> ToolResult<u64> {
        let v = self.execute("guest-fsfreeze-freeze", Value::Null).await?;
        parse_answer("guest-fsfreeze-freeze", v)
    }

    /// Thaws the guest's file systems; returns how many were thawed.
    pub async fn fsfreeze_thaw(&mut self) -> ToolResult<u64> {
        let v = self.execute("guest-fsfreeze-thaw", Value::Null).await?;
        parse_answer("guest-fsfreeze-thaw", v)
    }

    /// `guest-exec`: starts `path` with `args` in the guest (as the guest agent's user, root on
    /// most guests), its standard input `input`, its output captured; returns its pid in the
    /// guest. Follow it with [`GuestAgent::exec_status`].
    pub async fn exec(&mut self, path: &str, args: &[&str], input: Option<&[u8]>) -> ToolResult<i64> {
        use base64::Engine as _;
        let mut arguments = json!({"path": path, "arg": args, "capture-output": true});
        if let Some(input) = input {
            arguments["input-data"] = json!(base64::engine::general_purpose::STANDARD.encode(input));
        }
        let v = self.execute("guest-exec", arguments).await?;
        #[derive(Deserialize)]
        struct Started {
            pid: i64,
        }
        Ok(parse_answer::<Started>("guest-exec", v)?.pid)
    }

    /// `guest-exec-status`: whether the process `pid` started by [`GuestAgent::exec`] ended, and
    /// what it wrote (the guest agent keeps at most 16 MiB of each stream, and this client reads
    /// answers up to [`MAX_LINE`]).
    pub async fn exec_status(&mut self, pid: i64) -> ToolResult<ExecStatus> {
        use base64::Engine as _;
        let v = self.execute("guest-exec-status", json!({"pid": pid})).await?;
        #[derive(Deserialize)]
        struct Raw {
            exited: bool,
            exitcode: Option<i32>,
            signal: Option<i32>,
            #[serde(rename = "out-data")]
            out: Option<String>,
            #[serde(rename = "err-data")]
            err: Option<String>,
        }
        let raw: Raw = parse_answer("guest-exec-status", v)?;
        let decode = |field: &str, data: Option<String>| -> ToolResult<Vec<u8>> {
            match data {
                None => Ok(Vec::new()),
                Some(d) => base64::engine::general_purpose::STANDARD.decode(d).map_err(|e| {
                    ToolError::GuestAgentProtocol(format!("guest-exec-status {field} is not base64: {e}"))
                }),
            }
        };
        Ok(ExecStatus {
            exited: raw.exited,
            exit_code: raw.exitcode,
            signal: raw.signal,
            stdout: decode("out-data", raw.out)?,
            stderr: decode("err-data", raw.err)?,
        })
    }

    /// Runs `sh -c script` in the guest with `input` on its standard input and waits (polling,
    /// within `timeout`) until it ends; returns how it ended. A script still running at the
    /// timeout is left running in the guest.
    pub async fn run_shell(&mut self, script: &str, input: Option<&[u8]>, timeout: Duration) -> ToolResult<ExecStatus> {
        let pid = self.exec("/bin/sh", &["-c", script], input).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.exec_status(pid).await?;
            if status.exited {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ToolError::Timeout(timeout, "a command in the guest"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn sync(&mut self) -> ToolResult<()> {
        let id = sync_id();
        let request = json!({"execute": "guest-sync-delimited", "arguments": {"id": id}});
        let mut bytes = vec![SENTINEL];
        bytes.extend_from_slice(request.to_string().as_bytes());
        bytes.push(b'\n');
        self.write(&bytes).await?;
        for _ in 0..MAX_STALE {
            self.skip_to_sentinel().await?;
            let line = self.read_line().await?;
            match parse_reply(&line)? {
                Ok(v) if v.as_u64() == Some(id) => return Ok(()),
                // An earlier client's sync, answered late.
                _ => continue,
            }
        }
        Err(protocol(format!("no answer to guest-sync-delimited {id} among {MAX_STALE} stale ones")))
    }

    async fn execute_unbounded(&mut self, command: &str, args: Value) -> ToolResult<Value> {
        let request =
            if args.is_null() { json!({"execute": command}) } else { json!({"execute": command, "arguments": args}) };
        let mut line = request.to_string();
        line.push('\n');
        tracing::debug!(command, "guest agent execute");
        self.write(line.as_bytes()).await?;
        loop {
            let answer = self.read_line().await?;
            if answer.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return match parse_reply(&answer)? {
                Ok(v) => Ok(v),
                Err((class, desc)) => Err(ToolError::GuestAgent { command: command.to_string(), class, desc }),
            };
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> ToolResult<()> {
        let stream = self.stream.get_mut();
        stream.write_all(bytes).await.map_err(|e| ToolError::io("writing to the guest agent", e))?;
        stream.flush().await.map_err(|e| ToolError::io("writing to the guest agent", e))
    }

    /// Discards input up to and including the next sentinel byte, at most [`MAX_LINE`] bytes.
    async fn skip_to_sentinel(&mut self) -> ToolResult<()> {
        let mut skipped = 0usize;
        loop {
            let buf = self.stream.fill_buf().await.map_err(|e| ToolError::io("reading from the guest agent", e))?;
            if buf.is_empty() {
                return Err(protocol("the guest agent closed the connection"));
            }
            if let Some(at) = buf.iter().position(|b| *b == SENTINEL) {
                self.stream.consume(at + 1);
                return Ok(());
            }
            let n = buf.len();
            self.stream.consume(n);
            skipped += n;
            if skipped > MAX_LINE {
                return Err(protocol(format!("more than {MAX_LINE} bytes before the sync's answer")));
            }
        }
    }

    async fn read_line(&mut self) -> ToolResult<Vec<u8>> {
        match read_line_bounded(&mut self.stream, MAX_LINE).await {
            Ok(Some(line)) => Ok(line),
            Ok(None) => Err(protocol("the guest agent closed the connection")),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Err(protocol(e.to_string())),
            Err(e) => Err(ToolError::io("reading from the guest agent", e)),
        }
    }
}

/// One line (without its newline) from a peer that may not be trusted: refused
/// (`InvalidData`) once it passes `max` bytes, before it is held whole; `None` at the end of the
/// stream. Whatever follows a refused line is not read.
pub async fn read_line_bounded<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(None);
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(at) => (at + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max + 1 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a line longer than {max} bytes"),
            ));
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            line.pop();
            return Ok(Some(line));
        }
    }
}

/// An id no earlier sync on this socket is likely to have used.
fn sync_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    // JSON numbers past 2^53 lose precision in some parsers; the agent's is exact, keep it safe.
    h.finish() >> 11
}

fn protocol(message: impl Into<String>) -> ToolError {
    ToolError::GuestAgentProtocol(message.into())
}

/// A reply line: `Ok(return value)` or `Err((class, desc))` of an error reply.
#[allow(clippy::type_complexity)]
fn parse_reply(line: &[u8]) -> ToolResult<Result<Value, (String, String)>> {
    #[derive(Deserialize)]
    struct ErrorBody {
        #[serde(default)]
        class: String,
        #[serde(default)]
        desc: String,
    }
    #[derive(Deserialize)]
    struct Reply {
        #[serde(rename = "return")]
        value: Option<Value>,
        error: Option<ErrorBody>,
    }
    let reply: Reply = serde_json::from_slice(line)
        .map_err(|e| protocol(format!("an answer that is not a guest agent reply ({e})")))?;
    match (reply.value, reply.error) {
        (_, Some(e)) => Ok(Err((e.class, e.desc))),
        (Some(v), None) => Ok(Ok(v)),
        (None, None) => Err(protocol("an answer with neither \"return\" nor \"error\"")),
    }
}

fn parse_answer<T: serde::de::DeserializeOwned>(command: &str, v: Value) -> ToolResult<T> {
    serde_json::from_value(v).map_err(|e| protocol(format!("{command} answered unreadably: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// A guest agent played by the test: `script` gets each request line (after the sync) and
    /// answers with the bytes to send.
    async fn fake_agent(
        dir: &tempfile::TempDir,
        stale: &'static [u8],
        script: impl Fn(&Value) -> Vec<u8> + Send + 'static,
    ) -> std::path::PathBuf {
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            // What an earlier client left unread, then the sentinel reset.
            write.write_all(stale).await.unwrap();
            let mut first = [0u8; 1];
            read.read_exact(&mut first).await.unwrap();
            assert_eq!(first[0], SENTINEL, "the client resets the agent's parser first");
            let mut line = String::new();
            while read.read_line(&mut line).await.unwrap() > 0 {
                let request: Value = serde_json::from_str(line.trim()).unwrap();
                if request["execute"] == "guest-sync-delimited" {
                    let id = &request["arguments"]["id"];
                    // A stale sync answer first, then ours.
                    write.write_all(b"\xff{\"return\": 7}\n").await.unwrap();
                    let mut ours = b"\0junk\xff".to_vec();
                    ours.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
                    write.write_all(&ours).await.unwrap();
                } else {
                    write.write_all(&script(&request)).await.unwrap();
                }
                line.clear();
            }
        });
        path
    }

    #[tokio::test]
    async fn a_client_syncs_past_stale_answers_then_runs_commands() {
        let dir = tempfile::tempdir().unwrap();
        let socket = fake_agent(&dir, b"{\"return\": {}}\n{\"ret", |r| match r["execute"].as_str().unwrap() {
            "guest-ping" => b"{\"return\": {}}\n".to_vec(),
            "guest-info" => {
                br#"{"return": {"version": "7.2.0", "supported_commands": [{"name": "guest-ping", "enabled": true, "success-response": true}, {"name": "guest-fsfreeze-freeze", "enabled": false, "success-response": true}]}}"#
                    .iter()
                    .chain(b"\n")
                    .copied()
                    .collect()
            }
            "guest-fsfreeze-status" => b"{\"return\": \"frozen\"}\n".to_vec(),
            "guest-fsfreeze-thaw" => b"{\"return\": 2}\n".to_vec(),
            _ => b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no such command\"}}\n".to_vec(),
        })
        .await;
        let mut agent = GuestAgent::connect(&socket, Duration::from_secs(5)).await.unwrap();
        agent.ping().await.unwrap();
        let info = agent.info().await.unwrap();
        assert_eq!(info.version, "7.2.0");
        assert!(info.can("guest-ping") && !info.can("guest-fsfreeze-freeze") && !info.can("guest-exec"));
        assert_eq!(agent.fsfreeze_status().await.unwrap(), FreezeStatus::Frozen);
        assert_eq!(agent.fsfreeze_thaw().await.unwrap(), 2);
        let e = agent.execute("guest-exec", json!({"path": "/bin/true"})).await.unwrap_err();
        assert!(matches!(&e, ToolError::GuestAgent { class, .. } if class == "CommandNotFound"), "{e}");
    }

    #[tokio::test]
    async fn a_guest_that_floods_or_stalls_gets_an_error_not_drovers_memory() {
        let dir = tempfile::tempdir().unwrap();
        // A line with no end: refused once it passes the limit.
        let socket = fake_agent(&dir, b"", |_| {
            let mut flood = vec![b'['; MAX_LINE + 10];
            flood.push(b'\n');
            flood
        })
        .await;
        let mut agent = GuestAgent::connect(&socket, Duration::from_secs(5)).await.unwrap();
        let e = agent.ping().await.unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");

        // No answer at all: the command's timeout.
        let dir = tempfile::tempdir().unwrap();
        let socket = fake_agent(&dir, b"", |_| Vec::new()).await;
        let mut agent = GuestAgent::connect(&socket, Duration::from_millis(300)).await.unwrap();
        assert!(matches!(agent.ping().await.unwrap_err(), ToolError::Timeout(..)));

        // Not JSON, or JSON that is no reply.
        let dir = tempfile::tempdir().unwrap();
        let socket = fake_agent(&dir, b"", |r| {
            if r["execute"] == "guest-ping" { b"hello\n".to_vec() } else { b"{\"x\": 1}\n".to_vec() }
        })
        .await;
        let mut agent = GuestAgent::connect(&socket, Duration::from_secs(5)).await.unwrap();
        assert!(agent.ping().await.unwrap_err().to_string().contains("not a guest agent reply"));
        assert!(agent.info().await.unwrap_err().to_string().contains("neither"));

        // Nobody listening: a clear error, at once.
        let e = GuestAgent::connect(&dir.path().join("none.sock"), Duration::from_secs(1)).await.unwrap_err();
        assert!(e.to_string().contains("connecting to the guest agent"), "{e}");
    }
}
