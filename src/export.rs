//! `llmfs export`: materialize an entry's files without FUSE, through the same sources as the
//! mount's read path (so the bytes are the same as `cp -r` from it).
//!
//! A synthesized file is written piece by piece in parallel: its header, then each tensor in
//! pieces of whole elements, each decoded by the tensor's source straight into the thread's
//! scratch buffer and written at its offset. Export reads every byte once, in order, so it
//! bypasses the chunk cache the mount needs (no cached copies, no zeroed buffers per read);
//! other files go through the read path.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;

use crate::cache::with_scratch;
use crate::codec::delta::DELTA_CHUNK_ELEMS;
use crate::variant::read::{self, Cache};
use crate::variant::{Content, EntryView, SynthFile, VFile};

/// Bytes per parallel piece of a file read through the read path: several chunks, so each rayon
/// task decodes a few.
const PIECE: u64 = 4 * read::CHUNK_SIZE;

/// Elements per piece of a synthesized tensor: a whole number of lossless delta chunks (so no
/// chunk is decoded twice), 2 MiB of bf16 like the read path's cache chunk.
const PIECE_ELEMS: usize = 4 * DELTA_CHUNK_ELEMS;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{}: {source}", path.display())]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("{file}: {source}")]
    Read { file: String, source: crate::variant::ReadError },
}

/// Write every file of `view` into `out_dir` (created if missing, subdirectories too; existing files
/// are replaced).
/// Like `cp`, it leaves flushing to the kernel (no fsync).
pub fn export(view: &EntryView, out_dir: &Path, progress: impl Fn(u64) + Sync) -> Result<u64, ExportError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ExportError::Io { path, source }
    };
    fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    // A small cache for the files that go through the read path: it reads every chunk once.
    let cache = Cache::new(64 << 20);
    let mut total = 0;
    for file in &view.files {
        crate::variant::check_sources(file)
            .map_err(|source| ExportError::Read { file: file.name.clone(), source })?;
        // File names are relative paths (subdirectories, dotfiles); none may leave `out_dir`.
        crate::registry::validate_file_path(&file.name)
            .map_err(|e| ExportError::Io { path: out_dir.to_owned(), source: std::io::Error::other(e) })?;
        let path = out_dir.join(&file.name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let out =
            OpenOptions::new().create(true).write(true).truncate(true).open(&path).map_err(io(&path))?;
        out.set_len(file.size).map_err(io(&path))?;
        match &file.content {
            Content::Synth(synth) => export_synth(file, synth, &out, &path, &progress)?,
            _ => (0..file.size.div_ceil(PIECE)).into_par_iter().try_for_each(|piece| {
                let offset = piece * PIECE;
                let bytes = read::read_range(file, offset, PIECE, &cache)
                    .map_err(|source| ExportError::Read { file: file.name.clone(), source })?;
                out.write_all_at(&bytes, offset).map_err(io(&path))?;
                progress(bytes.len() as u64);
                Ok(())
            })?,
        }
        total += file.size;
    }
    Ok(total)
}

/// A synthesized file: its header, then every tensor in pieces of [`PIECE_ELEMS`] elements.
fn export_synth(
    file: &VFile,
    synth: &SynthFile,
    out: &File,
    path: &Path,
    progress: &(impl Fn(u64) + Sync),
) -> Result<(), ExportError> {
    let io = |source| ExportError::Io { path: path.to_owned(), source };
    // Padding between tensors and at the end (a GGUF's alignment) reads as the zeros of a
    // file of the full length.
    out.set_len(synth.size).map_err(io)?;
    out.write_all_at(&synth.header, 0).map_err(io)?;
    progress(synth.header.len() as u64);
    // Whole-tensor quantities first (`SynthFile::prepare`).
    synth.prepare().map_err(|source| ExportError::Read { file: file.name.clone(), source })?;
    let pieces: Vec<(usize, usize)> = synth
        .tensors
        .iter()
        .enumerate()
        .flat_map(|(i, t)| {
            let numel = ((t.end - t.start) / t.source.stored_type().block_bytes() as u64) as usize;
            (0..numel.div_ceil(PIECE_ELEMS)).map(move |p| (i, p))
        })
        .collect();
    pieces.into_par_iter().try_for_each(|(i, p)| {
        let t = &synth.tensors[i];
        let esize = t.source.stored_type().block_bytes();
        let numel = ((t.end - t.start) / esize as u64) as usize;
        let elems = p * PIECE_ELEMS..((p + 1) * PIECE_ELEMS).min(numel);
        let len = elems.len() * esize;
        with_scratch(len, |buf| {
            t.source
                .read(elems.clone(), buf)
                .map_err(|source| ExportError::Read { file: file.name.clone(), source })?;
            out.write_all_at(buf, t.start + (elems.start * esize) as u64)
                .map_err(|source| ExportError::Io { path: path.to_owned(), source })
        })?;
        progress(len as u64);
        Ok(())
    })
}
