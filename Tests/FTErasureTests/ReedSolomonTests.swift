import Testing
@testable import FTErasure

/// Every (k, m) with k, m ≥ 1 and k + m ≤ 6.
let smallCodes: [(Int, Int)] = (2...6).flatMap { n in (1..<n).map { m in (n - m, m) } }
/// Chunk lengths, several not multiples of 64 (ISA-L's SIMD width).
let chunkLengths = [1, 31, 64, 100, 1000, 4096 + 17]

@Suite("Reed-Solomon codec")
struct ReedSolomonTests {
    @Test("encode matches the pure-Swift GF(2^8) reference", arguments: smallCodes.map { [$0.0, $0.1] })
    func encodeMatchesReference(code: [Int]) throws {
        let (k, m) = (code[0], code[1])
        let rs = try ReedSolomon(dataCount: k, parityCount: m)
        var rng = SeededBytes(seed: UInt64(k * 31 + m))
        for len in chunkLengths {
            let data = (0..<k).map { _ in rng.bytes(len) }
            #expect(try rs.encode(data) == GF256Reference.encode(data, m: m), "RS(\(k)+\(m)) len \(len)")
        }
    }

    @Test("generator is ISA-L's Cauchy matrix", arguments: [(4, 2), (8, 2), (3, 1), (10, 4)].map { [$0.0, $0.1] })
    func generatorMatchesReference(code: [Int]) throws {
        let (k, m) = (code[0], code[1])
        let rs = try ReedSolomon(dataCount: k, parityCount: m)
        let g = GF256Reference.generator(k: k, m: m)
        for r in 0..<(k + m) { for c in 0..<k { #expect(rs.coefficient(row: r, column: c) == g[r][c]) } }
    }

    @Test("every erasure pattern of at most m chunks reconstructs exactly", arguments: smallCodes.map { [$0.0, $0.1] })
    func everyPatternReconstructs(code: [Int]) throws {
        let (k, m) = (code[0], code[1])
        let rs = try ReedSolomon(dataCount: k, parityCount: m)
        var rng = SeededBytes(seed: UInt64(1000 + k * 31 + m))
        for len in chunkLengths {
            let data = (0..<k).map { _ in rng.bytes(len) }
            let original = data + (try rs.encode(data))
            for pattern in subsets(of: k + m, maxSize: m) {
                var chunks = original
                // Whatever the lost buffers hold on entry must not matter.
                for i in pattern { chunks[i] = rng.bytes(len) }
                try rs.reconstruct(&chunks, missing: pattern)
                #expect(chunks == original, "RS(\(k)+\(m)) len \(len) missing \(pattern)")
            }
        }
    }

    @Test("update folded chunk by chunk in any order equals encode", arguments: smallCodes.map { [$0.0, $0.1] })
    func updateInAnyOrderEqualsEncode(code: [Int]) throws {
        let (k, m) = (code[0], code[1])
        let rs = try ReedSolomon(dataCount: k, parityCount: m)
        var rng = SeededBytes(seed: UInt64(2000 + k * 31 + m))
        for len in [1, 63, 4096 + 5] {
            let data = (0..<k).map { _ in rng.bytes(len) }
            let expected = try rs.encode(data)
            for trial in 0..<6 {
                var order = Array(0..<k)
                if trial > 0 { for i in stride(from: k - 1, to: 0, by: -1) { order.swapAt(i, Int(rng.next() % UInt64(i + 1))) } }
                var parity = [UInt8](repeating: 0, count: m * len)
                try parity.withUnsafeMutableBytes { raw in
                    let bufs = (0..<m).map { UnsafeMutableRawBufferPointer(rebasing: raw[$0 * len..<($0 + 1) * len]) }
                    for j in order {
                        try data[j].withUnsafeBytes { try rs.update(dataIndex: j, chunk: $0, parity: bufs) }
                    }
                }
                let folded = (0..<m).map { Array(parity[$0 * len..<($0 + 1) * len]) }
                #expect(folded == expected, "RS(\(k)+\(m)) len \(len) order \(order)")
            }
        }
    }

    @Test("large codes round-trip (RS(8+2), RS(10+4))", arguments: [(8, 2), (10, 4)].map { [$0.0, $0.1] })
    func largerCodes(code: [Int]) throws {
        let (k, m) = (code[0], code[1])
        let rs = try ReedSolomon(dataCount: k, parityCount: m)
        var rng = SeededBytes(seed: 77)
        let data = (0..<k).map { _ in rng.bytes(333) }
        let original = data + (try rs.encode(data))
        #expect(Array(original[k...]) == GF256Reference.encode(data, m: m))
        for pattern in [Array(0..<m), Array((k + m - m)..<(k + m)), [0, k]] where pattern.count <= m {
            var chunks = original
            try rs.reconstruct(&chunks, missing: pattern)
            #expect(chunks == original, "missing \(pattern)")
        }
    }

    @Test("decode tables are cached per loss pattern")
    func decodeCache() throws {
        let rs = try ReedSolomon(dataCount: 4, parityCount: 2)
        var rng = SeededBytes(seed: 5)
        let data = (0..<4).map { _ in rng.bytes(128) }
        let original = data + (try rs.encode(data))
        var chunks = original
        try rs.reconstruct(&chunks, missing: [1, 4])
        try rs.reconstruct(&chunks, missing: [4, 1])
        #expect(rs.cachedLossPatterns == 1)
        try rs.reconstruct(&chunks, missing: [0])
        #expect(rs.cachedLossPatterns == 2)
        #expect(chunks == original)
    }

    // MARK: invalid parameters

    private func expectError(_ code: ErasureError.Code, _ body: () throws -> Void,
                             sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            try body()
            Issue.record("expected \(code), got no error", sourceLocation: sourceLocation)
        } catch let error as ErasureError {
            #expect(error.code == code, "\(error)", sourceLocation: sourceLocation)
            #expect(!error.message.isEmpty, sourceLocation: sourceLocation)
        } catch {
            Issue.record("expected ErasureError \(code), got \(error)", sourceLocation: sourceLocation)
        }
    }

    @Test("invalid k, m and k + m are typed errors")
    func invalidParameters() {
        expectError(.invalidParameters) { _ = try ReedSolomon(dataCount: 0, parityCount: 2) }
        expectError(.invalidParameters) { _ = try ReedSolomon(dataCount: 4, parityCount: 0) }
        expectError(.invalidParameters) { _ = try ReedSolomon(dataCount: -1, parityCount: 1) }
        expectError(.invalidParameters) { _ = try ReedSolomon(dataCount: 250, parityCount: 6) }
        #expect((try? ReedSolomon(dataCount: 250, parityCount: 5)) != nil)
    }

    @Test("wrong inputs to encode, update and reconstruct are typed errors")
    func invalidInputs() throws {
        let rs = try ReedSolomon(dataCount: 3, parityCount: 2)
        let d = [[UInt8]](repeating: [1, 2, 3, 4], count: 3)
        expectError(.wrongChunkCount) { _ = try rs.encode(Array(d.prefix(2))) }
        expectError(.chunkLengthMismatch) { _ = try rs.encode([[1, 2, 3, 4], [1, 2, 3], [1, 2, 3, 4]]) }
        var full = d + (try rs.encode(d))
        expectError(.nothingMissing) { try rs.reconstruct(&full, missing: []) }
        expectError(.tooManyMissing) { try rs.reconstruct(&full, missing: [0, 1, 2]) }
        expectError(.invalidIndex) { try rs.reconstruct(&full, missing: [5]) }
        expectError(.invalidIndex) { try rs.reconstruct(&full, missing: [-1]) }
        expectError(.invalidIndex) { try rs.reconstruct(&full, missing: [1, 1]) }
        var short = Array(full.prefix(4))
        expectError(.wrongChunkCount) { try rs.reconstruct(&short, missing: [0]) }
        var ragged = full
        ragged[2] = [9]
        expectError(.chunkLengthMismatch) { try rs.reconstruct(&ragged, missing: [0]) }

        var parity = [UInt8](repeating: 0, count: 8)
        try parity.withUnsafeMutableBytes { raw in
            let p = [UnsafeMutableRawBufferPointer(rebasing: raw[0..<4]), UnsafeMutableRawBufferPointer(rebasing: raw[4..<8])]
            let chunk: [UInt8] = [1, 2, 3, 4]
            try chunk.withUnsafeBytes { c in
                expectError(.invalidIndex) { try rs.update(dataIndex: 3, chunk: c, parity: p) }
                expectError(.invalidIndex) { try rs.update(dataIndex: -1, chunk: c, parity: p) }
                expectError(.wrongChunkCount) { try rs.update(dataIndex: 0, chunk: c, parity: [p[0]]) }
                expectError(.chunkLengthMismatch) {
                    try rs.update(dataIndex: 0, chunk: UnsafeRawBufferPointer(rebasing: c[0..<3]), parity: p)
                }
                try rs.update(dataIndex: 0, chunk: c, parity: p)
            }
        }
    }
}

@Suite("CRC32C")
struct CRC32CTests {
    @Test("matches the standard check value")
    func checkValue() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
    }

