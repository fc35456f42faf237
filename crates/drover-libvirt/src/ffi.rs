//! The libvirt calls drover needs that the `virt` crate (0.4) does not wrap: checkpoints
//! (`virDomainCheckpoint*`), pull-mode backups (`virDomainBackupBegin`, `virDomainBackupGetXMLDesc`,
//! `virDomainAbortJob`) and the guest file system freeze (`virDomainFSFreeze` / `Thaw`). Each is a
//! thin, blocking, safe function over `virt::sys`; this module is the only `unsafe` in drover.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::ptr;

use virt::domain::Domain;
use virt::sys;

use crate::{LibvirtError, LibvirtResult};

fn last(what: &str) -> LibvirtError {
    LibvirtError::from_virt(what, &virt::error::Error::last_error())
}

fn cstring(what: &str, s: &str) -> LibvirtResult<CString> {
    CString::new(s)
        .map_err(|_| LibvirtError::new(crate::ErrorClass::Other, what, "the text holds a NUL byte".to_string()))
}

/// Takes a string libvirt allocated and frees it.
///
/// # Safety
/// `p` is null or a NUL-terminated string allocated by libvirt with malloc, not used after.
unsafe fn take_string(p: *mut std::os::raw::c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: per this function's contract.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    // SAFETY: allocated by libvirt with malloc and not used after.
    unsafe { libc::free(p.cast()) };
    Some(s)
}

/// Creates a checkpoint from its XML (`<domaincheckpoint>`); `redefine` only records an existing
/// one in libvirt's metadata (its bitmaps must be in the images).
pub fn checkpoint_create(dom: &Domain, xml: &str, redefine: bool) -> LibvirtResult<()> {
    let what = "creating a checkpoint";
    let xml = cstring(what, xml)?;
    let flags = if redefine { sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE } else { 0 };
    // SAFETY: a valid domain pointer and a NUL-terminated string that outlive the call.
    let cp = unsafe { sys::virDomainCheckpointCreateXML(dom.as_ptr(), xml.as_ptr(), flags) };
    if cp.is_null() {
        return Err(last(what));
    }
    // SAFETY: a checkpoint reference libvirt handed us; freed once.
    unsafe { sys::virDomainCheckpointFree(cp) };
    Ok(())
}

/// The names of the domain's checkpoints, parents before children.
pub fn checkpoint_names(dom: &Domain) -> LibvirtResult<Vec<String>> {
    let what = "listing the checkpoints";
    let mut list: *mut sys::virDomainCheckpointPtr = ptr::null_mut();
    // SAFETY: a valid domain; libvirt allocates the array and stores it in `list`.
    let n = unsafe {
        sys::virDomainListAllCheckpoints(dom.as_ptr(), &mut list, sys::VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
    };
    if n < 0 {
        return Err(last(what));
    }
    let mut names = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        // SAFETY: `list` holds `n` checkpoint references; each is read once and freed once.
        unsafe {
            let cp = *list.add(i);
            let name = sys::virDomainCheckpointGetName(cp);
            if !name.is_null() {
                names.push(CStr::from_ptr(name).to_string_lossy().into_owned());
            }
            sys::virDomainCheckpointFree(cp);
        }
    }
    if !list.is_null() {
        // SAFETY: the array libvirt allocated, freed once after its elements.
        unsafe { libc::free(list.cast()) };
    }
    Ok(names)
}

/// Runs `f` with the checkpoint named `name`, then frees it.
fn with_checkpoint<T>(
    dom: &Domain,
    name: &str,
    what: &str,
    f: impl FnOnce(sys::virDomainCheckpointPtr) -> LibvirtResult<T>,
) -> LibvirtResult<T> {
    let cname = cstring(what, name)?;
    // SAFETY: a valid domain and a NUL-terminated name.
    let cp = unsafe { sys::virDomainCheckpointLookupByName(dom.as_ptr(), cname.as_ptr(), 0) };
    if cp.is_null() {
        return Err(last(what));
    }
    let r = f(cp);
    // SAFETY: the reference the lookup returned, freed once.
    unsafe { sys::virDomainCheckpointFree(cp) };
    r
}

