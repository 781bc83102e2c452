import FTCore
import FTSMP
import FTSystem
import FTWorker
import Foundation
import Logging

/// `ft-bench snapshot`: the snapshot path of one worker into a real SMP (run
/// on a thread of this process, talking over `ipc://` and POSIX shared memory
/// exactly as `ft-smp` does), against memcpy into pre-faulted memory.
///
/// For each shard size S, in one run:
/// - floor: `memcpy` of S bytes into a pre-faulted buffer;
/// - synchronous staging: `snapshot(step:)` then wait for the SMP's reply
///   (copy, CRC32C per chunk, `staged` round trip);
/// - asynchronous snapshot: a training loop whose step computes (busy CPU) for
///   `stepSeconds` (default: 1.5 × the staging time, so compute covers the
///   copy), then `waitBeforeUpdate`, the update, `snapshot`; the time the loop
///   is blocked in the library per step;
/// - restore: `restore()` (CRC check of every chunk and copy back).
public struct SnapshotBench {
    public var sizes: [Int] = [256 << 20, 1 << 30]
    public var repetitions = 5
    public var asyncSteps = 8
    /// nil: 1.5 × the measured staging time.
    public var stepSeconds: Double?
    /// Also measure the Python path (`ft-bench snapshot --client python`):
    /// this interpreter runs this script (python/bench/snapshot_client.py)
    /// as a worker of its own SMP, with the same sizes and step time.
    public var python: (interpreter: String, script: String)?

    public init() {}

    public func run(progress: (String) -> Void = { _ in }) throws -> BenchReport {
        var report = BenchReport(section: "snapshot")
        report.table = [["shard", "memcpy GB/s", "staging GB/s", "staging ms", "step ms", "blocked ms/step", "blocked/copy",
                         "restore GB/s", "restore ms"]]
        for size in sizes {
            progress("shard \(size >> 20) MiB: allocating and pre-faulting")
            let r = try measure(size: size, progress: progress)
            let tag = size == 1 << 30 ? "" : "_\(size >> 20)mib"
            let ftag = "_\(size >> 20)mib"
            report.figure("memcpy_gbps\(ftag)", r.memcpyGBps)
            report.figure("staging_gbps\(ftag)", r.stagingGBps)
            report.figure("staging_ms\(ftag)", r.stagingSeconds * 1e3)
            report.figure("async_step_ms\(ftag)", r.stepSeconds * 1e3)
            report.figure("async_blocked_ms_per_step\(ftag)", r.blockedPerStep * 1e3)
            report.figure("restore_gbps\(ftag)", r.restoreGBps)
            report.figure("restore_ms\(ftag)", r.restoreSeconds * 1e3)
            report.figure("skipped_snapshots\(ftag)", Double(r.skipped))
            report.ratio("staging_vs_memcpy\(tag)", r.stagingGBps / r.memcpyGBps)
            report.ratio("blocked_vs_copy\(tag)", r.blockedPerStep / r.stagingSeconds)
            report.ratio("restore_vs_memcpy\(tag)", r.restoreGBps / r.memcpyGBps)
            report.table.append(["\(size >> 20) MiB", f(r.memcpyGBps), f(r.stagingGBps), f(r.stagingSeconds * 1e3),
                                 f(r.stepSeconds * 1e3), String(format: "%.3f", r.blockedPerStep * 1e3),
                                 String(format: "%.4f", r.blockedPerStep / r.stagingSeconds), f(r.restoreGBps), f(r.restoreSeconds * 1e3)])
            if let python {
                progress("shard \(size >> 20) MiB: the Python path (ft_torch)")
                let p = try measurePython(python, size: size, stepSeconds: r.stepSeconds)
                let gbps = Double(size) / p.stagingSeconds / 1e9
                report.figure("python_staging_gbps\(ftag)", gbps)
                report.figure("python_staging_ms\(ftag)", p.stagingSeconds * 1e3)
                report.figure("python_blocked_ms_per_step\(ftag)", p.blockedPerStep * 1e3)
                report.figure("python_snapshot_call_ms\(ftag)", p.callSeconds * 1e3)
                report.ratio("python_blocked_vs_copy\(tag)", p.blockedPerStep / p.stagingSeconds)
                report.ratio("python_staging_vs_swift\(tag)", gbps / r.stagingGBps)
                report.table.append(["\(size >> 20) MiB (Python)", "", f(gbps), f(p.stagingSeconds * 1e3), f(r.stepSeconds * 1e3),
                                     String(format: "%.3f", p.blockedPerStep * 1e3), String(format: "%.4f", p.blockedPerStep / p.stagingSeconds),
                                     "", ""])
            }
        }
        if python != nil {
            report.notes.append("Python rows: the same shard through ft_torch (attach, the optimizer pre-step hook, snapshot) in a "
                                + "Python process against its own SMP, with the same step time. python_staging_vs_swift: its staging "
                                + "throughput over the Swift path's; python_blocked_vs_copy: its blocked time per step over its staging time.")
        }
        report.notes.append("Ratios without a size suffix are for the 1 GiB shard. blocked/copy: time the training loop waited "
                            + "in the library per step over the synchronous staging time; medians of \(repetitions) repetitions "
                            + "(\(asyncSteps) steps for the asynchronous loop).")
        return report
    }

