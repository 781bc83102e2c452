import CISAL
import Synchronization

/// A systematic Reed-Solomon code `RS(k, m)` over GF(2^8), on ISA-L.
///
/// A codeword is `k` data chunks followed by `m` parity chunks, all of one
/// length; indices `0..<k` are data, `k..<k+m` parity. Any `m` chunks of a
/// codeword may be lost and rebuilt from the other `k`.
///
/// The generator is ISA-L's Cauchy matrix (identity on top of a Cauchy
/// block), so every `k × k` submatrix is invertible for every `k + m ≤ 255`:
/// each loss pattern of at most `m` chunks decodes.
///
/// - `encode` computes all parity chunks at once.
/// - `update` folds one data chunk into parity chunks that start zeroed, in
///   any order; after all `k` are folded the parity equals `encode`'s. This
///   lets a parity holder encode while chunks are still arriving.
/// - `reconstruct` rebuilds any set of at most `m` missing chunks, data or
///   parity, in place. Decode tables are built once per loss pattern and
///   cached (building one costs ~20 µs; a lookup far less).
///
/// Thread-safe: one instance may be shared by every thread of a process.
public final class ReedSolomon: Sendable {
    /// ISA-L's limit on `k + m` for GF(2^8) codes.
    public static let maxTotalCount = 255
    /// ISA-L takes chunk lengths as a C `int`.
    public static let maxChunkLength = Int(Int32.max)

    /// Data chunks per codeword (`k`).
    public let dataCount: Int
    /// Parity chunks per codeword (`m`).
    public let parityCount: Int
    /// `k + m`.
    public var totalCount: Int { dataCount + parityCount }

    /// `(k + m) × k` generator matrix, row-major; its top `k` rows are the identity.
    let generator: [UInt8]
    /// ISA-L's expanded tables for the `m` parity rows: `32 · k · m` bytes.
    let encodeTables: [UInt8]
    private let decodeCache = Mutex<[[Int]: DecodePlan]>([:])

    /// The tables that rebuild one loss pattern from the first `k` survivors.
    struct DecodePlan: Sendable {
        var missing: [Int]
        var survivors: [Int]
        var tables: [UInt8]
    }

    public init(dataCount k: Int, parityCount m: Int) throws(ErasureError) {
        guard k >= 1 else {
            throw ErasureError(.invalidParameters, "k (data chunks) must be at least 1, got \(k)")
        }
        guard m >= 1 else {
            throw ErasureError(.invalidParameters, "m (parity chunks) must be at least 1, got \(m)")
        }
        guard k + m <= Self.maxTotalCount else {
            throw ErasureError(.invalidParameters,
                               "k + m must be at most \(Self.maxTotalCount) for GF(2^8), got \(k) + \(m) = \(k + m)")
        }
        self.dataCount = k
        self.parityCount = m
        var matrix = [UInt8](repeating: 0, count: (k + m) * k)
        matrix.withUnsafeMutableBufferPointer { gf_gen_cauchy1_matrix($0.baseAddress, Int32(k + m), Int32(k)) }
        self.generator = matrix
        var tables = [UInt8](repeating: 0, count: 32 * k * m)
        matrix.withUnsafeMutableBufferPointer { a in
            tables.withUnsafeMutableBufferPointer { t in
                ec_init_tables(Int32(k), Int32(m), a.baseAddress! + k * k, t.baseAddress)
            }
        }
        self.encodeTables = tables
    }

    /// The generator coefficient of chunk `row` for data chunk `column`.
    public func coefficient(row: Int, column: Int) -> UInt8 {
        generator[row * dataCount + column]
    }

    // MARK: encode

