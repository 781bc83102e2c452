/// The coordinator's settings.
public struct CoordinatorSettings: Sendable {
    public var jobID: String
    public var nodes: Int
    public var workersPerNode: Int
    public var heartbeatInterval: Double = 0.1
    public var heartbeatTimeout: Double = 0.5
    /// A snapshot round not committed this long after its first `protected` is aborted.
    public var roundTimeout: Double = 10
    /// A recovery phase that takes longer is retried, then escalated.
    public var phaseTimeout: Double = 30
    public var phaseRetries = 2
    /// Failures in a row without a resume before the job is stopped (a crash loop).
    public var maxFailuresWithoutResume = 10
    /// Steps between snapshots (informational: workers decide collectively).
    public var snapshotInterval = 1
    /// Erasure coding across nodes: groups of `k + m` consecutive nodes
    /// (n0..n(k+m-1), …); nil for none.
    public var erasure: (k: Int, m: Int)?

    /// The node ids of the job, in order.
    public var nodeIDs: [String] { (0..<nodes).map { "n\($0)" } }

    public init(jobID: String, nodes: Int, workersPerNode: Int) {
        self.jobID = jobID
        self.nodes = nodes
        self.workersPerNode = workersPerNode
    }
}

/// The coordinator's brain as a value type: membership, epochs and fencing,
/// failure detection, the global snapshot commit, and recovery orchestration
/// (DESIGN.md, "Failure detection", "Recovery"). It takes messages and `now`
/// and returns directives (messages to send, lines to log); the
/// `ft-coordinator` shell does the sockets and the clock.
///
/// Job states and their legal transitions:
///
///     starting   -> recovering   every expected SMP and worker said hello
///                                (a fresh job restores "nothing"; a restarted
///                                coordinator restores the committed step)
///     running    -> recovering   a worker or SMP died (reported or timed out)
///     recovering -> recovering   another failure during recovery (new epoch)
///     recovering -> running      every worker restored and is ready: resume
///     recovering -> failed       unrecoverable plan, or a phase out of retries
///     running    -> stopped      every worker reported done
///
/// Epochs: every recovery raises the epoch and every message carries it. A
/// member declared dead is fenced: whatever it sends afterwards is answered
/// with `fenced` and changes nothing. State-changing reports (`protected`,
/// `ready`) from an older epoch are ignored.
///
/// Commit: step `s` commits when every node reported `protected(s)` in the
/// current epoch while running; then `commit(s)` goes to every SMP.
public struct CoordinatorInstance: Sendable {
    public enum JobState: String, Sendable {
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
        public var dataBytes = 0
        public var parityBytes = 0
        /// The epoch in which this process (pid) joined: older messages under
        /// this id come from a process it replaced, and are fenced.
        public var admittedEpoch: UInt64 = 0
    }

    public struct Worker: Sendable, Equatable {
        public var info: ControlMessage.WorkerInfo
        public var state: MemberState = .alive
        public var step = 0
        /// Restored and ready in the current epoch.
        public var ready = false
        /// Snapshots skipped (the ranks skip together).
        public var skipped = 0
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
    }

    struct Recovery: Sendable {
        var step: Int?
        var phase: Phase
        var phaseStartedAt: Double
        var retries = 0
        var restartWorkers: [String: [String]]
        /// Nodes to rebuild from parity, and the pids of their lost SMPs.
        var rebuildNodes: [String] = []
        var lostPIDs: [String: Int] = [:]
        var rebuilt: Set<String> = []
        var rebuildStartedAt: Double = 0
    }

    public let settings: CoordinatorSettings
    public private(set) var epoch: UInt64 = 1
    public private(set) var state: JobState = .starting
    public private(set) var committedStep: Int?
    public private(set) var committedAt: Double?
    public private(set) var nodes: [String: Node] = [:]
    public private(set) var workers: [String: Worker] = [:]
    public private(set) var lastFailure: FailureReport?
    public private(set) var stopReason: String?
    public private(set) var detector: FailureDetectorInstance
    private var recovery: Recovery?
    private var roundStartedAt: [Int: Double] = [:]
    private var lastResume: ControlMessage?
    public private(set) var lastLayout: ECLayout?
    private var failuresWithoutResume = 0
    public private(set) var abortedRounds = 0
    public private(set) var fencedMessages = 0

    public init(settings: CoordinatorSettings) {
        self.settings = settings
        detector = FailureDetectorInstance(interval: settings.heartbeatInterval, timeout: settings.heartbeatTimeout)
    }

    var expectedWorkers: Int { settings.nodes * settings.workersPerNode }

    // MARK: events

