//! Network mapping: which network of the recovery host each NIC of a failed-over replica is on.
//!
//! As Veeam's replication jobs do: a source network listed in the job's mapping table goes to the
//! network it names; one not listed goes to the recovery host's network of the same name when the
//! host has one (automatic mapping); any other NIC is isolated (the guest keeps it, with its MAC,
//! and reaches nothing), and the session says so. A host's networks are what its administrator
//! declared to its agent (`--network NAME=TARGET`): a request never names a host network. Test
//! VMs are always isolated and do not come here.

use drover_agent_api::{HostAgent, HostNetwork, VmNic};
use drover_types::{LogLevel, NetworkMapping, Vm};

/// Where one NIC goes, and the line the session log says it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NicPlacement {
    pub nic: VmNic,
    pub level: LogLevel,
    pub message: String,
    /// The NIC is isolated against the job's mapping (its network is not offered or not
    /// available, or the host could not say): what a readiness check reports as a problem.
    pub against_mapping: bool,
}

/// The NICs of `vm`'s replica on a host offering `networks` (`Err`: the host's agent could not
/// say), with `mappings` from the replication job. Pure, so every case is unit-tested.
pub(crate) fn place_nics(
    vm: &Vm,
    mappings: &[NetworkMapping],
    networks: Result<&[HostNetwork], &str>,
    host: &str,
) -> Vec<NicPlacement> {
    vm.nics
        .iter()
        .map(|n| {
            let mapped = mappings.iter().find(|m| m.from == n.network).map(|m| m.to.as_str());
            let target = mapped.unwrap_or(&n.network);
            let how = if mapped.is_some() { "the job's network mapping" } else { "the same name" };
            let isolated = |level, why: String| NicPlacement {
                nic: VmNic { network: n.network.clone(), mac: n.mac.clone(), no_uplink: true },
                level,
                message: format!("NIC {} ({}): isolated: {why}", n.mac, n.network),
                against_mapping: mapped.is_some(),
            };
            let networks = match networks {
                Ok(list) => list,
                Err(e) => {
                    let mut p = isolated(LogLevel::Warning, format!("cannot list the networks of host {host}: {e}"));
                    p.against_mapping = true;
                    return p;
                }
            };
            match networks.iter().find(|h| h.name == target) {
                Some(h) if h.available => NicPlacement {
                    nic: VmNic { network: target.to_string(), mac: n.mac.clone(), no_uplink: false },
                    level: LogLevel::Info,
                    message: format!(
                        "NIC {} ({}): on network {target} of host {host} ({how}; {})",
                        n.mac, n.network, h.target
                    ),
                    against_mapping: false,
                },
                Some(h) => isolated(
                    LogLevel::Warning,
                    format!(
                        "network {target} of host {host} ({how}) is not available: {}",
                        h.problem.as_deref().unwrap_or("no reason given")
                    ),
                ),
                None if mapped.is_some() => isolated(
                    LogLevel::Warning,
                    format!(
                        "the job maps it to network {target}, which host {host} does not offer (its administrator \
                         declares networks with `drover agent --network`)"
                    ),
                ),
                None => isolated(
                    LogLevel::Warning,
                    format!("the job maps no network for it and host {host} offers no network {target}"),
                ),
            }
        })
        .collect()
}

/// [`place_nics`] with the host's networks asked of its agent.
pub(crate) async fn replica_nics(
    agent: &dyn HostAgent,
    vm: &Vm,
    mappings: &[NetworkMapping],
    host: &str,
) -> Vec<NicPlacement> {
    if vm.nics.is_empty() {
        return Vec::new();
    }
    match agent.networks().await {
        Ok(list) => place_nics(vm, mappings, Ok(&list), host),
        Err(e) => place_nics(vm, mappings, Err(&e.message), host),
    }
}

/// The NICs `replica` of `source` runs with after a failover (or an undone failback) on
/// `agent`, its recovery host, each placement said in the session log.
pub(crate) async fn failover_nics(
    ctx: &crate::saga::StepCtx,
    agent: &dyn HostAgent,
    replica: &drover_types::Replica,
    source: &Vm,
) -> drover_types::Result<Vec<VmNic>> {
    let placed = placements(&ctx.engine, agent, replica, source).await?;
    for p in &placed {
        ctx.log(p.level, format!("{}: {}", replica.name, p.message)).await;
    }
    Ok(placed.into_iter().map(|p| p.nic).collect())
}

