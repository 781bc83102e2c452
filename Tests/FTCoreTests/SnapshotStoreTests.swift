import Testing
@testable import FTCore

func registration(_ id: String, rank: Int = 0, size: Int = 1, bytes: Int = 10_000) -> WorkerRegistration {
    WorkerRegistration(workerID: id, dpRank: rank, dpSize: size, chunkBytes: 4096, specs: [
        TensorSpec(name: "params", dtype: .f32, shape: [bytes / 4], role: .param, replicated: true),
        TensorSpec(name: "rng", dtype: .u8, shape: [16], role: .rng, replicated: false),
    ])
}

extension SnapshotStoreInstance.BeginOutcome {
    /// The slot to write, or nil for a skip (for `#require`).
    var slot: Int? { if case .write(let slot) = self { slot } else { nil } }
    var skipReason: String? { if case .skip(let reason) = self { reason } else { nil } }
}

@Suite("Snapshot store instance")
struct SnapshotStoreTests {
    func crcs(_ store: SnapshotStoreInstance, _ id: String) -> [UInt32] {
        Array(repeating: 7, count: store.workers[id]!.layout.chunkCount)
    }

    /// One full round for one worker; returns the slot written.
    @discardableResult
    func round(_ store: inout SnapshotStoreInstance, _ id: String, _ step: Int) throws -> Int {
        let slot = try #require(try store.begin(worker: id, step: step).slot, "step \(step) skipped")
        _ = try store.staged(worker: id, step: step, slot: slot, crcs: crcs(store, id))
        return slot
    }

