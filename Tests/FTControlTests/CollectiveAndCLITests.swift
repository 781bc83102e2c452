import FTControl
import FTCore
import FTSystem
import FTWorker
import FTZMQ
import Foundation
import Logging
import Synchronization
import Testing

@Suite("Ring collective")
struct RingCollectiveTests {
    /// Runs `body(rank)` for every rank on its own thread and waits.
    func onRanks(_ n: Int, _ body: @escaping @Sendable (Int) -> Void) {
        let group = DispatchGroup()
        for r in 0..<n {
            group.enter()
            Thread { body(r); group.leave() }.start()
        }
        group.wait()
    }

    @Test("allreduce sums in rank order and every rank gets the same bits")
    func deterministicSum() throws {
        let n = 4
        let rings = try (0..<n).map { try RingCollective(rank: $0, worldSize: n) }
        let peers = rings.map(\.endpoint)
        for r in rings { try r.connect(peers: peers, epoch: 1) }
        var rng = SplitMix64(seed: 5)
        let inputs: [[Float]] = (0..<n).map { _ in (0..<1000).map { _ in Float(Int64(rng.next() % 2_000_001) - 1_000_000) / 997 } }
        let results = Locked<[[Float]]>(Array(repeating: [], count: n))
        let pipes = (0..<n).map { _ -> (Int32, Int32) in var fds: [Int32] = [0, 0]; _ = pipe(&fds); return (fds[0], fds[1]) }
        for _ in 0..<3 {
            onRanks(n) { r in
                var v = inputs[r]
                try! v.withUnsafeMutableBufferPointer { try rings[r].allreduceSum($0, interrupt: pipes[r].0) }
                results.withLock { $0[r] = v }
            }
            let expected: [Float] = (0..<1000).map { i in ((inputs[0][i] + inputs[1][i]) + inputs[2][i]) + inputs[3][i] }
            for r in 0..<n { #expect(results.withLock { $0[r] } == expected, "rank \(r)") }
        }
        onRanks(n) { r in
            let agree = try! rings[r].allAgree(r != 2, interrupt: pipes[r].0)
            #expect(!agree)
        }
        for p in pipes { close(p.0); close(p.1) }
    }

    @Test("a pause abandons a collective at once, even when a peer never answers")
    func interruptAbandons() throws {
        let rings = try (0..<2).map { try RingCollective(rank: $0, worldSize: 2) }
        for r in rings { try r.connect(peers: rings.map(\.endpoint), epoch: 1) }
        var fds: [Int32] = [0, 0]
        _ = pipe(&fds)
        let (readEnd, writeEnd) = (fds[0], fds[1])
        defer { close(readEnd); close(writeEnd) }
        let start = monotonicSeconds()
        Thread {
            usleep(50_000)
            var b: UInt8 = 1
            _ = write(writeEnd, &b, 1)
        }.start()
        // Rank 1 waits for rank 0, which never sends: only the interrupt can end it.
        var v: [Float] = [1, 2, 3]
        #expect(throws: Interrupted.self) { try v.withUnsafeMutableBufferPointer { try rings[1].allreduceSum($0, interrupt: readEnd) } }
        print("ring wait abandoned \(String(format: "%.0f", (monotonicSeconds() - start) * 1000)) ms after start (interrupt at 50 ms)")
    }
}

final class Locked<T>: @unchecked Sendable {
    private var value: T
    private let lock = NSLock()
    init(_ v: T) { value = v }
    func withLock<R>(_ body: (inout T) -> R) -> R { lock.lock(); defer { lock.unlock() }; return body(&value) }
}

/// Runs a built executable and returns (exit status, stdout, stderr, seconds).
func runTool(_ name: String, _ args: [String], timeout: Double = 30) throws -> (FTSystem.ExitStatus?, String, Double) {
    let out = "/tmp/ft-tool-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).out"
    defer { unlink(out) }
    let start = monotonicSeconds()
    let p = try ChildProcess(arguments: [productsDirectory + "/" + name] + args, environment: ProcessInfo.processInfo.environment,
                             outputPath: out)
    let status = p.wait(timeoutSeconds: timeout)
    if status == nil { p.kill(SIGKILL); p.wait(timeoutSeconds: 5) }
    return (status, readText(out), monotonicSeconds() - start)
}

@Suite("ftctl", .serialized)
struct FtctlTests {
    @Test("status --json follows schema 1; the table shows the job; --help explains; bad arguments are usage errors",
          .timeLimit(.minutes(5)))
    func statusOutputs() throws {
        let job = try LocalJob(tag: "ctl", nodes: 2, workersPerNode: 1, steps: 100_000)
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { int(job.status()?["committed_step"]) >= 5 }, "\(job.logs)")
        kill(try #require(job.workerPID(node: 0, worker: 0)), SIGKILL)
        #expect(waitUntil(seconds: 30) { (job.status()?["last_failure"] as? [String: Any])?["outcome"] as? String == "resumed" })

        let (status, text, _) = try runTool("ftctl", ["status", "--run-dir", job.dir, "--json"])
        #expect(status == .exited(0), "\(text)")
        let o = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
        let top: [String: String] = ["schema": "n", "job": "s", "state": "s", "epoch": "n", "committed_step": "n",
                                     "committed_age_ms": "n", "snapshot_interval": "n", "uptime_s": "n", "nodes": "a",
                                     "last_failure": "o", "stop_reason": "null", "aborted_rounds": "n", "fenced_messages": "n", "refused_messages": "n",
                                     "malformed_frames": "n", "unauthenticated": "n", "unauthorized": "n", "skipped_snapshots": "n",
                                     "failures_total": "n", "failures": "a", "coordinator_pid": "n", "detector": "o", "watchdog": "o",
                                     "step_rate_per_s": "n", "total_steps": "n", "eta_s": "n", "metrics_url": "s", "durability": "o",
                                     "persist": "o"]
        #expect(Set(o.keys) == Set(top.keys))
        let persist = try #require(o["persist"] as? [String: Any])
        #expect(persist["enabled"] as? Bool == false && int(persist["durable_step"]) == -1 && int(persist["in_progress_step"]) == -1)
        let durability = try #require(o["durability"] as? [String: Any])
        for key in ["loss_per_failure", "loss_per_day", "window_s", "node_failures_per_day", "expected_steps_lost_per_failure"] {
            #expect(matches(durability[key], "n"), "durability.\(key): \(String(describing: durability[key]))")
        }
        #expect((durability["loss_per_failure"] as? Double) == 1.0)  // no erasure coding: a lost node's memory is gone
        for (key, kind) in top { #expect(matches(o[key], kind), "\(key): \(String(describing: o[key]))") }
        #expect(int(o["schema"]) == 1)
        let nodes = try #require(o["nodes"] as? [[String: Any]])
        #expect(nodes.count == 2)
        for n in nodes {
            #expect(Set(n.keys) == ["id", "smp", "pid", "data_bytes", "parity_bytes", "ec_group", "ec_health", "workers"])
            for w in try #require(n["workers"] as? [[String: Any]]) {
                #expect(Set(w.keys) == ["id", "rank", "state", "step", "pid", "activity", "activity_ms", "waiting_on"])
            }
        }
        let detector = try #require(o["detector"] as? [String: Any])
        #expect(Set(detector.keys) == ["timeout_ms", "local_health", "stalls", "largest_loop_gap_ms"])
        #expect(Set(try #require(o["watchdog"] as? [String: Any]).keys) == ["bound_ms", "step_p99_ms"])
        let failure = try #require(o["last_failure"] as? [String: Any])
        let reportKeys: Set<String> = ["what", "kind", "detected_by", "detected_at_s", "epoch", "outcome", "phases",
                                       "steps_reached", "restored_step", "steps_lost", "recovery_ms"]
        #expect(Set(failure.keys) == reportKeys.union(["age_ms"]))
        for p in try #require(failure["phases"] as? [[String: Any]]) { #expect(Set(p.keys) == ["phase", "ms", "reason"]) }
        // The resumed failure is in the history, with what it cost.
        #expect(int(o["failures_total"]) >= 1)
        let history = try #require(o["failures"] as? [[String: Any]])
        let resumed = try #require(history.last { $0["outcome"] as? String == "resumed" }, "\(history)")
        #expect(Set(resumed.keys) == reportKeys)
        #expect(int(resumed["steps_lost"]) >= 0 && int(resumed["steps_lost"]) <= int(resumed["steps_reached"]))
        #expect(int(resumed["restored_step"]) >= 5)
        #expect(((resumed["recovery_ms"] as? Double) ?? -1) > 0)

        let (tableStatus, table, _) = try runTool("ftctl", ["status", "--run-dir", job.dir])
        #expect(tableStatus == .exited(0))
        #expect(table.contains("job \(job.job)  state running"))
        #expect(table.contains("committed step"))
        #expect(table.contains("node  smp"))
        #expect(table.contains("n0    alive") && table.contains("n1    alive"))
        #expect(table.contains("last failure: worker n0/w0, reported by SMP n0"))
        for phase in ["detect", "plan", "rebuild", "restart", "resume"] { #expect(table.contains("\n\(phase) ")) }

        // --watch refreshes in place until interrupted: clear the screen, redraw.
        let (watchStatus, watched, _) = try runTool("ftctl", ["status", "--run-dir", job.dir, "--watch", "--interval", "0.2"], timeout: 1.5)
        #expect(watchStatus == nil, "--watch ended by itself: \(watched)")
        #expect(watched.components(separatedBy: "\u{1B}[H\u{1B}[2J").count >= 3, "\(watched)")
        #expect(watched.components(separatedBy: "job \(job.job)  state").count >= 3)

        let (helpStatus, help, _) = try runTool("ftctl", ["status", "--help"])
        #expect(helpStatus == .exited(0))
        for option in ["--endpoint", "--run-dir", "--keys", "--json", "--watch", "--timeout"] { #expect(help.contains(option)) }
        let (badStatus, bad, _) = try runTool("ftctl", ["status", "--timeout", "-3", "--endpoint", "tcp://127.0.0.1:1"])
        #expect(badStatus == .exited(64), "\(bad)")
        #expect(bad.contains("--timeout"))
        let (noTarget, noTargetText, _) = try runTool("ftctl", ["status"])
        #expect(noTarget == .exited(64))
        #expect(noTargetText.contains("--endpoint or --run-dir"))
    }

    @Test("an unreachable coordinator is a clear message and a non-zero exit")
    func unreachable() throws {
        let port = try freePort()
        let (status, text, _) = try runTool("ftctl", ["status", "--endpoint", "tcp://127.0.0.1:\(port)", "--timeout", "0.5"])
        #expect(status == .exited(2))
        #expect(text.contains("no answer from the coordinator at tcp://127.0.0.1:\(port) within 0.5 s"))
    }

    @Test("ft-coordinator and ft-smp refuse a network-reachable endpoint without keys; --insecure allows it and says so at start")
    func insecureEndpoints() throws {
        let dir = "/tmp/ft-ctl-insecure-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let port = try freePort()
        let coordinator = ["--job-id", "insec", "--nodes", "1", "--workers-per-node", "1", "--endpoint", "tcp://0.0.0.0:\(port)"]
        let (refused, refusedText, _) = try runTool("ft-coordinator", coordinator)
        #expect(refused == .exited(64), "\(refusedText)")
        #expect(refusedText.contains("--endpoint tcp://0.0.0.0:\(port) can be reached from the network: give --keys"), "\(refusedText)")
        let smp = ["--job-id", "insec", "--node-id", "n0", "--run-dir", dir, "--workers", "0", "--endpoint", "tcp://*:\(port)"]
        let (smpRefused, smpText, _) = try runTool("ft-smp", smp)
        #expect(smpRefused == .exited(64), "\(smpText)")
        #expect(smpText.contains("--endpoint tcp://*:\(port) can be reached from the network"), "\(smpText)")
        // A data endpoint on TCP serves tensors: it needs --keys (CURVE), or --insecure.
        let data = ["--job-id", "insec", "--node-id", "n0", "--run-dir", dir, "--workers", "0",
                    "--coordinator", "tcp://127.0.0.1:\(port)", "--data-endpoint", "tcp://127.0.0.1:*"]
        let (dataRefused, dataText, _) = try runTool("ft-smp", data)
        #expect(dataRefused == .exited(64), "\(dataText)")
        #expect(dataText.contains("--data-endpoint tcp://127.0.0.1:* without --keys would serve every tensor"), "\(dataText)")
        let (noCoordinator, noCoordinatorText, _) = try runTool("ft-smp", Array(data[0..<8]) + ["--data-endpoint", "tcp://127.0.0.1:*"])
        #expect(noCoordinator == .exited(64), "\(noCoordinatorText)")
        #expect(noCoordinatorText.contains("--data-endpoint is for peers of a job with a coordinator"), "\(noCoordinatorText)")
        // With --insecure the coordinator starts, warning at once; it is ended by PID.
        let out = dir + ".out"
        defer { unlink(out) }
        let p = try ChildProcess(arguments: [productsDirectory + "/ft-coordinator"] + coordinator + ["--insecure", "--linger-ms", "0"],
                                 environment: ProcessInfo.processInfo.environment, outputPath: out)
        defer { if p.poll() == nil { p.kill(SIGKILL); p.wait(timeoutSeconds: 5) } }
        #expect(waitUntil(seconds: 30) { readText(out).contains("INSECURE: tcp://0.0.0.0:\(port) is reachable from the network") }, "\(readText(out))")
        #expect(p.poll() == nil, "\(readText(out))")
    }

    func matches(_ v: Any?, _ kind: String) -> Bool {
        switch kind {
        case "n": return v is Int || v is Double
        case "s": return v is String
        case "a": return v is [Any]
        case "o": return v is [String: Any]
        case "null": return v is NSNull || v is String
        default: return false
        }
    }
}

@Suite("Log format")
struct LogFormatTests {
    @Test("log lines carry UTC timestamps to the millisecond, sorted metadata, the source and the message")
    func millisecondLines() throws {
        #expect(MillisecondLogHandler.timestamp(timespec(tv_sec: 0, tv_nsec: 5_999_999)) == "1970-01-01T00:00:00.005Z")
        #expect(MillisecondLogHandler.timestamp(timespec(tv_sec: 1_796_221_209, tv_nsec: 123_000_000)) == "2026-12-02T14:20:09.123Z")
        let lines = Mutex<[String]>([])
        var logger = Logger(label: "ft-smp.n0") { MillisecondLogHandler(label: $0, level: .info) { line in lines.withLock { $0.append(line) } } }
        logger[metadataKey: "node"] = "n0"
        logger.debug("not at info")
        logger.info("round 3 committed", metadata: ["b": "2", "a": "1"])
        let got = lines.withLock { $0 }
        try #require(got.count == 1)
        let line = got[0]
        #expect(line.hasSuffix(" info ft-smp.n0: a=1 b=2 node=n0 [FTControlTests] round 3 committed\n"))
        #expect(line.wholeMatch(of: /\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z .*\n/) != nil)
    }
}
