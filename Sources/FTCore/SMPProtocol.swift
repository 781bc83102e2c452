/// Worker-to-SMP messages, carried in a `WireEnvelope` over ZeroMQ (the
/// worker's DEALER to its SMP's workers' ROUTER, `ipc://` in
/// `RUN_DIR/sockets`, where the SMP checks each request's peer; a
/// `fetchSlice` to another node goes to that SMP's data endpoint, beside it,
/// which serves slices and EC frames only).
///
/// Every request gets exactly one reply: its `…Reply` or `.error`. The
/// envelope's `sender` is the worker id. In a worker's request its `epoch`
/// field is a request id, new for each request, that the reply carries back:
/// a reply whose id is not the one awaited (the late answer to a request
/// given up on) is dropped, never taken for the next answer. Between SMPs
/// (EC frames) it is the sender's job epoch. A slice reply carries the bytes of the chunks asked
/// for in a second ZeroMQ frame after the envelope. A worker asks for a
/// replicated tensor's slice a few chunks at a time (`SnapshotEngine.slicePieces`), so
/// that each reply lands in a small receive buffer that the allocator reuses
/// instead of pages faulted in afresh (at 32 MiB per reply, zeroing fresh
/// pages took about 40% of a restore's CPU).
///
///     worker                              SMP
///     register(registration)        ->    registered(slot names, slot bytes, committed step)
///     begin(step)                   ->    beginReply(slot | skip + reason)
///       ... worker copies into the slot, CRC per chunk ...
///     staged(step, slot, crcs)      ->    stagedReply(committed step)
///     restoreQuery(expected step)   ->    restoreReply(step, slot, crcs) | nothing committed
///     roundQuery                    ->    roundReply(committed step, round pending?)
///     fetchSlice(dp rank, tensor,   ->    sliceReply(step, byte range, crcs of those chunks) + [bytes]
///                chunk range)
///     status                        ->    statusReply(text)
///     any malformed or refused      ->    error(code, message)
public enum SMPMessage: Sendable, Equatable {
    case register(WorkerRegistration)
    case registered(slotNames: [String], slotBytes: Int, committedStep: Int?)
    case begin(step: Int)
    case beginReply(slot: Int?, reason: String)
    case staged(step: Int, slot: Int, crcs: [UInt32])
    case stagedReply(committedStep: Int?)
    /// `expected`: the step the coordinator decided (nil: whatever is committed).
    case restoreQuery(expected: Int?)
    case restoreReply(SnapshotStoreInstance.RestorePoint?)
    /// Chunks `chunks` (indexes into the rank's stored slice of `tensor`).
    case fetchSlice(dpRank: Int, dpSize: Int, tensor: String, chunks: Range<Int>)
    case sliceReply(step: Int, range: Range<Int>, crcs: [UInt32])
    case status
    case statusReply(String)
    /// Whether a snapshot round is pending (staged, not committed) on the node.
    case roundQuery
    case roundReply(committedStep: Int?, pending: Bool)
    // SMP to SMP (erasure coding, ARCHITECTURE.md "Planes"): bulk bytes travel in
    // frames of at most `frameBytes` (1-4 MiB by default), each with its own
    // CRC32C, as extra ZeroMQ frames after the envelope (sent zero-copy from
    // slot or parity memory). A frame is folded or decoded as soon as it arrives.
    //
    //     owner of a data chunk               parity holder
    //     ecChunk(offset, length, crc) + [bytes]   ->   (folded; no reply until the chunk is complete)
    //     ...                                      ->   ecAck(error "") once all `length` bytes are folded,
    //                                                   ecAck(error) at once for a refused frame
    //     replacement / repairing node        any holder of the row
    //     ecFetch(offset, length)             ->   ecChunkData(offset, crc, error "") + [bytes]
    //                                              | ecChunkData(offset, 0, error) and no bytes
    /// One frame of data chunk `dataIndex` of `row` for `step`: its bytes at
    /// `offset` of the chunk follow (`length` is the whole chunk's byte count;
    /// bytes past it are zeros and never sent); `crc` is the CRC32C of this frame.
    /// The envelope's epoch is the sender's: a holder in a later epoch refuses
    /// the frame (`fenced`), so a replaced SMP changes no parity (`ECRoundInstance`).
    case ecChunk(step: Int, row: Int, dataIndex: Int, offset: Int, length: Int, crc: UInt32)
    /// The holder folded every frame of the chunk (error empty), or refused one.
    case ecAck(step: Int, row: Int, dataIndex: Int, error: String)
    /// Bytes `offset..<offset+length` of codeword index `index` of `row` for
    /// `step` (data or parity), for a rebuild or a repair (`RebuildInstance`);
    /// `length` at most 64 MiB. Data bytes that fail their CRC at rest are
    /// refused (`corrupt`), never served.
    case ecFetch(step: Int, row: Int, index: Int, offset: Int, length: Int)
    /// The answer to `ecFetch`: the bytes follow (CRC32C `crc` over all of
    /// them), or `error` says why there are none.
    case ecChunkData(step: Int, row: Int, index: Int, offset: Int, crc: UInt32, error: String)
    case error(code: String, message: String)

