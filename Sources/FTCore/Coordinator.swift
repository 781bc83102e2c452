/// The coordinator's settings.
public struct CoordinatorSettings: Sendable {
    public var jobID: String
    public var nodes: Int
    public var workersPerNode: Int
    public var heartbeatInterval: Double = 0.1
    public var heartbeatTimeout: Double = 0.5
    /// A snapshot round not committed this long after its first `protected` is aborted.
    public var roundTimeout: Double = 10
    /// The floor of every recovery phase's deadline (seconds). A phase's
    /// deadline is this floor plus three times the time its bytes take at the
    /// recovery rate; a phase past its deadline is retried, then escalated.
    public var phaseTimeout: Double = 5
    public var phaseRetries = 2
    /// The rate (bytes per second) assumed for a recovery's bulk work before
    /// any has been measured; afterwards the median of the measured rates.
    public var recoveryBytesPerSecond: Double = 100e6
    /// Failure events in a row without a resume before the job is stopped (a
    /// crash loop). Failures detected within one heartbeat timeout of the
    /// first of a burst (a node's workers, every worker of the job) are one event.
    public var maxFailuresWithoutResume = 10
    /// A restarted coordinator that heard from a job that already ran waits
    /// this long for every node's hello; then the missing nodes are lost.
    public var startGrace: Double = 2
    /// How long this coordinator may hear from no member at all (its own
    /// link cut: a partition of its host) before it declares them all dead;
    /// meanwhile it declares nobody and every deadline waits. nil: derived,
    /// `max(10 s, 20 × heartbeatTimeout)`; only with two nodes or more (one
    /// node's silence is that node's).
    public var isolationLimit: Double?
    /// The step-progress watchdog (a hang that keeps heartbeats alive).
    public var watchdog = ProgressWatchdog.Settings()
    /// Steps between snapshots (informational: workers decide collectively).
    public var snapshotInterval = 1
    /// Erasure coding across nodes: groups of `k + m` consecutive nodes
    /// (n0..n(k+m-1), …); nil for none.
    public var erasure: (k: Int, m: Int)?
    /// The persistent tier: every node persists a committed step once
    /// `persistEvery` commits or `persistSeconds` seconds passed since the
    /// last one was ordered (either, or both; nil: off).
    public var persistEvery: Int?
    public var persistSeconds: Double?
    /// Commits wait this long for a persist to end, then go on without the
    /// nodes that did not answer (the SMPs keep the step's slots pinned:
    /// snapshots are skipped meanwhile, never overwritten under the writer).
    public var persistTimeout: Double = 600
    public var persistEnabled: Bool { persistEvery != nil || persistSeconds != nil }

    /// The node ids of the job, in order.
    public var nodeIDs: [String] { (0..<nodes).map { "n\($0)" } }
    /// The local worker ids of every node.
    public var workerIDs: [String] { (0..<workersPerNode).map { "w\($0)" } }

    /// Whether `id` names a member of this job: a node ("n3") or a worker ("n3/w1").
    public func isMemberID(_ id: String) -> Bool {
        let parts = id.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count <= 2, let node = Self.index(parts[0], prefix: "n"), node < nodes else { return false }
        guard parts.count == 2 else { return true }
        guard let worker = Self.index(parts[1], prefix: "w") else { return false }
        return worker < workersPerNode
    }

    /// `7` for "n7" (prefix "n"); nil unless it is the prefix and a canonical decimal.
    private static func index(_ s: Substring, prefix: Character) -> Int? {
        guard s.first == prefix, s.count >= 2, s.count <= 10 else { return nil }
        let digits = s.dropFirst()
        guard let v = Int(digits), String(v) == digits else { return nil }
        return v
    }

    public init(jobID: String, nodes: Int, workersPerNode: Int) {
        self.jobID = jobID
        self.nodes = nodes
        self.workersPerNode = workersPerNode
    }
}

/// The coordinator's brain as a value type: membership, epochs and fencing,
/// failure detection, the global snapshot commit, and recovery orchestration
/// (ARCHITECTURE.md, "Failure detection", "Recovery"). It takes messages and `now`
/// and returns directives (messages to send, lines to log); the
/// `ft-coordinator` shell does the sockets and the clock.
///
/// Job states and their legal transitions:
///
///     starting   -> recovering   every expected SMP and worker said hello (a
///                                fresh job restores "nothing"; a restarted
///                                coordinator restores the committed step), or a
///                                restarted coordinator's start grace ran out:
///                                nodes that never said hello, and nodes that
///                                hold nothing while others hold a committed
///                                step, are lost and rebuilt
///     running    -> recovering   a worker or SMP died (reported, timed out, or
///                                hung: the step-progress watchdog)
///     recovering -> recovering   another failure during recovery (new epoch)
///     recovering -> running      every worker restored and is ready: resume
///     recovering -> failed       unrecoverable plan, or a phase out of retries
///     running    -> stopped      every worker reported done
///
/// Epochs: every recovery raises the epoch and every message carries it. A
/// member declared dead is fenced: whatever it sends afterwards is answered
/// with `fenced` and changes nothing. State-changing reports (`protected`,
/// `ready`) from an older epoch are ignored. Declared dead means made dead:
/// the restart order names the incarnation (pid) the SMP must kill if it still
/// runs; a dead SMP's process is the launcher's to kill.
///
/// Commit: step `s` commits when every node reported `protected(s)` in the
/// current epoch while running; then `commit(s)` goes to every SMP. When
/// nodes are lost while running, the round every surviving node protected
/// commits before the recovery is planned, if no group lost more than `m`
/// (`commitAtFailure`): the lost nodes' part of it decodes from parity.
///
/// Persistence (with `persistEvery` / `persistSeconds`): after a commit that
/// is due, `persist(s)` goes to every node; no further round commits until
/// every live node answered `persisted(s)` (or `persistTimeout` passed), so
/// the slots and parity of `s` stay put while they are written. A step is
/// durable once every node wrote it, or `k` nodes of every EC group. A loss
/// that memory cannot recover (more than `m` nodes of a group, or any node
/// without EC) with a durable step is planned as a recovery from disk: every
/// node ends its workers, loads the newest durable step (`loadPersisted`,
/// answered by `rebuilt`), and every worker restores it; a step that a node
/// cannot load sends every node back to the durable step before it.
///
/// A stalled coordinator (its `tick`s far apart) accuses nobody: its failure
/// detector grants every member a fresh grace period, and round, phase and
/// watchdog deadlines move by the stall.
public struct CoordinatorInstance: Sendable {
    public enum JobState: String, Sendable, CaseIterable {
        case starting, running, recovering, stopped, failed
    }

    public enum MemberState: String, Sendable {
        case alive, dead, fenced, restarting, done
    }

    public enum Phase: String, Sendable, CaseIterable {
        case detect, plan, rebuild, restart, resume
    }

    public struct Node: Sendable, Equatable {
        public var id: String
        public var pid: Int
        public var dataEndpoint: String
        public var workers: [String]
        public var rankOffset: Int
        public var state: MemberState = .alive
        public var committedStep: Int?
        public var stagedStep: Int?
        public var protectedStep: Int?
        /// The staged step the SMP's hello said it had protected (for a coordinator that restarts).
        public var helloProtectedStep: Int?
        /// The chunk size of the EC layout the SMP's hello said it holds (0: none).
        public var helloLayoutChunkBytes = 0
        public var dataBytes = 0
        public var parityBytes = 0
        /// Shared memory its SMP has in use, as its heartbeats say.
        public var sharedMemoryBytes = 0
        /// The epoch in which this process (pid) joined: older messages under
        /// this id come from a process it replaced, and are fenced.
        public var admittedEpoch: UInt64 = 0
    }

    public struct Worker: Sendable, Equatable {
        public var info: ControlMessage.WorkerInfo
        public var state: MemberState = .alive
        public var step = 0
        /// Training (not paused or waiting for an instruction), as its last heartbeat said.
        public var running = false
        /// What it is doing, as its last heartbeat said.
        public var activity = WorkerActivity.idle
        /// Restored and ready in the current epoch.
        public var ready = false
        /// Snapshots skipped (the ranks skip together).
        public var skipped = 0
        /// Snapshots this process staged and the training time they blocked, in all, as its heartbeats say.
        public var snapshots = 0
        public var blockedSeconds = 0.0
        /// The epoch in which this process (pid) joined (see `Node`).
        public var admittedEpoch: UInt64 = 0
    }

    public struct PhaseRecord: Sendable, Equatable {
        public var phase: Phase
        public var seconds: Double
        public var reason: String
    }

    /// The last failure and what recovery did about it.
    public struct FailureReport: Sendable, Equatable {
        public var what: String
        public var kind: String
        public var detectedBy: String
        public var detectedAt: Double
        public var epoch: UInt64
        public var phases: [PhaseRecord] = []
        public var outcome: String = "in progress"
        /// The furthest step any worker reported before the job resumed.
        public var stepsReached = 0
        /// The step every worker restored (nil: the initial state), once resumed.
        public var restoredStep: Int?
        /// Steps computed again because of this failure (reached - restored), once resumed.
        public var stepsLost: Int?
        /// Milliseconds from detection to resume, once resumed.
        public var recoveryMs: Double?
    }

