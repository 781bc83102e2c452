import FTCore
import FTSystem
import Foundation

extension ChaosRunner {
    /// What a scenario sees while its job runs: the launcher's supervision
    /// (`Supervisor`) and every failure any coordinator incarnation reported.
    final class Watch {
        let job: LocalJob
        let supervisor: Supervisor
        /// Every failure any coordinator incarnation reported, by detection time
        /// and what, each tagged with the reporting coordinator's pid.
        var failures: [String: [String: Any]] = [:]
        var lastStatus: [String: Any]?
        var log: [String] = []
        /// When a committed step was first seen (a later recovery must restore one).
        var firstCommitSeenAt: Double?

        init(job: LocalJob) {
            self.job = job
            supervisor = Supervisor(job: job)
        }

        /// One look: the supervisor's tick and the failure history.
        func poll() {
            for action in supervisor.tick() { log.append(action) }
            guard let s = supervisor.lastStatus else { return }
            lastStatus = s
            merge(s)
        }

        func merge(_ s: [String: Any]) {
            if firstCommitSeenAt == nil, jsonInt(s["committed_step"]) >= 0 { firstCommitSeenAt = monotonicSeconds() }
            // The history, and the failure in progress (a coordinator killed now never records it).
            var reported = (s["failures"] as? [[String: Any]]) ?? []
            if let current = s["last_failure"] as? [String: Any] { reported.append(current) }
            for f in reported {
                var tagged = f
                tagged["coordinator_pid"] = jsonInt(s["coordinator_pid"])
                tagged["age_ms"] = nil
                let key = "\(f["detected_at_s"] ?? "")|\(f["what"] ?? "")"
                // A record only moves forward (in progress -> resumed or superseded).
                if failures[key]?["outcome"] as? String != "in progress" && failures[key] != nil && f["outcome"] as? String == "in progress" { continue }
                failures[key] = tagged
            }
        }

        var state: String { lastStatus?["state"] as? String ?? "" }

        var furthestStep: Int {
            ((lastStatus?["nodes"] as? [[String: Any]]) ?? []).flatMap { ($0["workers"] as? [[String: Any]]) ?? [] }
                .map { jsonInt($0["step"]) }.max() ?? 0
        }

        /// The names of the recovery phases the current failure has completed (empty when none is in progress).
        var completedPhases: [String] {
            guard let f = lastStatus?["last_failure"] as? [String: Any], f["outcome"] as? String == "in progress" else { return [] }
            return ((f["phases"] as? [[String: Any]]) ?? []).compactMap { $0["phase"] as? String }
        }

        var resumed: [[String: Any]] {
            failures.values.filter { $0["outcome"] as? String == "resumed" }.sorted { detectedAt($0) < detectedAt($1) }
        }

        func detectedAt(_ f: [String: Any]) -> Double { (f["detected_at_s"] as? Double) ?? Double(jsonInt(f["detected_at_s"])) }

        /// Polls until `condition` or the deadline; false on timeout.
        func until(seconds: Double, every: Double = 0.05, _ condition: () -> Bool) -> Bool {
            let end = monotonicSeconds() + seconds
            while monotonicSeconds() < end {
                poll()
                if condition() { return true }
                usleep(UInt32(every * 1e6))
            }
            return false
        }

        /// Waits `seconds`, keeping the job whole meanwhile.
        func sleep(_ seconds: Double) {
            let end = monotonicSeconds() + seconds
            while monotonicSeconds() < end {
                poll()
                usleep(UInt32(min(0.02, max(0, end - monotonicSeconds())) * 1e6))
            }
        }

        var ended: Bool {
            job.coordinator?.poll() != nil && FileManager.default.fileExists(atPath: job.dir + "/status.json")
        }

        /// The final status the coordinator wrote when the job ended.
        var finalStatus: [String: Any] {
            (try? String(contentsOfFile: job.dir + "/status.json", encoding: .utf8))
                .flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] } ?? [:]
        }
    }

    /// The largest heartbeat gap each kind of process logged (ms): SMPs and
    /// workers at exit and whenever a gap passed the warning threshold, the
    /// coordinator's largest gap between two loop turns at exit. A process
    /// killed with SIGKILL logs only the gaps that passed the threshold.
    /// `excluding`: processes the fault itself stopped (their own gap is the fault's).
    static func heartbeatGaps(_ job: LocalJob, excluding stopped: Set<Int32> = []) -> [String: Int] {
        heartbeatGapLines(job, excluding: stopped).mapValues(\.ms)
    }

    /// `heartbeatGaps` with the log line each largest gap came from ("" when none),
    /// so a long run that passed still says which process stalled and when.
    static func heartbeatGapLines(_ job: LocalJob, excluding stopped: Set<Int32> = []) -> [String: (ms: Int, line: String)] {
        func largest(_ text: String, _ patterns: [String]) -> (ms: Int, line: String) {
            var best = (ms: -1, line: "")
            for line in text.split(separator: "\n") {
                if let r = line.range(of: "(pid "), let pid = Int32(line[r.upperBound...].prefix { $0.isNumber }), stopped.contains(pid) { continue }
                for p in patterns {
                    guard let r = line.range(of: p) else { continue }
                    let digits = line[r.upperBound...].prefix { $0.isNumber }
                    if let v = Int(digits), v > best.ms { best = (v, String(line)) }
                }
            }
            return best
        }
        let dir = job.dir
        let files = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        let smpText = files.filter { ($0.hasPrefix("smp-") || $0.hasPrefix("spare")) && $0.hasSuffix(".log") }
            .map { LocalJob.read(dir + "/" + $0) }.joined(separator: "\n")
        // A worker declared hung is stopped by gdb while its stack is read: its last gap
        // is the dump's, not the heartbeat path's (skipped up to its successor's restore).
        let workerText = ((try? FileManager.default.contentsOfDirectory(atPath: dir + "/logs")) ?? [])
            .map { name -> String in
                var keep: [Substring] = []
                var hung = false
                for line in LocalJob.read(dir + "/logs/" + name).split(separator: "\n") {
                    if line.contains("fault injection: hanging") { hung = true }
                    if line.hasPrefix("restored step=") || line.hasPrefix("fresh start") { hung = false }
                    if !hung { keep.append(line) }
                }
                return keep.joined(separator: "\n")
            }.joined(separator: "\n")
        return [
            "smp": largest(smpText, ["largest heartbeat gap ", "no heartbeat sent for "]),
            "worker": largest(workerText, ["control: largest heartbeat gap ", "control: no heartbeat sent for "]),
            "coordinator_loop": largest(LocalJob.read(dir + "/coordinator.log"), ["largest_loop_gap_ms="]),
        ]
    }
}
