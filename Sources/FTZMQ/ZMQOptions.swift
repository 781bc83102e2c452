import CZMQ

/// Typed socket options. Times are in milliseconds, as libzmq takes them.
extension ZMQSocket {
    func setInt(_ option: Int32, _ value: Int, _ name: String) throws(ZMQError) {
        var v = Int32(clamping: value)
        try zmqCall("setsockopt \(name)=\(value)") { zmq_setsockopt(raw, option, &v, MemoryLayout<Int32>.size) }
    }

    func setBytes(_ option: Int32, _ value: [UInt8], _ name: String, shown: String? = nil) throws(ZMQError) {
        let raw = self.raw
        try zmqCall("setsockopt \(name)=\(shown ?? "<\(value.count) bytes>")") {
            value.withUnsafeBytes { zmq_setsockopt(raw, option, $0.baseAddress, $0.count) }
        }
    }

    func getInt(_ option: Int32, _ name: String) throws(ZMQError) -> Int {
        var v: Int32 = 0
        var len = MemoryLayout<Int32>.size
        try zmqCall("getsockopt \(name)") { zmq_getsockopt(raw, option, &v, &len) }
        return Int(v)
    }

    /// The largest frame accepted from a peer (`ZMQ_MAXMSGSIZE`, bytes; -1:
    /// no bound). A peer that announces a larger frame is disconnected
    /// before anything is allocated for it. Applies to connections made
    /// after it is set: set it before bind or connect.
    public func setMaxMessageSize(_ bytes: Int) throws(ZMQError) {
        var v = Int64(bytes)
        try zmqCall("setsockopt ZMQ_MAXMSGSIZE=\(bytes)") { zmq_setsockopt(raw, ZMQ_MAXMSGSIZE, &v, MemoryLayout<Int64>.size) }
    }

    /// The bound set by `setMaxMessageSize` (-1: none).
    public func maxMessageSize() throws(ZMQError) -> Int {
        var v: Int64 = 0
        var len = MemoryLayout<Int64>.size
        try zmqCall("getsockopt ZMQ_MAXMSGSIZE") { zmq_getsockopt(raw, ZMQ_MAXMSGSIZE, &v, &len) }
        return Int(v)
    }

    /// How long `close` waits to flush unsent messages (0: drop them; -1: forever).
    public func setLinger(milliseconds: Int) throws(ZMQError) { try setInt(ZMQ_LINGER, milliseconds, "ZMQ_LINGER") }

    /// Receive timeout for blocking receives (-1: forever); past it `.wouldBlock`.
    public func setReceiveTimeout(milliseconds: Int) throws(ZMQError) { try setInt(ZMQ_RCVTIMEO, milliseconds, "ZMQ_RCVTIMEO") }

    /// Send timeout for blocking sends (-1: forever); past it `.wouldBlock`.
    public func setSendTimeout(milliseconds: Int) throws(ZMQError) { try setInt(ZMQ_SNDTIMEO, milliseconds, "ZMQ_SNDTIMEO") }

    public func setSendHighWaterMark(_ messages: Int) throws(ZMQError) { try setInt(ZMQ_SNDHWM, messages, "ZMQ_SNDHWM") }

    /// The kernel receive buffer of this socket's connections (SO_RCVBUF; set
    /// before connect or bind). It also bounds how much one `recv` copies.
    public func setReceiveBuffer(bytes: Int) throws(ZMQError) { try setInt(ZMQ_RCVBUF, bytes, "ZMQ_RCVBUF") }

    /// For sockets that receive bulk bytes (slices, EC frames). libzmq receives a
    /// large message straight into its freshly allocated buffer, and a `recv`
    /// that faults fresh pages in is one stretch of kernel work that holds its
    /// core until the copy ends: 4-6 MiB (what the kernel's autotuned buffer
    /// held) took 70-80 ms on the 2-core VM, during which the real-time
    /// heartbeat threads woken on that core waited (heartbeat gaps of 150-240
    /// ms). 512 KiB (the kernel doubles it) bounds each such stretch to about a
    /// tenth of that and still fills a loopback or datacenter link.
    public static let bulkReceiveBufferBytes = 512 << 10

    /// `setReceiveBuffer(bytes: bulkReceiveBufferBytes)`.
    public func boundBulkReceives() throws(ZMQError) { try setReceiveBuffer(bytes: Self.bulkReceiveBufferBytes) }

    public func setReceiveHighWaterMark(_ messages: Int) throws(ZMQError) { try setInt(ZMQ_RCVHWM, messages, "ZMQ_RCVHWM") }

