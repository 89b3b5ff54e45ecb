//! The CLI and the mount on an S3 store (issue 15, DESIGN.md's contract with `--store
//! s3://BUCKET/PREFIX`), against a real SeaweedFS server on 127.0.0.1 that each test starts and
//! kills itself (`s3_common::Weed`), and a stub server that ignores conditional writes:
//! every command gives the local store's bytes; a mount serves `export`'s bytes and stores what is
//! written into deltas/; two nodes of one bucket see each other's entries come and go; parallel
//! registry changes lose nothing; a server killed mid-read gives EIO in bounded time and reads
//! work again after its restart; kill -9 mid-upload then `gc`; a server without conditional
//! writes is refused. Also `gc` on a local store.
//!
//! Each test has its own server (it starts in about a second), bucket prefix, LLMFS_NODE_DIR and
//! disk caches; every command runs under a timeout, every blocking file operation under
//! `with_deadline`, every mount is owned by a guard that unmounts it on drop (also on panic).
//! Skips with a message when `weed` is not installed, unless LLMFS_REQUIRE_S3=1 (CI).

mod common;
use common::s3_common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_one_line_error, assert_same_bytes, run_command, wait_until, with_deadline, Finished, MountGuard,
    TestStore,
};
use llmfs::demo::{self, ModelSpec};
use llmfs::format::Dtype;
use llmfs::store::{ObjectMeta, Store};
use s3_common::stub::{Mode, Stub};
use s3_common::{Weed, BUCKET, KEY_ID, SECRET};
use serde_json::Value;

/// Deadline of one blocking file operation through a mount (reading a tree, a cp).
const OP: Duration = Duration::from_secs(120);
/// How long a command may run (an upload of the large model on 2 busy cores included).
const CMD: Duration = Duration::from_secs(180);
/// Entries added or removed by another node show up in a mount within this (DESIGN/README: a
/// HEAD of registry.json every 2 s; "10 s or less").
const VISIBLE: Duration = Duration::from_secs(10);
const SHARD2: &str = "model-00002-of-00002.safetensors";

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

/// Two shards, bf16, about 2.5 MB; vocab × hidden spans two lossless chunks; kv_heads < heads.
fn spec() -> ModelSpec {
    ModelSpec {
        hidden: 128,
        intermediate: 344,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 3000,
        dtype: Dtype::BF16,
        shards: 2,
        seed: 7,
    }
}

/// The generated model plus a subdirectory (a repository's `1_Pooling/` and a nested file), so
/// uploads and in-place registration cover more than a flat directory.
fn write_model(dir: &Path, spec: &ModelSpec) {
    common::write_model(dir, spec);
    fs::create_dir_all(dir.join("1_Pooling/deeper")).unwrap();
    fs::write(dir.join("1_Pooling/config.json"), b"{\"word_embedding_dimension\": 128}\n").unwrap();
    fs::write(dir.join("1_Pooling/deeper/notes.txt"), b"nested file\n").unwrap();
}

/// A fine-tune of the model in `base` written into `out`.
fn finetune(base: &Path, out: &Path, seed: u64) {
    demo::write_finetune(base, out, 0.01, seed)
        .unwrap_or_else(|e| panic!("fine-tune into {}: {e}", out.display()));
}

/// `Weed::start`, saying how long the server took to come up.
fn start_weed(test: &str) -> Option<Weed> {
    let start = Instant::now();
    let weed = Weed::start(test)?;
    println!("SeaweedFS up in {:?}", start.elapsed());
    Some(weed)
}

/// One node's view of an S3 store: `llmfs --store s3://BUCKET/PREFIX` with the server's endpoint
/// and keys in the AWS environment and its own LLMFS_NODE_DIR (DIR/node). Two of these on one
/// prefix are two machines sharing a bucket.
fn s3_node(endpoint: &str, prefix: &str) -> TestStore {
    let mut ts = TestStore::new();
    ts.store = PathBuf::from(format!("s3://{BUCKET}/{prefix}"));
    let node = ts.path("node");
    let env: [(&str, &OsStr); 6] = [
        ("AWS_ENDPOINT_URL", OsStr::new(endpoint)),
        ("AWS_ALLOW_HTTP", OsStr::new("true")),
        ("AWS_ACCESS_KEY_ID", OsStr::new(KEY_ID)),
        ("AWS_SECRET_ACCESS_KEY", OsStr::new(SECRET)),
        ("AWS_REGION", OsStr::new("us-east-1")),
        ("LLMFS_NODE_DIR", node.as_os_str()),
    ];
    ts.env = env.iter().map(|(k, v)| (OsString::from(k), v.to_os_string())).collect();
    ts
}

fn set_env(ts: &mut TestStore, key: &str, value: &str) {
    ts.env.retain(|(k, _)| k != key);
    ts.env.push((key.into(), value.into()));
}

/// `llmfs mount TS/mnt --foreground --disk-cache CACHE`, owned by a guard.
fn mount(ts: &TestStore, cache: &Path) -> MountGuard {
    MountGuard::new(ts, &ts.path("mnt"), &["--disk-cache", cache.to_str().unwrap()])
}

fn os<P: AsRef<OsStr> + ?Sized>(p: &P) -> &OsStr {
    p.as_ref()
}

/// `llmfs export NAME DIR/export/NAME` on `ts`; returns the directory.
fn export(ts: &TestStore, name: &str) -> PathBuf {
    let out = ts.path("export").join(name);
    assert!(!out.exists(), "{} exported twice", out.display());
    ts.ok([os("export"), os(name), os(&out)]);
    out
}

fn ls(ts: &TestStore) -> BTreeMap<String, Value> {
    let v = ts.json(["ls", "--json"]);
    v.as_array()
        .expect("ls --json is a list")
        .iter()
        .map(|e| (e["name"].as_str().expect("an entry's name").to_owned(), e.clone()))
        .collect()
}

fn names(ts: &TestStore) -> BTreeSet<String> {
    ls(ts).into_keys().collect()
}

/// `info NAME --json` as `info` does, or the command's error line.
fn try_info(ts: &TestStore, name: &str) -> Result<Value, String> {
    let f = ts.run_full(["info", name, "--json"]);
    if !f.status.success() {
        return Err(f.stderr.trim_end().to_owned());
    }
    let mut v: Value = serde_json::from_str(&f.stdout).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(recipe) = v.get_mut("recipe").and_then(Value::as_object_mut) {
        recipe.remove("dir");
    }
    Ok(v)
}

fn json_line<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

fn show(r: &Result<Value, String>) -> String {
    match r {
        Ok(v) => json_line(v),
        Err(e) => format!("error: {e}"),
    }
}

/// Relative path → bytes of every regular file under `dir` (subdirectories too), skipping the
/// top-level names in `skip`. Under a deadline (for mounts).
fn read_tree(dir: &Path, skip: &[&str]) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, rel: &Path, skip: &[String], out: &mut BTreeMap<String, Vec<u8>>) {
        let dir = root.join(rel);
        let rd = fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
        for e in rd {
            let e = e.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
            let name = e.file_name().to_string_lossy().into_owned();
            if rel.as_os_str().is_empty() && skip.contains(&name) {
                continue;
            }
            let rel = rel.join(&name);
            let p = root.join(&rel);
            let meta = fs::metadata(&p).unwrap_or_else(|err| panic!("stat {}: {err}", p.display()));
            if meta.is_dir() {
                walk(root, &rel, skip, out);
            } else {
                let bytes = fs::read(&p).unwrap_or_else(|err| panic!("reading {}: {err}", p.display()));
                out.insert(rel.to_string_lossy().into_owned(), bytes);
            }
        }
    }
    let (d, skip) = (dir.to_owned(), skip.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    with_deadline(&format!("reading the tree {}", dir.display()), OP, move || {
        let mut out = BTreeMap::new();
        walk(&d, Path::new(""), &skip, &mut out);
        out
    })
}