    /// Failures since this coordinator started, oldest first (at most
    /// `historyLimit`); a failure during a recovery ends the one before it
    /// with the outcome "superseded".
    public private(set) var failureHistory: [FailureReport] = []
    public static let historyLimit = 256
    /// All failures since this coordinator started (the history keeps the last `historyLimit`).
    public private(set) var failureCount = 0

    private mutating func record(_ f: FailureReport) {
        failureHistory.append(f)
        if failureHistory.count > Self.historyLimit { failureHistory.removeFirst(failureHistory.count - Self.historyLimit) }
    }

    private var workersFurthestStep: Int { workers.values.map(\.step).max() ?? 0 }

    public enum Directive: Sendable, Equatable {
        case send(to: String, ControlMessage)
        case log(String)
        /// A message refused by `validate`: the shell logs it as a warning; nothing changed.
        case refused(sender: String, WireError)
    }

    struct Recovery: Sendable {
        var step: Int?
        var phase: Phase
        var phaseStartedAt: Double
        /// When the phase is retried (derived from its bytes; see `phaseDeadline`).
        var deadline: Double
        var retries = 0
        var restartWorkers: [String: [String]]
        /// Workers whose stack is saved before they are killed (hung).
        var saveStacks: Set<String> = []
        /// Nodes to rebuild from parity, and the pids of their lost SMPs.
        var rebuildNodes: [String] = []
        var lostPIDs: [String: Int] = [:]
        var rebuilt: Set<String> = []
        var rebuildStartedAt: Double = 0
        /// Bytes the rebuild restores (for the measured rate).
        var rebuildBytes = 0
        /// Rebuilds that reported an error.
        var rebuildFailures = 0
        /// Workers whose restore failed in this phase, with the reasons (they answer: not hung).
        var restoreFailures: [String: [String]] = [:]
        /// The rebuild phase loads `step` from the persistent tier on every node
        /// (`loadPersisted`), not lost nodes from their groups' parity.
        var fromDisk = false
    }

    public let settings: CoordinatorSettings
    public private(set) var epoch: UInt64 = 1
    public private(set) var state: JobState = .starting
    public private(set) var committedStep: Int?
    public private(set) var committedAt: Double?
    /// Seconds from the first `protected` of the last committed round to its commit (nil: not known).
    public private(set) var lastCommitLatency: Double?
    public private(set) var nodes: [String: Node] = [:]
    public private(set) var workers: [String: Worker] = [:]
    public private(set) var lastFailure: FailureReport?
    public private(set) var stopReason: String?
    public private(set) var detector: FailureDetectorInstance
    public private(set) var watchdog: ProgressWatchdog
    private var recovery: Recovery?
    private var roundStartedAt: [Int: Double] = [:]
    private var lastResume: ControlMessage?
    public private(set) var lastLayout: ECLayout?
    private var failuresWithoutResume = 0
    /// When the current burst of failures began (failures within a heartbeat timeout of it are one event).
    private var burstStartedAt: Double?
    /// When this coordinator first saw anything (its start grace counts from there).
    private var startingSince: Double?
    /// Exits of workers that had not joined yet, while the job starts: each is
    /// started again, until `maxStartExits` exits of one worker stop the job.
    private var startExits: [String: Int] = [:]
    /// Exits of one worker before it joins after which a starting job stops.
    public static let maxStartExits = 3
    /// Some member said hello knowing an epoch or holding a snapshot: this
    /// coordinator replaces one that ran the job.
    public private(set) var takesOverRunningJob = false
    /// Bulk rates (bytes/s) measured by recoveries, newest last.
    private var measuredRates: [Double] = []
    /// The watchdog reported a stall that is not a worker's hang (logged once per episode).
    private var watchdogNoted = false
    /// The persist in progress: its step, when it was ordered, the nodes yet to answer.
    public struct PersistRound: Sendable, Equatable {
        public var step: Int
        public var orderedAt: Double
        public var pending: Set<String>
    }
    public private(set) var persisting: PersistRound?
    /// The last persist ordered (step, when).
    public private(set) var lastPersistOrder: (step: Int, at: Double)?
    /// The newest step every live node of a persist wrote without error, and
    /// the newest durable one (every node's part, or `k` of every group's).
    public private(set) var persistedStep: Int?
    public private(set) var durableStep: Int?
    /// Durable steps known, oldest first (at most 8): a recovery from disk that
    /// cannot load the newest goes back to the one before.
    public private(set) var durableSteps: [Int] = []
    /// Nodes whose last persist failed, and why ("out_of_space: ..."); cleared by one that succeeds.
    public private(set) var persistErrors: [String: String] = [:]
    /// Nodes that wrote their part of each recent step.
    private var persistedBy: [Int: Set<String>] = [:]
    /// Seconds the last persist that ended took (ordered to its last answer).
    public private(set) var lastPersistSeconds: Double?
    public private(set) var abortedRounds = 0
    public private(set) var fencedMessages = 0
    /// Messages refused by `validate` (a sender, node, worker or rank outside the job).
    public private(set) var refusedMessages = 0

    public init(settings: CoordinatorSettings) {
        self.settings = settings
        detector = FailureDetectorInstance(interval: settings.heartbeatInterval, timeout: settings.heartbeatTimeout)
        if settings.nodes >= 2 { detector.isolationLimit = settings.isolationLimit ?? max(10, 20 * settings.heartbeatTimeout) }
        watchdog = ProgressWatchdog(settings: settings.watchdog)
    }

    var expectedWorkers: Int { settings.nodes * settings.workersPerNode }

    // MARK: events

    public mutating func receive(_ message: ControlMessage, from sender: String, epoch senderEpoch: UInt64, now: Double) -> [Directive] {
        if startingSince == nil { startingSince = now }
        do {
            try validate(message, from: sender)
        } catch {
            refusedMessages += 1
            return [.refused(sender: String(sender.prefix(64)), error)]
        }
        switch message {
        case .smpHello(let inventory):
            return smpHello(inventory, sender: sender, senderEpoch: senderEpoch, now: now)
        case .workerHello(let info):
            return workerHello(info, sender: sender, senderEpoch: senderEpoch, now: now)
        case .statusQuery:
            return []  // answered by the shell from `status`
        default:
            break
        }
        // Everything else comes from a member we must know.
        if let fence = fenceIfDead(sender, senderEpoch: senderEpoch) { return fence }
        guard nodes[sender] != nil || workers[sender] != nil else {
            return [.send(to: sender, .helloRequired)]
        }
        detector.heard(sender, now: now)
        let current = senderEpoch == epoch
        switch message {
        case .smpHeartbeat(let data, let parity, let shm):
            let resized = nodes[sender]?.dataBytes != data
            nodes[sender]?.dataBytes = data
            nodes[sender]?.parityBytes = parity
            nodes[sender]?.sharedMemoryBytes = shm
            // The layout follows the nodes' sizes (sent when it changes, and until every node has one).
            return [.send(to: sender, .ack(state: state.rawValue))] + (resized || lastLayout == nil ? layoutDirectives() : [])
        case .workerHeartbeat(let step, let running, let skipped, let activity, let snapshots, let blocked):
            workers[sender]?.snapshots = snapshots
            workers[sender]?.blockedSeconds = blocked
            workers[sender]?.step = step
            workers[sender]?.skipped = skipped
            workers[sender]?.running = running
            workers[sender]?.activity = activity
            var out: [Directive] = [.send(to: sender, .ack(state: state.rawValue))]
            if current, !running, state == .running, let resume = lastResume, workers[sender]?.state == .alive {
                // It missed the resume (or started late): say it again.
                out.append(.send(to: sender, resume))
            }
            return out
        case .childExited(let worker, let pid, let status):
            let key = "\(sender)/\(worker)"
            guard var w = workers[key] else { return exitedBeforeJoining(key, node: sender, worker: worker, status: status, now: now) }
            switch w.state {
            case .alive where pid == 0 || pid == w.info.pid:
                break  // the worker the job runs with died
            case .restarting where pid != 0 && pid != w.info.pid:
                break  // its replacement died before it said hello
            default:
                return []  // an incarnation already declared dead (and killed): not news
            }
            if state == .starting { return lostWhileStarting(key) }
            w.state = .dead
            w.ready = false
            workers[key] = w
            detector.forget(key)
            if state == .failed || state == .stopped { return [] }
            return failure(what: key, kind: "worker", detectedBy: "reported by SMP \(sender): \(status)", now: now)
        case .startRefused(let worker, let reason):
            let key = "\(sender)/\(worker)"
            guard state == .starting, !takesOverRunningJob, nodes[sender]?.workers.contains(worker) == true else {
                return [.log("worker \(key) could not register: \(reason)")]
            }
            return fail("worker \(key) cannot start: \(reason)", now: now)
        case .protected(let step, let chunk):
            guard current, state == .running, nodes[sender]?.state == .alive else { return [] }
            if let c = committedStep, step <= c { return [] }
            // With erasure coding, only a round protected under the layout sent last
            // counts: one protected before any layout arrived has no parity anywhere
            // (found by a spare that could not rebuild a step committed that way), and
            // one under a replaced layout lost its parity with it. The SMP protects
            // its staged round again when the layout reaches it.
            if settings.erasure != nil, chunk == 0 || chunk != lastLayout?.chunkBytes { return [] }
            nodes[sender]?.protectedStep = step
            if roundStartedAt[step] == nil { roundStartedAt[step] = now }
            return maybeCommit(step, now: now)
        case .ready(let restored):
            guard current, state == .recovering, let r = recovery, r.phase == .restart, var w = workers[sender] else { return [] }
            guard restored == r.step else {
                return [.log("worker \(sender) restored \(restored.map(String.init) ?? "nothing"), expected \(r.step.map(String.init) ?? "nothing"); asking again")]
                    + [.send(to: sender, .restore(step: r.step, sources: sliceSources))]
            }
            w.ready = true
            w.state = .alive
            workers[sender] = w
            return maybeResume(now: now)
        case .restoreFailed(let reason):
            guard current, state == .recovering, var r = recovery, r.phase == .restart, workers[sender]?.state == .alive else { return [] }
            // Alive and answering: not hung. Ordered again, a few times; the phase's deadline bounds it.
            r.restoreFailures[sender, default: []].append(reason)
            recovery = r
            let count = r.restoreFailures[sender]!.count
            guard count <= 3 else { return [.log("worker \(sender) failed to restore \(count) times; the last: \(reason)")] }
            return [.log("worker \(sender) failed to restore (\(reason)); ordered again"),
                    .send(to: sender, .restore(step: r.step, sources: sliceSources))]
        case .rebuilt(let step, let error):
            return rebuildDone(sender, step: step, error: error, now: now)
        case .persisted(let step, let bytes, let error):
            return persisted(sender, step: step, bytes: bytes, error: error, now: now)
        case .workerDone(let final):
            guard current, state == .running else { return [] }
            workers[sender]?.state = .done
            workers[sender]?.step = final
            detector.forget(sender)
            if workers.values.allSatisfy({ $0.state == .done }) && workers.count == expectedWorkers {
                state = .stopped
                stopReason = "every worker finished (final step \(final))"
                for n in nodes.values where n.state == .alive { detector.forget(n.id) }
                return [.log("job complete: \(stopReason!)")] + broadcastToNodes(.stop(reason: stopReason!, failed: false))
            }
            return []
        default:
            return [.log("unexpected \(message) from \(sender)")]
        }
    }

