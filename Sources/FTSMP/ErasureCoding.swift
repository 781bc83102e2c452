import FTControl
import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation
import Synchronization

/// A node's snapshot as erasure coding sees it: a manifest (what the node's
/// workers registered, and each slot's chunk CRCs for the step) followed by
/// every worker's slot for that step, in worker order — one virtual buffer of
/// `count` bytes, cut into the group's `k` chunks of `chunkBytes` (zeros past
/// the end). Rebuilding a lost node gives back this buffer; its manifest says
/// how to turn it back into workers' slots.
struct NodeImage {
    struct Entry {
        var registration: WorkerRegistration
        var slotBytes: Int
        var crcs: [UInt32]
    }

    static let magic: UInt32 = 0x4654_4E49  // "FTNI"

    var step: Int
    var entries: [Entry]

    func manifest() -> [UInt8] {
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

    /// The manifest's length without building the CRC values (they are fixed size).
    static func manifestSize(_ entries: [(WorkerRegistration, Int, Int)]) -> Int {
        NodeImage(step: 0, entries: entries.map { Entry(registration: $0.0, slotBytes: $0.1, crcs: Array(repeating: 0, count: $0.2)) })
            .manifest().count
    }

    static func parse(_ bytes: UnsafeRawBufferPointer) throws -> NodeImage {
        guard bytes.count >= 4 else { throw SMPError("rebuilt image too short") }
        let length = Int(bytes.load(as: UInt32.self).littleEndian)
        guard length + 4 <= bytes.count else { throw SMPError("rebuilt manifest length \(length) exceeds the image") }
        var r = ByteReader(Array(bytes[4..<4 + length]))
        guard try r.u32(field: "magic") == magic else { throw SMPError("rebuilt image has no manifest (bad magic)") }
        let step = Int(try r.i64(field: "step"))
        guard (0...WireLimits.maxStep).contains(step) else { throw SMPError("rebuilt manifest names step \(step)") }
        let count = Int(try r.u32(field: "entries"))
        var entries: [Entry] = []
        for _ in 0..<count {
            let payload = try r.blob(field: "registration")
            guard case .register(let reg) = try SMPMessage(WireEnvelope(type: 1, epoch: 0, sender: "", payload: payload)) else {
                throw SMPError("bad registration in the manifest")
            }
            let slotBytes = Int(try r.i64(field: "slot bytes"))
            guard (0...WireLimits.maxBytes).contains(slotBytes) else { throw SMPError("rebuilt manifest: slot of \(slotBytes) bytes") }
            let n = Int(try r.u32(field: "crc count"))
            var crcs: [UInt32] = []
            for _ in 0..<n { crcs.append(try r.u32(field: "crc")) }
            entries.append(Entry(registration: reg, slotBytes: slotBytes, crcs: crcs))
        }
        return NodeImage(step: step, entries: entries)
    }
}

/// Erasure-coding state of one SMP (ARCHITECTURE.md, "Erasure coding across nodes"):
/// parity it holds for other nodes (by step), and the round it is protecting.
final class ErasureState {
    var layout: ECLayout
    let group: Int
    let position: Int
    let codec: ReedSolomon
    var placement: ParityPlacement { layout.placement }
    var members: [String] { layout.groups[group] }
    var chunkBytes: Int { layout.chunkBytes }

    /// Parity chunks held, per step: row -> (parity index, bytes).
    var parity: [Int: [Int: (index: Int, bytes: UnsafeMutableRawBufferPointer)]] = [:]
    /// Data indexes folded so far, per step and row.
    var folded: [Int: [Int: Set<Int>]] = [:]
    /// The round being protected: step, its image pieces, acks still missing.
    var outgoing: (step: Int, manifest: [UInt8], pending: Set<String>)?
    var peers: [String: ZMQSocket] = [:]
    static let noLayout = "no EC layout"
    /// When to send the outgoing round again (a holder had no layout yet).
    var resendAt: Double?
    /// When each round started protecting (for the staged-to-committed time).
    var stagedAt: [Int: Double] = [:]
    /// Bytes folded and seconds spent folding, per step.
    var foldStats: [Int: (bytes: Int, seconds: Double)] = [:]
    /// Frames folded so far of chunks not yet complete: (step, row, data index) -> offsets and bytes.
    var partial: [ChunkKey: (offsets: Set<Int>, bytes: Int)] = [:]
    /// The rebuild in progress on a replacement node.
    var rebuilding: RebuildJob?

    struct ChunkKey: Hashable {
        var step: Int
        var row: Int
        var index: Int
    }

    /// Bytes per frame of a bulk transfer (ARCHITECTURE.md: 1-4 MiB). `FT_EC_FRAME_BYTES`
    /// overrides it (4 KiB...64 MiB), so tests can spread a small image over many frames.
    static let frameBytes: Int = {
        guard let v = ProcessInfo.processInfo.environment["FT_EC_FRAME_BYTES"].flatMap(Int.init) else { return 4 << 20 }
        return min(max(v, 4096), 64 << 20)
    }()
    /// Frames of a rebuild in flight at once (each asks k survivors): about 32 MiB, 2...16 frames.
    static var rebuildWindow: Int { min(16, max(2, (32 << 20) / frameBytes)) }
    /// How long a rebuild waits for one frame from one survivor before asking another.
    static let fetchTimeout = 5.0

    init(layout: ECLayout, node: String) throws {
        guard let (g, p) = layout.locate(node) else { throw SMPError("node \(node) is in no EC group of the layout") }
        self.layout = layout
        group = g
        position = p
        codec = try ReedSolomon(dataCount: layout.k, parityCount: layout.m)
        // Received frames are malloc'd by libzmq (4 MiB each): keep such blocks
        // off mmap and untrimmed, so they are reused rather than faulted in anew
        // for every frame (page faults cost more than the fold).
        _ = keepFreedBlocks(below: 32 << 20, trimAbove: 512 << 20)
    }

    deinit {
        for (_, rows) in parity { for (_, p) in rows { p.bytes.deallocate() } }
        for b in spareParity { b.deallocate() }
        for s in peers.values { s.close() }
    }

    var parityBytesHeld: Int { parity.values.reduce(0) { $0 + $1.count * chunkBytes } }

    /// Parity buffers of dropped steps, kept (faulted in) for the next rounds.
    var spareParity: [UnsafeMutableRawBufferPointer] = []

