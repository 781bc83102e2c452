/// Bounds every decoded message is held to (issue 13, "Validate every
/// decoded message"). They are far beyond any real job and small enough
/// that the arithmetic the receivers do on such values (a step plus one, a
/// sum of node sizes, an element count times a dtype size, an element
/// count times a DP rank) cannot overflow. A value outside them is refused
/// at decoding, as a `WireError` with the code `out_of_range`.
public enum WireLimits {
    /// The largest step a message may name (2^53: a step every microsecond for 285 years).
    public static let maxStep = 1 << 53
    /// The largest epoch an envelope may carry (2^53, as steps): receivers add
    /// one to the epochs they adopt (a coordinator taking over a job).
    public static let maxEpoch: UInt64 = 1 << 53
    /// The largest byte count or offset a message may name (64 TiB): a node's
    /// image, a chunk, a slot. Sums over 2^16 nodes stay below 2^62.
    public static let maxBytes = 1 << 46
    /// The largest stored size of one tensor (1 TiB).
    public static let maxTensorBytes = 1 << 40
    /// The largest data-parallel group (and so the largest rank + 1, and world size).
    public static let maxDPSize = 1 << 20
    /// Dimensions of a tensor.
    public static let maxDimensions = 8
    /// Tensors in one registration.
    public static let maxTensors = 1 << 16
    /// Process ids fit a C `pid_t`.
    public static let maxPID = Int(Int32.max)
    /// A heartbeat's activity duration (a year, in milliseconds).
    public static let maxMilliseconds = 366 * 24 * 3600 * 1000
    /// A duration carried as whole microseconds and read back as seconds in a
    /// `Double` (2^49 µs, 17 years): below it, microseconds / 1e6 * 1e6 rounds
    /// back to the same integer, so such a message survives a round trip.
    public static let maxMicroseconds = 1 << 49
    /// Nodes of a Reed-Solomon group (ISA-L's GF(2^8) bound).
    public static let maxGroupNodes = 255

    /// `value` if it lies in `range`, else an `out_of_range` error naming `field`.
    public static func check(_ value: Int, _ range: ClosedRange<Int>, _ field: String) throws(WireError) -> Int {
        guard range.contains(value) else {
            throw WireError(.outOfRange, "\(field) \(value) is outside \(range.lowerBound)...\(range.upperBound)")
        }
        return value
    }
}

/// Overflow-checked arithmetic for sizes computed from untrusted values:
/// nil instead of a trap.
public enum Checked {
    /// The product of `factors`, or nil when it overflows `Int` (or a factor is negative).
    public static func product(_ factors: some Sequence<Int>) -> Int? {
        var p = 1
        for f in factors {
            guard f >= 0 else { return nil }
            let (r, o) = p.multipliedReportingOverflow(by: f)
            guard !o else { return nil }
            p = r
        }
        return p
    }

    /// `a + b`, or nil when it overflows.
    public static func sum(_ a: Int, _ b: Int) -> Int? {
        let (r, o) = a.addingReportingOverflow(b)
        return o ? nil : r
    }

    /// `a * b`, or nil when it overflows.
    public static func product(_ a: Int, _ b: Int) -> Int? {
        let (r, o) = a.multipliedReportingOverflow(by: b)
        return o ? nil : r
    }

    /// Whether `offset..<offset+length` lies within `0..<bound`, without computing `offset + length`.
    public static func rangeFits(offset: Int, length: Int, within bound: Int) -> Bool {
        offset >= 0 && length >= 0 && bound >= 0 && offset <= bound && length <= bound - offset
    }
}

extension ControlMessage {
    /// The largest control-plane frame a socket accepts (`ZMQ_MAXMSGSIZE`):
    /// a status reply of 4 MiB (the most `statusReply` decodes) and its
    /// envelope. Every other control message is far smaller.
    public static let maxFrameBytes = (4 << 20) + (64 << 10)
}

extension SMPMessage {
    /// The largest frame an SMP socket accepts (`ZMQ_MAXMSGSIZE`): a whole
    /// envelope (a `staged` of a terabyte slot carries 4 MiB of CRCs), or one
    /// bulk frame of an EC transfer (`frameBytes`, 4 MiB by default).
    public static func maxFrameBytes(bulkFrameBytes: Int) -> Int {
        max(WireEnvelope.maxFrameBytes, bulkFrameBytes)
    }
}
