import CPlatform
#if canImport(Glibc)
import Glibc
#endif

/// Scheduling for the threads that carry heartbeats (ARCHITECTURE.md: heartbeats
/// never queue behind bulk work). On a host whose cores are busy copying,
/// folding and training, a sleeping thread that wakes to send a heartbeat
/// can wait for a core for hundreds of milliseconds; a thread with a
/// real-time policy does not. These threads sleep in `poll` almost all the
/// time, so a real-time priority costs the rest of the host nothing.
///
/// Two levels: heartbeat threads (`heartbeat`, priority 2) outrank the
/// coordinator's event loop (`eventLoop`, priority 1), which also runs
/// real-time so that its detector turns on time, but which can be busy for a
/// while (a recovery's bookkeeping, a status reply): at one level, a
/// heartbeat thread that woke behind it on a full host would wait out its
/// 100 ms round-robin slice.
public enum ThreadPriority {
    /// How the calling thread now runs.
    public enum Outcome: Sendable, Equatable, CustomStringConvertible {
        /// SCHED_RR at this priority.
        case realTime(Int32)
        /// A raised nice value (the real-time policy was refused).
        case nice(Int32)
        /// Unchanged, with the reason.
        case unchanged(SystemError)

        public var description: String {
            switch self {
            case .realTime(let p): "real-time (SCHED_RR \(p))"
            case .nice(let n): "nice \(n)"
            case .unchanged(let e): "unchanged (\(e))"
            }
        }
    }

    /// The real-time priority of threads that carry heartbeats.
    public static let heartbeat: Int32 = 2
    /// The real-time priority of the coordinator's event loop, below heartbeats.
    public static let eventLoop: Int32 = 1

    /// Raises the calling thread: SCHED_RR at `priority` where allowed (root or
    /// CAP_SYS_NICE), otherwise the lowest nice value allowed down to -10.
    /// `FT_NO_RT_HEARTBEATS=1` leaves it unchanged.
    @discardableResult
    public static func raiseCurrentThread(priority: Int32 = heartbeat) -> Outcome {
        if getenv("FT_NO_RT_HEARTBEATS").map({ String(cString: $0) }) == "1" {
            return .unchanged(SystemError("FT_NO_RT_HEARTBEATS=1", errno: 0))
        }
        var param = sched_param()
        param.sched_priority = priority
        let rc = pthread_setschedparam(pthread_self(), SCHED_RR, &param)
        if rc == 0 { return .realTime(priority) }
        let tid = id_t(ft_gettid())
        for value in stride(from: Int32(-10), through: -1, by: 3) where setpriority(__priority_which_t(PRIO_PROCESS.rawValue), tid, value) == 0 {
            return .nice(value)
        }
        return .unchanged(SystemError("pthread_setschedparam(SCHED_RR)", errno: rc))
    }

    /// Lowers the calling thread to nice 19, for bulk work that must not take
    /// a core from training or from the snapshot copies (the persist thread:
    /// on 2 cores at normal priority it stretched snapshot rounds and blocked
    /// training for 0.05-0.25 of a copy; at nice 19, 0.0003). Returns the
    /// nice value in force.
    @discardableResult
    public static func lowerCurrentThread() -> Int32 {
        let tid = id_t(ft_gettid())
        let which = __priority_which_t(PRIO_PROCESS.rawValue)
        _ = setpriority(which, tid, 19)
        errno = 0
        return getpriority(which, tid)
    }
}
