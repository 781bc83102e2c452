import FTControl
import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation
import Logging

/// The snapshot management process of one node (ARCHITECTURE.md, "Processes").
///
/// A single-threaded event loop (the `EventLoopShell` it shares with the
/// coordinator: poll, the stop pipe, a signalfd for SIGTERM/SIGINT) over the
/// sockets and descriptors of its components, each of which owns its state
/// and is reached only through its methods:
/// - `NodeMemory`: the store core and the shared-memory slots it describes;
/// - `WorkerService`: the workers' socket, who may ask on it, the answers;
/// - `WorkerSupervisor`: the worker processes (spawn, restart budget,
///   replacement orders with stack dumps), one pidfd each, so that an exit is
///   seen at once, not by timeout;
/// - `CoordinatorAgent`: the link to the coordinator (hello, heartbeats from
///   a thread of its own, reports, orders);
/// - `DataPlane`, with a coordinator: the data endpoint, erasure coding
///   across nodes (rounds, rebuilds, repairs).
///
/// The server owns only the wiring: the ZeroMQ context, the loop, the
/// requests held while the node's memory is rebuilt or repaired (answered
/// once it is over, at most `maxHeldRequests`), and the exit code. It hands
/// every request to the component that serves its socket, every coordinator
/// order to the components it concerns (`SMPServer+Orders.swift`, which also
/// holds what a worker's exit changes, the shutdown and the status), and
/// each component's report to the one that acts on it.
///
/// With a coordinator, it says hello with its inventory (committed and staged
/// steps), heartbeats, reports a child's exit at once, reports
/// `protected(s)` when every local worker staged `s` and the data plane
/// protected it, and obeys `commit`, `abort`, `restore`, `rebuild`,
/// `restartWorkers`, `fenced` and `stop`. `restartWorkers` names the
/// incarnation to replace: a worker the coordinator declared dead but whose
/// process still runs (hung, stopped, cut off) is killed first, after its
/// thread backtraces are saved to `RUN_DIR/stacks` when the coordinator asks
/// (a hang); it is respawned when its exit is seen, without reporting that
/// exit (the coordinator ordered it).
///
/// It ends on SIGTERM (stops its workers, frees every segment), on the
/// coordinator's `stop` or `fenced`, or, when it spawned workers, once all of
/// them exited successfully (a clean job end, which also frees every segment).
public final class SMPServer: @unchecked Sendable {
    public let config: SMPConfiguration
    let logger: Logger
    let context: ZMQContext
    let shell: EventLoopShell
    let memory: NodeMemory
    let workers: WorkerService
    /// The node's worker processes.
    let supervisor: WorkerSupervisor
    let agent: CoordinatorAgent
    /// With a coordinator: the data endpoint and erasure coding.
    let dataPlane: DataPlane?
    /// The persistent tier's writer (with `config.persistDirectory`).
    let persister: Persister?
    /// Requests that arrived during a rebuild or a repair, answered once it is over.
    var heldRequests: [Request] = []
    /// At most this many requests are held during a rebuild; more are refused (`busy`).
    static let maxHeldRequests = 4096
    /// Requests refused because `maxHeldRequests` were held.
    var refusedHeld = 0
    /// Counted and dropped: frames that could not be decoded.
    public internal(set) var malformedFrames = 0
    /// Requests refused for their peer (`unauthorized`).
    public internal(set) var unauthorizedRequests = 0
    var exitCode: Int32 = 0
    /// Every configured worker registered at least once (sizes are final).
    private var everyWorkerRegistered = false
    var stopRequested = false
    /// Test-only fault injection (FT_FAULT_FLIP_STAGED_STEP=S): flip a byte of
    /// the first worker's slot staged for the first round at or after step S,
    /// before the SMP checks it.
    let faultFlipStagedStep = ProcessInfo.processInfo.environment["FT_FAULT_FLIP_STAGED_STEP"].flatMap(Int.init)
    var faultFlipFired = false