    /// Computes the `m` parity chunks of the `k` data chunks.
    ///
    /// All chunks must have the same length. The parity buffers are overwritten.
    public func encode(data: [UnsafeRawBufferPointer], parity: [UnsafeMutableRawBufferPointer]) throws(ErasureError) {
        guard data.count == dataCount else {
            throw ErasureError(.wrongChunkCount, "encode needs \(dataCount) data chunks, got \(data.count)")
        }
        guard parity.count == parityCount else {
            throw ErasureError(.wrongChunkCount, "encode needs \(parityCount) parity chunks, got \(parity.count)")
        }
        let length = try Self.commonLength(data.map(\.count) + parity.map(\.count))
        guard length > 0 else { return }
        Self.withPointers(data.map { UnsafeMutableRawPointer(mutating: $0.baseAddress!) }) { src in
            Self.withPointers(parity.map { $0.baseAddress! }) { dst in
                encodeTables.withUnsafeBufferPointer { t in
                    ec_encode_data(Int32(length), Int32(dataCount), Int32(parityCount),
                                   UnsafeMutablePointer(mutating: t.baseAddress!), src, dst)
                }
            }
        }
    }

    /// Folds data chunk `dataIndex` into `parity`.
    ///
    /// Start a codeword with zeroed parity buffers and fold each of the `k` data
    /// chunks once, in any order; the result equals `encode`'s. Folding a chunk
    /// twice cancels it out (GF(2^8) addition is XOR), so callers must fold each
    /// chunk exactly once.
    public func update(dataIndex: Int, chunk: UnsafeRawBufferPointer, parity: [UnsafeMutableRawBufferPointer]) throws(ErasureError) {
        guard (0..<dataCount).contains(dataIndex) else {
            throw ErasureError(.invalidIndex, "data chunk index must be in 0..<\(dataCount), got \(dataIndex)")
        }
        guard parity.count == parityCount else {
            throw ErasureError(.wrongChunkCount, "update needs \(parityCount) parity chunks, got \(parity.count)")
        }
        let length = try Self.commonLength([chunk.count] + parity.map(\.count))
        guard length > 0 else { return }
        Self.withPointers(parity.map { $0.baseAddress! }) { dst in
            encodeTables.withUnsafeBufferPointer { t in
                ec_encode_data_update(Int32(length), Int32(dataCount), Int32(parityCount), Int32(dataIndex),
                                      UnsafeMutablePointer(mutating: t.baseAddress!),
                                      UnsafeMutablePointer(mutating: chunk.baseAddress!.assumingMemoryBound(to: UInt8.self)),
                                      dst)
            }
        }
    }

    /// Folds data chunk `dataIndex` into parity chunk `parityRow` only (a node
    /// holding one parity chunk of a codeword computes just its own). `chunk`
    /// may be a piece of the data chunk: it is folded into the same range of
    /// `parity` (`parity.count == chunk.count`), so a chunk can arrive in pieces.
    public func update(parityRow: Int, dataIndex: Int, chunk: UnsafeRawBufferPointer,
                       parity: UnsafeMutableRawBufferPointer) throws(ErasureError) {
        guard (0..<parityCount).contains(parityRow) else {
            throw ErasureError(.invalidIndex, "parity row must be in 0..<\(parityCount), got \(parityRow)")
        }
        guard (0..<dataCount).contains(dataIndex) else {
            throw ErasureError(.invalidIndex, "data chunk index must be in 0..<\(dataCount), got \(dataIndex)")
        }
        let length = try Self.commonLength([chunk.count, parity.count])
        guard length > 0 else { return }
        Self.withPointers([parity.baseAddress!]) { dst in
            encodeTables.withUnsafeBufferPointer { t in
                ec_encode_data_update(Int32(length), Int32(dataCount), 1, Int32(dataIndex),
                                      UnsafeMutablePointer(mutating: t.baseAddress! + parityRow * 32 * dataCount),
                                      UnsafeMutablePointer(mutating: chunk.baseAddress!.assumingMemoryBound(to: UInt8.self)),
                                      dst)
            }
        }
    }

    // MARK: reconstruct

