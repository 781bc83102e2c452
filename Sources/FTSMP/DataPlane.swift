import FTControl
import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation
import Logging

/// The SMP's data plane (ARCHITECTURE.md, "Erasure coding across nodes"): what
/// travels between SMPs of a job with a coordinator.
///
/// Owns the data endpoint (a ROUTER: peers' EC frames and fetches, and other
/// nodes' workers' slice requests, and nothing else; on `ipc://` each peer of
/// the job's uid, on `tcp://` in a job with keys a CURVE server whose ZAP
/// handler admits only the SMPs' node keys and the worker key,
/// `DataPlaneKeys`), the erasure-coding state once the coordinator sent the
/// layout (`ErasureState`: the round core, the parity buffers, the peer
/// sockets, a rebuild or a repair in progress), and a rebuild ordered before
/// the layout arrived. The decisions are the cores' (`ECRoundInstance`,
/// `RebuildInstance`); this component carries out their directives.
///
/// It reads and writes the workers' slots only through `NodeMemory`, speaks
/// to the coordinator only through `report`, and learns the coordinator's
/// epoch only through `epoch`; it never touches a worker's request or process.
/// Files: this one the endpoint, who may send what on it, the layout and the
/// peers; `DataPlane+Round.swift` protecting a round (sending, folding, acks)
/// and serving codeword bytes; `DataPlane+Rebuild.swift` fetching and decoding:
/// a replacement's rebuild and the repair of a corrupt chunk.
final class DataPlane {
    let config: SMPConfiguration
    let logger: Logger
    let memory: NodeMemory
    let context: ZMQContext
    /// Peers: EC frames from other SMPs, slice requests from other nodes' workers (`SMPConfiguration.dataEndpoint`).
    let router: ZMQSocket
    /// The endpoint bound (as peers reach it).
    private(set) var endpoint: String = ""
    /// CURVE on a `tcp://` data endpoint of a job with keys: the pair this SMP
    /// serves with and presents to its peers (`DataPlaneKeys`); nil on ipc.
    let keys: DataPlaneKeys?
    /// Admits only the SMP and worker keys to the data endpoint (with `keys`).
    private let zap: ZAPAuthenticator?
    /// Erasure coding across nodes, once the coordinator sent the layout.
    private(set) var erasure: ErasureState?
    /// A rebuild ordered before the layout arrived.
    private var pendingRebuild: (step: Int?, lost: [String])?
    /// The round the workers staged last and the epoch they staged it in.
    var stagedRound: (step: Int, epoch: UInt64)?
    /// EC fetches from peers refused (outside the layout); refused chunk frames
    /// are counted by the round core (`ECRoundInstance.refusedFrames`).
    var refusedChunks = 0
    /// Test-only fault injection (FT_FAULT_KILL_DURING_EC_STEP=S): SIGKILL this
    /// SMP halfway through sending its chunks of the first round at or after step S.
    let faultKillDuringECStep = ProcessInfo.processInfo.environment["FT_FAULT_KILL_DURING_EC_STEP"].flatMap(Int.init)

    /// Sends a message to the coordinator.
    var report: (ControlMessage) -> Void = { _ in }
    /// The coordinator's epoch as this node knows it (stamped on EC frames).
    var epoch: () -> UInt64 = { 0 }
    /// Between pieces of long work: the event loop says it is alive.
    var keepAlive: () -> Void = {}

