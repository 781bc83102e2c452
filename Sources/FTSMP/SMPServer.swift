import FTControl
import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation
import Logging

/// The snapshot management process of one node (ARCHITECTURE.md, "Processes").
///
/// A single-threaded event loop over two ZeroMQ ROUTERs, one per audience:
/// the workers' socket (`ipc://`, in a 0700 directory, the file 0600; every
/// request's peer is checked with SO_PEERCRED: the job's uid, and for spawned
/// workers the process, or a descendant of the process, of the very worker the
/// request names) and, with a coordinator, the data endpoint (peers' EC
/// frames and other nodes' workers' slice requests, and nothing else): by
/// default `ipc://` beside it, each peer of the job's uid; on `tcp://` in a
/// job with keys a CURVE server whose ZAP handler admits only the SMPs' node
/// keys and the worker key, each request served by the role and node its key
/// proved (`DataPlaneKeys`). Then one pidfd per child worker (its exit is
/// seen at once, not by timeout), and the stop pipe and signalfd
/// (SIGTERM/SIGINT: graceful shutdown) of the `EventLoopShell` it shares with
/// the coordinator. Decisions are made by `SnapshotStoreInstance` and the
/// data-plane cores; this shell owns the shared memory (two pre-faulted 0600
/// slots per worker, named `/ft-<job>-<node>-p<pid>-<worker>-s<slot>`); the
/// worker processes are its `WorkerSupervisor`'s, the coordinator link its
/// `ControlChannel`'s.
///
/// With a coordinator, it says hello with its inventory (committed and staged
/// steps), heartbeats (from a thread of its own, `ControlChannel`, so that
/// bulk work on the event loop never delays one), reports a child's exit at
/// once, reports `protected(s)` when every local worker staged `s`, and obeys
/// `commit`, `abort`, `restore`, `restartWorkers`, `fenced` and `stop`.
///
/// Files: this one holds the event loop, the coordinator's orders and the
/// intake of requests; `SMPServer+Requests.swift` who may ask what and the
/// answers (a worker's request id comes back in its reply);
/// `SMPServer+Lifecycle.swift` what a worker's exit changes, shutdown and
/// status; `WorkerSupervisor.swift` the worker processes (spawn, restart
/// budget, replacement orders with stack dumps);
/// `ErasureCoding.swift` and `ErasureCoding+Rebuild.swift` the data plane.
///
/// `restartWorkers` names the incarnation to replace: a worker the coordinator
/// declared dead but whose process still runs (hung, stopped, cut off) is
/// killed first, after its thread backtraces are saved to `RUN_DIR/stacks`
/// when the coordinator asks (a hang); it is respawned when its exit is seen,
/// without reporting that exit (the coordinator ordered it).
///
/// It ends on SIGTERM (stops its workers, frees every segment), on the
/// coordinator's `stop` or `fenced`, or, when it spawned workers, once all of
/// them exited successfully (a clean job end, which also frees every segment).
public final class SMPServer: @unchecked Sendable {
    public let config: SMPConfiguration
    let logger: Logger
    var store: SnapshotStoreInstance
    let context: ZMQContext
    /// Workers' requests (the ipc socket).
    let router: ZMQSocket
    /// Peers: EC frames from other SMPs, slice requests from other nodes' workers (`SMPConfiguration.dataEndpoint`).
    let dataRouter: ZMQSocket?
    public internal(set) var boundEndpoint: String
    var segments: [String: [SharedMemorySegment]] = [:]
    /// The node's worker processes.
    let supervisor: WorkerSupervisor
    let shell: EventLoopShell
    /// Counted and dropped: frames that could not be decoded.
    public internal(set) var malformedFrames = 0
    /// The coordinator link, on its own thread.
    var channel: ControlChannel?
    /// Erasure coding across nodes, once the coordinator sent the layout.
    var erasure: ErasureState?
    /// Test-only fault injection (FT_FAULT_KILL_DURING_EC_STEP=S): SIGKILL this
    /// SMP halfway through sending its chunks of the first round at or after step S.
    let faultKillDuringECStep = ProcessInfo.processInfo.environment["FT_FAULT_KILL_DURING_EC_STEP"].flatMap(Int.init)
    public internal(set) var dataEndpoint: String = ""
    /// CURVE on a `tcp://` data endpoint of a job with keys: the pair this SMP
    /// serves with and presents to its peers (`DataPlaneKeys`); nil on ipc.
    let dataKeys: DataPlaneKeys?
    /// Admits only the SMP and worker keys to the data endpoint (with `dataKeys`).
    let dataZAP: ZAPAuthenticator?
    var exitCode: Int32 = 0
    /// The step of the last `protected` sent, while that round is still staged
    /// (a hello says it again for a coordinator that restarts).
    var lastProtected: Int?
    var pendingRebuild: (step: Int?, lost: [String])?
    /// Requests that arrived during a rebuild, answered once it is over.
    var heldRequests: [Request] = []
    /// Which process is which spawned worker: pid -> (worker, the worker's own pid), checked against `children`.
    var requestOwners: [Int32: (worker: String, childPID: Int32)] = [:]
    /// Requests refused for their peer (`unauthorized`).
    public internal(set) var unauthorizedRequests = 0
    /// At most this many requests are held during a rebuild; more are refused (`busy`).
    static let maxHeldRequests = 4096
    /// The shared-memory budget in force (bytes).
    public let memoryLimit: Int
    /// Shared memory allocated now (bytes, every slot of every worker).
    var sharedMemoryBytes: Int { segments.values.reduce(0) { $0 + $1.reduce(0) { $0 + $1.count } } }
    /// Requests refused because they did not fit the layout or a bound (`out_of_range`, `memory_limit`, …).
    public internal(set) var refusedRequests = 0
    /// EC fetches from peers refused (outside the layout); refused chunk frames
    /// are counted by the round core (`ECRoundInstance.refusedFrames`).
    var refusedChunks = 0
    /// The committed slot each worker's bytes were last checked in (step, slot).
    var verifiedSlots: [String: (step: Int, slot: Int)] = [:]
    /// Workers' requests wait while this node's memory is rebuilt or repaired.
    var rebuildInProgress: Bool { pendingRebuild != nil || erasure?.rebuilding != nil || erasure?.repairing != nil }
    var stopRequested = false

