import FTCore
import FTSMP
import FTSystem
import FTToy
@testable import FTWorker
import FTZMQ
import Foundation
import Testing

@discardableResult
func register(_ client: SnapshotClient, _ model: ToyModel) throws -> Int? {
    try client.register(model.tensors.map { RegisteredTensor(spec: $0.0, buffer: $0.1) })
}

@Suite("Snapshot path on one node (in-process SMP)")
struct SnapshotPathTests {
    @Test("snapshot then restore gives back the last committed step's bytes; slots are 0600 and freed at the end")
    func roundTrip() throws {
        let smp = try InProcessSMP(tag: "rt")
        var stopped = false
        defer { if !stopped { smp.stop() } }
        let model = ToyModel(elements: 300_000, dpRank: 0)  // 1.2 MB per tensor: two 1 MiB chunks
        let client = try SnapshotClient(identity: smp.identity("w0"))
        #expect(try register(client, model) == nil)
        #expect(try client.restore() == nil)
        var hashes: [Int: String] = [:]
        for step in 1...5 {
            try client.waitBeforeUpdate()
            model.apply(step: step)
            try client.snapshot(step: step)
            try client.waitForRound()
            hashes[step] = model.hash
        }
        #expect(client.stats.snapshotsStaged == 5)
        #expect(client.stats.lastCommittedStep == 5)
        let names = segments(ofJob: smp.jobID)
        #expect(names.count == 2)
        for name in names { #expect(try SharedMemorySegment.mode(name: "/" + name) == 0o600) }

        // A "restarted" worker: same id, fresh memory.
        model.apply(step: 6)  // not snapshotted: must not come back
        let restarted = ToyModel(elements: 300_000, dpRank: 0)
        let client2 = try SnapshotClient(identity: smp.identity("w0"))
        #expect(try register(client2, restarted) == 5)
        #expect(try client2.restore() == 5)
        #expect(restarted.hash == hashes[5])
        #expect(restarted.step == 5)

        smp.stop()
        stopped = true
        #expect(segments(ofJob: smp.jobID).isEmpty)
    }

    @Test("a survivor told to restore the step its live tensors hold keeps them, checked in place; changed tensors are restored")
    func keepsLiveState() throws {
        let smp = try InProcessSMP(tag: "keep")
        defer { smp.stop() }
        let model = ToyModel(elements: 300_000, dpRank: 0)
        let client = try SnapshotClient(identity: smp.identity("w0"))
        try register(client, model)
        for step in 1...2 {
            try client.waitBeforeUpdate()
            model.apply(step: step)
            try client.snapshot(step: step)
            try client.waitForRound()
        }
        let committed = model.hash
        try client.restore(step: 2, sources: [], liveStateIs: 2)
        let kept = try #require(client.stats.lastRestore)
        #expect(kept.keptBytes > 0)
        #expect(kept.ownBytes == 0)
        #expect(model.hash == committed)

        // The tensors changed although the caller says they hold step 2: the
        // in-place check finds it, and the whole slot is restored.
        model.apply(step: 3)
        #expect(model.hash != committed)
        try client.restore(step: 2, sources: [], liveStateIs: 2)
        #expect(try #require(client.stats.lastRestore).keptBytes == 0)
        #expect(model.hash == committed)
        #expect(model.step == 2)

        // Live state of another step: restored, not checked.
        model.apply(step: 3)
        try client.restore(step: 2, sources: [], liveStateIs: 3)
        #expect(try #require(client.stats.lastRestore).ownBytes > 0)
        #expect(model.hash == committed)
    }

    @Test("a flipped byte in shared memory is reported with the exact worker, tensor and chunk")
    func flippedByte() throws {
        let smp = try InProcessSMP(tag: "flip")
        defer { smp.stop() }
        let model = ToyModel(elements: 600_000, dpRank: 0)  // 2.4 MB: chunks 0, 1, 2 per tensor
        let client = try SnapshotClient(identity: smp.identity("w0"))
        try register(client, model)
        model.apply(step: 1)
        try client.snapshot(step: 1)
        try client.waitForRound()
        let (reply, _) = try client.request(.restoreQuery(expected: nil))
        let point = try #require({ if case .restoreReply(let p?) = reply { p } else { nil } }(), "no restore point: \(reply)")
        let layout = ShardLayout(specs: model.tensors.map(\.0), dpRank: 0, dpSize: 1)
        let entry = layout.entry(named: "moments")!
        let name = "/ft-\(smp.jobID)-n0-p\(getpid())-w0-s\(point.slot)"
        let segment = try SharedMemorySegment.open(name: name, count: layout.slotBytes, writable: true)
        segment.base.storeBytes(of: segment.base.load(fromByteOffset: entry.slotOffset + (1 << 20) + 12345, as: UInt8.self) ^ 0x01,
                                toByteOffset: entry.slotOffset + (1 << 20) + 12345, as: UInt8.self)
        do {
            _ = try client.restore()
            Issue.record("restore of a corrupt slot succeeded")
        } catch let error as SnapshotError {
            #expect(error.code == .corrupt)
            #expect(error.corruption?.worker == "w0")
            #expect(error.corruption?.tensor == "moments")
            #expect(error.corruption?.chunk == 1)
            #expect(error.message.contains("tensor moments, chunk 1"))
        }
    }

    @Test("DP slicing: each rank stores its slice of replicated tensors; restore gathers the others")
    func dpSlicing() throws {
        let smp = try InProcessSMP(tag: "dp")
        defer { smp.stop() }
        let size = 3
        let models = (0..<size).map { ToyModel(elements: 100_001, dpRank: $0) }
        let clients = try (0..<size).map { try SnapshotClient(identity: smp.identity("w\($0)", rank: $0, size: size)) }
        for (c, m) in zip(clients, models) { try register(c, m) }
        for step in 1...3 {
            for (c, m) in zip(clients, models) {
                try c.waitBeforeUpdate()
                m.apply(step: step)
                try c.snapshot(step: step)
            }
            for c in clients { try c.waitForRound() }
        }
        // Slot size: a third of each replicated tensor, plus the small per-rank ones.
        let fullState = 2 * 100_001 * 4
        let status = try clients[0].request(.status).0
        let json = try #require({ if case .statusReply(let j) = status { j } else { nil } }(), "no status reply: \(status)")
        #expect(json.contains("\"committed_step\":3"))
        let layout = ShardLayout(specs: models[0].tensors.map(\.0), dpRank: 0, dpSize: size)
        #expect(layout.slotBytes < fullState / 2)

        let expected = models.map(\.hash)
        for rank in 0..<size {
            let fresh = ToyModel(elements: 100_001, dpRank: rank)
            let client = try SnapshotClient(identity: smp.identity("w\(rank)", rank: rank, size: size))
            try register(client, fresh)
            #expect(try client.restore() == 3)
            #expect(fresh.hash == expected[rank], "rank \(rank)")
        }
    }

    @Test("slices of many chunks come a few chunks per request: the bytes come back exact, and a corrupt chunk in a later piece is named by its index in the slice")
    func slicesInPieces() throws {
        let smp = try InProcessSMP(tag: "dpp")
        defer { smp.stop() }
        let chunk = 4096
        // 10_007 floats per tensor over 2 ranks: slices of 20_016 and 20_012 bytes, 5 chunks
        // each (the last partial): several pieces of at most `slicePieceChunks` chunks.
        let models = (0..<2).map { ToyModel(elements: 10_007, dpRank: $0) }
        let clients = try (0..<2).map { try SnapshotClient(identity: smp.identity("w\($0)", rank: $0, size: 2), chunkBytes: chunk) }
        for (c, m) in zip(clients, models) { try register(c, m) }
        for (c, m) in zip(clients, models) {
            m.apply(step: 1)
            try c.snapshot(step: 1)
        }
        for c in clients { try c.waitForRound() }
        let stored = ShardLayout.storedRange(of: models[0].tensors[0].0, dpRank: 1, dpSize: 2).count
        #expect(SnapshotEngine.slicePieces(storedBytes: stored, chunkBytes: chunk).count > 1)
        #expect(SnapshotEngine.slicePieces(storedBytes: stored, chunkBytes: chunk).flatMap { Array($0) } == Array(0..<5))

        let expected = models.map(\.hash)
        for rank in 0..<2 {
            let fresh = ToyModel(elements: 10_007, dpRank: rank)
            let client = try SnapshotClient(identity: smp.identity("w\(rank)", rank: rank, size: 2), chunkBytes: chunk)
            try register(client, fresh)
            #expect(try client.restore() == 1)
            #expect(fresh.hash == expected[rank], "rank \(rank)")
        }

        // Chunk 4 of rank 1's params slice (in the second piece) flipped at rest.
        let layout = ShardLayout(specs: models[1].tensors.map(\.0), dpRank: 1, dpSize: 2, chunkBytes: chunk)
        let segment = try SharedMemorySegment.open(name: "/ft-\(smp.jobID)-n0-p\(getpid())-w1-s0", count: layout.slotBytes, writable: true)
        let offset = layout.entry(named: "params")!.slotOffset + 4 * chunk + 3
        segment.base.storeBytes(of: segment.base.load(fromByteOffset: offset, as: UInt8.self) ^ 0x01, toByteOffset: offset, as: UInt8.self)
        let client = try SnapshotClient(identity: smp.identity("w0", rank: 0, size: 2), chunkBytes: chunk)
        let target = ToyModel(elements: 10_007, dpRank: 0)  // alive while the client writes into it
        try register(client, target)
        do {
            _ = try withExtendedLifetime(target) { try client.restore() }
            Issue.record("restore with a corrupt peer chunk succeeded")
        } catch let error as SnapshotError {
            #expect(error.code == .corrupt)
            #expect(error.corruption?.worker == "dp-rank-1" && error.corruption?.tensor == "params" && error.corruption?.chunk == 4,
                    "\(error.message)")
        }
    }

