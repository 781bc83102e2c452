import FTCore
import FTPersist
import FTSystem
import Foundation
import Logging

/// The persistent tier at the SMP (README, "Persistent tier"): writing this
/// node's part of a committed step when the coordinator says `persist`, and
/// loading one back into the slots before the job starts (`--resume-step`).
extension SMPServer {
    // MARK: writing

    /// `persist(step)`: starts writing this node's part of `step` (its
    /// committed slots and its parity) on the persist thread; `persisted`
    /// goes back when it ends (`checkPersist`), or at once when it cannot start.
    func startPersist(step: Int, nodes: [String], durable: Int?) {
        func refuse(_ code: PersistErrorCode, _ why: String) {
            logger.warning("cannot persist step \(step): \(why)")
            agent.report(.persisted(step: step, bytes: 0, error: "\(code.rawValue): \(why)"))
        }
        guard let persister else { return refuse(.unwritable, "this SMP has no persist directory (ft-smp --persist-dir)") }
        if let running = persister.running {
            return refuse(.io, "step \(running.step) is still being written")
        }
        guard let entries = memory.imageEntries(step: step, committedOnly: true) else {
            return refuse(.io, "this node does not hold step \(step) committed")
        }
        let image = NodeImage(step: step, entries: entries.map(\.entry))
        let manifest = image.manifest()
        let layout = NodeImageLayout(manifestBytes: manifest.count, slotBytes: entries.map(\.entry.slotBytes))
        var part = PersistedPart(job: config.jobID, node: config.nodeID, step: step, k: 0, m: 0, chunkBytes: 0, group: [], position: 0,
                                 nodes: nodes, imageBytes: layout.total, blockBytes: PersistedPart.defaultBlockBytes, imageCRCs: [],
                                 parityRows: [], writtenAt: 0)
        var copies: [UnsafeMutableRawBufferPointer] = []
        if let ec = dataPlane?.erasure {
            part.k = ec.layout.k
            part.m = ec.layout.m
            part.chunkBytes = ec.chunkBytes
            part.group = ec.members
            part.position = ec.position
            for (row, index) in ec.placement.parityRows(of: ec.position) {
                guard let source = ec.buffers[step]?[row] else {
                    for c in copies { c.deallocate() }
                    return refuse(.io, "this node holds no parity of row \(row) for step \(step)")
                }
                // Copied in 8 MiB pieces with heartbeats between: the buffers are reused after the next commit.
                let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: source.count, alignment: 64)
                var done = 0
                while done < source.count {
                    let n = min(8 << 20, source.count - done)
                    memcpy(copy.baseAddress! + done, source.baseAddress! + done, n)
                    done += n
                    keepAlive()
                }
                copies.append(copy)
                part.parityRows.append(.init(row: row, parityIndex: index, crcs: []))
            }
        }
        for e in entries { memory.pin(worker: e.id, slot: e.slot) }
        persister.keepDurable = durable
        logger.info("persisting step \(step): \(layout.total) image bytes and \(copies.count) parity chunks to \(persister.root)")
        persister.start(Persister.Job(part: part, manifest: manifest, layout: layout, bases: memory.slotBases(entries), parity: copies))
    }

    /// On every turn of the loop: a persist that ended unpins its slots, prunes old steps and says `persisted`.
    func checkPersist() {
        guard let persister, let outcome = persister.poll() else { return }
        memory.unpinAll()
        switch outcome.result {
        case .success(let r):
            let mbps = r.seconds > 0 ? Double(r.bytes) / r.seconds / 1e6 : 0
            logger.info("persisted step \(outcome.step): \(r.bytes) bytes in \(String(format: "%.2f", r.seconds)) s (\(String(format: "%.0f", mbps)) MB/s)")
            PartWriter.prune(root: persister.root, node: config.nodeID, keep: persister.keep, newest: outcome.step,
                             sparing: persister.keepDurable)
            agent.report(.persisted(step: outcome.step, bytes: r.bytes, error: ""))
        case .failure(let e):
            logger.error("persist of step \(outcome.step) failed (\(e.codeName)): \(e.message); nothing of it is kept, training goes on in memory")
            agent.report(.persisted(step: outcome.step, bytes: 0, error: "\(e.codeName): \(e.message)"))
        }
    }

    // MARK: loading

    /// `loadPersisted(step)`, in a running job whose memory cannot recover:
    /// ends this node's workers (none may write a slot meanwhile), loads
    /// `step` from disk, starts them again and answers `rebuilt`.
    func reloadPersisted(step: Int) throws {
        persister?.stopAndWait()
        memory.unpinAll()
        let ended = supervisor.killAllAndWait()
        for id in ended {
            workers.forget(worker: id)
            memory.workerExited(id)
        }
        agent.forgetProtected()
        dataPlane?.restore(step: step)
        do {
            try loadPersisted(step: step)
            agent.report(.rebuilt(step: step, error: ""))
        } catch {
            logger.error("cannot load step \(step) from disk: \(error)")
            agent.report(.rebuilt(step: step, error: "\(error)"))
        }
        let respawn = ended.isEmpty ? (0..<config.workerCount).map { "w\($0)" }.filter { supervisor.children[$0] == nil } : ended
        for id in respawn { try supervisor.spawn(workerID: id, epoch: agent.epoch) }
    }

    /// Before the workers start: puts this node's part of persisted `step`
    /// (decoded from its group's parts if its own is damaged or missing) into
    /// the slots, every chunk checked, and holds it committed: the hello says
    /// so and the coordinator restores the workers from it.
    func loadPersisted(step: Int) throws {
        guard let root = config.persistDirectory else {
            throw SMPError(.notHeld, "--resume-step needs --persist-dir")
        }
        let started = monotonicSeconds()
        let catalog = PersistCatalog(root: root)
        guard catalog.parts[step] != nil else {
            throw SMPError(.notHeld, "\(root) holds no part of step \(step) (steps there: \(PersistCatalog.steps(in: root)))")
        }
        var loader = ImageLoader(catalog: catalog)
        loader.log = { [logger] in logger.warning("\($0)") }
        let sink = ImageSink(memory: memory)
        var delivered = 0
        let loaded: ImageLoader.Loaded
        do {
            loaded = try loader.load(step: step, node: config.nodeID) { offset, bytes in
                try sink.accept(offset, bytes)
                delivered += bytes.count
                if delivered % (16 << 20) < bytes.count { keepAlive() }
                if delivered % (256 << 20) < bytes.count { logger.info("loading step \(step): \(delivered >> 20) MiB") }
            }
        } catch let e as PersistError {
            throw SMPError(.notHeld, "cannot load step \(step) of node \(config.nodeID) from \(root): \(e.message) (\(e.codeName))")
        }
        guard let image = sink.image, image.step == step else {
            throw SMPError(.rebuildInconsistent, "the image of step \(step) has no manifest of that step")
        }
        for e in image.entries {
            let id = e.registration.workerID
            try memory.installCommitted(worker: id, step: step, crcs: e.crcs)
            if let bad = memory.badChunks(worker: id, slot: 0, crcs: e.crcs, first: true).first {
                throw SMPError(.rebuildInconsistent, "worker \(id)'s slot of step \(step) fails its CRC32C after loading (\(bad.name))")
            }
        }
        let source = loaded.fromOwnPart ? "from this node's part" : "decoded from its group's parts"
        let seconds = String(format: "%.2f", monotonicSeconds() - started)
        logger.info("loaded step \(step) from \(root): \(image.entries.count) workers, \(loaded.bytesRead) bytes \(source) in \(seconds) s")
    }
}
