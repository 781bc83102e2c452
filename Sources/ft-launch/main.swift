import ArgumentParser
import FTLauncher
import FTPersist
import FTSystem
import Foundation

struct Launch: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ft-launch",
        abstract: "Start a local fault-tolerant training job, stop one, or run the demo.",
        subcommands: [Start.self, Stop.self, Demo.self])
}

/// Where this binary's siblings (ft-coordinator, ft-smp, ft-demo-trainer) are.
nonisolated var binaries: String { executableDirectory }

nonisolated func say(_ line: String) { FileHandle.standardOutput.write(Data((line + "\n").utf8)) }

struct Start: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a job from a config file and/or flags, keep it whole until it ends (cluster/launch).",
        discussion: """
            Every node runs locally as its own process group (its SMP and the SMP's workers) on loopback; the \
            coordinator too. With --hosts netns (root), every node, every spare and the coordinator runs on a host of \
            its own: a network namespace with its own address on a bridge; traffic between them crosses veth links, \
            and each SMP serves its data plane on its host's address. The namespaces, links and bridge are recorded \
            in RUN_DIR/netns and removed when the job ends, when it is stopped, and by cluster/stop RUN_DIR after a \
            launcher that died. With --hosts slurm, inside a Slurm allocation (cluster/slurm/ft-job.sbatch), the \
            coordinator runs here on the batch host and every node and spare is a job step of its own (srun) on a \
            host of the allocation, which must have one host per node and per spare; the run directory (default \
            SLURM_SUBMIT_DIR/ft-job-slurmJOBID) must be on a filesystem every host sees. The launcher generates the job's CURVE keys, starts the coordinator, the SMPs and any \
            spares, waits until the job runs, prints where the logs are, then stays in the foreground: it starts a \
            replacement for a node the coordinator declared lost (a spare while one is left, otherwise the node's SMP \
            restarted empty; either rebuilds from parity) and restarts a dead coordinator. It ends with the job: \
            exit status 0 when the job completed, 1 when it stopped as failed. Ctrl-C (or SIGTERM, or \
            `cluster/stop RUN_DIR` from elsewhere) ends every process of the job, by recorded PID.

            Config file keys (key = value, # comments; flags override them): nodes, workers_per_node, ec (K+M or \
            none), spares, snapshot_interval, steps, worker_command, port, run_dir, job_id, heartbeat_ms, timeout_ms, \
            phase_timeout, memory_limit, data_host, hosts (local, netns or slurm), metrics, node_failures_per_day, \
            persist_dir, persist_every, persist_seconds, persist_keep, persist_mbps.
            See cluster/example.conf.

            The persistent tier: with --persist-dir (a node-local disk or a shared filesystem) every SMP writes its \
            part of a committed step there every --persist-every steps (default 100) and/or --persist-seconds, in the \
            background. `--resume DIR` starts a job whose processes are all gone from the newest durable step in DIR \
            that reads back whole (same node count and EC code; each node's part CRC-checked, decoded from its \
            group's parity where damaged; an older durable step when a newer one cannot be loaded), and goes on \
            persisting there.
            """)

    @Option(help: "A config file (key = value lines).")
    var config: String?

    @Option(help: "Nodes (default 4).")
    var nodes: Int?

    @Option(help: "Workers per node (default 2).")
    var workersPerNode: Int?

    @Option(help: "Erasure coding across nodes, K+M or none (default 3+1).")
    var ec: String?

    @Option(help: "Spare SMPs in standby (default 0; needs ec).")
    var spares: Int?

    @Option(help: "Snapshot every this many steps (default 1).")
    var snapshotInterval: Int?

    @Option(help: "Steps, for the default worker command (default 2000).")
    var steps: Int?

    @Option(help: "The coordinator's loopback port (default: a free one).")
    var port: Int?

    @Option(help: "Run directory (default /tmp/ft-job-JOB).")
    var runDir: String?

    @Option(help: "Job id (default: job<pid>).")
    var jobId: String?

    @Option(help: "Heartbeat interval in milliseconds (default 100).")
    var heartbeatMs: Int?

    @Option(help: "Silence after which a process is dead, in milliseconds (default 500).")
    var timeoutMs: Int?

    @Option(help: "The floor of a recovery phase's deadline in seconds (default 5; give 60 for PyTorch workers, whose restart rebuilds the process group).")
    var phaseTimeout: Double?

    @Option(help: ArgumentHelp("Shared memory per node for snapshot slots, e.g. 8G or 512M (default: the SMP's, derived from the machine). A job whose workers do not fit stops at once, saying what they need.", valueName: "size"))
    var memoryLimit: String?

    @Option(help: ArgumentHelp("Serve each SMP's data plane (EC chunks, rebuild fetches, DP slices) on tcp://ADDRESS:* with CURVE, as nodes on separate hosts must, instead of a private ipc socket per SMP.", valueName: "address"))
    var dataHost: String?

    @Option(help: ArgumentHelp("Where the job's processes run: local (one host, loopback; default), netns (every node, spare and the coordinator on a network-namespace host of its own, with its own address; needs root), or slurm (inside a Slurm allocation: a job step per node and spare, one host each).", valueName: "local|netns|slurm"))
    var hosts: String?

    @Option(help: ArgumentHelp("The persistent tier: every SMP writes its part of a committed step under this directory (node-local or shared), in the background (default: off).", valueName: "dir"))
    var persistDir: String?

    @Option(help: "Persist every this many committed steps (default 100 when --persist-dir is given without --persist-seconds).")
    var persistEvery: Int?

    @Option(help: "Persist once this many seconds passed since the last persist.")
    var persistSeconds: Double?

    @Option(help: ArgumentHelp("A cold restart: load the newest durable step in this persist directory that reads back whole, and go on from it (the same node count and EC code as when it was written). Persisting goes on into it.", valueName: "dir"))
    var resume: String?

    @Option(help: "Seconds to wait for the job to start running.")
    var startTimeout = 120.0

    @Argument(parsing: .postTerminator, help: "The worker command, after -- (default: ft-demo-trainer --steps STEPS).")
    var workerCommand: [String] = []

    func validate() throws { _ = try resolved() }

    func resolved() throws -> ClusterConfig {
        var c = ClusterConfig()
        do {
            if let config {
                guard let text = try? String(contentsOfFile: config, encoding: .utf8) else {
                    throw ValidationError("cannot read the config file \(config)")
                }
                try c.apply(file: text, name: config)
            }
            if let nodes { c.nodes = nodes }
            if let workersPerNode { c.workersPerNode = workersPerNode }
            if let ec { c.erasure = try ClusterConfig.ErasureCode.parse(ec) }
            if let spares { c.spares = spares }
            if let snapshotInterval { c.snapshotInterval = snapshotInterval }
            if let steps { c.steps = steps }
            if let port { c.port = port }
            if let runDir { c.runDirectory = runDir }
            if let jobId { c.jobID = jobId }
            if let heartbeatMs { c.heartbeatMs = heartbeatMs }
            if let timeoutMs { c.timeoutMs = timeoutMs }
            if let phaseTimeout { c.phaseTimeout = phaseTimeout }
            if let memoryLimit {
                guard let v = ClusterConfig.parseBytes(memoryLimit) else {
                    throw ValidationError("--memory-limit must be a positive size in bytes (e.g. 8G, 512M), not '\(memoryLimit)'")
                }
                c.memoryLimit = v
            }
            if let dataHost { c.dataHost = dataHost }
            if let hosts { try c.set("hosts", hosts) }
            if let persistDir { c.persistDirectory = persistDir }
            if let resume { c.persistDirectory = c.persistDirectory ?? resume }
            if let persistEvery {
                guard persistEvery >= 1 else { throw ValidationError("--persist-every must be at least 1") }
                c.persistEvery = persistEvery
            }
            if let persistSeconds {
                guard persistSeconds > 0 else { throw ValidationError("--persist-seconds must be positive") }
                c.persistSeconds = persistSeconds
            }
            if !workerCommand.isEmpty { c.workerCommand = workerCommand }
            try c.validate(binaries: binaries)
        } catch let error as ClusterConfig.ConfigError {
            throw ValidationError("bad config: \(error.description)")
        }
        return c
    }

    func run() throws {
        let c = try resolved()
        // On Slurm: the allocation must hold the job before anything starts.
        var allocation: SlurmAllocation?
        if c.hosts == .slurm {
            do {
                let a = try SlurmAllocation.current()
                _ = try a.plan(nodes: c.nodes, spares: c.spares)
                allocation = a
            } catch {
                say("error: \(error)")
                throw ExitCode(2)
            }
        }
        let job = c.jobID ?? allocation.map { "slurm\($0.jobID)" } ?? "job\(getpid())"
        // On Slurm the run directory must be seen by every host: beside the submission by default.
        let dir = c.runDirectory ?? allocation.flatMap { $0.submitDirectory }.map { "\($0)/ft-job-\(job)" } ?? "/tmp/ft-job-\(job)"
        let signals = try SignalWatcher(signals: [SIGINT, SIGTERM])
        let ec = c.erasure.map { "RS(\($0.k)+\($0.m))" } ?? "no erasure coding"
        say("starting job \(job): \(c.nodes) nodes x \(c.workersPerNode) workers, \(ec), \(c.spares) spare\(c.spares == 1 ? "" : "s"), "
            + "a snapshot every \(c.snapshotInterval) step\(c.snapshotInterval == 1 ? "" : "s")")
        var options = c.jobOptions(binaries: binaries, runDirectory: dir, jobID: job)
        options.slurm = allocation
        if let resume {
            say("resuming from \(resume): checking its durable steps")
            do {
                let plan = try ResumePlan.choose(root: resume, nodes: c.nodes, erasure: c.erasure.map { ($0.k, $0.m) }) { say($0) }
                for s in plan.skipped { say("passed over step \(s.step): \(s.reason)") }
                say("resuming job \(plan.job)'s step \(plan.step) from \(resume)")
                options.resumeStep = plan.step
                options.persistDirectory = resume
            } catch {
                say("error: cannot resume from \(resume): \(error.message) (\(error.codeName))")
                throw ExitCode(2)
            }
        }
        if let allocation {
            say("Slurm job \(allocation.jobID): hosts " + allocation.hosts.map { "\($0) \(allocation.addresses[$0] ?? "?")" }.joined(separator: ", ")
                + "; the coordinator on \(allocation.hosts[0])")
        }
        let local = try LocalJob(options)
        var code: Int32 = 0
        defer { local.stop(removeFiles: false) }
        let started = monotonicSeconds()
        while (local.status(timeout: 0.5)?["state"] as? String) != "running" {
            if local.coordinator?.poll() != nil || monotonicSeconds() - started > startTimeout {
                // A job that cannot start (a worker refused or crashing at start-up) stops
                // with its reason in status.json.
                let final = (try? String(contentsOfFile: dir + "/status.json", encoding: .utf8))
                    .flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
                let why = (final?["stop_reason"] as? String).map { "it stopped: \($0)" }
                    ?? (local.coordinator?.poll() != nil ? "the coordinator ended" : "no start within \(Int(startTimeout)) s")
                say("the job did not start running (\(why)); logs under \(dir):")
                say(String(local.logs.suffix(4000)))
                say("the job did not start running: \(why)")
                throw ExitCode(1)
            }
            if signals.next() != nil { say("interrupted; stopping"); throw ExitCode(130) }
            usleep(100_000)
        }
        say("""
            job \(job) is running (started in \(String(format: "%.1f", monotonicSeconds() - started)) s); coordinator \(local.endpoint)
              run directory  \(dir)\(local.slurmHosts.isEmpty ? "" : "\n  Slurm hosts    " + local.slurmHosts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))\(local.hosts.map { h in "\n  hosts          network namespaces " + h.hosts.values.sorted { $0.address.compare($1.address, options: .numeric) == .orderedAscending }.map { "\($0.role) \($0.address)" }.joined(separator: ", ") } ?? "")
              logs           \(dir)/coordinator.log, \(dir)/smp-n*.log, \(dir)/logs/NODE-WORKER.log
              watch          \(binaries)/ftctl status --run-dir \(dir) --watch
              PIDs           \(dir)/job.pids (+ \(dir)/pids/)
              stop           \(allocation.map { "scancel \($0.jobID)" } ?? "cluster/stop \(dir)   (or Ctrl-C here)")
            """)
        let supervisor = Supervisor(job: local)
        var announced = Set<String>()  // failures announced (detection time and what; a restarted coordinator counts anew)
        var reported = Set<String>()  // history entries reported (detection time and what)
        var lastState = "running"
        while true {
            if let sig = signals.next() {
                say("signal \(sig): ending every process of the job")
                throw ExitCode(128 + sig)
            }
            for action in supervisor.tick() { say("launcher: \(action)") }
            if let s = supervisor.lastStatus {
                if let f = s["last_failure"] as? [String: Any],
                   announced.insert("\(f["detected_at_s"] ?? "")|\(f["what"] ?? "")").inserted {
                    say("failure: \(f["kind"] as? String ?? "?") \(f["what"] as? String ?? "?") (\(f["detected_by"] as? String ?? "?"))")
                }
                let history = (s["failures"] as? [[String: Any]]) ?? []
                for f in history where reported.insert("\(f["detected_at_s"] ?? "")|\(f["what"] ?? "")").inserted {
                    let what = "\(f["kind"] as? String ?? "?") \(f["what"] as? String ?? "?")"
                    let outcome = f["outcome"] as? String ?? "?"
                    if outcome == "resumed" {
                        let phases = ((f["phases"] as? [[String: Any]]) ?? []).map {
                            "\($0["phase"] as? String ?? "?") \(String(format: "%.0f", ($0["ms"] as? Double) ?? 0)) ms"
                        }
                        say("recovered from \(what): every worker restored step \(jsonInt(f["restored_step"])), \(jsonInt(f["steps_lost"])) steps lost, "
                            + "\(String(format: "%.0f", (f["recovery_ms"] as? Double) ?? -1)) ms (\(phases.joined(separator: ", ")))")
                    } else {
                        say("\(what): \(outcome)")
                    }
                }
                let state = s["state"] as? String ?? "?"
                if state != lastState, state != "running", state != "recovering" { say("job \(state)") }
                lastState = state
            }
            if let coordinator = local.coordinator, let status = coordinator.poll() {
                if (try? String(contentsOfFile: dir + "/status.json", encoding: .utf8)) != nil {
                    let final = (try? String(contentsOfFile: dir + "/status.json", encoding: .utf8))
                        .flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] } ?? [:]
                    code = status.isSuccess ? 0 : 1
                    say("job \(final["state"] as? String ?? "ended"): \(final["stop_reason"] as? String ?? "completed"); "
                        + "committed step \(jsonInt(final["committed_step"])), \(jsonInt(final["failures_total"])) failure(s)")
                    break
                }
            }
            usleep(200_000)
        }
        if code != 0 { throw ExitCode(code) }
    }
}

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "4 nodes x 2 workers, EC 3+1, a snapshot every step; kill a node midway; recover from memory; compare with an uninterrupted run.",
        discussion: """
            Runs the demo trainer twice on local processes: once uninterrupted (the reference), and once with \
            node n1 (its SMP and both workers) killed with SIGKILL halfway. The launcher starts a replacement \
            SMP for n1, which rebuilds n1's snapshot from the other nodes' parity; every worker restores the \
            last committed step and the job finishes. Prints progress, then a summary: steps lost, detection \
            and recovery time by phase, and whether the final parameter hash equals the reference's. \
            Exit status 0 when it does.
            """)

    @Option(help: "Training steps.")
    var steps = 400

    @Option(help: "Run directory (default: a new one under /tmp).")
    var runDir: String?

    func validate() throws {
        guard steps >= 20 else { throw ValidationError("--steps must be at least 20") }
        for b in ["ft-coordinator", "ft-smp", "ft-demo-trainer"] where access(binaries + "/" + b, X_OK) != 0 {
            throw ValidationError("\(binaries)/\(b) is missing: build with `swift build -c release` first")
        }
    }

    func options(_ tag: String, _ dir: String) -> LocalJob.Options {
        var o = LocalJob.Options(binaries: binaries, runDirectory: dir + "/" + tag, jobID: "demo\(tag)\(getpid())")
        o.nodes = 4
        o.workersPerNode = 2
        o.erasure = (3, 1)
        o.workerCommand = [binaries + "/ft-demo-trainer", "--steps", "\(steps)", "--report-every", "50"]
        return o
    }

    func finalHash(_ job: LocalJob, node: Int, worker: Int) -> String? {
        job.workerLog(node: node, worker: worker).split(separator: "\n").last { $0.hasPrefix("final step=\(steps) ") }
            .flatMap { $0.split(separator: " ").first { $0.hasPrefix("hash=") } }.map { String($0.dropFirst(5)) }
    }

    func waitEnd(_ job: LocalJob, supervisor: Supervisor?, label: String) throws {
        var lastPrint = 0.0
        while job.coordinator?.poll() == nil {
            for action in supervisor?.tick() ?? [] { say("[\(label)] launcher: \(action)") }
            let now = monotonicSeconds()
            if now - lastPrint >= 1, let s = job.status(timeout: 0.5) {
                lastPrint = now
                let steps = ((s["nodes"] as? [[String: Any]]) ?? []).flatMap { ($0["workers"] as? [[String: Any]]) ?? [] }.map { jsonInt($0["step"]) }
                say("[\(label)] \(s["state"] as? String ?? "?"), epoch \(jsonInt(s["epoch"])), committed step \(jsonInt(s["committed_step"])), "
                    + "workers at step \(steps.max() ?? 0)/\(self.steps)")
            }
            usleep(200_000)
        }
    }

    func run() throws {
        let dir = runDir ?? "/tmp/ft-demo-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        say("ft demo: 4 nodes x 2 workers, erasure coding RS(3+1), a snapshot every step, \(steps) steps; logs under \(dir)")

        say("1/2 the reference run, uninterrupted")
        let reference = try LocalJob(options("reference", dir))
        defer { reference.stop(removeFiles: false) }
        try waitEnd(reference, supervisor: nil, label: "reference")
        guard let expected = finalHash(reference, node: 0, worker: 0) else {
            throw ValidationError("the reference run did not finish:\n\(reference.logs.suffix(3000))")
        }
        say("reference final hash \(expected)")

        say("2/2 the same job; node n1 (its SMP and both workers) is killed halfway")
        let job = try LocalJob(options("recovered", dir))
        defer { job.stop(removeFiles: false) }
        say("watch it with: .build/release/ftctl status --run-dir \(job.dir) --watch")
        let supervisor = Supervisor(job: job)
        while jsonInt(job.status(timeout: 0.5)?["committed_step"]) < steps / 2 {
            if job.coordinator?.poll() != nil { throw ValidationError("the job ended early:\n\(job.logs.suffix(3000))") }
            usleep(100_000)
        }
        let before = job.status() ?? [:]
        let reached = ((before["nodes"] as? [[String: Any]]) ?? []).flatMap { ($0["workers"] as? [[String: Any]]) ?? [] }.map { jsonInt($0["step"]) }.max() ?? 0
        for w in 0..<2 { if let pid = job.workerPID(node: 1, worker: w) { kill(pid, SIGKILL) } }
        kill(job.smps[1].pid, SIGKILL)
        say("killed node n1 at about step \(reached) (SIGKILL to its SMP pid \(job.smps[1].pid) and both workers)")
        try waitEnd(job, supervisor: supervisor, label: "recovered")

        let final = (0..<4).flatMap { n in (0..<2).map { w in finalHash(job, node: n, worker: w) } }
        // How far the survivors had got when the job paused.
        let paused = (0..<4).flatMap { n in (0..<2).map { w in job.workerLog(node: n, worker: w) } }
            .flatMap { $0.split(separator: "\n").filter { $0.hasPrefix("paused at step=") } }
            .compactMap { Int($0.dropFirst("paused at step=".count)) }.max() ?? reached
        let restored = job.workerLog(node: 0, worker: 0).split(separator: "\n").last { $0.hasPrefix("restored step=") }
            .flatMap { Int($0.dropFirst("restored step=".count).prefix { $0 != " " }) }
        let status = (try? String(contentsOfFile: job.dir + "/status.json", encoding: .utf8))
            .flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] } ?? [:]
        let failure = status["last_failure"] as? [String: Any]
        say("")
        say("summary")
        say("  failure:       \(failure?["kind"] as? String ?? "?") \(failure?["what"] as? String ?? "?"), detected by \(failure?["detected_by"] as? String ?? "?")")
        say("  steps lost:    \(restored.map { max(0, paused - $0) } ?? -1) (the survivors had reached step \(paused); every worker restored step \(restored.map(String.init) ?? "?"))")
        for p in (failure?["phases"] as? [[String: Any]]) ?? [] {
            let ms = (p["ms"] as? Double) ?? Double(jsonInt(p["ms"]))
            say("  \((p["phase"] as? String ?? "?").padding(toLength: 8, withPad: " ", startingAt: 0)) \(String(format: "%8.1f", ms)) ms  \(p["reason"] as? String ?? "")")
        }
        let equal = final.allSatisfy { $0 == expected }
        say("  final hash:    \(final.compactMap { $0 }.first ?? "none") (reference \(expected)): \(equal ? "EQUAL" : "DIFFERENT")")
        say("  timeline:      \(drawTimeline(job.dir))")
        if !equal { throw ExitCode(1) }
    }

    /// `ftctl timeline` of the recovered run, next to its logs: the SVG, and a PNG
    /// when rsvg-convert is installed. Says where, or why not.
    func drawTimeline(_ dir: String) -> String {
        func ftctl(_ args: [String]) -> Bool {
            guard let p = try? ChildProcess(arguments: [binaries + "/ftctl", "timeline", dir, "-o", dir + "/timeline.svg",
                                                        "--title", "ft demo: node n1 killed and recovered from memory"] + args,
                                            environment: ProcessInfo.processInfo.environment, outputPath: dir + "/timeline.log") else { return false }
            return p.wait(timeoutSeconds: 120) == .exited(0)
        }
        if ftctl(["--png", dir + "/timeline.png"]) { return "\(dir)/timeline.svg, \(dir)/timeline.png" }
        if ftctl([]) { return "\(dir)/timeline.svg (no PNG: \((try? String(contentsOfFile: dir + "/timeline.log", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"))" }
        return "not drawn: \((try? String(contentsOfFile: dir + "/timeline.log", encoding: .utf8)) ?? "ftctl timeline failed")"
    }
}

