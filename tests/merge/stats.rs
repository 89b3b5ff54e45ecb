//! Whole-tensor statistics stored with a merge (issue 22): `llmfs merge` computes them once and
//! stores one file with the entry; reads use it and compute nothing (the daemon logs every
//! computation on a read, and an entry made before the file existed shows that line); `rm`
//! removes the file; a stored file rewritten after the merge answers EIO with a log line.

use super::*;

/// What the daemon logs when a read computes a tensor's statistics.
const COMPUTED_ON_READ: &str = "computing the whole-tensor statistics";

const TIES_ABC: &str = "merge_method: ties
base_model: a
models:
  - {model: b, parameters: {weight: 0.5, density: 0.5}}
  - {model: c, parameters: {weight: 0.4, density: 0.3}}
dtype: bfloat16
";

/// `a`, its fine-tunes `b` and `c`, a TIES merge of them, a slerp of `a` and `b`, and a slerp of
/// the TIES merge and `b` (a merge of a merge).
fn merges() -> TestStore {
    let ts = two_models();
    demo::write_finetune(&ts.path("a"), &ts.path("c"), 1.5, 9).unwrap();
    ts.ok(["add", "c", s(&ts.path("c"))]);
    let out = ts.run_full(["merge", "ties", "--config", s(&config(&ts, "ties.yml", TIES_ABC, &[]))]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("computed the whole-tensor statistics of"), "no summary:\n{}", out.stderr);
    ts.ok(["merge", "slerp", "--method", "slerp", "--base", "a", "--models", "a,b", "--t", "0.3"]);
    ts.ok(["merge", "mm", "--method", "slerp", "--base", "ties", "--models", "ties,b", "--t", "0.6"]);
    ts
}

/// The registry's file records of entry `name`, by file name.
fn records(ts: &TestStore, name: &str) -> Vec<String> {
    let registry = ts.registry_json();
    let files = registry["entries"][name]["files"].as_array().cloned().unwrap_or_default();
    files.iter().filter_map(|f| f["name"].as_str().map(str::to_owned)).collect()
}

/// Replace the stored registry (both backends).
fn write_registry(ts: &TestStore, registry: &serde_json::Value) {
    let bytes = serde_json::to_vec_pretty(registry).unwrap();
    match &ts.s3 {
        None => std::fs::write(ts.registry_path(), bytes).unwrap(),
        Some(s3) => {
            s3.objects().put("registry.json", bytes.into()).unwrap();
        }
    }
}

#[test]
fn merges_store_their_statistics_and_reads_compute_none() {
    let ts = merges();
    for name in ["ties", "slerp", "mm"] {
        assert_eq!(records(&ts, name), ["merge-stats.bin"], "{name}");
        let size = ts.stored_size(name, "merge-stats.bin");
        assert!(size.is_some_and(|n| n > 0), "{name}: {:?}", ts.stored_files(name));
        eprintln!("{name}: statistics file of {} bytes", size.unwrap());
    }
    // A linear merge needs none: no file.
    ts.ok(["merge", "lin", "--method", "linear", "--models", "a:1,b:1"]);
    assert!(records(&ts, "lin").is_empty() && ts.stored_files("lin").is_empty());

    // An entry as merges were before they stored statistics: the same merge without the file.
    let mut registry = ts.registry_json();
    let mut legacy = registry["entries"]["ties"].clone();
    legacy.as_object_mut().unwrap().remove("files");
    legacy["generation"] = serde_json::json!(7);
    registry["entries"]["legacy"] = legacy;
    write_registry(&ts, &registry);

    // In this process: the exports read the stored statistics, computing none.
    let before = llmfs::variant::source::STATS_COMPUTED_ON_READ.load(std::sync::atomic::Ordering::Relaxed);
    let want: Vec<(&str, PathBuf)> = ["ties", "slerp", "mm"].iter().map(|n| (*n, export(&ts, n))).collect();
    let store = ts.open_store();
    let reg = store.load().unwrap();
    for name in ["ties", "mm"] {
        let view = llmfs::variant::build_view(&reg, name).unwrap();
        let t = view.weights.values().flat_map(|w| &w.tensors).last().unwrap();
        let n: usize = t.shape.iter().product();
        let mut buf = vec![0u8; n * t.source.dtype().size()];
        t.source.read(0..n, &mut buf).unwrap();
    }
    let after = llmfs::variant::source::STATS_COMPUTED_ON_READ.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(after, before, "reads of merges with stored statistics computed some");

    let mount = MountGuard::new(&ts, &ts.path("mnt"), &["--disk-cache", "0"]);
    let pairs: Vec<(&str, &Path)> = want.iter().map(|(n, p)| (*n, p.as_path())).collect();
    assert_mount_equals(mount.path(), &pairs);
    assert!(
        !mount.log_text().contains(COMPUTED_ON_READ),
        "a read computed statistics:\n{}",
        mount.log_text()
    );
    // The legacy entry computes them on read (the log line this test relies on exists), and
    // reads the same bytes.
    assert_mount_equals(mount.path(), &[("legacy", &want[0].1)]);
    let line = mount.wait_log_line(&[COMPUTED_ON_READ], Duration::from_secs(10));
    assert!(line.is_some(), "the legacy entry computed nothing on read:\n{}", mount.log_text());
    drop(mount);

    // The exports after the mount read the same bytes as before.
    for (name, dir) in &want {
        let again = ts.path(format!("export-again-{name}"));
        ts.ok(["export", name, s(&again)]);
        for f in files(dir) {
            let (now, then) = (std::fs::read(again.join(&f)).unwrap(), std::fs::read(dir.join(&f)).unwrap());
            assert_same_bytes(&now, &then, &format!("{name}/{f}"));
        }
    }

    // rm removes the file (the legacy entry names no file of its own: it goes first).
    for name in ["mm", "legacy", "ties", "slerp"] {
        ts.ok(["rm", name]);
        assert!(ts.stored_files(name).is_empty(), "{name} left {:?}", ts.stored_files(name));
    }
    ts.assert_no_garbage("after removing the merges");
}

#[test]
fn a_rewritten_statistics_file_answers_eio_with_a_log_line() {
    let ts = merges();
    let mount = MountGuard::new(&ts, &ts.path("mnt"), &["--disk-cache", "0"]);
    // Locally the merge is read before the change, on S3 after (see the parent's test).
    if !ts.is_s3() {
        read_mounted(&mount.path().join("ties/model.safetensors")).expect("ties reads before the change");
    }
    rewrite_stored_file(&ts, "ties", "merge-stats.bin");
    for merged in ["ties", "mm"] {
        match read_mounted(&mount.path().join(merged).join("model.safetensors")) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{merged}: {e}"),
            Ok(_) => panic!("{merged} read after ties' statistics changed"),
        }
    }
    let line = mount.wait_log_line(&["ties", "merge-stats.bin"], Duration::from_secs(10));
    assert!(line.is_some(), "no log line names the changed file:\n{}", mount.log_text());
    eprintln!("log: {}", line.unwrap());
    read_mounted(&mount.path().join("slerp/model.safetensors")).expect("slerp does not read ties' file");
    let f = ts.run_full(["check", "ties"]);
    assert!(
        !f.status.success() && (f.stdout + &f.stderr).contains("merge-stats.bin"),
        "llmfs check ties passed"
    );
}