    public var type: UInt16 {
        switch self {
        case .register: 1
        case .registered: 2
        case .begin: 3
        case .beginReply: 4
        case .staged: 5
        case .stagedReply: 6
        case .restoreQuery: 7
        case .restoreReply: 8
        case .fetchSlice: 9
        case .sliceReply: 10
        case .status: 11
        case .statusReply: 12
        case .roundQuery: 13
        case .roundReply: 14
        case .ecChunk: 21
        case .ecAck: 22
        case .ecFetch: 23
        case .ecChunkData: 24
        case .error: 99
        }
    }

    /// The message's name, for logs ("ecFetch", "restoreQuery", …).
    public var name: String {
        switch self {
        case .register: "register"
        case .registered: "registered"
        case .begin: "begin"
        case .beginReply: "beginReply"
        case .staged: "staged"
        case .stagedReply: "stagedReply"
        case .restoreQuery: "restoreQuery"
        case .restoreReply: "restoreReply"
        case .fetchSlice: "fetchSlice"
        case .sliceReply: "sliceReply"
        case .status: "status"
        case .statusReply: "statusReply"
        case .roundQuery: "roundQuery"
        case .roundReply: "roundReply"
        case .ecChunk: "ecChunk"
        case .ecAck: "ecAck"
        case .ecFetch: "ecFetch"
        case .ecChunkData: "ecChunkData"
        case .error: "error"
        }
    }

    public func envelope(sender: String, epoch: UInt64 = 0) -> WireEnvelope {
        var w = ByteWriter()
        switch self {
        case .register(let r):
            w.string(r.workerID)
            w.i64(Int64(r.dpRank))
            w.i64(Int64(r.dpSize))
            w.i64(Int64(r.chunkBytes))
            w.u32(UInt32(r.specs.count))
            for s in r.specs {
                w.string(s.name)
                w.u8(s.dtype.rawValue)
                w.u8(s.role.rawValue)
                w.bool(s.replicated)
                w.u8(UInt8(s.shape.count))
                for d in s.shape { w.i64(Int64(d)) }
            }
        case .registered(let names, let bytes, let committed):
            w.u32(UInt32(names.count))
            for n in names { w.string(n) }
            w.i64(Int64(bytes))
            w.i64(Int64(committed ?? -1))
        case .begin(let step):
            w.i64(Int64(step))
        case .beginReply(let slot, let reason):
            w.i64(Int64(slot ?? -1))
            w.string(reason)
        case .staged(let step, let slot, let crcs):
            w.i64(Int64(step))
            w.i64(Int64(slot))
            Self.writeCRCs(crcs, &w)
        case .stagedReply(let committed):
            w.i64(Int64(committed ?? -1))
        case .restoreQuery(let expected):
            w.i64(Int64(expected ?? -1))
        case .status, .roundQuery:
            break
        case .roundReply(let committed, let pending):
            w.i64(Int64(committed ?? -1))
            w.bool(pending)
        case .ecChunk(let step, let row, let index, let offset, let length, let crc):
            w.i64(Int64(step)); w.i64(Int64(row)); w.i64(Int64(index)); w.i64(Int64(offset)); w.i64(Int64(length)); w.u32(crc)
        case .ecChunkData(let step, let row, let index, let offset, let crc, let error):
            w.i64(Int64(step)); w.i64(Int64(row)); w.i64(Int64(index)); w.i64(Int64(offset)); w.u32(crc); w.string(error)
        case .ecAck(let step, let row, let index, let error):
            w.i64(Int64(step)); w.i64(Int64(row)); w.i64(Int64(index)); w.string(error)
        case .ecFetch(let step, let row, let index, let offset, let length):
            w.i64(Int64(step)); w.i64(Int64(row)); w.i64(Int64(index)); w.i64(Int64(offset)); w.i64(Int64(length))
        case .restoreReply(let point):
            w.i64(Int64(point?.step ?? -1))
            w.i64(Int64(point?.slot ?? -1))
            Self.writeCRCs(point?.crcs ?? [], &w)
        case .fetchSlice(let rank, let size, let tensor, let chunks):
            w.i64(Int64(rank))
            w.i64(Int64(size))
            w.string(tensor)
            w.i64(Int64(chunks.lowerBound))
            w.i64(Int64(chunks.upperBound))
        case .sliceReply(let step, let range, let crcs):
            w.i64(Int64(step))
            w.i64(Int64(range.lowerBound))
            w.i64(Int64(range.upperBound))
            Self.writeCRCs(crcs, &w)
        case .statusReply(let text):
            w.string(text)
        case .error(let code, let message):
            w.string(code)
            w.string(message)
        }
        return WireEnvelope(type: type, epoch: epoch, sender: sender, payload: w.buffer)
    }

