//! The vocabulary of views: an entry's files ([`VFile`], [`EntryView`]), the tensors of its
//! weight files ([`LogicalTensor`]) and how a variant's view is laid out from its base's
//! ([`map_weights`]). The recipes build views with these; `variant`'s `build_view` picks the
//! recipe for each entry of a chain.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use super::source::TensorSource;
use crate::format::HeaderBuilder;
use crate::registry::INDEX_FILE;
use crate::source::{ReadError, SourceFile};

/// One file of an entry as the mount shows it.
#[derive(Clone, Debug)]
pub struct VFile {
    pub name: String,
    pub size: u64,
    pub content: Content,
}

#[derive(Clone, Debug)]
pub enum Content {
    /// A real file, served byte for byte (checked against its fingerprint on open).
    Passthrough(Arc<SourceFile>),
    /// Small bytes built when the view was made.
    Generated(Arc<[u8]>),
    /// A synthesized safetensors file.
    Synth(Arc<SynthFile>),
    /// A file that cannot be served (its base changed or is gone): every open gets EIO and this
    /// reason in the log.
    Broken(String),
}

/// A synthesized file: its segments, in file order, are the header bytes, then each tensor's
/// bytes (from its source), with zero padding wherever neither covers the file (a safetensors
/// file has none; a GGUF aligns each tensor's start). See [`SynthFile::segments`].
#[derive(Debug)]
pub struct SynthFile {
    /// Unique for the life of the process: the cache keys decoded chunks by it, so two versions
    /// of a file (a delta file rewritten through deltas/) never share a chunk.
    pub id: u64,
    pub header: Vec<u8>,
    /// In offset order, not overlapping each other or the header.
    pub tensors: Vec<SynthTensor>,
    /// The file's length: the end of the last tensor, or more (trailing padding).
    pub size: u64,
}

/// Elements of the tensors whose whole-tensor quantities are computed at once (see
/// [`SynthFile::prepare`]): about 10 GB of working memory for a merge.
const PREPARE_ELEMS: u64 = 1 << 28;

/// `items` (each with its tensor's element count) in the groups whose whole-tensor quantities
/// are computed at once, one group after another (see [`SynthFile::prepare`]; `llmfs merge`
/// too): largest first, at most [`PREPARE_ELEMS`] elements and as many tensors as the pool has
/// threads per group (a tensor's cut-offs are a few serial selections: groups of a third of
/// the threads left `llmfs merge` of a 6 GB TIES at 37 s on 16 cores, against 29-34 s for the
/// fills of its two files at once).
pub fn whole_tensor_groups<T>(mut items: Vec<(u64, T)>) -> Vec<Vec<T>> {
    let per_group = rayon::current_num_threads().max(1);
    items.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let mut groups: Vec<Vec<T>> = vec![];
    let mut elems = 0;
    for (n, item) in items {
        match groups.last_mut() {
            Some(g) if g.len() < per_group && elems + n <= PREPARE_ELEMS => g.push(item),
            _ => {
                groups.push(vec![item]);
                elems = 0;
            }
        }
        elems += n;
    }
    groups
}

/// A byte range of a synthesized file and what fills it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    Header(u64, u64),
    /// Tensor `index` of [`SynthFile::tensors`].
    Tensor(usize),
    Padding(u64, u64),
}

impl SynthFile {
    /// Header, then tensors with no gaps (a safetensors file).
    pub fn new(header: Vec<u8>, tensors: Vec<SynthTensor>) -> Self {
        let size = tensors.last().map_or(header.len() as u64, |t| t.end);
        Self::with_size(header, tensors, size)
    }

    /// Header, then tensors at their offsets, zeros between them and up to `size`.
    pub fn with_size(header: Vec<u8>, tensors: Vec<SynthTensor>, size: u64) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        debug_assert!(tensors.windows(2).all(|w| w[0].end <= w[1].start));
        debug_assert!(tensors.first().is_none_or(|t| t.start >= header.len() as u64));
        debug_assert!(tensors.last().is_none_or(|t| t.end <= size));
        SynthFile { id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed), header, tensors, size }
    }

    /// Compute the whole-tensor quantities its tensors' reads need ([`TensorSource::prepare`]),
    /// before a fill or an export decodes its pieces: several tensors at once, each in parallel
    /// inside. A merge's cut-off holds about 40 bytes per element while it runs (every input
    /// as f32, the magnitudes of each parent's delta), so the tensors go in groups
    /// ([`whole_tensor_groups`]), largest first, so a group's tensors take about as long and few
    /// threads wait at its end (16 cores, TIES of a 6 GB model: in file order, 45 % of the
    /// cores were idle).
    pub fn prepare(&self) -> Result<(), ReadError> {
        use rayon::prelude::*;
        let todo: Vec<(u64, &TensorSource)> = self
            .tensors
            .iter()
            .filter(|t| t.source.needs_prepare())
            .map(|t| ((t.end - t.start) / t.source.stored_type().block_bytes() as u64, &t.source))
            .collect();
        whole_tensor_groups(todo).into_iter().try_for_each(|g| g.par_iter().try_for_each(|s| s.prepare()))
    }

    /// The file's bytes in order: header, tensors, and the padding between them.
    pub fn segments(&self) -> Vec<Segment> {
        let mut out = vec![Segment::Header(0, self.header.len() as u64)];
        let mut pos = self.header.len() as u64;
        for (i, t) in self.tensors.iter().enumerate() {
            if t.start > pos {
                out.push(Segment::Padding(pos, t.start));
            }
            out.push(Segment::Tensor(i));
            pos = t.end;
        }
        if self.size > pos {
            out.push(Segment::Padding(pos, self.size));
        }
        out
    }
}