    @Test("empty input is 0; checksums chain over split input")
    func chaining() {
        #expect(CRC32C.checksum([UInt8]()) == 0)
        var rng = SeededBytes(seed: 9)
        let bytes = rng.bytes(10_000)
        let whole = CRC32C.checksum(bytes)
        for cut in [0, 1, 63, 5000, 9999, 10_000] {
            let first = CRC32C.checksum(bytes[..<cut])
            #expect(CRC32C.checksum(bytes[cut...], continuing: first) == whole, "cut at \(cut)")
        }
    }

    @Test("a single flipped bit changes the checksum")
    func detectsFlip() {
        var rng = SeededBytes(seed: 10)
        var bytes = rng.bytes(4096)
        let before = CRC32C.checksum(bytes)
        bytes[1234] ^= 0x10
        #expect(CRC32C.checksum(bytes) != before)
    }
}

@Suite("Reed-Solomon single-row update")
struct SingleRowUpdateTests {
    @Test("folding chunks in pieces into one parity row equals that row of encode", arguments: smallCodes.map { [$0.0, $0.1] })
    func pieces(code: [Int]) throws {
        let (k, m) = (code[0], code[1])
        let rs = try ReedSolomon(dataCount: k, parityCount: m)
        var rng = SeededBytes(seed: UInt64(3000 + k * 31 + m))
        let len = 1000
        let data = (0..<k).map { _ in rng.bytes(len) }
        let expected = try rs.encode(data)
        for row in 0..<m {
            var parity = [UInt8](repeating: 0, count: len)
            for d in (0..<k).reversed() {
                // In three uneven pieces, as frames of a transfer would arrive.
                for range in [0..<1, 1..<333, 333..<len] {
                    try data[d].withUnsafeBytes { c in
                        try parity.withUnsafeMutableBytes { p in
                            try rs.update(parityRow: row, dataIndex: d, chunk: UnsafeRawBufferPointer(rebasing: c[range]),
                                          parity: UnsafeMutableRawBufferPointer(rebasing: p[range]))
                        }
                    }
                }
            }
            #expect(parity == expected[row], "RS(\(k)+\(m)) row \(row)")
        }
    }
}
