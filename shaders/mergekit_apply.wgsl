// mergekit_apply.wgsl: the elementwise apply of mergekit's linear and generalized task
// arithmetic merges (task_arithmetic, ties, dare_*, breadcrumbs*), bit-identical to
// compute::mergekit's `TensorMerge::apply` on the CPU. One invocation computes one element of
// the range from the same element of every input and writes it as f32 bits (a value of the
// compute dtype, as the CPU's `out`).
//
// Every float operation is the soft-float of float_bits.wgsl, in the CPU kernel's order with
// its roundings (`r`: to the compute dtype and back after each torch op): linear is
// `fma(p_j, w_j, acc)` per input from +0 (torch's addcmul_, an FMA on the CPU), an f32 divide and
// one rounding; task arithmetic is, per non-base parent, `r(p - base)`, the sparsifier's mask
// (magnitude cut-off with its stored ties, band, or the counter-based Bernoulli draw of
// mergekit/sparsify.rs), the L1 rescale factor, `r(x * w)`; then the f32 sum in parent order,
// TIES's sign vote and disjoint mean, normalize, lambda, `r(base + mixed)`.

struct Params {
    n: u32,          // elements in this chunk
    first_lo: u32,   // the chunk's first element in the whole tensor (u64)
    first_hi: u32,
    mode: u32,       // 0 linear, 1 generalized task arithmetic
    inputs: u32,     // inputs (base included), at most 9
    base: u32,       // the base's input index (task arithmetic)
    dtype: u32,      // compute dtype: 0 F32, 1 F16, 2 BF16
    in_dtype: u32,   // how the inputs' values are stored in `vals` (their values are exact)
    stride: u32,     // u32 words per input in `vals`
    consensus: u32,
    normalize: u32,
    use_lambda: u32,
    lambda: u32,     // f32 bits
    plain_div: u32,  // f32 bits: the divisor without consensus
    den: u32,        // f32 bits: linear's sum of weights
    _pad: u32,
    // Per non-base parent k (at most 8), three vec4s:
    //   [3k]     kind (0 all, 1 nothing, 2 top, 3 band, 4 random), a (mag / lo / p), b (hi), has_factor
    //   [3k + 1] factor, ties offset in `ties`, ties count, weight (compute dtype)
    //   [3k + 2] stream key lo, hi, work dtype, 0
    par: array<vec4<u32>, 24>,
    // Linear: the weight of input j (f32 bits) at lin_w[j / 4][j % 4].
    lin_w: array<vec4<u32>, 3>,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> vals: array<u32>;
@group(0) @binding(2) var<storage, read> ties: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

fn value(j: u32, i: u32) -> u32 {
    if (P.in_dtype == 0u) {
        return vals[j * P.stride + i];
    }
    return dt_to_f32(dt_elem(vals[j * P.stride + (i >> 1u)], i, P.in_dtype), P.in_dtype);
}

fn r(x: u32) -> u32 {
    return fb_round(x, P.dtype);
}

// a - b (x86's subss: the first NaN operand, quieted).
fn f32_sub_bits(a: u32, b: u32) -> u32 {
    if (fb_is_nan(b) && !fb_is_nan(a)) {
        return b | 0x00400000u;
    }
    return f32_add_bits(a, b ^ 0x80000000u);
}

// ---- mergekit/sparsify.rs's `uniform`: splitmix64 on (lo, hi) pairs ----

fn shr64(a: vec2<u32>, sh: u32) -> vec2<u32> {
    // 0 < sh < 32
    return vec2<u32>((a.x >> sh) | (a.y << (32u - sh)), a.y >> sh);
}

fn mul64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let p = fb_mul_wide(a.x, b.x);
    return vec2<u32>(p.x, p.y + a.x * b.y + a.y * b.x);
}

fn splitmix64(z0: vec2<u32>) -> vec2<u32> {
    var z = fb_add64(z0, vec2<u32>(0x7f4a7c15u, 0x9e3779b9u));
    z = z ^ shr64(z, 30u);
    z = mul64(z, vec2<u32>(0x1ce4e5b9u, 0xbf58476du));
    z = z ^ shr64(z, 27u);
    z = mul64(z, vec2<u32>(0x133111ebu, 0x94d049bbu));
    return z ^ shr64(z, 31u);
}

// The draw in [0, 1) for element `index` of `stream`, as f32 bits: 24 bits of the hash times
// 2^-24, exact.
fn uniform_bits(stream: vec2<u32>, index: vec2<u32>) -> u32 {
    let h = splitmix64(stream ^ mul64(index, vec2<u32>(0xd192ed03u, 0xd1b54a32u)));
    let k = h.y >> 8u;
    if (k == 0u) {
        return 0u;
    }
    let l = firstLeadingBit(k);
    return ((l + 103u) << 23u) | ((k << (23u - l)) & 0x7FFFFFu);
}

