//! `llmfs merge`: register a merge entry with its whole-tensor statistics computed once.
//!
//! The config is checked and the view planned over the parents' views (the view the mount
//! builds, so a merge of a merge reads its parent through that parent's view); then every merged
//! tensor whose method needs whole-tensor quantities (TIES / breadcrumbs cut-offs and their tie
//! lists, rescale factors, SLERP / NuSLERP coefficients, model stock's t) has them computed by
//! `MergedSource::compute_stats` — the function a read of an older entry calls; the kept ties
//! as index intervals, `compute::mergekit::tie_runs` — tensors in
//! parallel on the rayon pool, and stored in one file (`merge::stats_file`) that is staged and
//! put in place by the registry update that registers the entry: a crash leaves no entry or a
//! whole one, and `rm` and `gc` treat the file as any stored file of an entry.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use rayon::prelude::*;

use crate::merge::stats_file::{self, StatsTable};
use crate::registry::{self, io_err, Entry, EntryKind, Error, FileRecord, FileRole, Fingerprint, Store};
use crate::variant::source::{MergedSource, TensorSource};
use crate::variant::{self, recipe};

/// A registered merge and what storing its statistics took.
pub struct Made {
    pub entry: Entry,
    /// Tensors whose statistics were computed and stored (0: the method needs none, no file).
    pub tensors: usize,
    /// Bytes of the stored statistics file.
    pub bytes: u64,
    /// Seconds spent computing them.
    pub seconds: f64,
}

/// Register merge entry `name` (`kind`, an `EntryKind::Merge` whose first parent is `first`).
/// `progress(done, total)` is called as tensors' statistics are computed.
pub fn make_merge(
    store: &Store,
    name: &str,
    first: &str,
    kind: EntryKind,
    progress: impl Fn(usize, usize) + Sync,
) -> Result<Made, Error> {
    registry::validate_name(name)?;
    let mut planned = store.load()?;
    let mut entry = recipe::new_entry(&planned, name, first, kind)?;
    planned.entries.insert(name.to_owned(), entry.clone());
    // The view the mount will build: refused here if it cannot be served.
    let view = variant::build_view(&planned, name).map_err(|e| Error::Invalid(e.to_string()))?;
    let merged: Vec<(&str, &MergedSource)> = view
        .weights
        .values()
        .flat_map(|w| &w.tensors)
        .filter_map(|t| match &t.source {
            TensorSource::Merged(m) if m.merge.needs_stats() => Some((t.name.as_str(), &**m)),
            _ => None,
        })
        .collect();
    if merged.is_empty() {
        let entry = recipe::register(store, name, first, entry.kind)?;
        return Ok(Made { entry, tensors: 0, bytes: 0, seconds: 0.0 });
    }

    let started = Instant::now();
    let done = AtomicUsize::new(0);
    // Each tensor's whole-tensor buffers go to the next one (freed when this returns).
    let _recycling = crate::compute::mergekit::Recycling::start();
    // A few tensors at a time (each holds its inputs whole while its cut-offs are found).
    let sized = merged.iter().map(|&(tensor, m)| (m.merge.numel() as u64, (tensor, m))).collect();
    let mut table = StatsTable::new();
    for group in variant::whole_tensor_groups(sized) {
        let computed: Vec<_> = group
            .par_iter()
            .map(|&(tensor, m)| {
                let stats = m.compute_stats().map_err(|e| Error::Invalid(format!("{tensor}: {e}")))?;
                progress(done.fetch_add(1, Ordering::Relaxed) + 1, merged.len());
                Ok((tensor.to_string(), stats))
            })
            .collect::<Result<_, Error>>()?;
        table.extend(computed);
    }
    let seconds = started.elapsed().as_secs_f64();

    let staging = store.staging_dir(&format!("merge-{name}"))?;
    let path = staging.path().join(stats_file::FILE_NAME);
    let bytes = stats_file::encode(&table);
    write_synced(&path, &bytes)?;
    let fingerprint = Fingerprint::of(&path).map_err(io_err(&path))?;
    let record = FileRecord {
        name: stats_file::FILE_NAME.to_owned(),
        role: FileRole::Other,
        fingerprint,
        object: None,
    };
    if let EntryKind::Merge { files, .. } = &mut entry.kind {
        *files = vec![record];
    }
    let entry = store.insert_staged(name, &entry, staging)?;
    Ok(Made { entry, tensors: table.len(), bytes: bytes.len() as u64, seconds })
}

/// Written and on disk before the registry names it.
fn write_synced(path: &std::path::Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}
