import FTCore

/// A tiny, slow, obviously-correct GF(2^8) Reed-Solomon encoder, independent
/// of ISA-L, to check the codec against. Same field (polynomial 0x11D) and
/// same Cauchy generator as ISA-L's `gf_gen_cauchy1_matrix`:
/// rows `0..<k` are the identity, row `i ≥ k` column `j` is `1 / (i ⊕ j)`.
enum GF256Reference {
    static func mul(_ a: UInt8, _ b: UInt8) -> UInt8 {
        var a = UInt16(a), b = b, p: UInt16 = 0
        while b != 0 {
            if b & 1 != 0 { p ^= a }
            a <<= 1
            if a & 0x100 != 0 { a ^= 0x11D }
            b >>= 1
        }
        return UInt8(p)
    }

    static func inv(_ a: UInt8) -> UInt8 {
        precondition(a != 0)
        for x in 1...255 where mul(a, UInt8(x)) == 1 { return UInt8(x) }
        preconditionFailure("no inverse")
    }

    static func generator(k: Int, m: Int) -> [[UInt8]] {
        (0..<(k + m)).map { i in
            (0..<k).map { j in i < k ? (i == j ? 1 : 0) : inv(UInt8(i ^ j)) }
        }
    }

    static func encode(_ data: [[UInt8]], m: Int) -> [[UInt8]] {
        let k = data.count
        let g = generator(k: k, m: m)
        let len = data[0].count
        return (0..<m).map { p in
            var out = [UInt8](repeating: 0, count: len)
            for j in 0..<k {
                let c = g[k + p][j]
                for b in 0..<len { out[b] ^= mul(c, data[j][b]) }
            }
            return out
        }
    }
}

/// Deterministic bytes for tests.
struct SeededBytes {
    var rng: SplitMix64
    init(seed: UInt64) { rng = SplitMix64(seed: seed) }
    mutating func next() -> UInt64 { rng.next() }
    mutating func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) } }
}

/// All subsets of `0..<n` with `1...maxSize` elements.
func subsets(of n: Int, maxSize: Int) -> [[Int]] {
    var out: [[Int]] = []
    for mask in 1..<(1 << n) where mask.nonzeroBitCount <= maxSize {
        out.append((0..<n).filter { mask & (1 << $0) != 0 })
    }
    return out
}
