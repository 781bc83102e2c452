import FTCore
import FTPersist
import FTSystem
import Foundation

/// The chaos harness behind `chaos/run` (`ft-chaos`): each scenario starts a
/// real local job (coordinator, SMPs, demo-trainer workers, optionally with
/// `stateMB` of synthetic state per worker), injects its faults at seeded
/// random moments (anywhere in the job, and during recoveries for the
/// scenarios that say so), keeps the job whole the way the launcher does
/// (`Supervisor`), and checks the end against a golden uninterrupted run of
/// the same shape: final parameter hash equal on every worker, steps lost per
/// failure within the documented bound, every failure resumed (or, for
/// `kill-m+1-nodes`, the clean stop with its report and nothing resumed), no
/// recovery that restored nothing once a step had been committed, and nothing
/// left behind (recorded processes, shared-memory segments). Processes are
/// signalled only by their recorded PIDs.
public final class ChaosRunner: @unchecked Sendable {
    public struct Options: Sendable {
        public var binaries: String
        public var workDirectory: String
        public var steps = 400
        public var snapshotInterval = 1
        /// Synthetic state of this many MiB per worker (`ft-demo-trainer --synthetic`); nil: the char LM.
        public var stateMB: Int?
        /// Simulated compute per step with synthetic state (ms).
        public var stepMs = 10.0
        /// The workload: the demo trainer, or the PyTorch example (`--worker torch`).
        public var worker = ChaosWorker.demo
        public var keepDirectories = false
        /// The persistent tier for every scenario's job: persist every this
        /// many committed steps into RUN_DIR/persist (nil: off; the disk
        /// scenarios, `diskScenarios`, use it with a default of steps / 10).
        /// With it, `kill-m+1-nodes` must resume from disk, bit-exact.
        public var persistEvery: Int?
        /// SMP data planes on `tcp://dataHost:*` with CURVE instead of ipc (`LocalJob.Options.dataHost`).
        public var dataHost: String?
        /// Every node, spare and the coordinator on a network-namespace host of its own (`LocalJob.Options.netns`);
        /// the network scenarios (`networkScenarios`) need it.
        public var netns = false
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
        /// First fault injected to the job running again (the last recovery, if several).
        public var recoveryMs: Double = -1
        /// First fault injected to the coordinator declaring it.
        public var detectMs: Double = -1
        public var failures = 0
        public var faults = 0
        /// The step every resumed recovery restored (-1: the initial state).
        public var restoredSteps: [Int] = []
        /// Largest heartbeat gap per process kind (ms; -1: none logged).
        public var heartbeatGaps: [String: Int] = [:]
        public var detail = ""
        public var seconds = 0.0

