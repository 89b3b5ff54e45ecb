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
//! file, the crate version, the synthesized header, each entry of its chain by its recipe (kind
//! and parameters, not its file list), and the files this file reads with their fingerprints. A changed base is still
//! caught at open by the fingerprint check that runs before the cache is asked, so it gives EIO,
//! never cached bytes; a delta rewritten through `deltas/` has new file records, so a new key.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use rayon::prelude::*;

mod pwrite;

use super::{Fs, FsError, FsResult, Node, Target};
use crate::cache::disk::{Cached, DiskCache, Key, KeyBuilder, Leaf, Written};
use crate::cache::memory::{MemFile, MemoryCache, WrittenPages};
use crate::cache::with_scratch;
use crate::variant::{Content, EntryView, ReadError, SourceFile, SynthFile, VFile};

/// Output bytes decoded per task: a multiple of every codec's chunk (the lossless delta's
/// 2^18 elements, quantization groups) for every element size, so no chunk is decoded twice,
/// and small enough that one task per core stays within the memory budget (16 x 2 MiB).
const PIECE: u64 = 2 << 20;

/// Smaller files (configs, a delta's stored index) are served through the daemon: a cache entry
/// (two files, two fsyncs) would cost more than it saves.
const MIN_CACHED: u64 = 1 << 20;

impl Fs {
    /// The open hook: a synthesized file of an entry is read from its decoded copy in the disk
    /// cache (made now if missing). Anything else, or no disk cache, is left as it is. The first
    /// open of any file of an entry (a loader opens its config.json or shard index first) starts
    /// the fills of all the entry's other synthesized files, at once (see [`EntryFills`]).
    pub(super) fn served_decoded(&self, node: &Node, target: Target) -> FsResult<Target> {
        let tiers = self.tiers();
        if tiers.disk.is_none() && tiers.memory.is_none() {
            return Ok(target);
        }
        let Node::File { entry, file, .. } = node else { return Ok(target) };
        self.fill_entry(&tiers, entry, file);
        let Target::Read(vfile) = &target else { return Ok(target) };
        let Content::Synth(synth) = &vfile.content else { return Ok(target) };
        if vfile.size < MIN_CACHED {
            return Ok(target);
        }
        let Some(key) = self.decoded_key(entry, vfile, synth) else { return Ok(target) };
        let label = format!("{entry}/{file}");
        match decode_into_cache(&tiers, &key, vfile, synth, &label, None) {
            Ok(Some(served)) => {
                let source = SourceFile::already_open(served.path, served.file)
                    .map_err(|e| FsError::eio(format!("{label}: the decoded copy: {e}")))?;
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
                tracing::warn!("{label}: not decoded into the cache, read through the daemon: {e}");
                Ok(target)
            }
        }
    }

    /// `llmfs warm`: decode every synthesized file of `entry` into the disk cache now, all at
    /// once (as a first open does), and fetch what its files read from an object store; `done`
    /// is told each file (its name and size) as it is ready. The files that could not be
    /// decoded, with why.
    pub fn warm(&self, entry: &str, done: &(dyn Fn(&str, u64) + Sync)) -> FsResult<Vec<String>> {
        let created = self.entry_created(entry).ok_or(FsError::new(libc::ENOENT))?;
        let view = self.view(entry, created)?;
        // Straight into the disk tier: what warm is for.
        let tiers = Tiers { disk: self.disk.get().cloned(), memory: None };
        let failed = std::sync::Mutex::new(vec![]);
        std::thread::scope(|scope| {
            for f in &view.files {
                let (tiers, failed) = (&tiers, &failed);
                scope.spawn(move || {
                    let label = format!("{entry}/{}", f.name);
                    let result = super::check_sources(f).map_err(|e| e.to_string()).and_then(|()| {
                        let Content::Synth(synth) = &f.content else { return Ok(()) };
                        if f.size < MIN_CACHED || tiers.disk.is_none() {
                            return Ok(());
                        }
                        let key = self.decoded_key(entry, f, synth).ok_or("the registry changed")?;
                        match decode_into_cache(tiers, &key, f, synth, &label, ahead_pool())? {
                            Some(_) => Ok(()),
                            None => Err("the disk cache cannot hold it".to_owned()),
                        }
                    });
                    match result {
                        Ok(()) => done(&f.name, f.size),
                        Err(e) => {
                            failed.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{label}: {e}"))
                        }
                    }
                });
            }
        });
        Ok(failed.into_inner().unwrap_or_else(|e| e.into_inner()))
    }

