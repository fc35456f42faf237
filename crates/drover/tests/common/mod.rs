//! What several of drover's end-to-end tests share.

use std::path::{Path, PathBuf};

/// Kills every QEMU process whose command line names `dir` when dropped: VMs are daemonized and
/// outlive drover and its agents by design, so a test that ends with a VM running (or fails
/// half-way) would leave it burning CPU for the rest of the run. Declare it after the temporary
/// directory, so it is dropped first.
pub struct QemuReaper(pub PathBuf);

impl Drop for QemuReaper {
    fn drop(&mut self) {
        for pid in qemu_pids(&self.0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// The QEMU processes whose command line names `dir`.
pub fn qemu_pids(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("qemu-system") && c.contains(&needle)
                })
                .unwrap_or(false)
        })
        .collect()
}
