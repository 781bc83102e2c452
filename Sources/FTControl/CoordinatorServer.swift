import FTCore
import FTSystem
import FTZMQ
import Foundation
import Logging

public struct CoordinatorServerConfig: Sendable {
    public var settings: CoordinatorSettings
    /// Where to bind, e.g. `tcp://127.0.0.1:5555` or `tcp://127.0.0.1:*`.
    public var endpoint: String
    /// CURVE keys (see `JobKeys`); nil runs without encryption (tests only).
    public var keysDirectory: String?
    /// Written here: `coordinator.endpoint`, `coordinator.pid`, `status.json` at exit.
    public var runDirectory: String?
    /// After the job stopped or failed, keep answering (members get `stop`, ftctl a last status) this long.
    public var lingerSeconds: Double = 1.0
    /// `HOST:PORT` to serve Prometheus metrics on (`GET /metrics`; port 0: a
    /// free one, written to `RUN_DIR/metrics.endpoint`); nil serves none.
    public var metricsAddress: String?
    /// The job's last step, when known (`ftctl status` shows the time to it).
    public var totalSteps: Int?
    /// The prior per-node failure rate of the durability estimate (failures per
    /// node per day), updated with the node failures this job sees.
    public var nodeFailuresPerDay = DurabilityEstimate.defaultNodeFailuresPerDay

    public init(settings: CoordinatorSettings, endpoint: String, keysDirectory: String?, runDirectory: String?) {
        self.settings = settings
        self.endpoint = endpoint
        self.keysDirectory = keysDirectory
        self.runDirectory = runDirectory
    }
}

/// The `ft-coordinator` shell: one ROUTER, `CoordinatorInstance` for every
/// decision, a clock, and the socket work its directives ask for.
///
/// Every frame is decoded defensively: a malformed frame is counted, logged and
/// dropped; an unauthenticated client never gets a frame through (ZAP refuses
/// its handshake; refusals are counted). With keys, each client's role comes
/// from the key it presented (`JobKeys.KeyRole`, the handshake's user id), and
/// a message its role may not send (an operator's anything but a status query,
/// a worker's SMP report, an SMP's worker message) is counted as unauthorized,
/// logged and dropped. Status queries are answered from the instance's view
/// (`CoordinatorStatus`).
///
/// Fencing by incarnation: the server remembers which member and process
/// (pid) said an accepted hello on each connection. A message on a connection
/// whose process is no longer the member's (it was replaced) is answered
/// `fenced` on that connection and goes no further, whatever epoch it
/// carries; a message for a member on a connection nobody said hello on, while
/// the member has another, is answered `helloRequired`. Epoch fencing in the
/// instance stays for everything else.
public final class CoordinatorServer: @unchecked Sendable {
    public let config: CoordinatorServerConfig
    private let logger: Logger
    private var instance: CoordinatorInstance
    private let context: ZMQContext
    private let router: ZMQSocket
    private let zap: ZAPAuthenticator?
    private var identities: [String: [UInt8]] = [:]
    /// Connection (ZeroMQ routing id) -> the member and process (pid) whose
    /// hello was accepted on it: a process that was replaced is fenced by who
    /// it is, not only by the epoch it knows (a stopped process may have heard
    /// the very epoch its replacement joined in before it was stopped).
    private var connections: [[UInt8]: (member: String, pid: Int)] = [:]
    private let shell: EventLoopShell
    public private(set) var boundEndpoint: String
    public private(set) var malformedFrames = 0
    /// Messages dropped because the sender's key role may not send them.
    public private(set) var unauthorizedMessages = 0
    private let startedAt = monotonicSeconds()
    /// What changed in the core, for the event log and the metrics.
    private var observer = JobObserver()
    private let events: EventLog?
    public let metrics = JobMetrics()
    private var metricsServer: MetricsHTTPServer?
    private var gaugesSetAt = -Double.infinity

