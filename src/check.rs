//! `llmfs check`: everything a loader would trip on, found before it loads.
//!
//! For each entry: its chain of bases resolves (no cycle, nothing missing); every base file still
//! matches its fingerprint (size, mtime, sampled hash) and every weight header still parses; the
//! adapter's file-level checks pass (config.json, tokenizer); and the entry's view builds with
//! every file servable, which for variants means every tensor resolves to a source.

use crate::registry::{EntryKind, Registry};
use crate::variant::{self, Content};
use crate::{adapter, format};

/// One line per problem, each naming the entry and the file.
pub fn check(registry: &Registry, names: &[String]) -> Vec<String> {
    let mut problems = vec![];
    for name in names {
        let entry = match registry.get(name) {
            Ok(e) => e,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        problems.extend(unfinished(registry, name));
        if let Err(e) = registry.chain(name) {
            problems.push(format!("{name}: {e}"));
            continue;
        }
        if let EntryKind::Base { dir, files, .. } = &entry.kind {
            for f in files {
                let path = dir.join(&f.name);
                if let Some(reason) = f.fingerprint.verify(&path) {
                    problems.push(format!("{name}: {}: {reason}", path.display()));
                } else if f.role == crate::registry::FileRole::Weights {
                    if let Err(e) = format::read_header_path(&path) {
                        problems.push(format!("{name}: {e}"));
                    }
                }
            }
            for p in adapter::validate(dir) {
                problems.push(format!("{name}: {p}"));
            }
            continue;
        }
        match variant::build_view(registry, name) {
            Err(e) => problems.push(format!("{name}: {e}")),
            Ok(view) => {
                for f in &view.files {
                    if let Content::Broken(reason) = &f.content {
                        problems.push(format!("{name}: {}: {reason}", f.name));
                    } else if let Err(e) = crate::vfs::check_sources(f) {
                        problems.push(format!("{name}: {}: {e}", f.name));
                    }
                }
            }
        }
    }
    problems
}

/// An entry written through `deltas/` whose writer stopped before storing some files (a daemon
/// killed mid-copy): one line per such file. Writing the file again, or removing it, clears it.
pub fn unfinished(registry: &Registry, name: &str) -> Vec<String> {
    registry
        .unfinished(name)
        .into_iter()
        .map(|f| format!("{name}: {f}: unfinished: it was being written into deltas/ and never stored"))
        .collect()
}
