import Foundation

/// The CURVE keys of a job's data plane: SMP data endpoints on `tcp://`
/// (nodes on other hosts). Every SMP's data socket serves with the SMP role's
/// key pair (`smp.key`, public half in `smp.pub`). Its clients present their
/// own pair: an SMP its node's (`smp-NODE.key`, public half in
/// `smp-NODE.pub`; the role's `smp.key` where a key directory has no node
/// keys), a worker `worker.key`. The SMP's ZAP handler admits only those
/// keys, so each message carries who its handshake proved
/// (`ZMQMessage.property("User-Id")`: "smp:NODE", "smp" or "worker"), not
/// what the sender wrote. Data endpoints on `ipc://` (one host) check peer
/// credentials instead and use no CURVE.
public struct DataPlaneKeys: Sendable {
    /// The public key every SMP's data socket serves with.
    public var serverPublicKey: String
    /// The pair an SMP serves with (nil for a worker, which only fetches).
    public var server: CurveKeyPair?
    /// The pair this process presents as a client.
    public var member: CurveKeyPair

    public init(serverPublicKey: String, server: CurveKeyPair? = nil, member: CurveKeyPair) {
        self.serverPublicKey = serverPublicKey
        self.server = server
        self.member = member
    }

    /// The user ids the ZAP handlers give admitted keys: "smp:NODE" for a
    /// node's key, "smp" for the role's shared one, "worker".
    public static let smpUser = "smp"
    public static let workerUser = "worker"
    public static func nodeUser(_ node: String) -> String { "smp:\(node)" }

    /// A user id's role and, for a node's key, its node.
    public static func parseUser(_ user: String) -> (role: String, node: String?) {
        guard let colon = user.firstIndex(of: ":") else { return (user, nil) }
        return (String(user[..<colon]), String(user[user.index(after: colon)...]))
    }

    /// File names of a node's own key pair and of its public half.
    public static func nodeKeyFile(_ node: String) -> String { "smp-\(node).key" }
    public static func nodePublicFile(_ node: String) -> String { "smp-\(node).pub" }

    /// Every node key's public half in a key directory (`smp-NODE.pub`): node -> key.
    public static func nodePublicKeys(in directory: String) throws(ZMQError) -> [String: String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        var keys: [String: String] = [:]
        for name in names.sorted() where name.hasPrefix("smp-") && name.hasSuffix(".pub") {
            keys[String(name.dropFirst(4).dropLast(4))] = try loadPublicKey(from: directory + "/" + name)
        }
        return keys
    }

    /// Loads, from a job's key directory, the servers' public key (`smp.pub`,
    /// or the public half of `smp.key` in a directory written before
    /// `smp.pub` existed) and `memberFile`'s pair ("worker.key").
    public static func load(from directory: String, memberFile: String) throws(ZMQError) -> DataPlaneKeys {
        let member = try CurveKeyPair.load(from: directory + "/" + memberFile)
        let server: String
        do {
            server = try loadPublicKey(from: directory + "/smp.pub")
        } catch {
            server = try CurveKeyPair.load(from: directory + "/smp.key").publicKey
        }
        return DataPlaneKeys(serverPublicKey: server, member: member)
    }

    /// An SMP's keys: it serves with `smp.key` and presents its node's pair
    /// (`smp-NODE.key`), or `smp.key` where there is none.
    public static func load(from directory: String, node: String) throws(ZMQError) -> DataPlaneKeys {
        let server = try CurveKeyPair.load(from: directory + "/smp.key")
        let nodePath = directory + "/" + nodeKeyFile(node)
        let member = access(nodePath, F_OK) == 0 ? try CurveKeyPair.load(from: nodePath) : server
        return DataPlaneKeys(serverPublicKey: server.publicKey, server: server, member: member)
    }

    /// Makes `socket` a CURVE client of an SMP's data endpoint when `endpoint`
    /// is on TCP (an `ipc://` endpoint is left as it is).
    public func secureClient(_ socket: ZMQSocket, for endpoint: String) throws(ZMQError) {
        guard endpoint.hasPrefix("tcp://") else { return }
        try socket.makeCurveClient(serverKey: serverPublicKey, keys: member)
    }
}
