import FTCore
import FTErasure
import FTSystem
import Foundation
import Logging

/// The node's snapshots in memory (ARCHITECTURE.md, "The snapshot path").
///
/// Owns the store core (`SnapshotStoreInstance`: which slot of which worker
/// holds which step, staged or committed) and the shared memory it describes:
/// two pre-faulted 0600 slots per worker, named
/// `/ft-<job>-<node>-p<pid>-<worker>-s<slot>`, within the node's budget
/// (`memoryLimit` and /dev/shm's free space), plus which committed slots were
/// last checked against their CRCs. The other components read the store's
/// state (`store`, read-only) and change it only through the methods here;
/// none of them holds a segment. The node image that a round sends and a
/// rebuild writes (`NodeImage`: a manifest, then every worker's slot) is laid
/// over these slots here.
final class NodeMemory {
    private(set) var store: SnapshotStoreInstance
    private var segments: [String: [SharedMemorySegment]] = [:]
    /// The shared-memory budget in force (bytes).
    let memoryLimit: Int
    /// The committed slot each worker's bytes were last checked in (step, slot).
    private var verifiedSlots: [String: (step: Int, slot: Int)] = [:]
    private let jobID: String
    private let nodeID: String
    private let logger: Logger
    /// Called between pieces of long work (faulting a slot in, checking CRCs):
    /// the event loop says it is alive there.
    var keepAlive: () -> Void = {}

