import FTCore
import FTSystem
import Foundation

/// The chaos harness behind `chaos/run` (`ft-chaos`): each scenario starts a
/// real local job (coordinator, SMPs, demo-trainer workers), injects its
/// faults at seeded random moments, keeps the job whole the way the launcher
/// does (`Supervisor`), and checks the end against a golden uninterrupted run
/// of the same shape: final parameter hash equal on every worker, steps lost
/// per failure at most the snapshot interval, every failure resumed (or, for
/// `kill-m+1-nodes`, the clean stop with its report and nothing resumed), and
/// nothing left behind (recorded processes, shared-memory segments).
/// Processes are signalled only by their recorded PIDs.
public final class ChaosRunner: @unchecked Sendable {
    public struct Options: Sendable {
        public var binaries: String
        public var workDirectory: String
        public var steps = 400
        public var snapshotInterval = 1
        public var keepDirectories = false
        public var progress: @Sendable (String) -> Void = { _ in }
        public init(binaries: String, workDirectory: String) {
            self.binaries = binaries
            self.workDirectory = workDirectory
        }
    }

    public struct Result: Sendable {
        public var name: String
        public var seed: UInt64
        public var passed = false
        /// nil where the scenario expects no final state (the clean stop).
        public var finalHashEqual: Bool?
        /// Sum over the failures the job resumed from.
        public var stepsLost = 0
        /// Fault injected to the job running again (the last recovery, if several).
        public var recoveryMs: Double = -1
        /// Fault injected to the coordinator declaring it.
        public var detectMs: Double = -1
        public var failures = 0
        public var faults = 0
        public var detail = ""
        public var seconds = 0.0

        public var json: [String: Any] {
            ["name": name, "passed": passed, "final_hash_equal": finalHashEqual.map { $0 as Any } ?? NSNull(),
             "steps_lost": stepsLost, "recovery_ms": (recoveryMs * 10).rounded() / 10, "detect_ms": (detectMs * 10).rounded() / 10,
             "seed": seed, "failures": failures, "faults": faults, "detail": detail, "seconds": (seconds * 10).rounded() / 10]
        }
    }

    /// A job shape; a golden run is made once per shape (and step count).
    struct Shape: Hashable {
        var nodes: Int
        var workersPerNode: Int
        var k: Int
        var m: Int
        var steps: Int
    }

    public static let scenarios: [(name: String, about: String)] = [
        ("kill-worker", "SIGKILL one worker"),
        ("kill-worker-mid-copy", "a worker SIGKILLs itself halfway through copying a snapshot into its slot"),
        ("kill-smp", "SIGKILL one SMP (its workers follow it by PDEATHSIG); rebuilt from parity"),
        ("kill-node", "SIGKILL one node: its SMP and its workers at once; rebuilt from parity"),
        ("kill-m-nodes", "RS(2+2): SIGKILL 2 nodes of the group at once; both rebuilt"),
        ("kill-m+1-nodes", "RS(2+2): SIGKILL 3 nodes of the group: the job must stop with its report, nothing resumed"),
        ("sigstop-node", "SIGSTOP a node past the timeout; after the recovery SIGCONT it: the old SMP must be fenced"),
        ("kill-coordinator", "SIGKILL the coordinator; the launcher restarts it and it rebuilds its view"),
        ("flip-byte", "flip a byte in both stored slots of a worker, then force a restore: repaired from parity"),
    ]

    /// The CI smoke subset: a worker (also mid-copy), a node, a zombie node, the coordinator, and the clean stop; a few minutes in all.
    public static let smoke = ["kill-worker", "kill-worker-mid-copy", "kill-node", "sigstop-node", "kill-coordinator", "kill-m+1-nodes"]

    public let options: Options
    private var goldens: [Shape: String] = [:]
    private var runCounter = 0

    public init(_ options: Options) throws {
        self.options = options
        try FileManager.default.createDirectory(atPath: options.workDirectory, withIntermediateDirectories: true)
    }

    static func shape(for scenario: String, steps: Int) -> Shape {
        scenario.hasPrefix("kill-m") ? Shape(nodes: 4, workersPerNode: 1, k: 2, m: 2, steps: steps)
            : Shape(nodes: 4, workersPerNode: 2, k: 3, m: 1, steps: steps)
    }