    /// Checks a message against the job the coordinator runs (the decoder
    /// already bounded every value, `WireLimits`): only the job's nodes and
    /// workers may speak (an operator may only ask for status), a hello names
    /// the sender itself, its workers and ranks exist in the job, and the
    /// world size is the job's. Refused: `WireError` `not_in_job`.
    public func validate(_ message: ControlMessage, from sender: String) throws(WireError) {
        if case .statusQuery = message { return }
        guard settings.isMemberID(sender) else {
            throw WireError(.notInJob, "sender '\(sender.prefix(64))' is not a node (n0..<n\(settings.nodes)) or worker of this job")
        }
        switch message {
        case .smpHello(let inv):
            guard inv.node == sender, !sender.contains("/") else { throw WireError(.notInJob, "an SMP hello from '\(sender)' names node '\(inv.node)'") }
            guard inv.workers.count <= settings.workersPerNode, Set(inv.workers).count == inv.workers.count,
                  inv.workers.allSatisfy({ settings.isMemberID("\(sender)/\($0)") }) else {
                throw WireError(.notInJob, "SMP \(sender) names workers \(inv.workers.prefix(8)) (the job has \(settings.workersPerNode) per node)")
            }
            guard inv.rankOffset < max(1, expectedWorkers) else {
                throw WireError(.notInJob, "SMP \(sender) says rank offset \(inv.rankOffset) in a job of \(expectedWorkers) ranks")
            }
        case .workerHello(let info):
            guard info.key == sender, sender.contains("/") else { throw WireError(.notInJob, "a worker hello from '\(sender)' names '\(info.key)'") }
            guard info.worldSize == expectedWorkers, info.rank < expectedWorkers else {
                throw WireError(.notInJob, "worker \(sender) says rank \(info.rank) of \(info.worldSize); the job has \(expectedWorkers) ranks")
            }
        case .smpHeartbeat, .childExited, .startRefused, .protected, .rebuilt, .persisted:
            guard !sender.contains("/") else { throw WireError(.notInJob, "\(message.type) comes from SMPs, not from worker \(sender)") }
        case .workerHeartbeat(_, _, _, let activity, _, _):
            guard sender.contains("/") else { throw WireError(.notInJob, "\(message.type) comes from workers, not from SMP \(sender)") }
            guard activity.waitingOn < expectedWorkers else {
                throw WireError(.notInJob, "worker \(sender) waits on rank \(activity.waitingOn) of \(expectedWorkers)")
            }
        case .ready, .restoreFailed, .workerDone:
            guard sender.contains("/") else { throw WireError(.notInJob, "\(message.type) comes from workers, not from SMP \(sender)") }
        default:
            break
        }
    }

    /// Time passes: heartbeat timeouts (unless this coordinator itself
    /// stalled), the start grace, the step-progress watchdog, round timeouts,
    /// phase deadlines.
    public mutating func tick(now: Double) -> [Directive] {
        var out: [Directive] = []
        if startingSince == nil { startingSince = now }
        guard state != .stopped && state != .failed else { return out }
        let t = detector.tick(now: now)
        if let cut = t.isolatedFor {
            // Cut off from every member: nothing can commit, and no one is accused; every deadline waits.
            if cut == 0 {
                out.append(.log("every member fell silent at once: this coordinator is cut off from them (a partition of its "
                    + "host), not all dead; it declares nobody for up to \(Int(detector.isolationLimit ?? 0)) s"))
            }
            return out
        }
        if let gap = t.stalledFor ?? t.isolationEnded {
            // The observer's pause is not the observed's failure: every deadline moves by it.
            for step in roundStartedAt.keys { roundStartedAt[step]! += gap }
            if var r = recovery {
                r.phaseStartedAt += gap
                r.deadline += gap
                r.rebuildStartedAt += gap
                recovery = r
            }
            watchdog.shift(by: gap)
            if let s = startingSince { startingSince = s + gap }
            let what = t.stalledFor != nil ? "this coordinator stalled for \(Int(gap * 1000)) ms (its loop did not run)"
                : "this coordinator hears its members again after \(Int(gap * 1000)) ms cut off"
            out.append(.log(what + ": every member gets a fresh grace period; timeouts are now "
                + "\(Int(detector.effectiveTimeout * 1000)) ms (local health \(detector.localHealth))"))
        }
        // Every member found silent in this tick is marked dead before any is acted
        // upon: the recovery planned for the first must already see the others. (A
        // worker and its SMP timed out in one tick; the worker's recovery, planned
        // alone, ordered restores naming the SMP's old data endpoint, and the
        // server stamped those orders with the epoch of the SMP's failure.)
        var silent: [(id: String, kind: String, ms: Int)] = []
        for d in t.dead {
            let id = d.id
            if state == .starting {
                out += lostWhileStarting(id)
                continue
            }
            if nodes[id] != nil {
                nodes[id]?.state = .dead
                for w in nodes[id]!.workers {
                    let key = "\(id)/\(w)"
                    workers[key]?.state = .dead
                    detector.forget(key)
                }
                silent.append((id, "smp", Int(d.silentFor * 1000)))
            } else if workers[id] != nil {
                workers[id]?.state = .dead
                workers[id]?.ready = false
                silent.append((id, "worker", Int(d.silentFor * 1000)))
            }
        }
        for f in silent {
            out += failure(what: f.id, kind: f.kind, detectedBy: "heartbeat timeout (silent \(f.ms) ms)", now: now)
            if state == .failed { return out }
        }
        if state == .starting, takesOverRunningJob, let since = startingSince, now - since > settings.startGrace {
            out += maybeStart(now: now, graceOver: true)
        }
        if let round = persisting, now - round.orderedAt > settings.persistTimeout {
            for node in round.pending.sorted() { persistErrors[node] = "timeout: no answer to persist step \(round.step) within \(Int(settings.persistTimeout)) s" }
            out.append(.log("persist of step \(round.step) not answered by \(round.pending.sorted().joined(separator: ", ")) within \(Int(settings.persistTimeout)) s; commits go on"))
            out += endPersist(now: now)
        }
        if state == .running {
            out += watch(now: now)
            for (step, started) in roundStartedAt.sorted(by: { $0.key < $1.key }) where persisting == nil && now - started > settings.roundTimeout {
                roundStartedAt[step] = nil
                abortedRounds += 1
                for id in nodes.keys where nodes[id]?.protectedStep == step { nodes[id]?.protectedStep = nil }
                out.append(.log("snapshot round \(step) aborted: not every node protected it within \(settings.roundTimeout) s"))
                out += broadcastToNodes(.abort(step: step))
            }
        }
        if state == .recovering, let r = recovery, now > r.deadline { out += phaseLate(r, now: now) }
        return out
    }