    /// The parity buffer of `row` for `step`, on first use taken from the
    /// spares or allocated, and zeroed in 8 MiB pieces with `between` called
    /// after each (first-touched memory can fault in at tens of MB/s on a
    /// loaded VM: a gigabyte node's chunk takes seconds).
    func parityBuffer(step: Int, row: Int, between: () -> Void = {}) -> UnsafeMutableRawBufferPointer? {
        guard let index = placement.parityHolders(row: row).firstIndex(of: position) else { return nil }
        if let existing = parity[step]?[row] { return existing.bytes }
        let b = spareParity.popLast() ?? UnsafeMutableRawBufferPointer.allocate(byteCount: chunkBytes, alignment: 64)
        var done = 0
        while done < chunkBytes {
            let n = min(8 << 20, chunkBytes - done)
            memset(b.baseAddress! + done, 0, n)
            done += n
            between()
        }
        parity[step, default: [:]][row] = (index, b)
        return b
    }

    /// Steps parity is held for at once: the committed step's (what a rebuild
    /// decodes from), the round in flight, and the next one, whose chunks can
    /// come from a peer that saw the commit before this node did (this node
    /// processes its peers' frames before the coordinator's commit in a loop
    /// turn). A fourth cannot come: the round after next needs this node's
    /// own `protected` of the next, so it processed that commit first.
    static let maxParitySteps = 3

    /// Whether a peer's chunk for `step` may allocate parity (`ParitySteps`):
    /// returns the step whose parity was dropped to make room, if any.
    func admitPeerStep(_ step: Int) throws(StoreError) -> Int? {
        guard case .replace(let highest) = try ParitySteps.admit(step, held: parity.keys, limit: Self.maxParitySteps) else { return nil }
        dropParity { $0 == highest }
        return highest
    }

    /// Whether every parity chunk this node holds for `step` has all k data chunks folded in.
    func parityComplete(step: Int) -> Bool {
        placement.parityRows(of: position).allSatisfy { folded[step]?[$0.row]?.count == layout.k }
    }

    /// A layout with other data endpoints: only the peers whose endpoint changed
    /// get a new socket, and a rebuild asks again what it had asked of them
    /// (their answers would go to the closed socket).
    func updateEndpoints(_ new: ECLayout) {
        for (node, socket) in peers where new.endpoints[node] != layout.endpoints[node] {
            socket.close()
            peers[node] = nil
            if let job = rebuilding {
                for key in Array(job.inFlight.keys) { job.inFlight[key]!.requested = job.inFlight[key]!.requested.filter { $0.value.node != node } }
            }
        }
        layout = new
    }

    /// Drops parity of the steps `keep` rejects.
    func dropParity(where reject: (Int) -> Bool) {
        for step in parity.keys where reject(step) {
            for (_, p) in parity[step]! {
                // Up to m spares: one round's worth. Safe to reuse: parity is never sent
                // zero-copy outside a recovery, when no step is dropped.
                if spareParity.count < layout.m { spareParity.append(p.bytes) } else { p.bytes.deallocate() }
            }
            parity[step] = nil
            folded[step] = nil
        }
        partial = partial.filter { !reject($0.key.step) }
        if let o = outgoing, reject(o.step) { outgoing = nil }
    }
}


/// Zero-copy frames handed to libzmq and not yet released by it: slot and
/// parity memory must not be unmapped or freed while this is above zero.
enum ZeroCopyFrames {
    static let outstanding = Atomic<Int>(0)

    /// A frame over `bytes`, counted until libzmq releases it.
    static func frame(_ bytes: UnsafeRawBufferPointer) -> ZMQFrame {
        outstanding.add(1, ordering: .relaxed)
        return .noCopy(bytes, release: { outstanding.subtract(1, ordering: .releasing) })
    }
}

/// A replacement node's rebuild from its group (ARCHITECTURE.md, "Recovery", step 3),
/// driven by the SMP's event loop so heartbeats and the coordinator's messages
/// keep flowing while frames are in flight.
///
/// The job is cut into tasks, one frame (`ErasureState.frameBytes`) of one row
/// each: ask k surviving holders of the row for the frame's byte range, decode
/// it as soon as k answers are in, straight into its destination (a rebuilt
/// slot, or this node's parity buffer), and drop the received frames. At most
/// `ErasureState.rebuildWindow` tasks are in flight. A survivor that does not
/// answer within `ErasureState.fetchTimeout`, or answers with an error or a
/// bad CRC, is not asked again; the frame goes to another survivor, or the
/// rebuild fails with the reason.
///
/// Two phases: `.manifest` decodes the first bytes of this node's image (the
/// manifest says which workers and slots to create), `.body` everything else.
final class RebuildJob {
    enum Phase { case manifest, body }
    enum Destination {
        /// The image's first bytes (`prefix`), to read the manifest.
        case prefix
        /// The image from this byte offset on, scattered over the rebuilt slots.
        case image(Int)
        /// This node's parity buffer of a row.
        case parity(row: Int)
    }
    struct Key: Hashable {
        var row: Int
        var offset: Int
    }
    struct Task {
        var row: Int
        var offset: Int
        var length: Int
        var destination: Destination
        /// Outstanding requests: codeword index -> (node, deadline).
        var requested: [Int: (node: String, deadline: Double)] = [:]
        /// Answers: codeword index -> its data frames.
        var have: [Int: [ZMQMessage]] = [:]
        /// Indexes that failed for this task.
        var tried: Set<Int> = []
        var key: Key { Key(row: row, offset: offset) }
    }

    let step: Int
    let lost: Set<String>
    let started: Double
    var phase = Phase.manifest
    var queue: [Task] = []
    var next = 0
    var inFlight: [Key: Task] = [:]
    /// Survivors that timed out or answered badly: not asked again.
    var failedNodes: Set<String> = []
    var prefix: UnsafeMutableRawBufferPointer
    var parsed: NodeImage?
    /// Image byte ranges and where they go (a slot's memory; nil: the manifest, already read).
    var targets: [(range: Range<Int>, base: UnsafeMutableRawPointer?)] = []
    var imageBytes = 0
    var bytesDecoded = 0

    init(step: Int, lost: Set<String>, started: Double, prefixBytes: Int) {
        self.step = step
        self.lost = lost
        self.started = started
        prefix = .allocate(byteCount: prefixBytes, alignment: 64)
        prefix.initializeMemory(as: UInt8.self, repeating: 0)
    }

    deinit { prefix.deallocate() }

