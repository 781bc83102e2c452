import FTCore
import FTLauncher
import FTSystem
import FTZMQ
import Foundation
import Testing

/// Nodes lost and rebuilt from parity, with real processes.
@Suite("Erasure coding across nodes (real processes)", .serialized)
struct ErasureIntegrationTests {
    /// A job of `nodes` nodes with one toy worker each, under EC k+m.
    func makeJob(_ tag: String, nodes: Int, k: Int, m: Int, steps: Int, smpEnvironment: [Int: [String: String]] = [:]) throws -> LocalJob {
        try LocalJob(tag: tag, nodes: nodes, workersPerNode: 1, steps: steps, stateKiB: 512, stepMs: 5) { o in
            o.erasure = (k, m)
            o.smpEnvironment = smpEnvironment
        }
    }

    /// Kills node `n` like a host dying: its worker and its SMP, SIGKILL.
    func killNode(_ job: LocalJob, _ n: Int) {
        if let pid = job.workerPID(node: n, worker: 0) { kill(pid, SIGKILL) }
        kill(job.smps[n].pid, SIGKILL)
    }

    /// Waits until the coordinator has declared these nodes dead (the launcher
    /// starts replacements once a node is known lost).
    func waitDeclaredDead(_ job: LocalJob, _ nodes: [Int]) -> Bool {
        waitUntil(seconds: 20) {
            let ns = (job.status()?["nodes"] as? [[String: Any]]) ?? []
            return nodes.allSatisfy { n in ns.contains { $0["id"] as? String == "n\(n)" && ($0["smp"] as? String == "dead" || $0["smp"] as? String == "fenced") } }
        }
    }