    public init(config: CoordinatorServerConfig, logger: Logger, watchSignals: Bool) throws {
        self.config = config
        self.logger = logger
        instance = CoordinatorInstance(settings: config.settings)
        shell = try EventLoopShell(watchSignals: watchSignals)
        context = try ZMQContext()
        if let dir = config.keysDirectory {
            let server = try CurveKeyPair.load(from: dir + "/coordinator.key")
            let users = try JobKeys.clientUsers(in: dir)
            zap = try ZAPAuthenticator(context: context, clients: users) { [logger] line in
                logger.warning("unauthenticated: \(line)")
            }
            router = try context.socket(.router, maxMessageBytes: ControlMessage.maxFrameBytes)
            try router.setZAPDomain("ft")
            try router.makeCurveServer(server)
        } else {
            zap = nil
            router = try context.socket(.router, maxMessageBytes: ControlMessage.maxFrameBytes)
        }
        try router.setLinger(milliseconds: 0)
        try router.setRouterMandatory(false)
        boundEndpoint = try router.bind(config.endpoint)
        if let dir = config.runDirectory {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            try (boundEndpoint + "\n").write(toFile: dir + "/coordinator.endpoint", atomically: true, encoding: .utf8)
            try "\(getpid())\n".write(toFile: dir + "/coordinator.pid", atomically: true, encoding: .utf8)
            events = try EventLog(runDirectory: dir)
        } else {
            events = nil
        }
        if let address = config.metricsAddress {
            let metrics = self.metrics
            let server = try MetricsHTTPServer(address: address) { metrics.exposition() }
            metricsServer = server
            if let dir = config.runDirectory {
                try (server.url + "\n").write(toFile: dir + "/metrics.endpoint", atomically: true, encoding: .utf8)
            }
        }
        events?.append(JobEvent(kind: .coordinatorUp, epoch: instance.epoch, pid: Int(getpid()),
                                detail: "control " + boundEndpoint + (metricsServer.map { ", metrics " + $0.url } ?? "")))
    }

    /// Asks a running `run()` to end, from any thread.
    public func stop() { shell.stop() }

    /// Handshakes refused by the authenticator.
    public var unauthenticated: Int { zap?.denied ?? 0 }

    /// Runs until the job ends (returns its final state) or SIGTERM / `stop()`.
    @discardableResult
    public func run() throws -> CoordinatorInstance.JobState {
        logger.info("coordinator up", metadata: ["job": "\(config.settings.jobID)", "endpoint": "\(boundEndpoint)",
                                                "metrics": "\(metricsServer?.url ?? "off")",
                                                "nodes": "\(config.settings.nodes)", "workers.per.node": "\(config.settings.workersPerNode)",
                                                "curve": "\(zap != nil)"])
        var endedAt: Double?
        loop: while true {
            let wait = Int(config.settings.heartbeatInterval * 500)
            let (ready, stop) = try shell.poll([.init(router, .readable)], timeoutMilliseconds: max(wait, 5))
            if let stop { logger.info("coordinator stopping \(stop)"); break loop }
            if ready[0].isReadable { drain() }
            execute(instance.tick(now: monotonicSeconds()))
            if instance.state == .stopped || instance.state == .failed {
                let now = monotonicSeconds()
                if endedAt == nil { endedAt = now }
                if now - endedAt! > config.lingerSeconds { break loop }
            }
        }
        observe()
        writeFinalStatus()
        metricsServer?.stop()
        zap?.stop()
        router.close()
        logger.info("coordinator down", metadata: ["state": "\(instance.state.rawValue)",
                                                  "largest_loop_gap_ms": "\(Int(instance.detector.largestGap * 1000)) (pid \(getpid()))",
                                                  "stalls": "\(instance.detector.stalls)"])
        return instance.state
    }

