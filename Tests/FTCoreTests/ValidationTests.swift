import Testing
@testable import FTCore

/// Crafted messages that used to trap a receiver (integer overflow) are
/// refused with a typed error (issue 13, "Validate every decoded message").
@Suite("Message validation")
struct ValidationTests {
    /// Decodes an SMP message from its encoding (the encoder writes any Int as i64).
    func decodeSMP(_ m: SMPMessage) throws(WireError) -> SMPMessage { try SMPMessage.decode(m.envelope(sender: "w0").encoded()).0 }
    func decodeControl(_ m: ControlMessage, sender: String = "n0") throws(WireError) -> ControlMessage {
        try ControlMessage.decode(m.envelope(sender: sender, epoch: 1).encoded()).0
    }
    /// The code of the `WireError` that `body` throws (nil: it throws nothing; any other error fails the test).
    func wireCode(_ body: () throws -> Void) -> WireError.Code? {
        do { try body() } catch let e as WireError { return e.code } catch { Issue.record("not a WireError: \(error)") }
        return nil
    }
    func storeCode(_ body: () throws -> Void) -> StoreError.Code? {
        do { try body() } catch let e as StoreError { return e.code } catch { Issue.record("not a StoreError: \(error)") }
        return nil
    }

    func registration(shape: [Int], dtype: DType = .f64, dpRank: Int = 0, dpSize: Int = 1, replicated: Bool = false) -> WorkerRegistration {
        WorkerRegistration(workerID: "w0", dpRank: dpRank, dpSize: dpSize,
                           specs: [TensorSpec(name: "t", dtype: dtype, shape: shape, role: .param, replicated: replicated)])
    }

    @Test("a register with an enormous shape is refused: element count × dtype size overflows no more")
    func enormousShape() {
        // 2^61 elements fit an Int; × 8 bytes does not (it trapped in validate and in the layout).
        let huge = registration(shape: [1 << 61])
        #expect(huge.specs[0].checkedByteCount == nil)
        #expect(wireCode { _ = try decodeSMP(.register(huge)) } == .outOfRange)
        var store = SnapshotStoreInstance()
        #expect(storeCode { _ = try store.register(huge) } == .invalidRegistration)
        // A product of dimensions that overflows, and one that fits but exceeds a terabyte.
        #expect(storeCode { _ = try store.register(registration(shape: [1 << 32, 1 << 32])) } == .invalidRegistration)
        #expect(storeCode { _ = try store.register(registration(shape: [1 << 20, 1 << 20], dtype: .u8)) } == nil)
        #expect(wireCode { _ = try decodeSMP(.register(registration(shape: [1 << 40, 2], dtype: .u8))) } == .outOfRange)
        #expect(store.workers.count == 1)
    }

    @Test("dpSize and dpRank are bounded; negative values are refused")
    func dpBounds() {
        let tooWide = registration(shape: [1 << 30], dtype: .u8, dpRank: Int.max - 1, dpSize: Int.max, replicated: true)
        #expect(wireCode { _ = try decodeSMP(.register(tooWide)) } == .outOfRange)
        var store = SnapshotStoreInstance()
        #expect(storeCode { _ = try store.register(tooWide) } == .invalidRegistration)
        let atBound = registration(shape: [1 << 30], dtype: .u8, dpRank: WireLimits.maxDPSize - 1, dpSize: WireLimits.maxDPSize, replicated: true)
        #expect(wireCode { _ = try decodeSMP(.register(atBound)) } == nil)
        #expect(storeCode { _ = try store.register(atBound) } == nil)
        #expect(wireCode { _ = try decodeSMP(.fetchSlice(dpRank: 0, dpSize: 0, tensor: "t", chunks: 0..<1)) } == .outOfRange)
        #expect(wireCode { _ = try decodeSMP(.fetchSlice(dpRank: 1 << 40, dpSize: 2, tensor: "t", chunks: 0..<1)) } == .outOfRange)
        #expect(wireCode { _ = try decodeSMP(.begin(step: -5)) } == .badValue)
        #expect(wireCode { _ = try decodeSMP(.staged(step: 3, slot: -1, crcs: [])) } == .badValue)
        #expect(wireCode { _ = try decodeSMP(.ecChunk(step: 1, row: -1, dataIndex: 0, offset: 0, length: 1, crc: 0)) } == .badValue)
        #expect(wireCode { _ = try decodeSMP(.ecFetch(step: 1, row: 0, index: 0, offset: -64, length: 1)) } == .badValue)
    }

