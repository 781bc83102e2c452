import FTControl
import FTCore
import FTSystem
import FTZMQ
import Foundation
import Logging

/// The SMP's service to workers (ARCHITECTURE.md, "The snapshot path").
///
/// Owns the workers' socket (a ROUTER on `ipc://`, in a 0700 directory, the
/// file 0600), who may ask on it (every request's peer is checked with
/// SO_PEERCRED: the job's uid, and for spawned workers the process, or a
/// descendant of the process, of the very worker the request names), and the
/// answers to workers' requests: register, begin, staged, restore, round,
/// status, and slices of replicated tensors (asked on this socket by the
/// node's own workers, or on the data endpoint by other nodes'). A worker's
/// request id comes back in its reply, so that a late reply is never taken
/// for the next one.
///
/// The slots and the store are `NodeMemory`'s: this service changes them
/// through its methods. What it cannot decide alone it hands over through
/// the hooks the server wires: a round every local worker staged
/// (`allStaged`, which the data plane protects), a checked read of a
/// committed slot (`repair`: the data plane repairs a corrupt chunk from
/// parity, and the request waits), a registration refused for memory
/// (`startRefused`, to the coordinator), which process is which spawned
/// worker (`children`, from the supervisor) and the status it answers with.
final class WorkerService {
    let config: SMPConfiguration
    let logger: Logger
    let memory: NodeMemory
    /// Workers' requests (the ipc socket).
    let router: ZMQSocket
    /// The endpoint bound.
    let endpoint: String
    /// Which process is which spawned worker: pid -> (worker, the worker's own pid), checked against `children`.
    private var requestOwners: [Int32: (worker: String, childPID: Int32)] = [:]
    /// Requests refused because they did not fit the layout or a bound (`out_of_range`, `memory_limit`, …).
    private(set) var refusedRequests = 0

    /// Every local worker staged this step.
    var allStaged: (Int) -> Void = { _ in }
    /// Checks a worker's committed slot (`unlessVerified`: skip one checked at
    /// this step already): false while a repair runs, a `corrupt` error when it cannot be repaired.
    var repair: (_ worker: String, _ unlessVerified: Bool) throws(StoreError) -> Bool = { _, _ in true }
    /// A registration refused for memory: (worker, reason).
    var startRefused: (String, String) -> Void = { _, _ in }
    /// The spawned workers' processes.
    var children: () -> [String: ChildProcess] = { [:] }
    /// The SMP's status (JSON).
    var status: () -> String = { "{}" }

    init(config: SMPConfiguration, context: ZMQContext, memory: NodeMemory, logger: Logger) throws {
        self.config = config
        self.memory = memory
        self.logger = logger
        // Workers' requests: an envelope at most (EC frames are refused here).
        router = try context.socket(.router, maxMessageBytes: SMPMessage.maxFrameBytes(bulkFrameBytes: ErasureState.frameBytes))
        try router.setLinger(milliseconds: 0)
        endpoint = try SocketFiles.bindPrivately(router, config.endpoint, runDirectory: config.runDirectory, what: "workers'", logger: logger)
    }

    /// A worker's process ended: its pids no longer speak for it.
    func forget(worker id: String) { requestOwners = requestOwners.filter { $0.value.worker != id } }