    private func drain() {
        while let messages = try? router.receiveMessages(timeoutMilliseconds: 0) {
            let frames = messages.map(\.bytes)
            guard frames.count == 2 else {
                countMalformed("a message of \(frames.count) frames")
                continue
            }
            let identity = frames[0]
            let decoded: (ControlMessage, WireEnvelope)
            do {
                decoded = try ControlMessage.decode(frames[1])
            } catch {
                countMalformed("\(error)")
                continue
            }
            let (message, envelope) = decoded
            if zap != nil {
                // The role of the key this connection presented (ZAP's user id), not a field of
                // the message; a node's own key speaks only for that node.
                let user = messages[1].property("User-Id").map(DataPlaneKeys.parseUser)
                let role = user.flatMap { JobKeys.KeyRole(rawValue: $0.role) }
                let otherNode = user?.node.map { node -> Bool in
                    if case .statusQuery = message { return false }
                    return envelope.sender != node
                } ?? false
                guard let role, role.may(message), !otherNode else {
                    unauthorizedMessages += 1
                    let key = user.map { u in u.node.map { "node \($0)'s" } ?? "the \(u.role)" } ?? "an unknown"
                    logger.warning("dropped \(String(describing: message).prefix(60)) from \(envelope.sender): \(key) key may not send it",
                                   metadata: ["unauthorized.total": "\(unauthorizedMessages)"])
                    continue
                }
            }
            if case .statusQuery = message {
                let json = CoordinatorStatus.json(instance, now: monotonicSeconds(), malformed: malformedFrames,
                                                  unauthenticated: unauthenticated, unauthorized: unauthorizedMessages, uptime: monotonicSeconds() - startedAt,
                                                  fencedByServer: fencedByIncarnation, extra: statusExtras())
                send(identity, .statusReply(json))
                continue
            }
            let helloPID: Int?
            switch message {
            case .smpHello(let inventory): helloPID = inventory.pid
            case .workerHello(let info): helloPID = info.pid
            default: helloPID = nil
            }
            if helloPID == nil, let current = currentPID(of: envelope.sender) {
                if let known = connections[identity], known.member == envelope.sender, known.pid != current {
                    // A replaced process (a zombie) under its successor's id.
                    fencedByIncarnation += 1
                    send(identity, .fenced(reason: "\(envelope.sender) was replaced by pid \(current); this process (pid \(known.pid)) is not it"))
                    continue
                }
                if connections[identity] == nil, let route = identities[envelope.sender], route != identity {
                    // A connection nobody said hello on, for a member that has one: who is it?
                    send(identity, .helloRequired)
                    continue
                }
            }
            let before = (instance.state, instance.epoch, instance.committedStep)
            var directives = instance.receive(message, from: envelope.sender, epoch: envelope.epoch, now: monotonicSeconds())
            if let pid = helloPID, directives.contains(where: { if case .send(envelope.sender, .welcome) = $0 { true } else { false } }) {
                for (c, known) in connections where known.member == envelope.sender { connections[c] = nil }
                connections[identity] = (envelope.sender, pid)
                identities[envelope.sender] = identity
            }
            // A fenced sender may be a zombie under a live member's id: answer it
            // on its own connection, and do not let it take over the member's route.
            directives.removeAll { d in
                if case .send(let to, .fenced) = d, to == envelope.sender {
                    if case .send(_, let m) = d { send(identity, m) }
                    return true
                }
                return false
            }
            // Routes only for the job's member ids: a stranger's names never grow this table.
            if config.settings.isMemberID(envelope.sender), !directives.isEmpty || identities[envelope.sender] == nil {
                identities[envelope.sender] = identity
            }
            execute(directives)
            if before != (instance.state, instance.epoch, instance.committedStep) {
                logger.debug("state \(instance.state.rawValue), epoch \(instance.epoch), committed \(instance.committedStep.map(String.init) ?? "none")")
            }
        }
    }

    /// Messages refused because their connection belongs to a replaced process (in `fenced_messages`).
    private var fencedByIncarnation = 0

    /// The pid of the process the coordinator knows as `member` (an SMP or a worker), if any.
    private func currentPID(of member: String) -> Int? {
        instance.nodes[member]?.pid ?? instance.workers[member]?.info.pid
    }

    /// (time, furthest step) once a second, for the step rate (the last 30 s).
    private var progress: [(Double, Int)] = []

    /// Steps per second over the last 30 s of training (nil: not enough yet).
    var stepRate: Double? {
        guard let first = progress.first, let last = progress.last, last.0 - first.0 >= 2, last.1 > first.1 else { return nil }
        return Double(last.1 - first.1) / (last.0 - first.0)
    }

