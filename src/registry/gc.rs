//! `llmfs gc`: what the store holds that no entry references, left by a crash (an upload killed
//! midway, a daemon killed between storing a file and committing the registry) or by a removal
//! that could not delete everything. Only what is older than a minimum age counts: an upload in
//! progress on another node is not garbage yet (its registry commit comes at the end).

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{EntryKind, Result, Store};

/// One thing `gc` removes: an object's key, or a path under the local store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Garbage {
    pub what: String,
    pub size: u64,
    path: Option<PathBuf>,
}

/// Everything no entry references, older than `min_age`, sorted.
pub fn find(store: &Store, min_age: Duration) -> Result<Vec<Garbage>> {
    let registry = store.load()?;
    let old_enough = |t: SystemTime| SystemTime::now().duration_since(t).is_ok_and(|age| age >= min_age);
    let mut out = vec![];
    if let Some(remote) = store.remote() {
        let referenced: HashSet<&str> = registry
            .entries
            .values()
            .flat_map(|e| e.kind.files())
            .filter_map(|f| f.object.as_deref())
            .collect();
        for meta in remote.list("models")? {
            if !referenced.contains(meta.key.as_str()) && old_enough(meta.last_modified) {
                out.push(Garbage { what: meta.key, size: meta.size, path: None });
            }
        }
        return Ok(out);
    }
    // Local: directories under models/ that no entry owns, and files in an owned directory that
    // its records do not name.
    let models = store.root().join("models");
    for item in fs::read_dir(&models).map_err(super::io_err(&models))?.flatten() {
        let name = item.file_name().to_string_lossy().into_owned();
        let owner = registry
            .entries
            .get(&name)
            .filter(|e| !matches!(e.kind, EntryKind::Cast { .. } | EntryKind::Base { copied: false, .. }));
        match owner {
            None => push_if_old(&mut out, &item.path(), &models, &old_enough),
            Some(entry) => {
                let named: HashSet<&str> = entry.kind.files().iter().map(|f| f.name.as_str()).collect();
                unnamed_files(&item.path(), &item.path(), &named, &mut |p| {
                    push_if_old(&mut out, p, &models, &old_enough)
                });
            }
        }
    }
    // Staging directories of processes that are gone.
    let tmp = store.tmp_dir();
    for item in fs::read_dir(&tmp).map_err(super::io_err(&tmp))?.flatten() {
        let name = item.file_name().to_string_lossy().into_owned();
        let pid = name.rsplit('.').nth(1).unwrap_or("");
        if !pid.is_empty()
            && pid.bytes().all(|b| b.is_ascii_digit())
            && !Path::new("/proc").join(pid).exists()
        {
            push_if_old(&mut out, &item.path(), store.root(), &old_enough);
        }
    }
    out.sort_by(|a, b| a.what.cmp(&b.what));
    Ok(out)
}

/// Removes what [`find`] found; returns the first failure's message, if any, after trying all.
pub fn remove(store: &Store, garbage: &[Garbage]) -> Result<()> {
    let mut first = None;
    for g in garbage {
        let result = match (&g.path, store.remote()) {
            (Some(p), _) if p.is_dir() => fs::remove_dir_all(p).map_err(super::io_err(p)),
            (Some(p), _) => fs::remove_file(p).map_err(super::io_err(p)),
            (None, Some(remote)) => remote.delete(&g.what).map_err(Into::into),
            (None, None) => Ok(()),
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
fn unnamed_files(root: &Path, dir: &Path, named: &HashSet<&str>, found: &mut dyn FnMut(&Path)) {
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
        let store = Store::open(dir.path()).unwrap();
        let orphan = store.entry_dir("orphan");
        fs::create_dir_all(orphan.join("sub")).unwrap();
        fs::write(orphan.join("sub/x"), b"12345").unwrap();
        assert!(find(&store, Duration::from_secs(3600)).unwrap().is_empty(), "too young to be garbage");
        let found = find(&store, Duration::ZERO).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].what.as_str(), found[0].size), ("models/orphan", 5));
        remove(&store, &found).unwrap();
        assert!(!orphan.exists());
        assert!(find(&store, Duration::ZERO).unwrap().is_empty());
    }
}
