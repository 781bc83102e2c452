import FTCore
import FTPersist
import FTSystem
import Foundation

/// Persist directory names, for the chaos faults that damage them.
enum PersistPathsForChaos {
    static func step(_ root: String, _ step: Int) -> String { PersistPaths.stepDirectory(root, step: step) }
}

extension ChaosRunner {
    /// One fault as injected: what, on whom, when.
    struct Fault {
        var kind: String
        var target: String
        var at: Double
        /// Processes the fault stopped (SIGSTOP): their own heartbeat gap is the fault's.
        var stopped: [Int32] = []
        /// Wall-clock spans when the fault held a link down or throttled (for checks against log timestamps).
        var spans: [(from: Date, to: Date)] = []
        /// The processes the fault cut off: for a flapping link, every incarnation of the node it hit.
        var cutOff: [Int32] = []
    }

    /// The step a persist is writing now, as the coordinator says (nil: none).
    func inProgressPersist(_ watch: Watch) -> Int? {
        let s = jsonInt((watch.lastStatus?["persist"] as? [String: Any])?["in_progress_step"])
        return s >= 0 ? s : nil
    }

    func durableStepOf(_ watch: Watch) -> Int? {
        let d = jsonInt((watch.lastStatus?["persist"] as? [String: Any])?["durable_step"])
        return d >= 0 ? d : nil
    }

    /// The job's namespace hosts, which the network faults need.
    func hosts(_ job: LocalJob) throws -> NetnsHosts {
        guard let h = job.hosts else { throw ChaosError(.usage, "network faults need --hosts netns") }
        return h
    }

    /// How long after a recovery is seen under way a second fault may come:
    /// about what the rest of a node's recovery takes here (longer with more state).
    var recoveryWindow: Double { 0.3 + Double(options.stateMB ?? 0) / 200 }

