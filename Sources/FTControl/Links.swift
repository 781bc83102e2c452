import FTCore
import FTSystem
import FTZMQ
import Foundation

/// A job's CURVE keys, in one directory (mode 0700, files 0600):
///
///     coordinator.key   the coordinator's key pair (server)
///     coordinator.pub   its public key, which every client needs
///     smp.key           the key pair SMPs present (and serve their data
///                       endpoints with, when on TCP: `DataPlaneKeys`)
///     smp.pub           its public key, which data-plane clients need
///     smp-NODE.key      each node's own pair, which its SMP presents
///                       instead (then it may speak only for NODE)
///     smp-NODE.pub      its public key, which the ZAP handlers admit
///     worker.key        the key pair workers present (their SMP points them here)
///     operator.key      the key pair of operators (`ftctl status`): read-only
///
/// The coordinator admits only clients presenting one of the three client
/// keys, and takes from each only what its role sends (`KeyRole.may`): an
/// operator's key reads the status and can change nothing.
public struct JobKeys: Sendable {
    public var server: CurveKeyPair?
    public var serverPublicKey: String
    /// The key pair this process presents, its role's.
    public var member: CurveKeyPair
    public var role: KeyRole

    /// The roles of the job's client keys; a key's role is the user id its ZAP
    /// handshake gives every message it sends.
    public enum KeyRole: String, Sendable, CaseIterable {
        case smp, worker, `operator`

        public var file: String { "\(rawValue).key" }

        /// Whether a client holding this role's key may send `message`: an SMP
        /// its reports, a worker its own, anyone the status query.
        public func may(_ message: ControlMessage) -> Bool {
            switch message {
            case .statusQuery: true
            case .smpHello, .smpHeartbeat, .childExited, .startRefused, .protected, .rebuilt, .persisted: self == .smp
            case .workerHello, .workerHeartbeat, .ready, .restoreFailed, .workerDone: self == .worker
            default: false  // the coordinator's own messages: nobody sends them to it
            }
        }
    }

    /// Writes a fresh key pair for the coordinator and for every role, and
    /// one for each of `nodes` (`smp-NODE.key`, public half `smp-NODE.pub`):
    /// an SMP that has its node's key is known by it, so it can speak only
    /// for its own node.
    @discardableResult
    public static func generate(in directory: String, nodes: [String] = []) throws -> JobKeys {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
        let server = try CurveKeyPair.generate()
        try server.write(to: directory + "/coordinator.key")
        var pairs: [KeyRole: CurveKeyPair] = [:]
        for role in KeyRole.allCases {
            pairs[role] = try CurveKeyPair.generate()
            try pairs[role]!.write(to: directory + "/" + role.file)
        }
        try ("# ft coordinator public key (Z85)\n" + server.publicKey + "\n")
            .write(toFile: directory + "/coordinator.pub", atomically: true, encoding: .utf8)
        // SMP data endpoints on TCP serve with the SMP pair (`DataPlaneKeys`).
        try ("# ft SMP data-plane public key (Z85)\n" + pairs[.smp]!.publicKey + "\n")
            .write(toFile: directory + "/smp.pub", atomically: true, encoding: .utf8)
        for node in nodes {
            let pair = try CurveKeyPair.generate()
            try pair.write(to: directory + "/" + DataPlaneKeys.nodeKeyFile(node))
            try ("# ft SMP \(node) public key (Z85)\n" + pair.publicKey + "\n")
                .write(toFile: directory + "/" + DataPlaneKeys.nodePublicFile(node), atomically: true, encoding: .utf8)
        }
        return JobKeys(server: server, serverPublicKey: server.publicKey, member: pairs[.operator]!, role: .operator)
    }

    /// Loads what a client of `role` needs (`withServerSecret`: the coordinator's
    /// pair too). An SMP of `node` presents its node's pair where there is one.
    public static func load(from directory: String, role: KeyRole, node: String? = nil,
                            withServerSecret: Bool = false) throws(ZMQError) -> JobKeys {
        var file = directory + "/" + role.file
        if role == .smp, let node, access(directory + "/" + DataPlaneKeys.nodeKeyFile(node), F_OK) == 0 {
            file = directory + "/" + DataPlaneKeys.nodeKeyFile(node)
        }
        let member = try CurveKeyPair.load(from: file)
        let pub = try loadPublicKey(from: directory + "/coordinator.pub")
        let server = withServerSecret ? try CurveKeyPair.load(from: directory + "/coordinator.key") : nil
        return JobKeys(server: server, serverPublicKey: pub, member: member, role: role)
    }

    /// The coordinator's view: every client key (Z85) -> the user id its
    /// messages carry: a role ("smp", "worker", "operator"), or "smp:NODE"
    /// for a node's key (`DataPlaneKeys.parseUser`).
    /// Where the directory has node keys, the shared `smp.key` is not admitted
    /// (every SMP holds it to serve its data endpoint: it must not let one
    /// speak for another node).
    public static func clientUsers(in directory: String) throws(ZMQError) -> [String: String] {
        let nodes = try DataPlaneKeys.nodePublicKeys(in: directory)
        var users: [String: String] = [:]
        for role in KeyRole.allCases where !(role == .smp && !nodes.isEmpty) {
            users[try CurveKeyPair.load(from: directory + "/" + role.file).publicKey] = role.rawValue
        }
        for (node, key) in nodes { users[key] = DataPlaneKeys.nodeUser(node) }
        return users
    }
}

/// A member's DEALER to the coordinator, for shells with their own poll loop
/// (the SMP) or their own thread (the worker control). It adopts the highest
/// epoch it hears and stamps it on everything it sends. Sends never block:
/// while the coordinator is away, messages that cannot be queued are dropped
/// (heartbeats and hellos are repeated anyway).
public final class CoordinatorLink: @unchecked Sendable {
    public let memberID: String
    public let endpoint: String
    public let socket: ZMQSocket
    public private(set) var epoch: UInt64 = 0
    public private(set) var lastHeard: Double

    public init(context: ZMQContext, endpoint: String, memberID: String, keys: JobKeys?) throws {
        self.memberID = memberID
        self.endpoint = endpoint
        socket = try context.socket(.dealer, maxMessageBytes: ControlMessage.maxFrameBytes)
        try socket.setLinger(milliseconds: 0)
        try socket.setReconnectInterval(milliseconds: 100)
        try socket.setSendHighWaterMark(1000)
        if let keys { try socket.makeCurveClient(serverKey: keys.serverPublicKey, keys: keys.member) }
        try socket.connect(endpoint)
        lastHeard = monotonicSeconds()
    }

    /// The step of the last `protected` this link sent (an SMP's hello says it
    /// again while that round is still staged); `forgetProtected()` when the
    /// round is voided.
    public private(set) var lastProtected: Int?

    public func forgetProtected() { lastProtected = nil }

    public func send(_ message: ControlMessage) {
        if case .protected(let step, _) = message { lastProtected = step }
        let frame = message.envelope(sender: memberID, epoch: epoch).encoded()
        _ = try? socket.send([frame], dontWait: true)
    }

    /// Every message waiting now (none when nothing arrived).
    public func drain() -> [(ControlMessage, UInt64)] {
        var out: [(ControlMessage, UInt64)] = []
        while let frames = try? socket.receiveNow() {
            guard let first = frames.first, let (message, envelope) = try? ControlMessage.decode(first) else { continue }
            epoch = max(epoch, envelope.epoch)
            lastHeard = monotonicSeconds()
            out.append((message, envelope.epoch))
        }
        return out
    }

    public func close() { socket.close() }
}
