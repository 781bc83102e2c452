/// Heartbeat failure detection as a value type (DESIGN.md, "Failure
/// detection"): members are heard from, time passes, and `tick(now:)` says who
/// died. No clock reads: `now` is seconds on any monotonic clock.
///
/// A member silent for more than two intervals is *suspect* (shown by
/// `ftctl status`); silent for more than `timeout` it is *dead*, reported once
/// and no longer tracked. A death reported by someone else (an SMP that saw
/// its child exit) is immediate: `forget` the member and act on the report.
public struct FailureDetectorInstance: Sendable {
    public enum Liveness: String, Sendable {
        case alive, suspect
    }

    public let interval: Double
    public let timeout: Double
    private var lastHeard: [String: Double] = [:]

    public init(interval: Double = 0.1, timeout: Double = 0.5) {
        precondition(interval > 0 && timeout > interval, "heartbeat timeout must exceed the interval")
        self.interval = interval
        self.timeout = timeout
    }

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

    /// Members silent for longer than the timeout, with how long they were
    /// silent, oldest first. They are no longer tracked.
    public mutating func tick(now: Double) -> [(id: String, silentFor: Double)] {
        let dead = lastHeard.filter { now - $0.value > timeout }
            .map { (id: $0.key, silentFor: now - $0.value) }
            .sorted { $0.silentFor > $1.silentFor || ($0.silentFor == $1.silentFor && $0.id < $1.id) }
        for d in dead { lastHeard[d.id] = nil }
        return dead
    }
}