    /// What the status adds to the core's view: the step rate and the time to the last step.
    private func statusExtras() -> [String: Any] {
        var o: [String: Any] = ["step_rate_per_s": stepRate.map { ($0 * 100).rounded() / 100 } ?? -1,
                                "total_steps": config.totalSteps ?? -1, "eta_s": -1,
                                "metrics_url": metricsServer?.url ?? NSNull()]
        if let total = config.totalSteps, let rate = stepRate, rate > 0 {
            let furthest = instance.workers.values.map(\.step).max() ?? 0
            o["eta_s"] = (Double(max(0, total - furthest)) / rate).rounded()
        }
        o["durability"] = durability()
        return o
    }

    /// The durability estimate (README, "Durability estimate"): the chance that
    /// the next node failure's window loses more than m nodes of its group, and
    /// the steps a failure memory does recover costs. The window is the longest
    /// node recovery this coordinator measured (detection to resume), or, before
    /// one, the detection timeout plus the phase floor; the rate is the prior
    /// updated with the node failures seen over this coordinator's node-days.
    private func durability() -> Any {
        let s = config.settings
        let nodeRecoveries = instance.failureHistory.filter { $0.kind == "smp" && $0.outcome == "resumed" }.compactMap(\.recoveryMs)
        let measured = nodeRecoveries.max().map { $0 / 1000 }
        let window = sane(measured ?? (s.heartbeatTimeout + s.phaseTimeout))
        let nodeFailures = instance.failureHistory.filter { $0.kind == "smp" }.count
            + (instance.lastFailure.map { $0.kind == "smp" && $0.outcome == "in progress" ? 1 : 0 } ?? 0)
        let nodeDays = sane(Double(s.nodes) * (monotonicSeconds() - startedAt) / 86_400)
        let rate = sane(DurabilityEstimate.posteriorRate(prior: config.nodeFailuresPerDay, observedFailures: nodeFailures, observedNodeDays: nodeDays))
        // Inputs the estimate's preconditions accept, whatever the clocks did: the status never traps.
        func sane(_ x: Double) -> Double { x.isFinite && x > 0 ? x : 0 }
        let latencySteps = sane((instance.lastCommitLatency ?? 0) * (stepRate ?? 0))
        var o: [String: Any] = [
            "node_failures_per_day": rate, "prior_node_failures_per_day": config.nodeFailuresPerDay,
            "node_failures_seen": nodeFailures, "node_days_seen": (nodeDays * 1e4).rounded() / 1e4,
            "window_s": (window * 1000).rounded() / 1000, "window_measured": measured != nil,
            "expected_steps_lost_per_failure": (DurabilityEstimate.expectedStepsLost(snapshotInterval: s.snapshotInterval,
                                                                                     stepsPerCommitLatency: latencySteps) * 100).rounded() / 100,
        ]
        if let ec = s.erasure, let groups = try? ECLayout.groups(of: s.nodeIDs, k: ec.k, m: ec.m) {
            let e = DurabilityEstimate(groups: groups.count, k: ec.k, m: ec.m, nodeFailuresPerDay: rate, windowSeconds: window)
            o["loss_per_failure"] = e.lossPerFailure
            o["loss_per_day"] = e.lossPerDay
        } else {
            o["loss_per_failure"] = 1.0  // without erasure coding a lost node's memory is gone
            o["loss_per_day"] = Double(s.nodes) * rate
        }
        return o
    }

    /// Compares the core with what it showed last: events to the log, counts to the metrics;
    /// gauges at most every 100 ms.
    private func observe() {
        let now = monotonicSeconds()
        if instance.state == .running, progress.last.map({ now - $0.0 >= 1 }) ?? true {
            progress.append((now, instance.workers.values.map(\.step).max() ?? 0))
            progress.removeAll { now - $0.0 > 30 }
        } else if instance.state == .recovering {
            progress.removeAll()  // a rate across a recovery says nothing about training
        }
        let changes = observer.observe(instance)
        for e in changes.events { events?.append(e) }
        metrics.record(changes)
        if now - gaugesSetAt >= 0.1 || !changes.events.isEmpty {
            gaugesSetAt = now
            metrics.update(from: instance)
        }
    }