    /// The workers' endpoint as bound.
    public var boundEndpoint: String { workers.endpoint }
    /// The data endpoint as bound ("" without a coordinator).
    public var dataEndpoint: String { dataPlane?.endpoint ?? "" }
    /// The shared-memory budget in force (bytes).
    public var memoryLimit: Int { memory.memoryLimit }
    /// Workers' requests wait while this node's memory is rebuilt or repaired.
    var rebuildInProgress: Bool { dataPlane?.busy ?? false }

    /// `watchSignals`: take SIGTERM/SIGINT through a signalfd (the `ft-smp`
    /// process); leave it off in-process.
    public init(config: SMPConfiguration, logger: Logger, watchSignals: Bool) throws {
        try SMPConfiguration.validateID(config.jobID, "job id")
        try SMPConfiguration.validateID(config.nodeID, "node id")
        self.config = config
        self.logger = logger
        shell = try EventLoopShell(watchSignals: watchSignals)
        context = try ZMQContext()
        for sub in ["", "/logs", "/pids", "/stacks"] {
            try FileManager.default.createDirectory(atPath: config.runDirectory + sub, withIntermediateDirectories: true)
        }
        memory = NodeMemory(rule: config.coordinatorEndpoint != nil ? CoordinatorCommitRule() : LocalCommitRule(),
                            memoryLimit: config.memoryLimit ?? SMPConfiguration.defaultMemoryLimit(),
                            jobID: config.jobID, nodeID: config.nodeID, logger: logger)
        workers = try WorkerService(config: config, context: context, memory: memory, logger: logger)
        supervisor = WorkerSupervisor(config: config, smpEndpoint: workers.endpoint, logger: logger)
        dataPlane = config.coordinatorEndpoint != nil ? try DataPlane(config: config, context: context, memory: memory, logger: logger) : nil
        agent = try CoordinatorAgent(config: config, logger: logger)
        persister = config.persistDirectory.map { Persister(root: $0, keep: max(1, config.persistKeep), bytesPerSecond: config.persistBytesPerSecond) }
        wire()
    }

    /// Each component's reports go to the one that acts on them.
    private func wire() {
        memory.keepAlive = { [unowned self] in keepAlive() }
        workers.allStaged = { [unowned self] step in
            // Checked against the workers' CRCs before anything is made of it: a slot
            // changed since its worker wrote it would be folded into parity as it is,
            // and a later repair would decode the same wrong bytes. Its worker is
            // ended (a failure like any other): the job goes back to the committed step.
            if let flip = faultFlipStagedStep, step >= flip, !faultFlipFired {
                faultFlipFired = true
                logger.warning("fault injection: a byte of step \(step)'s staged slot flipped")
                memory.flipStagedByte(step: step)
            }
            if let (worker, chunk) = memory.corruptStagedSlot(step: step) {
                logger.error("worker \(worker)'s snapshot of step \(step) fails its CRC32C (\(chunk)): its slot changed after the worker wrote it; ending the worker, the job recovers from the committed step")
                if let child = supervisor.children[worker] { kill(child.pid, SIGKILL) }
                return
            }
            if let dataPlane { dataPlane.startProtecting(step: step) } else { agent.report(.protected(step: step, layoutChunkBytes: 0)) }
        }
        workers.repair = { [unowned self] (worker, unlessVerified) throws(StoreError) -> Bool in
            guard let dataPlane else { return true }
            return try dataPlane.verifyAndRepair(worker: worker, unlessVerified: unlessVerified)
        }
        workers.startRefused = { [unowned self] worker, reason in agent.report(.startRefused(worker: worker, reason: reason)) }
        workers.children = { [unowned self] in supervisor.children }
        workers.status = { [unowned self] in statusJSON() }
        if let dataPlane {
            dataPlane.report = { [unowned self] message in agent.report(message) }
            dataPlane.epoch = { [unowned self] in agent.epoch }
            dataPlane.keepAlive = { [unowned self] in keepAlive() }
        }
    }

    /// Asks a running `run()` to shut down, from any thread.
    public func stop() { shell.stop() }

    // MARK: run loop

