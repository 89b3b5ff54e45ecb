//! Model stock (`model_stock.py`, filter_wise=False): the interpolation factor `t` from the mean
//! cosine between the fine-tunes' offsets from the base (a whole-tensor statistic), then the
//! fine-tunes' average moved towards the base by `1 - t`, elementwise.

use super::torch::{norm, sum};
use super::{round, Stats, TensorMerge};

impl TensorMerge {
    pub(super) fn model_stock_stats(&self, parents: &[&[f32]]) -> Stats {
        // model_stock.py l.28-63 (filter_wise=False): everything in the compute dtype.
        let d = self.dtype;
        let b = self.base.unwrap_or(0);
        let others = self.non_base(parents.len());
        let offsets: Vec<Vec<f32>> = others
            .iter()
            .map(|&j| parents[j].iter().zip(parents[b]).map(|(&x, &y)| round(d, x - y)).collect())
            .collect();
        let norms: Vec<f32> = offsets.iter().map(|o| norm(d, o)).collect();
        let mut cos = Vec::new();
        let min = round(d, 1e-6);
        for a in 0..offsets.len() {
            for c in a + 1..offsets.len() {
                let np = round(d, norms[a] * norms[c]);
                let prod: Vec<f32> =
                    offsets[a].iter().zip(&offsets[c]).map(|(&x, &y)| round(d, x * y)).collect();
                let dot = sum(d, &prod, self.threads);
                cos.push(round(d, dot / np.max(min)).clamp(-1.0, 1.0));
            }
        }
        // `mean` on bf16/f16: f32 sum, f32 divide, one rounding (ATen mean_out).
        let mut s = 0f32;
        for &c in &cos {
            s += c;
        }
        let cos_theta = round(d, s / cos.len() as f32);
        let count = offsets.len() as f32;
        let den = round(d, 1.0 + round(d, (count - 1.0) * cos_theta));
        let singular = den.abs() < round(d, 1e-6);
        let t = if singular { 0.0 } else { round(d, round(d, count * cos_theta) / den) };
        Stats::ModelStock { t }
    }

    /// model_stock.py l.65-70: `t * mean(fine-tunes) + (1 - t) * base`, in the compute dtype.
    pub(super) fn apply_model_stock(&self, t: f32, parents: &[&[f32]], out: &mut [f32]) {
        let d = self.dtype;
        let b = self.base.unwrap_or(0);
        let others = self.non_base(parents.len());
        let count = others.len() as f32;
        let one_t = round(d, 1.0 - t);
        for (i, o) in out.iter_mut().enumerate() {
            // python's sum() starts from int 0: `0 + w1` rounds -0 to +0.
            let mut acc = round(d, 0.0 + parents[others[0]][i]);
            for &j in &others[1..] {
                acc = round(d, acc + parents[j][i]);
            }
            let avg = round(d, acc / count);
            *o = round(d, round(d, t * avg) + round(d, one_t * parents[b][i]));
        }
    }
}
