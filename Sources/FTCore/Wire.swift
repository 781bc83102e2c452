/// The project's binary wire format: one envelope for every control-plane
/// message (ARCHITECTURE.md, "Planes").
///
///     offset  size  field
///     0       4     magic "FTW\0"
///     4       2     version (little endian), `WireEnvelope.version`
///     6       2     message type (little endian)
///     8       8     epoch (little endian)
///     16      2     sender length L (little endian), at most 255
///     18      L     sender, UTF-8
///     18+L    4     payload length P (little endian), at most `maxPayload`
///     22+L    P     payload
///
/// Decoding never traps: a frame that is short, long, of another version,
/// with a bad length or a sender that is not UTF-8 is a `WireError` with a
/// stable code, and the caller drops it. Payloads are written and read with `ByteWriter` / `ByteReader`.
public struct WireEnvelope: Sendable, Equatable {
    public static let magic: [UInt8] = [0x46, 0x54, 0x57, 0x00]  // "FTW\0"
    public static let version: UInt16 = 2
    public static let maxSenderBytes = 255
    /// Control messages are small; bulk data travels in raw frames beside them.
    public static let maxPayload = 16 << 20
    static let fixedHeader = 4 + 2 + 2 + 8 + 2 + 4
    /// The largest encoded envelope: header, longest sender, largest payload.
    public static let maxFrameBytes = fixedHeader + maxSenderBytes + maxPayload

    public var type: UInt16
    public var epoch: UInt64
    public var sender: String
    public var payload: [UInt8]

    public init(type: UInt16, epoch: UInt64, sender: String, payload: [UInt8] = []) {
        self.type = type
        self.epoch = epoch
        self.sender = sender
        self.payload = payload
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: Self.fixedHeader + sender.utf8.count + payload.count)
        w.bytes(Self.magic)
        w.u16(Self.version)
        w.u16(type)
        w.u64(epoch)
        let s = Array(sender.utf8.prefix(Self.maxSenderBytes))
        w.u16(UInt16(s.count))
        w.bytes(s)
        w.u32(UInt32(payload.count))
        w.bytes(payload)
        return w.buffer
    }

    public init(decoding frame: [UInt8]) throws(WireError) {
        var r = ByteReader(frame)
        let magic = try r.bytes(4, field: "magic")
        guard magic == Self.magic else {
            throw WireError(.badMagic, "frame does not start with the FTW magic (got \(magic.hexString))")
        }
        let version = try r.u16(field: "version")
        guard version == Self.version else {
            throw WireError(.unsupportedVersion, "wire version \(version) is not supported (this build speaks \(Self.version))")
        }
        type = try r.u16(field: "type")
        epoch = try r.u64(field: "epoch")
        guard epoch <= WireLimits.maxEpoch else {
            throw WireError(.outOfRange, "epoch \(epoch) exceeds \(WireLimits.maxEpoch)")
        }
        let senderLength = Int(try r.u16(field: "sender length"))
        guard senderLength <= Self.maxSenderBytes else {
            throw WireError(.badLength, "sender length \(senderLength) exceeds \(Self.maxSenderBytes)")
        }
        // Strict UTF-8: a sender is an id. Replacing bad bytes (U+FFFD, 3 bytes
        // each) could grow it past 255 bytes, which encoding would cut
        // mid-character (found by fuzzing: such a frame did not round-trip).
        let senderBytes = try r.bytes(senderLength, field: "sender")
        guard let s = String(validating: senderBytes, as: UTF8.self) else {
            throw WireError(.badValue, "sender is not UTF-8 (\(senderBytes.prefix(16).hexString))")
        }
        sender = s
        let payloadLength = Int(try r.u32(field: "payload length"))
        guard payloadLength <= Self.maxPayload else {
            throw WireError(.badLength, "payload length \(payloadLength) exceeds \(Self.maxPayload)")
        }
        payload = try r.bytes(payloadLength, field: "payload")
        guard r.remaining == 0 else {
            throw WireError(.trailingBytes, "\(r.remaining) bytes after the payload")
        }
    }
}