    init(config: SMPConfiguration, context: ZMQContext, memory: NodeMemory, logger: Logger) throws {
        self.config = config
        self.context = context
        self.memory = memory
        self.logger = logger
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
            zap = try ZAPAuthenticator(context: context, clients: clients) { [logger] line in
                logger.warning("data endpoint: \(line)")
            }
            try data.makeCurveServer(keys.server!)
            self.keys = keys
        } else {
            keys = nil
            zap = nil
        }
        router = data
        endpoint = try SocketFiles.bindPrivately(router, config.dataEndpoint, runDirectory: config.runDirectory, what: "data", logger: logger)
    }

    /// Workers' requests wait while this node's memory is rebuilt or repaired.
    var busy: Bool { pendingRebuild != nil || erasure?.rebuilding != nil || erasure?.repairing != nil }

    /// Bytes of parity this node holds now (heartbeats carry it).
    var parityBytesHeld: Int { erasure?.parityBytesHeld ?? 0 }

    /// The layout's chunk size (0 before the layout), as the hello says it.
    var chunkBytes: Int { erasure?.chunkBytes ?? 0 }

    /// Refused frames, for the status.
    var refusedFrames: Int { refusedChunks + (erasure?.round.refusedFrames ?? 0) }

    /// The earliest time a core wants to be woken (a resend, a fetch deadline).
    var wakeAt: Double? { erasure?.wakeAt }

    /// The sockets the event loop polls: the peers' (acks, fetched frames).
    var peerSockets: [ZMQSocket] { erasure.map { ec in ec.peers.keys.sorted().map { ec.peers[$0]! } } ?? [] }

    // MARK: who may send what

    /// Why `message`, which came on the data endpoint, may not be served to
    /// its peer, or nil when it may. The data endpoint serves peers only: EC
    /// frames and fetches from other SMPs, and slices to other nodes'
    /// workers; on ipc (the default) each request's peer must be of the job's
    /// uid (or root); on TCP in a job with keys (CURVE, `DataPlaneKeys`) EC
    /// frames and fetches must come under an SMP's key, and under its own
    /// node's name where it has a node key, and slice requests under an
    /// SMP's or the worker key, as the handshake proved it. A worker's own
    /// requests (register, begin, staged, restore, status, …) are refused
    /// here, so that no peer can void a round or register in a worker's name.
    func refusal(_ message: SMPMessage, sender: String, frame: ZMQMessage) -> StoreError? {
        switch message {
        case .ecChunk, .ecFetch, .fetchSlice:
            if keys != nil {
                // CURVE: the role (and node) are the ones the sender's key proved in its handshake.
                let user = DataPlaneKeys.parseUser(frame.property("User-Id") ?? "none")
                var allowed = [DataPlaneKeys.smpUser]
                if case .fetchSlice = message { allowed.append(DataPlaneKeys.workerUser) }
                guard allowed.contains(user.role) else {
                    return StoreError(.unauthorized, "\(message.name) from '\(sender)' came under the key of role '\(user.role)', not \(allowed.joined(separator: " or "))")
                }
                if let node = user.node, node != sender {
                    return StoreError(.unauthorized, "\(message.name) from '\(sender)' came under node \(node)'s key")
                }
                return nil
            }
            guard endpoint.hasPrefix("ipc://") else { return nil }  // TCP without keys (tests, --insecure): no credentials to check
            guard let peer = SocketFiles.peer(of: frame) else {
                return StoreError(.unauthorized, "\(message.name) from '\(sender)' came with no peer credentials")
            }
            guard peer.uid == getuid() || peer.uid == 0 else {
                return StoreError(.unauthorized, "\(message.name) from '\(sender)' came from uid \(peer.uid), not the job's uid \(getuid())")
            }
            return nil
        default:
            return StoreError(.unauthorized, "\(message.name) from '\(sender)' is not served on the data endpoint (a worker asks its own SMP)")
        }
    }

    // MARK: the layout

    /// The coordinator's layout: the first one creates the erasure-coding
    /// state (and protects a staged round, and starts a rebuild ordered
    /// before it); a later one with other endpoints only reconnects.
    func applyLayout(_ layout: ECLayout) {
        if let ec = erasure, ec.layout.k == layout.k, ec.layout.m == layout.m, ec.layout.chunkBytes == layout.chunkBytes,
           ec.layout.groups == layout.groups {
            if ec.layout.endpoints != layout.endpoints { updateEndpoints(ec, layout) }
            return
        }
        do {
            erasure = try ErasureState(layout: layout, node: config.nodeID)
            logger.info("EC layout: RS(\(layout.k)+\(layout.m)), chunk \(layout.chunkBytes) bytes, group \(erasure!.group) position \(erasure!.position)")
            protectStagedRound()
            if let (step, lost) = pendingRebuild {
                pendingRebuild = nil
                startRebuild(step: step, lost: lost)
            }
        } catch {
            logger.error("EC layout refused: \(error)")
        }
    }

    /// The coordinator orders this (replacement) node rebuilt for `step`;
    /// `rebuilt` goes back when it is done or has failed.
    func rebuild(step: Int?, lost: [String]) {
        guard erasure != nil else {
            pendingRebuild = (step, lost)  // the layout is on its way
            return
        }
        startRebuild(step: step, lost: lost)  // the loop goes on meanwhile
    }

    /// The coordinator committed `step`: logs the round's times, and the round core drops what it no longer needs.
    func commit(step: Int) {
        guard let ec = erasure else { return }
        if let t0 = ec.stagedAt.removeValue(forKey: step) {
            let fold = ec.foldStats.removeValue(forKey: step) ?? (0, 0)
            logger.info("round \(step) committed", metadata: [
                "staged_to_committed_ms": "\(String(format: "%.1f", (monotonicSeconds() - t0) * 1000))",
                "image_bytes": "\(memory.imageBytes)", "folded_bytes": "\(fold.bytes)",
                "fold_ms": "\(String(format: "%.1f", fold.seconds * 1000))"])
            ec.stagedAt = ec.stagedAt.filter { $0.key > step }
            ec.foldStats = ec.foldStats.filter { $0.key > step }
        }
        runRound(ec, ec.round.commit(step: step))
    }

    func abort(step: Int) {
        if let ec = erasure { runRound(ec, ec.round.abort(step: step)) }
    }

    func restore(step: Int?) {
        if let ec = erasure { runRound(ec, ec.round.restore(step: step)) }
    }

    // MARK: peers

    func peer(_ node: String, _ ec: ErasureState) throws -> ZMQSocket {
        if let s = ec.peers[node] { return s }
        guard let endpoint = ec.layout.endpoints[node] else { throw SMPError(.notInLayout, "no data endpoint for \(node)") }
        // Acks, and fetched frames of at most `frameBytes` (this node asks for no more).
        let s = try context.socket(.dealer, maxMessageBytes: SMPMessage.maxFrameBytes(bulkFrameBytes: ErasureState.frameBytes))
        try s.setLinger(milliseconds: 0)
        try s.setSendHighWaterMark(0)
        try s.boundBulkReceives()
        try keys?.secureClient(s, for: endpoint)
        try s.connect(endpoint)
        ec.peers[node] = s
        return s
    }

    /// A layout with other data endpoints: only the peers whose endpoint changed
    /// get a new socket, and a rebuild or repair asks again what it had asked of them
    /// (their answers would go to the closed socket).
    func updateEndpoints(_ ec: ErasureState, _ new: ECLayout) {
        let changed = ec.peers.keys.sorted().filter { new.endpoints[$0] != ec.layout.endpoints[$0] }
        ec.layout = new
        for node in changed {
            ec.peers.removeValue(forKey: node)?.close()
            for job in [ec.rebuilding, ec.repairing].compactMap({ $0 }) { runFetch(job, ec, job.core.endpointChanged(node, now: monotonicSeconds())) }
        }
    }

    /// Acks and fetched frames from peers, a due resend, and the fetch jobs'
    /// deadlines. Called on every turn of the event loop.
    func drainPeers() {
        guard let ec = erasure else { return }
        let now = monotonicSeconds()
        runRound(ec, ec.round.tick(now: now))
        for node in ec.peers.keys.sorted() {
            guard let socket = ec.peers[node] else { continue }
            while let frames = try? socket.receiveMessages(timeoutMilliseconds: 0) {
                guard let first = frames.first, let (message, _) = try? SMPMessage.decode(first.bytes) else { continue }
                switch message {
                case .ecAck(let step, let row, let index, let error):
                    runRound(ec, ec.round.onAck(from: node, step: step, row: row, dataIndex: index, error: error, now: monotonicSeconds()))
                case .ecChunkData(let step, let row, let index, let offset, let crc, let error):
                    receiveFetched(ec, from: node, step: step, row: row, index: index, offset: offset, crc: crc, error: error,
                                   frames: Array(frames.dropFirst()))
                default:
                    continue
                }
            }
        }
        for job in [ec.rebuilding, ec.repairing].compactMap({ $0 }) { runFetch(job, ec, job.core.tick(now: monotonicSeconds())) }
    }

    // MARK: the end

    /// At shutdown: closes the endpoint and the peer sockets, and waits, at
    /// most 2 s, until libzmq has released every zero-copy frame (slot memory
    /// is unmapped next).
    func close() {
        router.close()
        if let ec = erasure {
            for s in ec.peers.values { s.close() }
            ec.peers.removeAll()
        }
        ZeroCopyFrames.quiesce(logger: logger)
        erasure = nil  // frees the parity buffers
        zap?.stop()
    }
}