    private func execute(_ directives: [CoordinatorInstance.Directive]) {
        defer { observe() }
        for d in directives {
            switch d {
            case .log(let line):
                logger.info("\(line)")
            case .refused(let sender, let error):
                logger.warning("refused a message from '\(sender)': \(error)", metadata: ["refused.total": "\(instance.refusedMessages)"])
            case .send(let to, let message):
                guard let identity = identities[to] else {
                    logger.debug("no route to \(to) for \(message.type)")
                    continue
                }
                send(identity, message)
            }
        }
    }

    private func send(_ identity: [UInt8], _ message: ControlMessage) {
        let frame = message.envelope(sender: "coordinator", epoch: instance.epoch).encoded()
        do {
            try router.send([identity, frame], dontWait: true)
        } catch {
            logger.debug("send failed: \(error)")
        }
    }

    private func countMalformed(_ what: String) {
        malformedFrames += 1
        logger.warning("dropped a malformed frame: \(what)", metadata: ["malformed.total": "\(malformedFrames)"])
    }

    private func writeFinalStatus() {
        guard let dir = config.runDirectory else { return }
        let json = CoordinatorStatus.json(instance, now: monotonicSeconds(), malformed: malformedFrames,
                                          unauthenticated: unauthenticated, unauthorized: unauthorizedMessages, uptime: monotonicSeconds() - startedAt,
                                          fencedByServer: fencedByIncarnation, extra: statusExtras())
        try? (json + "\n").write(toFile: dir + "/status.json", atomically: true, encoding: .utf8)
    }
}

/// The `ftctl status --json` document, schema 1 (stable; README, "ftctl status"):
///
///     {"schema": 1, "job", "state", "epoch", "committed_step" (-1: none),
///      "committed_age_ms" (-1: none), "snapshot_interval", "uptime_s",
///      "nodes": [{"id", "smp", "pid", "data_bytes", "parity_bytes",
///                 "ec_group" (index as text, "none" without EC),
///                 "ec_health" ("ok", "degraded", "lost"; "no-ec" without EC),
///                 "workers": [{"id", "rank", "state", "step", "pid", "activity" (idle, computing,
///                              collective, snapshot-wait, restoring, held), "activity_ms",
///                              "waiting_on" (the rank a collective waits for, -1)}]}],
///      "last_failure": null | {"what", "kind", "detected_by", "age_ms",
///                              "detected_at_s" (CLOCK_MONOTONIC seconds), "epoch",
///                              "outcome", "phases": [{"phase", "ms", "reason"}],
///                              "steps_reached", "restored_step" (-1: initial state or not yet),
///                              "steps_lost" (-1: not resumed), "recovery_ms" (-1: not resumed)},
///      "failures_total", "failures": [the last 256 failures, oldest first, each like
///                                     last_failure without age_ms; a failure during a
///                                     recovery ends the one before with outcome "superseded by …"],
///      "stop_reason": null | "...", "aborted_rounds", "fenced_messages", "refused_messages", "skipped_snapshots",
///      "malformed_frames", "unauthenticated", "unauthorized", "coordinator_pid",
///      "detector": {"timeout_ms" (in force), "local_health", "stalls", "largest_loop_gap_ms"},
///      "watchdog": {"bound_ms", "step_p99_ms" (-1: none yet)},
///      "step_rate_per_s" (the last 30 s of training; -1: not known yet), "total_steps" (-1: not known),
///      "eta_s" (seconds to the last step at that rate; -1: not known), "metrics_url" (null: none),
///      "persist": {"enabled", "persisted_step" (every node wrote it; -1: none), "durable_step"
///                  (recoverable from disk; -1: none), "in_progress_step" (-1: none),
///                  "last_seconds" (-1: none), "errors": {node: "code: reason"}}}
public enum CoordinatorStatus {
    public static let schema = 1

