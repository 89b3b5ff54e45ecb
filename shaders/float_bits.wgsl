// float_bits.wgsl: f32 / f16 / bf16 arithmetic on bit patterns, with integer operations only.
//
// Not a kernel: the Rust side prepends this file to every kernel that rounds (see
// src/compute/gpu/mod.rs). WGSL lets a device flush f32 subnormals and gives `x / y` an error of
// 2.5 ulp, and `pack2x16float` rounds as the device pleases; the CPU kernels llmfs must match
// bit for bit (codec::quant, compute::cast, compute::merge, codec::delta) are IEEE with
// subnormals and round to nearest even. So the few float ops the kernels need (add, an integer
// divided by a float, the roundings to f16/bf16) are done here on u32 bit patterns, the way a
// soft-float library (Berkeley SoftFloat's f32_add / f32_div) does: exact on every device.
// NaN results follow x86 SSE (the CPU llmfs is checked against): a NaN operand comes back
// quieted, an invalid op (0/0, inf - inf) gives the default NaN 0xFFC00000.

const QNAN_DEFAULT: u32 = 0xFFC00000u;
const GUARD: u32 = 7u; // extra low bits kept below the 24-bit significand (SoftFloat keeps 7)

fn fb_is_nan(x: u32) -> bool {
    return (x & 0x7FFFFFFFu) > 0x7F800000u;
}

// Right shift that ORs everything shifted out into bit 0 ("jamming"), shift < 32 or not.
fn fb_shift_jam(m: u32, sh: u32) -> u32 {
    if (sh == 0u) {
        return m;
    }
    if (sh >= 31u) {
        return select(0u, 1u, m != 0u);
    }
    return (m >> sh) | select(0u, 1u, (m & ((1u << sh) - 1u)) != 0u);
}

// Rounds significand `m` (leading 1 at bit 23 + GUARD for a normal value, GUARD low bits) at
// biased exponent `be` to f32 bits, nearest even; be <= 0 gives a subnormal, overflow gives inf.
// For be == 1 a significand below 2^(23+GUARD) is a subnormal, which the same sum encodes.
fn fb_pack(sign: u32, m_in: u32, be: i32) -> u32 {
    if (be >= 255) {
        return sign | 0x7F800000u;
    }
    var m = m_in;
    var base = 0u;
    if (be <= 0) {
        m = fb_shift_jam(m, u32(1 - be));
    } else {
        base = u32(be - 1) << 23u;
    }
    var r = m >> GUARD;
    let g = m & ((1u << GUARD) - 1u);
    let half = 1u << (GUARD - 1u);
    if (g > half || (g == half && (r & 1u) == 1u)) {
        r += 1u;
    }
    // r may be 2^24 (carry into the exponent) or 2^23 from a subnormal: the sum is right, and
    // 0x7F800000 (inf) on overflow.
    return sign | (base + r);
}

// a + b on f32 bit patterns, correctly rounded (nearest even), subnormals kept.
fn f32_add_bits(a_in: u32, b_in: u32) -> u32 {
    let ea0 = (a_in >> 23u) & 0xFFu;
    let eb0 = (b_in >> 23u) & 0xFFu;
    if (ea0 == 255u || eb0 == 255u) {
        if (fb_is_nan(a_in)) {
            return a_in | 0x00400000u;
        }
        if (fb_is_nan(b_in)) {
            return b_in | 0x00400000u;
        }
        if (ea0 == 255u && eb0 == 255u && ((a_in ^ b_in) & 0x80000000u) != 0u) {
            return QNAN_DEFAULT;
        }
        return select(b_in, a_in, ea0 == 255u);
    }
    var a = a_in;
    var b = b_in;
    if ((b & 0x7FFFFFFFu) > (a & 0x7FFFFFFFu)) {
        a = b_in;
        b = a_in;
    }
    let ea = (a >> 23u) & 0xFFu;
    let eb = (b >> 23u) & 0xFFu;
    var ma = ((a & 0x7FFFFFu) | select(0u, 0x800000u, ea != 0u)) << GUARD;
    var mb = ((b & 0x7FFFFFu) | select(0u, 0x800000u, eb != 0u)) << GUARD;
    let xa = max(ea, 1u);
    let xb = max(eb, 1u);
    mb = fb_shift_jam(mb, xa - xb);
    let sign = a & 0x80000000u;
    var be = i32(xa);
    var m: u32;
    if (((a ^ b) & 0x80000000u) == 0u) {
        m = ma + mb; // < 2^32: both < 2^31
        if (m >= (1u << (24u + GUARD))) {
            m = fb_shift_jam(m, 1u);
            be += 1;
        }
    } else {
        m = ma - mb;
        if (m == 0u) {
            return 0u; // x - x = +0 when rounding to nearest
        }
        let lz = i32(23u + GUARD) - i32(firstLeadingBit(m));
        if (lz > 0) {
            let sh = min(lz, be - 1);
            m = m << u32(sh);
            be -= sh;
        }
    }
    return fb_pack(sign, m, be);
}