    /// Why `message`, which came on the workers' socket, may not be served,
    /// or nil when it may. The workers' ipc socket serves workers only, and
    /// each request's peer (SO_PEERCRED on the connection it came on) must be
    /// of the job's uid (or root); when this SMP spawned its workers, it must
    /// also be the process of the worker the request names, or a descendant
    /// of it. EC frames are refused here (peers use the data endpoint).
    func refusal(_ message: SMPMessage, sender: String, frame: ZMQMessage) -> StoreError? {
        switch message {
        case .ecChunk, .ecFetch:
            return StoreError(.unauthorized, "\(message.name) from '\(sender)' is not served on the workers' socket (peers use the data endpoint)")
        default:
            guard config.endpoint.hasPrefix("ipc://") else { return nil }  // TCP (tests): no credentials to check
            guard let peer = SocketFiles.peer(of: frame) else {
                return StoreError(.unauthorized, "a request from '\(sender)' came with no peer credentials")
            }
            guard peer.uid == getuid() || peer.uid == 0 else {
                return StoreError(.unauthorized, "a request from '\(sender)' came from uid \(peer.uid), not the job's uid \(getuid())")
            }
            guard config.workerCount > 0 else { return nil }  // workers started by someone else: the uid is what there is
            guard let owner = worker(owning: peer.pid) else {
                return StoreError(.unauthorized, "a request from '\(sender)' came from pid \(peer.pid), not a worker of node \(config.nodeID)")
            }
            guard owner == sender else {
                return StoreError(.unauthorized, "pid \(peer.pid) is worker \(owner) and may not speak for '\(sender)'")
            }
            return nil
        }
    }

    /// The spawned worker whose process is `pid` or an ancestor of it (a worker
    /// command may fork its trainer), remembered per pid while that worker's
    /// process lives.
    func worker(owning pid: Int32) -> String? {
        if let known = requestOwners[pid], children()[known.worker]?.pid == known.childPID { return known.worker }
        requestOwners[pid] = nil
        var p = pid
        for _ in 0..<16 {
            if let (id, child) = children().first(where: { $0.value.pid == p }) {
                requestOwners[pid] = (id, child.pid)
                return id
            }
            guard let parent = parentProcess(of: p), parent > 1 else { return nil }
            p = parent
        }
        return nil
    }

    // MARK: requests

    /// The reply to a worker's request, or nil when it waits for a repair.
    /// `requestID`: the request's id (its envelope's epoch field), which the
    /// reply carries back, so that a worker never takes a late reply for the
    /// answer to a later request (`SMPMessage`).
    func handle(_ message: SMPMessage, from sender: String, requestID: UInt64 = 0) -> [ZMQFrame]? {
        func reply(_ m: SMPMessage) -> [ZMQFrame] { [.bytes(m.envelope(sender: config.nodeID, epoch: requestID).encoded())] }
        func refuse(_ e: StoreError) -> [ZMQFrame] {
            switch e.code {
            case .memoryLimit:
                refusedRequests += 1
                logger.error("refused a request from \(sender): \(e)")
                // Starting the worker again needs the same memory: a job still
                // starting stops now, saying why, rather than at its start timeout.
                if case .register = message { startRefused(sender, e.message) }
            case .outOfRange, .invalidRegistration, .busy, .unexpectedRound:
                refusedRequests += 1
                logger.warning("refused a request from \(sender): \(e)")
            default:
                logger.info("refused a request from \(sender): \(e)")
            }
            return reply(.error(code: e.code.rawValue, message: e.message))
        }
        do throws(StoreError) {
            switch message {
            case .register(let registration):
                guard registration.workerID == sender else {
                    throw StoreError(.invalidRegistration, "sender '\(sender)' registered as '\(registration.workerID)'")
                }
                let (outcome, names) = try memory.register(registration)
                let slotBytes = memory.store.workers[registration.workerID]!.layout.slotBytes
                switch outcome {
                case .new(let bytes):
                    logger.info("worker registered", metadata: ["worker": "\(sender)", "slot.bytes": "\(bytes)",
                                                               "tensors": "\(registration.specs.count)"])
                    return reply(.registered(slotNames: names, slotBytes: slotBytes, committedStep: nil))
                case .rejoined(let committed):
                    logger.info("worker rejoined", metadata: ["worker": "\(sender)", "committed": "\(committed.map(String.init) ?? "none")"])
                    return reply(.registered(slotNames: names, slotBytes: slotBytes, committedStep: committed))
                }
            case .begin(let step):
                switch try memory.begin(worker: sender, step: step) {
                case .write(let slot): return reply(.beginReply(slot: slot, reason: ""))
                case .skip(let reason): return reply(.beginReply(slot: nil, reason: reason))
                }
            case .staged(let step, let slot, let crcs):
                if case .allStaged(let s) = try memory.staged(worker: sender, step: step, slot: slot, crcs: crcs) {
                    allStaged(s)
                }
                return reply(.stagedReply(committedStep: memory.store.workers[sender]?.lastCommitted))
            case .restoreQuery(let expected):
                if let expected, memory.store.committedStep != expected, memory.store.allHaveStaged(expected) {
                    // Its commit is decided and on its way: the worker carries the decision.
                    memory.commit(step: expected)
                }
                memory.discardUncommitted(worker: sender)  // any round of its in flight is void
                guard try repair(sender, false) else { return nil }
                let point = try memory.store.restorePoint(worker: sender)
                if let expected, point?.step != expected {
                    throw StoreError(.nothingCommitted, "node \(config.nodeID) holds step \(point.map { String($0.step) } ?? "none") "
                        + "committed for \(sender), not step \(expected)")
                }
                return reply(.restoreReply(point))
            case .roundQuery:
                let pending = memory.store.workers.values.contains { $0.slots.contains { if case .staged = $0 { true } else { false } } }
                return reply(.roundReply(committedStep: memory.store.committedStep, pending: pending))
            case .fetchSlice(let rank, let size, let tensor, let chunks):
                return try slice(rank: rank, size: size, tensor: tensor, chunks: chunks, requestID: requestID)
            case .status:
                return reply(.statusReply(status()))
            default:
                throw StoreError(.malformed, "\(message.name) is not a request")
            }
        } catch {
            return refuse(error)
        }
    }

