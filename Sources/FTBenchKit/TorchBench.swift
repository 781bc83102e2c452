import FTLauncher
import FTSystem
import Foundation

/// `ft-bench torch`: the GPT example (python/examples/gpt.py, DDP over gloo)
/// as a protected job of real processes: 4 nodes x 1 worker, RS(3+1).
///
/// The cost of protection, in one run: the same job with snapshots off (the
/// example attaches but never snapshots) and with a snapshot every N steps,
/// for each model size; each worker prints its mean wall time per step.
/// Then the recovery: a job with a snapshot every step loses node n1 (its SMP
/// and worker SIGKILLed once half the steps are committed); a replacement
/// SMP rebuilds it from parity and every worker restarts and restores. The
/// coordinator's phases (detect, plan, rebuild, restart, resume) come from
/// its status; the restart phase is split with the workers' own timestamps
/// (CLOCK_MONOTONIC, shared by every process): the process restart, torch's
/// import, the process-group rebuild (init_process_group and the DDP
/// constructor), the restore from the SMPs, and the wait for every rank.
public struct TorchBench {
    public var binaries: String
    public var python: String
    public var script: String
    public var steps = 200
    /// Model sizes: a tag and the example's flags.
    public var models: [(tag: String, flags: [String])] = [("base", []), ("large", ["--embd", "128", "--layers", "4", "--batch", "32"])]
    public var intervals = [1, 10]
    public var recovery = true
    /// Steps per block of the alternating run.
    public var block = 25

    public init(binaries: String, python: String, script: String) {
        self.binaries = binaries
        self.python = python
        self.script = script
    }

    func options(_ tag: String, interval: Int, flags: [String]) -> LocalJob.Options {
        var o = LocalJob.Options(binaries: binaries, runDirectory: "/tmp/ft-bench-torch-\(tag)-\(getpid())", jobID: "torch\(tag)\(getpid())")
        o.nodes = 4
        o.workersPerNode = 1
        o.erasure = (3, 1)
        o.snapshotInterval = interval
        o.lingerMs = 2000
        o.phaseTimeout = 60  // a restart rebuilds the process group (README, "Use it from PyTorch")
        o.workerCommand = [python, script, "--steps", "\(steps)", "--report-every", "50"] + flags
        return o
    }

    public func run(progress: (String) -> Void = { _ in }) throws -> BenchReport {
        var report = BenchReport(section: "torch")
        report.table = [["model", "snapshot every", "step ms off", "step ms on", "on / off"]]
        var reference: String?
        for model in models {
            for n in intervals {
                progress("\(model.tag) model: blocks of \(block) steps without and with a snapshot every \(n) step\(n == 1 ? "" : "s")")
                let r = try runJob(options("every\(n)-\(model.tag)", interval: n, flags: model.flags + ["--snapshots", "alternate",
                                                                                                         "--alternate-every", "\(block)"]),
                                   progress: progress)
                if model.tag == models[0].tag && n == 1 { reference = r.hash }
                progress("\(model.tag) model, a snapshot every \(n): \(f(r.offMs)) ms per step off, \(f(r.onMs)) on")
                report.figure("step_ms_off_every\(n)_\(model.tag)", r.offMs)
                report.figure("step_ms_on_every\(n)_\(model.tag)", r.onMs)
                report.ratio("step_every\(n)_vs_off_\(model.tag)", r.onMs / r.offMs)
                report.table.append([model.tag, "\(n)", f(r.offMs), f(r.onMs), String(format: "%.3f", r.onMs / r.offMs)])
            }
        }
        report.notes.append("One job per row (4 nodes x 1 worker, RS(3+1), \(steps) steps): blocks of \(block) steps without snapshots "
                            + "and with a snapshot every N steps take turns (gpt.py --snapshots alternate), so both see the same machine; "
                            + "step ms: the mean wall time of a step of each kind over the 4 ranks (the first step of each block left out).")
        if recovery, let reference {
            progress("recovery: a snapshot every step, node n1 killed once step \(steps / 2) is committed")
            try measureRecovery(into: &report, reference: reference, progress: progress)
        }
        return report
    }

    struct Outcome {
        var onMs: Double
        var offMs: Double
        var hash: String
    }

