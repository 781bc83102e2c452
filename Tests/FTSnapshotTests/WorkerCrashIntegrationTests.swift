import FTCore
import FTSMP
import FTSystem
import FTToy
import FTZMQ
import Foundation
import Testing

/// Real processes: `ft-smp` spawns `ft-toy-worker`, which trains and
/// snapshots every step; the test SIGKILLs the worker at seeded random
/// moments (and once, by fault injection, halfway through a copy), the SMP
/// restarts it, and it restores from the SMP's memory.
@Suite("Worker crash and restore (real processes)")
struct WorkerCrashIntegrationTests {
    struct Incarnation {
        var restoredStep: Int?
        var restoredHash: String?
    }

    @Test("a worker SIGKILLed at random points, including mid-copy, restores the last committed snapshot and ends bit-exact", .timeLimit(.minutes(3)))
    func killAndRestore() throws {
        let seed = ProcessInfo.processInfo.environment["FT_TEST_SEED"].flatMap(UInt64.init) ?? UInt64.random(in: 1...999_999)
        print("WorkerCrashIntegrationTests seed=\(seed) (replay with FT_TEST_SEED=\(seed))")
        var rng = SplitMix64(seed: seed)
        let steps = 300
        let stateKiB = 1024
        let faultStep = 20 + Int(rng.next() % 40)
        let randomKills = 3

        let dir = makeRunDirectory("crash")
        let job = uniqueJobID("crash")
        let smpLog = dir + "/smp.log"
        let workerLog = dir + "/logs/n0-w0.log"
        let workerPidFile = dir + "/pids/n0-w0.pid"
        var env = ProcessInfo.processInfo.environment
        env["FT_FAULT_KILL_MID_COPY_STEP"] = "\(faultStep)"
        let smp = try ChildProcess(
            arguments: [productsDirectory + "/ft-smp", "--job-id", job, "--node-id", "n0", "--run-dir", dir, "--workers", "1",
                        "--", productsDirectory + "/ft-toy-worker", "--steps", "\(steps)", "--state-kib", "\(stateKiB)", "--step-ms", "4"],
            environment: env, outputPath: smpLog)
        var killedPIDs: [Int32] = []
        defer {
            // End exactly what this test started, by PID, even on failure.
            if smp.poll() == nil {
                if let pid = Int32(readText(workerPidFile).trimmingCharacters(in: .whitespacesAndNewlines)) { kill(pid, SIGKILL) }
                smp.kill(SIGKILL)
                smp.wait(timeoutSeconds: 10)
            }
            for name in segments(ofJob: job) { _ = SharedMemorySegment.unlink(name: "/" + name) }
        }

        func incarnationsStarted() -> Int {
            readText(workerLog).split(separator: "\n").filter { $0.hasPrefix("restored") || $0.hasPrefix("fresh start") }.count
        }

        // 1. The fault-injected kill halfway through copying `faultStep`, then the restart.
        #expect(waitUntil(seconds: 60) { incarnationsStarted() >= 2 }, "worker never restarted after the mid-copy kill\n\(readText(smpLog))")

        // 2. Seeded random SIGKILLs, each after the previous incarnation restored.
        for kill in 0..<randomKills {
            let delay = 50 + Int(rng.next() % 400)
            usleep(UInt32(delay * 1000))
            guard let pid = Int32(readText(workerPidFile).trimmingCharacters(in: .whitespacesAndNewlines)), !killedPIDs.contains(pid) else {
                Issue.record("no fresh worker pid to kill")
                break
            }
            if smp.poll() != nil { break }  // the job already ended
            killedPIDs.append(pid)
            Glibc.kill(pid, SIGKILL)
            print("kill \(kill + 1): SIGKILL worker pid \(pid) after \(delay) ms")
            let before = incarnationsStarted()
            #expect(waitUntil(seconds: 60) { incarnationsStarted() > before || smp.poll() != nil })
        }

        // 3. The job ends cleanly and frees its shared memory.
        let status = smp.wait(timeoutSeconds: 120)
        #expect(status == .exited(0), "ft-smp ended with \(String(describing: status))\n\(readText(smpLog))")
        #expect(segments(ofJob: job).isEmpty, "shared memory left behind: \(segments(ofJob: job))")

        // The oracle: the same toy training, uninterrupted, in this process.
        let oracle = ToyModel(elements: stateKiB * 256, dpRank: 0)
        var expected = [0: oracle.hash]
        for s in 1...steps {
            oracle.apply(step: s)
            expected[s] = oracle.hash
        }

        // Each restart restored exactly the step the SMP held committed when the
        // previous incarnation died, with exactly that step's bytes.
        let exits = readText(smpLog).split(separator: "\n").filter { $0.contains("worker exited") }
        let committedAtExit = exits.map { line -> Int? in
            line.split(separator: " ").first { $0.hasPrefix("committed=") }.flatMap { Int($0.dropFirst("committed=".count)) }
        }
        let starts = readText(workerLog).split(separator: "\n").filter { $0.hasPrefix("restored") || $0.hasPrefix("fresh start") }
        #expect(starts.count == exits.count, "\(starts.count) starts for \(exits.count) exits")
        #expect(exits.count >= 2 + 1, "expected the mid-copy kill, at least one random kill and the clean exit")
        for (i, start) in starts.enumerated().dropFirst() where i - 1 < committedAtExit.count {
            let fields = Dictionary(uniqueKeysWithValues: start.split(separator: " ").compactMap { f -> (String, String)? in
                let kv = f.split(separator: "=", maxSplits: 1)
                return kv.count == 2 ? (String(kv[0]), String(kv[1])) : nil
            })
            let step = fields["step"].flatMap { Int($0) }
            #expect(step == committedAtExit[i - 1], "incarnation \(i) restored \(String(describing: step)), SMP held \(String(describing: committedAtExit[i - 1]))")
            if let step {
                #expect(fields["hash"] == expected[step], "incarnation \(i): restored bytes of step \(step) differ from that step's snapshot")
            }
        }
        // The mid-copy kill: the torn slot was never restored; the step before it was.
        if starts.count > 1 {
            #expect(starts[1].hasPrefix("restored step=\(faultStep - 1) "), "after the kill while copying step \(faultStep): \(starts[1])")
        }
        let final = readText(workerLog).split(separator: "\n").last { $0.hasPrefix("final") }
        #expect(final?.hasPrefix("final step=\(steps) hash=\(expected[steps]!) ") == true,
                "final state differs from the uninterrupted run: \(String(describing: final))")
        try? FileManager.default.removeItem(atPath: dir)
    }
}

