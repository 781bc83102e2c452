import FTControl
import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation
import Synchronization

/// Fetching and decoding frames from survivors (`RebuildInstance`): a
/// replacement's rebuild, and the repair of a chunk found corrupt.
extension DataPlane {
    // MARK: fetching and decoding

    /// A holder answered a fetch: its core decides whether the bytes are kept
    /// (good, and awaited), and decodes a frame once k are in.
    func receiveFetched(_ ec: ErasureState, from node: String, step: Int, row: Int, index: Int, offset: Int, crc: UInt32, error: String,
                        frames: [ZMQMessage]) {
        for job in [ec.rebuilding, ec.repairing].compactMap({ $0 }) {
            guard let task = job.core.inFlight[RebuildInstance.Key(row: row, offset: offset)], job.core.step == step,
                  task.requested[index]?.node == node else { continue }
            var problem: String?
            if !error.isEmpty {
                problem = error
            } else {
                var actual: UInt32 = 0
                var count = 0
                for f in frames {
                    f.withUnsafeBytes { actual = CRC32C.checksum($0, continuing: actual) }
                    count += f.count
                }
                if count != task.length { problem = "sent \(count) bytes, \(task.length) asked" }
                else if actual != crc { problem = "a frame failed its CRC32C" }
            }
            let (keep, directives) = job.core.onAnswer(from: node, step: step, row: row, index: index, offset: offset, error: problem,
                                                      now: monotonicSeconds())
            if keep { job.answers[.init(row: row, offset: offset, index: index)] = frames }
            runFetch(job, ec, directives)
            return
        }
    }

