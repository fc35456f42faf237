//! The QEMU driver against real QEMU processes running the tiny guest (`scripts/build-guest`).
//!
//! Needs `qemu-system-x86_64`, `qemu-img` (scripts/install-deps) and the built guest, found in
//! `$DROVER_GUEST_DIR` or `<workspace>/guest/out`. A missing guest is a failure, not a skip: a
//! silently skipped test proves nothing. VMs run under TCG with no network uplink (user-mode
//! networking with restrict=on, reachable only through forwards drover adds); every test
//! kills what it started, also when it fails (see [`KillOnDrop`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drover_hv::qemu::{Accel, QemuConfig, QemuDriver, TinyGuest, probe_kvm};
use drover_hv::{DiskSpec, HvError, Hypervisor, NicSpec, PowerState, ShutdownOutcome, TcpPortState, VmSpec};
use drover_qemu::image;
use uuid::Uuid;

/// Generous: the guest needs ~3-4 s under TCG, but CI machines may be loaded.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

fn guest_dir() -> PathBuf {
    std::env::var_os("DROVER_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out"))
}

fn tiny_guest() -> TinyGuest {
    let dir = guest_dir();
    TinyGuest::load(&dir).unwrap_or_else(|e| {
        panic!(
            "the tiny guest is not built in {} ({e}); run scripts/build-guest \
             (or set DROVER_GUEST_DIR)",
            dir.display()
        )
    })
}

/// Kills every QEMU started under `runtime_dir` when dropped, so a failing assertion does not
/// leave VMs running (they are daemonized and would outlive the test binary).
struct KillOnDrop {
    runtime_dir: PathBuf,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.runtime_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(pid) = std::fs::read_to_string(entry.path().join("qemu.pid")) else {
                continue;
            };
            let Ok(pid) = pid.trim().parse::<i32>() else {
                continue;
            };
            let is_ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&name))
                .unwrap_or(false);
            if is_ours {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

struct Fixture {
    // Field order matters: the guard kills QEMU before the directory is removed.
    _guard: KillOnDrop,
    dir: tempfile::TempDir,
    guest: TinyGuest,
}

impl Fixture {
    fn new() -> Self {
        let guest = tiny_guest();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        Fixture { _guard: KillOnDrop { runtime_dir: dir.path().join("run") }, dir, guest }
    }

    fn config(&self) -> QemuConfig {
        let mut config = QemuConfig::new(self.dir.path().join("run"));
        config.accel = Accel::Tcg;
        config
    }

    async fn spec(&self, name: &str) -> VmSpec {
        let disk = self.dir.path().join(format!("{name}.qcow2"));
        image::create_qcow2(&disk, 64 << 20).await.unwrap();
        VmSpec {
            id: Uuid::new_v4(),
            name: name.into(),
            vcpus: 1,
            memory_mib: 96,
            disks: vec![DiskSpec { path: disk }],
            nics: vec![NicSpec { network: "test-net".into(), mac: "52:54:00:d0:00:01".into(), no_uplink: false }],
            boot: self.guest.boot_spec(),
            hardware: Default::default(),
        }
    }
}

/// The Debian guest (`scripts/build-debian-guest`; missing is a failure, not a skip).
fn debian_guest() -> drover_hv::qemu::DebianGuest {
    let dir = std::env::var_os("DROVER_DEBIAN_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/debian"));
    drover_hv::qemu::DebianGuest::load(&dir)
        .unwrap_or_else(|e| panic!("the Debian guest is missing ({e}): run scripts/build-debian-guest"))
}

fn console(hv: &QemuDriver, vm: Uuid) -> String {
    std::fs::read_to_string(hv.console_log_path(vm)).unwrap_or_default()
}

