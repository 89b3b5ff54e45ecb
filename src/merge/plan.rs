//! From a config and the parents' tensor lists to one recipe per output tensor, as mergekit's
//! `MergePlanner` does (plan.py): `models:` becomes one slice over every layer (the base appended
//! when it is not listed), slices stack layers (output layer `k` is input layer
//! `layer_range[0] + offset`, renumbered), parameters are resolved per tensor with `t` the layer's
//! position in its slice (`idx / (n - 1)`, 1 for a one-layer slice, 0 outside the layers), and
//! tensors outside the layers come from the first slice (embeddings) or the last (final norm,
//! lm_head). mergekit reads the layer layout from its architecture tables; here any tensor named
//! `P.layers.N.S` is a layer tensor, names containing `embed` are taken from the first slice and
//! the other non-layer tensors from the last — the llama-like layout of every family llmfs serves.
//! `lm_head.weight` missing from a parent that ties its embeddings is read from
//! `model.embed_tokens.weight` (mergekit's `tied_names`).

use std::collections::BTreeMap;

use super::config::{method_params, InputSlice, Inputs, MergeConfig, Method, OutputSlice, Scope};
use super::params::{resolve, Params, Resolved};
use super::MergeError;
use crate::compute::mergekit::{name_key, Gta, GtaParent, Kernel, Sparsify, TensorMerge};
use crate::format::Dtype;

/// What the planner needs to know of one parent model.
#[derive(Clone, Debug, Default)]
pub struct ModelTensors {
    /// Every weight tensor: name → (dtype, shape).
    pub tensors: BTreeMap<String, (Dtype, Vec<usize>)>,
    /// `num_hidden_layers` of its config.json.
    pub num_layers: usize,
    /// The first of its config.json's `architectures` (None: not said). Parents that say
    /// different ones are refused, as mergekit refuses them without `--allow-crimes`.
    pub architecture: Option<String>,
}

/// One input of a merged tensor: which model's tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInput {
    pub model: String,
    pub tensor: String,
}

/// One output tensor: where its inputs are and the numbers of its merge.
#[derive(Clone, Debug)]
pub struct TensorRecipe {
    pub name: String,
    /// In mergekit's input order; `merge.base` indexes this list.
    pub inputs: Vec<TensorInput>,
    pub merge: TensorMerge,
    /// The dtype written: `out_dtype`, else the compute dtype.
    pub out_dtype: Dtype,
}

/// The whole merged model.
#[derive(Clone, Debug)]
pub struct MergePlan {
    pub tensors: Vec<TensorRecipe>,
    /// `num_hidden_layers` of the merged config.json (the sum of the slices' lengths).
    pub num_hidden_layers: usize,
    /// The model whose config.json the merge starts from (the base, else the first model).
    pub config_source: String,
    /// `torch_dtype` of the merged config.json: `out_dtype`, else `dtype` (unchanged if neither).
    pub torch_dtype: Option<Dtype>,
}

/// `P.layers.N.S` → (P, N, S).
pub fn split_layer(name: &str) -> Option<(&str, usize, &str)> {
    let at = name.find(".layers.")?;
    let rest = &name[at + 8..];
    let dot = rest.find('.')?;
    let n = rest[..dot].parse().ok()?;
    Some((&name[..at], n, &rest[dot + 1..]))
}