    /// Carries out a fetch core's directives (and those its answers give).
    func runFetch(_ job: FetchJob, _ ec: ErasureState, _ directives: [RebuildInstance.Directive]) {
        var work = directives[...]
        while let d = work.popFirst() {
            switch d {
            case .fetch(let node, let step, let row, let index, let offset, let length):
                do {
                    try peer(node, ec).send([SMPMessage.ecFetch(step: step, row: row, index: index, offset: offset, length: length)
                        .envelope(sender: config.nodeID).encoded()])
                } catch {
                    logger.warning("fetch from \(node) not sent: \(error)")
                    work += job.core.unreachable(node, now: monotonicSeconds())
                }
            case .decode(let task):
                var have: [Int: [ZMQMessage]] = [:]
                for i in task.have { have[i] = job.answers.removeValue(forKey: .init(row: task.row, offset: task.offset, index: i)) }
                do {
                    try decodeInto(task, have: have, job, ec)
                } catch {
                    work += job.core.fail("row \(task.row) of step \(job.core.step), bytes at \(task.offset): \(error)")
                }
                keepAlive()
            case .readPrefix:
                let length = (try? NodeImage.manifestLength(prefix: UnsafeRawBufferPointer(job.prefix))) ?? 0
                work += job.core.prefixRead(manifestBytes: length, now: monotonicSeconds())
            case .growPrefix(let bytes):
                let grown = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes, alignment: 64)
                grown.initializeMemory(as: UInt8.self, repeating: 0)
                grown.copyMemory(from: UnsafeRawBufferPointer(job.prefix))
                job.prefix.deallocate()
                job.prefix = grown
            case .parseManifest:
                do {
                    work += job.core.bodyPlanned(imageBytes: try beginRebuildBody(job), now: monotonicSeconds())
                } catch {
                    work += job.core.fail("\(error)")
                }
            case .reserveParity(let row):
                runRound(ec, ec.round.reserveParity(step: job.core.step, row: row))
            case .finished:
                job.answers.removeAll()
                if job === ec.rebuilding { finishRebuild(job, ec) } else { finishRepair(job, ec) }
            case .failed(let reason):
                job.answers.removeAll()
                if job === ec.rebuilding {
                    ec.rebuilding = nil
                    logger.error("rebuild failed: \(reason)")
                    report(.rebuilt(step: job.core.step, error: reason))
                } else {
                    ec.repairing = nil
                    if let id = job.repairWorker { ec.failedRepairs[id] = (job.core.step, reason, job.attempt) }
                    logger.error("repair of worker \(job.repairWorker ?? "?") failed: \(reason)")
                }
            case .warning(let text):
                logger.warning("\(text)")
            }
        }
    }

    /// Decodes a frame into its destination.
    func decodeInto(_ task: RebuildInstance.Decode, have: [Int: [ZMQMessage]], _ job: FetchJob, _ ec: ErasureState) throws {
        switch task.destination {
        case .prefix(let at):
            guard at + task.length <= job.prefix.count else { throw SMPError(.rebuildInconsistent, "prefix frame past the prefix") }
            try decodeFrame(ec, have: have, length: task.length, mine: task.mine, into: job.prefix.baseAddress! + at)
        case .parity(let row):
            guard let buffer = ec.buffers[job.core.step]?[row] else { throw SMPError(.rebuildInconsistent, "no parity buffer of row \(row)") }
            try decodeFrame(ec, have: have, length: task.length, mine: task.mine, into: buffer.baseAddress! + task.offset)
        case .image(let at):
            let range = at..<at + task.length
            if let t = job.targets.first(where: { $0.range.contains(at) }), let base = t.base, t.range.upperBound >= range.upperBound {
                try decodeFrame(ec, have: have, length: task.length, mine: task.mine, into: base + (at - t.range.lowerBound))
                return
            }
            // Across a boundary (manifest, slots, the image's end): decode aside, then scatter.
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: task.length, alignment: 64)
            defer { scratch.deallocate() }
            try decodeFrame(ec, have: have, length: task.length, mine: task.mine, into: scratch.baseAddress!)
            for t in job.targets {
                guard let base = t.base else { continue }
                let lo = max(t.range.lowerBound, range.lowerBound), hi = min(t.range.upperBound, range.upperBound)
                if lo < hi { memcpy(base + (lo - t.range.lowerBound), scratch.baseAddress! + (lo - at), hi - lo) }
            }
        }
    }

    /// Decodes one frame of a row from k holders' frames (`have`: codeword
    /// index -> data frames) into `dest` (`length` bytes of codeword index `mine`).
    func decodeFrame(_ ec: ErasureState, have: [Int: [ZMQMessage]], length: Int, mine: Int, into dest: UnsafeMutableRawPointer) throws {
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

    // MARK: rebuilding

    /// A replacement node: rebuild its image and parity for `step` from the
    /// group, without holding the event loop (`RebuildInstance`); `rebuilt`
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
            if current.core.step == step && current.core.lost == Set(lost) {
                logger.info("rebuild of step \(step) already in progress")
                return
            }
            logger.info("rebuild of step \(current.core.step) abandoned for step \(step), lost \(lost)")
        }
        let job = FetchJob(core: ec.fetchCore(step: step, lost: Set(lost), purpose: .node), started: monotonicSeconds())
        job.prefix = .allocate(byteCount: min(ErasureState.frameBytes, ec.chunkBytes), alignment: 64)
        job.prefix.initializeMemory(as: UInt8.self, repeating: 0)
        ec.rebuilding = job
        logger.info("rebuilding node \(config.nodeID) for step \(step) from parity",
                    metadata: ["lost": "\(lost)", "frame_bytes": "\(ErasureState.frameBytes)", "window": "\(ErasureState.rebuildWindow)"])
        runFetch(job, ec, job.core.start(now: monotonicSeconds()))
    }

    /// The manifest is in: create the workers' slots; returns the image's length.
    func beginRebuildBody(_ job: FetchJob) throws -> Int {
        let parsed = try NodeImage.parse(UnsafeRawBufferPointer(job.prefix))
        guard parsed.step == job.core.step else { throw SMPError(.rebuildInconsistent, "rebuilt image is of step \(parsed.step), not \(job.core.step)") }
        job.parsed = parsed
        let layout = parsed.layout
        job.targets = [(0..<layout.manifestBytes, nil)]
        for (i, base) in try memory.slotsForRebuild(parsed).enumerated() {
            job.targets.append((layout.slotStart(i)..<layout.slotStart(i) + parsed.entries[i].slotBytes, base))
        }
        return layout.total
    }

    /// Every frame is in: check the slots against their CRCs, install them, report.
    func finishRebuild(_ job: FetchJob, _ ec: ErasureState) {
        let step = job.core.step
        func fail(_ reason: String) { runFetch(job, ec, job.core.fail(reason)) }
        guard let parsed = job.parsed else { return fail("rebuild finished without a manifest") }
        for e in parsed.entries {
            let id = e.registration.workerID
            if let bad = memory.badChunks(worker: id, slot: 0, crcs: e.crcs, first: true).first?.name {
                return fail("rebuilt worker \(id), \(bad) fails its CRC32C")
            }
        }
        do {
            for e in parsed.entries { try memory.installCommitted(worker: e.registration.workerID, step: step, crcs: e.crcs) }
        } catch {
            return fail("\(error)")
        }
        ec.round.installRebuiltParity(step: step)
        ec.rebuilding = nil
        let seconds = monotonicSeconds() - job.started
        logger.info("rebuilt node \(config.nodeID) for step \(step) from parity",
                    metadata: ["bytes": "\(job.core.imageBytes)", "ms": "\(Int(seconds * 1000))", "workers": "\(parsed.entries.count)",
                               "decoded_bytes": "\(job.core.bytesDecoded)", "frames": "\(job.core.queue.count)"])
        report(.rebuilt(step: step, error: ""))
    }

    // MARK: corruption is an erasure

    /// Checks a worker's committed slot. A chunk that fails its CRC is
    /// repaired from its row's other chunks (as if lost) by a fetch job on
    /// the event loop (`RebuildInstance`, `.ranges`): false while that runs
    /// (the caller holds the request and asks again once it is over).
    /// `unlessVerified`: skip a slot already checked at this step (slices
    /// served to peers); a worker's own restore always checks. Without
    /// erasure coding nothing can be repaired: the reader's own CRC check
    /// names a corrupt chunk.
    func verifyAndRepair(worker id: String, unlessVerified: Bool = false) throws(StoreError) -> Bool {
        guard let ec = erasure, let point = try memory.store.restorePoint(worker: id), memory.store.workers[id] != nil else { return true }
        if unlessVerified, memory.wasVerified(worker: id, point) { return true }
        if ec.repairing != nil { return false }
        let bad = memory.badChunks(worker: id, slot: point.slot, crcs: point.crcs)
        guard !bad.isEmpty else {
            if let f = ec.failedRepairs[id], f.step == point.step { ec.failedRepairs[id] = nil }
            memory.markVerified(worker: id, point)
            return true
        }
        let names = bad.map(\.name).joined(separator: ", ")
        // A failed repair is tried again (its answers may have come from peers that were
        // changing state in the recovery), up to `repairAttempts` times for the same step.
        let previous = ec.failedRepairs[id].flatMap { $0.step == point.step ? $0 : nil }
        if let f = previous, f.attempts >= ErasureState.repairAttempts {
            throw StoreError(.corrupt, "worker \(id): \(names) fail their CRC32C and repair failed \(f.attempts) times: \(f.reason)")
        }
        guard let entries = memory.imageEntries(step: point.step, committedOnly: true), let i = entries.firstIndex(where: { $0.id == id }) else {
            throw StoreError(.corrupt, "worker \(id): \(names) fail their CRC32C; step \(point.step) is not committed on every worker")
        }
        logger.warning("worker \(id): \(names) fail their CRC32C; repairing from parity",
                       metadata: ["attempt": "\((previous?.attempts ?? 0) + 1)"])
        let manifest = NodeImage(step: point.step, entries: entries.map(\.entry)).manifest()
        let layout = NodeImageLayout(manifestBytes: manifest.count, slotBytes: entries.map(\.entry.slotBytes))
        let rows = ec.placement.dataRows(of: ec.position)
        let ranges = bad.flatMap { layout.chunkRanges(slot: i, range: $0.range, chunkBytes: ec.chunkBytes) }.map { (row: rows[$0.chunk], range: $0.range) }
        let job = FetchJob(core: ec.fetchCore(step: point.step, lost: [], purpose: .ranges(ranges)), started: monotonicSeconds())
        job.repairWorker = id
        job.attempt = (previous?.attempts ?? 0) + 1
        let slot = memory.slotBase(worker: id, slot: point.slot)
        job.corruptBefore = bad.map { ($0.range, Array(UnsafeRawBufferPointer(start: slot + $0.range.lowerBound, count: $0.range.count))) }
        job.targets = entries.enumerated().map { j, e in
            (layout.slotStart(j)..<layout.slotStart(j) + e.entry.slotBytes, j == i ? memory.slotBase(worker: e.id, slot: e.slot) : nil)
        }
        ec.repairing = job
        runFetch(job, ec, job.core.start(now: monotonicSeconds()))
        // Over already (it failed at once): check again, which names the failure.
        return ec.repairing == nil ? try verifyAndRepair(worker: id, unlessVerified: unlessVerified) : false
    }

    /// A repair's frames are decoded: check the worker's slot again (held
    /// requests are answered next, and check it too).
    func finishRepair(_ job: FetchJob, _ ec: ErasureState) {
        ec.repairing = nil
        guard let id = job.repairWorker, let point = try? memory.store.restorePoint(worker: id), point.step == job.core.step else { return }
        let bad = memory.badChunks(worker: id, slot: point.slot, crcs: point.crcs)
        if bad.isEmpty {
            logger.info("repaired worker \(id) from parity", metadata: ["bytes": "\(job.core.bytesDecoded)"])
        } else {
            // Whether the decode changed the bytes tells a row whose parity encodes these very
            // bytes (unchanged) from one whose parity and chunks disagree (changed).
            let base = memory.slotBase(worker: id, slot: point.slot)
            let how = bad.map { b -> String in
                guard let before = job.corruptBefore.first(where: { $0.range == b.range }) else { return "\(b.name): not checked before" }
                let now = UnsafeRawBufferPointer(start: base + b.range.lowerBound, count: b.range.count)
                let changed = zip(before.bytes, now).reduce(0) { $0 + ($1.0 == $1.1 ? 0 : 1) }
                return "\(b.name): the decode changed \(changed) of \(b.range.count) bytes"
            }
            logger.error("repair of worker \(id) for step \(job.core.step) failed", metadata: ["detail": "\(how.joined(separator: "; "))"])
            ec.failedRepairs[id] = (job.core.step, "\(bad.map(\.name).joined(separator: ", ")) still fail their CRC32C after repair", job.attempt)
        }
    }
}
