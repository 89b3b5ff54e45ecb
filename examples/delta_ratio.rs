//! Measures the lossless delta codec's choices: ulp distance vs XOR vs integer difference, byte
//! planes or not,
//! zstd levels, chunk size, and decode throughput per core.
//!
//! Base: `demo::random_tensor(seed, n, dtype, false)` (N(0, 0.02)); targets: an identical copy
//! and `dtype(f32(base) + N(0, k · std(base)))` for k in {0.001, 0.01, 0.1}. Ratio = raw bytes /
//! stored bytes (frames + 8-byte offsets).
//!
//! ```text
//! cargo run --release --example delta_ratio -- [--n ELEMS] [--seed S] [--dump DIR]
//! ```
//!
//! `--dump DIR` writes the bf16 pair(s) as raw little-endian files (`base.bin`,
//! `target_k{K}.bin`) and `llmfs.json` (llmfs's default-codec ratios) for
//! `scripts/zipnn_compare.py`.

use std::time::Instant;

use half::{bf16, f16};
use llmfs::codec::delta::{
    chunk_count, chunk_elems, decode_lossless_chunk_with, encode_lossless_with, forward_to_planes,
    inverse_from_planes, EncodedChunks, LosslessOptions, Transform, DEFAULT_LEVEL, DELTA_CHUNK_ELEMS,
};
use llmfs::demo::{random_tensor, SplitMix64};
use llmfs::format::Dtype;
use rayon::prelude::*;

const KS: [f32; 3] = [0.001, 0.01, 0.1];

fn get(dtype: Dtype, b: &[u8]) -> f32 {
    match dtype {
        Dtype::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
        Dtype::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
    }
}

fn put(dtype: Dtype, v: f32, b: &mut [u8]) {
    match dtype {
        Dtype::F16 => b.copy_from_slice(&f16::from_f32(v).to_le_bytes()),
        Dtype::BF16 => b.copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
        _ => b.copy_from_slice(&v.to_le_bytes()),
    }
}

