//! Protecting a libvirt domain that drover did not make: two `drover agent`s on the libvirt
//! driver (`--hypervisor libvirt`) beside a libvirt daemon (started here when none runs), and a
//! domain defined with `virsh define` outside drover, booting the tiny guest from two images
//! (a system and a data disk, cut in one libvirt backup job) that are in no drover datastore.
//! It is discovered and imported, powered on through drover, replicated (seed, then its dirty
//! extents only), its QEMU killed with `kill -9` between cycles (the next cycle finds the
//! checkpoints' bitmaps broken and hash-compares the disks, the one after is incremental again),
//! failed over into a domain drover defines on the DR host, and undone (that domain undefined);
//! failed over again and failed back into the domain's own images,
//! started through libvirt, and committed. The administrator's domain is never redefined.

mod common;

use common::{Api, Proc, agent_client, guest_dir, serve};

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use drover_agent_api::{HostAgent as _, PowerState};
use reqwest::Method as M;
use serde_json::{Value, json};
use uuid::Uuid;

const URI: &str = drover_hv::libvirt::testing::URI;

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh").args(["-c", URI]).args(args).output().unwrap()
}

/// A libvirt agent for `name` under `root`, enrolled with `token`, offering `networks`
/// (`--network`); it and its URL.
fn libvirt_agent(root: &Path, name: &str, enroll: (&str, &str), networks: &[String]) -> (Proc, String) {
    let mut cmd = Command::new(common::BIN);
    cmd.args(["agent", "--listen", "127.0.0.1:0", "--hypervisor", "libvirt", "--libvirt-uri", URI, "--data-dir"])
        .arg(root.join(name))
        .args(networks.iter().flat_map(|n| ["--network", n.as_str()]))
        .args(["--data-listen", "127.0.0.1:0", "--import-dir"])
        .arg(guest_dir())
        .args(["--enroll", enroll.0, enroll.1]);
    let mut proc = Proc::spawn(cmd, root.join(format!("{name}.log")));
    let rest = proc.line("drover agent for host ");
    let url = rest.split_once(" serving on ").unwrap().1.to_string();
    (proc, url)
}

/// The administrator's domain: defined with virsh, its image under `root/images`. Destroyed and
/// undefined when dropped, with every domain drover defined for it.
struct AdminDomain {
    name: String,
    uuid: Uuid,
    image: std::path::PathBuf,
    also: Vec<Uuid>,
}

impl AdminDomain {
    fn define(root: &Path) -> Self {
        let guest = drover_hv::qemu::TinyGuest::load(&guest_dir()).unwrap();
        let uuid = Uuid::new_v4();
        let name = format!("web-{}", &uuid.simple().to_string()[..8]);
        let dir = root.join("images");
        std::fs::create_dir_all(&dir).unwrap();
        // Two disks: the system disk the guest writes its markers to, and a data disk; libvirt
        // cuts both in one backup job.
        let image = dir.join("web.qcow2");
        let data = dir.join("web-data.qcow2");
        for file in [&image, &data] {
            let out =
                Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(file).arg("64M").output().unwrap();
            assert!(out.status.success());
        }
        drover_hv::libvirt::testing::define_tiny_guest_domain_with_disks(&name, uuid, &guest, &[&image, &data], &dir);
        AdminDomain { name, uuid, image, also: Vec::new() }
    }

    fn qemu_pid(&self) -> i32 {
        std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", self.name)).unwrap().trim().parse().unwrap()
    }

    fn xml(&self) -> String {
        String::from_utf8_lossy(&virsh(&["dumpxml", &self.name]).stdout).into_owned()
    }
}

impl Drop for AdminDomain {
    fn drop(&mut self) {
        for id in self.also.iter().map(Uuid::to_string).chain([self.uuid.to_string()]) {
            let _ = virsh(&["destroy", &id]);
            let _ = virsh(&["undefine", &id, "--checkpoints-metadata"]);
        }
    }
}

/// Runs the job, asserts it succeeded; its session's log.
async fn run_job(api: &Api, job: &str) -> Vec<String> {
    let run = api.ok(M::POST, &format!("/v1/replication-jobs/{job}/run"), None).await;
    let session = run["session_id"].as_str().unwrap().to_string();
    let s = api.wait_session(&session).await;
    let lines = api.log(&session).await;
    assert_eq!(s["result"], "Success", "{s}: {lines:?}");
    lines
}

