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

// ---- Multiply, fused multiply-add, divide and comparisons (the merge kernels) ----
// Same contract as f32_add_bits: correctly rounded to nearest even, subnormals kept, NaN
// operands quieted (the first NaN operand wins, as x86 SSE's mulss/divss), an invalid
// operation (0 * inf, 0/0, inf/inf, inf - inf) gives QNAN_DEFAULT. No float instruction is
// used: the device may flush subnormals or contract a*b+c, and `fma` in WGSL may be computed
// as a separate multiply and add; only integer arithmetic gives the CPU's bits everywhere.

// 32 x 32 -> 64-bit product as (lo, hi).
fn fb_mul_wide(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xFFFFu;
    let a1 = a >> 16u;
    let b0 = b & 0xFFFFu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 16u) + (p01 & 0xFFFFu) + (p10 & 0xFFFFu);
    let lo = (p00 & 0xFFFFu) | (mid << 16u);
    let hi = p11 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
    return vec2<u32>(lo, hi);
}

// 64-bit helpers on (lo, hi).
fn fb_add64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    return vec2<u32>(lo, a.y + b.y + select(0u, 1u, lo < a.x));
}

fn fb_sub64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    return vec2<u32>(a.x - b.x, a.y - b.y - select(0u, 1u, a.x < b.x));
}

fn fb_lt64(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.y < b.y || (a.y == b.y && a.x < b.x);
}

fn fb_shl64(a: vec2<u32>, sh: u32) -> vec2<u32> {
    if (sh == 0u) {
        return a;
    }
    if (sh >= 64u) {
        return vec2<u32>(0u, 0u);
    }
    if (sh >= 32u) {
        return vec2<u32>(0u, a.x << (sh - 32u));
    }
    return vec2<u32>(a.x << sh, (a.y << sh) | (a.x >> (32u - sh)));
}

// Right shift, everything shifted out ORed into bit 0.
fn fb_shr_jam64(a: vec2<u32>, sh: u32) -> vec2<u32> {
    if (sh == 0u) {
        return a;
    }
    if (sh >= 63u) {
        return vec2<u32>(select(0u, 1u, (a.x | a.y) != 0u), 0u);
    }
    var r: vec2<u32>;
    var lost: bool;
    if (sh >= 32u) {
        let s = sh - 32u;
        r = vec2<u32>(select(a.y, a.y >> s, s > 0u), 0u);
        lost = a.x != 0u || (s > 0u && (a.y & ((1u << s) - 1u)) != 0u);
    } else {
        r = vec2<u32>((a.x >> sh) | (a.y << (32u - sh)), a.y >> sh);
        lost = (a.x & ((1u << sh) - 1u)) != 0u;
    }
    r.x = r.x | select(0u, 1u, lost);
    return r;
}

// Index of the highest set bit of a non-zero 64-bit value.
fn fb_lead64(a: vec2<u32>) -> u32 {
    if (a.y != 0u) {
        return 32u + firstLeadingBit(a.y);
    }
    return firstLeadingBit(a.x);
}

// The significand of a finite non-zero f32 with its leading 1 at bit 23, and its exponent e
// (value = sig * 2^(e - 150)); subnormals normalized (e <= 0).
fn fb_unpack(x: u32) -> vec2<i32> {
    let e = i32((x >> 23u) & 0xFFu);
    let m = x & 0x7FFFFFu;
    if (e == 0) {
        let sh = 23u - firstLeadingBit(m);
        return vec2<i32>(i32(m << sh), 1 - i32(sh));
    }
    return vec2<i32>(i32(m | 0x800000u), e);
}

fn fb_is_inf(x: u32) -> bool {
    return (x & 0x7FFFFFFFu) == 0x7F800000u;
}

fn fb_is_zero(x: u32) -> bool {
    return (x & 0x7FFFFFFFu) == 0u;
}

// Special cases of a * b (a NaN, inf or zero operand): the result, or 1 (not a float result
// the checks below return: 1 is a subnormal no special case gives) when both are finite and
// non-zero.
fn fb_mul_special(a: u32, b: u32) -> u32 {
    if (fb_is_nan(a)) {
        return a | 0x00400000u;
    }
    if (fb_is_nan(b)) {
        return b | 0x00400000u;
    }
    let sign = (a ^ b) & 0x80000000u;
    if (fb_is_inf(a) || fb_is_inf(b)) {
        if (fb_is_zero(a) || fb_is_zero(b)) {
            return QNAN_DEFAULT;
        }
        return sign | 0x7F800000u;
    }
    if (fb_is_zero(a) || fb_is_zero(b)) {
        return sign;
    }
    return 1u;
}

// a * b on f32 bit patterns.
fn f32_mul_bits(a: u32, b: u32) -> u32 {
    let s = fb_mul_special(a, b);
    if (s != 1u) {
        return s;
    }
    let sign = (a ^ b) & 0x80000000u;
    let ua = fb_unpack(a);
    let ub = fb_unpack(b);
    // sa * sb in [2^46, 2^48); value = p * 2^(ea + eb - 300).
    let p = fb_mul_wide(u32(ua.x), u32(ub.x));
    var be = ua.y + ub.y - 127;
    var m: vec2<u32>;
    if (p.y >= (1u << 15u)) {
        m = fb_shr_jam64(p, 17u);
        be += 1;
    } else {
        m = fb_shr_jam64(p, 16u);
    }
    return fb_pack(sign, m.x, be);
}