/// `got` holds exactly `want`'s files, byte for byte.
#[track_caller]
fn assert_same_tree(got: &BTreeMap<String, Vec<u8>>, want: &BTreeMap<String, Vec<u8>>, what: &str) {
    let (g, w): (BTreeSet<_>, BTreeSet<_>) = (got.keys().collect(), want.keys().collect());
    assert_eq!(g, w, "{what}: file names differ");
    assert!(!want.is_empty(), "{what}: no files at all");
    for (name, bytes) in want {
        assert_same_bytes(&got[name], bytes, &format!("{what}: {name}"));
    }
}

/// Relative path → sha256 (by `sha256sum`) of every file under `dir`.
fn sha256_tree(dir: &Path) -> BTreeMap<String, String> {
    let files: Vec<String> = read_tree(dir, &[]).into_keys().collect();
    assert!(!files.is_empty(), "{}: no files", dir.display());
    let mut cmd = Command::new("sha256sum");
    cmd.current_dir(dir).arg("--").args(&files);
    let f = run_command(cmd, OP);
    assert!(f.status.success(), "sha256sum in {}: {}", dir.display(), f.stderr);
    f.stdout
        .lines()
        .map(|l| {
            let (hash, path) = l.split_once("  ").unwrap_or_else(|| panic!("sha256sum printed {l:?}"));
            (path.to_owned(), hash.to_owned())
        })
        .collect()
}

/// Every object of the store under `prefix` (a directory-like prefix, relative to the store).
fn objects(store: &Store, prefix: &str) -> Vec<ObjectMeta> {
    store.list(prefix).unwrap_or_else(|e| panic!("listing {prefix:?}: {e}"))
}

fn keys(store: &Store, prefix: &str) -> BTreeSet<String> {
    objects(store, prefix).into_iter().map(|m| m.key).collect()
}

/// Credentials are never written into the store, a node's directory or a log: neither the
/// secret key nor the key id in any object of the bucket (every prefix) or any file under
/// `paths` (directories or files).
#[track_caller]
fn assert_no_credentials(weed: &Weed, paths: &[&Path]) {
    let has = |bytes: &[u8], c: &str| bytes.windows(c.len()).any(|w| w == c.as_bytes());
    let root = weed.store("");
    for m in objects(&root, "") {
        let bytes = root.get(&m.key).unwrap_or_else(|e| panic!("get {}: {e}", m.key)).bytes;
        for c in [SECRET, KEY_ID] {
            assert!(!has(&bytes, c), "{c:?} in the object {}", m.key);
        }
    }
    for path in paths {
        let files = match fs::metadata(path) {
            Ok(m) if m.is_dir() => read_tree(path, &[]),
            Ok(_) => BTreeMap::from([(String::new(), fs::read(path).unwrap())]),
            Err(_) => continue,
        };
        for (rel, bytes) in files {
            for c in [SECRET, KEY_ID] {
                assert!(!has(&bytes, c), "{c:?} in {}/{rel}", path.display());
            }
        }
    }
}

/// The errno of a stat under a mount (None: it exists), under a deadline.
fn stat_errno(path: &Path) -> Option<i32> {
    let p = path.to_owned();
    with_deadline(&format!("stat {}", path.display()), OP, move || {
        fs::metadata(&p).err().map(|e| e.raw_os_error().unwrap_or(-1))
    })
}

/// The names in a directory (under a deadline), or the errno of listing it.
fn listing(dir: &Path) -> Result<BTreeSet<String>, i32> {
    let d = dir.to_owned();
    with_deadline(&format!("listing {}", dir.display()), OP, move || {
        fs::read_dir(&d)
            .map(|rd| {
                rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
            })
            .map_err(|e| e.raw_os_error().unwrap_or(-1))
    })
}

/// `cp -r SRC/. DEST/` under a timeout; must succeed.
#[track_caller]
fn cp_r(src: &Path, dest: &Path) {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "100", "cp", "-r"]).arg(src.join(".")).arg(format!("{}/", dest.display()));
    let f = run_command(cmd, OP);
    assert!(f.status.success(), "cp -r {} {}: {} {}", src.display(), dest.display(), f.status, f.stderr);
}

/// `cp -r` of a model directory into a fresh one (the same bytes under another path).
fn copy_dir(src: &Path, dest: &Path) {
    let mut cmd = Command::new("cp");
    cmd.arg("-r").arg(src).arg(dest);
    let f = run_command(cmd, OP);
    assert!(f.status.success(), "cp -r: {}", f.stderr);
}

#[track_caller]
fn assert_failed_with_one_line(f: &Finished, what: &str) {
    assert!(!f.status.success(), "{what} succeeded:\n{}", f.stdout);
    let lines: Vec<&str> = f.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: expected one line on stderr:\n{}", f.stderr);
}