    @Test("steps beyond 2^53 are refused, so step + 1 cannot overflow")
    func stepBounds() {
        #expect(wireCode { _ = try decodeSMP(.begin(step: Int.max)) } == .outOfRange)
        #expect(wireCode { _ = try decodeSMP(.begin(step: WireLimits.maxStep)) } == nil)
        #expect(wireCode { _ = try decodeControl(.protected(step: Int.max, layoutChunkBytes: 0)) } == .outOfRange)
        #expect(wireCode { _ = try decodeControl(.commit(step: WireLimits.maxStep + 1)) } == .outOfRange)
        #expect(wireCode { _ = try decodeControl(.ready(restoredStep: Int.max), sender: "n0/w0") } == .outOfRange)
        #expect(wireCode { _ = try decodeControl(.resume(fromStep: Int.max, peers: [])) } == .outOfRange)
    }

    @Test("an ecFetch with an offset near Int64.max is refused, at decoding and against the layout")
    func ecFetchOffset() {
        let offset = Int(Int64.max) - 10
        #expect(wireCode { _ = try decodeSMP(.ecFetch(step: 1, row: 0, index: 0, offset: offset, length: 100)) } == .outOfRange)
        // The layout check computes no offset + length: an in-range offset whose sum passes the chunk is refused too.
        let layout = ECLayout(k: 2, m: 1, chunkBytes: 4096, groups: [["n0", "n1", "n2"]], endpoints: [:])
        #expect(storeCode { try layout.checkFetch(position: 0, row: 0, index: 0, offset: offset, length: 100) } == .outOfRange)
        #expect(storeCode { try layout.checkFetch(position: 0, row: 0, index: 0, offset: 4000, length: 100) } == .outOfRange)
        #expect(storeCode { try layout.checkFetch(position: 0, row: 0, index: 0, offset: 0, length: 0) } == .outOfRange)
        #expect(storeCode { try layout.checkFetch(position: 0, row: 7, index: 0, offset: 0, length: 64) } == .outOfRange)
        let holder = layout.placement.position(ofCodewordIndex: 1, row: 0)
        #expect(storeCode { try layout.checkFetch(position: holder, row: 0, index: 1, offset: 4000, length: 96) } == nil)
        #expect(storeCode { try layout.checkFetch(position: (holder + 1) % 3, row: 0, index: 1, offset: 0, length: 96) } == .outOfRange)
    }

    @Test("an ecChunk frame outside the layout is refused: row, data index, holder, chunk length, frame range")
    func ecChunkFrame() {
        let layout = ECLayout(k: 2, m: 1, chunkBytes: 4096, groups: [["n0", "n1", "n2"]], endpoints: [:])
        let row = 1
        let holder = layout.placement.parityHolders(row: row)[0]
        func check(row: Int = row, position: Int = holder, index: Int = 0, offset: Int = 0, length: Int = 4096, frame: Int = 1024) -> StoreError.Code? {
            storeCode { try layout.checkChunkFrame(position: position, step: 5, row: row, dataIndex: index, offset: offset, length: length, frameBytes: frame) }
        }
        #expect(check() == nil)
        #expect(check(offset: 3072) == nil)
        #expect(check(row: 3) == .outOfRange)
        #expect(check(index: 2) == .outOfRange)
        #expect(check(position: (holder + 1) % 3) == .outOfRange)
        #expect(check(length: 4097) == .outOfRange)
        #expect(check(offset: 3073) == .outOfRange)
        #expect(check(offset: WireLimits.maxBytes, frame: Int.max) == .outOfRange)
    }