    @Test("a corrupt slice held by another rank fails the restore, naming that rank, tensor and chunk (without parity nothing repairs it)")
    func corruptPeerSlice() throws {
        let smp = try InProcessSMP(tag: "dpc")
        defer { smp.stop() }
        let models = (0..<2).map { ToyModel(elements: 50_000, dpRank: $0) }
        let clients = try (0..<2).map { try SnapshotClient(identity: smp.identity("w\($0)", rank: $0, size: 2)) }
        for (c, m) in zip(clients, models) { try register(c, m) }
        for (c, m) in zip(clients, models) {
            m.apply(step: 1)
            try c.snapshot(step: 1)
        }
        for c in clients { try c.waitForRound() }
        let layout = ShardLayout(specs: models[1].tensors.map(\.0), dpRank: 1, dpSize: 2)
        let segment = try SharedMemorySegment.open(name: "/ft-\(smp.jobID)-n0-p\(getpid())-w1-s0", count: layout.slotBytes, writable: true)
        let offset = layout.entry(named: "params")!.slotOffset + 10
        segment.base.storeBytes(of: segment.base.load(fromByteOffset: offset, as: UInt8.self) ^ 0x80, toByteOffset: offset, as: UInt8.self)
        do {
            _ = try clients[0].restore()
            Issue.record("restore with a corrupt peer slice succeeded")
        } catch let error as SnapshotError {
            #expect(error.code == .corrupt)
            #expect(error.corruption?.worker == "dp-rank-1" && error.corruption?.tensor == "params" && error.corruption?.chunk == 0)
            #expect(error.message.contains("worker dp-rank-1, tensor params, chunk 0"), "\(error.message)")
        }
    }