    /// A recovery phase passed its deadline. The first time, its orders are
    /// sent again (one may have been lost). After that, whoever holds it up
    /// is declared failed, as for a crash: a worker that does not restore
    /// (alive, but hung or deaf: its stack is saved before its SMP kills it),
    /// a replacement SMP that does not finish its rebuild (the launcher kills
    /// and replaces it). When nobody can be blamed (no replacement SMP came),
    /// it is retried until `phaseRetries`, then the job stops.
    private mutating func phaseLate(_ r: Recovery, now: Double) -> [Directive] {
        var r = r
        let late: [String]
        let blame: [String]
        if r.phase == .rebuild {
            let unfinished = r.rebuildNodes.filter { !r.rebuilt.contains($0) }
            late = unfinished.map { "the rebuild of \($0)" + (nodes[$0]?.state == .alive ? "" : " (no replacement SMP yet)") }
            blame = unfinished.filter { nodes[$0]?.state == .alive }
        } else {
            let notReady = expectedWorkerKeys.filter { workers[$0]?.ready != true }
            late = notReady.map { key in
                workers[key] == nil ? "\(key) (never said hello)"
                    : r.restoreFailures[key].map { "\(key) (its restore failed: \($0.last!))" } ?? key
            }
            blame = notReady.filter { workers[$0]?.state == .alive && r.restoreFailures[$0] == nil }
            // Those that are gone (or never came) on a live node: their SMP starts them (again).
            for key in notReady where workers[key]?.state != .alive {
                let parts = key.split(separator: "/").map(String.init)
                guard nodes[parts[0]]?.state == .alive, r.restartWorkers[parts[0]]?.contains(parts[1]) != true else { continue }
                r.restartWorkers[parts[0], default: []].append(parts[1])
            }
        }
        let what = late.isEmpty ? "nothing (a bug: nothing left to wait for)" : late.joined(separator: ", ")
        r.retries += 1
        if r.retries == 1 || (blame.isEmpty && r.retries <= settings.phaseRetries) {
            r.phaseStartedAt = now
            r.deadline = phaseDeadline(r.phase, r, now: now)
            recovery = r
            return [.log("recovery phase \(r.phase.rawValue) passed its deadline waiting for \(what); retry \(r.retries)")]
                + (r.phase == .rebuild ? rebuildDirectives(now: now) : restartDirectives(r))
        }
        guard !blame.isEmpty else {
            return fail("recovery phase \(r.phase.rawValue) passed its deadline \(r.retries) times waiting for \(what)", now: now)
        }
        recovery = r
        let by = "recovery phase \(r.phase.rawValue) passed its deadline twice waiting for it"
        if r.phase == .rebuild {
            for id in blame {
                nodes[id]?.state = .dead
                detector.forget(id)
                for w in nodes[id]?.workers ?? [] { workers["\(id)/\(w)"]?.state = .dead }
            }
            return failure(what: blame.joined(separator: ", "), kind: "smp", detectedBy: by, now: now)
        }
        for key in blame {
            workers[key]?.state = .dead
            workers[key]?.ready = false
            detector.forget(key)
        }
        return failure(what: blame.joined(separator: ", "), kind: "worker", detectedBy: by + " (alive but not restoring: hung)",
                       now: now, hung: Set(blame))
    }

    /// Every worker key the job expects ("n0/w0", …), in order.
    var expectedWorkerKeys: [String] {
        settings.nodeIDs.flatMap { n in settings.workerIDs.map { "\(n)/\($0)" } }
    }

    // MARK: watchdog

    /// The step-progress watchdog, while every worker trains: a job whose
    /// steps stopped completing for longer than the learned bound is hung,
    /// and the rank holding it up fails (its stack saved before it is killed).
    private mutating func watch(now: Double) -> [Directive] {
        let alive = workers.values.filter { $0.state == .alive }
        guard alive.count == expectedWorkers, alive.allSatisfy(\.running) else { return [] }
        watchdog.observe(jobStep: alive.map(\.step).min()!, now: now)
        guard let overdue = watchdog.overdue(now: now) else {
            watchdogNoted = false
            return []
        }
        let ranks = alive.sorted { $0.info.rank < $1.info.rank }
            .map { ProgressWatchdog.Rank(key: $0.info.key, rank: $0.info.rank, step: $0.step, activity: $0.activity) }
        let stalled = "no step completed for \(Int(overdue * 1000)) ms (bound \(Int(watchdog.bound * 1000)) ms"
            + (watchdog.p99.map { ", step p99 \(Int($0 * 1000)) ms" } ?? "") + ")"
        switch ProgressWatchdog.culprit(ranks) {
        case .culprit(let key, let reason):
            workers[key]?.state = .dead
            workers[key]?.ready = false
            detector.forget(key)
            var out = failure(what: key, kind: "worker", detectedBy: "step-progress watchdog: \(stalled); \(reason)", now: now, hung: [key])
            out.insert(.log("hung: \(key) holds the job up (\(reason)); saving its stack, then killing it"), at: 0)
            return out
        case .notAWorker(let reason):
            guard !watchdogNoted else { return [] }
            watchdogNoted = true
            return [.log("steps stalled: \(stalled), but not in a worker: \(reason)")]
        case nil:
            return []
        }
    }

    // MARK: hellos

    private mutating func smpHello(_ inv: ControlMessage.SMPInventory, sender: String, senderEpoch: UInt64, now: Double) -> [Directive] {
        guard inv.node == sender else { return [.log("SMP \(sender) said hello as \(inv.node); ignored")] }
        if let r = recovery, r.phase == .rebuild, r.rebuildNodes.contains(sender), let lostPID = r.lostPIDs[sender],
           inv.pid != lostPID, nodes[sender]?.state != .alive || nodes[sender]?.pid == inv.pid {
            // The replacement of a lost node: a new process under its id.
            var node = nodes[sender]!
            node.state = .alive
            node.pid = inv.pid
            node.dataEndpoint = inv.dataEndpoint
            node.committedStep = nil
            node.stagedStep = nil
            node.protectedStep = nil
            node.admittedEpoch = epoch
            nodes[sender] = node
            detector.heard(sender, now: now)
            return [.send(to: sender, .welcome(state: state.rawValue)), .log("replacement SMP for \(sender) (pid \(inv.pid), data plane \(inv.dataEndpoint))")]
                + rebuildDirectives(now: now)
        }
        if state != .starting, let known = nodes[sender], known.state == .alive, known.pid != inv.pid, senderEpoch > 0 {
            // Another process under a live node's id that was welcomed before
            // (it knows an epoch): an old incarnation come back, never a replacement.
            fencedMessages += 1
            return [.send(to: sender, .fenced(reason: "\(sender) is pid \(known.pid); pid \(inv.pid) was replaced"))]
        }
        if state != .starting, let known = nodes[sender], known.state == .alive, known.pid != inv.pid, inv.pid > 0 {
            // The node's SMP was restarted (by the launcher) before its silence
            // was noticed: the old process and its memory are gone.
            nodes[sender]?.state = .dead
            for w in known.workers {
                let key = "\(sender)/\(w)"
                if workers[key]?.state == .alive || workers[key]?.state == .restarting { workers[key]?.state = .dead }
                detector.forget(key)
            }
            detector.forget(sender)
            var out = failure(what: sender, kind: "smp", detectedBy: "restarted as pid \(inv.pid) (was \(known.pid))", now: now)
            if state == .recovering { out += smpHello(inv, sender: sender, senderEpoch: senderEpoch, now: now) }
            return out
        }
        if nodes[sender]?.pid != inv.pid || nodes[sender]?.state != .alive,
           let fence = fenceIfDead(sender, senderEpoch: senderEpoch) { return fence }
        if state == .stopped || state == .failed {
            return [.send(to: sender, .stop(reason: stopReason ?? "job over", failed: state == .failed))]
        }
        if nodes[sender] == nil && nodes.count >= settings.nodes {
            return [.send(to: sender, .fenced(reason: "the job already has its \(settings.nodes) nodes"))]
        }
        var node = nodes[sender] ?? Node(id: sender, pid: inv.pid, dataEndpoint: inv.dataEndpoint, workers: inv.workers,
                                         rankOffset: inv.rankOffset)
        node.pid = inv.pid
        node.dataEndpoint = inv.dataEndpoint
        node.workers = inv.workers
        node.rankOffset = inv.rankOffset
        node.committedStep = inv.committedStep
        node.stagedStep = inv.stagedStep
        node.helloProtectedStep = inv.protectedStep
        node.helloLayoutChunkBytes = inv.layoutChunkBytes
        nodes[sender] = node
        detector.heard(sender, now: now)
        if state == .starting {
            epoch = max(epoch, senderEpoch)
            // Epoch 1 is the first start's: a member that knows a later one saw the job run.
            if senderEpoch > 1 || !inv.isEmpty { takesOverRunningJob = true }
            if inv.layoutChunkBytes > 0, let ec = settings.erasure, (lastLayout?.chunkBytes ?? 0) < inv.layoutChunkBytes,
               let groups = try? ECLayout.groups(of: settings.nodeIDs, k: ec.k, m: ec.m) {
                // The layout the SMPs hold data and parity in, for rebuilds before sizes are known again.
                lastLayout = ECLayout(k: ec.k, m: ec.m, chunkBytes: inv.layoutChunkBytes, groups: groups, endpoints: [:])
            }
        }
        return [.send(to: sender, .welcome(state: state.rawValue))] + maybeStart(now: now)
    }

