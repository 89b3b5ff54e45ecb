// copy_words.wgsl: dst[i] = src[i], 16 bytes an invocation. Not a kernel of the read path: it
// measures what a shader can move (device memory, or host memory read or written directly
// over PCIe) for the transfer bounds that compute::gpu's benchmark reports.

struct Params {
    n: u32, // vec4 words to copy
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = grid_index(wg, nwg, li);
    if (i < P.n) {
        dst[i] = src[i];
    }
}
