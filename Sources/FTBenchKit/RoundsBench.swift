import FTLauncher
import FTSystem
import Foundation

/// `ft-bench rounds`: what a snapshot every step costs a job with a small
/// state, where the cost is per-round latency rather than bytes.
///
/// The demo trainer with synthetic state (a few MiB per worker, a fixed
/// compute per step) on 4 nodes x 2 workers, run three ways in one run: with
/// snapshots off (the interval longer than the job), with a snapshot every
/// step and no erasure coding (the round is the local copy, the SMPs'
/// `protected`, the coordinator's `commit`), and with a snapshot every step
/// and RS(3+1) (the chunks travel to their parity holders as well). The step
/// time comes from the job's progress (polled); the per-round commit latency
/// (each SMP's "all local workers staged" to "commit arrived", p50 and p99)
/// from the SMPs' logs of the RS(3+1) job.
public struct RoundsBench {
    public var binaries: String
    public var steps = 600
    public var stepMs = 10.0
    public var stateMB = 1

    public init(binaries: String) { self.binaries = binaries }

    func options(_ tag: String, interval: Int, erasure: Bool) -> LocalJob.Options {
        var o = LocalJob.Options(binaries: binaries, runDirectory: "/tmp/ft-bench-rounds-\(tag)-\(getpid())", jobID: "rounds\(tag)\(getpid())")
        o.nodes = 4
        o.workersPerNode = 2
        o.erasure = erasure ? (3, 1) : nil
        o.snapshotInterval = interval
        o.lingerMs = 2000
        o.workerCommand = [binaries + "/ft-demo-trainer", "--steps", "\(steps)", "--synthetic", "--state-mb", "\(stateMB)",
                           "--step-ms", "\(stepMs)", "--report-every", "\(steps)"]
        return o
    }

    public func run(progress: (String) -> Void = { _ in }) throws -> BenchReport {
        var report = BenchReport(section: "rounds")
        report.table = [["snapshots", "step ms", "vs off", "commit ms p50", "commit ms p99"]]
        progress("snapshots off")
        let off = try runJob(options("off", interval: steps * 10, erasure: false))
        progress("a snapshot every step, no erasure coding")
        let local = try runJob(options("noec", interval: 1, erasure: false))
        progress("a snapshot every step, RS(3+1)")
        let ec = try runJob(options("ec", interval: 1, erasure: true))
        let p50 = median(ec.commitMs), p99 = percentile(ec.commitMs, 99)
        report.figure("step_ms_off", off.stepMs)
        report.figure("step_ms_every1_no_ec", local.stepMs)
        report.figure("step_ms_every1_rs3_1", ec.stepMs)
        report.figure("commit_ms_p50", p50)
        report.figure("commit_ms_p99", p99)
        report.figure("rounds_measured", Double(ec.commitMs.count))
        report.ratio("step_every1_no_ec_vs_off", local.stepMs / off.stepMs)
        report.ratio("step_every1_rs3_1_vs_off", ec.stepMs / off.stepMs)
        report.table.append(["off", f(off.stepMs), "1.000", "-", "-"])
        report.table.append(["every step, no EC", f(local.stepMs), String(format: "%.3f", local.stepMs / off.stepMs), "-", "-"])
        report.table.append(["every step, RS(3+1)", f(ec.stepMs), String(format: "%.3f", ec.stepMs / off.stepMs), f(p50), f(p99)])
        report.notes.append("ft-demo-trainer --synthetic --state-mb \(stateMB) --step-ms \(stepMs), 4 nodes x 2 workers, \(steps) steps. "
                            + "step ms: wall time per step over the middle of the job (its progress polled every 20 ms). commit ms: each "
                            + "SMP's time from all its workers staged to the coordinator's commit, over every round of the RS(3+1) job.")
        return report
    }

    struct Outcome {
        var stepMs: Double
        var commitMs: [Double]
    }

    func runJob(_ o: LocalJob.Options) throws -> Outcome {
        let job = try LocalJob(o)
        defer { job.stop() }
        let started = monotonicSeconds()
        var marks: [(step: Int, t: Double)] = []
        while job.coordinator?.poll() == nil {
            if let s = job.status(timeout: 0.5), s["state"] as? String == "running" {
                let step = ((s["nodes"] as? [[String: Any]]) ?? []).flatMap { ($0["workers"] as? [[String: Any]]) ?? [] }
                    .map { jsonInt($0["step"]) }.min() ?? 0
                marks.append((step, monotonicSeconds()))
            }
            if monotonicSeconds() - started > 600 { throw BenchError(.timeout, "the job did not end in 600 s:\n\(job.logs.suffix(3000))") }
            usleep(20_000)
        }
        // The middle of the job: from 10 % to 90 % of the steps.
        guard let a = marks.first(where: { $0.step >= steps / 10 }), let b = marks.last(where: { $0.step <= steps * 9 / 10 }), b.step > a.step else {
            throw BenchError(.unexpectedOutcome, "too few progress samples (\(marks.count)):\n\(job.logs.suffix(2000))")
        }
        var commits: [Double] = []
        for n in 0..<o.nodes {
            let log = (try? String(contentsOfFile: job.dir + "/smp-n\(n).log", encoding: .utf8)) ?? ""
            for line in log.split(separator: "\n") where line.contains("committed") {
                if let v = field(line, "staged_to_committed_ms").flatMap(Double.init) { commits.append(v) }
            }
        }
        return Outcome(stepMs: (b.t - a.t) * 1000 / Double(b.step - a.step), commitMs: commits)
    }

    private func f(_ v: Double) -> String { String(format: "%.1f", v) }
}
