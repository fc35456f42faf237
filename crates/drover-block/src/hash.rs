//! Fixed-size block hashes and manifests.
//!
//! A manifest is the BLAKE3 hash of every 64 KiB block of one disk at one restore point. It is
//! what makes a restore point verifiable (what the target holds must hash to it), what the
//! hash-compare fallback compares when no dirty bitmap can be trusted, and what lets an
//! incremental point be checked without reading the whole disk: the manifest of point N is the
//! manifest of point N-1 with the changed blocks rehashed.
//!
//! 64 KiB is QEMU's default dirty-bitmap granularity, so a dirty granule is exactly one block.
//! BLAKE3 hashes at about 3 GB/s on one core here, faster than the disks it reads.
//!
//! On disk a manifest is a small header and the raw hashes; it is written to a temporary file,
//! synced and renamed, so a crash leaves either the old manifest or the new one.

use std::path::Path;

pub const BLOCK_SIZE: u64 = 64 * 1024;

const MAGIC: &[u8; 8] = b"DRVMANI1";
const HEADER_LEN: usize = 8 + 8 + 8;

pub type BlockHash = [u8; 32];

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest {path} is corrupt: {why}")]
    Corrupt { path: String, why: String },
    #[error("manifests of different shapes: {0}")]
    Shape(String),
}

pub fn hash_block(data: &[u8]) -> BlockHash {
    *blake3::hash(data).as_bytes()
}

/// The hash of a block of zeros of `len` bytes (what a hole or an unwritten block reads as).
pub fn zero_hash(len: usize) -> BlockHash {
    // Computed per call: it is cheap next to the I/O around it, and the last block of a disk may
    // be short.
    hash_block(&vec![0u8; len])
}

/// The per-block hashes of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub block_size: u64,
    pub disk_size: u64,
    hashes: Vec<BlockHash>,
}

impl Manifest {
    /// The manifest of a disk that reads as zeros everywhere (a new, empty disk).
    pub fn zeroed(disk_size: u64) -> Manifest {
        let n = disk_size.div_ceil(BLOCK_SIZE) as usize;
        let mut hashes = vec![zero_hash(BLOCK_SIZE as usize); n];
        if let Some(last) = hashes.last_mut() {
            *last = zero_hash(block_len(disk_size, (n - 1) as u64) as usize);
        }
        Manifest { block_size: BLOCK_SIZE, disk_size, hashes }
    }

    pub fn blocks(&self) -> u64 {
        self.hashes.len() as u64
    }

    pub fn hash(&self, block: u64) -> Option<&BlockHash> {
        self.hashes.get(block as usize)
    }

    /// The byte range of a block.
    pub fn block_range(&self, block: u64) -> (u64, u64) {
        (block * self.block_size, block_len(self.disk_size, block))
    }

    /// Records the content of `block`. `data` must be the whole block (short only at the end).
    pub fn set(&mut self, block: u64, data: &[u8]) -> Result<(), ManifestError> {
        let expected = block_len(self.disk_size, block);
        if block >= self.blocks() || data.len() as u64 != expected {
            return Err(ManifestError::Shape(format!(
                "block {block} of {} takes {expected} bytes, got {}",
                self.blocks(),
                data.len()
            )));
        }
        self.hashes[block as usize] = hash_block(data);
        Ok(())
    }

    /// Records a block's hash computed elsewhere (see [`hash_block`]).
    pub fn set_hash(&mut self, block: u64, hash: BlockHash) -> Result<(), ManifestError> {
        let blocks = self.blocks();
        let slot = self
            .hashes
            .get_mut(block as usize)
            .ok_or_else(|| ManifestError::Shape(format!("block {block} of {blocks}")))?;
        *slot = hash;
        Ok(())
    }

    /// Records every block of `data` read at `offset` (block-aligned).
    pub fn set_range(&mut self, offset: u64, data: &[u8]) -> Result<(), ManifestError> {
        if !offset.is_multiple_of(self.block_size) {
            return Err(ManifestError::Shape(format!("offset {offset} is not block-aligned")));
        }
        let mut block = offset / self.block_size;
        let mut rest = data;
        while !rest.is_empty() {
            let len = (block_len(self.disk_size, block) as usize).min(rest.len());
            let (this, tail) = rest.split_at(len);
            self.set(block, this)?;
            rest = tail;
            block += 1;
        }
        Ok(())
    }

