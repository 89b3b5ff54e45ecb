//! Per-tensor parameter resolution, as mergekit 0.1.5 does it (`config.py` `evaluate_setting`,
//! `parameter_resolver.py`): a setting is a scalar, a gradient (a list interpolated over the
//! layers of a slice) or a list of conditionals (`filter` substrings, first match wins); the
//! scopes are searched from the most specific (the model's own `parameters`, then the slice's,
//! then the global ones) and the first that yields a value wins; otherwise the method's default.
//! Kernels never see settings: [`resolve`] turns them into numbers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One YAML scalar of a parameter setting.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Scalar {
    Bool(bool),
    Num(f64),
    Str(String),
}

/// A scalar or a gradient (mergekit's `ScalarOrGradient`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Scalar(Scalar),
    Gradient(Vec<Scalar>),
}

/// `{value: V, filter: F}`: applies to tensors whose name contains F (or every tensor when F is
/// absent or `*`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conditional {
    pub value: Value,
    pub filter: Option<String>,
}

/// A parameter's setting in one scope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Setting {
    Value(Value),
    Conditional(Vec<Conditional>),
}

/// The `parameters:` of one scope, by name.
pub type Params = BTreeMap<String, Setting>;

/// The type a method declares for a parameter (`ParameterSpec.value_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Float,
    Bool,
}

/// A resolved parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Resolved {
    Float(f64),
    Bool(bool),
}

impl Resolved {
    pub fn float(self) -> f64 {
        match self {
            Resolved::Float(x) => x,
            Resolved::Bool(b) => b as u8 as f64,
        }
    }
    pub fn bool(self) -> bool {
        match self {
            Resolved::Bool(b) => b,
            Resolved::Float(x) => x != 0.0,
        }
    }
}

/// pydantic's lax validation of one scalar as `kind` (numeric strings are numbers; bools accept
/// 0/1 and the usual words). A bool is not taken as a float.
pub fn validate(name: &str, kind: Kind, s: &Scalar) -> Result<Resolved, String> {
    match (kind, s) {
        (Kind::Float, Scalar::Num(x)) => Ok(Resolved::Float(*x)),
        (Kind::Float, Scalar::Str(t)) => t
            .trim()
            .parse::<f64>()
            .map(Resolved::Float)
            .map_err(|_| format!("parameter {name}: {t:?} is not a number")),
        (Kind::Float, Scalar::Bool(_)) => Err(format!("parameter {name}: expected a number, got a boolean")),
        (Kind::Bool, Scalar::Bool(b)) => Ok(Resolved::Bool(*b)),
        (Kind::Bool, Scalar::Num(x)) if *x == 0.0 || *x == 1.0 => Ok(Resolved::Bool(*x == 1.0)),
        (Kind::Bool, Scalar::Str(t)) => match t.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" | "t" | "y" => Ok(Resolved::Bool(true)),
            "false" | "no" | "off" | "0" | "f" | "n" => Ok(Resolved::Bool(false)),
            _ => Err(format!("parameter {name}: {t:?} is not a boolean")),
        },
        (Kind::Bool, _) => Err(format!("parameter {name}: expected a boolean")),
    }
}

/// `evaluate_setting` (config.py l.30-75): `t` is the layer's position in its slice (0..=1).
pub fn evaluate(
    name: &str,
    kind: Kind,
    setting: &Setting,
    tensor: &str,
    t: f64,
) -> Result<Option<Resolved>, String> {
    match setting {
        Setting::Value(v) => evaluate_value(name, kind, v, t),
        Setting::Conditional(conds) => {
            for c in conds {
                let hit = match c.filter.as_deref() {
                    None | Some("*") => true,
                    Some(f) => !tensor.is_empty() && tensor.contains(f),
                };
                if hit {
                    return evaluate_value(name, kind, &c.value, t);
                }
            }
            Ok(None)
        }
    }
}

