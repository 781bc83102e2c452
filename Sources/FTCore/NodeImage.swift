/// A node's snapshot as erasure coding sees it (ARCHITECTURE.md, "Erasure
/// coding across nodes"): a manifest (what the node's workers registered, and
/// each slot's chunk CRCs for the step) followed by every worker's slot for
/// that step, in worker order — one virtual buffer of `NodeImageLayout.total`
/// bytes, cut into the group's `k` chunks of `chunkBytes` (zeros past the
/// end). Rebuilding a lost node gives back this buffer; its manifest says how
/// to turn it back into workers' slots.
///
/// Manifest bytes: u32 body length, then the body: magic "FTNI", i64 step,
/// u32 entry count, and per entry the worker's `register` payload (a blob),
/// i64 slot bytes, u32 CRC count and the CRCs (all little-endian).
public struct NodeImage: Sendable, Equatable {
    public struct Entry: Sendable, Equatable {
        public var registration: WorkerRegistration
        public var slotBytes: Int
        public var crcs: [UInt32]

        public init(registration: WorkerRegistration, slotBytes: Int, crcs: [UInt32]) {
            self.registration = registration
            self.slotBytes = slotBytes
            self.crcs = crcs
        }
    }

    public static let magic: UInt32 = 0x4654_4E49  // "FTNI"

    public var step: Int
    public var entries: [Entry]

    public init(step: Int, entries: [Entry]) {
        self.step = step
        self.entries = entries
    }

    public func manifest() -> [UInt8] {
        var w = ByteWriter()
        w.u32(Self.magic)
        w.i64(Int64(step))
        w.u32(UInt32(entries.count))
        for e in entries {
            w.blob(SMPMessage.register(e.registration).envelope(sender: "").payload)
            w.i64(Int64(e.slotBytes))
            w.u32(UInt32(e.crcs.count))
            for c in e.crcs { w.u32(c) }
        }
        let body = w.buffer
        var out = ByteWriter()
        out.u32(UInt32(body.count))
        out.bytes(body)
        return out.buffer
    }

    /// Where this image's bytes lie (manifest, then each entry's slot).
    public var layout: NodeImageLayout {
        NodeImageLayout(manifestBytes: manifest().count, slotBytes: entries.map(\.slotBytes))
    }

    /// The manifest's length without building the CRC values (they are fixed size).
    public static func manifestSize(_ entries: [(WorkerRegistration, Int, Int)]) -> Int {
        NodeImage(step: 0, entries: entries.map { Entry(registration: $0.0, slotBytes: $0.1, crcs: Array(repeating: 0, count: $0.2)) })
            .manifest().count
    }

    /// The manifest's total length (its u32 length prefix included), read
    /// from the image's first four bytes.
    public static func manifestLength(prefix: some Collection<UInt8>) throws(StoreError) -> Int {
        guard prefix.count >= 4 else { throw StoreError(.corrupt, "rebuilt image too short") }
        let b = Array(prefix.prefix(4))
        return (Int(b[0]) | Int(b[1]) << 8 | Int(b[2]) << 16 | Int(b[3]) << 24) + 4
    }

