//! Fingerprints of base files: how llmfs notices that a file it serves from changed after `add`.
//!
//! Hashing a multi-GB file on every open would cost as much as reading it, so a fingerprint is
//! size + mtime (checked on every open, for free) plus a BLAKE3 hash of the safetensors header and
//! of sampled blocks spread over the file (checked once per daemon and by `llmfs check`). An edit
//! that keeps size and mtime and touches no sampled block goes unseen: that is the price of not
//! reading the whole file, and the reason the sample includes the header, where any re-save shows.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Files up to this size are hashed whole.
const WHOLE_FILE_LIMIT: u64 = 4 << 20;
/// Sampled blocks: 32 of 64 KiB, 2 MiB read per file however large it is.
const SAMPLE_BLOCKS: u64 = 32;
const SAMPLE_BLOCK_SIZE: u64 = 64 << 10;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub size: u64,
    pub mtime_ns: i64,
    /// BLAKE3 (hex) of the first 4 MiB (all of a small file) and of sampled blocks after it.
    pub hash: String,
    /// The object's etag, for a file that lives in an object store (then `mtime_ns` and `hash`
    /// are unused: the store changes the etag whenever the object is rewritten).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

impl Fingerprint {
    pub fn of(path: &Path) -> io::Result<Fingerprint> {
        Fingerprint::of_open(&File::open(path)?)
    }

    /// The fingerprint of a file already open.
    fn of_open(file: &File) -> io::Result<Fingerprint> {
        let meta = file.metadata()?;
        Ok(Fingerprint {
            size: meta.len(),
            mtime_ns: mtime_ns(&meta),
            hash: sample_hash(file, meta.len())?,
            etag: None,
        })
    }

    /// The fingerprint of an object in a store: its size and etag.
    pub fn of_object(size: u64, etag: &str) -> Fingerprint {
        Fingerprint { size, mtime_ns: 0, hash: String::new(), etag: Some(etag.to_owned()) }
    }

    /// The cheap check: does the file still have the size and mtime it was added with?
    pub fn matches_stat(&self, meta: &std::fs::Metadata) -> bool {
        meta.len() == self.size && mtime_ns(meta) == self.mtime_ns
    }

    /// What differs between the recorded fingerprint and the file now, or None if it is unchanged.
    pub fn verify(&self, path: &Path) -> Option<String> {
        match File::open(path) {
            Ok(file) => self.verify_open(&file),
            Err(e) => Some(format!("cannot be read: {e}")),
        }
    }

    /// [`verify`](Self::verify) of a file already open.
    pub fn verify_open(&self, file: &File) -> Option<String> {
        let now = match Fingerprint::of_open(file) {
            Ok(f) => f,
            Err(e) => return Some(format!("cannot be read: {e}")),
        };
        if now.size != self.size {
            Some(format!("changed since it was added: size {} → {}", self.size, now.size))
        } else if now.hash != self.hash {
            Some("changed since it was added: its content hash differs".into())
        } else if now.mtime_ns != self.mtime_ns {
            Some("changed since it was added: modification time differs".into())
        } else {
            None
        }
    }
}

pub fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec())
}

fn sample_hash(file: &File, size: u64) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    let head = size.min(WHOLE_FILE_LIMIT);
    let mut buf = vec![0u8; head as usize];
    file.read_exact_at(&mut buf, 0)?;
    hasher.update(&buf);
    if size > WHOLE_FILE_LIMIT {
        let span = size - WHOLE_FILE_LIMIT;
        let mut block = vec![0u8; SAMPLE_BLOCK_SIZE as usize];
        for i in 0..SAMPLE_BLOCKS {
            // Evenly spaced, the last one ending at the end of the file.
            let offset =
                WHOLE_FILE_LIMIT + (span.saturating_sub(SAMPLE_BLOCK_SIZE)) * i / (SAMPLE_BLOCKS - 1);
            let len = SAMPLE_BLOCK_SIZE.min(size - offset) as usize;
            file.read_exact_at(&mut block[..len], offset)?;
            hasher.update(&block[..len]);
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn detects_a_changed_block_and_a_changed_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(6u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let fp = Fingerprint::of(&path).unwrap();
        assert_eq!(fp.verify(&path), None);
        // Change a byte inside the (whole-hashed) head, keep size and mtime.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[1, 2, 3], 100).unwrap();
        let times = std::fs::FileTimes::new()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(fp.mtime_ns as u64));
        f.set_times(times).unwrap();
        assert!(fp.verify(&path).unwrap().contains("hash"));
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"x").unwrap();
        assert!(fp.verify(&path).unwrap().contains("size"));
        std::fs::remove_file(&path).unwrap();
        assert!(fp.verify(&path).unwrap().contains("cannot be read"));
    }
}
