//! Variant files decoded whole into the disk cache, and read from there.
//!
//! Decoding behind page faults serves a loader one FUSE request at a time. Instead, the first
//! open of a synthesized file decodes all of it at once — its tensors in pieces, in parallel on
//! the rayon pool, streamed into a cache file (never held in memory) — and the handle then reads
//! that file: the kernel serves it directly (FUSE passthrough) where it can, the daemon by
//! `pread` where it cannot. Later opens, later processes and later mounts find it decoded.
//! The open waits for the decode; this keeps one rule for the whole life of a handle (passthrough
//! is chosen at open) and costs a loader nothing, since it reads every byte anyway.
//!
//! A file is cached under a key of everything its bytes depend on: the entry's generation and
//! file, the crate version, the synthesized header, and each entry of its chain as registered
//! (kind, recipe parameters, the files it reads and their fingerprints). A changed base is still
//! caught at open by the fingerprint check that runs before the cache is asked, so it gives EIO,
//! never cached bytes; a delta rewritten through `deltas/` has new file records, so a new key.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use rayon::prelude::*;

use super::{Fs, FsError, FsResult, Node, Target};
use crate::cache::disk::{Cached, DiskCache, Key, KeyBuilder, Leaf};
use crate::cache::with_scratch;
use crate::variant::{Content, ReadError, SourceFile, SynthFile, VFile};

/// Output bytes decoded per task: a multiple of every codec's chunk (the lossless delta's
/// 2^18 elements, quantization groups) for every element size, so no chunk is decoded twice,
/// and small enough that one task per core stays within the memory budget (16 x 2 MiB).
const PIECE: u64 = 2 << 20;

/// Smaller files (configs, a delta's stored index) are served through the daemon: a cache entry
/// (two files, two fsyncs) would cost more than it saves.
const MIN_CACHED: u64 = 1 << 20;

impl Fs {
    /// The open hook: a synthesized file of an entry is read from its decoded copy in the disk
    /// cache (made now if missing). Anything else, or no disk cache, is left as it is.
    pub(super) fn served_decoded(&self, node: &Node, target: Target) -> FsResult<Target> {
        let Some(disk) = self.disk.get() else { return Ok(target) };
        let (Node::File { entry, file, .. }, Target::Read(vfile)) = (node, &target) else {
            return Ok(target);
        };
        let Content::Synth(synth) = &vfile.content else { return Ok(target) };
        if vfile.size < MIN_CACHED {
            return Ok(target);
        }
        let Some(key) = self.decoded_key(entry, vfile, synth) else { return Ok(target) };
        let label = format!("{entry}/{file}");
        match decode_into_cache(disk, &key, vfile, synth, &label, None) {
            Ok(Some((cached, filled))) => {
                if filled {
                    self.decode_siblings(disk, entry, &vfile.name);
                }
                let source = cached
                    .file
                    .try_clone()
                    .and_then(|f| SourceFile::already_open(cached.path.clone(), f))
                    .map_err(|e| FsError::eio(format!("{label}: the disk cache's copy: {e}")))?;
                Ok(Target::Read(VFile {
                    name: vfile.name.clone(),
                    size: vfile.size,
                    content: Content::Passthrough(Arc::new(source)),
                }))
            }
            Ok(None) => Ok(target),
            // A fill that failed (a tensor that does not decode, a full cache disk) leaves the
            // file to the read path, where only the bytes that cannot be decoded answer EIO and
            // the rest of the file still reads, as it does with no disk cache.
            Err(e) => {
                tracing::warn!("{label}: not decoded into the disk cache, read through the daemon: {e}");
                Ok(target)
            }
        }
    }

