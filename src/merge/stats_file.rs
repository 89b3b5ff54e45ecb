//! The stored form of a merge's whole-tensor statistics: one small binary file per merge entry,
//! written by `llmfs merge` and read back by the view, so no read recomputes a whole tensor.
//!
//! Layout (every integer a LEB128 varint unless said; floats as their IEEE bits, little-endian,
//! so every value round-trips exactly):
//!
//! ```text
//! "LLMFSMST"  u8 version (1)  count
//! count × { name: len + UTF-8 bytes, stats }      names strictly increasing (bytewise)
//! stats  = u8 tag: 0 None | 1 Gta: n × parent | 2 Slerp: f32 coef_a, f32 coef_b
//!          | 3 Nuslerp: f32 s0, f32 s1, f32 sin_theta, u8 colinear | 4 ModelStock: f32 t
//! parent = keep, u8 has_factor [f32 factor]
//! keep   = u8 tag: 0 All | 1 Nothing | 2 Top: f32 mag, runs | 3 Band: f32 lo, f32 hi, runs
//!          | 4 Random: f32 p | 5 Della: f64 lo, f64 eps
//! runs   = n, then per run its first index's distance from the end of the previous run (from
//!          0 for the first) and its length minus one: the kept ties at the cut as index
//!          intervals (`compute::mergekit::tie_runs`: a few hundred per tensor where the list
//!          of indices would be millions)
//! ```
//!
//! The parser takes hostile bytes: every length is checked against what is left before anything
//! is allocated, indices must fit `u32`, trailing bytes are an error; it never panics.
//! [`check_fits`] then holds one tensor's statistics against that tensor's merge, so a file
//! that parses but belongs to another merge is refused before `apply` indexes with it.

use std::collections::BTreeMap;

use crate::compute::mergekit::{CompactStats, Keep, Kernel, ParentStats, Sparsify, Stats, TensorMerge};

/// The file's name among the entry's stored files.
pub const FILE_NAME: &str = "merge-stats.bin";

const MAGIC: &[u8; 8] = b"LLMFSMST";
const VERSION: u8 = 1;

/// Why stored statistics were refused: the byte offset and what was wrong there.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("merge statistics file, at byte {at}: {what}")]
pub struct StatsFileError {
    pub at: usize,
    pub what: String,
}

/// Every tensor's statistics in their compact form, by tensor name.
pub type StatsTable = BTreeMap<String, CompactStats>;

/// The file's bytes for `table`.
pub fn encode(table: &StatsTable) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.push(VERSION);
    varint(&mut out, table.len() as u64);
    for (name, stats) in table {
        varint(&mut out, name.len() as u64);
        out.extend_from_slice(name.as_bytes());
        encode_stats(&mut out, stats);
    }
    out
}

/// The runs of parent `k` (none where the compact form has none).
fn runs_of(c: &CompactStats, k: usize) -> &[(u32, u32)] {
    c.runs.get(k).map_or(&[], Vec::as_slice)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn f32_bits(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&v.to_bits().to_le_bytes());
}

fn encode_stats(out: &mut Vec<u8>, c: &CompactStats) {
    match &c.stats {
        Stats::None => out.push(0),
        Stats::Gta(parents) => {
            out.push(1);
            varint(out, parents.len() as u64);
            for (k, p) in parents.iter().enumerate() {
                encode_keep(out, &p.keep, runs_of(c, k));
                match p.factor {
                    None => out.push(0),
                    Some(f) => {
                        out.push(1);
                        f32_bits(out, f);
                    }
                }
            }
        }
        Stats::Slerp { coef_a, coef_b } => {
            out.push(2);
            f32_bits(out, *coef_a);
            f32_bits(out, *coef_b);
        }
        Stats::Nuslerp { s0, s1, sin_theta, colinear } => {
            out.push(3);
            for v in [s0, s1, sin_theta] {
                f32_bits(out, *v);
            }
            out.push(*colinear as u8);
        }
        Stats::ModelStock { t } => {
            out.push(4);
            f32_bits(out, *t);
        }
    }
}

