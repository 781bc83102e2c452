import FTLauncher
import FTSystem
import Foundation

/// `ft-bench detect`: time from a SIGKILL of a worker, or a SIGSTOP of an SMP,
/// to the coordinator's detection, over real processes on loopback (the
/// coordinator stamps detection with CLOCK_MONOTONIC, which every process of
/// the host shares). A killed worker is reported by its SMP at once; a stopped
/// SMP is found by heartbeat timeout (100 ms interval, 500 ms timeout).
public struct DetectBench {
    public var killTrials = 10
    public var stopTrials = 5
    public var binaries: String
    public var timeoutMs = 500

    public init(binaries: String) { self.binaries = binaries }

    func options(_ tag: String) -> LocalJob.Options {
        var o = LocalJob.Options(binaries: binaries, runDirectory: "/tmp/ft-bench-detect-\(tag)-\(getpid())",
                                 jobID: "detect\(tag)\(getpid())")
        o.nodes = 2
        o.workersPerNode = 1
        o.timeoutMs = timeoutMs
        o.lingerMs = 2000
        o.workerCommand = [binaries + "/ft-toy-worker", "--steps", "100000000", "--state-kib", "64", "--step-ms", "5"]
        return o
    }

    public func run(progress: (String) -> Void = { _ in }) throws -> BenchReport {
        var report = BenchReport(section: "detect")
        var killMs: [Double] = []
        do {
            let job = try LocalJob(options("kill"))
            defer { job.stop() }
            try waitRunning(job)
            for trial in 0..<killTrials {
                progress("SIGKILL trial \(trial + 1)/\(killTrials)")
                let before = jsonInt(job.status()?["epoch"])
                guard let pid = job.workerPID(node: trial % 2, worker: 0) else { throw BenchError(.unexpectedOutcome, "no worker pid") }
                let t0 = monotonicSeconds()
                kill(pid, SIGKILL)
                let failure = try waitFailure(job, afterEpoch: before)
                killMs.append(((failure["detected_at_s"] as? Double ?? t0) - t0) * 1000)
                try waitRunning(job)
            }
        }
        var stopMs: [Double] = []
        for trial in 0..<stopTrials {
            progress("SIGSTOP trial \(trial + 1)/\(stopTrials)")
            let job = try LocalJob(options("stop\(trial)"))
            defer { job.stop() }
            try waitRunning(job)
            let before = jsonInt(job.status()?["epoch"])
            let t0 = monotonicSeconds()
            kill(job.smps[1].pid, SIGSTOP)
            let failure = try waitFailure(job, afterEpoch: before)
            stopMs.append(((failure["detected_at_s"] as? Double ?? t0) - t0) * 1000)
        }
        report.figure("detect_sigkill_ms_p50", median(killMs))
        report.figure("detect_sigkill_ms_p99", percentile(killMs, 99))
        report.figure("detect_sigstop_ms_p50", median(stopMs))
        report.figure("detect_sigstop_ms_p99", percentile(stopMs, 99))
        report.figure("heartbeat_timeout_ms", Double(timeoutMs))
        report.ratio("sigstop_p50_vs_timeout", median(stopMs) / Double(timeoutMs))
        report.table = [["event", "trials", "p50 ms", "p99 ms", "max ms"],
                        ["worker SIGKILL (SMP report)", "\(killMs.count)", f(median(killMs)), f(percentile(killMs, 99)), f(killMs.max() ?? .nan)],
                        ["SMP SIGSTOP (heartbeat timeout)", "\(stopMs.count)", f(median(stopMs)), f(percentile(stopMs, 99)), f(stopMs.max() ?? .nan)]]
        report.notes.append("The heartbeat timeout is \(timeoutMs) ms (interval 100 ms): SIGSTOP detection cannot beat it; "
                            + "sigstop_p50_vs_timeout is the median over the timeout.")
        return report
    }

    private func waitRunning(_ job: LocalJob) throws {
        let deadline = monotonicSeconds() + 60
        while monotonicSeconds() < deadline {
            if let s = job.status(), s["state"] as? String == "running", jsonInt(s["committed_step"]) >= 3 { return }
            usleep(20_000)
        }
        throw BenchError(.timeout, "the job did not reach running within 60 s:\n\(job.logs.suffix(3000))")
    }

    private func waitFailure(_ job: LocalJob, afterEpoch epoch: Int) throws -> [String: Any] {
        let deadline = monotonicSeconds() + 30
        while monotonicSeconds() < deadline {
            if let s = job.status(), jsonInt(s["epoch"]) > epoch || s["state"] as? String == "failed",
               let f = s["last_failure"] as? [String: Any] { return f }
            usleep(5000)
        }
        throw BenchError(.timeout, "no detection within 30 s:\n\(job.logs.suffix(3000))")
    }

    private func f(_ v: Double) -> String { String(format: "%.1f", v) }
}
