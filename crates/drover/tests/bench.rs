//! `drover bench replication` on a small disk: the byte counts it reports must meet the design's
//! targets (these are counts, not timings, so they hold on any machine), and failback must leave
//! production equal to the replica.

use serde_json::Value;

#[test]
fn bench_replication_reports_what_moved() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["bench", "replication", "--size", "32MiB", "--change", "3%", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let changed = r["changed_bytes"].as_u64().unwrap();
    assert!(changed > 0);
    assert_eq!(r["full_copy"]["bytes_sent"].as_u64(), Some(32 << 20), "the seed sends the whole (random) disk");
    // Incremental: only the changed data, read once.
    assert!(r["incremental_ratio"].as_f64().unwrap() <= 1.05, "{r}");
    assert_eq!(r["incremental"]["bytes_read"], r["incremental"]["bytes_sent"]);
    // Hash-compare against the target's manifest: the source read once, the target not at all;
    // reading both sides: each once. Only the differing blocks are sent either way.
    assert_eq!(r["hash_compare"]["bytes_read"].as_u64(), Some(32 << 20));
    assert_eq!(r["hash_compare"]["bytes_sent"].as_u64(), Some(changed));
    assert_eq!(r["hash_compare_reading_target"]["bytes_read"].as_u64(), Some(2 * (32 << 20)));
    assert_eq!(r["hash_compare_reading_target"]["bytes_sent"].as_u64(), Some(changed));
    // Failback: no more than 1.1x what really changed, and production ends equal to the replica.
    assert!(r["failback"]["ratio"].as_f64().unwrap() <= 1.1, "{r}");
    assert_eq!(r["failback"]["equal_after"], true);
    assert!(r["convert_durable"]["min"].as_f64().unwrap() > 0.0, "{r}");
    // The full copy and the baselines ran repeatedly (the default three times), min ≤ median.
    for baseline in ["full_copy_runs", "convert_default", "convert_durable", "convert_direct", "rsync"] {
        let b = &r[baseline];
        assert_eq!(b["runs"], 3, "{baseline}: {r}");
        assert!(b["min"].as_f64().unwrap() <= b["median"].as_f64().unwrap(), "{baseline}: {r}");
    }
}

/// Between two agents over mutual TLS: the seed sends the whole (random, incompressible) disk,
/// the incremental exactly the changed blocks, within 1.05x on the wire, and the point it makes
/// equals the source (the bench checks and fails otherwise).
#[test]
fn bench_replication_remote_reports_what_crossed_the_wire() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["bench", "replication", "--remote", "--size", "16MiB", "--change", "10%", "--baseline-runs", "2"])
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let wire = r["seed_wire_bytes"].as_u64().unwrap();
    assert!((16 << 20..=(16 << 20) * 105 / 100).contains(&wire), "{r}");
    let changed = r["changed_bytes"].as_u64().unwrap();
    assert!(changed > 0);
    assert_eq!(r["incremental_data_bytes"].as_u64(), Some(changed), "{r}");
    assert!(r["incremental_wire_bytes"].as_u64().unwrap() <= changed * 105 / 100, "{r}");
    assert_eq!(r["seed_seconds"].as_array().unwrap().len(), 2);
    assert_eq!(r["qemu_img_convert_seconds"].as_array().unwrap().len(), 2);
    // The CPU of every process of each copy (at the kernel's 10 ms ticks: a 16 MiB copy may
    // show none).
    for key in ["seed_cpu_all_seconds_per_gib", "convert_cpu_all_seconds_per_gib"] {
        assert!(r[key].as_f64().is_some_and(|c| c.is_finite() && c >= 0.0), "{key}: {r}");
    }
}

#[test]
fn bench_refuses_bad_arguments() {
    for args in [["--size", "3MiB"], ["--size", "lots"], ["--change", "0%"], ["--change", "150%"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(["bench", "replication"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
    }
}

/// `drover bench em-sessions` on a short history: every request type is timed with the runs asked
/// for (min ≤ median ≤ p99), answers with a body, and the sessions were stored. Shape only: the
/// figures themselves are the benchmark's to print, not a test's to assert.
#[test]
fn bench_em_sessions_reports_every_request_type() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["bench", "em-sessions", "--sessions", "500", "--runs", "3", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["sessions"], 500, "{r}");
    let timings = r["timings"].as_array().unwrap();
    assert!(timings.len() >= 5, "{r}");
    for t in timings {
        let (min, median, p99) =
            (t["min_ms"].as_f64().unwrap(), t["median_ms"].as_f64().unwrap(), t["p99_ms"].as_f64().unwrap());
        assert!(0.0 < min && min <= median && median <= p99, "{t}");
        assert_eq!(t["runs"], 3, "{t}");
        assert!(t["bytes"].as_u64().unwrap() > 0, "{t}");
    }
}