fn encode_keep(out: &mut Vec<u8>, keep: &Keep, runs: &[(u32, u32)]) {
    match keep {
        Keep::All => out.push(0),
        Keep::Nothing => out.push(1),
        Keep::Top { mag, .. } => {
            out.push(2);
            f32_bits(out, *mag);
            encode_runs(out, runs);
        }
        Keep::Band { lo, hi, .. } => {
            out.push(3);
            f32_bits(out, *lo);
            f32_bits(out, *hi);
            encode_runs(out, runs);
        }
        Keep::Random { p } => {
            out.push(4);
            f32_bits(out, *p);
        }
        Keep::Della { lo, eps } => {
            out.push(5);
            out.extend_from_slice(&lo.to_bits().to_le_bytes());
            out.extend_from_slice(&eps.to_bits().to_le_bytes());
        }
    }
}

/// `runs` are increasing and disjoint (`TieRuns`).
fn encode_runs(out: &mut Vec<u8>, runs: &[(u32, u32)]) {
    varint(out, runs.len() as u64);
    let mut next = 0u64;
    for &(first, last) in runs {
        varint(out, first as u64 - next);
        varint(out, (last - first) as u64);
        next = last as u64 + 1;
    }
}

/// A cursor over the file's bytes: every read is checked against what is left.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn fail<T>(&self, what: impl Into<String>) -> Result<T, StatsFileError> {
        Err(StatsFileError { at: self.at, what: what.into() })
    }

    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], StatsFileError> {
        if n > self.left() {
            return self.fail(format!("truncated: {what} needs {n} bytes, {} left", self.left()));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn byte(&mut self, what: &str) -> Result<u8, StatsFileError> {
        Ok(self.take(1, what)?[0])
    }

    fn varint(&mut self, what: &str) -> Result<u64, StatsFileError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte(what)?;
            let bits = (b & 0x7f) as u64;
            if shift == 63 && bits > 1 {
                return self.fail(format!("{what}: varint overflows 64 bits"));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        self.fail(format!("{what}: varint longer than 10 bytes"))
    }

    /// A count of items that take at least `min_bytes` each: more than the bytes left could
    /// hold is refused before anything is allocated for them.
    fn count(&mut self, min_bytes: usize, what: &str) -> Result<usize, StatsFileError> {
        let n = self.varint(what)?;
        if n > (self.left() / min_bytes.max(1)) as u64 {
            return self.fail(format!("{what} {n}: more than the {} bytes left can hold", self.left()));
        }
        Ok(n as usize)
    }

    fn f32(&mut self, what: &str) -> Result<f32, StatsFileError> {
        let b = self.take(4, what)?;
        Ok(f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
    }

    fn f64(&mut self, what: &str) -> Result<f64, StatsFileError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(f64::from_bits(u64::from_le_bytes(a)))
    }
}

/// Parse a file written by [`encode`]. Any other bytes give an error naming where and what.
pub fn decode(bytes: &[u8]) -> Result<StatsTable, StatsFileError> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(MAGIC.len(), "magic")? != MAGIC {
        return Err(StatsFileError { at: 0, what: "not a merge statistics file (bad magic)".into() });
    }
    let version = r.byte("version")?;
    if version != VERSION {
        return r.fail(format!("version {version}; this llmfs reads version {VERSION}"));
    }
    // A tensor takes at least 2 bytes (an empty name's length, a tag).
    let n = r.count(2, "tensor count")?;
    let mut table = StatsTable::new();
    for _ in 0..n {
        let len = r.count(1, "name length")?;
        let at = r.at;
        let name = std::str::from_utf8(r.take(len, "name")?)
            .map_err(|_| StatsFileError { at, what: "a tensor name is not UTF-8".into() })?
            .to_owned();
        if table.last_key_value().is_some_and(|(last, _)| *last >= name) {
            return Err(StatsFileError { at, what: format!("tensor {name:?} out of order or repeated") });
        }
        let stats = decode_stats(&mut r)?;
        table.insert(name, stats);
    }
    if r.left() != 0 {
        return r.fail(format!("{} bytes after the last tensor", r.left()));
    }
    Ok(table)
}