// f32(q) / s for an integer |q| < 2^24 and f32 bits s, correctly rounded: long division of the
// significands, one quotient bit per step (the divisor fits 24 bits, the remainder 25).
fn f32_div_int_bits(q: i32, s: u32) -> u32 {
    let es = (s >> 23u) & 0xFFu;
    let ms = s & 0x7FFFFFu;
    let sign = select(0u, 0x80000000u, q < 0) ^ (s & 0x80000000u);
    if (es == 255u && ms != 0u) {
        return s | 0x00400000u; // NaN divisor
    }
    let s_zero = (s & 0x7FFFFFFFu) == 0u;
    if (q == 0) {
        return select(sign, QNAN_DEFAULT, s_zero); // 0/0 = NaN; 0/x = 0/inf = ±0
    }
    if (es == 255u) {
        return sign; // q / ±inf = ±0
    }
    if (s_zero) {
        return sign | 0x7F800000u; // q / ±0 = ±inf
    }
    // |q| = n * 2^(eq - 23), n in [2^23, 2^24).
    var n = u32(abs(q));
    let fq = i32(firstLeadingBit(n));
    n = n << u32(23 - fq);
    var e = fq; // unbiased exponent of q
    // s = d * 2^(e_s - 23), d in [2^23, 2^24).
    var d: u32;
    if (es == 0u) {
        let sh = 23 - i32(firstLeadingBit(ms));
        d = ms << u32(sh);
        e -= -126 - sh;
    } else {
        d = ms | 0x800000u;
        e -= i32(es) - 127;
    }
    if (n < d) {
        n = n << 1u;
        e -= 1;
    }
    // n / d in [1, 2): 24 + GUARD quotient bits, the last one jammed with the remainder.
    var r = n;
    var quo = 0u;
    for (var i = 0u; i < 24u + GUARD; i++) {
        let ge = r >= d;
        quo = (quo << 1u) | select(0u, 1u, ge);
        r = select(r, r - d, ge) << 1u;
    }
    quo = quo | select(0u, 1u, r != 0u);
    return fb_pack(sign, quo, e + 127);
}

// f16 bits -> f32 bits, exact; a NaN comes back quiet with its payload (F16C, `half`).
fn f16_to_f32_bits(h: u32) -> u32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1Fu;
    let m = h & 0x3FFu;
    if (e == 0x1Fu) {
        return sign | 0x7F800000u | (m << 13u) | select(0u, 0x00400000u, m != 0u);
    }
    if (e == 0u) {
        if (m == 0u) {
            return sign;
        }
        let p = firstLeadingBit(m); // value m * 2^-24
        return sign | ((p + 103u) << 23u) | ((m << (23u - p)) & 0x7FFFFFu);
    }
    return sign | ((e + 112u) << 23u) | (m << 13u);
}

// f32 bits -> f16 bits, round to nearest even, overflow to inf. A NaN becomes sign|0x7E00
// (`canonical`: the FP16 library torch uses) or keeps the top of its payload (F16C, `half`).
fn f32_to_f16_bits(x: u32, canonical_nan: bool) -> u32 {
    let sign = (x >> 16u) & 0x8000u;
    let a = x & 0x7FFFFFFFu;
    if (a > 0x7F800000u) {
        return sign | 0x7E00u | select((a >> 13u) & 0x3FFu, 0u, canonical_nan);
    }
    if (a >= 0x477FF000u) {
        return sign | 0x7C00u; // >= 65520 rounds to inf
    }
    if (a < 0x38800000u) {
        // Below 2^-14: an f16 subnormal (units of 2^-24) or zero.
        let e = a >> 23u;
        if (e < 102u) {
            return sign; // below 2^-25
        }
        let m = (a & 0x7FFFFFu) | 0x800000u;
        let sh = 126u - e; // 14..=24
        var r = m >> sh;
        let rem = m & ((1u << sh) - 1u);
        let half = 1u << (sh - 1u);
        if (rem > half || (rem == half && (r & 1u) == 1u)) {
            r += 1u;
        }
        return sign | r;
    }
    var h = (a >> 13u) - (112u << 10u);
    let rem = a & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u) == 1u)) {
        h += 1u;
    }
    return sign | h;
}

// f32 bits -> bf16 bits, round to nearest even. A NaN becomes 0x7FC0 (`canonical`: torch's
// c10::BFloat16) or keeps its top half, quieted (`half`).
fn f32_to_bf16_bits(x: u32, canonical_nan: bool) -> u32 {
    if (fb_is_nan(x)) {
        return select((x >> 16u) | 0x40u, 0x7FC0u, canonical_nan);
    }
    return (x + 0x7FFFu + ((x >> 16u) & 1u)) >> 16u;
}

// Dtype codes shared by the kernels: 0 = F32, 1 = F16, 2 = BF16.
fn dt_to_f32(h: u32, dtype: u32) -> u32 {
    if (dtype == 1u) {
        return f16_to_f32_bits(h);
    }
    if (dtype == 2u) {
        return h << 16u;
    }
    return h;
}

fn dt_from_f32(x: u32, dtype: u32, canonical_nan: bool) -> u32 {
    if (dtype == 1u) {
        return f32_to_f16_bits(x, canonical_nan);
    }
    if (dtype == 2u) {
        return f32_to_bf16_bits(x, canonical_nan);
    }
    return x;
}

// Element i of a buffer of `dtype` elements packed in u32 words (little-endian).
fn dt_elem(word: u32, i: u32, dtype: u32) -> u32 {
    if (dtype == 0u) {
        return word;
    }
    return (word >> ((i & 1u) * 16u)) & 0xFFFFu;
}

// The invocation's index in a 2-D grid of 256-wide workgroups (the grid is 2-D so that one
// dispatch can exceed max_compute_workgroups_per_dimension workgroups).
fn grid_index(wg: vec3<u32>, nwg: vec3<u32>, li: u32) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + li;
}
