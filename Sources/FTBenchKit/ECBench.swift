import FTCore
import FTErasure
import Foundation

/// `ft-bench ec`: throughput of the `ReedSolomon` codec against direct ISA-L
/// calls on the same buffers and against memcpy, all in one run.
///
/// For each code, `k + m` chunks of `chunkBytes` live in one pre-faulted,
/// page-aligned buffer. Each repetition times the raw ISA-L call and the codec
/// call back to back (so drift on a noisy machine hits both), and the median
/// of each is reported. Throughput counts the `k · chunk` bytes read.
/// Reconstruction loses the first `m` data chunks (the most work) and the
/// result is checked against the original bytes before anything is timed.
public struct ECBench {
    public var codes: [(k: Int, m: Int)] = [(4, 2), (8, 2), (3, 1)]
    public var chunkBytes = 4 << 20
    public var repetitions = 20

    public init() {}

    public func run(progress: (String) -> Void = { _ in }) throws -> BenchReport {
        var report = BenchReport(section: "ec")
        report.table = [["code", "chunk", "memcpy GB/s", "encode GB/s", "ISA-L enc GB/s", "enc ratio",
                         "reconstruct GB/s", "ISA-L rec GB/s", "rec ratio"]]
        var minEncode = Double.infinity
        var minReconstruct = Double.infinity
        for (k, m) in codes {
            progress("RS(\(k)+\(m)), \(chunkBytes >> 20) MiB chunks, \(repetitions) repetitions")
            let r = try measure(k: k, m: m)
            let tag = "rs\(k)_\(m)"
            report.figure("memcpy_gbps_\(tag)", r.memcpy)
            report.figure("encode_gbps_\(tag)", r.encode)
            report.figure("encode_isal_gbps_\(tag)", r.rawEncode)
            report.figure("reconstruct_gbps_\(tag)", r.reconstruct)
            report.figure("reconstruct_isal_gbps_\(tag)", r.rawReconstruct)
            report.ratio("encode_vs_isal_\(tag)", r.encode / r.rawEncode)
            report.ratio("reconstruct_vs_isal_\(tag)", r.reconstruct / r.rawReconstruct)
            report.ratio("encode_vs_memcpy_\(tag)", r.encode / r.memcpy)
            minEncode = min(minEncode, r.encode / r.rawEncode)
            minReconstruct = min(minReconstruct, r.reconstruct / r.rawReconstruct)
            report.table.append(["RS(\(k)+\(m))", "\(chunkBytes >> 20) MiB",
                                 f(r.memcpy), f(r.encode), f(r.rawEncode), String(format: "%.3f", r.encode / r.rawEncode),
                                 f(r.reconstruct), f(r.rawReconstruct), String(format: "%.3f", r.reconstruct / r.rawReconstruct)])
        }
        report.ratio("encode_vs_isal", minEncode)
        report.ratio("reconstruct_vs_isal", minReconstruct)
        report.notes.append("encode_vs_isal and reconstruct_vs_isal are the lowest ratios over the codes; "
                            + "GB/s counts the k data chunks read, medians of \(repetitions) interleaved repetitions.")
        return report
    }

    struct Result { var memcpy, encode, rawEncode, reconstruct, rawReconstruct: Double }

    func measure(k: Int, m: Int) throws -> Result {
        let n = k + m
        let len = chunkBytes
        let buffer = AlignedBuffer(count: n * len)
        buffer.randomize(seed: UInt64(k * 1000 + m))
        let chunks = (0..<n).map { buffer.slice($0 * len, len) }
        let copyTarget = AlignedBuffer(count: k * len)
        let original = AlignedBuffer(count: n * len)
        let codec = try ReedSolomon(dataCount: k, parityCount: m)
        let missing = Array(0..<m)
        let raw = ISALBaseline(k: k, m: m, chunks: chunks, missing: missing)
        let dataBytes = Double(k * len)

        // Correctness first: codec parity equals raw parity, and reconstruction restores the bytes.
        raw.encode()
        memcpy(original.base, buffer.base, n * len)
        try codec.encode(data: chunks[0..<k].map { UnsafeRawBufferPointer($0) }, parity: Array(chunks[k...]))
        guard memcmp(original.base, buffer.base, n * len) == 0 else {
            throw BenchError(.mismatch, "RS(\(k)+\(m)): codec parity differs from raw ISA-L parity")
        }
        for i in missing { memset(chunks[i].baseAddress!, 0, len) }
        try codec.reconstruct(chunks, missing: missing)
        guard memcmp(original.base, buffer.base, n * len) == 0 else {
            throw BenchError(.mismatch, "RS(\(k)+\(m)): codec reconstruction does not restore the original bytes")
        }
        for i in missing { memset(chunks[i].baseAddress!, 0, len) }
        raw.reconstruct()
        guard memcmp(original.base, buffer.base, n * len) == 0 else {
            throw BenchError(.mismatch, "RS(\(k)+\(m)): raw ISA-L reconstruction does not restore the original bytes")
        }

        var memcpyT: [Double] = [], encT: [Double] = [], rawEncT: [Double] = [], recT: [Double] = [], rawRecT: [Double] = []
        let dataIn = chunks[0..<k].map { UnsafeRawBufferPointer($0) }
        let parityOut = Array(chunks[k...])
        for rep in 0..<repetitions {
            memcpyT.append(timeSeconds { memcpy(copyTarget.base, buffer.base, k * len) })
            // Alternate which goes first, so neither always runs on a warmer cache.
            if rep % 2 == 0 {
                rawEncT.append(timeSeconds { raw.encode() })
                encT.append(try timeSeconds { try codec.encode(data: dataIn, parity: parityOut) })
                rawRecT.append(timeSeconds { raw.reconstruct() })
                recT.append(try timeSeconds { try codec.reconstruct(chunks, missing: missing) })
            } else {
                encT.append(try timeSeconds { try codec.encode(data: dataIn, parity: parityOut) })
                rawEncT.append(timeSeconds { raw.encode() })
                recT.append(try timeSeconds { try codec.reconstruct(chunks, missing: missing) })
                rawRecT.append(timeSeconds { raw.reconstruct() })
            }
        }
        func gbps(_ t: [Double]) -> Double { dataBytes / median(t) / 1e9 }
        return Result(memcpy: gbps(memcpyT), encode: gbps(encT), rawEncode: gbps(rawEncT),
                      reconstruct: gbps(recT), rawReconstruct: gbps(rawRecT))
    }

    private func f(_ v: Double) -> String { String(format: "%.2f", v) }
}

/// Why a benchmark could not produce its figures.
public typealias BenchError = CodedMessage<BenchErrorCode>

public enum BenchErrorCode: String, Sendable {
    /// A job did not start, progress or end in time.
    case timeout
    /// Two results that must be equal differ (parity, a reconstruction, final hashes).
    case mismatch
    /// A job or helper did something the benchmark cannot measure.
    case unexpectedOutcome = "unexpected_outcome"
    /// A file could not be made or read.
    case io
    /// What the benchmark needs is missing here (root for network namespaces, a tool).
    case unavailable
}