    /// The sizes of `entry`'s files (what [`Fs::warm`] goes through), for a progress bar.
    pub fn file_sizes(&self, entry: &str) -> FsResult<Vec<(String, u64)>> {
        let created = self.entry_created(entry).ok_or(FsError::new(libc::ENOENT))?;
        Ok(self.view(entry, created)?.files.iter().map(|f| (f.name.clone(), f.size)).collect())
    }

    /// Serve decoded files from memory first (see [`crate::cache::memory`]), bounded by
    /// `--memory-cache-size`.
    pub fn set_memory_cache(&self, memory: Arc<MemoryCache>) {
        let _ = self.memory.set(memory);
    }

    fn tiers(&self) -> Tiers {
        Tiers { disk: self.disk.get().cloned(), memory: self.memory.get().cloned() }
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
        // Each entry of the chain by its recipe, without its file list: the files this one reads
        // come next, each by what identifies its bytes. An entry whose other files change (the
        // next file of a `cp -r` into deltas/ committed while this one is read) keeps this
        // file's key, so its decoded copy, and the kernel's backing file of its inode, stay
        // the same. (Keyed by the whole record, the open after each commit decoded the file
        // again and met the previous copy still held by the kernel: EBUSY, a CI flake.)
        for name in catalog.registry.chain(entry).ok()? {
            let mut recipe = serde_json::to_value(catalog.registry.entries.get(name)?).ok()?;
            recipe.as_object_mut()?.remove("files");
            key.part(name.as_bytes()).part(&serde_json::to_vec(&recipe).ok()?);
        }
        let mut sources = vec![];
        synth.tensors.iter().for_each(|t| t.source.files(&mut sources));
        let mut read: Vec<(&std::path::Path, &crate::registry::Fingerprint)> =
            sources.iter().map(|s| (s.path.as_path(), &s.fingerprint)).collect();
        read.sort_by(|a, b| a.0.cmp(b.0));
        read.dedup_by(|a, b| a.0 == b.0);
        for (path, fingerprint) in read {
            key.part(path.as_os_str().as_encoded_bytes()).part(&serde_json::to_vec(fingerprint).ok()?);
        }
        Some(key.finish())
    }

    /// At the first open of a file of `entry` in this mount (per version of its view), start
    /// filling every other synthesized file of it into the disk cache, all at once, each led
    /// from a thread of its own with its pieces on the ahead pool: the cores are spread over the
    /// files, and no file waits for another. (Filled one after another, a first load was the
    /// fills in series, each bound on many cores by its one file's inode lock: issue 23.) The
    /// opened file's own fill, if any, is its open's, on the global pool. Files already decoded
    /// are found in the cache at once.
    fn fill_entry(&self, tiers: &Tiers, entry: &str, opened: &str) {
        let Some(view) =
            self.catalog.read().unwrap_or_else(|e| e.into_inner()).views.get(entry).map(|(_, v)| v.clone())
        else {
            return;
        };
        if !self.entry_fills.first_open(entry, &view) {
            return;
        }
        for f in view
            .files
            .iter()
            .filter(|f| f.name != opened && read_together(opened, &f.name) && f.size >= MIN_CACHED)
        {
            let Content::Synth(synth) = &f.content else { continue };
            let Some(key) = self.decoded_key(entry, f, synth) else { continue };
            let (tiers, vfile, synth, label) =
                (tiers.clone(), f.clone(), synth.clone(), format!("{entry}/{}", f.name));
            let spawned = std::thread::Builder::new().name("llmfs-fill".into()).spawn(move || {
                // Its sources as an open checks them (sampled hashes, once per mount): a changed
                // base is left to the open, which answers EIO.
                // On the ahead pool: sent to the global one, busy with the opened file's fill,
                // this check waited for that whole fill before this file's could start.
                let check = || super::check_sources(&vfile);
                let checked = match ahead_pool() {
                    Some(pool) => pool.install(check),
                    None => check(),
                };
                if checked.is_err() {
                    return;
                }
                if let Err(e) = decode_into_cache(&tiers, &key, &vfile, &synth, &label, ahead_pool()) {
                    tracing::warn!("disk cache: decoding {label} ahead: {e}");
                }
            });
            if let Err(e) = spawned {
                tracing::warn!("disk cache: no thread to decode {entry}/{} ahead: {e}", f.name);
            }
        }
    }
}

