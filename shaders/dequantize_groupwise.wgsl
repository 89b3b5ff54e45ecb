// dequantize_groupwise.wgsl: FastChat's group-wise int8/int4 decompress (symmetric and
// asymmetric) to f32/f16/bf16, bit-identical to codec::quant::dequantize_range_bytes.
//
// compression.py:291-298 (fschat 0.2.36), op by op, each op rounded to the dtype T:
//   symmetric   x' = T(q / scale)
//   asymmetric  x' = T(T(q / scale) + min)
// `q / scale` is a true, correctly rounded division (f32_div_int_bits), never a multiplication
// by a reciprocal. Layout (codec::quant module doc): codes of the zero-padded rows, row-major;
// 8-bit codes one a byte (i8 pattern when symmetric), 4-bit codes two a byte, low nibble
// first; one scale (and min) per group, in T.
//
// One invocation writes one u32 of output: one f32 or two f16/bf16 elements.

struct Params {
    n: u32,         // elements to produce
    cols: u32,      // row length of the tensor
    padded: u32,    // codes per padded row
    group: u32,     // group size
    gpr: u32,       // groups per row
    col0: u32,      // column of the first element
    q_off: u32,     // code index (in `q`) of the first element
    g_off: u32,     // group index (in `scale`) of the first element
    bits: u32,      // 8 or 4
    symmetric: u32, // 1 or 0
    dtype: u32,     // 0 F32, 1 F16, 2 BF16
    g0: u32,        // col0 / group
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> q: array<u32>;
@group(0) @binding(2) var<storage, read> scale: array<u32>;
@group(0) @binding(3) var<storage, read> minimum: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;

fn param(g: u32, from_min: bool) -> u32 {
    let w = select(scale[g >> select(0u, 1u, P.dtype != 0u)], minimum[g >> select(0u, 1u, P.dtype != 0u)], from_min);
    return dt_to_f32(dt_elem(w, g, P.dtype), P.dtype);
}

// Element i (relative to the dispatch's first element) as bits of T.
fn dequant(i: u32) -> u32 {
    let t = P.col0 + i;
    let rr = t / P.cols;
    let c = t - rr * P.cols;
    // Relative to the first element; never negative (a later row starts a padded row later).
    let k = P.q_off + rr * P.padded + c - P.col0;
    let g = P.g_off + rr * P.gpr + c / P.group - P.g0;
    var code: i32;
    if (P.bits == 8u) {
        let b = (q[k >> 2u] >> ((k & 3u) * 8u)) & 0xFFu;
        code = select(i32(b), i32(b) - 256, P.symmetric == 1u && b >= 128u);
    } else {
        let b = (q[k >> 3u] >> ((k & 7u) * 4u)) & 0xFu;
        code = select(i32(b), i32(b) - 16, P.symmetric == 1u && b >= 8u);
    }
    // torch's c10::Half / c10::BFloat16 roundings: NaN becomes the canonical NaN.
    let x = dt_from_f32(f32_div_int_bits(code, param(g, false)), P.dtype, true);
    if (P.symmetric == 1u) {
        return x;
    }
    return dt_from_f32(f32_add_bits(dt_to_f32(x, P.dtype), param(g, true)), P.dtype, true);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let w = grid_index(wg, nwg, li);
    if (P.dtype == 0u) {
        if (w < P.n) {
            out[w] = dequant(w);
        }
        return;
    }
    let i = 2u * w;
    if (i >= P.n) {
        return;
    }
    var v = dequant(i);
    if (i + 1u < P.n) {
        v = v | (dequant(i + 1u) << 16u);
    }
    out[w] = v;
}