    public init(_ envelope: WireEnvelope) throws(WireError) {
        var r = ByteReader(envelope.payload)
        switch envelope.type {
        case 1:
            let id = try r.string(field: "worker id", max: 255)
            let rank = try Self.int(&r, "dp rank", max: WireLimits.maxDPSize - 1)
            let size = try WireLimits.check(try Self.int(&r, "dp size"), 1...WireLimits.maxDPSize, "dp size")
            let chunk = try Self.int(&r, "chunk bytes", max: WireLimits.maxBytes)
            let count = Int(try r.u32(field: "tensor count"))
            guard count <= WireLimits.maxTensors else { throw WireError(.badLength, "tensor count \(count) exceeds \(WireLimits.maxTensors)") }
            var specs: [TensorSpec] = []
            for _ in 0..<count {
                let name = try r.string(field: "tensor name", max: 255)
                let rawType = try r.u8(field: "dtype")
                guard let dtype = DType(rawValue: rawType) else { throw WireError(.badValue, "dtype \(rawType) of '\(name)'") }
                let rawRole = try r.u8(field: "role")
                guard let role = TensorRole(rawValue: rawRole) else { throw WireError(.badValue, "role \(rawRole) of '\(name)'") }
                let replicated = try r.bool(field: "replicated")
                let dims = try WireLimits.check(Int(try r.u8(field: "rank")), 0...WireLimits.maxDimensions, "dimensions of '\(name)'")
                var shape: [Int] = []
                for _ in 0..<dims { shape.append(try Self.int(&r, "dimension")) }
                let spec = TensorSpec(name: name, dtype: dtype, shape: shape, role: role, replicated: replicated)
                guard let bytes = spec.checkedByteCount, bytes <= WireLimits.maxTensorBytes else {
                    throw WireError(.outOfRange, "tensor '\(name)' of shape \(shape) × \(dtype.size) bytes exceeds \(WireLimits.maxTensorBytes) bytes")
                }
                specs.append(spec)
            }
            self = .register(WorkerRegistration(workerID: id, dpRank: rank, dpSize: size, chunkBytes: chunk, specs: specs))
        case 2:
            let n = Int(try r.u32(field: "slot count"))
            guard n <= 16 else { throw WireError(.badLength, "slot count \(n)") }
            var names: [String] = []
            for _ in 0..<n { names.append(try r.string(field: "slot name", max: 255)) }
            let bytes = try Self.int(&r, "slot bytes", max: WireLimits.maxBytes)
            self = .registered(slotNames: names, slotBytes: bytes, committedStep: try Self.optionalStep(&r, "committed step"))
        case 3:
            self = .begin(step: try Self.step(&r, "step"))
        case 4:
            let slot = try Self.optionalInt(&r, "slot", max: 1)
            self = .beginReply(slot: slot, reason: try r.string(field: "reason"))
        case 5:
            let step = try Self.step(&r, "step")
            let slot = try Self.int(&r, "slot", max: 1)
            self = .staged(step: step, slot: slot, crcs: try Self.readCRCs(&r))
        case 6:
            self = .stagedReply(committedStep: try Self.optionalStep(&r, "committed step"))
        case 7:
            self = .restoreQuery(expected: try Self.optionalStep(&r, "expected step"))
        case 8:
            let step = try Self.optionalStep(&r, "step")
            let slot = try Self.optionalInt(&r, "slot", max: 1)
            let crcs = try Self.readCRCs(&r)
            if let step, let slot {
                self = .restoreReply(.init(step: step, slot: slot, crcs: crcs))
            } else {
                self = .restoreReply(nil)
            }
        case 9:
            let rank = try Self.int(&r, "dp rank", max: WireLimits.maxDPSize - 1)
            let size = try WireLimits.check(try Self.int(&r, "dp size"), 1...WireLimits.maxDPSize, "dp size")
            let tensor = try r.string(field: "tensor", max: 255)
            let first = try Self.int(&r, "first chunk", max: WireLimits.maxTensorBytes)
            let end = try Self.int(&r, "chunk end", max: WireLimits.maxTensorBytes)
            guard first <= end else { throw WireError(.badValue, "chunk range \(first)..<\(end)") }
            self = .fetchSlice(dpRank: rank, dpSize: size, tensor: tensor, chunks: first..<end)
        case 10:
            let step = try Self.step(&r, "step")
            let lo = try Self.int(&r, "range start", max: WireLimits.maxTensorBytes)
            let hi = try Self.int(&r, "range end", max: WireLimits.maxTensorBytes)
            guard lo <= hi else { throw WireError(.badValue, "slice range \(lo)..<\(hi)") }
            self = .sliceReply(step: step, range: lo..<hi, crcs: try Self.readCRCs(&r))
        case 11:
            self = .status
        case 12:
            self = .statusReply(try r.string(field: "status", max: 1 << 20))
        case 13:
            self = .roundQuery
        case 14:
            let committed = try Self.optionalStep(&r, "committed step")
            self = .roundReply(committedStep: committed, pending: try r.bool(field: "pending"))
        case 21, 22, 23, 24:
            let step = try Self.step(&r, "step")
            let row = try Self.int(&r, "row", max: WireLimits.maxGroupNodes - 1)
            let index = try Self.int(&r, "index", max: WireLimits.maxGroupNodes - 1)
            switch envelope.type {
            case 21:
                let offset = try Self.int(&r, "offset", max: WireLimits.maxBytes)
                let length = try Self.int(&r, "length", max: WireLimits.maxBytes)
                self = .ecChunk(step: step, row: row, dataIndex: index, offset: offset, length: length, crc: try r.u32(field: "crc"))
            case 22: self = .ecAck(step: step, row: row, dataIndex: index, error: try r.string(field: "error"))
            case 23:
                let offset = try Self.int(&r, "offset", max: WireLimits.maxBytes)
                let length = try Self.int(&r, "length")
                guard length <= 64 << 20 else { throw WireError(.badLength, "fetch of \(length) bytes exceeds 64 MiB") }
                self = .ecFetch(step: step, row: row, index: index, offset: offset, length: length)
            default:
                let offset = try Self.int(&r, "offset", max: WireLimits.maxBytes)
                let crc = try r.u32(field: "crc")
                self = .ecChunkData(step: step, row: row, index: index, offset: offset, crc: crc, error: try r.string(field: "error"))
            }
        case 99:
            let code = try r.string(field: "code", max: 255)
            self = .error(code: code, message: try r.string(field: "message", max: 1 << 16))
        default:
            throw WireError(.unknownType, "message type \(envelope.type) is not an SMP message")
        }
        guard r.remaining == 0 else { throw WireError(.trailingBytes, "\(r.remaining) bytes after SMP message \(envelope.type)") }
    }