    private mutating func workerHello(_ info: ControlMessage.WorkerInfo, sender: String, senderEpoch: UInt64, now: Double) -> [Directive] {
        guard info.key == sender else { return [.log("worker \(sender) said hello as \(info.key); ignored")] }
        if state == .stopped || state == .failed {
            return [.send(to: sender, .stop(reason: stopReason ?? "job over", failed: state == .failed))]
        }
        guard let node = nodes[info.node], node.state == .alive else {
            if nodes[info.node] == nil { return [.send(to: sender, .helloRequired)] }
            // The lost node's own worker comes back: fenced. A new process is the worker of
            // its replacement SMP, whose hello is not in yet: no answer; its hello is repeated.
            if workers[sender] == nil || workers[sender]?.info.pid == info.pid {
                return [.send(to: sender, .fenced(reason: "node \(info.node) was declared dead"))]
            }
            return []
        }
        if let existing = workers[sender], existing.state == .alive || existing.state == .done,
           existing.info.pid != info.pid, state != .starting {
            // A second process with a live worker's name: the old one is the worker.
            return [.send(to: sender, .fenced(reason: "worker \(sender) is already running as pid \(existing.info.pid)"))]
        }
        var w = workers[sender] ?? Worker(info: info)
        if workers[sender] != nil && w.info.pid != info.pid { w.admittedEpoch = epoch }
        w.info = info
        w.ready = false
        w.running = false
        w.activity = .idle
        if w.state != .done || state == .starting { w.state = .alive }
        workers[sender] = w
        detector.heard(sender, now: now)
        if state == .starting {
            epoch = max(epoch, senderEpoch)
            if senderEpoch > 1 { takesOverRunningJob = true }
        }
        var out: [Directive] = [.send(to: sender, .welcome(state: state.rawValue))]
        if state == .recovering, let r = recovery, r.phase == .restart {
            out.append(.send(to: sender, .restore(step: r.step, sources: sliceSources)))
        }
        return out + maybeStart(now: now)
    }

    /// A node or worker declared dead is fenced, and so is an old-epoch
    /// message from a worker being replaced (the replacement says hello anew).
    private mutating func fenceIfDead(_ sender: String, senderEpoch: UInt64) -> [Directive]? {
        let dead: Bool
        if let n = nodes[sender], n.state == .alive, senderEpoch < n.admittedEpoch {
            // A replaced process still talking under the id of its replacement.
            fencedMessages += 1
            return [.send(to: sender, .fenced(reason: "\(sender) was replaced in epoch \(n.admittedEpoch)"))]
        }
        if let w = workers[sender], w.state == .alive, senderEpoch < w.admittedEpoch {
            fencedMessages += 1
            return [.send(to: sender, .fenced(reason: "\(sender) was replaced in epoch \(w.admittedEpoch)"))]
        }
        if let n = nodes[sender] {
            dead = n.state == .dead || n.state == .fenced
            if dead { nodes[sender]?.state = .fenced }
        } else if let w = workers[sender] {
            dead = w.state == .fenced
                || (w.state == .dead && !(recovery?.restartWorkers[w.info.node]?.contains(w.info.worker) ?? false))
                || ((w.state == .dead || w.state == .restarting) && senderEpoch < epoch)
            if dead { workers[sender]?.state = .fenced }
        } else {
            dead = false
        }
        guard dead else { return nil }
        fencedMessages += 1
        return [.send(to: sender, .fenced(reason: "\(sender) was declared dead; the job is in epoch \(epoch)"))]
    }

    // MARK: start

    /// A member that said hello died before the job (re)started: no recovery
    /// yet (nothing is planned before the view is complete). A node is
    /// forgotten, so that it counts as missing; a worker is forgotten and
    /// its SMP told to end that process if it still runs and start it again.
    /// A worker the coordinator does not know exited (it had not said hello).
    /// While the job starts, nothing else would start it again: its SMP does,
    /// on this order, until `maxStartExits` exits say it never will join (a
    /// bad command, a crash at start-up) and the job stops with its status.
    private mutating func exitedBeforeJoining(_ key: String, node: String, worker: String, status: String, now: Double) -> [Directive] {
        guard state == .starting, nodes[node] != nil, nodes[node]!.workers.contains(worker), settings.isMemberID(key) else { return [] }
        startExits[key, default: 0] += 1
        let exits = startExits[key]!
        if exits >= Self.maxStartExits {
            return fail("worker \(key) exited \(exits) times before it joined the job (last: \(status)); see its log", now: now)
        }
        return [.log("worker \(key) exited before it joined the job (\(status)); starting it again (\(exits) of \(Self.maxStartExits))"),
                .send(to: node, .restartWorkers([.init(worker: worker, pid: 0)]))]
    }

    private mutating func lostWhileStarting(_ id: String) -> [Directive] {
        detector.forget(id)
        if let n = nodes.removeValue(forKey: id) {
            for w in n.workers { workers["\(id)/\(w)"] = nil; detector.forget("\(id)/\(w)") }
            return [.log("SMP \(id) (pid \(n.pid)) went silent before the job started; it counts as missing")]
        }
        guard let w = workers.removeValue(forKey: id) else { return [] }
        return [.log("worker \(id) (pid \(w.info.pid)) was lost before the job started; its SMP starts it again"),
                .send(to: w.info.node, .restartWorkers([.init(worker: w.info.worker, pid: w.info.pid)]))]
    }

    /// Once every expected SMP and worker is here, restore and resume through
    /// the recovery path: a fresh job restores nothing; a job whose
    /// coordinator restarted restores its committed step. A restarted
    /// coordinator does not wait forever for a node that will never say
    /// hello: after `startGrace` (`graceOver`) the missing nodes are lost, as
    /// are nodes that hold nothing while others hold a committed step (a
    /// replacement that was not rebuilt yet), and recovery plans around them.
    private mutating func maybeStart(now: Double, graceOver: Bool = false) -> [Directive] {
        guard state == .starting else { return [] }
        let allHere = nodes.count == settings.nodes && workers.count == expectedWorkers && workers.values.allSatisfy({ $0.state == .alive })
        guard allHere || (graceOver && takesOverRunningJob) else { return [] }
        var out: [Directive] = []
        var committed = nodes.values.compactMap(\.committedStep).max()
        // A round every node reported protected is committable, whether or not the
        // old coordinator got to broadcast its commit: commit it (fewer steps lost).
        // (With erasure coding, under one layout: each hello's protected step is the one
        // its SMP protected under the layout it holds.)
        let oneLayout = settings.erasure == nil
            || nodes.values.allSatisfy({ $0.helloLayoutChunkBytes > 0 && $0.helloLayoutChunkBytes == nodes.values.first?.helloLayoutChunkBytes })
        if nodes.count == settings.nodes, oneLayout, let p = nodes.values.first?.helloProtectedStep, p > (committed ?? -1),
           nodes.values.allSatisfy({ $0.helloProtectedStep == p && $0.stagedStep == p }) {
            out.append(.log("every node protected step \(p): committing it"))
            out += broadcastToNodes(.commit(step: p))
            for id in nodes.keys { nodes[id]?.committedStep = p; nodes[id]?.stagedStep = nil; nodes[id]?.helloProtectedStep = nil }
            committed = p
        }
        // Nodes that hold nothing while a step is committed lost their memory (replacements not rebuilt yet).
        let empty = committed == nil ? [] : nodes.values.filter { $0.committedStep == nil && $0.stagedStep == nil }.map(\.id)
        if let s = committed {
            // A commit the old coordinator broadcast may have reached some SMPs only;
            // every node holds `s` committed or staged (it reported protected(s)).
            for n in nodes.values.sorted(by: { $0.id < $1.id }) where n.committedStep != s && !empty.contains(n.id) {
                guard n.stagedStep == s else {
                    return fail("node \(n.id) holds neither committed nor staged step \(s) (it has \(n.committedStep.map(String.init) ?? "none")); "
                        + "cannot rebuild a consistent state", now: now)
                }
                out.append(.send(to: n.id, .commit(step: s)))
                nodes[n.id]?.committedStep = s
            }
        }
        committedStep = committed
        committedAt = committed == nil ? nil : now
        let missing = settings.nodeIDs.filter { nodes[$0] == nil }
        for (i, id) in settings.nodeIDs.enumerated() where nodes[id] == nil {
            // Never heard from: lost, for the launcher to replace (status shows it dead).
            nodes[id] = Node(id: id, pid: 0, dataEndpoint: "", workers: settings.workerIDs, rankOffset: i * settings.workersPerNode, state: .dead)
            // Its workers (if any said hello) went with it: the replacement's are new processes.
            for w in settings.workerIDs where workers["\(id)/\(w)"] != nil {
                workers["\(id)/\(w)"]?.state = .dead
                detector.forget("\(id)/\(w)")
            }
        }
        let rebuilding = takesOverRunningJob || committed != nil || workers.values.contains { $0.step > 0 }
        epoch += 1
        state = .recovering
        guard rebuilding else {
            recovery = Recovery(step: nil, phase: .restart, phaseStartedAt: now, deadline: 0, restartWorkers: [:])
            recovery!.deadline = phaseDeadline(.restart, recovery!, now: now)
            out.append(.log("all \(settings.nodes) nodes and \(expectedWorkers) workers are here; starting in epoch \(epoch)"))
            // The layout before the first round, when every node's size is in: rounds
            // count only once protected under it.
            out += layoutDirectives()
            return out + broadcastToNodes(.restore(step: nil, sources: [])) + broadcastToWorkers(.restore(step: nil, sources: sliceSources))
        }
        // Workers of surviving nodes that never said hello (or are dead) are restarted by their SMP.
        var lostWorkers: [String: [String]] = [:]
        for n in nodes.values where n.state == .alive && !empty.contains(n.id) {
            for w in settings.workerIDs where workers["\(n.id)/\(w)"]?.state != .alive {
                lostWorkers[n.id, default: []].append(w)
                if workers["\(n.id)/\(w)"] != nil { workers["\(n.id)/\(w)"]?.state = .dead }
            }
        }
        let lost = (missing + empty).sorted()
        var detail = "view rebuilt from \(nodes.count - missing.count) SMP reports"
        if !missing.isEmpty { detail += "; never heard from \(missing.joined(separator: ", "))" }
        if !empty.isEmpty { detail += "; \(empty.sorted().joined(separator: ", ")) hold\(empty.count == 1 ? "s" : "") no snapshot" }
        lastFailure = FailureReport(what: "coordinator", kind: "coordinator", detectedBy: "restarted; \(detail)", detectedAt: now, epoch: epoch)
        lastFailure!.stepsReached = workersFurthestStep
        failureCount += 1
        lastFailure!.phases = [PhaseRecord(phase: .detect, seconds: 0, reason: "coordinator restart")]
        out.append(.log("\(detail): epoch \(epoch), committed \(committed.map(String.init) ?? "none")"
            + (lost.isEmpty ? "" : "; lost \(lost.joined(separator: ", "))")))
        out += broadcastToNodes(.pause(reason: "coordinator restarted"))
        out += broadcastToWorkers(.pause(reason: "coordinator restarted"))
        return out + plan(lostNodes: Set(lost), lostWorkers: lostWorkers, alivePlaceholders: Set(empty), hung: [], now: now)
    }