    /// What `vfile`'s bytes depend on, or None when the view it came from is no longer the
    /// catalog's (the registry changed under it: serve it uncached rather than under a key of
    /// another version).
    fn decoded_key(&self, entry: &str, vfile: &VFile, synth: &Arc<SynthFile>) -> Option<Key> {
        let catalog = self.catalog.read().unwrap_or_else(|e| e.into_inner());
        let (created, view) = catalog.views.get(entry)?;
        let current = view.file(&vfile.name).map(|f| &f.content);
        if !matches!(current, Some(Content::Synth(s)) if Arc::ptr_eq(s, synth)) {
            return None;
        }
        let mut key = KeyBuilder::new("llmfs decoded file");
        key.part(env!("CARGO_PKG_VERSION").as_bytes())
            .part(entry.as_bytes())
            .part(&created.to_le_bytes())
            .part(vfile.name.as_bytes())
            .part(&vfile.size.to_le_bytes())
            .part(&synth.header);
        for name in catalog.registry.chain(entry).ok()? {
            let e = catalog.registry.entries.get(name)?;
            key.part(name.as_bytes()).part(&serde_json::to_vec(e).ok()?);
        }
        Some(key.finish())
    }

    /// After a fill, decode the entry's other synthesized files in the background, one after
    /// another: a loader reading shard 1 (at page-cache speed) opens shard 2 next.
    fn decode_siblings(&self, disk: &Arc<DiskCache>, entry: &str, opened: &str) {
        let Some(view) =
            self.catalog.read().unwrap_or_else(|e| e.into_inner()).views.get(entry).map(|(_, v)| v.clone())
        else {
            return;
        };
        let todo: Vec<(Key, VFile, Arc<SynthFile>, String)> = view
            .files
            .iter()
            .filter(|f| f.name != opened)
            .filter_map(|f| match &f.content {
                Content::Synth(s) if f.size >= MIN_CACHED && super::check_sources(f).is_ok() => {
                    let key = self.decoded_key(entry, f, s)?;
                    Some((key, f.clone(), s.clone(), format!("{entry}/{}", f.name)))
                }
                _ => None,
            })
            .collect();
        if todo.is_empty() {
            return;
        }
        let disk = disk.clone();
        std::thread::spawn(move || {
            for (key, vfile, synth, label) in todo {
                let done = decode_into_cache(&disk, &key, &vfile, &synth, &label, ahead_pool());
                if let Err(e) = done {
                    tracing::warn!("disk cache: decoding {label} ahead: {e}");
                }
            }
        });
    }
}

/// The threads that decode files ahead of the reader. Not the global pool: every open runs a
/// short parallel job there (the sampled check of its sources), and a job sent to a busy rayon
/// pool from outside waits until the workers' own queues are empty, so an open behind a sibling's
/// decode waited for all of it (measured: `load_file`'s open of the shard just decoded took as
/// long as the next shard's whole decode, 0.17 s of a 0.43 s first load on 2 cores). The cores
/// are shared with the global pool by the kernel's scheduler instead. None (logged) when its
/// threads cannot be started: the global pool then decodes ahead, as before.
fn ahead_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("llmfs-ahead-{i}"))
            .panic_handler(|panic| {
                tracing::error!("a task decoding ahead: {}", super::panic_message(&*panic))
            })
            .build()
            .map_err(|e| tracing::warn!("no threads of their own for decoding ahead ({e}): the pool's"))
            .ok()
    })
    .as_ref()
}

/// The cached copy of `vfile`, decoding it if needed; and whether this call decoded it.
///
/// The caller must not be a thread of a rayon pool, and the decode runs on `pool` (None: the
/// global one). A fill holds its key's slot while its pieces run; a pool thread that led a fill
/// would, while it waits for its pieces, steal other jobs of the pool, one of which may be the
/// same file's fill (two opens each decoding their siblings ahead): a second entry into the
/// slot from the thread that holds it, which waits for itself forever (seen in CI: a reader
/// hung on a file being decoded ahead).
fn decode_into_cache(
    disk: &Arc<DiskCache>,
    key: &Key,
    vfile: &VFile,
    synth: &SynthFile,
    label: &str,
    pool: Option<&rayon::ThreadPool>,
) -> Result<Option<(Arc<Cached>, bool)>, String> {
    debug_assert!(rayon::current_thread_index().is_none(), "a fill led from a pool thread");
    let mut filled = false;
    let cached = disk.get_or_fill(key, vfile.size, label, |f| {
        filled = true;
        let write = || write_decoded(synth, f).map_err(|e| e.to_string());
        match pool {
            Some(pool) => pool.install(write),
            None => write(),
        }
    })?;
    Ok(cached.map(|c| (c, filled)))
}

