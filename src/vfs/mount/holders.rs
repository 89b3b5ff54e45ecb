//! Which processes keep a mount alive: `llmfs umount` detaches the mount at once (new opens
//! fail), but the kernel ends the FUSE session, and so the daemon, only when the last file open
//! on it, mapped from it or used as a working directory is let go. A loader that keeps its
//! safetensors mapped, or a shell `cd`'d into the mount, holds the daemon, and with it the disk
//! cache the next mount wants; `umount` names them instead of waiting in silence.
//!
//! Read from /proc before the mount is detached: after it, the paths in /proc no longer start
//! with the mount point. Processes of other users are skipped where /proc hides them (not root).

use std::path::Path;

/// A process with a file open, mapped or as its working or root directory under a mount point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its command name (/proc/PID/comm).
    pub command: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.pid, self.command)
    }
}

/// The processes other than this one that hold anything under `mountpoint` (a canonical path),
/// by pid.
pub fn holders(mountpoint: &Path) -> Vec<Holder> {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out: Vec<Holder> = procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && holds(pid, mountpoint))
        .map(|pid| Holder { pid, command: command(pid) })
        .collect();
    out.sort_by_key(|h| h.pid);
    out
}

/// Whether process `pid` is still there (not reaped; a zombie holds nothing, but is rare here).
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn command(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_or_else(|_| "?".into(), |c| c.trim_end().to_owned())
}

fn holds(pid: u32, mountpoint: &Path) -> bool {
    let under = |p: &Path| p.starts_with(mountpoint);
    let link = |name: &str| std::fs::read_link(format!("/proc/{pid}/{name}")).is_ok_and(|p| under(&p));
    if link("cwd") || link("root") {
        return true;
    }
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        if fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| under(&p))) {
            return true;
        }
    }
    // A mapping outlives its file descriptor (safetensors' safe_open closes the file, keeps the
    // map). The path is the last field; it may contain spaces, so take the rest of the line from
    // the first '/'.
    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|maps| {
        maps.lines().filter_map(|l| l.find('/').map(|i| &l[i..])).any(|p| under(Path::new(p)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_with_a_file_open_under_a_directory_holds_it_and_others_do_not() {
        let dir = std::env::temp_dir().join(format!("llmfs-holders-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        std::fs::write(dir.join("weights with space"), b"x").unwrap();
        // A child that keeps the file open on its stdin (this process is skipped by design).
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::fs::File::open(dir.join("weights with space")).unwrap())
            .spawn()
            .unwrap();
        let found = holders(&dir);
        let other = holders(&dir.join("elsewhere"));
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found, vec![Holder { pid: child.id(), command: "sleep".into() }]);
        assert!(other.is_empty(), "{other:?}");
        assert!(!alive(child.id()), "reaped");
    }
}