    /// The identity a ROUTER sees for this DEALER/REQ (set before connect).
    public func setRoutingID(_ id: [UInt8]) throws(ZMQError) {
        try setBytes(ZMQ_ROUTING_ID, id, "ZMQ_ROUTING_ID", shown: String(decoding: id, as: UTF8.self))
    }

    /// ROUTER: fail a send to an unknown routing id with `.hostUnreachable`
    /// instead of dropping it silently.
    public func setRouterMandatory(_ on: Bool) throws(ZMQError) { try setInt(ZMQ_ROUTER_MANDATORY, on ? 1 : 0, "ZMQ_ROUTER_MANDATORY") }

    /// Queue messages only to completed connections.
    public func setImmediate(_ on: Bool) throws(ZMQError) { try setInt(ZMQ_IMMEDIATE, on ? 1 : 0, "ZMQ_IMMEDIATE") }

    /// Reconnect interval after a connection drops.
    public func setReconnectInterval(milliseconds: Int) throws(ZMQError) { try setInt(ZMQ_RECONNECT_IVL, milliseconds, "ZMQ_RECONNECT_IVL") }

    /// Time allowed for a ZMTP (and CURVE) handshake; 0 disables the limit.
    public func setHandshakeInterval(milliseconds: Int) throws(ZMQError) { try setInt(ZMQ_HANDSHAKE_IVL, milliseconds, "ZMQ_HANDSHAKE_IVL") }

    /// ZMTP heartbeats: a PING every `interval`; the connection is dropped
    /// (monitor: DISCONNECTED) when nothing arrives for `timeout`. `ttl` tells
    /// the peer how long to wait for us (0: its own setting). Measured here:
    /// a stopped peer is reported in ~300-400 ms at 100/300 ms.
    public func setHeartbeat(intervalMilliseconds: Int, timeoutMilliseconds: Int, ttlMilliseconds: Int = 0) throws(ZMQError) {
        try setInt(ZMQ_HEARTBEAT_IVL, intervalMilliseconds, "ZMQ_HEARTBEAT_IVL")
        try setInt(ZMQ_HEARTBEAT_TIMEOUT, timeoutMilliseconds, "ZMQ_HEARTBEAT_TIMEOUT")
        if ttlMilliseconds > 0 { try setInt(ZMQ_HEARTBEAT_TTL, ttlMilliseconds, "ZMQ_HEARTBEAT_TTL") }
    }

    /// Whether the last received frame has more frames after it.
    public var receiveMore: Bool { (try? getInt(ZMQ_RCVMORE, "ZMQ_RCVMORE")) == 1 }

    // MARK: CURVE

    /// Makes this socket a CURVE server with `keys` (set before bind).
    /// Clients must know `keys.publicKey`. Which clients are admitted is up to
    /// a ZAP handler, if the context has one; without one any client that
    /// knows the server key completes the handshake.
    public func makeCurveServer(_ keys: CurveKeyPair) throws(ZMQError) {
        try requireCurve()
        try setInt(ZMQ_CURVE_SERVER, 1, "ZMQ_CURVE_SERVER")
        try setBytes(ZMQ_CURVE_SECRETKEY, Array(keys.secretKey.utf8), "ZMQ_CURVE_SECRETKEY", shown: "<secret>")
        try allowCurveOverhead()
    }

    /// What CURVE adds to each message on the wire (a MESSAGE command: its
    /// name, flags, nonce and MAC, 33 bytes), with room to spare.
    public static let curveMessageOverheadBytes = 256

    /// libzmq checks `ZMQ_MAXMSGSIZE` against the frame on the wire, which
    /// under CURVE is the encrypted message: without this, a message of
    /// exactly the bound would drop the connection (and its sender would
    /// resend it forever).
    private func allowCurveOverhead() throws(ZMQError) {
        let bound = try maxMessageSize()
        if bound >= 0 { try setMaxMessageSize(bound + Self.curveMessageOverheadBytes) }
    }

    /// Makes this socket a CURVE client of the server whose public key is
    /// `serverKey`, authenticating as `keys` (set before connect). A wrong
    /// server key makes the handshake fail: nothing is ever delivered.
    public func makeCurveClient(serverKey: String, keys: CurveKeyPair) throws(ZMQError) {
        try requireCurve()
        try CurveKeyPair.validate(serverKey, what: "server public key")
        try setBytes(ZMQ_CURVE_SERVERKEY, Array(serverKey.utf8), "ZMQ_CURVE_SERVERKEY", shown: serverKey)
        try setBytes(ZMQ_CURVE_PUBLICKEY, Array(keys.publicKey.utf8), "ZMQ_CURVE_PUBLICKEY", shown: keys.publicKey)
        try setBytes(ZMQ_CURVE_SECRETKEY, Array(keys.secretKey.utf8), "ZMQ_CURVE_SECRETKEY", shown: "<secret>")
        try allowCurveOverhead()
    }

