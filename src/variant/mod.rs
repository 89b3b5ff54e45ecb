//! What bytes each file of an entry holds.
//!
//! An entry's files are described once, as an [`EntryView`]: a list of [`VFile`]s, each either a
//! real file read through ([`Content::Passthrough`]), a small generated file (a tokenizer config
//! with a chat template, a shard index with new sizes), or a synthesized safetensors file
//! ([`Content::Synth`]): header bytes built once, then tensors whose bytes come from a
//! [`TensorSource`] — stored bytes, or a recipe over another source (a cast, a dequantization …).
//! Views compose: a variant's view is its base's view with each weight tensor's source wrapped.
//!
//! `view` holds the vocabulary, `source` the tensor sources; this module's [`build_view`] walks an
//! entry's chain and applies each recipe (a delta's or an import's through [`delta`]).
//!
//! Nothing here knows about FUSE or the cache: `vfs` maps byte ranges onto these descriptions and
//! caches what [`TensorSource::read`] produces.

pub mod gguf;
pub mod read;
pub mod recipe;
pub mod source;
pub mod view;

use std::collections::HashMap;
use std::sync::Arc;

pub use crate::source::{ReadError, SourceFile};
pub use source::TensorSource;
pub use view::whole_tensor_groups;
pub use view::{
    check_sources, map_weights, tensor_stats, Content, EntryView, LogicalTensor, Segment, SynthFile,
    SynthTensor, VFile, ViewError, WeightFile,
};

use crate::registry::Registry;

/// Describe the files of entry `name`.
pub fn build_view(registry: &Registry, name: &str) -> Result<EntryView, ViewError> {
    let view = build_view_with(registry, name, &mut HashMap::new())?;
    Ok(Arc::unwrap_or_clone(view))
}

/// Describe the files of entry `name`, walking its ancestors parents first (a DAG: a merge has
/// several parents) and handing each recipe its parents' views. Views already in `built` are
/// used as they are, and every view built is left there: ancestors shared by several parents
/// (or by several entries built with one `built`) are built once and share their open files.
pub fn build_view_with(
    registry: &Registry,
    name: &str,
    built: &mut HashMap<String, Arc<EntryView>>,
) -> Result<Arc<EntryView>, ViewError> {
    // The walk first, so a cycle or a missing parent is an error, not a stack overflow.
    for entry_name in registry.ancestors(name)? {
        if built.contains_key(entry_name) {
            continue;
        }
        let entry = registry.get(entry_name)?;
        let parents: Vec<Arc<EntryView>> = entry.kind.parents().iter().map(|p| built[*p].clone()).collect();
        let view = recipe::view(registry, entry_name, entry, &parents)?;
        built.insert(entry_name.to_owned(), Arc::new(view));
    }
    Ok(built[name].clone())
}