// Whether tensor element `idx` is in the sorted tie list `ties[off .. off + len)`.
fn in_ties(off: u32, len: u32, idx: u32) -> bool {
    var lo = off;
    var hi = off + len;
    while (lo < hi) {
        let mid = lo + (hi - lo) / 2u;
        let t = ties[mid];
        if (t == idx) {
            return true;
        }
        if (t < idx) {
            lo = mid + 1u;
        } else {
            hi = mid;
        }
    }
    return false;
}

// Parent k's delta, sparsified (kept or `x * 0`), rescaled and back in the compute dtype
// (task_arithmetic.rs `Mix::sparsify`).
fn sparsify(k: u32, delta: u32, i: u32) -> u32 {
    let p0 = P.par[3u * k];
    let p1 = P.par[3u * k + 1u];
    let p2 = P.par[3u * k + 2u];
    let kind = p0.x;
    if (kind == 0u) {
        return delta;
    }
    let work = p2.z;
    let idx = P.first_lo + i; // tie lists hold u32 element indices
    let a = delta & 0x7FFFFFFFu;
    var x: u32;
    if (kind == 1u) {
        x = f32_mul_bits(delta, 0u);
    } else if (kind == 2u) {
        var keep = f32_gt_bits(a, p0.y);
        if (!keep && f32_eq_bits(a, p0.y)) {
            keep = in_ties(p1.y, p1.z, idx);
        }
        x = select(f32_mul_bits(delta, 0u), delta, keep);
    } else if (kind == 3u) {
        var keep = f32_gt_bits(a, p0.y) && f32_gt_bits(p0.z, a);
        if (!keep && (f32_eq_bits(a, p0.y) || f32_eq_bits(a, p0.z))) {
            keep = in_ties(p1.y, p1.z, idx);
        }
        x = select(f32_mul_bits(delta, 0u), delta, keep);
    } else {
        let first = vec2<u32>(P.first_lo, P.first_hi);
        let u = uniform_bits(vec2<u32>(p2.x, p2.y), fb_add64(first, vec2<u32>(i, 0u)));
        let m = select(0u, 0x3F800000u, f32_gt_bits(p0.y, u));
        x = fb_round(f32_mul_bits(fb_round(delta, work), m), work);
    }
    if (p0.w != 0u) {
        x = fb_round(f32_mul_bits(x, p1.x), work);
    }
    return r(x);
}

fn linear(i: u32) -> u32 {
    var acc = 0u;
    for (var j = 0u; j < P.inputs; j++) {
        acc = f32_fma_bits(value(j, i), P.lin_w[j / 4u][j % 4u], acc);
    }
    if (P.normalize != 0u) {
        acc = f32_div_bits(acc, P.den);
    }
    return r(acc);
}

fn task_arithmetic(i: u32) -> u32 {
    let y = value(P.base, i);
    var xs: array<u32, 8>;
    var kp = 0u;
    var sum = 0u;
    for (var j = 0u; j < P.inputs; j++) {
        if (j == P.base) {
            continue;
        }
        let delta = r(f32_sub_bits(value(j, i), y));
        let x = r(f32_mul_bits(sparsify(kp, delta, i), P.par[3u * kp + 1u].w));
        xs[kp] = x;
        sum = f32_add_bits(sum, x);
        kp += 1u;
    }
    var acc: u32;
    var dv: u32;
    if (P.consensus != 0u) {
        // Majority sign of the rounded sum, >= 0 counting as +; the agreeing parents' deltas
        // and weights (the others add `x * 0` and 0).
        let s = r(sum);
        let pos = f32_gt_bits(s, 0u) || f32_eq_bits(s, 0u);
        acc = 0u;
        dv = 0u;
        for (var k = 0u; k < kp; k++) {
            let v = xs[k];
            let on = select(f32_gt_bits(0u, v), f32_gt_bits(v, 0u), pos);
            acc = f32_add_bits(acc, select(f32_mul_bits(v, 0u), v, on));
            dv = f32_add_bits(dv, select(0u, P.par[3u * k + 1u].w, on));
        }
        dv = r(dv);
        if (f32_eq_bits(dv, 0u)) {
            dv = 0x3F800000u;
        }
    } else {
        acc = sum;
        dv = P.plain_div;
    }
    var mixed = r(acc);
    if (P.normalize != 0u) {
        mixed = r(f32_div_bits(mixed, dv));
    }
    if (P.use_lambda != 0u) {
        mixed = r(f32_mul_bits(mixed, P.lambda));
    }
    return r(f32_add_bits(y, mixed));
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let i = grid_index(wg, nwg, li);
    if (i >= P.n) {
        return;
    }
    if (P.mode == 0u) {
        out[i] = linear(i);
    } else {
        out[i] = task_arithmetic(i);
    }
}