/// Whether a loader that opened `opened` reads `other` too: the entry's safetensors files (and
/// config.json, index, tokenizer) go together, while each GGUF view is a whole model on its own
/// (llama.cpp maps one). So opening a GGUF file fills no other file, and opening the safetensors
/// side fills no GGUF view: the five GGUF types cost several times the safetensors' decode,
/// and a first open that started them all made the one asked for wait behind the others.
fn read_together(opened: &str, other: &str) -> bool {
    let in_gguf = |name: &str| {
        name.strip_prefix(crate::variant::gguf::GGUF_DIR).is_some_and(|rest| rest.starts_with('/'))
    };
    !in_gguf(opened) && !in_gguf(other)
}

/// The entries whose fills this mount started, by the view they were started for: a registry
/// change (a rewritten delta) makes a new view, whose first open starts them again.
#[derive(Default)]
pub(super) struct EntryFills(std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<EntryView>>>);

impl EntryFills {
    /// True the first time it is asked for `entry`'s `view`.
    fn first_open(&self, entry: &str, view: &Arc<EntryView>) -> bool {
        let mut done = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if done.get(entry).and_then(std::sync::Weak::upgrade).is_some_and(|v| Arc::ptr_eq(&v, view)) {
            return false;
        }
        done.insert(entry.to_owned(), Arc::downgrade(view));
        true
    }
}

/// The threads that decode files ahead of the reader. Not the global pool: every open runs a
/// short parallel job there (the sampled check of its sources), and a job sent to a busy rayon
/// pool from outside waits until the workers' own queues are empty, so an open behind a sibling's
/// decode waited for all of it (measured: `load_file`'s open of the shard just decoded took as
/// long as the next shard's whole decode, 0.17 s of a 0.43 s first load on 2 cores). The cores
/// are shared with the global pool by the kernel's scheduler instead, the ahead pool's threads
/// at a lower priority ([`ahead_nice`]). None (logged) when its threads cannot be started: the
/// global pool then decodes ahead, as before.
fn ahead_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let nice = ahead_nice();
        rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("llmfs-ahead-{i}"))
            .start_handler(move |_| lower_priority(nice))
            .panic_handler(|panic| {
                tracing::error!("a task decoding ahead: {}", super::panic_message(&*panic))
            })
            .build()
            .map_err(|e| tracing::warn!("no threads of their own for decoding ahead ({e}): the pool's"))
            .ok()
    })
    .as_ref()
}

/// How much lower than the rest of the daemon the ahead pool's threads run (a nice increment;
/// `LLMFS_AHEAD_NICE=N`, 0 to 19, 0: the same priority). A loader reads the file it opened
/// first, whose fill runs on the global pool, while the fills of the entry's other files run on
/// the ahead pool: at the same priority they shared the cores evenly, so on the lent 16-core
/// host both shards of a 6000 MiB model finished filling together (0.54 s) and only then could
/// the loader read shard 1 (done at 0.92 s). Niced, the opened file's fill (and the daemon's
/// request threads) get the cores first and the siblings what is left: shard 1 is ready sooner,
/// and shard 2 fills while the loader reads shard 1 (2 cores, 1100 MiB model, medians of 5:
/// shard 1 of a cast filled in 0.33-0.35 s instead of 0.59-0.62, first loads of casts 16-33%
/// faster; a lossless delta, decode-bound there, the same). Nice, not `SCHED_IDLE`: a niced thread
/// still gets its weight's share of a busy machine (nice 10: about 1/10 of a nice-0 thread's),
/// so a fill ahead finishes however loaded the cores are, and a reader that opens a file filled
/// ahead waits for it with the cores otherwise idle. The priority cannot be raised back later
/// (that takes `CAP_SYS_NICE`), so it is the pool threads', set once as each starts. Linux's
/// nice is per thread; with autogroup scheduling it orders the daemon's threads among
/// themselves, not against the loader's session.
///
/// Only with few cores by default (fewer than [`AHEAD_NICE_MAX_THREADS`] pool threads): on the
/// lent 16-core host (6000 MiB model, `fill_timeline.py`, one call, dd26d1f) niced fills ahead
/// made first loads slower, not faster: the lossless delta's shard 2 finished at 1.42 s instead
/// of 0.84 (loader done at 1.55 s against 1.05), the f16 cast's at 0.72 s instead of 0.61
/// (`load_file` median 8.6 GB/s against 9.0); there the cores are not what the shards wait for.
fn ahead_nice() -> i32 {
    let default = if rayon::current_num_threads() < AHEAD_NICE_MAX_THREADS { AHEAD_NICE } else { 0 };
    match std::env::var("LLMFS_AHEAD_NICE") {
        Err(_) => default,
        Ok(v) => v.parse::<i32>().map(|n| n.clamp(0, 19)).unwrap_or_else(|_| {
            tracing::warn!("LLMFS_AHEAD_NICE={v:?} is not a number of 0 to 19: {default}");
            default
        }),
    }
}

