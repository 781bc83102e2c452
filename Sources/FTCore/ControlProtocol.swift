/// Control-plane messages between the coordinator and the SMPs and workers,
/// carried in a `WireEnvelope` (the envelope's `epoch` is the sender's epoch,
/// its `sender` the member id: a node id for an SMP, `node/worker` for a
/// worker). SMPs and workers are ZeroMQ DEALERs; the coordinator is a ROUTER.
///
///     SMP -> coordinator      smpHello, smpHeartbeat, childExited, startRefused, protected, persisted
///     worker -> coordinator   workerHello, workerHeartbeat, ready, restoreFailed, workerDone
///     coordinator -> member   welcome, ack, helloRequired, commit, abort, pause,
///                             restore, restartWorkers, resume, fenced, stop, persist, loadPersisted
///     ftctl -> coordinator    statusQuery  ->  statusReply(json)
///
/// Every heartbeat is answered with `ack` (or `helloRequired` by a coordinator
/// that does not know the sender, e.g. after its restart, or `fenced` when the
/// sender was declared dead); a member that hears nothing for the timeout
/// treats the coordinator as gone (a worker holds at its next step boundary
/// until it hears from it again).
///
/// A worker's heartbeat says what it is doing (`WorkerActivity`), for the
/// coordinator's step-progress watchdog: a rank blocked in a collective names
/// the rank it waits for, so a hang can be traced to the rank holding it up.
/// `restartWorkers` names the incarnation (pid) of each worker to replace: the
/// SMP kills that process if it still runs (saving its stack first when asked)
/// and then starts a new one; an order repeated after the new one started
/// changes nothing.
public enum ControlMessage: Sendable, Equatable {
    // SMP -> coordinator
    case smpHello(SMPInventory)
    /// `sharedMemoryBytes`: the shared memory the SMP has in use (slots and segments).
    case smpHeartbeat(dataBytes: Int, parityBytes: Int, sharedMemoryBytes: Int = 0)
    /// A child worker (process `pid`) exited on its own.
    case childExited(worker: String, pid: Int, status: String)
    /// A worker cannot join: its SMP refused its registration for a reason
    /// that starting it again does not change (the shared memory it needs is
    /// more than the node's budget or /dev/shm holds). A job still starting
    /// stops at once with `reason` rather than wait for its start timeout.
    case startRefused(worker: String, reason: String)
    /// Every local worker staged `step` and this node's part of its round is
    /// done: its chunks acked by every parity holder, its own parity complete,
    /// all under the EC layout of `layoutChunkBytes` (0: no layout, a job
    /// without erasure coding). In a job with erasure coding the coordinator
    /// counts it only when that is the layout it sent last: a round protected
    /// before the layout arrived, or under a layout since replaced, protects nothing.
    case protected(step: Int, layoutChunkBytes: Int)
    /// The SMP's part of committed step `step` is on disk (`persist`'s
    /// answer): `bytes` written, or `error` ("code: sentence", code one of
    /// `PersistErrorCode`'s, e.g. `out_of_space`) when nothing was kept.
    case persisted(step: Int, bytes: Int, error: String)
    // worker -> coordinator
    case workerHello(WorkerInfo)
    /// `running`: the worker is training (not paused or waiting for resume);
    /// `skipped`: snapshots it skipped because a round was still pending.
    /// `snapshots`, `blockedSeconds`: snapshots this process staged so far and the
    /// training time they blocked, in all (the coordinator's metrics take the differences).
    case workerHeartbeat(step: Int, running: Bool, skipped: Int, activity: WorkerActivity, snapshots: Int = 0, blockedSeconds: Double = 0)
    case ready(restoredStep: Int?)
    /// The restore the coordinator ordered failed (a source did not answer, a
    /// chunk was corrupt): the worker is alive and waits for the next order.
    case restoreFailed(reason: String)
    case workerDone(finalStep: Int)
    // coordinator -> members
    case welcome(state: String)
    case ack(state: String)
    case helloRequired
    case commit(step: Int)
    /// Write this node's part of committed step `step` (its slots' data and
    /// its parity) to the persist directory, in the background, and answer
    /// `persisted`. `nodes`: every node of the job, in layout order (the part
    /// names them; a cold restart needs all of them). The coordinator commits
    /// no further round until every live node answered, so the slots and
    /// parity of `step` stay put while they are written. `durable`: the
    /// newest durable step the coordinator knows (nil: none), which the SMP's
    /// retention never removes (newer steps may all fail on another node).
    case persist(step: Int, nodes: [String], durable: Int?)
    /// Memory cannot recover the job (a group lost more than m nodes): end
    /// this node's workers, load persisted `step` from the persist directory
    /// into the slots (decoded from the group's parts where this node's own
    /// is damaged or missing), start the workers again, and answer `rebuilt`.
    case loadPersisted(step: Int)
    case abort(step: Int)
    case pause(reason: String)
    /// To a worker: restore this step (nil: start from the initial state);
    /// `sources[r]` is the data endpoint of the SMP holding rank r's slices.
    /// To an SMP: commit `step` if it is staged, drop other uncommitted rounds.
    case restore(step: Int?, sources: [String])
    /// To an SMP: replace these workers (see `WorkerRestart`).
    case restartWorkers([WorkerRestart])
    /// Run from this step; `peers` lists every rank's collective endpoint, by rank.
    case resume(fromStep: Int, peers: [String])
    case fenced(reason: String)
    case stop(reason: String, failed: Bool)
    /// To every SMP: the EC groups, chunk length and peers' data endpoints.
    case ecLayout(ECLayout)
    /// To a replacement SMP: rebuild this node's data and parity for `step`
    /// from its group; `lost` are the nodes whose chunks are gone.
    case rebuild(step: Int?, lost: [String])
    /// From an SMP: rebuilt (or failed to, with the reason).
    case rebuilt(step: Int?, error: String)
    // operator
    case statusQuery
    case statusReply(String)

