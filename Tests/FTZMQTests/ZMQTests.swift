import Testing
import Synchronization
#if canImport(Glibc)
import Glibc
#endif
@testable import FTZMQ

/// A fresh temporary directory for one test, removed by the caller.
func makeTempDir() -> String {
    var template = Array("/tmp/ft-zmq-test-XXXXXX".utf8CString)
    let path = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
    return path
}

func removeTree(_ path: String) {
    if let dir = opendir(path) {
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
            if name != "." && name != ".." { unlink(path + "/" + name) }
        }
        closedir(dir)
    }
    rmdir(path)
}

/// A socket that drops unsent messages on close, so a test never waits on one.
func lingerless(_ ctx: ZMQContext, _ type: ZMQSocketType) throws -> ZMQSocket {
    let socket = try ctx.socket(type, maxMessageBytes: 64 << 20)
    try socket.setLinger(milliseconds: 0)
    return socket
}

/// A ROUTER that answers each request with "re:" + the request, then checks the reply on the DEALER.
func roundTrip(router: ZMQSocket, dealer: ZMQSocket, payload: [UInt8]) throws -> Bool {
    try dealer.send([payload])
    guard let request = try router.receive(timeoutMilliseconds: 5000) else { return false }
    #expect(request.count == 2)
    #expect(request[0] == Array("dealer-1".utf8))
    #expect(request[1] == payload)
    try router.send([request[0], Array("re:".utf8) + request[1]])
    guard let reply = try dealer.receive(timeoutMilliseconds: 5000) else { return false }
    return reply == [Array("re:".utf8) + payload]
}

@Suite("ZeroMQ adapter")
struct ZMQTests {
    @Test("ROUTER/DEALER round trip over inproc://")
    func inprocRoundTrip() throws {
        let ctx = try ZMQContext()
        let router = try lingerless(ctx, .router)
        let dealer = try lingerless(ctx, .dealer)
        defer { dealer.close(); router.close() }
        try router.bind("inproc://ft-test-roundtrip")
        try dealer.setRoutingID(Array("dealer-1".utf8))
        try dealer.connect("inproc://ft-test-roundtrip")
        #expect(try roundTrip(router: router, dealer: dealer, payload: Array("ping".utf8)))
    }

    @Test("ZMQ_MAXMSGSIZE: a frame over the socket's bound never arrives; frames within it do")
    func maxMessageSize() throws {
        let ctx = try ZMQContext()
        let router = try ctx.socket(.router, maxMessageBytes: 1024)
        try router.setLinger(milliseconds: 0)
        defer { router.close() }
        #expect(try router.maxMessageSize() == 1024)
        let endpoint = try router.bind("tcp://127.0.0.1:*")
        let big = try lingerless(ctx, .dealer)
        let small = try lingerless(ctx, .dealer)
        defer { big.close(); small.close() }
        try big.connect(endpoint)
        try big.send([[UInt8](repeating: 1, count: 4096)])  // the router drops this peer's connection
        try small.connect(endpoint)
        try small.send([[UInt8](repeating: 2, count: 1000)])
        let received = try #require(try router.receive(timeoutMilliseconds: 10_000))
        #expect(received.count == 2 && received[1] == [UInt8](repeating: 2, count: 1000))
        #expect(try router.receive(timeoutMilliseconds: 200) == nil)
    }