        public var json: [String: Any] {
            ["name": name, "passed": passed, "final_hash_equal": finalHashEqual.map { $0 as Any } ?? NSNull(),
             "steps_lost": stepsLost, "recovery_ms": (recoveryMs * 10).rounded() / 10, "detect_ms": (detectMs * 10).rounded() / 10,
             "seed": seed, "failures": failures, "faults": faults, "restored_steps": restoredSteps,
             "heartbeat_gap_ms": heartbeatGaps, "detail": detail, "seconds": (seconds * 10).rounded() / 10]
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
        ("sigstop-node", "SIGSTOP a node past the timeout (the launcher may not kill it: a zombie); after the recovery SIGCONT it: it must be fenced"),
        ("kill-coordinator", "SIGKILL the coordinator; the launcher restarts it and it rebuilds its view"),
        ("flip-byte", "kill a worker and flip a byte in both its stored slots: its replacement's restore repairs it from parity"),
        ("coordinator-pause", "SIGSTOP the coordinator for 3 s, then SIGCONT: no false failure, or nothing lost"),
        ("kill-coordinator-during-recovery", "SIGKILL a node or a worker, then the coordinator at a random moment of the recovery"),
        ("hung-worker", "SIGSTOP one worker: declared dead by timeout, killed by its SMP, replaced"),
        ("stuck-worker", "a worker hangs in a step with its heartbeats alive: the step-progress watchdog names it, saves its stack, replaces it"),
        ("kill-replacement-during-rebuild", "SIGKILL a node, then its replacement while it rebuilds"),
        ("kill-source-during-rebuild", "RS(2+2): SIGKILL a node, then another (a source of the rebuild) while it rebuilds"),
        ("second-fault-during-recovery", "SIGKILL a node or a worker, then a worker of another node at a random moment of the recovery"),
        ("kill-all-workers", "4 nodes x 3 workers: SIGKILL every worker of the job at once: one failure event"),
        ("partition-node", "--hosts netns: a node's link down past the timeout (a spare takes over), then up: the old incarnation is fenced, exits, frees its memory"),
        ("partition-coordinator", "--hosts netns: the coordinator's link down for 3 s: nothing commits, no second coordinator; then the job goes on"),
        ("slow-link", "--hosts netns: a node's link throttled (tbf) for 8 s: no false failure, rounds commit more slowly, the result is equal"),
        ("flapping-link", "--hosts netns: a node's link down 5 times for 0.2-2x the timeout, up between: each time the node is kept or cleanly replaced, never both"),
        ("kill-everything", "persistence on: SIGKILL every process of the job (coordinator, SMPs, workers) once a step is durable, then a cold restart from disk (--resume): bit-exact"),
        ("torn-persist", "RS(2+2), persistence on and slow: SIGKILL a node while it writes its part (left torn), then 3 nodes (beyond memory): resumed from the newest durable step, bit-exact"),
        ("corrupt-persisted-file", "RS(2+2), persistence on: flip a byte in one node's persisted image and cut another's short, then SIGKILL 3 nodes: the damaged parts are decoded from the others, bit-exact"),
    ]

    /// The scenarios that need the persistent tier (on by default for them).
    public static let diskScenarios: Set<String> = ["kill-everything", "torn-persist", "corrupt-persisted-file"]

    /// The scenarios that act on the network: they need `Options.netns`.
    public static let networkScenarios: Set<String> = ["partition-node", "partition-coordinator", "slow-link", "flapping-link"]

    /// The scenarios a runner with these options runs by default: the network ones only on namespace hosts.
    public static func matrix(netns: Bool) -> [String] {
        scenarios.map(\.name).filter { netns || !networkScenarios.contains($0) }
    }

    /// The CI smoke subset: one of each kind of fault, a few minutes in all.
    public static let smoke = ["kill-worker", "kill-worker-mid-copy", "kill-node", "sigstop-node", "kill-coordinator", "kill-m+1-nodes",
                               "coordinator-pause", "hung-worker", "stuck-worker", "kill-coordinator-during-recovery", "kill-all-workers",
                               "kill-everything", "corrupt-persisted-file"]

    /// What the soak draws from: every fault kind that keeps the job recoverable.
    static let soakKinds = ["kill-worker", "kill-smp", "kill-node", "kill-coordinator", "sigstop-node", "coordinator-pause",
                            "hung-worker", "kill-all-workers", "kill-coordinator-during-recovery", "kill-replacement-during-rebuild",
                            "second-fault-during-recovery", "stuck-worker", "kill-worker-mid-copy"]

    public let options: Options
    private var goldens: [Shape: [String]] = [:]
    private var runCounter = 0
    /// The namespaces of the scenario job running now (to check that none outlives it).
    private var namespaces: [String] = []

    public init(_ options: Options) throws {
        self.options = options
        try FileManager.default.createDirectory(atPath: options.workDirectory, withIntermediateDirectories: true)
    }

    /// The shape of `scenario`'s job for this runner's workload.
    func jobShape(for scenario: String, steps: Int) -> Shape { options.worker.adjust(Self.shape(for: scenario, steps: steps)) }

    static func shape(for scenario: String, steps: Int) -> Shape {
        if scenario.hasPrefix("kill-m") || scenario == "kill-source-during-rebuild" || scenario == "torn-persist" || scenario == "corrupt-persisted-file" {
            return Shape(nodes: 4, workersPerNode: 1, k: 2, m: 2, steps: steps)
        }
        if scenario == "kill-all-workers" { return Shape(nodes: 4, workersPerNode: 3, k: 3, m: 1, steps: steps) }
        return Shape(nodes: 4, workersPerNode: 2, k: 3, m: 1, steps: steps)
    }