/// [`ahead_nice`]'s default with fewer than [`AHEAD_NICE_MAX_THREADS`] pool threads.
const AHEAD_NICE: i32 = 10;

/// Pool threads from which fills ahead run at the opened file's priority (see [`ahead_nice`]).
const AHEAD_NICE_MAX_THREADS: usize = 8;

/// Lower this thread's priority: raise its nice value by `by` (at most to 19); a failure is
/// logged and changes nothing.
fn lower_priority(by: i32) {
    if by == 0 {
        return;
    }
    // SAFETY: gettid has no preconditions; a Linux thread id is a process id for get/setpriority.
    let tid = unsafe { libc::gettid() } as libc::id_t;
    // getpriority may return -1 as a nice value: errno, cleared before, tells an error apart.
    // SAFETY: errno is this thread's; getpriority on this thread.
    let now = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, tid)
    };
    let failed =
        |what: &str| tracing::warn!("{what} of a thread decoding ahead: {}", std::io::Error::last_os_error());
    if now == -1 && std::io::Error::last_os_error().raw_os_error() != Some(0) {
        return failed("getpriority");
    }
    // SAFETY: setpriority on this thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, (now + by).min(19)) } != 0 {
        failed("setpriority");
    }
}

/// Where decoded files are kept: memory first, then disk; either may be off.
#[derive(Clone)]
pub(crate) struct Tiers {
    pub disk: Option<Arc<DiskCache>>,
    pub memory: Option<Arc<MemoryCache>>,
}

/// A decoded file to serve: the open file and the path that names its content (the disk tier's
/// path of its key for both tiers, so that the kernel's one backing file per inode is the same
/// content whichever tier an open got it from).
pub(crate) struct Served {
    pub file: std::fs::File,
    pub path: std::path::PathBuf,
}

