//! The data path of replication.
//!
//! - [`nbd`]: an NBD client (newstyle handshake, structured replies, block status with meta
//!   contexts such as `qemu:dirty-bitmap:<name>` and `base:allocation`, reads and writes).
//! - [`extents`]: sets of byte ranges: union, intersection, clipping, chunking.
//! - [`hash`]: fixed-size block hashes and manifests.
//! - [`copy`]: moving extents between exports, and the hash-compare sync.
//! - [`direct`]: reading an image nobody writes to straight from its files (`qemu-img map`).
//! - [`chain`]: restore points on the target as a chain of qcow2 overlays per disk.

pub mod chain;
pub mod copy;
pub mod direct;
pub mod extents;
pub mod hash;
pub mod nbd;
