//! Which files of a directory an entry keeps: the one repository walker behind `llmfs add`,
//! `delta make` and `delta import`, so all three keep the same files.
//!
//! The rule is "everything, or say why not": every regular file in every subdirectory, dotfiles
//! too, under any name the local filesystem allows (spaces, `+`, non-ASCII), with symlinks
//! followed the way `cp -rL` follows them (the Hugging Face cache's `snapshots/REV/` is all
//! symlinks into `blobs/`). What is not kept is named in a [`Walk::notes`] line the command
//! prints, or refuses the whole command:
//!
//! - skipped with a line: `.git/` (a git checkout's object store is not part of the model) and
//!   the hub's `.cache/huggingface/` bookkeeping at the top (what `huggingface_hub`'s `local_dir`
//!   downloads leave beside the files), empty directories (an entry holds files), and anything
//!   that is neither a file nor a directory (a socket, a FIFO: reading one could block forever);
//! - followed with a line: a symlink whose target lies outside the directory (the entry then
//!   depends on that target too), except a hub snapshot's links into its own repository's
//!   `blobs/` (`models--ORG--NAME/snapshots/REV/` → `../../blobs/`), which is the layout;
//! - refused: a dangling symlink, a directory cycle through symlinks, a name that is not UTF-8
//!   (entries name files by UTF-8 paths), a path [`super::validate_file_path`] refuses, and a
//!   top-level `deltas` (the mount's `MOUNT/NAME/deltas/` is where fine-tunes are written).
//!
//! Which kept files are the model's weights is [`role_of`]: only top-level `*.safetensors` (and
//! the top-level shard index). Hugging Face repositories keep their weights at the top; a
//! `*.safetensors` in a subdirectory (sentence-transformers' `2_Dense/`) is kept and served as it
//! is, byte for byte, and variants (casts, quantization) leave it alone. `*.bin`, `*.pt` and
//! `*.pth` are kept as plain files too.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{io_err, validate_file_path, Error, FileRole, Result, INDEX_FILE};

/// A top-level name no entry may hold: the mount shows `MOUNT/NAME/deltas/` in every entry.
pub const RESERVED: &str = "deltas";

/// What a directory holds, as an entry keeps it.
#[derive(Debug, Default)]
pub struct Walk {
    /// The directory, canonical (symlinks resolved).
    pub root: PathBuf,
    /// Every kept file: its path relative to `root` (`/`-separated) and its size, sorted by path.
    pub files: Vec<(String, u64)>,
    /// One line for each thing left out or followed outside `root`, to print.
    pub notes: Vec<String>,
}

impl Walk {
    /// Bytes of all kept files.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|(_, s)| s).sum()
    }
    /// Every kept file with its [`role_of`].
    pub fn with_roles(&self) -> Vec<(String, FileRole)> {
        self.files.iter().map(|(n, _)| (n.clone(), role_of(n))).collect()
    }
}

/// The role a kept file plays in an entry, by its path: only top-level files are weights or the
/// shard index (see the module doc).
pub fn role_of(path: &str) -> FileRole {
    if path.contains('/') {
        FileRole::Other
    } else if path.ends_with(".safetensors") {
        FileRole::Weights
    } else if path == INDEX_FILE {
        FileRole::Index
    } else {
        FileRole::Other
    }
}

/// Whether a path names a PyTorch pickle (kept as a plain file; llmfs serves weights only as
/// safetensors).
pub fn is_pickle(path: &str) -> bool {
    !path.contains('/') && [".bin", ".pt", ".pth"].iter().any(|s| path.ends_with(s))
}

/// Walk `dir` (see the module doc). Errors name the offending path.
pub fn walk(dir: &Path) -> Result<Walk> {
    let meta = fs::metadata(dir).map_err(io_err(dir))?;
    if !meta.is_dir() {
        return Err(Error::NotAModel { path: dir.to_owned(), reason: "not a directory".into() });
    }
    if let Some(reason) = hub_repo(dir) {
        return Err(Error::NotAModel { path: dir.to_owned(), reason });
    }
    let root = dir.canonicalize().map_err(io_err(dir))?;
    // A hub cache snapshot (`models--ORG--NAME/snapshots/REV/`) is all symlinks into its
    // repository's `blobs/`: that is the layout, not worth a line; links leaving it still are.
    let blobs = root
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "snapshots"))
        .and_then(Path::parent)
        .and_then(|repo| repo.join("blobs").canonicalize().ok());
    let mut walker =
        Walker { root: root.clone(), out: Walk { root, ..Default::default() }, outside: vec![], blobs };
    let mut ancestors = vec![(meta.dev(), meta.ino())];
    walker.dir(&walker.root.clone(), "", &mut ancestors)?;
    let Walker { mut out, outside, .. } = walker;
    if !outside.is_empty() {
        const SHOWN: usize = 4;
        let mut line = format!(
            "followed {} symlink{} pointing outside {} (the entry keeps what they point to): ",
            outside.len(),
            if outside.len() == 1 { "" } else { "s" },
            out.root.display()
        );
        let listed: Vec<String> =
            outside.iter().take(SHOWN).map(|(p, t)| format!("{p} -> {}", t.display())).collect();
        line.push_str(&listed.join(", "));
        if outside.len() > SHOWN {
            line.push_str(&format!(" and {} more", outside.len() - SHOWN));
        }
        out.notes.push(line);
    }
    out.files.sort();
    Ok(out)
}