    @Test("under CURVE a message of exactly ZMQ_MAXMSGSIZE still arrives (libzmq checks the encrypted frame); one over it does not")
    func maxMessageSizeUnderCurve() throws {
        let ctx = try ZMQContext()
        let serverKeys = try CurveKeyPair.generate()
        let bound = 1 << 20
        let router = try ctx.socket(.router, maxMessageBytes: bound)
        try router.setLinger(milliseconds: 0)
        defer { router.close() }
        try router.makeCurveServer(serverKeys)
        let endpoint = try router.bind("tcp://127.0.0.1:*")
        let over = try ctx.socket(.dealer, maxMessageBytes: bound)
        let exact = try ctx.socket(.dealer, maxMessageBytes: bound)
        defer { over.close(); exact.close() }
        for s in [over, exact] {
            try s.setLinger(milliseconds: 0)
            try s.makeCurveClient(serverKey: serverKeys.publicKey, keys: try CurveKeyPair.generate())
        }
        try over.connect(endpoint)
        try over.send([[UInt8](repeating: 1, count: bound + ZMQSocket.curveMessageOverheadBytes + 1)])  // dropped with its connection
        try exact.connect(endpoint)
        try exact.send([[UInt8](repeating: 2, count: bound)])
        let received = try #require(try router.receive(timeoutMilliseconds: 10_000), "a message of exactly the bound did not arrive")
        #expect(received.count == 2 && received[1] == [UInt8](repeating: 2, count: bound))
        #expect(try router.receive(timeoutMilliseconds: 200) == nil)
    }

    @Test("ROUTER/DEALER round trip over tcp://127.0.0.1 on a free port")
    func tcpRoundTrip() throws {
        let ctx = try ZMQContext()
        let router = try lingerless(ctx, .router)
        let dealer = try lingerless(ctx, .dealer)
        defer { dealer.close(); router.close() }
        let endpoint = try router.bind("tcp://127.0.0.1:*")
        #expect(endpoint.hasPrefix("tcp://127.0.0.1:") && !endpoint.hasSuffix(":*"))
        try dealer.setRoutingID(Array("dealer-1".utf8))
        try dealer.connect(endpoint)
        #expect(try roundTrip(router: router, dealer: dealer, payload: Array(repeating: 7, count: 100_000)))
    }

    @Test("CURVE round trip; a client with the wrong server key gets nothing and the server keeps serving")
    func curve() throws {
        #expect(ZMQContext.has("curve"))
        let ctx = try ZMQContext()
        let serverKeys = try CurveKeyPair.generate()
        let clientKeys = try CurveKeyPair.generate()
        let router = try lingerless(ctx, .router)
        try router.makeCurveServer(serverKeys)
        let endpoint = try router.bind("tcp://127.0.0.1:*")
        defer { router.close() }

        // Wrong server key: the handshake fails, nothing reaches the server, no reply comes.
        let impostorKey = try CurveKeyPair.generate().publicKey
        let wrong = try lingerless(ctx, .dealer)
        defer { wrong.close() }
        try wrong.setRoutingID(Array("dealer-1".utf8))
        try wrong.makeCurveClient(serverKey: impostorKey, keys: clientKeys)
        try wrong.connect(endpoint)
        try wrong.send([Array("let me in".utf8)], dontWait: true)
        #expect(try router.receive(timeoutMilliseconds: 500) == nil)
        #expect(try wrong.receive(timeoutMilliseconds: 100) == nil)

        // The right key works, on the same server, while the wrong client is still around.
        let right = try lingerless(ctx, .dealer)
        defer { right.close() }
        try right.setRoutingID(Array("dealer-1".utf8))
        try right.makeCurveClient(serverKey: serverKeys.publicKey, keys: clientKeys)
        try right.connect(endpoint)
        #expect(try roundTrip(router: router, dealer: right, payload: Array("secret hello".utf8)))
        #expect(try wrong.receive(timeoutMilliseconds: 50) == nil)
    }