fn promote(a: Dtype, b: Dtype) -> Dtype {
    if a == b {
        a
    } else {
        Dtype::F32
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, MergeError> {
    Err(MergeError::Config(msg.into()))
}

struct Planner<'a> {
    cfg: &'a MergeConfig,
    models: &'a BTreeMap<String, ModelTensors>,
    seed: u64,
    threads: usize,
    out: Vec<TensorRecipe>,
}

/// Plan a merge. `models` holds every model the config references.
pub fn plan(
    cfg: &MergeConfig,
    models: &BTreeMap<String, ModelTensors>,
    seed: u64,
) -> Result<MergePlan, MergeError> {
    plan_with_threads(cfg, models, seed, 1)
}

/// [`plan`], matching a mergekit run whose torch used `threads` intra-op threads (see
/// `TensorMerge::threads`: whole-tensor sums over more than 32768 elements depend on it).
pub fn plan_with_threads(
    cfg: &MergeConfig,
    models: &BTreeMap<String, ModelTensors>,
    seed: u64,
    threads: usize,
) -> Result<MergePlan, MergeError> {
    for m in cfg.referenced_models() {
        if !models.contains_key(&m) {
            return err(format!("model {m:?} is not known"));
        }
    }
    check_same_layout(cfg, models)?;
    let slices: Vec<OutputSlice> = match &cfg.inputs {
        Inputs::Slices(s) => s.clone(),
        Inputs::Models(ms) => {
            let mut sources: Vec<InputSlice> = ms
                .iter()
                .map(|m| InputSlice {
                    model: m.model.clone(),
                    layer_range: (0, models[&m.model].num_layers),
                    parameters: m.parameters.clone(),
                })
                .collect();
            if let Some(b) = &cfg.base_model {
                if !ms.iter().any(|m| &m.model == b) {
                    sources.push(InputSlice {
                        model: b.clone(),
                        layer_range: (0, models[b].num_layers),
                        parameters: None,
                    });
                }
            }
            vec![OutputSlice { sources, base_model: None, parameters: None }]
        }
    };
    for (i, s) in slices.iter().enumerate() {
        let len = s.sources[0].layer_range.1 - s.sources[0].layer_range.0;
        for src in &s.sources {
            let (a, b) = src.layer_range;
            if b - a != len {
                return err(format!(
                    "slices[{i}]: all inputs to a slice must contain the same number of layers"
                ));
            }
            let n = models[&src.model].num_layers;
            if b > n {
                return err(format!(
                    "slices[{i}]: layer_range [{a}, {b}] is outside {}'s {n} layers",
                    src.model
                ));
            }
        }
    }
    let mut p = Planner { cfg, models, seed, threads: threads.max(1), out: Vec::new() };
    let first = &slices[0];
    let last = &slices[slices.len() - 1];
    let reference = &models[&first.sources[0].model];
    let mut pre = Vec::new();
    let mut post = Vec::new();
    for name in reference.tensors.keys() {
        if split_layer(name).is_some() {
            continue;
        }
        if name.contains("embed") {
            pre.push(name.clone());
        } else {
            post.push(name.clone());
        }
    }
    let all_sources = slices.iter().flat_map(|s| &s.sources);
    if !post.iter().any(|n| n == "lm_head.weight")
        && all_sources.clone().any(|s| models[&s.model].tensors.contains_key("lm_head.weight"))
    {
        post.push("lm_head.weight".into());
    }
    for name in &pre {
        p.tensor(name, &vec![name.clone(); first.sources.len()], first, 0.0)?;
    }
    let mut out_layer = 0;
    for s in &slices {
        let len = s.sources[0].layer_range.1 - s.sources[0].layer_range.0;
        for off in 0..len {
            let t = if len > 1 { off as f64 / (len - 1) as f64 } else { 1.0 };
            let src0 = &s.sources[0];
            let in0 = src0.layer_range.0 + off;
            let mut template: Vec<(String, String)> = models[&src0.model]
                .tensors
                .keys()
                .filter_map(|n| {
                    split_layer(n)
                        .filter(|(_, k, _)| *k == in0)
                        .map(|(pre, _, suf)| (pre.to_string(), suf.to_string()))
                })
                .collect();
            template.sort();
            for (prefix, suffix) in &template {
                let out_name = format!("{prefix}.layers.{out_layer}.{suffix}");
                let ins: Vec<String> = s
                    .sources
                    .iter()
                    .map(|src| format!("{prefix}.layers.{}.{suffix}", src.layer_range.0 + off))
                    .collect();
                p.tensor(&out_name, &ins, s, t)?;
            }
            out_layer += 1;
        }
    }
    for name in &post {
        p.tensor(name, &vec![name.clone(); last.sources.len()], last, 0.0)?;
    }
    let config_source = cfg.base_model.clone().unwrap_or_else(|| cfg.referenced_models()[0].clone());
    Ok(MergePlan {
        tensors: p.out,
        num_hidden_layers: out_layer,
        config_source,
        torch_dtype: cfg.out_dtype.or(cfg.dtype),
    })
}

/// The parents are one architecture: the same `architectures`, and (when `models:` merges
/// whole models) the same layer count and tensor names, so that no parent's tensor is silently
/// left out. The error names the first tensor one parent has and another lacks.
fn check_same_layout(cfg: &MergeConfig, models: &BTreeMap<String, ModelTensors>) -> Result<(), MergeError> {
    let names = cfg.referenced_models();
    let Some((first, rest)) = names.split_first() else { return Ok(()) };
    let reference = &models[first];
    for m in rest {
        if let (Some(a), Some(b)) = (&reference.architecture, &models[m].architecture) {
            if a != b {
                return err(format!("parents of different architectures: {first} is {a}, {m} is {b}"));
            }
        }
    }
    // `lm_head.weight` may be missing where the embeddings are tied (mergekit's `tied_names`).
    let names_of = |mt: &ModelTensors, layers: bool| -> Vec<String> {
        mt.tensors
            .keys()
            .filter(|n| split_layer(n).is_some() == layers && n.as_str() != "lm_head.weight")
            .cloned()
            .collect()
    };
    let whole_models = matches!(cfg.inputs, Inputs::Models(_));
    for m in rest {
        let other = &models[m];
        // Non-layer tensors always (embeddings and the head come from one parent); layer tensors
        // when whole models are merged (slices name their own layers).
        let mut kinds = vec![false];
        if whole_models {
            kinds.push(true);
        }
        for layers in kinds {
            let (a, b) = (names_of(reference, layers), names_of(other, layers));
            let missing = a
                .iter()
                .filter(|n| !other.tensors.contains_key(*n))
                .map(|n| (n, m.as_str()))
                .chain(b.iter().filter(|n| !reference.tensors.contains_key(*n)).map(|n| (n, first.as_str())))
                .min_by(|x, y| tensor_order(x.0).cmp(&tensor_order(y.0)));
            if let Some((tensor, lacking)) = missing {
                let (la, lb) = (reference.num_layers, other.num_layers);
                let layers =
                    if la != lb { format!(" ({first} has {la} layers, {m} {lb})") } else { String::new() };
                return err(format!("tensor {tensor} is missing in model {lacking}{layers}"));
            }
        }
    }
    Ok(())
}

/// Tensors in the order the planner visits them: layer tensors by layer number, then name.
fn tensor_order(name: &str) -> (usize, &str) {
    match split_layer(name) {
        Some((_, n, _)) => (n, name),
        None => (0, name),
    }
}

impl Planner<'_> {
    /// Plan one output tensor `name` from `inputs[i]` of slice `s`'s source `i`.
    fn tensor(&mut self, name: &str, inputs: &[String], s: &OutputSlice, t: f64) -> Result<(), MergeError> {
        let cfg = self.cfg;
        let base_model = s.base_model.as_deref().or(cfg.base_model.as_deref());
        let mut resolved_inputs = Vec::new();
        let mut shape: Option<&Vec<usize>> = None;
        let mut dtype: Option<Dtype> = None;
        for (src, tname) in s.sources.iter().zip(inputs) {
            let mt = &self.models[&src.model];
            let actual = if mt.tensors.contains_key(tname) {
                tname.clone()
            } else if tname == "lm_head.weight" && mt.tensors.contains_key("model.embed_tokens.weight") {
                "model.embed_tokens.weight".to_string()
            } else {
                return err(format!("tensor {tname} is missing in model {}", src.model));
            };
            let (dt, sh) = &mt.tensors[&actual];
            if !matches!(dt, Dtype::F16 | Dtype::BF16 | Dtype::F32) {
                return err(format!("tensor {actual} of {} is {dt:?}: only float tensors merge", src.model));
            }
            match shape {
                None => shape = Some(sh),
                Some(s0) if s0 != sh => {
                    return err(format!("tensor {name}: shape {sh:?} in {} differs from {s0:?}", src.model));
                }
                _ => {}
            }
            dtype = Some(dtype.map_or(*dt, |d| promote(d, *dt)));
            resolved_inputs.push(TensorInput { model: src.model.clone(), tensor: actual });
        }
        let base = base_model.and_then(|b| s.sources.iter().position(|x| x.model == b));
        let method = cfg.method;
        let specs = method_params(method);
        let shared_scopes: Vec<Option<&Params>> = vec![s.parameters.as_ref(), cfg.parameters.as_ref()];
        let mut shared = BTreeMap::new();
        for sp in specs.iter().filter(|p| p.scope == Scope::Shared) {
            let v = resolve(sp.name, sp.kind, sp.default, &shared_scopes, name, t, None)
                .map_err(MergeError::Config)?;
            shared.insert(sp.name, v.expect("shared parameters resolve"));
        }
        // Per input: the slice's sources for that model, then the slice's, then the global parameters.
        let mut per_input: Vec<BTreeMap<&str, Option<Resolved>>> = Vec::new();
        for (i, src) in s.sources.iter().enumerate() {
            let mut scopes: Vec<Option<&Params>> =
                s.sources.iter().filter(|x| x.model == src.model).map(|x| x.parameters.as_ref()).collect();
            scopes.extend(shared_scopes.iter().copied());
            let mut m = BTreeMap::new();
            for sp in specs.iter().filter(|p| p.scope != Scope::Shared) {
                if sp.scope == Scope::NonBase && Some(i) == base {
                    continue;
                }
                let optional = method == Method::Passthrough;
                let v = if optional {
                    resolve(
                        sp.name,
                        sp.kind,
                        Some(Resolved::Float(f64::NAN)),
                        &scopes,
                        &inputs[i],
                        t,
                        Some(&src.model),
                    )
                    .map_err(MergeError::Config)?
                    .filter(|v| !v.float().is_nan())
                } else {
                    resolve(sp.name, sp.kind, sp.default, &scopes, &inputs[i], t, Some(&src.model))
                        .map_err(MergeError::Config)?
                };
                m.insert(sp.name, v);
            }
            per_input.push(m);
        }
        let f = |m: &BTreeMap<&str, Option<Resolved>>, k: &str| {
            m.get(k).copied().flatten().map(Resolved::float).unwrap_or(0.0)
        };
        let non_base: Vec<usize> = (0..s.sources.len()).filter(|&i| Some(i) != base).collect();
        let check_density = |d: f64, i: usize| -> Result<(), MergeError> {
            if !(d > 0.0 && d <= 1.0) {
                return err(format!(
                    "density {d} for {}.{} is outside (0, 1]",
                    s.sources[i].model, inputs[i]
                ));
            }
            Ok(())
        };
        let kernel = match method {
            Method::Linear => {
                let weights: Vec<f64> = per_input.iter().map(|m| f(m, "weight")).collect();
                let normalize = shared["normalize"].bool();
                if normalize && weights.iter().map(|&w| w as f32).sum::<f32>() == 0.0 {
                    return err(format!("tensor {name}: weights sum to zero with normalize"));
                }
                Kernel::Linear { weights, normalize }
            }
            Method::Slerp => {
                let t = shared["t"].float();
                if !(0.0..=1.0).contains(&t) {
                    return err(format!("tensor {name}: t = {t} is outside [0, 1]"));
                }
                Kernel::Slerp { t }
            }
            Method::Nuslerp => {
                if shared["nuslerp_row_wise"].bool() || !shared["nuslerp_flatten"].bool() {
                    return err("nuslerp: only the flattened form (nuslerp_flatten: true, nuslerp_row_wise: false) is supported");
                }
                let w: Vec<f64> = non_base.iter().map(|&i| f(&per_input[i], "weight")).collect();
                let total = w[0] + w[1];
                Kernel::Nuslerp { t: if total.abs() < 1e-6 { 0.5 } else { w[1] / total } }
            }
            Method::ModelStock => {
                if shared["filter_wise"].bool() {
                    return err("model_stock: filter_wise: true is not supported");
                }
                Kernel::ModelStock
            }
            Method::Passthrough => Kernel::Passthrough {
                scale: per_input[0].get("scale").copied().flatten().map(Resolved::float),
            },
            m => {
                let sparsify = match m {
                    Method::Ties => Some(Sparsify::Magnitude),
                    Method::DareTies | Method::DareLinear => Some(Sparsify::Random),
                    Method::Breadcrumbs | Method::BreadcrumbsTies => Some(Sparsify::MagnitudeOutliers),
                    Method::Della | Method::DellaLinear => Some(Sparsify::Della),
                    _ => None,
                };
                let consensus =
                    matches!(m, Method::Ties | Method::DareTies | Method::BreadcrumbsTies | Method::Della);
                let mut parents = Vec::new();
                for &i in &non_base {
                    let pi = &per_input[i];
                    let density = f(pi, "density");
                    check_density(density, i)?;
                    let epsilon = f(pi, "epsilon");
                    if sparsify == Some(Sparsify::Della)
                        && density < 1.0
                        && (density + epsilon >= 1.0 || density - epsilon <= 0.0)
                    {
                        return err(format!(
                            "{}.{}: epsilon must be chosen such that density +/- epsilon is in (0, 1)",
                            s.sources[i].model, inputs[i]
                        ));
                    }
                    parents.push(GtaParent {
                        weight: f(pi, "weight"),
                        density,
                        gamma: f(pi, "gamma"),
                        epsilon,
                    });
                }
                Kernel::Gta(Gta {
                    consensus,
                    sparsify,
                    parents,
                    normalize: shared["normalize"].bool(),
                    rescale: shared["rescale"].bool(),
                    lambda: shared["lambda"].float(),
                })
            }
        };
        let compute = cfg.dtype.unwrap_or(dtype.expect("a slice has sources"));
        self.out.push(TensorRecipe {
            name: name.to_string(),
            inputs: resolved_inputs,
            merge: TensorMerge {
                kernel,
                dtype: compute,
                base,
                shape: shape.cloned().unwrap_or_default(),
                seed: self.seed,
                name_key: name_key(name),
                threads: self.threads,
            },
            out_dtype: cfg.out_dtype.unwrap_or(compute),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(layers: usize) -> ModelTensors {
        let mut t = BTreeMap::new();
        t.insert("model.embed_tokens.weight".to_string(), (Dtype::BF16, vec![8, 4]));
        t.insert("model.norm.weight".to_string(), (Dtype::BF16, vec![4]));
        t.insert("lm_head.weight".to_string(), (Dtype::BF16, vec![8, 4]));
        for l in 0..layers {
            t.insert(format!("model.layers.{l}.mlp.up_proj.weight"), (Dtype::BF16, vec![4, 4]));
            t.insert(format!("model.layers.{l}.self_attn.q_proj.weight"), (Dtype::BF16, vec![4, 4]));
        }
        ModelTensors { tensors: t, num_layers: layers, architecture: None }
    }

    #[test]
    fn frankenmerge_renumbers_layers() {
        let cfg = MergeConfig::from_yaml(
            "slices:\n - sources: [{model: a, layer_range: [0, 3]}]\n - sources: [{model: b, layer_range: [1, 4]}]\nmerge_method: passthrough\ndtype: bfloat16\n",
        )
        .unwrap();
        let models: BTreeMap<String, ModelTensors> =
            [("a".to_string(), model(4)), ("b".to_string(), model(4))].into();
        let p = plan(&cfg, &models, 0).unwrap();
        assert_eq!(p.num_hidden_layers, 6);
        let find = |n: &str| p.tensors.iter().find(|r| r.name == n).unwrap();
        assert_eq!(
            find("model.layers.3.mlp.up_proj.weight").inputs[0],
            TensorInput { model: "b".into(), tensor: "model.layers.1.mlp.up_proj.weight".into() }
        );
        assert_eq!(
            find("model.layers.5.mlp.up_proj.weight").inputs[0].tensor,
            "model.layers.3.mlp.up_proj.weight"
        );
        assert_eq!(find("model.norm.weight").inputs[0].model, "b");
        assert_eq!(find("model.embed_tokens.weight").inputs[0].model, "a");
        assert_eq!(p.tensors.len(), 2 * 6 + 3);
        let bad = MergeConfig::from_yaml(
            "slices:\n - sources: [{model: a, layer_range: [0, 9]}]\nmerge_method: passthrough\n",
        )
        .unwrap();
        assert!(plan(&bad, &models, 0).unwrap_err().to_string().contains("outside"));
    }

    #[test]
    fn slerp_gradient_and_filters_resolve_per_layer() {
        let cfg = MergeConfig::from_yaml(
            "models: [{model: a}, {model: b}]\nbase_model: a\nmerge_method: slerp\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 1]\n    - value: 0.25\n",
        )
        .unwrap();
        let models: BTreeMap<String, ModelTensors> =
            [("a".to_string(), model(3)), ("b".to_string(), model(3))].into();
        let p = plan(&cfg, &models, 0).unwrap();
        let t = |n: &str| match p.tensors.iter().find(|r| r.name == n).unwrap().merge.kernel {
            Kernel::Slerp { t } => t,
            _ => panic!(),
        };
        assert_eq!(t("model.layers.0.self_attn.q_proj.weight"), 0.0);
        assert_eq!(t("model.layers.1.self_attn.q_proj.weight"), 0.5);
        assert_eq!(t("model.layers.2.self_attn.q_proj.weight"), 1.0);
        assert_eq!(t("model.layers.1.mlp.up_proj.weight"), 0.25);
        assert_eq!(t("model.embed_tokens.weight"), 0.25);
    }

    #[test]
    fn ties_per_model_densities_and_order() {
        let cfg = MergeConfig::from_yaml(
            "models:\n - model: a\n   parameters: {weight: 0.5, density: 0.3}\n - model: b\n   parameters: {weight: 0.7, density: [0.2, 0.8]}\nbase_model: base\nmerge_method: ties\n",
        )
        .unwrap();
        let models: BTreeMap<String, ModelTensors> =
            [("a".to_string(), model(2)), ("b".to_string(), model(2)), ("base".to_string(), model(2))].into();
        let p = plan(&cfg, &models, 0).unwrap();
        let r = p.tensors.iter().find(|r| r.name == "model.layers.1.mlp.up_proj.weight").unwrap();
        assert_eq!(r.merge.base, Some(2));
        let Kernel::Gta(g) = &r.merge.kernel else { panic!() };
        assert_eq!((g.parents[0].density, g.parents[1].density), (0.3, 0.8));
        assert!(g.consensus && g.normalize && !g.rescale);
    }

    #[test]
    fn parents_must_share_architecture_layers_and_tensor_names() {
        let cfg = MergeConfig::from_short("linear", None, "a:1,b:1", None).unwrap();
        let run = |b: ModelTensors| {
            let models: BTreeMap<String, ModelTensors> =
                [("a".to_string(), model(2)), ("b".to_string(), b)].into();
            plan(&cfg, &models, 0).map(|_| ()).map_err(|e| e.to_string())
        };
        assert_eq!(run(model(2)), Ok(()));
        // b's extra layer would be dropped without a word.
        let e = run(model(3)).unwrap_err();
        assert!(e.contains("tensor model.layers.2.mlp.up_proj.weight is missing in model a"), "{e}");
        assert!(e.contains("a has 2 layers, b 3"), "{e}");
        let mut extra = model(2);
        extra.tensors.insert("model.rotary.inv_freq".into(), (Dtype::F32, vec![2]));
        let e = run(extra).unwrap_err();
        assert!(e.contains("tensor model.rotary.inv_freq is missing in model a"), "{e}");
        let mut fewer = model(2);
        fewer.tensors.remove("model.layers.1.self_attn.q_proj.weight");
        let e = run(fewer).unwrap_err();
        assert!(e.contains("model.layers.1.self_attn.q_proj.weight is missing in model b"), "{e}");
        // A tied head is not a missing tensor.
        let mut tied = model(2);
        tied.tensors.remove("lm_head.weight");
        assert_eq!(run(tied), Ok(()));
        let arch = |a: &str| ModelTensors { architecture: Some(a.into()), ..model(2) };
        let models: BTreeMap<String, ModelTensors> =
            [("a".to_string(), arch("LlamaForCausalLM")), ("b".to_string(), arch("Qwen2ForCausalLM"))].into();
        let e = plan(&cfg, &models, 0).unwrap_err().to_string();
        assert!(e.contains("different architectures: a is LlamaForCausalLM, b is Qwen2ForCausalLM"), "{e}");
    }
}