    /// `fencedByServer`: messages the server fenced by incarnation, counted with the instance's in `fenced_messages`.
    public static func object(_ c: CoordinatorInstance, now: Double, malformed: Int, unauthenticated: Int, unauthorized: Int = 0, uptime: Double,
                              fencedByServer: Int = 0, extra: [String: Any] = [:]) -> [String: Any] {
        var nodes: [[String: Any]] = []
        for n in c.nodes.values.sorted(by: { $0.id < $1.id }) {
            let ws = c.workers.values.filter { $0.info.node == n.id }.sorted { $0.info.rank < $1.info.rank }
            let smpState: String
            if n.state == .alive, c.detector.liveness(n.id, now: now) == .suspect { smpState = "suspect" } else { smpState = n.state.rawValue }
            nodes.append([
                "id": n.id, "smp": smpState, "pid": n.pid, "data_bytes": n.dataBytes, "parity_bytes": n.parityBytes,
                "ec_group": c.ecHealth(of: n.id).map { "\($0.group)" } ?? "none",
                "ec_health": c.ecHealth(of: n.id)?.health ?? (n.state == .alive ? "no-ec" : "lost"),
                "workers": ws.map {
                    ["id": $0.info.worker, "rank": $0.info.rank, "state": $0.state.rawValue, "step": $0.step, "pid": $0.info.pid,
                     "activity": $0.activity.kind.name, "activity_ms": $0.activity.milliseconds, "waiting_on": $0.activity.waitingOn]
                },
            ])
        }
        func report(_ f: CoordinatorInstance.FailureReport) -> [String: Any] {
            ["what": f.what, "kind": f.kind, "detected_by": f.detectedBy, "detected_at_s": f.detectedAt,
             "epoch": f.epoch, "outcome": f.outcome,
             "phases": f.phases.map { ["phase": $0.phase.rawValue, "ms": ($0.seconds * 1000 * 1000).rounded() / 1000, "reason": $0.reason] },
             "steps_reached": f.stepsReached, "restored_step": f.restoredStep ?? -1, "steps_lost": f.stepsLost ?? -1,
             "recovery_ms": f.recoveryMs.map { ($0 * 1000).rounded() / 1000 } ?? -1]
        }
        var failure: Any = NSNull()
        if let f = c.lastFailure {
            var o = report(f)
            o["age_ms"] = Int((now - f.detectedAt) * 1000)
            failure = o
        }
        return [
            "schema": schema, "job": c.settings.jobID, "state": c.state.rawValue, "epoch": c.epoch,
            "committed_step": c.committedStep ?? -1,
            "committed_age_ms": c.committedAt.map { Int((now - $0) * 1000) } ?? -1,
            "snapshot_interval": c.settings.snapshotInterval, "uptime_s": (uptime * 10).rounded() / 10,
            "nodes": nodes, "last_failure": failure, "failures_total": c.failureCount, "failures": c.failureHistory.map(report),
            "stop_reason": c.stopReason.map { $0 as Any } ?? NSNull(),
            "aborted_rounds": c.abortedRounds, "fenced_messages": c.fencedMessages + fencedByServer,
            "refused_messages": c.refusedMessages,
            "skipped_snapshots": c.workers.values.map(\.skipped).max() ?? 0,
            "malformed_frames": malformed, "unauthenticated": unauthenticated, "unauthorized": unauthorized,
            "coordinator_pid": Int(getpid()),
            "detector": ["timeout_ms": Int(c.detector.effectiveTimeout * 1000), "local_health": c.detector.localHealth,
                         "stalls": c.detector.stalls, "largest_loop_gap_ms": Int(c.detector.largestGap * 1000)],
            "watchdog": ["bound_ms": Int(c.watchdog.bound * 1000), "step_p99_ms": c.watchdog.p99.map { Int($0 * 1000) } ?? -1],
            "persist": ["enabled": c.settings.persistEnabled, "persisted_step": c.persistedStep ?? -1, "durable_step": c.durableStep ?? -1,
                        "in_progress_step": c.persisting?.step ?? -1,
                        "last_seconds": c.lastPersistSeconds.map { ($0 * 1000).rounded() / 1000 } ?? -1, "errors": c.persistErrors] as [String: Any],
        ].merging(extra) { _, added in added }
    }

    public static func json(_ c: CoordinatorInstance, now: Double, malformed: Int, unauthenticated: Int, unauthorized: Int = 0, uptime: Double,
                            fencedByServer: Int = 0, extra: [String: Any] = [:]) -> String {
        let o = object(c, now: now, malformed: malformed, unauthenticated: unauthenticated, unauthorized: unauthorized, uptime: uptime,
                       fencedByServer: fencedByServer, extra: extra)
        let data = (try? JSONSerialization.data(withJSONObject: o, options: [.sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self)
    }
}