    /// Tasks of `length` bytes of `row` from chunk offset 0, frame by frame.
    func enqueue(row: Int, length: Int, destination: (Int) -> Destination) {
        var offset = 0
        while offset < length {
            let n = min(ErasureState.frameBytes, length - offset)
            queue.append(Task(row: row, offset: offset, length: n, destination: destination(offset)))
            offset += n
        }
    }

    var done: Bool { inFlight.isEmpty && next == queue.count }
}

extension SMPServer {
    // MARK: the node image

    /// The workers in image order with their slot (for `step`) and CRCs.
    func imageEntries(step: Int, committedOnly: Bool) -> [(id: String, slot: Int, entry: NodeImage.Entry)]? {
        var out: [(String, Int, NodeImage.Entry)] = []
        for (id, w) in store.workers.sorted(by: { $0.key < $1.key }) {
            guard let slot = w.slots.firstIndex(where: {
                switch $0 {
                case .committed(step, _): true
                case .staged(step, _): !committedOnly
                default: false
                }
            }) else { return nil }
            out.append((id, slot, NodeImage.Entry(registration: w.registration, slotBytes: w.layout.slotBytes, crcs: w.slots[slot].crcs)))
        }
        return out
    }

    /// Bytes of this node's image (manifest and one version of every slot).
    var imageBytes: Int {
        guard !store.workers.isEmpty else { return 0 }
        let ws = store.workers.sorted { $0.key < $1.key }
        return NodeImage.manifestSize(ws.map { ($0.value.registration, $0.value.layout.slotBytes, $0.value.layout.chunkCount) })
            + ws.reduce(0) { $0 + $1.value.layout.slotBytes }
    }

    /// The pieces of the image's byte range `range` (manifest, then slots), each a view of memory.
    func imagePieces(manifest: [UInt8], entries: [(id: String, slot: Int, entry: NodeImage.Entry)], range: Range<Int>,
                     manifestPointer: UnsafeRawPointer) -> [UnsafeRawBufferPointer] {
        var pieces: [UnsafeRawBufferPointer] = []
        var offset = 0
        func take(_ base: UnsafeRawPointer, _ count: Int) {
            let lo = max(range.lowerBound, offset), hi = min(range.upperBound, offset + count)
            if lo < hi { pieces.append(UnsafeRawBufferPointer(start: base + (lo - offset), count: hi - lo)) }
            offset += count
        }
        take(manifestPointer, manifest.count)
        for e in entries { take(UnsafeRawPointer(segments[e.id]![e.slot].base), e.entry.slotBytes) }
        return pieces
    }

    /// Frames for `pieces` of the image: zero-copy over slot memory (stable while
    /// a round is in flight or the job is paused for recovery); the manifest's
    /// bytes are copied (its array is not kept).
    func wireFrames(_ pieces: [UnsafeRawBufferPointer], manifest: UnsafeRawBufferPointer) -> [ZMQFrame] {
        pieces.map { p in
            if let b = p.baseAddress, let m = manifest.baseAddress, b >= m, b < m + manifest.count { return .bytes(Array(p)) }
            return ZeroCopyFrames.frame(p)
        }
    }

    /// At shutdown: closes the peer sockets (the router is closed already) and
    /// waits, at most 2 s, until libzmq has released every zero-copy frame.
    func quiesceZeroCopy() {
        if let ec = erasure {
            for s in ec.peers.values { s.close() }
            ec.peers.removeAll()
        }
        let deadline = monotonicSeconds() + 2
        while ZeroCopyFrames.outstanding.load(ordering: .acquiring) > 0 && monotonicSeconds() < deadline { usleep(1000) }
        let left = ZeroCopyFrames.outstanding.load(ordering: .acquiring)
        if left > 0 { logger.warning("\(left) zero-copy frames still held by libzmq after 2 s; unmapping anyway") }
        erasure = nil  // frees the parity buffers
    }

    // MARK: protecting a round

    /// Every local worker staged `step`: send each data chunk, frame by frame,
    /// to its row's parity holders (folding locally where this node holds
    /// parity itself). Each frame's CRC32C is computed once, for every holder.
    func startProtecting(step: Int) {
        guard let ec = erasure else {
            report(.protected(step: step))
            return
        }
        guard let entries = imageEntries(step: step, committedOnly: false) else { return }
        if ec.stagedAt[step] == nil { ec.stagedAt[step] = monotonicSeconds() }
        let manifest = NodeImage(step: step, entries: entries.map(\.entry)).manifest()
        var pending = Set<String>()
        ec.outgoing = (step, manifest, [])
        let total = manifest.count + entries.reduce(0) { $0 + $1.entry.slotBytes }
        let L = ec.chunkBytes
        guard total <= L * ec.layout.k else {
            logger.error("image of \(total) bytes exceeds k × chunk (\(ec.layout.k) × \(L)); waiting for a larger layout")
            ec.outgoing = nil
            return
        }
        let F = ErasureState.frameBytes
        manifest.withUnsafeBytes { mp in
            for c in 0..<ec.layout.k {
                let (row, dataIndex) = ec.placement.place(chunk: c, of: ec.position)
                let start = c * L
                let length = max(0, min(L, total - start))
                var unsent: Set<String> = []
                var offset = 0
                repeat {
                    let n = min(F, length - offset)
                    let pieces = n == 0 ? [] : imagePieces(manifest: manifest, entries: entries, range: start + offset..<start + offset + n,
                                                           manifestPointer: mp.baseAddress!)
                    var crc: UInt32 = 0
                    for p in pieces { crc = CRC32C.checksum(p, continuing: crc) }
                    for holder in ec.placement.parityHolders(row: row) {
                        if holder == ec.position {
                            let folded = foldFrame(step: step, row: row, dataIndex: dataIndex, offset: offset, length: length, pieces: pieces)
                            if !folded.error.isEmpty { logger.error("local fold of chunk \(row)/\(dataIndex) failed: \(folded.error)") }
                            continue
                        }
                        let node = ec.members[holder]
                        if offset == 0 {
                            pending.insert("\(row)/\(dataIndex)/\(node)")
                            if let killStep = faultKillDuringECStep, step >= killStep, pending.count >= 2 {
                                // Test fault injection: die with the round half sent.
                                logger.warning("fault injection: SIGKILL during the EC round of step \(step)")
                                kill(getpid(), SIGKILL)
                            }
                        }
                        let header = SMPMessage.ecChunk(step: step, row: row, dataIndex: dataIndex, offset: offset, length: length, crc: crc)
                            .envelope(sender: config.nodeID).encoded()
                        // The slots stay staged, unmodified, until this round commits or aborts,
                        // which needs the holders' acks: the bytes can go without a copy.
                        do {
                            try peer(node, ec).send([.bytes(header)] + wireFrames(pieces, manifest: mp))
                        } catch {
                            if unsent.insert(node).inserted { logger.warning("EC chunk \(row)/\(dataIndex) for \(node) not sent: \(error)") }
                        }
                    }
                    offset += n
                    keepAlive()
                } while offset < length
            }
        }
        ec.outgoing!.pending = pending
        checkProtected(step: step)
    }

