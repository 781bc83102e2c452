import FTCore
import FTSMP
import FTSystem
import FTToy
import FTWorker
import FTZMQ
import Foundation
import Testing

/// Crafted messages against a real SMP (issue 13): each is refused with a
/// typed error reply and the SMP keeps serving.
@Suite("Hostile input to an SMP", .serialized)
struct HostileInputTests {
    /// A raw DEALER to the SMP that sends one frame and returns the decoded reply.
    final class Raw {
        let ctx: ZMQContext
        let socket: ZMQSocket
        init(_ endpoint: String) throws {
            ctx = try ZMQContext()
            socket = try ctx.socket(.dealer, maxMessageBytes: WireEnvelope.maxFrameBytes)
            try socket.setLinger(milliseconds: 0)
            try socket.connect(endpoint)
        }
        deinit { socket.close() }

        func ask(_ frame: [UInt8]) throws -> SMPMessage {
            try socket.send([frame])
            let reply = try #require(try socket.receive(timeoutMilliseconds: 10_000), "the SMP did not answer")
            return try SMPMessage.decode(reply[0]).0
        }

        /// Whether `m` is a `registered` reply.
        static func isRegistered(_ m: SMPMessage) -> Bool { if case .registered = m { true } else { false } }

        /// The error reply's code and message (nil: not an error).
        func refusal(_ m: SMPMessage, from sender: String = "w0") throws -> (code: String, message: String)? {
            guard case .error(let code, let message) = try ask(m.envelope(sender: sender).encoded()) else { return nil }
            return (code, message)
        }
    }

    @Test("an ipc:// request carries its sender's pid and uid (libzmq's Peer-Address, and SO_PEERCRED on its descriptor); other forms are not credentials")
    func peerCredentials() throws {
        #expect(PeerCredentials(peerAddress: ":1000:1000:4242") == PeerCredentials(pid: 4242, uid: 1000))
        for text in ["127.0.0.1", "::1", "", ":a:b:c", ":0:0:0", ":0:0:-5"] { #expect(PeerCredentials(peerAddress: text) == nil, "\(text)") }
        #expect(parentProcess(of: getpid()) == getppid())
        #expect(parentProcess(of: -1) == nil)

        let dir = makeRunDirectory("cred")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ctx = try ZMQContext()
        let server = try ctx.socket(.router, maxMessageBytes: 1024)
        let client = try ctx.socket(.dealer, maxMessageBytes: 1024)
        defer { server.close(); client.close() }
        try server.setLinger(milliseconds: 0)
        try client.setLinger(milliseconds: 0)
        let endpoint = try server.bind("ipc://\(dir)/cred.sock")
        try client.connect(endpoint)
        try client.send([[1, 2, 3]])
        let frames = try #require(try server.receiveMessages(timeoutMilliseconds: 10_000))
        let me = PeerCredentials(pid: getpid(), uid: getuid())
        #expect(frames[1].property("Peer-Address").flatMap(PeerCredentials.init(peerAddress:)) == me,
                "\(String(describing: frames[1].property("Peer-Address")))")
        #expect(frames[1].sourceDescriptor.flatMap(PeerCredentials.init(socket:)) == me)
    }

    @Test("each socket serves its audience only: a worker's requests on the TCP data endpoint and EC frames on the workers' socket are refused (unauthorized)")
    func endpointsByAudience() throws {
        // Nobody listens at this coordinator endpoint: the SMP only needs one to open its data endpoint.
        let smp = try InProcessSMP(tag: "aud", coordinator: "tcp://127.0.0.1:9")
        defer { smp.stop() }
        // Both sockets are ipc files of mode 0600 in the run directory's 0700 sockets directory.
        for endpoint in [smp.server.dataEndpoint, smp.server.boundEndpoint] {
            #expect(endpoint.hasPrefix("ipc://"), "\(endpoint)")
            var st = stat()
            #expect(stat(String(endpoint.dropFirst(6)), &st) == 0 && st.st_mode & 0o777 == 0o600, "\(endpoint)")
            let directory = URL(fileURLWithPath: String(endpoint.dropFirst(6))).deletingLastPathComponent().path
            #expect(stat(directory, &st) == 0 && st.st_mode & 0o777 == 0o700, "\(directory)")
        }
        let data = try Raw(smp.server.dataEndpoint)
        let reg = WorkerRegistration(workerID: "w0", dpRank: 0, dpSize: 1,
                                     specs: [TensorSpec(name: "t", dtype: .f32, shape: [1024], role: .param, replicated: true)])
        // Register, stage, void a round, read status: none of it over the data endpoint.
        for m: SMPMessage in [.register(reg), .begin(step: 1), .staged(step: 1, slot: 0, crcs: [0]), .restoreQuery(expected: nil),
                              .roundQuery, .status] {
            let r = try #require(try data.refusal(m), "\(m.type) over the data endpoint was served")
            #expect(r.code == "unauthorized", "\(m.type): \(r)")
        }
        // A slice request is a peer's: it is handled (here: no such worker), not refused for its socket.
        let slice = try #require(try data.refusal(.fetchSlice(dpRank: 0, dpSize: 1, tensor: "t", chunks: 0..<1)))
        #expect(slice.code == "unknown_worker", "\(slice)")
        // EC frames are for the data endpoint only.
        let local = try Raw(smp.server.boundEndpoint)
        for m: SMPMessage in [.ecFetch(step: 1, row: 0, index: 0, offset: 0, length: 8),
                              .ecChunk(step: 1, row: 0, dataIndex: 0, offset: 0, length: 8, crc: 0)] {
            let r = try #require(try local.refusal(m, from: "n1"), "\(m.type) on the workers' socket was served")
            #expect(r.code == "unauthorized", "\(m.type): \(r)")
        }
        #expect(smp.server.unauthorizedRequests == 8)
        // The workers' socket still serves a worker.
        #expect(Raw.isRegistered(try local.ask(SMPMessage.register(reg).envelope(sender: "w0").encoded())))
    }

