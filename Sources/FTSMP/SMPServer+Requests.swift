import FTControl
import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation
import Logging

/// Requests: who may ask what on which socket, and the answers.
extension SMPServer {
    // MARK: who may ask what

    /// Why `message` may not be served to its peer, or nil when it may.
    ///
    /// - The data endpoint serves peers only: EC frames and fetches from other
    ///   SMPs, and slices to other nodes' workers; on ipc (the default) each
    ///   request's peer must be of the job's uid (or root); on TCP in a job
    ///   with keys (CURVE, `DataPlaneKeys`) EC frames and fetches must come
    ///   under an SMP's key, and under its own node's name where it has a
    ///   node key, and slice requests under an SMP's or the worker key, as
    ///   the handshake proved it. A worker's own
    ///   requests (register, begin, staged, restore, status, …) are refused
    ///   there, so that no peer can void a round or register in a worker's name.
    /// - The workers' ipc socket serves workers only, and each request's peer
    ///   (SO_PEERCRED on the connection it came on) must be of the job's uid
    ///   (or root); when this SMP spawned its workers, it must also be the
    ///   process of the worker the request names, or a descendant of it.
    func refusal(_ message: SMPMessage, sender: String, frame: ZMQMessage, fromPeers: Bool) -> StoreError? {
        switch (message, fromPeers) {
        case (.ecChunk, true), (.ecFetch, true), (.fetchSlice, true):
            if dataKeys != nil {
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
            guard dataEndpoint.hasPrefix("ipc://") else { return nil }  // TCP without keys (tests, --insecure): no credentials to check
            guard let peer = Self.peer(of: frame) else {
                return StoreError(.unauthorized, "\(message.name) from '\(sender)' came with no peer credentials")
            }
            guard peer.uid == getuid() || peer.uid == 0 else {
                return StoreError(.unauthorized, "\(message.name) from '\(sender)' came from uid \(peer.uid), not the job's uid \(getuid())")
            }
            return nil
        case (_, true):
            return StoreError(.unauthorized, "\(message.name) from '\(sender)' is not served on the data endpoint (a worker asks its own SMP)")
        case (.ecChunk, false), (.ecFetch, false):
            return StoreError(.unauthorized, "\(message.name) from '\(sender)' is not served on the workers' socket (peers use the data endpoint)")
        case (_, false):
            guard config.endpoint.hasPrefix("ipc://") else { return nil }  // TCP (tests): no credentials to check
            guard let peer = Self.peer(of: frame) else {
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
        if let known = requestOwners[pid], supervisor.children[known.worker]?.pid == known.childPID { return known.worker }
        requestOwners[pid] = nil
        var p = pid
        for _ in 0..<16 {
            if let (id, child) = supervisor.children.first(where: { $0.value.pid == p }) {
                requestOwners[pid] = (id, child.pid)
                return id
            }
            guard let parent = parentProcess(of: p), parent > 1 else { return nil }
            p = parent
        }
        return nil
    }

    /// Binds `socket` to `endpoint`; an `ipc://` socket file is made 0600, in a
    /// directory that is made 0700 when it is the run directory's sockets
    /// directory (a warning when another one is open to others).
    static func bindPrivately(_ socket: ZMQSocket, _ endpoint: String, runDirectory: String, what: String, logger: Logger) throws -> String {
        guard endpoint.hasPrefix("ipc://") else { return try socket.bind(endpoint) }
        let path = String(endpoint.dropFirst(6))
        let directory = URL(fileURLWithPath: path).deletingLastPathComponent().standardized.path
        let own = URL(fileURLWithPath: runDirectory).appendingPathComponent(SMPConfiguration.socketDirectoryName).standardized.path
        if directory == own {
            try makePrivateDirectory(directory)
        } else if let open = openToOthers(directory) {
            logger.warning("\("the \(what) socket directory \(directory) is open to other users (mode \(open)); its socket file is 0600 and every request's peer is checked")")
        }
        // A socket file left by a crashed SMP of this node would make bind fail.
        unlink(path)
        let bound = try socket.bind(endpoint)
        guard chmod(path, 0o600) == 0 else { throw SystemError("chmod 0600 \(path)", errno: errno) }
        return bound
    }

    /// The credentials of the process that sent `frame` over an ipc socket:
    /// taken when the connection was accepted (libzmq's Peer-Address), else
    /// asked of its descriptor now.
    static func peer(of frame: ZMQMessage) -> PeerCredentials? {
        frame.property("Peer-Address").flatMap(PeerCredentials.init(peerAddress:)) ?? frame.sourceDescriptor.flatMap(PeerCredentials.init(socket:))
    }

    /// Makes `path` a directory of mode 0700 owned by this user (created if
    /// missing); throws when it belongs to someone else.
    static func makePrivateDirectory(_ path: String) throws {
        if mkdir(path, 0o700) != 0 && errno != EEXIST { throw SystemError("mkdir \(path)", errno: errno) }
        var st = stat()
        guard lstat(path, &st) == 0 else { throw SystemError("stat \(path)", errno: errno) }
        guard (st.st_mode & S_IFMT) == S_IFDIR, st.st_uid == geteuid() else {
            throw SMPError(.unsafeDirectory, "\(path) must be a directory owned by uid \(geteuid()) (it is mode \(String(st.st_mode, radix: 8)), uid \(st.st_uid))")
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
                return try slice(rank: rank, size: size, tensor: tensor, chunks: chunks, requestID: requestID)
            case .status:
                return reply(.statusReply(statusJSON()))
            default:
                throw StoreError(.malformed, "\(message.name) is not a request")
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
    func slice(rank: Int, size: Int, tensor: String, chunks: Range<Int>, requestID: UInt64) throws(StoreError) -> [ZMQFrame]? {
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
        let header = SMPMessage.sliceReply(step: point.step, range: range, crcs: crcs).envelope(sender: config.nodeID, epoch: requestID).encoded()
        // Zero-copy from the committed slot (verified above; the receiver checks every chunk's CRC again).
        return [.bytes(header), ZeroCopyFrames.frame(data)]
    }
}