    @Test("bad requests get their error reply and the SMP keeps serving everyone else")
    func badRequests() throws {
        let smp = try InProcessSMP(tag: "bad")
        defer { smp.stop() }
        let ctx = try ZMQContext()
        let raw = try ctx.socket(.dealer, maxMessageBytes: WireEnvelope.maxFrameBytes)
        defer { raw.close() }
        try raw.setLinger(milliseconds: 0)
        try raw.connect(smp.server.boundEndpoint)
        func ask(_ frame: [UInt8]) throws -> SMPMessage? {
            try raw.send([frame])
            guard let reply = try raw.receive(timeoutMilliseconds: 5000) else { return nil }
            return try SMPMessage.decode(reply[0]).0
        }
        func errorCode(_ m: SMPMessage, from sender: String) throws -> String? {
            guard case .error(let code, let message)? = try ask(m.envelope(sender: sender).encoded()) else { return nil }
            #expect(!message.isEmpty)
            return code
        }
        // Garbage and truncated frames.
        let garbageReply = try ask([1, 2, 3, 4, 5])
        let code = try #require({ if case .error(let c, _)? = garbageReply { c } else { nil } }(), "no error reply to garbage: \(String(describing: garbageReply))")
        #expect(code == "malformed")
        #expect(try errorCode(.begin(step: 1), from: "ghost") == "unknown_worker")
        let model = ToyModel(elements: 1000, dpRank: 0)
        let reg = WorkerRegistration(workerID: "w0", dpRank: 0, dpSize: 1, specs: model.tensors.map(\.0))
        let registered = try ask(SMPMessage.register(reg).envelope(sender: "w0").encoded())
        let isRegistered: Bool = { if case .registered? = registered { true } else { false } }()
        try #require(isRegistered, "registration refused: \(String(describing: registered))")
        var other = reg
        other.specs[0].shape = [8]
        #expect(try errorCode(.register(other), from: "w0") == "registration_mismatch")
        #expect(try errorCode(.register(reg), from: "impostor") == "invalid_registration")
        let begun = try ask(SMPMessage.begin(step: 10).envelope(sender: "w0").encoded())
        let slot = try #require({ if case .beginReply(let s?, _)? = begun { s } else { nil } }(), "begin refused: \(String(describing: begun))")
        #expect(try errorCode(.staged(step: 10, slot: slot, crcs: [1, 2]), from: "w0") == "size_mismatch")
        #expect(try errorCode(.begin(step: 9), from: "w0") == "step_not_increasing")
        #expect(try errorCode(.fetchSlice(dpRank: 5, dpSize: 9, tensor: "params", chunks: 0..<1), from: "w0") == "unknown_worker")
        // Chunks beyond the slice, and an empty piece of a slice that has chunks.
        #expect(try errorCode(.fetchSlice(dpRank: 0, dpSize: 1, tensor: "params", chunks: 0..<99), from: "w0") == "out_of_range")
        #expect(try errorCode(.fetchSlice(dpRank: 0, dpSize: 1, tensor: "params", chunks: 0..<0), from: "w0") == "out_of_range")
        #expect(try errorCode(.registered(slotNames: [], slotBytes: 0, committedStep: nil), from: "w0") == "malformed")
        #expect(smp.server.malformedFrames >= 1)

        // Everyone else is still served.
        let good = ToyModel(elements: 1000, dpRank: 0)
        let client = try SnapshotClient(identity: smp.identity("w1", rank: 0, size: 1))
        #expect(throws: SnapshotError.self) { try register(client, good) }  // rank 0 of 1 is w0's
        let client2 = try SnapshotClient(identity: smp.identity("w2", rank: 0, size: 2))
        try register(client2, ToyModel(elements: 1000, dpRank: 0))
        #expect(try client2.restore() == nil)
    }
}

