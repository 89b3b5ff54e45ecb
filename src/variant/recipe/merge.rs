//! A merge: several parents' tensors combined by one of mergekit's methods, computed on read.
//!
//! The entry keeps its configuration (mergekit's schema, models named by entry), its seed and
//! the whole-tensor statistics `llmfs merge` computed (`merge::stats_file`), so reads never
//! compute them (an entry made before they were stored computes them at first read).
//! Its view is planned from its parents' views as mergekit's planner does (`merge::plan`: which
//! input tensors make each output tensor, renumbered layers for a passthrough stack, the
//! numbers of each tensor's merge); each output tensor is a [`MergedSource`] over its inputs'
//! sources, whatever recipe made them (a base, a cast, a quantized copy, a delta, an import,
//! another merge). Files: the base's (mergekit's `config_source`) file names and shard layout
//! when the merged tensors are the base's; one `model.safetensors` when a layer stack renames
//! them. config.json gets the new layer count and dtype; the tokenizer comes from
//! `tokenizer_source`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;

use crate::format::Dtype;
use crate::merge::config::TokenizerSource;
use crate::merge::{self, stats_file, MergeConfig, ModelTensors};
use crate::registry::{FileRecord, Registry};
use crate::source::SourceFile;
use crate::variant::source::{MergedSource, StoredStats, TensorSource};
use crate::variant::view::{read_whole, with_weights, EntryView, LogicalTensor, ViewError, WeightFile};

/// The files a tokenizer is made of (`tokenizer_source` takes them from one parent).
const TOKENIZER_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

/// `num_hidden_layers` of a view's config.json (0 when it has none).
fn num_layers(view: &EntryView) -> usize {
    view.file("config.json")
        .and_then(|f| read_whole(f).ok())
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|c| c.get("num_hidden_layers").and_then(Value::as_u64))
        .unwrap_or(0) as usize
}

/// The first of `architectures` in a view's config.json (None when it says none).
fn architecture(view: &EntryView) -> Option<String> {
    let config = view.file("config.json").and_then(|f| read_whole(f).ok())?;
    let config = serde_json::from_slice::<Value>(&config).ok()?;
    config.get("architectures")?.get(0)?.as_str().map(str::to_owned)
}

/// A view's vocabulary, token → id: tokenizer.json's `model.vocab` (a map, or unigram's list of
/// `[token, score]`) and `added_tokens`, else vocab.json. None when it has neither.
fn vocabulary(view: &EntryView) -> Option<BTreeMap<u64, String>> {
    let json =
        |name: &str| -> Option<Value> { serde_json::from_slice(&read_whole(view.file(name)?).ok()?).ok() };
    let mut out = BTreeMap::new();
    if let Some(tok) = json("tokenizer.json") {
        match tok.pointer("/model/vocab") {
            Some(Value::Object(m)) => {
                out.extend(m.iter().filter_map(|(k, v)| Some((v.as_u64()?, k.clone()))))
            }
            Some(Value::Array(list)) => out.extend(
                list.iter().enumerate().filter_map(|(i, e)| Some((i as u64, e.get(0)?.as_str()?.to_owned()))),
            ),
            _ => {}
        }
        for a in tok.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
            if let (Some(id), Some(c)) =
                (a.get("id").and_then(Value::as_u64), a.get("content").and_then(Value::as_str))
            {
                out.insert(id, c.to_owned());
            }
        }
        return Some(out);
    }
    let Value::Object(m) = json("vocab.json")? else { return None };
    Some(m.iter().filter_map(|(k, v)| Some((v.as_u64()?, k.clone()))).collect())
}

/// mergekit's `tokenizer_source` builds a tokenizer over the parents' vocabularies and permutes
/// each parent's embedding rows to it; llmfs takes one parent's tokenizer files as they are, which
/// is the same only when every parent has that vocabulary. Otherwise the merged embeddings would
/// not match the served tokenizer: refused, naming the first token id that differs.
fn check_vocabularies(source: &str, views: &BTreeMap<&str, &Arc<EntryView>>) -> Result<(), String> {
    let vocab_of = |m: &str| {
        vocabulary(views[m]).ok_or_else(|| {
            format!("tokenizer_source: {m} has no tokenizer.json or vocab.json to compare vocabularies with")
        })
    };
    let want = vocab_of(source)?;
    for &m in views.keys().filter(|&&m| m != source) {
        let got = vocab_of(m)?;
        if got == want {
            continue;
        }
        let ids = want.keys().chain(got.keys());
        let id = ids.filter(|id| want.get(id) != got.get(id)).min().copied().unwrap_or(0);
        let show = |v: &BTreeMap<u64, String>| v.get(&id).map_or("none".to_owned(), |t| format!("{t:?}"));
        return Err(format!(
            "tokenizer_source {source}: the vocabulary of {m} differs (token id {id}: {} in {m}, {} in {source}); \
             llmfs does not permute embeddings to a merged vocabulary",
            show(&got),
            show(&want)
        ));
    }
    Ok(())
}

