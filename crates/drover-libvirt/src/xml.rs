//! Domain XML as drover reads it (a description of a domain: its disks, NICs, channels and
//! whether drover defined it) and the XML drover writes (pull-mode backups and checkpoints).
//! Parsed with quick-xml, bounded in size and depth.

use std::path::PathBuf;

use quick_xml::escape::escape;
use quick_xml::events::{BytesStart, Event};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{ErrorClass, LibvirtError, LibvirtResult};

/// The largest domain XML read (a domain with hundreds of devices is a few tens of KiB).
pub const MAX_XML_BYTES: usize = 4 << 20;
/// The deepest element nesting read (libvirt's domain XML is under ten levels deep).
pub const MAX_DEPTH: usize = 64;
/// The namespace of drover's `<metadata>` element in a domain drover defined.
pub const DROVER_NS: &str = "urn:drover:libvirt:1";

/// A domain as libvirt describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainDescription {
    pub uuid: Uuid,
    pub name: String,
    /// `kvm` or `qemu` (TCG).
    pub domain_type: String,
    pub memory_kib: u64,
    pub vcpus: u32,
    /// The disks (`device='disk'`; CD-ROMs and floppies are not), in the XML's order: drover's
    /// disk index is the position here.
    pub disks: Vec<DomainDisk>,
    pub nics: Vec<DomainNic>,
    pub channels: Vec<DomainChannel>,
    /// Direct kernel boot, when the domain boots that way.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    /// Its firmware is UEFI (`<os firmware='efi'>`, or a pflash loader).
    pub uefi: bool,
    /// Its machine type (`<os><type machine=...>`: `pc-q35-7.2`, `pc-i440fx-8.0`, `pc`...).
    pub machine: Option<String>,
    /// Defined by drover (its `<metadata>` carries drover's element): drover may redefine or
    /// undefine it. Any other domain is the administrator's and is never redefined.
    pub owned_by_drover: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainDisk {
    /// `file`, `block`, `network`, `volume`.
    pub source_type: String,
    /// The image format (`qcow2`, `raw`), from `<driver type>`.
    pub format: Option<String>,
    /// The image file or block device, when it has one.
    pub source: Option<PathBuf>,
    /// The guest's name for it (`vda`).
    pub target: String,
    pub bus: Option<String>,
}