struct Stop: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "End every process a job recorded (RUN_DIR/job.pids, RUN_DIR/pids), by PID, free its shared memory, and remove its network namespaces (RUN_DIR/netns).",
        discussion: """
            SIGTERM first (a launcher then ends its job itself, an SMP frees its memory), SIGKILL after --grace \
            seconds to whatever of the job is left. A PID is signalled only while it still names a process of the \
            job (its command line or environment carries the job id), so a reused PID is never hit.
            """)

    @Argument(help: "The job's run directory.")
    var runDir: String

    @Option(help: "Seconds to wait after SIGTERM before SIGKILL.")
    var grace = 5.0

    func run() throws {
        guard let job = (try? String(contentsOfFile: runDir + "/job.id", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) else {
            throw ValidationError("\(runDir) is not a job's run directory (no job.id)")
        }
        let launcher = (try? String(contentsOfFile: runDir + "/job.pids", encoding: .utf8))?.split(separator: "\n")
            .first { $0.hasPrefix("launcher ") }.flatMap { Int32($0.split(separator: " ")[1]) }
        var targets = RecordedProcesses.all(runDirectory: runDir).filter { RecordedProcesses.belongs($0, toJob: job) }
        // The launcher is not of the job by its arguments; it is recorded, and it is an ft-launch.
        let launcherAlive = launcher.map { pid in
            kill(pid, 0) == 0 && ((try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)) ?? "").contains("ft-launch")
        } ?? false
        guard !targets.isEmpty || launcherAlive else {
            RecordedProcesses.freeSharedMemory(job: job)
            let removed = NetnsHosts.remove(recordIn: runDir)
            say("job \(job): nothing of it is running" + (removed.isEmpty ? "" : "; removed what it left: \(removed.joined(separator: ", "))"))
            if !NetnsHosts.leftovers(recordIn: runDir).isEmpty { throw ExitCode(1) }
            return
        }
        if launcherAlive, let launcher { targets.append(launcher) }
        for pid in targets { kill(pid, SIGCONT); kill(pid, SIGTERM) }
        say("sent SIGTERM to \(targets.count) recorded process\(targets.count == 1 ? "" : "es") of job \(job)")
        let deadline = monotonicSeconds() + grace
        var left = targets
        while monotonicSeconds() < deadline {
            left = left.filter { kill($0, 0) == 0 && ($0 == launcher || RecordedProcesses.belongs($0, toJob: job)) }
            if left.isEmpty { break }
            usleep(50_000)
        }
        for pid in left { kill(pid, SIGKILL) }
        if !left.isEmpty { say("SIGKILL to \(left.count) that outlived SIGTERM for \(grace) s") }
        usleep(100_000)
        RecordedProcesses.freeSharedMemory(job: job)
        let remaining = RecordedProcesses.all(runDirectory: runDir).filter { RecordedProcesses.belongs($0, toJob: job) }
        // The job's network hosts, once nothing of it runs in them (a launcher that got SIGTERM removed them itself).
        if remaining.isEmpty && !(launcherAlive && kill(launcher!, 0) == 0) { NetnsHosts.remove(recordIn: runDir) }
        let segments = RecordedProcesses.segments(job: job)
        let network = NetnsHosts.leftovers(recordIn: runDir)
        say("job \(job) stopped: \(remaining.count) recorded processes alive, \(segments.count) shared-memory segments left"
            + (network.isEmpty ? "" : ", \(network.count) network namespaces/links left (\(network.joined(separator: ", ")))"))
        if !remaining.isEmpty || !segments.isEmpty || !network.isEmpty { throw ExitCode(1) }
    }
}

Launch.main()