    public struct SMPInventory: Sendable, Equatable {
        public var node: String
        public var pid: Int
        /// Where peers fetch slices and chunks (TCP).
        public var dataEndpoint: String
        /// Local worker ids ("w0", …) with their global DP ranks.
        public var workers: [String]
        public var rankOffset: Int
        public var committedStep: Int?
        /// A step every local worker has staged but not committed.
        public var stagedStep: Int?
        /// That staged step, if this SMP reported it `protected` (its chunks are at
        /// their holders, its parity complete): a coordinator that restarts
        /// commits a step every node protected.
        public var protectedStep: Int?
        /// The chunk length of the EC layout this SMP holds data and parity
        /// in (0: none yet), so that a restarted coordinator knows the layout.
        public var layoutChunkBytes: Int

        public init(node: String, pid: Int, dataEndpoint: String, workers: [String], rankOffset: Int,
                    committedStep: Int?, stagedStep: Int?, protectedStep: Int? = nil, layoutChunkBytes: Int = 0) {
            self.node = node
            self.pid = pid
            self.dataEndpoint = dataEndpoint
            self.workers = workers
            self.rankOffset = rankOffset
            self.committedStep = committedStep
            self.stagedStep = stagedStep
            self.protectedStep = protectedStep
            self.layoutChunkBytes = layoutChunkBytes
        }

        /// Holds no snapshot at all: nothing committed and nothing staged (a
        /// fresh node, or a replacement that has not been rebuilt).
        public var isEmpty: Bool { committedStep == nil && stagedStep == nil }
    }

    /// One worker an SMP is told to replace.
    public struct WorkerRestart: Sendable, Equatable {
        public var worker: String
        /// The incarnation to end first if it still runs (0: none known).
        public var pid: Int
        /// Save its thread backtraces to the run directory before it is killed (a hang).
        public var saveStack: Bool

        public init(worker: String, pid: Int, saveStack: Bool = false) {
            self.worker = worker
            self.pid = pid
            self.saveStack = saveStack
        }
    }

