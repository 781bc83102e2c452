import ArgumentParser
import FTLauncher
import FTSystem
import Foundation

/// `chaos/run`: the failure scenario matrix and the soak (see `ChaosRunner`).
struct Chaos: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ft-chaos",
        abstract: "Run failure scenarios against real local jobs and check them against an uninterrupted run.",
        discussion: """
            Each scenario starts a job (ft-coordinator, ft-smp, ft-demo-trainer workers; 4 nodes x 2 workers with \
            RS(3+1), 4 x 1 with RS(2+2) for the multi-node losses, 4 x 3 for kill-all-workers), injects its faults \
            at a seeded random step anywhere in the job, at a random moment within that step (and, for the \
            scenarios that say so, at a random moment of the recovery that follows), keeps the job whole as the \
            launcher does, and checks: the final parameter hash of every worker equals the golden uninterrupted \
            run's, each failure lost at most 2N-1 steps (N the snapshot interval), every failure was resumed from \
            (kill-m+1-nodes: the job stopped with its report and nothing resumed), no recovery restarted from \
            step 0 once a step was committed, and no recorded process or shared-memory segment was left. \
            Processes are signalled only by their recorded PIDs; SIGINT or SIGTERM ends the running job's \
            processes and keeps its run directory. --state-mb N replaces the char LM by N MiB of synthetic state \
            per worker (real sizes).

            Scenarios (--list prints them one per line):
            \(ChaosRunner.scenarios.map { "\($0.name): \($0.about)." }.joined(separator: "\n"))

            Every run prints its seed; --seed replays it. --soak SECONDS injects a fault of any kind above (but \
            those that need another job shape) at exponential intervals of mean --mtbf seconds, one at a time, \
            besides a hang and a death mid-copy of one worker at random steps. The JSON and the table give the \
            largest heartbeat gap each kind of process logged. Exit status 0 when every scenario passed.
            """)

    @Option(help: "Run only this scenario (repeatable).")
    var scenario: [String] = []

    @Flag(help: "Run the CI smoke subset (\(ChaosRunner.smoke.joined(separator: ", "))).")
    var smoke = false

    @Option(help: "Seed of every scenario run (default: a random one each, printed).")
    var seed: UInt64?

    @Option(help: "Training steps per job.")
    var steps = 400

    @Option(help: "Snapshot interval in steps.")
    var snapshotInterval = 1

    @Option(help: "Synthetic state of this many MiB per worker instead of the char LM (ft-demo-trainer --synthetic).")
    var stateMb: Int?

    @Option(help: "The persistent tier in every scenario's job: persist every this many committed steps (RUN_DIR/persist). With it, kill-m+1-nodes must resume from disk, bit-exact. The disk scenarios (\(ChaosRunner.diskScenarios.sorted().joined(separator: ", "))) persist anyway, by default every steps/10.")
    var persistEvery: Int?

    @Option(help: ArgumentHelp("SMP data planes on tcp://ADDRESS:* with CURVE (as nodes on separate hosts) instead of private ipc sockets.", valueName: "address"))
    var dataHost: String?

    @Option(help: ArgumentHelp("Where each job runs: local (one host, loopback) or netns (every node, spare and the coordinator on a network-namespace host of its own; needs root). The network scenarios (\(ChaosRunner.networkScenarios.sorted().joined(separator: ", "))) run only with netns.", valueName: "local|netns"))
    var hosts = "local"

    @Option(help: "With --state-mb: simulated compute per step in milliseconds.")
    var stepMs = 10.0

    @Option(help: "The workload: demo (ft-demo-trainer) or torch (python/examples/gpt.py under ft_torch, 1 worker per node).")
    var worker = "demo"

    @Option(help: "With --worker torch: the Python interpreter.")
    var python = "python3"

    @Option(help: "Soak for this many seconds instead of running scenarios.")
    var soak: Double?

    @Option(help: "Soak: mean time between failures in seconds.")
    var mtbf = 20.0

    @Flag(help: "One JSON object instead of the table.")
    var json = false

    @Flag(help: "Keep every run directory (failed runs are always kept).")
    var keep = false

    @Option(help: "Where run directories go (default: a new directory under /tmp).")
    var workDir: String?

    @Flag(help: "List the scenarios and exit.")
    var list = false

    func validate() throws {
        for s in scenario where !ChaosRunner.scenarios.contains(where: { $0.name == s }) {
            throw ValidationError("unknown scenario '\(s)'; known: \(ChaosRunner.scenarios.map(\.name).joined(separator: ", "))")
        }
        guard steps >= 40 else { throw ValidationError("--steps must be at least 40") }
        guard snapshotInterval >= 1 else { throw ValidationError("--snapshot-interval must be at least 1") }
        if let persistEvery, persistEvery < 1 { throw ValidationError("--persist-every must be at least 1") }
        if let stateMb { guard stateMb >= 1 && stateMb <= 16384 else { throw ValidationError("--state-mb must be in 1...16384") } }
        guard stepMs >= 0 else { throw ValidationError("--step-ms must not be negative") }
        if let soak { guard soak > 0 && mtbf > 0 else { throw ValidationError("--soak and --mtbf must be positive") } }
        if smoke && !scenario.isEmpty { throw ValidationError("give either --smoke or --scenario") }
        guard hosts == "local" || hosts == "netns" else { throw ValidationError("--hosts is local or netns, not '\(hosts)'") }
        if hosts == "netns", let reason = NetnsHosts.unavailableReason { throw ValidationError("--hosts netns: \(reason)") }
        if hosts == "netns", dataHost != nil { throw ValidationError("--data-host names one address for every node; --hosts netns gives each its own: give one of them") }
        for s in scenario where hosts != "netns" && ChaosRunner.networkScenarios.contains(s) {
            throw ValidationError("scenario '\(s)' acts on a host's network link: it needs --hosts netns")
        }
        for b in ["ft-coordinator", "ft-smp", worker == "torch" ? "libFTWorkerC.so" : "ft-demo-trainer"] where access(binaries + "/" + b, R_OK) != 0 {
            throw ValidationError("\(binaries)/\(b) is missing: build first (swift build -c release)")
        }
        let workload = try chaosWorker()
        for s in scenario where !workload.supports(s) {
            throw ValidationError("scenario '\(s)' needs --worker demo (the worker injects its own fault)")
        }
    }

    func chaosWorker() throws -> ChaosWorker {
        switch worker {
        case "demo": return .demo
        case "torch":
            switch ChaosWorker.torch(python: python) {
            case .success(let w): return w
            case .failure(let e): throw ValidationError(e.description)
            }
        default: throw ValidationError("--worker is demo or torch, not '\(worker)'")
        }
    }

    var binaries: String { executableDirectory }

    func run() throws {
        if list {
            for s in ChaosRunner.scenarios { print("\(s.name.padding(toLength: 22, withPad: " ", startingAt: 0)) \(s.about)") }
            return
        }
        // Blocked here before any thread starts (every thread inherits the mask):
        // SIGINT/SIGTERM end the jobs' processes instead of leaving them running.
        let signals = try SignalWatcher(signals: [SIGINT, SIGTERM])
        Thread {
            var item = pollfd(fd: signals.fd, events: Int16(POLLIN), revents: 0)
            while true {
                guard poll(&item, 1, -1) > 0, let sig = signals.next() else { continue }
                let dirs = LocalJob.endEveryLiveJob()
                let line = "chaos: signal \(sig): ended the processes of \(dirs.count) job(s)"
                    + (dirs.isEmpty ? "" : "; their run directories are kept: \(dirs.joined(separator: ", "))")
                FileHandle.standardError.write(Data((line + "\n").utf8))
                Foundation.exit(130)
            }
        }.start()
        let dir = workDir ?? "/tmp/ft-chaos-\(getpid())"
        var options = ChaosRunner.Options(binaries: binaries, workDirectory: dir)
        options.steps = steps
        options.snapshotInterval = snapshotInterval
        options.stateMB = stateMb
        options.persistEvery = persistEvery
        options.stepMs = stepMs
        options.dataHost = dataHost
        options.netns = hosts == "netns"
        options.worker = try chaosWorker()
        options.keepDirectories = keep
        options.progress = { line in FileHandle.standardError.write(Data("chaos: \(line)\n".utf8)) }
        let runner = try ChaosRunner(options)
        var results: [ChaosRunner.Result] = []
        if let soak {
            let s = seed ?? UInt64.random(in: 1...UInt64(Int64.max))
            options.progress("soak seed \(s) (replay with --seed \(s))")
            results.append(runner.soak(duration: soak, mtbf: mtbf, seed: s))
        } else {
            let names = (smoke ? ChaosRunner.smoke : scenario.isEmpty ? ChaosRunner.matrix(netns: options.netns) : scenario)
                .filter { options.worker.supports($0) }
            for name in names {
                let s = seed ?? UInt64.random(in: 1...UInt64(Int64.max))
                let r = runner.run(name, seed: s)
                options.progress("\(name): \(r.passed ? "PASSED" : "FAILED") in \(String(format: "%.1f", r.seconds)) s (seed \(s); replay: chaos/run --scenario \(name) --seed \(s))"
                    + (r.passed ? "" : " — \(r.detail)"))
                results.append(r)
            }
        }
        if json {
            var o: [String: Any] = ["scenarios": results.map(\.json), "steps": steps, "snapshot_interval": snapshotInterval]
            o["state_mb"] = stateMb ?? NSNull()
            o["data_host"] = dataHost ?? NSNull()
            o["hosts"] = hosts
            let data = try JSONSerialization.data(withJSONObject: o, options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print(table(results))
        }
        if !results.allSatisfy(\.passed) { throw ExitCode(1) }
    }

    func table(_ results: [ChaosRunner.Result]) -> String {
        var rows = [["scenario", "passed", "hash equal", "steps lost", "detect ms", "recovery ms", "failures", "gap ms smp/worker/coord",
                     "seed", "notes"]]
        for r in results {
            let gaps = ["smp", "worker", "coordinator_loop"].map { r.heartbeatGaps[$0].map { $0 < 0 ? "-" : "\($0)" } ?? "-" }.joined(separator: "/")
            rows.append([r.name, r.passed ? "yes" : "NO", r.finalHashEqual.map { $0 ? "yes" : "NO" } ?? "n/a (stop)",
                         "\(r.stepsLost)", r.detectMs < 0 ? "-" : String(format: "%.0f", r.detectMs),
                         r.recoveryMs < 0 ? "-" : String(format: "%.0f", r.recoveryMs), "\(r.failures)", gaps, "\(r.seed)",
                         String(r.detail.prefix(200))])
        }
        let widths = (0..<rows[0].count - 1).map { c in rows.map { $0[c].count }.max()! }
        return rows.enumerated().map { i, row in
            var line = ""
            for (c, cell) in row.enumerated() {
                line += c < widths.count ? cell.padding(toLength: widths[c] + 2, withPad: " ", startingAt: 0) : cell
            }
            return line + (i == 0 ? "\n" + widths.map { String(repeating: "-", count: $0) + "  " }.joined() + "-----" : "")
        }.joined(separator: "\n")
    }
}

Chaos.main()
