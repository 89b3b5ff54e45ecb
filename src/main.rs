//! The `llmfs` command line: parse arguments, call the library, print results. Errors leave as
//! one line on stderr and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use llmfs::cache::disk::Verify;
use llmfs::codec::quant::QuantConfig;
use llmfs::delta::import::ImportFormat;
use llmfs::delta::{self, DeltaCodec};
use llmfs::format::Dtype;
use llmfs::registry::add::{self, AddOptions, ChatTemplateChoice};
use llmfs::registry::{self, EntryKind, Store};
use llmfs::vfs::mount::{self, DiskCacheOptions, MountOptions};
use llmfs::{adapter, check, demo, export, quantize, variant};

#[derive(Parser)]
#[command(name = "llmfs", version, about = "A FUSE filesystem for LLM weights: variants synthesized on read")]
struct Cli {
    /// The store (default: $LLMFS_STORE, else ~/.local/share/llmfs).
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register a Hugging Face model directory (safetensors weights).
    Add {
        name: String,
        path: PathBuf,
        /// Copy the files into the store instead of referencing them in place.
        #[arg(long)]
        copy: bool,
        #[arg(long)]
        link: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Chat template for tokenizer_config.json: auto (the family's, if the model has none), none, or a template name.
        #[arg(long, default_value = "auto")]
        chat_template: ChatTemplateChoice,
    },
    /// A dtype view of another entry: every floating tensor converted (round to nearest even).
    Cast {
        name: String,
        #[arg(long)]
        base: String,
        #[arg(long, value_parser = parse_float_dtype)]
        dtype: Dtype,
    },
    /// Merge entries with one of mergekit's methods (a mergekit YAML whose models are entry names,
    /// or the short form), computed on read: nothing is materialized.
    Merge {
        name: String,
        /// A mergekit YAML configuration (`merge_method`, `models` or `slices`, `base_model` ...).
        #[arg(long, conflicts_with_all = ["method", "models"])]
        config: Option<PathBuf>,
        /// The short form: linear, ties, slerp, ... (mergekit's method names).
        #[arg(long, requires = "models")]
        method: Option<String>,
        /// The short form's base model.
        #[arg(long, requires = "method")]
        base: Option<String>,
        /// The short form's models: A:WEIGHT[:DENSITY],C:WEIGHT …
        #[arg(long, requires = "method")]
        models: Option<String>,
        /// The short form's interpolation factor (slerp, nuslerp).
        #[arg(long, requires = "method")]
        t: Option<f64>,
        /// Seed of DARE's and DELLA's random masks (counter-based: the same bits everywhere).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Store the linear weights of BASE group-wise quantized (FastChat's compression); dequantized on read.
    Quantize {
        name: String,
        #[arg(long)]
        base: String,
        /// 8 or 4.
        #[arg(long, default_value_t = 8)]
        bits: u8,
        #[arg(long, default_value_t = 256)]
        group_size: usize,
        /// Quantize with a per-group minimum (FastChat's symmetric=False).
        #[arg(long)]
        asymmetric: bool,
    },
    /// Deltas: a fine-tune stored as its difference from a base.
    #[command(subcommand)]
    Delta(DeltaCommand),
    /// List entries.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Describe one entry.
    Info {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Pre-load validation of one entry or all: exits non-zero with one line per problem.
    Check { name: Option<String> },
    /// Materialize an entry's files without FUSE (the same bytes as `cp -r` from the mount).
    Export {
        name: String,
        out_dir: PathBuf,
        /// Write only the entry's GGUF file of this type (F16, BF16, Q8_0, Q4_0, Q4_K_M).
        #[arg(long)]
        gguf: Option<String>,
    },
    /// Remove an entry (refused while another entry depends on it).
    Rm { name: String },
    /// Remove what no entry references (left by a crash or a killed upload).
    Gc {
        /// List it, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only what is at least this many seconds old (an upload in progress on another node
        /// is not garbage yet).
        #[arg(long, default_value_t = 3600)]
        min_age: u64,
    },
    /// Mount the store.
    Mount(MountArgs),
    /// Decode entries into the disk cache ahead of the loaders (with a progress bar).
    Warm {
        #[arg(required = true)]
        names: Vec<String>,
        /// The disk cache (default STORE/cache), as `mount --disk-cache`.
        #[arg(long, env = "LLMFS_DISK_CACHE")]
        disk_cache: Option<PathBuf>,
        #[arg(long, value_parser = parse_size)]
        disk_cache_size: Option<u64>,
    },
    /// Unmount (also a stale mount whose daemon died); returns once its daemon has ended.
    Umount { mountpoint: PathBuf },
    /// The live mounts: mount point, daemon, store, disk cache (or why there is none).
    Status,
    /// Build a demo store (a generated model and variants) in DIR and mount it at DIR/mnt.
    Demo {
        #[arg(default_value = "llmfs-demo")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum DeltaCommand {
    /// Store the model directory TARGET as a delta against BASE (entry NAME reads back as TARGET).
    Make {
        name: String,
        #[arg(long)]
        base: String,
        #[arg(long)]
        target: PathBuf,
        /// lossless (exact), q8 (int8 of the difference per group) or bitdelta (sign + row scale).
        #[arg(long, default_value = "lossless", value_parser = parse_codec)]
        codec: DeltaCodec,
    },
    /// Import a delta made by another tool: FastChat's make_delta output, or a PEFT LoRA adapter.
    Import {
        name: String,
        #[arg(long)]
        base: String,
        #[arg(long)]
        from: PathBuf,
        #[arg(long, value_parser = parse_format)]
        format: ImportFormat,
    },
}

/// `llmfs mount`'s options. The daemon is this command again in the foreground: its command line
/// is [`MountArgs::daemon_args`] of the same struct, so no option is dropped on the way.
#[derive(clap::Args, Clone, Debug, PartialEq)]
struct MountArgs {
    mountpoint: PathBuf,
    /// Bytes of decoded tensor chunks kept in memory (e.g. 256MiB, 4GiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    cache_size: u64,
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "gpu"])]
    backend: String,
    /// Stay attached (default: run as a daemon, logging to STORE/llmfs.log).
    #[arg(long)]
    foreground: bool,
    /// Let other users access the mount (needs user_allow_other in /etc/fuse.conf unless root).
    #[arg(long)]
    allow_other: bool,
    /// Directory of decoded variant files, kept across mounts (default STORE/cache; 0: none).
    #[arg(long, env = "LLMFS_DISK_CACHE")]
    disk_cache: Option<PathBuf>,
    /// Bytes the disk cache may hold (default 32GiB, at most half the disk's free space; 0: none).
    #[arg(long, value_parser = parse_size)]
    disk_cache_size: Option<u64>,
    /// What is checked before a cached file is served: stat (its length, inode and ctime,
    /// which any write changes) or full (also its content hash, once per mount: reads it all).
    #[arg(long, default_value = "stat", value_parser = ["full", "stat"])]
    disk_cache_verify: String,
    /// Bytes of decoded files kept in memory, in front of the disk cache (default 0, none: it
    /// measured slower than the disk cache alone, see the README).
    #[arg(long, env = "LLMFS_MEMORY_CACHE", value_parser = parse_size)]
    memory_cache_size: Option<u64>,
    /// Decode these entries into the disk cache once mounted (with a progress bar).
    #[arg(long, num_args = 1.., value_name = "NAME")]
    warm: Vec<String>,
}

impl MountArgs {
    /// The disk cache directory: `--disk-cache` made absolute, else `STORE/cache`; `0`: none.
    fn disk_dir(&self, store: &Store) -> Option<PathBuf> {
        match &self.disk_cache {
            Some(d) if d.as_os_str() == "0" => None,
            Some(d) => Some(std::path::absolute(d).unwrap_or(d.clone())),
            None => Some(store.root().join("cache")),
        }
    }

