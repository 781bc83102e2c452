import CZMQ
import FTCore
#if canImport(Glibc)
import Glibc
#endif

/// A failed ZeroMQ call or key-file operation: a stable `code`, the C `errno`
/// it came from (0 when it did not come from C), the operation that failed,
/// and a message for people.
public struct ZMQError: CodedError, Equatable {
    public enum Code: String, Sendable, Equatable {
        /// Non-blocking call with nothing to do now (EAGAIN), or a timeout.
        case wouldBlock = "would_block"
        /// The context was terminated (ETERM): shut down.
        case contextTerminated = "context_terminated"
        /// A signal interrupted the call (EINTR).
        case interrupted = "interrupted"
        /// ROUTER_MANDATORY and no peer with that routing id (EHOSTUNREACH).
        case hostUnreachable = "host_unreachable"
        /// bind: the address is taken (EADDRINUSE).
        case addressInUse = "address_in_use"
        /// An endpoint ZeroMQ does not understand (EINVAL, EPROTONOSUPPORT, ENOENT...).
        case invalidEndpoint = "invalid_endpoint"
        /// Any other errno from libzmq.
        case system = "system"
        /// A key file that others may read (mode must be 0600 or stricter).
        case insecureKeyFile = "insecure_key_file"
        /// A key file that cannot be read or written.
        case keyFileIO = "key_file_io"
        /// A key or key file that is not well-formed.
        case invalidKey = "invalid_key"
        /// This libzmq lacks a capability (e.g. CURVE).
        case unsupported = "unsupported"
    }

    public var code: Code
    /// The errno that libzmq or the OS reported, 0 if none.
    public var errno: Int32
    /// What was being done, e.g. `"bind tcp://127.0.0.1:5555"`.
    public var operation: String
    public var message: String

    public init(_ code: Code, errno: Int32 = 0, operation: String, message: String) {
        self.code = code
        self.errno = errno
        self.operation = operation
        self.message = message
    }

    public var description: String {
        errno == 0
            ? "zmq \(code.rawValue) in \(operation): \(message)"
            : "zmq \(code.rawValue) in \(operation): \(message) (errno \(errno))"
    }

    /// The error for the current `zmq_errno()`.
    static func last(_ operation: @autoclosure () -> String) -> ZMQError {
        fromErrno(ft_zmq_errno(), operation())
    }

    static func fromErrno(_ err: Int32, _ operation: String) -> ZMQError {
        let code: Code
        switch err {
        case EAGAIN: code = .wouldBlock
        case ETERM: code = .contextTerminated
        case EINTR: code = .interrupted
        case EHOSTUNREACH: code = .hostUnreachable
        case EADDRINUSE: code = .addressInUse
        case EPROTONOSUPPORT, ENOENT, EADDRNOTAVAIL, ENODEV: code = .invalidEndpoint
        default: code = .system
        }
        return ZMQError(code, errno: err, operation: operation, message: String(cString: zmq_strerror(err)))
    }
}

/// Runs a libzmq call that returns -1 on failure; every call goes through here.
@discardableResult
@inline(__always)
func zmqCall(_ operation: @autoclosure () -> String, _ body: () -> Int32) throws(ZMQError) -> Int32 {
    let rc = body()
    if rc == -1 { throw ZMQError.last(operation()) }
    return rc
}
