//! mergekit's YAML schema (`config.py` `MergeConfiguration`, 0.1.5), parsed strictly.
//!
//! The subset llmfs computes: `merge_method`, `base_model`, `models: [{model, parameters}]` or
//! `slices: [{sources: [{model, layer_range, parameters}], base_model, parameters}]`,
//! `parameters`, `dtype`, `out_dtype`, `tokenizer_source: base | <model>`, `chat_template`.
//! Anything else — `modules`, `tokenizer:`, `tokenizer_source: union`, LoRA references
//! (`model+adapter`), an unknown method, key or parameter — is refused with one line naming it;
//! mergekit itself ignores unknown parameters, llmfs does not. The short form of the CLI
//! (`--method M [--base B] --models A:W[:D],C:W [--t T]`) builds the same [`MergeConfig`].

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_norway::Value as Yaml;

use super::params::{Conditional, Kind, Params, Resolved, Scalar, Setting, Value};
use super::MergeError;
use crate::format::Dtype;

/// The methods of mergekit's registry that llmfs computes (`merge_methods/registry.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Method {
    Linear,
    TaskArithmetic,
    Ties,
    DareTies,
    DareLinear,
    Breadcrumbs,
    BreadcrumbsTies,
    Della,
    DellaLinear,
    Slerp,
    Nuslerp,
    ModelStock,
    Passthrough,
}

pub const METHODS: [(&str, Method); 13] = [
    ("linear", Method::Linear),
    ("task_arithmetic", Method::TaskArithmetic),
    ("ties", Method::Ties),
    ("dare_ties", Method::DareTies),
    ("dare_linear", Method::DareLinear),
    ("breadcrumbs", Method::Breadcrumbs),
    ("breadcrumbs_ties", Method::BreadcrumbsTies),
    ("della", Method::Della),
    ("della_linear", Method::DellaLinear),
    ("slerp", Method::Slerp),
    ("nuslerp", Method::Nuslerp),
    ("model_stock", Method::ModelStock),
    ("passthrough", Method::Passthrough),
];

impl Method {
    pub fn parse(s: &str) -> Result<Method, MergeError> {
        METHODS.iter().find(|(n, _)| *n == s).map(|(_, m)| *m).ok_or_else(|| {
            let names: Vec<&str> = METHODS.iter().map(|(n, _)| *n).collect();
            MergeError::Config(format!(
                "merge_method {s:?} is not supported (supported: {})",
                names.join(", ")
            ))
        })
    }

    pub fn name(self) -> &'static str {
        METHODS.iter().find(|(_, m)| *m == self).map(|(n, _)| *n).expect("every method is named")
    }
}

/// Which inputs a parameter is bound to (`ParameterScope`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One value per tensor.
    Shared,
    /// One value per input, base included.
    Input,
    /// One value per input other than the base.
    NonBase,
}

/// A parameter a method declares (`ParameterSpec`): name, type, scope, default (`None`: required).
#[derive(Clone, Copy, Debug)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: Kind,
    pub scope: Scope,
    pub default: Option<Resolved>,
}

const fn spec(name: &'static str, kind: Kind, scope: Scope, default: Option<Resolved>) -> ParamSpec {
    ParamSpec { name, kind, scope, default }
}

/// The parameters each method declares, with mergekit's defaults.
pub fn method_params(m: Method) -> Vec<ParamSpec> {
    use Kind::*;
    use Method::*;
    use Resolved as R;
    use Scope::*;
    match m {
        Linear => {
            vec![spec("weight", Float, Input, None), spec("normalize", Bool, Shared, Some(R::Bool(true)))]
        }
        Slerp => vec![spec("t", Float, Shared, None)],
        Nuslerp => vec![
            spec("weight", Float, NonBase, None),
            spec("nuslerp_row_wise", Bool, Shared, Some(R::Bool(false))),
            spec("nuslerp_flatten", Bool, Shared, Some(R::Bool(true))),
        ],
        ModelStock => vec![spec("filter_wise", Bool, Shared, Some(R::Bool(false)))],
        Passthrough => vec![spec("scale", Float, Input, None)],
        _ => {
            let (normalize, rescale) = gta_defaults(m);
            let mut v = vec![
                spec("int8_mask", Bool, Shared, Some(R::Bool(false))),
                spec("normalize", Bool, Shared, Some(R::Bool(normalize))),
                spec("rescale", Bool, Shared, Some(R::Bool(rescale))),
                spec("lambda", Float, Shared, Some(R::Float(1.0))),
                spec("weight", Float, NonBase, None),
                spec("density", Float, NonBase, Some(R::Float(1.0))),
            ];
            if matches!(m, Breadcrumbs | BreadcrumbsTies) {
                v.push(spec("gamma", Float, NonBase, Some(R::Float(0.01))));
            }
            if matches!(m, Della | DellaLinear) {
                v.push(spec("epsilon", Float, NonBase, Some(R::Float(0.15))));
            }
            v
        }
    }
}

