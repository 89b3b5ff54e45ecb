//! What a store holds that no entry references, left by a crash (an upload killed midway, a
//! daemon killed between storing a file and committing the registry) or by a removal that could
//! not delete everything. The registry says what is referenced ([`References`]); this finds the
//! rest, in the store's own layout (see `node`): objects under `models/` no record names on an
//! object store; locally, directories under `models/` no entry owns, files in an owned directory
//! its records do not name, and staging directories of processes that are gone. Only what is
//! older than a minimum age counts: an upload in progress on another node is not garbage yet
//! (its registry commit comes at the end).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{Node, StoreError};

/// What the catalogue references.
#[derive(Debug, Default)]
pub struct References {
    /// Object keys records name.
    pub objects: HashSet<String>,
    /// Entries that own a local directory, with the files their records name in it.
    pub dirs: HashMap<String, HashSet<String>>,
}

/// One thing to remove: an object's key, or a path under the node's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Garbage {
    pub what: String,
    pub size: u64,
    path: Option<PathBuf>,
}

/// Everything `refs` does not reference, older than `min_age`, sorted.
pub fn find(node: &Node, refs: &References, min_age: Duration) -> Result<Vec<Garbage>, StoreError> {
    let old_enough = |t: SystemTime| SystemTime::now().duration_since(t).is_ok_and(|age| age >= min_age);
    let mut out = vec![];
    if !node.keeps_local_paths() {
        for meta in node.list("models")? {
            if !refs.objects.contains(&meta.key) && old_enough(meta.last_modified) {
                out.push(Garbage { what: meta.key, size: meta.size, path: None });
            }
        }
        return Ok(out);
    }
    let io = |p: &Path| {
        let key = p.display().to_string();
        move |e: std::io::Error| StoreError::Io { key, reason: e.to_string() }
    };
    let models = node.dir().join("models");
    for item in fs::read_dir(&models).map_err(io(&models))?.flatten() {
        let name = item.file_name().to_string_lossy().into_owned();
        match refs.dirs.get(&name) {
            None => push_if_old(&mut out, &item.path(), &models, &old_enough),
            Some(named) => unnamed_files(&item.path(), &item.path(), named, &mut |p| {
                push_if_old(&mut out, p, &models, &old_enough)
            }),
        }
    }
    // Staging directories of processes that are gone.
    let tmp = node.tmp_dir();
    for item in fs::read_dir(&tmp).map_err(io(&tmp))?.flatten() {
        let name = item.file_name().to_string_lossy().into_owned();
        let pid = name.rsplit('.').nth(1).unwrap_or("");
        if !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
        {
            push_if_old(&mut out, &item.path(), node.dir(), &old_enough);
        }
    }
    out.sort_by(|a, b| a.what.cmp(&b.what));
    Ok(out)
}

/// Removes what [`find`] found; returns the first failure, if any, after trying all.
pub fn remove(node: &Node, garbage: &[Garbage]) -> Result<(), StoreError> {
    let mut first = None;
    for g in garbage {
        let io = |e: std::io::Error| StoreError::Io { key: g.what.clone(), reason: e.to_string() };
        let result = match &g.path {
            Some(p) if p.is_dir() => fs::remove_dir_all(p).map_err(io),
            Some(p) => fs::remove_file(p).map_err(io),
            None => node.delete(&g.what),
        };
        if let Err(e) = result {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

fn push_if_old(out: &mut Vec<Garbage>, path: &Path, under: &Path, old_enough: &dyn Fn(SystemTime) -> bool) {
    let Ok(meta) = fs::symlink_metadata(path) else { return };
    if !meta.modified().is_ok_and(old_enough) {
        return;
    }
    let what = path.strip_prefix(under.parent().unwrap_or(under)).unwrap_or(path).display().to_string();
    out.push(Garbage { what, size: du(path), path: Some(path.to_owned()) });
}

/// Files under `dir` whose path relative to `root` is not in `named`.
fn unnamed_files(root: &Path, dir: &Path, named: &HashSet<String>, found: &mut dyn FnMut(&Path)) {
    for item in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = item.path();
        if item.file_type().is_ok_and(|t| t.is_dir()) {
            unnamed_files(root, &path, named, found);
        } else if let Some(rel) = path.strip_prefix(root).ok().and_then(|r| r.to_str()) {
            if !named.contains(rel) {
                found(&path);
            }
        }
    }
}

fn du(path: &Path) -> u64 {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            fs::read_dir(path).into_iter().flatten().flatten().map(|i| du(&i.path())).sum()
        }
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_orphans_are_found_and_owned_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(dir.path()).unwrap();
        let orphan = node.entry_dir("orphan");
        fs::create_dir_all(orphan.join("sub")).unwrap();
        fs::write(orphan.join("sub/x"), b"12345").unwrap();
        let owned = node.entry_dir("owned");
        fs::create_dir_all(&owned).unwrap();
        fs::write(owned.join("named"), b"1").unwrap();
        fs::write(owned.join("stray"), b"12").unwrap();
        let mut refs = References::default();
        refs.dirs.insert("owned".into(), HashSet::from(["named".to_string()]));
        assert!(find(&node, &refs, Duration::from_secs(3600)).unwrap().is_empty(), "too young to be garbage");
        let found = find(&node, &refs, Duration::ZERO).unwrap();
        let what: Vec<_> = found.iter().map(|g| (g.what.as_str(), g.size)).collect();
        assert_eq!(what, [("models/orphan", 5), ("models/owned/stray", 2)]);
        remove(&node, &found).unwrap();
        assert!(!orphan.exists() && owned.join("named").exists());
        assert!(find(&node, &refs, Duration::ZERO).unwrap().is_empty());
    }
}
