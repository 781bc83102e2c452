import FTCore

/// A failure of the erasure codec: a stable `code`, a message for people, and
/// the values that caused it. Thrown for invalid parameters and inputs; the
/// codec never traps on bad input.
public struct ErasureError: CodedError, Equatable {
    public enum Code: String, Sendable, Equatable {
        /// `k` or `m` out of range, or `k + m` above ISA-L's limit.
        case invalidParameters = "invalid_parameters"
        /// A list of chunks that does not have the number of entries the code needs.
        case wrongChunkCount = "wrong_chunk_count"
        /// Chunks of one call that differ in length, or one that is too long for ISA-L.
        case chunkLengthMismatch = "chunk_length_mismatch"
        /// A chunk index outside `0..<k+m` (or `0..<k` for a data chunk), or named twice.
        case invalidIndex = "invalid_index"
        /// `reconstruct` with no chunk missing: nothing to do.
        case nothingMissing = "nothing_missing"
        /// More chunks missing than the code's `m` parity chunks can repair.
        case tooManyMissing = "too_many_missing"
        /// A decode matrix that could not be inverted (cannot happen with the
        /// Cauchy generator; kept so a regression is an error, not a wrong answer).
        case singularMatrix = "singular_matrix"
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "erasure \(code.rawValue): \(message)" }
}