    /// The worker command: the char LM, or synthetic state of `stateMB` MiB.
    var workerCommand: (Int) -> [String] {
        { [options] steps in
            if let torch = options.worker.command(steps: steps) { return torch }
            var c = [options.binaries + "/ft-demo-trainer", "--steps", "\(steps)", "--report-every", "100"]
            if let mb = options.stateMB { c += ["--synthetic", "--state-mb", "\(mb)", "--step-ms", "\(options.stepMs)"] }
            return c
        }
    }

    private func jobOptions(_ shape: Shape, tag: String, environment: [String: String] = [:], spares: Int = 0) -> LocalJob.Options {
        runCounter += 1
        let id = "ch\(getpid())x\(runCounter)"
        var o = LocalJob.Options(binaries: options.binaries, runDirectory: options.workDirectory + "/\(runCounter)-\(tag)", jobID: id)
        o.nodes = shape.nodes
        o.workersPerNode = shape.workersPerNode
        o.erasure = (shape.k, shape.m)
        o.snapshotInterval = options.snapshotInterval
        o.environment = environment
        o.workerCommand = workerCommand(shape.steps)
        o.dataHost = options.dataHost
        o.netns = options.netns
        o.spares = spares
        options.worker.configure(&o)
        if let every = persistEvery(for: tag) {
            o.persistDirectory = o.runDirectory + "/persist"
            o.persistEvery = every
            o.persistKeep = 2
        }
        return o
    }

