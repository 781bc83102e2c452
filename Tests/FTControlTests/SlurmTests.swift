import FTCore
import FTLauncher
import FTSystem
import Foundation
import Testing

@Suite("Slurm allocation (pure)")
struct SlurmAllocationTests {
    let allocation = SlurmAllocation(jobID: "7", hosts: ["a", "b", "c", "d", "e"],
                                     addresses: ["a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3", "d": "10.0.0.4", "e": "10.0.0.5"])

    @Test("the coordinator on the batch host, node i on host i, spares after the nodes")
    func plan() throws {
        let roles = try allocation.plan(nodes: 4, spares: 1)
        #expect(roles == ["coordinator": "a", "n0": "a", "n1": "b", "n2": "c", "n3": "d", "spare0": "e"])
    }

    @Test("an allocation too small for nodes + spares is refused, saying what to submit")
    func tooSmall() {
        #expect(throws: SlurmAllocation.PlanError.self) { try allocation.plan(nodes: 4, spares: 2) }
        do {
            _ = try allocation.plan(nodes: 4, spares: 2)
        } catch {
            #expect("\(error)".contains("4 + 2 = 6") && "\(error)".contains("sbatch --nodes=6"), "\(error)")
        }
    }

    @Test("a step runs on its host alone, beside the others, and survives a sibling's failure")
    func stepCommand() {
        let c = allocation.stepCommand(host: "c", name: "ft-j-n2-1", ["ft-smp", "--node-id", "n2"])
        #expect(c.contains("--nodelist=c") && c.contains("--nodes=1") && c.contains("--ntasks=1") && c.contains("--overlap"))
        #expect(c.contains("--kill-on-bad-exit=0") && c.contains("--job-name=ft-j-n2-1") && c.contains("--jobid=7"))
        #expect(Array(c.suffix(3)) == ["ft-smp", "--node-id", "n2"])
    }

    @Test("hosts = slurm takes no data_host; ft-launch start --hosts slurm outside an allocation exits 2 before anything starts, saying where it runs")
    func launcherOutside() throws {
        var c = ClusterConfig()
        c.hosts = .slurm
        c.dataHost = "10.0.0.2"
        #expect(throws: ClusterConfig.ConfigError.self) { try c.validate(binaries: productsDirectory) }
        let dir = "/tmp/ft-slurm-outside-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let (status, out, _) = try runTool("ft-launch", ["start", "--hosts", "slurm", "--run-dir", dir])
        #expect(status == .exited(2), "\(out)")
        #expect(out.contains("inside a Slurm allocation") && out.contains("SLURM_JOB_ID"), "\(out)")
        #expect(!FileManager.default.fileExists(atPath: dir), "a run directory was made")
    }

    @Test("outside an allocation, hosts = slurm says where it must run")
    func outside() {
        #expect(throws: SlurmAllocation.PlanError.self) { try SlurmAllocation.current(environment: [:]) }
    }
}

/// Real Slurm: munge, slurmctld and one slurmd per network-namespace host
/// (`SlurmCluster`); the job is submitted with `sbatch cluster/slurm/ft-job.sbatch`.
/// A stage of its own in scripts/test.sh (FT_SLURM_TESTS=1), after the other
/// tests: its jobs hold the machine for about two minutes, which the time
/// limits of the process tests queued behind them would otherwise pay for.
@Suite("Slurm (real slurmctld and slurmd on namespace hosts)", .serialized,
       .enabled(if: ProcessInfo.processInfo.environment["FT_SLURM_TESTS"] == "1",
                "the Slurm tests run in a stage of their own (scripts/test.sh runs them with FT_SLURM_TESTS=1)"),
       .enabled(if: SlurmCluster.unavailableReason == nil, "no Slurm cluster can be made here: \(SlurmCluster.unavailableReason ?? "")"))