    func peer(_ node: String, _ ec: ErasureState) throws -> ZMQSocket {
        if let s = ec.peers[node] { return s }
        guard let endpoint = ec.layout.endpoints[node] else { throw SMPError("no data endpoint for \(node)") }
        // Acks, and fetched frames of at most `frameBytes` (this node asks for no more).
        let s = try context.socket(.dealer, maxMessageBytes: SMPMessage.maxFrameBytes(bulkFrameBytes: ErasureState.frameBytes))
        try s.setLinger(milliseconds: 0)
        try s.setSendHighWaterMark(0)
        try s.connect(endpoint)
        ec.peers[node] = s
        return s
    }

    /// Folds one frame of data chunk `dataIndex` (`pieces`, contiguous, at byte
    /// `offset` of a chunk of `length` bytes) into this node's parity of `row`,
    /// at the same offset (RS is bytewise). A frame already folded is ignored
    /// (folding twice would cancel it). Says whether the whole chunk is in.
    func foldFrame(step: Int, row: Int, dataIndex: Int, offset: Int, length: Int,
                   pieces: [UnsafeRawBufferPointer]) -> (error: String, complete: Bool) {
        guard let ec = erasure else { return (ErasureState.noLayout, false) }
        if ec.folded[step]?[row]?.contains(dataIndex) == true { return ("", true) }
        guard let buffer = ec.parityBuffer(step: step, row: row, between: keepAlive), let index = ec.parity[step]?[row]?.index else {
            return ("node \(config.nodeID) holds no parity of row \(row)", false)
        }
        let key = ErasureState.ChunkKey(step: step, row: row, index: dataIndex)
        var state = ec.partial[key] ?? ([], 0)
        if state.offsets.contains(offset) { return ("", false) }
        let count = pieces.reduce(0) { $0 + $1.count }
        guard length <= buffer.count, offset + count <= length else {
            return ("frame \(offset)..<\(offset + count) lies outside a chunk of \(length) bytes (parity \(buffer.count))", false)
        }
        let started = monotonicSeconds()
        var at = offset
        for p in pieces {
            do {
                try ec.codec.update(parityRow: index, dataIndex: dataIndex, chunk: p,
                                    parity: UnsafeMutableRawBufferPointer(rebasing: buffer[at..<at + p.count]))
            } catch {
                return ("\(error)", false)
            }
            at += p.count
        }
        let s = ec.foldStats[step] ?? (0, 0)
        ec.foldStats[step] = (s.bytes + count, s.seconds + monotonicSeconds() - started)
        state.offsets.insert(offset)
        state.bytes += count
        guard state.bytes >= length else {
            ec.partial[key] = state
            return ("", false)
        }
        ec.partial[key] = nil
        ec.folded[step, default: [:]][row, default: []].insert(dataIndex)
        return ("", true)
    }

    /// A peer's frame of a data chunk arrived: check it, fold it; the ack goes
    /// once the whole chunk is folded (nil: nothing to say yet).
    func receiveChunk(step: Int, row: Int, dataIndex: Int, offset: Int, length: Int, crc: UInt32,
                      frames: ArraySlice<ZMQMessage>) -> SMPMessage? {
        func ack(_ error: String) -> SMPMessage { .ecAck(step: step, row: row, dataIndex: dataIndex, error: error) }
        guard let ec = erasure else { return ack(ErasureState.noLayout) }
        do throws(StoreError) {
            try checkChunkHeader(ec, step: step, row: row, dataIndex: dataIndex, offset: offset, length: length,
                                 frameBytes: frames.reduce(0) { $0 + $1.count })
        } catch {
            refusedChunks += 1
            logger.warning("refused an EC chunk frame: \(error)", metadata: ["refused.total": "\(refusedChunks)"])
            return ack("\(error)")
        }
        var actual: UInt32 = 0
        for f in frames { f.withUnsafeBytes { actual = CRC32C.checksum($0, continuing: actual) } }
        guard actual == crc else { return ack("frame at \(offset): CRC32C mismatch in transfer") }
        if let c = store.committedStep, step <= c, erasure?.folded[step]?[row]?.contains(dataIndex) != true {
            return ack("step \(step) is not newer than the committed \(c)")
        }
        if ec.folded[step]?[row]?.contains(dataIndex) != true {
            do throws(StoreError) {
                if let evicted = try ec.admitPeerStep(step) {
                    logger.warning("dropped the parity of step \(evicted) for a chunk of the earlier step \(step)")
                }
            } catch {
                refusedChunks += 1
                logger.warning("refused an EC chunk frame: \(error)", metadata: ["refused.total": "\(refusedChunks)"])
                return ack("\(error)")
            }
        }
        var pieces: [UnsafeRawBufferPointer] = []
        for f in frames { f.withUnsafeBytes { pieces.append($0) } }
        let result = withExtendedLifetime(frames) {
            foldFrame(step: step, row: row, dataIndex: dataIndex, offset: offset, length: length, pieces: pieces)
        }
        guard result.error.isEmpty else { return ack(result.error) }
        guard result.complete else { return nil }
        checkProtected(step: step)
        return ack("")
    }

    /// A chunk frame's header against the layout (`ECLayout.checkChunkFrame`).
    func checkChunkHeader(_ ec: ErasureState, step: Int, row: Int, dataIndex: Int, offset: Int, length: Int,
                          frameBytes: Int) throws(StoreError) {
        try ec.layout.checkChunkFrame(position: ec.position, step: step, row: row, dataIndex: dataIndex, offset: offset, length: length,
                                      frameBytes: frameBytes)
    }

