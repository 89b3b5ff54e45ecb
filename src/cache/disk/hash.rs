//! The content hash a sidecar records: BLAKE3 over the file's length and the hashes of its
//! leaves, fixed [`HASH_PIECE`]-byte pieces hashed in parallel, or the [`Leaf`]s a fill hashed
//! itself as it wrote them (gaps between them read back), so a commit need not read the file.

use std::fs::File;
use std::os::unix::fs::FileExt;

use rayon::prelude::*;

use crate::cache::with_scratch;

/// The tree hash's leaves: a piece of this many bytes is hashed per task, in parallel.
pub(super) const HASH_PIECE: u64 = 2 << 20;

/// The hash of bytes `start..start + len` of a file being filled: a leaf of its content hash.
/// A fill that returns leaves for (some of) the bytes it wrote spares the commit reading them
/// back; bytes no leaf covers are hashed from the file.
#[derive(Clone, Copy, Debug)]
pub struct Leaf {
    pub start: u64,
    pub len: u64,
    pub hash: [u8; 32],
}

impl Leaf {
    pub fn of(start: u64, bytes: &[u8]) -> Leaf {
        Leaf { start, len: bytes.len() as u64, hash: *blake3::hash(bytes).as_bytes() }
    }
}

/// BLAKE3 over the file's length and the hashes of its [`HASH_PIECE`]-byte pieces, hashed in
/// parallel on the rayon pool (a plain BLAKE3 of the whole file would run on one core).
pub fn content_hash(file: &File, len: u64) -> std::io::Result<String> {
    hash_leaves(file, &leaf_ends(len, &[]))
}

/// Where the leaves of a `len`-byte file's hash end: `recorded` (a sidecar's), else every
/// [`HASH_PIECE`] bytes.
pub(super) fn leaf_ends(len: u64, recorded: &[u64]) -> Vec<u64> {
    if !recorded.is_empty() {
        return recorded.to_vec();
    }
    (1..=len.div_ceil(HASH_PIECE)).map(|i| (i * HASH_PIECE).min(len)).collect()
}

/// Recorded leaf ends (a sidecar's) that can be checked: none, or increasing to `len`, each
/// leaf small enough to read into scratch memory.
pub(super) fn valid_ends(ends: &[u64], len: u64) -> bool {
    let mut at = 0;
    for &end in ends {
        if end <= at || end - at > LARGEST_LEAF {
            return false;
        }
        at = end;
    }
    ends.is_empty() || at == len
}

const LARGEST_LEAF: u64 = 64 << 20;

/// The root over the length and the leaves' hashes (the one formula for every leaf layout).
fn root(len: u64, leaves: &[[u8; 32]]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&len.to_le_bytes());
    for leaf in leaves {
        h.update(leaf);
    }
    h.finalize().to_hex().to_string()
}

/// The content hash with leaves ending at `ends`, reading the file on the rayon pool.
pub(super) fn hash_leaves(file: &File, ends: &[u64]) -> std::io::Result<String> {
    let leaf = |i: usize| {
        let at = if i == 0 { 0 } else { ends[i - 1] };
        with_scratch((ends[i] - at) as usize, |buf| {
            file.read_exact_at(buf, at)?;
            Ok(*blake3::hash(buf).as_bytes())
        })
    };
    let leaves: Vec<[u8; 32]> = (0..ends.len()).into_par_iter().map(leaf).collect::<std::io::Result<_>>()?;
    Ok(root(ends.last().copied().unwrap_or(0), &leaves))
}

/// A fill's leaves laid end to end over `0..len`, gaps becoming leaves of their own (split at
/// [`HASH_PIECE`]): the ends of the whole tiling, with each given leaf's hash, or None when
/// there are none, they overlap, pass the end or one is too large to check in scratch memory.
pub(super) fn tile(mut leaves: Vec<Leaf>, len: u64) -> Option<Vec<(u64, Option<[u8; 32]>)>> {
    if leaves.is_empty() {
        return None;
    }
    leaves.retain(|l| l.len > 0);
    leaves.sort_by_key(|l| l.start);
    let mut ends = vec![];
    let mut at = 0;
    let gap_to = |to: u64, ends: &mut Vec<(u64, Option<[u8; 32]>)>, at: &mut u64| {
        while *at < to {
            *at = (*at + HASH_PIECE).min(to);
            ends.push((*at, None));
        }
    };
    for l in &leaves {
        if l.start < at || l.start + l.len > len || l.len > LARGEST_LEAF {
            return None;
        }
        gap_to(l.start, &mut ends, &mut at);
        at = l.start + l.len;
        ends.push((at, Some(l.hash)));
    }
    gap_to(len, &mut ends, &mut at);
    Some(ends)
}

/// The content hash from a tiling ([`tile`]): given leaves as they are, gaps read from the file
/// on this thread, `pace` called before each.
pub(super) fn combine(
    file: &File,
    len: u64,
    tiling: &[(u64, Option<[u8; 32]>)],
    pace: &mut dyn FnMut(),
) -> std::io::Result<String> {
    let mut hashes = Vec::with_capacity(tiling.len());
    let mut at = 0;
    for &(end, hash) in tiling {
        hashes.push(match hash {
            Some(h) => h,
            None => with_scratch((end - at) as usize, |buf| {
                pace();
                file.read_exact_at(buf, at)?;
                Ok::<_, std::io::Error>(*blake3::hash(buf).as_bytes())
            })?,
        });
        at = end;
    }
    Ok(root(len, &hashes))
}