#[derive(Debug)]
pub struct SynthTensor {
    pub name: String,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
    pub source: TensorSource,
}

/// A tensor of an entry, before it is laid out in a file.
#[derive(Clone, Debug)]
pub struct LogicalTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub source: TensorSource,
}

/// A weight file before layout: its tensors in file order, and the header's `__metadata__`.
#[derive(Clone, Debug)]
pub struct WeightFile {
    pub tensors: Vec<LogicalTensor>,
    pub metadata: serde_json::Map<String, Value>,
}

/// Every file of one entry.
#[derive(Clone, Debug, Default)]
pub struct EntryView {
    pub files: Vec<VFile>,
    /// The logical weight files (by file name), from which variants derive theirs.
    pub weights: BTreeMap<String, WeightFile>,
}

impl EntryView {
    pub fn file(&self, name: &str) -> Option<&VFile> {
        self.files.iter().find(|f| f.name == name)
    }
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    #[error("{entry}: {reason}")]
    Invalid { entry: String, reason: String },
}

/// A variant's view: the base's files, with weights rebuilt tensor by tensor through `map`, and
/// the shard index (if any) given the new sizes. `label` goes into each header's metadata.
pub fn map_weights(
    base: &EntryView,
    label: &str,
    mut map: impl FnMut(&LogicalTensor) -> Result<LogicalTensor, String>,
) -> Result<EntryView, String> {
    let mut weights = BTreeMap::new();
    for (file_name, weight_file) in &base.weights {
        let tensors = weight_file.tensors.iter().map(&mut map).collect::<Result<Vec<_>, _>>()?;
        weights.insert(file_name.clone(), WeightFile { tensors, metadata: weight_file.metadata.clone() });
    }
    Ok(with_weights(base, label, weights))
}

/// A variant's view: `base`'s files with its weight files laid out anew from `weights` (same
/// names: in the base's places; a base weight file `weights` lacks is dropped, a new one comes
/// last). The shard index gets the new total size, or goes when the files are not the base's.
pub fn with_weights(base: &EntryView, label: &str, weights: BTreeMap<String, WeightFile>) -> EntryView {
    let mut view = EntryView { files: vec![], weights };
    let same_files = base.weights.keys().eq(view.weights.keys());
    let mut total_tensor_bytes = 0u64;
    let mut laid_out = |name: &str, weights: &WeightFile| {
        let synth = layout(label, weights);
        total_tensor_bytes += synth.size - synth.header.len() as u64;
        VFile { name: name.to_owned(), size: synth.size, content: Content::Synth(Arc::new(synth)) }
    };
    for base_file in &base.files {
        let file = match (view.weights.get(&base_file.name), &base_file.content) {
            (_, Content::Broken(_)) => base_file.clone(),
            (Some(weights), _) => laid_out(&base_file.name, weights),
            (None, _) if base.weights.contains_key(&base_file.name) => continue,
            (None, _) if base_file.name == INDEX_FILE && !same_files => continue,
            (None, _) => base_file.clone(),
        };
        view.files.push(file);
    }
    for (name, weights) in &view.weights {
        if base.file(name).is_none() {
            let file = laid_out(name, weights);
            view.files.push(file);
        }
    }
    if let Some(index) = view.files.iter_mut().find(|f| f.name == INDEX_FILE) {
        // Whatever the base's index is (a file, generated, a delta's stored file), the variant's
        // is the same JSON with its own total size.
        match read_whole(index).and_then(|bytes| rewrite_index(&bytes, total_tensor_bytes)) {
            Ok(bytes) => {
                index.size = bytes.len() as u64;
                index.content = Content::Generated(bytes.into());
            }
            Err(reason) => index.content = Content::Broken(format!("{INDEX_FILE}: {reason}")),
        }
    }
    view
}