    /// Runs a job to its end; every worker's step time and final hash.
    func runJob(_ o: LocalJob.Options, progress: (String) -> Void) throws -> Outcome {
        let job = try LocalJob(o)
        var keep = true  // a job that fails keeps its logs
        defer { job.stop(removeFiles: !keep) }
        try waitEnd(job)
        var on: [Double] = [], off: [Double] = []
        var hashes: Set<String> = []
        for n in 0..<o.nodes {
            guard let line = job.workerLog(node: n, worker: 0).split(separator: "\n").last(where: { $0.hasPrefix("final step=\(steps) ") }),
                  let onMs = field(line, "step_ms_on").flatMap(Double.init), let offMs = field(line, "step_ms_off").flatMap(Double.init),
                  let hash = field(line, "hash") else {
                throw BenchError(.unexpectedOutcome, "worker n\(n) printed no final line (logs in \(job.dir)):\n\(job.workerLog(node: n, worker: 0).suffix(3000))")
            }
            on.append(onMs)
            off.append(offMs)
            hashes.insert(hash)
        }
        guard hashes.count == 1 else { throw BenchError(.mismatch, "the workers ended with different hashes: \(hashes.sorted()) (logs in \(job.dir))") }
        keep = false
        return Outcome(onMs: on.reduce(0, +) / Double(on.count), offMs: off.reduce(0, +) / Double(off.count), hash: hashes.first!)
    }

