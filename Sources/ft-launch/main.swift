import ArgumentParser
import FTLauncher
import FTSystem
import Foundation

struct Launch: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ft-launch",
        abstract: "Start a local fault-tolerant training job, stop one, or run the demo.",
        subcommands: [Demo.self, Stop.self])
}

/// Where this binary's siblings (ft-coordinator, ft-smp, ft-demo-trainer) are.
nonisolated var binaries: String {
    let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    return (exe as NSString).deletingLastPathComponent
}

nonisolated func say(_ line: String) { FileHandle.standardOutput.write(Data((line + "\n").utf8)) }

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "4 nodes x 2 workers, EC 3+1, a snapshot every step; kill a node midway; recover from memory; compare with an uninterrupted run.",
        discussion: """
            Runs the demo trainer twice on local processes: once uninterrupted (the reference), and once with
            node n1 (its SMP and both workers) killed with SIGKILL halfway. The launcher starts a replacement
            SMP for n1, which rebuilds n1's snapshot from the other nodes' parity; every worker restores the
            last committed step and the job finishes. Prints progress, then a summary: steps lost, detection
            and recovery time by phase, and whether the final parameter hash equals the reference's.
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
        if !equal { throw ExitCode(1) }
    }
}

struct Stop: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "End every process a job recorded (RUN_DIR/job.pids and RUN_DIR/pids/*.pid), by PID.")

    @Argument(help: "The job's run directory.")
    var runDir: String

    func run() throws {
        var pids: [Int32] = []
        if let text = try? String(contentsOfFile: runDir + "/job.pids", encoding: .utf8) {
            pids += text.split(separator: "\n").compactMap { $0.split(separator: " ").last.flatMap { Int32($0) } }
        }
        for name in (try? FileManager.default.contentsOfDirectory(atPath: runDir + "/pids")) ?? [] {
            if let text = try? String(contentsOfFile: runDir + "/pids/" + name, encoding: .utf8),
               let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) { pids.append(pid) }
        }
        guard !pids.isEmpty else { throw ValidationError("no recorded PIDs under \(runDir)") }
        var ended = 0
        for pid in Set(pids) where kill(pid, 0) == 0 {
            kill(pid, SIGTERM)
            ended += 1
        }
        say("sent SIGTERM to \(ended) recorded process\(ended == 1 ? "" : "es") of \(runDir)")
    }
}

Launch.main()
