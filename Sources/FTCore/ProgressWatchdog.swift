/// The step-progress watchdog (ARCHITECTURE.md, "Failure detection": a hang is a
/// failure). A worker can be alive, its heartbeats flowing, while its training
/// is stuck: a deadlocked collective, a stuck kernel. This value type learns
/// how long the job's steps take and says when steps stopped completing for
/// longer than a bound derived from them, and which rank holds the others up.
///
/// It is fed the job's step (the smallest step every running worker has
/// completed: data-parallel ranks advance together) with `now`. The bound is
/// `max(floor, multiplier × p99)` of the per-step durations seen (the last
/// `window` of them); until `warmupSteps` durations are known it is
/// `max(floor, initialBound)`. Time the job is not running (a recovery, the
/// coordinator's own stall) does not count: `restart(now:)` after a resume,
/// `shift(by:)` after a stall of the observer.
public struct ProgressWatchdog: Sendable {
    public struct Settings: Sendable, Equatable {
        /// The bound never goes below this (seconds).
        public var floor: Double = 3
        /// The bound is this many times the p99 step time.
        public var multiplier: Double = 5
        /// Step durations needed before the learned bound applies.
        public var warmupSteps = 5
        /// The bound before that (seconds).
        public var initialBound: Double = 30
        /// Durations remembered.
        public var window = 256

        public init() {}
    }

    public let settings: Settings
    private var durations: [Double] = []
    private var next = 0
    private var step: Int?
    private var progressAt: Double?
    /// The first advance after a restart includes the restart itself: not a step time.
    private var skipNext = true

    public init(settings: Settings = Settings()) {
        precondition(settings.floor > 0 && settings.multiplier >= 1 && settings.window > 0 && settings.warmupSteps >= 1)
        self.settings = settings
    }

    /// The job runs again (from a resume): progress is measured from `now`.
    public mutating func restart(now: Double) {
        step = nil
        progressAt = now
        skipNext = true
    }

    /// The job stopped running (a recovery): nothing is overdue until `restart`.
    public mutating func pause() {
        step = nil
        progressAt = nil
    }

    /// The observer stalled for `seconds`: that time is not the job's.
    public mutating func shift(by seconds: Double) {
        if let t = progressAt { progressAt = t + seconds }
    }

    /// The job has completed `jobStep` at `now`.
    public mutating func observe(jobStep: Int, now: Double) {
        guard let at = progressAt else { return }
        guard let last = step else {
            step = jobStep
            return
        }
        guard jobStep > last else { return }
        if skipNext {
            skipNext = false
        } else {
            let perStep = (now - at) / Double(jobStep - last)
            if durations.count < settings.window { durations.append(perStep) } else { durations[next] = perStep }
            next = (next + 1) % settings.window
            p99 = Self.percentile99(durations)
        }
        step = jobStep
        progressAt = now
    }

    /// The 99th percentile (nearest rank) of `values`: the k-th largest for a
    /// small k, found without sorting (it is recomputed at every step).
    static func percentile99(_ values: [Double]) -> Double {
        let rank = min(values.count, Int((Double(values.count) * 0.99).rounded(.up)))  // 1-based, ascending
        let k = values.count - rank + 1  // that value is the k-th largest
        var top: [Double] = []  // the k largest so far, descending
        top.reserveCapacity(k + 1)
        for v in values where top.count < k || v > top[top.count - 1] {
            let i = top.firstIndex { v > $0 } ?? top.count
            top.insert(v, at: i)
            if top.count > k { top.removeLast() }
        }
        return top[k - 1]
    }

    /// The p99 of the step durations seen (nil before any), updated as they come.
    public private(set) var p99: Double?

    /// How long steps may stop completing before the job is hung.
    public var bound: Double {
        guard durations.count >= settings.warmupSteps, let p99 else { return max(settings.floor, settings.initialBound) }
        return max(settings.floor, settings.multiplier * p99)
    }

    /// Seconds since the last completed step, when longer than the bound.
    public func overdue(now: Double) -> Double? {
        guard let at = progressAt, now - at > bound else { return nil }
        return now - at
    }

    /// One worker as the watchdog sees it.
    public struct Rank: Sendable, Equatable {
        public var key: String
        public var rank: Int
        public var step: Int
        public var activity: WorkerActivity

        public init(key: String, rank: Int, step: Int, activity: WorkerActivity) {
            self.key = key
            self.rank = rank
            self.step = step
            self.activity = activity
        }
    }

    public enum Verdict: Sendable, Equatable {
        /// This rank holds the others up.
        case culprit(key: String, reason: String)
        /// Not a worker's hang: the job waits for a snapshot round or for the coordinator.
        case notAWorker(reason: String)
    }

    /// Which rank holds the job up. Ranks blocked in a collective name the
    /// rank they wait for; following those waits leads to the rank that is
    /// not waiting for anyone: computing (the culprit), or waiting for a
    /// snapshot round or the coordinator (not a worker's hang). A cycle of
    /// waits (a deadlocked collective) names its rank furthest behind. Ranks
    /// that say nothing useful are judged by step (furthest behind), then by
    /// time in their activity (longest).
    public static func culprit(_ ranks: [Rank]) -> Verdict? {
        guard !ranks.isEmpty else { return nil }
        let byRank = Dictionary(ranks.map { ($0.rank, $0) }, uniquingKeysWith: { a, _ in a })
        var terminals: [Rank] = []
        var cycles: [[Rank]] = []
        for start in ranks.sorted(by: { $0.rank < $1.rank }) {
            var seen: [Int] = []
            var current = start
            while current.activity.kind == .collective, let next = byRank[current.activity.waitingOn], !seen.contains(current.rank) {
                seen.append(current.rank)
                current = next
            }
            if current.activity.kind == .collective, seen.contains(current.rank) {
                cycles.append(seen.compactMap { byRank[$0] })
            } else {
                terminals.append(current)
            }
        }
        func describe(_ r: Rank) -> String {
            let a = r.activity
            let what = a.kind == .collective ? "waiting in a collective for rank \(a.waitingOn)" : a.kind.name
            return "rank \(r.rank) (\(r.key)) has been \(what) for \(a.milliseconds) ms after step \(r.step)"
        }
        // Where the waits end decides.
        let ends = Dictionary(terminals.map { ($0.rank, $0) }, uniquingKeysWith: { a, _ in a }).values
        if let waiting = ends.first(where: { $0.activity.kind == .snapshotWait || $0.activity.kind == .held }) {
            return .notAWorker(reason: describe(waiting))
        }
        let computing = ends.filter { $0.activity.kind == .computing || $0.activity.kind == .restoring }
        if let worst = computing.max(by: { ($0.activity.milliseconds, -$0.rank) < ($1.activity.milliseconds, -$1.rank) }) {
            return .culprit(key: worst.key, reason: describe(worst))
        }
        let pool = cycles.first ?? Array(ends) + ranks
        let behind = pool.min { ($0.step, -$0.activity.milliseconds, $0.rank) < ($1.step, -$1.activity.milliseconds, $1.rank) }!
        return .culprit(key: behind.key, reason: describe(behind) + (cycles.isEmpty ? "" : " (a cycle of collective waits)"))
    }
}
