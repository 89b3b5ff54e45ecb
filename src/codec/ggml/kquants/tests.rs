//! The lanes of `make_qkx2_quants_x8` and `make_qx_quants_q6_x16` (and the AVX2 search under
//! them) against the scalar ports of ggml's functions, every lane, code and scale.

use super::*;

/// Sub-blocks that take every branch: random, flat, zero, all positive, all negative,
/// one outlier, tiny, huge, NaN.
fn sub_blocks(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut s = seed | 1;
    let mut r = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut out = Vec::new();
    for k in 0..64 {
        let mut v: Vec<f32> = (0..n).map(|_| r()).collect();
        match k % 9 {
            1 => v.iter_mut().for_each(|x| *x = 0.25),
            2 => v.iter_mut().for_each(|x| *x = 0.0),
            3 => v.iter_mut().for_each(|x| *x = x.abs() + 0.1),
            4 => v.iter_mut().for_each(|x| *x = -x.abs() - 0.1),
            5 => v[k % n] *= 100.0,
            6 => v.iter_mut().for_each(|x| *x *= 1e-30),
            7 => v.iter_mut().for_each(|x| *x *= 1e30),
            8 => v[k % n] = f32::NAN,
            _ => {}
        }
        out.push(v);
    }
    out
}

#[test]
fn qkx2_lanes_are_the_scalar_function_bit_for_bit() {
    for (nmax, rmin, nstep) in [(15, -1.0, 20), (31, -0.5, 15)] {
        // 40 seeds of 64 sub-blocks: every lane meets every kind of sub-block.
        for group in (1..=40).flat_map(|seed| sub_blocks(32, seed)).collect::<Vec<_>>().chunks_exact(SUB) {
            let mut xt = [[0.0f32; SUB]; 32];
            let mut wt = [[0.0f32; SUB]; 32];
            for (j, v) in group.iter().enumerate() {
                for i in 0..32 {
                    xt[i][j] = v[i];
                    wt[i][j] = 0.01 + v[i].abs();
                }
            }
            let mut lt = [[0u8; SUB]; 32];
            let (scales, mins) = make_qkx2_quants_x8(nmax, &xt, &wt, &mut lt, rmin, 0.1, nstep);
            for (j, v) in group.iter().enumerate() {
                let x: [f32; 32] = v.as_slice().try_into().unwrap();
                let w: [f32; 32] = std::array::from_fn(|i| wt[i][j]);
                let mut l = [0u8; 32];
                let (scale, min) = make_qkx2_quants(nmax, &x, &w, &mut l, rmin, 0.1, nstep);
                assert_eq!(scale.to_bits(), scales[j].to_bits(), "lane {j}");
                assert_eq!(min.to_bits(), mins[j].to_bits(), "lane {j}");
                assert_eq!(l, std::array::from_fn::<u8, 32, _>(|i| lt[i][j]), "lane {j}");
            }
        }
    }
}

#[test]
fn qx_lanes_are_the_scalar_function_bit_for_bit() {
    for group in (1..=40).flat_map(|seed| sub_blocks(16, seed)).collect::<Vec<_>>().chunks_exact(SUB6) {
        let mut xt = [[0.0f32; SUB6]; 16];
        for (j, v) in group.iter().enumerate() {
            for i in 0..16 {
                xt[i][j] = v[i];
            }
        }
        let mut lt = [[0i8; SUB6]; 16];
        let scales = make_qx_quants_q6_x16(&xt, &mut lt);
        for (j, v) in group.iter().enumerate() {
            let x: [f32; 16] = v.as_slice().try_into().unwrap();
            let mut l = [0i8; 16];
            let scale = make_qx_quants_q6(&x, &mut l);
            assert_eq!(scale.to_bits(), scales[j].to_bits(), "lane {j}");
            assert_eq!(l, std::array::from_fn::<i8, 16, _>(|i| lt[i][j]), "lane {j}");
        }
    }
}
