//! Raw ranged-GET throughput of a store: the bound a mount of that store can approach
//! (issue 15's benchmark, `scripts/bench_s3.py`). Every object under the given prefixes is read
//! whole through llmfs's own `Store::read_range_parallel` (parts of `--part-mib` MiB, up to
//! `--in-flight` GETs at once), one object after another as a loader reads shard after shard;
//! every part's bytes are copied into one reused buffer (touched, as a loader's copy to a GPU
//! would) and dropped.
//!
//! ```text
//! cargo run --release --example s3_get -- STORE PREFIX [PREFIX…] [--part-mib 8] [--in-flight 8] [--reps 1] [--list] [--into DIR]
//! ```
//!
//! STORE is `s3://BUCKET[/PREFIX]` (endpoint and keys from the AWS environment, as llmfs's
//! `--store`) or a local directory. Prints one line per repetition and, last, one JSON line
//! `{"objects":N,"bytes":B,"secs":[...],"median_secs":S,"gbps":G}` (G from the median).
//! `--into DIR`: each object is written into a new file in DIR instead (Store::fetch_into, the
//! mount's own fetch of an object into its disk cache, minus the cache's bookkeeping); the file
//! is removed after each repetition.
//! `--list` only lists: one JSON line `[{"key":K,"size":N},…]` (empty prefixes allowed), exit 0
//! once the server answers (the benchmark polls it until a fresh server is up).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use llmfs::store::{ReadOptions, Store};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    let mut opts = ReadOptions { part_size: 8 << 20, max_in_flight: 8 };
    let mut reps = 1usize;
    let mut list_only = false;
    let mut into: Option<std::path::PathBuf> = None;
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<usize> {
            args.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| name.to_string())
        };
        match a.as_str() {
            "--part-mib" => opts.part_size = (value("--part-mib")? as u64) << 20,
            "--in-flight" => opts.max_in_flight = value("--in-flight")?.max(1),
            "--reps" => reps = value("--reps")?.max(1),
            "--list" => list_only = true,
            "--into" => into = Some(args.next().context("--into needs a directory")?.into()),
            "-h" | "--help" => {
                println!(
                    "usage: s3_get STORE PREFIX [PREFIX…] [--part-mib 8] [--in-flight 8] [--reps 1] [--list] [--into DIR]"
                );
                return Ok(());
            }
            _ if a.starts_with("--") => bail!("unknown option {a}"),
            _ => positional.push(a),
        }
    }
    if positional.len() < 2 {
        bail!("usage: s3_get STORE PREFIX [PREFIX…] [--part-mib 8] [--in-flight 8] [--reps 1] [--list] [--into DIR]");
    }
    let store = Store::open(&positional[0]).with_context(|| positional[0].clone())?;
    let mut objects = Vec::new();
    for prefix in &positional[1..] {
        objects.extend(store.list(prefix).with_context(|| format!("list {prefix}"))?);
    }
    if list_only {
        let listed: Vec<_> =
            objects.iter().map(|o| serde_json::json!({"key": o.key, "size": o.size})).collect();
        println!("{}", serde_json::Value::from(listed));
        return Ok(());
    }
    if objects.is_empty() {
        bail!("{}: no objects under {:?}", store.location(), &positional[1..]);
    }
    let total: u64 = objects.iter().map(|o| o.size).sum();
    let mut buf = vec![0u8; opts.part_size as usize];
    let mut secs = Vec::with_capacity(reps);
    for rep in 0..reps {
        let t = Instant::now();
        let mut n = 0u64;
        for o in &objects {
            if let Some(dir) = &into {
                let path = dir.join(format!(".s3_get-{}", std::process::id()));
                let file = std::fs::File::create(&path).with_context(|| path.display().to_string())?;
                let r = store.fetch_into(&o.key, &o.etag, o.size, &file);
                std::fs::remove_file(&path)?;
                r?;
                n += o.size;
                continue;
            }
            store.read_range_parallel(&o.key, 0..o.size, &opts, &mut |_, b| {
                // Touched: copied out, as a loader copies every tensor (a part is at most part_size).
                let len = b.len().min(buf.len());
                buf[..len].copy_from_slice(&b[..len]);
                n += b.len() as u64;
                Ok(())
            })?;
        }
        let s = t.elapsed().as_secs_f64();
        if n != total {
            bail!("read {n} bytes, the objects hold {total}");
        }
        std::hint::black_box(&buf);
        println!(
            "rep {rep}: {} objects, {:.1} MB in {s:.3} s: {:.2} GB/s ({} MiB parts, {} in flight)",
            objects.len(),
            total as f64 / 1e6,
            total as f64 / s / 1e9,
            opts.part_size >> 20,
            opts.max_in_flight
        );
        secs.push(s);
    }
    let mut sorted = secs.clone();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    let median = if sorted.len() % 2 == 1 { sorted[mid] } else { (sorted[mid - 1] + sorted[mid]) / 2.0 };
    println!(
        "{{\"objects\":{},\"bytes\":{total},\"secs\":{secs:?},\"median_secs\":{median},\"gbps\":{}}}",
        objects.len(),
        total as f64 / median / 1e9
    );
    Ok(())
}
