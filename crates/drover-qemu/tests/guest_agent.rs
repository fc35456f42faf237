//! The QEMU guest agent of a real guest: the Debian VM `scripts/build-debian-guest` makes (systemd,
//! `qemu-guest-agent`), booted under TCG on an overlay of its cached disk, answered through
//! drover's client: ping, what it can do, its interfaces, and a freeze and thaw of its file
//! systems. Fails (never skips) when the guest has not been built.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_qemu::qga::{FreezeStatus, GuestAgent};

/// How long the guest may take to boot to its guest agent under TCG (measured about 20 s).
const BOOT_LIMIT: Duration = Duration::from_secs(240);

fn debian_guest() -> PathBuf {
    let dir = std::env::var_os("DROVER_DEBIAN_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/debian"));
    assert!(
        dir.join("guest.json").is_file() && dir.join("disk.qcow2").is_file(),
        "the Debian guest is missing in {}: run scripts/build-debian-guest first",
        dir.display()
    );
    dir
}

/// The VM's QEMU, killed when dropped.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn boot(guest: &Path, dir: &Path) -> Vm {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(guest.join("guest.json")).unwrap()).unwrap();
    let disk = dir.join("disk.qcow2");
    // An overlay: the cached image stays as built.
    drover_qemu::image::create_overlay(&disk, &guest.join("disk.qcow2")).await.unwrap();
    let child = Command::new("qemu-system-x86_64")
        .args(["-machine", "pc,accel=tcg", "-m", "512", "-smp", "1", "-nodefaults", "-display", "none"])
        .arg("-kernel")
        .arg(guest.join(manifest["kernel"].as_str().unwrap()))
        .arg("-initrd")
        .arg(guest.join(manifest["initrd"].as_str().unwrap()))
        .args(["-append", manifest["cmdline"].as_str().unwrap()])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2", disk.display()))
        .args(["-device", "virtio-serial"])
        .arg("-chardev")
        .arg(format!("socket,path={},server=on,wait=off,id=qga0", dir.join("qga.sock").display()))
        .args(["-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Vm(child)
}

/// Connects once the guest agent answers (it starts late in the guest's boot).
async fn wait_for_agent(vm: &mut Vm, dir: &Path) -> (GuestAgent, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = vm.0.try_wait().unwrap() {
            panic!("QEMU exited ({status}) before the guest agent answered");
        }
        if let Ok(agent) = GuestAgent::connect(&dir.join("qga.sock"), Duration::from_secs(3)).await {
            return (agent, started.elapsed());
        }
        if started.elapsed() > BOOT_LIMIT {
            let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
            let tail: String =
                console.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            panic!("the guest agent did not answer within {BOOT_LIMIT:?}; console:\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_agent_of_a_debian_guest_answers_and_freezes_its_file_systems() {
    let guest = debian_guest();
    let dir = tempfile::tempdir().unwrap();
    let mut vm = boot(&guest, dir.path()).await;
    let (mut agent, after) = wait_for_agent(&mut vm, dir.path()).await;
    println!("the Debian guest's agent answered {:.1} s after QEMU started (TCG)", after.as_secs_f64());

    agent.ping().await.unwrap();
    let info = agent.info().await.unwrap();
    for command in ["guest-ping", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-network-get-interfaces"] {
        assert!(info.can(command), "the guest agent {} cannot {command}", info.version);
    }
    let interfaces = agent.network_interfaces().await.unwrap();
    let lo = interfaces.iter().find(|i| i.name == "lo").unwrap_or_else(|| panic!("no lo in {interfaces:?}"));
    assert!(lo.ip_addresses.iter().any(|a| a.address == "127.0.0.1" && a.prefix == 8), "{lo:?}");

    assert_eq!(agent.fsfreeze_status().await.unwrap(), FreezeStatus::Thawed);
    let frozen = agent.fsfreeze_freeze().await.unwrap();
    assert!(frozen >= 1, "the root file system at least: {frozen}");
    assert_eq!(agent.fsfreeze_status().await.unwrap(), FreezeStatus::Frozen);
    // A second freeze is refused by the agent, with its reason, and changes nothing.
    let e = agent.fsfreeze_freeze().await.unwrap_err();
    assert!(matches!(e, drover_qemu::ToolError::GuestAgent { .. }), "{e}");
    assert_eq!(agent.fsfreeze_thaw().await.unwrap(), frozen);
    assert_eq!(agent.fsfreeze_status().await.unwrap(), FreezeStatus::Thawed);

    // A second client (the first dropped) syncs past whatever the first left and is answered.
    drop(agent);
    let mut again = GuestAgent::connect(&dir.path().join("qga.sock"), Duration::from_secs(10)).await.unwrap();
    again.ping().await.unwrap();
}