/// `dtype(base + N(0, k · std(base)))`, deterministic in `seed`.
fn make_target(base: &[u8], dtype: Dtype, k: f32, seed: u64) -> Vec<u8> {
    let e = dtype.size();
    let n = base.len() / e;
    let mean = (0..n).map(|i| get(dtype, &base[i * e..]) as f64).sum::<f64>() / n as f64;
    let var = (0..n).map(|i| (get(dtype, &base[i * e..]) as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    let sigma = k * var.sqrt() as f32;
    let mut out = base.to_vec();
    const BLOCK: usize = 1 << 16;
    out.par_chunks_mut(BLOCK * e).enumerate().for_each(|(blk, chunk)| {
        let mut rng = SplitMix64(seed ^ 0xDE17A ^ (blk as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for el in chunk.chunks_mut(e) {
            let v = get(dtype, el) + rng.normal() * sigma;
            put(dtype, v, el);
        }
    });
    out
}

fn stored(enc: &EncodedChunks) -> usize {
    enc.frames.len() + 8 * enc.offsets.len()
}

fn ratio(raw: usize, enc: &EncodedChunks) -> f64 {
    raw as f64 / stored(enc) as f64
}

/// The stored size with chunks of `chunk` elements instead of `DELTA_CHUNK_ELEMS` (same payload
/// layout and frame settings as the codec).
fn stored_with_chunk(target: &[u8], base: &[u8], esize: usize, level: i32, chunk: usize) -> usize {
    target
        .par_chunks(chunk * esize)
        .zip(base.par_chunks(chunk * esize))
        .map(|(t, b)| {
            let mut planes = vec![0u8; t.len()];
            forward_to_planes(LosslessOptions::DEFAULT.transform, esize, t, Some(b), &mut planes);
            let mut c = zstd::bulk::Compressor::new(level).unwrap();
            c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true)).unwrap();
            c.compress(&planes).unwrap().len() + 8
        })
        .sum()
}

/// Single-thread decode throughput (output bytes per second) of every chunk of `enc`.
fn decode_gbps(enc: &EncodedChunks, base: &[u8], esize: usize, opts: LosslessOptions, raw: &[u8]) -> f64 {
    let n = base.len() / esize;
    let mut out = vec![0u8; raw.len()];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        for c in 0..chunk_count(n) {
            let r = chunk_elems(c, n);
            let bytes = r.start * esize..r.end * esize;
            decode_lossless_chunk_with(
                enc.frame(c),
                Some(&base[bytes.clone()]),
                esize,
                opts,
                &mut out[bytes],
            )
            .unwrap();
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    assert!(out == raw, "decode differs");
    raw.len() as f64 / best / 1e9
}

/// Where one core's decode time goes: zstd alone, the plane join + inverse transform alone.
fn breakdown(enc: &EncodedChunks, base: &[u8], esize: usize, raw: &[u8]) {
    let n = base.len() / esize;
    let mut dec = zstd::bulk::Decompressor::new().unwrap();
    let mut planes = vec![0u8; raw.len()];
    let mut out = vec![0u8; raw.len()];
    let (mut t_zstd, mut t_inv) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let t0 = Instant::now();
        for c in 0..chunk_count(n) {
            let r = chunk_elems(c, n);
            dec.decompress_to_buffer(enc.frame(c), &mut planes[r.start * esize..r.end * esize]).unwrap();
        }
        t_zstd = t_zstd.min(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        for c in 0..chunk_count(n) {
            let r = chunk_elems(c, n);
            let b = r.start * esize..r.end * esize;
            inverse_from_planes(
                LosslessOptions::DEFAULT.transform,
                esize,
                &planes[b.clone()],
                Some(&base[b.clone()]),
                &mut out[b],
            );
        }
        t_inv = t_inv.min(t0.elapsed().as_secs_f64());
    }
    assert!(out == raw);
    let gb = raw.len() as f64 / 1e9;
    println!("decode breakdown, 1 core: zstd {:.2} GB/s, planes+inverse {:.2} GB/s", gb / t_zstd, gb / t_inv);
}

/// zstd parameters vs ratio and one core's zstd decode speed, on the default payload.
fn sweep(target: &[u8], base: &[u8], esize: usize, name: &str) {
    use zstd::zstd_safe::CParameter;
    let n = base.len() / esize;
    let mut payloads = Vec::new();
    for c in 0..chunk_count(n) {
        let r = chunk_elems(c, n);
        let b = r.start * esize..r.end * esize;
        let mut p = vec![0u8; b.len()];
        forward_to_planes(
            LosslessOptions::DEFAULT.transform,
            esize,
            &target[b.clone()],
            Some(&base[b]),
            &mut p,
        );
        payloads.push(p);
    }
    for (level, min_match) in [(-1, 0), (1, 0), (1, 6), (1, 7), (3, 0), (3, 7), (9, 7)] {
        let mut comp = zstd::bulk::Compressor::new(level).unwrap();
        comp.set_parameter(CParameter::ChecksumFlag(true)).unwrap();
        if min_match > 0 {
            comp.set_parameter(CParameter::MinMatch(min_match)).unwrap();
        }
        let frames: Vec<Vec<u8>> = payloads.iter().map(|p| comp.compress(p).unwrap()).collect();
        let size: usize = frames.iter().map(|f| f.len() + 8).sum();
        let mut dec = zstd::bulk::Decompressor::new().unwrap();
        let mut out = vec![0u8; DELTA_CHUNK_ELEMS * esize];
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t0 = Instant::now();
            for f in &frames {
                dec.decompress_to_buffer(f, &mut out[..]).unwrap();
            }
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "  sweep {name:<8} level {level:>2} min_match {min_match}: ratio {:.3}, zstd decode {:.2} GB/s",
            target.len() as f64 / size as f64,
            target.len() as f64 / best / 1e9
        );
    }
}

fn main() {
    let mut n: usize = 4 << 20;
    let mut seed: u64 = 42;
    let mut dump: Option<std::path::PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--n" => n = args.next().and_then(|v| v.parse().ok()).expect("--n ELEMS"),
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).expect("--seed S"),
            "--dump" => dump = Some(args.next().expect("--dump DIR").into()),
            other => panic!("unknown argument {other}"),
        }
    }
    println!("n = {n} elements, seed = {seed}, ratio = raw / (frames + 8 B per offset)\n");

    let variants = [
        ("ulp+planes", LosslessOptions { transform: Transform::Ulp, planes: true }),
        ("xor+planes", LosslessOptions { transform: Transform::Xor, planes: true }),
        ("xor", LosslessOptions { transform: Transform::Xor, planes: false }),
        ("sub+planes", LosslessOptions { transform: Transform::Sub, planes: true }),
        ("sub", LosslessOptions { transform: Transform::Sub, planes: false }),
    ];
    println!(
        "{:<5} {:<9} {:>3} | {:>10} {:>10} {:>8} {:>10} {:>8} | {:>9} {:>9}",
        "dtype",
        "target",
        "lvl",
        "ulp+planes",
        "xor+planes",
        "xor",
        "sub+planes",
        "sub",
        "no base",
        "dec GB/s"
    );
    let mut json = Vec::new();
    for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
        let e = dtype.size();
        let base = random_tensor(seed, n, dtype, false);
        let mut targets = vec![("same".to_string(), base.clone())];
        for (i, k) in KS.iter().enumerate() {
            targets.push((format!("k={k}"), make_target(&base, dtype, *k, seed + 1 + i as u64)));
        }
        if let (Some(dir), Dtype::BF16) = (&dump, dtype) {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("base.bin"), &base).unwrap();
            for (name, t) in &targets[1..] {
                std::fs::write(dir.join(format!("target_{}.bin", name.replace('=', ""))), t).unwrap();
            }
        }
        for (name, target) in &targets {
            for level in [1, 3, 9] {
                let mut row = Vec::new();
                let mut default_enc = None;
                for (_, opts) in variants {
                    let enc = encode_lossless_with(target, Some(&base), e, level, opts);
                    row.push(ratio(target.len(), &enc));
                    if opts == LosslessOptions::DEFAULT {
                        default_enc = Some(enc);
                    }
                }
                let fresh = encode_lossless_with(target, None, e, level, LosslessOptions::DEFAULT);
                let enc = default_enc.unwrap();
                let gbps = decode_gbps(&enc, &base, e, LosslessOptions::DEFAULT, target);
                println!(
                    "{:<5} {:<9} {:>3} | {:>10.2} {:>10.2} {:>8.2} {:>10.2} {:>8.2} | {:>9.3} {:>9.2}",
                    dtype.name(),
                    name,
                    level,
                    row[0],
                    row[1],
                    row[2],
                    row[3],
                    row[4],
                    ratio(target.len(), &fresh),
                    gbps
                );
                if dtype == Dtype::BF16 && name != "same" {
                    json.push(format!(
                        "{{\"target\": \"{}\", \"level\": {level}, \"raw\": {}, \"stored\": {}, \"ratio\": {:.4}, \"decode_gbps_1core\": {:.3}}}",
                        name.replace('=', ""),
                        target.len(),
                        stored(&enc),
                        row[0],
                        gbps
                    ));
                }
            }
        }
        println!();

        if dtype == Dtype::BF16 {
            println!("chunk size (default codec, level {DEFAULT_LEVEL}, bf16): ratio");
            for (name, target) in &targets[1..] {
                let cells: Vec<String> = [1usize << 14, 1 << 16, 1 << 18, 1 << 20]
                    .iter()
                    .map(|&c| {
                        format!(
                            "{}Ki {:.3}",
                            c >> 10,
                            target.len() as f64
                                / stored_with_chunk(target, &base, e, DEFAULT_LEVEL, c) as f64
                        )
                    })
                    .collect();
                println!("  {:<8} {}", name, cells.join("   "));
            }
            println!();
            let t0 = Instant::now();
            let enc =
                encode_lossless_with(&targets[2].1, Some(&base), e, DEFAULT_LEVEL, LosslessOptions::DEFAULT);
            let dt = t0.elapsed().as_secs_f64();
            println!(
                "encode bf16 k=0.01 level {DEFAULT_LEVEL}: {:.2} GB/s on {} threads ({} chunks)",
                base.len() as f64 / dt / 1e9,
                rayon::current_num_threads(),
                enc.n_chunks()
            );
            breakdown(&enc, &base, e, &targets[2].1);
            if std::env::var_os("SWEEP").is_some() {
                for (name, target) in &targets[1..] {
                    sweep(target, &base, e, name);
                }
            }
            println!();
        }
    }
    if let Some(dir) = &dump {
        let text = format!(
            "{{\"n\": {n}, \"seed\": {seed}, \"dtype\": \"BF16\", \"results\": [\n  {}\n]}}\n",
            json.join(",\n  ")
        );
        std::fs::write(dir.join("llmfs.json"), text).unwrap();
        println!("dumped the bf16 pairs and llmfs.json to {}", dir.display());
    }
}