struct SlurmTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    static var epilog: String { repository + "/cluster/slurm/epilog.sh" }
    /// A toy worker that runs until the job is ended.
    static var toyWorker: [String] { [productsDirectory + "/ft-toy-worker", "--steps", "100000", "--state-kib", "256", "--step-ms", "10"] }

    /// Submits a job of 4 nodes x 1 worker running `command`, RS(3+1), `spares` spares; returns the Slurm job id and the run directory.
    func submit(_ cluster: SlurmCluster, command: [String], spares: Int, phaseTimeout: Int = 20) throws -> (id: String, dir: String) {
        let dir = cluster.dir + "/job"
        let config = cluster.dir + "/job.conf"
        try """
            nodes = 4
            workers_per_node = 1
            ec = 3+1
            spares = \(spares)
            run_dir = \(dir)
            worker_command = \(command.joined(separator: " "))
            phase_timeout = \(phaseTimeout)

            """.write(toFile: config, atomically: true, encoding: .utf8)
        var env = cluster.environment
        env["FT_BIN"] = productsDirectory
        let out = cluster.dir + "/sbatch.out"
        let p = try ChildProcess(arguments: ["sbatch", "--parsable", "--nodes=\(4 + spares)", "--output=\(cluster.dir)/slurm-%j.out",
                                             Self.repository + "/cluster/slurm/ft-job.sbatch", "--config", config],
                                 environment: env, outputPath: out)
        #expect(p.wait(timeoutSeconds: 30)?.isSuccess == true, "\(readText(out))")
        let id = try #require(readText(out).split(separator: "\n").last.map { String($0.split(separator: ";")[0]) }, "\(readText(out))")
        try #require(Int(id) != nil, "sbatch said: \(readText(out))")
        return (id, dir)
    }

    func status(_ dir: String) -> [String: Any]? {
        guard let (_, out, _) = try? runTool("ftctl", ["status", "--run-dir", dir, "--json"], timeout: 10) else { return nil }
        return try? JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any]
    }

    func jobLog(_ cluster: SlurmCluster, _ id: String, _ dir: String) -> String {
        "== sbatch output\n" + readText(cluster.dir + "/slurm-\(id).out") + "\n" + jobLogs(dir)
            + "\n== slurmctld\n" + readText(cluster.dir + "/slurmctld.log").suffix(3000)
    }

    /// The job's processes left on any host (slurmd aside), and its shared-memory segments.
    func leftovers(_ cluster: SlurmCluster, job: String) -> (pids: [String: [Int32]], segments: [String]) {
        var pids: [String: [Int32]] = [:]
        for h in cluster.names where !cluster.jobPIDs(on: h).isEmpty { pids[h] = cluster.jobPIDs(on: h) }
        return (pids, RecordedProcesses.segments(job: job))
    }

    /// Every rank's final hash of `command` run uninterrupted on local processes (4 nodes x 1 worker, RS(3+1)).
    func goldenHashes(command: [String], steps: Int, phaseTimeout: Double) throws -> [String] {
        var o = FTLauncher.LocalJob.Options(binaries: productsDirectory, runDirectory: "/tmp/ft-slurm-golden-\(getpid())-\(UInt32.random(in: 0...UInt32.max))",
                                            jobID: "goldenslurm\(getpid())")
        o.nodes = 4
        o.erasure = (3, 1)
        o.workerCommand = command
        o.phaseTimeout = phaseTimeout
        let job = try FTLauncher.LocalJob(o)
        defer { job.stop(removeFiles: ProcessInfo.processInfo.environment["FT_KEEP_TEST_DIRS"] == nil) }
        #expect(job.coordinator?.wait(timeoutSeconds: 240)?.isSuccess == true, "the golden run failed\n\(job.logs.suffix(3000))")
        return try (0..<4).map { rank in try #require(finalHash(job.workerLog(node: rank, worker: 0), steps: steps), "golden rank \(rank)") }
    }

    func finalHash(_ log: String, steps: Int) -> String? {
        log.split(separator: "\n").last { $0.hasPrefix("final step=\(steps) ") }
            .flatMap { $0.split(separator: " ").first { $0.hasPrefix("hash=") } }.map { String($0.dropFirst(5)) }
    }

    @Test("sbatch the demo trainer on 5 hosts (4 nodes + 1 spare, RS(3+1)); host n1 dies whole (its slurmd, its step, its SMP and worker, SIGKILL); the spare takes over and the job ends bit-exact; squeue and sacct show its life; nothing is left on any host",
          .timeLimit(.minutes(6)))
    func nodeLossOnSlurm() throws {
        let steps = 300
        try nodeLoss(command: [productsDirectory + "/ft-demo-trainer", "--steps", "\(steps)", "--report-every", "50"], steps: steps,
                     killAt: 100, phaseTimeout: 20)
    }

    @Test("the PyTorch GPT example on Slurm: host n1 dies whole, the spare takes over, bit-exact (about 3 minutes: FT_SLURM_TORCH=1)",
          .enabled(if: ProcessInfo.processInfo.environment["FT_SLURM_TORCH"] == "1",
                   "the PyTorch run on Slurm takes about 3 minutes, beyond the test command's budget: run it with FT_SLURM_TORCH=1"),
          .timeLimit(.minutes(10)))
    func torchNodeLossOnSlurm() throws {
        let worker = try ChaosWorker.torch(python: "python3").get()
        guard case .torch(let python, let script) = worker else {
            Issue.record("ChaosWorker.torch gave \(worker)")
            return
        }
        let steps = 120
        try nodeLoss(command: [python, script, "--steps", "\(steps)", "--report-every", "20"], steps: steps, killAt: 40, phaseTimeout: 60)
    }

    @Test("at real sizes on Slurm: 64 MiB per worker (FT_SLURM_STATE_MB sets it), host n1 dies whole at a random committed step, the spare takes over, bit-exact (a few minutes: FT_SLURM_STATE_MB=64)",
          .enabled(if: ProcessInfo.processInfo.environment["FT_SLURM_STATE_MB"] != nil,
                   "a lost host at real sizes takes minutes, beyond the test command's budget: run it with FT_SLURM_STATE_MB=64"),
          .timeLimit(.minutes(10)))
    func realSizeNodeLossOnSlurm() throws {
        let mb = try #require(Int(ProcessInfo.processInfo.environment["FT_SLURM_STATE_MB"] ?? ""), "FT_SLURM_STATE_MB must be a number of MiB")
        let steps = 200, killAt = Int.random(in: 20...120)
        print("slurm: \(mb) MiB per worker, host h1 killed once step \(killAt) is committed")
        try nodeLoss(command: [productsDirectory + "/ft-toy-worker", "--steps", "\(steps)", "--state-kib", "\(mb * 1024)", "--step-ms", "10"],
                     steps: steps, killAt: killAt, phaseTimeout: 20)
    }

    func nodeLoss(command: [String], steps: Int, killAt: Int, phaseTimeout: Int) throws {
        realProcessJobs.lock()
        defer { realProcessJobs.unlock() }
        let expected = try goldenHashes(command: command, steps: steps, phaseTimeout: Double(phaseTimeout))
        let cluster = try SlurmCluster(hosts: 5, epilog: Self.epilog)
        defer { cluster.stop() }
        let (id, dir) = try submit(cluster, command: command, spares: 1, phaseTimeout: phaseTimeout)
        #expect(waitUntil(seconds: 180) { jsonInt(status(dir)?["committed_step"]) >= killAt }, "\(jobLog(cluster, id, dir))")
        let queue = cluster.run(["squeue", "-h", "-j", id, "-o", "%i %T %D %N"])
        #expect(queue.contains("RUNNING") && queue.contains(" 5 "), "squeue: \(queue)")
        let steps1 = cluster.run(["squeue", "-h", "-s", "-j", id, "-o", "%i %j %N"])
        #expect(steps1.contains("ft-slurm\(id)-n1-") && steps1.contains("ft-slurm\(id)-spare0-"), "squeue -s: \(steps1)")

        let killed = cluster.killHost("h1")
        #expect(killed >= 3, "host h1 ran \(killed) processes")
        #expect(waitUntil(seconds: 300) { cluster.run(["squeue", "-h", "-j", id]).trimmingCharacters(in: .whitespacesAndNewlines).isEmpty },
                "the job did not end\n\(jobLog(cluster, id, dir))")
        let final = try #require(try? JSONSerialization.jsonObject(with: Data(readText(dir + "/status.json").utf8)) as? [String: Any],
                                 "\(jobLog(cluster, id, dir))")
        #expect(final["state"] as? String == "stopped", "\(final)")
        let failure = final["last_failure"] as? [String: Any]
        #expect(failure?["outcome"] as? String == "resumed", "\(final)")
        let output = readText(cluster.dir + "/slurm-\(id).out")
        #expect(output.contains("spare0") && output.contains("took over n1"), "\(output)")
        // Every rank's final hash equals the uninterrupted run's.
        for rank in 0..<4 {
            #expect(finalHash(readText(dir + "/logs/n\(rank)-w0.log"), steps: steps) == expected[rank], "rank \(rank)\n\(jobLog(cluster, id, dir))")
        }
        print("slurm: \(command[0].split(separator: "/").last ?? ""): \(output.split(separator: "\n").filter { $0.hasPrefix("recovered") }.joined(separator: "; ")); final hashes equal the uninterrupted run's: \(expected)")
        let accounting = cluster.run(["sacct", "-c", "-j", id, "-o", "JobID,JobName,State,NNodes,NodeList", "-P", "-n"])
        #expect(accounting.contains("|COMPLETED|"), "sacct -c: \(accounting)")
        print("slurm: squeue while running: \(queue.trimmingCharacters(in: .whitespacesAndNewlines)); steps: "
              + steps1.split(separator: "\n").joined(separator: ", ") + "; sacct -c: " + accounting.split(separator: "\n").joined(separator: ", "))
        let left = leftovers(cluster, job: "slurm\(id)")
        #expect(left.pids.isEmpty && left.segments.isEmpty, "left: \(left)")
        cluster.stop()
        #expect(NetnsHosts.leftovers(recordIn: cluster.dir).isEmpty)
    }

    @Test("with no spare: a node whose SMP died goes on in a new step on its own host; once the host itself is gone, the job stops cleanly with the report, and nothing is left",
          .timeLimit(.minutes(4)))
    func noSpareLeft() throws {
        realProcessJobs.lock()
        defer { realProcessJobs.unlock() }
        let cluster = try SlurmCluster(hosts: 4, epilog: Self.epilog)
        defer { cluster.stop() }
        let (id, dir) = try submit(cluster, command: Self.toyWorker,
                                   spares: 0, phaseTimeout: 5)
        #expect(waitUntil(seconds: 90) { jsonInt(status(dir)?["committed_step"]) >= 50 }, "\(jobLog(cluster, id, dir))")
        // n1's SMP and worker die; its host (and its slurmd) stays.
        let slurmd = Set(cluster.pids(on: "h1")).subtracting(cluster.jobPIDs(on: "h1"))
        let smpPID = try #require(Int32(readText(dir + "/pids/n1.smp.pid").trimmingCharacters(in: .whitespacesAndNewlines)), "\(jobLog(cluster, id, dir))")
        if let worker = Int32(readText(dir + "/pids/n1-w0.pid").trimmingCharacters(in: .whitespacesAndNewlines)) { kill(worker, SIGKILL) }
        kill(smpPID, SIGKILL)
        #expect(waitUntil(seconds: 60) {
            let f = status(dir)?["last_failure"] as? [String: Any]
            return f?["outcome"] as? String == "resumed" && (f?["what"] as? String ?? "").contains("n1")
        }, "\(jobLog(cluster, id, dir))")
        let output = readText(cluster.dir + "/slurm-\(id).out")
        #expect(output.contains("started a replacement SMP for n1"), "\(output)")
        #expect(cluster.run(["squeue", "-h", "-s", "-j", id, "-o", "%j %N"]).contains("n1-5 h1"), "n1's new step is not on h1")
        #expect(Set(cluster.pids(on: "h1")).isSuperset(of: slurmd))
        // Now the host goes, and no spare is left: the recovery cannot finish, and the job says so.
        #expect(cluster.killHost("h1") >= 3)
        #expect(waitUntil(seconds: 120) { cluster.run(["squeue", "-h", "-j", id]).trimmingCharacters(in: .whitespacesAndNewlines).isEmpty },
                "the job did not end\n\(jobLog(cluster, id, dir))")
        let final = try #require(try? JSONSerialization.jsonObject(with: Data(readText(dir + "/status.json").utf8)) as? [String: Any],
                                 "\(jobLog(cluster, id, dir))")
        #expect(final["state"] as? String == "failed", "\(final)")
        #expect((final["stop_reason"] as? String ?? "").contains("n1"), "\(final)")
        #expect(readText(cluster.dir + "/slurm-\(id).out").contains("job failed"), "\(readText(cluster.dir + "/slurm-\(id).out"))")
        print("slurm: no spare left: " + (final["stop_reason"] as? String ?? "?") + "; sacct -c: "
              + cluster.run(["sacct", "-c", "-j", id, "-o", "State,NNodes,NodeList", "-P", "-n"]).split(separator: "\n").joined(separator: ", "))
        #expect(waitUntil(seconds: 10) { leftovers(cluster, job: "slurm\(id)").pids.isEmpty && leftovers(cluster, job: "slurm\(id)").segments.isEmpty },
                "left: \(leftovers(cluster, job: "slurm\(id)"))")
    }

    @Test("scancel in the middle of a job ends every process on every host and frees all shared memory", .timeLimit(.minutes(4)))
    func scancelCleans() throws {
        realProcessJobs.lock()
        defer { realProcessJobs.unlock() }
        let cluster = try SlurmCluster(hosts: 5, epilog: Self.epilog)
        defer { cluster.stop() }
        let (id, dir) = try submit(cluster, command: Self.toyWorker,
                                   spares: 1)
        #expect(waitUntil(seconds: 90) { jsonInt(status(dir)?["committed_step"]) >= 50 }, "\(jobLog(cluster, id, dir))")
        #expect(!RecordedProcesses.segments(job: "slurm\(id)").isEmpty)
        cluster.run(["scancel", id])
        #expect(waitUntil(seconds: 60) { cluster.run(["squeue", "-h", "-j", id]).trimmingCharacters(in: .whitespacesAndNewlines).isEmpty },
                "the job did not end\n\(jobLog(cluster, id, dir))")
        #expect(waitUntil(seconds: 10) { leftovers(cluster, job: "slurm\(id)").pids.isEmpty && leftovers(cluster, job: "slurm\(id)").segments.isEmpty },
                "left: \(leftovers(cluster, job: "slurm\(id)"))\n\(jobLog(cluster, id, dir))")
        #expect(cluster.run(["sacct", "-c", "-j", id, "-o", "State", "-P", "-n"]).contains("CANCELLED"))
    }
}
