import CZMQ
#if canImport(Glibc)
import Glibc
#endif

/// A ZeroMQ context: owns libzmq's I/O threads. Thread-safe.
///
/// Close every socket before the context is released: releasing it
/// terminates the context, which waits for open sockets.
public final class ZMQContext: @unchecked Sendable {
    let handle: UnsafeMutableRawPointer

    public init(ioThreads: Int = 1) throws(ZMQError) {
        guard let ctx = zmq_ctx_new() else { throw ZMQError.last("zmq_ctx_new") }
        handle = ctx
        try zmqCall("zmq_ctx_set ZMQ_IO_THREADS") { zmq_ctx_set(ctx, ZMQ_IO_THREADS, Int32(ioThreads)) }
    }

    deinit {
        // Retry on EINTR; any other failure leaves nothing to do.
        while zmq_ctx_term(handle) == -1 && ft_zmq_errno() == EINTR {}
    }

    /// A new socket of `type` in this context. `maxMessageBytes` is the
    /// largest frame it accepts from a peer (`ZMQ_MAXMSGSIZE`): libzmq drops
    /// the connection of a peer that announces a larger one, before
    /// allocating it. Every caller says what its socket legitimately
    /// carries; nil (no bound) only for `inproc://` sockets, whose peers are
    /// this process.
    public func socket(_ type: ZMQSocketType, maxMessageBytes: Int?) throws(ZMQError) -> ZMQSocket {
        guard let s = zmq_socket(handle, type.rawValue) else { throw ZMQError.last("zmq_socket \(type)") }
        let socket = ZMQSocket(handle: s, type: type, context: self)
        if let maxMessageBytes { try socket.setMaxMessageSize(maxMessageBytes) }
        return socket
    }

    /// Whether libzmq was built with a capability (`"curve"`, `"ipc"`, ...).
    public static func has(_ capability: String) -> Bool { zmq_has(capability) == 1 }

    /// libzmq's version as `(major, minor, patch)`.
    public static var version: (Int, Int, Int) {
        var a: Int32 = 0, b: Int32 = 0, c: Int32 = 0
        zmq_version(&a, &b, &c)
        return (Int(a), Int(b), Int(c))
    }
}

public enum ZMQSocketType: Sendable, CustomStringConvertible {
    case pair, pub, sub, req, rep, dealer, router, pull, push

    var rawValue: Int32 {
        switch self {
        case .pair: ZMQ_PAIR
        case .pub: ZMQ_PUB
        case .sub: ZMQ_SUB
        case .req: ZMQ_REQ
        case .rep: ZMQ_REP
        case .dealer: ZMQ_DEALER
        case .router: ZMQ_ROUTER
        case .pull: ZMQ_PULL
        case .push: ZMQ_PUSH
        }
    }

    public var description: String {
        switch self {
        case .pair: "PAIR"
        case .pub: "PUB"
        case .sub: "SUB"
        case .req: "REQ"
        case .rep: "REP"
        case .dealer: "DEALER"
        case .router: "ROUTER"
        case .pull: "PULL"
        case .push: "PUSH"
        }
    }
}

/// One ZeroMQ socket.
///
/// Like the libzmq socket it wraps, it must be used by one thread at a time
/// (handing it to another thread between uses is fine). It is closed, with
/// the linger set by `setLinger`, on `close()` or when released.
public final class ZMQSocket: @unchecked Sendable {
    private var handle: UnsafeMutableRawPointer?
    /// A `ZMQMonitor` publishes this socket's events.
    fileprivate var monitored = false
    public let type: ZMQSocketType
    /// `ZMQ_MAXMSGSIZE` for a socket that only sends (PUSH) or is never
    /// read: room for ZMTP's own commands (READY, PING, CURVE's), nothing more.
    public static let sendOnlyMaxMessageBytes = 64 << 10
    // Keeps the context alive while the socket is open.
    private let context: ZMQContext

    init(handle: UnsafeMutableRawPointer, type: ZMQSocketType, context: ZMQContext) {
        self.handle = handle
        self.type = type
        self.context = context
    }

    deinit { close() }

    /// Closes the socket (stopping its monitor first, see `ZMQMonitor`). Idempotent.
    public func close() {
        if let h = handle {
            if monitored { zmq_socket_monitor(h, nil, 0) }
            zmq_close(h)
            handle = nil
        }
    }

    var raw: UnsafeMutableRawPointer {
        guard let h = handle else { preconditionFailure("ZMQSocket used after close()") }
        return h
    }

    // MARK: endpoints

    /// Binds to `endpoint` and returns the endpoint actually bound, which
    /// resolves a wildcard port: `bind("tcp://127.0.0.1:*")` picks a free port.
    @discardableResult
    public func bind(_ endpoint: String) throws(ZMQError) -> String {
        try zmqCall("bind \(endpoint)") { zmq_bind(raw, endpoint) }
        return try lastEndpoint()
    }