    /// The committed bytes of chunks `chunks` of one rank's slice of a
    /// replicated tensor, from a slot checked against its CRCs (a corrupt
    /// chunk is repaired from parity, or named, never served).
    func slice(rank: Int, size: Int, tensor: String, chunks: Range<Int>, requestID: UInt64) throws(StoreError) -> [ZMQFrame]? {
        guard let owner = memory.store.worker(dpRank: rank, dpSize: size) else {
            throw StoreError(.unknownWorker, "no worker with DP rank \(rank) of \(size) on this node")
        }
        let id = owner.registration.workerID
        guard let entry = owner.layout.entry(named: tensor), entry.spec.replicated else {
            throw StoreError(.unknownTensor, "worker \(id) has no replicated tensor '\(tensor)'")
        }
        guard chunks.upperBound <= entry.chunkCount, entry.chunkCount == 0 || !chunks.isEmpty else {
            throw StoreError(.outOfRange, "chunks \(chunks) of '\(tensor)' asked for; DP rank \(rank) stores \(entry.chunkCount)")
        }
        // Once per committed step: every rank fetches slices of the same slot.
        guard try repair(id, true) else { return nil }
        guard let point = try memory.store.restorePoint(worker: id) else {
            throw StoreError(.nothingCommitted, "worker \(id) has no committed snapshot")
        }
        let bytes = chunks.isEmpty ? 0..<0
            : owner.layout.chunkRange(entry, chunk: chunks.lowerBound).lowerBound
                ..< owner.layout.chunkRange(entry, chunk: chunks.upperBound - 1).upperBound
        let base = memory.slotBase(worker: id, slot: point.slot)
        let data = UnsafeRawBufferPointer(start: base + entry.slotOffset + bytes.lowerBound, count: bytes.count)
        let crcs = chunks.map { point.crcs[entry.firstChunk + $0] }
        let range = (entry.storedRange.lowerBound + bytes.lowerBound) ..< (entry.storedRange.lowerBound + bytes.upperBound)
        let header = SMPMessage.sliceReply(step: point.step, range: range, crcs: crcs).envelope(sender: config.nodeID, epoch: requestID).encoded()
        // Zero-copy from the committed slot (verified above; the receiver checks every chunk's CRC again).
        return [.bytes(header), ZeroCopyFrames.frame(data)]
    }
}