    public static func parse(_ bytes: some Collection<UInt8>) throws(StoreError) -> NodeImage {
        let length = try manifestLength(prefix: bytes) - 4
        guard length + 4 <= bytes.count else { throw StoreError(.corrupt, "rebuilt manifest length \(length) exceeds the image") }
        var r = ByteReader(Array(bytes.dropFirst(4).prefix(length)))
        do {
            guard try r.u32(field: "magic") == magic else { throw StoreError(.corrupt, "rebuilt image has no manifest (bad magic)") }
            let step = Int(try r.i64(field: "step"))
            guard (0...WireLimits.maxStep).contains(step) else { throw StoreError(.corrupt, "rebuilt manifest names step \(step)") }
            let count = Int(try r.u32(field: "entries"))
            var entries: [Entry] = []
            for _ in 0..<count {
                let payload = try r.blob(field: "registration")
                guard case .register(let reg) = try SMPMessage(WireEnvelope(type: 1, epoch: 0, sender: "", payload: payload)) else {
                    throw StoreError(.corrupt, "bad registration in the manifest")
                }
                let slotBytes = Int(try r.i64(field: "slot bytes"))
                guard (0...WireLimits.maxBytes).contains(slotBytes) else { throw StoreError(.corrupt, "rebuilt manifest: slot of \(slotBytes) bytes") }
                let n = Int(try r.u32(field: "crc count"))
                guard n <= length / 4 else { throw StoreError(.corrupt, "rebuilt manifest: \(n) CRCs in \(length) bytes") }
                var crcs: [UInt32] = []
                for _ in 0..<n { crcs.append(try r.u32(field: "crc")) }
                entries.append(Entry(registration: reg, slotBytes: slotBytes, crcs: crcs))
            }
            return NodeImage(step: step, entries: entries)
        } catch let error as StoreError {
            throw error
        } catch {
            throw StoreError(.corrupt, "rebuilt manifest: \(error)")
        }
    }
}

/// Where the bytes of a node image lie: `manifestBytes` of manifest, then
/// each worker's slot in image order. Pure arithmetic over byte ranges, for
/// the shell that moves the bytes (zero-copy pieces to send, destinations to
/// decode into) and for the cores that plan frames.
public struct NodeImageLayout: Sendable, Equatable {
    /// A contiguous piece of an image range: `count` bytes at `offset` of its source.
    public struct Piece: Sendable, Equatable {
        public enum Source: Sendable, Equatable {
            case manifest
            /// The slot of the worker at this position of the image's entries.
            case slot(Int)
        }
        public var source: Source
        public var offset: Int
        public var count: Int
        /// Where the piece starts in the image.
        public var imageOffset: Int
    }

    public var manifestBytes: Int
    public var slotBytes: [Int]

    public init(manifestBytes: Int, slotBytes: [Int]) {
        self.manifestBytes = manifestBytes
        self.slotBytes = slotBytes
    }

    public var total: Int { manifestBytes + slotBytes.reduce(0, +) }

    /// Where the slot of entry `i` starts in the image.
    public func slotStart(_ i: Int) -> Int { manifestBytes + slotBytes.prefix(i).reduce(0, +) }

    /// The pieces of image bytes `range` (clipped to the image), in order.
    public func pieces(_ range: Range<Int>) -> [Piece] {
        var out: [Piece] = []
        var start = 0
        func take(_ source: Piece.Source, _ count: Int) {
            let lo = max(range.lowerBound, start), hi = min(range.upperBound, start + count)
            if lo < hi { out.append(Piece(source: source, offset: lo - start, count: hi - lo, imageOffset: lo)) }
            start += count
        }
        take(.manifest, manifestBytes)
        for (i, b) in slotBytes.enumerated() { take(.slot(i), b) }
        return out
    }

    /// The image bytes of data chunk `c` of `chunkBytes` (empty past the image's end).
    public func chunkRange(_ c: Int, chunkBytes: Int) -> Range<Int> {
        let lo = min(total, c * chunkBytes)
        return lo..<min(total, (c + 1) * chunkBytes)
    }

    /// Bytes `range` of entry `i`'s slot as ranges of (data chunk index,
    /// offset within that chunk), for a repair of a slot's bytes.
    public func chunkRanges(slot i: Int, range: Range<Int>, chunkBytes: Int) -> [(chunk: Int, range: Range<Int>)] {
        let base = slotStart(i)
        let lo = base + range.lowerBound, hi = base + range.upperBound
        guard lo < hi else { return [] }
        return (lo / chunkBytes...(hi - 1) / chunkBytes).map { c in
            (c, (max(lo, c * chunkBytes) - c * chunkBytes)..<(min(hi, (c + 1) * chunkBytes) - c * chunkBytes))
        }
    }
}
