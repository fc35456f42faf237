//! The README's first command, as CI can run it: `drover lab --exit --scenario` on a fresh data
//! directory brings up real VMs, replicates them, fails over, fails back and commits.

mod common;

use common::QemuReaper;

use std::path::Path;

/// Runs `drover lab --exit --scenario` with `extra` arguments on a fresh data directory and
/// returns what it printed, after killing every process that names the directory (the lab's VMs
/// outlive it by design). Fails unless the lab succeeded.
fn run_lab(extra: &[&str]) -> String {
    let guest = std::env::var_os("DROVER_GUEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out"));
    assert!(guest.join("guest.json").is_file(), "the tiny guest is missing: run scripts/build-guest first");
    // Short path: QEMU's sockets live under it.
    let data = tempfile::Builder::new().prefix("drl").tempdir_in("/tmp").unwrap();
    let _reaper = QemuReaper(data.path().to_path_buf());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["lab", "--exit", "--scenario", "--accel", "tcg", "--listen", "127.0.0.1:0"])
        .args(["--vro-listen", "127.0.0.1:0", "--em-listen", "127.0.0.1:0"])
        .args(extra)
        .arg("--data-dir")
        .arg(data.path())
        .arg("--guest-dir")
        .arg(&guest)
        .env_remove("DROVER_ADMIN_PASSWORD")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // The lab's VMs (and any thaw watchdog) outlive it by design; stop them.
    let needle = data.path().to_string_lossy().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>()
            && let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && String::from_utf8_lossy(&cmd).contains(&needle)
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("Failed"), "{stdout}");
    stdout
}

#[test]
fn lab_scenario_runs_the_whole_story() {
    let stdout = run_lab(&[]);
    for want in [
        "drover lab is up",
        "  VRO:",
        "/api/v3",
        "  EM:",
        "/api/sessionMngr/?v=latest",
        "replica lab-vm1_replica  Ready, 1 restore point(s)",
        "fail over to DR",
        "production site lost",
        "production host cannot be reached",
        "production shows the markers written at DR",
        "scenario complete",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
    // The admin password is printed once, on this first start.
    assert!(stdout.contains("login:      admin / "), "{stdout}");
}

/// The same story with the real guest: a Debian VM whose points are application-consistent
/// (frozen through its guest agent, on the production agent), and whose markers travel through
/// its guest agent.
#[test]
fn lab_scenario_runs_with_the_debian_guest() {
    let debian = std::env::var_os("DROVER_DEBIAN_GUEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/debian"));
    let stdout = run_lab(&["--guest", "debian", "--vms", "1", "--debian-guest-dir", debian.to_str().unwrap()]);
    for want in [
        "replica lab-debian1_replica Ready, 1 restore point(s), the newest application-consistent",
        "application-consistent cut: ",
        "production host cannot be reached",
        "replicas show production's markers",
        "production shows the markers written at DR",
        "scenario complete",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}