    public struct WorkerInfo: Sendable, Equatable {
        public var node: String
        public var worker: String
        public var rank: Int
        public var worldSize: Int
        public var pid: Int
        /// Where the rank's collective listens.
        public var collectiveEndpoint: String

        public init(node: String, worker: String, rank: Int, worldSize: Int, pid: Int, collectiveEndpoint: String) {
            self.node = node
            self.worker = worker
            self.rank = rank
            self.worldSize = worldSize
            self.pid = pid
            self.collectiveEndpoint = collectiveEndpoint
        }

        public var key: String { "\(node)/\(worker)" }
    }

    public var type: UInt16 {
        switch self {
        case .smpHello: 101
        case .smpHeartbeat: 102
        case .childExited: 103
        case .startRefused: 105
        case .protected: 104
        case .persisted: 106
        case .workerHello: 111
        case .workerHeartbeat: 112
        case .ready: 113
        case .workerDone: 114
        case .restoreFailed: 115
        case .welcome: 121
        case .ack: 122
        case .helloRequired: 123
        case .commit: 124
        case .abort: 125
        case .pause: 126
        case .restore: 127
        case .restartWorkers: 128
        case .resume: 129
        case .fenced: 130
        case .stop: 131
        case .persist: 132
        case .loadPersisted: 133
        case .statusQuery: 141
        case .statusReply: 142
        case .ecLayout: 151
        case .rebuild: 152
        case .rebuilt: 153
        }
    }

    public func envelope(sender: String, epoch: UInt64) -> WireEnvelope {
        var w = ByteWriter()
        switch self {
        case .smpHello(let i):
            w.string(i.node); w.i64(Int64(i.pid)); w.string(i.dataEndpoint)
            w.u32(UInt32(i.workers.count)); for x in i.workers { w.string(x) }
            w.i64(Int64(i.rankOffset)); w.i64(Int64(i.committedStep ?? -1)); w.i64(Int64(i.stagedStep ?? -1))
            w.i64(Int64(i.protectedStep ?? -1)); w.i64(Int64(i.layoutChunkBytes))
        case .smpHeartbeat(let d, let p, let shm):
            w.i64(Int64(d)); w.i64(Int64(p)); w.i64(Int64(shm))
        case .childExited(let worker, let pid, let status):
            w.string(worker); w.i64(Int64(pid)); w.string(status)
        case .startRefused(let worker, let reason):
            w.string(worker); w.string(reason)
        case .protected(let s, let chunk):
            w.i64(Int64(s)); w.i64(Int64(chunk))
        case .persisted(let s, let bytes, let error):
            w.i64(Int64(s)); w.i64(Int64(bytes)); w.string(error)
        case .persist(let s, let nodes, let durable):
            w.i64(Int64(s)); w.u32(UInt32(nodes.count)); for x in nodes { w.string(x) }
            w.i64(Int64(durable ?? -1))
        case .loadPersisted(let s):
            w.i64(Int64(s))
        case .commit(let s), .abort(let s), .workerDone(let s):
            w.i64(Int64(s))
        case .workerHello(let i):
            w.string(i.node); w.string(i.worker); w.i64(Int64(i.rank)); w.i64(Int64(i.worldSize)); w.i64(Int64(i.pid))
            w.string(i.collectiveEndpoint)
        case .workerHeartbeat(let step, let running, let skipped, let a, let snapshots, let blocked):
            w.i64(Int64(step)); w.bool(running); w.i64(Int64(skipped))
            w.u8(a.kind.rawValue); w.i64(Int64(a.waitingOn)); w.i64(Int64(a.milliseconds))
            w.i64(Int64(snapshots)); w.i64(Int64(Self.micros(blocked)))
        case .ready(let s):
            w.i64(Int64(s ?? -1))
        case .restore(let s, let sources):
            w.i64(Int64(s ?? -1)); w.u32(UInt32(sources.count)); for x in sources { w.string(x) }
        case .welcome(let s), .ack(let s), .pause(let s), .fenced(let s), .statusReply(let s), .restoreFailed(let s):
            w.string(s)
        case .helloRequired, .statusQuery:
            break
        case .restartWorkers(let list):
            w.u32(UInt32(list.count))
            for x in list { w.string(x.worker); w.i64(Int64(x.pid)); w.bool(x.saveStack) }
        case .resume(let from, let peers):
            w.i64(Int64(from)); w.u32(UInt32(peers.count)); for p in peers { w.string(p) }
        case .stop(let reason, let failed):
            w.string(reason); w.bool(failed)
        case .ecLayout(let l):
            w.i64(Int64(l.k)); w.i64(Int64(l.m)); w.i64(Int64(l.chunkBytes))
            w.u32(UInt32(l.groups.count))
            for g in l.groups { w.u32(UInt32(g.count)); for x in g { w.string(x) } }
            let eps = l.endpoints.sorted { $0.key < $1.key }
            w.u32(UInt32(eps.count)); for (k, v) in eps { w.string(k); w.string(v) }
        case .rebuild(let s, let lost):
            w.i64(Int64(s ?? -1)); w.u32(UInt32(lost.count)); for x in lost { w.string(x) }
        case .rebuilt(let s, let error):
            w.i64(Int64(s ?? -1)); w.string(error)
        }
        return WireEnvelope(type: type, epoch: epoch, sender: sender, payload: w.buffer)
    }

