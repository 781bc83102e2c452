import FTControl
import FTCore
import FTSystem
import FTZMQ
import Foundation
import Testing

/// Real processes on loopback: a coordinator, SMPs, toy workers.
@Suite("Control plane with real processes", .serialized)
struct RecoveryIntegrationTests {
    @Test("a heartbeat timeout above the coordinator's default start grace is taken: the grace follows the timeout, and the job runs to its end",
          .timeLimit(.minutes(5)))
    func longTimeout() throws {
        let job = try LocalJob(tag: "lt", nodes: 2, workersPerNode: 1, steps: 60) { o in o.timeoutMs = 3000 }
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 90) { job.coordinator?.poll() != nil }, "job did not end\n\(job.logs)")
        #expect(job.coordinator?.status == .exited(0), "\(job.logs)")
        #expect(!job.logs.contains("must exceed"), "\(job.logs)")
    }

    @Test("a SIGKILLed worker is detected through its SMP's exit report, not a timeout; the job restores, resumes and ends bit-exact",
          .timeLimit(.minutes(3)))
    func workerKill() throws {
        let job = try LocalJob(tag: "wk", nodes: 2, workersPerNode: 2, steps: 600)
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { (job.status()?["state"] as? String) == "running" && int(job.status()?["committed_step"]) >= 50 },
                "job never ran\n\(job.logs)")
        let before = job.status() ?? [:]
        let pid = try #require(job.workerPID(node: 1, worker: 0))
        let killedAt = monotonicSeconds()
        kill(pid, SIGKILL)
        #expect(waitUntil(seconds: 30) {
            let s = job.status()
            return int(s?["epoch"]) > int(before["epoch"]) && (s?["state"] as? String) == "running"
        }, "no recovery\n\(job.logs)")
        let after = try #require(job.status())
        let failure = try #require(after["last_failure"] as? [String: Any])
        #expect(failure["what"] as? String == "n1/w0")
        #expect((failure["detected_by"] as? String)?.contains("reported by SMP n1") == true)
        let detectedAt = try #require(failure["detected_at_s"] as? Double)
        let detectMs = (detectedAt - killedAt) * 1000
        print("worker SIGKILL detected after \(String(format: "%.1f", detectMs)) ms")
        #expect(failure["outcome"] as? String == "resumed")
        let phases = (failure["phases"] as? [[String: Any]])?.compactMap { $0["phase"] as? String }
        #expect(phases == ["detect", "plan", "rebuild", "restart", "resume"])
        #expect(int(after["committed_step"]) >= int(before["committed_step"]))

        // Every worker restored the same committed step, and the run ends as an uninterrupted one.
        #expect(waitUntil(seconds: 120) { job.coordinator?.poll() != nil }, "job did not finish\n\(job.logs)")
        #expect(job.coordinator?.status == .exited(0), "\(job.logs)")
        let restores = (0..<2).flatMap { n in (0..<2).map { w in
            job.workerLog(node: n, worker: w).split(separator: "\n").filter { $0.hasPrefix("restored step=") }.last.map(String.init)
        } }
        let steps = Set(restores.compactMap { $0?.split(separator: " ").first })
        #expect(steps.count == 1, "workers restored different steps: \(restores)")
        let expected = job.expectedFinalHashes()
        for n in 0..<2 {
            for w in 0..<2 {
                #expect(job.finalHash(node: n, worker: w) == expected[n * 2 + w], "rank \(n * 2 + w)\n\(job.workerLog(node: n, worker: w))")
            }
        }
        for smp in job.smps { #expect(smp.wait(timeoutSeconds: 20) == .exited(0)) }
    }

    @Test("an SMP silenced with SIGSTOP is detected by timeout; the job stops with a report; continued, it is fenced and changes nothing",
          .timeLimit(.minutes(5)))
    func smpStopped() throws {
        let job = try LocalJob(tag: "ss", nodes: 2, workersPerNode: 1, steps: 100_000, lingerMs: 5000)
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { int(job.status()?["committed_step"]) >= 20 }, "job never ran\n\(job.logs)")
        let stoppedAt = monotonicSeconds()
        kill(job.smps[1].pid, SIGSTOP)
        #expect(waitUntil(seconds: 10) { (job.status()?["state"] as? String) == "failed" }, "not stopped\n\(job.logs)")
        let failed = try #require(job.status())
        let failure = try #require(failed["last_failure"] as? [String: Any])
        #expect(failure["what"] as? String == "n1")
        #expect((failure["detected_by"] as? String)?.contains("heartbeat timeout") == true)
        let detectMs = ((failure["detected_at_s"] as? Double ?? 0) - stoppedAt) * 1000
        print("SMP SIGSTOP detected after \(String(format: "%.1f", detectMs)) ms")
        // Never before the timeout (how soon after is ft-bench detect's to measure).
        #expect(detectMs > 400, "detection after \(detectMs) ms with a 500 ms timeout")
        let reason = failed["stop_reason"] as? String ?? ""
        #expect(reason.contains("n1") && reason.contains("last committed"), "\(reason)")
        // The surviving node stopped its job and freed its memory.
        #expect(job.smps[0].wait(timeoutSeconds: 20) == .exited(1), "\(job.logs)")

        // Continued, the old SMP is refused and told to go; it changes nothing.
        kill(job.smps[1].pid, SIGCONT)
        #expect(job.smps[1].wait(timeoutSeconds: 10) == .exited(3), "\(job.logs)")
        #expect(readText(job.dir + "/smp-n1.log").contains("fenced by the coordinator"))
        let later = try #require(job.status())
        #expect(later["state"] as? String == "failed")
        #expect(int(later["epoch"]) == int(failed["epoch"]))
        #expect(int(later["committed_step"]) == int(failed["committed_step"]))
        #expect(int(later["fenced_messages"]) >= 1)
    }

    @Test("killing and restarting the coordinator mid-run loses no committed step, and training goes on",
          .timeLimit(.minutes(3)))
    func coordinatorRestart() throws {
        let job = try LocalJob(tag: "cr", nodes: 2, workersPerNode: 1, steps: 700)
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { int(job.status()?["committed_step"]) >= 100 }, "job never ran\n\(job.logs)")
        let before = int(job.status()?["committed_step"])
        job.coordinator!.kill(SIGKILL)
        job.coordinator!.wait(timeoutSeconds: 5)
        try job.startCoordinator()
        #expect(waitUntil(seconds: 30) { (job.status()?["state"] as? String) == "running" }, "no rebuild\n\(job.logs)")
        let rebuilt = try #require(job.status())
        #expect(int(rebuilt["committed_step"]) >= before, "committed \(before) before, \(int(rebuilt["committed_step"])) after")
        let failure = rebuilt["last_failure"] as? [String: Any]
        #expect(failure?["kind"] as? String == "coordinator")
        #expect(waitUntil(seconds: 120) { job.coordinator?.poll() != nil }, "job did not finish\n\(job.logs)")
        #expect(job.coordinator?.status == .exited(0))
        let expected = job.expectedFinalHashes()
        for n in 0..<2 { #expect(job.finalHash(node: n, worker: 0) == expected[n], "\(job.workerLog(node: n, worker: 0))") }
    }

    @Test("malformed frames and unauthenticated clients are counted and dropped; the coordinator keeps serving",
          .timeLimit(.minutes(5)))
    func hostileInput() throws {
        let job = try LocalJob(tag: "mf", nodes: 1, workersPerNode: 1, steps: 100_000)
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { (job.status()?["state"] as? String) == "running" }, "\(job.logs)")
        let keys = try JobKeys.load(from: job.dir + "/keys", role: .worker)
        let ctx = try ZMQContext()
        // An authenticated client sending garbage, truncated and oversized frames.
        let bad = try ctx.socket(.dealer, maxMessageBytes: ControlMessage.maxFrameBytes)
        defer { bad.close() }
        try bad.setLinger(milliseconds: 0)
        try bad.makeCurveClient(serverKey: keys.serverPublicKey, keys: keys.member)
        // Sends block until the handshake is done (a DEALER has no peer before):
        // wait for it here, however slowly a loaded machine gets there.
        let monitor = try bad.monitor(events: [.handshakeSucceeded])
        defer { monitor.close() }
        try bad.connect(job.endpoint)
        var handshake: ZMQSocketEvent?
        for _ in 0..<12 where handshake == nil { handshake = try ZMQSocketEvent.receive(from: monitor, timeoutMilliseconds: 5000) }
        #expect(handshake?.kind == .handshakeSucceeded)
        var rng = SplitMix64(seed: 99)
        let valid = ControlMessage.workerHeartbeat(step: 1, running: true, skipped: 0, activity: .idle).envelope(sender: "x", epoch: 1).encoded()
        for i in 0..<200 {
            let frame: [UInt8] = i % 2 == 0
                ? (0..<Int(rng.next() % 64)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                : Array(valid.prefix(Int(rng.next() % UInt64(valid.count))))
            try bad.send([frame])
        }
        try bad.send([[1, 2], [3, 4]])  // two frames
        // A client with a key the job does not know: its handshake is refused.
        let stranger = try ctx.socket(.dealer, maxMessageBytes: ControlMessage.maxFrameBytes)
        defer { stranger.close() }
        try stranger.setLinger(milliseconds: 0)
        try stranger.makeCurveClient(serverKey: keys.serverPublicKey, keys: try CurveKeyPair.generate())
        try stranger.connect(job.endpoint)
        try stranger.send([ControlMessage.statusQuery.envelope(sender: "stranger", epoch: 0).encoded()], dontWait: true)
        #expect(try stranger.receive(timeoutMilliseconds: 1000) == nil)
        #expect(waitUntil(seconds: 10) {
            let s = job.status()
            return int(s?["malformed_frames"]) >= 150 && int(s?["unauthenticated"]) >= 1
        }, "\(String(describing: job.status()))")
        #expect(job.coordinator?.poll() == nil)
        #expect((job.status()?["state"] as? String) == "running")
    }

    @Test("the read-only operator key reads the status and nothing else: a forged SMP report with it (or a worker's key) is dropped and counted",
          .timeLimit(.minutes(5)))
    func operatorKeyIsReadOnly() throws {
        let job = try LocalJob(tag: "op", nodes: 1, workersPerNode: 1, steps: 100_000)
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { (job.status()?["state"] as? String) == "running" }, "\(job.logs)")
        let workerPID = try #require(job.workerPID(node: 0, worker: 0))
        let ctx = try ZMQContext()
        // ftctl finds RUN_DIR/keys/operator.key and reads the status with it.
        let (status, text, _) = try runTool("ftctl", ["status", "--run-dir", job.dir, "--json"])
        #expect(status == .exited(0), "\(text)")
        #expect(text.contains("\"state\":\"running\""), "\(text)")
        for role in [JobKeys.KeyRole.operator, .worker] {
            let keys = try JobKeys.load(from: job.dir + "/keys", role: role)
            let s = try ctx.socket(.dealer, maxMessageBytes: ControlMessage.maxFrameBytes)
            defer { s.close() }
            try s.setLinger(milliseconds: 0)
            try s.makeCurveClient(serverKey: keys.serverPublicKey, keys: keys.member)
            try s.connect(job.endpoint)
            // The live worker's death, as its SMP would report it: a recovery, if it were believed.
            let epoch = UInt64(int(job.status()?["epoch"]))
            try s.send([ControlMessage.childExited(worker: "w0", pid: Int(workerPID), status: "signal 9").envelope(sender: "n0", epoch: epoch).encoded()])
            try s.send([ControlMessage.statusQuery.envelope(sender: "x", epoch: 0).encoded()])
            let reply = try #require(try s.receive(timeoutMilliseconds: 10_000), "no status reply to the \(role) key")
            let decoded = try ControlMessage.decode(reply[0]).0
            #expect({ if case .statusReply = decoded { true } else { false } }(), "not a status reply: \(decoded)")
        }
        #expect(waitUntil(seconds: 10) { int(job.status()?["unauthorized"]) >= 2 }, "\(String(describing: job.status()))")
        #expect(int(job.status()?["failures_total"]) == 0)
        #expect((job.status()?["state"] as? String) == "running")
        #expect(job.workerPID(node: 0, worker: 0) == workerPID)
    }

    @Test("a node's own key speaks only for that node: n1's key reporting n0's worker dead is dropped and counted; the shared smp.key is not admitted",
          .timeLimit(.minutes(5)))
    func nodeKeysSpeakForTheirNode() throws {
        let job = try LocalJob(tag: "nk", nodes: 2, workersPerNode: 1, steps: 100_000)
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { (job.status()?["state"] as? String) == "running" }, "\(job.logs)")
        let workerPID = try #require(job.workerPID(node: 0, worker: 0))
        let dir = job.dir + "/keys"
        let ctx = try ZMQContext()
        // n1's own key (what n1's SMP presents) under n0's name.
        let n1 = try JobKeys.load(from: dir, role: .smp, node: "n1")
        #expect(n1.member == (try CurveKeyPair.load(from: dir + "/smp-n1.key")))
        let s = try ctx.socket(.dealer, maxMessageBytes: ControlMessage.maxFrameBytes)
        defer { s.close() }
        try s.setLinger(milliseconds: 0)
        try s.makeCurveClient(serverKey: n1.serverPublicKey, keys: n1.member)
        try s.connect(job.endpoint)
        let epoch = UInt64(int(job.status()?["epoch"]))
        try s.send([ControlMessage.childExited(worker: "w0", pid: Int(workerPID), status: "signal 9").envelope(sender: "n0", epoch: epoch).encoded()])
        try s.send([ControlMessage.statusQuery.envelope(sender: "x", epoch: 0).encoded()])
        let reply = try #require(try s.receive(timeoutMilliseconds: 10_000), "no status reply to n1's key")
        var answered = false
        if case .statusReply = try ControlMessage.decode(reply[0]).0 { answered = true }
        #expect(answered)
        #expect(waitUntil(seconds: 10) { int(job.status()?["unauthorized"]) >= 1 }, "\(String(describing: job.status()))")
        // The shared smp.key, which every SMP holds to serve its data endpoint, is not a client key.
        let shared = try CurveKeyPair.load(from: dir + "/smp.key")
        let t = try ctx.socket(.dealer, maxMessageBytes: ControlMessage.maxFrameBytes)
        defer { t.close() }
        try t.setLinger(milliseconds: 0)
        try t.makeCurveClient(serverKey: n1.serverPublicKey, keys: shared)
        let events = try t.monitor(events: [.handshakeSucceeded, .handshakeFailedAuth])
        defer { events.close() }
        try t.connect(job.endpoint)
        var event: ZMQSocketEvent?
        for _ in 0..<12 where event == nil { event = try ZMQSocketEvent.receive(from: events, timeoutMilliseconds: 5000) }
        #expect(event?.kind == .handshakeFailedAuth)
        #expect(int(job.status()?["failures_total"]) == 0)
        #expect((job.status()?["state"] as? String) == "running")
        #expect(job.workerPID(node: 0, worker: 0) == workerPID)
    }
}