    @Test("parity is held for at most two rounds: an unexpected step allocates nothing")
    func paritySteps() throws {
        #expect(try ParitySteps.admit(5, held: [], limit: 2) == .accept)
        #expect(try ParitySteps.admit(5, held: [5, 6], limit: 2) == .accept)
        #expect(try ParitySteps.admit(6, held: [5], limit: 2) == .accept)
        // A third round above both: refused.
        #expect(storeCode { _ = try ParitySteps.admit(WireLimits.maxStep, held: [5, 6], limit: 2) } == .unexpectedRound)
        // A round below the highest takes its place (the lowest rounds are the ones that can commit).
        #expect(try ParitySteps.admit(4, held: [5, 1 << 50], limit: 2) == .replace(1 << 50))
    }

    @Test("control messages: sizes, pids, ranks and layouts are bounded")
    func controlBounds() {
        #expect(wireCode { _ = try decodeControl(.smpHeartbeat(dataBytes: Int.max, parityBytes: 0)) } == .outOfRange)
        #expect(wireCode { _ = try decodeControl(.smpHeartbeat(dataBytes: WireLimits.maxBytes, parityBytes: 0)) } == nil)
        let hello = ControlMessage.SMPInventory(node: "n0", pid: Int(Int32.max) + 1, dataEndpoint: "", workers: [], rankOffset: 0,
                                                committedStep: nil, stagedStep: nil)
        #expect(wireCode { _ = try decodeControl(.smpHello(hello)) } == .outOfRange)
        #expect(wireCode {
            _ = try decodeControl(.workerHello(.init(node: "n0", worker: "w0", rank: 4, worldSize: 4, pid: 1, collectiveEndpoint: "")), sender: "n0/w0")
        } == .outOfRange)
        let layout = ECLayout(k: 0, m: 1, chunkBytes: 4096, groups: [["n0"]], endpoints: [:])
        #expect(wireCode { _ = try decodeControl(.ecLayout(layout)) } == .outOfRange)
        let huge = ECLayout(k: 2, m: 1, chunkBytes: Int.max, groups: [["n0", "n1", "n2"]], endpoints: [:])
        #expect(wireCode { _ = try decodeControl(.ecLayout(huge)) } == .outOfRange)
        let ragged = ECLayout(k: 2, m: 1, chunkBytes: 4096, groups: [["n0", "n1"]], endpoints: [:])
        #expect(wireCode { _ = try decodeControl(.ecLayout(ragged)) } == .outOfRange)
    }

    @Test("the coordinator refuses strangers and hellos that do not fit the job, and changes nothing")
    func coordinatorRefusals() {
        var c = CoordinatorInstance(settings: CoordinatorSettings(jobID: "j", nodes: 2, workersPerNode: 1))
        func refused(_ m: ControlMessage, from sender: String) -> WireError.Code? {
            let out = c.receive(m, from: sender, epoch: 1, now: 1)
            for d in out { if case .refused(_, let e) = d { return e.code } }
            return nil
        }
        let inv = ControlMessage.SMPInventory(node: "n7", pid: 10, dataEndpoint: "", workers: ["w0"], rankOffset: 0, committedStep: nil, stagedStep: nil)
        #expect(refused(.smpHello(inv), from: "n7") == .notInJob)
        var tooMany = inv
        tooMany.node = "n0"
        tooMany.workers = ["w0", "w1"]
        #expect(refused(.smpHello(tooMany), from: "n0") == .notInJob)
        let world = ControlMessage.WorkerInfo(node: "n0", worker: "w0", rank: 0, worldSize: 5, pid: 3, collectiveEndpoint: "")
        #expect(refused(.workerHello(world), from: "n0/w0") == .notInJob)
        #expect(refused(.workerHeartbeat(step: 1, running: true, skipped: 0, activity: .idle), from: "n0") == .notInJob)
        #expect(refused(.protected(step: 1, layoutChunkBytes: 0), from: "intruder") == .notInJob)
        #expect(refused(.protected(step: 1, layoutChunkBytes: 0), from: "n01") == .notInJob)
        #expect(c.refusedMessages == 6)
        #expect(c.nodes.isEmpty && c.workers.isEmpty)
        // The job's own members are admitted.
        var good = inv
        good.node = "n1"
        #expect(refused(.smpHello(good), from: "n1") == nil)
        #expect(c.nodes["n1"] != nil)
        #expect(c.settings.isMemberID("n1/w0") && !c.settings.isMemberID("n1/w1") && !c.settings.isMemberID("n2"))
    }
}
