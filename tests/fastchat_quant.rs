//! llmfs's quantizer against FastChat's, bit for bit.
//!
//! `scripts/fastchat_quant_check.py` ran fschat 0.2.36's `compress`/`decompress` under torch
//! (CPU) on seeded tensors and checked in, per case, the input and FastChat's output
//! (`tests/data/fastchat_quant/*.safetensors`, listed in `manifest.json`). Here llmfs quantizes
//! the same input with the same configuration, dequantizes it — whole, in odd ranges, and
//! through the byte interface — and every element must have FastChat's bit pattern. No Python
//! or torch is needed to run it.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use llmfs::codec::quant::{
    dequantize_range, dequantize_range_bytes, quantize, QuantBytesView, QuantConfig, QuantFloat,
};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Manifest {
    torch: String,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    file: String,
    dtype: String,
    rows: usize,
    cols: usize,
    bits: u8,
    group_size: usize,
    symmetric: bool,
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fastchat_quant")
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(data_dir().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest.json parses")
}

fn elements<T: QuantFloat>(st: &SafeTensors<'_>, name: &str, case: &Case) -> Vec<T> {
    let view = st.tensor(name).unwrap_or_else(|e| panic!("{}: tensor {name}: {e}", case.name));
    let want = match T::DTYPE {
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        _ => Dtype::F32,
    };
    assert_eq!(view.dtype(), want, "{}: {name} dtype", case.name);
    assert_eq!(view.shape(), &[case.rows, case.cols], "{}: {name} shape", case.name);
    view.data().chunks_exact(T::SIZE).map(T::read_le).collect()
}

/// Quantizes the case's input with llmfs and compares every element with FastChat's output;
/// returns the number of elements compared.
fn check_case<T: QuantFloat>(case: &Case) -> usize {
    let bytes = std::fs::read(data_dir().join(&case.file)).expect("case file");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let input: Vec<T> = elements(&st, "input", case);
    let expected: Vec<T> = elements(&st, "expected", case);
    let cfg = QuantConfig { bits: case.bits, group_size: case.group_size, symmetric: case.symmetric };
    cfg.validate(case.cols).expect("valid config");

    let qt = quantize(&input, case.rows, case.cols, cfg);
    let n = case.rows * case.cols;
    let mut got = vec![T::default(); n];
    dequantize_range(qt.view(), 0..n, &mut got);
    for i in 0..n {
        let (g, e) = (got[i], expected[i]);
        assert!(!e.to_f32().is_nan(), "{}: FastChat produced NaN at {i}", case.name);
        assert_eq!(
            g.to_bits_u32(),
            e.to_bits_u32(),
            "{}: element {i} (row {}, col {}): llmfs {g:?}, FastChat {e:?}, input {:?}",
            case.name,
            i / case.cols,
            i % case.cols,
            input[i],
        );
    }

    // The read path asks for arbitrary chunks: every range of a few odd sizes, through the
    // byte interface, must give the same bytes.
    let scale: Vec<u8> = qt.scale.iter().flat_map(|s| le(*s)).collect();
    let min: Vec<u8> = qt.min.iter().flat_map(|s| le(*s)).collect();
    let view = QuantBytesView::new::<T>(case.rows, case.cols, cfg, &qt.q, &scale, &min).expect("view");
    for step in [1usize, 5, 97, 1000] {
        let mut start = 0;
        while start < n {
            let end = (start + step).min(n);
            let mut out = vec![0u8; (end - start) * T::SIZE];
            dequantize_range_bytes::<T>(view, start..end, &mut out);
            let want: Vec<u8> = expected[start..end].iter().flat_map(|s| le(*s)).collect();
            assert_eq!(out, want, "{}: bytes of {start}..{end}", case.name);
            start = end + step / 3; // leave gaps so starts fall everywhere
        }
    }
    n
}

fn le<T: QuantFloat>(v: T) -> Vec<u8> {
    let mut b = vec![0u8; T::SIZE];
    v.write_le(&mut b);
    b
}

#[test]
fn every_case_is_bit_identical_to_fastchat() {
    let m = manifest();
    assert!(m.cases.len() >= 72, "manifest lists only {} cases", m.cases.len());
    let mut total = 0;
    for case in &m.cases {
        total += match case.dtype.as_str() {
            "f16" => check_case::<f16>(case),
            "bf16" => check_case::<bf16>(case),
            "f32" => check_case::<f32>(case),
            other => panic!("{}: unknown dtype {other}", case.name),
        };
    }
    eprintln!("{} cases, {total} elements bit-identical to FastChat (torch {})", m.cases.len(), m.torch);
}

#[test]
fn cases_cover_the_contract() {
    // Every dtype × mode × width appears, and some column count is not a multiple of the group.
    let m = manifest();
    for dtype in ["f16", "bf16", "f32"] {
        for bits in [8, 4] {
            for symmetric in [true, false] {
                assert!(
                    m.cases.iter().any(|c| c.dtype == dtype
                        && c.bits == bits
                        && c.symmetric == symmetric
                        && c.cols % c.group_size != 0),
                    "no padded case for {dtype} {bits}-bit symmetric={symmetric}"
                );
                // FastChat's default group size on rows shorter than it (one padded group per
                // row) and on rows that are not a multiple of it (a full group and a padded one).
                for (cols, what) in [(128, "shorter than"), (300, "not a multiple of")] {
                    assert!(
                        m.cases.iter().any(|c| c.dtype == dtype
                            && c.bits == bits
                            && c.symmetric == symmetric
                            && c.group_size == 256
                            && c.cols == cols),
                        "no {dtype} {bits}-bit symmetric={symmetric} case with rows {what} the group (256)"
                    );
                }
            }
        }
    }
}