    // MARK: commit

    private mutating func maybeCommit(_ step: Int, now: Double) -> [Directive] {
        guard nodes.values.allSatisfy({ $0.state == .alive && $0.protectedStep == step }) else { return [] }
        // A persist reads the committed step's slots and parity: the next commit,
        // after which workers overwrite them, waits for it (workers skip snapshots meanwhile).
        guard persisting == nil else { return [] }
        return commit(step, now: now) + maybePersist(now: now)
    }

    // MARK: persistence

    /// Orders every node to persist the committed step when one is due.
    private mutating func maybePersist(now: Double) -> [Directive] {
        guard settings.persistEnabled, state == .running, persisting == nil, let step = committedStep,
              nodes.count == settings.nodes, nodes.values.allSatisfy({ $0.state == .alive }) else { return [] }
        if let last = lastPersistOrder {
            guard step > last.step else { return [] }
            let byRounds = settings.persistEvery.map { step - last.step >= $0 } ?? false
            let bySeconds = settings.persistSeconds.map { now - last.at >= $0 } ?? false
            guard byRounds || bySeconds else { return [] }
        }
        lastPersistOrder = (step, now)
        persisting = PersistRound(step: step, orderedAt: now, pending: Set(nodes.keys))
        return [.log("persisting step \(step) on every node")] + broadcastToNodes(.persist(step: step, nodes: settings.nodeIDs, durable: durableStep))
    }

    /// A node's answer to `persist`. Counted whatever the epoch: it says what
    /// is on disk, which no later event changes.
    private mutating func persisted(_ node: String, step: Int, bytes: Int, error: String, now: Double) -> [Directive] {
        var out: [Directive] = []
        if error.isEmpty {
            persistedBy[step, default: []].insert(node)
            persistErrors[node] = nil
        } else {
            persistErrors[node] = error
            out.append(.log("node \(node) could not persist step \(step): \(error); training goes on in memory"))
        }
        if !durableSteps.contains(step), isDurable(step) {
            durableSteps = Array((durableSteps + [step]).sorted().suffix(8))
        }
        if durableStep.map({ step > $0 }) ?? true, isDurable(step) {
            durableStep = step
            out.append(.log("step \(step) is durable on disk (\(persistedBy[step]!.sorted().joined(separator: ", ")))"))
            persistedBy = persistedBy.filter { $0.key >= step }
        }
        guard var round = persisting, round.step == step else { return out }
        round.pending.remove(node)
        persisting = round
        if round.pending.isEmpty { out += endPersist(now: now) }
        return out
    }

    /// Every node of the job wrote its part of `step`, or, with erasure coding, at least `k` of every group.
    private func isDurable(_ step: Int) -> Bool {
        let have = persistedBy[step] ?? []
        guard let ec = settings.erasure, let groups = try? ECLayout.groups(of: settings.nodeIDs, k: ec.k, m: ec.m) else {
            return settings.nodeIDs.allSatisfy(have.contains)
        }
        return groups.allSatisfy { $0.filter(have.contains).count >= ec.k }
    }

    /// The persist in progress is over (every live node answered, or its time
    /// ran out): the round waiting for it may commit.
    private mutating func endPersist(now: Double) -> [Directive] {
        guard let round = persisting else { return [] }
        persisting = nil
        lastPersistSeconds = now - round.orderedAt
        let ok = persistedBy[round.step] ?? []
        if settings.nodeIDs.allSatisfy(ok.contains) { persistedStep = max(persistedStep ?? -1, round.step) }
        // Rounds that waited were not late.
        for step in roundStartedAt.keys { roundStartedAt[step] = now }
        if let step = nodes.values.first?.protectedStep, state == .running { return maybeCommit(step, now: now) }
        return []
    }

    private mutating func commit(_ step: Int, now: Double) -> [Directive] {
        // (Never negative: an isolation or a stall shifts round start times forward.)
        lastCommitLatency = roundStartedAt[step].map { max(0, now - $0) }
        committedStep = step
        committedAt = now
        roundStartedAt = roundStartedAt.filter { $0.key > step }
        for id in nodes.keys {
            nodes[id]?.committedStep = step
            nodes[id]?.protectedStep = nil
        }
        return broadcastToNodes(.commit(step: step))
    }

    /// Node losses that stop a running job in the middle of a round: when every
    /// surviving node reported `protected(s)` for the round in flight and no
    /// group lost more nodes than its parity covers, `s` is committed before
    /// the recovery is planned. A survivor's `protected(s)` means its own
    /// chunks of `s` were acked by every holder (the lost ones included) and
    /// its parity of every row it holds is complete, lost nodes' frames folded
    /// in; so every row of `s` still has at least `k` complete pieces, and the
    /// lost nodes' images of `s` decode from them. Survivors' workers, whose
    /// live state is `s`, then keep it instead of restoring the step before.
    /// Since `protected(s)` waits for every holder's ack, the lost ones
    /// included, this fires only when the lost nodes had finished their own
    /// part of the round (rare after a crash; the simulations reach it).
    private mutating func commitAtFailure(now: Double) -> [Directive] {
        guard state == .running, persisting == nil, let ec = settings.erasure,
              let groups = try? ECLayout.groups(of: settings.nodeIDs, k: ec.k, m: ec.m) else { return [] }
        let lost = Set(nodes.values.filter { $0.state == .dead || $0.state == .fenced }.map(\.id))
        let alive = nodes.values.filter { $0.state == .alive }
        guard !lost.isEmpty, let s = alive.first?.protectedStep, s > (committedStep ?? -1),
              alive.count + lost.count == settings.nodes, alive.allSatisfy({ $0.protectedStep == s }),
              groups.allSatisfy({ $0.filter(lost.contains).count <= ec.m }) else { return [] }
        return [.log("round \(s) was protected by every surviving node: committed at the failure (\(lost.sorted().joined(separator: ", "))'s part decodes from parity)")]
            + commit(s, now: now)
    }

    // MARK: recovery

    /// A member failed: a new epoch, everyone paused, a new plan. `hung`:
    /// workers whose stack is saved before their SMP kills them.
    private mutating func failure(what: String, kind: String, detectedBy: String, now: Double, hung: Set<String> = []) -> [Directive] {
        if state == .stopped || state == .failed { return [] }
        if let start = burstStartedAt, now - start <= settings.heartbeatTimeout, state == .recovering {
            // Part of the same event (a node's workers, every worker at once): not another one in a row.
        } else {
            failuresWithoutResume += 1
            burstStartedAt = now
        }
        if failuresWithoutResume > settings.maxFailuresWithoutResume {
            return fail("\(failuresWithoutResume) failures in a row without resuming (the last: \(kind) \(what), \(detectedBy)); "
                + "stopping instead of looping", now: now)
        }
        let committedAtFailure = commitAtFailure(now: now)
        epoch += 1
        let previous = state
        state = .recovering
        watchdog.pause()
        roundStartedAt.removeAll()
        for id in nodes.keys { nodes[id]?.protectedStep = nil }
        for id in workers.keys { workers[id]?.ready = false }
        var reached = workersFurthestStep
        if var superseded = lastFailure, superseded.outcome == "in progress" {
            superseded.outcome = "superseded by \(kind) \(what)"
            reached = max(reached, superseded.stepsReached)
            record(superseded)
        }
        lastFailure = FailureReport(what: what, kind: kind, detectedBy: detectedBy, detectedAt: now, epoch: epoch)
        lastFailure!.stepsReached = reached
        failureCount += 1
        lastFailure!.phases.append(PhaseRecord(phase: .detect, seconds: 0, reason: detectedBy))
        var out: [Directive] = [.log("\(kind) \(what) failed (\(detectedBy)); epoch \(epoch); pausing the job"
            + (previous == .recovering ? " (during recovery)" : ""))] + committedAtFailure
        out += broadcastToNodes(.pause(reason: "\(kind) \(what) failed"))
        out += broadcastToWorkers(.pause(reason: "\(kind) \(what) failed"))

        var lostNodes = Set(nodes.values.filter { $0.state == .dead || $0.state == .fenced }.map(\.id))
        if var round = persisting {
            // A lost node's SMP will not answer the persist in progress.
            round.pending.subtract(lostNodes)
            persisting = round
            if round.pending.isEmpty {
                persisting = nil
                lastPersistSeconds = now - round.orderedAt
            }
        }
        // A replacement that has not finished rebuilding holds nothing yet: still lost.
        if let old = recovery, old.phase == .rebuild { lostNodes.formUnion(Set(old.rebuildNodes).subtracting(old.rebuilt)) }
        var lostWorkers: [String: [String]] = [:]
        for w in workers.values where (w.state == .dead || w.state == .restarting) && !lostNodes.contains(w.info.node) {
            lostWorkers[w.info.node, default: []].append(w.info.worker)
        }
        return out + plan(lostNodes: lostNodes, lostWorkers: lostWorkers, alivePlaceholders: [], hung: hung, now: now)
    }