    /// Runs until SIGTERM, `stop()`, the coordinator's `stop`/`fenced`, or a
    /// clean end of all spawned workers. Returns the process exit code: 0 for a
    /// clean end or a requested stop, 1 when the coordinator stopped a failed
    /// job, 3 when fenced.
    @discardableResult
    public func run() throws -> Int32 {
        logger.info("smp up", metadata: ["job": "\(config.jobID)", "node": "\(config.nodeID)", "endpoint": "\(boundEndpoint)",
                                        "data": "\(dataEndpoint)", "pid": "\(getpid())", "memory_limit": "\(memoryLimit)"])
        SMPFiles.write(config.runDirectory + "/pids/\(config.nodeID).smp.pid", "\(getpid())\n")
        SMPFiles.appendLine(config.runDirectory + "/pids/history", "\(config.nodeID) smp \(getpid())")
        if let step = config.resumeStep { try loadPersisted(step: step) }
        try supervisor.startAll(epoch: agent.epoch)
        agent.start(inventory)
        loop: while true {
            keepAlive()
            // Always current: the control thread says it at once to a coordinator that
            // restarts (a stale one, from before the last commit, would mislead it).
            agent.updateHello(inventory)
            var items: [ZMQPoller.Item] = [.init(workers.router, .readable)]
            let (childItems, childIDs) = supervisor.pollItems()
            items += childItems
            for p in dataPlane?.peerSockets ?? [] { items.append(.init(p, .readable)) }
            var dataIndex: Int?
            if let dataPlane {
                dataIndex = items.count
                items.append(.init(dataPlane.router, .readable))
            }
            if let inbox = agent.inbox { items.append(.init(inbox, .readable)) }
            var wait = Int(config.heartbeatInterval * 1000)
            if let at = dataPlane?.wakeAt { wait = min(wait, max(1, Int((at - monotonicSeconds()) * 1000))) }
            let (ready, stop) = try shell.poll(items, timeoutMilliseconds: wait)
            if let stop {
                logger.info("smp stopping \(stop)")
                break loop
            }
            for (offset, id) in childIDs.enumerated() where ready[1 + offset].isReadable {  // after the router
                try childExited(id)
            }
            supervisor.endReplacedWorkers()
            let dataReadable = dataIndex.map { ready[$0].isReadable } ?? false
            if ready[0].isReadable || dataReadable || (!heldRequests.isEmpty && !rebuildInProgress) { try drainRequests() }
            if agent.inbox != nil, ready.last!.isReadable { try obeyCoordinator() }
            dataPlane?.drainPeers()
            checkPersist()
            if stopRequested { break loop }
            if supervisor.allFinished {
                logger.info("all workers finished; clean end")
                break loop
            }
        }
        shutdown()
        return exitCode
    }

    /// Between pieces of long work on the event loop, and on every turn: tells
    /// the control thread the loop is alive (it heartbeats meanwhile), with
    /// this node's image and parity sizes.
    func keepAlive() {
        agent.progress()
        agent.reportSizes { (reportedImageBytes, dataPlane?.parityBytesHeld ?? 0, memory.sharedMemoryBytes) }
    }

    /// The image size the heartbeats carry: 0 until every worker of the node
    /// registered once. The coordinator cuts the EC layout to the largest node's
    /// image; one cut to a node half registered grows later, and a new chunk size
    /// drops every node's parity, the committed step's included.
    private var reportedImageBytes: Int {
        if !everyWorkerRegistered { everyWorkerRegistered = memory.store.workers.count >= config.workerCount }
        return everyWorkerRegistered ? memory.imageBytes : 0
    }

    /// What this node holds, as the hello says it.
    var inventory: ControlMessage.SMPInventory {
        let store = memory.store
        let steps = store.workers.values.map { $0.lastCommitted }
        let committed: Int? = steps.isEmpty || steps.contains(where: { $0 == nil }) ? nil : steps.compactMap { $0 }.min()
        return .init(node: config.nodeID, pid: Int(getpid()), dataEndpoint: dataEndpoint,
                     workers: (0..<config.workerCount).map { "w\($0)" }, rankOffset: config.rankOffset,
                     committedStep: committed, stagedStep: store.stagedStep,
                     protectedStep: agent.protectedStep(staged: store.stagedStep, layoutChunkBytes: dataPlane?.chunkBytes ?? 0),
                     layoutChunkBytes: dataPlane?.chunkBytes ?? 0)
    }

