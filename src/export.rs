//! `llmfs export`: materialize an entry's files without FUSE, through the same read path as the
//! mount (so the bytes are the same as `cp -r` from it).

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use rayon::prelude::*;

use crate::variant::EntryView;
use crate::vfs::{self, read, Cache};

/// Bytes per parallel piece of a file: several chunks, so each rayon task decodes a few.
const PIECE: u64 = 4 * read::CHUNK_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{}: {source}", path.display())]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("{file}: {source}")]
    Read { file: String, source: crate::variant::ReadError },
}

/// Write every file of `view` into `out_dir` (created if missing; existing files are replaced).
/// Like `cp`, it leaves flushing to the kernel (no fsync).
pub fn export(view: &EntryView, out_dir: &Path, progress: impl Fn(u64) + Sync) -> Result<u64, ExportError> {
    let io = |path: &Path| { let path = path.to_owned(); move |source| ExportError::Io { path, source } };
    fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    // A small cache: export reads every chunk once, in order.
    let cache = Cache::new(64 << 20);
    let mut total = 0;
    for file in &view.files {
        vfs::check_sources(file).map_err(|source| ExportError::Read { file: file.name.clone(), source })?;
        let path = out_dir.join(&file.name);
        let out = OpenOptions::new().create(true).write(true).truncate(true).open(&path).map_err(io(&path))?;
        out.set_len(file.size).map_err(io(&path))?;
        (0..file.size.div_ceil(PIECE)).into_par_iter().try_for_each(|piece| {
            let offset = piece * PIECE;
            let bytes = read::read_range(file, offset, PIECE, &cache)
                .map_err(|source| ExportError::Read { file: file.name.clone(), source })?;
            out.write_all_at(&bytes, offset).map_err(io(&path))?;
            progress(bytes.len() as u64);
            Ok(())
        })?;
        total += file.size;
    }
    Ok(total)
}
