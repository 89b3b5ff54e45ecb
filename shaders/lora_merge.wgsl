// lora_merge.wgsl: LoRA merge `T(f32(W) + scale * (L @ R))` with L rows × r and R r × cols in
// f32 (L = B, R = A; for a transposed weight the host passes L = A^T, R = B^T), as
// compute::merge::lora_rows and PEFT's merge. A tiled matrix product: a workgroup of 256
// invocations computes a 64 × 64 tile with L and R staged in workgroup memory 16 ranks at a
// time; accumulation in f32 (sums in another order than the CPU's, so results agree within f32
// rounding of the product; see compute::gpu's doc).
//
// Invocation (x, y), x < 32 and y < 8, owns the column pair 2x, 2x + 1 of the tile's rows
// y, y + 8, ..., y + 56. So a warp's 32 invocations read W and write the output as 32
// consecutive words of one row: 128 contiguous bytes per access, which is what reading and
// writing host memory over PCIe needs (strided 4-byte accesses ran at 2 GB/s).
//
// Output elements are addressed linearly, `row * cols + col - e_off`, and only those in
// [0, n) are written (a read may start and end mid-row). For 16-bit dtypes two elements share
// a u32: a word whose two elements this invocation owns is stored whole; a word shared with
// another invocation (odd row length or offset) is OR-ed in atomically, into a zeroed buffer
// (such chunks keep their output in device memory; the others may write host memory directly).

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

// L's tile as [k][row slot]: ls[k * 16 + 2y + h] holds rows y + 8(4h + i), i = 0..3, so an
// invocation reads its eight rows with two 16-byte loads. R's as [k][column pair]: rs[k * 32 + x]
// holds columns 2x and 2x + 1. The eight accumulators are named vec2s (columns 2x, 2x + 1),
// not an indexed array, which a compiler may leave in memory.
var<workgroup> ls: array<vec4<f32>, 256>; // KT × 16
var<workgroup> rs: array<vec2<f32>, 512>; // KT × 32

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let x = li % 32u;
    let y = li / 32u;
    let row0 = wg.y * TILE;
    let col0 = wg.x * TILE;
    var acc0 = vec2<f32>(0.0);
    var acc1 = vec2<f32>(0.0);
    var acc2 = vec2<f32>(0.0);
    var acc3 = vec2<f32>(0.0);
    var acc4 = vec2<f32>(0.0);
    var acc5 = vec2<f32>(0.0);
    var acc6 = vec2<f32>(0.0);
    var acc7 = vec2<f32>(0.0);
    for (var k0 = 0u; k0 < P.rank; k0 += KT) {
        for (var j = 0u; j < 4u; j++) {
            let idx = li + 256u * j;
            // L tile: row idx / KT, rank idx % KT (consecutive invocations read along a row).
            let lr = idx / KT;
            let lk = idx % KT;
            let lv = select(0.0, lf[min((row0 + lr) * P.rank + k0 + lk, arrayLength(&lf) - 1u)], row0 + lr < P.rows && k0 + lk < P.rank);
            let a = lr / 8u;
            ls[lk * 16u + (lr % 8u) * 2u + a / 4u][a % 4u] = lv;
            // R tile: rank idx / TILE, col idx % TILE.
            let rk = idx / TILE;
            let rc = idx % TILE;
            let rv = select(0.0, rf[min((k0 + rk) * P.cols + col0 + rc, arrayLength(&rf) - 1u)], k0 + rk < P.rank && col0 + rc < P.cols);
            rs[rk * 32u + rc / 2u][rc % 2u] = rv;
        }
        workgroupBarrier();
        for (var k = 0u; k < KT; k++) {
            let la = ls[k * 16u + y * 2u];
            let lb = ls[k * 16u + y * 2u + 1u];
            let rv = rs[k * 32u + x];
            acc0 = acc0 + la.x * rv;
            acc1 = acc1 + la.y * rv;
            acc2 = acc2 + la.z * rv;
            acc3 = acc3 + la.w * rv;
            acc4 = acc4 + lb.x * rv;
            acc5 = acc5 + lb.y * rv;
            acc6 = acc6 + lb.z * rv;
            acc7 = acc7 + lb.w * rv;
        }
        workgroupBarrier();
    }
    let acc = array<vec2<f32>, 8>(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7);
    let c0 = col0 + x * 2u;
    for (var a = 0u; a < 8u; a++) {
        let r = row0 + y + 8u * a;
        if (r >= P.rows) {
            break;
        }
        let lin0 = i32(r * P.cols + c0) - i32(P.e_off); // signed: row 0 may start before e_off
        var vals: array<u32, 2>;
        var ok: array<bool, 2>;
        // Each word of W is loaded once (it may be host memory, read over PCIe).
        var word = 0u;
        var word_at = 0xFFFFFFFFu;
        for (var b = 0u; b < 2u; b++) {
            let l = lin0 + i32(b);
            ok[b] = c0 + b < P.cols && l >= 0 && u32(l) < P.n;
            if (ok[b]) {
                let at = select(u32(l) >> 1u, u32(l), P.dtype == 0u);
                if (at != word_at) {
                    word = w[at];
                    word_at = at;
                }
                let v = bitcast<f32>(dt_to_f32(dt_elem(word, u32(l), P.dtype), P.dtype)) + acc[a][b] * P.scale;
                vals[b] = dt_from_f32(bitcast<u32>(v), P.dtype, false);
            }
        }
        for (var b = 0u; b < 2u; b++) {
            if (!ok[b]) {
                continue;
            }
            let l = u32(lin0 + i32(b));
            if (P.dtype == 0u) {
                atomicStore(&out[l], vals[b]);
            } else if ((l & 1u) == 0u && b == 0u && ok[1]) {
                atomicStore(&out[l >> 1u], vals[0] | (vals[1] << 16u));
            } else if ((l & 1u) == 1u && b == 1u && ok[0]) {
                // stored whole with its even partner
            } else {
                atomicOr(&out[l >> 1u], vals[b] << ((l & 1u) * 16u));
            }
        }
    }
}