    /// A peer's erasure-coding request on the data endpoint (`ecChunk`,
    /// `ecFetch`): the reply's frames, or nil when there is none (yet).
    func peerRequest(_ message: SMPMessage, frames: [ZMQMessage]) -> [ZMQFrame]? {
        // The router is drained in one go and a round brings a gigabyte of frames:
        // heartbeat between them, or the coordinator takes this node for dead.
        defer { keepAlive() }
        switch message {
        case .ecChunk(let step, let row, let index, let offset, let length, let crc):
            return receiveChunk(step: step, row: row, dataIndex: index, offset: offset, length: length, crc: crc, frames: frames[2...])
                .map { [.bytes($0.envelope(sender: config.nodeID).encoded())] }
        case .ecFetch(let step, let row, let index, let offset, let length):
            do {
                let (data, crc) = try codewordFrames(step: step, row: row, index: index, offset: offset, length: length)
                return [.bytes(SMPMessage.ecChunkData(step: step, row: row, index: index, offset: offset, crc: crc, error: "")
                    .envelope(sender: config.nodeID).encoded())] + data
            } catch let error as StoreError {
                refusedChunks += 1
                logger.warning("refused an EC fetch: \(error)", metadata: ["refused.total": "\(refusedChunks)"])
                return [.bytes(SMPMessage.ecChunkData(step: step, row: row, index: index, offset: offset, crc: 0, error: "\(error)")
                    .envelope(sender: config.nodeID).encoded())]
            } catch {
                return [.bytes(SMPMessage.ecChunkData(step: step, row: row, index: index, offset: offset, crc: 0, error: "\(error)")
                    .envelope(sender: config.nodeID).encoded())]
            }
        default:
            return nil
        }
    }

    /// Acks and fetched frames from peers, a pending resend, and the rebuild's
    /// next requests and timeouts. Called on every turn of the event loop.
    func drainPeerAcks() {
        guard let ec = erasure else { return }
        if let at = ec.resendAt, monotonicSeconds() >= at {
            ec.resendAt = nil
            if let step = ec.outgoing?.step { startProtecting(step: step) }
        }
        for (node, socket) in ec.peers {
            while let frames = try? socket.receiveMessages(timeoutMilliseconds: 0) {
                guard let first = frames.first, let (message, _) = try? SMPMessage.decode(first.bytes) else { continue }
                switch message {
                case .ecAck(let step, let row, let index, let error):
                    guard error.isEmpty else {
                        logger.warning("\(node) refused chunk \(row)/\(index) of step \(step): \(error)")
                        if error == ErasureState.noLayout || error.hasPrefix(StoreError.Code.unexpectedRound.rawValue),
                           ec.outgoing?.step == step {
                            // It has not got the layout yet, or not yet dropped an old step's
                            // parity: send the round again shortly (holders ignore the frames
                            // they already folded).
                            ec.resendAt = monotonicSeconds() + 0.1
                        }
                        continue
                    }
                    if ec.outgoing?.step == step {
                        ec.outgoing!.pending.remove("\(row)/\(index)/\(node)")
                        checkProtected(step: step)
                    }
                case .ecChunkData(let step, let row, let index, let offset, let crc, let error):
                    receiveFetched(from: node, step: step, row: row, index: index, offset: offset, crc: crc, error: error,
                                   frames: Array(frames.dropFirst()))
                default:
                    continue
                }
            }
        }
        pumpRebuild()
    }

    /// protected(s): our chunks are at their holders and our parity of s is complete.
    func checkProtected(step: Int) {
        guard let ec = erasure, let o = ec.outgoing, o.step == step, o.pending.isEmpty, ec.parityComplete(step: step) else { return }
        ec.outgoing = nil
        report(.protected(step: step))
    }

    // MARK: serving repairs

    /// Bytes `offset..<offset+length` of codeword index `index` of `row` for
    /// `step`, as this node holds it: zero-copy frames over parity or slot
    /// memory (zeros past the image's end), and their CRC32C.
    func codewordFrames(step: Int, row: Int, index: Int, offset: Int, length: Int) throws -> (frames: [ZMQFrame], crc: UInt32) {
        guard let ec = erasure else { throw SMPError(ErasureState.noLayout) }
        let k = ec.layout.k, L = ec.chunkBytes
        // Row, index (held here) and range against the layout; offset + length is
        // never computed before it is known to fit (an offset near Int64.max trapped).
        try ec.layout.checkFetch(position: ec.position, row: row, index: index, offset: offset, length: length)
        if index >= k {
            guard let p = ec.parity[step]?[row], ec.folded[step]?[row]?.count == k else {
                throw SMPError("no complete parity of row \(row) for step \(step) on \(config.nodeID)")
            }
            // Parity of the step being recovered stays until the next commit.
            let bytes = UnsafeRawBufferPointer(rebasing: p.bytes[offset..<offset + length])
            return ([ZeroCopyFrames.frame(bytes)], CRC32C.checksum(bytes))
        }
        guard let entries = imageEntries(step: step, committedOnly: false) else {
            throw SMPError("\(config.nodeID) does not hold step \(step)")
        }
        let manifest = NodeImage(step: step, entries: entries.map(\.entry)).manifest()
        let c = ec.placement.dataRows(of: ec.position).firstIndex(of: row)!
        let total = manifest.count + entries.reduce(0) { $0 + $1.entry.slotBytes }
        let lo = c * L + offset, hi = lo + length
        let end = max(lo, min(hi, total))
        var frames: [ZMQFrame] = []
        var crc: UInt32 = 0
        manifest.withUnsafeBytes { mp in
            let pieces = end > lo ? imagePieces(manifest: manifest, entries: entries, range: lo..<end, manifestPointer: mp.baseAddress!) : []
            for p in pieces { crc = CRC32C.checksum(p, continuing: crc) }
            frames = wireFrames(pieces, manifest: mp)
        }
        if hi > end {
            let zeros = [UInt8](repeating: 0, count: hi - end)
            crc = zeros.withUnsafeBytes { CRC32C.checksum($0, continuing: crc) }
            frames.append(.bytes(zeros))
        }
        return (frames, crc)
    }

    // MARK: decoding frames

    /// Checks a fetched frame (no error, its CRC, `length` bytes) and gives its data frames.
    func checkFetched(node: String, crc: UInt32, error: String, length: Int, frames: [ZMQMessage]) throws -> [ZMQMessage] {
        guard error.isEmpty else { throw SMPError("\(node): \(error)") }
        var actual: UInt32 = 0
        var count = 0
        for f in frames {
            f.withUnsafeBytes { actual = CRC32C.checksum($0, continuing: actual) }
            count += f.count
        }
        guard count == length else { throw SMPError("\(node) sent \(count) bytes, \(length) asked") }
        guard actual == crc else { throw SMPError("a frame from \(node) failed its CRC32C") }
        return frames
    }

