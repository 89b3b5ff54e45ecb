// cast_float.wgsl: dtype casts between f32, f16 and bf16, bit-identical to compute::cast
// (round to nearest even through f32; overflow becomes inf; a NaN cast to f16 or bf16 becomes
// torch's canonical NaN, sign | 0x7E00 or 0x7FC0, as on the CPU). One invocation writes one u32
// of output.

struct Params {
    n: u32,    // elements
    src_dtype: u32, // 0 F32, 1 F16, 2 BF16
    dst_dtype: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<u32>;

fn cast_one(i: u32) -> u32 {
    let w = src[select(i >> 1u, i, P.src_dtype == 0u)];
    let h = dt_elem(w, i, P.src_dtype);
    // bf16 -> f32 is a shift (no quieting); f16 -> f32 quiets a NaN, as the multiply in the CPU's routine does.
    return dt_from_f32(dt_to_f32(h, P.src_dtype), P.dst_dtype, true);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let w = grid_index(wg, nwg, li);
    if (P.dst_dtype == 0u) {
        if (w < P.n) {
            dst[w] = cast_one(w);
        }
        return;
    }
    let i = 2u * w;
    if (i >= P.n) {
        return;
    }
    var v = cast_one(i);
    if (i + 1u < P.n) {
        v = v | (cast_one(i + 1u) << 16u);
    }
    dst[w] = v;
}