/// Where `replica`'s NICs would go on `agent`'s host now, by its job's mapping.
pub(crate) async fn placements(
    engine: &crate::Engine,
    agent: &dyn HostAgent,
    replica: &drover_types::Replica,
    source: &Vm,
) -> drover_types::Result<Vec<NicPlacement>> {
    let store = engine.store();
    let mappings = match store.object_get::<drover_types::ReplicationJob>(replica.tenant_id, replica.job_id.0).await {
        Ok(job) => job.network_mappings,
        // The job was deleted: no table, automatic mapping only.
        Err(drover_types::Error::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(e),
    };
    let ds = store.object_get::<drover_types::Datastore>(replica.tenant_id, replica.target_datastore_id.0).await?;
    let host = store.object_get_any_tenant::<drover_types::Host>(ds.host_id.0).await?;
    Ok(replica_nics(agent, source, &mappings, &host.name).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(nets: &[&str]) -> Vm {
        let t = chrono::Utc::now();
        Vm {
            id: drover_types::VmId::new(),
            tenant_id: drover_types::TenantId::new(),
            name: "web".into(),
            host_id: drover_types::HostId::new(),
            datastore_id: drover_types::DatastoreId::new(),
            vcpus: 1,
            memory_mib: 128,
            disks: Vec::new(),
            nics: nets
                .iter()
                .enumerate()
                .map(|(i, n)| drover_types::VmNic { network: n.to_string(), mac: format!("52:54:00:00:00:0{i}") })
                .collect(),
            tags: Vec::new(),
            boot: drover_types::VmBoot { kernel: None, initrd: None, cmdline: None, firmware: Default::default() },
            power_state: drover_types::VmPowerState::Off,
            provisioned: true,
            libvirt_domain: None,
            guest_addresses: Vec::new(),
            created_at: t,
            updated_at: t,
            hardware: Default::default(),
        }
    }

    fn net(name: &str, available: bool) -> HostNetwork {
        HostNetwork {
            name: name.into(),
            target: format!("libvirt network {name}"),
            available,
            problem: (!available).then(|| "libvirt network is not active".into()),
        }
    }

    fn map(from: &str, to: &str) -> NetworkMapping {
        NetworkMapping { from: from.into(), to: to.into() }
    }

    #[test]
    fn a_mapped_network_wins_over_the_same_name_and_the_rest_is_isolated() {
        let v = vm(&["lan", "dmz", "mgmt", "backup"]);
        let host = [net("dr-lan", true), net("dmz", true), net("lan", true), net("backup", false)];
        let p = place_nics(&v, &[map("lan", "dr-lan"), map("mgmt", "dr-mgmt")], Ok(&host), "dr1");
        // lan: mapped to dr-lan although the host also has a "lan".
        assert_eq!(p[0].nic, VmNic { network: "dr-lan".into(), mac: v.nics[0].mac.clone(), no_uplink: false });
        assert_eq!(p[0].level, LogLevel::Info);
        assert!(p[0].message.contains("the job's network mapping"), "{}", p[0].message);
        // dmz: not mapped, the host has a dmz.
        assert_eq!(p[1].nic.network, "dmz");
        assert!(!p[1].nic.no_uplink);
        assert!(p[1].message.contains("the same name"), "{}", p[1].message);
        // mgmt: mapped to a network the host does not offer.
        assert!(p[2].nic.no_uplink);
        assert_eq!(p[2].level, LogLevel::Warning);
        assert!(p[2].message.contains("dr-mgmt, which host dr1 does not offer"), "{}", p[2].message);
        // backup: the host has it, not active.
        assert!(p[3].nic.no_uplink);
        assert!(p[3].message.contains("not available: libvirt network is not active"), "{}", p[3].message);
        // The MACs are the source's, in order.
        assert!(p.iter().zip(&v.nics).all(|(p, n)| p.nic.mac == n.mac));
    }

    #[test]
    fn without_networks_or_an_answer_every_nic_is_isolated() {
        let v = vm(&["lan"]);
        let p = place_nics(&v, &[], Ok(&[]), "dr1");
        assert!(p[0].nic.no_uplink);
        assert!(p[0].message.contains("offers no network lan"), "{}", p[0].message);
        let p = place_nics(&v, &[map("lan", "dr-lan")], Err("connection refused"), "dr1");
        assert!(p[0].nic.no_uplink);
        assert!(p[0].message.contains("cannot list the networks of host dr1: connection refused"), "{}", p[0].message);
    }
}