/// The decoded copy of `vfile` (cached under `key`), decoding it if no tier has it: into
/// memory where the memory tier has room (then written to the disk tier in the background),
/// else into the disk tier. None: neither tier can hold it.
///
/// The caller must not be a thread of a rayon pool, and the decode runs on `pool` (None: the
/// global one). A fill holds its key's slot while its pieces run; a pool thread that led a fill
/// would, while it waits for its pieces, steal other jobs of the pool, one of which may be the
/// same file's fill (two opens each decoding their siblings ahead): a second entry into the
/// slot from the thread that holds it, which waits for itself forever (seen in CI: a reader
/// hung on a file being decoded ahead).
pub(crate) fn decode_into_cache(
    tiers: &Tiers,
    key: &Key,
    vfile: &VFile,
    synth: &Arc<SynthFile>,
    label: &str,
    pool: Option<&rayon::ThreadPool>,
) -> Result<Option<Served>, String> {
    debug_assert!(rayon::current_thread_index().is_none(), "a fill led from a pool thread");
    let path = match &tiers.disk {
        Some(disk) => disk.dir().join(key.hex()),
        None => std::path::PathBuf::from(format!("/memfd:llmfs/{}", key.hex())),
    };
    let from_disk = |c: Arc<Cached>| -> Result<Option<Served>, String> {
        let file = c.file.try_clone().map_err(|e| e.to_string())?;
        Ok(Some(Served { file, path: c.path.clone() }))
    };
    if let Some(memory) = &tiers.memory {
        if let Some(m) = memory.get(key) {
            return Ok(Some(Served { file: m.file.try_clone().map_err(|e| e.to_string())?, path }));
        }
        // Decoded before (a committed disk entry), or being decoded into the disk tier now
        // (the memory tier was full): that copy, not a second decode.
        let disk_has = tiers.disk.as_ref().is_some_and(|d| d.in_flight(key));
        if let Some(c) = tiers.disk.as_ref().and_then(|d| d.get(key, vfile.size)) {
            return from_disk(c);
        }
        if !disk_has {
            let fill = |bytes: &mut [u8], written: WrittenPages<'_>| {
                let written = drop_mapped().then_some(written);
                let mut write = || decode_into(synth, bytes, written);
                match pool {
                    Some(pool) => pool.install(write),
                    None => write(),
                }
                .map_err(|e| e.to_string())
            };
            if let Some((m, filled)) = memory.get_or_fill(key, vfile.size, label, fill)? {
                let file = m.file.try_clone().map_err(|e| e.to_string())?;
                if filled {
                    persist(tiers, *key, m, label.to_owned());
                }
                return Ok(Some(Served { file, path }));
            }
        }
    }
    let Some(disk) = &tiers.disk else { return Ok(None) };
    let cached = disk.get_or_fill_written(key, vfile.size, label, "decoded", |f| {
        // No leaves: the commit hashes the file it reads back (see [`write_decoded`]).
        let write = || {
            write_decoded(synth, f)
                .map(|refold| Written { leaves: vec![], refold })
                .map_err(|e| e.to_string())
        };
        match pool {
            Some(pool) => pool.install(write),
            None => write(),
        }
    })?;
    match cached {
        Some(c) => from_disk(c),
        None => Ok(None),
    }
}

/// Write a file just decoded into memory to the disk tier, on a thread of its own at the
/// lowest priority (behind the reader, who is served from memory meanwhile), then let the
/// memory tier evict it. The disk tier commits it as it commits any fill (crash safe, hashed:
/// the leaves are hashed here, while the bytes are hot).
fn persist(tiers: &Tiers, key: Key, m: Arc<MemFile>, label: String) {
    let Some(memory) = tiers.memory.clone() else { return };
    let disk = tiers.disk.clone();
    let run = move || {
        // SAFETY: setpriority on this thread (a Linux thread id is a process id for it).
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
        if let Some(disk) = disk {
            let copied = disk.get_or_fill_as(&key, m.len, &label, "stored from memory", |out| {
                copy_out(&m.file, out, m.len)
            });
            if let Err(e) = copied {
                tracing::warn!("disk cache: writing {label} from memory: {e}");
            }
        }
        memory.persisted(&key);
    };
    let (memory, key2) = (tiers.memory.clone(), key);
    if let Err(e) = std::thread::Builder::new().name("llmfs-persist".into()).spawn(run) {
        tracing::warn!("no thread to write {key2:?} to the disk cache: {e}");
        if let Some(memory) = memory {
            memory.persisted(&key2);
        }
    }
}

/// Copy `len` bytes of `from` into `out` (a disk-tier fill), hashing them as leaves on the way.
fn copy_out(from: &std::fs::File, out: &std::fs::File, len: u64) -> Result<Vec<Leaf>, String> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor we own.
    if len > 0 && unsafe { libc::fallocate(out.as_raw_fd(), 0, 0, len as libc::off_t) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e.to_string());
        }
    }
    let mut leaves = vec![];
    let mut at = 0;
    while at < len {
        let n = PIECE.min(len - at);
        let leaf = with_scratch(n as usize, |buf| {
            from.read_exact_at(buf, at)?;
            out.write_all_at(buf, at)?;
            Ok::<_, std::io::Error>(Leaf::of(at, buf))
        })
        .map_err(|e| e.to_string())?;
        leaves.push(leaf);
        at += n;
    }
    Ok(leaves)
}

