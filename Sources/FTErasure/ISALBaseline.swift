import CISAL

/// Direct ISA-L calls with everything prepared in advance: the floor that
/// `ft-bench ec` measures `ReedSolomon` against. Not for production use.
///
/// It calls the same ISA-L functions on the same buffers as the codec, but
/// with the pointer arrays and decode tables built once, outside the timed
/// loop, so any overhead the codec adds shows up as a ratio below 1.
public final class ISALBaseline {
    private let k: Int
    private let m: Int
    private let length: Int
    private var encodeTables: [UInt8]
    private var decodeTables: [UInt8]
    private let errs: Int
    private let data: UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>
    private let parity: UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>
    private let survivors: UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>
    private let outputs: UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>

    /// Prepares encode over `chunks` (`k + m` buffers of `length` bytes, data
    /// first) and reconstruction of the chunks at `missing` from the first `k`
    /// others, with ISA-L's Cauchy matrix like the codec.
    public init(k: Int, m: Int, chunks: [UnsafeMutableRawBufferPointer], missing: [Int]) {
        precondition(chunks.count == k + m && !missing.isEmpty && missing.count <= m)
        self.k = k
        self.m = m
        self.length = chunks[0].count
        let n = k + m
        var a = [UInt8](repeating: 0, count: n * k)
        gf_gen_cauchy1_matrix(&a, Int32(n), Int32(k))
        var tables = [UInt8](repeating: 0, count: 32 * k * m)
        a.withUnsafeMutableBufferPointer { ap in
            ec_init_tables(Int32(k), Int32(m), ap.baseAddress! + k * k, &tables)
        }
        encodeTables = tables
        // The textbook ISA-L decode: invert the survivors' rows, take the rows
        // of the lost data chunks, and for lost parity multiply through.
        let lost = Set(missing)
        let alive = Array((0..<n).filter { !lost.contains($0) }.prefix(k))
        var b = [UInt8](repeating: 0, count: k * k)
        for (r, row) in alive.enumerated() { for c in 0..<k { b[r * k + c] = a[row * k + c] } }
        var inv = [UInt8](repeating: 0, count: k * k)
        precondition(gf_invert_matrix(&b, &inv, Int32(k)) == 0)
        let sortedMissing = missing.sorted()
        var d = [UInt8](repeating: 0, count: sortedMissing.count * k)
        for (i, idx) in sortedMissing.enumerated() {
            for c in 0..<k {
                if idx < k {
                    d[i * k + c] = inv[idx * k + c]
                } else {
                    var s: UInt8 = 0
                    for j in 0..<k { s ^= gf_mul(a[idx * k + j], inv[j * k + c]) }
                    d[i * k + c] = s
                }
            }
        }
        errs = sortedMissing.count
        var dtables = [UInt8](repeating: 0, count: 32 * k * sortedMissing.count)
        ec_init_tables(Int32(k), Int32(sortedMissing.count), &d, &dtables)
        decodeTables = dtables

        func table(_ ptrs: [UnsafeMutableRawBufferPointer]) -> UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?> {
            let t = UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>.allocate(capacity: max(ptrs.count, 1))
            for (i, p) in ptrs.enumerated() { t[i] = p.baseAddress!.assumingMemoryBound(to: UInt8.self) }
            return t
        }
        data = table(Array(chunks[0..<k]))
        parity = table(Array(chunks[k...]))
        survivors = table(alive.map { chunks[$0] })
        outputs = table(sortedMissing.map { chunks[$0] })
    }

    deinit {
        data.deallocate()
        parity.deallocate()
        survivors.deallocate()
        outputs.deallocate()
    }

    /// One `ec_encode_data` over the prepared buffers.
    public func encode() {
        ec_encode_data(Int32(length), Int32(k), Int32(m), &encodeTables, data, parity)
    }

    /// Folds data chunk `dataIndex` into parity row 0 only, as a parity holder
    /// does (one `ec_encode_data_update` with the row's tables).
    public func updateRow(dataIndex: Int) {
        encodeTables.withUnsafeMutableBufferPointer { t in
            ec_encode_data_update(Int32(length), Int32(k), 1, Int32(dataIndex), t.baseAddress!, data[dataIndex], parity)
        }
    }

    /// One decode of the prepared loss pattern over the prepared buffers.
    public func reconstruct() {
        ec_encode_data(Int32(length), Int32(k), Int32(errs), &decodeTables, survivors, outputs)
    }
}
