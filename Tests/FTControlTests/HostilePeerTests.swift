import FTControl
import FTErasure
import FTLauncher
import FTCore
import FTSystem
import FTZMQ
import Foundation
import Testing

/// A local process that is not one of the job's tries everything against a
/// running job whose data planes are on the network (TCP with CURVE): reading
/// tensors, injecting parity, voiding a round, speaking for a worker, and
/// garbage of every shape on every listening socket. All of it is refused,
/// the job keeps running, and it ends with the hashes of an uninterrupted run.
@Suite("Hostile peers against a running job (real processes)", .serialized)
struct HostilePeerTests {
    /// A DEALER with `configure` applied and connected, and how its first
    /// handshake ended (succeeded, failed, or the server hung up).
    func connect(_ ctx: ZMQContext, _ endpoint: String, configure: (ZMQSocket) throws -> Void = { _ in }) throws -> (ZMQSocket, ZMQSocketEvent.Kind?) {
        let s = try ctx.socket(.dealer, maxMessageBytes: 1 << 20)
        try s.setLinger(milliseconds: 0)
        try configure(s)
        let events = try s.monitor(events: [.handshakeSucceeded, .handshakeFailedAuth, .handshakeFailedProtocol, .handshakeFailedNoDetail,
                                            .disconnected])
        defer { events.close() }
        try s.connect(endpoint)
        var event: ZMQSocketEvent?
        for _ in 0..<12 where event == nil { event = try ZMQSocketEvent.receive(from: events, timeoutMilliseconds: 5000) }
        return (s, event?.kind)
    }

    /// Raw bytes on a TCP port, as a port scanner or a confused client sends them.
    func rawTCP(_ endpoint: String, _ bytes: [UInt8]) throws {
        let colon = try #require(endpoint.lastIndex(of: ":"), "\(endpoint) has no port")
        let port = try #require(UInt16(endpoint[endpoint.index(after: colon)...]), "\(endpoint) has no port")
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        try #require(fd >= 0, "socket: errno \(errno)")
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        try #require(ok == 0, "connect to \(endpoint): errno \(errno)")
        _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// An error reply's code, or nil (no reply in 30 s, or not an error).
    func refusalCode(_ s: ZMQSocket) throws -> String? {
        guard let frames = try s.receiveMessages(timeoutMilliseconds: 30_000) else { return nil }
        let (reply, _) = try SMPMessage.decode(frames[0].bytes)
        guard case .error(let code, _) = reply else { return nil }
        return code
    }

    @Test("a process without the job's keys (or with a worker's) reads nothing, injects nothing, voids nothing and crashes nothing; the job ends bit-exact",
          .timeLimit(.minutes(4)))
    func hostilePeerSuite() throws {
        let job = try LocalJob(tag: "hostile", nodes: 4, workersPerNode: 1, steps: 1500, stateKiB: 256, stepMs: 5) { o in
            o.erasure = (3, 1)
            o.dataHost = "127.0.0.1"
        }
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { jsonInt(job.status()?["committed_step"]) >= 50 }, "\(job.logs)")
        let keys = job.dir + "/keys"
        let dataEndpoints = try (0..<4).map { try job.smpUpField(node: $0, "data") }
        let workerEndpoint = try job.smpUpField(node: 0, "endpoint")
        #expect(dataEndpoints.allSatisfy { $0.hasPrefix("tcp://127.0.0.1:") }, "\(dataEndpoints)")
        let ctx = try ZMQContext()
        var rng = SplitMix64(seed: 0x0BAD)
        func garbage(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8(truncatingIfNeeded: rng.next()) } }

        // 1. The coordinator: a key it does not know gets no answer; raw bytes on its port are dropped.
        let coordinatorKey = try loadPublicKey(from: keys + "/coordinator.pub")
        let (strangerToCoordinator, coordinatorHandshake) = try connect(ctx, job.endpoint) {
            try $0.makeCurveClient(serverKey: coordinatorKey, keys: try CurveKeyPair.generate())
        }
        defer { strangerToCoordinator.close() }
        #expect(coordinatorHandshake == .handshakeFailedAuth)
        for n in [0, 1, 7, 64, 4096] { try rawTCP(job.endpoint, garbage(n)) }