    /// Decodes one frame of `row` from k holders' frames (`have`: codeword
    /// index -> data frames) into `dest` (`length` bytes of codeword index `mine`).
    func decodeFrame(have: [Int: [ZMQMessage]], length: Int, mine: Int, into dest: UnsafeMutableRawPointer) throws {
        guard let ec = erasure else { throw SMPError(ErasureState.noLayout) }
        var scratch: [UnsafeMutableRawBufferPointer] = []
        defer { for b in scratch { b.deallocate() } }
        func allocate() -> UnsafeMutableRawBufferPointer {
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 64)
            scratch.append(b)
            return b
        }
        var chunks: [UnsafeMutableRawBufferPointer] = []
        for i in 0..<ec.placement.n {
            if let frames = have[i] {
                if frames.count == 1 {
                    // Read in place: the message's memory lives as long as `have`.
                    chunks.append(frames[0].withUnsafeBytes { UnsafeMutableRawBufferPointer(mutating: $0) })
                } else {
                    let b = allocate()
                    var at = 0
                    for f in frames {
                        f.withUnsafeBytes { _ = memcpy(b.baseAddress! + at, $0.baseAddress!, $0.count) }
                        at += f.count
                    }
                    chunks.append(b)
                }
            } else if i == mine {
                chunks.append(UnsafeMutableRawBufferPointer(start: dest, count: length))
            } else {
                chunks.append(allocate())  // another missing index: decoded and dropped
            }
        }
        let missing = (0..<ec.placement.n).filter { have[$0] == nil }
        try withExtendedLifetime(have) { try ec.codec.reconstruct(chunks, missing: missing) }
    }

    /// Bytes `range` of this node's own codeword index of `row` (found corrupt)
    /// decoded from k other holders straight into `dest`, frame by frame.
    /// Synchronous: a repair covers one tensor chunk.
    func repairRange(step: Int, row: Int, range: Range<Int>, into dest: UnsafeMutableRawPointer) throws {
        guard let ec = erasure else { throw SMPError(ErasureState.noLayout) }
        let n = ec.placement.n, k = ec.layout.k
        let mine = ec.placement.codewordIndex(of: ec.position, row: row)
        var sockets: [String: ZMQSocket] = [:]
        defer { for s in sockets.values { s.close() } }
        var offset = range.lowerBound
        while offset < range.upperBound {
            let length = min(ErasureState.frameBytes, range.upperBound - offset)
            var have: [Int: [ZMQMessage]] = [:]
            var reasons: [String] = []
            for index in 0..<n where have.count < k && index != mine {
                let node = ec.members[ec.placement.position(ofCodewordIndex: index, row: row)]
                guard node != config.nodeID else { continue }
                do {
                    let s: ZMQSocket
                    if let existing = sockets[node] {
                        s = existing
                    } else {
                        guard let endpoint = ec.layout.endpoints[node] else { throw SMPError("no data endpoint for \(node)") }
                        s = try context.socket(.dealer, maxMessageBytes: SMPMessage.maxFrameBytes(bulkFrameBytes: ErasureState.frameBytes))
                        sockets[node] = s
                        try s.setLinger(milliseconds: 0)
                        try s.connect(endpoint)
                    }
                    try s.send([SMPMessage.ecFetch(step: step, row: row, index: index, offset: offset, length: length)
                        .envelope(sender: config.nodeID).encoded()])
                    guard let frames = try s.receiveMessages(timeoutMilliseconds: 2000) else {
                        sockets.removeValue(forKey: node)?.close()  // a late answer must not pass for the next one
                        throw SMPError("no answer from \(node) within 2 s")
                    }
                    guard case .ecChunkData(step, row, index, offset, let crc, let error)? = try? SMPMessage.decode(frames[0].bytes).0 else {
                        throw SMPError("unexpected answer from \(node)")
                    }
                    have[index] = try checkFetched(node: node, crc: crc, error: error, length: length, frames: Array(frames.dropFirst()))
                } catch {
                    reasons.append("\(error)")
                }
                keepAlive()
            }
            guard have.count == k else {
                throw SMPError("row \(row) of step \(step), bytes \(offset)..<\(offset + length): only \(have.count) of the \(k) chunks "
                    + "needed could be fetched (\(reasons.joined(separator: "; ")))")
            }
            try decodeFrame(have: have, length: length, mine: mine, into: dest + (offset - range.lowerBound))
            offset += length
        }
    }

    // MARK: rebuilding

    /// A replacement node: rebuild its image and parity for `step` from the
    /// group, without holding the event loop (see `RebuildJob`); `rebuilt`
    /// goes to the coordinator when it is done or has failed.
    func startRebuild(step: Int?, lost: [String]) {
        guard let step else {
            logger.info("nothing committed: nothing to rebuild")
            report(.rebuilt(step: nil, error: ""))
            return
        }
        guard let ec = erasure else {
            report(.rebuilt(step: step, error: ErasureState.noLayout))
            return
        }
        if let current = ec.rebuilding {
            if current.step == step && current.lost == Set(lost) {
                logger.info("rebuild of step \(step) already in progress")
                return
            }
            logger.info("rebuild of step \(current.step) abandoned for step \(step), lost \(lost)")
        }
        let job = RebuildJob(step: step, lost: Set(lost), started: monotonicSeconds(), prefixBytes: min(ErasureState.frameBytes, ec.chunkBytes))
        ec.rebuilding = job
        let first = ec.placement.dataRows(of: ec.position)[0]
        job.enqueue(row: first, length: job.prefix.count) { _ in .prefix }
        logger.info("rebuilding node \(config.nodeID) for step \(step) from parity",
                    metadata: ["lost": "\(lost)", "frame_bytes": "\(ErasureState.frameBytes)", "window": "\(ErasureState.rebuildWindow)"])
        pumpRebuild()
    }