/// Write all of `synth` into `out` (its bytes, in memory: a shared mapping of a cache file or
/// memfd): the header, then every tensor in pieces of [`PIECE`] bytes decoded in parallel, each
/// straight into its place (no copy), giving back each piece's pages through `written` once it
/// is written (see [`drop_mapped`]).
fn decode_into(
    synth: &SynthFile,
    out: &mut [u8],
    written: Option<WrittenPages<'_>>,
) -> Result<(), ReadError> {
    let len = synth.size;
    if out.len() as u64 != len {
        return Err(ReadError::Decode(format!("{} bytes to fill, {len} to write", out.len())));
    }
    let header = synth.header.len();
    out[..header].copy_from_slice(&synth.header);
    if let Some(w) = &written {
        w.release(0..header);
    }
    /// The output's address, shared by the pieces, which write disjoint ranges of it.
    #[derive(Clone, Copy)]
    struct Out(*mut u8);
    // SAFETY: only used to write disjoint ranges of one buffer that outlives the parallel loop.
    unsafe impl Send for Out {}
    // SAFETY: as above.
    unsafe impl Sync for Out {}
    impl Out {
        /// The address `at` bytes in (a method, so a closure captures the whole `Out`, which is
        /// Send, rather than its raw pointer, which is not).
        fn at(self, at: usize) -> *mut u8 {
            // SAFETY: callers stay within the buffer (see below).
            unsafe { self.0.add(at) }
        }
    }
    let base = Out(out.as_mut_ptr());
    pieces(synth)?.into_par_iter().try_for_each(|(i, from, to)| {
        let t = &synth.tensors[i];
        let esize = t.source.stored_type().block_bytes() as u64;
        let at = (t.start + from * esize) as usize;
        let n = ((to - from) * esize) as usize;
        // SAFETY: pieces tile the tensors' ranges without overlap, all within `out` (a tensor
        // ends at or before `len`, checked above), so each task writes its own bytes only.
        let dst = unsafe { std::slice::from_raw_parts_mut(base.at(at), n) };
        super::read::decode_elements(t, from as usize..to as usize, dst)?;
        if let Some(w) = &written {
            w.release(at..at + n);
        }
        Ok(())
    })
}

/// Write all of `synth` into `out` (of its length): the header, then every tensor in pieces of
/// [`PIECE`] bytes decoded in parallel, each written at its offset as soon as it is done. The
/// file's blocks are reserved first (fallocate), so a full disk fails the fill at once rather
/// than midway.
///
/// Nothing is hashed here: the commit reads the file back and hashes it, after the fill, at the
/// lowest priority, while a core is spare. The fill is on the loader's critical path, the
/// commit is not. Hashing each piece here while it was hot in the cache (so the commit need
/// not read the file back) made fills 35-45 % slower on 2 cores and first loads slower on 16
/// too: on the lent 16-core host, two calls with the two ways alternating (6000 MiB model,
/// `scripts/bench_load_results/16core-session16-hash.txt`), hashed here against by the commit,
/// GB/s: f16 cast 7.8-12.5 against 10.6-14.7, q8 7.1-10.3 against 9.7-12.6, LoRA 4.0-5.2
/// against 5.8-7.1; the commit's hash won 18 of 20 pairs of rounds.
///
/// With many pool threads ([`FILL_BY_MAPPING_MIN_THREADS`]) the pieces are decoded straight
/// into one shared mapping of the file, not written by `pwrite`: buffered writes to one file
/// serialize on its inode lock (`scripts/fill_bench.c` on the lent 16-core host: 4.7 GB/s with
/// 16 writers of a generated pattern, against 13 GB/s through a mapping), and a real fill of a
/// cast took as long with 4 threads as with 16 there (`scripts/fill_probe_device.sh`). On 2
/// cores the mapping's page faults, which zero each page before it is written, made fills about
/// 2x slower, so few threads keep `pwrite`. (Mapping each piece on its own was 3x slower still:
/// every mmap and munmap waits for all page faults in flight.)
///
/// Returns whether the disk cache's commit should re-fold the file into 2 MiB folios (its pieces
/// were written unaligned to 2 MiB).
pub fn write_decoded(synth: &SynthFile, out: &std::fs::File) -> Result<bool, ReadError> {
    use std::os::fd::AsRawFd;
    let len = synth.size;
    // SAFETY: fallocate on a descriptor we own.
    let reserved = len > 0 && unsafe { libc::fallocate(out.as_raw_fd(), 0, 0, len as libc::off_t) } == 0;
    if len > 0 && !reserved {
        let e = std::io::Error::last_os_error();
        // Filesystems without fallocate (EOPNOTSUPP) are written without the reservation.
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(cache_io(e));
        }
    }
    // Padding (a GGUF's alignment) is the zeros of a file of the full length.
    out.set_len(len).map_err(cache_io)?;
    // Only into reserved blocks: a page fault that finds the disk full kills the process
    // (SIGBUS), where a pwrite returns ENOSPC.
    if reserved && fill_by_mapping() {
        if let Some(mut map) = crate::cache::memory::SharedMap::new(out, len as usize) {
            let (bytes, written) = map.split();
            return decode_into(synth, bytes, drop_mapped().then_some(written)).map(|()| false);
        }
    }
    pwrite::write_by_pwrite(synth, out)
}

