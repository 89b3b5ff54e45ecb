//! `llmfs gc`: what the store holds that no entry references (see `store::gc`, which knows the
//! store's layout); the catalogue says what is referenced.

use std::time::Duration;

use super::{EntryKind, Result, Store};
pub use crate::store::gc::Garbage;
use crate::store::gc::References;

/// Everything no entry references, older than `min_age`, sorted.
pub fn find(store: &Store, min_age: Duration) -> Result<Vec<Garbage>> {
    let registry = store.load()?;
    let mut refs = References::default();
    for (name, entry) in &registry.entries {
        let files = entry.kind.files();
        refs.objects.extend(files.iter().filter_map(|f| f.object.clone()));
        // Casts own nothing, and a base added in place owns no directory of the store.
        if !matches!(entry.kind, EntryKind::Cast { .. } | EntryKind::Base { copied: false, .. }) {
            refs.dirs.insert(name.clone(), files.iter().map(|f| f.name.clone()).collect());
        }
    }
    Ok(crate::store::gc::find(store.node(), &refs, min_age)?)
}

/// Removes what [`find`] found; returns the first failure, if any, after trying all.
pub fn remove(store: &Store, garbage: &[Garbage]) -> Result<()> {
    Ok(crate::store::gc::remove(store.node(), garbage)?)
}
