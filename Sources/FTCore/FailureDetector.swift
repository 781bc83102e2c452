/// Heartbeat failure detection as a value type (ARCHITECTURE.md, "Failure
/// detection"): members are heard from, time passes, and `tick(now:)` says who
/// died. No clock reads: `now` is seconds on any monotonic clock.
///
/// A member silent for more than two intervals is *suspect* (shown by
/// `ftctl status`); silent for longer than the effective timeout it is
/// *dead*, reported once and no longer tracked. A death reported by someone
/// else (an SMP that saw its child exit) is immediate: `forget` the member and
/// act on the report.
///
/// **The observer can be the slow one.** A detector whose own loop stalled (a
/// SIGSTOP, an overloaded host, a VM pause) cannot tell a silent member from
/// heartbeats it has not read yet. So every `tick` measures the gap since the
/// previous one; a gap longer than `stallThreshold` is the *observer's* stall:
/// that tick declares nobody, and every tracked member gets a fresh grace
/// period (silence counts again from now), which leaves the shell time to
/// drain what queued up meanwhile. Like Lifeguard's local health multiplier
/// (HashiCorp memberlist), each stall also raises `localHealth`, and the
/// effective timeout is `timeout × (1 + localHealth)`: an observer that keeps
/// missing its own deadlines is slower to accuse. `localHealth` falls by one
/// after each `healthDecay` seconds without a stall.
///
/// **The observer can be the one cut off.** With `isolationLimit` set, a
/// tick that finds a member past the timeout while *no* tracked member (of
/// two or more) was heard for half the timeout declares nobody: members that
/// die one by one are declared while the others still talk, so a silence
/// that fell on all of them together is the observer's own link (a
/// partition of the coordinator's host) far more often than every host dying
/// in the same instant. The detector is *isolated*: it reports that, and
/// keeps every member tracked. The first member heard again ends
/// it, as a stall ends: every member gets a fresh grace period and
/// `localHealth` rises, so one that really died meanwhile is declared a
/// timeout later. An isolation that lasts `isolationLimit` seconds is taken
/// for what it looks like: every member is declared.
public struct FailureDetectorInstance: Sendable {
    public enum Liveness: String, Sendable {
        case alive, suspect
    }

    /// What one tick found.
    public struct Tick: Sendable, Equatable {
        /// Members silent for longer than the effective timeout, longest silence first.
        public var dead: [Death] = []
        /// The observer's own gap, when this tick found it stalled (nobody is declared then).
        public var stalledFor: Double?
        /// How long every member has been silent, while the observer is isolated (nobody is declared then).
        public var isolatedFor: Double?
        /// How long the isolation lasted, at the tick that found a member heard again.
        public var isolationEnded: Double?
    }

    public struct Death: Sendable, Equatable {
        public var id: String
        public var silentFor: Double
    }

    public let interval: Double
    public let timeout: Double
    /// A gap between ticks longer than this is the observer's stall.
    public let stallThreshold: Double
    /// Seconds without a stall after which `localHealth` falls by one.
    public let healthDecay: Double
    public static let maxLocalHealth = 4
    /// Seconds every member may be silent at once before they are declared
    /// (the observer isolated meanwhile); nil: no isolation, members are
    /// declared as they time out.
    public var isolationLimit: Double?
    /// When the observer found itself cut off from every member.
    public private(set) var isolatedSince: Double?

    private var lastHeard: [String: Double] = [:]
    private var lastTick: Double?
    private var healthChangedAt = 0.0
    /// 0 when healthy; raised by each stall of the observer (at most `maxLocalHealth`).
    public private(set) var localHealth = 0
    /// Stalls seen so far, and the longest gap between two ticks.
    public private(set) var stalls = 0
    public private(set) var largestGap = 0.0

    /// `stallThreshold` defaults to half the timeout: a loop that could not
    /// look for half the timeout may have missed the heartbeats that matter.
    public init(interval: Double = 0.1, timeout: Double = 0.5, stallThreshold: Double? = nil, healthDecay: Double? = nil) {
        precondition(interval > 0 && timeout > interval, "heartbeat timeout must exceed the interval")
        self.interval = interval
        self.timeout = timeout
        self.stallThreshold = stallThreshold ?? timeout / 2
        self.healthDecay = healthDecay ?? max(10, 20 * timeout)
        precondition(self.stallThreshold > 0 && self.healthDecay > 0)
    }

    /// The timeout in force: `timeout × (1 + localHealth)`.
    public var effectiveTimeout: Double { timeout * Double(1 + localHealth) }

    /// Starts tracking `id` (or refreshes it): heard from at `now`.
    public mutating func heard(_ id: String, now: Double) {
        lastHeard[id] = max(lastHeard[id] ?? now, now)
    }

    public mutating func forget(_ id: String) {
        lastHeard[id] = nil
    }

    public func isTracked(_ id: String) -> Bool { lastHeard[id] != nil }

    public func lastHeard(_ id: String) -> Double? { lastHeard[id] }

    public func liveness(_ id: String, now: Double) -> Liveness? {
        guard let t = lastHeard[id] else { return nil }
        return now - t > 2 * interval ? .suspect : .alive
    }

    /// Time passes. Members silent for longer than the effective timeout are
    /// reported (longest silence first) and no longer tracked, unless the
    /// observer itself stalled since the previous tick.
    public mutating func tick(now: Double) -> Tick {
        let gap = lastTick.map { now - $0 } ?? 0
        lastTick = max(lastTick ?? now, now)
        largestGap = max(largestGap, gap)
        if gap > stallThreshold {
            stalls += 1
            localHealth = min(Self.maxLocalHealth, localHealth + 1)
            healthChangedAt = now
            for id in lastHeard.keys { lastHeard[id] = max(lastHeard[id]!, now) }
            return Tick(dead: [], stalledFor: gap)
        }
        if localHealth > 0, now - healthChangedAt > healthDecay {
            localHealth -= 1
            healthChangedAt = now
        }
        let limit = effectiveTimeout
        let newest = lastHeard.values.max() ?? now
        if let since = isolatedSince {
            if newest < since, lastHeard.count >= 2 {
                if let cap = isolationLimit, now - since < cap { return Tick(isolatedFor: now - since) }
                isolatedSince = nil  // past the limit: declared below like any silence
            } else {
                // Someone was heard: the cut is mended. Silence counts again from now.
                isolatedSince = nil
                localHealth = min(Self.maxLocalHealth, localHealth + 1)
                healthChangedAt = now
                for id in lastHeard.keys { lastHeard[id] = max(lastHeard[id]!, now) }
                return Tick(isolationEnded: now - since)
            }
        } else if let cap = isolationLimit, cap > 0, lastHeard.count >= 2, now - newest > limit / 2,
                  lastHeard.values.contains(where: { now - $0 > limit }) {
            // Someone timed out, and nobody at all was heard for half the timeout: the silence is ours.
            isolatedSince = now
            return Tick(isolatedFor: 0)
        }
        let dead = lastHeard.filter { now - $0.value > limit }
            .map { Death(id: $0.key, silentFor: now - $0.value) }
            .sorted { $0.silentFor > $1.silentFor || ($0.silentFor == $1.silentFor && $0.id < $1.id) }
        for d in dead { lastHeard[d.id] = nil }
        return Tick(dead: dead)
    }
}
