// libFuzzer targets over FTCore (issue 13, "Fuzzing"). Built by `fuzz/run`
// together with Sources/FTCore/*.swift into one binary
// (`swiftc -sanitize=fuzzer,address -parse-as-library`); the target is
// chosen by FT_FUZZ_TARGET:
//
//   wire         WireEnvelope(decoding:) on raw bytes; what decodes re-encodes
//                and decodes to the same envelope
//   smp          SMPMessage.decode on raw bytes; the same round trip
//   control      ControlMessage.decode on raw bytes; the same round trip
//   store        SnapshotStoreInstance (the SMP's core) driven by a sequence
//                of SMP messages built from the input, each encoded and
//                decoded first, as an SMP receives them
//   coordinator  CoordinatorInstance driven by a sequence of control messages
//                (and ticks) built from the input, each encoded and decoded
//                first, from job members and strangers
//
// A trap, an overflow, an out-of-bounds access or a failed round trip is a
// crash: libFuzzer stops and writes the input to crash-<sha1>.

#if canImport(Glibc)
import Glibc
#endif

enum Target: String, CaseIterable {
    case wire, smp, control, store, coordinator
}

let selected: Target = {
    guard let name = getenv("FT_FUZZ_TARGET").map({ String(cString: $0) }), let t = Target(rawValue: name) else {
        fatalError("set FT_FUZZ_TARGET to one of \(Target.allCases.map(\.rawValue))")
    }
    return t
}()

/// With FT_FUZZ_SEEDS=DIR, writes a few valid frames of the selected target
/// into DIR first (a starting corpus: libFuzzer mutates from there).
@_cdecl("LLVMFuzzerInitialize")
public func fuzzInitialize(_ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>) -> Int32 {
    guard let dir = getenv("FT_FUZZ_SEEDS").map({ String(cString: $0) }) else { return 0 }
    let reg = WorkerRegistration(workerID: "w0", dpRank: 0, dpSize: 2, chunkBytes: 4096,
                                 specs: [TensorSpec(name: "p", dtype: .f32, shape: [3, 5], role: .param, replicated: true)])
    let smp: [SMPMessage] = [.register(reg), .begin(step: 3), .staged(step: 3, slot: 1, crcs: [1, 2]), .restoreQuery(expected: 2),
                             .fetchSlice(dpRank: 1, dpSize: 2, tensor: "p", chunks: 0..<2), .ecChunk(step: 4, row: 1, dataIndex: 0, offset: 0, length: 64, crc: 9),
                             .ecFetch(step: 4, row: 2, index: 1, offset: 64, length: 128), .error(code: "x", message: "y")]
    let control: [ControlMessage] = [
        .smpHello(.init(node: "n0", pid: 7, dataEndpoint: "tcp://a", workers: ["w0"], rankOffset: 0, committedStep: 2, stagedStep: nil)),
        .workerHello(.init(node: "n0", worker: "w0", rank: 0, worldSize: 2, pid: 8, collectiveEndpoint: "tcp://b")),
        .workerHeartbeat(step: 5, running: true, skipped: 0, activity: WorkerActivity(.collective, waitingOn: 1, milliseconds: 3)),
        .protected(step: 4, layoutChunkBytes: 4096), .restore(step: 3, sources: ["a", "b"]), .restartWorkers([.init(worker: "w0", pid: 9)]),
        .ecLayout(ECLayout(k: 2, m: 1, chunkBytes: 4096, groups: [["n0", "n1", "n2"]], endpoints: ["n0": "tcp://c"])),
        .rebuild(step: 3, lost: ["n1"]), .statusQuery,
        .persist(step: 6, nodes: ["n0", "n1", "n2"], durable: 3), .persisted(step: 6, bytes: 1 << 20, error: ""), .loadPersisted(step: 6),
    ]
    var frames: [[UInt8]] = []
    switch selected {
    case .wire: frames = control.prefix(3).map { $0.envelope(sender: "n0", epoch: 2).encoded() }
    case .smp: frames = smp.map { $0.envelope(sender: "w0", epoch: 1).encoded() }
    case .control: frames = control.map { $0.envelope(sender: "n0/w0", epoch: 3).encoded() }
    case .store, .coordinator: frames = (0..<4).map { i in (0..<64).map { UInt8(truncatingIfNeeded: $0 * 37 + i * 11) } }
    }
    for (i, f) in frames.enumerated() {
        guard let file = fopen("\(dir)/seed-\(i)", "wb") else { continue }
        _ = f.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, file) }
        fclose(file)
    }
    return 0
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    switch selected {
    case .wire: fuzzWire(bytes)
    case .smp: fuzzSMP(bytes)
    case .control: fuzzControl(bytes)
    case .store: fuzzStore(bytes)
    case .coordinator: fuzzCoordinator(bytes)
    }
    return 0
}

func fuzzWire(_ bytes: [UInt8]) {
    guard let e = try? WireEnvelope(decoding: bytes) else { return }
    let again = try? WireEnvelope(decoding: e.encoded())
    precondition(again == e, "an envelope does not survive a round trip")
}