impl DomainDisk {
    /// Why drover cannot track this disk's changes, if it cannot: libvirt's checkpoints are
    /// bitmaps inside qcow2 images.
    pub fn untrackable(&self) -> Option<String> {
        if self.source_type != "file" || self.source.is_none() {
            return Some(format!("disk {} is not a file (type {})", self.target, self.source_type));
        }
        if self.format.as_deref() != Some("qcow2") {
            return Some(format!(
                "disk {} is {} (checkpoints need qcow2)",
                self.target,
                self.format.as_deref().unwrap_or("of no declared format")
            ));
        }
        None
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainNic {
    /// `network`, `bridge`, `user`, `direct`...
    pub kind: String,
    pub mac: Option<String>,
    /// The libvirt network or the bridge it is on.
    pub source: Option<String>,
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainChannel {
    /// The port's name in the guest (`org.qemu.guest_agent.0`).
    pub name: String,
    /// The host side's unix socket, for a `type='unix'` channel.
    pub path: Option<PathBuf>,
}

fn xml_err(message: impl Into<String>) -> LibvirtError {
    LibvirtError::new(ErrorClass::Other, "reading domain XML", message)
}

fn attr(e: &BytesStart<'_>, name: &str) -> LibvirtResult<Option<String>> {
    for a in e.attributes() {
        let a = a.map_err(|e| xml_err(e.to_string()))?;
        if a.key.as_ref() == name.as_bytes() {
            return Ok(Some(a.unescape_value().map_err(|e| xml_err(e.to_string()))?.into_owned()));
        }
    }
    Ok(None)
}

impl DomainDescription {
    pub fn parse(text: &str) -> LibvirtResult<Self> {
        if text.len() > MAX_XML_BYTES {
            return Err(xml_err(format!("the domain XML is {} bytes; at most {MAX_XML_BYTES}", text.len())));
        }
        let mut reader = quick_xml::Reader::from_str(text);
        let mut path: Vec<String> = Vec::new();
        let mut d = DomainDescription {
            uuid: Uuid::nil(),
            name: String::new(),
            domain_type: String::new(),
            memory_kib: 0,
            vcpus: 0,
            disks: Vec::new(),
            nics: Vec::new(),
            channels: Vec::new(),
            kernel: None,
            initrd: None,
            cmdline: None,
            uefi: false,
            machine: None,
            owned_by_drover: false,
        };
        // The device being read (its element ended pushes it).
        let mut disk: Option<DomainDisk> = None;
        let mut nic: Option<DomainNic> = None;
        let mut channel: Option<DomainChannel> = None;
        let mut memory_unit = String::from("KiB");
        loop {
            let ev = reader.read_event().map_err(|e| xml_err(e.to_string()))?;
            let (start, empty) = match &ev {
                Event::Start(e) => (Some(e.clone()), false),
                Event::Empty(e) => (Some(e.clone()), true),
                _ => (None, false),
            };
            if let Some(e) = start {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                path.push(name.clone());
                if path.len() > MAX_DEPTH {
                    return Err(xml_err(format!("the domain XML nests deeper than {MAX_DEPTH}")));
                }
                let p: Vec<&str> = path.iter().map(String::as_str).collect();
                match p.as_slice() {
                    ["domain"] => d.domain_type = attr(&e, "type")?.unwrap_or_default(),
                    ["domain", "memory"] => memory_unit = attr(&e, "unit")?.unwrap_or_else(|| "KiB".into()),
                    ["domain", "os"] => d.uefi |= attr(&e, "firmware")?.as_deref() == Some("efi"),
                    ["domain", "os", "loader"] => d.uefi |= attr(&e, "type")?.as_deref() == Some("pflash"),
                    ["domain", "os", "type"] => d.machine = attr(&e, "machine")?,
                    ["domain", "metadata", _] if name.ends_with(":vm") || name == "vm" => {
                        let prefix = name.split_once(':').map(|(p, _)| p);
                        let ns_attr = prefix.map_or("xmlns".to_string(), |p| format!("xmlns:{p}"));
                        if attr(&e, &ns_attr)?.as_deref() == Some(DROVER_NS) {
                            d.owned_by_drover = true;
                        }
                    }
                    ["domain", "devices", "disk"] if attr(&e, "device")?.as_deref().unwrap_or("disk") == "disk" => {
                        disk = Some(DomainDisk {
                            source_type: attr(&e, "type")?.unwrap_or_else(|| "file".into()),
                            format: None,
                            source: None,
                            target: String::new(),
                            bus: None,
                        });
                    }
                    ["domain", "devices", "disk", "driver"] => {
                        if let Some(dk) = disk.as_mut() {
                            dk.format = attr(&e, "type")?;
                        }
                    }
                    ["domain", "devices", "disk", "source"] => {
                        if let Some(dk) = disk.as_mut() {
                            dk.source = attr(&e, "file")?.or(attr(&e, "dev")?).map(PathBuf::from);
                        }
                    }
                    ["domain", "devices", "disk", "target"] => {
                        if let Some(dk) = disk.as_mut() {
                            dk.target = attr(&e, "dev")?.unwrap_or_default();
                            dk.bus = attr(&e, "bus")?;
                        }
                    }
                    ["domain", "devices", "interface"] => {
                        nic = Some(DomainNic {
                            kind: attr(&e, "type")?.unwrap_or_default(),
                            mac: None,
                            source: None,
                            model: None,
                        })
                    }
                    ["domain", "devices", "interface", "mac"] => {
                        if let Some(n) = nic.as_mut() {
                            n.mac = attr(&e, "address")?;
                        }
                    }
                    ["domain", "devices", "interface", "source"] => {
                        if let Some(n) = nic.as_mut() {
                            n.source = attr(&e, "network")?.or(attr(&e, "bridge")?).or(attr(&e, "dev")?);
                        }
                    }
                    ["domain", "devices", "interface", "model"] => {
                        if let Some(n) = nic.as_mut() {
                            n.model = attr(&e, "type")?;
                        }
                    }
                    ["domain", "devices", "channel"] => {
                        channel = Some(DomainChannel { name: String::new(), path: None });
                    }
                    ["domain", "devices", "channel", "source"] => {
                        if let Some(c) = channel.as_mut() {
                            c.path = attr(&e, "path")?.map(PathBuf::from);
                        }
                    }
                    ["domain", "devices", "channel", "target"] => {
                        if let Some(c) = channel.as_mut() {
                            c.name = attr(&e, "name")?.unwrap_or_default();
                        }
                    }
                    _ => {}
                }
                if empty {
                    end_element(&mut path, &mut d, &mut disk, &mut nic, &mut channel);
                }
                continue;
            }
            match ev {
                Event::Text(t) => {
                    let text = t.unescape().map_err(|e| xml_err(e.to_string()))?.trim().to_string();
                    let p: Vec<&str> = path.iter().map(String::as_str).collect();
                    match p.as_slice() {
                        ["domain", "name"] => d.name = text,
                        ["domain", "uuid"] => {
                            d.uuid = text
                                .parse()
                                .map_err(|_| xml_err(format!("the domain's uuid {text:?} does not parse")))?
                        }
                        ["domain", "memory"] => {
                            let n: u64 =
                                text.parse().map_err(|_| xml_err(format!("memory {text:?} does not parse")))?;
                            d.memory_kib = match memory_unit.as_str() {
                                "b" | "bytes" => n / 1024,
                                "KiB" | "k" => n,
                                "MiB" | "M" => n.saturating_mul(1024),
                                "GiB" | "G" => n.saturating_mul(1 << 20),
                                "TiB" | "T" => n.saturating_mul(1 << 30),
                                other => return Err(xml_err(format!("memory unit {other:?} is not known"))),
                            };
                        }
                        ["domain", "vcpu"] => {
                            d.vcpus = text.parse().map_err(|_| xml_err(format!("vcpu {text:?} does not parse")))?
                        }
                        ["domain", "os", "kernel"] => d.kernel = Some(PathBuf::from(text)),
                        ["domain", "os", "initrd"] => d.initrd = Some(PathBuf::from(text)),
                        ["domain", "os", "cmdline"] => d.cmdline = Some(text),
                        _ => {}
                    }
                }
                Event::End(_) => end_element(&mut path, &mut d, &mut disk, &mut nic, &mut channel),
                Event::Eof => break,
                _ => {}
            }
        }
        if d.uuid.is_nil() || d.name.is_empty() {
            return Err(xml_err("the domain XML has no name or no uuid"));
        }
        Ok(d)
    }

    /// The disk at drover's index `index`.
    pub fn disk(&self, index: usize) -> LibvirtResult<&DomainDisk> {
        self.disks.get(index).ok_or_else(|| {
            LibvirtError::new(
                ErrorClass::Other,
                "finding a disk",
                format!("domain {} has {} disks; there is no disk {index}", self.name, self.disks.len()),
            )
        })
    }

    /// The host socket of the channel named `name`.
    pub fn channel_path(&self, name: &str) -> Option<&std::path::Path> {
        self.channels.iter().find(|c| c.name == name).and_then(|c| c.path.as_deref())
    }
}

fn end_element(
    path: &mut Vec<String>,
    d: &mut DomainDescription,
    disk: &mut Option<DomainDisk>,
    nic: &mut Option<DomainNic>,
    channel: &mut Option<DomainChannel>,
) {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    match p.as_slice() {
        ["domain", "devices", "disk"] => {
            if let Some(dk) = disk.take() {
                d.disks.push(dk);
            }
        }
        ["domain", "devices", "interface"] => {
            if let Some(n) = nic.take() {
                d.nics.push(n);
            }
        }
        ["domain", "devices", "channel"] => {
            if let Some(c) = channel.take() {
                d.channels.push(c);
            }
        }
        _ => {}
    }
    path.pop();
}

/// A domain drover defines (a replica, a test VM): its `<metadata>` marks it as drover's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDomain {
    pub uuid: Uuid,
    pub name: String,
    /// `qemu` (TCG) or `kvm`.
    pub domain_type: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Direct kernel boot; without a kernel the domain boots from its first disk.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    /// UEFI firmware (libvirt picks OVMF, without Secure Boot) instead of BIOS.
    pub uefi: bool,
    /// The machine type: `pc` or `q35` (libvirt takes the newest of that family).
    pub machine: String,
    /// qcow2 images, in order (named `vda`, `vdb`... on virtio, `sda`... on SATA or SCSI, `hda`...
    /// on IDE).
    pub disks: Vec<NewDisk>,
    pub nics: Vec<NewNic>,
    pub console_log: PathBuf,
    /// The host socket of drover's channel (`org.drover.agent`).
    pub drover_channel: PathBuf,
}

/// A disk of a [`NewDomain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDisk {
    pub image: PathBuf,
    /// `virtio`, `sata`, `scsi` (on a virtio-scsi controller) or `ide`.
    pub bus: String,
}

/// A NIC of a [`NewDomain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewNic {
    pub mac: String,
    /// The libvirt network it is on.
    pub network: String,
    /// `virtio`, `e1000`, `e1000e`, `rtl8139`.
    pub model: String,
}