/// Entry `name`'s view: `config` (a serialized [`MergeConfig`]) over `parents` (the views of
/// `parent_names`, in the registry's order). `files`: the entry's stored files, its statistics
/// file among them when `llmfs merge` stored one (entries made before: none, computed on read).
pub(super) fn view(
    registry: &Registry,
    name: &str,
    files: &[FileRecord],
    config: &Value,
    seed: u64,
    parent_names: &[String],
    parents: &[Arc<EntryView>],
) -> Result<EntryView, ViewError> {
    let invalid = |reason: String| ViewError::Invalid { entry: name.to_owned(), reason };
    let cfg: MergeConfig =
        serde_json::from_value(config.clone()).map_err(|e| invalid(format!("stored merge config: {e}")))?;
    let views: BTreeMap<&str, &Arc<EntryView>> =
        parent_names.iter().map(String::as_str).zip(parents).collect();
    // Every parent's tensors by name, and what the planner needs of each.
    let mut tensors: HashMap<&str, HashMap<&str, &LogicalTensor>> = HashMap::new();
    let mut models: BTreeMap<String, ModelTensors> = BTreeMap::new();
    for (&parent, view) in &views {
        let by_name: HashMap<&str, &LogicalTensor> =
            view.weights.values().flat_map(|w| &w.tensors).map(|t| (t.name.as_str(), t)).collect();
        let info = ModelTensors {
            tensors: by_name
                .iter()
                .map(|(n, t)| (n.to_string(), (t.source.dtype(), t.shape.clone())))
                .collect(),
            num_layers: num_layers(view),
            architecture: architecture(view),
        };
        tensors.insert(parent, by_name);
        models.insert(parent.to_owned(), info);
    }
    let plan = merge::plan(&cfg, &models, seed).map_err(|e| invalid(e.to_string()))?;
    let template = views
        .get(plan.config_source.as_str())
        .ok_or_else(|| invalid(format!("no parent {}", plan.config_source)))?;

    // The stored statistics, shared by every tensor (parsed at the first read that needs them).
    let stored = files.iter().find(|f| f.name == stats_file::FILE_NAME).map(|record| {
        let file = SourceFile::of_record(&registry.entry_dir(name), record, registry.objects.as_ref());
        Arc::new(StoredStats::new(Arc::new(file)))
    });

    // Each merged tensor over its inputs' sources.
    let mut merged: BTreeMap<&str, LogicalTensor> = BTreeMap::new();
    for recipe in &plan.tensors {
        let mut inputs = vec![];
        for input in &recipe.inputs {
            let t = tensors.get(input.model.as_str()).and_then(|m| m.get(input.tensor.as_str())).ok_or_else(
                || invalid(format!("{}: parent {} has no tensor {}", recipe.name, input.model, input.tensor)),
            )?;
            if !t.source.dtype().is_float() {
                return Err(invalid(format!(
                    "{}: {} is {}, not a float tensor",
                    recipe.name,
                    input.tensor,
                    t.source.dtype()
                )));
            }
            inputs.push(t.source.clone());
        }
        // Only tensors whose merge needs statistics read the file (a passthrough of a merge
        // with a TIES part, say, never opens it).
        let stats =
            stored.as_ref().filter(|_| recipe.merge.needs_stats()).map(|s| (s.clone(), recipe.name.clone()));
        let source = MergedSource::new(inputs, recipe.merge.clone(), recipe.out_dtype, stats);
        merged.insert(
            &recipe.name,
            LogicalTensor {
                name: recipe.name.clone(),
                shape: recipe.merge.shape.clone(),
                source: TensorSource::Merged(Arc::new(source)),
            },
        );
    }

    // The template's files when the merge has exactly its tensors; one file otherwise.
    let template_names: Vec<&str> =
        template.weights.values().flat_map(|w| &w.tensors).map(|t| t.name.as_str()).collect();
    let same_tensors =
        template_names.len() == merged.len() && template_names.iter().all(|n| merged.contains_key(n));
    let mut weights: BTreeMap<String, WeightFile> = BTreeMap::new();
    if same_tensors {
        for (file, w) in &template.weights {
            let tensors = w.tensors.iter().map(|t| merged[t.name.as_str()].clone()).collect();
            weights.insert(file.clone(), WeightFile { tensors, metadata: w.metadata.clone() });
        }
    } else {
        let metadata = template.weights.values().next().map(|w| w.metadata.clone()).unwrap_or_default();
        weights.insert(
            "model.safetensors".into(),
            WeightFile {
                tensors: plan.tensors.iter().map(|r| merged[r.name.as_str()].clone()).collect(),
                metadata,
            },
        );
    }
    let mut view = with_weights(template, &format!("merge {name} ({})", cfg.method.name()), weights);

    // The tokenizer of `tokenizer_source` (mergekit's default: the base's, i.e. the template's).
    if let Some(ts) = &cfg.tokenizer_source {
        let source = match ts {
            TokenizerSource::Model(m) => m.as_str(),
            TokenizerSource::Base => plan.config_source.as_str(),
        };
        check_vocabularies(source, &views).map_err(invalid)?;
    }
    if let Some(TokenizerSource::Model(m)) = &cfg.tokenizer_source {
        let from =
            views.get(m.as_str()).ok_or_else(|| invalid(format!("tokenizer_source {m} is not a parent")))?;
        view.files.retain(|f| !TOKENIZER_FILES.contains(&f.name.as_str()));
        view.files.extend(from.files.iter().filter(|f| TOKENIZER_FILES.contains(&f.name.as_str())).cloned());
    }
    let layers = plan.num_hidden_layers;
    let dtype: Option<Dtype> = plan.torch_dtype;
    super::edit_config(&mut view, |config| {
        if layers > 0 && config.get("num_hidden_layers").and_then(Value::as_u64) != Some(layers as u64) {
            config.insert("num_hidden_layers".into(), layers.into());
        }
        if let Some(d) = dtype {
            super::set_dtype(config, d);
        }
    });
    Ok(view)
}