@Suite("ft-smp lifecycle (real processes)")
struct SMPLifecycleTests {
    /// A real `ft-smp` (node n0, no coordinator) spawning two endless toy
    /// workers, `workerPrefix` before the worker command; `end()` ends exactly
    /// what it started, by PID, and frees its segments and run directory.
    final class TwoWorkerSMP {
        let dir: String
        let job: String
        let process: ChildProcess

        init(tag: String, options: [String] = [], workerPrefix: [String] = []) throws {
            dir = makeRunDirectory(tag)
            job = uniqueJobID(tag)
            process = try ChildProcess(
                arguments: [productsDirectory + "/ft-smp", "--job-id", job, "--node-id", "n0", "--run-dir", dir, "--workers", "2"]
                    + options + ["--"] + workerPrefix
                    + [productsDirectory + "/ft-toy-worker", "--steps", "100000", "--state-kib", "64", "--step-ms", "2"],
                environment: ProcessInfo.processInfo.environment, outputPath: dir + "/smp.log")
        }

        var log: String { readText(dir + "/smp.log") }

        func workerPIDs() -> [Int32] {
            (0..<2).compactMap { Int32(readText(dir + "/pids/n0-w\($0).pid").trimmingCharacters(in: .whitespacesAndNewlines)) }
        }

        func end() {
            if process.poll() == nil {
                for pid in workerPIDs() { kill(pid, SIGKILL) }
                process.kill(SIGKILL)
                process.wait(timeoutSeconds: 10)
            }
            for name in segments(ofJob: job) { _ = SharedMemorySegment.unlink(name: "/" + name) }
            try? FileManager.default.removeItem(atPath: dir)
        }
    }

