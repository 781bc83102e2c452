import FTCore
import Foundation
import Prometheus

/// The coordinator's Prometheus metrics (`GET /metrics` on `--metrics`):
/// the job's, and each SMP's as its heartbeats report them (SMPs serve no
/// endpoint of their own). Counters and histograms are fed by
/// `JobObserver`'s changes; gauges are set from the core's view before each
/// scrape is answered and after each observation.
///
///     ft_snapshot_rounds_committed_total            counter
///     ft_snapshot_rounds_aborted_total              counter
///     ft_commit_latency_seconds                     histogram: a round's first `protected` to its commit
///     ft_snapshot_blocked_seconds                   histogram: training time blocked per snapshot, as workers report it
///     ft_node_protected_bytes{node}                 gauge: the node's image under erasure coding
///     ft_node_parity_bytes{node}                    gauge
///     ft_node_shared_memory_bytes{node}             gauge: the SMP's shared memory in use
///     ft_failures_total{kind}                       counter: smp, worker, coordinator
///     ft_recovery_phase_seconds{phase}              histogram: detect, plan, rebuild, restart, resume
///     ft_steps_lost_total                           counter
///     ft_steps_since_commit                         gauge: the RPO in steps
///     ft_committed_step                             gauge
///     ft_epoch                                      gauge
///     ft_ec_group_health{group,state}               gauge: 1 for the group's state (ok, degraded, lost), else 0
///     ft_job_state{state}                           gauge: 1 for the job's state
///
///     ft_persisted_step                             gauge: the newest step every node wrote to disk (-1: none)
///     ft_durable_step                               gauge: the newest step recoverable from disk (-1: none)
///     ft_persist_errors                             gauge: nodes whose last persist failed (out of space, ...)
public final class JobMetrics: @unchecked Sendable {
    public let registry = PrometheusCollectorRegistry()
    private let committed: Counter
    private let aborted: Counter
    private let commitLatency: ValueHistogram
    private let blocked: ValueHistogram
    private let stepsLost: Counter
    private let stepsSinceCommit: Gauge
    private let committedStep: Gauge
    private let epoch: Gauge
    private let persistedStep: Gauge
    private let durableStep: Gauge
    private let persistErrors: Gauge
    private var failures: [String: Counter] = [:]
    private var phases: [String: ValueHistogram] = [:]
    private let lock = NSLock()
    /// Per worker: (snapshots, blocked seconds) last reported, for per-snapshot observations.
    private var lastBlocked: [String: (Int, Double)] = [:]

    static func name(_ metric: String, _ unit: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(namespace: "ft", metricName: metric, unitName: unit, helpText: help)
    }