    /// The rebuild's next steps: timeouts, new requests, phase changes.
    func pumpRebuild() {
        guard let ec = erasure, let job = ec.rebuilding else { return }
        let now = monotonicSeconds()
        for key in Array(job.inFlight.keys) {
            var task = job.inFlight[key]!
            for (index, r) in task.requested where now > r.deadline {
                logger.warning("row \(task.row) of step \(job.step), bytes at \(task.offset): no answer from \(r.node) within \(ErasureState.fetchTimeout) s; asking another survivor")
                job.failedNodes.insert(r.node)
                task.requested[index] = nil
                task.tried.insert(index)
            }
            job.inFlight[key] = task
        }
        while job.inFlight.count < ErasureState.rebuildWindow && job.next < job.queue.count {
            let task = job.queue[job.next]
            job.next += 1
            job.inFlight[task.key] = task
        }
        for key in Array(job.inFlight.keys) {
            var task = job.inFlight[key]!
            if let error = requestSurvivors(&task, job: job, ec: ec) { return failRebuild(error) }
            job.inFlight[key] = task
        }
        guard job.done else { return }
        switch job.phase {
        case .manifest:
            do { try beginRebuildBody(job, ec) } catch { return failRebuild("\(error)") }
            pumpRebuild()
        case .body:
            finishRebuild(job, ec)
        }
    }

    /// Asks survivors for the task's frame until k answers are in or on their way.
    func requestSurvivors(_ task: inout RebuildJob.Task, job: RebuildJob, ec: ErasureState) -> String? {
        let k = ec.layout.k
        let mine = ec.placement.codewordIndex(of: ec.position, row: task.row)
        var index = 0
        while task.have.count + task.requested.count < k {
            while index < ec.placement.n {
                let node = ec.members[ec.placement.position(ofCodewordIndex: index, row: task.row)]
                if index != mine, task.have[index] == nil, task.requested[index] == nil, !task.tried.contains(index),
                   !job.lost.contains(node), !job.failedNodes.contains(node), node != config.nodeID { break }
                index += 1
            }
            guard index < ec.placement.n else {
                return "row \(task.row) of step \(job.step), bytes \(task.offset)..<\(task.offset + task.length): only "
                    + "\(task.have.count + task.requested.count) of the \(k) chunks needed are reachable "
                    + "(lost \(job.lost.sorted()), failed \(job.failedNodes.sorted()))"
            }
            let node = ec.members[ec.placement.position(ofCodewordIndex: index, row: task.row)]
            do {
                try peer(node, ec).send([SMPMessage.ecFetch(step: job.step, row: task.row, index: index, offset: task.offset, length: task.length)
                    .envelope(sender: config.nodeID).encoded()])
                task.requested[index] = (node, monotonicSeconds() + ErasureState.fetchTimeout)
            } catch {
                logger.warning("fetch from \(node) not sent: \(error)")
                job.failedNodes.insert(node)
            }
        }
        return nil
    }

    /// A survivor answered a rebuild's request: keep it, and decode the frame once k are in.
    func receiveFetched(from node: String, step: Int, row: Int, index: Int, offset: Int, crc: UInt32, error: String, frames: [ZMQMessage]) {
        guard let ec = erasure, let job = ec.rebuilding, job.step == step,
              var task = job.inFlight[RebuildJob.Key(row: row, offset: offset)], task.requested[index]?.node == node else { return }
        task.requested[index] = nil
        do {
            task.have[index] = try checkFetched(node: node, crc: crc, error: error, length: task.length, frames: frames)
        } catch {
            logger.warning("row \(row) of step \(step), bytes at \(offset): \(error); asking another survivor")
            job.failedNodes.insert(node)
            task.tried.insert(index)
        }
        guard task.have.count == ec.layout.k else {
            job.inFlight[task.key] = task
            return
        }
        job.inFlight[task.key] = nil
        do {
            try decodeInto(task, job, ec)
            job.bytesDecoded += task.length
        } catch {
            failRebuild("row \(row) of step \(step), bytes at \(offset): \(error)")
        }
    }

