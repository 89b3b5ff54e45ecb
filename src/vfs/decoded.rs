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
        match decode_into_cache(disk, &key, vfile, synth, &label) {
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
                let done = ahead_pool().install(|| decode_into_cache(&disk, &key, &vfile, &synth, &label));
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
/// are shared with the global pool by the kernel's scheduler instead.
fn ahead_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("llmfs-ahead-{i}"))
            .panic_handler(|panic| {
                tracing::error!("a task decoding ahead: {}", super::panic_message(&*panic))
            })
            .build()
            .expect("a thread pool for decoding ahead")
    })
}

/// The cached copy of `vfile`, decoding it if needed; and whether this call decoded it.
fn decode_into_cache(
    disk: &Arc<DiskCache>,
    key: &Key,
    vfile: &VFile,
    synth: &SynthFile,
    label: &str,
) -> Result<Option<(Arc<Cached>, bool)>, String> {
    let mut filled = false;
    let cached = disk.get_or_fill(key, vfile.size, label, |f| {
        filled = true;
        write_decoded(synth, f).map_err(|e| e.to_string())
    })?;
    Ok(cached.map(|c| (c, filled)))
}

/// Write all of `synth` into `out` (of its length): the header, then every tensor in pieces of
/// [`PIECE`] bytes decoded in parallel, each hashed (a [`Leaf`] of the cache's content hash,
/// while it is hot in the cache, so the commit need not read the file back: that read and hash
/// took 15-25% of a 2-core first load's CPU) and written straight into its place in a shared mapping of the
/// file (or, where the file cannot be mapped, decoded into scratch memory and written with
/// `pwrite`). The file's blocks are reserved first (fallocate), so a full disk fails the fill at
/// once rather than midway, and a write into the mapping cannot meet a full disk (which would be
/// a SIGBUS); a filesystem that cannot reserve is written by `pwrite`.
///
/// Why a mapping: buffered writes to one file serialize on its inode lock, so with `pwrite` the
/// fill ran at the speed of one memcpy stream into the page cache whatever the core count
/// (2.8-4.3 GB/s on 16 cores), and each piece was copied twice (decoded into scratch, copied
/// into the page cache). Page faults on one mapping run in parallel and the decoder writes each
/// byte once. (Mapping each piece on its own was measured 3x slower than `pwrite`: every mmap and
/// munmap waits for all page faults in flight; one mapping for the whole file avoids that.)
/// Which way is faster depends on the cores: see [`fill_by_mapping`].
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
        return write_by_pwrite(synth, out);
    }
    if !fill_by_mapping() || len == 0 {
        return write_by_pwrite(synth, out);
    }
    match Mapping::new(out, len as usize) {
        Ok(map) => write_by_mapping(synth, &map),
        Err(e) => {
            tracing::debug!("disk cache: cannot map the file being filled ({e}); writing it by pwrite");
            write_by_pwrite(synth, out)
        }
    }
}

/// Pool threads from which a fill goes through a mapping. Page faults cost more CPU than
/// `pwrite` (every new page is zeroed before it is written), which is a loss when the cores are
/// the limit; it pays when there are more cores than one inode's writes can keep busy.
const MAPPING_MIN_THREADS: usize = 8;

/// Whether fills write through a mapping: `LLMFS_DISK_FILL=mmap` or `pwrite`, else by the size
/// of the pool ([`MAPPING_MIN_THREADS`]).
fn fill_by_mapping() -> bool {
    static BY_MAPPING: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *BY_MAPPING.get_or_init(|| match std::env::var("LLMFS_DISK_FILL").as_deref() {
        Ok("mmap") => true,
        Ok("pwrite") => false,
        _ => rayon::current_num_threads() >= MAPPING_MIN_THREADS,
    })
}

/// A shared, writable mapping of a whole file, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; the pieces written through it from several threads are
// disjoint (see `write_by_mapping`).
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &std::fs::File, len: usize) -> std::io::Result<Mapping> {
        use std::os::fd::AsRawFd;
        // SAFETY: a new mapping of a file we own, of its length; nothing else maps it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping { ptr: ptr as *mut u8, len })
    }

    /// Bytes `at..at + n` of the file, to write.
    ///
    /// # Safety
    /// No other live slice may overlap this one.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, at: usize, n: usize) -> &mut [u8] {
        assert!(at + n <= self.len);
        // SAFETY: within the mapping; disjointness is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), n) }
    }

    /// Make the pages of `at..at + n` present and writable in one call (one fault-in walk instead
    /// of a fault per page), or drop them from this process's page tables: the page cache keeps
    /// them (dirty), the daemon's resident set does not. Advice only: an error changes nothing
    /// (MADV_POPULATE_WRITE needs Linux 5.14; without it the writes fault the pages in).
    fn advise(&self, at: usize, n: usize, advice: libc::c_int) {
        // SAFETY: within the mapping; both kinds of advice keep the file's contents.
        unsafe { libc::madvise(self.ptr.add(at) as *mut libc::c_void, n, advice) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no slice of it outlives the fill.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

const PAGE: usize = 4096;
/// Linux's MADV_POPULATE_WRITE (5.14+; not in every libc crate version).
const MADV_POPULATE_WRITE: libc::c_int = 23;

fn write_by_mapping(synth: &SynthFile, map: &Mapping) -> Result<Vec<Leaf>, ReadError> {
    // SAFETY: the header's bytes are no tensor's.
    unsafe { map.slice(0, synth.header.len()) }.copy_from_slice(&synth.header);
    let header = Leaf::of(0, &synth.header);
    let mut leaves: Vec<Leaf> = pieces(synth)
        .into_par_iter()
        .map(|(i, from, to)| {
            let t = &synth.tensors[i];
            let esize = t.source.dtype().size() as u64;
            let (at, n) = ((t.start + from * esize) as usize, ((to - from) * esize) as usize);
            // Whole pages only: a page at either end may hold a neighbour's bytes too, and stays
            // mapped until the end (dropping it while the neighbour writes could lose that write's
            // dirty bit).
            let (first, end) = (at.next_multiple_of(PAGE), (at + n) / PAGE * PAGE);
            if first < end {
                map.advise(first, end - first, MADV_POPULATE_WRITE);
            }
            // SAFETY: pieces are disjoint byte ranges of the file, each written by one task.
            let piece = unsafe { map.slice(at, n) };
            super::read::decode_elements(t, from as usize..to as usize, piece)?;
            let leaf = Leaf::of(at as u64, piece);
            if first < end {
                map.advise(first, end - first, libc::MADV_DONTNEED);
            }
            Ok(leaf)
        })
        .collect::<Result<_, ReadError>>()?;
    leaves.push(header);
    Ok(leaves)
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

fn write_by_pwrite(synth: &SynthFile, out: &std::fs::File) -> Result<Vec<Leaf>, ReadError> {
    out.write_all_at(&synth.header, 0).map_err(cache_io)?;
    let mut leaves: Vec<Leaf> = pieces(synth)
        .into_par_iter()
        .map(|(i, from, to)| {
            let t = &synth.tensors[i];
            let esize = t.source.dtype().size() as u64;
            with_scratch(((to - from) * esize) as usize, |buf| {
                super::read::decode_elements(t, from as usize..to as usize, buf)?;
                let at = t.start + from * esize;
                out.write_all_at(buf, at).map_err(cache_io)?;
                Ok(Leaf::of(at, buf))
            })
        })
        .collect::<Result<_, ReadError>>()?;
    leaves.push(Leaf::of(0, &synth.header));
    Ok(leaves)
}