    /// Plans the recovery from what is lost and starts its first phase.
    /// `alivePlaceholders`: lost nodes whose (replacement) SMP is already here.
    private mutating func plan(lostNodes: Set<String>, lostWorkers: [String: [String]], alivePlaceholders: Set<String>,
                               hung: Set<String>, now: Double) -> [Directive] {
        let groups = settings.erasure.flatMap { try? ECLayout.groups(of: settings.nodeIDs, k: $0.k, m: $0.m) } ?? []
        let plan = RecoveryPlanner.plan(.init(nodes: settings.nodeIDs, lostNodes: lostNodes, lostWorkers: lostWorkers,
                                              committedStep: committedStep, ecGroups: groups, parityPerGroup: settings.erasure?.m ?? 0,
                                              durableStep: settings.persistEnabled ? durableStep : nil))
        switch plan {
        case .restoreFromDisk(let step, let reason):
            lastFailure?.phases.append(PhaseRecord(phase: .plan, seconds: 0, reason: reason))
            // Every node goes back to `step`: what memory holds past it is void.
            committedStep = step
            roundStartedAt.removeAll()
            persisting = nil
            for id in nodes.keys {
                nodes[id]?.committedStep = step
                nodes[id]?.stagedStep = nil
                nodes[id]?.protectedStep = nil
            }
            // Every worker is restarted by its SMP around the load (none may write a slot meanwhile).
            var all: [String: [String]] = [:]
            for w in workers.values {
                all[w.info.node, default: []].append(w.info.worker)
                if w.state == .alive || w.state == .dead { workers[w.info.key]?.state = .restarting }
                workers[w.info.key]?.ready = false
                detector.forget(w.info.key)
            }
            var r = Recovery(step: step, phase: .rebuild, phaseStartedAt: now, deadline: 0, restartWorkers: all.mapValues { $0.sorted() },
                             rebuildNodes: settings.nodeIDs)
            r.fromDisk = true
            r.saveStacks = (recovery?.saveStacks ?? []).union(hung)
            r.rebuildStartedAt = now
            for id in settings.nodeIDs where lostNodes.contains(id) { r.lostPIDs[id] = alivePlaceholders.contains(id) ? 0 : nodes[id]?.pid ?? 0 }
            r.rebuildBytes = settings.nodeIDs.reduce(0) { $0 + bytesHeld(by: $1) }
            r.deadline = phaseDeadline(.rebuild, r, now: now)
            recovery = r
            return [.log("memory cannot recover (\(reason)); every node loads step \(step) from disk")] + rebuildDirectives(now: now)
        case .unrecoverable(let reason):
            lastFailure?.phases.append(PhaseRecord(phase: .plan, seconds: 0, reason: reason))
            return fail(reason, now: now)
        case .restore(let step, let restarts, let rebuildNodes, let reason):
            lastFailure?.phases.append(PhaseRecord(phase: .plan, seconds: 0, reason: reason))
            var r = Recovery(step: step, phase: rebuildNodes.isEmpty ? .restart : .rebuild, phaseStartedAt: now, deadline: 0,
                             restartWorkers: restarts, rebuildNodes: rebuildNodes)
            for (node, ids) in restarts { for id in ids { workers["\(node)/\(id)"]?.state = .restarting } }
            r.saveStacks = (recovery?.saveStacks ?? []).union(hung)
            if rebuildNodes.isEmpty {
                lastFailure?.phases.append(PhaseRecord(phase: .rebuild, seconds: 0, reason: "nothing to rebuild: snapshot memory intact on every node"))
                r.deadline = phaseDeadline(.restart, r, now: now)
                recovery = r
                return restartDirectives(r)
            }
            // Wait for a replacement SMP of each lost node (the same node restarted
            // empty, or a spare under its id), then have it rebuild from its group.
            r.rebuildStartedAt = now
            for id in rebuildNodes { r.lostPIDs[id] = alivePlaceholders.contains(id) ? 0 : nodes[id]?.pid ?? 0 }
            // Replacements that already said hello keep their place in the rebuild.
            if let old = recovery, old.phase == .rebuild {
                r.lostPIDs.merge(old.lostPIDs) { _, original in original }
                r.rebuilt = old.rebuilt.intersection(rebuildNodes)
            }
            r.rebuildBytes = rebuildNodes.reduce(0) { $0 + bytesHeld(by: $1) }
            r.deadline = phaseDeadline(.rebuild, r, now: now)
            recovery = r
            return [.log("waiting for replacement SMPs of \(rebuildNodes.joined(separator: ", ")) to rebuild from parity")]
                + rebuildDirectives(now: now)
        }
    }

    /// Bytes a node holds (its image and parity), as its heartbeats said, or
    /// from the layout when it never said (a restarted coordinator).
    private func bytesHeld(by node: String) -> Int {
        let n = nodes[node]
        let known = (n?.dataBytes ?? 0) + (n?.parityBytes ?? 0)
        if known > 0 { return known }
        return lastLayout.map { $0.chunkBytes * ($0.k + $0.m) } ?? 0
    }

    /// The rate assumed for bulk recovery work: the median measured one, or the configured one.
    var recoveryRate: Double {
        guard !measuredRates.isEmpty else { return settings.recoveryBytesPerSecond }
        return measuredRates.sorted()[measuredRates.count / 2]
    }

    /// When a phase that starts `now` is late: the floor plus three times
    /// its bytes at the recovery rate (a rebuild: the lost nodes' bytes; a
    /// restart: every node's image, an upper bound on what a worker pulls).
    func phaseDeadline(_ phase: Phase, _ r: Recovery, now: Double) -> Double {
        let bytes: Int
        switch phase {
        case .rebuild: bytes = r.rebuildBytes
        case .restart: bytes = nodes.values.reduce(0) { $0 + $1.dataBytes }
        default: bytes = 0
        }
        return now + settings.phaseTimeout + 3 * Double(bytes) / recoveryRate
    }

    /// Rebuild orders for replacements that are here and not yet rebuilt.
    private mutating func rebuildDirectives(now: Double) -> [Directive] {
        guard let r = recovery, r.phase == .rebuild else { return [] }
        var out = layoutDirectives(force: true)
        for id in r.rebuildNodes where nodes[id]?.state == .alive && !r.rebuilt.contains(id) {
            if r.fromDisk, let step = r.step {
                out.append(.send(to: id, .loadPersisted(step: step)))
            } else {
                out.append(.send(to: id, .rebuild(step: r.step, lost: r.rebuildNodes)))
            }
        }
        return out
    }

    private mutating func rebuildDone(_ node: String, step: Int?, error: String, now: Double) -> [Directive] {
        guard state == .recovering, var r = recovery, r.phase == .rebuild, r.rebuildNodes.contains(node), step == r.step else { return [] }
        if r.fromDisk, !error.isEmpty, let failed = r.step {
            // The step cannot be loaded (damaged beyond what its parity decodes): never
            // a partial load; every node goes back to the durable step before it, if any.
            durableSteps.removeAll { $0 >= failed }
            durableStep = durableSteps.last
            if let older = durableStep {
                r.step = older
                r.rebuilt = []
                recovery = r
                committedStep = older
                for id in nodes.keys { nodes[id]?.committedStep = older }
                lastFailure?.phases.append(PhaseRecord(phase: .plan, seconds: 0,
                                                       reason: "step \(failed) cannot be loaded on \(node) (\(error)); every node loads durable step \(older)"))
                return [.log("node \(node) cannot load step \(failed) from disk (\(error)); every node loads durable step \(older) instead")]
                    + rebuildDirectives(now: now)
            }
            return fail("node \(node) cannot load step \(failed) from disk (\(error)) and no older durable step is known", now: now)
        }
        guard error.isEmpty else {
            // A source may have died (the failure detector will say so, and the plan
            // will change) or been slow: order the rebuild again a little later.
            r.rebuildFailures += 1
            if r.rebuildFailures > settings.phaseRetries {
                return fail("rebuild of node \(node) failed \(r.rebuildFailures) times; the last: \(error)", now: now)
            }
            r.retries = 0
            r.deadline = now + 2 * settings.heartbeatTimeout
            recovery = r
            return [.log("rebuild of node \(node) failed (\(error)); ordered again in \(Int(2000 * settings.heartbeatTimeout)) ms "
                + "unless a source is declared lost meanwhile")]
        }
        r.rebuilt.insert(node)
        recovery = r
        guard r.rebuilt.count == r.rebuildNodes.count else { return [.log("node \(node) rebuilt")] }
        let seconds = now - r.rebuildStartedAt
        noteRate(bytes: r.rebuildBytes, seconds: seconds)
        lastFailure?.phases.append(PhaseRecord(phase: .rebuild, seconds: seconds,
                                               reason: r.fromDisk ? "every node loaded step \(r.step ?? -1) from disk"
                                                   : "rebuilt \(r.rebuildNodes.joined(separator: ", ")) from parity"))
        r.phase = .restart
        r.phaseStartedAt = now
        r.retries = 0
        r.deadline = phaseDeadline(.restart, r, now: now)
        recovery = r
        return [.log("rebuilt \(r.rebuildNodes.joined(separator: ", ")); restoring")] + restartDirectives(r)
    }

