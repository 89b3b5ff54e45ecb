//! A delta entry's files as the mount shows them: each target file rebuilt from its container.

use std::collections::HashSet;
use std::sync::Arc;

use super::source::{LosslessSource, LossySource};
use super::{keys, make::BaseTensors};
use crate::format::{self, Dtype};
use crate::registry::{self, FileRecord, FileRole, Registry};
use crate::variant::{
    Content, EntryView, LogicalTensor, SourceFile, SynthFile, SynthTensor, TensorSource, VFile, ViewError,
    WeightFile,
};

/// Describe delta entry `name` (containers `files`) over its base's view.
pub fn delta_view(
    registry: &Registry,
    name: &str,
    files: &[FileRecord],
    base: &EntryView,
) -> Result<EntryView, ViewError> {
    let invalid = |reason: String| ViewError::Invalid { entry: name.to_owned(), reason };
    let base_tensors = BaseTensors::of(base);
    let dir = registry.entry_dir(name);
    let mut view = EntryView::default();
    for record in files {
        let source = Arc::new(SourceFile::new(dir.join(&record.name), record.fingerprint.clone()));
        if let Some(reason) = source.stat_problem() {
            view.files.push(VFile {
                name: record.name.clone(),
                size: 0,
                content: Content::Broken(format!("{}: {reason}", source.path.display())),
            });
            continue;
        }
        let container = format::read_header_path(&source.path).map_err(|e| invalid(e.to_string()))?;
        let meta =
            |k: &str| container.metadata.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let size: u64 = meta(keys::SIZE)
            .parse()
            .map_err(|_| invalid(format!("{}: no {} in its metadata", record.name, keys::SIZE)))?;
        let bad = |e: String| invalid(format!("{}: {e}", record.name));
        let (header_bytes, tensors) = if meta(keys::KIND) == keys::KIND_SAFETENSORS {
            let h = container.tensor(keys::HEADER).ok_or_else(|| bad("no __header__".into()))?;
            if h.len() > 8 + format::MAX_HEADER_SIZE {
                return Err(bad("stored header is over the size limit".into()));
            }
            let mut prefix = vec![0u8; h.len() as usize];
            source
                .read_exact_at(&mut prefix, container.data_start + h.start)
                .map_err(|e| bad(e.to_string()))?;
            let target = format::parse_header_prefix(&prefix, size).map_err(|e| bad(e.to_string()))?;
            if target.data_start != prefix.len() as u64 {
                return Err(bad("stored header has trailing bytes".into()));
            }
            let based: HashSet<String> =
                serde_json::from_str(&meta(keys::BASED)).map_err(|e| bad(e.to_string()))?;
            let mut logical = vec![];
            let mut synth = vec![];
            for t in &target.tensors {
                let base = if based.contains(&t.name) {
                    let twin = base_tensors.twin(&t.name, &t.shape, t.dtype).ok_or_else(|| {
                        bad(format!("{}: its base tensor is gone or changed shape", t.name))
                    })?;
                    Some(twin.source.clone())
                } else {
                    None
                };
                let lossy = match &base {
                    Some(b) => LossySource::open(&source, &container, &t.name, &t.shape, t.dtype, b.clone())
                        .map_err(&bad)?,
                    None => None,
                };
                let src = match lossy {
                    Some(l) => TensorSource::LossyDelta(Arc::new(l)),
                    None => TensorSource::Delta(Arc::new(
                        LosslessSource::open(&source, &container, &t.name, t.dtype, t.numel(), base)
                            .map_err(&bad)?,
                    )),
                };
                logical.push(LogicalTensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    source: src.clone(),
                });
                synth.push(SynthTensor {
                    name: t.name.clone(),
                    start: target.data_start + t.start,
                    end: target.data_start + t.end,
                    source: src,
                });
            }
            // The bytes are rebuilt tensor by tensor whatever the file is called, but only a
            // top-level `*.safetensors` is one of the model's weight files (what a cast or a
            // quantization of this entry converts): the same rule as `add` and `delta make`, so a
            // safetensors file written through deltas/ under another name or in a subdirectory
            // stays a plain file for the entries built on this one.
            if registry::walk::role_of(&record.name) == FileRole::Weights {
                view.weights.insert(
                    record.name.clone(),
                    WeightFile { tensors: logical, metadata: target.metadata.clone() },
                );
            }
            (prefix, synth)
        } else {
            let src = LosslessSource::open(&source, &container, keys::FILE, Dtype::U8, size as usize, None)
                .map_err(&bad)?;
            (
                vec![],
                vec![SynthTensor {
                    name: keys::FILE.into(),
                    start: 0,
                    end: size,
                    source: TensorSource::Delta(Arc::new(src)),
                }],
            )
        };
        view.files.push(VFile {
            name: record.name.clone(),
            size,
            content: Content::Synth(Arc::new(SynthFile::new(header_bytes, tensors))),
        });
    }
    Ok(view)
}