    /// Persist cadence of a scenario's job (nil: none). The golden run needs none:
    /// persisting does not change what training computes.
    func persistEvery(for scenario: String) -> Int? {
        guard scenario != "golden" else { return nil }
        if let every = options.persistEvery { return every }
        return Self.diskScenarios.contains(scenario) ? max(5, options.steps / 10) : nil
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

    /// The golden hashes of `shape`, one per worker in rank order: an
    /// uninterrupted run, made once. (The char LM's ranks end equal; synthetic
    /// state keeps a per-rank RNG, so its ranks end different.)
    func golden(_ shape: Shape) throws -> [String] {
        if let g = goldens[shape] { return g }
        options.progress("golden run: \(shape.nodes) nodes x \(shape.workersPerNode) workers, RS(\(shape.k)+\(shape.m)), \(shape.steps) steps"
            + (options.stateMB.map { ", \($0) MiB of state per worker" } ?? ""))
        let job = try LocalJob(jobOptions(shape, tag: "golden"))
        defer { job.stop(removeFiles: !options.keepDirectories) }
        let started = monotonicSeconds()
        while job.coordinator?.poll() == nil {
            if monotonicSeconds() - started > 1800 { throw ChaosError(.timeout, "the golden run did not end in 1800 s:\n\(job.logs.suffix(2000))") }
            usleep(100_000)
        }
        let hashes = Self.finalHashes(job, steps: shape.steps).compactMap { $0 }
        guard hashes.count == shape.nodes * shape.workersPerNode else {
            throw ChaosError(.unexpectedOutcome, "the golden run did not end with a final hash on every worker (\(hashes)):\n\(job.logs.suffix(2000))")
        }
        goldens[shape] = hashes
        return hashes
    }

    /// Why a scenario or the soak did not pass, or could not run.
    public typealias ChaosError = CodedMessage<ChaosErrorCode>

    public enum ChaosErrorCode: String, Sendable {
        /// An unknown scenario or fault, or one the worker command cannot take.
        case usage
        /// What the harness waited for (a start, a recovery, the end) did not come in time.
        case timeout
        /// The job did something other than the scenario expects.
        case unexpectedOutcome = "unexpected_outcome"
        /// A file the harness needs could not be made.
        case io
    }

    /// Runs one scenario by name with `seed`.
    public func run(_ name: String, seed: UInt64) -> Result {
        var result = Result(name: name, seed: seed)
        let started = monotonicSeconds()
        namespaces = []
        do {
            try runScenario(name, seed: seed, into: &result)
        } catch {
            result.passed = false
            result.detail = "\(error)"
        }
        // The job has been stopped: its hosts must be gone with it.
        let left = namespaces.filter { FileManager.default.fileExists(atPath: "/run/netns/" + $0) }
        if !left.isEmpty {
            result.passed = false
            result.detail += "; network namespaces left after the job: \(left)"
        }
        result.seconds = monotonicSeconds() - started
        return result
    }

    private func runScenario(_ name: String, seed: UInt64, into result: inout Result) throws {
        guard Self.scenarios.contains(where: { $0.name == name }) else {
            throw ChaosError(.usage, "unknown scenario \(name) (known: \(Self.scenarios.map(\.name).joined(separator: ", ")))")
        }
        guard options.netns || !Self.networkScenarios.contains(name) else {
            throw ChaosError(.usage, "\(name) acts on a host's network link: it needs --hosts netns")
        }
        guard options.worker.supports(name) else {
            throw ChaosError(.usage, "\(name) needs the demo trainer (its fault is injected by the worker itself)")
        }
        var rng = SplitMix64(seed: seed)
        let shape = jobShape(for: name, steps: options.steps)
        // The clean stop has no final state to compare: no golden run for it.
        let cleanStop = name == "kill-m+1-nodes" && persistEvery(for: name) == nil
        let expected = cleanStop ? [] : try golden(shape)
        // The moment of the fault: any step from early on to near the end.
        let target = Int.random(in: max(5, shape.steps / 20)...shape.steps * 9 / 10, using: &rng)
        let node = Int.random(in: 0..<shape.nodes, using: &rng)
        let worker = Int.random(in: 0..<shape.workersPerNode, using: &rng)
        let rank = node * shape.workersPerNode + worker
        var environment: [String: String] = [:]
        if name == "kill-worker-mid-copy" {
            environment["FT_FAULT_KILL_MID_COPY_STEP"] = "\(target)"
            environment["FT_FAULT_RANK"] = "\(rank)"
        }
        if name == "stuck-worker" {
            environment["FT_FAULT_HANG_STEP"] = "\(target)"
            environment["FT_FAULT_RANK"] = "\(rank)"
        }
        options.progress("\(name) (seed \(seed)): fault around step \(target), node n\(node), worker w\(worker)")
        // A node cut off is taken over by a spare on another host (its own cannot be reached).
        let spares = name == "partition-node" || name == "flapping-link" ? 1 : 0
        var jobOptions = jobOptions(shape, tag: name, environment: environment, spares: spares)
        if name == "torn-persist" {
            // Slow enough that a node's part takes about a second to write: the kill lands mid-write.
            let imageMB = Double(shape.workersPerNode) * Double(options.stateMB ?? 1)
            jobOptions.persistMbps = max(0.2, imageMB / 1.0)
        }
        var job = try LocalJob(jobOptions)
        namespaces = job.hosts?.hosts.values.map(\.namespace).sorted() ?? []
        var watch = Watch(job: job)
        // A SIGSTOPped or cut-off node stands for one the launcher cannot reach: left alive, to be fenced.
        watch.supervisor.killDeclaredDead = !["sigstop-node", "partition-node", "flapping-link"].contains(name)
        var keep = true  // a run that throws keeps its logs; a passed one follows --keep
        defer { job.stop(removeFiles: !keep) }
        // A cold restart's first job: its run directory holds the persist directory the second reads.
        var coldRestartedRunDirectory: String?
        defer { if !keep, let dir = coldRestartedRunDirectory { try? FileManager.default.removeItem(atPath: dir) } }
        let persisting = persistEvery(for: name) != nil

        // A worker that faults by itself does it at `target`: watch from a little before.
        let selfInflicted = name == "kill-worker-mid-copy" || name == "stuck-worker"  // the worker picks its moment
        let watchFrom = selfInflicted ? target - 2 : target
        guard watch.until(seconds: 600, { watch.furthestStep >= watchFrom - 1 || watch.ended }) else {
            throw ChaosError(.timeout, "the job never reached step \(watchFrom - 1)")
        }
        let stepStarted = monotonicSeconds()
        guard watch.until(seconds: 600, { watch.furthestStep >= watchFrom || watch.ended }) else {
            throw ChaosError(.timeout, "the job never reached step \(watchFrom)")
        }
        guard !watch.ended else { throw ChaosError(.unexpectedOutcome, "the job ended before step \(watchFrom):\n\(job.logs.suffix(1500))") }
        if !selfInflicted {
            // Seen at a step boundary (status is polled): move the fault to a moment
            // drawn uniformly over the next step (its compute, update, snapshot round).
            let stepSeconds = min(monotonicSeconds() - stepStarted, 5)
            watch.sleep(Double.random(in: 0..<max(stepSeconds, 0.001), using: &rng))
        }
        // On namespace hosts every peer is another host: no socket of the job may be on loopback.
        let loopback = options.netns
            ? job.leftovers().pids.flatMap { pid in NetnsHosts.loopbackSockets(namespaceOf: pid).map { "pid \(pid): \($0)" } } : []
        let injectedAt = monotonicSeconds()
        var notes: [String] = []
        let resumeLinesBefore = countLines(job, prefix: "resume from=")
        var reachedBeforeColdRestart: Int?
        if persisting, Self.diskScenarios.contains(name) || name == "kill-m+1-nodes" {
            // The fault needs the disk: wait until a step is durable there.
            guard watch.until(seconds: 600, { durableStep(watch) != nil || watch.ended }), !watch.ended else {
                throw ChaosError(.timeout, "no step became durable on disk before the job ended")
            }
        }
        let faults = try inject(name, job: job, watch: watch, shape: shape, node: node, worker: worker, rng: &rng, notes: &notes)
        result.faults = faults.count
        if name == "kill-everything" {
            // Every process is gone: a cold restart from the persist directory, as `ft-launch start --resume` does it.
            let durable = durableStep(watch)
            reachedBeforeColdRestart = watch.furthestStep
            job.stop(removeFiles: false)
            coldRestartedRunDirectory = job.options.runDirectory
            let dir = job.options.persistDirectory!
            let plan = try ResumePlan.choose(root: dir, nodes: shape.nodes, erasure: (shape.k, shape.m))
            notes.append("cold restart from step \(plan.step) (the coordinator last said durable: \(durable.map(String.init) ?? "none"))")
            var again = job.options
            again.runDirectory = job.options.runDirectory + "-resumed"
            again.jobID = job.options.jobID + "r"
            again.resumeStep = plan.step
            again.persistDirectory = dir
            job = try LocalJob(again)
            watch = Watch(job: job)
        }

        guard watch.until(seconds: 1800, every: 0.1, { watch.ended }) else {
            throw ChaosError(.timeout, "the job did not end within 1800 s of the fault")
        }
        let final = watch.finalStatus
        watch.merge(final)
        result.failures = watch.failures.count
        result.heartbeatGaps = Self.heartbeatGaps(job, excluding: Set(faults.flatMap(\.stopped)))
        let finalCoordinator = jsonInt(final["coordinator_pid"])

        if cleanStop {
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
            result.finalHashEqual = hashes == expected
            let resumed = watch.resumed.filter { watch.detectedAt($0) >= injectedAt - 1 }
            result.stepsLost = resumed.reduce(0) { $0 + max(0, jsonInt($1["steps_lost"])) }
            if let reached = reachedBeforeColdRestart, let restored = resumed.first.map({ jsonInt($0["restored_step"]) }) {
                // The new coordinator knows only the restored step: the steps lost are those the killed job had reached past it.
                result.stepsLost = max(0, reached - restored)
            }
            result.restoredSteps = resumed.map { jsonInt($0["restored_step"]) }
            if !selfInflicted, let first = watch.failures.values.map(watch.detectedAt).filter({ $0 >= injectedAt - 1 }).min() {
                result.detectMs = (first - injectedAt) * 1000
            }
            if let last = resumed.last {
                let phases = ((last["phases"] as? [[String: Any]]) ?? []).map { p in
                    "\(p["phase"] ?? "?") \(Int((p["ms"] as? Double) ?? Double(jsonInt(p["ms"]))))"
                }
                notes.append("last recovery (ms): " + phases.joined(separator: ", "))
                let recoveryMs = (last["recovery_ms"] as? Double) ?? Double(jsonInt(last["recovery_ms"]))
                result.recoveryMs = selfInflicted ? recoveryMs : (watch.detectedAt(last) - injectedAt) * 1000 + recoveryMs
            }
            let fromDisk = Self.diskScenarios.contains(name) || name == "kill-m+1-nodes"
            var problems = endProblems(hashes: hashes, expected: expected, watch: watch, resumed: resumed, finalCoordinator: finalCoordinator,
                                       lostBound: fromDisk ? persistBound(name) : nil)
            if resumed.isEmpty && !["coordinator-pause", "partition-coordinator", "slow-link", "flapping-link"].contains(name) {
                problems.append("no failure was detected and resumed from")
            }
            problems += scenarioChecks(name, job: job, watch: watch, shape: shape, node: node, worker: worker, faults: faults,
                                       injectedAt: injectedAt, result: &result, notes: &notes)
            if !loopback.isEmpty { problems.append("sockets on loopback on namespace hosts: \(loopback.prefix(5))") }
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

    /// The checks every run that should end like its golden run shares: equal
    /// final hashes, no failure left unresumed (a recovery a killed
    /// coordinator left in progress is taken over by its successor), steps
    /// lost within the documented bound, and no recovery that restored
    /// nothing once a committed step existed.
    func endProblems(hashes: [String?], expected: [String], watch: Watch, resumed: [[String: Any]], finalCoordinator: Int,
                     lostBound: Int? = nil) -> [String] {
        var problems: [String] = []
        if hashes != expected { problems.append("final hashes \(hashes.map { $0 ?? "none" }) != golden \(expected)") }
        let unfinished = watch.failures.values.filter {
            let o = $0["outcome"] as? String ?? ""
            let orphan = o == "in progress" && jsonInt($0["coordinator_pid"]) != finalCoordinator
            return o != "resumed" && !o.hasPrefix("superseded") && !orphan
        }
        if !unfinished.isEmpty { problems.append("failures not resumed: \(unfinished.map { "\($0["what"] ?? "?"): \($0["outcome"] ?? "?")" })") }
        let bound = lostBound ?? 2 * options.snapshotInterval - 1
        let worstLost = resumed.map { jsonInt($0["steps_lost"]) }.max() ?? 0
        if worstLost > bound {
            problems.append("a failure lost \(worstLost) steps (> " + (lostBound == nil ? "2 × snapshot interval − 1" : "the persist bound") + " = \(bound))")
        }
        if let firstCommit = watch.firstCommitSeenAt {
            let fresh = resumed.filter { watch.detectedAt($0) > firstCommit && jsonInt($0["restored_step"]) < 0 }
            if !fresh.isEmpty {
                problems.append("\(fresh.count) recover\(fresh.count == 1 ? "y" : "ies") restarted training from step 0 while a committed step existed")
            }
        }
        return problems
    }

    /// The newest durable step the coordinator reported (nil: none yet).
    func durableStep(_ watch: Watch) -> Int? {
        let d = jsonInt((watch.lastStatus?["persist"] as? [String: Any])?["durable_step"])
        return d >= 0 ? d : nil
    }

    /// Steps a recovery from disk may lose: those since the durable step,
    /// at most two persist periods (one being written when the fault came)
    /// and the rounds skipped while it was written.
    func persistBound(_ name: String) -> Int { 2 * (persistEvery(for: name) ?? 0) + 4 * options.snapshotInterval + 8 }

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

    func percentile(_ values: [Double], _ p: Double) -> Double {
        guard !values.isEmpty else { return 0 }
        let s = values.sorted()
        return s[min(s.count - 1, Int(Double(s.count - 1) * p + 0.5))]
    }
}
