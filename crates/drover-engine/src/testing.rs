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
    drover_hv::image::create_qcow2(&file, 64 << 20).await.expect("point file");
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
        }],
        verified: false,
    };
    store.restore_point_publish(tenant, &point).await.expect("published point");
    (replica, point)
}

/// The host paths of a test: `root` (a test's temporary directory) holds its datastores and its
/// imports, and the tiny guest's directory, when it is built, is an import directory too (the
/// real-QEMU tests boot its kernel and initrd).
pub fn host_paths(root: &Path) -> crate::host_paths::HostPaths {
    let mut imports = vec![root.to_path_buf()];
    let guest = std::env::var_os("DROVER_GUEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out"));
    if let Ok(guest) = std::fs::canonicalize(guest) {
        imports.push(guest);
    }
    crate::host_paths::HostPaths::new(&[root.to_path_buf()], &imports).expect("test host paths")
}