#[tokio::test]
async fn marker_survives_a_graceful_shutdown_and_a_new_boot() {
    let fx = Fixture::new();
    let hv = QemuDriver::new(fx.config());
    let spec = fx.spec("persist").await;
    let vm = spec.id;

    let started = Instant::now();
    hv.power_on(&spec).await.unwrap();
    let pid = hv.pid(vm).expect("QEMU runs");
    hv.power_on(&spec).await.unwrap(); // idempotent: the same process
    assert_eq!(hv.pid(vm), Some(pid));
    let hb = hv
        .wait_heartbeat(vm, BOOT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("no heartbeat: {e}; console:\n{}", console(&hv, vm)));
    eprintln!(
        "first boot (with mke2fs): heartbeat {:.2} s after power_on, guest uptime {:.2} s",
        started.elapsed().as_secs_f64(),
        hb.uptime_secs
    );
    assert_eq!(hb.marker, None, "a fresh disk has no marker");
    assert!(console(&hv, vm).contains("drover-guest: ready"));
    assert_eq!(hv.status(vm).await.unwrap(), PowerState::Running);

    hv.write_marker(vm, "restore-point 1, ünïcode").await.unwrap();
    let hb = hv.wait_heartbeat(vm, BOOT_TIMEOUT).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("restore-point 1, ünïcode"));

    let t = Instant::now();
    assert_eq!(hv.shutdown(vm, Duration::from_secs(30)).await.unwrap(), ShutdownOutcome::Graceful);
    eprintln!("graceful shutdown took {} ms", t.elapsed().as_millis());
    assert_eq!(hv.status(vm).await.unwrap(), PowerState::Off);
    assert_eq!(hv.shutdown(vm, Duration::from_secs(1)).await.unwrap(), ShutdownOutcome::AlreadyOff);
    assert!(matches!(hv.wait_heartbeat(vm, Duration::from_secs(1)).await, Err(HvError::NotRunning(_))));
    assert!(!image::info(&spec.disks[0].path).await.unwrap().format.is_empty());

    let started = Instant::now();
    hv.power_on(&spec).await.unwrap();
    let hb = hv.wait_heartbeat(vm, BOOT_TIMEOUT).await.unwrap();
    eprintln!("second boot: heartbeat {:.2} s after power_on", started.elapsed().as_secs_f64());
    assert_eq!(hb.marker.as_deref(), Some("restore-point 1, ünïcode"), "the marker is on the disk");

    hv.power_off(vm).await.unwrap();
    assert_eq!(hv.status(vm).await.unwrap(), PowerState::Off);
    hv.power_off(vm).await.unwrap();
    hv.forget(vm).await.unwrap();
    assert!(!hv.vm_dir(vm).exists());
    assert!(spec.disks[0].path.exists(), "forget leaves disks alone");
}