    private func jobOptions(_ shape: Shape, tag: String, environment: [String: String] = [:]) -> LocalJob.Options {
        runCounter += 1
        let id = "ch\(getpid())x\(runCounter)"
        var o = LocalJob.Options(binaries: options.binaries, runDirectory: options.workDirectory + "/\(runCounter)-\(tag)", jobID: id)
        o.nodes = shape.nodes
        o.workersPerNode = shape.workersPerNode
        o.erasure = (shape.k, shape.m)
        o.snapshotInterval = options.snapshotInterval
        o.environment = environment
        o.workerCommand = [options.binaries + "/ft-demo-trainer", "--steps", "\(shape.steps)", "--report-every", "100"]
        return o
    }

    /// The final hash of every worker of the job (nil where a worker printed none).
    static func finalHashes(_ job: LocalJob, steps: Int) -> [String?] {
        (0..<job.options.nodes).flatMap { n in
            (0..<job.options.workersPerNode).map { w in
                job.workerLog(node: n, worker: w).split(separator: "\n").last { $0.hasPrefix("final step=\(steps) ") }
                    .flatMap { $0.split(separator: " ").first { $0.hasPrefix("hash=") } }.map { String($0.dropFirst(5)) }
            }
        }
    }

    /// The golden hash of `shape`: an uninterrupted run, made once.
    func golden(_ shape: Shape) throws -> String {
        if let g = goldens[shape] { return g }
        options.progress("golden run: \(shape.nodes) nodes x \(shape.workersPerNode) workers, RS(\(shape.k)+\(shape.m)), \(shape.steps) steps")
        let job = try LocalJob(jobOptions(shape, tag: "golden"))
        defer { job.stop(removeFiles: !options.keepDirectories) }
        let started = monotonicSeconds()
        while job.coordinator?.poll() == nil {
            if monotonicSeconds() - started > 600 { throw ChaosError("the golden run did not end in 600 s:\n\(job.logs.suffix(2000))") }
            usleep(100_000)
        }
        let hashes = Self.finalHashes(job, steps: shape.steps)
        guard let first = hashes.first ?? nil, hashes.allSatisfy({ $0 == first }) else {
            throw ChaosError("the golden run did not end with one final hash on every worker (\(hashes)):\n\(job.logs.suffix(2000))")
        }
        goldens[shape] = first
        return first
    }

    // MARK: running a job under faults

    /// What a scenario sees while its job runs.
    final class Watch {
        let job: LocalJob
        let supervisor: Supervisor
        /// Every failure any coordinator incarnation reported, by detection time and what.
        var failures: [String: [String: Any]] = [:]
        var lastStatus: [String: Any]?
        var log: [String] = []

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
            for f in (s["failures"] as? [[String: Any]]) ?? [] {
                failures["\(f["detected_at_s"] ?? "")|\(f["what"] ?? "")"] = f
            }
        }