    /// Seconds: 1 ms to about 2 minutes.
    static let secondsBuckets: [Double] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]

    public init() {
        committed = registry.makeCounter(descriptor: Self.name("snapshot_rounds_committed", "total", "Snapshot rounds committed."))
        aborted = registry.makeCounter(descriptor: Self.name("snapshot_rounds_aborted", "total", "Snapshot rounds aborted."))
        commitLatency = registry.makeValueHistogram(
            descriptor: Self.name("commit_latency", "seconds", "From a round's first protected report to its commit."), buckets: Self.secondsBuckets)
        blocked = registry.makeValueHistogram(
            descriptor: Self.name("snapshot_blocked", "seconds", "Training time blocked per snapshot, as the workers report it."),
            buckets: Self.secondsBuckets)
        stepsLost = registry.makeCounter(descriptor: Self.name("steps_lost", "total", "Steps computed again after recoveries."))
        stepsSinceCommit = registry.makeGauge(descriptor: Self.name("steps_since_commit", "", "Steps the furthest worker ran past the committed step (the RPO in steps)."))
        committedStep = registry.makeGauge(descriptor: Self.name("committed_step", "", "The last committed step (-1: none)."))
        epoch = registry.makeGauge(descriptor: Self.name("epoch", "", "The coordinator's epoch."))
        persistedStep = registry.makeGauge(descriptor: Self.name("persisted_step", "", "The newest step every node wrote to disk (-1: none)."))
        durableStep = registry.makeGauge(descriptor: Self.name("durable_step", "", "The newest step recoverable from disk (-1: none)."))
        persistErrors = registry.makeGauge(descriptor: Self.name("persist_errors", "", "Nodes whose last persist failed."))
        for kind in ["smp", "worker", "coordinator"] { _ = failureCounter(kind) }
        for phase in CoordinatorInstance.Phase.allCases { _ = phaseHistogram(phase.rawValue) }
    }

    private func failureCounter(_ kind: String) -> Counter {
        if let c = failures[kind] { return c }
        let c = registry.makeCounter(descriptor: Self.name("failures", "total", "Failures detected, by kind of member."), labels: [("kind", kind)])
        failures[kind] = c
        return c
    }

    private func phaseHistogram(_ phase: String) -> ValueHistogram {
        if let h = phases[phase] { return h }
        let h = registry.makeValueHistogram(descriptor: Self.name("recovery_phase", "seconds", "Recovery phase durations."),
                                            labels: [("phase", phase)], buckets: Self.secondsBuckets)
        phases[phase] = h
        return h
    }

    /// Counts what an observation found.
    public func record(_ changes: JobObserver.Changes) {
        lock.withLock {
            if changes.roundsCommitted > 0 { committed.increment(by: Int64(changes.roundsCommitted)) }
            if changes.roundsAborted > 0 { aborted.increment(by: Int64(changes.roundsAborted)) }
            for l in changes.commitLatencies where l.isFinite { commitLatency.record(max(0, l)) }
            for kind in changes.failures { failureCounter(kind).increment() }
            for (phase, seconds) in changes.phases where seconds.isFinite { phaseHistogram(phase).record(max(0, seconds)) }
            if changes.stepsLost > 0 { stepsLost.increment(by: Int64(changes.stepsLost)) }
        }
    }

    /// Sets the gauges from the core's view, and turns the workers' cumulative
    /// snapshot counters into per-snapshot blocked-time observations.
    public func update(from c: CoordinatorInstance) {
        lock.withLock {
            let furthest = c.workers.values.map(\.step).max() ?? 0
            stepsSinceCommit.set(to: Double(max(0, furthest - (c.committedStep ?? 0))))
            committedStep.set(to: Double(c.committedStep ?? -1))
            epoch.set(to: Double(c.epoch))
            persistedStep.set(to: Double(c.persistedStep ?? -1))
            durableStep.set(to: Double(c.durableStep ?? -1))
            persistErrors.set(to: Double(c.persistErrors.count))
            for n in c.nodes.values {
                registry.makeGauge(descriptor: Self.name("node_protected", "bytes", "The node's image, protected by erasure coding."),
                                   labels: [("node", n.id)]).set(to: Double(n.dataBytes))
                registry.makeGauge(descriptor: Self.name("node_parity", "bytes", "Parity the node holds."),
                                   labels: [("node", n.id)]).set(to: Double(n.parityBytes))
                registry.makeGauge(descriptor: Self.name("node_shared_memory", "bytes", "Shared memory the node's SMP has in use."),
                                   labels: [("node", n.id)]).set(to: Double(n.sharedMemoryBytes))
            }
            var groups: [Int: String] = [:]
            for n in c.nodes.values { if let h = c.ecHealth(of: n.id) { groups[h.group] = h.health } }
            for (g, health) in groups {
                for state in ["ok", "degraded", "lost"] {
                    registry.makeGauge(descriptor: Self.name("ec_group_health", "", "1 for the EC group's state (ok, degraded, lost), 0 otherwise."),
                                       labels: [("group", "\(g)"), ("state", state)]).set(to: health == state ? 1 : 0)
                }
            }
            for state in CoordinatorInstance.JobState.allCases {
                registry.makeGauge(descriptor: Self.name("job_state", "", "1 for the job's state, 0 otherwise."),
                                   labels: [("state", state.rawValue)]).set(to: c.state == state ? 1 : 0)
            }
            for w in c.workers.values {
                let key = w.info.key
                let now = (w.snapshots, w.blockedSeconds)
                if let last = lastBlocked[key], now.0 > last.0, now.1 >= last.1 {
                    // The blocked time of the snapshots since the last heartbeat, shared evenly.
                    let each = (now.1 - last.1) / Double(now.0 - last.0)
                    for _ in 0..<min(now.0 - last.0, 64) { blocked.record(each) }
                }
                lastBlocked[key] = now
            }
        }
    }

    /// The exposition text (Prometheus text format 0.0.4).
    public func exposition() -> String { lock.withLock { registry.emitToString() } }
}