/// The checkpoint's XML (`<domaincheckpoint>` without the domain).
pub fn checkpoint_xml(dom: &Domain, name: &str) -> LibvirtResult<String> {
    let what = "reading a checkpoint";
    with_checkpoint(dom, name, what, |cp| {
        // SAFETY: a valid checkpoint; the string is ours to free.
        let s =
            unsafe { take_string(sys::virDomainCheckpointGetXMLDesc(cp, sys::VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)) };
        s.ok_or_else(|| last(what))
    })
}

/// Deletes a checkpoint: its bitmaps too, or, with `metadata_only`, only libvirt's record of it.
pub fn checkpoint_delete(dom: &Domain, name: &str, metadata_only: bool) -> LibvirtResult<()> {
    let what = "deleting a checkpoint";
    with_checkpoint(dom, name, what, |cp| {
        let flags = if metadata_only { sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY } else { 0 };
        // SAFETY: a valid checkpoint.
        if unsafe { sys::virDomainCheckpointDelete(cp, flags) } < 0 { Err(last(what)) } else { Ok(()) }
    })
}

/// Begins a backup job (`<domainbackup>`), creating the checkpoint `checkpoint_xml` describes
/// at the same instant.
pub fn backup_begin(dom: &Domain, backup_xml: &str, checkpoint_xml: Option<&str>) -> LibvirtResult<()> {
    let what = "beginning a backup";
    let backup = cstring(what, backup_xml)?;
    let checkpoint = checkpoint_xml.map(|x| cstring(what, x)).transpose()?;
    let cp_ptr = checkpoint.as_ref().map_or(ptr::null(), |c| c.as_ptr());
    // SAFETY: a valid domain; the strings are NUL-terminated and outlive the call (or null).
    if unsafe { sys::virDomainBackupBegin(dom.as_ptr(), backup.as_ptr(), cp_ptr, 0) } < 0 {
        Err(last(what))
    } else {
        Ok(())
    }
}

/// The running backup job's XML, or `None` when no backup job runs.
pub fn backup_xml(dom: &Domain) -> LibvirtResult<Option<String>> {
    let what = "reading the backup job";
    // SAFETY: a valid domain; the string is ours to free.
    match unsafe { take_string(sys::virDomainBackupGetXMLDesc(dom.as_ptr(), 0)) } {
        Some(s) => Ok(Some(s)),
        None => {
            let e = last(what);
            if matches!(e.class, crate::ErrorClass::NoBackup | crate::ErrorClass::OperationInvalid) {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

/// Ends the domain's job: how a pull-mode backup is ended (libvirt then reports it "canceled",
/// which is its normal end).
pub fn abort_job(dom: &Domain) -> LibvirtResult<()> {
    // SAFETY: a valid domain.
    if unsafe { sys::virDomainAbortJob(dom.as_ptr()) } < 0 { Err(last("ending the backup job")) } else { Ok(()) }
}

/// Freezes every file system of the guest through its guest agent; the number frozen.
pub fn fs_freeze(dom: &Domain) -> LibvirtResult<u32> {
    // SAFETY: a valid domain; no mount points (all of them).
    let n = unsafe { sys::virDomainFSFreeze(dom.as_ptr(), ptr::null_mut(), 0, 0) };
    if n < 0 { Err(last("freezing the guest's file systems")) } else { Ok(n as u32) }
}

/// Thaws every file system of the guest; the number thawed.
pub fn fs_thaw(dom: &Domain) -> LibvirtResult<u32> {
    // SAFETY: a valid domain; no mount points (all of them).
    let n = unsafe { sys::virDomainFSThaw(dom.as_ptr(), ptr::null_mut(), 0, 0) };
    if n < 0 { Err(last("thawing the guest's file systems")) } else { Ok(n as u32) }
}