    /// Rebuilds the chunks at the indices in `missing` from the others.
    ///
    /// `chunks` holds all `k + m` chunks of one codeword in index order, each of
    /// the same length; the buffers at the `missing` indices are outputs and
    /// their contents on entry are ignored. Reads only the first `k` chunks
    /// that are not missing.
    public func reconstruct(_ chunks: [UnsafeMutableRawBufferPointer], missing: [Int]) throws(ErasureError) {
        guard chunks.count == totalCount else {
            throw ErasureError(.wrongChunkCount, "reconstruct needs all \(totalCount) chunks of the codeword, got \(chunks.count)")
        }
        let plan = try decodePlan(missing: missing)
        let length = try Self.commonLength(chunks.map(\.count))
        guard length > 0 else { return }
        Self.withPointers(plan.survivors.map { chunks[$0].baseAddress! }) { src in
            Self.withPointers(plan.missing.map { chunks[$0].baseAddress! }) { dst in
                plan.tables.withUnsafeBufferPointer { t in
                    ec_encode_data(Int32(length), Int32(dataCount), Int32(plan.missing.count),
                                   UnsafeMutablePointer(mutating: t.baseAddress!), src, dst)
                }
            }
        }
    }

    /// Number of loss patterns whose decode tables are cached.
    public var cachedLossPatterns: Int { decodeCache.withLock { $0.count } }

    /// The decode plan for a loss pattern, from the cache or built and cached.
    func decodePlan(missing unsorted: [Int]) throws(ErasureError) -> DecodePlan {
        let missing = unsorted.sorted()
        guard !missing.isEmpty else {
            throw ErasureError(.nothingMissing, "reconstruct called with no missing chunk")
        }
        for (i, index) in missing.enumerated() {
            guard (0..<totalCount).contains(index) else {
                throw ErasureError(.invalidIndex, "chunk index must be in 0..<\(totalCount), got \(index)")
            }
            guard i == 0 || missing[i - 1] != index else {
                throw ErasureError(.invalidIndex, "chunk index \(index) is named twice in the missing list")
            }
        }
        guard missing.count <= parityCount else {
            throw ErasureError(.tooManyMissing,
                               "\(missing.count) chunks missing (\(missing)), but RS(\(dataCount)+\(parityCount)) repairs at most \(parityCount)")
        }
        if let cached = decodeCache.withLock({ $0[missing] }) {
            return cached
        }
        let plan = try buildDecodePlan(missing: missing)
        decodeCache.withLock { $0[missing] = plan }
        return plan
    }

    private func buildDecodePlan(missing: [Int]) throws(ErasureError) -> DecodePlan {
        let k = dataCount
        let lost = Set(missing)
        let survivors = Array((0..<totalCount).lazy.filter { !lost.contains($0) }.prefix(k))
        // B: the generator rows of the survivors; B · data = survivors' chunks.
        var b = [UInt8](repeating: 0, count: k * k)
        for (r, row) in survivors.enumerated() {
            for c in 0..<k { b[r * k + c] = generator[row * k + c] }
        }
        var inverse = [UInt8](repeating: 0, count: k * k)
        let rc = b.withUnsafeMutableBufferPointer { bp in
            inverse.withUnsafeMutableBufferPointer { ip in
                gf_invert_matrix(bp.baseAddress, ip.baseAddress, Int32(k))
            }
        }
        guard rc == 0 else {
            throw ErasureError(.singularMatrix, "decode matrix for missing \(missing) is singular")
        }
        // Row i of the decode matrix expresses missing chunk i over the survivors:
        // a data chunk d is row d of B⁻¹; a parity chunk p is generator row p · B⁻¹.
        var decode = [UInt8](repeating: 0, count: missing.count * k)
        for (i, index) in missing.enumerated() {
            if index < k {
                for c in 0..<k { decode[i * k + c] = inverse[index * k + c] }
            } else {
                for c in 0..<k {
                    var s: UInt8 = 0
                    for j in 0..<k { s ^= gf_mul(generator[index * k + j], inverse[j * k + c]) }
                    decode[i * k + c] = s
                }
            }
        }
        var tables = [UInt8](repeating: 0, count: 32 * k * missing.count)
        decode.withUnsafeMutableBufferPointer { d in
            tables.withUnsafeMutableBufferPointer { t in
                ec_init_tables(Int32(k), Int32(missing.count), d.baseAddress, t.baseAddress)
            }
        }
        return DecodePlan(missing: missing, survivors: survivors, tables: tables)
    }

