import FTControl
import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation
import Logging

/// What an SMP is told at start.
public struct SMPConfiguration: Sendable {
    public var jobID: String
    public var nodeID: String
    /// Where workers reach the SMP: `ipc://…` (default: `RUN_DIR/sockets/`, a
    /// directory of mode 0700; the socket file is 0600) or `tcp://127.0.0.1:PORT`
    /// (tests only: over TCP no peer credentials can be checked).
    public var endpoint: String
    /// Logs, PID files and the endpoint socket live here.
    public var runDirectory: String
    /// Workers to spawn (0: workers are started by someone else and connect).
    public var workerCount: Int
    /// The command each worker runs; the SMP adds the FT_* environment.
    public var workerCommand: [String]
    /// Restart a worker that exits unsuccessfully, up to this many times in total.
    public var maxRestarts: Int
    public var extraEnvironment: [String: String]
    /// The coordinator to report to. Without one, a step commits when every
    /// local worker staged it and the SMP restarts dead workers itself.
    public var coordinatorEndpoint: String?
    /// CURVE keys of the job (`JobKeys` layout), for the coordinator link.
    public var keysDirectory: String?
    /// Global DP rank of this node's first worker, and the job's DP size.
    public var rankOffset = 0
    public var worldSize: Int?
    public var heartbeatInterval = 0.1
    /// The coordinator's heartbeat timeout (heartbeat gaps over 0.3× of it are logged).
    public var heartbeatTimeout = 0.5
    /// The event loop not turning for this long is a hang: heartbeats stop so
    /// that the coordinator replaces this SMP.
    public var hangBound = 10.0
    /// The most shared memory (bytes, both slots of every worker) this SMP
    /// allocates; a registration past it is refused (`memory_limit`). nil:
    /// `defaultMemoryLimit()`, taken at start.
    public var memoryLimit: Int?

    public init(jobID: String, nodeID: String, endpoint: String? = nil, runDirectory: String, workerCount: Int,
                workerCommand: [String], maxRestarts: Int = 100, extraEnvironment: [String: String] = [:]) {
        self.jobID = jobID
        self.nodeID = nodeID
        self.runDirectory = runDirectory
        // The pid keeps a stopped-then-continued SMP of this node (a zombie the
        // coordinator fences) from unlinking its replacement's socket file.
        self.endpoint = endpoint ?? "ipc://\(runDirectory)/\(Self.socketDirectoryName)/\(nodeID)-p\(getpid()).smp.sock"
        self.workerCount = workerCount
        self.workerCommand = workerCommand
        self.maxRestarts = maxRestarts
        self.extraEnvironment = extraEnvironment
    }

    /// The directory under the run directory that holds the workers' sockets (mode 0700).
    public static let socketDirectoryName = "sockets"

    /// The default budget: 90% of what /dev/shm has free when the SMP starts
    /// (every registration is also checked against what it has free then).
    public static func defaultMemoryLimit() -> Int {
        guard let space = try? SharedMemorySegment.space() else { return WireLimits.maxBytes }
        return space.free / 10 * 9
    }

    /// Job and node ids go into shared-memory names: keep them to [A-Za-z0-9_-].
    public static func validateID(_ id: String, _ what: String) throws(SMPError) {
        let ok = !id.isEmpty && id.utf8.count <= 48
            && id.utf8.allSatisfy { ($0 >= 48 && $0 <= 57) || ($0 >= 65 && $0 <= 90) || ($0 >= 97 && $0 <= 122) || $0 == 45 || $0 == 95 }
        guard ok else { throw SMPError("\(what) '\(id)' must be 1-48 characters of A-Z, a-z, 0-9, '-' or '_'") }
    }
}

