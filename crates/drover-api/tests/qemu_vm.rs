//! The integration test of the foundation: the server in-process on a temporary SQLite database,
//! a VM created over HTTP, powered on as a real QEMU process running the tiny guest (heartbeat
//! seen), shut down, and every session record checked.

mod common;

use std::time::Duration;

use common::{Server, tiny_guest, with_qemu};
use drover_hv::Hypervisor;
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Reads the SSE stream of a session until it ends; returns the progress values and log lines seen.
async fn follow(server: &Server, token: &str, session: &str) -> (Vec<u64>, Vec<String>, Value) {
    let resp = server
        .http
        .get(format!("{}/v1/sessions/{session}/events", server.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let (mut progress, mut log, mut last) = (Vec::new(), Vec::new(), Value::Null);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(deadline, stream.next()).await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let kind =
                event.lines().find_map(|l| l.strip_prefix("event:")).map(str::trim).unwrap_or_default().to_string();
            let data: String = event.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).collect();
            if data.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(&data).unwrap();
            match kind.as_str() {
                "session" => {
                    progress.push(v["progress"].as_u64().unwrap());
                    last = v;
                }
                "log" => log.push(v["message"].as_str().unwrap().to_string()),
                other => panic!("unexpected event {other:?}"),
            }
        }
    }
    (progress, log, last)
}

/// True once the process has exited: gone from /proc, or a zombie waiting for init to reap it.
async fn process_gone(pid: u32) -> bool {
    for _ in 0..50 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat) if stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')) => return true,
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    false
}

