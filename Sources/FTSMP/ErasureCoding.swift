import FTControl
import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation
import Synchronization

/// Erasure-coding state of one SMP (ARCHITECTURE.md, "Erasure coding across
/// nodes"). The decisions are the cores' (`ECRoundInstance`: the round at a
/// data holder and at a parity holder; `RebuildInstance`: rebuilds and
/// repairs); this shell owns what they leave out: the parity buffers, the
/// peer sockets, the answers a rebuild holds, and the ISA-L codec.
final class ErasureState {
    var layout: ECLayout
    let group: Int
    let position: Int
    let codec: ReedSolomon
    var placement: ParityPlacement { layout.placement }
    var members: [String] { layout.groups[group] }
    var chunkBytes: Int { layout.chunkBytes }

    var round: ECRoundInstance
    /// Parity buffers (`chunkBytes` each) the round core holds: step -> row -> bytes.
    var buffers: [Int: [Int: UnsafeMutableRawBufferPointer]] = [:]
    /// Parity buffers of dropped steps, kept (faulted in) for the next rounds: at most m.
    var spareParity: [UnsafeMutableRawBufferPointer] = []
    var peers: [String: ZMQSocket] = [:]
    /// The image of the round being sent (its manifest and entries), for resends.
    var outgoingImage: (step: Int, manifest: [UInt8], entries: [ImageEntry])?
    /// When each round started protecting (for the staged-to-committed time).
    var stagedAt: [Int: Double] = [:]
    /// Bytes folded and seconds spent folding, per step.
    var foldStats: [Int: (bytes: Int, seconds: Double)] = [:]
    /// The rebuild in progress on a replacement node.
    var rebuilding: FetchJob?
    /// The repair of corrupt chunks in progress (one at a time).
    var repairing: FetchJob?
    /// Repairs that failed, by worker: (step, reason); a restore of that step is refused with it.
    var failedRepairs: [String: (step: Int, reason: String)] = [:]

    /// Bytes per frame of a bulk transfer (1-4 MiB). `FT_EC_FRAME_BYTES`
    /// overrides it (4 KiB...64 MiB), so tests can spread a small image over many frames.
    static let frameBytes: Int = {
        guard let v = ProcessInfo.processInfo.environment["FT_EC_FRAME_BYTES"].flatMap(Int.init) else { return 4 << 20 }
        return min(max(v, 4096), 64 << 20)
    }()
    /// Frames of a rebuild in flight at once (each asks k survivors): about 32 MiB, 2...16 frames.
    static var rebuildWindow: Int { min(16, max(2, (32 << 20) / frameBytes)) }
    /// How long a rebuild waits for one frame from one survivor before asking another.
    static let fetchTimeout = 5.0
    static let noLayout = ECRoundInstance.noLayout

    init(layout: ECLayout, node: String) throws {
        guard let (g, p) = layout.locate(node) else { throw SMPError(.notInLayout, "node \(node) is in no EC group of the layout") }
        self.layout = layout
        group = g
        position = p
        codec = try ReedSolomon(dataCount: layout.k, parityCount: layout.m)
        round = ECRoundInstance(k: layout.k, m: layout.m, chunkBytes: layout.chunkBytes, frameBytes: Self.frameBytes,
                                members: layout.groups[g], position: p)
        // Received frames are malloc'd by libzmq (4 MiB each): keep such blocks
        // off mmap and untrimmed, so they are reused rather than faulted in anew
        // for every frame (page faults cost more than the fold).
        _ = keepFreedBlocks(below: 32 << 20, trimAbove: 512 << 20)
    }

    deinit {
        for (_, rows) in buffers { for (_, b) in rows { b.deallocate() } }
        for b in spareParity { b.deallocate() }
        for s in peers.values { s.close() }
    }

    var parityBytesHeld: Int { round.parityChunksHeld * chunkBytes }

    /// A core for fetching codeword bytes of `step` from this node's group.
    func fetchCore(step: Int, lost: Set<String>, purpose: RebuildInstance.Purpose) -> RebuildInstance {
        RebuildInstance(step: step, lost: lost, purpose: purpose, k: layout.k, m: layout.m, chunkBytes: chunkBytes,
                        frameBytes: Self.frameBytes, members: members, position: position, window: Self.rebuildWindow,
                        timeout: Self.fetchTimeout)
    }