fn evaluate_value(name: &str, kind: Kind, v: &Value, t: f64) -> Result<Option<Resolved>, String> {
    match v {
        Value::Scalar(s) => validate(name, kind, s).map(Some),
        Value::Gradient(list) => {
            if list.is_empty() {
                return Ok(None);
            }
            let values = list.iter().map(|s| validate(name, kind, s)).collect::<Result<Vec<_>, _>>()?;
            let n = values.len();
            if kind == Kind::Bool {
                // Non-numeric endpoints select: values[int(t * (len - 1))].
                let i = ((t * (n - 1) as f64) as usize).min(n - 1);
                return Ok(Some(values[i]));
            }
            let scaled = t * (n - 1) as f64;
            let i0 = (scaled as usize).min(n - 1);
            let i1 = (i0 + 1).min(n - 1);
            let frac = scaled - i0 as f64;
            let r = (1.0 - frac) * values[i0].float() + frac * values[i1].float();
            Ok(Some(Resolved::Float(r)))
        }
    }
}

/// `resolve_parameter` (parameter_resolver.py l.21-40): the first scope whose setting yields a
/// value, else `default`, else an error naming the parameter and where it was needed.
pub fn resolve(
    name: &str,
    kind: Kind,
    default: Option<Resolved>,
    scopes: &[Option<&Params>],
    tensor: &str,
    t: f64,
    model: Option<&str>,
) -> Result<Option<Resolved>, String> {
    for p in scopes.iter().flatten() {
        if let Some(s) = p.get(name) {
            if let Some(v) = evaluate(name, kind, s, tensor, t)? {
                return Ok(Some(v));
            }
        }
    }
    match default {
        Some(d) => Ok(Some(d)),
        None => Err(match model {
            Some(m) => format!("missing required parameter {name} for {m}.{tensor}"),
            None => format!("missing required parameter {name} for {tensor}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grad(v: &[f64]) -> Setting {
        Setting::Value(Value::Gradient(v.iter().map(|&x| Scalar::Num(x)).collect()))
    }

    #[test]
    fn gradient_interpolates_like_mergekit() {
        let s = grad(&[0.0, 0.5, 0.3, 0.7, 1.0]);
        // t = 3/7 (layer 3 of 8): scaled = 12/7, i0 = 1, frac = 5/7.
        let t = 3.0 / 7.0;
        let scaled = t * 4.0;
        let frac = scaled - 1.0;
        let want = (1.0 - frac) * 0.5 + frac * 0.3;
        assert_eq!(evaluate("t", Kind::Float, &s, "x", t).unwrap(), Some(Resolved::Float(want)));
        assert_eq!(evaluate("t", Kind::Float, &s, "x", 1.0).unwrap(), Some(Resolved::Float(1.0)));
        assert_eq!(evaluate("t", Kind::Float, &s, "x", 0.0).unwrap(), Some(Resolved::Float(0.0)));
    }

    #[test]
    fn first_matching_filter_wins_and_falls_through_scopes() {
        let conds = Setting::Conditional(vec![
            Conditional { value: Value::Scalar(Scalar::Num(0.1)), filter: Some("self_attn".into()) },
            Conditional { value: Value::Scalar(Scalar::Num(0.2)), filter: Some("mlp".into()) },
        ]);
        let mut local = Params::new();
        local.insert("t".into(), conds);
        let mut global = Params::new();
        global.insert("t".into(), Setting::Value(Value::Scalar(Scalar::Num(0.5))));
        let r = |name: &str| {
            resolve("t", Kind::Float, None, &[Some(&local), Some(&global)], name, 0.0, None)
                .unwrap()
                .unwrap()
                .float()
        };
        assert_eq!(r("model.layers.0.self_attn.q_proj.weight"), 0.1);
        assert_eq!(r("model.layers.0.mlp.up_proj.weight"), 0.2);
        assert_eq!(r("model.norm.weight"), 0.5);
        let err = resolve("weight", Kind::Float, None, &[None], "x.weight", 0.0, Some("m")).unwrap_err();
        assert!(err.contains("missing required parameter weight for m.x.weight"), "{err}");
    }

    #[test]
    fn booleans_and_numeric_strings_validate() {
        assert_eq!(validate("n", Kind::Bool, &Scalar::Str("yes".into())).unwrap(), Resolved::Bool(true));
        assert_eq!(validate("d", Kind::Float, &Scalar::Str("1e-3".into())).unwrap(), Resolved::Float(1e-3));
        assert!(validate("d", Kind::Float, &Scalar::Bool(true)).is_err());
    }
}