impl NewDomain {
    pub fn xml(&self) -> String {
        let e = |s: &str| escape(s).into_owned();
        let p = |p: &std::path::Path| escape(&*p.to_string_lossy()).into_owned();
        let mut x = format!(
            "<domain type='{}'><name>{}</name><uuid>{}</uuid>\
             <metadata><drover:vm xmlns:drover='{DROVER_NS}'/></metadata>\
             <memory unit='MiB'>{}</memory><vcpu>{}</vcpu><os{}><type arch='x86_64' machine='{}'>hvm</type>",
            e(&self.domain_type),
            e(&self.name),
            self.uuid,
            self.memory_mib,
            self.vcpus,
            if self.uefi { " firmware='efi'" } else { "" },
            e(&self.machine)
        );
        if self.uefi {
            // Without this libvirt picks the Secure Boot firmware with Microsoft's keys enrolled
            // wherever the machine has SMM (q35), and an unsigned bootloader is refused.
            x.push_str(
                "<firmware><feature enabled='no' name='secure-boot'/><feature enabled='no' name='enrolled-keys'/></firmware>",
            );
        }
        match &self.kernel {
            Some(k) => {
                x.push_str(&format!("<kernel>{}</kernel>", p(k)));
                if let Some(i) = &self.initrd {
                    x.push_str(&format!("<initrd>{}</initrd>", p(i)));
                }
                if let Some(c) = &self.cmdline {
                    x.push_str(&format!("<cmdline>{}</cmdline>", e(c)));
                }
            }
            None => x.push_str("<boot dev='hd'/>"),
        }
        x.push_str(
            "</os><features><acpi/></features><on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash><devices>",
        );
        // Each bus family names its disks from `a` on: vd (virtio), sd (SATA and SCSI), hd (IDE).
        let mut named: std::collections::BTreeMap<&str, usize> = Default::default();
        for d in &self.disks {
            let prefix = match d.bus.as_str() {
                "sata" | "scsi" => "sd",
                "ide" => "hd",
                _ => "vd",
            };
            let n = named.entry(prefix).or_default();
            x.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>\
                 <source file='{}'/><target dev='{prefix}{}' bus='{}'/></disk>",
                p(&d.image),
                disk_letter(*n),
                e(&d.bus)
            ));
            *n += 1;
        }
        if self.disks.iter().any(|d| d.bus == "scsi") {
            x.push_str("<controller type='scsi' index='0' model='virtio-scsi'/>");
        }
        for n in &self.nics {
            x.push_str(&format!(
                "<interface type='network'><mac address='{}'/><source network='{}'/><model type='{}'/></interface>",
                e(&n.mac),
                e(&n.network),
                e(&n.model)
            ));
        }
        x.push_str(&format!(
            "<serial type='file'><source path='{}'/><target port='0'/></serial>\
             <channel type='unix'><source mode='bind' path='{}'/><target type='virtio' name='org.drover.agent'/></channel>\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             <memballoon model='none'/></devices></domain>",
            p(&self.console_log),
            p(&self.drover_channel)
        ));
        x
    }
}

