//! Set-ups shared by the tests of several crates (feature `test-support`; never in the product).

use std::path::Path;

use drover_store::Store;
use drover_types::{
    DatastoreId, Replica, ReplicationJobId, RestorePoint, RestorePointDisk, RestorePointId, RestorePointState,
    SessionId, TenantId, VmId,
};

/// A ready replica of `vm` (for `job`, on datastore `dr` at `dr_path`) with one published restore
/// point whose disk `data` is an empty qcow2 of 64 MiB: what a failover can boot from where the
/// simulated hypervisor cannot replicate for real.
pub async fn replica_with_point(
    store: &Store,
    tenant: TenantId,
    job: ReplicationJobId,
    vm: (VmId, &str),
    dr: DatastoreId,
    dr_path: &Path,
) -> (Replica, RestorePoint) {
    let replica = Replica::new(tenant, job, vm, dr);
    store.object_insert(&replica).await.expect("replica record");
    let chain = dr_path.join(replica.id.to_string()).join("data");
    std::fs::create_dir_all(&chain).expect("chain directory");
    let file = chain.join("point-1.qcow2");
    drover_qemu::image::create_qcow2(&file, 64 << 20).await.expect("point file");
    let point = RestorePoint {
        id: RestorePointId::new(),
        replica_id: replica.id,
        sequence: 0,
        session_id: SessionId::new(),
        state: RestorePointState::Published,
        created_at: replica.created_at,
        bytes_written: 0,
        disks: vec![RestorePointDisk {
            disk: "data".into(),
            file: file.to_string_lossy().into(),
            size_bytes: 64 << 20,
            manifest_digest: String::new(),
            tracking_bitmap: None,
        }],
        verified: false,
        consistency: Default::default(),
    };
    store.restore_point_publish(tenant, &point).await.expect("published point");
    (replica, point)
}

/// The host paths of a test: `root` (a test's temporary directory) holds its datastores and its
/// imports, and the tiny guest's and the Debian guest's directories, when they are built, are
/// import directories too (the real-QEMU tests boot their kernels and import the Debian disk).
pub fn host_paths(root: &Path) -> crate::host_paths::HostPaths {
    let mut imports = vec![root.to_path_buf()];
    let guest = std::env::var_os("DROVER_GUEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out"));
    if let Ok(guest) = std::fs::canonicalize(guest) {
        imports.push(guest);
    }
    let debian = std::env::var_os("DROVER_DEBIAN_GUEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/debian"));
    if let Ok(debian) = std::fs::canonicalize(debian) {
        imports.push(debian);
    }
    crate::host_paths::HostPaths::new(&[root.to_path_buf()], &imports).expect("test host paths")
}

/// The inventory most engine tests start from: a production site, a host `h1` and one datastore
/// per name at `root/<name>`, made by `admin` (a system administrator). Returns the host and the
/// datastores with their paths.
pub async fn infrastructure(
    app: &crate::app::App,
    admin: &crate::app::Caller,
    root: &Path,
    datastores: &[&str],
) -> (drover_types::HostId, Vec<(DatastoreId, std::path::PathBuf)>) {
    let site = app.site_create(admin, "prod", drover_types::SiteKind::Production).await.expect("site");
    let host = app
        .host_create(admin, crate::app::NewHost { site_id: site.id, name: "h1".into(), address: "local".into() })
        .await
        .expect("host");
    let mut out = Vec::new();
    for name in datastores {
        let path = root.join(name);
        let new =
            crate::app::NewDatastore { host_id: host.id, name: (*name).into(), path: path.to_string_lossy().into() };
        out.push((app.datastore_create(admin, new).await.expect("datastore").id, path));
    }
    (host.id, out)
}

/// A VM with one 64 MiB disk `data`, no NIC and no boot files: what the simulated hypervisor runs.
pub fn new_vm(name: &str, host: drover_types::HostId, datastore: DatastoreId) -> crate::app::NewVm {
    crate::app::NewVm {
        name: name.into(),
        host_id: host,
        datastore_id: datastore,
        vcpus: 1,
        memory_mib: 96,
        disks: vec![drover_types::VmDisk { name: "data".into(), size_bytes: 64 << 20, import_from: None }],
        nics: vec![],
        tags: vec![],
        boot: drover_types::VmBoot { kernel: None, initrd: None, cmdline: None, firmware: Default::default() },
    }
}

/// The engine configuration of the simulated-hypervisor tests: short timeouts, a fast monitor,
/// and `root` as the host's datastore root and import directory ([`host_paths`]).
pub fn fast_config(root: &Path) -> crate::EngineConfig {
    crate::EngineConfig {
        heartbeat_timeout: std::time::Duration::from_secs(5),
        shutdown_timeout: std::time::Duration::from_secs(2),
        retry_backoff: std::time::Duration::from_millis(10),
        monitor_interval: std::time::Duration::from_millis(100),
        host_paths: host_paths(root),
        agent_wait: std::time::Duration::from_secs(30),
        ..crate::EngineConfig::default()
    }
}

/// Kills every VM `driver` has a runtime directory for: VMs outlive drover by design, and a test
/// must not leave them behind (call it from a test fixture's `Drop`).
pub fn kill_vms(driver: &drover_hv::qemu::QemuDriver) {
    for vm in std::fs::read_dir(driver.config().runtime_dir.clone()).into_iter().flatten().flatten() {
        if let Ok(id) = vm.file_name().to_string_lossy().parse::<uuid::Uuid>()
            && let Some(pid) = driver.pid(id)
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}