    @Test("slots alternate and the committed slot is never the one written")
    func alternate() throws {
        var store = SnapshotStoreInstance()
        #expect(try store.register(registration("w0")) == .new(slotBytes: store.workers["w0"]!.layout.slotBytes))
        var previous: Int?
        for step in 1...20 {
            let committedBefore = store.workers["w0"]!.committedSlot
            let slot = try #require(try store.begin(worker: "w0", step: step).slot, "step \(step) skipped")
            #expect(slot != committedBefore)
            if let previous { #expect(slot != previous) }
            previous = slot
            #expect(try store.staged(worker: "w0", step: step, slot: slot, crcs: crcs(store, "w0")) == .committed(step: step))
            #expect(store.workers["w0"]!.committedSlot == slot)
            #expect(try store.restorePoint(worker: "w0")?.step == step)
        }
    }

    @Test("random event sequences never write or free the committed slot, and commit only fully staged steps (seeded)")
    func randomSequences() throws {
        for seed in 0..<200 {
            var rng = LCG(seed: UInt64(seed))
            var store = SnapshotStoreInstance()
            let ids = ["w0", "w1", "w2"]
            for (i, id) in ids.enumerated() { _ = try store.register(registration(id, rank: i, size: 3)) }
            var next = [String: Int]()
            var writing = [String: (Int, Int)]()
            for _ in 0..<200 {
                let id = ids[Int(rng.next() % 3)]
                let before = store
                switch rng.next() % 10 {
                case 0:
                    store.workerExited(id)
                    writing[id] = nil
                    next[id] = (store.workers[id]!.lastCommitted ?? 0)
                case 1...4:
                    let step = next[id, default: 0] + 1
                    next[id] = step
                    if case .write(let slot) = try store.begin(worker: id, step: step) {
                        #expect(before.workers[id]!.committedSlot != slot, "seed \(seed): wrote the committed slot")
                        writing[id] = (step, slot)
                    } else {
                        writing[id] = nil
                    }
                default:
                    if let (step, slot) = writing[id] {
                        writing[id] = nil
                        if case .committed(let committed) = try store.staged(worker: id, step: step, slot: slot, crcs: crcs(store, id)) {
                            for w in store.workers.values { #expect(w.lastCommitted == committed, "seed \(seed)") }
                        }
                    }
                }
                // A committed version is replaced only by a newer one, never lost.
                for w in ids {
                    if let old = before.workers[w]!.lastCommitted {
                        #expect((store.workers[w]!.lastCommitted ?? -1) >= old, "seed \(seed)")
                        #expect(store.workers[w]!.committedSlot != nil, "seed \(seed)")
                    }
                }
                // Every worker's committed step is the node's committed step.
                if let node = store.committedStep {
                    for w in store.workers.values { #expect(w.lastCommitted == node, "seed \(seed)") }
                }
            }
        }
    }

    @Test("a torn copy is dropped on worker exit; the committed slot stands")
    func tornCopy() throws {
        var store = SnapshotStoreInstance()
        _ = try store.register(registration("w0"))
        let slot1 = try round(&store, "w0", 1)
        let begun = try store.begin(worker: "w0", step: 2)
        let slot2 = try #require(begun.slot, "step 2 not begun as a write: \(begun)")
        #expect(slot2 != slot1)
        store.workerExited("w0")
        #expect(store.workers["w0"]!.slots[slot2] == .empty)
        #expect(try store.restorePoint(worker: "w0") == .init(step: 1, slot: slot1, crcs: crcs(store, "w0")))
        // The restarted worker re-registers, restores step 1, and redoes step 2.
        #expect(try store.register(registration("w0")) == .rejoined(committedStep: 1))
        #expect(try store.begin(worker: "w0", step: 2) == .write(slot: slot2))
    }

    @Test("a snapshot due while the previous round is uncommitted is skipped and counted")
    func skip() throws {
        var store = SnapshotStoreInstance()
        _ = try store.register(registration("w0", rank: 0, size: 2))
        _ = try store.register(registration("w1", rank: 1, size: 2))
        let begun = try store.begin(worker: "w0", step: 1)
        let a = try #require(begun.slot, "step 1 not begun as a write: \(begun)")
        #expect(try store.staged(worker: "w0", step: 1, slot: a, crcs: crcs(store, "w0")) == .waiting)
        let reason = try #require(try store.begin(worker: "w0", step: 2).skipReason, "not skipped")
        #expect(reason.contains("step 1"))
        #expect(store.workers["w0"]!.skipped == 1)
        try round(&store, "w1", 1)
        #expect(store.committedStep == 1)
        #expect(store.workers["w0"]!.lastCommitted == 1)
    }

    @Test("a round another worker moved past is dropped instead of skipping forever")
    func deadRound() throws {
        var store = SnapshotStoreInstance()
        _ = try store.register(registration("w0", rank: 0, size: 2))
        _ = try store.register(registration("w1", rank: 1, size: 2))
        let a = try #require(try store.begin(worker: "w0", step: 2).slot, "step 2 of w0 not begun as a write")
        _ = try store.staged(worker: "w0", step: 2, slot: a, crcs: crcs(store, "w0"))
        let b = try #require(try store.begin(worker: "w1", step: 3).slot, "step 3 of w1 not begun as a write")
        _ = try store.staged(worker: "w1", step: 3, slot: b, crcs: crcs(store, "w1"))
        // w0's round 2 can never commit: w1 is past it. w0 writes 3 instead.
        let c = try #require(try store.begin(worker: "w0", step: 3).slot, "w0 skipped a round that can never commit")
        #expect(store.workers["w0"]!.aborted == 1)
        #expect(try store.staged(worker: "w0", step: 3, slot: c, crcs: crcs(store, "w0")) == .committed(step: 3))
    }

    @Test("bad requests are typed errors")
    func errors() throws {
        var store = SnapshotStoreInstance()
        func code(_ body: () throws -> Void) -> StoreError.Code? {
            do { try body(); return nil } catch { return (error as? StoreError)?.code }
        }
        #expect(code { _ = try store.begin(worker: "nobody", step: 1) } == .unknownWorker)
        _ = try store.register(registration("w0"))
        #expect(code { _ = try store.register(registration("w0", bytes: 20_000)) } == .registrationMismatch)
        #expect(code { _ = try store.register(registration("w1", rank: 0, size: 1)) } == .invalidRegistration)
        #expect(code { _ = try store.register(registration("w2", rank: 3, size: 2)) } == .invalidRegistration)
        #expect(code { _ = try store.register(WorkerRegistration(workerID: "w3", dpRank: 0, dpSize: 1, specs: [])) } == .invalidRegistration)
        try round(&store, "w0", 5)
        #expect(code { _ = try store.begin(worker: "w0", step: 5) } == .stepNotIncreasing)
        #expect(code { _ = try store.begin(worker: "w0", step: 4) } == .stepNotIncreasing)
        #expect(code { _ = try store.staged(worker: "w0", step: 6, slot: 0, crcs: []) } == .noWriteInProgress)
        let slot = try #require(try store.begin(worker: "w0", step: 6).slot, "step 6 not begun as a write")
        #expect(code { _ = try store.staged(worker: "w0", step: 6, slot: slot, crcs: [1]) } == .sizeMismatch)
        #expect(code { _ = try store.staged(worker: "w0", step: 7, slot: slot, crcs: crcs(store, "w0")) } == .noWriteInProgress)
        #expect(code { _ = try store.restorePoint(worker: "ghost") } == .unknownWorker)
    }
}

@Suite("Shard layout")
struct ShardLayoutTests {
    @Test("replicated tensors are split on element boundaries and the slices cover the tensor exactly")
    func slicesCover() {
        for size in 1...7 {
            for elements in [0, 1, 5, 1000, 1001] {
                let spec = TensorSpec(name: "t", dtype: .bf16, shape: [elements], role: .param, replicated: true)
                var next = 0
                for rank in 0..<size {
                    let r = ShardLayout.storedRange(of: spec, dpRank: rank, dpSize: size)
                    #expect(r.lowerBound == next)
                    #expect(r.lowerBound % 2 == 0 && r.upperBound % 2 == 0)
                    next = r.upperBound
                }
                #expect(next == spec.byteCount)
            }
        }
    }

    @Test("offsets are aligned, chunks tile every stored range, non-replicated tensors are whole")
    func offsetsAndChunks() {
        let specs = [
            TensorSpec(name: "a", dtype: .f32, shape: [1000, 3], role: .param, replicated: true),
            TensorSpec(name: "b", dtype: .u8, shape: [13], role: .rng, replicated: false),
            TensorSpec(name: "c", dtype: .f64, shape: [5000], role: .optimizer, replicated: true),
        ]
        let layout = ShardLayout(specs: specs, dpRank: 1, dpSize: 3, chunkBytes: 4096)
        var chunks = 0
        var end = 0
        for e in layout.entries {
            #expect(e.slotOffset % ShardLayout.alignment == 0)
            #expect(e.slotOffset >= end)
            end = e.slotOffset + e.storedBytes
            #expect(e.firstChunk == chunks)
            var covered = 0
            for c in 0..<e.chunkCount {
                let r = layout.chunkRange(e, chunk: c)
                #expect(r.lowerBound == covered && r.count <= 4096 && !r.isEmpty)
                covered = r.upperBound
            }
            #expect(covered == e.storedBytes)
            chunks += e.chunkCount
        }
        #expect(layout.chunkCount == chunks)
        #expect(layout.slotBytes >= end)
        #expect(layout.entry(named: "b")!.storedRange == 0..<13)
    }
}

@Suite("Coordinator commit rule on the node")
struct CoordinatorRuleTests {
    @Test("under a coordinator, all-staged is reported, not committed; commit, abort and prepareRestore act on it")
    func coordinatorRule() throws {
        var store = SnapshotStoreInstance(rule: CoordinatorCommitRule())
        _ = try store.register(registration("w0", rank: 0, size: 2))
        _ = try store.register(registration("w1", rank: 1, size: 2))
        func stage(_ id: String, _ step: Int) throws -> SnapshotStoreInstance.StagedOutcome {
            guard let slot = try store.begin(worker: id, step: step).slot else { return .waiting }
            return try store.staged(worker: id, step: step, slot: slot, crcs: Array(repeating: 1, count: store.workers[id]!.layout.chunkCount))
        }
        #expect(try stage("w0", 1) == .waiting)
        #expect(try stage("w1", 1) == .allStaged(step: 1))
        #expect(store.stagedStep == 1)
        #expect(store.committedStep == nil)
        store.commit(step: 1)
        #expect(store.committedStep == 1)
        #expect(try stage("w0", 2) == .waiting)
        #expect(try stage("w1", 2) == .allStaged(step: 2))
        store.abort(step: 2)
        #expect(store.stagedStep == nil)
        #expect(try stage("w0", 3) == .waiting)
        #expect(try stage("w1", 3) == .allStaged(step: 3))
        // The commit of 3 is decided but its message lost: a restore of 3 commits it.
        let held3 = store.prepareRestore(step: 3)
        #expect(held3)
        #expect(try store.restorePoint(worker: "w0")?.step == 3)
        #expect(try stage("w0", 4) == .waiting)
        // A restore of 3 drops the half-staged round 4.
        let heldAgain = store.prepareRestore(step: 3)
        #expect(heldAgain)
        #expect(store.workers["w0"]!.slots.allSatisfy { if case .staged = $0 { false } else { true } })
        let held9 = store.prepareRestore(step: 9)
        #expect(!held9)
    }
}

@Suite("SMP messages")
struct SMPMessageTests {
    @Test("every message round-trips through the wire envelope")
    func roundTrip() throws {
        let messages: [SMPMessage] = [
            .register(registration("w0", rank: 1, size: 2)),
            .registered(slotNames: ["/a", "/b"], slotBytes: 123, committedStep: nil),
            .registered(slotNames: ["/a", "/b"], slotBytes: 123, committedStep: 9),
            .begin(step: 4), .beginReply(slot: 1, reason: ""), .beginReply(slot: nil, reason: "busy"),
            .staged(step: 4, slot: 1, crcs: [1, 2, 3]), .stagedReply(committedStep: 4), .stagedReply(committedStep: nil),
            .restoreQuery(expected: nil), .restoreQuery(expected: 7), .restoreReply(nil), .roundQuery,
            .roundReply(committedStep: 3, pending: true), .roundReply(committedStep: nil, pending: false), .restoreReply(.init(step: 3, slot: 0, crcs: [9])),
            .fetchSlice(dpRank: 1, dpSize: 4, tensor: "params", chunks: 2..<6), .sliceReply(step: 3, range: 10..<20, crcs: [5]),
            .status, .statusReply("{}"), .error(code: "unknown_worker", message: "who?"),
            .ecChunk(step: 5, row: 2, dataIndex: 1, offset: 4 << 20, length: 341 << 20, crc: 0xDEAD_BEEF),
            .ecAck(step: 5, row: 2, dataIndex: 1, error: ""), .ecAck(step: 5, row: 2, dataIndex: 1, error: "no EC layout"),
            .ecFetch(step: 5, row: 0, index: 3, offset: 8 << 20, length: 4 << 20),
            .ecChunkData(step: 5, row: 0, index: 3, offset: 8 << 20, crc: 7, error: ""),
            .ecChunkData(step: 5, row: 0, index: 3, offset: 0, crc: 0, error: "no complete parity"),
        ]
        for m in messages {
            let (decoded, envelope) = try SMPMessage.decode(m.envelope(sender: "w0", epoch: 3).encoded())
            #expect(decoded == m)
            #expect(envelope.sender == "w0" && envelope.epoch == 3)
        }
    }

    @Test("unknown types, trailing bytes and bad values are typed errors, random payloads never crash")
    func refusals() {
        #expect(throws: WireError.self) { try SMPMessage(WireEnvelope(type: 500, epoch: 0, sender: "x")) }
        var env = SMPMessage.begin(step: 1).envelope(sender: "x")
        env.payload.append(0)
        #expect(throws: WireError.self) { try SMPMessage(env) }
        env = SMPMessage.begin(step: 1).envelope(sender: "x")
        env.payload = Array(repeating: 0xFF, count: 8)
        #expect(throws: WireError.self) { try SMPMessage(env) }
        // A fetch of more than one 64 MiB frame is refused before anything is read.
        #expect(throws: WireError.self) { try SMPMessage(SMPMessage.ecFetch(step: 1, row: 0, index: 0, offset: 0, length: 65 << 20).envelope(sender: "x")) }
        var rng = LCG(seed: 42)
        for _ in 0..<3000 {
            let type = UInt16(rng.next() % 16)
            let payload = (0..<Int(rng.next() % 40)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            _ = try? SMPMessage(WireEnvelope(type: type == 15 ? 99 : type, epoch: 0, sender: "x", payload: payload))
        }
    }
}

struct LCG {
    var state: UInt64
    init(seed: UInt64) { state = seed &* 2_862_933_555_777_941_757 &+ 3_037_000_493 }
    mutating func next() -> UInt64 {
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return state >> 17
    }
}

@Suite("Reported rounds survive worker deaths")
struct ReportedRoundTests {
    @Test("under a coordinator, a staged round outlives its worker until committed; locally it is dropped")
    func keepsReportedRound() throws {
        for reported in [true, false] {
            var store = reported ? SnapshotStoreInstance(rule: CoordinatorCommitRule()) : SnapshotStoreInstance()
            _ = try store.register(registration("w0", rank: 0, size: 2))
            _ = try store.register(registration("w1", rank: 1, size: 2))
            for id in ["w0", "w1"] {
                let slot = try #require(try store.begin(worker: id, step: 1).slot, "step 1 of \(id) not begun as a write")
                _ = try store.staged(worker: id, step: 1, slot: slot, crcs: Array(repeating: 1, count: store.workers[id]!.layout.chunkCount))
            }
            if reported {
                #expect(store.stagedStep == 1)  // protected(1) was reported
                store.workerExited("w0")        // w0 dies before commit(1) arrives
                #expect(store.allHaveStaged(1))
                store.commit(step: 1)
                #expect(try store.restorePoint(worker: "w0")?.step == 1)
            } else {
                #expect(store.committedStep == 1)
            }
        }
    }
}
