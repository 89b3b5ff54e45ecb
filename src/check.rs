//! `llmfs check`: everything a loader would trip on, found before it loads.
//!
//! For each entry: its chain of bases resolves (no cycle, nothing missing); every base file still
//! matches its fingerprint (size, mtime, sampled hash) and every weight header still parses; the
//! adapter's file-level checks pass (config.json, tokenizer); the entry's view builds with every
//! file servable, which for variants means every tensor resolves to a source; and, for every kind
//! of entry, the shard index (`model.safetensors.index.json`) names only shards the entry has,
//! each holding the tensors the index maps to it — FastChat's loaders (and transformers') open
//! the shards the index names, so a missing shard or tensor fails a load halfway.
//!
//! Each check is one function returning its problem lines; [`check`] runs them all in order.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::registry::{Entry, EntryKind, FileRole, Registry, INDEX_FILE};
use crate::variant::{self, Content, EntryView};
use crate::{adapter, format};

/// One line per problem, each naming the entry and the file.
pub fn check(registry: &Registry, names: &[String]) -> Vec<String> {
    let mut problems = vec![];
    for name in names {
        let entry = match registry.get(name) {
            Ok(e) => e,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        problems.extend(unfinished(registry, name));
        if let Err(e) = registry.ancestors(name) {
            problems.push(format!("{name}: {e}"));
            continue;
        }
        let view = variant::build_view(registry, name);
        match (&entry.kind, &view) {
            (EntryKind::Base { .. }, _) => problems.extend(base_files(registry, name, entry)),
            (_, Err(e)) => problems.push(format!("{name}: {e}")),
            (_, Ok(view)) => problems.extend(servable(name, view)),
        }
        if let Ok(view) = &view {
            problems.extend(shard_index(name, view));
        }
    }
    problems
}

/// A base's files against their fingerprints, its weight headers, and the adapter's checks.
fn base_files(registry: &Registry, name: &str, entry: &Entry) -> Vec<String> {
    let mut problems = vec![];
    let EntryKind::Base { dir, files, .. } = &entry.kind else { return problems };
    if files.iter().any(|f| f.object.is_some()) {
        return object_base_files(registry, name, dir, files);
    }
    for f in files {
        let path = dir.join(&f.name);
        if let Some(reason) = f.fingerprint.verify(&path) {
            problems.push(format!("{name}: {}: {reason}; {}", path.display(), changed_hint(name, &path, f)));
        } else if f.role == FileRole::Weights {
            if let Err(e) = format::read_header_path(&path) {
                problems.push(format!("{name}: {e}"));
            }
        }
    }
    for p in adapter::validate(dir) {
        problems.push(format!("{name}: {p}"));
    }
    problems
}

/// [`base_files`] of a base in an object store: each object must still have its etag (a HEAD),
/// weight headers must parse (ranged reads), and the adapter's checks run on a temporary copy
/// of its small files.
fn object_base_files(
    registry: &Registry,
    name: &str,
    dir: &std::path::Path,
    files: &[crate::registry::FileRecord],
) -> Vec<String> {
    let mut problems = vec![];
    // The small files, for the adapter's checks (which read a directory).
    let tmp = registry.store_root.join("tmp").join(format!("check-{name}.{}", std::process::id()));
    for f in files {
        let source = crate::source::SourceFile::of_record(dir, f, registry.objects.as_ref());
        if let Err(e) = source.object_unchanged() {
            problems.push(format!(
                "{name}: {e}; an object of a base must keep the bytes it was added with: restore it, or `llmfs rm` the entries over it and add it again"
            ));
            continue;
        }
        if f.role == FileRole::Weights {
            if let Err(e) = source.header() {
                problems.push(format!("{name}: {e}"));
            }
        } else if f.fingerprint.size <= 64 << 20 {
            let path = tmp.join(&f.name);
            if let (Some(parent), Ok(bytes)) = (path.parent(), source.read_all()) {
                let _ = std::fs::create_dir_all(parent);
                let _ = std::fs::write(&path, bytes);
            }
        }
    }
    let _ = std::fs::create_dir_all(&tmp);
    for p in adapter::validate(&tmp) {
        problems.push(format!("{name}: {p}"));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    problems
}

/// What to do about base file `path` that no longer matches its fingerprint. A base is never
/// re-fingerprinted silently: its variants and deltas were coded against the bytes it was added
/// with, and the sampled hash cannot prove the bytes it does not read unchanged. When only the
/// modification time moved (`touch`, a copy that did not keep times), putting it back is the
/// user's say-so that the bytes are the same.
fn changed_hint(name: &str, path: &std::path::Path, f: &crate::registry::FileRecord) -> String {
    let now = crate::registry::fingerprint::Fingerprint::of(path);
    let fp = &f.fingerprint;
    let serves = format!(
        "until then {name} and every variant over it answer EIO, and writes into MOUNT/{name}/deltas/ fail at close"
    );
    match now {
        Ok(now) if now.size == fp.size && now.hash == fp.hash => {
            let (secs, ns) = (fp.mtime_ns.div_euclid(1_000_000_000), fp.mtime_ns.rem_euclid(1_000_000_000));
            format!(
                "its size and sampled bytes match, only its modification time moved: if its bytes are \
                 the ones added, put the time back with `touch -m -d @{secs}.{ns:09} '{}'`; {serves}",
                path.display()
            )
        }
        _ => format!("restore the bytes it was added with (or `llmfs rm` the entries over it and add it again); {serves}"),
    }
}

/// Every file of a variant's view can be served.
fn servable(name: &str, view: &EntryView) -> Vec<String> {
    let mut problems = vec![];
    for f in &view.files {
        if let Content::Broken(reason) = &f.content {
            problems.push(format!("{name}: {}: {reason}", f.name));
        } else if let Err(e) = crate::variant::check_sources(f) {
            problems.push(format!("{name}: {}: {e}", f.name));
        }
    }
    problems
}

/// Index files above this size are refused (real ones are well under 1 MiB).
const MAX_INDEX_SIZE: u64 = 64 << 20;

/// The shard index, read as the mount serves it: every shard it names is a file of the entry,
/// and each holds the tensors the index maps to it. One line per missing shard and per shard
/// lacking tensors (not one per tensor: a lost shard of a 70B model would be hundreds of lines).
/// An unservable index or shard is left to the checks above, which already report it.
fn shard_index(name: &str, view: &EntryView) -> Vec<String> {
    let Some(file) = view.file(INDEX_FILE) else { return vec![] };
    if matches!(file.content, Content::Broken(_)) || crate::variant::check_sources(file).is_err() {
        return vec![];
    }
    let line = |reason: String| vec![format!("{name}: {INDEX_FILE}: {reason}")];
    if file.size > MAX_INDEX_SIZE {
        return line(format!("{} bytes is too large for a shard index", file.size));
    }
    let cache = crate::variant::read::Cache::new(MAX_INDEX_SIZE);
    let bytes = match crate::variant::read::read_range(file, 0, file.size, &cache) {
        Ok(b) => b,
        Err(e) => return line(format!("cannot be read: {e}")),
    };
    let index: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return line(format!("not valid JSON: {e}")),
    };
    let Some(map) = index.get("weight_map").and_then(Value::as_object) else {
        return line("no weight_map object".into());
    };
    // Shard → the tensors the index maps to it, in the index's order.
    let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (tensor, shard) in map {
        match shard.as_str() {
            Some(s) => shards.entry(s).or_default().push(tensor),
            None => return line(format!("weight_map[{tensor:?}] is not a string")),
        }
    }
    // transformers' save_pretrained leaves the index of a sharded save when an unsharded one
    // follows into the same directory; loaders that trust the index (vLLM) then skip the weights.
    let stale = match view.file("model.safetensors") {
        Some(_) => " (a stale index beside model.safetensors, as save_pretrained leaves when an unsharded save follows a sharded one: remove it)",
        None => "",
    };
    let mut problems = vec![];
    for (shard, tensors) in shards {
        let Some(f) = view.file(shard) else {
            problems.extend(line(format!(
                "names shard {shard} ({} tensor{}), which the entry does not have{stale}",
                tensors.len(),
                if tensors.len() == 1 { "" } else { "s" }
            )));
            continue;
        };
        if matches!(f.content, Content::Broken(_)) {
            continue;
        }
        let Some(weights) = view.weights.get(shard) else {
            problems.extend(line(format!("names shard {shard}, which is not a safetensors weight file")));
            continue;
        };
        let held: std::collections::HashSet<&str> = weights.tensors.iter().map(|t| t.name.as_str()).collect();
        let lacking: Vec<&str> = tensors.into_iter().filter(|t| !held.contains(t)).collect();
        if !lacking.is_empty() {
            const SHOWN: usize = 3;
            let mut list =
                lacking.iter().take(SHOWN).map(|t| format!("{t:?}")).collect::<Vec<_>>().join(", ");
            if lacking.len() > SHOWN {
                list.push_str(&format!(" and {} more", lacking.len() - SHOWN));
            }
            problems.extend(line(format!(
                "maps {} tensor{} to {shard}, which does not hold {}: {list}",
                lacking.len(),
                if lacking.len() == 1 { "" } else { "s" },
                if lacking.len() == 1 { "it" } else { "them" }
            )));
        }
    }
    problems
}

/// An entry written through `deltas/` whose writer stopped before storing some files (a daemon
/// killed mid-copy): one line per such file. Writing the file again, or removing it, clears it.
/// The line says both ways out: a writer's temporary file (rsync's `.NAME.XXXXXX`) is never
/// written again by the next run, so only its removal completes the entry.
pub fn unfinished(registry: &Registry, name: &str) -> Vec<String> {
    let base = registry.entries.get(name).and_then(|e| e.kind.base()).unwrap_or("BASE");
    registry
        .unfinished(name)
        .into_iter()
        .map(|f| {
            format!(
                "{name}: {f}: unfinished: it was being written into deltas/ and never stored \
                 (write it again, or remove it: rm MOUNT/{base}/deltas/{name}/{f})"
            )
        })
        .collect()
}
