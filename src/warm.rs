//! `llmfs warm NAME…` and `llmfs mount --warm NAME…`: decode entries into the disk cache ahead
//! of the loaders, with a progress bar: how a serving node is prepared before its replicas start.
//!
//! Without a mount holding the disk cache, `warm` opens the cache itself and decodes every
//! variant file of each entry there, all files at once (as a first open does), and fetches what
//! they read from an object store. When a mount serves from that cache (it holds its lock), the
//! same is done through the mount: opening a file there decodes it into the cache, so `warm`
//! opens each weight file of `MOUNT/NAME/` and returns when every open has.

use std::path::Path;
use std::sync::Arc;

use crate::registry::Store;
use crate::vfs::mount::{self, DiskCacheOptions, DiskCacheState};
use crate::vfs::Fs;

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("{0}: no such entry")]
    NoEntry(String),
    #[error("no disk cache to warm ({0})")]
    NoCache(String),
    #[error("{} file(s) not decoded: {}", .0.len(), .0.join("; "))]
    Failed(Vec<String>),
    #[error("{0}")]
    Io(String),
}

fn bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("a valid template"),
    );
    bar
}

/// `llmfs warm NAME… --disk-cache DIR`: the disk cache of `opts`, or, when a mount holds it,
/// through that mount.
pub fn warm(store: Store, names: &[String], opts: &DiskCacheOptions) -> Result<(), WarmError> {
    let note = format!("llmfs pid {}, warm", std::process::id());
    let (disk, state) = mount::open_disk_cache(opts, &note);
    let disk = match (disk, state) {
        (Some(d), _) => d,
        (None, DiskCacheState::Unusable { reason, .. }) => {
            let holder = std::fs::read_to_string(opts.dir.join("lock")).unwrap_or_default();
            return match mount::serving_holder(holder.trim()) {
                Some(mp) => {
                    eprintln!(
                        "{} is the disk cache of the mount at {}: warming through it",
                        opts.dir.display(),
                        mp.display()
                    );
                    through_mount(&mp, names)
                }
                None => Err(WarmError::NoCache(reason)),
            };
        }
        (None, _) => return Err(WarmError::NoCache("its size is 0".into())),
    };
    // An object store's files are fetched into the disk cache, as a mount does.
    let store = match store.node().fetcher() {
        Some(fetched) => {
            let cached = crate::cache::objects::CachedObjects::new(fetched, disk.clone());
            store.with_objects(crate::store::Objects(Arc::new(cached)))
        }
        None => store,
    };
    let fs = Fs::new(store, 256 << 20).map_err(|e| WarmError::Io(e.to_string()))?;
    fs.set_disk_cache(disk.clone());
    let mut sizes = vec![];
    for name in names {
        let files = fs.file_sizes(name).map_err(|_| WarmError::NoEntry(name.clone()))?;
        sizes.push(files.iter().map(|(_, n)| n).sum::<u64>());
    }
    let total: u64 = sizes.iter().sum();
    let bar = bar(total);
    let started = std::time::Instant::now();
    let mut failed = vec![];
    for name in names {
        bar.set_message(name.clone());
        let done = |_: &str, n: u64| bar.inc(n);
        failed.extend(fs.warm(name, &done).map_err(|e| {
            let why = e.message.unwrap_or_else(|| std::io::Error::from_raw_os_error(e.errno).to_string());
            WarmError::Io(format!("{name}: {why}"))
        })?);
    }
    bar.finish();
    let decoded = started.elapsed().as_secs_f64();
    // Committed before this process lets go of the cache.
    disk.flush();
    // The rate a first open fills at, and the commit's read-back after it: what a node's
    // preparation costs, and what the benchmark's scaling rows are made of.
    let committed = started.elapsed().as_secs_f64() - decoded;
    eprintln!("warm: {}, committed {committed:.2} s later", rate(total, decoded));
    if failed.is_empty() {
        Ok(())
    } else {
        Err(WarmError::Failed(failed))
    }
}

/// Warm `names` through the mount at `mountpoint` ([`mount::open_weights`]), with a progress bar.
pub fn through_mount(mountpoint: &Path, names: &[String]) -> Result<(), WarmError> {
    let files = mount::weight_files(mountpoint, names).map_err(WarmError::NoEntry)?;
    let total = files.iter().map(|(_, n)| n).sum();
    let bar = bar(total);
    let started = std::time::Instant::now();
    let failed = mount::open_weights(&files, &|n| bar.inc(n));
    bar.finish();
    // The mount's daemon commits them in the background (its `llmfs umount` waits for that).
    eprintln!("warm: {}, committed by the mount", rate(total, started.elapsed().as_secs_f64()));
    if failed.is_empty() {
        Ok(())
    } else {
        Err(WarmError::Failed(failed))
    }
}

/// "SIZE in S s (R GB/s)": `warm`'s last line, so a node's preparation says how fast it went.
fn rate(bytes: u64, secs: f64) -> String {
    format!(
        "{} in {secs:.2} s ({:.2} GB/s)",
        indicatif::HumanBytes(bytes),
        bytes as f64 / 1e9 / secs.max(1e-9)
    )
}