    public init(_ e: WireEnvelope) throws(WireError) {
        var r = ByteReader(e.payload)
        // Every integer is non-negative and bounded (`WireLimits`): steps,
        // sizes, ranks and pids that no real job has are refused here, so
        // the coordinator's and the SMPs' arithmetic on them cannot overflow.
        func int(_ f: String, max: Int) throws(WireError) -> Int {
            let v = try r.i64(field: f)
            guard v >= 0 else { throw WireError(.badValue, "\(f) is negative (\(v))") }
            return try WireLimits.check(Int(v), 0...max, f)
        }
        func optional(_ f: String, max: Int) throws(WireError) -> Int? {
            let v = try r.i64(field: f)
            guard v >= -1 else { throw WireError(.badValue, "\(f) is \(v)") }
            return v == -1 ? nil : try WireLimits.check(Int(v), 0...max, f)
        }
        func step(_ f: String) throws(WireError) -> Int { try int(f, max: WireLimits.maxStep) }
        func optionalStep(_ f: String) throws(WireError) -> Int? { try optional(f, max: WireLimits.maxStep) }
        func bytes(_ f: String) throws(WireError) -> Int { try int(f, max: WireLimits.maxBytes) }
        func pid(_ f: String) throws(WireError) -> Int { try int(f, max: WireLimits.maxPID) }
        func rank(_ f: String) throws(WireError) -> Int { try int(f, max: WireLimits.maxDPSize - 1) }
        func strings(_ f: String) throws(WireError) -> [String] {
            let n = Int(try r.u32(field: "\(f) count"))
            guard n <= 65536 else { throw WireError(.badLength, "\(f) count \(n)") }
            var out: [String] = []
            for _ in 0..<n { out.append(try r.string(field: f, max: 1024)) }
            return out
        }
        switch e.type {
        case 101:
            let node = try r.string(field: "node", max: 255)
            let pid = try pid("pid")
            let data = try r.string(field: "data endpoint", max: 1024)
            let workers = try strings("worker")
            let offset = try rank("rank offset")
            let committed = try optionalStep("committed step")
            let staged = try optionalStep("staged step")
            let protected = try optionalStep("protected step")
            self = .smpHello(.init(node: node, pid: pid, dataEndpoint: data, workers: workers, rankOffset: offset,
                                   committedStep: committed, stagedStep: staged, protectedStep: protected,
                                   layoutChunkBytes: try bytes("layout chunk bytes")))
        case 102:
            let d = try bytes("data bytes")
            let p = try bytes("parity bytes")
            self = .smpHeartbeat(dataBytes: d, parityBytes: p, sharedMemoryBytes: try bytes("shared memory bytes"))
        case 103:
            let worker = try r.string(field: "worker", max: 255)
            let pid = try pid("pid")
            self = .childExited(worker: worker, pid: pid, status: try r.string(field: "status", max: 255))
        case 104:
            let s = try step("step")
            self = .protected(step: s, layoutChunkBytes: try bytes("layout chunk bytes"))
        case 106:
            let s = try step("step")
            let b = try bytes("bytes")
            self = .persisted(step: s, bytes: b, error: try r.string(field: "error", max: 1 << 16))
        case 132:
            let s = try step("step")
            let nodes = try strings("node")
            self = .persist(step: s, nodes: nodes, durable: try optionalStep("durable step"))
        case 133: self = .loadPersisted(step: try step("step"))
        case 105:
            let worker = try r.string(field: "worker", max: 255)
            self = .startRefused(worker: worker, reason: try r.string(field: "reason", max: 1024))
        case 111:
            let node = try r.string(field: "node", max: 255)
            let worker = try r.string(field: "worker", max: 255)
            let rank = try rank("rank")
            let world = try WireLimits.check(try int("world size", max: WireLimits.maxDPSize), 1...WireLimits.maxDPSize, "world size")
            guard rank < world else { throw WireError(.outOfRange, "rank \(rank) is not below the world size \(world)") }
            let pid = try pid("pid")
            self = .workerHello(.init(node: node, worker: worker, rank: rank, worldSize: world, pid: pid,
                                      collectiveEndpoint: try r.string(field: "collective endpoint", max: 1024)))
        case 112:
            let current = try step("step")
            let running = try r.bool(field: "running")
            let skipped = try step("skipped")
            let raw = try r.u8(field: "activity")
            guard let kind = WorkerActivity.Kind(rawValue: raw) else { throw WireError(.badValue, "activity \(raw) is unknown") }
            let waitingOn = try optional("waiting on", max: WireLimits.maxDPSize - 1)
            let activity = WorkerActivity(kind, waitingOn: waitingOn ?? -1, milliseconds: try int("activity ms", max: WireLimits.maxMilliseconds))
            let snapshots = try step("snapshots")
            let blockedMicros = try int("blocked microseconds", max: WireLimits.maxMicroseconds)
            self = .workerHeartbeat(step: current, running: running, skipped: skipped, activity: activity,
                                    snapshots: snapshots, blockedSeconds: Double(blockedMicros) / 1e6)
        case 113: self = .ready(restoredStep: try optionalStep("restored step"))
        case 114: self = .workerDone(finalStep: try step("final step"))
        case 115: self = .restoreFailed(reason: try r.string(field: "reason"))
        case 121: self = .welcome(state: try r.string(field: "state", max: 64))
        case 122: self = .ack(state: try r.string(field: "state", max: 64))
        case 123: self = .helloRequired
        case 124: self = .commit(step: try step("step"))
        case 125: self = .abort(step: try step("step"))
        case 126: self = .pause(reason: try r.string(field: "reason"))
        case 127:
            let s = try optionalStep("step")
            self = .restore(step: s, sources: try strings("source"))
        case 128:
            let n = Int(try r.u32(field: "worker count"))
            guard n <= 65536 else { throw WireError(.badLength, "worker count \(n)") }
            var list: [WorkerRestart] = []
            for _ in 0..<n {
                let worker = try r.string(field: "worker", max: 255)
                let pid = try pid("pid")
                list.append(WorkerRestart(worker: worker, pid: pid, saveStack: try r.bool(field: "save stack")))
            }
            self = .restartWorkers(list)
        case 129:
            let from = try step("from step")
            self = .resume(fromStep: from, peers: try strings("peer"))
        case 130: self = .fenced(reason: try r.string(field: "reason"))
        case 131:
            let reason = try r.string(field: "reason", max: 1 << 16)
            self = .stop(reason: reason, failed: try r.bool(field: "failed"))
        case 151:
            let k = try WireLimits.check(try int("k", max: WireLimits.maxGroupNodes), 1...WireLimits.maxGroupNodes - 1, "k")
            let m = try WireLimits.check(try int("m", max: WireLimits.maxGroupNodes), 1...WireLimits.maxGroupNodes - k, "m")
            let chunk = try WireLimits.check(try bytes("chunk bytes"), 1...WireLimits.maxBytes, "chunk bytes")
            let ng = Int(try r.u32(field: "group count"))
            guard ng <= 4096 else { throw WireError(.badLength, "group count \(ng)") }
            var groups: [[String]] = []
            for _ in 0..<ng {
                let g = try strings("node")
                guard g.count == k + m else { throw WireError(.outOfRange, "a group of \(g.count) nodes in a layout of k+m = \(k)+\(m)") }
                groups.append(g)
            }
            let ne = Int(try r.u32(field: "endpoint count"))
            guard ne <= 65536 else { throw WireError(.badLength, "endpoint count \(ne)") }
            var eps: [String: String] = [:]
            for _ in 0..<ne {
                let key = try r.string(field: "node", max: 255)
                eps[key] = try r.string(field: "endpoint", max: 1024)
            }
            self = .ecLayout(ECLayout(k: k, m: m, chunkBytes: chunk, groups: groups, endpoints: eps))
        case 152:
            let s = try optionalStep("step")
            self = .rebuild(step: s, lost: try strings("lost node"))
        case 153:
            let s = try optionalStep("step")
            self = .rebuilt(step: s, error: try r.string(field: "error", max: 1 << 16))
        case 141: self = .statusQuery
        case 142: self = .statusReply(try r.string(field: "status", max: 1 << 22))
        default: throw WireError(.unknownType, "message type \(e.type) is not a control message")
        }
        guard r.remaining == 0 else { throw WireError(.trailingBytes, "\(r.remaining) bytes after control message \(e.type)") }
    }