func fuzzSMP(_ bytes: [UInt8]) {
    guard let (m, e) = try? SMPMessage.decode(bytes) else { return }
    let again = try? SMPMessage.decode(m.envelope(sender: e.sender, epoch: e.epoch).encoded())
    precondition(again?.0 == m, "SMP message \(m.type) does not survive a round trip")
}

func fuzzControl(_ bytes: [UInt8]) {
    guard let (m, e) = try? ControlMessage.decode(bytes) else { return }
    let again = try? ControlMessage.decode(m.envelope(sender: e.sender, epoch: e.epoch).encoded())
    precondition(again?.0 == m, "control message \(m.type) does not survive a round trip")
}

// MARK: structured inputs

/// Reads choices from the fuzz input; zeros once it is used up.
struct Choices {
    let bytes: [UInt8]
    var at = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    var done: Bool { at >= bytes.count }

    mutating func byte() -> UInt8 {
        guard at < bytes.count else { return 0 }
        defer { at += 1 }
        return bytes[at]
    }

    mutating func below(_ n: Int) -> Int { n <= 1 ? 0 : Int(byte()) % n }

    mutating func u64() -> UInt64 { (0..<8).reduce(UInt64(0)) { acc, i in acc | UInt64(byte()) << (8 * UInt64(i)) } }

    /// Mostly small, sometimes anything, sometimes an edge that overflows arithmetic.
    mutating func int() -> Int {
        let edges: [Int] = [0, 1, -1, Int.max, Int.min, Int.max - 1, 1 << 53, (1 << 53) + 1, 1 << 46, (1 << 46) + 1,
                            1 << 40, 1 << 62, 1 << 20, (1 << 20) + 1, 64 << 20, Int(Int32.max), 255, 256]
        switch byte() {
        case 0..<170: return Int(byte() % 8)
        case 170..<210: return Int(byte()) | Int(byte()) << 8
        case 210..<235: return edges[below(edges.count)]
        default: return Int(bitPattern: UInt(u64()))
        }
    }

    mutating func optionalInt() -> Int? { byte() % 4 == 0 ? nil : int() }

    mutating func string(_ options: [String]) -> String {
        if byte() % 16 == 0 { return String(decoding: (0..<below(12)).map { _ in byte() }, as: UTF8.self) }
        return options[below(options.count)]
    }

    mutating func crcs() -> [UInt32] { (0..<below(6)).map { _ in UInt32(truncatingIfNeeded: u64()) } }
}

// MARK: the SMP's core

func fuzzStore(_ bytes: [UInt8]) {
    var c = Choices(bytes)
    var store = SnapshotStoreInstance(rule: c.byte() % 2 == 0 ? LocalCommitRule() : CoordinatorCommitRule())
    let workers = ["w0", "w1", "w2"]
    let names = ["a", "b", "c"]
    var steps = 0
    while !c.done && steps < 64 {
        steps += 1
        let sender = c.string(workers)
        let message: SMPMessage
        switch c.below(10) {
        case 0, 1:
            let specs = (0..<c.below(4)).map { _ in
                TensorSpec(name: c.string(names), dtype: DType.allCases[c.below(DType.allCases.count)],
                           shape: (0..<c.below(4)).map { _ in c.int() }, role: .param, replicated: c.byte() % 2 == 0)
            }
            let chunk = c.byte() % 2 == 0 ? 4096 : c.int()
            message = .register(WorkerRegistration(workerID: c.byte() % 8 == 0 ? c.string(workers) : sender,
                                                   dpRank: c.int(), dpSize: c.int(), chunkBytes: chunk, specs: specs))
        case 2, 3: message = .begin(step: c.int())
        case 4, 5: message = .staged(step: c.int(), slot: c.int(), crcs: c.crcs())
        case 6: message = .restoreQuery(expected: c.optionalInt())
        case 7:
            let (a, b) = (c.int(), c.int())
            message = .fetchSlice(dpRank: c.int(), dpSize: c.int(), tensor: c.string(names), chunks: min(a, b)..<max(a, b))
        default:
            // The coordinator's side of the store: commit, abort, restore.
            switch c.below(4) {
            case 0: store.commit(step: c.int())
            case 1: store.abort(step: c.int())
            case 2: store.prepareRestore(step: c.optionalInt())
            default: store.workerExited(c.string(workers))
            }
            continue
        }
        // As the SMP receives it: encoded, decoded (the decoder's bounds apply), then handled.
        guard let (decoded, envelope) = try? SMPMessage.decode(message.envelope(sender: sender).encoded()) else { continue }
        let from = envelope.sender
        switch decoded {
        case .register(let r):
            guard r.workerID == from else { continue }
            if case .new(let slotBytes) = try? store.register(r) {
                precondition(slotBytes >= 0 && slotBytes <= WireLimits.maxTensors * WireLimits.maxTensorBytes)
            }
        case .begin(let s): _ = try? store.begin(worker: from, step: s)
        case .staged(let s, let slot, let crcs): _ = try? store.staged(worker: from, step: s, slot: slot, crcs: crcs)
        case .restoreQuery(let expected):
            if let expected, store.committedStep != expected, store.allHaveStaged(expected) { store.commit(step: expected) }
            store.discardUncommitted(worker: from)
            _ = try? store.restorePoint(worker: from)
        case .fetchSlice(let rank, let size, let tensor, let chunks):
            // As the SMP checks and serves it: chunks within the slice, then their byte range.
            if let w = store.worker(dpRank: rank, dpSize: size), let entry = w.layout.entry(named: tensor),
               chunks.upperBound <= entry.chunkCount, !chunks.isEmpty {
                let lo = w.layout.chunkRange(entry, chunk: chunks.lowerBound).lowerBound
                let hi = w.layout.chunkRange(entry, chunk: chunks.upperBound - 1).upperBound
                precondition(lo <= hi && hi <= entry.storedBytes)
            }
        default:
            break
        }
        // The slot invariant: at most one committed slot per worker.
        for w in store.workers.values {
            precondition(w.slots.filter { if case .committed = $0 { true } else { false } }.count <= 1)
        }
    }
}