    /// Decodes a task's frame into its destination.
    func decodeInto(_ task: RebuildJob.Task, _ job: RebuildJob, _ ec: ErasureState) throws {
        let mine = ec.placement.codewordIndex(of: ec.position, row: task.row)
        switch task.destination {
        case .prefix:
            try decodeFrame(have: task.have, length: task.length, mine: mine, into: job.prefix.baseAddress! + task.offset)
        case .parity(let row):
            guard let buffer = ec.parityBuffer(step: job.step, row: row) else { throw SMPError("no parity buffer of row \(row)") }
            try decodeFrame(have: task.have, length: task.length, mine: mine, into: buffer.baseAddress! + task.offset)
        case .image(let at):
            let range = at..<at + task.length
            if let t = job.targets.first(where: { $0.range.contains(at) }), let base = t.base, t.range.upperBound >= range.upperBound {
                try decodeFrame(have: task.have, length: task.length, mine: mine, into: base + (at - t.range.lowerBound))
                return
            }
            // Across a boundary (manifest, slots, the image's end): decode aside, then scatter.
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: task.length, alignment: 64)
            defer { scratch.deallocate() }
            try decodeFrame(have: task.have, length: task.length, mine: mine, into: scratch.baseAddress!)
            for t in job.targets {
                guard let base = t.base else { continue }
                let lo = max(t.range.lowerBound, range.lowerBound), hi = min(t.range.upperBound, range.upperBound)
                if lo < hi { memcpy(base + (lo - t.range.lowerBound), scratch.baseAddress! + (lo - at), hi - lo) }
            }
        }
    }

    /// The manifest is in: create the workers' slots and queue the rest of the image and the parity.
    func beginRebuildBody(_ job: RebuildJob, _ ec: ErasureState) throws {
        let L = ec.chunkBytes, k = ec.layout.k
        let manifestBytes = Int(job.prefix.load(as: UInt32.self).littleEndian) + 4
        if manifestBytes > job.prefix.count {
            // A manifest longer than the first frame: read that much, then go on.
            guard manifestBytes <= L else { throw SMPError("rebuilt manifest of \(manifestBytes) bytes exceeds a chunk of \(L)") }
            job.prefix.deallocate()
            job.prefix = .allocate(byteCount: manifestBytes, alignment: 64)
            job.enqueue(row: ec.placement.dataRows(of: ec.position)[0], length: manifestBytes) { _ in .prefix }
            return
        }
        let parsed = try NodeImage.parse(UnsafeRawBufferPointer(job.prefix))
        guard parsed.step == job.step else { throw SMPError("rebuilt image is of step \(parsed.step), not \(job.step)") }
        job.parsed = parsed
        job.targets = [(0..<manifestBytes, nil)]
        var offset = manifestBytes
        for e in parsed.entries {
            let id = e.registration.workerID
            if case .new(let bytes) = try store.register(e.registration) {
                do throws(StoreError) {
                    try checkMemory(worker: id, slotBytes: bytes)
                } catch {
                    store.remove(worker: id)
                    logger.error("rebuild refused: \(error)")
                    throw error
                }
                segments[id] = try (0..<2).map { try createSlot(name: segmentName(worker: id, slot: $0), count: bytes) }
            }
            let segment = segments[id]![0]
            guard segment.count == e.slotBytes else { throw SMPError("image entry \(id): slot of \(segment.count) bytes, \(e.slotBytes) expected") }
            job.targets.append((offset..<offset + e.slotBytes, segment.base))
            offset += e.slotBytes
        }
        job.imageBytes = offset
        guard offset <= k * L else { throw SMPError("rebuilt image of \(offset) bytes exceeds k × chunk") }
        for row in 0..<ec.placement.n {
            let mine = ec.placement.codewordIndex(of: ec.position, row: row)
            if mine < k {
                let c = ec.placement.dataRows(of: ec.position).firstIndex(of: row)!
                job.enqueue(row: row, length: max(0, min(L, offset - c * L))) { .image(c * L + $0) }
            } else {
                _ = ec.parityBuffer(step: job.step, row: row, between: keepAlive)
                job.enqueue(row: row, length: L) { _ in .parity(row: row) }
            }
        }
        job.phase = .body
    }

    /// Every frame is in: check the slots against their CRCs, install them, report.
    func finishRebuild(_ job: RebuildJob, _ ec: ErasureState) {
        let k = ec.layout.k
        guard let parsed = job.parsed else { return failRebuild("rebuild finished without a manifest") }
        for row in 0..<ec.placement.n where ec.placement.codewordIndex(of: ec.position, row: row) >= k {
            ec.folded[job.step, default: [:]][row] = Set(0..<k)
        }
        do {
            for e in parsed.entries {
                let id = e.registration.workerID
                let segment = segments[id]![0]
                let layout = e.registration.layout
                for entry in layout.entries {
                    for chunk in 0..<entry.chunkCount {
                        let r = layout.chunkRange(entry, chunk: chunk)
                        let actual = CRC32C.checksum(UnsafeRawBufferPointer(start: segment.base + entry.slotOffset + r.lowerBound, count: r.count))
                        guard actual == e.crcs[entry.firstChunk + chunk] else {
                            return failRebuild("rebuilt worker \(id), tensor \(entry.spec.name), chunk \(chunk) fails its CRC32C")
                        }
                    }
                    keepAlive()
                }
                try store.installCommitted(worker: id, step: job.step, slot: 0, crcs: e.crcs)
            }
        } catch {
            return failRebuild("\(error)")
        }
        ec.rebuilding = nil
        let seconds = monotonicSeconds() - job.started
        logger.info("rebuilt node \(config.nodeID) for step \(job.step) from parity",
                    metadata: ["bytes": "\(job.imageBytes)", "ms": "\(Int(seconds * 1000))", "workers": "\(parsed.entries.count)",
                               "decoded_bytes": "\(job.bytesDecoded)", "frames": "\(job.queue.count)"])
        report(.rebuilt(step: job.step, error: ""))
    }

    func failRebuild(_ error: String) {
        guard let ec = erasure, let job = ec.rebuilding else { return }
        ec.rebuilding = nil
        logger.error("rebuild failed: \(error)")
        report(.rebuilt(step: job.step, error: error))
    }

    // MARK: corruption is an erasure

    /// Checks a worker's committed slot; a chunk that fails its CRC is rebuilt
    /// from its row's other chunks (as if lost), decoded straight into the slot.
    /// `unlessVerified`: skip a slot already checked at this step (slices
    /// served to peers); a worker's own restore always checks. Without
    /// erasure coding nothing can be repaired: the reader's own CRC check
    /// names a corrupt chunk.
    func verifyAndRepair(worker id: String, unlessVerified: Bool = false) throws(StoreError) {
        guard erasure != nil, let point = try store.restorePoint(worker: id), store.workers[id] != nil else { return }
        if unlessVerified, let v = verifiedSlots[id], v.step == point.step, v.slot == point.slot { return }
        try verifySlot(worker: id)
        verifiedSlots[id] = (point.step, point.slot)
    }

    private func verifySlot(worker id: String) throws(StoreError) {
        guard let ec = erasure, let point = try store.restorePoint(worker: id), let w = store.workers[id] else { return }
        let segment = segments[id]![point.slot]
        for entry in w.layout.entries {
            for chunk in 0..<entry.chunkCount {
                let r = w.layout.chunkRange(entry, chunk: chunk)
                let start = entry.slotOffset + r.lowerBound
                guard CRC32C.checksum(UnsafeRawBufferPointer(start: segment.base + start, count: r.count)) != point.crcs[entry.firstChunk + chunk] else { continue }
                logger.warning("worker \(id), tensor \(entry.spec.name), chunk \(chunk) fails its CRC32C; repairing from parity")
                guard let entries = imageEntries(step: point.step, committedOnly: true) else { continue }
                let manifestSize = NodeImage(step: point.step, entries: entries.map(\.entry)).manifest().count
                var base = manifestSize
                for e in entries { if e.id == id { break }; base += e.entry.slotBytes }
                let lo = base + start, hi = lo + r.count
                let L = ec.chunkBytes
                for c in (lo / L)...((hi - 1) / L) {
                    let row = ec.placement.dataRows(of: ec.position)[c]
                    let from = max(lo, c * L), to = min(hi, (c + 1) * L)
                    do {
                        try repairRange(step: point.step, row: row, range: (from - c * L)..<(to - c * L), into: segment.base + (from - base))
                    } catch {
                        throw StoreError(.corrupt, "worker \(id), tensor \(entry.spec.name), chunk \(chunk) fails its CRC32C and repair failed: \(error)")
                    }
                }
                guard CRC32C.checksum(UnsafeRawBufferPointer(start: segment.base + start, count: r.count)) == point.crcs[entry.firstChunk + chunk] else {
                    throw StoreError(.corrupt, "worker \(id), tensor \(entry.spec.name), chunk \(chunk) still fails its CRC32C after repair")
                }
                logger.info("repaired worker \(id), tensor \(entry.spec.name), chunk \(chunk) from parity")
            }
        }
    }
}

