// bitdelta_apply.wgsl: BitDelta decode `T(f32(base) ± scale[row])` (+ where the sign bit is 0),
// bit-identical to codec::delta::decode_bitdelta_range. Sign bits: element i is bit i % 8 of
// byte i / 8, LSB first, set = negative. One invocation writes one u32 of output.

struct Params {
    n: u32,       // elements
    cols: u32,    // row length
    col0: u32,    // column of the first element (its row is scale[0])
    bit_off: u32, // bit of the first element within signs' first byte
    dtype: u32,   // 0 F32, 1 F16, 2 BF16
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> signs: array<u32>;
@group(0) @binding(2) var<storage, read> scales: array<u32>;
@group(0) @binding(3) var<storage, read> base: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;

fn apply(i: u32, bw: u32) -> u32 {
    let bit = P.bit_off + i;
    let neg = (signs[bit >> 5u] >> (bit & 31u)) & 1u;
    let s = scales[(P.col0 + i) / P.cols] ^ (neg << 31u);
    let x = dt_to_f32(dt_elem(bw, i, P.dtype), P.dtype);
    return dt_from_f32(f32_add_bits(x, s), P.dtype, false);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let w = grid_index(wg, nwg, li);
    if (P.dtype == 0u) {
        if (w < P.n) {
            out[w] = apply(w, base[w]);
        }
        return;
    }
    let i = 2u * w;
    if (i >= P.n) {
        return;
    }
    let bw = base[w];
    var v = apply(i, bw);
    if (i + 1u < P.n) {
        v = v | (apply(i + 1u, bw) << 16u);
    }
    out[w] = v;
}