    public func unbind(_ endpoint: String) throws(ZMQError) {
        try zmqCall("unbind \(endpoint)") { zmq_unbind(raw, endpoint) }
    }

    public func connect(_ endpoint: String) throws(ZMQError) {
        try zmqCall("connect \(endpoint)") { zmq_connect(raw, endpoint) }
    }

    public func disconnect(_ endpoint: String) throws(ZMQError) {
        try zmqCall("disconnect \(endpoint)") { zmq_disconnect(raw, endpoint) }
    }

    /// The endpoint of the last bind or connect.
    public func lastEndpoint() throws(ZMQError) -> String {
        var buf = [CChar](repeating: 0, count: 1024)
        var len = buf.count
        try zmqCall("getsockopt ZMQ_LAST_ENDPOINT") { zmq_getsockopt(raw, ZMQ_LAST_ENDPOINT, &buf, &len) }
        return String(decoding: buf.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    // MARK: send

    /// Sends one multipart message. Blocks (up to the send timeout) when the
    /// peer's queue is full, unless `dontWait`, which throws `.wouldBlock`.
    public func send(_ frames: [ZMQFrame], dontWait: Bool = false) throws(ZMQError) {
        precondition(!frames.isEmpty, "a ZeroMQ message has at least one frame")
        for (i, frame) in frames.enumerated() {
            var flags: Int32 = dontWait ? ZMQ_DONTWAIT : 0
            if i < frames.count - 1 { flags |= ZMQ_SNDMORE }
            try send(frame, flags: flags)
        }
    }

    /// Sends one multipart message of byte arrays.
    public func send(_ frames: [[UInt8]], dontWait: Bool = false) throws(ZMQError) {
        try send(frames.map { ZMQFrame.bytes($0) }, dontWait: dontWait)
    }

    private func send(_ frame: ZMQFrame, flags: Int32) throws(ZMQError) {
        switch frame.storage {
        case .bytes(let bytes):
            let raw = self.raw
            try zmqCall("send (\(bytes.count) bytes)") {
                bytes.withUnsafeBytes { Int32(truncatingIfNeeded: zmq_send(raw, $0.baseAddress, $0.count, flags)) }
            }
        case .noCopy(let buffer, let release):
            let msg = UnsafeMutablePointer<zmq_msg_t>.allocate(capacity: 1)
            defer { msg.deallocate() }
            let hint = Unmanaged.passRetained(ReleaseBox(release)).toOpaque()
            let data = UnsafeMutableRawPointer(mutating: buffer.baseAddress ?? UnsafeRawPointer(hint))
            // From here on libzmq owns the buffer and calls the release function
            // exactly once, when it no longer needs the bytes (possibly right away).
            let rc = zmq_msg_init_data(msg, data, buffer.count, { _, hint in
                Unmanaged<ReleaseBox>.fromOpaque(hint!).takeRetainedValue().release()
            }, hint)
            if rc == -1 {
                let error = ZMQError.last("zmq_msg_init_data")
                Unmanaged<ReleaseBox>.fromOpaque(hint).takeRetainedValue().release()
                throw error
            }
            if zmq_msg_send(msg, raw, flags) == -1 {
                let error = ZMQError.last("send zero-copy (\(buffer.count) bytes)")
                zmq_msg_close(msg)  // releases the buffer
                throw error
            }
        }
    }

    // MARK: receive

    /// Receives one multipart message, waiting at most `timeoutMilliseconds`
    /// (`nil`: the socket's receive timeout, by default forever). Returns nil
    /// when nothing arrived in time.
    public func receiveMessages(timeoutMilliseconds: Int? = nil) throws(ZMQError) -> [ZMQMessage]? {
        if let timeout = timeoutMilliseconds {
            guard try ZMQPoller.poll([.init(self, .readable)], timeoutMilliseconds: timeout)[0].isReadable else {
                return nil
            }
        }
        var frames: [ZMQMessage] = []
        repeat {
            let message = ZMQMessage()
            if zmq_msg_recv(message.msg, raw, 0) == -1 {
                let error = ZMQError.last("receive")
                if error.code == .wouldBlock && frames.isEmpty { return nil }
                throw error
            }
            frames.append(message)
        } while frames.last!.hasMore
        return frames
    }

    /// Receives one multipart message as byte arrays; nil on timeout.
    public func receive(timeoutMilliseconds: Int? = nil) throws(ZMQError) -> [[UInt8]]? {
        try receiveMessages(timeoutMilliseconds: timeoutMilliseconds)?.map { $0.bytes }
    }

    /// Receives one multipart message, not waiting; nil when none is queued.
    public func receiveNow() throws(ZMQError) -> [[UInt8]]? {
        try receive(timeoutMilliseconds: 0)
    }

    // MARK: monitor

    /// Starts publishing this socket's events and returns the monitor that
    /// reads them. Close the monitor (or this socket) when done; see `ZMQMonitor`.
    public func monitor(events: ZMQSocketEvent.Kind = .all) throws(ZMQError) -> ZMQMonitor {
        let endpoint = "inproc://ft-monitor-\(UInt(bitPattern: raw))-\(UInt64.random(in: 0...UInt64.max))"
        try zmqCall("zmq_socket_monitor \(endpoint)") { zmq_socket_monitor(raw, endpoint, events.rawValue) }
        monitored = true
        let pair = try context.socket(.pair, maxMessageBytes: nil)  // inproc
        try pair.connect(endpoint)
        return ZMQMonitor(source: self, pair: pair)
    }

    fileprivate func stopMonitor() {
        guard monitored, let h = handle else { return }
        zmq_socket_monitor(h, nil, 0)
        monitored = false
    }
}

/// The events of one socket (`ZMQSocket.monitor`), read with `ZMQSocketEvent.receive(from:)`.
///
/// libzmq sends each event from its I/O thread with a *blocking* send on a
/// PAIR socket. Once the reading end is closed that send never returns, and
/// the I/O thread, which serves every socket of the context, stops: no
/// handshake, no message, no close completes again. So `close()` stops the
/// monitor on the source socket before closing the reading end, and closing
/// the source socket stops it too. Read events often enough that no more than
/// the PAIR's high-water mark (1000) queue up, for the same reason.
public final class ZMQMonitor: @unchecked Sendable {
    private var source: ZMQSocket?
    let pair: ZMQSocket

    fileprivate init(source: ZMQSocket, pair: ZMQSocket) {
        self.source = source
        self.pair = pair
    }

    deinit { close() }

    /// Stops the monitor, then closes the reading end. Idempotent; use it
    /// from the thread that uses the source socket.
    public func close() {
        source?.stopMonitor()
        source = nil
        pair.close()
    }
}

/// One frame of an outgoing message.
public struct ZMQFrame: Sendable {
    enum Storage: @unchecked Sendable {
        case bytes([UInt8])
        case noCopy(UnsafeRawBufferPointer, @Sendable () -> Void)
    }
    let storage: Storage

    /// A frame whose bytes libzmq copies.
    public static func bytes(_ bytes: [UInt8]) -> ZMQFrame { ZMQFrame(storage: .bytes(bytes)) }

    /// A frame sent without copying: libzmq reads `buffer` directly, possibly
    /// after `send` returned, and calls `release` exactly once, on one of its
    /// I/O threads, when it no longer needs the bytes. The caller must keep the
    /// buffer valid and unmodified until then.
    public static func noCopy(_ buffer: UnsafeRawBufferPointer, release: @escaping @Sendable () -> Void) -> ZMQFrame {
        ZMQFrame(storage: .noCopy(buffer, release))
    }
}

private final class ReleaseBox {
    let release: @Sendable () -> Void
    init(_ release: @escaping @Sendable () -> Void) { self.release = release }
}

/// A received frame, owning libzmq's message: read it in place with
/// `withUnsafeBytes` to avoid a copy, or take `bytes`.
public final class ZMQMessage: @unchecked Sendable {
    let msg: UnsafeMutablePointer<zmq_msg_t>

    init() {
        msg = .allocate(capacity: 1)
        zmq_msg_init(msg)
    }

    deinit {
        zmq_msg_close(msg)
        msg.deallocate()
    }

    public var count: Int { zmq_msg_size(msg) }

    var hasMore: Bool { zmq_msg_more(msg) == 1 }

    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(start: zmq_msg_data(msg), count: zmq_msg_size(msg)))
    }

    public var bytes: [UInt8] { withUnsafeBytes { Array($0) } }

    /// The descriptor of the connection this message came in on (libzmq's
    /// ZMQ_SRCFD, from the connection's metadata: set on frames a peer sent,
    /// not on the routing-id frame a ROUTER adds); nil when unknown.
    public var sourceDescriptor: Int32? {
        let fd = zmq_msg_get(msg, ZMQ_SRCFD)
        return fd >= 0 ? fd : nil
    }

    /// A metadata property of the connection this message came in on (e.g.
    /// "Peer-Address": over ipc://, libzmq appends ":UID:GID:PID" of the peer,
    /// taken with SO_PEERCRED when the connection was accepted); nil when unset.
    public func property(_ name: String) -> String? {
        guard let value = zmq_msg_gets(msg, name) else { return nil }
        return String(cString: value)
    }
}