/// Why `dir` is a Hugging Face cache repository (`hub/models--ORG--NAME/`, holding `blobs/`,
/// `refs/` and `snapshots/REV/`) rather than a model: the model is one of its snapshots, which
/// this names (the one `refs/main` points to, else the first), so the user can add that.
fn hub_repo(dir: &Path) -> Option<String> {
    let snapshots = dir.join("snapshots");
    if !snapshots.is_dir() || !dir.join("blobs").is_dir() {
        return None;
    }
    let main = fs::read_to_string(dir.join("refs/main")).ok().map(|r| r.trim().to_owned());
    let rev = main.filter(|r| !r.is_empty() && snapshots.join(r).is_dir()).or_else(|| {
        let mut revs: Vec<String> = fs::read_dir(&snapshots)
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        revs.sort();
        revs.into_iter().next()
    });
    Some(match rev {
        Some(rev) => format!(
            "a Hugging Face cache repository, not a model directory: add one of its snapshots, such as {}",
            snapshots.join(rev).display()
        ),
        None => "a Hugging Face cache repository with no snapshot (snapshots/ is empty)".to_owned(),
    })
}

struct Walker {
    root: PathBuf,
    out: Walk,
    /// Symlinks (relative path, canonical target) that lead outside `root`.
    outside: Vec<(String, PathBuf)>,
    /// The hub cache repository's `blobs/` when `root` is one of its snapshots.
    blobs: Option<PathBuf>,
}

impl Walker {
    /// Walk directory `path` (relative path `rel`, "" for the root). `ancestors` holds the
    /// (device, inode) of every directory from the root down to `path`: meeting one again is a
    /// cycle.
    fn dir(&mut self, path: &Path, rel: &str, ancestors: &mut Vec<(u64, u64)>) -> Result<()> {
        let mut names = vec![];
        for item in fs::read_dir(path).map_err(gone(path))? {
            names.push(item.map_err(io_err(path))?.file_name());
        }
        names.sort();
        for os_name in names {
            let child = path.join(&os_name);
            let Some(name) = os_name.to_str() else {
                return Err(Error::NotAModel {
                    path: child,
                    reason: "the name is not UTF-8; rename it (an entry names its files by UTF-8 paths)"
                        .into(),
                });
            };
            let child_rel = if rel.is_empty() { name.to_owned() } else { format!("{rel}/{name}") };
            validate_file_path(&child_rel)?;
            if rel.is_empty() && name == RESERVED {
                return Err(Error::NotAModel {
                    path: child,
                    reason: format!(
                        "{RESERVED:?} is reserved at the top of an entry (the mount writes fine-tunes into \
                         MOUNT/NAME/{RESERVED}/); rename it"
                    ),
                });
            }
            let link = fs::symlink_metadata(&child).map_err(gone(&child))?;
            let meta = if link.file_type().is_symlink() {
                let target = fs::read_link(&child).unwrap_or_default();
                let meta = fs::metadata(&child).map_err(|e| Error::NotAModel {
                    path: child.clone(),
                    reason: format!("a symlink to {} that cannot be followed: {e}", target.display()),
                })?;
                let real = child.canonicalize().map_err(io_err(&child))?;
                let hub_blob = self.blobs.as_ref().is_some_and(|b| real.starts_with(b));
                if !real.starts_with(&self.root) && !hub_blob {
                    self.outside.push((child_rel.clone(), real));
                }
                meta
            } else {
                link
            };
            if meta.is_dir() {
                if name == ".git" {
                    self.out
                        .notes
                        .push(format!("skipped {child_rel}/: a git directory, not part of the model"));
                    continue;
                }
                if rel == ".cache" && name == "huggingface" {
                    self.out.notes.push(format!(
                        "skipped {child_rel}/: huggingface_hub's download bookkeeping, not part of the model"
                    ));
                    continue;
                }
                let id = (meta.dev(), meta.ino());
                if ancestors.contains(&id) {
                    return Err(Error::NotAModel {
                        path: child,
                        reason: "a directory cycle: this symlink leads back to a directory above it".into(),
                    });
                }
                ancestors.push(id);
                let before = self.out.files.len();
                let notes_before = self.out.notes.len();
                self.dir(&child, &child_rel, ancestors)?;
                ancestors.pop();
                if self.out.files.len() == before && self.out.notes.len() == notes_before {
                    self.out
                        .notes
                        .push(format!("skipped {child_rel}/: an empty directory (entries hold files)"));
                }
            } else if meta.is_file() {
                self.out.files.push((child_rel, meta.len()));
            } else {
                self.out.notes.push(format!(
                    "skipped {child_rel}: neither a file nor a directory (a socket, FIFO or device)"
                ));
            }
        }
        Ok(())
    }
}

