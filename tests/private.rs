//! The README's "private by default": the store's directories are 0700 and its files 0600
//! (subdirectories of an entry included, whatever modes the source files had), and the mount is
//! the user's alone unless `--allow-other` — another user cannot even stat it.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use common::{MountGuard, TestStore};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn modes(p: &Path, out: &mut Vec<(PathBuf, bool, u32)>) {
    let meta = fs::symlink_metadata(p).unwrap();
    out.push((p.to_owned(), meta.is_dir(), meta.permissions().mode() & 0o7777));
    if meta.is_dir() {
        for e in fs::read_dir(p).unwrap() {
            modes(&e.unwrap().path(), out);
        }
    }
}

#[test]
fn store_directories_are_0700_and_files_0600() {
    let ts = TestStore::new();
    let repo = ts.model("repo");
    fs::create_dir_all(repo.join("1_Pooling")).unwrap();
    fs::write(repo.join("1_Pooling/config.json"), b"{}").unwrap();
    let mut all = vec![];
    modes(&repo, &mut all);
    for (p, _, _) in &all {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    ts.ok(["add", "m", s(&repo), "--copy"]);
    ts.ok(["quantize", "q", "--base", "m", "--group-size", "64"]);
    let target = ts.path("ft");
    llmfs::demo::write_finetune(&repo, &target, 0.01, 3).unwrap();
    fs::create_dir_all(target.join("1_Pooling")).unwrap();
    fs::write(target.join("1_Pooling/config.json"), b"{\"x\": 1}").unwrap();
    ts.ok(["delta", "make", "ft", "--base", "m", "--target", s(&target)]);
    let mut all = vec![];
    modes(&ts.store, &mut all);
    for (p, is_dir, mode) in &all {
        let want = if *is_dir { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "{} is {mode:o}, not {want:o}", p.display());
    }
    for rel in
        ["registry.json", "models/m/1_Pooling/config.json", "models/ft/1_Pooling/config.json", "models/q"]
    {
        assert!(all.iter().any(|(p, _, _)| p.ends_with(rel)), "{rel} not in the store");
    }
}

/// The mount's super options as /proc/self/mountinfo lists them.
fn mount_options(mp: &Path) -> String {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(s(mp)))
        .unwrap_or_else(|| panic!("{} not in mountinfo", mp.display()));
    line.rsplit(' ').next().unwrap().to_owned()
}

/// `stat MOUNT` as user nobody (65534): whether it succeeded.
fn nobody_can_stat(mp: &Path) -> bool {
    let out = std::process::Command::new("stat")
        .arg(mp)
        .uid(65534)
        .gid(65534)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running stat as nobody");
    out.status.success()
}

#[test]
fn the_mount_is_private_unless_allow_other() {
    let ts = TestStore::new();
    let model = ts.model("model");
    ts.ok(["add", "m", s(&model)]);
    // Let other users reach the mount points: the test directory is 0700 by default.
    fs::set_permissions(ts.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("note: not root: checking the mount options only, not access as another user");
    }
    {
        let m = MountGuard::new(&ts, &ts.path("private"), &[]);
        let opts = mount_options(m.path());
        assert!(!opts.contains("allow_other"), "a default mount allows other users: {opts}");
        assert!(opts.contains("default_permissions"), "{opts}");
        if root {
            assert!(!nobody_can_stat(m.path()), "another user can stat a private mount");
            assert!(fs::metadata(m.path().join("m/config.json")).is_ok(), "the owner cannot read it");
        }
    }
    let m = MountGuard::new(&ts, &ts.path("shared"), &["--allow-other"]);
    let opts = mount_options(m.path());
    assert!(opts.contains("allow_other"), "--allow-other is not in the mount's options: {opts}");
    if root {
        assert!(nobody_can_stat(m.path()), "--allow-other did not let another user in");
    }
}