/// A frame that could not be decoded. The receiver counts it, logs it and
/// drops it; it never crashes on one.
public struct WireError: CodedError, Equatable {
    public enum Code: String, Sendable {
        case truncated
        case badMagic = "bad_magic"
        case unsupportedVersion = "unsupported_version"
        case badLength = "bad_length"
        case trailingBytes = "trailing_bytes"
        case unknownType = "unknown_type"
        case badValue = "bad_value"
        /// A value outside `WireLimits` (a step, size, rank, count or pid no real job has).
        case outOfRange = "out_of_range"
        /// A sender, node, worker or rank that is not part of the receiver's job.
        case notInJob = "not_in_job"
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "wire \(code.rawValue): \(message)" }
}

/// Appends little-endian values to a byte buffer.
public struct ByteWriter: Sendable {
    public private(set) var buffer: [UInt8] = []

    public init(capacity: Int = 64) { buffer.reserveCapacity(capacity) }

    public mutating func u8(_ v: UInt8) { buffer.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { buffer.append(contentsOf: $0) } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { buffer.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { buffer.append(contentsOf: $0) } }
    public mutating func i64(_ v: Int64) { u64(UInt64(bitPattern: v)) }
    public mutating func bool(_ v: Bool) { u8(v ? 1 : 0) }
    public mutating func bytes(_ v: some Collection<UInt8>) { buffer.append(contentsOf: v) }
    /// A u32 length, then the bytes.
    public mutating func blob(_ v: some Collection<UInt8>) { u32(UInt32(v.count)); bytes(v) }
    /// A u32 length, then UTF-8.
    public mutating func string(_ v: String) { blob(Array(v.utf8)) }
}

/// Reads little-endian values; every read checks the length first.
public struct ByteReader: Sendable {
    private let data: [UInt8]
    public private(set) var offset = 0

    public init(_ data: [UInt8]) { self.data = data }

    public var remaining: Int { data.count - offset }

    public mutating func bytes(_ n: Int, field: String) throws(WireError) -> [UInt8] {
        guard n >= 0, n <= remaining else {
            throw WireError(.truncated, "\(field): needs \(n) bytes at offset \(offset), \(remaining) left")
        }
        defer { offset += n }
        return Array(data[offset..<offset + n])
    }

    private mutating func fixed<T: FixedWidthInteger>(_: T.Type, field: String) throws(WireError) -> T {
        let size = MemoryLayout<T>.size
        guard size <= remaining else {
            throw WireError(.truncated, "\(field): needs \(size) bytes at offset \(offset), \(remaining) left")
        }
        var v: T = 0
        for i in 0..<size { v |= T(data[offset + i]) << (8 * i) }
        offset += size
        return v
    }

    public mutating func u8(field: String) throws(WireError) -> UInt8 { try fixed(UInt8.self, field: field) }
    public mutating func u16(field: String) throws(WireError) -> UInt16 { try fixed(UInt16.self, field: field) }
    public mutating func u32(field: String) throws(WireError) -> UInt32 { try fixed(UInt32.self, field: field) }
    public mutating func u64(field: String) throws(WireError) -> UInt64 { try fixed(UInt64.self, field: field) }
    public mutating func i64(field: String) throws(WireError) -> Int64 { Int64(bitPattern: try u64(field: field)) }

    public mutating func bool(field: String) throws(WireError) -> Bool {
        switch try u8(field: field) {
        case 0: return false
        case 1: return true
        case let v: throw WireError(.badValue, "\(field): \(v) is not a boolean")
        }
    }

    public mutating func blob(field: String, max: Int = WireEnvelope.maxPayload) throws(WireError) -> [UInt8] {
        let n = Int(try u32(field: "\(field) length"))
        guard n <= max else { throw WireError(.badLength, "\(field): length \(n) exceeds \(max)") }
        return try bytes(n, field: field)
    }

    public mutating func string(field: String, max: Int = 4096) throws(WireError) -> String {
        String(decoding: try blob(field: field, max: max), as: UTF8.self)
    }
}

extension Collection<UInt8> {
    /// Lowercase hex, e.g. for logs.
    public var hexString: String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(count * 2)
        for b in self {
            out.append(digits[Int(b >> 4)])
            out.append(digits[Int(b & 0xF)])
        }
        return String(decoding: out, as: UTF8.self)
    }
}