    @Test("zero-copy send delivers the bytes and releases the buffer exactly once")
    func zeroCopy() throws {
        let ctx = try ZMQContext()
        let pull = try lingerless(ctx, .pull)
        let push = try lingerless(ctx, .push)
        defer { push.close(); pull.close() }
        let endpoint = try pull.bind("tcp://127.0.0.1:*")
        try push.connect(endpoint)
        let size = 1 << 20
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 64)
        for i in 0..<size { buffer[i] = UInt8(truncatingIfNeeded: i * 7) }
        let released = Mutex(0)
        try push.send([.bytes(Array("header".utf8)), .noCopy(UnsafeRawBufferPointer(buffer), release: {
            released.withLock { $0 += 1 }
        })])
        let frames = try #require(try pull.receiveMessages(timeoutMilliseconds: 5000))
        #expect(frames.count == 2)
        #expect(frames[0].bytes == Array("header".utf8))
        #expect(frames[1].count == size)
        #expect(frames[1].withUnsafeBytes { $0.elementsEqual(UnsafeRawBufferPointer(buffer)) })
        // libzmq releases from its I/O thread once the bytes are on the wire.
        for _ in 0..<200 where released.withLock({ $0 }) == 0 { usleep(5000) }
        #expect(released.withLock { $0 } == 1)
        buffer.deallocate()
    }

    @Test("errors are typed and keep errno")
    func typedErrors() throws {
        let ctx = try ZMQContext()
        let a = try lingerless(ctx, .router)
        let b = try lingerless(ctx, .router)
        defer { a.close(); b.close() }
        let endpoint = try a.bind("tcp://127.0.0.1:*")
        do {
            try b.bind(endpoint)
            Issue.record("second bind to \(endpoint) succeeded")
        } catch {
            #expect(error.code == .addressInUse)
            #expect(error.errno == EADDRINUSE)
            #expect(error.operation.contains(endpoint))
        }
        do {
            try b.connect("nosuch://x")
            Issue.record("connect to a bogus transport succeeded")
        } catch {
            #expect(error.code == .invalidEndpoint)
            #expect(error.errno != 0)
        }
        let dealer = try lingerless(ctx, .dealer)
        defer { dealer.close() }
        #expect(try dealer.receive(timeoutMilliseconds: 20) == nil)
        do {
            try a.setRouterMandatory(true)
            try a.send([Array("nobody".utf8), Array("x".utf8)])
            Issue.record("send to an unknown routing id succeeded with ROUTER_MANDATORY")
        } catch {
            #expect(error.code == .hostUnreachable)
        }
    }

    @Test("a monitor with heartbeats reports the peer's disconnect")
    func monitorReportsDisconnect() throws {
        let ctx = try ZMQContext()
        let router = try lingerless(ctx, .router)
        try router.setHeartbeat(intervalMilliseconds: 100, timeoutMilliseconds: 300)
        let endpoint = try router.bind("tcp://127.0.0.1:*")
        let monitor = try router.monitor(events: [.accepted, .disconnected, .handshakeSucceeded])
        defer { monitor.close(); router.close() }
        let dealer = try lingerless(ctx, .dealer)
        try dealer.connect(endpoint)
        var seen: [ZMQSocketEvent.Kind] = []
        while !seen.contains(.handshakeSucceeded), let e = try ZMQSocketEvent.receive(from: monitor, timeoutMilliseconds: 5000) {
            seen.append(e.kind)
        }
        #expect(seen.contains(.accepted))
        #expect(seen.contains(.handshakeSucceeded))
        dealer.close()
        let event = try ZMQSocketEvent.receive(from: monitor, timeoutMilliseconds: 5000)
        #expect(event?.kind == .disconnected)
    }

    /// libzmq emits monitor events with a blocking send from its I/O thread:
    /// with the reading end closed and the monitor left on, the next event
    /// (here, the peer going away and each reconnect attempt) stops that
    /// thread, and no socket of the context moves again. This was an
    /// intermittent hang of the hostile-peer suite.
    @Test("closing a monitor stops it first: later events on its socket never stall the context")
    func closedMonitorNeverStallsTheContext() throws {
        let ctx = try ZMQContext()
        let server = try lingerless(ctx, .router)
        let endpoint = try server.bind("tcp://127.0.0.1:*")
        let client = try lingerless(ctx, .dealer)
        try client.setReconnectInterval(milliseconds: 10)
        let monitor = try client.monitor(events: .all)
        try client.connect(endpoint)
        var handshake: ZMQSocketEvent?
        while handshake?.kind != .handshakeSucceeded {
            handshake = try #require(try ZMQSocketEvent.receive(from: monitor, timeoutMilliseconds: 5000))
        }
        monitor.close()
        server.close()  // the client sees DISCONNECTED, then retries every 10 ms: many events, none read
        usleep(200_000)
        let a = try lingerless(ctx, .router)
        defer { a.close(); client.close() }
        let b = try lingerless(ctx, .dealer)
        defer { b.close() }
        try b.connect(try a.bind("tcp://127.0.0.1:*"))
        try b.send([[1, 2, 3]])
        let got = try a.receive(timeoutMilliseconds: 5000)
        #expect(got?.last == [1, 2, 3], "the context's I/O thread is stalled")
    }
}

