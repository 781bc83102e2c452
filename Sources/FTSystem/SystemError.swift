#if canImport(Glibc)
import Glibc
#endif
import FTCore

/// A failed system call: what was being done, the errno, and the OS's text.
/// Its code is the errno's name in lower case (`enoent`, `enospc`), or
/// `errno_N` for one without a name here.
public struct SystemError: CodedError, Equatable {
    public var operation: String
    public var errno: Int32

    public struct Code: RawRepresentable, Hashable, Sendable {
        public let rawValue: String
        public init(rawValue: String) { self.rawValue = rawValue }
    }

    public var code: Code { Code(rawValue: Self.names[errno] ?? "errno_\(errno)") }

    static let names: [Int32: String] = [
        EPERM: "eperm", ENOENT: "enoent", ESRCH: "esrch", EINTR: "eintr", EIO: "eio", E2BIG: "e2big", EBADF: "ebadf",
        ECHILD: "echild", EAGAIN: "eagain", ENOMEM: "enomem", EACCES: "eacces", EFAULT: "efault", EBUSY: "ebusy",
        EEXIST: "eexist", ENOTDIR: "enotdir", EISDIR: "eisdir", EINVAL: "einval", ENFILE: "enfile", EMFILE: "emfile",
        EFBIG: "efbig", ENOSPC: "enospc", EROFS: "erofs", EPIPE: "epipe", ERANGE: "erange", ENOSYS: "enosys",
        ENOTEMPTY: "enotempty", ENAMETOOLONG: "enametoolong", EADDRINUSE: "eaddrinuse", ECONNREFUSED: "econnrefused",
        ECONNRESET: "econnreset", ETIMEDOUT: "etimedout", EOVERFLOW: "eoverflow",
    ]

    public init(_ operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var message: String { String(cString: strerror(errno)) }
    public var description: String { "\(operation): \(message) (errno \(errno))" }
}

/// Runs a call that returns -1 and sets errno on failure; retries on EINTR.
@discardableResult
@inline(__always)
func sys<T: BinaryInteger>(_ operation: @autoclosure () -> String, _ body: () -> T) throws(SystemError) -> T {
    while true {
        let rc = body()
        if rc != -1 { return rc }
        let err = errno
        if err == EINTR { continue }
        throw SystemError(operation(), errno: err)
    }
}