    public static func decode(_ frame: [UInt8]) throws(WireError) -> (ControlMessage, WireEnvelope) {
        let e = try WireEnvelope(decoding: frame)
        return (try ControlMessage(e), e)
    }
}

/// What a worker is doing, as its heartbeat tells the coordinator's
/// step-progress watchdog (`ProgressWatchdog`).
public struct WorkerActivity: Sendable, Equatable {
    public enum Kind: UInt8, Sendable, CaseIterable {
        /// Not training: waiting for an instruction (paused, restored, done).
        case idle = 0
        /// Computing a step (forward, backward, update).
        case computing = 1
        /// Blocked in a collective, waiting for rank `waitingOn`'s message.
        case collective = 2
        /// Waiting for the previous snapshot round to commit, or for its copy.
        case snapshotWait = 3
        /// Restoring a snapshot.
        case restoring = 4
        /// Holding at a step boundary: the coordinator is silent.
        case held = 5

        public var name: String {
            switch self {
            case .idle: "idle"
            case .computing: "computing"
            case .collective: "collective"
            case .snapshotWait: "snapshot-wait"
            case .restoring: "restoring"
            case .held: "held"
            }
        }
    }

    public var kind: Kind
    /// For `.collective`: the DP rank it waits for (-1: unknown).
    public var waitingOn: Int
    /// How long it has been doing this, in milliseconds.
    public var milliseconds: Int

    public init(_ kind: Kind, waitingOn: Int = -1, milliseconds: Int = 0) {
        self.kind = kind
        self.waitingOn = waitingOn
        self.milliseconds = milliseconds
    }

    public static let idle = WorkerActivity(.idle)
}

extension ControlMessage {
    /// Seconds as whole microseconds for the wire, rounded to the nearest (a
    /// decoded value, microseconds / 1e6, comes back to the same integer;
    /// truncating turned 249 µs into 248): 0 for anything not finite or
    /// negative, at most what the decoder takes (`WireLimits.maxMicroseconds`).
    static func micros(_ seconds: Double) -> Int {
        guard seconds.isFinite, seconds > 0 else { return 0 }
        let us = (seconds * 1e6).rounded()
        return us >= Double(WireLimits.maxMicroseconds) ? WireLimits.maxMicroseconds : Int(us)
    }
}
