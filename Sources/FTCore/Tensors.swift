/// Element types of registered tensors.
public enum DType: UInt8, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    case f32 = 1, f16, bf16, f64, i32, i64, u8

    public var size: Int {
        switch self {
        case .u8: 1
        case .f16, .bf16: 2
        case .f32, .i32: 4
        case .f64, .i64: 8
        }
    }

    public var description: String {
        switch self {
        case .f32: "f32"
        case .f16: "f16"
        case .bf16: "bf16"
        case .f64: "f64"
        case .i32: "i32"
        case .i64: "i64"
        case .u8: "u8"
        }
    }
}

/// What a tensor is to the trainer; recovery restores all of them alike.
public enum TensorRole: UInt8, Sendable, Hashable, CustomStringConvertible {
    case param = 1, optimizer, rng, meta

    public var description: String {
        switch self {
        case .param: "param"
        case .optimizer: "optimizer"
        case .rng: "rng"
        case .meta: "meta"
        }
    }
}

/// One named buffer a worker registers for snapshots.
///
/// A `replicated` tensor holds the same bytes on every rank of the worker's
/// data-parallel group, so each rank snapshots only its slice `r/D` of it and
/// restore gathers the other slices from the ranks that hold them.
public struct TensorSpec: Sendable, Hashable {
    public var name: String
    public var dtype: DType
    public var shape: [Int]
    public var role: TensorRole
    public var replicated: Bool

    public init(name: String, dtype: DType, shape: [Int], role: TensorRole, replicated: Bool) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.role = role
        self.replicated = replicated
    }

    /// The element count; call only on a validated spec (`checkedByteCount` is not nil).
    public var elementCount: Int { shape.reduce(1, *) }
    public var byteCount: Int { elementCount * dtype.size }

    /// The byte count, or nil when a dimension is negative or the element
    /// count or byte count overflows `Int` (a crafted registration).
    public var checkedByteCount: Int? {
        Checked.product(shape).flatMap { Checked.product($0, dtype.size) }
    }
}

/// Where each tensor's snapshotted bytes sit in a worker's slot, and how they
/// are cut into CRC-checked chunks. A pure function of the registration, the
/// rank's place in its data-parallel group and the chunk size, so every rank
/// computes every other rank's layout identically.
///
/// A replicated tensor of `e` elements is split on element boundaries: rank
/// `r` of `D` holds elements `r·e/D ..< (r+1)·e/D`. Each tensor's stored bytes
/// start at a 64-byte aligned slot offset and are cut into chunks of
/// `chunkBytes` (the last may be shorter); a CRC32C covers each chunk.
public struct ShardLayout: Sendable, Equatable {
    public struct Entry: Sendable, Equatable {
        public var spec: TensorSpec
        /// The byte range of the full tensor that this rank stores.
        public var storedRange: Range<Int>
        /// Where those bytes start in the slot.
        public var slotOffset: Int
        /// Index of this tensor's first chunk in the slot's chunk list.
        public var firstChunk: Int
        public var chunkCount: Int
        public var storedBytes: Int { storedRange.count }
    }

    public static let defaultChunkBytes = 1 << 20
    public static let alignment = 64

    public let entries: [Entry]
    public let dpRank: Int
    public let dpSize: Int
    public let chunkBytes: Int
    /// Bytes a slot needs.
    public let slotBytes: Int
    /// Total chunks (and CRCs) per snapshot.
    public let chunkCount: Int

    public init(specs: [TensorSpec], dpRank: Int, dpSize: Int, chunkBytes: Int = ShardLayout.defaultChunkBytes) {
        precondition(dpSize >= 1 && (0..<dpSize).contains(dpRank) && chunkBytes > 0)
        var entries: [Entry] = []
        var offset = 0
        var chunks = 0
        for spec in specs {
            let range = Self.storedRange(of: spec, dpRank: dpRank, dpSize: dpSize)
            let n = range.isEmpty ? 0 : (range.count + chunkBytes - 1) / chunkBytes
            entries.append(Entry(spec: spec, storedRange: range, slotOffset: offset, firstChunk: chunks, chunkCount: n))
            offset += (range.count + Self.alignment - 1) / Self.alignment * Self.alignment
            chunks += n
        }
        self.entries = entries
        self.dpRank = dpRank
        self.dpSize = dpSize
        self.chunkBytes = chunkBytes
        self.slotBytes = offset
        self.chunkCount = chunks
    }

    /// The byte range of `spec` that rank `dpRank` of `dpSize` stores.
    public static func storedRange(of spec: TensorSpec, dpRank: Int, dpSize: Int) -> Range<Int> {
        guard spec.replicated else { return 0..<spec.byteCount }
        let e = spec.elementCount
        let lo = rankBoundary(e, dpRank, dpSize)
        let hi = rankBoundary(e, dpRank + 1, dpSize)
        return lo * spec.dtype.size..<hi * spec.dtype.size
    }

    private static func rankBoundary(_ elements: Int, _ rank: Int, _ size: Int) -> Int {
        // Int multiplication first: exact, and `elements * rank` fits for any real tensor.
        elements * rank / size
    }

    public func entry(named name: String) -> Entry? { entries.first { $0.spec.name == name } }

    /// The byte range, within the tensor's stored bytes, of its chunk `i`.
    public func chunkRange(_ entry: Entry, chunk i: Int) -> Range<Int> {
        let lo = i * chunkBytes
        return lo..<min(lo + chunkBytes, entry.storedBytes)
    }
}