// MARK: the coordinator's core

func fuzzCoordinator(_ bytes: [UInt8]) {
    var c = Choices(bytes)
    let nodes = 1 + c.below(4)
    let perNode = 1 + c.below(2)
    var settings = CoordinatorSettings(jobID: "fuzz", nodes: nodes, workersPerNode: perNode)
    if nodes >= 2, c.byte() % 2 == 0 { settings.erasure = (k: nodes - 1, m: 1) }
    var coordinator = CoordinatorInstance(settings: settings)
    let nodeIDs = settings.nodeIDs
    let workerKeys = nodeIDs.flatMap { n in settings.workerIDs.map { "\(n)/\($0)" } }
    let senders = nodeIDs + workerKeys + ["n9", "n0/w7", "ftctl", "", "n00", "n1/w01"]
    var now = 0.0
    var lastEpoch = coordinator.epoch
    var steps = 0
    while !c.done && steps < 128 {
        steps += 1
        if c.below(5) == 0 {
            now += [0.01, 0.1, 0.3, 0.6, 2, 11][c.below(6)]
            _ = coordinator.tick(now: now)
            continue
        }
        now += 0.001
        let sender = c.string(senders)
        let epoch = c.byte() % 4 == 0 ? UInt64(truncatingIfNeeded: c.int()) : coordinator.epoch
        let message: ControlMessage
        switch c.below(14) {
        case 0:
            let node = c.byte() % 8 == 0 ? c.string(nodeIDs) : sender
            message = .smpHello(.init(node: node, pid: c.int(), dataEndpoint: "tcp://d", workers: (0..<c.below(4)).map { _ in c.string(settings.workerIDs + ["w9"]) },
                                      rankOffset: c.int(), committedStep: c.optionalInt(), stagedStep: c.optionalInt(),
                                      protectedStep: c.optionalInt(), layoutChunkBytes: c.int()))
        case 1:
            let parts = sender.split(separator: "/").map(String.init)
            message = .workerHello(.init(node: parts.first ?? "", worker: parts.count > 1 ? parts[1] : "w0", rank: c.int(),
                                         worldSize: c.byte() % 4 == 0 ? c.int() : nodes * perNode, pid: c.int(), collectiveEndpoint: "r"))
        case 2: message = .smpHeartbeat(dataBytes: c.int(), parityBytes: c.int())
        case 3: message = .workerHeartbeat(step: c.int(), running: c.byte() % 2 == 0, skipped: c.int(),
                                           activity: WorkerActivity(WorkerActivity.Kind.allCases[c.below(6)], waitingOn: c.optionalInt() ?? -1,
                                                                    milliseconds: c.int()))
        case 4: message = .childExited(worker: c.string(settings.workerIDs), pid: c.int(), status: "exit 1")
        case 5: message = .protected(step: c.int(), layoutChunkBytes: c.int())
        case 6: message = .ready(restoredStep: c.optionalInt())
        case 7: message = .restoreFailed(reason: "fuzz")
        case 8: message = .workerDone(finalStep: c.int())
        case 9: message = .rebuilt(step: c.optionalInt(), error: c.byte() % 2 == 0 ? "" : "failed")
        case 10: message = .statusQuery
        case 11: message = .commit(step: c.int())  // not for the coordinator: must change nothing
        case 12: message = .startRefused(worker: c.string(settings.workerIDs), reason: "fuzz")
        default: message = .smpHeartbeat(dataBytes: c.int() & 0xFFFF, parityBytes: 0)
        }
        // As the coordinator's server receives it: encoded, decoded (bounds apply), then handled.
        guard let (decoded, envelope) = try? ControlMessage.decode(message.envelope(sender: sender, epoch: epoch).encoded()) else { continue }
        _ = coordinator.receive(decoded, from: envelope.sender, epoch: envelope.epoch, now: now)
        precondition(coordinator.epoch >= lastEpoch, "the epoch went back")
        lastEpoch = coordinator.epoch
        if let committed = coordinator.committedStep { precondition(committed <= WireLimits.maxStep) }
        _ = coordinator.ecHealth(of: sender)
    }
}