#[tokio::test]
async fn a_new_driver_reattaches_and_sees_a_killed_vm_as_died() {
    let fx = Fixture::new();
    let spec = fx.spec("reattach").await;
    let vm = spec.id;
    {
        let first = QemuDriver::new(fx.config());
        first.power_on(&spec).await.unwrap();
    } // drover "restarts": the first driver is gone, QEMU is not

    let hv = QemuDriver::new(fx.config());
    assert_eq!(hv.reattach().await.unwrap(), vec![(vm, PowerState::Running)]);
    hv.wait_heartbeat(vm, BOOT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("no heartbeat: {e}; console:\n{}", console(&hv, vm)));

    // A shutdown that may not wait is a forced power-off.
    assert_eq!(hv.shutdown(vm, Duration::ZERO).await.unwrap(), ShutdownOutcome::ForcedOff);
    assert_eq!(hv.reattach().await.unwrap(), vec![(vm, PowerState::Off)]);

    hv.power_on(&spec).await.unwrap();
    let pid = hv.pid(vm).expect("QEMU runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while hv.status(vm).await.unwrap() != PowerState::Died {
        assert!(Instant::now() < deadline, "status never became Died");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restarted = QemuDriver::new(fx.config());
    assert_eq!(restarted.reattach().await.unwrap(), vec![(vm, PowerState::Died)]);
    restarted.power_off(vm).await.unwrap();
    assert_eq!(restarted.status(vm).await.unwrap(), PowerState::Off);
    restarted.forget(vm).await.unwrap();
}

/// The guest listens on port 22 (greeting) and 80 (quiet); the host sees both open and 23 closed
/// through the forwards `check_tcp_port` adds, none of them is left behind, and the guest itself
/// reaches nothing outside.
#[tokio::test]
async fn check_tcp_port_tells_open_from_closed() {
    let fx = Fixture::new();
    let hv = QemuDriver::new(fx.config());
    let mut spec = fx.spec("ports").await;
    spec.boot = fx.guest.boot_spec_listening(&[22]);
    // No uplink: the guest tries the host's loopback through slirp's gateway (10.0.2.2), which
    // an unrestricted user-mode network would let through, and must not get there.
    let host_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host_port = host_listener.local_addr().unwrap().port();
    let cmdline = spec.boot.cmdline.take().unwrap();
    // Port 80 accepts but says nothing first, like HTTP: only slirp's state tells it open.
    spec.boot.cmdline = Some(format!("{cmdline} drover.listen-quiet=80 drover.reach=10.0.2.2:{host_port}"));
    let vm = spec.id;

    // Checked right after power-on, while the guest boots: slirp accepts on the host side at
    // once, but the guest does not answer yet; the check must keep trying, not call that open.
    let started = Instant::now();
    hv.power_on(&spec).await.unwrap();
    let state = hv.check_tcp_port(vm, 22, BOOT_TIMEOUT).await.unwrap();
    let open_after = started.elapsed();
    assert_eq!(state, TcpPortState::Open, "console:\n{}", console(&hv, vm));
    let hb = hv.wait_heartbeat(vm, BOOT_TIMEOUT).await.unwrap();
    eprintln!(
        "port 22 open {:.2} s after power_on; heartbeat {:.2} s after (guest uptime {:.2} s)",
        open_after.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        hb.uptime_secs
    );
    assert!(console(&hv, vm).contains("listen=22"), "console:\n{}", console(&hv, vm));

    for _ in 0..3 {
        let t = Instant::now();
        assert_eq!(hv.check_tcp_port(vm, 22, Duration::from_secs(10)).await.unwrap(), TcpPortState::Open);
        eprintln!("open port 22: decided in {} ms (forward added and removed)", t.elapsed().as_millis());
        // A zero timeout is one attempt.
        let t = Instant::now();
        assert_eq!(hv.check_tcp_port(vm, 23, Duration::ZERO).await.unwrap(), TcpPortState::Closed);
        eprintln!("closed port 23: decided in {} ms (one attempt)", t.elapsed().as_millis());
    }
    for _ in 0..3 {
        let t = Instant::now();
        assert_eq!(hv.check_tcp_port(vm, 80, Duration::from_secs(10)).await.unwrap(), TcpPortState::Open);
        eprintln!("open quiet port 80: decided in {} ms", t.elapsed().as_millis());
    }
    let t = Instant::now();
    assert_eq!(hv.check_tcp_port(vm, 23, Duration::from_secs(2)).await.unwrap(), TcpPortState::Closed);
    let waited = t.elapsed();
    // Attempts repeat until less than one pause (200 ms) is left.
    assert!(
        waited >= Duration::from_millis(1700) && waited < Duration::from_secs(10),
        "retried until the timeout: {waited:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    while !console(&hv, vm).contains("drover-guest: reach ") {
        assert!(Instant::now() < deadline, "the guest never reported its reach attempt:\n{}", console(&hv, vm));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(console(&hv, vm).contains(&format!("reach 10.0.2.2:{host_port} unreachable")), "{}", console(&hv, vm));
    let accepted = tokio::time::timeout(Duration::from_millis(100), host_listener.accept()).await;
    assert!(accepted.is_err(), "the guest reached the host: {accepted:?}");

    let mut qmp = hv.qmp(vm).await.unwrap();
    let info = qmp.execute("human-monitor-command", serde_json::json!({"command-line": "info usernet"})).await.unwrap();
    let info = info.as_str().unwrap_or_default().to_owned();
    drop(qmp);
    assert!(!info.contains("HOST_FORWARD"), "every forward is removed:\n{info}");

    // Without a NIC there is nothing to check through.
    hv.power_off(vm).await.unwrap();
    spec.nics.clear();
    hv.power_on(&spec).await.unwrap();
    assert!(matches!(hv.check_tcp_port(vm, 22, Duration::ZERO).await, Err(HvError::InvalidSpec(_))));
    hv.forget(vm).await.unwrap();
    assert!(matches!(hv.check_tcp_port(vm, 22, Duration::ZERO).await, Err(HvError::UnknownVm(_))));
}

/// `Accel::Auto` relies on the probe: whatever the host's KVM does, the probe must answer within
/// its timeout and leave nothing behind.
#[tokio::test]
async fn kvm_probe_answers_within_its_timeout() {
    let guest = tiny_guest();
    let started = Instant::now();
    let timeout = Duration::from_secs(4);
    let ok = probe_kvm(Path::new("qemu-system-x86_64"), &guest.boot_spec(), timeout).await;
    eprintln!("KVM probe: {ok} after {:.1} s", started.elapsed().as_secs_f64());
    assert!(started.elapsed() < timeout + Duration::from_secs(5));
}

/// A real guest with no drover code in it (`scripts/build-debian-guest`: Debian, systemd,
/// `qemu-guest-agent`) is heard through the standard QEMU guest agent's port, which every VM the
/// driver starts has; the heartbeat says so (no marker, its QEMU's uptime) and carries the
/// guest's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debian_guest_is_heard_through_the_qemu_guest_agent() {
    let debian = debian_guest();
    let f = Fixture::new();
    let hv = QemuDriver::new(f.config());
    // An overlay: the cached image stays as built.
    let disk = f.dir.path().join("debian.qcow2");
    image::create_overlay(&disk, &debian.disk).await.unwrap();
    let spec = VmSpec {
        id: Uuid::new_v4(),
        name: "debian".into(),
        vcpus: 1,
        memory_mib: 512,
        disks: vec![DiskSpec { path: disk }],
        // User networking (no uplink): QEMU's DHCP gives it 10.0.2.15.
        nics: vec![NicSpec { network: "test-net".into(), mac: "52:54:00:d0:0d:eb".into(), no_uplink: false }],
        boot: debian.boot_spec(),
        hardware: Default::default(),
    };
    let started = Instant::now();
    hv.power_on(&spec).await.unwrap();
    let hb = hv.wait_heartbeat(spec.id, Duration::from_secs(240)).await.unwrap_or_else(|e| {
        let console = console(&hv, spec.id);
        let tail: Vec<&str> = console.lines().rev().take(30).collect();
        panic!("no heartbeat from the Debian guest: {e}; console (last lines first):\n{}", tail.join("\n"))
    });
    println!("the Debian guest's heartbeat (guest agent) {:.1} s after power-on", started.elapsed().as_secs_f64());
    assert_eq!(hb.marker, None, "the guest agent carries no marker");
    assert!(hb.uptime_secs > 0.0 && hb.uptime_secs <= started.elapsed().as_secs_f64() + 1.0, "{hb:?}");
    // Heard again on a new connection (the first client gone), with the address the guest
    // took by DHCP once it has it (not loopback or link-local).
    let deadline = Instant::now() + Duration::from_secs(90);
    let hb = loop {
        let hb = hv.wait_heartbeat(spec.id, Duration::from_secs(20)).await.unwrap();
        if !hb.addresses.is_empty() || Instant::now() > deadline {
            break hb;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(hb.addresses, vec!["10.0.2.15".to_string()], "{hb:?}");

    // Its file systems freeze through the guest agent, and thaw.
    let started = Instant::now();
    let frozen = hv.guest_freeze(spec.id).await.unwrap();
    println!("the Debian guest froze in {:.2} s: {}", started.elapsed().as_secs_f64(), frozen.reason);
    assert!(frozen.frozen && frozen.filesystems >= 1, "{frozen:?}");
    // The guest agent says it is frozen: a second freeze is refused as someone else's.
    let again = hv.guest_freeze(spec.id).await.unwrap();
    assert!(!again.frozen && again.reason.contains("already frozen"), "{again:?}");
    assert_eq!(hv.guest_thaw(spec.id).await.unwrap(), frozen.filesystems);
    assert_eq!(hv.guest_thaw(spec.id).await.unwrap(), 0, "thawing a thawed guest thaws nothing");

    // A marker, written and read through the guest agent (the guest has no drover channel).
    assert_eq!(hv.wait_heartbeat(spec.id, Duration::from_secs(20)).await.unwrap().marker, None);
    hv.write_marker(spec.id, "written through qemu-ga").await.unwrap();
    let hb = hv.wait_heartbeat(spec.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("written through qemu-ga"));
    assert_eq!(hv.power_off(spec.id).await.ok(), Some(()));
}

/// The Debian guest boots from its own disk, with no kernel given (SYSLINUX on its boot
/// partition, `scripts/build-debian-guest`): under SeaBIOS and under UEFI (OVMF, with the VM's
/// own copy of the UEFI variables), and is heard through its guest agent each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debian_guest_boots_from_its_disk_under_bios_and_uefi() {
    let debian = debian_guest();
    let f = Fixture::new();
    let hv = QemuDriver::new(f.config());
    for firmware in [drover_hv::Firmware::Bios, drover_hv::Firmware::Uefi] {
        let disk = f.dir.path().join(format!("debian-{firmware:?}.qcow2"));
        image::create_overlay(&disk, &debian.disk).await.unwrap();
        let spec = VmSpec {
            id: Uuid::new_v4(),
            name: format!("debian-{firmware:?}"),
            vcpus: 1,
            memory_mib: 512,
            disks: vec![DiskSpec { path: disk }],
            nics: vec![],
            boot: drover_hv::BootSpec { kernel: None, initrd: None, cmdline: None, firmware },
            hardware: Default::default(),
        };
        let started = Instant::now();
        hv.power_on(&spec).await.unwrap();
        let hb = hv.wait_heartbeat(spec.id, Duration::from_secs(300)).await.unwrap_or_else(|e| {
            let console = console(&hv, spec.id);
            let tail: Vec<&str> = console.lines().rev().take(30).collect();
            panic!("no heartbeat from the Debian guest booted by {firmware:?}: {e}; console:\n{}", tail.join("\n"))
        });
        println!(
            "{firmware:?}: the Debian guest, booted from its disk, answered {:.1} s after power-on",
            started.elapsed().as_secs_f64()
        );
        assert_eq!(hb.marker, None);
        let console = console(&hv, spec.id);
        assert!(console.contains("Linux version"), "the kernel came from the disk: {console}");
        if firmware == drover_hv::Firmware::Bios {
            assert!(console.contains("SYSLINUX"), "SeaBIOS ran SYSLINUX from the disk");
        } else {
            let vars = hv.vm_dir(spec.id).join("uefi-vars.fd");
            let mode =
                std::fs::metadata(&vars).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
            assert_eq!(mode.ok(), Some(0o600), "the VM's own UEFI variables, private");
        }
        hv.power_off(spec.id).await.unwrap();
    }
}