        var furthestStep: Int {
            ((lastStatus?["nodes"] as? [[String: Any]]) ?? []).flatMap { ($0["workers"] as? [[String: Any]]) ?? [] }
                .map { jsonInt($0["step"]) }.max() ?? 0
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

        var ended: Bool {
            job.coordinator?.poll() != nil && FileManager.default.fileExists(atPath: job.dir + "/status.json")
        }

        /// The final status the coordinator wrote when the job ended.
        var finalStatus: [String: Any] {
            (try? String(contentsOfFile: job.dir + "/status.json", encoding: .utf8))
                .flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] } ?? [:]
        }
    }

    public struct ChaosError: Error, CustomStringConvertible {
        public var description: String
        init(_ d: String) { description = d }
    }

    /// Runs one scenario by name with `seed`.
    public func run(_ name: String, seed: UInt64) -> Result {
        var result = Result(name: name, seed: seed)
        let started = monotonicSeconds()
        defer { result.seconds = monotonicSeconds() - started }
        do {
            try runScenario(name, seed: seed, into: &result)
        } catch {
            result.passed = false
            result.detail = "\(error)"
        }
        result.seconds = monotonicSeconds() - started
        return result
    }

    private func runScenario(_ name: String, seed: UInt64, into result: inout Result) throws {
        guard Self.scenarios.contains(where: { $0.name == name }) else {
            throw ChaosError("unknown scenario \(name) (known: \(Self.scenarios.map(\.name).joined(separator: ", ")))")
        }
        var rng = SplitMix64(seed: seed)
        let shape = Self.shape(for: name, steps: options.steps)
        // The clean stop has no final state to compare: no golden run for it.
        let expected = name == "kill-m+1-nodes" ? "" : try golden(shape)
        // The moment of the fault: a step between a quarter and 60 % of the run.
        let target = Int.random(in: shape.steps / 4...shape.steps * 3 / 5, using: &rng)
        let node = Int.random(in: 0..<shape.nodes, using: &rng)
        let worker = Int.random(in: 0..<shape.workersPerNode, using: &rng)
        var environment: [String: String] = [:]
        if name == "kill-worker-mid-copy" {
            environment["FT_FAULT_KILL_MID_COPY_STEP"] = "\(target)"
            environment["FT_FAULT_RANK"] = "\(node * shape.workersPerNode + worker)"
        }
        options.progress("\(name) (seed \(seed)): fault around step \(target), node n\(node), worker w\(worker)")
        let job = try LocalJob(jobOptions(shape, tag: name, environment: environment))
        let watch = Watch(job: job)
        var keep = true  // a run that throws keeps its logs; a passed one follows --keep
        defer { job.stop(removeFiles: !keep) }

        guard watch.until(seconds: 300, { watch.furthestStep >= target || watch.ended }) else {
            throw ChaosError("the job never reached step \(target)")
        }
        guard !watch.ended else { throw ChaosError("the job ended before step \(target):\n\(job.logs.suffix(1500))") }
        let injectedAt = monotonicSeconds()
        var notes: [String] = []
        var stopped: [Int32] = []  // SIGSTOPped by sigstop-node
        var oldSMP: ChildProcess?
        let resumeLinesBefore = countLines(job, prefix: "resume from=")

        switch name {
        case "kill-worker", "kill-smp", "kill-node", "kill-coordinator":
            try inject(name, job, node: node, worker: worker)
            result.faults = 1
        case "kill-worker-mid-copy":
            result.faults = 1  // the worker does it itself at `target`
        case "kill-m-nodes", "kill-m+1-nodes":
            let count = name == "kill-m-nodes" ? shape.m : shape.m + 1
            var victims = Array(0..<shape.nodes)
            victims.shuffle(using: &rng)
            victims = Array(victims.prefix(count)).sorted()
            for n in victims { try inject("kill-node", job, node: n, worker: 0) }
            notes.append("killed \(victims.map { "n\($0)" }.joined(separator: ", "))")
            result.faults = count
        case "sigstop-node":
            oldSMP = job.smps[node]
            stopped = try inject(name, job, node: node, worker: worker)
            result.faults = 1
        case "flip-byte":
            // Hold node `flipNode`'s SMP still, force a recovery (kill a worker
            // elsewhere), corrupt both slots of one of its workers, let it go:
            // its restore must find the bad chunk and rebuild it from parity.
            let flipNode = node
            let other = (node + 1) % shape.nodes
            let smp = job.smps[flipNode]
            kill(smp.pid, SIGSTOP)
            if let pid = job.workerPID(node: other, worker: 0) { kill(pid, SIGKILL) }
            usleep(100_000)
            var flipped = 0
            let prefix = "ft-\(job.job)-n\(flipNode)-p\(smp.pid)-w\(worker)-s"
            for name in RecordedProcesses.segments(job: job.job) where name.hasPrefix(prefix) {
                guard let h = FileHandle(forUpdatingAtPath: "/dev/shm/" + name) else { continue }
                let size = (try? h.seekToEnd()) ?? 0
                let offset = UInt64.random(in: 0..<max(1, size), using: &rng)
                try h.seek(toOffset: offset)
                let b = try h.read(upToCount: 1) ?? Data([0])
                try h.seek(toOffset: offset)
                try h.write(contentsOf: Data([b[0] ^ 0x40]))
                try h.close()
                flipped += 1
            }
            kill(smp.pid, SIGCONT)
            notes.append("flipped a byte in \(flipped) slots of n\(flipNode)/w\(worker)")
            guard flipped == 2 else { throw ChaosError("found \(flipped) slots of n\(flipNode)/w\(worker) to corrupt, expected 2") }
            result.faults = 1
        default:
            throw ChaosError("unknown scenario \(name)")
        }

        if name == "sigstop-node" {
            // Wait for the recovery without it (a replacement rebuilt the node), then let it go.
            guard watch.until(seconds: 120, { watch.resumed.contains { watch.detectedAt($0) >= injectedAt - 1 } || watch.ended }) else {
                throw ChaosError("no recovery while n\(node) was stopped")
            }
            for pid in stopped { kill(pid, SIGCONT) }
            let fenced = watch.until(seconds: 20) { oldSMP?.poll() != nil && stopped.dropLast().allSatisfy { kill($0, 0) != 0 } }
            let status = oldSMP?.poll()
            notes.append("continued the old n\(node): its SMP \(status.map { "\($0)" } ?? "still running")")
            guard fenced, status == .exited(3) else {
                throw ChaosError("the continued SMP of n\(node) was not fenced (exit \(status.map { "\($0)" } ?? "none"), want code 3)")
            }
        }

        guard watch.until(seconds: 600, every: 0.1, { watch.ended }) else {
            throw ChaosError("the job did not end within 600 s of the fault")
        }
        let final = watch.finalStatus
        watch.merge(final)
        result.failures = watch.failures.count

        if name == "kill-m+1-nodes" {
            let reason = final["stop_reason"] as? String ?? ""
            let state = final["state"] as? String ?? ""
            let resumedAfter = countLines(job, prefix: "resume from=") - resumeLinesBefore
            result.finalHashEqual = nil
            result.detectMs = (watch.failures.values.map(watch.detectedAt).filter { $0 >= injectedAt - 1 }.min().map { ($0 - injectedAt) * 1000 }) ?? -1
            notes.append("stop: \(reason)")
            let reportOK = reason.contains("group") && reason.contains("committed")
            result.passed = state == "failed" && reportOK && resumedAfter == 0 && watch.resumed.allSatisfy { watch.detectedAt($0) < injectedAt }
            if !result.passed {
                notes.append("state \(state), \(resumedAfter) resume lines after the kill, report \(reportOK ? "ok" : "incomplete")")
            }
        } else {
            let hashes = Self.finalHashes(job, steps: shape.steps)
            result.finalHashEqual = hashes.allSatisfy { $0 == expected }
            let resumed = watch.resumed.filter { watch.detectedAt($0) >= injectedAt - 1 }
            result.stepsLost = resumed.reduce(0) { $0 + max(0, jsonInt($1["steps_lost"])) }
            let selfInflicted = name == "kill-worker-mid-copy"  // the worker picks its moment: detection is not measurable from here
            if !selfInflicted, let first = watch.failures.values.map(watch.detectedAt).filter({ $0 >= injectedAt - 1 }).min() {
                result.detectMs = (first - injectedAt) * 1000
            }
            if let last = resumed.last {
                let recoveryMs = (last["recovery_ms"] as? Double) ?? Double(jsonInt(last["recovery_ms"]))
                result.recoveryMs = selfInflicted ? recoveryMs : (watch.detectedAt(last) - injectedAt) * 1000 + recoveryMs
            }
            var problems = endProblems(hashes: hashes, expected: expected, watch: watch, resumed: resumed)
            if resumed.isEmpty { problems.append("no failure was detected and resumed from") }
            if name == "flip-byte" {
                let repaired = (0..<shape.nodes).contains { LocalJob.read(job.dir + "/smp-n\($0).log").contains("repaired worker") }
                if !repaired { problems.append("no SMP log says it repaired the corrupt chunk") }
            }
            if name == "kill-worker-mid-copy" {
                let died = (0..<shape.nodes).contains { LocalJob.read(job.dir + "/smp-n\($0).log").contains("signal 9") }
                if !died { problems.append("the worker did not die mid-copy (no SIGKILL in the SMP logs)") }
            }
            result.passed = problems.isEmpty
            notes += problems
        }
        let leftovers = awaitLeftovers(job)
        if !leftovers.isEmpty {
            result.passed = false
            notes.append("left behind: \(leftovers)")
        }
        notes += watch.log.map { "launcher: \($0)" }
        result.detail = notes.joined(separator: "; ")
        keep = options.keepDirectories || !result.passed
        if !result.passed { result.detail += " (logs kept in \(job.dir))" }
    }

    /// One fault by recorded PID: `kill-worker` (worker `w` of node `n`),
    /// `kill-smp`, `kill-node` (the SMP and all its workers at once),
    /// `kill-coordinator`, or `sigstop-node` (SIGSTOP the node; returns the
    /// stopped PIDs, the SMP's last, for the caller to continue later).
    @discardableResult
    func inject(_ kind: String, _ job: LocalJob, node n: Int, worker w: Int) throws -> [Int32] {
        let workers = (0..<job.options.workersPerNode).compactMap { job.workerPID(node: n, worker: $0) }
        switch kind {
        case "kill-worker":
            guard let pid = job.workerPID(node: n, worker: w) else { throw ChaosError("no recorded PID for n\(n)/w\(w)") }
            kill(pid, SIGKILL)
        case "kill-smp":
            kill(job.smps[n].pid, SIGKILL)
        case "kill-node":
            for pid in workers { kill(pid, SIGKILL) }
            kill(job.smps[n].pid, SIGKILL)
        case "kill-coordinator":
            guard let c = job.coordinator else { throw ChaosError("no coordinator") }
            c.kill(SIGKILL)
        case "sigstop-node":
            let pids = workers + [job.smps[n].pid]
            for pid in pids { kill(pid, SIGSTOP) }
            return pids
        default:
            throw ChaosError("no such fault: \(kind)")
        }
        return []
    }

    /// The checks every run that should end like its golden run shares: equal
    /// final hashes, no failure left unresumed, at most the interval of steps lost.
    func endProblems(hashes: [String?], expected: String, watch: Watch, resumed: [[String: Any]]) -> [String] {
        var problems: [String] = []
        if !hashes.allSatisfy({ $0 == expected }) { problems.append("final hashes \(hashes.map { $0 ?? "none" }) != golden \(expected)") }
        let unfinished = watch.failures.values.filter {
            let o = $0["outcome"] as? String ?? ""
            return o != "resumed" && !o.hasPrefix("superseded")
        }
        if !unfinished.isEmpty { problems.append("failures not resumed: \(unfinished.map { "\($0["what"] ?? "?"): \($0["outcome"] ?? "?")" })") }
        let worstLost = resumed.map { jsonInt($0["steps_lost"]) }.max() ?? 0
        if worstLost > options.snapshotInterval { problems.append("a failure lost \(worstLost) steps (> snapshot interval \(options.snapshotInterval))") }
        return problems
    }

    /// What the job left after it ended: recorded processes still alive, shm segments.
    func awaitLeftovers(_ job: LocalJob) -> String {
        var left = job.leftovers()
        let end = monotonicSeconds() + 10
        while (!left.pids.isEmpty || !left.segments.isEmpty) && monotonicSeconds() < end {
            usleep(100_000)
            left = job.leftovers()
        }
        var parts: [String] = []
        if !left.pids.isEmpty { parts.append("processes \(left.pids)") }
        if !left.segments.isEmpty { parts.append("\(left.segments.count) shm segments") }
        return parts.joined(separator: ", ")
    }

    func countLines(_ job: LocalJob, prefix: String) -> Int {
        (0..<job.options.nodes).flatMap { n in (0..<job.options.workersPerNode).map { job.workerLog(node: n, worker: $0) } }
            .reduce(0) { $0 + $1.split(separator: "\n").filter { $0.hasPrefix(prefix) }.count }
    }

    // MARK: soak

    /// Kills something at exponential intervals (mean `mtbf` seconds) for
    /// `duration` seconds of a long job, one fault at a time (the next after
    /// the job runs again), then lets it finish and checks it like a scenario.
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
        let probe = Self.shape(for: "kill-node", steps: options.steps)
        let t0 = monotonicSeconds()
        _ = try golden(probe)
        let perStep = (monotonicSeconds() - t0) / Double(options.steps)
        let steps = max(options.steps, Int(duration * 1.15 / perStep))
        let shape = Self.shape(for: "kill-node", steps: steps)
        options.progress("soak: \(steps) steps (~\(String(format: "%.1f", perStep * 1000)) ms/step uninterrupted), faults at a mean of every \(mtbf) s for \(duration) s")
        let expected = try golden(shape)
        let job = try LocalJob(jobOptions(shape, tag: "soak"))
        let watch = Watch(job: job)
        var keep = true
        defer { job.stop(removeFiles: !keep) }
        guard watch.until(seconds: 120, { (watch.lastStatus?["state"] as? String) == "running" }) else {
            throw ChaosError("the soak job did not start")
        }
        let kinds = ["kill-worker", "kill-smp", "kill-node", "kill-coordinator", "sigstop-node"]
        var counts: [String: Int] = [:]
        var injections: [Double] = []
        let soakEnd = monotonicSeconds() + duration
        var stoppedOld: [(ChildProcess, [Int32])] = []
        while monotonicSeconds() < soakEnd {
            // Exponential wait, from the moment the job runs again.
            let wait = -mtbf * log(1 - Double.random(in: 0..<1, using: &rng))
            let at = monotonicSeconds() + wait
            while monotonicSeconds() < min(at, soakEnd) && !watch.ended {
                watch.poll()
                usleep(100_000)
            }
            if monotonicSeconds() >= soakEnd || watch.ended { break }
            let kind = kinds.randomElement(using: &rng)!
            let n = Int.random(in: 0..<shape.nodes, using: &rng)
            let w = Int.random(in: 0..<shape.workersPerNode, using: &rng)
            options.progress("soak: \(Int(monotonicSeconds() - (soakEnd - duration))) s: \(kind) n\(n)/w\(w) (furthest step \(watch.furthestStep)/\(steps))")
            injections.append(monotonicSeconds())
            let smp = job.smps[n]
            let stopped = try inject(kind, job, node: n, worker: w)
            if !stopped.isEmpty { stoppedOld.append((smp, stopped)) }  // continued once the job resumed without it
            counts[kind, default: 0] += 1
            let injected = injections.last!
            // One fault at a time: wait until the job resumed from it.
            guard watch.until(seconds: 120, { watch.resumed.contains { watch.detectedAt($0) >= injected - 1 } || watch.ended }) else {
                throw ChaosError("no recovery within 120 s of \(kind) n\(n)/w\(w)")
            }
            for (_, pids) in stoppedOld { for pid in pids { kill(pid, SIGCONT) } }
            for (smp, _) in stoppedOld {
                _ = watch.until(seconds: 20) { smp.poll() != nil }
                if smp.poll() != .exited(3) { throw ChaosError("a continued SMP (pid \(smp.pid)) was not fenced: \(smp.poll().map { "\($0)" } ?? "still running")") }
            }
            stoppedOld.removeAll()
        }
        options.progress("soak: faults over (\(injections.count)); letting the job finish")
        guard watch.until(seconds: 3600, every: 0.2, { watch.ended }) else { throw ChaosError("the soak job did not end") }
        watch.merge(watch.finalStatus)
        let hashes = Self.finalHashes(job, steps: steps)
        result.faults = injections.count
        result.failures = watch.failures.count
        result.finalHashEqual = hashes.allSatisfy { $0 == expected }
        let resumed = watch.resumed
        result.stepsLost = resumed.reduce(0) { $0 + max(0, jsonInt($1["steps_lost"])) }
        let recoveries = resumed.map { (($0["recovery_ms"] as? Double) ?? Double(jsonInt($0["recovery_ms"]))) }
        result.recoveryMs = recoveries.max() ?? -1
        let worstLost = resumed.map { jsonInt($0["steps_lost"]) }.max() ?? 0
        var notes = ["faults: " + counts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "),
                     "\(resumed.count) recoveries, detect-to-resume p50 \(Int(percentile(recoveries, 0.5))) ms, max \(Int(recoveries.max() ?? 0)) ms",
                     "worst steps lost per failure \(worstLost)"]
        var problems = endProblems(hashes: hashes, expected: expected, watch: watch, resumed: resumed)
        let leftovers = awaitLeftovers(job)
        if !leftovers.isEmpty { problems.append("left behind: \(leftovers)") }
        result.passed = problems.isEmpty
        notes += problems
        result.detail = notes.joined(separator: "; ")
        keep = options.keepDirectories || !result.passed
        if !result.passed { result.detail += " (logs kept in \(job.dir))" }
    }

    func percentile(_ values: [Double], _ p: Double) -> Double {
        guard !values.isEmpty else { return 0 }
        let s = values.sorted()
        return s[min(s.count - 1, Int(Double(s.count - 1) * p + 0.5))]
    }
}
