//! Inode numbers: what each names (the root, an entry, a file or directory in it, the deltas/
//! tree), assigned on first sight and never reused within a mount, and the lookups of an
//! entry's children by path.

use std::collections::HashMap;

use super::{write, Kind, ROOT_INO};

/// What an inode names. `created` is the entry's generation (unique per registration). File and
/// directory paths inside an entry are relative, `/`-separated (`1_Pooling/config.json`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Node {
    Root,
    Entry {
        name: String,
        created: u64,
    },
    /// `<entry>/<dir>/`: a subdirectory, implied by the paths of the entry's files.
    Dir {
        entry: String,
        created: u64,
        dir: String,
    },
    Deltas {
        entry: String,
        created: u64,
    },
    File {
        entry: String,
        created: u64,
        file: String,
    },
    /// `<entry>/deltas/<name>/<dir>`: delta entry `name` over `entry`, stored or being written
    /// (`dir` empty), or a directory in it.
    DeltaDir {
        entry: String,
        created: u64,
        name: String,
        dir: String,
    },
    DeltaFile {
        entry: String,
        created: u64,
        name: String,
        file: String,
    },
    /// What was at a path a rename replaced: the inode names nothing now.
    Gone(u64),
}

#[derive(Default)]
pub(super) struct Inodes {
    by_node: HashMap<Node, u64>,
    nodes: Vec<Node>,
}

impl Inodes {
    pub(super) fn ino(&mut self, node: Node) -> u64 {
        if let Some(&ino) = self.by_node.get(&node) {
            return ino;
        }
        self.nodes.push(node.clone());
        let ino = self.nodes.len() as u64 + ROOT_INO;
        self.by_node.insert(node, ino);
        ino
    }
    pub(super) fn node(&self, ino: u64) -> Option<&Node> {
        if ino == ROOT_INO {
            return Some(&Node::Root);
        }
        self.nodes.get(ino.checked_sub(ROOT_INO + 1)? as usize)
    }

    /// `node` was removed: its inode names nothing from now on (a file of that name made later
    /// is a new one).
    pub(super) fn forget(&mut self, node: &Node) {
        if let Some(ino) = self.by_node.remove(node) {
            self.nodes[(ino - ROOT_INO - 1) as usize] = Node::Gone(ino);
            self.by_node.insert(Node::Gone(ino), ino);
        }
    }

    /// A rename of `from` to `to` inside `<entry>/deltas/<name>/`: the kernel keeps the inodes it
    /// knows under their new names, so each inode at or under `from` now names the path under
    /// `to`, and those that named what was at `to` name nothing.
    pub(super) fn rename(&mut self, entry: &str, name: &str, from: &str, to: &str) {
        let path_of = |node: &Node| match node {
            Node::DeltaFile { entry: e, name: n, file: p, .. }
            | Node::DeltaDir { entry: e, name: n, dir: p, .. }
                if e == entry && n == name && !p.is_empty() =>
            {
                Some(p.clone())
            }
            _ => None,
        };
        let with_path = |node: &Node, path: String| match node.clone() {
            Node::DeltaFile { entry, created, name, .. } => {
                Node::DeltaFile { entry, created, name, file: path }
            }
            Node::DeltaDir { entry, created, name, .. } => Node::DeltaDir { entry, created, name, dir: path },
            other => other,
        };
        for pass in [to, from] {
            for i in 0..self.nodes.len() {
                let Some(path) = path_of(&self.nodes[i]) else { continue };
                if !write::within(&path, pass) {
                    continue;
                }
                let ino = i as u64 + ROOT_INO + 1;
                let new = if pass == to {
                    Node::Gone(ino)
                } else {
                    with_path(&self.nodes[i], write::moved(&path, from, to))
                };
                let old = std::mem::replace(&mut self.nodes[i], new.clone());
                self.by_node.remove(&old);
                self.by_node.insert(new, ino);
            }
        }
    }
}

/// The entries of directory `dir` (empty: the top) of a tree given by its file paths and
/// directory paths: each child's name and kind.
pub(super) fn children<'a>(
    files: impl IntoIterator<Item = &'a String>,
    dirs: impl IntoIterator<Item = &'a String>,
    dir: &str,
) -> std::collections::BTreeMap<String, Kind> {
    let mut out = std::collections::BTreeMap::new();
    let tagged = files.into_iter().map(|f| (f, Kind::File)).chain(dirs.into_iter().map(|d| (d, Kind::Dir)));
    for (path, kind) in tagged {
        let rest = if dir.is_empty() {
            Some(path.as_str())
        } else {
            path.strip_prefix(dir).and_then(|r| r.strip_prefix('/'))
        };
        match rest.map(|r| r.split_once('/')) {
            Some(Some((first, _))) => {
                out.entry(first.to_owned()).or_insert(Kind::Dir);
            }
            Some(None) if !rest.unwrap_or_default().is_empty() => {
                out.insert(rest.unwrap_or_default().to_owned(), kind);
            }
            _ => {}
        }
    }
    out
}

/// What `path` is in a tree given by its file paths and directory paths.
pub(super) fn find<'a>(
    files: impl IntoIterator<Item = &'a String>,
    dirs: impl IntoIterator<Item = &'a String>,
    path: &str,
) -> Option<Kind> {
    let mut found = None;
    for f in files {
        if f == path {
            return Some(Kind::File);
        }
        if write::within(f, path) {
            found = Some(Kind::Dir);
        }
    }
    if found.is_none() && dirs.into_iter().any(|d| write::within(d, path)) {
        found = Some(Kind::Dir);
    }
    found
}