// a * b + c with one rounding (C's fmaf, Rust's mul_add).
fn f32_fma_bits(a: u32, b: u32, c: u32) -> u32 {
    if (fb_is_nan(a) || fb_is_nan(b)) {
        return fb_mul_special(a, b);
    }
    let prod_special = fb_mul_special(a, b);
    if (prod_special == QNAN_DEFAULT) {
        return QNAN_DEFAULT; // 0 * inf (+ anything but NaN, which x86 also answers so)
    }
    if (fb_is_nan(c)) {
        return c | 0x00400000u;
    }
    if (prod_special != 1u) {
        // The product is an infinity or a signed zero, exact: one addition.
        return f32_add_bits(prod_special, c);
    }
    if (fb_is_inf(c)) {
        return c; // c infinite, the product finite
    }
    let sign_p = (a ^ b) & 0x80000000u;
    let ua = fb_unpack(a);
    let ub = fb_unpack(b);
    let p = fb_mul_wide(u32(ua.x), u32(ub.x)); // in [2^46, 2^48)
    // The exact product as xp * 2^(ep) with its leading 1 at bit 61 (xp has >= 14 zero low bits).
    let lp = fb_lead64(p);
    var xp = fb_shl64(p, 61u - lp);
    var ep = ua.y + ub.y - 300 - i32(61u - lp);
    if (fb_is_zero(c)) {
        // x * y + (±0): the exact product, rounded.
        return fb_pack(sign_p, fb_shr_jam64(xp, 31u).x, ep + 61 + 127);
    }
    let sign_c = c & 0x80000000u;
    let uc = fb_unpack(c);
    var xc = fb_shl64(vec2<u32>(u32(uc.x), 0u), 38u); // leading 1 at bit 61
    var ec = uc.y - 150 - 38;
    // Align the smaller exponent to the larger (the jam keeps rounding exact).
    var e = ep;
    if (ep >= ec) {
        xc = fb_shr_jam64(xc, u32(min(ep - ec, 63)));
    } else {
        xp = fb_shr_jam64(xp, u32(min(ec - ep, 63)));
        e = ec;
    }
    var x: vec2<u32>;
    var sign: u32;
    if (sign_p == sign_c) {
        x = fb_add64(xp, xc); // < 2^63
        sign = sign_p;
    } else if (fb_lt64(xp, xc)) {
        x = fb_sub64(xc, xp);
        sign = sign_c;
    } else {
        x = fb_sub64(xp, xc);
        sign = sign_p;
    }
    if ((x.x | x.y) == 0u) {
        return 0u; // exact cancellation: +0 when rounding to nearest
    }
    // value = x * 2^e; m gets the leading 1 at bit 30 (23 + GUARD) and the rest jammed.
    let l = fb_lead64(x);
    var m: u32;
    if (l >= 30u) {
        m = fb_shr_jam64(x, l - 30u).x;
    } else {
        m = fb_shl64(x, 30u - l).x;
    }
    return fb_pack(sign, m, e + i32(l) + 127);
}

// a / b on f32 bit patterns.
fn f32_div_bits(a: u32, b: u32) -> u32 {
    if (fb_is_nan(a)) {
        return a | 0x00400000u;
    }
    if (fb_is_nan(b)) {
        return b | 0x00400000u;
    }
    let sign = (a ^ b) & 0x80000000u;
    if (fb_is_inf(a)) {
        return select(sign | 0x7F800000u, QNAN_DEFAULT, fb_is_inf(b));
    }
    if (fb_is_inf(b)) {
        return sign;
    }
    if (fb_is_zero(b)) {
        return select(sign | 0x7F800000u, QNAN_DEFAULT, fb_is_zero(a));
    }
    if (fb_is_zero(a)) {
        return sign;
    }
    let ua = fb_unpack(a);
    let ub = fb_unpack(b);
    var n = u32(ua.x);
    let d = u32(ub.x);
    var e = ua.y - ub.y; // unbiased exponent of the quotient when n >= d
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

// A key that orders non-NaN f32 bit patterns as their values (±0 equal).
fn fb_key(x: u32) -> i32 {
    let m = i32(x & 0x7FFFFFFFu);
    return select(m, -m, (x & 0x80000000u) != 0u);
}

// a > b, false when either is NaN.
fn f32_gt_bits(a: u32, b: u32) -> bool {
    return !fb_is_nan(a) && !fb_is_nan(b) && fb_key(a) > fb_key(b);
}

fn f32_eq_bits(a: u32, b: u32) -> bool {
    return !fb_is_nan(a) && !fb_is_nan(b) && fb_key(a) == fb_key(b);
}

// Round f32 bits to `dtype` (0 F32, 1 F16, 2 BF16) and back: `half`'s rounding (a NaN keeps
// the top of its payload, quieted), as compute::mergekit's `round`.
fn fb_round(x: u32, dtype: u32) -> u32 {
    return dt_to_f32(dt_from_f32(x, dtype, false), dtype);
}