    init(rule: any CommitRule, memoryLimit: Int, jobID: String, nodeID: String, logger: Logger) {
        store = SnapshotStoreInstance(rule: rule)
        self.memoryLimit = memoryLimit
        self.jobID = jobID
        self.nodeID = nodeID
        self.logger = logger
        // Segments left by a previous SMP of this node that died: its memory is
        // lost by definition (a replacement rebuilds from parity), and the names
        // must be free for this one.
        let prefix = "ft-\(jobID)-\(nodeID)-"
        let stale = ((try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? []).filter { $0.hasPrefix(prefix) }
        for name in stale { SharedMemorySegment.unlink(name: "/" + name) }
        if !stale.isEmpty { logger.info("removed \(stale.count) shared-memory segments left by a previous SMP of \(nodeID)") }
    }

    /// Shared memory allocated now (bytes, every slot of every worker).
    var sharedMemoryBytes: Int { segments.values.reduce(0) { $0 + $1.reduce(0) { $0 + $1.count } } }

    /// `/ft-JOB-NODE-pPID-WORKER-sSLOT`: the SMP's pid is in the name so that
    /// an SMP that was stopped, replaced and then continued (and fenced) frees
    /// only its own segments, never its replacement's.
    func segmentName(worker: String, slot: Int) -> String {
        "/ft-\(jobID)-\(nodeID)-p\(getpid())-\(worker)-s\(slot)"
    }

    /// The start of a worker's slot; the worker must be registered.
    func slotBase(worker id: String, slot: Int) -> UnsafeMutableRawPointer { segments[id]![slot].base }

    // MARK: registering

    /// Registers a worker, and for a new one allocates and pre-faults its two
    /// slots within the budget (nothing is kept when that fails). Returns the
    /// store's outcome and the slots' names.
    func register(_ registration: WorkerRegistration) throws(StoreError) -> (outcome: SnapshotStoreInstance.RegisterOutcome, names: [String]) {
        let id = registration.workerID
        let outcome = try store.register(registration)
        let names = (0..<2).map { segmentName(worker: id, slot: $0) }
        guard case .new(let bytes) = outcome else { return (outcome, names) }
        do throws(StoreError) {
            try checkMemory(worker: id, slotBytes: bytes)
        } catch {
            store.remove(worker: id)
            throw error
        }
        do {
            segments[id] = try names.map { try createSlot(name: $0, count: bytes) }
        } catch {
            store.remove(worker: id)
            for name in names { SharedMemorySegment.unlink(name: name) }
            let free = (try? SharedMemorySegment.space().free).map(String.init) ?? "unknown"
            throw StoreError(.memoryLimit, "could not allocate 2 × \(bytes) bytes of shared memory for worker \(id) "
                + "(/dev/shm has \(free) bytes free): \(error)")
        }
        return (outcome, names)
    }

    /// Whether two slots of `slotBytes` fit this SMP's budget (`memoryLimit`)
    /// and /dev/shm's free space; a `memory_limit` error naming the bytes
    /// needed and available if not.
    func checkMemory(worker: String, slotBytes: Int) throws(StoreError) {
        guard let needed = Checked.product(slotBytes, 2) else {
            throw StoreError(.memoryLimit, "worker \(worker) needs 2 × \(slotBytes) bytes of shared memory, more than any node has")
        }
        let used = sharedMemoryBytes
        if needed > memoryLimit - used {
            throw StoreError(.memoryLimit, "worker \(worker) needs \(needed) bytes of shared memory (2 slots of \(slotBytes)); "
                + "node \(nodeID) has \(max(0, memoryLimit - used)) of its budget of \(memoryLimit) bytes left "
                + "(\(used) in use; ft-smp --memory-limit)")
        }
        if let free = try? SharedMemorySegment.space().free, needed > free {
            throw StoreError(.memoryLimit, "worker \(worker) needs \(needed) bytes of shared memory (2 slots of \(slotBytes)); "
                + "/dev/shm has \(free) bytes available")
        }
    }

    /// A slot segment, pre-faulted in 4 MiB pieces with heartbeats between
    /// (a 1 GiB slot takes a second to fault in, far longer on a loaded VM;
    /// each piece is one system call, kept short for the cores' sake, see
    /// `ZMQSocket.bulkReceiveBufferBytes`).
    private func createSlot(name: String, count: Int) throws -> SharedMemorySegment {
        let segment = try SharedMemorySegment.create(name: name, count: count, prefault: false)
        var offset = 0
        while offset < count {
            let n = min(4 << 20, count - offset)
            try segment.prefault(offset..<offset + n)
            offset += n
            keepAlive()
        }
        return segment
    }

    // MARK: the store's transitions

    func begin(worker id: String, step: Int) throws(StoreError) -> SnapshotStoreInstance.BeginOutcome {
        try store.begin(worker: id, step: step)
    }

    func staged(worker id: String, step: Int, slot: Int, crcs: [UInt32]) throws(StoreError) -> SnapshotStoreInstance.StagedOutcome {
        try store.staged(worker: id, step: step, slot: slot, crcs: crcs)
    }

    func commit(step: Int) { store.commit(step: step) }
    func pin(worker id: String, slot: Int) { store.pin(worker: id, slot: slot) }
    func unpinAll() { store.unpinAll() }

    /// The start of every entry's slot, for a reader on another thread (the
    /// persist thread): the segments stay mapped until `freeAll`.
    func slotBases(_ entries: [ImageEntry]) -> [UnsafeRawPointer] {
        entries.map { UnsafeRawPointer(segments[$0.id]![$0.slot].base) }
    }
    func abort(step: Int) { store.abort(step: step) }
    func prepareRestore(step: Int?) -> Bool { store.prepareRestore(step: step) }
    func discardUncommitted(worker id: String) { store.discardUncommitted(worker: id) }
    func workerExited(_ id: String) { store.workerExited(id) }

    /// A rebuilt worker's slot 0 holds `step` committed (its CRCs checked).
    func installCommitted(worker id: String, step: Int, crcs: [UInt32]) throws(StoreError) {
        try store.installCommitted(worker: id, step: step, slot: 0, crcs: crcs)
    }

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

    /// A rebuild read the image's manifest: registers each worker it names
    /// and allocates its slots (within the budget). Returns where each
    /// entry's bytes go: slot 0 of its worker.
    func slotsForRebuild(_ image: NodeImage) throws -> [UnsafeMutableRawPointer] {
        var out: [UnsafeMutableRawPointer] = []
        for e in image.entries {
            let id = e.registration.workerID
            do throws(StoreError) {
                _ = try register(e.registration)
            } catch {
                logger.error("rebuild refused: \(error)")
                throw error
            }
            let segment = segments[id]![0]
            guard segment.count == e.slotBytes else {
                throw SMPError(.rebuildInconsistent, "image entry \(id): slot of \(segment.count) bytes, \(e.slotBytes) expected")
            }
            out.append(segment.base)
        }
        return out
    }

    // MARK: checking

    /// The chunks of a worker's slot that fail their CRCs (`crcs`).
    /// `within`: only the chunks that overlap these bytes of the slot.
    func badChunks(worker id: String, slot: Int, crcs: [UInt32], first: Bool = false,
                   within: Range<Int>? = nil) -> [(name: String, range: Range<Int>)] {
        guard let layout = store.workers[id]?.layout, let base = segments[id]?[slot].base else { return [] }
        var out: [(String, Range<Int>)] = []
        for entry in layout.entries {
            for chunk in 0..<entry.chunkCount {
                let r = layout.chunkRange(entry, chunk: chunk)
                let start = entry.slotOffset + r.lowerBound
                if let within, !within.overlaps(start..<start + r.count) { continue }
                guard CRC32C.checksum(UnsafeRawBufferPointer(start: base + start, count: r.count)) != crcs[entry.firstChunk + chunk] else { continue }
                out.append(("tensor \(entry.spec.name), chunk \(chunk)", start..<start + r.count))
                if first { return out }
                if chunk % 64 == 63 { keepAlive() }
            }
            keepAlive()
        }
        return out
    }

    /// The first worker whose slot staged for `step` fails the CRC32Cs the
    /// worker sent with it, and the chunk's name: its bytes changed after the
    /// worker wrote them (a stray write, a memory fault). Parity folded from
    /// them would decode into the same wrong bytes, so such a round is never
    /// protected.
    func corruptStagedSlot(step: Int) -> (worker: String, chunk: String)? {
        for (id, w) in store.workers.sorted(by: { $0.key < $1.key }) {
            guard let slot = w.slots.firstIndex(where: { if case .staged(step, _) = $0 { true } else { false } }) else { continue }
            if let bad = badChunks(worker: id, slot: slot, crcs: w.slots[slot].crcs, first: true).first { return (id, bad.name) }
        }
        return nil
    }

    /// Test-only fault injection: flips one byte in the middle of the first
    /// worker's slot staged for `step`, as a stray write after the worker wrote it.
    func flipStagedByte(step: Int) {
        for (id, w) in store.workers.sorted(by: { $0.key < $1.key }) {
            guard let slot = w.slots.firstIndex(where: { if case .staged(step, _) = $0 { true } else { false } }),
                  let base = segments[id]?[slot].base else { continue }
            let p = (base + w.layout.slotBytes / 2).assumingMemoryBound(to: UInt8.self)
            p.pointee ^= 0x40
            return
        }
    }

    /// Whether `point` of worker `id` was checked already.
    func wasVerified(worker id: String, _ point: SnapshotStoreInstance.RestorePoint) -> Bool {
        verifiedSlots[id].map { $0.step == point.step && $0.slot == point.slot } ?? false
    }

    func markVerified(worker id: String, _ point: SnapshotStoreInstance.RestorePoint) { verifiedSlots[id] = (point.step, point.slot) }

    // MARK: the end

    /// Unlinks every segment (at shutdown, once nothing reads them).
    func freeAll() {
        for (_, segs) in segments { for s in segs { SharedMemorySegment.unlink(name: s.name) } }
        segments.removeAll()
    }
}

/// A worker's slot in a node image: the worker, which of its slots, and its entry.
typealias ImageEntry = (id: String, slot: Int, entry: NodeImage.Entry)