    /// The earliest time a core wants to be woken (a resend, a fetch deadline).
    var wakeAt: Double? { [round.wakeAt, rebuilding?.core.wakeAt, repairing?.core.wakeAt].compactMap { $0 }.min() }
}

/// A worker's slot in a node image: the worker, which of its slots, and its entry.
typealias ImageEntry = (id: String, slot: Int, entry: NodeImage.Entry)

/// A rebuild or a repair in progress: its core, the answers it holds (until
/// their frame is decoded), and where decoded image bytes go.
final class FetchJob {
    struct AnswerKey: Hashable {
        var row: Int
        var offset: Int
        var index: Int
    }
    var core: RebuildInstance
    let started: Double
    var answers: [AnswerKey: [ZMQMessage]] = [:]
    /// The image's first bytes (a rebuild's manifest).
    var prefix = UnsafeMutableRawBufferPointer.allocate(byteCount: 0, alignment: 64)
    var parsed: NodeImage?
    /// Image byte ranges and where they go (a slot's memory; nil: the manifest, already read).
    var targets: [(range: Range<Int>, base: UnsafeMutableRawPointer?)] = []
    /// A repair's worker and the chunks to check once it is over.
    var repairWorker: String?

    init(core: RebuildInstance, started: Double) {
        self.core = core
        self.started = started
    }

    deinit { prefix.deallocate() }
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

extension SMPServer {
    // MARK: the node image