        for (n, data) in dataEndpoints.enumerated() {
            // 2. Each SMP's data endpoint: a stranger's key, or no CURVE at all, never completes a handshake.
            let (stranger, strangerHandshake) = try connect(ctx, data) {
                try $0.makeCurveClient(serverKey: try loadPublicKey(from: keys + "/smp.pub"), keys: try CurveKeyPair.generate())
            }
            stranger.close()
            #expect(strangerHandshake == .handshakeFailedAuth, "n\(n)")
            let (plain, plainHandshake) = try connect(ctx, data)
            plain.close()
            #expect(plainHandshake != .handshakeSucceeded, "n\(n): a client without CURVE completed a handshake")
            for size in [0, 1, 10, 64, 100_000] { try rawTCP(data, garbage(size)) }

            // 3. With a worker's key (a worker of the job gone rogue): no parity injected, no EC chunk read,
            // no round voided, no registration in a worker's name.
            let (rogue, rogueHandshake) = try connect(ctx, data) {
                try DataPlaneKeys.load(from: keys, memberFile: "worker.key").secureClient($0, for: data)
            }
            defer { rogue.close() }
            #expect(rogueHandshake == .handshakeSucceeded, "n\(n)")
            let committed = jsonInt(job.status()?["committed_step"])
            let attempts: [(SMPMessage, [[UInt8]])] = [
                (.ecChunk(step: committed + 1, row: 0, dataIndex: 0, offset: 0, length: 64, crc: CRC32C.checksum(Array(repeating: 0xEE, count: 64))),
                 [Array(repeating: 0xEE, count: 64)]),
                (.ecFetch(step: committed, row: 0, index: 0, offset: 0, length: 4096), []),
                (.restoreQuery(expected: nil), []),
                (.begin(step: committed + 1), []),
                (.status, []),
            ]
            for (message, extra) in attempts {
                try rogue.send([message.envelope(sender: "n\((n + 1) % 4)", epoch: 1).encoded()] + extra)
                #expect(try refusalCode(rogue) == "unauthorized", "n\(n): \(message) was not refused")
            }
            // Another node's SMP key under this name: an SMP speaks only for its own node.
            let other = (n + 1) % 4
            let (impersonator, impersonatorHandshake) = try connect(ctx, data) {
                try DataPlaneKeys.load(from: keys, node: "n\(other)").secureClient($0, for: data)
            }
            defer { impersonator.close() }
            #expect(impersonatorHandshake == .handshakeSucceeded, "n\(n)")
            try impersonator.send([SMPMessage.ecFetch(step: committed, row: 0, index: 0, offset: 0, length: 4096)
                .envelope(sender: "n\((n + 2) % 4)", epoch: 1).encoded()])
            #expect(try refusalCode(impersonator) == "unauthorized", "n\(n): n\(other)'s key fetched under another node's name")
            // Truncated, random and multi-frame garbage: counted and dropped, never answered with data.
            let valid = SMPMessage.fetchSlice(dpRank: 0, dpSize: 4, tensor: "params", chunks: 0..<1).envelope(sender: "w0", epoch: 1).encoded()
            for i in 0..<100 {
                try rogue.send([i % 2 == 0 ? garbage(Int(rng.next() % 200)) : Array(valid.prefix(Int(rng.next() % UInt64(valid.count))))])
            }
            try rogue.send([[1, 2, 3], garbage(10), garbage(1000)])
        }

        // 4. The workers' ipc socket of n0, from a process of the job's user that is not the worker it names:
        // it may not void w0's round or read its restore point.
        let (impostor, _) = try connect(ctx, workerEndpoint)
        defer { impostor.close() }
        try impostor.send([SMPMessage.restoreQuery(expected: nil).envelope(sender: "w0", epoch: 1).encoded()])
        #expect(try refusalCode(impostor) == "unauthorized")
        try impostor.send([SMPMessage.begin(step: jsonInt(job.status()?["committed_step"]) + 1).envelope(sender: "w0", epoch: 1).encoded()])
        #expect(try refusalCode(impostor) == "unauthorized")

        // The job noticed none of it: no failure, the run ends with the uninterrupted hashes.
        #expect(job.status()?["last_failure"] == nil || job.status()?["last_failure"] is NSNull, "\(String(describing: job.status()))")
        #expect(waitUntil(seconds: 180) { job.coordinator?.poll() != nil }, "job did not end\n\(job.logs)")
        #expect(job.coordinator?.status == .exited(0), "\(job.logs)")
        let expected = job.expectedFinalHashes()
        for n in 0..<4 {
            #expect(job.finalHash(node: n, worker: 0) == expected[n], "rank \(n)\n\(job.workerLog(node: n, worker: 0))")
        }
        let refusals = (0..<4).map { readText(job.dir + "/smp-n\($0).log").components(separatedBy: "refused a request").count - 1 }
        #expect(refusals.reduce(0, +) >= 4 * 6 + 2, "\(refusals)")
    }
}