/// Pool threads from which a fill writes through a shared mapping (see [`write_decoded`]).
const FILL_BY_MAPPING_MIN_THREADS: usize = 8;

/// Whether fills write the cache file through one shared mapping rather than by `pwrite`: by
/// the pool's size, or `LLMFS_FILL_BY_MAPPING=1`/`0` (so the tests run both ways on any
/// machine). Buffered writes to one file serialize on its inode lock, page faults do not: on
/// the lent 16-core host a cast's fill took as long with 4 threads as with 16 by `pwrite`.
fn fill_by_mapping() -> bool {
    static MAPPING: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MAPPING.get_or_init(|| {
        env_switch("LLMFS_FILL_BY_MAPPING", || rayon::current_num_threads() >= FILL_BY_MAPPING_MIN_THREADS)
    })
}

/// Whether a fill through a shared mapping (the disk tier's [`fill_by_mapping`], the memory
/// tier's always) gives back each piece's pages as soon as the piece is written
/// ([`WrittenPages::release`]), or `LLMFS_FILL_DROP_MAPPED=0` keeps them mapped until the file
/// is done. Kept, every page of the file counted in the daemon's RSS until then: its peak RSS
/// grew by the size of the largest files filled at once (6.0 GB for a 6 GB model on the lent
/// 16-core host), page cache shared with the readers but what operators see. Given back, the
/// daemon's peak RSS stays within `--cache-size` + 64 MiB (tests/mount.rs,
/// `mapped_fills_keep_the_daemon_small`). The cost is one `madvise` per 2 MiB piece (a TLB
/// flush on the cores running the daemon; it takes the mmap lock for reading only, so page
/// faults in flight go on, unlike the mmap/munmap of a mapping per piece, 3x slower): within
/// the noise on 2 cores (`fill_bench` 1 GiB: 1.84 GB/s against 1.95 keeping the pages, rounds
/// differing both ways), and the 13 GB/s of `fill_bench` through a mapping on the lent 16-core
/// host that chose mapped fills was measured giving back every piece so.
fn drop_mapped() -> bool {
    static DROP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DROP.get_or_init(|| env_switch("LLMFS_FILL_DROP_MAPPED", || true))
}

/// `$var` = 1 or 0 if set so (a switch for comparisons and tests), else `default()`.
fn env_switch(var: &str, default: impl FnOnce() -> bool) -> bool {
    match std::env::var(var).as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => default(),
    }
}

/// (tensor index, first element, end element) of every piece of `synth`'s tensors, once the
/// whole-tensor quantities their reads need are computed ([`SynthFile::prepare`]).
fn pieces(synth: &SynthFile) -> Result<Vec<(usize, u64, u64)>, ReadError> {
    synth.prepare()?;
    let mut pieces = vec![];
    for (i, t) in synth.tensors.iter().enumerate() {
        let esize = t.source.stored_type().block_bytes() as u64;
        let elems = (t.end - t.start) / esize;
        let per = (PIECE / esize).max(1);
        let mut at = 0;
        while at < elems {
            pieces.push((i, at, (at + per).min(elems)));
            at += per;
        }
    }
    Ok(pieces)
}

fn cache_io(e: std::io::Error) -> ReadError {
    ReadError::Io { path: "the disk cache".into(), reason: e.to_string() }
}
