// add_f16.wgsl: FastChat's fp16 delta add `f16(f32(a) + f32(b))` (apply_delta.py l.138-140),
// bit-identical to compute::merge::add_f16. One invocation writes two elements.

struct Params {
    n: u32, // elements
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> a: array<u32>;
@group(0) @binding(2) var<storage, read> b: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

fn add_one(x: u32, y: u32) -> u32 {
    return f32_to_f16_bits(f32_add_bits(f16_to_f32_bits(x), f16_to_f32_bits(y)), false);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let w = grid_index(wg, nwg, li);
    if (2u * w >= P.n) {
        return;
    }
    let x = a[w];
    let y = b[w];
    var v = add_one(x & 0xFFFFu, y & 0xFFFFu);
    if (2u * w + 1u < P.n) {
        v = v | (add_one(x >> 16u, y >> 16u) << 16u);
    }
    out[w] = v;
}