public struct SMPError: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The snapshot management process of one node (ARCHITECTURE.md, "Processes").
///
/// A single-threaded event loop over two ZeroMQ ROUTERs, one per audience:
/// the workers' socket (`ipc://`, in a 0700 directory, the file 0600; every
/// request's peer is checked with SO_PEERCRED: the job's uid, and for spawned
/// workers the process, or a descendant of the process, of the very worker the
/// request names) and, with a coordinator, the data endpoint (TCP: peers' EC
/// frames and other nodes' workers' slice requests, and nothing else). Then
/// one pidfd per child worker (its exit is seen at once,
/// not by timeout), a signalfd (SIGTERM/SIGINT: graceful shutdown) and a stop
/// pipe (in-process use). Decisions are made by `SnapshotStoreInstance`; this
/// shell owns the shared memory (two pre-faulted 0600 slots per worker, named
/// `/ft-<job>-<node>-<worker>-s<slot>`) and the child processes.
///
/// With a coordinator, it says hello with its inventory (committed and staged
/// steps), heartbeats (from a thread of its own, `ControlChannel`, so that
/// bulk work on the event loop never delays one), reports a child's exit at
/// once, reports `protected(s)` when every local worker staged `s`, and obeys
/// `commit`, `abort`, `restore`, `restartWorkers`, `fenced` and `stop`. It
/// also listens on TCP (its data endpoint) for peers' slice requests.
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
    /// Peers: EC frames from other SMPs, slice requests from other nodes' workers (TCP).
    let dataRouter: ZMQSocket?
    public private(set) var boundEndpoint: String
    var segments: [String: [SharedMemorySegment]] = [:]
    var children: [String: ChildProcess] = [:]
    private var restarts: [String: Int] = [:]
    private var finished: Set<String> = []
    private var totalRestarts = 0
    private let signals: SignalWatcher?
    private let stopPipe: (read: Int32, write: Int32)
    /// Counted and dropped: frames that could not be decoded.
    public private(set) var malformedFrames = 0
    /// The coordinator link, on its own thread.
    var channel: ControlChannel?
    /// Erasure coding across nodes, once the coordinator sent the layout.
    var erasure: ErasureState?
    /// Test-only fault injection (FT_FAULT_KILL_DURING_EC_STEP=S): SIGKILL this
    /// SMP halfway through sending its chunks of the first round at or after step S.
    let faultKillDuringECStep = ProcessInfo.processInfo.environment["FT_FAULT_KILL_DURING_EC_STEP"].flatMap(Int.init)
    public private(set) var dataEndpoint: String = ""
    private var exitCode: Int32 = 0
    /// The step of the last `protected` sent, while that round is still staged
    /// (a hello says it again for a coordinator that restarts).
    private var lastProtected: Int?
    /// Workers being ended on the coordinator's order, respawned when their
    /// exit is seen; `killAt`: when a stack dump still running is cut short.
    private var replacing: [String: (pid: Int32, killAt: Double?, dumper: ChildProcess?)] = [:]
    private var pendingRebuild: (step: Int?, lost: [String])?
    /// Requests that arrived during a rebuild, answered once it is over.
    private var heldRequests: [Request] = []
    /// Which process is which spawned worker: pid -> (worker, the worker's own pid), checked against `children`.
    private var requestOwners: [Int32: (worker: String, childPID: Int32)] = [:]
    /// Requests refused for their peer (`unauthorized`).
    public private(set) var unauthorizedRequests = 0
    /// At most this many requests are held during a rebuild; more are refused (`busy`).
    static let maxHeldRequests = 4096
    /// The shared-memory budget in force (bytes).
    public let memoryLimit: Int
    /// Shared memory allocated now (bytes, every slot of every worker).
    var sharedMemoryBytes: Int { segments.values.reduce(0) { $0 + $1.reduce(0) { $0 + $1.count } } }
    /// Requests refused because they did not fit the layout or a bound (`out_of_range`, `memory_limit`, …).
    public private(set) var refusedRequests = 0
    /// EC fetches from peers refused (outside the layout); refused chunk frames
    /// are counted by the round core (`ECRoundInstance.refusedFrames`).
    var refusedChunks = 0
    /// The committed slot each worker's bytes were last checked in (step, slot).
    var verifiedSlots: [String: (step: Int, slot: Int)] = [:]
    /// Workers' requests wait while this node's memory is rebuilt or repaired.
    private var rebuildInProgress: Bool { pendingRebuild != nil || erasure?.rebuilding != nil || erasure?.repairing != nil }
    private var stopRequested = false

    /// `watchSignals`: take SIGTERM/SIGINT through a signalfd (the `ft-smp`
    /// process); leave it off in-process.
    public init(config: SMPConfiguration, logger: Logger, watchSignals: Bool) throws {
        try SMPConfiguration.validateID(config.jobID, "job id")
        try SMPConfiguration.validateID(config.nodeID, "node id")
        self.config = config
        self.logger = logger
        memoryLimit = config.memoryLimit ?? SMPConfiguration.defaultMemoryLimit()
        signals = watchSignals ? try SignalWatcher(signals: [SIGTERM, SIGINT]) : nil
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw SystemError("pipe", errno: errno) }
        stopPipe = (fds[0], fds[1])
        context = try ZMQContext()
        // Workers' requests and peers' EC frames: an envelope or one bulk frame at most.
        router = try context.socket(.router, maxMessageBytes: SMPMessage.maxFrameBytes(bulkFrameBytes: ErasureState.frameBytes))
        try router.setLinger(milliseconds: 0)
        if config.coordinatorEndpoint != nil {
            let data = try context.socket(.router, maxMessageBytes: SMPMessage.maxFrameBytes(bulkFrameBytes: ErasureState.frameBytes))
            try data.setLinger(milliseconds: 0)
            try data.boundBulkReceives()  // peers' EC frames
            dataRouter = data
        } else {
            dataRouter = nil
        }
        try FileManager.default.createDirectory(atPath: config.runDirectory, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: config.runDirectory + "/logs", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: config.runDirectory + "/pids", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: config.runDirectory + "/stacks", withIntermediateDirectories: true)
        if config.endpoint.hasPrefix("ipc://") {
            let path = String(config.endpoint.dropFirst(6))
            let directory = URL(fileURLWithPath: path).deletingLastPathComponent().standardized.path
            let own = URL(fileURLWithPath: config.runDirectory).appendingPathComponent(SMPConfiguration.socketDirectoryName).standardized.path
            if directory == own {
                try Self.makePrivateDirectory(directory)
            } else if let open = Self.openToOthers(directory) {
                logger.warning("\("the workers' socket directory \(directory) is open to other users (mode \(open)); its socket file is 0600 and every request's peer is checked")")
            }
            // A socket file left by a crashed SMP of this node would make bind fail.
            unlink(path)
            boundEndpoint = try router.bind(config.endpoint)
            guard chmod(path, 0o600) == 0 else { throw SystemError("chmod 0600 \(path)", errno: errno) }
        } else {
            boundEndpoint = try router.bind(config.endpoint)
        }
        // Segments left by a previous SMP of this node that died: its memory is
        // lost by definition (a replacement rebuilds from parity), and the names
        // must be free for this one.
        let prefix = "ft-\(config.jobID)-\(config.nodeID)-"
        let stale = ((try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? []).filter { $0.hasPrefix(prefix) }
        for name in stale { SharedMemorySegment.unlink(name: "/" + name) }
        if !stale.isEmpty { logger.info("removed \(stale.count) shared-memory segments left by a previous SMP of \(config.nodeID)") }
        if let coordinator = config.coordinatorEndpoint {
            store = SnapshotStoreInstance(rule: CoordinatorCommitRule())
            dataEndpoint = try dataRouter!.bind("tcp://127.0.0.1:*")
            let keys = try config.keysDirectory.map { try JobKeys.load(from: $0, role: .smp) }
            channel = try ControlChannel(endpoint: coordinator, memberID: config.nodeID, keys: keys,
                                         interval: config.heartbeatInterval, timeout: config.heartbeatTimeout,
                                         hangBound: config.hangBound, logger: logger)
        } else {
            store = SnapshotStoreInstance()
        }
    }

    deinit {
        close(stopPipe.read)
        close(stopPipe.write)
    }

    /// Asks a running `run()` to shut down, from any thread.
    public func stop() {
        var b: UInt8 = 1
        _ = write(stopPipe.write, &b, 1)
    }

    // MARK: run loop

    /// Runs until SIGTERM, `stop()`, the coordinator's `stop`/`fenced`, or a
    /// clean end of all spawned workers. Returns the process exit code: 0 for a
    /// clean end or a requested stop, 1 when the coordinator stopped a failed
    /// job, 3 when fenced.
    @discardableResult
    public func run() throws -> Int32 {
        logger.info("smp up", metadata: ["job": "\(config.jobID)", "node": "\(config.nodeID)", "endpoint": "\(boundEndpoint)",
                                        "data": "\(dataEndpoint)", "pid": "\(getpid())", "memory_limit": "\(memoryLimit)"])
        writeFile(config.runDirectory + "/pids/\(config.nodeID).smp.pid", "\(getpid())\n")
        appendLine(config.runDirectory + "/pids/history", "\(config.nodeID) smp \(getpid())")
        for i in 0..<config.workerCount { try spawn(workerID: "w\(i)") }
        sendHello()
        channel?.start()
        loop: while true {
            channel?.progress()
            reportSizes()
            // Always current: the control thread says it at once to a coordinator that
            // restarts (a stale one, from before the last commit, would mislead it).
            updateHello()
            var items: [ZMQPoller.Item] = [.init(router, .readable), .init(fileDescriptor: stopPipe.read, .readable)]
            if let signals { items.append(.init(fileDescriptor: signals.fd, .readable)) }
            let childIDs = children.keys.sorted()
            for id in childIDs { items.append(.init(fileDescriptor: children[id]!.pidfd, .readable)) }
            let dumperIDs = replacing.keys.sorted().filter { replacing[$0]?.dumper != nil }
            for id in dumperIDs { items.append(.init(fileDescriptor: replacing[id]!.dumper!.pidfd, .readable)) }
            if let ec = erasure { for p in ec.peers.values { items.append(.init(p, .readable)) } }
            var dataIndex: Int?
            if let dataRouter {
                dataIndex = items.count
                items.append(.init(dataRouter, .readable))
            }
            if let channel { items.append(.init(channel.inbox, .readable)) }
            var wait = Int(config.heartbeatInterval * 1000)
            if let at = erasure?.wakeAt { wait = min(wait, max(1, Int((at - monotonicSeconds()) * 1000))) }
            let ready = try ZMQPoller.poll(items, timeoutMilliseconds: wait)
            if ready[1].isReadable {
                logger.info("smp stopping on request")
                break loop
            }
            if let signals, ready[2].isReadable, let sig = signals.next() {
                logger.info("smp stopping on signal \(sig)")
                break loop
            }
            let base = signals == nil ? 2 : 3
            for (offset, id) in childIDs.enumerated() where ready[base + offset].isReadable {
                try childExited(id)
            }
            endReplacedWorkers()
            let dataReadable = dataIndex.map { ready[$0].isReadable } ?? false
            if ready[0].isReadable || dataReadable || (!heldRequests.isEmpty && !rebuildInProgress) { try drainRequests() }
            if channel != nil, ready.last!.isReadable { try handleCoordinator() }
            drainPeerAcks()
            if stopRequested { break loop }
            if config.workerCount > 0 && finished.count == config.workerCount {
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
    private func reportSizes() {
        let now = monotonicSeconds()
        guard let channel, now - sizesReportedAt >= config.heartbeatInterval / 2 else { return }
        sizesReportedAt = now
        channel.setSizes(data: imageBytes, parity: erasure?.parityBytesHeld ?? 0)
    }
    private var sizesReportedAt = 0.0

    /// Sends a message to the coordinator (if any); remembers a `protected` for later hellos.
    func report(_ message: ControlMessage) {
        if case .protected(let step) = message { lastProtected = step }
        channel?.send(message)
    }

    private func applyLayout(_ layout: ECLayout) {
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
    private var inventory: ControlMessage.SMPInventory {
        let steps = store.workers.values.map { $0.lastCommitted }
        let committed: Int? = steps.isEmpty || steps.contains(where: { $0 == nil }) ? nil : steps.compactMap { $0 }.min()
        return .init(node: config.nodeID, pid: Int(getpid()), dataEndpoint: dataEndpoint,
                     workers: (0..<config.workerCount).map { "w\($0)" }, rankOffset: config.rankOffset,
                     committedStep: committed, stagedStep: store.stagedStep,
                     protectedStep: lastProtected.flatMap { $0 == store.stagedStep ? $0 : nil },
                     layoutChunkBytes: erasure?.chunkBytes ?? 0)
    }

    /// The hello the control thread repeats until welcomed.
    private func updateHello() { channel?.setHello(inventory) }

    private func sendHello() {
        guard let channel else { return }
        channel.setHello(inventory)
        channel.send(.smpHello(inventory))
    }

    private func handleCoordinator() throws {
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
                for r in list { try replaceWorker(r) }
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

    private func drainRequests() throws {
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
                        .envelope(sender: config.nodeID).encoded())])
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
                                .envelope(sender: config.nodeID).encoded())]
                            try? socket.send([.bytes(identity)] + reply)
                            continue
                        }
                        heldRequests.append(request)
                        continue
                    }
                    guard let r = handle(message, from: envelope.sender) else {
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

    // MARK: who may ask what

    /// Why `message` may not be served to its peer, or nil when it may.
    ///
    /// - The data endpoint (TCP, open to the host) serves peers only: EC
    ///   frames and fetches from other SMPs, and slices to other nodes' workers.
    ///   A worker's own requests (register, begin, staged, restore, status, …)
    ///   are refused there, so that no one can void a round or register in a
    ///   worker's name over TCP.
    /// - The workers' ipc socket serves workers only, and each request's peer
    ///   (SO_PEERCRED on the connection it came on) must be of the job's uid
    ///   (or root); when this SMP spawned its workers, it must also be the
    ///   process of the worker the request names, or a descendant of it.
    func refusal(_ message: SMPMessage, sender: String, frame: ZMQMessage, fromPeers: Bool) -> StoreError? {
        switch (message, fromPeers) {
        case (.ecChunk, true), (.ecFetch, true), (.fetchSlice, true):
            return nil
        case (_, true):
            return StoreError(.unauthorized, "\(message.type) from '\(sender)' is not served on the data endpoint (a worker asks its own SMP)")
        case (.ecChunk, false), (.ecFetch, false):
            return StoreError(.unauthorized, "\(message.type) from '\(sender)' is not served on the workers' socket (peers use the data endpoint)")
        case (_, false):
            guard config.endpoint.hasPrefix("ipc://") else { return nil }  // TCP (tests): no credentials to check
            // Taken when the connection was accepted (libzmq's Peer-Address), else asked of its descriptor now.
            guard let peer = frame.property("Peer-Address").flatMap(PeerCredentials.init(peerAddress:))
                    ?? frame.sourceDescriptor.flatMap(PeerCredentials.init(socket:)) else {
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
    private func worker(owning pid: Int32) -> String? {
        if let known = requestOwners[pid], children[known.worker]?.pid == known.childPID { return known.worker }
        requestOwners[pid] = nil
        var p = pid
        for _ in 0..<16 {
            if let (id, child) = children.first(where: { $0.value.pid == p }) {
                requestOwners[pid] = (id, child.pid)
                return id
            }
            guard let parent = parentProcess(of: p), parent > 1 else { return nil }
            p = parent
        }
        return nil
    }

    /// Makes `path` a directory of mode 0700 owned by this user (created if
    /// missing); throws when it belongs to someone else.
    static func makePrivateDirectory(_ path: String) throws {
        if mkdir(path, 0o700) != 0 && errno != EEXIST { throw SystemError("mkdir \(path)", errno: errno) }
        var st = stat()
        guard lstat(path, &st) == 0 else { throw SystemError("stat \(path)", errno: errno) }
        guard (st.st_mode & S_IFMT) == S_IFDIR, st.st_uid == geteuid() else {
            throw SMPError("\(path) must be a directory owned by uid \(geteuid()) (it is mode \(String(st.st_mode, radix: 8)), uid \(st.st_uid))")
        }
        if st.st_mode & 0o077 != 0, chmod(path, 0o700) != 0 { throw SystemError("chmod 0700 \(path)", errno: errno) }
    }

    /// The mode of `path` in octal when group or others may enter it, nil otherwise.
    static func openToOthers(_ path: String) -> String? {
        var st = stat()
        guard stat(path, &st) == 0, st.st_mode & 0o011 != 0 else { return nil }
        return String(st.st_mode & 0o777, radix: 8)
    }

    // MARK: requests

    /// The reply to a worker's request, or nil when it waits for a repair.
    func handle(_ message: SMPMessage, from sender: String) -> [ZMQFrame]? {
        func reply(_ m: SMPMessage) -> [ZMQFrame] { [.bytes(m.envelope(sender: config.nodeID).encoded())] }
        func refuse(_ e: StoreError) -> [ZMQFrame] {
            switch e.code {
            case .memoryLimit:
                refusedRequests += 1
                logger.error("refused a request from \(sender): \(e)")
                // Starting the worker again needs the same memory: a job still
                // starting stops now, saying why, rather than at its start timeout.
                if case .register = message { channel?.send(.startRefused(worker: sender, reason: e.message)) }
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
                let outcome = try store.register(registration)
                let names = (0..<2).map { segmentName(worker: registration.workerID, slot: $0) }
                let slotBytes = store.workers[registration.workerID]!.layout.slotBytes
                switch outcome {
                case .new(let bytes):
                    do throws(StoreError) {
                        try checkMemory(worker: registration.workerID, slotBytes: bytes)
                    } catch {
                        store.remove(worker: registration.workerID)
                        throw error
                    }
                    do {
                        segments[registration.workerID] = try names.map { try createSlot(name: $0, count: bytes) }
                    } catch {
                        store.remove(worker: registration.workerID)
                        for name in names { SharedMemorySegment.unlink(name: name) }
                        let free = (try? SharedMemorySegment.space().free).map(String.init) ?? "unknown"
                        throw StoreError(.memoryLimit, "could not allocate 2 × \(bytes) bytes of shared memory for worker \(registration.workerID) "
                            + "(/dev/shm has \(free) bytes free): \(error)")
                    }
                    logger.info("worker registered", metadata: ["worker": "\(sender)", "slot.bytes": "\(bytes)",
                                                               "tensors": "\(registration.specs.count)"])
                    return reply(.registered(slotNames: names, slotBytes: slotBytes, committedStep: nil))
                case .rejoined(let committed):
                    logger.info("worker rejoined", metadata: ["worker": "\(sender)", "committed": "\(committed.map(String.init) ?? "none")"])
                    return reply(.registered(slotNames: names, slotBytes: slotBytes, committedStep: committed))
                }
            case .begin(let step):
                switch try store.begin(worker: sender, step: step) {
                case .write(let slot): return reply(.beginReply(slot: slot, reason: ""))
                case .skip(let reason): return reply(.beginReply(slot: nil, reason: reason))
                }
            case .staged(let step, let slot, let crcs):
                if case .allStaged(let s) = try store.staged(worker: sender, step: step, slot: slot, crcs: crcs) {
                    startProtecting(step: s)
                }
                return reply(.stagedReply(committedStep: store.workers[sender]?.lastCommitted))
            case .restoreQuery(let expected):
                if let expected, store.committedStep != expected, store.allHaveStaged(expected) {
                    // Its commit is decided and on its way: the worker carries the decision.
                    store.commit(step: expected)
                }
                store.discardUncommitted(worker: sender)  // any round of its in flight is void
                guard try verifyAndRepair(worker: sender) else { return nil }
                let point = try store.restorePoint(worker: sender)
                if let expected, point?.step != expected {
                    throw StoreError(.nothingCommitted, "node \(config.nodeID) holds step \(point.map { String($0.step) } ?? "none") "
                        + "committed for \(sender), not step \(expected)")
                }
                return reply(.restoreReply(point))
            case .roundQuery:
                let pending = store.workers.values.contains { $0.slots.contains { if case .staged = $0 { true } else { false } } }
                return reply(.roundReply(committedStep: store.committedStep, pending: pending))
            case .fetchSlice(let rank, let size, let tensor, let chunks):
                return try slice(rank: rank, size: size, tensor: tensor, chunks: chunks)
            case .status:
                return reply(.statusReply(statusJSON()))
            default:
                throw StoreError(.malformed, "\(message.type) is not a request")
            }
        } catch {
            return refuse(error)
        }
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
                + "node \(config.nodeID) has \(max(0, memoryLimit - used)) of its budget of \(memoryLimit) bytes left "
                + "(\(used) in use; ft-smp --memory-limit)")
        }
        if let free = try? SharedMemorySegment.space().free, needed > free {
            throw StoreError(.memoryLimit, "worker \(worker) needs \(needed) bytes of shared memory (2 slots of \(slotBytes)); "
                + "/dev/shm has \(free) bytes available")
        }
    }

    /// The committed bytes of chunks `chunks` of one rank's slice of a
    /// replicated tensor, from a slot checked against its CRCs (a corrupt
    /// chunk is repaired from parity, or named, never served).
    private func slice(rank: Int, size: Int, tensor: String, chunks: Range<Int>) throws(StoreError) -> [ZMQFrame]? {
        guard let owner = store.worker(dpRank: rank, dpSize: size) else {
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
        guard try verifyAndRepair(worker: id, unlessVerified: true) else { return nil }
        guard let point = try store.restorePoint(worker: id) else {
            throw StoreError(.nothingCommitted, "worker \(id) has no committed snapshot")
        }
        let bytes = chunks.isEmpty ? 0..<0
            : owner.layout.chunkRange(entry, chunk: chunks.lowerBound).lowerBound
                ..< owner.layout.chunkRange(entry, chunk: chunks.upperBound - 1).upperBound
        let segment = segments[id]![point.slot]
        let data = UnsafeRawBufferPointer(start: segment.base + entry.slotOffset + bytes.lowerBound, count: bytes.count)
        let crcs = chunks.map { point.crcs[entry.firstChunk + $0] }
        let range = (entry.storedRange.lowerBound + bytes.lowerBound) ..< (entry.storedRange.lowerBound + bytes.upperBound)
        let header = SMPMessage.sliceReply(step: point.step, range: range, crcs: crcs).envelope(sender: config.nodeID).encoded()
        // Zero-copy from the committed slot (verified above; the receiver checks every chunk's CRC again).
        return [.bytes(header), ZeroCopyFrames.frame(data)]
    }

    // MARK: children

    private func spawn(workerID: String) throws {
        let dpRank = config.rankOffset + (Int(workerID.dropFirst()) ?? 0)
        var env = ProcessInfo.processInfo.environment.merging(config.extraEnvironment) { $1 }
        env["FT_JOB_ID"] = config.jobID
        env["FT_NODE_ID"] = config.nodeID
        env["FT_WORKER_ID"] = workerID
        env["FT_DP_RANK"] = "\(dpRank)"
        env["FT_DP_SIZE"] = "\(config.worldSize ?? config.workerCount)"
        if let c = config.coordinatorEndpoint { env["FT_COORDINATOR_ENDPOINT"] = c }
        if let k = config.keysDirectory { env["FT_KEYS_DIR"] = k }
        env["FT_SMP_ENDPOINT"] = boundEndpoint
        env["FT_RESTART_COUNT"] = "\(restarts[workerID, default: 0])"
        env["FT_RUN_DIR"] = config.runDirectory
        env["FT_HEARTBEAT_MS"] = "\(Int(config.heartbeatInterval * 1000))"
        // A Swift worker that crashes (or gets SIGQUIT) writes every thread's backtrace here.
        env["SWIFT_BACKTRACE"] = env["SWIFT_BACKTRACE"]
            ?? "enable=yes,interactive=no,threads=all,output-to=\(config.runDirectory)/stacks"
        env.merge(Self.torchrunEnvironment(env, rank: dpRank, localRank: dpRank - config.rankOffset, localWorldSize: config.workerCount,
                                           epoch: channel?.epoch ?? 0)) { $1 }
        let child = try ChildProcess(arguments: config.workerCommand, environment: env,
                                     outputPath: config.runDirectory + "/logs/\(config.nodeID)-\(workerID).log")
        children[workerID] = child
        writeFile(config.runDirectory + "/pids/\(config.nodeID)-\(workerID).pid", "\(child.pid)\n")
        // Every worker ever started, for a stop that also ends workers of a
        // replaced (stopped, later continued) SMP of this node.
        appendLine(config.runDirectory + "/pids/history", "\(config.nodeID) \(workerID) \(child.pid)")
        logger.info("worker started", metadata: ["worker": "\(workerID)", "pid": "\(child.pid)",
                                                 "restarts": "\(restarts[workerID, default: 0])"])
    }

    /// torchrun's variables, so that a torch.distributed script runs under
    /// ft-smp as under torchrun: RANK, WORLD_SIZE, LOCAL_RANK,
    /// LOCAL_WORLD_SIZE, and MASTER_ADDR / MASTER_PORT when the launcher gave
    /// FT_MASTER_ADDR / FT_MASTER_PORT_BASE: the port is FT_MASTER_PORT_BASE
    /// + epoch mod FT_MASTER_PORT_SPAN (default 64), fresh in every epoch
    /// (ft_torch sets it again for the epoch it restores in).
    static func torchrunEnvironment(_ env: [String: String], rank: Int, localRank: Int, localWorldSize: Int,
                                    epoch: UInt64) -> [String: String] {
        var out = ["RANK": "\(rank)", "WORLD_SIZE": env["FT_DP_SIZE"] ?? "1", "LOCAL_RANK": "\(localRank)",
                   "LOCAL_WORLD_SIZE": "\(localWorldSize)"]
        if let address = env["FT_MASTER_ADDR"] { out["MASTER_ADDR"] = address }
        if let base = env["FT_MASTER_PORT_BASE"].flatMap(Int.init) {
            let span = max(1, env["FT_MASTER_PORT_SPAN"].flatMap(Int.init) ?? 64)
            out["MASTER_PORT"] = "\(base + Int(epoch % UInt64(span)))"
        }
        return out
    }

    private func childExited(_ id: String) throws {
        guard let child = children[id], let status = child.poll() else { return }
        children[id] = nil
        requestOwners = requestOwners.filter { $0.value.worker != id }  // its processes are gone
        store.workerExited(id)
        let committed = store.workers[id]?.lastCommitted
        logger.info("worker exited", metadata: ["worker": "\(id)", "pid": "\(child.pid)", "status": "\(status)",
                                                "committed": "\(committed.map(String.init) ?? "none")"])
        if let order = replacing.removeValue(forKey: id) {
            // Ended on the coordinator's order: its replacement starts now.
            order.dumper?.kill(SIGKILL)
            restarts[id, default: 0] += 1
            try spawn(workerID: id)
            return
        }
        if status.isSuccess {
            finished.insert(id)
            return
        }
        if let channel {
            // The coordinator decides what happens next (and restarts it through us).
            channel.send(.childExited(worker: id, pid: Int(child.pid), status: "\(status)"))
            return
        }
        guard totalRestarts < config.maxRestarts else {
            logger.error("worker \(id) failed and the restart budget (\(config.maxRestarts)) is spent; not restarting")
            finished.insert(id)
            return
        }
        totalRestarts += 1
        restarts[id, default: 0] += 1
        try spawn(workerID: id)
    }

    /// The coordinator declared `r.worker` dead: if that incarnation still
    /// runs, end it (saving its stack first when asked) and respawn it once
    /// its exit is seen; if none runs, start one now. An order about an
    /// incarnation that is gone (a newer one runs) changes nothing.
    private func replaceWorker(_ r: ControlMessage.WorkerRestart) throws {
        guard let child = children[r.worker] else {
            guard replacing[r.worker] == nil else { return }
            restarts[r.worker, default: 0] += 1
            try spawn(workerID: r.worker)
            return
        }
        guard r.pid != 0, Int(child.pid) == r.pid, replacing[r.worker] == nil else { return }
        if r.saveStack, let dumper = startStackDump(worker: r.worker, pid: child.pid) {
            logger.warning("worker \(r.worker) (pid \(child.pid)) is hung: saving its stack, then killing it")
            replacing[r.worker] = (child.pid, monotonicSeconds() + 15, dumper)
        } else {
            logger.warning("worker \(r.worker) (pid \(child.pid)) was declared dead: killing it")
            child.kill(SIGKILL)
            replacing[r.worker] = (child.pid, nil, nil)
        }
    }

    /// Thread backtraces of a hung worker, to `RUN_DIR/stacks/NODE-WORKER-pPID.txt`:
    /// `gdb` attached to it (every thread, native frames, demangled when
    /// swift-demangle is at hand). Without gdb, SIGQUIT: a Swift worker's
    /// runtime writes its own backtraces there (SWIFT_BACKTRACE, set at spawn).
    private func startStackDump(worker: String, pid: Int32) -> ChildProcess? {
        let dir = config.runDirectory + "/stacks"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let file = "\(dir)/\(config.nodeID)-\(worker)-p\(pid).txt"
        guard ChildProcess.resolve("gdb") != nil else {
            logger.info("gdb is not installed: asking worker \(worker) to write its own backtraces (SIGQUIT)")
            kill(pid, SIGQUIT)
            return nil
        }
        let script = "echo \"# \(config.nodeID)/\(worker) pid \(pid), declared hung by the coordinator's step-progress watchdog\"; "
            + "timeout 10 gdb -batch -nx -p \(pid) -ex 'thread apply all bt' </dev/null 2>&1 | "
            + "if command -v swift-demangle >/dev/null; then swift-demangle --simplified; else cat; fi"
        do {
            return try ChildProcess(arguments: ["/bin/sh", "-c", script], environment: ProcessInfo.processInfo.environment, outputPath: file)
        } catch {
            logger.warning("could not start gdb for worker \(worker): \(error)")
            return nil
        }
    }

    /// Workers whose stack dump is over (or took too long) are killed now.
    private func endReplacedWorkers() {
        let now = monotonicSeconds()
        for (id, order) in replacing {
            guard let dumper = order.dumper else {
                if order.killAt == nil, let child = children[id], child.pid == order.pid { child.kill(SIGKILL) }
                continue
            }
            guard dumper.poll() != nil || (order.killAt.map { now > $0 } ?? false) else { continue }
            if dumper.poll() == nil { dumper.kill(SIGKILL) } else { logger.info("stack of worker \(id) (pid \(order.pid)) saved to \(config.runDirectory)/stacks") }
            replacing[id] = (order.pid, nil, nil)
            if let child = children[id], child.pid == order.pid { child.kill(SIGKILL) }
        }
    }

    private func shutdown() {
        for (_, order) in replacing { order.dumper?.kill(SIGKILL) }
        for (id, child) in children {
            child.kill(SIGTERM)
            if child.wait(timeoutSeconds: 5) == nil {
                logger.warning("worker \(id) ignored SIGTERM for 5 s; SIGKILL")
                child.kill(SIGKILL)
                child.wait(timeoutSeconds: 5)
            }
        }
        children.removeAll()
        router.close()
        dataRouter?.close()
        quiesceZeroCopy()  // libzmq may still be reading slot memory: wait before unmapping it
        for (_, segs) in segments { for s in segs { SharedMemorySegment.unlink(name: s.name) } }
        segments.removeAll()
        channel?.shutdown()
        if config.endpoint.hasPrefix("ipc://") { unlink(String(config.endpoint.dropFirst(6))) }
        // Only our own record: a replacement of this node may have written its pid there.
        let pidFile = config.runDirectory + "/pids/\(config.nodeID).smp.pid"
        if (try? String(contentsOfFile: pidFile, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) == "\(getpid())" {
            unlink(pidFile)
        }
        logger.info("smp down; shared memory freed")
    }

    /// `/ft-JOB-NODE-pPID-WORKER-sSLOT`: the SMP's pid is in the name so that
    /// an SMP that was stopped, replaced and then continued (and fenced) frees
    /// only its own segments, never its replacement's.
    func segmentName(worker: String, slot: Int) -> String {
        "/ft-\(config.jobID)-\(config.nodeID)-p\(getpid())-\(worker)-s\(slot)"
    }

    // MARK: status

    /// The SMP's state as JSON (one object; keys documented in the README).
    func statusJSON() -> String {
        var workers: [[String: Any]] = []
        for (id, w) in store.workers.sorted(by: { $0.key < $1.key }) {
            let slots = w.slots.map { s -> String in
                switch s {
                case .empty: "empty"
                case .writing(let step): "writing(\(step))"
                case .staged(let step, _): "staged(\(step))"
                case .committed(let step, _): "committed(\(step))"
                }
            }
            var entry: [String: Any] = ["id": id, "dp_rank": w.registration.dpRank, "slots": slots,
                                        "slot_bytes": w.layout.slotBytes, "bytes_held": 2 * w.layout.slotBytes,
                                        "skipped": w.skipped, "aborted": w.aborted, "restarts": restarts[id, default: 0]]
            entry["last_staged"] = w.lastStaged ?? -1
            entry["last_committed"] = w.lastCommitted ?? -1
            entry["pid"] = children[id].map { Int($0.pid) } ?? -1
            workers.append(entry)
        }
        let object: [String: Any] = ["job": config.jobID, "node": config.nodeID, "committed_step": store.committedStep ?? -1,
                                     "malformed_frames": malformedFrames, "refused_requests": refusedRequests + refusedChunks + (erasure?.round.refusedFrames ?? 0),
                                     "unauthorized_requests": unauthorizedRequests,
                                     "memory_limit": memoryLimit, "shared_memory_bytes": sharedMemoryBytes, "workers": workers]
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self)
    }

    private func appendLine(_ path: String, _ line: String) {
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        guard fd >= 0 else { return }
        defer { close(fd) }
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }  // one write: lines never interleave
    }

    private func writeFile(_ path: String, _ text: String) {
        _ = FileManager.default.createFile(atPath: path, contents: Data(text.utf8))
    }
}