    /// `watchSignals`: take SIGTERM/SIGINT through a signalfd (the `ft-smp`
    /// process); leave it off in-process.
    public init(config: SMPConfiguration, logger: Logger, watchSignals: Bool) throws {
        try SMPConfiguration.validateID(config.jobID, "job id")
        try SMPConfiguration.validateID(config.nodeID, "node id")
        self.config = config
        self.logger = logger
        memoryLimit = config.memoryLimit ?? SMPConfiguration.defaultMemoryLimit()
        shell = try EventLoopShell(watchSignals: watchSignals)
        context = try ZMQContext()
        // Workers' requests and peers' EC frames: an envelope or one bulk frame at most.
        router = try context.socket(.router, maxMessageBytes: SMPMessage.maxFrameBytes(bulkFrameBytes: ErasureState.frameBytes))
        try router.setLinger(milliseconds: 0)
        if config.coordinatorEndpoint != nil {
            let data = try context.socket(.router, maxMessageBytes: SMPMessage.maxFrameBytes(bulkFrameBytes: ErasureState.frameBytes))
            try data.setLinger(milliseconds: 0)
            try data.boundBulkReceives()  // peers' EC frames
            if let dir = config.keysDirectory, config.dataEndpoint.hasPrefix("tcp://") {
                // On the network: CURVE, and only the job's SMP and worker keys get in.
                let keys = try DataPlaneKeys.load(from: dir, node: config.nodeID)
                // Node keys where the directory has them (then the shared smp.key, which
                // every SMP holds to serve, is not a client key); the shared key where not.
                var clients = [try CurveKeyPair.load(from: dir + "/worker.key").publicKey: DataPlaneKeys.workerUser]
                let nodes = try DataPlaneKeys.nodePublicKeys(in: dir)
                if nodes.isEmpty { clients[keys.serverPublicKey] = DataPlaneKeys.smpUser }
                for (node, key) in nodes { clients[key] = DataPlaneKeys.nodeUser(node) }
                dataZAP = try ZAPAuthenticator(context: context, clients: clients) { [logger] line in
                    logger.warning("data endpoint: \(line)")
                }
                try data.makeCurveServer(keys.server!)
                dataKeys = keys
            } else {
                dataKeys = nil
                dataZAP = nil
            }
            dataRouter = data
        } else {
            dataRouter = nil
            dataKeys = nil
            dataZAP = nil
        }
        try FileManager.default.createDirectory(atPath: config.runDirectory, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: config.runDirectory + "/logs", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: config.runDirectory + "/pids", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: config.runDirectory + "/stacks", withIntermediateDirectories: true)
        boundEndpoint = try Self.bindPrivately(router, config.endpoint, runDirectory: config.runDirectory, what: "workers'", logger: logger)
        supervisor = WorkerSupervisor(config: config, smpEndpoint: boundEndpoint, logger: logger)
        // Segments left by a previous SMP of this node that died: its memory is
        // lost by definition (a replacement rebuilds from parity), and the names
        // must be free for this one.
        let prefix = "ft-\(config.jobID)-\(config.nodeID)-"
        let stale = ((try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? []).filter { $0.hasPrefix(prefix) }
        for name in stale { SharedMemorySegment.unlink(name: "/" + name) }
        if !stale.isEmpty { logger.info("removed \(stale.count) shared-memory segments left by a previous SMP of \(config.nodeID)") }
        if let coordinator = config.coordinatorEndpoint {
            store = SnapshotStoreInstance(rule: CoordinatorCommitRule())
            dataEndpoint = try Self.bindPrivately(dataRouter!, config.dataEndpoint, runDirectory: config.runDirectory, what: "data", logger: logger)
            let keys = try config.keysDirectory.map { try JobKeys.load(from: $0, role: .smp, node: config.nodeID) }
            channel = try ControlChannel(endpoint: coordinator, memberID: config.nodeID, keys: keys,
                                         interval: config.heartbeatInterval, timeout: config.heartbeatTimeout,
                                         hangBound: config.hangBound, logger: logger)
        } else {
            store = SnapshotStoreInstance()
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
        try supervisor.startAll(epoch: channel?.epoch ?? 0)
        sendHello()
        channel?.start()
        loop: while true {
            channel?.progress()
            reportSizes()
            // Always current: the control thread says it at once to a coordinator that
            // restarts (a stale one, from before the last commit, would mislead it).
            updateHello()
            var items: [ZMQPoller.Item] = [.init(router, .readable)]
            let (childItems, childIDs) = supervisor.pollItems()
            items += childItems
            if let ec = erasure { for p in ec.peers.values { items.append(.init(p, .readable)) } }
            var dataIndex: Int?
            if let dataRouter {
                dataIndex = items.count
                items.append(.init(dataRouter, .readable))
            }
            if let channel { items.append(.init(channel.inbox, .readable)) }
            var wait = Int(config.heartbeatInterval * 1000)
            if let at = erasure?.wakeAt { wait = min(wait, max(1, Int((at - monotonicSeconds()) * 1000))) }
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
            if channel != nil, ready.last!.isReadable { try handleCoordinator() }
            drainPeerAcks()
            if stopRequested { break loop }
            if supervisor.allFinished {
                logger.info("all workers finished; clean end")
                break loop
            }
        }
        shutdown()
        return exitCode
    }

    // MARK: coordinator

    /// A slot segment, pre-faulted in 4 MiB pieces with heartbeats between
    /// (a 1 GiB slot takes a second to fault in, far longer on a loaded VM;
    /// each piece is one system call, kept short for the cores' sake, see
    /// `ZMQSocket.bulkReceiveBufferBytes`).
    func createSlot(name: String, count: Int) throws -> SharedMemorySegment {
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

    /// Between pieces of long work on the event loop: tells the control
    /// thread the loop is alive (it heartbeats meanwhile).
    func keepAlive() {
        channel?.progress()
        reportSizes()
    }

    /// The sizes heartbeats carry: this node's image and the parity it holds
    /// (worked out at most twice per heartbeat interval: the loop turns for every frame).
    func reportSizes() {
        let now = monotonicSeconds()
        guard let channel, now - sizesReportedAt >= config.heartbeatInterval / 2 else { return }
        sizesReportedAt = now
        channel.setSizes(data: imageBytes, parity: erasure?.parityBytesHeld ?? 0)
    }
    var sizesReportedAt = 0.0

    /// Sends a message to the coordinator (if any); remembers a `protected` for later hellos.
    func report(_ message: ControlMessage) {
        if case .protected(let step) = message { lastProtected = step }
        channel?.send(message)
    }

    func applyLayout(_ layout: ECLayout) {
        if let ec = erasure, ec.layout.k == layout.k, ec.layout.m == layout.m, ec.layout.chunkBytes == layout.chunkBytes,
           ec.layout.groups == layout.groups {
            if ec.layout.endpoints != layout.endpoints { updateEndpoints(ec, layout) }
            return
        }
        do {
            erasure = try ErasureState(layout: layout, node: config.nodeID)
            logger.info("EC layout: RS(\(layout.k)+\(layout.m)), chunk \(layout.chunkBytes) bytes, group \(erasure!.group) position \(erasure!.position)")
            if let s = store.stagedStep { startProtecting(step: s) }
            if let (step, lost) = pendingRebuild {
                pendingRebuild = nil
                startRebuild(step: step, lost: lost)
            }
        } catch {
            logger.error("EC layout refused: \(error)")
        }
    }

    /// What this node holds, as the hello says it.
    var inventory: ControlMessage.SMPInventory {
        let steps = store.workers.values.map { $0.lastCommitted }
        let committed: Int? = steps.isEmpty || steps.contains(where: { $0 == nil }) ? nil : steps.compactMap { $0 }.min()
        return .init(node: config.nodeID, pid: Int(getpid()), dataEndpoint: dataEndpoint,
                     workers: (0..<config.workerCount).map { "w\($0)" }, rankOffset: config.rankOffset,
                     committedStep: committed, stagedStep: store.stagedStep,
                     protectedStep: lastProtected.flatMap { $0 == store.stagedStep ? $0 : nil },
                     layoutChunkBytes: erasure?.chunkBytes ?? 0)
    }

    /// The hello the control thread repeats until welcomed.
    func updateHello() { channel?.setHello(inventory) }

    func sendHello() {
        guard let channel else { return }
        channel.setHello(inventory)
        channel.send(.smpHello(inventory))
    }

    func handleCoordinator() throws {
        guard let channel else { return }
        for message in channel.receive() {
            switch message {
            case .welcome, .ack, .pause:
                break
            case .helloRequired:
                sendHello()
            case .ecLayout(let layout):
                applyLayout(layout)
            case .rebuild(let step, let lost):
                guard erasure != nil else {
                    pendingRebuild = (step, lost)  // the layout is on its way
                    continue
                }
                startRebuild(step: step, lost: lost)  // reports `rebuilt` when done; the loop goes on meanwhile
            case .commit(let step):
                if let ec = erasure, let t0 = ec.stagedAt.removeValue(forKey: step) {
                    let fold = ec.foldStats.removeValue(forKey: step) ?? (0, 0)
                    logger.info("round \(step) committed", metadata: [
                        "staged_to_committed_ms": "\(String(format: "%.1f", (monotonicSeconds() - t0) * 1000))",
                        "image_bytes": "\(imageBytes)", "folded_bytes": "\(fold.bytes)",
                        "fold_ms": "\(String(format: "%.1f", fold.seconds * 1000))"])
                    ec.stagedAt = ec.stagedAt.filter { $0.key > step }
                    ec.foldStats = ec.foldStats.filter { $0.key > step }
                }
                if let ec = erasure { runRound(ec, ec.round.commit(step: step)) }
                if store.allHaveStaged(step) {
                    store.commit(step: step)
                    logger.debug("committed step \(step)")
                } else if store.committedStep != step {
                    logger.warning("commit(\(step)) but not every local worker holds it staged")
                }
            case .abort(let step):
                lastProtected = nil
                store.abort(step: step)
                if let ec = erasure { runRound(ec, ec.round.abort(step: step)) }
                logger.info("snapshot round \(step) aborted by the coordinator")
            case .restore(let step, _):
                lastProtected = nil  // any staged round is void now
                if let ec = erasure { runRound(ec, ec.round.restore(step: step)) }
                if !store.prepareRestore(step: step) {
                    logger.error("asked to restore step \(step.map(String.init) ?? "none"), which this node does not hold committed")
                }
            case .restartWorkers(let list):
                for r in list { try supervisor.replace(r, epoch: channel.epoch) }
            case .fenced(let reason):
                logger.error("fenced by the coordinator: \(reason); stopping")
                exitCode = 3
                stopRequested = true
            case .stop(let reason, let failed):
                logger.info("job stopped by the coordinator: \(reason)", metadata: ["failed": "\(failed)"])
                exitCode = failed ? 1 : 0
                stopRequested = true
            default:
                logger.debug("ignored \(message.type) from the coordinator")
            }
        }
    }

    /// A request as received, and the socket it came on (its reply goes back there).
    struct Request {
        var frames: [ZMQMessage]
        var fromPeers: Bool
    }

    func drainRequests() throws {
        func next() throws -> Request? {
            if !rebuildInProgress, !heldRequests.isEmpty { return heldRequests.removeFirst() }
            if let frames = try router.receiveMessages(timeoutMilliseconds: 0) { return Request(frames: frames, fromPeers: false) }
            if let dataRouter, let frames = try dataRouter.receiveMessages(timeoutMilliseconds: 0) {
                return Request(frames: frames, fromPeers: true)
            }
            return nil
        }
        while let request = try next() {
            let frames = request.frames
            let socket = request.fromPeers ? dataRouter! : router
            let identity = frames[0].bytes
            guard frames.count >= 2 else {
                malformedFrames += 1
                logger.warning("dropped a message with no payload frame")
                continue
            }
            let reply: [ZMQFrame]
            do {
                let (message, envelope) = try SMPMessage.decode(frames[1].bytes)
                if let refusal = refusal(message, sender: envelope.sender, frame: frames[1], fromPeers: request.fromPeers) {
                    unauthorizedRequests += 1
                    logger.warning("refused a request: \(refusal)", metadata: ["unauthorized.total": "\(unauthorizedRequests)"])
                    try? socket.send([.bytes(identity), .bytes(SMPMessage.error(code: refusal.code.rawValue, message: refusal.message)
                        .envelope(sender: config.nodeID, epoch: envelope.epoch).encoded())])
                    continue
                }
                switch message {
                case .ecChunk, .ecFetch:
                    // A chunk's frames are acked once all are folded: most get no reply.
                    guard let r = peerRequest(message, envelope: envelope, frames: frames) else { continue }
                    reply = r
                default:
                    if rebuildInProgress {
                        // This node's memory is being rebuilt: its workers wait for the answer.
                        guard heldRequests.count < Self.maxHeldRequests else {
                            refusedRequests += 1
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
                    guard let r = handle(message, from: envelope.sender, requestID: envelope.epoch) else {
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
