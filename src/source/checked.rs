//! Which local source files this node has checked against their fingerprints, and what each
//! file's stat said then, kept in the disk cache's directory (`DIR/checked-sources`) so that a
//! new daemon need not check them again.
//!
//! A daemon checks a base file's sampled hash (6 MiB read and hashed) the first time a variant
//! reading from it is opened. After a remount that was most of a warm load's extra time on 2
//! cores: 11-14 ms for the two shards of a 1100 MiB cast, against a 70-95 ms load. A file whose
//! device, inode, size, mtime and ctime are what they were when its check passed has not been
//! written, truncated or replaced since (any of those changes the ctime, which cannot be set
//! back), which is the same argument the disk cache's own entries are trusted on and the one
//! the daemon already uses between two opens. So a remount trusts such a file without reading
//! it; a file whose stat moved is checked again. `llmfs check` still reads every fingerprint.
//!
//! The file is one JSON record per line, appended as checks pass (the last record of a path
//! wins; a torn or unreadable line is skipped: it only costs a check) and rewritten without the
//! superseded lines when it is loaded. One daemon holds a disk cache directory at a time (its
//! lock), so one writes the file at a time. Without a disk cache nothing is kept across mounts.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

use crate::registry::Fingerprint;

const FILE: &str = "checked-sources";

/// What a file's stat said when its check passed, and the sampled hash it was checked against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    hash: String,
}

impl Record {
    fn of(path: &Path, meta: &std::fs::Metadata, fingerprint: &Fingerprint) -> Record {
        let (size, mtime_ns, ctime_ns) = super::stamp_of(meta);
        Record {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
            size,
            mtime_ns,
            ctime_ns,
            hash: fingerprint.hash.clone(),
        }
    }
}

/// The checks of this process, and the file they are kept in (None: kept in memory only).
struct Checked {
    records: HashMap<PathBuf, Record>,
    file: Option<File>,
}

static CHECKED: OnceLock<Mutex<Checked>> = OnceLock::new();

fn checked() -> &'static Mutex<Checked> {
    CHECKED.get_or_init(|| Mutex::new(Checked { records: HashMap::new(), file: None }))
}

/// Keep this process's checks in `dir` (a disk cache directory this process holds), starting
/// from the ones kept there before. Failing to read or write the file is logged and costs only
/// checks: they are then kept in memory.
pub fn keep_in(dir: &Path) {
    let path = dir.join(FILE);
    let mut records = HashMap::new();
    let mut lines = 0;
    if let Ok(text) = std::fs::read_to_string(&path) {
        for line in text.lines() {
            lines += 1;
            if let Ok(r) = serde_json::from_str::<Record>(line) {
                records.insert(r.path.clone(), r);
            }
        }
    }
    let file = if lines > records.len() { rewrite(dir, &records) } else { append_to(&path) };
    let file = file
        .map_err(|e| tracing::warn!("{}: {e}: base files are checked again at each mount", path.display()));
    let mut c = checked().lock().unwrap_or_else(|e| e.into_inner());
    c.records.extend(records);
    c.file = file.ok();
}

fn append_to(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().append(true).create(true).mode(0o600).open(path)
}

/// The file with one line per record (superseded and unreadable lines dropped), replaced
/// atomically, open for appending.
fn rewrite(dir: &Path, records: &HashMap<PathBuf, Record>) -> std::io::Result<File> {
    let tmp = dir.join("tmp").join(FILE);
    let mut text = vec![];
    for r in records.values() {
        serde_json::to_writer(&mut text, r).map_err(std::io::Error::other)?;
        text.push(b'\n');
    }
    std::fs::write(&tmp, &text)?;
    std::fs::rename(&tmp, dir.join(FILE))?;
    append_to(&dir.join(FILE))
}

/// Whether `path`, open with stat `meta`, passed a check against `fingerprint` with this same
/// stat (in this process or one that kept its checks in the same directory).
pub fn trusted(path: &Path, meta: &std::fs::Metadata, fingerprint: &Fingerprint) -> bool {
    let c = checked().lock().unwrap_or_else(|e| e.into_inner());
    c.records.get(path).is_some_and(|r| *r == Record::of(path, meta, fingerprint))
}

/// `path`, open with stat `meta`, just passed a check against `fingerprint`.
pub fn passed(path: &Path, meta: &std::fs::Metadata, fingerprint: &Fingerprint) {
    let r = Record::of(path, meta, fingerprint);
    let mut c = checked().lock().unwrap_or_else(|e| e.into_inner());
    if c.records.get(path) == Some(&r) {
        return;
    }
    if let Some(f) = &mut c.file {
        let mut line = serde_json::to_vec(&r).expect("a record serializes");
        line.push(b'\n');
        // One write of the whole line (O_APPEND): a crash leaves at most a torn last line.
        if let Err(e) = f.write_all(&line) {
            tracing::warn!("keeping the check of {}: {e}", path.display());
        }
    }
    c.records.insert(path.to_owned(), r);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(hash: &str) -> Fingerprint {
        Fingerprint { size: 0, mtime_ns: 0, hash: hash.into(), etag: None }
    }

    /// A record matches only the same path, stat and hash; any write moves the ctime.
    #[test]
    fn a_record_matches_the_same_stat_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        let r = Record::of(&p, &meta, &fingerprint("h"));
        assert_eq!(r, Record::of(&p, &meta, &fingerprint("h")));
        assert_ne!(r, Record::of(&p, &meta, &fingerprint("other")));
        assert_ne!(r, Record::of(&dir.path().join("g"), &meta, &fingerprint("h")));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().write_all(b"x").unwrap();
        let after = std::fs::metadata(&p).unwrap();
        assert_ne!(r, Record::of(&p, &after, &fingerprint("h")), "a write in place changes the ctime");
    }

    /// Records survive in the directory's file; torn and superseded lines are dropped when it is
    /// loaded.
    #[test]
    fn records_are_kept_and_the_file_compacted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        let p = dir.path().join("base");
        std::fs::write(&p, b"weights").unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        let r = Record::of(&p, &meta, &fingerprint("h"));
        let old = Record { hash: "old".into(), ..r.clone() };
        let line = |r: &Record| serde_json::to_string(r).unwrap() + "\n";
        let text = line(&old) + &line(&r) + "{\"path\": \"torn";
        std::fs::write(dir.path().join(FILE), text).unwrap();
        keep_in(dir.path());
        assert!(trusted(&p, &meta, &fingerprint("h")));
        assert!(!trusted(&p, &meta, &fingerprint("old")), "the last record of a path wins");
        assert_eq!(std::fs::read_to_string(dir.path().join(FILE)).unwrap(), line(&r));
    }
}