/// The files of an entry: the relative paths of the objects under `models/NAME/UPLOAD-ID/`
/// (every key of the entry must have that form) with their sizes.
fn uploaded_files(store: &Store, name: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for m in objects(store, &format!("models/{name}")) {
        let rest = m.key.strip_prefix(&format!("models/{name}/")).expect("listed under the prefix");
        let (upload, file) =
            rest.split_once('/').unwrap_or_else(|| panic!("{}: not models/NAME/UPLOAD-ID/FILE", m.key));
        assert!(!upload.is_empty() && !file.is_empty(), "{}: not models/NAME/UPLOAD-ID/FILE", m.key);
        out.insert(file.to_owned(), m.size);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 1. Every command on an S3 store gives the local store's bytes
// ---------------------------------------------------------------------------------------------

#[test]
fn every_command_on_an_s3_store_gives_the_local_stores_bytes() {
    let Some(weed) = start_weed("every_command_on_an_s3_store_gives_the_local_stores_bytes") else { return };
    let prefix = "same-bytes";
    let local = TestStore::new();
    let s3 = s3_node(&weed.endpoint(), prefix);
    let bucket = weed.store(prefix);
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");

    let model = local.path("model");
    write_model(&model, &spec());
    let ft = local.path("ft");
    finetune(&model, &ft, 3);
    // The S3 store uploads a copy that is removed afterwards: its entry must not need it.
    let upload = s3.path("model");
    copy_dir(&model, &upload);
    let model_files = read_tree(&model, &[]);

    // add: the local store copies, the S3 store uploads; every file lands under
    // models/base/UPLOAD-ID/ with its size.
    local.ok([os("add"), os("base"), os(&model), os("--copy")]);
    s3.ok([os("add"), os("base"), os(&upload)]);
    let up = uploaded_files(&bucket, "base");
    let want: BTreeMap<String, u64> = model_files.iter().map(|(k, v)| (k.clone(), v.len() as u64)).collect();
    assert_eq!(up, want, "the objects add uploaded");
    fs::remove_dir_all(&upload).unwrap();

    let fc_base = data.join("fastchat_delta/base");
    let commands: Vec<Vec<OsString>> = [
        vec![os("cast"), os("f16"), os("--base"), os("base"), os("--dtype"), os("f16")],
        vec![os("quantize"), os("q8"), os("--base"), os("base"), os("--bits"), os("8")],
        vec![
            os("quantize"),
            os("q4"),
            os("--base"),
            os("base"),
            os("--bits"),
            os("4"),
            os("--group-size"),
            os("128"),
            os("--asymmetric"),
        ],
        vec![os("delta"), os("make"), os("lossless"), os("--base"), os("base"), os("--target"), os(&ft)],
        vec![
            os("delta"),
            os("make"),
            os("dq8"),
            os("--base"),
            os("base"),
            os("--target"),
            os(&ft),
            os("--codec"),
            os("q8"),
        ],
        vec![os("add"), os("fcbase"), os(&fc_base), os("--copy")],
        vec![
            os("delta"),
            os("import"),
            os("vicuna"),
            os("--base"),
            os("fcbase"),
            os("--from"),
            os(&data.join("fastchat_delta/delta")),
            os("--format"),
            os("fastchat"),
        ],
        vec![
            os("delta"),
            os("import"),
            os("lora"),
            os("--base"),
            os("fcbase"),
            os("--from"),
            os(&data.join("lora/adapter")),
            os("--format"),
            os("lora"),
        ],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(OsString::from).collect())
    .collect();
    for args in &commands {
        local.ok(args);
        s3.ok(args);
    }
    // Containers written by quantize and delta make are the entry's own objects.
    for name in ["q8", "q4", "lossless", "dq8", "fcbase"] {
        assert!(!uploaded_files(&bucket, name).is_empty(), "no objects under models/{name}/");
    }

    // ls, info, check, export: the same on both stores. Every difference is collected first, so
    // that one run names them all.
    let all = ["base", "f16", "q8", "q4", "lossless", "dq8", "fcbase", "vicuna", "lora"];
    let mut diffs: Vec<String> = Vec::new();
    let (l, s) = (ls(&local), ls(&s3));
    assert_eq!(
        l.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        all.iter().copied().collect(),
        "ls of the local store"
    );
    for name in all {
        if s.get(name) != l.get(name) {
            diffs.push(format!(
                "ls --json, {name}: S3 {} vs local {}",
                json_line(&s.get(name)),
                json_line(&l.get(name))
            ));
        }
        let (is, il) = (try_info(&s3, name), try_info(&local, name));
        if is != il {
            diffs.push(format!("info --json {name}: S3 {} vs local {}", show(&is), show(&il)));
        }
    }
    let (cl, cs) = (local.run_full(["check"]), s3.run_full(["check"]));
    if (cl.status.success(), &cl.stdout) != (cs.status.success(), &cs.stdout) {
        diffs.push(format!(
            "check: S3 ({}) {}{} vs local ({}) {}{}",
            cs.status, cs.stdout, cs.stderr, cl.status, cl.stdout, cl.stderr
        ));
    }

    // export: the same files, sha256 for sha256; the base is the model, the lossless delta the
    // fine-tune.
    for name in all {
        let el = export(&local, name);
        let es = s3.path("export").join(name);
        let f = s3.run_full([os("export"), os(name), os(&es)]);
        if !f.status.success() {
            diffs.push(format!("export {name} on S3 failed ({}): {}", f.status, f.stderr.trim_end()));
            continue;
        }
        let (hl, hs) = (sha256_tree(&el), sha256_tree(&es));
        if hs != hl {
            let differ: Vec<&String> = hl
                .keys()
                .chain(hs.keys())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .filter(|k| hl.get(*k) != hs.get(*k))
                .collect();
            diffs.push(format!("export {name}: sha256 differs (S3 vs local) for {differ:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} difference(s) between the S3 and the local store:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    assert_same_tree(&read_tree(&s3.path("export/base"), &[]), &model_files, "export of base from S3");
    assert_same_tree(
        &read_tree(&s3.path("export/lossless"), &[]),
        &read_tree(&ft, &[]),
        "export of lossless",
    );

    // rm: refused while dependents exist; else the entry's objects leave the bucket.
    for ts in [&local, &s3] {
        assert_failed_with_one_line(&ts.run_full(["rm", "base"]), "rm base with dependents");
    }
    for name in ["q4", "dq8", "lora", "f16"] {
        local.ok(["rm", name]);
        s3.ok(["rm", name]);
        assert!(
            keys(&bucket, &format!("models/{name}")).is_empty(),
            "models/{name}/ left after rm: {:?}",
            keys(&bucket, &format!("models/{name}"))
        );
        assert!(!local.store.join("models").join(name).exists(), "STORE/models/{name} left after rm");
    }
    let (l, s) = (ls(&local), ls(&s3));
    assert_eq!(s, l, "ls --json after rm: S3 vs local");
    assert_eq!(
        s.keys().map(String::as_str).collect::<Vec<_>>(),
        ["base", "fcbase", "lossless", "q8", "vicuna"]
    );
    // What is left in the bucket is what the entries left own (and the registry).
    for m in objects(&bucket, "") {
        let owned = ["base", "fcbase", "lossless", "q8", "vicuna"]
            .iter()
            .any(|n| m.key.starts_with(&format!("models/{n}/")));
        assert!(owned || m.key == "registry.json", "{} left in the bucket", m.key);
    }
    assert_no_credentials(&weed, &[&s3.path("node")]);
}

#[test]
fn add_of_a_model_already_in_the_bucket_registers_it_in_place() {
    let Some(weed) = start_weed("add_of_a_model_already_in_the_bucket_registers_it_in_place") else { return };
    let prefix = "in-place";
    let s3 = s3_node(&weed.endpoint(), prefix);
    let bucket = weed.store(prefix);
    let model = s3.path("model");
    write_model(&model, &spec());
    let model_files = read_tree(&model, &[]);
    // `add NAME s3://BUCKET/PATH`: a model uploaded by something else, registered where it is.
    let dir = "hf/model";
    for rel in model_files.keys() {
        bucket.put_file(&format!("{dir}/{rel}"), &model.join(rel), &mut |_| {}).unwrap();
    }
    let in_bucket = keys(&bucket, dir);
    s3.ok(["add", "inplace", &format!("s3://{BUCKET}/{prefix}/{dir}")]);
    assert!(keys(&bucket, "models/inplace").is_empty(), "an in-place add copied objects");
    let e = &ls(&s3)["inplace"];
    assert_eq!(e["kind"], "base", "{e:#}");
    s3.ok(["check", "inplace"]);
    s3.ok(["cast", "f16", "--base", "inplace", "--dtype", "f16"]);
    assert_same_tree(&read_tree(&export(&s3, "inplace"), &[]), &model_files, "export of the in-place entry");
    let m = mount(&s3, &s3.path("cache"));
    assert_same_tree(&read_tree(&m.path().join("inplace"), &["deltas"]), &model_files, "MOUNT/inplace");
    assert_same_tree(
        &read_tree(&m.path().join("f16"), &[]),
        &read_tree(&export(&s3, "f16"), &[]),
        "MOUNT/f16 (a cast of the in-place entry)",
    );
    drop(m);
    // rm leaves its objects: they are not the entry's to delete.
    s3.ok(["rm", "f16"]);
    s3.ok(["rm", "inplace"]);
    assert_eq!(keys(&bucket, dir), in_bucket, "rm of an in-place entry touched its objects");
    assert!(names(&s3).is_empty());
}

// ---------------------------------------------------------------------------------------------
// 2. A mount of an S3 store
// ---------------------------------------------------------------------------------------------

#[test]
fn a_mount_of_an_s3_store_reads_exports_bytes_and_stores_a_copied_finetune() {
    let Some(weed) = start_weed("a_mount_of_an_s3_store_reads_exports_bytes_and_stores_a_copied_finetune")
    else {
        return;
    };
    let s3 = s3_node(&weed.endpoint(), "mount");
    let bucket = weed.store("mount");
    let model = s3.path("model");
    write_model(&model, &spec());
    let (ft, ft2) = (s3.path("ft"), s3.path("ft2"));
    finetune(&model, &ft, 4);
    finetune(&model, &ft2, 5);
    s3.ok([os("add"), os("base"), os(&model)]);
    // Uploaded: what follows reads the bucket, not this directory.
    fs::remove_dir_all(&model).unwrap();
    s3.ok(["cast", "f32", "--base", "base", "--dtype", "f32"]);
    s3.ok(["quantize", "q4", "--base", "base", "--bits", "4"]);
    s3.ok([os("delta"), os("make"), os("d"), os("--base"), os("base"), os("--target"), os(&ft)]);
    let entries = ["base", "f32", "q4", "d"];
    let exported: BTreeMap<&str, BTreeMap<String, Vec<u8>>> =
        entries.iter().map(|n| (*n, read_tree(&export(&s3, n), &[]))).collect();

    let cache = s3.path("disk-cache");
    let m = mount(&s3, &cache);
    for name in entries {
        // The base's writable deltas/ folder is no file of the entry.
        let got = read_tree(&m.path().join(name), &["deltas"]);
        assert_same_tree(&got, &exported[name], &format!("MOUNT/{name} vs llmfs export"));
    }
    // Read again (now from the disk cache / page cache): still the same bytes.
    assert_same_tree(&read_tree(&m.path().join("f32"), &[]), &exported["f32"], "MOUNT/f32 read twice");

    // cp -r of a fine-tune into deltas/NEW: a new entry that reads back as the source.
    let new = m.path().join("base/deltas/new");
    fs::create_dir(&new).unwrap();
    cp_r(&ft2, &new);
    let want = read_tree(&ft2, &[]);
    assert_same_tree(&read_tree(&m.path().join("new"), &[]), &want, "MOUNT/new after cp -r into deltas/new");
    assert_same_tree(&read_tree(&new, &[]), &want, "MOUNT/base/deltas/new");
    let l = ls(&s3);
    assert_eq!(
        (l["new"]["kind"].as_str(), l["new"]["base"].as_str()),
        (Some("delta"), Some("base")),
        "{l:#?}"
    );
    assert!(!uploaded_files(&bucket, "new").is_empty(), "no objects under models/new/");
    assert_same_tree(&read_tree(&export(&s3, "new"), &[]), &want, "export of new");
    let f = s3.run_full(["check"]);
    assert!(f.status.success(), "check after the write: {}{}", f.stdout, f.stderr);
    // The daemon's log is beside the mount point.
    assert_no_credentials(&weed, &[&s3.path("node"), &m.log]);
}

// ---------------------------------------------------------------------------------------------
// 3. Two nodes of one bucket
// ---------------------------------------------------------------------------------------------

#[test]
fn two_nodes_of_one_bucket_see_each_others_entries_come_and_go() {
    let Some(weed) = start_weed("two_nodes_of_one_bucket_see_each_others_entries_come_and_go") else {
        return;
    };
    let prefix = "two-nodes";
    let (a, b, c) = (
        s3_node(&weed.endpoint(), prefix),
        s3_node(&weed.endpoint(), prefix),
        s3_node(&weed.endpoint(), prefix),
    );
    let model = a.path("model");
    write_model(&model, &spec());
    let ft = a.path("ft");
    finetune(&model, &ft, 6);
    a.ok([os("add"), os("base"), os(&model)]);
    // Uploaded: what follows reads the bucket, not this directory.
    let base_files = read_tree(&model, &[]);
    fs::remove_dir_all(&model).unwrap();

    let ma = mount(&a, &a.path("cache"));
    let mb = mount(&b, &b.path("cache"));
    assert_same_tree(&read_tree(&mb.path().join("base"), &["deltas"]), &base_files, "node B: MOUNT/base");
    assert_eq!(stat_errno(&mb.path().join("new")), Some(libc::ENOENT));

    // Node A writes a fine-tune into deltas/new; node B sees it without a remount.
    let new_a = ma.path().join("base/deltas/new");
    fs::create_dir(&new_a).unwrap();
    cp_r(&ft, &new_a);
    let written = Instant::now();
    let want = read_tree(&ft, &[]);
    // The top-level names: files and the first component of those in subdirectories.
    let want_names: BTreeSet<String> = want.keys().map(|k| k.split('/').next().unwrap().to_owned()).collect();
    // (Every entry has a writable deltas/ folder of its own.)
    let seen = wait_until(VISIBLE, || {
        listing(&mb.path().join("new")).is_ok_and(|mut names| names.remove("deltas") && names == want_names)
    });
    let took = written.elapsed();
    println!("node B saw node A's new entry after {took:?}");
    assert!(
        seen,
        "node B: MOUNT/new not there (with all its files) {VISIBLE:?} after node A wrote it: MOUNT/ {:?}, MOUNT/new/ {:?}",
        listing(mb.path()),
        listing(&mb.path().join("new"))
    );
    assert_same_tree(&read_tree(&mb.path().join("new"), &[]), &want, "node B: MOUNT/new");
    assert_same_tree(&read_tree(&ma.path().join("new"), &[]), &want, "node A: MOUNT/new");

    // A third node adds a cast of it: both mounts show it without a remount.
    c.ok(["cast", "new16", "--base", "new", "--dtype", "f16"]);
    let added = Instant::now();
    let both = wait_until(VISIBLE, || {
        stat_errno(&ma.path().join("new16/config.json")).is_none()
            && stat_errno(&mb.path().join("new16/config.json")).is_none()
    });
    println!("both mounts showed a third node's new16 after {:?}", added.elapsed());
    assert!(both, "MOUNT/new16 not on both nodes {VISIBLE:?} after llmfs cast on a third node");
    let want16 = read_tree(&export(&c, "new16"), &[]);
    assert_same_tree(&read_tree(&mb.path().join("new16"), &[]), &want16, "node B: MOUNT/new16");
    assert_same_tree(&read_tree(&ma.path().join("new16"), &[]), &want16, "node A: MOUNT/new16");
    c.ok(["rm", "new16"]);

    // A third node removes the written entry: gone from both mounts.
    c.ok(["rm", "new"]);
    let removed = Instant::now();
    let gone = wait_until(VISIBLE, || {
        stat_errno(&ma.path().join("new")) == Some(libc::ENOENT)
            && stat_errno(&mb.path().join("new")) == Some(libc::ENOENT)
    });
    println!("both mounts lost the entry {:?} after llmfs rm on a third node", removed.elapsed());
    assert!(
        gone,
        "MOUNT/new still there {VISIBLE:?} after llmfs rm on another node: A {:?}, B {:?}",
        stat_errno(&ma.path().join("new")),
        stat_errno(&mb.path().join("new"))
    );
    // The folder it was written into goes too, with the directories node A made in it (its
    // staging of an entry that is gone).
    let emptied = wait_until(VISIBLE, || stat_errno(&new_a) == Some(libc::ENOENT));
    assert!(
        emptied,
        "node A: MOUNT/base/deltas/new still there {VISIBLE:?} after llmfs rm on another node: {:?}",
        listing(&new_a)
    );
    println!(
        "node A's MOUNT/base/deltas/ after the rm: {:?}, deltas/new/: {:?}",
        listing(&ma.path().join("base/deltas")),
        listing(&new_a)
    );
    assert!(keys(&weed.store(prefix), "models/new").is_empty(), "models/new/ left after rm");
    drop((ma, mb));
}

// ---------------------------------------------------------------------------------------------
// 4. Many processes changing the registry at once
// ---------------------------------------------------------------------------------------------

#[test]
fn parallel_registry_changes_from_10_processes_and_a_mount_lose_nothing() {
    let Some(weed) = start_weed("parallel_registry_changes_from_10_processes_and_a_mount_lose_nothing")
    else {
        return;
    };
    let prefix = "parallel";
    let s3 = s3_node(&weed.endpoint(), prefix);
    let bucket = weed.store(prefix);
    let model = s3.path("model");
    write_model(&model, &spec());
    let ft = s3.path("ft");
    finetune(&model, &ft, 8);
    s3.ok([os("add"), os("base"), os(&model)]);
    // Uploaded: what follows reads the bucket, not this directory.
    fs::remove_dir_all(&model).unwrap();
    s3.ok(["cast", "r1", "--base", "base", "--dtype", "f16"]);
    s3.ok(["quantize", "r2", "--base", "base", "--bits", "8"]);
    s3.ok(["cast", "r3", "--base", "base", "--dtype", "f32"]);
    assert!(!keys(&bucket, "models/r2").is_empty());

    // Each process is its own node (its own LLMFS_NODE_DIR), as on separate machines.
    let jobs: Vec<Vec<String>> = [
        "cast c1 --base base --dtype f16",
        "cast c2 --base base --dtype f32",
        "cast c3 --base base --dtype f16",
        "cast c4 --base base --dtype bf16",
        "quantize c5 --base base --bits 8",
        "quantize c6 --base base --bits 4",
        "rm r1",
        "rm r2",
        "rm r3",
    ]
    .iter()
    .map(|j| j.split(' ').map(String::from).collect())
    .chain([["delta", "make", "c7", "--base", "base", "--target"]
        .iter()
        .map(|s| s.to_string())
        .chain([ft.to_str().unwrap().to_owned()])
        .collect()])
    .collect();
    // And a mount on yet another node, whose deltas/ is written into at the same time.
    let writer = s3_node(&weed.endpoint(), prefix);
    let m = mount(&writer, &writer.path("cache"));
    let w = m.path().join("base/deltas/w");
    let nodes: Vec<TestStore> = jobs.iter().map(|_| s3_node(&weed.endpoint(), prefix)).collect();
    let start = Instant::now();
    let results: Vec<(String, Finished)> = std::thread::scope(|scope| {
        let copy = scope.spawn(|| {
            fs::create_dir(&w).unwrap();
            cp_r(&ft, &w);
        });
        let handles: Vec<_> = jobs
            .iter()
            .zip(&nodes)
            .map(|(job, node)| {
                let cmd = node.command(job);
                scope.spawn(move || (job.join(" "), run_command(cmd, CMD)))
            })
            .collect();
        let done = handles.into_iter().map(|h| h.join().expect("a runner thread")).collect();
        if let Err(panic) = copy.join() {
            std::panic::resume_unwind(panic);
        }
        done
    });
    println!("{} commands and a cp -r into deltas/, in parallel: {:?}", jobs.len(), start.elapsed());
    for (job, f) in &results {
        assert!(f.status.success(), "llmfs {job} failed ({}):\n{}{}", f.status, f.stdout, f.stderr);
    }

    let want: BTreeSet<String> =
        ["base", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "w"].iter().map(|s| s.to_string()).collect();
    assert_eq!(names(&s3), want, "entries after the parallel changes");
    let registry = bucket.get("registry.json").expect("registry.json");
    let parsed: Result<Value, _> = serde_json::from_slice(&registry.bytes);
    assert!(parsed.is_ok(), "registry.json is not valid JSON: {:?}", parsed.err());
    let text = String::from_utf8_lossy(&registry.bytes);
    for gone in ["r1", "r2", "r3"] {
        assert!(!text.contains(&format!("\"{gone}\"")), "registry.json still names {gone}");
    }
    assert!(keys(&bucket, "models/r2").is_empty(), "models/r2/ left after rm");
    for q in ["c5", "c6"] {
        assert!(!keys(&bucket, &format!("models/{q}")).is_empty(), "no objects for {q}");
    }
    let f = s3.run_full(["check"]);
    assert!(f.status.success(), "check: {}{}", f.stdout, f.stderr);
    for n in ["c1", "c4", "c6"] {
        export(&s3, n);
    }
    let ft_files = read_tree(&ft, &[]);
    assert_same_tree(&read_tree(&export(&s3, "c7"), &[]), &ft_files, "export of c7");
    assert_same_tree(&read_tree(&export(&s3, "w"), &[]), &ft_files, "export of w");
    assert_same_tree(&read_tree(&m.path().join("w"), &[]), &ft_files, "MOUNT/w");
    let gc = s3.run_full(["gc", "--dry-run", "--min-age", "0"]);
    println!("gc --dry-run after the parallel changes:\n{}{}", gc.stdout, gc.stderr);
}

// ---------------------------------------------------------------------------------------------
// 5. The server killed while a mount reads
// ---------------------------------------------------------------------------------------------

/// LLMFS_S3_CONNECT_SECS + LLMFS_S3_RETRY_SECS + LLMFS_S3_REQUEST_SECS + 5 s: the documented
/// bound for a read through a mount against a dead server, with this test's settings.
const DEAD_BOUND: Duration = Duration::from_secs(2 + 3 + 5 + 5);
/// Room for 2 busy cores on top of the bound.
const DEAD_SLACK: Duration = Duration::from_secs(5);

/// Reads `path` through the mount, 256 KiB at a time, under a deadline: the bytes read and the
/// errno it ended with (None: EOF).
fn read_chunks(path: &Path) -> (Vec<u8>, Option<i32>) {
    let p = path.to_owned();
    with_deadline(&format!("reading {}", path.display()), Duration::from_secs(90), move || {
        let mut f = match fs::File::open(&p) {
            Ok(f) => f,
            Err(e) => return (Vec::new(), Some(e.raw_os_error().unwrap_or(-1))),
        };
        let mut got = Vec::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match f.read(&mut buf) {
                Ok(0) => return (got, None),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Some(e.raw_os_error().unwrap_or(-1))),
            }
        }
    })
}

/// Two shards of about 58 MB (bf16): fetching them takes long enough (localhost serves a few
/// hundred MB/s) that a kill 100 ms after a reader starts lands while they come in.
fn killed_spec() -> ModelSpec {
    ModelSpec {
        hidden: 1024,
        intermediate: 2752,
        layers: 2,
        heads: 8,
        kv_heads: 8,
        vocab: 16000,
        dtype: Dtype::BF16,
        shards: 2,
        seed: 29,
    }
}

/// Reads `entry/file` through the mount at `mp` in chunks; asserts every byte it got is right
/// and it ended (EOF or errno) within the dead server's bound; returns the errno.
/// (bytes read, the errno that ended the read).
fn read_with_the_server_down(
    mp: &Path,
    entry: &str,
    file: &str,
    want: &[u8],
    what: &str,
) -> (usize, Option<i32>) {
    let start = Instant::now();
    let (got, errno) = read_chunks(&mp.join(entry).join(file));
    let took = start.elapsed();
    println!("{what}: MOUNT/{entry}/{file} with the server down: {} bytes, {errno:?}, {took:?}", got.len());
    assert_same_bytes(&got, &want[..got.len().min(want.len())], &format!("{what}: MOUNT/{entry}/{file}"));
    assert!(
        took <= DEAD_BOUND + DEAD_SLACK,
        "{what}: MOUNT/{entry}/{file} ended after {took:?} (bound {DEAD_BOUND:?})"
    );
    (got.len(), errno)
}

#[test]
fn the_server_killed_mid_read_gives_eio_in_bounded_time_and_reads_work_after_restart() {
    let Some(mut weed) =
        start_weed("the_server_killed_mid_read_gives_eio_in_bounded_time_and_reads_work_after_restart")
    else {
        return;
    };
    // Two nodes: one mounts with a disk cache (whole files decoded into it), one without (every
    // byte decoded on the read path from ranged GETs).
    let prefix = "killed";
    let (mut s3, mut s3b) = (s3_node(&weed.endpoint(), prefix), s3_node(&weed.endpoint(), prefix));
    for ts in [&mut s3, &mut s3b] {
        for (k, v) in
            [("LLMFS_S3_CONNECT_SECS", "2"), ("LLMFS_S3_REQUEST_SECS", "5"), ("LLMFS_S3_RETRY_SECS", "3")]
        {
            set_env(ts, k, v);
        }
    }
    let model = s3.path("model");
    write_model(&model, &killed_spec());
    s3.ok([os("add"), os("base"), os(&model)]);
    // Uploaded: what follows reads the bucket, not this directory.
    fs::remove_dir_all(&model).unwrap();
    // The same tensors in one file: a lossless delta whose model.safetensors needs both of the
    // base's shards, fetched one after the other as a reader goes.
    let one = s3.path("one-file");
    common::write_model(&one, &ModelSpec { shards: 1, ..killed_spec() });
    s3.ok([os("delta"), os("make"), os("one"), os("--base"), os("base"), os("--target"), os(&one)]);
    let want: BTreeMap<&str, BTreeMap<String, Vec<u8>>> =
        ["base", "one"].iter().map(|n| (*n, read_tree(&export(&s3, n), &[]))).collect();
    assert_same_tree(&want["one"], &read_tree(&one, &[]), "export of one");

    let m = mount(&s3, &s3.path("cache"));
    let m0 = MountGuard::new(&s3b, &s3b.path("mnt"), &["--disk-cache", "0"]);
    // Both work. On the node without a disk cache only a listing: opening a file of the base
    // would prefetch the base's other objects, and the read below must find them not fetched.
    let p = m.path().join("base/config.json");
    let got = with_deadline("reading config.json", OP, move || fs::read(p)).unwrap();
    assert_same_bytes(&got, &want["base"]["config.json"], "MOUNT/base/config.json");
    let listed = listing(&m0.path().join("base"));
    assert!(
        listed.as_ref().is_ok_and(|l| l.contains("config.json")),
        "MOUNT/base on the node without a disk cache: {listed:?}"
    );

    // Killed while a reader is in the middle of a variant file (no disk cache): opening it
    // fetches the objects it reads from (both of the base's shards and the delta's container,
    // over 100 MB), and the kill lands while they come in. What the reader got is right, and it
    // ends with EIO within the bound, never hung.
    let reader = {
        let p = m0.path().join("one/model.safetensors");
        std::thread::spawn(move || (read_chunks(&p), Instant::now()))
    };
    std::thread::sleep(Duration::from_millis(100));
    weed.kill();
    let killed = Instant::now();
    let ((got, errno), ended) = reader.join().expect("the reader thread");
    let took = ended.saturating_duration_since(killed);
    let shard = &want["one"]["model.safetensors"];
    println!("mid-read: {} of {} bytes, then {errno:?}, {took:?} after the kill", got.len(), shard.len());
    assert_same_bytes(&got, &shard[..got.len().min(shard.len())], "the bytes read before and after the kill");
    assert_eq!(
        errno,
        Some(libc::EIO),
        "a read interrupted by the kill: {} of {} bytes",
        got.len(),
        shard.len()
    );
    assert!(
        took <= DEAD_BOUND + DEAD_SLACK,
        "the reader ended {took:?} after the kill (bound {DEAD_BOUND:?})"
    );

    // Files no read on this node has touched need the server: EIO within the bound. On the
    // node with the disk cache, an entry's first open prefetches the objects of its other files
    // (the base's second shard, since config.json was read): those are served whole and right.
    // The two mounts in parallel (each read waits out the bound; one mount's reads one after the
    // other, so that they do not queue for its threads).
    let files = [("base", SHARD2), ("one", "model.safetensors")];
    std::thread::scope(|scope| {
        let (want, mp, mp0) = (&want, m.path(), m0.path());
        let other = scope.spawn(move || {
            read_with_the_server_down(mp0, "base", SHARD2, &want["base"][SHARD2], "no disk cache");
        });
        for (entry, file) in files {
            let (got, errno) = read_with_the_server_down(mp, entry, file, &want[entry][file], "disk cache");
            let prefetched = errno.is_none() && got == want[entry][file].len();
            assert!(
                errno == Some(libc::EIO) || prefetched,
                "disk cache: MOUNT/{entry}/{file} with the server down: {errno:?} after {got} bytes"
            );
        }
        if let Err(panic) = other.join() {
            std::panic::resume_unwind(panic);
        }
    });

    // Back up: the same reads through the same mounts give the right bytes.
    weed.restart();
    for (mp, what) in [(m.path(), "disk cache"), (m0.path(), "no disk cache")] {
        for (entry, file) in files {
            let start = Instant::now();
            let (got, errno) = read_chunks(&mp.join(entry).join(file));
            println!("{what}: MOUNT/{entry}/{file} after the restart: {errno:?} after {:?}", start.elapsed());
            assert_eq!(errno, None, "{what}: MOUNT/{entry}/{file} after the server's restart");
            assert_same_bytes(
                &got,
                &want[entry][file],
                &format!("{what}: MOUNT/{entry}/{file} after the restart"),
            );
        }
    }
    assert_same_tree(
        &read_tree(&m.path().join("base"), &["deltas"]),
        &want["base"],
        "MOUNT/base after the restart",
    );
}

/// A cold load decodes while its objects arrive (`store::Incoming`): the decoders read each
/// range of the fetch's file in the disk cache as soon as it is there. A cast read cold gives
/// its bytes; a server killed while a delta's objects are still coming in gives EIO in bounded
/// time (never a hang, never wrong bytes), leaves no partial object in the disk cache as if it
/// were whole, and the same read after the server's restart fetches again and gives the bytes.
#[test]
fn a_cold_read_decodes_as_objects_arrive_and_a_kill_mid_fetch_is_eio_then_a_clean_refetch() {
    let Some(mut weed) =
        start_weed("a_cold_read_decodes_as_objects_arrive_and_a_kill_mid_fetch_is_eio_then_a_clean_refetch")
    else {
        return;
    };
    let mut s3 = s3_node(&weed.endpoint(), "cold-fetch");
    for (k, v) in
        [("LLMFS_S3_CONNECT_SECS", "2"), ("LLMFS_S3_REQUEST_SECS", "5"), ("LLMFS_S3_RETRY_SECS", "3")]
    {
        set_env(&mut s3, k, v);
    }
    let model = s3.path("model");
    write_model(&model, &killed_spec());
    s3.ok([os("add"), os("base"), os(&model)]);
    fs::remove_dir_all(&model).unwrap();
    s3.ok(["cast", "half", "--base", "base", "--dtype", "f16"]);
    // The same tensors in one file: its lossless delta reads both of the base's shards.
    let one = s3.path("one-file");
    common::write_model(&one, &ModelSpec { shards: 1, ..killed_spec() });
    s3.ok([os("delta"), os("make"), os("one"), os("--base"), os("base"), os("--target"), os(&one)]);
    let want: BTreeMap<&str, BTreeMap<String, Vec<u8>>> =
        ["half", "one"].iter().map(|n| (*n, read_tree(&export(&s3, n), &[]))).collect();

    // Cold: a fresh disk cache; the cast's shards decode from the base's objects as they come.
    {
        let m = mount(&s3, &s3.path("cache-cast"));
        for file in ["model-00001-of-00002.safetensors", SHARD2] {
            let (got, errno) = read_chunks(&m.path().join("half").join(file));
            assert_eq!(errno, None, "a cold read of MOUNT/half/{file}");
            assert_same_bytes(&got, &want["half"][file], &format!("a cold read of MOUNT/half/{file}"));
        }
    }

    // Killed as soon as the first object's fill file appears in the disk cache (the delta's
    // open fetches its container and both of the base's shards, over 100 MB, in parallel).
    let cache = s3.path("cache-delta");
    let m = mount(&s3, &cache);
    let reader = {
        let p = m.path().join("one/model.safetensors");
        std::thread::spawn(move || (read_chunks(&p), Instant::now()))
    };
    let fetching = wait_until(Duration::from_secs(30), || {
        fs::read_dir(cache.join("tmp")).is_ok_and(|mut d| d.next().is_some())
    });
    assert!(fetching, "no fill started in {}", cache.display());
    weed.kill();
    let killed = Instant::now();
    let ((got, errno), ended) = reader.join().expect("the reader thread");
    let took = ended.saturating_duration_since(killed);
    let file = &want["one"]["model.safetensors"];
    println!("mid-fetch: {} of {} bytes, then {errno:?}, {took:?} after the kill", got.len(), file.len());
    assert_same_bytes(&got, &file[..got.len().min(file.len())], "the bytes read before the kill");
    assert_eq!(
        errno,
        Some(libc::EIO),
        "a read whose objects were cut off: {} of {} bytes",
        got.len(),
        file.len()
    );
    assert!(
        took <= DEAD_BOUND + DEAD_SLACK,
        "the reader ended {took:?} after the kill (bound {DEAD_BOUND:?})"
    );

    // Back up: the same read through the same mount fetches again and gives every byte (a
    // partial copy kept as whole would give zeros where the fetch stopped).
    weed.restart();
    let (got, errno) = read_chunks(&m.path().join("one/model.safetensors"));
    assert_eq!(errno, None, "MOUNT/one/model.safetensors after the server's restart");
    assert_same_bytes(&got, file, "MOUNT/one/model.safetensors after the restart");
}

// ---------------------------------------------------------------------------------------------
// 6. kill -9 mid-upload, then gc
// ---------------------------------------------------------------------------------------------

/// About 130 MB in 6 shards: an upload that lasts long enough to be killed midway.
fn large_spec() -> ModelSpec {
    ModelSpec {
        hidden: 1024,
        intermediate: 2752,
        layers: 4,
        heads: 8,
        kv_heads: 8,
        vocab: 8000,
        dtype: Dtype::BF16,
        shards: 6,
        seed: 17,
    }
}

/// gc's lines for `keys`: each key on one line starting with `verb`, then the summary line.
#[track_caller]
fn assert_gc_lines(f: &Finished, verb: &str, keys: &BTreeSet<String>, what: &str) {
    assert!(f.status.success(), "{what} failed ({}):\n{}{}", f.status, f.stdout, f.stderr);
    let lines: Vec<&str> = f.stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    let (summary, items) = lines.split_last().unwrap_or_else(|| panic!("{what}: printed nothing"));
    assert_eq!(items.len(), keys.len(), "{what}: one line per object:\n{}", f.stdout);
    for key in keys {
        assert!(
            items.iter().any(|l| l.starts_with(verb) && l.contains(key.as_str())),
            "{what}: no `{verb} {key} (SIZE)` line:\n{}",
            f.stdout
        );
    }
    assert!(summary.starts_with(&format!("{} object", keys.len())), "{what}: summary line {summary:?}");
}

#[test]
fn kill_9_mid_upload_leaves_no_entry_and_gc_removes_the_leftovers() {
    let Some(weed) = start_weed("kill_9_mid_upload_leaves_no_entry_and_gc_removes_the_leftovers") else {
        return;
    };
    let prefix = "killed-upload";
    let s3 = s3_node(&weed.endpoint(), prefix);
    let bucket = weed.store(prefix);
    let small = s3.path("small");
    write_model(&small, &spec());
    s3.ok([os("add"), os("keep"), os(&small)]);
    let kept = keys(&bucket, "models/keep");
    assert!(!kept.is_empty());
    let large = s3.path("large");
    write_model(&large, &large_spec());

    // kill -9 as soon as the first of its objects shows up in the bucket.
    let mut cmd = s3.command([os("add"), os("big"), os(&large)]);
    let log = s3.path("add.log");
    cmd.stdout(Stdio::null()).stderr(fs::File::create(&log).unwrap());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawning llmfs add");
    let mut first = BTreeSet::new();
    while first.is_empty() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "llmfs add exited ({status}) before any of its objects was seen in the bucket: make the model larger\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if started.elapsed() > CMD {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no object of llmfs add in the bucket after {CMD:?}");
        }
        first = keys(&bucket, "models/big");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The server is frozen for the kill (SIGSTOP: it answers nothing), so that the kill lands
    // mid-upload however fast localhost uploads are (a few hundred MB/s here); thawed, it sees
    // the dead client's connections reset. A part it had whole before the freeze may still
    // complete: the listing below waits for that.
    weed.freeze(true);
    child.kill().unwrap();
    let status = child.wait().unwrap();
    weed.freeze(false);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "llmfs add finished before the kill ({status}): make the model larger"
    );
    println!(
        "killed llmfs add {:?} after its start, with {} object(s) uploaded",
        started.elapsed(),
        first.len()
    );

    assert!(!names(&s3).contains("big"), "a killed add left an entry");
    let leftovers = keys(&bucket, "models/big");
    assert!(!leftovers.is_empty());
    let large_files = read_tree(&large, &[]).len();
    assert!(leftovers.len() < large_files, "every file was uploaded before the kill: {leftovers:?}");

    // The default --min-age (an hour) spares an upload that may still be going on elsewhere.
    let f = s3.run_full(["gc", "--dry-run"]);
    assert_gc_lines(&f, "would remove", &BTreeSet::new(), "gc --dry-run (default --min-age)");
    // --dry-run --min-age 0 lists them and removes nothing.
    let f = s3.run_full(["gc", "--dry-run", "--min-age", "0"]);
    assert_gc_lines(&f, "would remove", &leftovers, "gc --dry-run --min-age 0");
    assert!(!f.stdout.contains("models/keep"), "gc would remove an entry's objects:\n{}", f.stdout);
    assert_eq!(keys(&bucket, "models/big"), leftovers, "gc --dry-run removed objects");
    // gc --min-age 0 removes them, and only them.
    let f = s3.run_full(["gc", "--min-age", "0"]);
    assert_gc_lines(&f, "removed", &leftovers, "gc --min-age 0");
    assert!(keys(&bucket, "models/big").is_empty(), "left after gc: {:?}", keys(&bucket, "models/big"));
    assert_eq!(keys(&bucket, "models/keep"), kept, "gc touched an entry's objects");
    let rest: BTreeSet<String> = keys(&bucket, "");
    let mut want = kept.clone();
    want.insert("registry.json".into());
    assert_eq!(rest, want, "the bucket after gc: the registry and what entries own");
    let f = s3.run_full(["gc", "--dry-run", "--min-age", "0"]);
    assert_gc_lines(&f, "would remove", &BTreeSet::new(), "gc --dry-run --min-age 0 after gc");

    // The name is free: a later add of it works, and serves the model.
    let f = s3.run_timeout([os("add"), os("big"), os(&large)], CMD);
    assert!(f.status.success(), "add big after gc: {}{}", f.stdout, f.stderr);
    println!("add of the large model ({large_files} files): {:?}", f.elapsed);
    s3.ok(["check", "big"]);
    assert_eq!(sha256_tree(&export(&s3, "big")), sha256_tree(&large), "export of big");
    assert_eq!(ls(&s3)["keep"]["kind"], "base");
}

// ---------------------------------------------------------------------------------------------
// 7. A server that ignores conditional writes
// ---------------------------------------------------------------------------------------------

#[test]
fn a_server_that_ignores_conditional_writes_is_refused_with_one_line() {
    let stub = Stub::start(Mode::IgnoresConditions, &[]);
    let ts = s3_node(&stub.endpoint(), "refused");
    let model = ts.path("model");
    write_model(&model, &spec());
    let f = ts.run_full([os("add"), os("m"), os(&model)]);
    assert_one_line_error(&f, &["does not honour conditional writes"]);
    assert!(!f.stderr.contains(SECRET), "the secret in an error line");
    // Nothing registered: reads still work and show no entry; no registry.json names it.
    assert!(names(&ts).is_empty(), "an entry on a refused store");
    let store =
        Store::s3(s3_common::s3_config(&stub.endpoint(), "refused", s3_common::test_limits())).unwrap();
    if let Ok(reg) = store.get("registry.json") {
        assert!(
            !String::from_utf8_lossy(&reg.bytes).contains("\"m\""),
            "registry.json names the refused entry"
        );
    }
    assert!(store.head("models/m").is_err());
}

// ---------------------------------------------------------------------------------------------
// gc on a local store
// ---------------------------------------------------------------------------------------------

#[test]
fn gc_on_a_local_store_removes_directories_no_entry_owns() {
    let ts = TestStore::new();
    let model = ts.model("model");
    ts.ok([os("add"), os("base"), os(&model)]);
    ts.ok(["quantize", "q", "--base", "base", "--bits", "8"]);
    ts.ok([os("add"), os("copied"), os(&model), os("--copy")]);
    let models = ts.store.join("models");
    let owned: BTreeMap<String, Vec<u8>> = ["q", "copied"]
        .iter()
        .flat_map(|n| read_tree(&models.join(n), &[]).into_iter().map(move |(k, v)| (format!("{n}/{k}"), v)))
        .collect();
    assert!(!owned.is_empty());
    // What a crash leaves: a directory under models/ that no entry owns.
    let orphan = models.join("orphan");
    fs::create_dir_all(orphan.join("sub")).unwrap();
    fs::write(orphan.join("model.safetensors"), vec![7u8; 4096]).unwrap();
    fs::write(orphan.join("sub/x.json"), b"{}").unwrap();

    let gc = |args: &[&str]| {
        let f = ts.run_full([&["gc"], args].concat());
        assert!(f.status.success(), "gc {args:?}: {}{}", f.stdout, f.stderr);
        f.stdout
    };
    let owned_now = || -> BTreeMap<String, Vec<u8>> {
        ["q", "copied"]
            .iter()
            .flat_map(|n| {
                read_tree(&models.join(n), &[]).into_iter().map(move |(k, v)| (format!("{n}/{k}"), v))
            })
            .collect()
    };
    // Fresh: younger than the default --min-age, so not garbage yet.
    let out = gc(&["--dry-run"]);
    assert!(!out.contains("orphan"), "gc --dry-run listed a fresh directory:\n{out}");
    let out = gc(&["--dry-run", "--min-age", "0"]);
    let listed: Vec<&str> = out.lines().filter(|l| l.starts_with("would remove")).collect();
    assert!(
        !listed.is_empty() && listed.iter().all(|l| l.contains("orphan")),
        "gc --dry-run --min-age 0:\n{out}"
    );
    assert!(!out.contains("models/q") && !out.contains("copied"), "gc would remove an entry's files:\n{out}");
    assert!(out.lines().last().is_some_and(|l| l.contains("object")), "no summary line:\n{out}");
    assert!(orphan.join("sub/x.json").exists(), "gc --dry-run removed something");
    let out = gc(&["--min-age", "0"]);
    assert!(out.lines().any(|l| l.starts_with("removed") && l.contains("orphan")), "gc --min-age 0:\n{out}");
    assert!(!orphan.exists(), "models/orphan left after gc");
    assert_eq!(owned_now(), owned, "gc changed an entry's files");
    ts.ok(["check"]);
    let out = gc(&["--dry-run", "--min-age", "0"]);
    assert!(!out.lines().any(|l| l.starts_with("would remove")), "garbage after gc:\n{out}");
}

// ---------------------------------------------------------------------------------------------
// A stalled server stalls only what needs it (issue 21)
// ---------------------------------------------------------------------------------------------

/// The fastest of three tries of `op` through the mount, each under a deadline: a request that
/// waits on the frozen server takes the whole stall every time, a scheduling hiccup only once.
fn fastest_of_3<T: Send + 'static>(
    what: &str,
    op: impl Fn() -> T + Send + Sync + Clone + 'static,
) -> (Duration, T) {
    let mut best: Option<(Duration, T)> = None;
    for _ in 0..3 {
        let op = op.clone();
        let (took, got) = with_deadline(what, OP, move || {
            let start = Instant::now();
            let got = op();
            (start.elapsed(), got)
        });
        if best.as_ref().is_none_or(|(b, _)| took < *b) {
            best = Some((took, got));
        }
    }
    best.expect("three tries")
}

