import FTCore
import FTErasure

/// A deterministic toy training state for tests of the snapshot path: two
/// replicated tensors (parameters and optimizer moments, identical on every
/// data-parallel rank), a per-rank RNG state and a step counter. Each step
/// rewrites every byte, so a restored state that is off by one step, torn or
/// mixed shows in the hash. Not a model: the demo trainer is.
public final class ToyModel: @unchecked Sendable {
    public let elements: Int
    public let dpRank: Int
    public let params: UnsafeMutableRawBufferPointer
    public let moments: UnsafeMutableRawBufferPointer
    public let rng: UnsafeMutableRawBufferPointer
    public let meta: UnsafeMutableRawBufferPointer

    /// Whether parameters and moments are registered as replicated (DP-sliced).
    public let replicated: Bool

    /// `initialized: false` leaves the tensors unwritten (their values
    /// undefined) until `reset()` or a restore: a worker under a coordinator
    /// is told which before it trains, and a replacement that restores 256 MiB
    /// must not first spend a second writing a state it overwrites.
    public init(elements: Int, dpRank: Int, replicated: Bool = true, initialized: Bool = true) {
        self.elements = elements
        self.dpRank = dpRank
        self.replicated = replicated
        params = .allocate(byteCount: elements * 4, alignment: 64)
        moments = .allocate(byteCount: elements * 4, alignment: 64)
        rng = .allocate(byteCount: 8, alignment: 8)
        meta = .allocate(byteCount: 8, alignment: 8)
        if initialized {
            reset()
        } else {
            rng.storeBytes(of: 0, as: UInt64.self)
            meta.storeBytes(of: 0, as: Int64.self)
        }
    }

    /// Back to the initial state (step 0).
    public func reset() {
        let p = params.bindMemory(to: UInt32.self)
        let m = moments.bindMemory(to: UInt32.self)
        for i in 0..<elements {
            p[i] = UInt32(truncatingIfNeeded: i &* 2_654_435_761)
            m[i] = 0
        }
        rng.storeBytes(of: 0x9E37_79B9_7F4A_7C15 &* UInt64(dpRank + 1), as: UInt64.self)
        meta.storeBytes(of: 0, as: Int64.self)
    }

    deinit {
        params.deallocate()
        moments.deallocate()
        rng.deallocate()
        meta.deallocate()
    }

    /// The tensors as the worker library registers them.
    public var tensors: [(TensorSpec, UnsafeMutableRawBufferPointer)] {
        [
            (TensorSpec(name: "params", dtype: .u8, shape: [elements * 4], role: .param, replicated: replicated), params),
            (TensorSpec(name: "moments", dtype: .u8, shape: [elements * 4], role: .optimizer, replicated: replicated), moments),
            (TensorSpec(name: "rng", dtype: .u8, shape: [8], role: .rng, replicated: false), rng),
            (TensorSpec(name: "meta", dtype: .i64, shape: [1], role: .meta, replicated: false), meta),
        ]
    }

    public var step: Int { Int(meta.load(as: Int64.self)) }

    /// The optimizer update of step `s` (must be `step + 1`).
    public func apply(step s: Int) {
        precondition(s == step + 1, "toy step \(s) after \(step)")
        let p = params.baseAddress!.assumingMemoryBound(to: UInt32.self)
        let m = moments.baseAddress!.assumingMemoryBound(to: UInt32.self)
        let salt = UInt32(truncatingIfNeeded: s &* 40503)
        for i in 0..<elements {
            let v = p[i] &* 1_664_525 &+ 1_013_904_223 &+ salt
            p[i] = v
            m[i] = (m[i] >> 1) ^ v
        }
        var r = rng.load(as: UInt64.self)
        r ^= r << 13; r ^= r >> 7; r ^= r << 17
        rng.storeBytes(of: r, as: UInt64.self)
        meta.storeBytes(of: Int64(s), as: Int64.self)
    }

    /// A digest of the whole state: CRC32C of each tensor.
    public var hash: String {
        [params, moments, rng, meta].map { buf in
            let s = String(CRC32C.checksum(UnsafeRawBufferPointer(buf)), radix: 16)
            return String(repeating: "0", count: 8 - s.count) + s
        }.joined(separator: "-")
    }
}