    /// The daemon's arguments after `--store STORE`: these options, paths made absolute (it
    /// runs from `/`), in the foreground, without `--warm` (the parent warms through the mount
    /// once it is up).
    fn daemon_args(&self, store: &Store) -> Vec<String> {
        let abs = |p: &Path| p.canonicalize().unwrap_or_else(|_| std::path::absolute(p).unwrap_or(p.into()));
        let daemon = MountArgs {
            mountpoint: abs(&self.mountpoint),
            foreground: true,
            disk_cache: Some(self.disk_dir(store).unwrap_or_else(|| "0".into())),
            warm: vec![],
            ..self.clone()
        };
        let MountArgs {
            mountpoint,
            cache_size,
            backend,
            foreground,
            allow_other,
            disk_cache,
            disk_cache_size,
            disk_cache_verify,
            memory_cache_size,
            warm,
        } = daemon;
        let mut args = vec!["mount".to_string(), mountpoint.display().to_string()];
        let mut opt = |name: &str, value: Option<String>| {
            if let Some(v) = value {
                args.extend([format!("--{name}"), v]);
            }
        };
        opt("cache-size", Some(cache_size.to_string()));
        opt("backend", Some(backend));
        opt("disk-cache", disk_cache.map(|d| d.display().to_string()));
        opt("disk-cache-size", disk_cache_size.map(|n| n.to_string()));
        opt("disk-cache-verify", Some(disk_cache_verify));
        opt("memory-cache-size", memory_cache_size.map(|n| n.to_string()));
        args.extend(foreground.then(|| "--foreground".to_string()));
        args.extend(allow_other.then(|| "--allow-other".to_string()));
        if !warm.is_empty() {
            args.push("--warm".into());
            args.extend(warm);
        }
        args
    }
}

fn parse_format(s: &str) -> Result<ImportFormat, String> {
    ImportFormat::parse(s).ok_or_else(|| format!("{s:?}: use fastchat or lora"))
}

fn parse_codec(s: &str) -> Result<DeltaCodec, String> {
    DeltaCodec::parse(s).ok_or_else(|| format!("{s:?}: use lossless, q8 or bitdelta"))
}

fn parse_float_dtype(s: &str) -> Result<Dtype, String> {
    match s.to_ascii_lowercase().as_str() {
        "f16" | "float16" => Ok(Dtype::F16),
        "bf16" | "bfloat16" => Ok(Dtype::BF16),
        "f32" | "float32" => Ok(Dtype::F32),
        _ => Err(format!("{s:?}: use f16, bf16 or f32")),
    }
}

/// `256MiB`, `4GiB`, `1024` (bytes), `512KiB`, `2TiB`.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: expected a size like 256MiB or 4GiB"))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use KiB, MiB, GiB or TiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?}: too large"))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print in full; a usage error is one line, like every other error.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            eprintln!("llmfs: {line}");
            return ExitCode::from(2);
        }
    };
    if !matches!(cli.command, Command::Mount(_)) {
        // A command's output piped into `head` (`llmfs info NAME | head`) ends it quietly, as
        // it does any Unix tool, instead of a panic on the next println. The daemon keeps
        // Rust's default (SIGPIPE ignored): nothing it writes ends it.
        // SAFETY: signal(2) with SIG_DFL, before any thread of ours starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of causes, joined, skipping a cause that a message already
            // quotes (our error types put their source in their own text).
            let mut line = String::new();
            for cause in e.chain() {
                let text = cause.to_string();
                if !line.contains(&text) {
                    if !line.is_empty() {
                        line.push_str(": ");
                    }
                    line.push_str(&text);
                }
            }
            eprintln!("llmfs: {}", line.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn open_store(dir: Option<&Path>) -> Result<Store> {
    let root = dir.map(Path::to_path_buf).unwrap_or_else(Store::default_root);
    Ok(Store::open_location(&root)?)
}

fn run(cli: Cli) -> Result<ExitCode> {
    let store_arg = cli.store.clone();
    match cli.command {
        Command::Demo { dir } => return run_demo(&dir),
        Command::Umount { mountpoint } => {
            let done = mount::unmount(&mountpoint, |pid, holders| {
                if holders.is_empty() {
                    eprintln!(
                        "llmfs: waiting for the daemon (pid {pid}) to commit its decoded files and end"
                    );
                } else {
                    eprintln!(
                        "llmfs: waiting for the daemon (pid {pid}) to end: files on the mount are still in use by {}; \
                         it ends, and its disk cache is free for the next mount, once they are closed",
                        list(holders)
                    );
                }
            })?;
            println!("unmounted {}", mountpoint.display());
            if let Some(pid) = done.daemon_still_running {
                let by = if done.holders.is_empty() {
                    String::new()
                } else {
                    format!(" (files in use by {})", list(&done.holders))
                };
                eprintln!(
                    "llmfs: warning: its daemon (pid {pid}) still runs{by}: its disk cache is not free yet"
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Status => {
            for m in mount::status::all() {
                println!("{}", m.line());
            }
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let store = open_store(store_arg.as_deref())?;
    match cli.command {
        Command::Add { name, path, copy, link, description, chat_template } => {
            let opts = AddOptions { copy, link, description, chat_template };
            let added = match path.to_str().filter(|p| p.starts_with("s3://")) {
                Some(url) => add::add_objects(&store, &name, url, &opts)?,
                None => {
                    // Uploads to an object store take a while: show them (a local add uploads
                    // nothing and the bar stays empty).
                    let total = registry::walk::walk(&path).map(|w| w.total_size()).unwrap_or(0);
                    let bar = progress_bar(total);
                    let shown = bar.clone();
                    registry::set_upload_progress(Some(Box::new(move |n| shown.inc(n))));
                    let added = add::add(&store, &name, &path, &opts);
                    registry::set_upload_progress(None);
                    bar.finish_and_clear();
                    added?
                }
            };
            print_notes(&added.notes);
            let entry = added.entry;
            let EntryKind::Base { files, .. } = &entry.kind else { unreachable!("add makes bases") };
            // Say what the mount's tokenizer_config.json gets: the family's template is not always
            // it (the model has its own, the family is unknown, --chat-template chose another).
            let chat = match entry.chat_template.as_deref() {
                None => "the model's own chat_template, or none".to_owned(),
                Some(t) => match adapter::no_chat_template_reason(t) {
                    None => format!("chat_template {t} in the mounted tokenizer_config.json"),
                    Some(why) => format!("no chat_template: {t} has no Jinja form ({why})"),
                },
            };
            println!(
                "added {name}: {} files, {} family, template {}; {chat}",
                files.len(),
                entry.family,
                entry.template
            );
        }
        Command::Merge { name, config, method, base, models, t, seed } => {
            let (cfg, source) = match (&config, &method, &models) {
                (Some(path), _, _) => {
                    let text =
                        std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
                    (llmfs::merge::MergeConfig::from_yaml(&text)?, text)
                }
                (None, Some(m), Some(list)) => {
                    let cfg = llmfs::merge::MergeConfig::from_short(m, base.as_deref(), list, t)?;
                    let mut shown = format!("--method {m}");
                    if let Some(b) = &base {
                        shown += &format!(" --base {b}");
                    }
                    shown += &format!(" --models {list}");
                    if let Some(t) = t {
                        shown += &format!(" --t {t}");
                    }
                    (cfg, shown)
                }
                _ => bail!("merge: give --config FILE.yml, or --method M --models A:W,..."),
            };
            let parents = cfg.referenced_models();
            let first = parents.first().cloned().context("merge: the config names no model")?;
            let kind = EntryKind::Merge {
                parents,
                config: serde_json::to_value(&cfg)?,
                source,
                seed,
                files: vec![],
            };
            // Tensors done of all that need whole-tensor statistics.
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("statistics {bar:40} {pos}/{len} tensors eta {eta}")
                    .expect("a valid template"),
            );
            let made = llmfs::make_merge::make_merge(&store, &name, &first, kind, |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            });
            bar.finish_and_clear();
            let made = made?;
            if made.tensors > 0 {
                eprintln!(
                    "computed the whole-tensor statistics of {} tensors in {:.1} s, stored {}",
                    made.tensors,
                    made.seconds,
                    llmfs::info::human(made.bytes)
                );
            }
            println!("added {name}: a {} merge of {}", cfg.method.name(), cfg.referenced_models().join(", "));
        }
        Command::Cast { name, base, dtype } => {
            llmfs::variant::recipe::register(
                &store,
                &name,
                &base,
                EntryKind::Cast { base: base.clone(), dtype },
            )?;
            println!("added {name}: {base} as {dtype}");
        }
        Command::Quantize { name, base, bits, group_size, asymmetric } => {
            let config = QuantConfig { bits, group_size, symmetric: !asymmetric };
            let registry = store.load()?;
            let total = variant::build_view(&registry, &base).map(|v| v.total_size()).unwrap_or(0);
            let bar = progress_bar(total);
            let entry = quantize::quantize(&store, &name, &base, config, |n| bar.inc(n))?;
            bar.finish_and_clear();
            let EntryKind::Quantized { errors, .. } = &entry.kind else {
                unreachable!("quantize makes quantized entries")
            };
            let max = errors.values().cloned().fold(0.0, f64::max);
            println!(
                "added {name}: {} tensors of {base} quantized to {bits} bits, max relative error {max:.2e}",
                errors.len()
            );
        }
        Command::Delta(DeltaCommand::Make { name, base, target, codec }) => {
            let size = registry::walk::walk(&target).map(|w| w.total_size()).unwrap_or(0);
            let bar = progress_bar(size);
            let added = delta::make::make_delta(&store, &name, &base, &target, codec, |n| bar.inc(n))?;
            bar.finish_and_clear();
            print_notes(&added.notes);
            let entry = added.entry;
            let EntryKind::Delta { files, .. } = &entry.kind else { unreachable!("make_delta makes deltas") };
            let stored: u64 = files.iter().map(|f| f.fingerprint.size).sum();
            println!(
                "added {name}: {} files of {} as a {} delta of {base}, {} stored ({:.2}x smaller)",
                files.len(),
                target.display(),
                codec.name(),
                llmfs::info::human(stored),
                size as f64 / stored.max(1) as f64
            );
        }
        Command::Delta(DeltaCommand::Import { name, base, from, format }) => {
            let added = delta::import::import(&store, &name, &base, &from, format)?;
            print_notes(&added.notes);
            println!(
                "added {name}: {} delta from {} applied to {base} on read",
                format.name(),
                from.display()
            );
        }
        Command::Ls { json } => llmfs::info::ls(&store.load()?, json)?,
        Command::Info { name, json } => llmfs::info::info(&store.load()?, &name, json)?,
        Command::Check { name } => {
            let registry = store.load()?;
            let names: Vec<String> = match name {
                Some(n) => vec![n],
                None => registry.entries.keys().cloned().collect(),
            };
            let problems = check::check(&registry, &names);
            for p in &problems {
                println!("{p}");
            }
            if !problems.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
            println!("{} entr{} ok", names.len(), if names.len() == 1 { "y" } else { "ies" });
        }
        Command::Export { name, out_dir, gguf } => {
            let registry = store.load()?;
            let mut view = variant::build_view(&registry, &name)?;
            if let Some(kind) = gguf {
                let target = llmfs::format::gguf::GgufTarget::parse(&kind)
                    .with_context(|| format!("--gguf {kind}: use F16, BF16, Q8_0, Q4_0 or Q4_K_M"))?;
                let files = variant::gguf::files(&name, &view)
                    .map_err(|why| anyhow::anyhow!("{name} has no GGUF files: {why}"))?;
                let suffix = format!("-{}.gguf", target.name());
                let mut file =
                    files.into_iter().find(|f| f.name.ends_with(&suffix)).context("no such GGUF file")?;
                file.name = file.name.rsplit('/').next().unwrap_or(&file.name).to_owned();
                view = variant::EntryView { files: vec![file], weights: Default::default() };
            }
            let bar = progress_bar(view.total_size());
            let bytes = export::export(&view, &out_dir, |n| bar.inc(n))?;
            bar.finish_and_clear();
            println!("exported {name}: {} files, {bytes} bytes to {}", view.files.len(), out_dir.display());
        }
        Command::Gc { dry_run, min_age } => {
            let garbage = registry::gc::find(&store, std::time::Duration::from_secs(min_age))?;
            for g in &garbage {
                let verb = if dry_run { "would remove" } else { "removed" };
                if !dry_run {
                    registry::gc::remove(&store, std::slice::from_ref(g))?;
                }
                println!("{verb} {} ({})", g.what, llmfs::info::human(g.size));
            }
            let total: u64 = garbage.iter().map(|g| g.size).sum();
            println!(
                "{} objects, {}{}",
                garbage.len(),
                llmfs::info::human(total),
                if dry_run { " (dry run)" } else { "" }
            );
        }
        Command::Rm { name } => {
            let entry = store.update(|r| {
                r.get(&name)?;
                let deps = r.dependents(&name);
                if !deps.is_empty() {
                    return Err(registry::Error::HasDependents {
                        name: name.clone(),
                        dependents: deps.join(", "),
                    });
                }
                Ok(r.entries.remove(&name).expect("checked above"))
            })?;
            // The catalogue no longer names it: its files can go (a crash here leaves orphans
            // for `llmfs gc`, never a half entry).
            store.remove_owned(&name, &entry);
            println!("removed {name}");
        }
        Command::Mount(args) => mount_command(store, args)?,
        Command::Warm { names, disk_cache, disk_cache_size } => {
            let dir = match disk_cache {
                Some(d) if d.as_os_str() == "0" => bail!("--disk-cache 0: nothing to warm"),
                Some(d) => std::path::absolute(&d).unwrap_or(d),
                None => store.root().join("cache"),
            };
            let opts = DiskCacheOptions { dir, size: disk_cache_size, verify: Verify::Stat };
            llmfs::warm::warm(store, &names, &opts)?;
        }
        Command::Demo { .. } | Command::Umount { .. } | Command::Status => unreachable!("handled above"),
    }
    Ok(ExitCode::SUCCESS)
}

fn mount_command(store: Store, args: MountArgs) -> Result<()> {
    let mountpoint = &args.mountpoint;
    if args.backend == "gpu" && !cfg!(feature = "gpu") {
        bail!("--backend gpu: this build has no GPU backend (build with `cargo build --release --features gpu`)");
    }
    let dead = std::fs::metadata(mountpoint).err().and_then(|e| e.raw_os_error());
    if matches!(dead, Some(libc::ENOTCONN | libc::ECONNABORTED)) {
        // A mount whose daemon died (kill -9, a crash): say how to clear it.
        bail!(
            "{}: a dead llmfs mount is there (its daemon is gone): `llmfs umount {}` clears it, then mount again",
            mountpoint.display(),
            mountpoint.display()
        );
    }
    if !args.foreground {
        let mut daemon = vec!["--store".to_string(), store.location()];
        daemon.extend(args.daemon_args(&store));
        let status = mount::spawn_daemon(&store, mountpoint, &daemon)?;
        if let Some(line) = status.and_then(|s| s.warning()) {
            eprintln!("llmfs: {line}");
        }
        if !args.warm.is_empty() {
            llmfs::warm::through_mount(&mountpoint.canonicalize()?, &args.warm)?;
        }
        println!(
            "mounted {} at {} (log: {})",
            store.location(),
            mountpoint.display(),
            store.log_path().display()
        );
        return Ok(());
    }
    let verify = if args.disk_cache_verify == "stat" { Verify::Stat } else { Verify::Full };
    let opts = MountOptions {
        cache_size: args.cache_size,
        allow_other: args.allow_other,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()).max(2),
        disk_cache: args
            .disk_dir(&store)
            .filter(|_| args.disk_cache_size != Some(0))
            .map(|dir| DiskCacheOptions { dir, size: args.disk_cache_size, verify }),
        memory_cache_size: args.memory_cache_size,
        warm: args.warm.clone(),
    };
    init_logging();
    let select = |kind: &str| {
        llmfs::compute::backend::select(kind, llmfs::codec::quant::dequantize_range_bytes::<half::f16>)
    };
    if args.backend == "auto" {
        // auto cannot fail, so it need not hold the mount back: probing the GPU (a Vulkan
        // instance, and on a real GPU a calibration) took 0.3 s of every mount's 0.34 s here.
        // Until it answers, every kernel runs on the CPU, which gives the same bytes.
        let probe =
            std::thread::Builder::new().name("llmfs-backend".into()).spawn(move || match select("auto") {
                Ok(line) => tracing::info!("{line}"),
                Err(e) => tracing::warn!("backend auto: {e}; every kernel runs on the CPU"),
            });
        if let Err(e) = probe {
            tracing::warn!("backend auto: no thread to probe the GPU ({e}); every kernel runs on the CPU");
        }
    } else {
        let line = select(&args.backend).map_err(|e| anyhow::anyhow!(e))?;
        tracing::info!("{line}");
    }
    mount::run_foreground(store, mountpoint, &opts)?;
    Ok(())
}

/// "4321 (python3), 4400 (bash)", at most eight, then how many more.
fn list(holders: &[mount::Holder]) -> String {
    let mut s = holders.iter().take(8).map(|h| h.to_string()).collect::<Vec<_>>().join(", ");
    if holders.len() > 8 {
        s += &format!(" and {} more", holders.len() - 8);
    }
    s
}

/// What a command's walk of a directory left out or followed outside it: one line each, on
/// stderr, so nothing is left out without a word.
fn print_notes(notes: &[String]) {
    for n in notes {
        eprintln!("llmfs: note: {n}");
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).init();
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("a valid template"),
    );
    bar
}

fn run_demo(dir: &Path) -> Result<ExitCode> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let (store_dir, model_dir, mnt) = (dir.join("store"), dir.join("models/tiny-vicuna"), dir.join("mnt"));
    if mount::is_mounted(&mnt) {
        mount::unmount(&mnt, |_, _| {})?;
    }
    if !model_dir.join("config.json").exists() {
        println!("generating a small LLaMA-shaped model (Vicuna-named) in {}", model_dir.display());
        demo::write_model(&model_dir, &demo::ModelSpec::tiny())?;
        // A tokenizer, so the entries show GGUF views (llama.cpp's files) too.
        demo::write_byte_tokenizer(&model_dir)?;
    }
    let store = Store::open(&store_dir)?;
    let have = |n: &str| store.load().map(|r| r.entries.contains_key(n));
    // Named so that family detection finds Vicuna: the mount adds its chat template.
    if !have("tiny-vicuna")? {
        add::add(&store, "tiny-vicuna", &model_dir, &AddOptions::default())?;
    }
    for (variant, bits) in [("tiny-vicuna-q8", 8), ("tiny-vicuna-q4", 4)] {
        if !have(variant)? {
            let config = QuantConfig { bits, group_size: 128, symmetric: bits == 8 };
            quantize::quantize(&store, variant, "tiny-vicuna", config, |_| {})?;
        }
    }
    if !have("tiny-vicuna-f32")? {
        llmfs::variant::recipe::register(
            &store,
            "tiny-vicuna-f32",
            "tiny-vicuna",
            EntryKind::Cast { base: "tiny-vicuna".into(), dtype: Dtype::F32 },
        )?;
    }
    // A fine-tune, stored as a lossless delta of the base.
    let ft_dir = dir.join("models/tiny-vicuna-ft");
    if !ft_dir.join("config.json").exists() {
        demo::write_finetune(&model_dir, &ft_dir, 0.01, 5)?;
    }
    if !have("tiny-vicuna-ft")? {
        delta::make::make_delta(
            &store,
            "tiny-vicuna-ft",
            "tiny-vicuna",
            &ft_dir,
            DeltaCodec::Lossless,
            |_| {},
        )?;
    }
    std::fs::create_dir_all(&mnt)?;
    let Command::Mount(demo_mount) = Cli::parse_from([
        "llmfs".as_ref(),
        "mount".as_ref(),
        mnt.as_os_str(),
        "--cache-size".as_ref(),
        "256MiB".as_ref(),
    ])
    .command
    else {
        unreachable!("parsed a mount")
    };
    let mut exe_args = vec!["--store".to_string(), store.location()];
    exe_args.extend(demo_mount.daemon_args(&store));
    mount::spawn_daemon(&store, &mnt, &exe_args)?;
    // The commands are printed to work as typed (in bash): the binary by its real path (it need
    // not be on $PATH, e.g. `cargo run --release -- demo`), every path shell-quoted.
    let exe = std::env::current_exe().map_or("llmfs".into(), |p| p.display().to_string());
    let q = |p: &Path| shell_quote(&p.display().to_string());
    let (llmfs, s, m, f) = (shell_quote(&exe), q(store.root()), q(&mnt), q(&ft_dir));
    let f32_export = q(&dir.join("export-f32"));
    let m_raw = mnt.display();
    println!(
        "demo store: {}\nmounted at: {}\n\nTry:\n  ls -l {m}/*/\n  {llmfs} --store {s} ls\n  {llmfs} --store {s} info tiny-vicuna-q4\n  \
         ls -l {m}/tiny-vicuna-ft/gguf/\n  \
         python3 -c \"from safetensors import safe_open; f = safe_open('{m_raw}/tiny-vicuna-f32/model-00001-of-00002.safetensors', 'numpy'); print(f.keys())\"\n  \
         cmp <({llmfs} --store {s} export tiny-vicuna-f32 {f32_export} >/dev/null; cat {f32_export}/*.safetensors) <(cat {m}/tiny-vicuna-f32/*.safetensors) && echo same bytes\n  \
         mkdir {m}/tiny-vicuna/deltas/my-ft && cp -r {f}/. {m}/tiny-vicuna/deltas/my-ft/ && diff -r -x deltas -x gguf {f} {m}/my-ft && echo stored as a delta\n  \
         {llmfs} umount {m}",
        store.root().display(),
        mnt.display(),
    );
    Ok(ExitCode::SUCCESS)
}

/// `s` as one bash word: unchanged when it holds only safe characters, else single-quoted.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(shell_quote("/tmp/a-b_c.d"), "/tmp/a-b_c.d");
        assert_eq!(shell_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn the_daemon_gets_every_mount_option() {
        let store = Store::open(tempfile::tempdir().unwrap().path()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let given = MountArgs {
            mountpoint: dir.path().to_path_buf(),
            cache_size: 12345,
            backend: "cpu".into(),
            foreground: false,
            allow_other: true,
            disk_cache: Some(dir.path().join("c")),
            disk_cache_size: Some(777),
            disk_cache_verify: "full".into(),
            memory_cache_size: Some(999),
            warm: vec!["a".into()],
        };
        let mut argv = vec!["llmfs".to_string()];
        argv.extend(given.daemon_args(&store));
        let Command::Mount(daemon) = Cli::try_parse_from(&argv).unwrap().command else {
            panic!("not a mount")
        };
        let want = MountArgs { foreground: true, warm: vec![], ..given };
        assert_eq!(daemon, want);
        // No disk cache stays none; the default is the store's.
        let none = MountArgs { disk_cache: Some("0".into()), ..want.clone() };
        assert_eq!(none.daemon_args(&store).iter().filter(|a| *a == "0").count(), 1);
        let default = MountArgs { disk_cache: None, ..want };
        assert!(default.daemon_args(&store).contains(&store.root().join("cache").display().to_string()));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }
}