    struct Result {
        var memcpyGBps, stagingGBps, stagingSeconds, stepSeconds, blockedPerStep, restoreGBps, restoreSeconds: Double
        var skipped: Int
    }

    /// Runs `body` with a real SMP on a thread of this process (no workers of
    /// its own), stopped and cleaned up afterwards.
    func withSMP<T>(_ body: (_ server: SMPServer, _ jobID: String, _ directory: String) throws -> T) throws -> T {
        try InProcessSMP.with(directory: "/tmp/ft-bench-snapshot-\(getpid())", jobID: "bench\(getpid())", body)
    }

    struct PythonResult {
        var stagingSeconds, blockedPerStep, callSeconds: Double
    }

    /// The Python client against its own SMP: staging (median) and blocked time per step.
    func measurePython(_ python: (interpreter: String, script: String), size: Int, stepSeconds: Double) throws -> PythonResult {
        try withSMP { server, jobID, directory in
            var env = ProcessInfo.processInfo.environment
            env.merge(["FT_JOB_ID": jobID, "FT_WORKER_ID": "w0", "FT_DP_RANK": "0", "FT_DP_SIZE": "1",
                       "FT_SMP_ENDPOINT": server.boundEndpoint, "FT_RESTART_COUNT": "0"]) { $1 }
            if env["FT_WORKER_LIB"] == nil, access(executableDirectory + "/libFTWorkerC.so", R_OK) == 0 {
                env["FT_WORKER_LIB"] = executableDirectory + "/libFTWorkerC.so"
            }
            let output = directory + "/python-client.out"
            let child = try ChildProcess(arguments: [python.interpreter, python.script, "--bytes", "\(size)", "--repetitions", "\(repetitions)",
                                                     "--steps", "\(asyncSteps)", "--step-ms", "\(stepSeconds * 1000)"],
                                         environment: env, outputPath: output)
            let status = child.wait(timeoutSeconds: 600)
            let text = (try? String(contentsOfFile: output, encoding: .utf8)) ?? ""
            guard status?.isSuccess == true,
                  let line = text.split(separator: "\n").last(where: { $0.hasPrefix("{") }),
                  let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                  let staging = o["staging_s"] as? [Double], let blocked = o["blocked_s_per_step"] as? Double,
                  let call = o["python_s_per_snapshot"] as? Double else {
                if status == nil { child.kill(SIGKILL); child.wait(timeoutSeconds: 5) }
                throw BenchError(.unexpectedOutcome, "the Python snapshot client failed (\(status.map { "\($0)" } ?? "timed out")):\n\(text.suffix(3000))")
            }
            return PythonResult(stagingSeconds: median(staging), blockedPerStep: blocked, callSeconds: call)
        }
    }

    func measure(size: Int, progress: (String) -> Void) throws -> Result {
        try withSMP { server, jobID, _ in try measure(size: size, server: server, jobID: jobID, progress: progress) }
    }