    func measureRecovery(into report: inout BenchReport, reference: String, progress: (String) -> Void) throws {
        let o = options("recovery", interval: 1, flags: models[0].flags)
        let job = try LocalJob(o)
        var keep = true  // a run that fails keeps its logs
        defer { job.stop(removeFiles: !keep) }
        let supervisor = Supervisor(job: job)
        var killedAt: Double?
        try waitEnd(job) {
            supervisor.tick()
            if killedAt == nil, jsonInt(supervisor.lastStatus?["committed_step"]) >= steps / 2 {
                if let pid = job.workerPID(node: 1, worker: 0) { kill(pid, SIGKILL) }
                kill(job.smps[1].pid, SIGKILL)
                killedAt = monotonicSeconds()
                progress("killed node n1 (its SMP and worker)")
            }
        }
        guard let killedAt else {
            throw BenchError(.unexpectedOutcome, "the job ended before step \(steps / 2) was committed (last status: \(supervisor.lastStatus.map { "\($0["state"] ?? "?"), committed \(jsonInt($0["committed_step"]))" } ?? "none")):\n\(job.logs.suffix(3000))")
        }
        let status = (try? String(contentsOfFile: job.dir + "/status.json", encoding: .utf8))
            .flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] } ?? [:]
        let failures = ((status["failures"] as? [[String: Any]]) ?? []).filter { $0["outcome"] as? String == "resumed" }
        guard failures.count == 1, let failure = failures.first else {
            throw BenchError(.unexpectedOutcome, "expected one failure resumed from, got \(failures.count): \(status["failures"] ?? "none")")
        }
        let detectedAt = (failure["detected_at_s"] as? Double) ?? Double(jsonInt(failure["detected_at_s"]))
        report.figure("recovery_kill_to_detect_ms", (detectedAt - killedAt) * 1000)
        for p in (failure["phases"] as? [[String: Any]]) ?? [] {
            report.figure("recovery_\(p["phase"] as? String ?? "?")_ms", (p["ms"] as? Double) ?? Double(jsonInt(p["ms"])))
        }
        let recoveryMs = (failure["recovery_ms"] as? Double) ?? Double(jsonInt(failure["recovery_ms"]))
        report.figure("recovery_ms", recoveryMs)
        report.figure("recovery_steps_lost", Double(jsonInt(failure["steps_lost"])))
        // The restart phase, from the workers' logs (each worker's last restart).
        var rows: [[String: Double]] = []
        for n in 0..<o.nodes {
            rows.append(Self.timeline(job.workerLog(node: n, worker: 0), after: detectedAt))
        }
        func worst(_ key: String) -> Double { rows.compactMap { $0[key] }.max() ?? .nan }
        func span(_ from: String, _ to: String) -> Double {
            rows.compactMap { r in r[to].flatMap { b in r[from].map { (b - $0) * 1000 } } }.max() ?? .nan
        }
        report.figure("recovery_detect_to_resume_ms", (worst("resume") - detectedAt) * 1000)
        report.figure("restart_replacement_process_ms", worst("agent_ms"))
        report.figure("restart_trainer_start_ms", span("instruction", "up"))
        report.figure("restart_process_group_ms", worst("process_group_ms"))
        report.figure("restart_ddp_ms", worst("ddp_ms"))
        report.figure("restart_process_group_rebuild_ms", span("instruction", "setup"))
        report.figure("restart_attach_ms", span("setup", "attached"))
        report.figure("restart_restore_ms", span("attached", "restored"))
        report.figure("restart_ready_to_resume_ms", span("ready", "resume"))
        var hashes: Set<String> = []
        for n in 0..<o.nodes {
            if let line = job.workerLog(node: n, worker: 0).split(separator: "\n").last(where: { $0.hasPrefix("final step=\(steps) ") }),
               let hash = field(line, "hash") { hashes.insert(hash) }
        }
        report.figure("recovered_hash_equal", hashes == [reference] ? 1 : 0)
        keep = false
        let keys = ["recovery_kill_to_detect_ms", "recovery_detect_ms", "recovery_plan_ms", "recovery_rebuild_ms", "recovery_restart_ms",
                    "restart_replacement_process_ms", "restart_trainer_start_ms", "restart_process_group_ms", "restart_ddp_ms",
                    "restart_process_group_rebuild_ms", "restart_attach_ms", "restart_restore_ms", "restart_ready_to_resume_ms",
                    "recovery_resume_ms", "recovery_detect_to_resume_ms", "recovery_ms", "recovery_steps_lost", "recovered_hash_equal"]
        let figures = Dictionary(report.figures, uniquingKeysWith: { $1 })
        report.notes.append("recovery of node n1 (the coordinator's phases, then the restart phase by piece):\n"
                            + renderTable([["figure", "value"]] + keys.map { [$0, figures[$0].map { String(format: "%.1f", $0) } ?? "-"] }))
        report.notes.append("Recovery: detect, plan, rebuild, restart, resume are the coordinator's phases; restart_*: the slowest worker's "
                            + "piece of the restart phase: replacement_process: the lost node's new worker process up to its agent (Python, "
                            + "torch and the script's imports); trainer_start: from the restore instruction to a forked trainer running; "
                            + "process_group: init_process_group (with the wait for the last rank); ddp: the DDP constructor; "
                            + "process_group_rebuild: from the restore instruction to DDP ready; attach: registration; restore: from the "
                            + "SMPs; ready_to_resume: waiting for every rank. recovered_hash_equal: the recovered job's final hash equals "
                            + "the uninterrupted run's (\(reference)).")
    }

    /// Timestamps (monotonic seconds) of the last restart after `after` in a worker log, and its setup durations (ms).
    static func timeline(_ log: String, after: Double) -> [String: Double] {
        var out: [String: Double] = [:]
        let marks: [(String, String)] = [("ft: agent up", "agent"), ("ft: restore instruction", "instruction"), ("ft: trainer up", "up"),
                                         ("setup: ", "setup"), ("ft: attached", "attached"), ("ft: restored step", "restored"),
                                         ("ft: ready", "ready"), ("ft: resume from", "resume")]
        for line in log.split(separator: "\n") {
            guard let t = field(line, "t").flatMap(Double.init), t >= after else { continue }
            for (prefix, key) in marks where line.hasPrefix(prefix) { out[key] = t }
            if line.hasPrefix("setup: ") {
                for key in ["process_group_ms", "ddp_ms"] { out[key] = field(line, key).flatMap(Double.init) }
            }
            if line.hasPrefix("ft: agent up ") { out["agent_ms"] = Double(line.split(separator: " ")[3]) }
        }
        return out
    }

    /// Until the job ends: at most 300 s to start running, 1800 s in all.
    func waitEnd(_ job: LocalJob, tick: () -> Void = {}) throws {
        let started = monotonicSeconds()
        var running = false
        while job.coordinator?.poll() == nil {
            tick()
            let elapsed = monotonicSeconds() - started
            if !running, elapsed > 300 {
                running = (job.status(timeout: 1)?["state"] as? String).map { $0 != "starting" } ?? false
                if !running { throw BenchError(.timeout, "the job did not start in 300 s (logs in \(job.dir)):\n\(job.logs.suffix(3000))") }
            }
            if elapsed > 1800 { throw BenchError(.timeout, "the job did not end in 1800 s (logs in \(job.dir)):\n\(job.logs.suffix(3000))") }
            usleep(100_000)
        }
    }

    private func f(_ v: Double) -> String { String(format: "%.1f", v) }
}

/// The value of `name=value` among a line's space-separated words.
func field<S: StringProtocol>(_ line: S, _ name: String) -> String? {
    line.split(separator: " ").first { $0.hasPrefix(name + "=") }.map { String($0.dropFirst(name.count + 1)) }
}