/// All bytes of a small file of a view (a shard index: bounded to 64 MiB).
pub(crate) fn read_whole(file: &VFile) -> Result<Vec<u8>, String> {
    if file.size > 64 << 20 {
        return Err(format!("{} bytes is too large for a shard index", file.size));
    }
    match &file.content {
        Content::Passthrough(source) => source.read_all().map_err(|e| e.to_string()),
        Content::Generated(bytes) => Ok(bytes.to_vec()),
        Content::Broken(reason) => Err(reason.clone()),
        Content::Synth(synth) => {
            let mut out = vec![0u8; file.size as usize];
            out[..synth.header.len()].copy_from_slice(&synth.header);
            for t in &synth.tensors {
                let esize = t.source.stored_type().block_bytes() as u64;
                let dst = &mut out[t.start as usize..t.end as usize];
                t.source.read(0..((t.end - t.start) / esize) as usize, dst).map_err(|e| e.to_string())?;
            }
            Ok(out)
        }
    }
}

/// Lay a weight file out: tensors in the base's order, contiguous, after a spec-exact header
/// that keeps the base's `__metadata__` (transformers checks `format: pt`) and says what made it.
fn layout(label: &str, weights: &WeightFile) -> SynthFile {
    let mut builder = HeaderBuilder::new();
    for (k, v) in &weights.metadata {
        builder = builder.metadata(k, v.as_str().unwrap_or_default());
    }
    builder = builder.metadata("llmfs", label);
    for t in &weights.tensors {
        builder.tensor(&t.name, t.source.dtype(), &t.shape);
    }
    let (header, infos) = builder.build();
    let data_start = header.len() as u64;
    let tensors = infos
        .into_iter()
        .zip(&weights.tensors)
        .map(|(info, t)| SynthTensor {
            name: info.name,
            start: data_start + info.start,
            end: data_start + info.end,
            source: t.source.clone(),
        })
        .collect();
    SynthFile::new(header, tensors)
}

/// The shard index with `metadata.total_size` set to the variant's; everything else kept.
fn rewrite_index(bytes: &[u8], total_size: u64) -> Result<Vec<u8>, String> {
    let mut index: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let obj = index.as_object_mut().ok_or("not a JSON object")?;
    let metadata = obj.entry("metadata").or_insert_with(|| Value::Object(Default::default()));
    if let Some(m) = metadata.as_object_mut() {
        m.insert("total_size".into(), total_size.into());
    }
    let mut out = serde_json::to_vec_pretty(&index).expect("JSON serializes");
    out.push(b'\n');
    Ok(out)
}

/// Summary numbers for `llmfs info`.
pub fn tensor_stats(view: &EntryView) -> (usize, BTreeMap<String, usize>) {
    let mut count = 0;
    let mut dtypes = BTreeMap::new();
    for w in view.weights.values() {
        for t in &w.tensors {
            count += 1;
            *dtypes.entry(t.source.dtype().to_string()).or_insert(0) += 1;
        }
    }
    (count, dtypes)
}

/// Every source file a virtual file reads from must still match its fingerprint.
pub fn check_sources(file: &VFile) -> Result<(), ReadError> {
    match &file.content {
        Content::Passthrough(source) => source.check(),
        Content::Generated(_) => Ok(()),
        Content::Broken(reason) => Err(ReadError::Decode(reason.clone())),
        Content::Synth(synth) => {
            let mut sources = vec![];
            for t in &synth.tensors {
                t.source.files(&mut sources);
            }
            sources.sort_by_key(|s| Arc::as_ptr(s) as usize);
            sources.dedup_by_key(|s| Arc::as_ptr(s) as usize);
            // In parallel: a first open verifies each file's sampled hash (6 MiB read and hashed
            // per file), which for a delta over a sharded base is several files.
            use rayon::prelude::*;
            sources.par_iter().try_for_each(|s| s.check())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_tensor_groups_go_largest_first_within_their_bounds() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(6).build().unwrap();
        let sizes = [5u64, PREPARE_ELEMS, 7, 1 << 27, 3, (1 << 27) + 1, 9];
        let groups = pool.install(|| whole_tensor_groups(sizes.iter().map(|&n| (n, n)).collect()));
        // Every item once, in descending order across the groups.
        let flat: Vec<u64> = groups.iter().flatten().copied().collect();
        let mut want = sizes.to_vec();
        want.sort_by_key(|&n| std::cmp::Reverse(n));
        assert_eq!(flat, want);
        for g in &groups {
            assert!(!g.is_empty() && g.len() <= 6, "6 threads: at most 6 per group, {groups:?}");
            assert!(g.len() == 1 || g.iter().sum::<u64>() <= PREPARE_ELEMS, "{groups:?}");
        }
        // The largest fills a group alone; the two halves cannot share one (2^28 + 1 elements).
        assert_eq!(groups[0], vec![PREPARE_ELEMS]);
        assert_eq!(groups[1], vec![(1 << 27) + 1]);
        // Small ones share a group up to the thread count.
        let groups = pool.install(|| whole_tensor_groups((0..14u64).map(|n| (n, n)).collect()));
        assert_eq!(groups.iter().map(Vec::len).collect::<Vec<_>>(), [6, 6, 2]);
    }
}
