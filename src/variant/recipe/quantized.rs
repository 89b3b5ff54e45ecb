//! A quantized copy: the base's linear weights stored as FastChat's group-wise codes and scales
//! in containers the entry owns (written by `llmfs quantize`), dequantized on read; every other
//! tensor is the base's.

use std::sync::Arc;

use crate::codec::quant_file::QuantSource;
use crate::registry::recipe::QuantConfig;
use crate::registry::{FileRecord, Registry};
use crate::variant::source::TensorSource;
use crate::variant::view::{map_weights, EntryView, LogicalTensor, ViewError};

pub(super) fn view(
    registry: &Registry,
    name: &str,
    files: &[FileRecord],
    config: QuantConfig,
    base: &EntryView,
) -> Result<EntryView, ViewError> {
    let containers = super::open_containers(registry, name, files)?;
    map_weights(base, &format!("quantized {name}"), |t| {
        let found = containers
            .iter()
            .find_map(|(file, header)| {
                QuantSource::find(file, header, &t.name, &t.shape, t.source.dtype(), config).transpose()
            })
            .transpose()?;
        Ok(match found {
            Some(q) => LogicalTensor { source: TensorSource::Dequant(Arc::new(q)), ..t.clone() },
            None => t.clone(),
        })
    })
    .map_err(|reason| ViewError::Invalid { entry: name.to_string(), reason })
}
