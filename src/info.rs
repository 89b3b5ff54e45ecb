//! `llmfs ls` and `llmfs info`: what a person reads about the store's entries (sizes as
//! mounted, bytes stored, recipes and their parameters, adapters and templates), as text or JSON.

use std::path::Path;

use serde_json::json;

use crate::adapter;
use crate::registry::{EntryKind, Registry};
use crate::variant;

#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error(transparent)]
    Registry(#[from] crate::registry::Error),
    #[error(transparent)]
    View(#[from] variant::ViewError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Bytes of an entry's weight files as the mount shows them.
fn weights_size(view: &variant::EntryView) -> u64 {
    view.files.iter().filter(|f| view.weights.contains_key(&f.name)).map(|f| f.size).sum()
}

fn entry_size(registry: &Registry, name: &str) -> Option<u64> {
    variant::build_view(registry, name).ok().map(|v| v.total_size())
}

/// Bytes the entry keeps in the store (`STORE/models/NAME/`, subdirectories included): its
/// copies, containers, deltas. 0 for a base referenced in place. Apparent sizes (`du -b`), so the
/// number does not depend on the filesystem's block size.
pub fn stored_bytes(registry: &Registry, name: &str) -> u64 {
    fn walk(dir: &Path) -> u64 {
        let Ok(items) = std::fs::read_dir(dir) else { return 0 };
        items
            .flatten()
            .map(|item| match item.metadata() {
                Ok(m) if m.is_dir() => walk(&item.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }
    let Some(entry) = registry.entries.get(name) else { return 0 };
    if registry.objects.is_some() {
        // An object store: the objects the entry owns (a base added in place owns none).
        if matches!(entry.kind, EntryKind::Base { copied: false, .. }) {
            return 0;
        }
        return entry.kind.files().iter().filter(|f| f.object.is_some()).map(|f| f.fingerprint.size).sum();
    }
    walk(&registry.entry_dir(name))
}

pub fn ls(registry: &Registry, as_json: bool) -> Result<(), InfoError> {
    if as_json {
        let list: Vec<_> = registry
            .entries
            .iter()
            .map(|(n, e)| {
                json!({
                    "name": n,
                    "kind": e.kind.name(),
                    "base": e.kind.base(),
                    "family": e.family,
                    "adapter": adapter::adapter_of_family(&e.family),
                    "template": e.template,
                    "size": entry_size(registry, n),
                    "stored_bytes": stored_bytes(registry, n),
                    "simple_name": e.info.simple_name,
                    "unfinished": registry.unfinished(n),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    // SIZE: the files as the mount shows them; STORED: what the entry itself keeps on disk.
    println!("{:<28} {:<14} {:<24} {:<14} {:>12} {:>12}", "NAME", "KIND", "BASE", "FAMILY", "SIZE", "STORED");
    for (n, e) in &registry.entries {
        let size = entry_size(registry, n).map_or("?".into(), human);
        let stored = match &e.kind {
            EntryKind::Base { copied: false, .. } => "in place".to_owned(),
            _ => human(stored_bytes(registry, n)),
        };
        let unfinished = registry.unfinished(n).len();
        let incomplete =
            if unfinished > 0 { format!("  INCOMPLETE ({unfinished} unfinished)") } else { String::new() };
        println!(
            "{:<28} {:<14} {:<24} {:<14} {:>12} {:>12}{incomplete}",
            n,
            e.kind.name(),
            e.kind.base().unwrap_or("-"),
            e.family,
            size,
            stored
        );
    }
    Ok(())
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn info(registry: &Registry, name: &str, as_json: bool) -> Result<(), InfoError> {
    let entry = registry.get(name)?;
    let view = variant::build_view(registry, name)?;
    let (tensors, dtypes) = variant::tensor_stats(&view);
    let gguf = variant::gguf::files_with_notes(name, &view);
    let files: Vec<_> = view.files.iter().map(|f| json!({"name": f.name, "size": f.size})).collect();
    let recipe = match &entry.kind {
        EntryKind::Base { dir, copied, .. } => json!({"dir": dir, "copied": copied}),
        EntryKind::Cast { base, dtype } => json!({"base": base, "dtype": dtype.name()}),
        EntryKind::Imported { base, format, files } => {
            json!({"base": base, "format": format.name(), "files": files.iter().map(|f| &f.name).collect::<Vec<_>>()})
        }
        EntryKind::Delta { base, codec, files } => {
            let stored: u64 = files.iter().map(|f| f.fingerprint.size).sum();
            json!({"base": base, "codec": codec.name(), "stored_bytes": stored, "ratio": view.total_size() as f64 / stored.max(1) as f64})
        }
        EntryKind::Merge { parents, config, source, seed, files } => {
            let stats: u64 = files.iter().map(|f| f.fingerprint.size).sum();
            json!({"parents": parents, "method": config.get("method"), "seed": seed, "config": source, "stats_bytes": stats})
        }
        EntryKind::Quantized { base, config, files, errors } => {
            let on_disk: u64 = files.iter().map(|f| f.fingerprint.size).sum();
            let base_weights = weights_size(&variant::build_view(registry, base)?);
            json!({
                "base": base,
                "bits": config.bits,
                "group_size": config.group_size,
                "symmetric": config.symmetric,
                "quantized_tensors": errors.len(),
                "on_disk_bytes": on_disk,
                "base_weight_bytes": base_weights,
                "disk_ratio": base_weights as f64 / on_disk.max(1) as f64,
                "max_relative_error": errors.values().cloned().fold(0.0, f64::max),
                "relative_errors": errors,
            })
        }
    };
    let value = json!({
        "name": name,
        "kind": entry.kind.name(),
        "recipe": recipe,
        "family": entry.family,
        "adapter": adapter::adapter_of_family(&entry.family),
        "template": entry.template,
        "chat_template": entry.chat_template,
        "chat_template_unavailable": entry.chat_template.as_deref().and_then(adapter::no_chat_template_reason),
        "model_info": entry.info,
        "files": files,
        "tensors": tensors,
        "dtypes": dtypes,
        "size": view.total_size(),
        "unfinished": registry.unfinished(name),
        "gguf": match &gguf {
            Ok((files, _)) => json!(files.iter().map(|f| json!({"name": f.name, "size": f.size})).collect::<Vec<_>>()),
            Err(why) => json!({"none": why}),
        },
        "gguf_notes": gguf.as_ref().map(|(_, notes)| notes.clone()).unwrap_or_default(),
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("name:          {name}");
    match (&entry.kind, entry.kind.base()) {
        (EntryKind::Merge { parents, source, seed, .. }, _) => {
            println!(
                "kind:          merge ({}) of {}, seed {seed}",
                value["recipe"]["method"],
                parents.join(", ")
            );
            println!("config:");
            for line in source.lines() {
                println!("  {line}");
            }
        }
        (_, Some(base)) => println!("kind:          {} of {base}", entry.kind.name()),
        (EntryKind::Base { dir, copied: false, .. }, None) => {
            println!("kind:          base, served in place from {}", dir.display())
        }
        (EntryKind::Base { dir, .. }, None) => {
            println!("kind:          base, copied into the store from {}", dir.display())
        }
        (_, None) => println!("kind:          {} {}", entry.kind.name(), value["recipe"]),
    }
    // The FastChat adapter beside its template; families an older llmfs recorded may be none.
    match adapter::adapter_of_family(&entry.family) {
        Some(a) => println!("adapter:       {a} (family {}, template {})", entry.family, entry.template),
        None => println!("adapter:       ? (family {}, template {})", entry.family, entry.template),
    }
    match entry.chat_template.as_deref() {
        None => println!("chat_template: (the model's own, or none)"),
        Some(t) => match adapter::no_chat_template_reason(t) {
            None => {
                println!("chat_template: {t} (in the mounted tokenizer_config.json if the model has none)")
            }
            Some(why) => println!("chat_template: none: template {t} has no Jinja form ({why})"),
        },
    }
    println!("simple name:   {}", entry.info.simple_name);
    println!("link:          {}", entry.info.link);
    println!("description:   {}", entry.info.description);
    match tensors {
        0 => println!("tensors:       0"),
        _ => println!(
            "tensors:       {tensors} ({})",
            dtypes.iter().map(|(d, n)| format!("{n} {d}")).collect::<Vec<_>>().join(", ")
        ),
    }
    println!("size:          {} ({} bytes)", human(view.total_size()), view.total_size());
    match &gguf {
        Ok((files, notes)) => {
            for f in files {
                println!("gguf:          {} ({})", f.name, human(f.size));
            }
            for note in notes {
                println!("gguf note:     {note}");
            }
        }
        Err(why) => println!("gguf:          none: {why}"),
    }
    let unfinished = registry.unfinished(name);
    if !unfinished.is_empty() {
        println!(
            "INCOMPLETE:    {} file(s) being written through deltas/ were never stored (write them again, or rm them there): {}",
            unfinished.len(),
            unfinished.join(", ")
        );
    }
    if let EntryKind::Quantized { .. } = entry.kind {
        let r = &value["recipe"];
        println!(
            "quantized:     {} tensors, {} bits, group size {}, {}; max relative error {:.2e}",
            r["quantized_tensors"],
            r["bits"],
            r["group_size"],
            if r["symmetric"] == true { "symmetric" } else { "asymmetric" },
            r["max_relative_error"].as_f64().unwrap_or(0.0)
        );
        println!(
            "on disk:       {} against {} of base weights ({:.2}x smaller)",
            human(r["on_disk_bytes"].as_u64().unwrap_or(0)),
            human(r["base_weight_bytes"].as_u64().unwrap_or(0)),
            r["disk_ratio"].as_f64().unwrap_or(0.0)
        );
    }
    println!("files:");
    for f in &view.files {
        println!("  {:<44} {:>12}", f.name, f.size);
    }
    Ok(())
}