fn decode_stats(r: &mut Reader) -> Result<CompactStats, StatsFileError> {
    let mut runs = vec![];
    let stats = match r.byte("statistics tag")? {
        0 => Stats::None,
        1 => {
            // A parent takes at least 2 bytes (a keep tag, a factor flag).
            let n = r.count(2, "parent count")?;
            let mut parents = Vec::with_capacity(n);
            for _ in 0..n {
                let (keep, parent_runs) = decode_keep(r)?;
                runs.push(parent_runs);
                let factor = match r.byte("factor flag")? {
                    0 => None,
                    1 => Some(r.f32("factor")?),
                    f => return r.fail(format!("factor flag {f}")),
                };
                parents.push(ParentStats { keep, factor });
            }
            Stats::Gta(parents)
        }
        2 => Stats::Slerp { coef_a: r.f32("coef_a")?, coef_b: r.f32("coef_b")? },
        3 => Stats::Nuslerp {
            s0: r.f32("s0")?,
            s1: r.f32("s1")?,
            sin_theta: r.f32("sin_theta")?,
            colinear: match r.byte("colinear")? {
                0 => false,
                1 => true,
                c => return r.fail(format!("colinear flag {c}")),
            },
        },
        4 => Stats::ModelStock { t: r.f32("t")? },
        t => return r.fail(format!("unknown statistics tag {t}")),
    };
    Ok(CompactStats { stats, runs })
}

/// A mask (tie lists empty) and its runs of kept ties.
fn decode_keep(r: &mut Reader) -> Result<(Keep, Vec<(u32, u32)>), StatsFileError> {
    Ok(match r.byte("keep tag")? {
        0 => (Keep::All, vec![]),
        1 => (Keep::Nothing, vec![]),
        2 => (Keep::Top { mag: r.f32("mag")?, ties: vec![] }, decode_runs(r)?),
        3 => {
            let (lo, hi) = (r.f32("lo")?, r.f32("hi")?);
            (Keep::Band { lo, hi, ties: vec![] }, decode_runs(r)?)
        }
        4 => (Keep::Random { p: r.f32("p")? }, vec![]),
        5 => (Keep::Della { lo: r.f64("lo")?, eps: r.f64("eps")? }, vec![]),
        t => return r.fail(format!("unknown keep tag {t}")),
    })
}

fn decode_runs(r: &mut Reader) -> Result<Vec<(u32, u32)>, StatsFileError> {
    // A run takes at least 2 bytes (two varints).
    let n = r.count(2, "run count")?;
    let mut runs = Vec::with_capacity(n);
    let mut next = 0u64;
    for _ in 0..n {
        let first = next.saturating_add(r.varint("run start")?);
        let last = first.saturating_add(r.varint("run length")?);
        if last > u32::MAX as u64 {
            return r.fail(format!("tie index {last} does not fit 32 bits"));
        }
        runs.push((first as u32, last as u32));
        next = last + 1;
    }
    Ok(runs)
}