    // Time limits count the wait for a free test thread too: on 2 cores the seeded
    // simulations can hold both for minutes while this suite waits its turn.
    @Test("SIGTERM stops the workers and frees every shared-memory segment", .timeLimit(.minutes(4)))
    func sigterm() throws {
        let job = try TwoWorkerSMP(tag: "term")
        defer { job.end() }
        let (dir, smp) = (job.dir, job.process)
        func workerPIDs() -> [Int32] { job.workerPIDs() }
        #expect(waitUntil(seconds: 30) { segments(ofJob: job.job).count == 4 && readText(dir + "/logs/n0-w1.log").contains("fresh start") })
        for name in segments(ofJob: job.job) { #expect(try SharedMemorySegment.mode(name: "/" + name) == 0o600) }
        let workers = workerPIDs()
        #expect(workers.count == 2)
        smp.kill(SIGTERM)
        let status = smp.wait(timeoutSeconds: 20)
        #expect(status == .exited(0), "\(readText(dir + "/smp.log"))")
        #expect(segments(ofJob: job.job).isEmpty)
        for pid in workers { #expect(kill(pid, 0) == -1, "worker \(pid) still running after the SMP stopped") }
        #expect(readText(dir + "/smp.log").contains("stopping on signal 15"))
    }

    @Test("the workers' socket is 0600 in a 0700 directory; a request from a process that is not the worker it names is refused, and the real worker goes on",
          .timeLimit(.minutes(4)))
    func workerSocketPeers() throws {
        // Both children say they are w1 (their environment is overridden): the
        // child spawned as w0 speaks for w1 and must be refused; w1 is itself.
        let smp = try TwoWorkerSMP(tag: "peer", options: ["--max-restarts", "0"], workerPrefix: ["/usr/bin/env", "FT_WORKER_ID=w1"])
        defer { smp.end() }
        let (dir, job) = (smp.dir, smp.job)
        let smpLog = { readText(dir + "/smp.log") }
        #expect(waitUntil(seconds: 30) { smpLog().contains("may not speak for 'w1'") }, "\(smpLog())")
        #expect(waitUntil(seconds: 30) { readText(dir + "/logs/n0-w1.log").contains("fresh start") }, "\(smpLog())")
        #expect(segments(ofJob: job).count == 2, "only w1 (the real one) registered: \(segments(ofJob: job))")

        let sockets = dir + "/" + SMPConfiguration.socketDirectoryName
        let files = try FileManager.default.contentsOfDirectory(atPath: sockets).filter { $0.hasSuffix(".smp.sock") }
        let socketFile = try #require(files.first, "no socket in \(sockets)")
        var st = stat()
        #expect(stat(sockets, &st) == 0 && st.st_mode & 0o777 == 0o700, "\(String(st.st_mode, radix: 8))")
        #expect(stat(sockets + "/" + socketFile, &st) == 0 && st.st_mode & 0o777 == 0o600, "\(String(st.st_mode, radix: 8))")

        // This test process is no worker of the SMP: nothing it asks is served, whatever name it gives.
        let ctx = try ZMQContext()
        let raw = try ctx.socket(.dealer, maxMessageBytes: WireEnvelope.maxFrameBytes)
        defer { raw.close() }
        try raw.setLinger(milliseconds: 0)
        try raw.connect("ipc://" + sockets + "/" + socketFile)
        for (message, sender) in [(SMPMessage.restoreQuery(expected: nil), "w1"), (.status, "ops"), (.begin(step: 1 << 30), "w1")] {
            try raw.send([message.envelope(sender: sender).encoded()])
            let reply = try #require(try raw.receive(timeoutMilliseconds: 10_000), "no reply to \(message.type)")
            let decoded = try SMPMessage.decode(reply[0]).0
            let (code, text) = try #require({ if case .error(let c, let t) = decoded { (c, t) } else { nil } }(),
                                            "\(message.type) from a stranger was served")
            #expect(code == "unauthorized" && text.contains("not a worker of node n0"), "\(code): \(text)")
        }
        // The real w1 still trains and snapshots.
        let before = readText(dir + "/logs/n0-w1.log").count
        #expect(waitUntil(seconds: 20) { readText(dir + "/logs/n0-w1.log").count > before }, "w1 stopped after the refusals")
        smp.process.kill(SIGTERM)
        #expect(smp.process.wait(timeoutSeconds: 20) != nil)
    }
}
