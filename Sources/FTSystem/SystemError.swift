#if canImport(Glibc)
import Glibc
#endif

/// A failed system call: what was being done, the errno, and the OS's text.
public struct SystemError: Error, Sendable, Equatable, CustomStringConvertible {
    public var operation: String
    public var errno: Int32

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
