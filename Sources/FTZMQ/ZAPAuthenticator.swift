import CZMQ
import Foundation
import Synchronization

/// A ZeroMQ ZAP handler (RFC 27) that admits CURVE clients whose public key
/// is on a list and refuses every other one. It serves every CURVE server
/// socket of its context; start it before those sockets bind. Each admitted
/// key has a user id, which libzmq attaches to every message that client
/// sends (`ZMQMessage.property("User-Id")`): the server reads who sent it
/// from the handshake, not from the message.
///
/// A refused handshake never delivers a message: the client's frames are
/// dropped by libzmq, the refusal is counted and reported to `onDenied`.
public final class ZAPAuthenticator: @unchecked Sendable {
    public static let endpoint = "inproc://zeromq.zap.01"

    private let socket: ZMQSocket
    /// Admitted client key (Z85) -> its user id.
    private let allowed: [String: String]
    private let onDenied: @Sendable (String) -> Void
    private let stopFlag = Atomic<Bool>(false)
    private let finished = DispatchSemaphore(value: 0)
    private let deniedCount = Atomic<Int>(0)
    private let admittedCount = Atomic<Int>(0)

    /// `allowedClientKeys`: Z85 public keys of the clients to admit, each its own user id.
    public convenience init(context: ZMQContext, allowedClientKeys: [String],
                            onDenied: @escaping @Sendable (String) -> Void = { _ in }) throws(ZMQError) {
        try self.init(context: context, clients: Dictionary(allowedClientKeys.map { ($0, $0) }) { a, _ in a }, onDenied: onDenied)
    }

    /// `clients`: the Z85 public key of each client to admit -> the user id its messages carry.
    public init(context: ZMQContext, clients: [String: String], onDenied: @escaping @Sendable (String) -> Void = { _ in }) throws(ZMQError) {
        for key in clients.keys { try CurveKeyPair.validate(key, what: "allowed client key") }
        allowed = clients
        self.onDenied = onDenied
        socket = try context.socket(.rep, maxMessageBytes: nil)  // inproc (ZAP)
        try socket.setLinger(milliseconds: 0)
        try socket.bind(Self.endpoint)
        let thread = Thread { [self] in self.serve() }
        thread.name = "ft-zap"
        thread.start()
    }

    /// Handshakes refused so far.
    public var denied: Int { deniedCount.load(ordering: .relaxed) }
    /// Handshakes admitted so far.
    public var admitted: Int { admittedCount.load(ordering: .relaxed) }

    /// Stops serving (call before the context is released).
    public func stop() {
        guard !stopFlag.exchange(true, ordering: .acquiringAndReleasing) else { return }
        finished.wait()
    }

    private func serve() {
        defer {
            socket.close()
            finished.signal()
        }
        while !stopFlag.load(ordering: .acquiring) {
            guard let request = try? socket.receive(timeoutMilliseconds: 100) else { continue }
            guard request.count >= 6 else { continue }
            let version = request[0], requestID = request[1]
            let address = String(decoding: request[3], as: UTF8.self)
            let mechanism = String(decoding: request[5], as: UTF8.self)
            var user: String?
            var clientKey = "?"
            if mechanism == "CURVE", request.count >= 7, request[6].count == 32 {
                clientKey = Self.z85(request[6])
                user = allowed[clientKey]
            }
            let ok = user != nil
            let status = ok ? "200" : "400"
            let text = ok ? "OK" : "client key not allowed"
            try? socket.send([version, requestID, Array(status.utf8), Array(text.utf8), Array((user ?? "").utf8), []])
            if ok {
                admittedCount.add(1, ordering: .relaxed)
            } else {
                deniedCount.add(1, ordering: .relaxed)
                onDenied("refused a \(mechanism) handshake from \(address) (client key \(clientKey))")
            }
        }
    }

    static func z85(_ key: [UInt8]) -> String {
        var out = [CChar](repeating: 0, count: 41)
        var input = key
        _ = zmq_z85_encode(&out, &input, 32)
        return String(decoding: out.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

extension ZMQSocket {
    /// The ZAP domain of a server socket (authentication applies per domain).
    public func setZAPDomain(_ domain: String) throws(ZMQError) {
        try setBytes(ZMQ_ZAP_DOMAIN, Array(domain.utf8), "ZMQ_ZAP_DOMAIN", shown: domain)
    }
}

/// Reads a Z85 public key from a text file (one line; `#` comments allowed).
public func loadPublicKey(from path: String) throws(ZMQError) -> String {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
        throw ZMQError(.keyFileIO, operation: "read \(path)", message: "cannot read public key file \(path)")
    }
    guard let line = text.split(separator: "\n").map({ $0.trimmingSpaces }).first(where: { !$0.isEmpty && !$0.hasPrefix("#") }) else {
        throw ZMQError(.invalidKey, operation: "read \(path)", message: "\(path) holds no key")
    }
    let key = line.hasPrefix("public-key") ? line.split(separator: "=", maxSplits: 1).last.map { $0.trimmingSpaces } ?? line : line
    try CurveKeyPair.validate(key, what: "public key in \(path)")
    return key
}
