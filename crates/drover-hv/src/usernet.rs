//! Checking a guest's TCP port from the host through QEMU user-mode networking (slirp).
//!
//! A NIC whose network has no host bridge is `-netdev user,restrict=on`: the guest reaches
//! nothing outside its virtual 10.0.2.0/24 (no uplink, which test failover needs), and the host
//! reaches the guest only through port forwards. To check a port, drover adds a forward at check
//! time over the VM's QMP (HMP `hostfwd_add <netdev> tcp:127.0.0.1:<free port>-<guest>:<port>`),
//! connects to it, decides, and removes the forward (`hostfwd_remove`). The guest is
//! [`GUEST_ADDRESS`], slirp's first DHCP lease, which the tiny guest also sets statically.
//!
//! # The trap, and the rule
//! slirp accepts the host-side connection at once, before it has even sent the SYN to the guest,
//! so "connect succeeded" says nothing. What happens next, measured against the tiny guest under
//! TCG with QEMU 10.0 (`tests/qemu_guest.rs` prints its own figures on every run):
//! ```text
//!   guest listens, greets   slirp's socket goes SYN_SENT -> ESTABLISHED; the greeting arrives
//!                           4-45 ms after connect (a whole check, forward added and removed:
//!                           6-26 ms)
//!   guest listens, quiet    ESTABLISHED in `info usernet`, nothing to read (a whole check:
//!                           28-32 ms)
//!   guest refuses (RST)     slirp closes the host socket: end-of-file 1-7 ms after connect
//!   guest silent            (still booting, no address, packets dropped) the host socket stays
//!                           open and silent and slirp's socket stays SYN_SENT (watched for 3 s
//!                           while the guest booted): from the host socket alone this looks
//!                           exactly like a quiet service
//! ```
//! So an open socket is not evidence. The rule, polled every [`POLL`] for at most [`ATTEMPT`]:
//! - bytes from the guest ⇒ **open**;
//! - end-of-file or a reset on the host socket ⇒ **closed** (refused);
//! - slirp reports our connection `ESTABLISHED` in HMP `info usernet` ⇒ **open**: the guest
//!   answered the SYN, whether or not its service speaks first;
//! - none of these within [`ATTEMPT`] ⇒ **no answer**.
//!
//! A closed or silent port is retried (a fresh connection) until the caller's timeout, because a
//! replica's services come up some time after it boots. A service that accepts and closes at once
//! without a byte looks refused; none worth checking does that.

use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::{HvError, HvResult, TcpPortState};
use drover_qemu::qmp::QmpClient;

/// The guest's address on a user-mode network: slirp's first DHCP lease in its default
/// 10.0.2.0/24, and the tiny guest's static address.
pub const GUEST_ADDRESS: &str = "10.0.2.15";
/// How long one connection may stay undecided before it counts as no answer. The tiny guest
/// answers in tens of milliseconds under TCG; a loaded host is slower.
pub const ATTEMPT: Duration = Duration::from_secs(2);
/// How often an undecided connection is looked at (a read, and `info usernet`).
pub const POLL: Duration = Duration::from_millis(25);
/// Pause between attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Bound on one QMP connection + command.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How many free host ports are tried when another process takes one between our pick and
/// slirp's bind.
const FORWARD_TRIES: usize = 5;

/// One HMP command over QMP; a fresh connection each time, because QEMU serves one QMP client at
/// a time and the rest of the driver must not wait behind a port check.
async fn hmp(qmp_socket: &std::path::Path, command_line: &str) -> HvResult<String> {
    let mut qmp = QmpClient::connect_timeout(qmp_socket, QMP_TIMEOUT).await?;
    let out =
        qmp.execute_timeout("human-monitor-command", json!({ "command-line": command_line }), QMP_TIMEOUT).await?;
    Ok(out.as_str().unwrap_or_default().to_owned())
}

/// A forward from `127.0.0.1:<host_port>` to the guest's port, removed by [`Forward::remove`].
struct Forward<'a> {
    qmp_socket: &'a std::path::Path,
    netdev: &'a str,
    host_port: u16,
}

