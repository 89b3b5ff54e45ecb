//! One test per finding of the fuzz targets (fuzz/) and of the audit of what they reach, named
//! after what it guards. Each runs the same call on the same bytes as the finding: either the
//! fuzz harness itself (fuzz/harness.rs, included here, so a replay is exactly the fuzzer's call)
//! on the minimized input, or the library call the harness makes, with the expected error.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;
use std::sync::Mutex;

use llmfs::codec::quant::QuantConfig;
use llmfs::delta::import::{self, ImportFormat};
use llmfs::demo;
use llmfs::format::{Dtype, HeaderBuilder};
use llmfs::registry::{EntryKind, Store};
use llmfs::variant;

/// The harness shares one scratch store per process: replays run one at a time.
static HARNESS: Mutex<()> = Mutex::new(());

fn replay(target: fn(&[u8]), input: &[u8]) {
    let _guard = HARNESS.lock().unwrap_or_else(|e| e.into_inner());
    target(input);
}

fn tiny_store(dir: &Path) -> Store {
    demo::write_model(&dir.join("base"), &harness::tiny_spec()).unwrap();
    let store = Store::open(dir.join("store")).unwrap();
    llmfs::registry::add::add(&store, "base", &dir.join("base"), &Default::default()).unwrap();
    store
}

fn safetensors(tensors: &[(&str, Dtype, &[usize])], fill: u8) -> Vec<u8> {
    let mut b = HeaderBuilder::new().metadata("format", "pt");
    for (name, dtype, shape) in tensors {
        b.tensor(name, *dtype, shape);
    }
    let (mut bytes, infos) = b.build();
    let len = infos.last().map_or(0, |t| t.end) as usize;
    bytes.resize(bytes.len() + len, fill);
    bytes
}

// ---------------------------------------------------------------------------------------------
// quant_container
// ---------------------------------------------------------------------------------------------

/// `QuantSource::find` computed `config.n_groups(rows, cols)` (a division by `group_size`)
/// before `config.check_shape` refused a zero group size: a registry whose quantized entry says
/// `"group_size": 0` (registry.json is a file: hand-edited, corrupted) made the daemon panic on
/// the first lookup of that entry instead of answering EIO.
#[test]
fn quantized_entry_with_group_size_zero_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let store = tiny_store(dir.path());
    llmfs::quantize::quantize(
        &store,
        "q",
        "base",
        QuantConfig { bits: 8, group_size: 8, symmetric: true },
        |_| {},
    )
    .unwrap();
    let mut registry = store.load().unwrap();
    match &mut registry.entries.get_mut("q").unwrap().kind {
        EntryKind::Quantized { config, .. } => config.group_size = 0,
        other => panic!("{other:?}"),
    }
    assert!(variant::build_view(&registry, "q").is_err(), "a zero group size must be refused");
}

// ---------------------------------------------------------------------------------------------
// peft_config
// ---------------------------------------------------------------------------------------------

/// A base holding both `l` and `l.weight` (a valid safetensors file) gives both the same LoRA
/// stem `l`: the adapter's pair was counted twice (`used` = 4 of 2 adapter tensors) and
/// `lora_tensors - used` underflowed — a panic in debug builds, "18446744073709551614 of 2
/// adapter tensors match no base weight" in release.
#[test]
fn lora_pair_matching_two_base_tensors_is_counted_once_not_an_underflow() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::write(
        base.join("config.json"),
        br#"{"model_type":"llama","architectures":["LlamaForCausalLM"]}"#,
    )
    .unwrap();
    std::fs::write(
        base.join("model.safetensors"),
        safetensors(&[("l", Dtype::F32, &[4, 4]), ("l.weight", Dtype::F32, &[4, 4])], 0),
    )
    .unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    llmfs::registry::add::add(&store, "base", &base, &Default::default()).unwrap();
    let adapter = dir.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(adapter.join("adapter_config.json"), br#"{"r":2,"lora_alpha":2}"#).unwrap();
    std::fs::write(
        adapter.join("adapter_model.safetensors"),
        safetensors(
            &[
                ("base_model.model.l.lora_A.weight", Dtype::F32, &[2, 4]),
                ("base_model.model.l.lora_B.weight", Dtype::F32, &[4, 2]),
            ],
            0,
        ),
    )
    .unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        import::import(&store, "lora", "base", &adapter, ImportFormat::Lora)
    }));
    // `l` has no `.weight` suffix, so only `l.weight` takes the pair: one stem, used once, and the
    // import succeeds (the count no longer underflows into a refusal).
    let added = result.expect("import panicked").expect("the pair fits l.weight");
    let registry = store.load().unwrap();
    let view = variant::build_view(&registry, "lora").unwrap();
    let merged = view.weights.values().flat_map(|w| &w.tensors).filter(|t| t.name == "l.weight");
    assert!(
        merged.map(|t| matches!(t.source, variant::TensorSource::Lora { .. })).eq([true]),
        "l.weight is not merged: {:?}",
        added.entry
    );
}

