/// The CURVE keys of a job's data plane: SMP data endpoints on `tcp://`
/// (nodes on other hosts). Every SMP's data socket serves with the SMP role's
/// key pair (`smp.key`, public half in `smp.pub`); its clients, peer SMPs and
/// other nodes' workers fetching slices, present their role's pair, and the
/// SMP's ZAP handler admits only those two keys, so each message carries the
/// role its handshake proved (`ZMQMessage.property("User-Id")`: "smp" or
/// "worker"), not one the sender wrote. Data endpoints on `ipc://` (one host)
/// check peer credentials instead and use no CURVE.
public struct DataPlaneKeys: Sendable {
    /// The public key every SMP's data socket serves with.
    public var serverPublicKey: String
    /// The pair this process presents as a client (an SMP: also the pair it serves with).
    public var member: CurveKeyPair

    public init(serverPublicKey: String, member: CurveKeyPair) {
        self.serverPublicKey = serverPublicKey
        self.member = member
    }

    /// The user id the data plane's ZAP handler gives each admitted role.
    public static let smpUser = "smp"
    public static let workerUser = "worker"

    /// Loads, from a job's key directory, the servers' public key (`smp.pub`,
    /// or the public half of `smp.key` in a directory written before
    /// `smp.pub` existed) and `memberFile`'s pair ("smp.key", "worker.key").
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

    /// Makes `socket` a CURVE client of an SMP's data endpoint when `endpoint`
    /// is on TCP (an `ipc://` endpoint is left as it is).
    public func secureClient(_ socket: ZMQSocket, for endpoint: String) throws(ZMQError) {
        guard endpoint.hasPrefix("tcp://") else { return }
        try socket.makeCurveClient(serverKey: serverPublicKey, keys: member)
    }
}
