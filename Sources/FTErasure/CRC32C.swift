import CISAL

/// CRC32C (Castagnoli, the iSCSI polynomial) over ISA-L's `crc32_iscsi`,
/// which runs on the CPU's CRC32 instruction where there is one.
///
/// The value is the standard one: `CRC32C.checksum("123456789") == 0xE3069283`.
/// Checksums chain: `checksum(b, continuing: checksum(a)) == checksum(a + b)`.
public enum CRC32C {
    /// The standard CRC32C of `buffer`, or of the bytes before it and `buffer`
    /// when `previous` is the checksum of the bytes before it.
    public static func checksum(_ buffer: UnsafeRawBufferPointer, continuing previous: UInt32 = 0) -> UInt32 {
        // ISA-L's crc32_iscsi neither pre- nor post-inverts; the standard CRC does both.
        var crc = ~previous
        guard var base = buffer.baseAddress?.assumingMemoryBound(to: UInt8.self) else {
            return previous
        }
        var remaining = buffer.count
        // crc32_iscsi takes an `int` length: feed it pieces below 2 GiB.
        let piece = 1 << 30
        while remaining > 0 {
            let n = min(remaining, piece)
            crc = crc32_iscsi(UnsafeMutablePointer(mutating: base), Int32(n), crc)
            base += n
            remaining -= n
        }
        return ~crc
    }

    /// The standard CRC32C of `bytes`.
    public static func checksum<Bytes: Sequence>(_ bytes: Bytes, continuing previous: UInt32 = 0) -> UInt32
    where Bytes.Element == UInt8 {
        let array = Array(bytes)
        return array.withUnsafeBytes { checksum($0, continuing: previous) }
    }
}