    func expectBitExact(_ job: LocalJob, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(waitUntil(seconds: 150) { job.coordinator?.poll() != nil }, "job did not end\n\(job.logs)", sourceLocation: sourceLocation)
        #expect(job.coordinator?.status == .exited(0), "\(job.logs)", sourceLocation: sourceLocation)
        let expected = job.expectedFinalHashes()
        for n in 0..<job.nodes {
            #expect(job.finalHash(node: n, worker: 0) == expected[n], "rank \(n)\n\(job.workerLog(node: n, worker: 0))",
                    sourceLocation: sourceLocation)
        }
    }

    @Test("RS(3+1): a node killed (SMP and worker) is rebuilt from parity and the run ends bit-exact", .timeLimit(.minutes(3)))
    func oneNode() throws {
        let job = try makeJob("ec31", nodes: 4, k: 3, m: 1, steps: 500)
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { jsonInt(job.status()?["committed_step"]) >= 100 }, "\(job.logs)")
        let healthy = (job.status()?["nodes"] as? [[String: Any]]) ?? []
        #expect(healthy.allSatisfy { $0["ec_group"] as? String == "0" && $0["ec_health"] as? String == "ok" }, "\(healthy)")
        killNode(job, 2)
        #expect(waitDeclaredDead(job, [2]), "\(job.logs)")
        let degraded = (job.status()?["nodes"] as? [[String: Any]]) ?? []
        #expect(degraded.allSatisfy { $0["ec_health"] as? String == "degraded" }, "\(degraded)")
        try job.inner.startSMP(node: 2)  // the launcher's part: the same node, restarted empty
        #expect(waitUntil(seconds: 60) { (job.status()?["last_failure"] as? [String: Any])?["outcome"] as? String == "resumed" },
                "\(job.logs)")
        let phases = ((job.status()?["last_failure"] as? [String: Any])?["phases"] as? [[String: Any]]) ?? []
        #expect(phases.contains { $0["phase"] as? String == "rebuild" && ($0["reason"] as? String ?? "").contains("from parity") },
                "\(phases)")
        #expect(readText(job.dir + "/smp-n2.log").contains("rebuilt node n2"))
        expectBitExact(job)
    }

    @Test("RS(3+1) with 4 KiB frames: chunks travel and are rebuilt in many frames, folded and decoded frame by frame, bit-exact",
          .timeLimit(.minutes(3)))
    func manyFrames() throws {
        let small = ["FT_EC_FRAME_BYTES": "4096"]
        let job = try makeJob("ecfrm", nodes: 4, k: 3, m: 1, steps: 400, smpEnvironment: Dictionary(uniqueKeysWithValues: (0..<4).map { ($0, small) }))
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { jsonInt(job.status()?["committed_step"]) >= 60 }, "\(job.logs)")
        killNode(job, 1)
        #expect(waitDeclaredDead(job, [1]), "\(job.logs)")
        try job.inner.startSMP(node: 1, environment: small)
        #expect(waitUntil(seconds: 60) { (job.status()?["last_failure"] as? [String: Any])?["outcome"] as? String == "resumed" },
                "\(job.logs)")
        let log = readText(job.dir + "/smp-n1.log")
        let line = try #require(log.split(separator: "\n").first { $0.contains("rebuilt node n1") }, "\(log)")
        let frames = line.split(separator: " ").first { $0.hasPrefix("frames=") }.flatMap { Int($0.dropFirst("frames=".count)) } ?? 0
        // 4 rows of chunks of 80+ KiB each (the image is over 256 KiB), in 4 KiB frames.
        #expect(frames > 60, "\(line)")
        #expect(log.contains("frame_bytes=4096"), "\(log)")
        expectBitExact(job)
    }

    @Test("RS(4+2): two nodes killed at once are rebuilt and the run ends bit-exact", .timeLimit(.minutes(3)))
    func twoNodes() throws {
        let job = try makeJob("ec42", nodes: 6, k: 4, m: 2, steps: 400)
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { jsonInt(job.status()?["committed_step"]) >= 80 }, "\(job.logs)")
        killNode(job, 1)
        killNode(job, 4)
        #expect(waitDeclaredDead(job, [1, 4]), "\(job.logs)")
        try job.inner.startSMP(node: 1)
        try job.inner.startSMP(node: 4)
        #expect(waitUntil(seconds: 60) { (job.status()?["last_failure"] as? [String: Any])?["outcome"] as? String == "resumed" },
                "\(job.logs)")
        for n in [1, 4] { #expect(readText(job.dir + "/smp-n\(n).log").contains("rebuilt node n\(n)")) }
        expectBitExact(job)
    }

    @Test("RS(3+1): a node killed in the middle of an encoding round; the previous committed step stands and is rebuilt",
          .timeLimit(.minutes(3)))
    func duringEncoding() throws {
        let job = try makeJob("ecmid", nodes: 4, k: 3, m: 1, steps: 400, smpEnvironment: [1: ["FT_FAULT_KILL_DURING_EC_STEP": "60"]])
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { job.smps[1].poll() != nil }, "the fault did not fire\n\(job.logs)")
        if let pid = job.workerPID(node: 1, worker: 0) { kill(pid, SIGKILL) }
        let line = readText(job.dir + "/smp-n1.log").split(separator: "\n").first { $0.contains("fault injection: SIGKILL during the EC round of step") }
        let killedStep = try #require(line.flatMap { Int($0.split(separator: " ").last ?? "") }, "\(job.logs)")
        #expect(waitDeclaredDead(job, [1]), "\(job.logs)")
        try job.inner.startSMP(node: 1)
        #expect(waitUntil(seconds: 60) { (job.status()?["last_failure"] as? [String: Any])?["outcome"] as? String == "resumed" },
                "\(job.logs)")
        // The round being encoded never committed: everyone went back to a step before it.
        for n in 0..<4 {
            let restored = job.workerLog(node: n, worker: 0).split(separator: "\n").filter { $0.hasPrefix("restored step=") }
            for r in restored {
                let step = Int(r.dropFirst("restored step=".count).prefix { $0 != " " }) ?? .max
                #expect(step < killedStep, "node \(n) restored \(step), the interrupted round was \(killedStep)")
            }
        }
        expectBitExact(job)
    }

    @Test("a flipped byte in a stored chunk is repaired from parity instead of failing the restore", .timeLimit(.minutes(3)))
    func flippedByte() throws {
        // Small frames: the repair of one tensor chunk spans several framed fetches.
        let job = try makeJob("ecflip", nodes: 4, k: 3, m: 1, steps: 600,
                              smpEnvironment: Dictionary(uniqueKeysWithValues: (0..<4).map { ($0, ["FT_EC_FRAME_BYTES": "4096"]) }))
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { jsonInt(job.status()?["committed_step"]) >= 100 }, "\(job.logs)")
        // Hold n2's SMP still, kill its worker and corrupt both of that worker's slots before the SMP
        // sees the death. The worker itself must die: a survivor whose live state is the committed
        // step checks its own memory and reads nothing, so only a replacement reads the slot.
        kill(job.smps[2].pid, SIGSTOP)
        let victim = try #require(job.workerPID(node: 2, worker: 0), "\(job.logs)")
        kill(victim, SIGKILL)
        // Dead (a zombie its stopped parent has not reaped) before its slots are touched.
        #expect(waitUntil(seconds: 10) { readText("/proc/\(victim)/stat").split(separator: ")").last?.dropFirst().first == "Z" })
        var flipped = 0
        for slot in 0..<2 {
            let path = "/dev/shm/ft-\(job.job)-n2-p\(job.smps[2].pid)-w0-s\(slot)"
            guard let h = FileHandle(forUpdatingAtPath: path) else { continue }
            try h.seek(toOffset: 100_000)
            let b = try h.read(upToCount: 1) ?? Data([0])
            try h.seek(toOffset: 100_000)
            try h.write(contentsOf: Data([b[0] ^ 0x40]))
            try h.close()
            flipped += 1
        }
        #expect(flipped == 2)
        kill(job.smps[2].pid, SIGCONT)
        #expect(waitUntil(seconds: 60) { (job.status()?["last_failure"] as? [String: Any])?["outcome"] as? String == "resumed" },
                "\(job.logs)")
        #expect(readText(job.dir + "/smp-n2.log").contains("repaired worker w0"), "\(readText(job.dir + "/smp-n2.log"))")
        expectBitExact(job)
    }

    @Test("a staged slot changed after its worker wrote it is never folded into parity: the worker is ended and the job goes back to the committed step, bit-exact",
          .timeLimit(.minutes(3)))
    func strayWriteBeforeProtect() throws {
        let job = try makeJob("ecstray", nodes: 4, k: 3, m: 1, steps: 400, smpEnvironment: [1: ["FT_FAULT_FLIP_STAGED_STEP": "80"]])
        defer { job.cleanUp() }
        let marker = "fault injection: a byte of step "
        #expect(waitUntil(seconds: 60) { readText(job.dir + "/smp-n1.log").contains(marker) }, "the fault did not fire\n\(job.logs)")
        let line = try #require(readText(job.dir + "/smp-n1.log").split(separator: "\n").first { $0.contains(marker) }, "\(job.logs)")
        let flipped = try #require(line.range(of: marker).flatMap { Int(line[$0.upperBound...].prefix { $0.isNumber }) }, "\(line)")
        #expect(waitUntil(seconds: 30) { readText(job.dir + "/smp-n1.log").contains("snapshot of step \(flipped) fails its CRC32C") },
                "\(job.logs)")
        #expect(waitUntil(seconds: 60) { (job.status()?["last_failure"] as? [String: Any])?["outcome"] as? String == "resumed" },
                "\(job.logs)")
        // The corrupt round never committed: every worker went back to a step before it.
        for n in 0..<4 {
            for r in job.workerLog(node: n, worker: 0).split(separator: "\n") where r.hasPrefix("restored step=") {
                let step = Int(r.dropFirst("restored step=".count).prefix { $0 != " " }) ?? .max
                #expect(step < flipped, "node \(n) restored \(step), the corrupt round was \(flipped)")
            }
        }
        expectBitExact(job)
    }

    @Test("SMP data planes on TCP with CURVE: a stranger's key is refused in the handshake, a worker's key may not fetch EC chunks, and a node is rebuilt and every slice fetched over CURVE, bit-exact",
          .timeLimit(.minutes(3)))
    func curveDataPlane() throws {
        let job = try LocalJob(tag: "eccurve", nodes: 4, workersPerNode: 1, steps: 500, stateKiB: 512, stepMs: 5) { o in
            o.erasure = (3, 1)
            o.dataHost = "127.0.0.1"
        }
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { jsonInt(job.status()?["committed_step"]) >= 100 }, "\(job.logs)")
        let data = try job.smpUpField(node: 0, "data")
        #expect(data.hasPrefix("tcp://127.0.0.1:"), "\(data)")
        let keys = job.dir + "/keys"
        #expect(try loadPublicKey(from: keys + "/smp.pub") == CurveKeyPair.load(from: keys + "/smp.key").publicKey)
        let ctx = try ZMQContext()

        // A key the job does not know: the SMP's ZAP handler refuses the handshake.
        let stranger = try ctx.socket(.dealer, maxMessageBytes: 1 << 20)
        defer { stranger.close() }
        try stranger.setLinger(milliseconds: 0)
        try stranger.makeCurveClient(serverKey: try loadPublicKey(from: keys + "/smp.pub"), keys: try CurveKeyPair.generate())
        let strangerEvents = try stranger.monitor(events: [.handshakeFailedAuth, .handshakeSucceeded])
        defer { strangerEvents.close() }
        try stranger.connect(data)
        var event: ZMQSocketEvent?
        for _ in 0..<12 where event == nil { event = try ZMQSocketEvent.receive(from: strangerEvents, timeoutMilliseconds: 5000) }
        #expect(event?.kind == .handshakeFailedAuth, "\(String(describing: event))")

        // A worker's key gets in, as the role its key proves: it may fetch slices, not EC chunks.
        let worker = try ctx.socket(.dealer, maxMessageBytes: 1 << 20)
        defer { worker.close() }
        try worker.setLinger(milliseconds: 0)
        try DataPlaneKeys.load(from: keys, memberFile: "worker.key").secureClient(worker, for: data)
        let workerEvents = try worker.monitor(events: [.handshakeSucceeded])
        defer { workerEvents.close() }
        try worker.connect(data)
        var handshake: ZMQSocketEvent?
        for _ in 0..<12 where handshake == nil { handshake = try ZMQSocketEvent.receive(from: workerEvents, timeoutMilliseconds: 5000) }
        #expect(handshake?.kind == .handshakeSucceeded)
        // Under an SMP's name: the name is not what counts, the key is.
        try worker.send([SMPMessage.ecFetch(step: 1, row: 0, index: 0, offset: 0, length: 64).envelope(sender: "n1", epoch: 7).encoded()])
        let frames = try #require(try worker.receiveMessages(timeoutMilliseconds: 30_000), "no answer to an EC fetch under a worker key")
        let (reply, _) = try SMPMessage.decode(frames[0].bytes)
        var refusal: (code: String, text: String)?
        if case .error(let code, let text) = reply { refusal = (code, text) }
        let (code, text) = try #require(refusal, "an EC fetch under a worker key was answered with \(reply)")
        #expect(code == "unauthorized" && text.contains("role 'worker'"), "\(code): \(text)")

        // The job itself: EC rounds, a node's rebuild and the restores' slices, all over CURVE.
        killNode(job, 2)
        #expect(waitDeclaredDead(job, [2]), "\(job.logs)")
        try job.inner.startSMP(node: 2)
        #expect(waitUntil(seconds: 60) { (job.status()?["last_failure"] as? [String: Any])?["outcome"] as? String == "resumed" },
                "\(job.logs)")
        #expect(readText(job.dir + "/smp-n2.log").contains("rebuilt node n2"))
        expectBitExact(job)
    }
}