@Suite("CURVE key files")
struct CurveKeyFileTests {
    @Test("written with mode 0600 and read back")
    func roundTrip() throws {
        let dir = makeTempDir()
        defer { removeTree(dir) }
        let keys = try CurveKeyPair.generate()
        let path = dir + "/job.key"
        try keys.write(to: path)
        var st = stat()
        #expect(stat(path, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o600)
        #expect(try CurveKeyPair.load(from: path) == keys)
    }

    @Test("a key file with mode 0644 is refused with a clear message")
    func refusesReadableKeyFile() throws {
        let dir = makeTempDir()
        defer { removeTree(dir) }
        let path = dir + "/job.key"
        try CurveKeyPair.generate().write(to: path)
        #expect(chmod(path, 0o644) == 0)
        do {
            _ = try CurveKeyPair.load(from: path)
            Issue.record("a 0644 key file was accepted")
        } catch {
            #expect(error.code == .insecureKeyFile)
            #expect(error.message.contains(path))
            #expect(error.message.contains("0644"))
            #expect(error.message.contains("chmod 600"))
        }
    }

    @Test("missing, malformed and invalid key files are typed errors")
    func badFiles() throws {
        let dir = makeTempDir()
        defer { removeTree(dir) }
        do {
            _ = try CurveKeyPair.load(from: dir + "/absent.key")
            Issue.record("missing file loaded")
        } catch {
            #expect(error.code == .keyFileIO)
            #expect(error.errno == ENOENT)
        }
        let path = dir + "/bad.key"
        let fd = open(path, O_WRONLY | O_CREAT, 0o600)
        let text = Array("public-key = short\nsecret-key = alsoshort\n".utf8)
        _ = text.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
        do {
            _ = try CurveKeyPair.load(from: path)
            Issue.record("invalid keys loaded")
        } catch {
            #expect(error.code == .invalidKey)
        }
        #expect(throws: ZMQError.self) { try CurveKeyPair(publicKey: String(repeating: "A", count: 39), secretKey: "x") }
    }
}

@Suite("endpoint scope")
struct EndpointScopeTests {
    @Test("only ipc, inproc and loopback tcp endpoints count as reachable from this host alone")
    func loopback() {
        for e in ["ipc:///tmp/x.sock", "inproc://a", "tcp://127.0.0.1:5555", "tcp://127.1.2.3:*", "tcp://localhost:1", "tcp://[::1]:9",
                  "tcp://10.0.0.1;127.0.0.1:5"] {
            #expect(ZMQEndpoint.isLoopbackOnly(e), "\(e)")
        }
        for e in ["tcp://*:5555", "tcp://0.0.0.0:1", "tcp://10.0.0.1:1", "tcp://eth0:1", "tcp://[::]:1", "tcp://128.0.0.1:1",
                  "tcp://127.0.0.1.5:1", "tcp://1270.0.0.1:1", "tcp://127.0.0.1", "udp://127.0.0.1:1", "tcp://[::1:1", "pgm://x"] {
            #expect(!ZMQEndpoint.isLoopbackOnly(e), "\(e)")
        }
    }
}