/// Write all of `synth` into `out` (of its length): the header, then every tensor in pieces of
/// [`PIECE`] bytes decoded in parallel, each written at its offset as soon as it is done. The
/// file's blocks are reserved first (fallocate), so a full disk fails the fill at once rather
/// than midway.
///
/// With cores to spare ([`HASH_IN_FILL_MIN_THREADS`]) each piece is also hashed here, while it
/// is hot in the cache, as a [`Leaf`] of the cache's content hash, so the commit need not read
/// the file back. With few cores the commit does it instead, after the fill, at the lowest
/// priority: the fill is on the loader's critical path and the cores are all busy during it,
/// while the commit runs in the idle tail of the load (the loader reading the last file alone).
///
/// Measured and not kept (issue 13): writing through one shared mapping of the file instead of
/// `pwrite`. Buffered writes to one file serialize on its inode lock (`scripts/fill_bench.c` on
/// the lent 16-core host: 4.7 GB/s with 16 writers of a generated pattern, against 13 GB/s
/// through a mapping), but a real fill ran at the same 3.2-4.8 GB/s either way there (the limit
/// is elsewhere), and on 2 cores the mapping's page faults, which zero each page before it is
/// written, made fills about 2x slower. (Mapping each piece on its own was 3x slower still:
/// every mmap and munmap waits for all page faults in flight.)
pub fn write_decoded(synth: &SynthFile, out: &std::fs::File) -> Result<Vec<Leaf>, ReadError> {
    use std::os::fd::AsRawFd;
    let len = synth.tensors.last().map_or(synth.header.len() as u64, |t| t.end);
    // SAFETY: fallocate on a descriptor we own.
    if len > 0 && unsafe { libc::fallocate(out.as_raw_fd(), 0, 0, len as libc::off_t) } != 0 {
        let e = std::io::Error::last_os_error();
        // Filesystems without fallocate (EOPNOTSUPP) are written without the reservation.
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(cache_io(e));
        }
    }
    write_by_pwrite(synth, out, hash_in_fill())
}

/// Pool threads from which a fill hashes its own pieces (see [`write_decoded`]).
const HASH_IN_FILL_MIN_THREADS: usize = 8;

/// Whether fills hash their pieces: by the pool's size, or `LLMFS_HASH_IN_FILL=1`/`0` (so the
/// tests can run both ways on any machine).
fn hash_in_fill() -> bool {
    static HASH: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HASH.get_or_init(|| match std::env::var("LLMFS_HASH_IN_FILL").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => rayon::current_num_threads() >= HASH_IN_FILL_MIN_THREADS,
    })
}

/// (tensor index, first element, end element) of every piece of `synth`'s tensors.
fn pieces(synth: &SynthFile) -> Vec<(usize, u64, u64)> {
    let mut pieces = vec![];
    for (i, t) in synth.tensors.iter().enumerate() {
        let esize = t.source.dtype().size() as u64;
        let elems = (t.end - t.start) / esize;
        let per = (PIECE / esize).max(1);
        let mut at = 0;
        while at < elems {
            pieces.push((i, at, (at + per).min(elems)));
            at += per;
        }
    }
    pieces
}

fn cache_io(e: std::io::Error) -> ReadError {
    ReadError::Io { path: "the disk cache".into(), reason: e.to_string() }
}

fn write_by_pwrite(synth: &SynthFile, out: &std::fs::File, hash: bool) -> Result<Vec<Leaf>, ReadError> {
    out.write_all_at(&synth.header, 0).map_err(cache_io)?;
    let leaves: Vec<Option<Leaf>> = pieces(synth)
        .into_par_iter()
        .map(|(i, from, to)| {
            let t = &synth.tensors[i];
            let esize = t.source.dtype().size() as u64;
            with_scratch(((to - from) * esize) as usize, |buf| {
                super::read::decode_elements(t, from as usize..to as usize, buf)?;
                let at = t.start + from * esize;
                out.write_all_at(buf, at).map_err(cache_io)?;
                Ok(hash.then(|| Leaf::of(at, buf)))
            })
        })
        .collect::<Result<_, ReadError>>()?;
    let mut leaves: Vec<Leaf> = leaves.into_iter().flatten().collect();
    if hash {
        leaves.push(Leaf::of(0, &synth.header));
    }
    Ok(leaves)
}