#[test]
fn a_frozen_server_stalls_only_the_open_that_needs_it() {
    let Some(weed) = start_weed("a_frozen_server_stalls_only_the_open_that_needs_it") else {
        return;
    };
    let mut s3 = s3_node(&weed.endpoint(), "frozen");
    // A request outlasts the freeze: the open that needs the server finishes once it is back.
    for (k, v) in
        [("LLMFS_S3_CONNECT_SECS", "5"), ("LLMFS_S3_REQUEST_SECS", "60"), ("LLMFS_S3_RETRY_SECS", "5")]
    {
        set_env(&mut s3, k, v);
    }
    let small = ModelSpec { shards: 1, ..spec() };
    for (name, seed) in [("a", 1), ("b", 2)] {
        let model = s3.path(name);
        common::write_model(&model, &ModelSpec { seed, ..small.clone() });
        s3.ok([os("add"), os(name), os(&model)]);
    }
    let want_b = fs::read(s3.path("b").join("model.safetensors")).unwrap();
    let want_config = fs::read(s3.path("a").join("config.json")).unwrap();
    let m = mount(&s3, &s3.path("cache"));
    let mp = m.path().to_owned();
    // Entry a is open and read; b's view is not built yet (nothing of it was looked up).
    let open_a = fs::File::open(mp.join("a/config.json")).unwrap();
    assert_same_bytes(&fs::read(mp.join("a/config.json")).unwrap(), &want_config, "MOUNT/a/config.json");

    weed.freeze(true);
    let opener = {
        let p = mp.join("b/model.safetensors");
        std::thread::spawn(move || {
            let start = Instant::now();
            let got = fs::read(&p).map_err(|e| e.raw_os_error());
            (got, start.elapsed())
        })
    };
    // Let it reach the server and stall there.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!opener.is_finished(), "the open of b's weights did not wait for the frozen server");
    let mut times = vec![];
    {
        let p = mp.join("a/config.json");
        times.push((
            "stat MOUNT/a/config.json",
            fastest_of_3("stat", move || fs::metadata(&p).map(|m| m.len()).ok()).0,
        ));
    }
    {
        let p = mp.clone();
        let (took, names) = fastest_of_3("readdir MOUNT", move || listing_now(&p));
        assert_eq!(names, ["a", "b"].map(String::from).into(), "MOUNT lists both entries");
        times.push(("readdir MOUNT", took));
    }
    {
        let p = mp.join("a");
        let (took, names) = fastest_of_3("readdir MOUNT/a", move || listing_now(&p));
        assert!(names.contains("config.json"), "MOUNT/a lists its files: {names:?}");
        times.push(("readdir MOUNT/a", took));
    }
    {
        let p = mp.join("a/config.json");
        let (took, got) = fastest_of_3("read MOUNT/a/config.json", move || fs::read(&p).ok());
        assert_same_bytes(&got.unwrap_or_default(), &want_config, "MOUNT/a/config.json, server frozen");
        times.push(("open+read MOUNT/a/config.json", took));
    }
    {
        use std::os::unix::fs::FileExt;
        let f = std::sync::Arc::new(open_a);
        let len = want_config.len();
        let (took, got) = fastest_of_3("pread of the open MOUNT/a/config.json", move || {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, 0).ok().map(|()| buf)
        });
        assert_same_bytes(&got.unwrap_or_default(), &want_config, "pread of the open MOUNT/a/config.json");
        times.push(("pread of an open file", took));
    }
    for (what, took) in &times {
        println!("server frozen, b's open waiting: {what} in {took:?}");
    }
    assert!(!opener.is_finished(), "b's open finished while the server was frozen");
    for (what, took) in &times {
        assert!(*took < Duration::from_millis(100), "{what} took {took:?} while another entry's open waited");
    }

    weed.freeze(false);
    let (got, took) = with_deadline("b's open after the server is back", OP, move || opener.join().unwrap());
    println!("b's weights read in {took:?} (the server frozen for part of it)");
    assert_same_bytes(
        &got.expect("reading MOUNT/b/model.safetensors once the server is back"),
        &want_b,
        "MOUNT/b/model.safetensors",
    );
}

/// The names in `dir`, read once (an error reads as nothing).
fn listing_now(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}