    /// The blocks whose hashes differ, as `(first block, count)` runs.
    pub fn diff(&self, other: &Manifest) -> Result<Vec<(u64, u64)>, ManifestError> {
        if self.block_size != other.block_size || self.disk_size != other.disk_size {
            return Err(ManifestError::Shape(format!(
                "{} bytes in {}-byte blocks vs {} bytes in {}-byte blocks",
                self.disk_size, self.block_size, other.disk_size, other.block_size
            )));
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, (a, b)) in self.hashes.iter().zip(&other.hashes).enumerate() {
            if a != b {
                match runs.last_mut() {
                    Some((start, count)) if *start + *count == i as u64 => *count += 1,
                    _ => runs.push((i as u64, 1)),
                }
            }
        }
        Ok(runs)
    }

    /// One hash over the whole manifest: what the store records for a restore point.
    pub fn digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(&self.block_size.to_le_bytes());
        h.update(&self.disk_size.to_le_bytes());
        for b in &self.hashes {
            h.update(b);
        }
        h.finalize().to_hex().to_string()
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.hashes.len() * 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        for b in &self.hashes {
            out.extend_from_slice(b);
        }
        out
    }

    fn decode(path: &Path, bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let corrupt = |why: &str| ManifestError::Corrupt { path: path.display().to_string(), why: why.into() };
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return Err(corrupt("bad header"));
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        let (block_size, disk_size) = (word(8), word(16));
        if block_size == 0 {
            return Err(corrupt("zero block size"));
        }
        let body = &bytes[HEADER_LEN..];
        if body.len() as u64 != disk_size.div_ceil(block_size) * 32 {
            return Err(corrupt("length does not match the disk size"));
        }
        let hashes = body.chunks_exact(32).map(|c| c.try_into().unwrap_or([0; 32])).collect();
        Ok(Manifest { block_size, disk_size, hashes })
    }

    /// Writes the manifest durably: temporary file, fsync, rename, fsync of the directory.
    pub async fn save(&self, path: &Path) -> Result<(), ManifestError> {
        drover_qemu::durable::write(path, self.encode(), 0o600)
            .await
            .map_err(|e| ManifestError::Io { context: format!("writing {}", path.display()), source: e })
    }

    pub async fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|e| ManifestError::Io { context: format!("reading {}", path.display()), source: e })?;
        Manifest::decode(path, &bytes)
    }
}

fn block_len(disk_size: u64, block: u64) -> u64 {
    disk_size.saturating_sub(block * BLOCK_SIZE).min(BLOCK_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_zeroed_manifest_matches_hashing_zeros() {
        let size = 3 * BLOCK_SIZE + 100;
        let mut m = Manifest::zeroed(size);
        assert_eq!(m.blocks(), 4);
        let fresh = m.clone();
        m.set_range(0, &vec![0u8; size as usize]).unwrap();
        assert_eq!(m, fresh);
        assert_eq!(m.block_range(3), (3 * BLOCK_SIZE, 100));
    }

    #[test]
    fn wrong_shapes_are_refused() {
        let mut m = Manifest::zeroed(2 * BLOCK_SIZE);
        assert!(m.set(0, &[1, 2, 3]).is_err());
        assert!(m.set(2, &vec![0; BLOCK_SIZE as usize]).is_err());
        assert!(m.set_range(1, &[0]).is_err());
        assert!(m.diff(&Manifest::zeroed(BLOCK_SIZE)).is_err());
    }

    proptest! {
        #[test]
        fn diff_finds_exactly_the_changed_blocks(changes in proptest::collection::btree_set(0u64..40, 0..12)) {
            let size = 40 * BLOCK_SIZE - 7;
            let a = Manifest::zeroed(size);
            let mut b = a.clone();
            for &blk in &changes {
                let (_, len) = b.block_range(blk);
                b.set(blk, &vec![0xAB; len as usize]).unwrap();
            }
            let runs = a.diff(&b).unwrap();
            let found: std::collections::BTreeSet<u64> = runs.iter().flat_map(|(s, n)| *s..*s + *n).collect();
            prop_assert_eq!(&found, &changes);
            // Runs are maximal: two runs never touch.
            prop_assert!(runs.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0));
            prop_assert_eq!(a.digest() == b.digest(), changes.is_empty());
        }
    }

    #[tokio::test]
    async fn save_and_load_round_trip_and_detect_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p1.manifest");
        let mut m = Manifest::zeroed(5 * BLOCK_SIZE);
        m.set(2, &vec![7u8; BLOCK_SIZE as usize]).unwrap();
        m.save(&path).await.unwrap();
        assert_eq!(Manifest::load(&path).await.unwrap(), m);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(Manifest::load(&path).await, Err(ManifestError::Corrupt { .. })));
    }
}