/// `(default_normalize, default_rescale)` of the task arithmetic rows of registry.py.
pub fn gta_defaults(m: Method) -> (bool, bool) {
    match m {
        Method::Ties => (true, false),
        Method::DareTies | Method::DareLinear | Method::DellaLinear => (false, true),
        Method::Della => (true, true),
        _ => (false, false),
    }
}

/// `tokenizer_source`: the base's tokenizer or one model's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TokenizerSource {
    Base,
    Model(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputModel {
    pub model: String,
    pub parameters: Option<Params>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputSlice {
    pub model: String,
    /// `[start, end)` layers of `model`.
    pub layer_range: (usize, usize),
    pub parameters: Option<Params>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputSlice {
    pub sources: Vec<InputSlice>,
    pub base_model: Option<String>,
    pub parameters: Option<Params>,
}

/// `models:` or `slices:` (exactly one, as mergekit requires).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Inputs {
    Models(Vec<InputModel>),
    Slices(Vec<OutputSlice>),
}

/// A parsed, validated mergekit configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MergeConfig {
    pub method: Method,
    pub base_model: Option<String>,
    pub inputs: Inputs,
    pub parameters: Option<Params>,
    pub dtype: Option<Dtype>,
    pub out_dtype: Option<Dtype>,
    pub tokenizer_source: Option<TokenizerSource>,
    pub chat_template: Option<String>,
}

fn err<T>(msg: impl Into<String>) -> Result<T, MergeError> {
    Err(MergeError::Config(msg.into()))
}

/// `dtype_from_name` (common.py l.228): `bfloat16`, `float16`, `float32`, with an optional
/// `torch.` prefix. float64 is refused (llmfs serves f16/bf16/f32).
pub fn parse_dtype(key: &str, s: &str) -> Result<Dtype, MergeError> {
    match s.strip_prefix("torch.").unwrap_or(s) {
        "bfloat16" => Ok(Dtype::BF16),
        "float16" => Ok(Dtype::F16),
        "float32" => Ok(Dtype::F32),
        other => err(format!("{key}: {other:?} is not supported (bfloat16, float16 or float32)")),
    }
}

fn key_str(k: &Yaml, at: &str) -> Result<String, MergeError> {
    match k {
        Yaml::String(s) => Ok(s.clone()),
        _ => err(format!("{at}: keys must be strings")),
    }
}

fn mapping<'a>(v: &'a Yaml, at: &str) -> Result<&'a serde_norway::Mapping, MergeError> {
    match v {
        Yaml::Mapping(m) => Ok(m),
        Yaml::Tagged(t) => mapping(&t.value, at),
        _ => err(format!("{at}: expected a mapping")),
    }
}

fn string(v: &Yaml, at: &str) -> Result<String, MergeError> {
    match v {
        Yaml::String(s) => Ok(s.clone()),
        Yaml::Number(n) => Ok(n.to_string()),
        _ => err(format!("{at}: expected a string")),
    }
}

/// A model reference: a plain name or path. LoRA (`a+b`) and the mapping form are refused.
fn model_ref(v: &Yaml, at: &str) -> Result<String, MergeError> {
    let s = match v {
        Yaml::String(s) => s.clone(),
        Yaml::Mapping(_) => {
            return err(format!("{at}: model references as mappings are not supported (name the model)"))
        }
        _ => return err(format!("{at}: expected a model name")),
    };
    if s.is_empty() {
        return err(format!("{at}: empty model name"));
    }
    if s.contains('+') {
        return err(format!(
            "{at}: LoRA references ({s:?}) are not supported: import the adapter as an entry and name it"
        ));
    }
    Ok(s)
}

/// Check a mapping's keys against `allowed`, naming the first unknown one.
fn keys(m: &serde_norway::Mapping, allowed: &[&str], at: &str) -> Result<(), MergeError> {
    for k in m.keys() {
        let k = key_str(k, at)?;
        if !allowed.contains(&k.as_str()) {
            return err(format!("{at}: unknown key {k:?}"));
        }
    }
    Ok(())
}