/// Whether `compact` can be `merge`'s (the same method, one entry per non-base parent, runs
/// of ties inside the tensor): what `resolve` and `apply` rely on, checked before they run.
pub fn check_fits(compact: &CompactStats, merge: &TensorMerge) -> Result<(), String> {
    let numel = merge.numel() as u64;
    match (&merge.kernel, &compact.stats) {
        (Kernel::Gta(g), Stats::Gta(parents)) => {
            if parents.len() != g.parents.len() || compact.runs.len() != parents.len() {
                return Err(format!("{} parents' statistics for {} parents", parents.len(), g.parents.len()));
            }
            if compact.runs.iter().any(|r| r.last().is_some_and(|&(_, last)| last as u64 >= numel)) {
                return Err(format!("a run of ties past the tensor's {numel} elements"));
            }
            for p in parents {
                // The mask kinds this merge's sparsifier makes (`TensorMerge::parent_stats`).
                let fits = matches!(
                    (g.sparsify, &p.keep),
                    (_, Keep::All)
                        | (Some(Sparsify::Magnitude), Keep::Nothing | Keep::Top { .. })
                        | (Some(Sparsify::MagnitudeOutliers), Keep::Nothing | Keep::Band { .. })
                        | (Some(Sparsify::Random), Keep::Random { .. })
                        | (Some(Sparsify::Della), Keep::Nothing | Keep::Della { .. })
                );
                if !fits {
                    return Err(format!("a parent's mask is not one {:?} makes", g.sparsify));
                }
            }
            Ok(())
        }
        (Kernel::Slerp { .. }, Stats::Slerp { .. })
        | (Kernel::Nuslerp { .. }, Stats::Nuslerp { .. })
        | (Kernel::ModelStock, Stats::ModelStock { .. })
        | (Kernel::Linear { .. } | Kernel::Passthrough { .. }, Stats::None) => {
            if compact.runs.is_empty() {
                Ok(())
            } else {
                Err("runs of ties for a method without cut-offs".into())
            }
        }
        (_, s) => Err(format!("statistics of another method ({})", stats_kind(s))),
    }
}

