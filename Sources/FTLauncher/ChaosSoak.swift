import FTCore
import FTSystem
import Foundation

extension ChaosRunner {
    /// Injects faults at exponential intervals (mean `mtbf` seconds) for
    /// `duration` seconds of a long job, one at a time (the next after the job
    /// runs again), drawn from every fault kind (`soakKinds`, which include a
    /// worker that hangs with its heartbeats alive and one that dies halfway
    /// through a snapshot's copy: the harness drops a trigger file that the
    /// chosen rank acts on at its next step, `FT_FAULT_TRIGGER_DIR`); then
    /// lets the job finish and checks it like a scenario.
    public func soak(duration: Double, mtbf: Double, seed: UInt64) -> Result {
        var result = Result(name: "soak", seed: seed)
        let started = monotonicSeconds()
        do {
            try runSoak(duration: duration, mtbf: mtbf, seed: seed, into: &result)
        } catch {
            result.passed = false
            result.detail = "\(error)"
        }
        result.seconds = monotonicSeconds() - started
        return result
    }

    private func runSoak(duration: Double, mtbf: Double, seed: UInt64, into result: inout Result) throws {
        var rng = SplitMix64(seed: seed)
        // Calibrate: how many steps does the soak need to last `duration`?
        let probe = jobShape(for: "kill-node", steps: options.steps)
        let t0 = monotonicSeconds()
        _ = try golden(probe)
        let perStep = (monotonicSeconds() - t0) / Double(options.steps)
        let steps = max(options.steps, Int(duration * 1.15 / perStep))
        let shape = jobShape(for: "kill-node", steps: steps)
        options.progress("soak: \(steps) steps (~\(String(format: "%.1f", perStep * 1000)) ms/step uninterrupted), faults at a mean of every \(mtbf) s for \(duration) s")
        let expected = try golden(shape)
        // Faults a worker injects itself (a hang, a death mid-copy) come from trigger files.
        let runDirectory = options.workDirectory + "/soak-\(seed)"
        let triggers = runDirectory + "/fault-triggers"
        try FileManager.default.createDirectory(atPath: triggers, withIntermediateDirectories: true)
        let environment = ["FT_FAULT_TRIGGER_DIR": triggers]
        var opts = LocalJob.Options(binaries: options.binaries, runDirectory: runDirectory, jobID: "soak\(getpid())")
        opts.nodes = shape.nodes
        opts.workersPerNode = shape.workersPerNode
        opts.erasure = (shape.k, shape.m)
        opts.snapshotInterval = options.snapshotInterval
        opts.environment = environment
        opts.workerCommand = workerCommand(steps)
        opts.dataHost = options.dataHost
        options.worker.configure(&opts)
        let job = try LocalJob(opts)
        let watch = Watch(job: job)
        var keep = true
        defer { job.stop(removeFiles: !keep) }
        guard watch.until(seconds: 300, { watch.state == "running" }) else { throw ChaosError(.timeout, "the soak job did not start") }
        var counts: [String: Int] = [:]
        var injections: [Double] = []
        var stopped: [Int32] = []  // processes the faults themselves stopped
        var notes: [String] = []
        let soakEnd = monotonicSeconds() + duration
        while monotonicSeconds() < soakEnd {
            // Exponential wait, from the moment the job runs again.
            let wait = -mtbf * log(1 - Double.random(in: 0..<1, using: &rng))
            watch.sleep(min(wait, max(0, soakEnd - monotonicSeconds())))
            if monotonicSeconds() >= soakEnd || watch.ended { break }
            guard watch.until(seconds: 300, { watch.state == "running" || watch.ended }), !watch.ended else { break }
            let kind = Self.soakKinds.randomElement(using: &rng)!
            // A zombie node needs the launcher to leave it alive (it cannot reach it).
            watch.supervisor.killDeclaredDead = kind != "sigstop-node"
            let n = Int.random(in: 0..<shape.nodes, using: &rng)
            let w = Int.random(in: 0..<shape.workersPerNode, using: &rng)
            options.progress("soak: \(Int(monotonicSeconds() - (soakEnd - duration))) s: \(kind) n\(n)/w\(w) (furthest step \(watch.furthestStep)/\(steps))")
            let injected = monotonicSeconds()
            injections.append(injected)
            if kind == "stuck-worker" || kind == "kill-worker-mid-copy" {
                let rank = n * shape.workersPerNode + w
                let file = triggers + (kind == "stuck-worker" ? "/hang-rank-\(rank)" : "/kill-mid-copy-rank-\(rank)")
                guard FileManager.default.createFile(atPath: file, contents: nil) else { throw ChaosError(.io, "cannot create \(file)") }
            }
            stopped += try inject(kind, job: job, watch: watch, shape: shape, node: n, worker: w, rng: &rng, notes: &notes).flatMap(\.stopped)
            watch.supervisor.killDeclaredDead = true
            counts[kind, default: 0] += 1
            // One fault at a time: wait until the job resumed from it (a coordinator pause may declare nothing).
            guard watch.until(seconds: 300, { watch.ended || (watch.state == "running"
                && (kind == "coordinator-pause" || watch.resumed.contains { watch.detectedAt($0) >= injected - 1 })) }) else {
                throw ChaosError(.timeout, "no recovery within 300 s of \(kind) n\(n)/w\(w)")
            }
        }
        options.progress("soak: faults over (\(injections.count)); letting the job finish")
        guard watch.until(seconds: 7200, every: 0.2, { watch.ended }) else { throw ChaosError(.timeout, "the soak job did not end") }
        let final = watch.finalStatus
        watch.merge(final)
        let hashes = Self.finalHashes(job, steps: steps)
        result.faults = injections.count
        result.failures = watch.failures.count
        result.finalHashEqual = hashes == expected
        let gapLines = Self.heartbeatGapLines(job, excluding: Set(stopped))
        result.heartbeatGaps = gapLines.mapValues(\.ms)
        let resumed = watch.resumed
        result.stepsLost = resumed.reduce(0) { $0 + max(0, jsonInt($1["steps_lost"])) }
        result.restoredSteps = resumed.map { jsonInt($0["restored_step"]) }
        let hangsCaught = watch.failures.values.filter { ($0["detected_by"] as? String ?? "").contains("watchdog") }.count
        notes.insert("\(hangsCaught) hangs caught by the watchdog", at: 0)
        let recoveries = resumed.map { (($0["recovery_ms"] as? Double) ?? Double(jsonInt($0["recovery_ms"]))) }
        result.recoveryMs = recoveries.max() ?? -1
        let worstLost = resumed.map { jsonInt($0["steps_lost"]) }.max() ?? 0
        var detail = ["faults: " + counts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "),
                      "\(resumed.count) recoveries, detect-to-resume p50 \(Int(percentile(recoveries, 0.5))) ms, max \(Int(recoveries.max() ?? 0)) ms",
                      "worst steps lost per failure \(worstLost)",
                      "largest heartbeat gaps (ms): " + result.heartbeatGaps.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")]
        if result.heartbeatGaps["coordinator_loop"] == -1 {
            detail.append("coordinator_loop -1: no coordinator of the soak logged one that counts (each was killed, or paused, and a pause's gap is the fault's own)")
        }
        // Which process and when: the run directory of a soak that passed is removed.
        detail += gapLines.sorted { $0.key < $1.key }.filter { !$0.value.line.isEmpty }.map { "largest \($0.key) gap from: \($0.value.line)" }
        var problems = endProblems(hashes: hashes, expected: expected, watch: watch, resumed: resumed, finalCoordinator: jsonInt(final["coordinator_pid"]))
        let leftovers = awaitLeftovers(job)
        if !leftovers.isEmpty { problems.append("left behind: \(leftovers)") }
        result.passed = problems.isEmpty
        detail += problems
        result.detail = (detail + notes.suffix(40)).joined(separator: "; ")
        keep = options.keepDirectories || !result.passed
        if !result.passed { result.detail += " (logs kept in \(job.dir))" }
    }
}
