import CFTWorker
import FTCore
import FTWorker

/// A failure of the C interface's own (an argument, the order of calls, the
/// environment), handed back as an ft status and its sentence. Its codes are
/// the snake_case names of the statuses (`FT_E_INVALID_ARGUMENT` is
/// `invalid_argument`), so the project's one error vocabulary (`CodedError`)
/// covers this boundary too.
struct ABIFailure: CodedError {
    enum Code: String, Sendable, CaseIterable {
        case invalidArgument = "invalid_argument"
        case misuse
        case noEnvironment = "no_environment"
        case transport

        /// The stable C status of the code.
        var status: Int32 {
            switch self {
            case .invalidArgument: FT_E_INVALID_ARGUMENT
            case .misuse: FT_E_MISUSE
            case .noEnvironment: FT_E_NO_ENVIRONMENT
            case .transport: FT_E_TRANSPORT
            }
        }
    }

    var code: Code
    var message: String

    init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    var status: Int32 { code.status }
    var description: String { "\(code.rawValue): \(message)" }

    static func invalid(_ m: String) -> ABIFailure { ABIFailure(.invalidArgument, m) }
    static func misuse(_ m: String) -> ABIFailure { ABIFailure(.misuse, m) }
}

extension SnapshotError.Code {
    /// The stable C status of each worker-library error code.
    var abiStatus: Int32 {
        switch self {
        case .refused: FT_E_REFUSED
        case .corrupt: FT_E_CORRUPT
        case .timeout: FT_E_TIMEOUT
        case .transport: FT_E_TRANSPORT
        case .misuse: FT_E_MISUSE
        case .interrupted: FT_E_INTERRUPTED
        }
    }
}

/// The one funnel every exported function goes through: runs `body`, turns
/// whatever it throws into a status and this thread's `ft_last_error()`.
func abiCall(_ body: () throws -> Void) -> Int32 {
    do {
        try body()
        return FT_OK
    } catch let f as ABIFailure {
        return fail(f.status, f.message)
    } catch let e as SnapshotError {
        return fail(e.code.abiStatus, e.smpCode.map { "\(e.message) [SMP code \($0)]" } ?? e.message)
    } catch {
        return fail(FT_E_TRANSPORT, "\(error)")
    }
}

private func fail(_ status: Int32, _ message: String) -> Int32 {
    message.withCString { ft__set_last_error($0) }
    return status
}

/// The object behind an opaque handle, or a failure naming the argument.
func object<T: AnyObject>(_ handle: OpaquePointer?, _ what: String) throws -> T {
    guard let handle else { throw ABIFailure.invalid("\(what) is NULL") }
    return Unmanaged<T>.fromOpaque(UnsafeRawPointer(handle)).takeUnretainedValue()
}

/// Hands `value` out as an opaque handle (released by `release`).
func handle<T: AnyObject>(_ value: T) -> OpaquePointer {
    OpaquePointer(Unmanaged.passRetained(value).toOpaque())
}

func release<T: AnyObject>(_ handle: OpaquePointer?, as: T.Type) {
    guard let handle else { return }
    Unmanaged<T>.fromOpaque(UnsafeRawPointer(handle)).release()
}

/// Writes `value` through an out pointer that must not be NULL.
func store<T>(_ value: T, _ pointer: UnsafeMutablePointer<T>?, _ what: String) throws {
    guard let pointer else { throw ABIFailure.invalid("\(what) is NULL") }
    pointer.pointee = value
}
