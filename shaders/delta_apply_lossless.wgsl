// delta_apply_lossless.wgsl: the inverse of the lossless delta transform, bit-identical to
// codec::delta::inverse_from_planes (planes = 1) and codec::delta::delta_inverse (planes = 0),
// run after the CPU has zstd-decompressed a chunk. Per element of `esize` bytes (1, 2, 4, 8),
// as a little-endian unsigned integer d combined with the base's b:
//   Xor  t = d ^ b;   Sub  t = d + b (wrapping);
//   Ulp  t = ord(unzigzag(d) + ord(b)), ord(x) = x ^ (top - 1) when the sign bit is set.
// With planes, byte k of element i is at `k * stride + i`. No base = a base of zeros.
// One invocation writes one u32 of output (4, 2 or 1 elements), or one 8-byte element.

struct Params {
    n: u32,         // elements
    esize: u32,     // 1, 2, 4 or 8
    transform: u32, // 0 Xor, 1 Sub, 2 Ulp
    planes: u32,    // 1: byte planes; 0: elements as they are
    stride: u32,    // bytes from one plane to the next (a multiple of 4)
    has_base: u32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> delta: array<u32>;
@group(0) @binding(2) var<storage, read> base: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

fn byte_at(addr: u32) -> u32 {
    return (delta[addr >> 2u] >> ((addr & 3u) * 8u)) & 0xFFu;
}

// Byte k of element i's delta.
fn dbyte(i: u32, k: u32) -> u32 {
    return byte_at(select(i * P.esize + k, k * P.stride + i, P.planes == 1u));
}

fn base_word(w: u32) -> u32 {
    return select(0u, base[w], P.has_base == 1u);
}

// Inverse transform of one element of `bits` <= 32 bits held in the low bits of a u32.
fn inv32(d: u32, b: u32, bits: u32) -> u32 {
    let mask = select((1u << bits) - 1u, 0xFFFFFFFFu, bits == 32u);
    if (P.transform == 0u) {
        return d ^ b;
    }
    if (P.transform == 1u) {
        return (d + b) & mask;
    }
    let top = 1u << (bits - 1u);
    let ob = select(b, b ^ (top - 1u), (b & top) != 0u);
    let z = select(d >> 1u, ~(d >> 1u) & mask, (d & 1u) == 1u);
    let x = (z + ob) & mask;
    return select(x, x ^ (top - 1u), (x & top) != 0u);
}

// The same on 64-bit elements held as (lo, hi).
fn inv64(d: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    if (P.transform == 0u) {
        return d ^ b;
    }
    if (P.transform == 1u) {
        let lo = d.x + b.x;
        return vec2<u32>(lo, d.y + b.y + select(0u, 1u, lo < d.x));
    }
    let flip = vec2<u32>(0xFFFFFFFFu, 0x7FFFFFFFu);
    let ob = select(b, b ^ flip, (b.y & 0x80000000u) != 0u);
    var z = vec2<u32>((d.x >> 1u) | (d.y << 31u), d.y >> 1u);
    if ((d.x & 1u) == 1u) {
        z = ~z;
    }
    let lo = z.x + ob.x;
    let x = vec2<u32>(lo, z.y + ob.y + select(0u, 1u, lo < z.x));
    return select(x, x ^ flip, (x.y & 0x80000000u) != 0u);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let w = grid_index(wg, nwg, li);
    if (P.esize == 8u) {
        if (w >= P.n) {
            return;
        }
        var lo = 0u;
        var hi = 0u;
        for (var k = 0u; k < 4u; k++) {
            lo = lo | (dbyte(w, k) << (8u * k));
            hi = hi | (dbyte(w, k + 4u) << (8u * k));
        }
        let t = inv64(vec2<u32>(lo, hi), vec2<u32>(base_word(2u * w), base_word(2u * w + 1u)));
        out[2u * w] = t.x;
        out[2u * w + 1u] = t.y;
        return;
    }
    let per = 4u / P.esize; // elements in this word
    let first = w * per;
    if (first >= P.n) {
        return;
    }
    let bits = 8u * P.esize;
    let bw = base_word(w);
    var v = 0u;
    for (var j = 0u; j < per; j++) {
        let i = first + j;
        var d = 0u;
        for (var k = 0u; k < P.esize; k++) {
            d = d | (dbyte(i, k) << (8u * k));
        }
        let b = select((bw >> (bits * j)) & ((1u << bits) - 1u), bw, bits == 32u);
        v = v | (inv32(d, b, bits) << (bits * j));
    }
    out[w] = v;
}