    /// Records the rate of a phase that moved `bytes` in `seconds`; small
    /// phases say more about latency than about bandwidth and are not kept.
    private mutating func noteRate(bytes: Int, seconds: Double) {
        guard bytes >= 64 << 20, seconds > 0 else { return }
        measuredRates.append(Double(bytes) / seconds)
        if measuredRates.count > 8 { measuredRates.removeFirst() }
    }

    /// The EC layout, sent when it is known or changed (or when forced).
    private mutating func layoutDirectives(force: Bool = false) -> [Directive] {
        guard let ec = settings.erasure, let groups = try? ECLayout.groups(of: settings.nodeIDs, k: ec.k, m: ec.m) else { return [] }
        // Every node's size, a dead one's too: cut without a node that died before it
        // said its size, the chunk would grow when its replacement says it, and a new
        // chunk size drops every node's parity, the committed step's included.
        guard nodes.count == settings.nodes, nodes.values.allSatisfy({ $0.dataBytes > 0 }) else {
            // Sizes unknown (a replacement has no workers yet): the last layout, with today's endpoints.
            guard force, var layout = lastLayout else { return [] }
            layout.endpoints = Dictionary(uniqueKeysWithValues: nodes.values.map { ($0.id, $0.dataEndpoint) })
            lastLayout = layout
            return broadcastToNodes(.ecLayout(layout))
        }
        let chunk = groups.map { g in ParityPlacement.chunkBytes(forNodeBytes: g.compactMap { nodes[$0]?.dataBytes }, k: ec.k) }.max()!
        let layout = ECLayout(k: ec.k, m: ec.m, chunkBytes: max(chunk, lastLayout?.chunkBytes ?? 0), groups: groups,
                              endpoints: Dictionary(uniqueKeysWithValues: nodes.values.map { ($0.id, $0.dataEndpoint) }))
        guard force || layout != lastLayout else { return [] }
        if let last = lastLayout, last.chunkBytes != layout.chunkBytes {
            // SMPs drop their parity for a new chunk size and protect their staged
            // round again: a `protected` under the old one no longer holds.
            for id in nodes.keys { nodes[id]?.protectedStep = nil }
        }
        lastLayout = layout
        return broadcastToNodes(.ecLayout(layout))
    }

    private func restartDirectives(_ r: Recovery) -> [Directive] {
        var out: [Directive] = []
        for n in nodes.values.sorted(by: { $0.id < $1.id }) where n.state == .alive {
            out.append(.send(to: n.id, .restore(step: r.step, sources: [])))
            // Each names the incarnation to end first: the dead worker's last known
            // process (0: never heard of). One that said hello since is not restarted again.
            let restarts = (r.restartWorkers[n.id] ?? []).compactMap { id -> ControlMessage.WorkerRestart? in
                let key = "\(n.id)/\(id)"
                guard workers[key]?.state != .alive else { return nil }
                return ControlMessage.WorkerRestart(worker: id, pid: workers[key]?.info.pid ?? 0, saveStack: r.saveStacks.contains(key))
            }
            if !restarts.isEmpty { out.append(.send(to: n.id, .restartWorkers(restarts))) }
        }
        for w in workers.values.sorted(by: { $0.info.key < $1.info.key }) where w.state == .alive && !w.ready {
            out.append(.send(to: w.info.key, .restore(step: r.step, sources: sliceSources)))
        }
        return out
    }

    private mutating func maybeResume(now: Double) -> [Directive] {
        guard state == .recovering, let r = recovery, workers.count == expectedWorkers,
              workers.values.allSatisfy({ $0.ready && $0.state == .alive }) else { return [] }
        let restartSeconds = now - r.phaseStartedAt
        let from = (r.step ?? 0) + 1
        state = .running
        recovery = nil
        failuresWithoutResume = 0
        burstStartedAt = nil
        watchdog.restart(now: now)
        watchdogNoted = false
        // A restart that restored a step moved at most every image; one that restored nothing (the
        // job's start) moved nothing, and its "rate" (every image in a fraction of a second) would
        // shrink every later deadline: a 1 GiB rebuild over CURVE was declared failed after 5.5 s.
        if r.step != nil { noteRate(bytes: nodes.values.reduce(0) { $0 + $1.dataBytes }, seconds: restartSeconds) }
        let peers = workers.values.sorted { $0.info.rank < $1.info.rank }.map(\.info.collectiveEndpoint)
        if lastFailure != nil && lastFailure!.outcome == "in progress" {
            lastFailure!.phases.append(PhaseRecord(phase: .restart, seconds: restartSeconds,
                                                   reason: "\(workers.count) workers restored \(r.step.map { "step \($0)" } ?? "the initial state")"))
            lastFailure!.phases.append(PhaseRecord(phase: .resume, seconds: 0, reason: "resume from step \(from)"))
            lastFailure!.outcome = "resumed"
            // Paused workers kept reporting their step: the furthest is what was reached.
            let reached = max(lastFailure!.stepsReached, workersFurthestStep)
            lastFailure!.stepsReached = reached
            lastFailure!.restoredStep = r.step
            lastFailure!.stepsLost = max(0, reached - (r.step ?? 0))
            lastFailure!.recoveryMs = (now - lastFailure!.detectedAt) * 1000
            record(lastFailure!)
        }
        for id in workers.keys { workers[id]?.step = from - 1 }
        lastResume = .resume(fromStep: from, peers: peers)
        return [.log("resuming in epoch \(epoch) from step \(from)")] + broadcastToWorkers(lastResume!)
    }

    private mutating func fail(_ reason: String, now: Double) -> [Directive] {
        state = .failed
        stopReason = reason
        recovery = nil
        if lastFailure == nil || lastFailure!.outcome != "in progress" {
            // Not part of a recovery in progress (the last one, if any, is in the history already).
            lastFailure = FailureReport(what: "job", kind: "job", detectedBy: reason, detectedAt: now, epoch: epoch)
            failureCount += 1
        }
        lastFailure!.outcome = "stopped: \(reason)"
        lastFailure!.stepsReached = max(lastFailure!.stepsReached, workersFurthestStep)
        record(lastFailure!)
        for n in nodes.values { detector.forget(n.id) }
        for w in workers.values { detector.forget(w.info.key) }
        return [.log("job stopped: \(reason)")]
            + broadcastToNodes(.stop(reason: reason, failed: true))
            + broadcastToWorkers(.stop(reason: reason, failed: true))
    }

    // MARK: helpers

    /// A node's EC group (index) and its health: "ok" when every member is
    /// alive, "degraded" when at most m are lost, "lost" beyond; nil without EC.
    public func ecHealth(of node: String) -> (group: Int, health: String)? {
        guard let ec = settings.erasure, let groups = try? ECLayout.groups(of: settings.nodeIDs, k: ec.k, m: ec.m),
              let g = groups.firstIndex(where: { $0.contains(node) }) else { return nil }
        let rebuilding = Set(recovery?.rebuildNodes ?? []).subtracting(recovery?.rebuilt ?? [])
        let lost = groups[g].filter { nodes[$0]?.state != .alive || rebuilding.contains($0) }.count
        return (g, lost == 0 ? "ok" : lost <= ec.m ? "degraded" : "lost")
    }

    /// For each DP rank, the data endpoint of the SMP holding its slices.
    var sliceSources: [String] {
        var out = [String](repeating: "", count: expectedWorkers)
        for w in workers.values where (0..<expectedWorkers).contains(w.info.rank) {
            out[w.info.rank] = nodes[w.info.node]?.dataEndpoint ?? ""
        }
        return out
    }

    private func broadcastToNodes(_ m: ControlMessage) -> [Directive] {
        nodes.values.filter { $0.state == .alive }.map(\.id).sorted().map { .send(to: $0, m) }
    }

    private func broadcastToWorkers(_ m: ControlMessage) -> [Directive] {
        workers.values.filter { $0.state == .alive }.map(\.info.key).sorted().map { .send(to: $0, m) }
    }
}
