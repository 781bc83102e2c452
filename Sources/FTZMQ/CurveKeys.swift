import CZMQ
#if canImport(Glibc)
import Glibc
#endif

/// A CURVE key pair, both keys in Z85 text (40 characters each).
///
/// Key files hold a secret, so they are written with mode 0600 and a file
/// that group or others may read is refused on load. The format is text:
///
///     # ft CURVE key pair (Z85)
///     public-key = <40 chars>
///     secret-key = <40 chars>
public struct CurveKeyPair: Sendable, Equatable {
    public let publicKey: String
    public let secretKey: String

    public init(publicKey: String, secretKey: String) throws(ZMQError) {
        try Self.validate(publicKey, what: "public key")
        try Self.validate(secretKey, what: "secret key")
        self.publicKey = publicKey
        self.secretKey = secretKey
    }

    /// A fresh key pair from libzmq's CSPRNG.
    public static func generate() throws(ZMQError) -> CurveKeyPair {
        var pub = [CChar](repeating: 0, count: 41)
        var sec = [CChar](repeating: 0, count: 41)
        let rc = zmq_curve_keypair(&pub, &sec)
        if rc == -1 {
            let error = ZMQError.last("zmq_curve_keypair")
            throw error.errno == ENOTSUP
                ? ZMQError(.unsupported, errno: error.errno, operation: error.operation, message: "this libzmq was built without CURVE support")
                : error
        }
        return try CurveKeyPair(publicKey: Self.string(pub), secretKey: Self.string(sec))
    }

    /// Writes the pair to `path`, created (or truncated) with mode 0600.
    public func write(to path: String) throws(ZMQError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw Self.ioError("open \(path) for writing") }
        defer { Glibc.close(fd) }
        // An existing file keeps its mode through O_TRUNC: force 0600.
        guard fchmod(fd, 0o600) == 0 else { throw Self.ioError("chmod 600 \(path)") }
        let text = "# ft CURVE key pair (Z85)\npublic-key = \(publicKey)\nsecret-key = \(secretKey)\n"
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        guard written == bytes.count else { throw Self.ioError("write \(path)") }
    }

    /// Reads a pair written by `write(to:)`. Refuses a file whose mode lets
    /// group or others read or write it, naming the file and its mode.
    public static func load(from path: String) throws(ZMQError) -> CurveKeyPair {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw ioError("open \(path)") }
        defer { Glibc.close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw ioError("stat \(path)") }
        let mode = st.st_mode & 0o777
        guard mode & 0o077 == 0 else {
            throw ZMQError(.insecureKeyFile, operation: "load key file \(path)",
                           message: "key file \(path) has mode \(String(mode, radix: 8, uppercase: false).leftPadded(to: 4)); "
                               + "it holds a secret key and must be readable by its owner only (chmod 600 \(path))")
        }
        var data: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 { throw ioError("read \(path)") }
            if n == 0 { break }
            data += buf[0..<n]
            if data.count > 65536 {
                throw ZMQError(.invalidKey, operation: "load key file \(path)", message: "\(path) is too large to be a key file")
            }
        }
        var fields: [String: String] = [:]
        for line in String(decoding: data, as: UTF8.self).split(separator: "\n") {
            let trimmed = line.trimmingSpaces
            if trimmed.isEmpty || trimmed.hasPrefix("#") { continue }
            let parts = trimmed.split(separator: "=", maxSplits: 1).map { String($0).trimmingSpaces }
            guard parts.count == 2 else {
                throw ZMQError(.invalidKey, operation: "load key file \(path)", message: "\(path): line '\(trimmed)' is not 'name = value'")
            }
            fields[parts[0]] = parts[1]
        }
        guard let pub = fields["public-key"], let sec = fields["secret-key"] else {
            throw ZMQError(.invalidKey, operation: "load key file \(path)", message: "\(path) must have a public-key and a secret-key line")
        }
        do {
            return try CurveKeyPair(publicKey: pub, secretKey: sec)
        } catch {
            throw ZMQError(.invalidKey, operation: "load key file \(path)", message: "\(path): \(error.message)")
        }
    }

    /// Checks that `key` is 40 characters of Z85 that decode to 32 bytes.
    static func validate(_ key: String, what: String) throws(ZMQError) {
        guard key.utf8.count == 40 else {
            throw ZMQError(.invalidKey, operation: "check \(what)", message: "\(what) must be 40 characters of Z85, got \(key.utf8.count)")
        }
        var out = [UInt8](repeating: 0, count: 32)
        guard zmq_z85_decode(&out, key) != nil else {
            throw ZMQError(.invalidKey, operation: "check \(what)", message: "\(what) is not valid Z85")
        }
    }

    private static func string(_ chars: [CChar]) -> String {
        String(decoding: chars.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private static func ioError(_ operation: String) -> ZMQError {
        let err = errno
        return ZMQError(.keyFileIO, errno: err, operation: operation, message: String(cString: strerror(err)))
    }
}

extension StringProtocol {
    var trimmingSpaces: String {
        String(drop(while: { $0 == " " || $0 == "\t" || $0 == "\r" }).reversed()
            .drop(while: { $0 == " " || $0 == "\t" || $0 == "\r" }).reversed())
    }
}

extension String {
    func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}