fn mentions(lines: &[String], what: &str) -> bool {
    lines.iter().any(|l| l.contains(what))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_libvirt_domain_is_imported_replicated_and_failed_over_into_a_domain_at_dr() {
    drover_hv::libvirt::testing::ensure_daemon();
    let dir = tempfile::Builder::new().prefix("lv").tempdir_in("/tmp").unwrap();
    let root = dir.path();
    // The administrator's domain has a NIC on a network of production's; the DR agent offers
    // another network as "dr-lan".
    let (prod_net, dr_net) =
        (drover_hv::libvirt::testing::TestNetwork::start(), drover_hv::libvirt::testing::TestNetwork::start());
    let mut dom = AdminDomain::define(root);
    let nic = ["attach-interface", &dom.name, "network", &prod_net.0, "--mac", "52:54:00:6c:76:01", "--config"];
    assert!(virsh(&nic).status.success());
    let defined_xml = dom.xml();

    let cp = serve(root);
    let api = Api::login(&cp.api).await;
    let (prod_id, dr_id) = api.prod_and_dr_hosts().await;
    let token = api.enrolment_token(&prod_id).await;
    let (_prod_agent, prod_url) = libvirt_agent(root, "pa", (&cp.agent_url, &token), &[]);
    let token = api.enrolment_token(&dr_id).await;
    let (_dr_agent, dr_url) = libvirt_agent(root, "da", (&cp.agent_url, &token), &[format!("dr-lan={}", dr_net.0)]);
    api.ok(M::PATCH, &format!("/v1/hosts/{prod_id}"), Some(json!({"address": prod_url}))).await;
    api.ok(M::PATCH, &format!("/v1/hosts/{dr_id}"), Some(json!({"address": dr_url}))).await;

    // Importing needs a datastore on the host (for drover's own files there).
    let import = json!({"host_id": prod_id, "domain": dom.name});
    let (status, v) = api.send(M::POST, "/v1/vms/import", Some(import.clone())).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("no datastore"), "{v}");
    let (_prod_ds, dr_ds) = api.prod_and_dr_datastores(root, &prod_id, &dr_id).await;

    // Discovery: the production agent lists the domain, importable.
    let domains = api.ok(M::GET, &format!("/v1/hosts/{prod_id}/domains"), None).await;
    let listed = domains.as_array().unwrap().iter().find(|d| d["name"] == dom.name.as_str()).cloned();
    let listed = listed.unwrap_or_else(|| panic!("{domains}"));
    assert_eq!(listed["uuid"], dom.uuid.to_string());
    assert_eq!(listed["unsupported"], json!([]), "{listed}");
    assert_eq!(listed["imported_as"], Value::Null);
    assert_eq!(listed["disks"][0]["source"], dom.image.to_string_lossy().as_ref());
    assert_eq!(listed["hardware"]["machine"], "pc", "{listed}");
    assert_eq!(listed["hardware"]["disk_buses"], json!(["virtio", "virtio"]), "{listed}");

    let (status, v) = api.send(M::POST, "/v1/vms/import", Some(json!({"host_id": prod_id, "domain": "nope"}))).await;
    assert_eq!(status, 404, "{v}");
    assert!(v["message"].as_str().unwrap().contains(&dom.name), "the error lists what the host has: {v}");
    let (status, vm) = api.send(M::POST, "/v1/vms/import", Some(import.clone())).await;
    assert_eq!(status, 201, "{vm}");
    let vm_id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(vm_id, dom.uuid.to_string(), "the VM is the domain");
    assert_eq!(vm["libvirt_domain"], dom.name.as_str());
    assert_eq!(vm["disks"][0]["name"], "vda");
    assert_eq!(vm["disks"][0]["size_bytes"], 64 << 20);
    assert_eq!(vm["disks"][1]["name"], "vdb", "every disk of the domain: {vm}");
    assert_eq!(vm["power_state"], "Off");
    let (status, v) = api.send(M::POST, "/v1/vms/import", Some(import)).await;
    assert_eq!(status, 409, "imported twice: {v}");
    let domains = api.ok(M::GET, &format!("/v1/hosts/{prod_id}/domains"), None).await;
    assert!(domains.as_array().unwrap().iter().any(|d| d["imported_as"] == vm_id.as_str()), "{domains}");

    // drover powers it on through libvirt and hears its heartbeat.
    let on = api.ok(M::POST, &format!("/v1/vms/{vm_id}/power-on"), None).await;
    let s = api.wait_session(on["session_id"].as_str().unwrap()).await;
    let lines = api.log(on["session_id"].as_str().unwrap()).await;
    assert_eq!(s["result"], "Success", "{s}: {lines:?}");
    let vm_uuid = dom.uuid;
    let prod = agent_client(&cp.data, &prod_id, &prod_url).await;
    let dr = agent_client(&cp.data, &dr_id, &dr_url).await;
    assert_eq!(prod.vm_status(vm_uuid).await.unwrap(), PowerState::Running);
    prod.vm_write_marker(vm_uuid, "one").await.unwrap();

    assert_eq!(vm["nics"][0]["network"], prod_net.0.as_str(), "{vm}");
    // Its hardware as its definition says (libvirt's default NIC model when it names none),
    // for its replica.
    assert_eq!(vm["hardware"]["machine"], "pc", "{vm}");
    assert_eq!(vm["hardware"]["disk_buses"], json!(["virtio", "virtio"]), "{vm}");
    let model = vm["hardware"]["nic_models"][0].as_str().unwrap().to_string();
    let defined = dom.xml();
    let named = defined.split("<interface").nth(1).and_then(|i| i.split("<model type='").nth(1));
    assert_eq!(named.map_or("rtl8139", |m| m.split('\'').next().unwrap()), model, "{defined}");
    let networks = api.ok(M::GET, &format!("/v1/hosts/{dr_id}/networks"), None).await;
    let offered = json!([{"name": "dr-lan", "target": format!("libvirt network {}", dr_net.0), "available": true}]);
    assert_eq!(networks, offered);

    // Replication: a seed, then only the dirty extents of the checkpoint. At failover the
    // replica's NIC goes to dr-lan.
    let job = api.manual_job(&vm_id, &dr_id, &dr_ds, 3).await;
    let mapping = json!({"network_mappings": [{"from": prod_net.0, "to": "dr-lan"}]});
    let patched = api.ok(M::PATCH, &format!("/v1/replication-jobs/{job}"), Some(mapping)).await;
    assert_eq!(patched["network_mappings"][0]["to"], "dr-lan", "{patched}");
    let lines = run_job(&api, &job).await;
    assert!(mentions(&lines, "seed mode"), "{lines:?}");
    prod.vm_write_marker(vm_uuid, "two").await.unwrap();
    let lines = run_job(&api, &job).await;
    assert_eq!(lines.iter().filter(|l| l.contains("bitmap mode")).count(), 2, "both disks incrementally: {lines:?}");
    println!("incremental: {lines:#?}");

    // kill -9 of the domain's QEMU between cycles: the checkpoint's bitmap is broken; the
    // administrator starts the domain again.
    let pid = dom.qemu_pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    common::wait_for("the killed domain to read as died", 30, async || {
        prod.vm_status(vm_uuid).await.is_ok_and(|p| p == PowerState::Died)
    })
    .await;
    assert!(virsh(&["start", &dom.name]).status.success());
    prod.vm_wait_heartbeat(vm_uuid, Duration::from_secs(120)).await.unwrap();
    prod.vm_write_marker(vm_uuid, "three").await.unwrap();
    let lines = run_job(&api, &job).await;
    assert!(mentions(&lines, "hash-compare"), "the broken bitmap makes a hash-compare: {lines:?}");
    assert!(mentions(&lines, "inconsistent"), "with the reason: {lines:?}");
    println!("after kill -9: {lines:#?}");
    let lines = run_job(&api, &job).await;
    assert!(mentions(&lines, "bitmap mode"), "incremental again: {lines:?}");

    // Failover: the replica runs as a domain drover defines on the DR host, from the newest
    // point, with what production wrote last.
    let plan_id = api.heartbeat_plan(&vm_id).await;
    let lines = api.plan_action(&plan_id, "failover", None).await;
    println!("failover: {lines:#?}");
    let replicas = api.ok(M::GET, "/v1/replicas", None).await;
    let replica_id: Uuid = replicas["items"][0]["id"].as_str().unwrap().parse().unwrap();
    dom.also.push(replica_id);
    let hb = dr.vm_wait_heartbeat(replica_id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("three"));
    let replica_xml = String::from_utf8_lossy(&virsh(&["dumpxml", &replica_id.to_string()]).stdout).into_owned();
    assert!(replica_xml.contains("urn:drover:libvirt:1"), "the replica is a domain of drover's: {replica_xml}");
    assert!(replica_xml.contains("dev='vdb'"), "with both disks: {replica_xml}");
    assert!(replica_xml.contains(&format!("<source network='{}'", dr_net.0)), "on dr-lan: {replica_xml}");
    assert!(replica_xml.contains("52:54:00:6c:76:01"), "with production's MAC: {replica_xml}");
    assert!(replica_xml.contains(&format!("<model type='{model}'/>")), "and its NIC model: {replica_xml}");
    assert!(mentions(&lines, &format!("NIC 52:54:00:6c:76:01 ({}): on network dr-lan", prod_net.0)), "{lines:?}");
    let at_dr = dr.domains().await.unwrap();
    assert!(at_dr.iter().any(|d| d.uuid == replica_id && d.owned_by_drover), "{at_dr:?}");

    // Undo: the replica's domain is gone; the administrator's domain is as it was defined.
    api.plan_action(&plan_id, "undo", None).await;
    assert!(!virsh(&["dominfo", &replica_id.to_string()]).status.success(), "the replica's domain is undefined");
    assert!(!dom.xml().contains("urn:drover"), "drover never redefined the administrator's domain");
    assert_eq!(
        dom.xml().lines().filter(|l| l.contains("<source file=")).count(),
        defined_xml.lines().filter(|l| l.contains("<source file=")).count()
    );
    let lines = run_job(&api, &job).await;
    println!("after undo: {lines:#?}");

    // Failover again; the replica writes at DR; failback writes that into the administrator's
    // domain's own image (pulled by production's agent from the DR agent) and starts the domain
    // through libvirt; the commit removes the replica's domain.
    api.plan_action(&plan_id, "failover", None).await;
    dr.vm_wait_heartbeat(replica_id, Duration::from_secs(120)).await.unwrap();
    dr.vm_write_marker(replica_id, "written at DR").await.unwrap();
    let lines = api.plan_action(&plan_id, "prepare-failback", None).await;
    let synced = lines.iter().filter(|l| l.contains("synced to production by hash-compare between the agents"));
    assert_eq!(synced.count(), 2, "both disks: {lines:?}");
    println!("prepare-failback: {lines:#?}");
    dr.vm_write_marker(replica_id, "written at DR after the sync").await.unwrap();
    let lines = api.plan_action(&plan_id, "switchover", None).await;
    println!("switchover: {lines:#?}");
    let hb = prod.vm_wait_heartbeat(vm_uuid, Duration::from_secs(120)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("written at DR after the sync"), "production has what was written at DR");
    api.plan_action(&plan_id, "commit-failback", None).await;
    let replicas = api.ok(M::GET, "/v1/replicas", None).await;
    assert_eq!(replicas["items"][0]["state"], "Ready", "{replicas}");
    assert!(!virsh(&["dominfo", &replica_id.to_string()]).status.success(), "the replica's domain is undefined");
    assert!(!dom.xml().contains("urn:drover"), "the failback did not redefine the administrator's domain");
    // Nothing of drover's beside the administrator's image: the manifest is in the datastore.
    let beside: Vec<String> = std::fs::read_dir(dom.image.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("manifest"))
        .collect();
    assert!(beside.is_empty(), "{beside:?}");
    for disk in ["vda", "vdb"] {
        let manifest = root.join("pa/datastores/ds").join(&vm_id).join(format!("{disk}.manifest"));
        assert!(manifest.exists(), "production's manifest of {disk} is kept in its datastore");
    }
    let lines = run_job(&api, &job).await;
    println!("after the failback: {lines:#?}");
    drop(cp);
}