    public static func decode(_ frame: [UInt8]) throws(WireError) -> (SMPMessage, WireEnvelope) {
        let envelope = try WireEnvelope(decoding: frame)
        return (try SMPMessage(envelope), envelope)
    }

    private static func writeCRCs(_ crcs: [UInt32], _ w: inout ByteWriter) {
        w.u32(UInt32(crcs.count))
        for c in crcs { w.u32(c) }
    }

    private static func readCRCs(_ r: inout ByteReader) throws(WireError) -> [UInt32] {
        let n = Int(try r.u32(field: "crc count"))
        guard n * 4 <= r.remaining else { throw WireError(.truncated, "\(n) CRCs announced, \(r.remaining) bytes left") }
        var out: [UInt32] = []
        out.reserveCapacity(n)
        for _ in 0..<n { out.append(try r.u32(field: "crc")) }
        return out
    }

    /// A non-negative integer, at most `max` (`out_of_range` beyond).
    private static func int(_ r: inout ByteReader, _ field: String, max: Int = Int(Int64.max)) throws(WireError) -> Int {
        let v = try r.i64(field: field)
        guard v >= 0 else { throw WireError(.badValue, "\(field) is negative (\(v))") }
        return try WireLimits.check(Int(v), 0...max, field)
    }

    /// -1 for none, else a non-negative integer at most `max`.
    private static func optionalInt(_ r: inout ByteReader, _ field: String, max: Int = Int(Int64.max)) throws(WireError) -> Int? {
        let v = try r.i64(field: field)
        guard v >= -1 else { throw WireError(.badValue, "\(field) is \(v)") }
        return v == -1 ? nil : try WireLimits.check(Int(v), 0...max, field)
    }

    private static func step(_ r: inout ByteReader, _ field: String) throws(WireError) -> Int {
        try int(&r, field, max: WireLimits.maxStep)
    }

    private static func optionalStep(_ r: inout ByteReader, _ field: String) throws(WireError) -> Int? {
        try optionalInt(&r, field, max: WireLimits.maxStep)
    }
}