/// The fuzzer's input for the same bug, minimized by hand (`cargo fuzz tmin` could not shrink
/// it): group size 0, a 1×1 shape, and a container holding only an empty `x.q` and `x.scale`.
#[test]
fn quant_container_group_size_zero_replay() {
    let mut input = vec![0u8]; // 8-bit, symmetric, F16
    for v in [0u16, 1, 1, 0, 0] {
        input.extend_from_slice(&v.to_le_bytes()); // group_size, rows, cols, range a, b
    }
    let json = br#"{"x.q":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"x.scale":{"dtype":"F16","shape":[0],"data_offsets":[0,0]}}"#;
    input.extend_from_slice(&(json.len() as u64).to_le_bytes());
    input.extend_from_slice(json);
    replay(harness::quant_container, &input);
}

// ---------------------------------------------------------------------------------------------
// registry
// ---------------------------------------------------------------------------------------------

/// `Store::load` validates entry names but not the file names of the records an entry owns in
/// `STORE/models/NAME/`: a registry.json naming `../../outside.safetensors` made the daemon
/// open (and serve) a file outside the store. Names are validated everywhere (issue 7,
/// Security): such a registry is corrupt, or the entry is refused.
#[test]
fn registry_file_names_cannot_leave_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = tiny_store(dir.path());
    llmfs::quantize::quantize(
        &store,
        "q",
        "base",
        QuantConfig { bits: 8, group_size: 8, symmetric: true },
        |_| {},
    )
    .unwrap();
    // The container, moved outside the store, and the record pointing at it.
    let outside = dir.path().join("outside.safetensors");
    std::fs::rename(store.entry_dir("q").join("model.safetensors"), &outside).unwrap();
    let mut text: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.registry_path()).unwrap()).unwrap();
    text["entries"]["q"]["files"][0]["name"] = "../../../outside.safetensors".into();
    std::fs::write(store.registry_path(), serde_json::to_vec(&text).unwrap()).unwrap();
    assert!(store.entry_dir("q").join("../../../outside.safetensors").exists());
    // The registry is refused as corrupt when loaded, naming the entry and the file.
    let e = store.load().expect_err("an entry's file record reaches outside STORE/models/q/").to_string();
    assert!(e.contains("corrupt") && e.contains("\"q\"") && e.contains("outside.safetensors"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// merge_stats
// ---------------------------------------------------------------------------------------------

/// The `merge_stats` harness over its seeds (fuzz/corpus/merge_stats, written by hand in the
/// file's layout, one with every method's statistics) and every truncation and many one-byte
/// changes of them: a table or an error, never a panic, and what parses applies without one.
#[test]
fn merge_stats_seeds_and_their_mutations_never_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/merge_stats");
    let mut seeds = 0;
    for seed in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(seed.unwrap().path()).unwrap();
        assert!(llmfs::merge::stats_file::decode(&bytes).is_ok(), "a seed does not parse");
        for cut in 0..=bytes.len() {
            replay(harness::merge_stats, &bytes[..cut]);
        }
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x02, 0x10, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                replay(harness::merge_stats, &b);
            }
        }
        seeds += 1;
    }
    assert!(seeds >= 3, "{seeds} seeds");
}