fn stats_kind(s: &Stats) -> &'static str {
    match s {
        Stats::None => "none",
        Stats::Gta(_) => "task arithmetic",
        Stats::Slerp { .. } => "slerp",
        Stats::Nuslerp { .. } => "nuslerp",
        Stats::ModelStock { .. } => "model stock",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Increasing disjoint intervals.
    fn runs() -> impl Strategy<Value = Vec<(u32, u32)>> {
        prop::collection::btree_set(any::<u32>(), 0..40)
            .prop_map(|s| s.into_iter().collect::<Vec<_>>().chunks_exact(2).map(|p| (p[0], p[1])).collect())
    }

    /// A mask with empty tie lists, and its runs (empty where it has no cut).
    fn keep() -> impl Strategy<Value = (Keep, Vec<(u32, u32)>)> {
        let f = || any::<u32>().prop_map(f32::from_bits);
        prop_oneof![
            Just((Keep::All, vec![])),
            Just((Keep::Nothing, vec![])),
            (f(), runs()).prop_map(|(mag, r)| (Keep::Top { mag, ties: vec![] }, r)),
            (f(), f(), runs()).prop_map(|(lo, hi, r)| (Keep::Band { lo, hi, ties: vec![] }, r)),
            f().prop_map(|p| (Keep::Random { p }, vec![])),
            (any::<u64>(), any::<u64>()).prop_map(|(lo, eps)| {
                (Keep::Della { lo: f64::from_bits(lo), eps: f64::from_bits(eps) }, vec![])
            }),
        ]
    }

    fn compact() -> impl Strategy<Value = CompactStats> {
        let f = || any::<u32>().prop_map(f32::from_bits);
        let plain = |stats| CompactStats { stats, runs: vec![] };
        prop_oneof![
            Just(plain(Stats::None)),
            prop::collection::vec((keep(), prop::option::of(f())), 0..4).prop_map(|ps| {
                let runs = ps.iter().map(|((_, r), _)| r.clone()).collect();
                let per = ps.into_iter().map(|((keep, _), factor)| ParentStats { keep, factor }).collect();
                CompactStats { stats: Stats::Gta(per), runs }
            }),
            (f(), f()).prop_map(move |(coef_a, coef_b)| plain(Stats::Slerp { coef_a, coef_b })),
            (f(), f(), f(), any::<bool>()).prop_map(move |(s0, s1, sin_theta, colinear)| {
                plain(Stats::Nuslerp { s0, s1, sin_theta, colinear })
            }),
            f().prop_map(move |t| plain(Stats::ModelStock { t })),
        ]
    }

    /// Bit-exact comparison (NaN payloads included): Debug of the bits, not `==` on floats.
    fn bits(t: &StatsTable) -> String {
        let re = encode(t);
        format!("{re:?}")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn every_table_round_trips_bit_exactly(table in prop::collection::btree_map(".{0,12}", compact(), 0..6)) {
            let bytes = encode(&table);
            let back = decode(&bytes).unwrap();
            prop_assert_eq!(back.len(), table.len());
            prop_assert_eq!(bits(&back), bits(&table));
            for (a, b) in back.values().zip(table.values()) {
                prop_assert_eq!(&a.runs, &b.runs);
            }
            // Every strict prefix is refused with an error, never a panic.
            for cut in 0..bytes.len() {
                prop_assert!(decode(&bytes[..cut]).is_err());
            }
        }

        #[test]
        fn any_bytes_give_a_table_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..64), flip in any::<usize>()) {
            let _ = decode(&bytes);
            let mut framed = MAGIC.to_vec();
            framed.push(VERSION);
            framed.extend_from_slice(&bytes);
            let _ = decode(&framed);
            if !framed.is_empty() {
                let i = flip % framed.len();
                framed[i] ^= 0x5a;
                let _ = decode(&framed);
            }
        }
    }

    #[test]
    fn hostile_lengths_are_refused_before_allocating() {
        let mut b = MAGIC.to_vec();
        b.push(VERSION);
        varint(&mut b, u64::MAX >> 1);
        let e = decode(&b).unwrap_err();
        assert!(e.what.contains("more than"), "{e}");
        // A run that ends past u32.
        let top = Stats::Gta(vec![ParentStats { keep: Keep::Top { mag: 1.0, ties: vec![] }, factor: None }]);
        let t: StatsTable =
            [("w".to_string(), CompactStats { stats: top, runs: vec![vec![(u32::MAX - 1, u32::MAX)]] })]
                .into();
        let mut b = encode(&t);
        let last = b.len() - 2; // the run length's byte, before the factor flag
        b[last] += 1;
        assert!(decode(&b).unwrap_err().what.contains("32 bits"));
        assert!(decode(b"LLMFSMSX\x01\x00").unwrap_err().what.contains("magic"));
        assert!(decode(b"LLMFSMST\x02\x00").unwrap_err().what.contains("version 2"));
        assert!(decode(b"LLMFSMST\x01\x00\x00").unwrap_err().what.contains("after the last"));
    }

    #[test]
    fn stats_of_another_merge_do_not_fit() {
        use crate::compute::mergekit::{name_key, Gta, GtaParent};
        use crate::format::Dtype;
        let gta = Kernel::Gta(Gta {
            consensus: true,
            sparsify: Some(Sparsify::Magnitude),
            parents: vec![GtaParent { weight: 1.0, density: 0.5, gamma: 0.0, epsilon: 0.0 }],
            normalize: true,
            rescale: false,
            lambda: 1.0,
        });
        let m = TensorMerge {
            kernel: gta,
            dtype: Dtype::BF16,
            base: Some(0),
            shape: vec![4, 4],
            seed: 0,
            name_key: name_key("w"),
            threads: 1,
        };
        let one = |keep: Keep, runs: Vec<(u32, u32)>| CompactStats {
            stats: Stats::Gta(vec![ParentStats { keep, factor: None }]),
            runs: vec![runs],
        };
        let top = |runs| one(Keep::Top { mag: 0.5, ties: vec![] }, runs);
        assert_eq!(check_fits(&top(vec![(3, 5), (9, 15)]), &m), Ok(()));
        assert!(check_fits(&top(vec![(3, 16)]), &m).unwrap_err().contains("past"));
        let plain = |stats| CompactStats { stats, runs: vec![] };
        assert!(check_fits(&plain(Stats::Gta(vec![])), &m).unwrap_err().contains("0 parents"));
        let e = check_fits(&plain(Stats::ModelStock { t: 0.5 }), &m).unwrap_err();
        assert!(e.contains("another method"), "{e}");
        let e = check_fits(&one(Keep::Band { lo: 0.0, hi: 1.0, ties: vec![] }, vec![]), &m).unwrap_err();
        assert!(e.contains("mask"), "{e}");
    }
}