    @Test("a process of another user cannot reach either SMP socket (the sockets directory is 0700)",
          .enabled(if: getuid() == 0 && access("/usr/bin/setpriv", X_OK) == 0 && access("/usr/bin/python3", X_OK) == 0,
                   "needs root, setpriv and /usr/bin/python3 to run a process as uid 65534"))
    func otherUserLockedOut() throws {
        let smp = try InProcessSMP(tag: "uid", coordinator: "tcp://127.0.0.1:9")
        defer { smp.stop() }
        for endpoint in [smp.server.dataEndpoint, smp.server.boundEndpoint] {
            let out = "/tmp/ft-uid-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).out"
            defer { unlink(out) }
            let connect = "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\nprint('connected')"
            let p = try ChildProcess(arguments: ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                                 "/usr/bin/python3", "-c", connect, String(endpoint.dropFirst(6))],
                                     environment: [:], outputPath: out)
            let status = p.wait(timeoutSeconds: 30)
            #expect(status != nil && status != .exited(0), "\(endpoint): \(readText(out))")
            #expect(readText(out).contains("PermissionError"), "\(endpoint): \(readText(out))")
        }
        // The job's own user still reaches them.
        #expect(Raw.isRegistered(try Raw(smp.server.boundEndpoint).ask(SMPMessage.register(
            WorkerRegistration(workerID: "w0", dpRank: 0, dpSize: 1, specs: [TensorSpec(name: "t", dtype: .f32, shape: [4], role: .param, replicated: false)]))
            .envelope(sender: "w0").encoded())))
    }

    @Test("a late reply (another request's id) is dropped, never taken for the answer to the request awaited")
    func lateReplyDropped() throws {
        let dir = "/tmp/ft-late-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ctx = try ZMQContext()
        let fake = try ctx.socket(.router, maxMessageBytes: nil)
        defer { fake.close() }
        try fake.setLinger(milliseconds: 0)
        let endpoint = try fake.bind("ipc://\(dir)/fake.sock")
        let client = try SnapshotClient(identity: WorkerIdentity(jobID: "late", workerID: "w0", dpRank: 0, dpSize: 1, smpEndpoint: endpoint))
        // A fake SMP: it answers the round query first with a reply under an older id (step 7), then under the request's own (step 3).
        let served = DispatchSemaphore(value: 0)
        final class Problem: @unchecked Sendable {
            private var text: String?
            private let lock = NSLock()
            func set(_ t: String) { lock.lock(); text = t; lock.unlock() }
            func get() -> String? { lock.lock(); defer { lock.unlock() }; return text }
        }
        let problem = Problem()
        Thread {
            defer { served.signal() }
            do {
                guard let frames = try fake.receive(timeoutMilliseconds: 10_000), frames.count == 2 else { problem.set("no request"); return }
                let (request, envelope) = try SMPMessage.decode(frames[1])
                guard case .roundQuery = request, envelope.epoch > 0 else { problem.set("unexpected request \(request) id \(envelope.epoch)"); return }
                try fake.send([frames[0], SMPMessage.roundReply(committedStep: 7, pending: false).envelope(sender: "n0", epoch: envelope.epoch &- 1).encoded()])
                try fake.send([frames[0], SMPMessage.roundReply(committedStep: 3, pending: false).envelope(sender: "n0", epoch: envelope.epoch).encoded()])
            } catch {
                problem.set("\(error)")
            }
        }.start()
        #expect(try client.committedStepOnSMP() == 3)
        served.wait()
        #expect(problem.get() == nil, "\(problem.get() ?? "")")
        #expect(client.staleReplies == 1)
    }

    @Test("an enormous shape, a huge dpSize, an ecFetch near Int64.max and negative values are refused; the SMP answers after")
    func craftedOverflows() throws {
        let smp = try InProcessSMP(tag: "ovf")
        defer { smp.stop() }
        let raw = try Raw(smp.server.boundEndpoint)
        let huge = WorkerRegistration(workerID: "w0", dpRank: 0, dpSize: 1,
                                      specs: [TensorSpec(name: "t", dtype: .f64, shape: [1 << 61], role: .param, replicated: false)])
        let r1 = try #require(try raw.refusal(.register(huge)))
        #expect(r1.code == "malformed" && r1.message.contains("out_of_range"), "\(r1)")
        let wide = WorkerRegistration(workerID: "w0", dpRank: Int.max - 1, dpSize: Int.max,
                                      specs: [TensorSpec(name: "t", dtype: .f32, shape: [1 << 20], role: .param, replicated: true)])
        let r2 = try #require(try raw.refusal(.register(wide)))
        #expect(r2.code == "malformed" && r2.message.contains("out_of_range"), "\(r2)")
        let fetch = try #require(try raw.refusal(.ecFetch(step: 1, row: 0, index: 0, offset: Int(Int64.max) - 10, length: 100), from: "n9"))
        #expect(fetch.code == "malformed" && fetch.message.contains("out_of_range"), "\(fetch)")
        let chunk = try #require(try raw.refusal(.ecChunk(step: Int.max, row: 0, dataIndex: 0, offset: 0, length: 8, crc: 0), from: "n9"))
        #expect(chunk.code == "malformed", "\(chunk)")
        let negative = try #require(try raw.refusal(.begin(step: -3)))
        #expect(negative.code == "malformed" && negative.message.contains("bad_value"), "\(negative)")
        #expect(smp.server.malformedFrames == 5)

        // Still serving: a status request, then a real registration and a snapshot round.
        let status = try raw.ask(SMPMessage.status.envelope(sender: "ops").encoded())
        let json = try #require({ if case .statusReply(let text) = status { text } else { nil } }(), "\(status)")
        #expect(json.contains("\"malformed_frames\":5"), "\(json)")
        let client = try SnapshotClient(identity: smp.identity("w1"))
        try register(client, ToyModel(elements: 1000, dpRank: 0))
        #expect(try client.restore() == nil)
    }

    @Test("a registration past --memory-limit is refused with memory_limit, naming the bytes; smaller ones still fit")
    func memoryLimit() throws {
        let smp = try InProcessSMP(tag: "mem", memoryLimit: 1 << 20)
        defer { smp.stop() }
        #expect(smp.server.memoryLimit == 1 << 20)
        let raw = try Raw(smp.server.boundEndpoint)
        func registration(_ worker: String, rank: Int, bytes: Int) -> WorkerRegistration {
            WorkerRegistration(workerID: worker, dpRank: rank, dpSize: 4, chunkBytes: 4096,
                               specs: [TensorSpec(name: "t", dtype: .u8, shape: [bytes], role: .param, replicated: false)])
        }
        // 2 slots of 600 KB: past a 1 MiB budget.
        let big = try #require(try raw.refusal(.register(registration("w0", rank: 0, bytes: 600_000))))
        #expect(big.code == StoreError.Code.memoryLimit.rawValue, "\(big)")
        #expect(big.message.contains("1200000 bytes") && big.message.contains("1048576"), "\(big.message)")
        #expect(segments(ofJob: smp.jobID).isEmpty)
        // 2 slots of 300 KB fit; then 448,576 bytes are left: a second such worker does not fit.
        #expect(Raw.isRegistered(try raw.ask(SMPMessage.register(registration("w1", rank: 1, bytes: 300_000)).envelope(sender: "w1").encoded())))
        let second = try #require(try raw.refusal(.register(registration("w2", rank: 2, bytes: 300_000)), from: "w2"))
        #expect(second.code == StoreError.Code.memoryLimit.rawValue, "\(second)")
        #expect(segments(ofJob: smp.jobID).count == 2)
        // The refused worker is not half-registered: a smaller registration under its id works.
        #expect(Raw.isRegistered(try raw.ask(SMPMessage.register(registration("w2", rank: 2, bytes: 100_000)).envelope(sender: "w2").encoded())))
        #expect(segments(ofJob: smp.jobID).count == 4)
    }
}
