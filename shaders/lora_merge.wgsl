// lora_merge.wgsl: LoRA merge `T(f32(W) + scale * (L @ R))` with L rows × r and R r × cols in
// f32 (L = B, R = A; for a transposed weight the host passes L = A^T, R = B^T), as
// compute::merge::lora_rows and PEFT's merge. A tiled matrix product: a workgroup of 16 × 16
// invocations computes a 64 × 64 tile, each invocation a 4 × 4 block, with L and R staged in
// workgroup memory 16 ranks at a time; accumulation in f32 (sums in another order than the
// CPU's, so results agree within f32 rounding of the product; see compute::gpu's doc).
//
// Output elements are addressed linearly, `row * cols + col - e_off`, and only those in
// [0, n) are written (a read may start and end mid-row). For 16-bit dtypes two elements share
// a u32: a word whose two elements this invocation owns is stored whole; a word shared with
// another invocation (odd row length or offset) is OR-ed in atomically, into a zeroed buffer.

struct Params {
    rows: u32,  // rows of this dispatch (of W, in its stored orientation)
    cols: u32,
    rank: u32,
    dtype: u32, // 0 F32, 1 F16, 2 BF16
    e_off: u32, // linear index of the first output element within row 0
    n: u32,     // output elements
    scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> lf: array<f32>; // rows × rank
@group(0) @binding(2) var<storage, read> rf: array<f32>; // rank × cols
@group(0) @binding(3) var<storage, read> w: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<atomic<u32>>;

const TILE: u32 = 64u;
const KT: u32 = 16u;

// Tiles as vec4s, [k][4 rows] and [k][4 cols], so the inner loop reads each operand with one
// 16-byte load and keeps its 4 × 4 accumulators in registers (named vec4s, not an indexed
// array, which a compiler may leave in memory).
var<workgroup> ls: array<vec4<f32>, 256>; // KT × TILE/4
var<workgroup> rs: array<vec4<f32>, 256>; // KT × TILE/4

fn w_elem(l: u32) -> u32 {
    if (P.dtype == 0u) {
        return w[l];
    }
    return dt_to_f32(dt_elem(w[l >> 1u], l, P.dtype), P.dtype);
}

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let row0 = wg.y * TILE;
    let col0 = wg.x * TILE;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < P.rank; k0 += KT) {
        for (var j = 0u; j < 4u; j++) {
            let idx = li + 256u * j;
            // L tile: row idx / KT, rank idx % KT (consecutive invocations read along a row).
            let lr = idx / KT;
            let lk = idx % KT;
            let lv = select(0.0, lf[min((row0 + lr) * P.rank + k0 + lk, arrayLength(&lf) - 1u)], row0 + lr < P.rows && k0 + lk < P.rank);
            ls[lk * 16u + lr / 4u][lr % 4u] = lv;
            // R tile: rank idx / TILE, col idx % TILE.
            let rk = idx / TILE;
            let rc = idx % TILE;
            let rv = select(0.0, rf[min((k0 + rk) * P.cols + col0 + rc, arrayLength(&rf) - 1u)], k0 + rk < P.rank && col0 + rc < P.cols);
            rs[rk * 16u + rc / 4u][rc % 4u] = rv;
        }
        workgroupBarrier();
        for (var k = 0u; k < KT; k++) {
            let lv = ls[k * 16u + lid.y];
            let rv = rs[k * 16u + lid.x];
            acc0 = acc0 + lv.x * rv;
            acc1 = acc1 + lv.y * rv;
            acc2 = acc2 + lv.z * rv;
            acc3 = acc3 + lv.w * rv;
        }
        workgroupBarrier();
    }
    var acc = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var a = 0u; a < 4u; a++) {
        let r = row0 + lid.y * 4u + a;
        if (r >= P.rows) {
            break;
        }
        let c0 = col0 + lid.x * 4u;
        let lin0 = i32(r * P.cols + c0) - i32(P.e_off); // signed: row 0 may start before e_off
        var vals: array<u32, 4>;
        var ok: array<bool, 4>;
        for (var b = 0u; b < 4u; b++) {
            let l = lin0 + i32(b);
            ok[b] = c0 + b < P.cols && l >= 0 && u32(l) < P.n;
            if (ok[b]) {
                let x = bitcast<f32>(w_elem(u32(l))) + acc[a][b] * P.scale;
                vals[b] = dt_from_f32(bitcast<u32>(x), P.dtype, false);
            }
        }
        for (var b = 0u; b < 4u; b++) {
            if (!ok[b]) {
                continue;
            }
            let l = u32(lin0 + i32(b));
            if (P.dtype == 0u) {
                atomicStore(&out[l], vals[b]);
            } else if ((l & 1u) == 0u && b < 3u && ok[b + 1u]) {
                atomicStore(&out[l >> 1u], vals[b] | (vals[b + 1u] << 16u));
            } else if ((l & 1u) == 1u && b > 0u && ok[b - 1u]) {
                // stored whole with its even partner
            } else {
                atomicOr(&out[l >> 1u], vals[b] << ((l & 1u) * 16u));
            }
        }
    }
}