/// `a`..`z`, then `aa`.. as libvirt names disks.
fn disk_letter(mut i: usize) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (i % 26) as u8);
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

/// One disk of a pull-mode backup ([`backup_xml`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupDisk<'a> {
    /// The disk's target (`vda`).
    pub target: &'a str,
    /// The NBD export it is served as.
    pub export_name: &'a str,
    /// Holds what the guest overwrites while the backup runs.
    pub scratch: &'a std::path::Path,
    /// The changes since this checkpoint are the export's `qemu:dirty-bitmap:<export_bitmap>`
    /// context; without one the disk is exported whole, with no bitmap.
    pub incremental: Option<&'a str>,
}

/// A pull-mode backup of `disks`, all at one instant, served on the unix socket `socket`; every
/// other disk of `all_targets` is left out. Each disk says its own mode and checkpoint (libvirt
/// ≥ 7.6's per-disk `backupmode`/`incremental`), so disks whose bitmaps differ share one job.
pub fn backup_xml(
    socket: &std::path::Path,
    disks: &[BackupDisk<'_>],
    all_targets: &[&str],
    export_bitmap: &str,
) -> String {
    let mut x = String::from("<domainbackup mode='pull'>");
    x.push_str(&format!("<server transport='unix' socket='{}'/><disks>", escape(&*socket.to_string_lossy())));
    for t in all_targets {
        match disks.iter().find(|d| d.target == *t) {
            Some(d) => {
                let mode = match d.incremental {
                    Some(cp) => format!(
                        "backupmode='incremental' incremental='{}' exportbitmap='{}'",
                        escape(cp),
                        escape(export_bitmap)
                    ),
                    None => "backupmode='full'".to_string(),
                };
                x.push_str(&format!(
                    "<disk name='{}' backup='yes' type='file' {mode} exportname='{}'><scratch file='{}'/></disk>",
                    escape(*t),
                    escape(d.export_name),
                    escape(&*d.scratch.to_string_lossy()),
                ));
            }
            None => x.push_str(&format!("<disk name='{}' backup='no'/>", escape(*t))),
        }
    }
    x.push_str("</disks></domainbackup>");
    x
}

/// A checkpoint named `name` that tracks the disks `tracked` (a bitmap of that name in each),
/// every other disk of `all_targets` not.
pub fn checkpoint_xml(name: &str, tracked: &[&str], all_targets: &[&str]) -> String {
    let mut x = format!("<domaincheckpoint><name>{}</name><disks>", escape(name));
    for t in all_targets {
        let how = if tracked.contains(t) { "bitmap" } else { "no" };
        x.push_str(&format!("<disk name='{}' checkpoint='{how}'/>", escape(*t)));
    }
    x.push_str("</disks></domaincheckpoint>");
    x
}

/// What a running backup job's XML says of disk `target`: whether it is backed up, under which
/// export name, and since which checkpoint (`None`: whole).
pub fn backup_job_disk(text: &str, target: &str) -> LibvirtResult<Option<(String, Option<String>)>> {
    if text.len() > MAX_XML_BYTES {
        return Err(xml_err("the backup XML is too large"));
    }
    let mut reader = quick_xml::Reader::from_str(text);
    let mut depth = 0usize;
    let mut global_incremental: Option<String> = None;
    let mut in_incremental = false;
    // The disk's export name, backup mode and own checkpoint.
    let mut found: Option<(String, Option<String>, Option<String>)> = None;
    loop {
        let e = match reader.read_event().map_err(|e| xml_err(e.to_string()))? {
            Event::Start(e) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(xml_err("the backup XML nests too deep"));
                }
                in_incremental = depth == 2 && e.name().as_ref() == b"incremental";
                Some(e)
            }
            Event::Empty(e) => Some(e),
            Event::Text(t) if in_incremental => {
                global_incremental = Some(t.unescape().map_err(|e| xml_err(e.to_string()))?.trim().to_string());
                None
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                in_incremental = false;
                None
            }
            Event::Eof => break,
            _ => None,
        };
        if let Some(e) = e
            && e.name().as_ref() == b"disk"
            && attr(&e, "name")?.as_deref() == Some(target)
            && attr(&e, "backup")?.as_deref() != Some("no")
        {
            let export = attr(&e, "exportname")?.unwrap_or_default();
            found = Some((export, attr(&e, "backupmode")?, attr(&e, "incremental")?));
        }
    }
    // A disk without its own checkpoint follows the job's; a full one has none.
    Ok(found.map(|(export, mode, own)| match mode.as_deref() {
        Some("full") => (export, None),
        _ => (export, own.or(global_incremental)),
    }))
}