    private func requireCurve() throws(ZMQError) {
        guard ZMQContext.has("curve") else {
            throw ZMQError(.unsupported, operation: "CURVE setup", message: "this libzmq was built without CURVE support")
        }
    }
}

/// Waits on several sockets (or file descriptors) at once.
public enum ZMQPoller {
    public struct Events: OptionSet, Sendable {
        public let rawValue: Int16
        public init(rawValue: Int16) { self.rawValue = rawValue }
        public static let readable = Events(rawValue: Int16(ZMQ_POLLIN))
        public static let writable = Events(rawValue: Int16(ZMQ_POLLOUT))
        public static let error = Events(rawValue: Int16(ZMQ_POLLERR))
    }

    public struct Item {
        enum Target { case socket(ZMQSocket), fd(Int32) }
        let target: Target
        let events: Events
        public init(_ socket: ZMQSocket, _ events: Events) { target = .socket(socket); self.events = events }
        public init(fileDescriptor: Int32, _ events: Events) { target = .fd(fileDescriptor); self.events = events }
    }

    public struct Ready: Sendable {
        public let events: Events
        public var isReadable: Bool { events.contains(.readable) }
        public var isWritable: Bool { events.contains(.writable) }
    }

    /// Waits until an item is ready or `timeoutMilliseconds` pass (-1: forever).
    /// Returns what each item is ready for, in order.
    public static func poll(_ items: [Item], timeoutMilliseconds: Int) throws(ZMQError) -> [Ready] {
        var raw = items.map { item -> zmq_pollitem_t in
            switch item.target {
            case .socket(let s): zmq_pollitem_t(socket: s.raw, fd: -1, events: item.events.rawValue, revents: 0)
            case .fd(let fd): zmq_pollitem_t(socket: nil, fd: fd, events: item.events.rawValue, revents: 0)
            }
        }
        try zmqCall("zmq_poll") { zmq_poll(&raw, Int32(raw.count), timeoutMilliseconds) }
        return raw.map { Ready(events: Events(rawValue: $0.revents)) }
    }
}

/// An event from a socket monitor.
public struct ZMQSocketEvent: Sendable, Equatable {
    public struct Kind: OptionSet, Sendable, Hashable {
        public let rawValue: Int32
        public init(rawValue: Int32) { self.rawValue = rawValue }
        public static let connected = Kind(rawValue: ZMQ_EVENT_CONNECTED)
        public static let accepted = Kind(rawValue: ZMQ_EVENT_ACCEPTED)
        public static let disconnected = Kind(rawValue: ZMQ_EVENT_DISCONNECTED)
        public static let handshakeSucceeded = Kind(rawValue: ZMQ_EVENT_HANDSHAKE_SUCCEEDED)
        public static let handshakeFailedProtocol = Kind(rawValue: ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL)
        public static let handshakeFailedAuth = Kind(rawValue: ZMQ_EVENT_HANDSHAKE_FAILED_AUTH)
        public static let handshakeFailedNoDetail = Kind(rawValue: ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        public static let monitorStopped = Kind(rawValue: ZMQ_EVENT_MONITOR_STOPPED)
        public static let all = Kind(rawValue: ZMQ_EVENT_ALL)
    }

    public let kind: Kind
    /// The event's value: a file descriptor, an errno or an interval, by kind.
    public let value: UInt32
    public let endpoint: String

    /// Reads the next event from a monitor; nil on timeout.
    public static func receive(from monitor: ZMQMonitor, timeoutMilliseconds: Int) throws(ZMQError) -> ZMQSocketEvent? {
        guard let frames = try monitor.pair.receive(timeoutMilliseconds: timeoutMilliseconds) else { return nil }
        guard frames.count == 2, frames[0].count == 6 else {
            throw ZMQError(.system, operation: "monitor receive", message: "malformed monitor event (\(frames.map(\.count)) bytes)")
        }
        let f = frames[0]
        let id = UInt16(f[0]) | UInt16(f[1]) << 8
        let value = UInt32(f[2]) | UInt32(f[3]) << 8 | UInt32(f[4]) << 16 | UInt32(f[5]) << 24
        return ZMQSocketEvent(kind: Kind(rawValue: Int32(id)), value: value, endpoint: String(decoding: frames[1], as: UTF8.self))
    }
}