    func measure(size: Int, server: SMPServer, jobID: String, progress: (String) -> Void) throws -> Result {

        // The shard: two tensors of S/2 bytes (parameters and optimizer state).
        let half = size / 2
        let params = AlignedBuffer(count: half)
        let moments = AlignedBuffer(count: half)
        params.randomize(seed: 1)
        moments.randomize(seed: 2)
        let floorTarget = AlignedBuffer(count: size)
        let client = try SnapshotClient(identity: WorkerIdentity(jobID: jobID, workerID: "w0", dpRank: 0, dpSize: 1,
                                                                 smpEndpoint: server.boundEndpoint))
        try client.register([
            RegisteredTensor(spec: TensorSpec(name: "params", dtype: .u8, shape: [half], role: .param, replicated: false),
                             buffer: params.bytes),
            RegisteredTensor(spec: TensorSpec(name: "moments", dtype: .u8, shape: [half], role: .optimizer, replicated: false),
                             buffer: moments.bytes),
        ])

        progress("shard \(size >> 20) MiB: memcpy floor and synchronous staging")
        var memcpyT: [Double] = []
        var stagingT: [Double] = []
        var step = 0
        for _ in 0..<repetitions {
            memcpyT.append(timeSeconds {
                memcpy(floorTarget.base, params.base, half)
                memcpy(floorTarget.base + half, moments.base, half)
            })
            step += 1
            let s = step
            stagingT.append(try timeSeconds {
                try client.snapshot(step: s)
                try client.waitForRound()
            })
        }
        let staging = median(stagingT)
        let stepSeconds = self.stepSeconds ?? staging * 1.5

        progress("shard \(size >> 20) MiB: asynchronous loop, \(asyncSteps) steps of \(String(format: "%.1f", stepSeconds * 1e3)) ms compute")
        let skippedBefore = client.stats.snapshotsSkipped
        let blockedBefore = client.stats.blockedSeconds
        for _ in 0..<asyncSteps {
            spin(seconds: stepSeconds)             // forward and backward
            try client.waitBeforeUpdate()          // the update may not overwrite bytes not yet copied
            params.base.storeBytes(of: UInt64(step), as: UInt64.self)  // the optimizer update (cheap here)
            step += 1
            try client.snapshot(step: step)
        }
        try client.waitForRound()
        let blockedPerStep = (client.stats.blockedSeconds - blockedBefore) / Double(asyncSteps)
        let skipped = client.stats.snapshotsSkipped - skippedBefore

        progress("shard \(size >> 20) MiB: restore")
        var restoreT: [Double] = []
        for _ in 0..<repetitions {
            restoreT.append(try timeSeconds { _ = try client.restore() })
        }
        let bytes = Double(size)
        return Result(memcpyGBps: bytes / median(memcpyT) / 1e9, stagingGBps: bytes / staging / 1e9, stagingSeconds: staging,
                      stepSeconds: stepSeconds, blockedPerStep: blockedPerStep,
                      restoreGBps: bytes / median(restoreT) / 1e9, restoreSeconds: median(restoreT), skipped: skipped)
    }

    /// Busy CPU work for `seconds`, standing in for a step's compute.
    private func spin(seconds: Double) {
        let end = monotonicSeconds() + seconds
        var x: UInt64 = 1
        while monotonicSeconds() < end {
            for _ in 0..<1000 { x = x &* 6_364_136_223_846_793_005 &+ 1 }
        }
        if x == 42 { print("") }  // keep the loop
    }

    private func f(_ v: Double) -> String { String(format: "%.2f", v) }
}

/// A real SMP on a thread of this process (no workers of its own, no
/// coordinator), for the benches that drive it with an in-process client.
enum InProcessSMP {
    static func with<T>(directory: String, jobID: String,
                        _ body: (_ server: SMPServer, _ jobID: String, _ directory: String) throws -> T) throws -> T {
        var logger = Logger(label: "ft-bench.smp")
        logger.logLevel = .warning
        let server = try SMPServer(config: SMPConfiguration(jobID: jobID, nodeID: "n0", runDirectory: directory,
                                                            workerCount: 0, workerCommand: []),
                                   logger: logger, watchSignals: false)
        let done = DispatchSemaphore(value: 0)
        Thread { [server] in
            _ = try? server.run()
            done.signal()
        }.start()
        defer {
            server.stop()
            done.wait()
            try? FileManager.default.removeItem(atPath: directory)
        }
        return try body(server, jobID, directory)
    }
}