    // MARK: helpers

    static func commonLength(_ lengths: [Int]) throws(ErasureError) -> Int {
        let first = lengths.first ?? 0
        guard lengths.allSatisfy({ $0 == first }) else {
            throw ErasureError(.chunkLengthMismatch, "all chunks must have the same length, got lengths \(lengths)")
        }
        guard first <= maxChunkLength else {
            throw ErasureError(.chunkLengthMismatch, "chunk length \(first) exceeds ISA-L's limit of \(maxChunkLength) bytes")
        }
        return first
    }

    /// Calls `body` with a C array of `unsigned char *` for `pointers`.
    static func withPointers<R>(_ pointers: [UnsafeMutableRawPointer],
                                _ body: (UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>) -> R) -> R {
        withUnsafeTemporaryAllocation(of: UnsafeMutablePointer<UInt8>?.self, capacity: max(pointers.count, 1)) { buf in
            for (i, p) in pointers.enumerated() { buf[i] = p.assumingMemoryBound(to: UInt8.self) }
            return body(buf.baseAddress!)
        }
    }
}

// MARK: - Convenience over arrays

extension ReedSolomon {
    /// The `m` parity chunks of `data` (`k` arrays of one length).
    public func encode(_ data: [[UInt8]]) throws(ErasureError) -> [[UInt8]] {
        guard data.count == dataCount else {
            throw ErasureError(.wrongChunkCount, "encode needs \(dataCount) data chunks, got \(data.count)")
        }
        let length = try Self.commonLength(data.map(\.count))
        var codeword = Codeword(chunks: data + Array(repeating: [], count: parityCount), length: length)
        try codeword.withBuffers { (bufs) throws(ErasureError) in
            try encode(data: bufs[..<dataCount].map { UnsafeRawBufferPointer($0) }, parity: Array(bufs[dataCount...]))
        }
        return codeword.chunks(Array(dataCount..<totalCount))
    }

    /// Rebuilds the chunks of `chunks` (all `k + m`, in index order) at the `missing` indices.
    public func reconstruct(_ chunks: inout [[UInt8]], missing: [Int]) throws(ErasureError) {
        guard chunks.count == totalCount else {
            throw ErasureError(.wrongChunkCount, "reconstruct needs all \(totalCount) chunks of the codeword, got \(chunks.count)")
        }
        let lost = Set(missing)
        let length = try Self.commonLength(chunks.enumerated().filter { !lost.contains($0.offset) }.map(\.element.count))
        var codeword = Codeword(chunks: chunks, length: length)
        try codeword.withBuffers { (bufs) throws(ErasureError) in try reconstruct(bufs, missing: missing) }
        for index in lost where (0..<totalCount).contains(index) {
            chunks[index] = codeword.chunks([index])[0]
        }
    }
}

/// Chunks of one length laid out in one contiguous array.
private struct Codeword {
    var storage: [UInt8]
    let length: Int
    let count: Int

    init(chunks: [[UInt8]], length: Int) {
        self.length = length
        self.count = chunks.count
        storage = [UInt8](repeating: 0, count: max(length * chunks.count, 1))
        for (i, chunk) in chunks.enumerated() where chunk.count == length {
            storage.replaceSubrange(i * length..<(i + 1) * length, with: chunk)
        }
    }

    mutating func withBuffers(_ body: ([UnsafeMutableRawBufferPointer]) throws(ErasureError) -> Void) throws(ErasureError) {
        let (length, count) = (self.length, self.count)
        let result: Result<Void, ErasureError> = storage.withUnsafeMutableBytes { raw in
            let bufs = (0..<count).map {
                UnsafeMutableRawBufferPointer(rebasing: raw[$0 * length..<($0 + 1) * length])
            }
            do throws(ErasureError) { try body(bufs); return .success(()) } catch { return .failure(error) }
        }
        try result.get()
    }

    func chunks(_ indices: [Int]) -> [[UInt8]] {
        indices.map { Array(storage[$0 * length..<($0 + 1) * length]) }
    }
}