    /// Injects the faults of scenario (or soak fault kind) `name` on `node` /
    /// `worker`, including those that wait for a recovery to be under way.
    /// Returns them in order.
    func inject(_ name: String, job: LocalJob, watch: Watch, shape: Shape, node: Int, worker: Int,
                rng: inout SplitMix64, notes: inout [String]) throws -> [Fault] {
        func other(than n: Int) -> Int { (n + 1 + Int.random(in: 0..<(shape.nodes - 1), using: &rng)) % shape.nodes }
        func delay() -> Double { Double.random(in: 0...recoveryWindow, using: &rng) }
        switch name {
        case "kill-worker", "kill-smp", "kill-node", "kill-coordinator", "hung-worker", "kill-all-workers":
            return [try fault(name, job, node: node, worker: worker)]
        case "kill-worker-mid-copy", "stuck-worker":
            return [Fault(kind: name, target: "n\(node)/w\(worker)", at: monotonicSeconds())]  // the worker does it itself
        case "kill-m-nodes", "kill-m+1-nodes":
            let count = name == "kill-m-nodes" ? shape.m : shape.m + 1
            var victims = Array(0..<shape.nodes)
            victims.shuffle(using: &rng)
            victims = Array(victims.prefix(count)).sorted()
            notes.append("killed \(victims.map { "n\($0)" }.joined(separator: ", "))")
            return try victims.map { try fault("kill-node", job, node: $0, worker: 0) }
        case "kill-everything":
            // Every process of the job at once: the coordinator, then each node's process group (its SMP and workers).
            var f = Fault(kind: name, target: "job", at: monotonicSeconds())
            if let c = job.coordinator { kill(-c.pid, SIGKILL); kill(c.pid, SIGKILL) }
            for smp in job.smps { kill(-smp.pid, SIGKILL); kill(smp.pid, SIGKILL) }
            for n in 0..<shape.nodes { for pid in recordedWorkers(job, node: n) { kill(pid, SIGKILL) } }
            f.stopped = []
            notes.append("SIGKILLed the coordinator and every node (process groups)")
            return [f]
        case "torn-persist":
            // Mid-write: a persist in progress (slowed down), then the node writing it dies.
            guard watch.until(seconds: 120, { inProgressPersist(watch) != nil || watch.ended }), let step = inProgressPersist(watch) else {
                throw ChaosError(.timeout, "no persist in progress was seen")
            }
            watch.sleep(Double.random(in: 0.1...0.5, using: &rng))
            let torn = try fault("kill-node", job, node: node, worker: 0)
            let dir = PersistPathsForChaos.step(job.options.persistDirectory!, step)
            let leftovers = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.hasPrefix(".n\(node).tmp-") }
            notes.append("killed n\(node) while persisting step \(step); its torn part: \(leftovers.isEmpty ? "none left (it had finished)" : leftovers.joined(separator: ", "))")
            // The memory recovery of n\(node) first, then more than memory can take.
            guard watch.until(seconds: 120, { watch.resumed.contains { watch.detectedAt($0) >= torn.at - 1 } || watch.ended }) else {
                throw ChaosError(.unexpectedOutcome, "no recovery from the node killed mid-persist")
            }
            var victims = Array(0..<shape.nodes)
            victims.shuffle(using: &rng)
            victims = Array(victims.prefix(shape.m + 1)).sorted()
            notes.append("then killed \(victims.map { "n\($0)" }.joined(separator: ", "))")
            return [torn] + (try victims.map { try fault("kill-node", job, node: $0, worker: 0) })
        case "corrupt-persisted-file":
            // The newest durable step's parts: a byte flipped in one image, another image cut short (m = 2 damaged).
            guard let step = durableStepOf(watch) else { throw ChaosError(.unexpectedOutcome, "no durable step") }
            let dir = PersistPathsForChaos.step(job.options.persistDirectory!, step)
            var damaged = Array(0..<shape.nodes)
            damaged.shuffle(using: &rng)
            let flipped = damaged[0], cut = damaged[1]
            let image = "\(dir)/n\(flipped)/image.bin"
            guard let h = FileHandle(forUpdatingAtPath: image) else { throw ChaosError(.io, "cannot open \(image)") }
            let size = (try? h.seekToEnd()) ?? 0
            let at = UInt64.random(in: 0..<max(1, size), using: &rng)
            try? h.seek(toOffset: at)
            var byte = (try? h.read(upToCount: 1))?.first ?? 0
            byte ^= 0x10
            try? h.seek(toOffset: at)
            try? h.write(contentsOf: Data([byte]))
            try? h.close()
            let other = "\(dir)/n\(cut)/image.bin"
            let otherSize = ((try? FileManager.default.attributesOfItem(atPath: other))?[.size] as? Int) ?? 0
            guard truncate(other, off_t(otherSize / 2)) == 0 else { throw ChaosError(.io, "cannot truncate \(other)") }
            notes.append("step \(step) on disk: flipped byte \(at) of n\(flipped)'s image, cut n\(cut)'s image to \(otherSize / 2) of \(otherSize) bytes")
            var victims = Array(0..<shape.nodes)
            victims.shuffle(using: &rng)
            victims = Array(victims.prefix(shape.m + 1)).sorted()
            notes.append("killed \(victims.map { "n\($0)" }.joined(separator: ", "))")
            return try victims.map { try fault("kill-node", job, node: $0, worker: 0) }
        case "sigstop-node":
            let smp = job.smps[node]
            let workers = recordedWorkers(job, node: node)
            var f = try fault(name, job, node: node, worker: worker)
            f.stopped = workers + [smp.pid]
            // Wait for the recovery without it (a replacement rebuilt the node), then let it go.
            guard watch.until(seconds: 120, { watch.resumed.contains { watch.detectedAt($0) >= f.at - 1 } || watch.ended }) else {
                throw ChaosError(.unexpectedOutcome, "no recovery while n\(node) was stopped")
            }
            for pid in workers + [smp.pid] { kill(pid, SIGCONT) }
            let fenced = watch.until(seconds: 20) { smp.poll() != nil && workers.allSatisfy { kill($0, 0) != 0 } }
            let status = smp.poll()
            notes.append("continued the old n\(node): its SMP \(status.map { "\($0)" } ?? "still running")")
            guard fenced, status == .exited(3) else {
                throw ChaosError(.unexpectedOutcome, "the continued SMP of n\(node) was not fenced (exit \(status.map { "\($0)" } ?? "none"), want code 3)")
            }
            return [f]
        case "partition-node":
            let h = try hosts(job)
            let host = job.hostOfNode[node] ?? "n\(node)"
            let old = job.smps[node]
            let workers = recordedWorkers(job, node: node)
            var f = Fault(kind: name, target: "n\(node)", at: monotonicSeconds())
            let from = Date()
            try h.setLink(host, up: false)
            // Cut off past the timeout: declared lost, a spare on another host rebuilds it. Then the link comes back.
            let recovered = watch.until(seconds: 120) { watch.resumed.contains { watch.detectedAt($0) >= f.at - 1 } || watch.ended }
            let downFor = monotonicSeconds() - f.at
            try h.setLink(host, up: true)
            f.spans = [(from, Date())]
            guard recovered else { throw ChaosError(.unexpectedOutcome, "no recovery while n\(node)'s host was cut off") }
            notes.append("n\(node)'s link down for \(Int(downFor * 1000)) ms (until its recovery), then up; \(watch.log.last ?? "")")
            let fenced = watch.until(seconds: 30) { old.poll() != nil && workers.allSatisfy { kill($0, 0) != 0 } }
            let status = old.poll()
            notes.append("the old n\(node) after the link came back: its SMP \(status.map { "\($0)" } ?? "still running")")
            guard fenced, status == .exited(3) else {
                throw ChaosError(.unexpectedOutcome, "the cut-off SMP of n\(node) was not fenced once its link was back "
                    + "(exit \(status.map { "\($0)" } ?? "none"), want code 3; workers alive: \(workers.filter { kill($0, 0) == 0 }))")
            }
            let kept = RecordedProcesses.segments(job: job.job).filter { $0.contains("-p\(old.pid)-") }
            guard kept.isEmpty else { throw ChaosError(.unexpectedOutcome, "the fenced SMP of n\(node) left \(kept.count) shared-memory segments") }
            f.cutOff = [old.pid]
            return [f]
        case "partition-coordinator":
            let h = try hosts(job)
            guard let c = job.coordinator else { throw ChaosError(.unexpectedOutcome, "no coordinator") }
            var f = Fault(kind: name, target: "coordinator", at: monotonicSeconds())
            let from = Date()
            try h.setLink("coordinator", up: false)
            watch.sleep(3)
            try h.setLink("coordinator", up: true)
            f.spans = [(from, Date())]
            f.cutOff = [c.pid]
            notes.append("the coordinator's link down for 3 s")
            return [f]
        case "slow-link":
            let h = try hosts(job)
            let host = job.hostOfNode[node] ?? "n\(node)"
            // About what a round of this node's state takes 2 s for (at least 20 Mbit/s): slow, below the timeout.
            let mbit = max(20, shape.workersPerNode * (options.stateMB ?? 0) * 8 / 2)
            var f = Fault(kind: name, target: "n\(node)", at: monotonicSeconds())
            let from = Date()
            try h.throttle(host, megabitsPerSecond: mbit)
            watch.sleep(8)
            try h.throttle(host, megabitsPerSecond: nil)
            f.spans = [(from, Date())]
            notes.append("n\(node)'s link throttled to \(mbit) Mbit/s each way for 8 s")
            return [f]
        case "flapping-link":
            let h = try hosts(job)
            let timeout = Double(job.options.timeoutMs) / 1000
            var f = Fault(kind: name, target: "n\(node)", at: monotonicSeconds())
            var incarnations = Set<Int32>()  // every SMP that was n<node> during the flaps
            var downs: [String] = []
            for _ in 0..<5 {
                let host = job.hostOfNode[node] ?? "n\(node)"
                incarnations.insert(job.smps[node].pid)
                let down = Double.random(in: 0.2 * timeout...2 * timeout, using: &rng)
                let from = Date()
                try h.setLink(host, up: false)
                watch.sleep(down)
                try h.setLink(host, up: true)
                f.spans.append((from, Date()))
                downs.append("\(host) \(Int(down * 1000)) ms")
                watch.sleep(Double.random(in: 0.3...1.5, using: &rng))
            }
            incarnations.insert(job.smps[node].pid)
            notes.append("n\(node)'s link down \(downs.joined(separator: ", ")), up between")
            f.cutOff = incarnations.sorted()
            return [f]
        case "flip-byte":
            return [try flipByte(job, watch: watch, shape: shape, node: node, worker: worker, rng: &rng, notes: &notes)]
        case "coordinator-pause":
            guard let c = job.coordinator else { throw ChaosError(.unexpectedOutcome, "no coordinator") }
            let f = Fault(kind: name, target: "coordinator", at: monotonicSeconds(), stopped: [c.pid])
            kill(c.pid, SIGSTOP)
            watch.sleep(3)
            kill(c.pid, SIGCONT)
            notes.append("coordinator stopped for 3 s")
            return [f]
        case "kill-coordinator-during-recovery", "second-fault-during-recovery":
            // Mostly a node: its recovery has every phase (rebuild included) to land in.
            let first = Int.random(in: 0..<3, using: &rng) < 2 ? "kill-node" : "kill-worker"
            let f1 = try fault(first, job, node: node, worker: worker)
            guard watch.until(seconds: 30, every: 0.01, { watch.state == "recovering" || watch.ended }) else {
                throw ChaosError(.timeout, "no recovery began within 30 s of \(first) n\(node)")
            }
            let d = delay()
            watch.sleep(d)
            let phases = watch.completedPhases
            let f2 = name == "kill-coordinator-during-recovery"
                ? try fault("kill-coordinator", job, node: 0, worker: 0)
                : try fault("kill-worker", job, node: other(than: node), worker: Int.random(in: 0..<shape.workersPerNode, using: &rng))
            notes.append("\(first) \(f1.target), then \(f2.kind) \(f2.target) \(Int(d * 1000)) ms into the recovery "
                + "(state \(watch.state), phases done: \(phases.isEmpty ? "none seen" : phases.joined(separator: ",")))")
            return [f1, f2]
        case "kill-replacement-during-rebuild", "kill-source-during-rebuild":
            let old = job.smps[node].pid
            let f1 = try fault("kill-node", job, node: node, worker: 0)
            guard watch.until(seconds: 30, every: 0.005, { job.smps[node].pid != old || watch.ended }) else {
                throw ChaosError(.timeout, "n\(node) was not replaced within 30 s")
            }
            let d = delay() / 2
            watch.sleep(d)
            let phases = watch.completedPhases
            let victim = name == "kill-replacement-during-rebuild" ? node : other(than: node)
            let f2 = try fault("kill-node", job, node: victim, worker: 0)
            notes.append("killed n\(node), then \(name == "kill-replacement-during-rebuild" ? "its replacement" : "n\(victim)") "
                + "\(Int(d * 1000)) ms after the replacement started (phases done: \(phases.isEmpty ? "none seen" : phases.joined(separator: ",")))")
            return [f1, f2]
        default:
            throw ChaosError(.usage, "no such fault: \(name)")
        }
    }

    /// The workers a node's SMP recorded, still processes of this job.
    func recordedWorkers(_ job: LocalJob, node n: Int) -> [Int32] {
        (0..<job.options.workersPerNode).compactMap { job.workerPID(node: n, worker: $0) }.filter { RecordedProcesses.belongs($0, toJob: job.job) }
    }

    /// One fault by recorded PID: `kill-worker` (worker `w` of node `n`),
    /// `hung-worker` (SIGSTOP it), `kill-smp`, `kill-node` (its process group:
    /// the SMP and its workers at once), `kill-all-workers`,
    /// `kill-coordinator`, or `sigstop-node` (SIGSTOP the SMP and its workers).
    func fault(_ kind: String, _ job: LocalJob, node n: Int, worker w: Int) throws -> Fault {
        let at = monotonicSeconds()
        func worker(_ n: Int, _ w: Int) throws -> Int32 {
            guard let pid = job.workerPID(node: n, worker: w), RecordedProcesses.belongs(pid, toJob: job.job) else {
                throw ChaosError(.unexpectedOutcome, "no live recorded process for n\(n)/w\(w)")
            }
            return pid
        }
        switch kind {
        case "kill-worker":
            kill(try worker(n, w), SIGKILL)
        case "hung-worker":
            let pid = try worker(n, w)
            kill(pid, SIGSTOP)
            return Fault(kind: kind, target: "n\(n)/w\(w)", at: at, stopped: [pid])
        case "kill-smp":
            kill(job.smps[n].pid, SIGKILL)
        case "kill-node":
            kill(-job.smps[n].pid, SIGKILL)  // its process group: the SMP and its workers
            kill(job.smps[n].pid, SIGKILL)
            return Fault(kind: kind, target: "n\(n)", at: at)
        case "kill-all-workers":
            let all = (0..<job.options.nodes).flatMap { recordedWorkers(job, node: $0) }
            for pid in all { kill(pid, SIGKILL) }
            return Fault(kind: kind, target: "\(all.count) workers", at: at)
        case "kill-coordinator":
            guard let c = job.coordinator else { throw ChaosError(.unexpectedOutcome, "no coordinator") }
            c.kill(SIGKILL)
            return Fault(kind: kind, target: "coordinator", at: at)
        case "sigstop-node":
            for pid in recordedWorkers(job, node: n) + [job.smps[n].pid] { kill(pid, SIGSTOP) }
            return Fault(kind: kind, target: "n\(n)", at: at)
        default:
            throw ChaosError(.usage, "no such fault: \(kind)")
        }
        return Fault(kind: kind, target: kind.hasSuffix("smp") ? "n\(n)" : "n\(n)/w\(w)", at: at)
    }

    /// Holds node `node`'s SMP still, corrupts both slots of one of its
    /// workers, kills that worker first (a recovery: the survivors keep their live
    /// state, so only the replacement reads the slots) and lets the SMP go:
    /// the replacement's restore must find the bad chunk, rebuilt from parity.
    func flipByte(_ job: LocalJob, watch: Watch, shape: Shape, node: Int, worker: Int,
                  rng: inout SplitMix64, notes: inout [String]) throws -> Fault {
        let smp = job.smps[node]
        let at = monotonicSeconds()
        kill(smp.pid, SIGSTOP)
        if let pid = job.workerPID(node: node, worker: worker), RecordedProcesses.belongs(pid, toJob: job.job) { kill(pid, SIGKILL) }
        usleep(100_000)
        var flipped = 0
        let prefix = "ft-\(job.job)-n\(node)-p\(smp.pid)-w\(worker)-s"
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
        notes.append("flipped a byte in \(flipped) slots of n\(node)/w\(worker)")
        guard flipped == 2 else { throw ChaosError(.unexpectedOutcome, "found \(flipped) slots of n\(node)/w\(worker) to corrupt, expected 2") }
        // The SMP was held still for the flip: its heartbeat gap then is the fault's own.
        return Fault(kind: "flip-byte", target: "n\(node)/w\(worker)", at: at, stopped: [smp.pid])
    }

    /// "round N committed" lines of every SMP log whose timestamps fall in [from, to).
    func committedRounds(_ job: LocalJob, between from: Date, and to: Date) -> [String] {
        smpLogLines(job).filter { $0.line.hasSuffix("committed") && $0.line.contains(" round ") && $0.at >= from && $0.at < to }.map(\.line)
    }

    /// "first...last (count)" of the round numbers in "round N committed" lines.
    func roundNumbers(_ lines: [String]) -> String {
        let rounds = Set(lines.compactMap { l in l.range(of: " round ").flatMap { Int(l[$0.upperBound...].prefix { $0.isNumber }) } })
        guard let first = rounds.min(), let last = rounds.max() else { return "none" }
        return "\(first)...\(last) (\(rounds.count))"
    }

    /// The staged-to-committed times (ms) SMPs logged in [from, to).
    func commitLatencies(_ job: LocalJob, between from: Date, and to: Date) -> [Double] {
        smpLogLines(job).filter { $0.at >= from && $0.at < to }.compactMap { l in
            l.line.split(separator: " ").first { $0.hasPrefix("staged_to_committed_ms=") }.flatMap { Double($0.dropFirst("staged_to_committed_ms=".count)) }
        }
    }

    /// Every SMP log line (nodes and spares) with its timestamp.
    func smpLogLines(_ job: LocalJob) -> [(at: Date, line: String)] {
        let files = ((try? FileManager.default.contentsOfDirectory(atPath: job.dir)) ?? []).filter { $0.hasSuffix(".log") && $0 != "coordinator.log" }
        let format = ISO8601DateFormatter()
        format.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return files.flatMap { LocalJob.read(job.dir + "/" + $0).split(separator: "\n") }.compactMap { line in
            guard let stamp = line.split(separator: " ").first, let at = format.date(from: String(stamp)) else { return nil }
            return (at, String(line))
        }
    }

    /// What each scenario must show besides the common end checks.
    func scenarioChecks(_ name: String, job: LocalJob, watch: Watch, shape: Shape, node: Int, worker: Int, faults: [Fault],
                        injectedAt: Double, result: inout Result, notes: inout [String]) -> [String] {
        var problems: [String] = []
        let smpLogs = (try? FileManager.default.contentsOfDirectory(atPath: job.dir))?.filter { $0.hasSuffix(".log") }
            .map { LocalJob.read(job.dir + "/" + $0) }.joined(separator: "\n") ?? ""
        let key = "n\(node)/w\(worker)"
        let after = watch.failures.values.filter { watch.detectedAt($0) >= injectedAt - 1 }
        switch name {
        case "flip-byte":
            if !smpLogs.contains("repaired worker") { problems.append("no SMP log says it repaired the corrupt chunk") }
        case "kill-worker-mid-copy":
            if !smpLogs.contains("signal 9") { problems.append("the worker did not die mid-copy (no SIGKILL in the SMP logs)") }
        case "hung-worker":
            let declared = after.contains { $0["what"] as? String == key && ($0["detected_by"] as? String ?? "").contains("heartbeat timeout") }
            if !declared { problems.append("the stopped worker \(key) was not declared dead by heartbeat timeout") }
            if !smpLogs.contains("was declared dead: killing it") { problems.append("its SMP did not kill the stopped worker") }
        case "stuck-worker":
            let log = job.workerLog(node: node, worker: worker)
            guard let line = log.split(separator: "\n").first(where: { $0.contains("fault injection: hanging in step") }),
                  let hungAt = line.split(separator: " ").last.flatMap({ Double($0) }) else {
                problems.append("worker \(key) never hung (no fault injection line in its log)")
                break
            }
            guard let f = after.first(where: { ($0["detected_by"] as? String ?? "").contains("watchdog") }) else {
                problems.append("the step-progress watchdog declared nothing")
                break
            }
            let by = f["detected_by"] as? String ?? ""
            if f["what"] as? String != key { problems.append("the watchdog named \(f["what"] ?? "?"), not the stuck \(key): \(by)") }
            result.detectMs = (watch.detectedAt(f) - hungAt) * 1000
            let boundMs = by.range(of: "(bound ").flatMap { Int(by[$0.upperBound...].prefix { $0.isNumber }) } ?? 0
            notes.append("stuck \(key) detected \(Int(result.detectMs)) ms after it hung (watchdog bound \(boundMs) ms)")
            if result.detectMs > Double(boundMs) + 1000 {
                problems.append("detected \(Int(result.detectMs)) ms after the hang, more than the bound \(boundMs) ms + 1 s")
            }
            let stacks = (try? FileManager.default.contentsOfDirectory(atPath: job.dir + "/stacks")) ?? []
            let saved = stacks.filter { $0.hasPrefix("n\(node)-w\(worker)-") }.map { LocalJob.read(job.dir + "/stacks/" + $0) }
            if !saved.contains(where: { $0.contains("hangForever") }) {
                problems.append("no stack of \(key) showing hangForever in \(job.dir)/stacks (\(stacks))")
            } else {
                notes.append("its stack was saved to stacks/\(stacks.first { $0.hasPrefix("n\(node)-w\(worker)-") } ?? "?")")
            }
        case "partition-node":
            // Checked where the fault was injected (fenced, exited 3, memory freed): only what the others must not see.
            break
        case "partition-coordinator":
            guard let f = faults.first, let span = f.spans.first else { break }
            let during = committedRounds(job, between: span.from.addingTimeInterval(0.1), and: span.to)
            if !during.isEmpty { problems.append("\(during.count) round(s) committed while the coordinator was cut off: \(during.prefix(3))") }
            let pids = Set(watch.failures.values.map { jsonInt($0["coordinator_pid"]) }.filter { $0 > 0 })
            let coordinators = (job.coordinator.map { [$0.pid] } ?? []) + f.cutOff
            if Set(coordinators).count != 1 || pids.contains(where: { $0 != Int(f.cutOff[0]) }) {
                problems.append("a second coordinator acted (pids \(Set(coordinators).sorted()), failures recorded by \(pids.sorted()))")
            }
            let declared = after.filter { ($0["kind"] as? String) != "coordinator" }
            notes.append((declared.isEmpty ? "no failure declared" : "declared \(declared.count) failure(s): \(declared.map { "\($0["what"] ?? "?")" })")
                + "; rounds \(roundNumbers(committedRounds(job, between: span.to, and: Date.distantFuture))) committed after")
        case "slow-link":
            guard let span = faults.first?.spans.first else { break }
            if !after.isEmpty { problems.append("a slow link was declared a failure: \(after.map { "\($0["what"] ?? "?") (\($0["detected_by"] ?? "?"))" })") }
            let before = commitLatencies(job, between: span.from.addingTimeInterval(-8), and: span.from)
            let slowed = commitLatencies(job, between: span.from.addingTimeInterval(0.5), and: span.to)
            let (b, s) = (percentile(before, 0.5), percentile(slowed, 0.5))
            notes.append("median commit \(String(format: "%.1f", b)) ms before, \(String(format: "%.1f", s)) ms while throttled (\(slowed.count) rounds)")
            if slowed.isEmpty { problems.append("no round committed while the link was throttled") }
            else if !(s > b) { problems.append("rounds did not commit more slowly while throttled (\(b) ms before, \(s) ms during): the throttle did not act") }
        case "flapping-link":
            guard let f = faults.first else { break }
            // Each incarnation of the node: replaced and then fenced (it ended with code 3), or kept to the end. Never both.
            let current = job.smps[node].pid
            var fates: [String] = []
            for pid in f.cutOff {
                let process = (job.smps + job.retired).first { $0.pid == pid }
                let exit = process?.poll()
                let kept = pid == current
                fates.append("pid \(pid): \(kept ? "kept" : "replaced"), \(exit.map { "\($0)" } ?? "running")")
                if !kept && exit != .exited(3) {
                    problems.append("n\(node)'s SMP pid \(pid) was replaced yet not fenced (\(exit.map { "\($0)" } ?? "still running"), want exit 3)")
                }
                if kept && exit != .exited(0) {
                    problems.append("n\(node)'s SMP pid \(pid) was kept yet did not end with the job (\(exit.map { "\($0)" } ?? "still running"))")
                }
            }
            notes.append("incarnations of n\(node): " + fates.joined(separator: "; "))
        case "coordinator-pause":
            let declared = after.filter { ($0["kind"] as? String) != "coordinator" }
            notes.append(declared.isEmpty ? "no failure declared" : "declared \(declared.count) failure(s): \(declared.map { "\($0["what"] ?? "?")" })")
        case "kill-all-workers":
            let stopped = after.contains { ($0["outcome"] as? String ?? "").contains("in a row") }
            if stopped { problems.append("killing every worker was counted as many failures in a row") }
            notes.append("\(after.count) failure records, \(watch.resumed.filter { watch.detectedAt($0) >= injectedAt - 1 }.count) resumed")
        default:
            break
        }
        return problems
    }
}
