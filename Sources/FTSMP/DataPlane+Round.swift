import FTControl
import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation

/// Protecting a round (every local worker staged it: the round core sends
/// each data chunk, frame by frame, to its row's parity holders, folds what
/// it receives into parity, and reports `protected` once every holder acked),
/// and serving codeword bytes to a peer's rebuild or repair.
extension DataPlane {
    // MARK: protecting a round

    /// Every local worker staged `step`: the round core sends each data chunk,
    /// frame by frame, to its row's parity holders.
    func startProtecting(step: Int) {
        stagedRound = (step, epoch())
        protectStagedRound()
    }

    /// Protects the round staged last, while it is still staged, under the
    /// epoch it was staged in (also when the layout comes after: holders
    /// restored in a newer epoch refuse it, as they refuse any voided round).
    func protectStagedRound() {
        guard let (step, stagedEpoch) = stagedRound, memory.store.stagedStep == step else { return }
        guard let ec = erasure else {
            // No layout (yet): a job without erasure coding is protected now; in one
            // with it the coordinator does not count this, and the round is protected
            // when the layout comes (`applyLayout`).
            report(.protected(step: step, layoutChunkBytes: 0))
            return
        }
        guard let entries = memory.imageEntries(step: step, committedOnly: false) else { return }
        if ec.stagedAt[step] == nil { ec.stagedAt[step] = monotonicSeconds() }
        let manifest = NodeImage(step: step, entries: entries.map(\.entry)).manifest()
        ec.outgoingImage = (step, manifest, entries)
        let total = manifest.count + entries.reduce(0) { $0 + $1.entry.slotBytes }
        runRound(ec, ec.round.startRound(step: step, imageBytes: total, epoch: stagedEpoch))
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
                    let pieces = memory.imagePieces(manifest: mp, entries: image.entries, range: f.imageRange)
                    var crc: UInt32 = 0
                    for p in pieces { crc = CRC32C.checksum(p, continuing: crc) }
                    if let index = f.foldLocally { fold(ec, step: f.step, row: f.row, parityIndex: index, dataIndex: f.dataIndex, offset: f.offset, pieces) }
                    let header = SMPMessage.ecChunk(step: f.step, row: f.row, dataIndex: f.dataIndex, offset: f.offset, length: f.length, crc: crc)
                        .envelope(sender: config.nodeID, epoch: f.epoch).encoded()
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
                report(.protected(step: step, layoutChunkBytes: ec.chunkBytes))
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
            let directives = ec.round.onChunkFrame(from: envelope.sender, epoch: envelope.epoch, ownEpoch: epoch(),
                                                   step: step, row: row, dataIndex: index, offset: offset, length: length,
                                                   frameBytes: data.reduce(0) { $0 + $1.count }, crcMatches: actual == crc,
                                                   committedStep: memory.store.committedStep)
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

    /// Frames for `pieces` of the image: zero-copy over slot memory (stable while
    /// a round is in flight or the job is paused for recovery); the manifest's
    /// bytes are copied (its array is not kept).
    func wireFrames(_ pieces: [UnsafeRawBufferPointer], manifest: UnsafeRawBufferPointer) -> [ZMQFrame] {
        pieces.map { p in
            if let b = p.baseAddress, let m = manifest.baseAddress, b >= m, b < m + manifest.count { return .bytes(Array(p)) }
            return ZeroCopyFrames.frame(p)
        }
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
        guard let entries = memory.imageEntries(step: step, committedOnly: false) else {
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
            if let bad = memory.badChunks(worker: e.id, slot: e.slot, crcs: e.entry.crcs, first: true,
                                          within: p.offset..<p.offset + p.count).first {
                // And it repairs itself from its row (when the step is the committed one).
                if memory.store.committedStep == step, ec.repairing == nil { _ = try? verifyAndRepair(worker: e.id) }
                throw StoreError(.corrupt, "\(config.nodeID) holds worker \(e.id)'s \(bad.name) of step \(step) corrupt")
            }
        }
        var frames: [ZMQFrame] = []
        var crc: UInt32 = 0
        manifest.withUnsafeBytes { mp in
            let pieces = end > lo ? memory.imagePieces(manifest: mp, entries: entries, range: lo..<end) : []
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