/// An I/O error on a file the walk found: one that is gone says so (it vanished while the command
/// ran; nothing was registered).
pub(crate) fn gone(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotAModel {
                path: path.to_owned(),
                reason: "vanished while it was being added (nothing was registered; run the command again)"
                    .into(),
            }
        } else {
            Error::Io { path: path.to_owned(), source }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn names(w: &Walk) -> Vec<&str> {
        w.files.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn keeps_every_file_and_names_what_it_skips() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for f in ["model.safetensors", ".gitattributes", "1_Pooling/config.json", "a b+é.txt", "x/y/z.bin"] {
            fs::create_dir_all(p.join(f).parent().unwrap()).unwrap();
            fs::write(p.join(f), f).unwrap();
        }
        fs::create_dir_all(p.join(".git/objects")).unwrap();
        fs::write(p.join(".git/HEAD"), "ref").unwrap();
        fs::create_dir_all(p.join(".cache/huggingface/download")).unwrap();
        fs::write(p.join(".cache/huggingface/download/x.incomplete"), "x").unwrap();
        fs::create_dir_all(p.join("empty")).unwrap();
        let w = walk(p).unwrap();
        assert_eq!(
            names(&w),
            [".gitattributes", "1_Pooling/config.json", "a b+é.txt", "model.safetensors", "x/y/z.bin"]
        );
        assert_eq!(w.files[1].1, "1_Pooling/config.json".len() as u64);
        let notes = w.notes.join("\n");
        for needle in ["skipped .git/", "skipped .cache/huggingface/", "skipped empty/"] {
            assert!(notes.contains(needle), "{needle:?} not in {notes}");
        }
        assert_eq!(w.notes.len(), 3, "{notes}");
    }

    #[test]
    fn follows_symlinks_and_says_when_they_leave() {
        let d = tempfile::tempdir().unwrap();
        let (repo, outside) = (d.path().join("repo"), d.path().join("blobs"));
        fs::create_dir_all(repo.join("sub")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("blob"), "12345").unwrap();
        fs::write(repo.join("sub/inner"), "1").unwrap();
        symlink(outside.join("blob"), repo.join("config.json")).unwrap();
        symlink("sub/inner", repo.join("inside-link")).unwrap();
        symlink(&outside, repo.join("linked-dir")).unwrap();
        let w = walk(&repo).unwrap();
        assert_eq!(names(&w), ["config.json", "inside-link", "linked-dir/blob", "sub/inner"]);
        assert_eq!(w.files[0].1, 5);
        assert_eq!(w.notes.len(), 1, "{:?}", w.notes);
        assert!(w.notes[0].contains("followed 2 symlinks") && w.notes[0].contains("config.json ->"));
    }

    #[test]
    fn refuses_cycles_dangling_links_and_the_reserved_name() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        fs::create_dir_all(p.join("a/b")).unwrap();
        fs::write(p.join("model.safetensors"), "x").unwrap();
        symlink("../..", p.join("a/b/up")).unwrap();
        let e = walk(p).unwrap_err().to_string();
        assert!(e.contains("a/b/up") && e.contains("cycle"), "{e}");
        fs::remove_file(p.join("a/b/up")).unwrap();
        symlink("nowhere", p.join("a/dangling")).unwrap();
        let e = walk(p).unwrap_err().to_string();
        assert!(e.contains("a/dangling") && e.contains("cannot be followed"), "{e}");
        fs::remove_file(p.join("a/dangling")).unwrap();
        fs::create_dir(p.join("deltas")).unwrap();
        fs::write(p.join("deltas/x"), "x").unwrap();
        let e = walk(p).unwrap_err().to_string();
        assert!(e.contains("reserved"), "{e}");
    }

    #[test]
    fn a_fifo_is_skipped_with_a_line_and_a_non_utf8_name_refused() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        fs::write(p.join("model.safetensors"), "x").unwrap();
        let fifo = std::ffi::CString::new(p.join("pipe").as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let w = walk(p).unwrap();
        assert_eq!(names(&w), ["model.safetensors"]);
        assert!(w.notes.len() == 1 && w.notes[0].contains("skipped pipe"), "{:?}", w.notes);
        fs::write(p.join(std::ffi::OsStr::from_bytes(b"bad\xff.txt")), "x").unwrap();
        let e = walk(p).unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
    }

    #[test]
    fn roles_come_from_the_top_level_only() {
        assert_eq!(role_of("model.safetensors"), FileRole::Weights);
        assert_eq!(role_of(INDEX_FILE), FileRole::Index);
        assert_eq!(role_of("2_Dense/model.safetensors"), FileRole::Other);
        assert_eq!(role_of(&format!("x/{INDEX_FILE}")), FileRole::Other);
        assert_eq!(role_of("training_args.bin"), FileRole::Other);
        assert!(is_pickle("pytorch_model.bin") && !is_pickle("x/y.pt") && !is_pickle("a.json"));
    }
}