/// Checks the invariants every finished session record holds.
fn assert_finished(s: &Value, kind: &str) {
    assert_eq!(s["kind"], kind, "{s}");
    assert_eq!(s["state"], "Stopped", "{s}");
    assert_eq!(s["result"], "Success", "{s}");
    assert_eq!(s["progress"], 100);
    assert!(s["ended_at"].is_string());
    assert!(s["failure_message"].is_null());
    let tasks = s["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 1);
    assert_eq!(tasks[0]["state"], "Stopped");
    assert_eq!(tasks[0]["result"], "Success");
    assert_eq!(tasks[0]["progress"], 100);
}

#[tokio::test]
async fn a_real_vm_is_created_powered_on_and_shut_down_over_http() {
    let guest = tiny_guest();
    let (server, driver) = with_qemu().await;
    let t = server.admin().await;
    let (host, ds) = server.infrastructure(&t).await;
    let boot = json!({"kernel": guest.vmlinux, "initrd": guest.initramfs, "cmdline": guest.cmdline});
    let vm = server.vm(&t, &host, &ds, "tiny", json!({"boot": boot, "memory_mib": 128})).await;
    let image = server.dir.path().join("ds1").join(&vm).join("data.qcow2");
    let info = drover_qemu::image::info(&image).await.unwrap();
    assert_eq!(info.format, "qcow2");
    assert_eq!(info.virtual_size, 64 << 20);

    // Power on: a real QEMU process; the session waits for the guest's heartbeat.
    let (status, accepted) = server.call(Some(&t), Method::POST, &format!("/v1/vms/{vm}/power-on"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let session = accepted["session_id"].as_str().unwrap().to_string();
    let (progress, log, last) = follow(&server, &t, &session).await;
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "progress went backwards: {progress:?}");
    assert_eq!(progress.last(), Some(&100));
    assert_eq!(last["result"], "Success", "{last}");
    assert!(log.iter().any(|l| l.starts_with("heartbeat: guest up")), "{log:?}");
    let vm_id: uuid::Uuid = vm.parse().unwrap();
    assert_eq!(driver.status(vm_id).await.unwrap(), drover_hv::PowerState::Running);
    let pid = driver.pid(vm_id).expect("a QEMU process");
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(cmdline.contains("qemu-system-x86_64") && cmdline.contains(&vm), "{cmdline}");
    let v = server.ok(&t, Method::GET, &format!("/v1/vms/{vm}"), None).await;
    assert_eq!(v["power_state"], "Running");

    // The guest answers on its channel and keeps a marker on its data disk.
    driver.write_marker(vm_id, "hello from the test").await.unwrap();
    let hb = driver.wait_heartbeat(vm_id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("hello from the test"));

    // A second power-on while running is a conflict and changes nothing.
    let (status, _) = server.call(Some(&t), Method::POST, &format!("/v1/vms/{vm}/power-on"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Graceful shutdown through ACPI.
    let (_, accepted) = server.call(Some(&t), Method::POST, &format!("/v1/vms/{vm}/shutdown"), None).await;
    let s = server.wait_session(&t, accepted["session_id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_finished(&s, "VmShutdown");
    assert_eq!(driver.status(vm_id).await.unwrap(), drover_hv::PowerState::Off);
    assert!(process_gone(pid).await, "QEMU process {pid} still running after the shutdown");
    let (_, log) =
        server.call(Some(&t), Method::GET, &format!("/v1/sessions/{}/log", s["id"].as_str().unwrap()), None).await;
    assert!(log["items"].as_array().unwrap().iter().any(|e| e["message"] == "shutdown: Graceful"), "{log}");

    // Every session of the VM, checked.
    let (_, sessions) =
        server.call(Some(&t), Method::GET, &format!("/v1/sessions?target_id={vm}&order=oldest"), None).await;
    let kinds: Vec<&str> = sessions["items"].as_array().unwrap().iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["VmCreate", "VmPowerOn", "VmShutdown"]);
    for item in sessions["items"].as_array().unwrap() {
        let id = item["id"].as_str().unwrap();
        let s = server.ok(&t, Method::GET, &format!("/v1/sessions/{id}"), None).await;
        assert_finished(&s, item["kind"].as_str().unwrap());
        let (_, log) = server.call(Some(&t), Method::GET, &format!("/v1/sessions/{id}/log"), None).await;
        let messages: Vec<&str> =
            log["items"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
        assert!(messages.first().unwrap().ends_with("started"), "{messages:?}");
        assert!(messages.last().unwrap().ends_with("finished: Success"), "{messages:?}");
    }
    let steps = server
        .app
        .engine()
        .store()
        .steps_of(sessions["items"][1]["id"].as_str().unwrap().parse().unwrap())
        .await
        .unwrap();
    let names: Vec<_> = steps.iter().map(|s| (s.name.as_str(), s.state)).collect();
    use drover_types::StepState::Done;
    assert_eq!(names, [("begin", Done), ("power_on", Done), ("wait_heartbeat", Done), ("mark_state", Done)]);

    // Power on again: the marker written before the shutdown is on the disk.
    let (_, accepted) = server.call(Some(&t), Method::POST, &format!("/v1/vms/{vm}/power-on"), None).await;
    let s = server.wait_session(&t, accepted["session_id"].as_str().unwrap(), Duration::from_secs(120)).await;
    assert_eq!(s["result"], "Success", "{s}");
    let hb = driver.wait_heartbeat(vm_id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("hello from the test"));

    // Delete powers it off and removes the disks.
    let (_, accepted) = server.call(Some(&t), Method::POST, &format!("/v1/vms/{vm}/power-off"), None).await;
    let s = server.wait_session(&t, accepted["session_id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_finished(&s, "VmPowerOff");
    let (status, accepted) = server.call(Some(&t), Method::DELETE, &format!("/v1/vms/{vm}"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let s = server.wait_session(&t, accepted["session_id"].as_str().unwrap(), Duration::from_secs(60)).await;
    assert_finished(&s, "VmDelete");
    assert!(!image.exists());
    assert_eq!(server.call(Some(&t), Method::GET, &format!("/v1/vms/{vm}"), None).await.0, StatusCode::NOT_FOUND);
    server.stop().await;
}