    // MARK: requests

    /// A request as received, and the socket it came on (its reply goes back there).
    struct Request {
        var frames: [ZMQMessage]
        var fromPeers: Bool
    }

    /// Every request waiting on the workers' socket and the data endpoint
    /// (and the held ones, once no rebuild or repair runs): EC frames and
    /// fetches go to the data plane, everything else to the worker service,
    /// each after its socket's owner admitted the peer.
    func drainRequests() throws {
        func next() throws -> Request? {
            if !rebuildInProgress, !heldRequests.isEmpty { return heldRequests.removeFirst() }
            if let frames = try workers.router.receiveMessages(timeoutMilliseconds: 0) { return Request(frames: frames, fromPeers: false) }
            if let dataPlane, let frames = try dataPlane.router.receiveMessages(timeoutMilliseconds: 0) {
                return Request(frames: frames, fromPeers: true)
            }
            return nil
        }
        while let request = try next() {
            let frames = request.frames
            let socket = request.fromPeers ? dataPlane!.router : workers.router
            let identity = frames[0].bytes
            guard frames.count >= 2 else {
                malformedFrames += 1
                logger.warning("dropped a message with no payload frame")
                continue
            }
            let reply: [ZMQFrame]
            do {
                let (message, envelope) = try SMPMessage.decode(frames[1].bytes)
                let refusal = request.fromPeers ? dataPlane!.refusal(message, sender: envelope.sender, frame: frames[1])
                    : workers.refusal(message, sender: envelope.sender, frame: frames[1])
                if let refusal {
                    unauthorizedRequests += 1
                    logger.warning("refused a request: \(refusal)", metadata: ["unauthorized.total": "\(unauthorizedRequests)"])
                    try? socket.send([.bytes(identity), .bytes(SMPMessage.error(code: refusal.code.rawValue, message: refusal.message)
                        .envelope(sender: config.nodeID, epoch: envelope.epoch).encoded())])
                    continue
                }
                switch message {
                case .ecChunk, .ecFetch:
                    // A chunk's frames are acked once all are folded: most get no reply.
                    guard let r = dataPlane!.peerRequest(message, envelope: envelope, frames: frames) else { continue }
                    reply = r
                default:
                    if rebuildInProgress {
                        // This node's memory is being rebuilt: its workers wait for the answer.
                        guard heldRequests.count < Self.maxHeldRequests else {
                            refusedHeld += 1
                            logger.warning("refused a request from \(envelope.sender): \(Self.maxHeldRequests) requests are already held during the rebuild")
                            reply = [.bytes(SMPMessage.error(code: StoreError.Code.busy.rawValue,
                                                             message: "\(Self.maxHeldRequests) requests are held while node \(config.nodeID) rebuilds; ask again later")
                                .envelope(sender: config.nodeID, epoch: envelope.epoch).encoded())]
                            try? socket.send([.bytes(identity)] + reply)
                            continue
                        }
                        heldRequests.append(request)
                        continue
                    }
                    guard let r = workers.handle(message, from: envelope.sender, requestID: envelope.epoch) else {
                        heldRequests.append(request)  // a repair from parity started: answered once it is over
                        continue
                    }
                    reply = r
                }
            } catch {
                malformedFrames += 1
                logger.warning("dropped a malformed frame: \(error)", metadata: ["malformed.total": "\(malformedFrames)"])
                reply = [.bytes(SMPMessage.error(code: StoreError.Code.malformed.rawValue, message: "\(error)")
                    .envelope(sender: config.nodeID).encoded())]
            }
            do {
                try socket.send([.bytes(identity)] + reply)
            } catch {
                logger.warning("reply not sent: \(error)")
            }
        }
    }
}