/// The disks a checkpoint's XML says it tracks with a bitmap, with the bitmap's name.
pub fn checkpoint_disks(text: &str) -> LibvirtResult<Vec<(String, String)>> {
    if text.len() > MAX_XML_BYTES {
        return Err(xml_err("the checkpoint XML is too large"));
    }
    let mut reader = quick_xml::Reader::from_str(text);
    let mut depth = 0usize;
    let mut name = String::new();
    let mut in_name = false;
    let mut out = Vec::new();
    loop {
        match reader.read_event().map_err(|e| xml_err(e.to_string()))? {
            Event::Start(e) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(xml_err("the checkpoint XML nests too deep"));
                }
                in_name = depth == 2 && e.name().as_ref() == b"name";
            }
            Event::Empty(e) if e.name().as_ref() == b"disk" && attr(&e, "checkpoint")?.as_deref() == Some("bitmap") => {
                let disk = attr(&e, "name")?.unwrap_or_default();
                let bitmap = attr(&e, "bitmap")?.unwrap_or_else(|| name.clone());
                out.push((disk, bitmap));
            }
            Event::Text(t) if in_name => name = t.unescape().map_err(|e| xml_err(e.to_string()))?.trim().to_string(),
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                in_name = false;
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = r#"<domain type='qemu' id='3'>
  <name>web-1</name>
  <uuid>6f1c1c4e-9d1a-4d57-9d6b-2f7a3c1f0b11</uuid>
  <metadata><drover:vm xmlns:drover="urn:drover:libvirt:1" id="x"/></metadata>
  <memory unit='MiB'>192</memory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>/g/vmlinux</kernel><initrd>/g/init.img</initrd><cmdline>console=ttyS0 quiet</cmdline></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/libvirt/images/web&amp;1.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/iso/d.iso'/><target dev='sda' bus='sata'/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/data'/><target dev='vdb' bus='virtio'/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/><model type='virtio'/></interface>
    <channel type='unix'><source mode='bind' path='/run/x/agent.sock'/><target type='virtio' name='org.drover.agent'/></channel>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>"#;

    #[test]
    fn a_domain_is_described() {
        let d = DomainDescription::parse(DOMAIN).unwrap();
        assert_eq!(d.name, "web-1");
        assert_eq!(d.uuid.to_string(), "6f1c1c4e-9d1a-4d57-9d6b-2f7a3c1f0b11");
        assert_eq!((d.memory_kib, d.vcpus, d.domain_type.as_str()), (192 * 1024, 2, "qemu"));
        assert!(d.owned_by_drover);
        assert_eq!(d.disks.len(), 2, "the CD-ROM is not a disk: {:?}", d.disks);
        assert_eq!(d.disks[0].source.as_deref(), Some(std::path::Path::new("/var/lib/libvirt/images/web&1.qcow2")));
        assert_eq!(d.disks[0].untrackable(), None);
        assert_eq!(d.disks[1].target, "vdb");
        assert!(d.disks[1].untrackable().unwrap().contains("not a file"));
        assert_eq!(d.nics[0].mac.as_deref(), Some("52:54:00:aa:bb:cc"));
        assert_eq!(d.nics[0].source.as_deref(), Some("default"));
        assert_eq!(d.channel_path("org.drover.agent"), Some(std::path::Path::new("/run/x/agent.sock")));
        assert_eq!(d.channel_path("org.qemu.guest_agent.0"), None);
        assert_eq!(d.cmdline.as_deref(), Some("console=ttyS0 quiet"));
    }

    #[test]
    fn a_domain_drover_defines_reads_back_as_drovers() {
        let n = NewDomain {
            uuid: Uuid::new_v4(),
            name: "drover-db<1>".into(),
            domain_type: "qemu".into(),
            memory_mib: 128,
            vcpus: 1,
            kernel: Some("/g/vmlinux".into()),
            initrd: None,
            cmdline: Some("console=ttyS0 a='b'".into()),
            uefi: false,
            machine: "pc".into(),
            disks: (0..28).map(|i| NewDisk { image: format!("/d/{i}.qcow2").into(), bus: "virtio".into() }).collect(),
            nics: vec![NewNic { mac: "52:54:00:00:00:01".into(), network: "dr-net".into(), model: "virtio".into() }],
            console_log: "/r/console.log".into(),
            drover_channel: "/r/agent.sock".into(),
        };
        let d = DomainDescription::parse(&n.xml()).unwrap();
        assert!(d.owned_by_drover);
        assert_eq!((d.uuid, d.name.as_str(), d.memory_kib), (n.uuid, "drover-db<1>", 128 * 1024));
        assert_eq!(d.disks.len(), 28);
        assert_eq!((d.disks[25].target.as_str(), d.disks[26].target.as_str()), ("vdz", "vdaa"));
        assert_eq!(d.cmdline.as_deref(), Some("console=ttyS0 a='b'"));
        assert_eq!(d.nics[0].source.as_deref(), Some("dr-net"));
        assert_eq!(d.channel_path("org.drover.agent"), Some(std::path::Path::new("/r/agent.sock")));
        assert!(!d.uefi);
        assert_eq!(d.machine.as_deref(), Some("pc"));
        let disk_boot = NewDomain { kernel: None, uefi: true, ..n.clone() };
        assert!(disk_boot.xml().contains("<boot dev='hd'/>"));
        assert!(DomainDescription::parse(&disk_boot.xml()).unwrap().uefi, "UEFI reads back");

        // Another guest's hardware: q35, SATA and SCSI disks named in one family, an IDE-less
        // machine, an e1000 NIC.
        let buses = ["sata", "virtio", "scsi", "sata"];
        let other = NewDomain {
            machine: "q35".into(),
            disks: buses
                .iter()
                .enumerate()
                .map(|(i, b)| NewDisk { image: format!("/d/{i}.qcow2").into(), bus: (*b).into() })
                .collect(),
            nics: vec![NewNic { mac: "52:54:00:00:00:02".into(), network: "n".into(), model: "e1000".into() }],
            ..n
        };
        let xml = other.xml();
        assert!(xml.contains("<controller type='scsi' index='0' model='virtio-scsi'/>"), "{xml}");
        let d = DomainDescription::parse(&xml).unwrap();
        assert_eq!(d.machine.as_deref(), Some("q35"));
        let disks: Vec<(&str, Option<&str>)> = d.disks.iter().map(|x| (x.target.as_str(), x.bus.as_deref())).collect();
        assert_eq!(
            disks,
            [("sda", Some("sata")), ("vda", Some("virtio")), ("sdb", Some("scsi")), ("sdc", Some("sata"))]
        );
        assert_eq!(d.nics[0].model.as_deref(), Some("e1000"));
    }

    #[test]
    fn a_domain_of_someone_else_is_not_ours() {
        let other = DOMAIN.replace("urn:drover:libvirt:1", "urn:someone:else");
        assert!(!DomainDescription::parse(&other).unwrap().owned_by_drover);
    }

    #[test]
    fn bounds_and_garbage_are_refused() {
        let deep = format!("<domain>{}{}</domain>", "<a>".repeat(100), "</a>".repeat(100));
        assert!(DomainDescription::parse(&deep).unwrap_err().message.contains("deeper"));
        let big = format!("<domain><name>{}</name></domain>", "x".repeat(MAX_XML_BYTES));
        assert!(DomainDescription::parse(&big).unwrap_err().message.contains("at most"));
        assert!(DomainDescription::parse("<domain><name>x</name></domain>").is_err(), "no uuid");
        assert!(DomainDescription::parse("<domain><uuid>nope</uuid>").is_err());
    }

    #[test]
    fn backup_and_checkpoint_xml_name_their_disks_and_escape() {
        let scratch = std::path::Path::new("/run/s.qcow2");
        let disks = [
            BackupDisk { target: "vda", export_name: "disk0", scratch, incremental: Some("drover-r1") },
            BackupDisk { target: "vdc", export_name: "disk2", scratch, incremental: None },
        ];
        let b = backup_xml(std::path::Path::new("/run/d'x/nbd.sock"), &disks, &["vda", "vdb", "vdc"], "drover-export");
        assert!(b.contains("socket='/run/d&apos;x/nbd.sock'"), "{b}");
        assert!(b.contains("<disk name='vdb' backup='no'/>"));
        assert!(
            b.contains(
                "backupmode='incremental' incremental='drover-r1' exportbitmap='drover-export' exportname='disk0'"
            ),
            "{b}"
        );
        assert!(b.contains("<disk name='vdc' backup='yes' type='file' backupmode='full' exportname='disk2'>"), "{b}");
        // What libvirt answers for a running job reads back per disk.
        assert_eq!(backup_job_disk(&b, "vda").unwrap(), Some(("disk0".into(), Some("drover-r1".into()))));
        assert_eq!(backup_job_disk(&b, "vdc").unwrap(), Some(("disk2".into(), None)));
        assert_eq!(backup_job_disk(&b, "vdb").unwrap(), None);
        let global = "<domainbackup mode='pull'><incremental>cp</incremental><disks><disk name='vda' backup='yes' exportname='d'/></disks></domainbackup>";
        assert_eq!(backup_job_disk(global, "vda").unwrap(), Some(("d".into(), Some("cp".into()))));

        let c = checkpoint_xml("drover-r2", &["vda", "vdc"], &["vda", "vdb", "vdc"]);
        assert_eq!(
            checkpoint_disks(&c.replace("checkpoint='bitmap'", "checkpoint='bitmap' bitmap='drover-r2'")).unwrap(),
            vec![("vda".to_string(), "drover-r2".to_string()), ("vdc".to_string(), "drover-r2".to_string())]
        );
        assert!(c.contains("<disk name='vdb' checkpoint='no'/>"));
    }
}