    /// The workers in image order with their slot (for `step`) and CRCs.
    func imageEntries(step: Int, committedOnly: Bool) -> [ImageEntry]? {
        var out: [ImageEntry] = []
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

    /// Views of image bytes `range` (manifest, then slots).
    func imagePieces(manifest: UnsafeRawBufferPointer, entries: [ImageEntry], range: Range<Int>) -> [UnsafeRawBufferPointer] {
        let layout = NodeImageLayout(manifestBytes: manifest.count, slotBytes: entries.map(\.entry.slotBytes))
        return layout.pieces(range).map { p in
            switch p.source {
            case .manifest: UnsafeRawBufferPointer(rebasing: manifest[p.offset..<p.offset + p.count])
            case .slot(let i): UnsafeRawBufferPointer(start: segments[entries[i].id]![entries[i].slot].base + p.offset, count: p.count)
            }
        }
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

    func peer(_ node: String, _ ec: ErasureState) throws -> ZMQSocket {
        if let s = ec.peers[node] { return s }
        guard let endpoint = ec.layout.endpoints[node] else { throw SMPError(.notInLayout, "no data endpoint for \(node)") }
        // Acks, and fetched frames of at most `frameBytes` (this node asks for no more).
        let s = try context.socket(.dealer, maxMessageBytes: SMPMessage.maxFrameBytes(bulkFrameBytes: ErasureState.frameBytes))
        try s.setLinger(milliseconds: 0)
        try s.setSendHighWaterMark(0)
        try s.boundBulkReceives()
        try dataKeys?.secureClient(s, for: endpoint)
        try s.connect(endpoint)
        ec.peers[node] = s
        return s
    }

    /// A layout with other data endpoints: only the peers whose endpoint changed
    /// get a new socket, and a rebuild or repair asks again what it had asked of them
    /// (their answers would go to the closed socket).
    func updateEndpoints(_ ec: ErasureState, _ new: ECLayout) {
        let changed = ec.peers.keys.sorted().filter { new.endpoints[$0] != ec.layout.endpoints[$0] }
        ec.layout = new
        for node in changed {
            ec.peers.removeValue(forKey: node)?.close()
            for job in [ec.rebuilding, ec.repairing].compactMap({ $0 }) { runFetch(job, ec, job.core.endpointChanged(node, now: monotonicSeconds())) }
        }
    }

    // MARK: protecting a round

    /// Every local worker staged `step`: the round core sends each data chunk,
    /// frame by frame, to its row's parity holders.
    func startProtecting(step: Int) {
        guard let ec = erasure else {
            report(.protected(step: step))
            return
        }
        guard let entries = imageEntries(step: step, committedOnly: false) else { return }
        if ec.stagedAt[step] == nil { ec.stagedAt[step] = monotonicSeconds() }
        let manifest = NodeImage(step: step, entries: entries.map(\.entry)).manifest()
        ec.outgoingImage = (step, manifest, entries)
        let total = manifest.count + entries.reduce(0) { $0 + $1.entry.slotBytes }
        runRound(ec, ec.round.startRound(step: step, imageBytes: total))
    }

    /// Carries out the round core's directives; `received`: the frame a `.fold` folds.
    func runRound(_ ec: ErasureState, _ directives: [ECRoundInstance.Directive], received: [UnsafeRawBufferPointer] = [],
                  reply: ((SMPMessage) -> Void)? = nil) {
        var unsent: Set<String> = []
        var sentHeaders = 0
        for d in directives {
            switch d {
            case .send(let f):
                guard let image = ec.outgoingImage, image.step == f.step else {
                    logger.error("no image of step \(f.step) to send")
                    continue
                }
                image.manifest.withUnsafeBytes { mp in
                    let pieces = imagePieces(manifest: mp, entries: image.entries, range: f.imageRange)
                    var crc: UInt32 = 0
                    for p in pieces { crc = CRC32C.checksum(p, continuing: crc) }
                    if let index = f.foldLocally { fold(ec, step: f.step, row: f.row, parityIndex: index, dataIndex: f.dataIndex, offset: f.offset, pieces) }
                    let header = SMPMessage.ecChunk(step: f.step, row: f.row, dataIndex: f.dataIndex, offset: f.offset, length: f.length, crc: crc)
                        .envelope(sender: config.nodeID, epoch: channel?.epoch ?? 0).encoded()
                    for node in f.to {
                        if f.offset == 0 {
                            sentHeaders += 1
                            if let killStep = faultKillDuringECStep, f.step >= killStep, sentHeaders >= 2 {
                                // Test fault injection: die with the round half sent.
                                logger.warning("fault injection: SIGKILL during the EC round of step \(f.step)")
                                kill(getpid(), SIGKILL)
                            }
                        }
                        // The slots stay staged, unmodified, until this round commits or aborts,
                        // which needs the holders' acks: the bytes can go without a copy.
                        do {
                            try peer(node, ec).send([.bytes(header)] + wireFrames(pieces, manifest: mp))
                        } catch {
                            if unsent.insert(node).inserted { logger.warning("EC chunk \(f.row)/\(f.dataIndex) for \(node) not sent: \(error)") }
                        }
                    }
                }
                keepAlive()
            case .allocateParity(let step, let row, _):
                let b = ec.spareParity.popLast() ?? UnsafeMutableRawBufferPointer.allocate(byteCount: ec.chunkBytes, alignment: 64)
                // Zeroed in 8 MiB pieces with heartbeats between (first-touched memory can
                // fault in at tens of MB/s on a loaded VM: a gigabyte node's chunk takes seconds).
                var done = 0
                while done < b.count {
                    let n = min(8 << 20, b.count - done)
                    memset(b.baseAddress! + done, 0, n)
                    done += n
                    keepAlive()
                }
                ec.buffers[step, default: [:]][row] = b
            case .freeParity(let step):
                for (_, b) in ec.buffers.removeValue(forKey: step) ?? [:] {
                    // Up to m spares: one round's worth. Safe to reuse: parity is never sent
                    // zero-copy outside a recovery, when no step is dropped.
                    if ec.spareParity.count < ec.layout.m { ec.spareParity.append(b) } else { b.deallocate() }
                }
                if ec.outgoingImage.map({ ec.round.outgoing?.step != $0.step }) == true { ec.outgoingImage = nil }
            case .fold(let step, let row, let index, let dataIndex, let offset):
                fold(ec, step: step, row: row, parityIndex: index, dataIndex: dataIndex, offset: offset, received)
            case .ack(_, let step, let row, let dataIndex, let error):
                reply?(.ecAck(step: step, row: row, dataIndex: dataIndex, error: error))
            case .protected(let step):
                ec.outgoingImage = nil
                report(.protected(step: step))
            case .warning(let text):
                logger.warning("\(text)", metadata: ["refused.total": "\(ec.round.refusedFrames)"])
            }
        }
    }

    /// Folds one frame of data chunk `dataIndex` (`pieces`, contiguous, at byte
    /// `offset` of the chunk) into the parity of `row`, at the same offset (RS is bytewise).
    func fold(_ ec: ErasureState, step: Int, row: Int, parityIndex: Int, dataIndex: Int, offset: Int, _ pieces: [UnsafeRawBufferPointer]) {
        guard let buffer = ec.buffers[step]?[row] else {
            logger.error("no parity buffer of row \(row) for step \(step) to fold into")
            return
        }
        let started = monotonicSeconds()
        var at = offset
        for p in pieces {
            do {
                // The core checked the frame against the chunk: this cannot fail.
                try ec.codec.update(parityRow: parityIndex, dataIndex: dataIndex, chunk: p,
                                    parity: UnsafeMutableRawBufferPointer(rebasing: buffer[at..<at + p.count]))
            } catch {
                preconditionFailure("fold of a checked frame failed: \(error)")
            }
            at += p.count
        }
        let s = ec.foldStats[step] ?? (0, 0)
        ec.foldStats[step] = (s.bytes + at - offset, s.seconds + monotonicSeconds() - started)
    }

    /// A peer's erasure-coding request on the data endpoint (`ecChunk`,
    /// `ecFetch`): the reply's frames, or nil when there is none (yet).
    func peerRequest(_ message: SMPMessage, envelope: WireEnvelope, frames: [ZMQMessage]) -> [ZMQFrame]? {
        // The router is drained in one go and a round brings a gigabyte of frames:
        // heartbeat between them, or the coordinator takes this node for dead.
        defer { keepAlive() }
        switch message {
        case .ecChunk(let step, let row, let index, let offset, let length, let crc):
            let data = frames[2...]
            guard let ec = erasure else {
                return [.bytes(SMPMessage.ecAck(step: step, row: row, dataIndex: index, error: ErasureState.noLayout)
                    .envelope(sender: config.nodeID).encoded())]
            }
            var actual: UInt32 = 0
            for f in data { f.withUnsafeBytes { actual = CRC32C.checksum($0, continuing: actual) } }
            let directives = ec.round.onChunkFrame(from: envelope.sender, epoch: envelope.epoch, ownEpoch: channel?.epoch ?? 0,
                                                   step: step, row: row, dataIndex: index, offset: offset, length: length,
                                                   frameBytes: data.reduce(0) { $0 + $1.count }, crcMatches: actual == crc,
                                                   committedStep: store.committedStep)
            var pieces: [UnsafeRawBufferPointer] = []
            for f in data { f.withUnsafeBytes { pieces.append($0) } }
            var ack: SMPMessage?
            withExtendedLifetime(data) { runRound(ec, directives, received: pieces) { ack = $0 } }
            return ack.map { [.bytes($0.envelope(sender: config.nodeID).encoded())] }
        case .ecFetch(let step, let row, let index, let offset, let length):
            do {
                let (data, crc) = try codewordFrames(step: step, row: row, index: index, offset: offset, length: length)
                return [.bytes(SMPMessage.ecChunkData(step: step, row: row, index: index, offset: offset, crc: crc, error: "")
                    .envelope(sender: config.nodeID).encoded())] + data
            } catch {
                if error is StoreError {
                    refusedChunks += 1
                    logger.warning("refused an EC fetch: \(error)", metadata: ["refused.total": "\(refusedChunks)"])
                }
                return [.bytes(SMPMessage.ecChunkData(step: step, row: row, index: index, offset: offset, crc: 0, error: "\(error)")
                    .envelope(sender: config.nodeID).encoded())]
            }
        default:
            return nil
        }
    }

    /// Acks and fetched frames from peers, a due resend, and the fetch jobs'
    /// deadlines. Called on every turn of the event loop.
    func drainPeerAcks() {
        guard let ec = erasure else { return }
        let now = monotonicSeconds()
        runRound(ec, ec.round.tick(now: now))
        for node in ec.peers.keys.sorted() {
            guard let socket = ec.peers[node] else { continue }
            while let frames = try? socket.receiveMessages(timeoutMilliseconds: 0) {
                guard let first = frames.first, let (message, _) = try? SMPMessage.decode(first.bytes) else { continue }
                switch message {
                case .ecAck(let step, let row, let index, let error):
                    runRound(ec, ec.round.onAck(from: node, step: step, row: row, dataIndex: index, error: error, now: monotonicSeconds()))
                case .ecChunkData(let step, let row, let index, let offset, let crc, let error):
                    receiveFetched(ec, from: node, step: step, row: row, index: index, offset: offset, crc: crc, error: error,
                                   frames: Array(frames.dropFirst()))
                default:
                    continue
                }
            }
        }
        for job in [ec.rebuilding, ec.repairing].compactMap({ $0 }) { runFetch(job, ec, job.core.tick(now: monotonicSeconds())) }
    }

    // MARK: serving repairs

    /// Bytes `offset..<offset+length` of codeword index `index` of `row` for
    /// `step`, as this node holds it: zero-copy frames over parity or slot
    /// memory (zeros past the image's end), and their CRC32C.
    func codewordFrames(step: Int, row: Int, index: Int, offset: Int, length: Int) throws -> (frames: [ZMQFrame], crc: UInt32) {
        guard let ec = erasure else { throw SMPError(.noErasureCoding, ErasureState.noLayout) }
        let k = ec.layout.k, L = ec.chunkBytes
        // Row, index (held here) and range against the layout; offset + length is
        // never computed before it is known to fit (an offset near Int64.max trapped).
        try ec.layout.checkFetch(position: ec.position, row: row, index: index, offset: offset, length: length)
        if index >= k {
            guard let p = ec.buffers[step]?[row], ec.round.holdsCompleteParity(step: step, row: row) else {
                throw SMPError(.notHeld, "no complete parity of row \(row) for step \(step) on \(config.nodeID)")
            }
            // Parity of the step being recovered stays until the next commit.
            let bytes = UnsafeRawBufferPointer(rebasing: p[offset..<offset + length])
            return ([ZeroCopyFrames.frame(bytes)], CRC32C.checksum(bytes))
        }
        guard let entries = imageEntries(step: step, committedOnly: false) else {
            throw SMPError(.notHeld, "\(config.nodeID) does not hold step \(step)")
        }
        let manifest = NodeImage(step: step, entries: entries.map(\.entry)).manifest()
        let c = ec.placement.dataRows(of: ec.position).firstIndex(of: row)!
        let total = manifest.count + entries.reduce(0) { $0 + $1.entry.slotBytes }
        let lo = c * L + offset, hi = lo + length
        let end = max(lo, min(hi, total))
        // Bytes that fail their CRC at rest are not served: they would decode into
        // garbage. The asker turns to another holder (the data-plane simulation
        // found rebuilds failing over and over on a survivor's flipped byte).
        let layout = NodeImageLayout(manifestBytes: manifest.count, slotBytes: entries.map(\.entry.slotBytes))
        for p in layout.pieces(lo..<end) {
            guard case .slot(let i) = p.source else { continue }
            let e = entries[i]
            if let bad = badChunks(worker: e.id, base: segments[e.id]![e.slot].base, crcs: e.entry.crcs, first: true,
                                   within: p.offset..<p.offset + p.count).first {
                // And it repairs itself from its row (when the step is the committed one).
                if store.committedStep == step, ec.repairing == nil { _ = try? verifyAndRepair(worker: e.id) }
                throw StoreError(.corrupt, "\(config.nodeID) holds worker \(e.id)'s \(bad.name) of step \(step) corrupt")
            }
        }
        var frames: [ZMQFrame] = []
        var crc: UInt32 = 0
        manifest.withUnsafeBytes { mp in
            let pieces = end > lo ? imagePieces(manifest: mp, entries: entries, range: lo..<end) : []
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
}
