import CPlatform
#if canImport(Glibc)
import Glibc
#endif

/// Scheduling for the threads that carry heartbeats (DESIGN.md: heartbeats
/// never queue behind bulk work). On a host whose cores are busy copying,
/// folding and training, a sleeping thread that wakes to send a heartbeat
/// can wait for a core for hundreds of milliseconds; a thread with a
/// real-time policy does not. These threads sleep in `poll` almost all the
/// time, so the lowest real-time priority costs the rest of the host nothing.
public enum ThreadPriority {
    /// How the calling thread now runs.
    public enum Outcome: Sendable, Equatable, CustomStringConvertible {
        /// SCHED_RR at priority 1.
        case realTime
        /// A raised nice value (the real-time policy was refused).
        case nice(Int32)
        /// Unchanged, with the reason.
        case unchanged(SystemError)

        public var description: String {
            switch self {
            case .realTime: "real-time (SCHED_RR 1)"
            case .nice(let n): "nice \(n)"
            case .unchanged(let e): "unchanged (\(e))"
            }
        }
    }

    /// Raises the calling thread: SCHED_RR priority 1 where allowed (root or
    /// CAP_SYS_NICE), otherwise the lowest nice value allowed down to -10.
    /// `FT_NO_RT_HEARTBEATS=1` leaves it unchanged.
    @discardableResult
    public static func raiseCurrentThread() -> Outcome {
        if getenv("FT_NO_RT_HEARTBEATS").map({ String(cString: $0) }) == "1" {
            return .unchanged(SystemError("FT_NO_RT_HEARTBEATS=1", errno: 0))
        }
        var param = sched_param()
        param.sched_priority = 1
        let rc = pthread_setschedparam(pthread_self(), SCHED_RR, &param)
        if rc == 0 { return .realTime }
        let tid = id_t(ft_gettid())
        for value in stride(from: Int32(-10), through: -1, by: 3) where setpriority(__priority_which_t(PRIO_PROCESS.rawValue), tid, value) == 0 {
            return .nice(value)
        }
        return .unchanged(SystemError("pthread_setschedparam(SCHED_RR)", errno: rc))
    }
}