fn get<'a>(m: &'a serde_norway::Mapping, k: &str) -> Option<&'a Yaml> {
    m.get(Yaml::String(k.into())).filter(|v| !v.is_null())
}

fn scalar(v: &Yaml, at: &str) -> Result<Scalar, MergeError> {
    match v {
        Yaml::Bool(b) => Ok(Scalar::Bool(*b)),
        Yaml::Number(n) => {
            n.as_f64().map(Scalar::Num).ok_or_else(|| MergeError::Config(format!("{at}: bad number")))
        }
        Yaml::String(s) => Ok(Scalar::Str(s.clone())),
        _ => err(format!("{at}: expected a number, a boolean or a list of them")),
    }
}

fn value(v: &Yaml, at: &str) -> Result<Value, MergeError> {
    match v {
        Yaml::Sequence(list) => {
            Ok(Value::Gradient(list.iter().map(|e| scalar(e, at)).collect::<Result<_, _>>()?))
        }
        _ => Ok(Value::Scalar(scalar(v, at)?)),
    }
}

fn conditional(v: &Yaml, at: &str) -> Result<Conditional, MergeError> {
    let m = mapping(v, at)?;
    keys(m, &["value", "filter"], at)?;
    let Some(val) = get(m, "value") else {
        return err(format!("{at}: a conditional parameter needs a value"));
    };
    Ok(Conditional { value: value(val, at)?, filter: get(m, "filter").map(|f| string(f, at)).transpose()? })
}

fn setting(v: &Yaml, at: &str) -> Result<Setting, MergeError> {
    match v {
        Yaml::Mapping(_) => Ok(Setting::Conditional(vec![conditional(v, at)?])),
        Yaml::Sequence(list) if list.iter().any(|e| matches!(e, Yaml::Mapping(_))) => {
            Ok(Setting::Conditional(list.iter().map(|e| conditional(e, at)).collect::<Result<_, _>>()?))
        }
        _ => Ok(Setting::Value(value(v, at)?)),
    }
}

/// A `parameters:` mapping, every name checked against the method's declared parameters.
fn params(v: Option<&Yaml>, method: Method, at: &str) -> Result<Option<Params>, MergeError> {
    let Some(v) = v else { return Ok(None) };
    let m = mapping(v, at)?;
    let known = method_params(method);
    let mut out = Params::new();
    for (k, val) in m {
        let name = key_str(k, at)?;
        if !known.iter().any(|p| p.name == name) {
            let names: Vec<&str> = known.iter().map(|p| p.name).collect();
            return err(format!(
                "{at}: parameter {name:?} is not a parameter of {} ({})",
                method.name(),
                if names.is_empty() { "it takes none".to_string() } else { names.join(", ") }
            ));
        }
        if val.is_null() {
            continue;
        }
        out.insert(name.clone(), setting(val, &format!("{at}.{name}"))?);
    }
    Ok(Some(out))
}

fn layer_range(v: &Yaml, at: &str) -> Result<(usize, usize), MergeError> {
    let Yaml::Sequence(list) = v else { return err(format!("{at}: layer_range must be [start, end]")) };
    let nums: Vec<Option<u64>> = list.iter().map(|e| e.as_u64()).collect();
    match nums.as_slice() {
        [Some(a), Some(b)] if a <= b => Ok((*a as usize, *b as usize)),
        _ => err(format!("{at}: layer_range must be [start, end] with 0 <= start <= end")),
    }
}

impl MergeConfig {
    /// Parse a mergekit YAML document.
    pub fn from_yaml(text: &str) -> Result<MergeConfig, MergeError> {
        let doc: Yaml =
            serde_norway::from_str(text).map_err(|e| MergeError::Config(format!("not YAML: {e}")))?;
        Self::from_value(&doc)
    }

