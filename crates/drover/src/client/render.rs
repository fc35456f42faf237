//! Human output: aligned tables for lists, `key: value` blocks for single objects.
//!
//! Everything here only builds strings; the caller writes them to stdout, and progress and
//! warnings go to stderr, so that a pipe gets only the data.

use chrono::{DateTime, Utc};
use drover_api::views::*;
use serde::Serialize;

/// A table with a header row; columns are as wide as their widest cell.
#[derive(Debug)]
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Self {
        Table { header: header.to_vec(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                if i + 1 == columns {
                    line.push_str(cell); // no trailing padding
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Aligned `key: value` lines.
pub fn details(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| {
            let v = if v.is_empty() { "-" } else { v.as_str() };
            format!("{:<width$}  {v}\n", format!("{k}:"), width = width + 1)
        })
        .collect()
}

/// The name an enum has on the wire (`DisasterRecovery`, `Running`, ...).
pub fn wire_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

pub fn local_time(t: &DateTime<Utc>) -> String {
    t.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S").to_string()
}

fn opt_time(t: &Option<DateTime<Utc>>) -> String {
    t.as_ref().map(local_time).unwrap_or_else(|| "-".into())
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(ToString::to_string).unwrap_or_else(|| "-".into())
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() { "-".into() } else { items.join(", ") }
}

pub fn sites(page: &Page<SiteView>) -> Table {
    let mut t = Table::new(&["ID", "NAME", "KIND", "CREATED"]);
    for s in &page.items {
        t.row(vec![s.id.to_string(), s.name.clone(), wire_name(&s.kind), local_time(&s.created_at)]);
    }
    t
}

pub fn site(s: &SiteView) -> String {
    details(&[
        ("id", s.id.to_string()),
        ("name", s.name.clone()),
        ("kind", wire_name(&s.kind)),
        ("created", local_time(&s.created_at)),
    ])
}

pub fn hosts(page: &Page<HostView>) -> Table {
    let mut t = Table::new(&["ID", "NAME", "SITE", "ADDRESS", "CREATED"]);
    for h in &page.items {
        t.row(vec![
            h.id.to_string(),
            h.name.clone(),
            h.site_id.to_string(),
            h.address.clone(),
            local_time(&h.created_at),
        ]);
    }
    t
}

pub fn host(h: &HostView) -> String {
    details(&[
        ("id", h.id.to_string()),
        ("name", h.name.clone()),
        ("site", h.site_id.to_string()),
        ("address", h.address.clone()),
        ("created", local_time(&h.created_at)),
    ])
}

pub fn enrolment(e: &EnrolmentView) -> String {
    format!(
        "{}\n\nOn the host, run (the token works once, until {}):\n\n  {}\n",
        details(&[("host", e.host_id.to_string()), ("enrol at", e.enrol_url.clone()), ("token", e.token.clone())]),
        local_time(&e.expires_at),
        e.command
    )
}

pub fn host_agent(a: &AgentView) -> String {
    let state = serde_json::to_value(a.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    details(&[
        ("state", state),
        ("enrolled", a.enrolled_at.as_ref().map_or_else(|| "-".into(), local_time)),
        ("last seen", a.last_seen.as_ref().map_or_else(|| "-".into(), local_time)),
        ("last error", a.last_error.clone().unwrap_or_else(|| "-".into())),
        (
            "certificate until",
            match (&a.certificate_expires_at, a.certificate_renewal_due) {
                (None, _) => "-".into(),
                (Some(at), false) => local_time(at),
                (Some(at), true) => format!(
                    "{} (renewal due: the control plane renews it while the agent is reachable; now: drover host renew-certificate)",
                    local_time(at)
                ),
            },
        ),
    ])
}

pub fn datastores(page: &Page<DatastoreView>) -> Table {
    let mut t = Table::new(&["ID", "NAME", "HOST", "PATH"]);
    for x in &page.items {
        t.row(vec![x.id.to_string(), x.name.clone(), x.host_id.to_string(), x.path.clone()]);
    }
    t
}

pub fn datastore(x: &DatastoreView) -> String {
    details(&[
        ("id", x.id.to_string()),
        ("name", x.name.clone()),
        ("host", x.host_id.to_string()),
        ("path", x.path.clone()),
        ("created", local_time(&x.created_at)),
    ])
}

pub fn grants(g: &DatastoreGrants) -> String {
    let tenants: Vec<String> = g.tenant_ids.iter().map(|t| t.to_string()).collect();
    details(&[
        ("datastore", g.datastore_id.to_string()),
        ("granted to", if tenants.is_empty() { "(no tenant)".into() } else { tenants.join(", ") }),
    ])
}

pub fn vms(page: &Page<VmView>) -> Table {
    let mut t = Table::new(&["ID", "NAME", "POWER", "VCPUS", "MEMORY", "DISKS", "HOST", "TAGS"]);
    for v in &page.items {
        let power = if v.provisioned { wire_name(&v.power_state) } else { "(provisioning)".into() };
        t.row(vec![
            v.id.to_string(),
            v.name.clone(),
            power,
            v.vcpus.to_string(),
            format!("{} MiB", v.memory_mib),
            v.disks.len().to_string(),
            v.host_id.to_string(),
            list_or_dash(&v.tags),
        ]);
    }
    t
}

pub fn host_domains(domains: &[drover_api::views::HostDomainView]) -> Table {
    let mut t = Table::new(&["UUID", "NAME", "STATE", "VCPUS", "MEMORY", "MACHINE", "DISKS", "IMPORT"]);
    for d in domains {
        let disks: Vec<String> = d
            .disks
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let bus = d.hardware.disk_buses.get(i).map_or("?", String::as_str);
                match x.size_bytes {
                    Some(s) => {
                        format!("{} {} {bus} ({})", x.target, x.format.as_deref().unwrap_or("?"), format_size(s))
                    }
                    None => format!("{} {} {bus}", x.target, x.format.as_deref().unwrap_or("?")),
                }
            })
            .collect();
        let import = match (d.imported_as, d.unsupported.is_empty()) {
            (Some(vm), _) => format!("imported as VM {vm}"),
            (None, true) => "can be imported".into(),
            (None, false) => format!("no: {}", d.unsupported.join("; ")),
        };
        t.row(vec![
            d.uuid.to_string(),
            d.name.clone(),
            wire_name(&d.state),
            d.vcpus.to_string(),
            format!("{} MiB", d.memory_mib),
            d.hardware.machine.clone(),
            list_or_dash(&disks),
            import,
        ]);
    }
    t
}

pub fn host_networks(networks: &[drover_api::views::HostNetworkView]) -> Table {
    let mut t = Table::new(&["NAME", "ON THE HOST", "AVAILABLE"]);
    for n in networks {
        let available = match (&n.problem, n.available) {
            (_, true) => "yes".to_string(),
            (Some(p), false) => format!("no: {p}"),
            (None, false) => "no".to_string(),
        };
        t.row(vec![n.name.clone(), n.target.clone(), available]);
    }
    t
}

pub fn vm(v: &VmView) -> String {
    let bus = |i: usize| v.hardware.disk_buses.get(i).map_or("virtio", String::as_str);
    let disks: Vec<String> = v
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| match &d.import_from {
            Some(src) => format!("{} (imported from {src}; {})", d.name, bus(i)),
            None => format!("{} ({}, {})", d.name, format_size(d.size_bytes), bus(i)),
        })
        .collect();
    let model = |i: usize| v.hardware.nic_models.get(i).map_or("virtio", String::as_str);
    let nics: Vec<String> = v
        .nics
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{} ({}, {})", n.network, n.mac.as_deref().unwrap_or("auto"), model(i)))
        .collect();
    details(&[
        ("id", v.id.to_string()),
        ("name", v.name.clone()),
        ("power", wire_name(&v.power_state)),
        ("provisioned", v.provisioned.to_string()),
        ("vcpus", v.vcpus.to_string()),
        ("memory", format!("{} MiB", v.memory_mib)),
        ("disks", list_or_dash(&disks)),
        ("nics", list_or_dash(&nics)),
        ("tags", list_or_dash(&v.tags)),
        ("kernel", opt(&v.boot.kernel)),
        ("machine", v.hardware.machine.clone()),
        ("addresses", list_or_dash(&v.guest_addresses)),
        ("libvirt domain", opt(&v.libvirt_domain)),
        ("host", v.host_id.to_string()),
        ("datastore", v.datastore_id.to_string()),
        ("created", local_time(&v.created_at)),
        ("updated", local_time(&v.updated_at)),
    ])
}

fn schedule(s: &ScheduleBody) -> String {
    match s {
        ScheduleBody::Manual => "manual".into(),
        ScheduleBody::Interval { secs } => format!("every {secs} s"),
        ScheduleBody::Continuous => "continuous".into(),
    }
}

pub fn jobs(page: &Page<ReplicationJobView>) -> Table {
    let mut t = Table::new(&["ID", "NAME", "VMS", "SCHEDULE", "RETENTION", "ENABLED"]);
    for j in &page.items {
        t.row(vec![
            j.id.to_string(),
            j.name.clone(),
            j.vm_ids.len().to_string(),
            schedule(&j.schedule),
            j.retention_points.to_string(),
            j.enabled.to_string(),
        ]);
    }
    t
}

pub fn job(j: &ReplicationJobView) -> String {
    let vms: Vec<String> = j.vm_ids.iter().map(ToString::to_string).collect();
    details(&[
        ("id", j.id.to_string()),
        ("name", j.name.clone()),
        ("vms", list_or_dash(&vms)),
        ("target host", j.target_host_id.to_string()),
        ("target datastore", j.target_datastore_id.to_string()),
        ("schedule", schedule(&j.schedule)),
        ("retention", format!("{} restore points", j.retention_points)),
        ("consistency", wire_name(&j.consistency)),
        (
            "networks",
            list_or_dash(&j.network_mappings.iter().map(|m| format!("{}={}", m.from, m.to)).collect::<Vec<_>>()),
        ),
        ("enabled", j.enabled.to_string()),
        ("created", local_time(&j.created_at)),
    ])
}

pub fn replicas(page: &Page<ReplicaView>) -> Table {
    let mut t = Table::new(&["ID", "NAME", "STATE", "SOURCE VM", "JOB", "CREATED"]);
    for r in &page.items {
        t.row(vec![
            r.id.to_string(),
            r.name.clone(),
            wire_name(&r.state),
            r.source_vm_id.to_string(),
            r.job_id.to_string(),
            local_time(&r.created_at),
        ]);
    }
    t
}

pub fn replica(r: &ReplicaView) -> String {
    details(&[
        ("id", r.id.to_string()),
        ("name", r.name.clone()),
        ("state", wire_name(&r.state)),
        ("source vm", r.source_vm_id.to_string()),
        ("job", r.job_id.to_string()),
        ("target datastore", r.target_datastore_id.to_string()),
        ("failover point", opt(&r.failover_point_id)),
        ("created", local_time(&r.created_at)),
    ])
}

pub fn restore_points(page: &Page<RestorePointView>) -> Table {
    let mut t = Table::new(&["SEQUENCE", "CREATED", "STATE", "CONSISTENCY", "BYTES WRITTEN", "VERIFIED", "ID", "WHY"]);
    for p in &page.items {
        t.row(vec![
            p.sequence.to_string(),
            local_time(&p.created_at),
            wire_name(&p.state),
            wire_name(&p.consistency),
            approx_size(p.bytes_written),
            if p.verified { "yes" } else { "no" }.into(),
            p.id.to_string(),
            p.consistency_reason.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t
}

fn mappings(l: &RecoveryLocationView) -> Vec<String> {
    l.network_mappings.iter().map(|m| format!("{}={}", m.from, m.to)).collect()
}

pub fn locations(page: &Page<RecoveryLocationView>) -> Table {
    let mut t = Table::new(&["ID", "NAME", "KIND", "HOST", "DATASTORE", "NETWORKS"]);
    for l in &page.items {
        t.row(vec![
            l.id.to_string(),
            l.name.clone(),
            wire_name(&l.kind),
            opt(&l.host_id),
            opt(&l.datastore_id),
            list_or_dash(&mappings(l)),
        ]);
    }
    t
}

pub fn location(l: &RecoveryLocationView) -> String {
    details(&[
        ("id", l.id.to_string()),
        ("name", l.name.clone()),
        ("description", l.description.clone()),
        ("kind", wire_name(&l.kind)),
        ("host", opt(&l.host_id)),
        ("datastore", opt(&l.datastore_id)),
        ("networks", list_or_dash(&mappings(l))),
    ])
}

pub fn plans(page: &Page<PlanView>) -> Table {
    let mut t = Table::new(&["ID", "NAME", "MODE", "STATE", "GROUPS", "VMS"]);
    for p in &page.items {
        let vms: usize = p.groups.iter().map(|g| g.vms.len()).sum();
        t.row(vec![
            p.id.to_string(),
            p.name.clone(),
            wire_name(&p.mode),
            p.state_name.clone(),
            p.groups.len().to_string(),
            vms.to_string(),
        ]);
    }
    t
}

pub fn plan(p: &PlanView) -> String {
    let mut out = details(&[
        ("id", p.id.to_string()),
        ("name", p.name.clone()),
        ("description", p.description.clone()),
        ("mode", wire_name(&p.mode)),
        ("state", format!("{} ({})", p.state_name, wire_name(&p.state))),
        ("last stable state", wire_name(&p.last_stable_state)),
        ("interrupted state", p.interrupted_state.as_ref().map(wire_name).unwrap_or_else(|| "-".into())),
        ("recovery location", p.recovery_location_id.to_string()),
        ("created", local_time(&p.created_at)),
        ("updated", local_time(&p.updated_at)),
    ]);
    for g in &p.groups {
        let mode = if g.max_parallel <= 1 { "sequential".to_string() } else { format!("{} at once", g.max_parallel) };
        let critical = if g.critical { ", critical" } else { "" };
        out.push_str(&format!("group {:?} ({mode}, delay {} s{critical}):\n", g.name, g.delay_secs));
        for v in &g.vms {
            let steps: Vec<String> = v.steps.iter().flatten().map(|s| s.name.clone()).collect();
            out.push_str(&format!("  vm {}: {}\n", v.vm_id, list_or_dash(&steps)));
        }
    }
    out
}

fn result_text(s: &SessionView) -> String {
    if s.halted { "Halted".into() } else { wire_name(&s.result) }
}

pub fn audit(page: &Page<AuditView>) -> Table {
    let mut t = Table::new(&["SEQ", "AT", "USER", "ACTION", "OUTCOME", "FROM", "DETAIL"]);
    for e in &page.items {
        t.row(vec![
            e.seq.to_string(),
            local_time(&e.at),
            e.user_name.clone(),
            e.action.clone(),
            e.outcome.clone(),
            e.address.clone().unwrap_or_else(|| "-".into()),
            e.detail.clone(),
        ]);
    }
    t
}

pub fn sessions(page: &Page<SessionView>) -> Table {
    let mut t = Table::new(&["ID", "KIND", "NAME", "STATE", "RESULT", "PROGRESS", "CREATED"]);
    for s in &page.items {
        t.row(vec![
            s.id.to_string(),
            wire_name(&s.kind),
            s.name.clone(),
            wire_name(&s.state),
            result_text(s),
            format!("{}%", s.progress),
            local_time(&s.created_at),
        ]);
    }
    t
}

pub fn session(s: &SessionView) -> String {
    let mut out = details(&[
        ("id", s.id.to_string()),
        ("kind", wire_name(&s.kind)),
        ("name", s.name.clone()),
        ("target", format!("{} {}", s.target_kind, s.target_id)),
        ("state", wire_name(&s.state)),
        ("result", result_text(s)),
        ("progress", format!("{}%", s.progress)),
        ("failure", opt(&s.failure_message)),
        ("created", local_time(&s.created_at)),
        ("ended", opt_time(&s.ended_at)),
    ]);
    if let Some(tasks) = s.tasks.as_ref().filter(|t| !t.is_empty()) {
        let mut t = Table::new(&["TASK", "VM", "STATE", "RESULT", "PROGRESS", "FAILURE"]);
        for task in tasks {
            t.row(vec![
                task.name.clone(),
                opt(&task.vm_id),
                wire_name(&task.state),
                wire_name(&task.result),
                format!("{}%", task.progress),
                opt(&task.failure_message),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

pub fn log(page: &Page<LogEntryView>) -> String {
    page.items.iter().map(|e| format!("{} {:<7} {}\n", local_time(&e.at), wire_name(&e.level), e.message)).collect()
}

pub fn users(page: &Page<UserView>) -> Table {
    let mut t = Table::new(&["ID", "NAME", "ROLE", "TENANT", "CREATED"]);
    for u in &page.items {
        t.row(vec![
            u.id.to_string(),
            u.name.clone(),
            wire_name(&u.role),
            u.tenant_id.to_string(),
            local_time(&u.created_at),
        ]);
    }
    t
}

pub fn user(u: &UserView) -> String {
    details(&[
        ("id", u.id.to_string()),
        ("name", u.name.clone()),
        ("role", wire_name(&u.role)),
        ("tenant", u.tenant_id.to_string()),
        ("created", local_time(&u.created_at)),
    ])
}

pub fn tenants(page: &Page<TenantView>) -> Table {
    let mut t = Table::new(&["ID", "NAME", "SYSTEM", "CREATED"]);
    for x in &page.items {
        t.row(vec![x.id.to_string(), x.name.clone(), x.is_system.to_string(), local_time(&x.created_at)]);
    }
    t
}

pub fn tenant(x: &TenantView) -> String {
    details(&[
        ("id", x.id.to_string()),
        ("name", x.name.clone()),
        ("system", x.is_system.to_string()),
        ("created", local_time(&x.created_at)),
    ])
}

/// `1073741824` → `1 GiB`; exact binary units when they fit, bytes otherwise.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (name, size) in UNITS {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{} {name}", bytes / size);
        }
    }
    format!("{bytes} B")
}

/// `1536` → `1.5 KiB`: one decimal in the largest binary unit that fits, for amounts of data
/// rather than configured sizes.
pub fn approx_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (name, size) in UNITS {
        if bytes >= size {
            return format!("{:.1} {name}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_without_trailing_spaces() {
        let mut t = Table::new(&["ID", "NAME", "KIND"]);
        t.row(vec!["1".into(), "production-site".into(), "Production".into()]);
        t.row(vec!["22".into(), "dr".into(), "".into()]);
        assert_eq!(t.render(), "ID  NAME             KIND\n1   production-site  Production\n22  dr\n");
    }

    #[test]
    fn details_align_keys() {
        assert_eq!(details(&[("id", "1".into()), ("name", "x".into())]), "id:    1\nname:  x\n");
    }

    #[test]
    fn sizes_use_exact_binary_units() {
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(1000), "1000 B");
    }

    #[test]
    fn amounts_of_data_round_to_one_decimal() {
        assert_eq!(approx_size(0), "0 B");
        assert_eq!(approx_size(1023), "1023 B");
        assert_eq!(approx_size(1536), "1.5 KiB");
        assert_eq!(approx_size(64 << 20), "64.0 MiB");
        assert_eq!(approx_size((3 << 30) + (1 << 29)), "3.5 GiB");
    }

    #[test]
    fn enums_render_by_their_wire_name() {
        assert_eq!(wire_name(&drover_types::SiteKind::DisasterRecovery), "DisasterRecovery");
    }
}
