//! The staging files themselves: writes into them, the bound on a sparse file's size, and the
//! sweep of what a killed daemon left.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use crate::registry::{EntryKind, Store};
use crate::vfs::error::io_fs;
use crate::vfs::{FsError, FsResult};

/// Write `data` at `offset` of a staged file.
pub fn write_at(file: &File, offset: u64, data: &[u8]) -> FsResult<u32> {
    // Only a hole is checked: a write that runs out of disk gets the disk's own ENOSPC.
    fits(file, offset)?;
    file.write_all_at(data, offset).map_err(|e| io_fs("staging write", e))?;
    Ok(data.len() as u32)
}

/// EFBIG if staged file `file` grown to `size` bytes by a hole (a write past its end, a
/// truncate that extends it) would be larger than the staging filesystem can hold: a write at a
/// huge offset (or `truncate -s 1T`) makes a sparse file that costs nothing until it is stored,
/// and storing reads (and codes) every byte of it, holes included. Its current size plus the
/// free space is what a real file could reach.
pub fn fits(file: &File, size: u64) -> FsResult<()> {
    use std::os::fd::AsRawFd;
    let now = file.metadata().map_err(|e| io_fs("staging", e))?.len();
    if size <= now {
        return Ok(());
    }
    // SAFETY: fstatvfs fills the struct we pass, for a descriptor we hold open.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) } != 0 {
        return Ok(()); // Unknown: the write itself says if the disk is full.
    }
    let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
    if size - now > free {
        return Err(FsError {
            errno: libc::EFBIG,
            message: Some(format!(
                "a file of {size} bytes does not fit: the staging filesystem has {free} bytes free \
                 (a write at a huge offset or a truncate far past the end makes a sparse file, which \
                 is stored whole)"
            )),
        });
    }
    Ok(())
}

/// Remove what a killed daemon left: staging directories of processes that no longer run, and
/// half-written containers. Called when a mount starts.
pub fn sweep(store: &Store) {
    let alive = |pid: &str| PathBuf::from("/proc").join(pid).exists();
    if let Ok(items) = fs::read_dir(store.tmp_dir()) {
        for item in items.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            // "{label}.{pid}.{n}": the pid is the second-to-last field.
            let pid = name.rsplit('.').nth(1).unwrap_or("");
            if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && !alive(pid) {
                tracing::info!("removing {name}, left by a process that is gone");
                let _ = fs::remove_dir_all(item.path());
            }
        }
    }
    // Containers of an older version's commits (".{file}.{pid}.tmp" in the entry's directory)
    // whose process died; a stored file of that form (a dotfile of the model) stays.
    let registry = store.load().unwrap_or_default();
    if let Ok(dirs) = fs::read_dir(store.root().join("models")) {
        for dir in dirs.flatten() {
            let entry = dir.file_name().to_string_lossy().into_owned();
            let stored = |n: &str| match registry.entries.get(&entry).map(|e| &e.kind) {
                Some(EntryKind::Delta { files, .. }) => files.iter().any(|f| f.name == n),
                _ => true,
            };
            for f in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
                let n = f.file_name().to_string_lossy().into_owned();
                let pid = n.rsplit('.').nth(1).unwrap_or("");
                let numeric = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
                if n.starts_with('.') && n.ends_with(".tmp") && numeric && !alive(pid) && !stored(&n) {
                    let _ = fs::remove_file(f.path());
                }
            }
        }
    }
}
