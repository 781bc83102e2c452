import FTCore
import Foundation

/// Watches the coordinator core between its steps and says what changed, as
/// `JobEvent`s for the event log and as observations for the metrics. The
/// core decides; this only compares what it shows now with what it showed
/// last time (`observe`), so a restarted coordinator, which rebuilt its view
/// from the SMPs, reports from there on.
///
/// Failures are followed by identity (what failed, when, in which epoch)
/// through the core's history and its last failure: each one's `failure`
/// event once, each recovery phase once as the core records it, and
/// `resumed` once; a failure superseded by the next one gets its phases, no
/// `resumed`. Commits are sampled: at most one `commit` event a second, and
/// always the first after the start and after each recovery.
public struct JobObserver {
    /// What one observation found.
    public struct Changes {
        public var events: [JobEvent] = []
        /// Steps committed since the last observation (each a round committed).
        public var roundsCommitted = 0
        public var roundsAborted = 0
        /// Failures first seen, by kind (smp, worker, coordinator).
        public var failures: [String] = []
        /// Recovery phases that ended: (phase, seconds).
        public var phases: [(String, Double)] = []
        /// Steps lost by recoveries that ended.
        public var stepsLost = 0
        /// Seconds from the round's first `protected` to its commit, for each commit seen.
        public var commitLatencies: [Double] = []
    }

    private struct FailureKey: Hashable {
        var what: String
        var detectedAt: Double
        var epoch: UInt64
    }

    private var started = false
    private var stopped = false
    private var committed: Int?
    private var aborted = 0
    private var durable: Int?
    private var persistErrors: [String: String] = [:]
    private var fenced = 0
    private var pids: [String: Int] = [:]
    private var phasesSeen: [FailureKey: Int] = [:]
    private var resumedSeen: Set<FailureKey> = []
    private var lastCommitEventAt = -Double.infinity
    private var lastCommitEventStep: Int?
    private var commitEventDue = true
    private var lastFencedEventAt = -Double.infinity
    private let wallClock: () -> Double

    /// `wallClock`: seconds since 1970 (events carry it); tests pass their own.
    public init(wallClock: @escaping () -> Double = { Date().timeIntervalSince1970 }) {
        self.wallClock = wallClock
    }

    /// What changed in `c` since the last call (events stamped with `wallClock`).
    public mutating func observe(_ c: CoordinatorInstance) -> Changes {
        var out = Changes()
        let t = wallClock()
        let wasStarted = started
        func event(_ kind: JobEvent.Kind, step: Int? = nil, what: String? = nil, member: String? = nil, phase: String? = nil,
                   seconds: Double? = nil, stepsLost: Int? = nil, pid: Int? = nil, failed: Bool? = nil, detail: String? = nil) {
            out.events.append(JobEvent(time: t, kind: kind, epoch: c.epoch, step: step, what: what, member: member, phase: phase,
                                       seconds: seconds, stepsLost: stepsLost, pid: pid, failed: failed, detail: detail))
        }
        // Failures, their phases, their ends.
        var reports = c.failureHistory.suffix(16)
        if let last = c.lastFailure, !reports.contains(where: { $0.what == last.what && $0.detectedAt == last.detectedAt && $0.epoch == last.epoch }) {
            reports.append(last)
        }
        for f in reports {
            let key = FailureKey(what: f.what, detectedAt: f.detectedAt, epoch: f.epoch)
            if phasesSeen[key] == nil {
                phasesSeen[key] = 0
                out.failures.append(f.kind)
                event(.failure, step: c.committedStep, what: f.what, member: f.kind, detail: f.detectedBy)
            }
            for p in f.phases.dropFirst(phasesSeen[key]!) {
                out.phases.append((p.phase.rawValue, p.seconds))
                event(.phase, what: f.what, phase: p.phase.rawValue, seconds: p.seconds, detail: p.reason)
            }
            phasesSeen[key] = f.phases.count
            if f.outcome == "resumed", !resumedSeen.contains(key) {
                resumedSeen.insert(key)
                out.stepsLost += f.stepsLost ?? 0
                commitEventDue = true
                event(.resumed, step: f.restoredStep, what: f.what, seconds: f.recoveryMs.map { $0 / 1000 }, stepsLost: f.stepsLost)
            }
        }
        if phasesSeen.count > 4096 {
            // Bounded: keep what the history can still show.
            let live = Set(reports.map { FailureKey(what: $0.what, detectedAt: $0.detectedAt, epoch: $0.epoch) })
            phasesSeen = phasesSeen.filter { live.contains($0.key) }
            resumedSeen = resumedSeen.intersection(live)
        }
        // Members: a process (pid) taking a node's place, the first ones included
        // (after the failures: a restarted SMP's hello is its node's failure and its replacement at once).
        for n in c.nodes.values.sorted(by: { $0.id < $1.id }) where n.pid > 0 && pids[n.id] != n.pid {
            let replaced = pids[n.id]
            pids[n.id] = n.pid
            event(.member, what: n.id, pid: n.pid, detail: (replaced.map { "replaces pid \($0), " } ?? "") + "data plane " + n.dataEndpoint)
        }
        if !started && c.state != .starting {
            started = true
            commitEventDue = true
            event(.start, step: c.committedStep, detail: "\(c.settings.nodes) nodes x \(c.settings.workersPerNode) workers"
                + (c.settings.erasure.map { ", RS(\($0.k)+\($0.m))" } ?? "") + ", a snapshot every \(c.settings.snapshotInterval) steps")
        }
        // Commits (each change of the committed step is a round committed).
        if let s = c.committedStep, s != committed {
            if committed != nil || wasStarted {  // not the step a restarted coordinator found
                out.roundsCommitted += 1
                if let l = c.lastCommitLatency { out.commitLatencies.append(l) }
            }
            committed = s
            if commitEventDue || t - lastCommitEventAt >= 1 {
                commitEventDue = false
                lastCommitEventAt = t
                lastCommitEventStep = s
                event(.commit, step: s)
            }
        }
        if c.abortedRounds > aborted {
            out.roundsAborted = c.abortedRounds - aborted
            event(.abort, detail: "\(out.roundsAborted) round(s) aborted: not every node protected in time")
        }
        aborted = c.abortedRounds
        if c.fencedMessages > fenced, t - lastFencedEventAt >= 1 {
            event(.fenced, detail: "\(c.fencedMessages - fenced) message(s) of replaced processes refused")
            fenced = c.fencedMessages
            lastFencedEventAt = t
        }
        if let d = c.durableStep, d != durable {
            durable = d
            event(.persisted, step: d, seconds: c.lastPersistSeconds, detail: "durable on disk")
        }
        for (node, error) in c.persistErrors.sorted(by: { $0.key < $1.key }) where persistErrors[node] != error {
            event(.persistFailed, what: node, detail: error)
        }
        persistErrors = c.persistErrors
        if !stopped && (c.state == .stopped || c.state == .failed) {
            stopped = true
            // The last commit, sampled or not: the picture's steps end where the job did.
            if let s = c.committedStep, s != lastCommitEventStep, !out.events.contains(where: { $0.kind == .commit }) {
                lastCommitEventStep = s
                event(.commit, step: s)
            }
            event(.stopped, step: c.committedStep, failed: c.state == .failed, detail: c.stopReason)
        }
        return out
    }
}