    public mutating func receive(_ message: ControlMessage, from sender: String, epoch senderEpoch: UInt64, now: Double) -> [Directive] {
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
        case .smpHeartbeat(let data, let parity):
            nodes[sender]?.dataBytes = data
            nodes[sender]?.parityBytes = parity
            return [.send(to: sender, .ack(state: state.rawValue))] + layoutDirectives()
        case .workerHeartbeat(let step, let running, let skipped):
            workers[sender]?.step = step
            workers[sender]?.skipped = skipped
            var out: [Directive] = [.send(to: sender, .ack(state: state.rawValue))]
            if current, !running, state == .running, let resume = lastResume, workers[sender]?.state == .alive {
                // It missed the resume (or started late): say it again.
                out.append(.send(to: sender, resume))
            }
            return out
        case .childExited(let worker, let status):
            let key = "\(sender)/\(worker)"
            guard var w = workers[key], w.state == .alive || w.state == .restarting else { return [] }
            w.state = .dead
            w.ready = false
            workers[key] = w
            detector.forget(key)
            if state == .failed || state == .stopped { return [] }
            return failure(what: key, kind: "worker", detectedBy: "reported by SMP \(sender): \(status)", now: now)
        case .protected(let step):
            guard current, state == .running, nodes[sender]?.state == .alive else { return [] }
            if let c = committedStep, step <= c { return [] }
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
        case .rebuilt(let step, let error):
            return rebuildDone(sender, step: step, error: error, now: now)
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

    /// Time passes: heartbeat timeouts, round timeouts, phase timeouts.
    public mutating func tick(now: Double) -> [Directive] {
        var out: [Directive] = []
        guard state != .stopped && state != .failed else { return out }
        for (id, silent) in detector.tick(now: now) {
            let ms = Int(silent * 1000)
            if nodes[id] != nil {
                nodes[id]?.state = .dead
                for w in nodes[id]!.workers {
                    let key = "\(id)/\(w)"
                    workers[key]?.state = .dead
                    detector.forget(key)
                }
                out += failure(what: id, kind: "smp", detectedBy: "heartbeat timeout (silent \(ms) ms)", now: now)
            } else if workers[id] != nil {
                workers[id]?.state = .dead
                workers[id]?.ready = false
                out += failure(what: id, kind: "worker", detectedBy: "heartbeat timeout (silent \(ms) ms)", now: now)
            }
            if state == .failed { return out }
        }
        if state == .running {
            for (step, started) in roundStartedAt where now - started > settings.roundTimeout {
                roundStartedAt[step] = nil
                abortedRounds += 1
                for id in nodes.keys where nodes[id]?.protectedStep == step { nodes[id]?.protectedStep = nil }
                out.append(.log("snapshot round \(step) aborted: not every node protected it within \(settings.roundTimeout) s"))
                out += broadcastToNodes(.abort(step: step))
            }
        }
        if state == .recovering, var r = recovery, now - r.phaseStartedAt > settings.phaseTimeout {
            let waiting = r.phase == .rebuild
                ? r.rebuildNodes.filter { !r.rebuilt.contains($0) }.map { "the rebuild of \($0)" }
                : workers.values.filter { !$0.ready }.map(\.info.key).sorted()
            if r.retries < settings.phaseRetries {
                r.retries += 1
                r.phaseStartedAt = now
                recovery = r
                out.append(.log("recovery phase \(r.phase.rawValue) timed out waiting for \(waiting.joined(separator: ", ")); retry \(r.retries)"))
                out += r.phase == .rebuild ? rebuildDirectives(now: now) : restartDirectives(r)
            } else {
                out += fail("recovery phase \(r.phase.rawValue) timed out \(settings.phaseRetries + 1) times waiting for "
                    + waiting.joined(separator: ", "), now: now)
            }
        }
        return out
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
            return [.send(to: sender, .welcome(state: state.rawValue)), .log("replacement SMP for \(sender) (pid \(inv.pid))")]
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
        nodes[sender] = node
        detector.heard(sender, now: now)
        if state == .starting { epoch = max(epoch, senderEpoch) }
        return [.send(to: sender, .welcome(state: state.rawValue))] + maybeStart(now: now)
    }

    private mutating func workerHello(_ info: ControlMessage.WorkerInfo, sender: String, senderEpoch: UInt64, now: Double) -> [Directive] {
        guard info.key == sender else { return [.log("worker \(sender) said hello as \(info.key); ignored")] }
        if state == .stopped || state == .failed {
            return [.send(to: sender, .stop(reason: stopReason ?? "job over", failed: state == .failed))]
        }
        guard let node = nodes[info.node], node.state == .alive else {
            if nodes[info.node] == nil { return [.send(to: sender, .helloRequired)] }
            return [.send(to: sender, .fenced(reason: "node \(info.node) was declared dead"))]
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
        if w.state != .done || state == .starting { w.state = .alive }
        workers[sender] = w
        detector.heard(sender, now: now)
        if state == .starting { epoch = max(epoch, senderEpoch) }
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

    /// Once every expected SMP and worker is here, restore and resume through
    /// the recovery path: a fresh job restores nothing; a job whose
    /// coordinator restarted restores its committed step.
    private mutating func maybeStart(now: Double) -> [Directive] {
        guard state == .starting, nodes.count == settings.nodes,
              workers.count == expectedWorkers, workers.values.allSatisfy({ $0.state == .alive }) else { return [] }
        var committed = nodes.values.compactMap(\.committedStep).max()
        var out: [Directive] = []
        // A round every node reported protected is committable, whether or not the
        // old coordinator got to broadcast its commit: commit it (fewer steps lost).
        if let p = nodes.values.first?.helloProtectedStep, p > (committed ?? -1),
           nodes.values.allSatisfy({ $0.helloProtectedStep == p && $0.stagedStep == p }) {
            out.append(.log("every node protected step \(p): committing it"))
            out += broadcastToNodes(.commit(step: p))
            for id in nodes.keys { nodes[id]?.committedStep = p; nodes[id]?.stagedStep = nil; nodes[id]?.helloProtectedStep = nil }
            committed = p
        }
        if let s = committed {
            // A commit the old coordinator broadcast may have reached some SMPs only;
            // every node holds `s` committed or staged (it reported protected(s)).
            for n in nodes.values where n.committedStep != s {
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
        let rebuilding = committed != nil || workers.values.contains { $0.step > 0 }
        epoch += 1
        state = .recovering
        let r = Recovery(step: committed, phase: .restart, phaseStartedAt: now, restartWorkers: [:])
        recovery = r
        if rebuilding {
            lastFailure = FailureReport(what: "coordinator", kind: "coordinator", detectedBy: "restarted; view rebuilt from \(nodes.count) SMP reports",
                                        detectedAt: now, epoch: epoch)
            lastFailure!.stepsReached = workersFurthestStep
            failureCount += 1
            lastFailure!.phases = [PhaseRecord(phase: .detect, seconds: 0, reason: "coordinator restart"),
                                   PhaseRecord(phase: .plan, seconds: 0, reason: "restore committed \(committed.map { "step \($0)" } ?? "nothing") on every worker"),
                                   PhaseRecord(phase: .rebuild, seconds: 0, reason: "snapshot memory intact on every node")]
        }
        out.append(.log(rebuilding ? "view rebuilt: epoch \(epoch), committed \(committed.map(String.init) ?? "none")"
                                   : "all \(settings.nodes) nodes and \(expectedWorkers) workers are here; starting in epoch \(epoch)"))
        out += broadcastToNodes(.restore(step: committed, sources: []))
        out += broadcastToWorkers(.restore(step: committed, sources: sliceSources))
        return out
    }

    // MARK: commit

    private mutating func maybeCommit(_ step: Int, now: Double) -> [Directive] {
        guard nodes.values.allSatisfy({ $0.state == .alive && $0.protectedStep == step }) else { return [] }
        committedStep = step
        committedAt = now
        roundStartedAt = roundStartedAt.filter { $0.key > step }
        for id in nodes.keys {
            nodes[id]?.committedStep = step
            nodes[id]?.protectedStep = nil
        }
        return broadcastToNodes(.commit(step: step))
    }

    // MARK: recovery

    private mutating func failure(what: String, kind: String, detectedBy: String, now: Double) -> [Directive] {
        if state == .stopped || state == .failed { return [] }
        failuresWithoutResume += 1
        if failuresWithoutResume > settings.maxFailuresWithoutResume {
            return fail("\(failuresWithoutResume) failures in a row without resuming (the last: \(kind) \(what), \(detectedBy)); "
                + "stopping instead of looping", now: now)
        }
        epoch += 1
        let previous = state
        state = .recovering
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
            + (previous == .recovering ? " (during recovery)" : ""))]
        out += broadcastToNodes(.pause(reason: "\(kind) \(what) failed"))
        out += broadcastToWorkers(.pause(reason: "\(kind) \(what) failed"))

        let planStart = now
        var lostNodes = Set(nodes.values.filter { $0.state == .dead || $0.state == .fenced }.map(\.id))
        // A replacement that has not finished rebuilding holds nothing yet: still lost.
        if let old = recovery, old.phase == .rebuild { lostNodes.formUnion(Set(old.rebuildNodes).subtracting(old.rebuilt)) }
        var lostWorkers: [String: [String]] = [:]
        for w in workers.values where (w.state == .dead || w.state == .restarting) && !lostNodes.contains(w.info.node) {
            lostWorkers[w.info.node, default: []].append(w.info.worker)
        }
        let groups = settings.erasure.flatMap { try? ECLayout.groups(of: settings.nodeIDs, k: $0.k, m: $0.m) } ?? []
        let plan = RecoveryPlanner.plan(.init(nodes: nodes.keys.sorted(), lostNodes: lostNodes, lostWorkers: lostWorkers,
                                              committedStep: committedStep, ecGroups: groups, parityPerGroup: settings.erasure?.m ?? 0))
        switch plan {
        case .unrecoverable(let reason):
            lastFailure!.phases.append(PhaseRecord(phase: .plan, seconds: now - planStart, reason: reason))
            return out + fail(reason, now: now)
        case .restore(let step, let restarts, let rebuildNodes, let reason):
            lastFailure!.phases.append(PhaseRecord(phase: .plan, seconds: now - planStart, reason: reason))
            for (node, ids) in restarts { for id in ids { workers["\(node)/\(id)"]?.state = .restarting } }
            if rebuildNodes.isEmpty {
                lastFailure!.phases.append(PhaseRecord(phase: .rebuild, seconds: 0, reason: "nothing to rebuild: snapshot memory intact on every node"))
                let r = Recovery(step: step, phase: .restart, phaseStartedAt: now, restartWorkers: restarts)
                recovery = r
                return out + restartDirectives(r)
            }
            // Wait for a replacement SMP of each lost node (the same node restarted
            // empty, or a spare under its id), then have it rebuild from its group.
            var r = Recovery(step: step, phase: .rebuild, phaseStartedAt: now, restartWorkers: restarts, rebuildNodes: rebuildNodes)
            r.rebuildStartedAt = now
            for id in rebuildNodes { r.lostPIDs[id] = nodes[id]?.pid ?? -1 }
            // Replacements that already said hello keep their place in the rebuild.
            if let old = recovery, old.phase == .rebuild {
                r.lostPIDs.merge(old.lostPIDs) { _, original in original }
                r.rebuilt = old.rebuilt.intersection(rebuildNodes)
            }
            recovery = r
            out.append(.log("waiting for replacement SMPs of \(rebuildNodes.joined(separator: ", ")) to rebuild from parity"))
            return out + rebuildDirectives(now: now)
        }
    }

    /// Rebuild orders for replacements that are here and not yet rebuilt.
    private mutating func rebuildDirectives(now: Double) -> [Directive] {
        guard let r = recovery, r.phase == .rebuild else { return [] }
        var out = layoutDirectives(force: true)
        for id in r.rebuildNodes where nodes[id]?.state == .alive && !r.rebuilt.contains(id) {
            out.append(.send(to: id, .rebuild(step: r.step, lost: r.rebuildNodes)))
        }
        return out
    }

    private mutating func rebuildDone(_ node: String, step: Int?, error: String, now: Double) -> [Directive] {
        guard state == .recovering, var r = recovery, r.phase == .rebuild, r.rebuildNodes.contains(node), step == r.step else { return [] }
        guard error.isEmpty else {
            return fail("rebuild of node \(node) failed: \(error)", now: now)
        }
        r.rebuilt.insert(node)
        recovery = r
        guard r.rebuilt.count == r.rebuildNodes.count else { return [.log("node \(node) rebuilt")] }
        lastFailure?.phases.append(PhaseRecord(phase: .rebuild, seconds: now - r.rebuildStartedAt,
                                               reason: "rebuilt \(r.rebuildNodes.joined(separator: ", ")) from parity"))
        r.phase = .restart
        r.phaseStartedAt = now
        r.retries = 0
        recovery = r
        return [.log("rebuilt \(r.rebuildNodes.joined(separator: ", ")); restoring")] + restartDirectives(r)
    }

    /// The EC layout, sent when it is known or changed (or when forced).
    private mutating func layoutDirectives(force: Bool = false) -> [Directive] {
        guard let ec = settings.erasure, let groups = try? ECLayout.groups(of: settings.nodeIDs, k: ec.k, m: ec.m) else { return [] }
        guard nodes.count == settings.nodes, nodes.values.allSatisfy({ $0.dataBytes > 0 || $0.state != .alive }) else {
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
        lastLayout = layout
        return broadcastToNodes(.ecLayout(layout))
    }

    private func restartDirectives(_ r: Recovery) -> [Directive] {
        var out: [Directive] = []
        for n in nodes.values.sorted(by: { $0.id < $1.id }) where n.state == .alive {
            out.append(.send(to: n.id, .restore(step: r.step, sources: [])))
            if let ids = r.restartWorkers[n.id], !ids.isEmpty { out.append(.send(to: n.id, .restartWorkers(ids))) }
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