@Suite("Pre-faulting live memory")
struct PopulateTests {
    @Test("populateForWrite faults in a fresh buffer without changing a byte, while another thread writes it")
    func populateKeepsBytes() throws {
        let count = 32 << 20
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
        defer { buffer.deallocate() }
        let words = buffer.bindMemory(to: UInt64.self)
        // The first half written before, the second half written during the populate.
        for i in 0..<words.count / 2 { words[i] = UInt64(i) &* 0x9E37_79B9_7F4A_7C15 }
        let shared = UncheckedBuffer(words: words)
        let writer = Thread {
            for i in shared.words.count / 2 ..< shared.words.count { shared.words[i] = ~UInt64(i) }
        }
        writer.start()
        let populated = populateForWrite(buffer, piece: 1 << 20)
        while !writer.isFinished { usleep(1000) }
        // This kernel has MADV_POPULATE_WRITE (Linux 5.14+): the whole buffer was populated.
        #expect(populated == count)
        var wrong = 0
        for i in 0..<words.count / 2 where words[i] != UInt64(i) &* 0x9E37_79B9_7F4A_7C15 { wrong += 1 }
        for i in words.count / 2 ..< words.count where words[i] != ~UInt64(i) { wrong += 1 }
        #expect(wrong == 0)
        // A stop asked at once populates nothing.
        #expect(populateForWrite(buffer, stop: { true }) == 0)
    }
}

private struct UncheckedBuffer: @unchecked Sendable { let words: UnsafeMutableBufferPointer<UInt64> }
