//! Spherical interpolation: SLERP (`slerp.py`: two inputs, coefficients from the angle between
//! the whole tensors) and NuSLERP (`nuslerp.py`, flattened: two task vectors or two models,
//! weighted by `t`). The angle is a whole-tensor statistic; the interpolation is elementwise.

use super::torch::{norm, sum};
use super::{round, Stats, TensorMerge};
use crate::format::Dtype;

impl TensorMerge {
    pub(super) fn slerp_stats(&self, t: f64, parents: &[&[f32]]) -> Stats {
        // slerp.py l.30-80, for one output (the batch's leading axis is 1 here).
        let b = self.base.unwrap_or(0);
        let (a, v) = (parents[b], parents[1 - b]);
        const CHUNK: usize = 1024 * 1024;
        let t32 = t as f32;
        let n = a.len();
        if n == 0 {
            return Stats::Slerp { coef_a: 1.0 - t32, coef_b: t32 };
        }
        // Norms of chunk norms: a norm over the stacked chunks axis (an outer reduction, in order).
        let chunk_norms = |x: &[f32]| -> f32 {
            let mut s = 0f32;
            for c in x.chunks(CHUNK) {
                let q = norm(Dtype::F32, c);
                s += q * q;
            }
            s.sqrt()
        };
        let na = chunk_norms(a);
        let nb = chunk_norms(v);
        let eps = 1e-8f32;
        let na = if na > eps { na } else { 1.0 };
        let nb = if nb > eps { nb } else { 1.0 };
        let mut dot = 0f32;
        for (ca, cb) in a.chunks(CHUNK).zip(v.chunks(CHUNK)) {
            let prod: Vec<f32> = ca.iter().zip(cb).map(|(&x, &y)| (x / na) * (y / nb)).collect();
            dot += sum(Dtype::F32, &prod, self.threads);
        }
        let dot = dot.clamp(-1.0, 1.0);
        let linear = dot.abs() > 0.9995f32;
        let theta = (if linear { 0.0 } else { dot }).acos();
        let sin_theta = theta.sin();
        let one_t = 1.0 - t32;
        let coef_a = if linear { one_t } else { (one_t * theta).sin() / sin_theta };
        let coef_b = if linear { t32 } else { (t32 * theta).sin() / sin_theta };
        Stats::Slerp { coef_a, coef_b }
    }

    pub(super) fn nuslerp_stats(&self, t: f64, parents: &[&[f32]]) -> Stats {
        // nuslerp.py l.17-50 with flatten=True, in the compute dtype.
        let d = self.dtype;
        let nb = self.non_base(parents.len());
        let (v0, v1) = self.nuslerp_inputs(parents, &nb);
        let clamp_min = round(d, 1e-7);
        let n0 = norm(d, &v0).max(clamp_min);
        let n1 = norm(d, &v1).max(clamp_min);
        let prod: Vec<f32> =
            v0.iter().zip(&v1).map(|(&x, &y)| round(d, round(d, x / n0) * round(d, y / n1))).collect();
        let cos = sum(d, &prod, self.threads).clamp(-1.0, 1.0);
        let eps2 = round(d, 1e-16);
        let colinear = round(d, 1.0 - round(d, cos * cos)) <= eps2;
        let theta = round(d, (if colinear { 0.0 } else { cos }).acos());
        let sin_theta = round(d, theta.sin());
        let s0 = round(d, round(d, theta * (1.0 - t) as f32).sin());
        let s1 = round(d, round(d, theta * t as f32).sin());
        Stats::Nuslerp { s0, s1, sin_theta, colinear }
    }

    /// NuSLERP's two vectors over `parents` (whole or a range): task vectors when there is a base.
    fn nuslerp_inputs(&self, parents: &[&[f32]], nb: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let d = self.dtype;
        match self.base {
            Some(b) => (
                parents[nb[0]].iter().zip(parents[b]).map(|(&x, &y)| round(d, x - y)).collect(),
                parents[nb[1]].iter().zip(parents[b]).map(|(&x, &y)| round(d, x - y)).collect(),
            ),
            None => (parents[nb[0]].to_vec(), parents[nb[1]].to_vec()),
        }
    }

    /// slerp.py l.82: `coef_a * a + coef_b * b` in f32, one rounding.
    pub(super) fn apply_slerp(&self, coef_a: f32, coef_b: f32, parents: &[&[f32]], out: &mut [f32]) {
        let d = self.dtype;
        let b = self.base.unwrap_or(0);
        for ((o, &x), &y) in out.iter_mut().zip(parents[b]).zip(parents[1 - b]) {
            *o = round(d, coef_a * x + coef_b * y);
        }
    }

    /// nuslerp.py l.40-60: the two vectors interpolated in the compute dtype, added to the base
    /// where there is one.
    pub(super) fn apply_nuslerp(
        &self,
        t: f64,
        stats: (f32, f32, f32, bool),
        parents: &[&[f32]],
        out: &mut [f32],
    ) {
        let d = self.dtype;
        let (s0, s1, sin_theta, colinear) = stats;
        let nb = self.non_base(parents.len());
        let (v0, v1) = self.nuslerp_inputs(parents, &nb);
        let (a, c) = ((1.0 - t) as f32, t as f32);
        for (i, o) in out.iter_mut().enumerate() {
            let r = if colinear {
                round(d, round(d, a * v0[i]) + round(d, c * v1[i]))
            } else {
                round(d, round(d, round(d, s0 * v0[i]) + round(d, s1 * v1[i])) / sin_theta)
            };
            *o = match self.base {
                Some(b) => round(d, parents[b][i] + r),
                None => r,
            };
        }
    }
}