impl<'a> Forward<'a> {
    /// Picks a free loopback port and asks slirp to listen on it. The port can be taken by
    /// someone else between the pick and slirp's bind; then HMP answers with an error text and
    /// another port is tried.
    async fn add(qmp_socket: &'a std::path::Path, netdev: &'a str, guest_port: u16) -> HvResult<Forward<'a>> {
        let mut last = String::new();
        for _ in 0..FORWARD_TRIES {
            let host_port = {
                let probe = std::net::TcpListener::bind("127.0.0.1:0")
                    .map_err(|e| HvError::io("picking a free loopback port", e))?;
                probe.local_addr().map_err(|e| HvError::io("picking a free loopback port", e))?.port()
            };
            let rule = format!("tcp:127.0.0.1:{host_port}-{GUEST_ADDRESS}:{guest_port}");
            // HMP reports failure as text in a successful QMP reply; success is silent.
            let out = hmp(qmp_socket, &format!("hostfwd_add {netdev} {rule}")).await?;
            if out.trim().is_empty() {
                return Ok(Forward { qmp_socket, netdev, host_port });
            }
            last = out.trim().to_owned();
        }
        Err(HvError::Qmp { command: "hostfwd_add".into(), class: "HMP".into(), desc: last })
    }

    async fn remove(self) -> HvResult<()> {
        let out =
            hmp(self.qmp_socket, &format!("hostfwd_remove {} tcp:127.0.0.1:{}", self.netdev, self.host_port)).await?;
        if out.contains("removed") {
            Ok(())
        } else {
            Err(HvError::Qmp { command: "hostfwd_remove".into(), class: "HMP".into(), desc: out.trim().to_owned() })
        }
    }
}

/// Whether `info usernet` shows a connection through the forward on `host_port` that the guest
/// answered. For a forwarded connection slirp prints the forward's host port as the source port;
/// the listening forward itself is `HOST_FORWARD`, a connection still waiting for the guest is
/// `SYN_SENT`. Pure, so it is tested on captured output.
pub fn usernet_established(info: &str, host_port: u16) -> bool {
    info.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Protocol[State] FD SourceAddress Port DestAddress Port RecvQ SendQ
        fields.len() >= 4 && fields[0] == "TCP[ESTABLISHED]" && fields[3] == host_port.to_string()
    })
}

/// One connection through the forward, decided by the rule in the module documentation.
async fn attempt(qmp_socket: &std::path::Path, host_port: u16) -> HvResult<TcpPortState> {
    let mut stream = TcpStream::connect(("127.0.0.1", host_port))
        .await
        .map_err(|e| HvError::io(format!("connecting to the forward on 127.0.0.1:{host_port}"), e))?;
    let deadline = Instant::now() + ATTEMPT;
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(POLL, stream.read(&mut buf)).await {
            Ok(Ok(0)) => return Ok(TcpPortState::Closed),
            Ok(Ok(_)) => return Ok(TcpPortState::Open),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(TcpPortState::Closed),
            Ok(Err(e)) => return Err(HvError::io("reading from the forward", e)),
            Err(_) => {}
        }
        if usernet_established(&hmp(qmp_socket, "info usernet").await?, host_port) {
            return Ok(TcpPortState::Open);
        }
        if Instant::now() >= deadline {
            return Ok(TcpPortState::NoAnswer);
        }
    }
}

/// Checks `guest_port` through a forward on the user-mode netdev `netdev` of the VM whose QMP
/// socket is `qmp_socket`, retrying until it is open or `timeout` passes. The forward is removed
/// before this returns, also when an attempt fails.
pub async fn check_tcp_port(
    qmp_socket: &std::path::Path,
    netdev: &str,
    guest_port: u16,
    timeout: Duration,
) -> HvResult<TcpPortState> {
    let deadline = Instant::now() + timeout;
    let forward = Forward::add(qmp_socket, netdev, guest_port).await?;
    let host_port = forward.host_port;
    let result = async {
        loop {
            let state = attempt(qmp_socket, host_port).await?;
            tracing::debug!(guest_port, ?state, "TCP port attempt");
            if state == TcpPortState::Open || Instant::now() + RETRY_PAUSE >= deadline {
                return Ok(state);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
    .await;
    let removed = forward.remove().await;
    match (result, removed) {
        (Ok(state), Ok(())) => Ok(state),
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape QEMU 10.0 prints: two forwards, one connection the guest answered (port 22) and
    /// one still waiting for it.
    const INFO: &str = "Hub -1 (net0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n  TCP[SYN_SENT]      88       127.0.0.1 45023       10.0.2.15    23     0     0\r\n  TCP[ESTABLISHED]   87       127.0.0.1 45022       10.0.2.15    22     0     0\r\n  TCP[HOST_FORWARD]  15       127.0.0.1 45023       10.0.2.15    23     0     0\r\n  TCP[HOST_FORWARD]  14       127.0.0.1 45022       10.0.2.15    22     0     0\r\n";

    #[test]
    fn usernet_states() {
        assert!(usernet_established(INFO, 45022));
        assert!(!usernet_established(INFO, 45023), "SYN_SENT is no answer yet");
        assert!(!usernet_established(INFO, 22), "the guest port is not the host port");
        assert!(!usernet_established("", 45022));
    }
}
