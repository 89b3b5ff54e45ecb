//! What a running mount says about itself, where `umount`, `mount` and `status` find it.
//!
//! Each daemon writes one small JSON file per mount point into the user's runtime directory
//! (`$XDG_RUNTIME_DIR/llmfs/mounts/`, else `/tmp/llmfs-UID/mounts/`, a 0700 directory of the
//! user's own): its pid, store and whether it got its disk cache (and if not, why). The daemon
//! holds an `flock` on that file for its whole life, so the lock's release is the daemon's end:
//! `llmfs umount` waits for it, which is what lets a `mount` right after an `umount` find the
//! disk cache free (the old daemon commits what it decoded, then lets go of the cache, then
//! exits). The file is keyed by the canonical mount point, not by the store, because `umount`
//! is given only the mount point.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The disk cache as the mount got it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum DiskCacheState {
    /// In use by this mount.
    On { dir: PathBuf, capacity: u64 },
    /// Not asked for (`--disk-cache 0`, or a size of 0).
    Off,
    /// Asked for and not usable: every variant file is decoded on the read path, on every mount.
    Unusable { dir: PathBuf, reason: String },
}

/// One mount's status file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountStatus {
    pub pid: u32,
    pub mountpoint: PathBuf,
    pub store: String,
    pub disk_cache: DiskCacheState,
}

impl MountStatus {
    /// The line to put in front of a user whose mount runs without the disk cache it asked for.
    pub fn warning(&self) -> Option<String> {
        match &self.disk_cache {
            DiskCacheState::Unusable { dir, reason } => Some(format!(
                "warning: {}: running without its disk cache {} ({reason}): variant files are decoded on every read and nothing is kept for the next mount",
                self.mountpoint.display(),
                dir.display()
            )),
            _ => None,
        }
    }

    /// `status`'s line for this mount.
    pub fn line(&self) -> String {
        let cache = match &self.disk_cache {
            DiskCacheState::On { dir, capacity } => {
                format!("disk cache {} ({:.1} GiB)", dir.display(), *capacity as f64 / (1u64 << 30) as f64)
            }
            DiskCacheState::Off => "no disk cache".into(),
            DiskCacheState::Unusable { dir, reason } => {
                format!("NO DISK CACHE: {} unusable: {reason}", dir.display())
            }
        };
        format!("{}  pid {}  store {}  {cache}", self.mountpoint.display(), self.pid, self.store)
    }
}

/// The user's directory of status files (created 0700), or None when there is none we can trust
/// (a `/tmp/llmfs-UID` that is not ours or is open to others).
fn runtime_dir() -> Option<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let base = match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).filter(|d| d.is_dir()) {
        Some(d) => d.join("llmfs"),
        None => std::env::temp_dir().join(format!("llmfs-{uid}")),
    };
    let dir = base.join("mounts");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).ok()?;
    for d in [&base, &dir] {
        let m = std::fs::symlink_metadata(d).ok()?;
        if !m.is_dir() || m.uid() != uid || m.mode() & 0o077 != 0 {
            tracing::warn!("{}: not a private directory of this user; no mount status kept", d.display());
            return None;
        }
    }
    Some(dir)
}

/// The status file of the mount at `mountpoint` (canonical).
fn status_path(mountpoint: &Path) -> Option<PathBuf> {
    let hash = blake3::hash(mountpoint.as_os_str().as_encoded_bytes());
    Some(runtime_dir()?.join(format!("{}.json", &hash.to_hex()[..32])))
}

fn try_lock(file: &File, how: libc::c_int) -> bool {
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) == 0 }
}

/// The daemon's hold on its status file: the `flock` lasts as long as this (and the process).
pub struct Published {
    _file: File,
    path: PathBuf,
}

impl Drop for Published {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Write `status` for its mount and hold its lock (None, logged, where there is no runtime
/// directory). Written to a temporary name, locked, then renamed: whoever finds the file finds
/// it whole and locked.
pub fn publish(status: &MountStatus) -> Option<Published> {
    let path = status_path(&status.mountpoint)?;
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let write = || -> std::io::Result<File> {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        if !try_lock(&f, libc::LOCK_EX) {
            return Err(std::io::Error::other("cannot lock it"));
        }
        f.write_all(&serde_json::to_vec(status).expect("a status serializes"))?;
        std::fs::rename(&tmp, &path)?;
        Ok(f)
    };
    match write() {
        Ok(f) => Some(Published { _file: f, path }),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!("mount status {}: {e}", path.display());
            None
        }
    }
}

/// The status of the live mount at `mountpoint` (canonical): None when none was published or
/// its daemon is gone (its lock released).
pub fn read(mountpoint: &Path) -> Option<(MountStatus, File)> {
    let path = status_path(mountpoint)?;
    let file = File::open(&path).ok()?;
    let status: MountStatus = serde_json::from_reader(&file).ok()?;
    if try_lock(&file, libc::LOCK_SH) {
        // Nobody holds it: a daemon that died without removing it.
        let _ = std::fs::remove_file(&path);
        return None;
    }
    Some((status, file))
}

/// Every live mount's status (for `llmfs status`), by mount point.
pub fn all() -> Vec<MountStatus> {
    let mut out: Vec<MountStatus> =
        super::llmfs_mounts().iter().filter_map(|mp| read(mp).map(|(s, _)| s)).collect();
    out.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
    out
}

/// Wait until the daemon whose status file is `file` has ended (released its lock), at most
/// `timeout`. True if it has.
pub fn wait_for_exit(file: &File, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if try_lock(file, libc::LOCK_SH) {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_status_is_read_while_held_and_gone_after() {
        let mp = std::env::temp_dir().join(format!("llmfs-status-test-{}", std::process::id()));
        let status = MountStatus {
            pid: std::process::id(),
            mountpoint: mp.clone(),
            store: "/s".into(),
            disk_cache: DiskCacheState::Unusable { dir: "/c".into(), reason: "in use".into() },
        };
        let held = publish(&status).expect("a runtime directory");
        let (read_back, file) = read(&mp).expect("published");
        assert_eq!(read_back.disk_cache, status.disk_cache);
        assert!(read_back.warning().unwrap().contains("/c (in use)"));
        assert!(!wait_for_exit(&file, Duration::from_millis(30)), "still held");
        drop(held);
        assert!(wait_for_exit(&file, Duration::from_secs(5)));
        assert!(read(&mp).is_none());
    }
}
