//! A cast: every floating tensor of the base converted to another float type (round to nearest
//! even, NaN and Inf kept), the rest as they are; config.json names the new dtype.

use std::sync::Arc;

use crate::format::Dtype;
use crate::variant::source::TensorSource;
use crate::variant::view::{map_weights, EntryView, LogicalTensor, ViewError};

pub(super) fn view(name: &str, base: &EntryView, dtype: Dtype) -> Result<EntryView, ViewError> {
    let mut view = map_weights(base, &format!("cast {name}"), |t| {
        let source = if t.source.dtype().is_float() && t.source.dtype() != dtype {
            TensorSource::Cast { inner: Arc::new(t.source.clone()), to: dtype }
        } else {
            t.source.clone()
        };
        Ok(LogicalTensor { source, ..t.clone() })
    })
    .map_err(|reason| ViewError::Invalid { entry: name.to_string(), reason })?;
    super::config_with_dtype(&mut view, dtype);
    Ok(view)
}