    fn from_value(doc: &Yaml) -> Result<MergeConfig, MergeError> {
        let top = mapping(doc, "config")?;
        for k in top.keys() {
            let k = key_str(k, "config")?;
            match k.as_str() {
                "merge_method" | "base_model" | "models" | "slices" | "parameters" | "dtype"
                | "out_dtype" | "tokenizer_source" | "chat_template" => {}
                "modules" => {
                    return err(
                        "modules: not supported (llmfs merges single-module models: use models or slices)",
                    )
                }
                "tokenizer" => {
                    return err("tokenizer: not supported (use tokenizer_source: base or a model's name)")
                }
                other => return err(format!("unknown key {other:?}")),
            }
        }
        let method = match get(top, "merge_method") {
            Some(v) => Method::parse(&string(v, "merge_method")?)?,
            None => return err("merge_method is required"),
        };
        let base_model = get(top, "base_model").map(|v| model_ref(v, "base_model")).transpose()?;
        let inputs = match (get(top, "models"), get(top, "slices")) {
            (Some(_), Some(_)) | (None, None) => {
                return err("exactly one of models or slices must be present")
            }
            (Some(models), None) => {
                let Yaml::Sequence(list) = models else { return err("models: expected a list") };
                if list.is_empty() {
                    return err("models: empty");
                }
                let mut out = Vec::new();
                for (i, m) in list.iter().enumerate() {
                    let at = format!("models[{i}]");
                    let mm = mapping(m, &at)?;
                    keys(mm, &["model", "parameters"], &at)?;
                    let Some(model) = get(mm, "model") else {
                        return err(format!("{at}: model is required"));
                    };
                    out.push(InputModel {
                        model: model_ref(model, &format!("{at}.model"))?,
                        parameters: params(get(mm, "parameters"), method, &format!("{at}.parameters"))?,
                    });
                }
                Inputs::Models(out)
            }
            (None, Some(slices)) => {
                let Yaml::Sequence(list) = slices else { return err("slices: expected a list") };
                if list.is_empty() {
                    return err("slices: empty");
                }
                let mut out = Vec::new();
                for (i, s) in list.iter().enumerate() {
                    let at = format!("slices[{i}]");
                    let sm = mapping(s, &at)?;
                    if get(sm, "residual_weight").is_some() {
                        return err(format!("{at}: residual_weight is not supported"));
                    }
                    keys(sm, &["sources", "base_model", "parameters", "residual_weight"], &at)?;
                    let Some(Yaml::Sequence(srcs)) = get(sm, "sources") else {
                        return err(format!("{at}: sources must be a list"));
                    };
                    if srcs.is_empty() {
                        return err(format!("{at}: sources is empty"));
                    }
                    let mut sources = Vec::new();
                    for (j, src) in srcs.iter().enumerate() {
                        let at = format!("{at}.sources[{j}]");
                        let m = mapping(src, &at)?;
                        keys(m, &["model", "layer_range", "parameters"], &at)?;
                        let Some(model) = get(m, "model") else {
                            return err(format!("{at}: model is required"));
                        };
                        let Some(lr) = get(m, "layer_range") else {
                            return err(format!("{at}: layer_range is required"));
                        };
                        sources.push(InputSlice {
                            model: model_ref(model, &format!("{at}.model"))?,
                            layer_range: layer_range(lr, &at)?,
                            parameters: params(get(m, "parameters"), method, &format!("{at}.parameters"))?,
                        });
                    }
                    out.push(OutputSlice {
                        sources,
                        base_model: get(sm, "base_model")
                            .map(|v| model_ref(v, &format!("{at}.base_model")))
                            .transpose()?,
                        parameters: params(get(sm, "parameters"), method, &format!("{at}.parameters"))?,
                    });
                }
                Inputs::Slices(out)
            }
        };
        let dtype = get(top, "dtype").map(|v| parse_dtype("dtype", &string(v, "dtype")?)).transpose()?;
        let out_dtype =
            get(top, "out_dtype").map(|v| parse_dtype("out_dtype", &string(v, "out_dtype")?)).transpose()?;
        let tokenizer_source = match get(top, "tokenizer_source") {
            None => None,
            Some(v) => match string(v, "tokenizer_source")?.as_str() {
                "base" => Some(TokenizerSource::Base),
                "union" => {
                    return err("tokenizer_source: union is not supported (use base or a model's name)")
                }
                _ => Some(TokenizerSource::Model(model_ref(v, "tokenizer_source")?)),
            },
        };
        let chat_template = get(top, "chat_template").map(|v| string(v, "chat_template")).transpose()?;
        let cfg = MergeConfig {
            method,
            base_model,
            inputs,
            parameters: params(get(top, "parameters"), method, "parameters")?,
            dtype,
            out_dtype,
            tokenizer_source,
            chat_template,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every model the config names, base first, each once, in order of appearance.
    pub fn referenced_models(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        let mut add = |m: &str| {
            if seen.insert(m.to_string()) {
                out.push(m.to_string());
            }
        };
        if let Some(b) = &self.base_model {
            add(b);
        }
        match &self.inputs {
            Inputs::Models(ms) => ms.iter().for_each(|m| add(&m.model)),
            Inputs::Slices(ss) => ss.iter().flat_map(|s| &s.sources).for_each(|s| add(&s.model)),
        }
        out
    }

    /// Structural checks that need no model: input counts per method (`InputContract`),
    /// parameter values that must hold whatever the tensor, a tokenizer source that is named.
    pub fn validate(&self) -> Result<(), MergeError> {
        let groups: Vec<(Vec<&str>, Option<&str>)> = match &self.inputs {
            Inputs::Models(ms) => {
                let mut v: Vec<&str> = ms.iter().map(|m| m.model.as_str()).collect();
                if let Some(b) = &self.base_model {
                    if !v.contains(&b.as_str()) {
                        v.push(b);
                    }
                }
                vec![(v, self.base_model.as_deref())]
            }
            Inputs::Slices(ss) => ss
                .iter()
                .map(|s| {
                    (
                        s.sources.iter().map(|x| x.model.as_str()).collect(),
                        s.base_model.as_deref().or(self.base_model.as_deref()),
                    )
                })
                .collect(),
        };
        for (i, (models, base)) in groups.iter().enumerate() {
            let at = if matches!(self.inputs, Inputs::Slices(_)) {
                format!("slices[{i}]: ")
            } else {
                String::new()
            };
            let uniq: BTreeSet<&&str> = models.iter().collect();
            if uniq.len() != models.len() {
                return err(format!("{at}a model appears twice among the inputs"));
            }
            let has_base = base.is_some_and(|b| models.contains(&b));
            let n = models.len();
            let non_base = n - has_base as usize;
            let m = self.method;
            let needs_base = !matches!(m, Method::Linear | Method::Passthrough | Method::Nuslerp);
            if needs_base && !has_base {
                return err(format!("{at}{} requires a base_model among its inputs", m.name()));
            }
            let ok = match m {
                Method::Slerp => n == 2,
                Method::Nuslerp => non_base == 2,
                Method::ModelStock => n >= 3,
                Method::Passthrough => n == 1,
                _ => n >= 1,
            };
            if !ok {
                let want = match m {
                    Method::Slerp => "exactly 2 inputs (the base and one model)",
                    Method::Nuslerp => "exactly 2 models besides the base",
                    Method::ModelStock => "at least 3 inputs (the base and two models)",
                    _ => "exactly 1 input per slice",
                };
                return err(format!("{at}{} takes {want}; got {n}", m.name()));
            }
        }
        if let Some(TokenizerSource::Model(m)) = &self.tokenizer_source {
            if !self.referenced_models().contains(m) {
                return err(format!("tokenizer_source: {m:?} is not one of the merged models"));
            }
        }
        if matches!(self.tokenizer_source, Some(TokenizerSource::Base)) && self.base_model.is_none() {
            return err("tokenizer_source: base needs a base_model");
        }
        Ok(())
    }

    /// The CLI's short form: `--method M [--base B] --models A:W[:D],C:W [--t T]`. A model
    /// without `:W` takes no parameters (slerp's other model, a base listed among the models).
    pub fn from_short(
        method: &str,
        base: Option<&str>,
        models: &str,
        t: Option<f64>,
    ) -> Result<MergeConfig, MergeError> {
        let method = Method::parse(method)?;
        let mut list = Vec::new();
        for item in models.split(',').map(str::trim) {
            if item.is_empty() {
                return err("--models: empty item");
            }
            let parts: Vec<&str> = item.split(':').collect();
            let num = |s: &str, what: &str| -> Result<Scalar, MergeError> {
                s.parse::<f64>().map(Scalar::Num).map_err(|_| {
                    MergeError::Config(format!("--models {item:?}: {what} {s:?} is not a number"))
                })
            };
            let mut p = Params::new();
            match parts.as_slice() {
                [_] => {}
                [_, w] => {
                    p.insert("weight".into(), Setting::Value(Value::Scalar(num(w, "weight")?)));
                }
                [_, w, d] => {
                    p.insert("weight".into(), Setting::Value(Value::Scalar(num(w, "weight")?)));
                    p.insert("density".into(), Setting::Value(Value::Scalar(num(d, "density")?)));
                }
                _ => return err(format!("--models {item:?}: expected NAME[:WEIGHT[:DENSITY]]")),
            }
            let known = method_params(method);
            for k in p.keys() {
                if !known.iter().any(|s| s.name == k) {
                    return err(format!("--models {item:?}: {k} is not a parameter of {}", method.name()));
                }
            }
            let name = model_ref(&Yaml::String(parts[0].to_string()), "--models")?;
            list.push(InputModel { model: name, parameters: if p.is_empty() { None } else { Some(p) } });
        }
        let parameters = match t {
            None => None,
            Some(t) => {
                if !method_params(method).iter().any(|s| s.name == "t") {
                    return err(format!("--t: {} takes no t", method.name()));
                }
                let mut p = Params::new();
                p.insert("t".into(), Setting::Value(Value::Scalar(Scalar::Num(t))));
                Some(p)
            }
        };
        let cfg = MergeConfig {
            method,
            base_model: base.map(|b| model_ref(&Yaml::String(b.to_string()), "--base")).transpose()?,
            inputs: Inputs::Models(list),
            parameters,
            dtype: None,
            out_dtype: None,
            tokenizer_source: None,
            chat_template: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIES: &str = "
models:
  - model: base
  - model: a
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: b
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
";

    #[test]
    fn parses_mergekits_ties_example() {
        let c = MergeConfig::from_yaml(TIES).unwrap();
        assert_eq!(c.method, Method::Ties);
        assert_eq!(c.dtype, Some(Dtype::BF16));
        assert_eq!(c.referenced_models(), vec!["base", "a", "b"]);
        let Inputs::Models(m) = &c.inputs else { panic!() };
        assert_eq!(m.len(), 3);
        assert!(matches!(m[1].parameters.as_ref().unwrap()["density"], Setting::Value(Value::Gradient(_))));
    }

    #[test]
    fn slerp_with_filters_and_slices() {
        let y = "
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
      - model: b
        layer_range: [0, 4]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
";
        let c = MergeConfig::from_yaml(y).unwrap();
        let Some(p) = &c.parameters else { panic!() };
        let Setting::Conditional(conds) = &p["t"] else { panic!() };
        assert_eq!(conds.len(), 3);
        assert_eq!(conds[0].filter.as_deref(), Some("self_attn"));
    }

    #[test]
    fn refusals_name_what_is_refused() {
        let cases = [
            ("merge_method: linear\nmodels: [{model: a}]\nmodules: {}\n", "modules"),
            ("merge_method: frob\nmodels: [{model: a}]\n", "frob"),
            ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1, wieght: 2}}]\n", "wieght"),
            ("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: union\n", "union"),
            ("merge_method: linear\nmodels: [{model: a}]\ntokenizer: {source: base}\n", "tokenizer"),
            ("merge_method: linear\nmodels: [{model: a}]\nfoo: 1\n", "foo"),
            ("merge_method: linear\nmodels: [{model: a+lora}]\n", "LoRA"),
            ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}, {model: c}]\nparameters: {t: 0.5}\n", "exactly 2"),
            ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]\n", "base_model"),
            ("merge_method: linear\nmodels: [{model: a}]\nslices: []\n", "exactly one"),
            ("merge_method: linear\nmodels: [{model: a}]\ndtype: float64\n", "float64"),
            ("- a\n", "mapping"),
        ];
        for (y, want) in cases {
            let e = MergeConfig::from_yaml(y).unwrap_err().to_string();
            assert!(e.contains(want), "{y}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn short_form_builds_the_same_config() {
        let c = MergeConfig::from_short("ties", Some("base"), "a:0.5:0.7,b:0.5", None).unwrap();
        let y = MergeConfig::from_yaml(
            "merge_method: ties\nbase_model: base\nmodels:\n - model: a\n   parameters: {weight: 0.5, density: 0.7}\n - model: b\n   parameters: {weight: 0.5}\n",
        )
        .unwrap();
        assert_eq!(c, y);
        let s = MergeConfig::from_short("slerp", Some("a"), "a,b", Some(0.3)).unwrap();
        assert_eq!(s.method, Method::Slerp);
        assert!(MergeConfig::from_short("slerp", Some("a"), "a,b:1", Some(0.3)).is_err());
        assert!(MergeConfig::from_short("linear", None, "a:x", None).is_err());
    }
}
