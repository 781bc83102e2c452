/// The one shape of every error the project throws: a stable `code` for
/// programs and a `message` for people.
///
/// A code is snake_case and, once published in a reply, a log line or a JSON
/// field, keeps its meaning. Callers and tests branch on the code, never on
/// the text, which may be reworded at any time. Each error type lists its
/// codes as a `String`-backed enum beside its own doc comment. `description`
/// is for people (some types prefix the code, `CodedMessage` is the message
/// alone); where a program reads the code, print `codeName` with it.
public protocol CodedError: Error, Sendable, CustomStringConvertible {
    associatedtype Code: RawRepresentable & Hashable & Sendable where Code.RawValue == String
    var code: Code { get }
    /// A sentence that names what was refused and why.
    var message: String { get }
}

extension CodedError {
    /// The code as it appears on the wire, in logs and in JSON.
    public var codeName: String { code.rawValue }
}

/// The stable code of any error: a `CodedError`'s, or `"unexpected"` for an
/// error of a library that does not have one (the caller logs its text).
public func errorCode(_ error: any Error) -> String {
    (error as? any CodedError)?.codeName ?? "unexpected"
}

/// An error that is a code and a message and nothing else. Error types whose
/// codes need no other field are this over their own code enum
/// (`typealias SMPError = CodedMessage<SMPErrorCode>`), so that each keeps a
/// distinct type for typed throws and `catch` without repeating the storage.
public struct CodedMessage<Code: RawRepresentable & Hashable & Sendable>: CodedError, Equatable where Code.RawValue == String {
    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }
}
