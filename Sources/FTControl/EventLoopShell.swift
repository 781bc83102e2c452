import FTSystem
import FTZMQ
import Foundation

/// The part of an event loop that the coordinator and the SMP share: a stop
/// pipe that any thread may write to (`stop()`), and, in a process of its
/// own, SIGTERM and SIGINT taken through a signalfd. `poll` waits on the
/// caller's items plus these and says whether to stop; what the loop does
/// with its own items (sockets, pidfds) stays in the server.
///
/// It owns the pipe's two descriptors and the signal mask's watcher; it
/// knows nothing of the server's state.
public final class EventLoopShell: @unchecked Sendable {
    /// Why `poll` says to stop.
    public enum StopReason: Sendable, Equatable, CustomStringConvertible {
        /// `stop()` was called.
        case requested
        /// A watched signal arrived.
        case signal(Int32)

        public var description: String {
            switch self {
            case .requested: "on request"
            case .signal(let s): "on signal \(s)"
            }
        }
    }

    private let stopPipe: (read: Int32, write: Int32)
    private let signals: SignalWatcher?

    /// `watchSignals`: take SIGTERM/SIGINT (blocked for the process) through a
    /// signalfd; leave it off for a server running inside another process.
    public init(watchSignals: Bool) throws {
        signals = watchSignals ? try SignalWatcher(signals: [SIGTERM, SIGINT]) : nil
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw SystemError("pipe", errno: errno) }
        stopPipe = (fds[0], fds[1])
    }

    deinit {
        close(stopPipe.read)
        close(stopPipe.write)
    }

    /// Asks the loop to stop, from any thread (one byte on the pipe).
    public func stop() {
        var b: UInt8 = 1
        _ = write(stopPipe.write, &b, 1)
    }

    /// Waits up to `timeoutMilliseconds` for any of `items`, the stop pipe or a
    /// signal. Returns the readiness of `items` (same order, same count), and a
    /// reason when the loop should stop instead of handling them.
    public func poll(_ items: [ZMQPoller.Item], timeoutMilliseconds: Int) throws -> (ready: [ZMQPoller.Ready], stop: StopReason?) {
        var all = items
        all.append(.init(fileDescriptor: stopPipe.read, .readable))
        if let signals { all.append(.init(fileDescriptor: signals.fd, .readable)) }
        let ready = try ZMQPoller.poll(all, timeoutMilliseconds: timeoutMilliseconds)
        let callers = Array(ready.prefix(items.count))
        if ready[items.count].isReadable { return (callers, .requested) }
        if let signals, ready[items.count + 1].isReadable, let sig = signals.next() { return (callers, .signal(sig)) }
        return (callers, nil)
    }
}
