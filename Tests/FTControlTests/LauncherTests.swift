import FTLauncher
import FTSystem
import Foundation
import Testing

@Suite("cluster launcher config")
struct ClusterConfigTests {
    func config(_ text: String) throws -> ClusterConfig {
        var c = ClusterConfig()
        try c.apply(file: text, name: "test.conf")
        return c
    }

    func error(_ c: ClusterConfig, binaries: String = productsDirectory) -> String? {
        do {
            try c.validate(binaries: binaries)
            return nil
        } catch {
            return "\(error.codeName): \(error.message)"
        }
    }

    @Test("a config file sets every key; comments and blank lines are fine; unknown keys and bad values name their line")
    func parsing() throws {
        let c = try config("""
            # a job
            nodes = 6
            workers_per_node = 1   # one each

            ec = 4+2
            spares = 2
            snapshot_interval = 5
            steps = 100
            worker_command = /bin/sleep 1000
            port = 0
            run_dir = /tmp/x
            job_id = abc
            heartbeat_ms = 50
            timeout_ms = 300
            phase_timeout = 60
            memory_limit = 8G
            data_host = 10.0.0.2
            """)
        #expect(c.nodes == 6 && c.workersPerNode == 1 && c.erasure == .init(k: 4, m: 2) && c.spares == 2)
        #expect(c.snapshotInterval == 5 && c.steps == 100 && c.workerCommand == ["/bin/sleep", "1000"])
        #expect(c.runDirectory == "/tmp/x" && c.jobID == "abc" && c.heartbeatMs == 50 && c.timeoutMs == 300 && c.phaseTimeout == 60)
        #expect(c.memoryLimit == 8 << 30 && c.jobOptions(binaries: "/b", runDirectory: "/r", jobID: "j").memoryLimit == 8 << 30)
        #expect(c.dataHost == "10.0.0.2" && c.jobOptions(binaries: "/b", runDirectory: "/r", jobID: "j").dataHost == "10.0.0.2")
        #expect(ClusterConfig.parseBytes("512M") == 512 << 20 && ClusterConfig.parseBytes("4096") == 4096 && ClusterConfig.parseBytes("2GiB") == 2 << 30)
        #expect(ClusterConfig.parseBytes("0") == nil && ClusterConfig.parseBytes("-1G") == nil && ClusterConfig.parseBytes("lots") == nil)
        #expect(ClusterConfig.parseBytes("9999999999999T") == nil)
        #expect(throws: ClusterConfig.ConfigError(.badValue, "test.conf:1: memory_limit must be a positive size in bytes (e.g. 8G, 512M), not '8Q'")) {
            try config("memory_limit = 8Q")
        }
        #expect(try config("ec = none").erasure == nil)
        // The persistent tier: a directory alone persists every 100 steps; bad cadences name their line.
        let persisted = try config("persist_dir = /data/ft\npersist_keep = 3\npersist_mbps = 250")
        let po = persisted.jobOptions(binaries: "/b", runDirectory: "/r", jobID: "j")
        #expect(po.persistDirectory == "/data/ft" && po.persistEvery == 100 && po.persistSeconds == nil && po.persistKeep == 3 && po.persistMbps == 250)
        #expect(try config("persist_dir = /d\npersist_seconds = 60").jobOptions(binaries: "/b", runDirectory: "/r", jobID: "j").persistEvery == nil)
        #expect(throws: ClusterConfig.ConfigError(.badValue, "test.conf:1: persist_every must be at least 1 step, not '0'")) { try config("persist_every = 0") }
        #expect(throws: ClusterConfig.ConfigError(.badValue, "test.conf:1: persist_keep must be at least 1, not '0'")) { try config("persist_keep = 0") }
        #expect(c.hosts == .local && c.jobOptions(binaries: "/b", runDirectory: "/r", jobID: "j").netns == false)
        let netns = try config("hosts = netns")
        #expect(netns.hosts == .netns && netns.jobOptions(binaries: "/b", runDirectory: "/r", jobID: "j").netns)
        #expect(throws: ClusterConfig.ConfigError(.badValue, "test.conf:1: hosts must be local, netns or slurm, not 'ssh'")) { try config("hosts = ssh") }
        #expect(throws: ClusterConfig.ConfigError(.unknownKey, "test.conf:2: unknown key 'nodez' (known: data_host, ec, heartbeat_ms, hosts, job_id, memory_limit, metrics, node_failures_per_day, nodes, persist_dir, persist_every, persist_keep, persist_mbps, persist_seconds, phase_timeout, port, run_dir, snapshot_interval, spares, steps, timeout_ms, worker_command, workers_per_node)")) {
            try config("nodes = 4\nnodez = 4")
        }
        // Metrics: auto by default (a free port on the coordinator's host), off, or HOST:PORT; the durability prior.
        #expect(c.jobOptions(binaries: "/b", runDirectory: "/r", jobID: "j").metrics == nil)
        #expect(try config("metrics = off").jobOptions(binaries: "/b", runDirectory: "/r", jobID: "j").metrics == "off")
        #expect(try config("metrics = 127.0.0.1:9400").metrics == "127.0.0.1:9400")
        #expect(throws: ClusterConfig.ConfigError(.badValue, "test.conf:1: metrics must be auto, off or HOST:PORT (e.g. 127.0.0.1:9400), not '9400'")) {
            try config("metrics = 9400")
        }
        #expect(try config("node_failures_per_day = 0.01").jobOptions(binaries: "/b", runDirectory: "/r", jobID: "j").nodeFailuresPerDay == 0.01)
        #expect(throws: ClusterConfig.ConfigError(.badValue, "test.conf:1: node_failures_per_day must be a rate in [0, 100) failures per node per day, not '-1'")) {
            try config("node_failures_per_day = -1")
        }
        #expect(throws: ClusterConfig.ConfigError(.badValue, "test.conf:1: nodes must be a whole number, not 'four'")) { try config("nodes = four") }
        #expect(throws: ClusterConfig.ConfigError(.syntax, "test.conf:1: expected key = value, got 'nodes 4'")) { try config("nodes 4") }
        #expect(throws: ClusterConfig.ConfigError(.badValue, "test.conf:1: ec must be K+M (e.g. 3+1) or none, not '3-1'")) { try config("ec = 3-1") }
        #expect(throws: ClusterConfig.ConfigError(.badValue, "test.conf:1: phase_timeout must be a positive number of seconds, not '0'")) {
            try config("phase_timeout = 0")
        }
    }

    @Test("bad configs are refused before anything starts, each with a clear reason")
    func validation() throws {
        var c = ClusterConfig()
        #expect(error(c) == nil)
        c.nodes = 3
        #expect(error(c) == "inconsistent: ec 3+1 needs groups of 4 nodes, and the job has only 3")
        c.nodes = 6
        #expect(error(c) == "inconsistent: ec 3+1 cuts the nodes into groups of 4: 6 nodes do not divide into them")
        c = ClusterConfig()
        c.erasure = nil
        c.spares = 1
        #expect(error(c) == "inconsistent: spares need ec: a spare rebuilds a lost node from its group's parity")
        c = ClusterConfig()
        c.hosts = .netns
        c.dataHost = "10.0.0.2"
        #expect(error(c) == NetnsHosts.unavailableReason.map { "unavailable: hosts = netns: \($0)" }
            ?? "inconsistent: data_host names one address for every node; with hosts = netns each SMP serves on its own host's address: leave data_host out")
        c = ClusterConfig()
        c.dataHost = "tcp://10.0.0.2:5000"
        #expect(error(c) == "bad_value: data_host must be an IPv4 address or host name such as 127.0.0.1 or 10.0.0.2, not 'tcp://10.0.0.2:5000'")
        c = ClusterConfig()
        c.snapshotInterval = 0
        #expect(error(c) == "bad_value: snapshot_interval must be at least 1 step, not 0")
        c = ClusterConfig()
        #expect(error(c, binaries: "/nonexistent")?.hasPrefix("missing_executable: /nonexistent/ft-coordinator is missing or not executable") == true)
        c.workerCommand = ["/nonexistent/trainer"]
        #expect(error(c) == "missing_executable: worker command '/nonexistent/trainer' is not an executable file, nor found in PATH")
        c.workerCommand = ["/tmp"]
        #expect(error(c) == "missing_executable: worker command '/tmp' is not an executable file, nor found in PATH")
        c.workerCommand = ["sleep", "10"]
        #expect(error(c) == nil)

        // A port something listens on.
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        _ = listen(fd, 1)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        c.port = Int(UInt16(bigEndian: address.sin_port))
        #expect(error(c)?.hasPrefix("port_unavailable: port \(c.port) on 127.0.0.1 is not available (Address already in use)") == true, "\(error(c) ?? "")")
    }
}

@Suite("cluster launcher (real processes)", .serialized)
struct LauncherProcessTests {
    @Test("ft-launch start runs a job in its own process groups, a spare takes over a killed node, ft-launch stop ends exactly the recorded PIDs",
          .timeLimit(.minutes(3)))
    func startSpareStop() throws {
        realProcessJobs.lock()
        defer { realProcessJobs.unlock() }
        let dir = "/tmp/ft-ctl-launch-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let job = "launch\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let out = dir + ".out"
        defer { unlink(out) }
        let launcher = try ChildProcess(
            arguments: [productsDirectory + "/ft-launch", "start", "--nodes", "4", "--workers-per-node", "1", "--ec", "3+1", "--spares", "1",
                        "--snapshot-interval", "2", "--run-dir", dir, "--job-id", job, "--",
                        productsDirectory + "/ft-toy-worker", "--steps", "100000", "--state-kib", "64", "--step-ms", "5"],
            environment: ProcessInfo.processInfo.environment, outputPath: out)
        defer {
            if launcher.poll() == nil { launcher.kill(SIGKILL); launcher.wait(timeoutSeconds: 5) }
            RecordedProcesses.freeSharedMemory(job: job)
        }
        #expect(waitUntil(seconds: 60) { readText(out).contains("is running") }, "\(readText(out))")
        #expect(readText(out).contains("ftctl status --run-dir \(dir) --watch"))
        let pids = readText(dir + "/job.pids")
        for role in ["launcher", "coordinator", "smp-n0", "smp-n3", "spare0"] { #expect(pids.contains(role + " "), "\(pids)") }
        // Each node is its own process group, led by its SMP.
        let smp1 = try #require(pids.split(separator: "\n").first { $0.hasPrefix("smp-n1 ") }.flatMap { Int32($0.split(separator: " ")[1]) })
        #expect(getpgid(smp1) == smp1)
        let worker1 = try #require(Int32(readText(dir + "/pids/n1-w0.pid").trimmingCharacters(in: .whitespacesAndNewlines)))
        #expect(getpgid(worker1) == smp1)
        // The coordinator reports the interval the workers use.
        let (_, status, _) = try runTool("ftctl", ["status", "--run-dir", dir, "--json"])
        let o = try #require(try JSONSerialization.jsonObject(with: Data(status.utf8)) as? [String: Any])
        #expect(int(o["snapshot_interval"]) == 2)
        func jobStatus() -> [String: Any] {
            ((try? JSONSerialization.jsonObject(with: Data(runTool("ftctl", ["status", "--run-dir", dir, "--json"]).1.utf8))) as? [String: Any]) ?? [:]
        }
        // A snapshot every 2 steps: every committed step is even (workers wait for a
        // pending round rather than skip, and restores land on committed steps).
        var committed: [Int] = []
        #expect(waitUntil(seconds: 30) {
            committed.append(int(jobStatus()["committed_step"]))
            return committed.last! >= 10
        })
        #expect(committed.allSatisfy { $0 == -1 || $0 % 2 == 0 }, "\(committed)")

        // Kill node n1: the spare takes its place and rebuilds it.
        kill(worker1, SIGKILL)
        kill(smp1, SIGKILL)
        // (The last failure of the loss, the SMP or one of its workers, is the one recovery resumes from.)
        #expect(waitUntil(seconds: 60) { readText(out).contains("recovered from") }, "\(readText(out))\n\(jobLogs(dir))")
        #expect(readText(out).contains("launcher: spare0 (pid"), "\(readText(out))")
        #expect(readText(dir + "/spare0.log").contains("rebuilt node n1"), "\(readText(dir + "/spare0.log"))")
        let recovered = jobStatus()
        let restored = ((recovered["failures"] as? [[String: Any]]) ?? []).filter { $0["outcome"] as? String == "resumed" }.map { int($0["restored_step"]) }
        #expect(!restored.isEmpty && restored.allSatisfy { $0 % 2 == 0 }, "\(restored)")
        #expect(int(recovered["committed_step"]) % 2 == 0)
        let all = RecordedProcesses.all(runDirectory: dir).filter { RecordedProcesses.belongs($0, toJob: job) }
        #expect(all.count >= 9)  // coordinator, 4 SMPs (one the former spare), 4 workers
        // ftctl status lists the spare (from the run directory) as the node it took over, and the table says so.
        let spares = (jobStatus()["spares"] as? [[String: Any]]) ?? []
        #expect(spares.count == 1 && spares.first?["id"] as? String == "spare0" && spares.first?["node"] as? String == "n1"
                && spares.first?["state"] as? String == "took over", "\(spares)")
        let (_, table, _) = try runTool("ftctl", ["status", "--run-dir", dir])
        #expect(table.contains("spares: spare0 took over n1"), "\(table)")
        #expect(table.contains("durability: a node failure is beyond memory with p = "), "\(table)")

        let (stopStatus, stopText, _) = try runTool("ft-launch", ["stop", dir])
        #expect(stopStatus == .exited(0), "\(stopText)")
        #expect(stopText.contains("0 recorded processes alive, 0 shared-memory segments left"), "\(stopText)")
        #expect(launcher.wait(timeoutSeconds: 10) != nil)
        #expect(all.allSatisfy { kill($0, 0) != 0 })
        #expect(RecordedProcesses.segments(job: job).isEmpty)
        let (again, againText, _) = try runTool("ft-launch", ["stop", dir])
        #expect(again == .exited(0) && againText.contains("nothing of it is running"), "\(againText)")
    }

    @Test("a job that cannot start stops at once saying why (workers over the memory budget; a worker that exits at start-up), leaving nothing",
          arguments: ["memory", "exits"])
    func cannotStart(_ cause: String) throws {
        realProcessJobs.lock()
        defer { realProcessJobs.unlock() }
        let dir = "/tmp/ft-ctl-nostart-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let job = "nostart\(getpid())\(cause)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        defer { RecordedProcesses.freeSharedMemory(job: job) }
        // 2 slots of 64 MiB per worker, over a 16 MiB budget.
        let worker = cause == "memory" ? [productsDirectory + "/ft-toy-worker", "--steps", "100", "--state-kib", "65536"] : ["/bin/false"]
        // The start timeout is far away: the launcher must end on the job's own report.
        let (status, text, _) = try runTool("ft-launch", ["start", "--nodes", "2", "--workers-per-node", "1", "--ec", "none",
                                                          "--memory-limit", "16M", "--start-timeout", "600", "--run-dir", dir,
                                                          "--job-id", job, "--"] + worker, timeout: 120)
        #expect(status == .exited(1), "\(text)")
        let expected = cause == "memory"
            ? "cannot start: worker w0 needs 134217" : "exited \(3) times before it joined the job (last: exit 1)"
        #expect(text.contains("the job did not start running: it stopped: worker n"), "\(text)")
        #expect(text.contains(expected), "\(text)")
        let recorded = RecordedProcesses.all(runDirectory: dir)
        #expect(recorded.count >= 3, "\(recorded)")  // the coordinator, 2 SMPs, their workers
        #expect(!recorded.contains { RecordedProcesses.belongs($0, toJob: job) }, "\(recorded)")
        #expect(RecordedProcesses.segments(job: job).isEmpty)
    }

    @Test("--hosts netns: every node, spare and the coordinator on a host of its own; no socket on loopback; the job's work crosses hosts; after SIGKILL of the launcher, ft-launch stop removes every namespace, process and segment",
          .enabled(if: NetnsHosts.unavailableReason == nil, "network namespaces are unavailable here: \(NetnsHosts.unavailableReason ?? "")"),
          .timeLimit(.minutes(3)))
    func netnsHosts() throws {
        realProcessJobs.lock()
        defer { realProcessJobs.unlock() }
        let dir = "/tmp/ft-ctl-netns-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let job = "netns\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let out = dir + ".out"
        defer { unlink(out) }
        let launcher = try ChildProcess(
            arguments: [productsDirectory + "/ft-launch", "start", "--hosts", "netns", "--nodes", "4", "--workers-per-node", "2", "--ec", "3+1",
                        "--spares", "1", "--run-dir", dir, "--job-id", job, "--",
                        productsDirectory + "/ft-demo-trainer", "--steps", "100000", "--report-every", "1000"],
            environment: ProcessInfo.processInfo.environment, outputPath: out)
        defer {
            // Whatever happened: the processes, the segments and the namespaces go.
            if launcher.poll() == nil { launcher.kill(SIGKILL); launcher.wait(timeoutSeconds: 5) }
            for pid in RecordedProcesses.all(runDirectory: dir) where RecordedProcesses.belongs(pid, toJob: job) { kill(pid, SIGKILL) }
            RecordedProcesses.freeSharedMemory(job: job)
            NetnsHosts.remove(recordIn: dir)
        }
        #expect(waitUntil(seconds: 60) { readText(out).contains("is running") }, "\(readText(out))")
        let record = readText(dir + "/netns").split(separator: "\n").filter { $0.hasPrefix("netns ") }.map { String($0.dropFirst(6)) }
        #expect(record.count == 6, "coordinator, 4 nodes, 1 spare: \(record)")
        for ns in record { #expect(FileManager.default.fileExists(atPath: "/run/netns/" + ns), "\(ns)") }
        // Rounds commit across hosts: the data planes serve on the hosts' addresses.
        func jobStatus() -> [String: Any] {
            ((try? JSONSerialization.jsonObject(with: Data(runTool("ftctl", ["status", "--run-dir", dir, "--json"]).1.utf8))) as? [String: Any]) ?? [:]
        }
        #expect(waitUntil(seconds: 60) { int(jobStatus()["committed_step"]) >= 20 })
        let endpoint = readText(dir + "/coordinator.endpoint").trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(endpoint.hasPrefix("tcp://10.") && !endpoint.contains("127.0.0.1"), "\(endpoint)")
        let smpLog = readText(dir + "/smp-n1.log")
        #expect(smpLog.contains("data endpoint on 10."), "\(smpLog.prefix(2000))")
        // Nothing of the job listens or connects on loopback: every namespace's TCP sockets are between hosts.
        let processes = RecordedProcesses.all(runDirectory: dir).filter { RecordedProcesses.belongs($0, toJob: job) }
        #expect(processes.count >= 14, "coordinator, 4 SMPs, 8 workers, 1 spare: \(processes)")
        var sockets = 0
        for pid in processes {
            let text = readText("/proc/\(pid)/net/tcp")
            sockets += max(0, text.split(separator: "\n").count - 1)
            let loopback = NetnsHosts.loopbackSockets(namespaceOf: pid)
            #expect(loopback.isEmpty, "pid \(pid) (\(readText("/proc/\(pid)/cmdline").prefix(60))): \(loopback)")
        }
        #expect(sockets > 20, "the check saw the job's TCP sockets (\(sockets))")

        // The launcher dies without cleaning up; ft-launch stop ends its processes and removes its hosts.
        launcher.kill(SIGKILL)
        launcher.wait(timeoutSeconds: 10)
        #expect(processes.contains { RecordedProcesses.belongs($0, toJob: job) }, "the job outlives its launcher until stopped")
        let (stopStatus, stopText, _) = try runTool("ft-launch", ["stop", dir])
        #expect(stopStatus == .exited(0), "\(stopText)")
        #expect(stopText.contains("0 recorded processes alive, 0 shared-memory segments left"), "\(stopText)")
        // (Orphans of the dead launcher may linger as zombies until init reaps them: nothing of the job runs.)
        #expect(processes.allSatisfy { !RecordedProcesses.belongs($0, toJob: job) })
        #expect(RecordedProcesses.segments(job: job).isEmpty)
        for ns in record { #expect(!FileManager.default.fileExists(atPath: "/run/netns/" + ns), "\(ns) left") }
        #expect(NetnsHosts.leftovers(recordIn: dir).isEmpty)
        let links = ((try? FileManager.default.contentsOfDirectory(atPath: "/sys/class/net")) ?? []).filter { n in record.contains { $0.hasPrefix(n.prefix(8)) } }
        #expect(links.isEmpty, "links or bridge left: \(links)")
    }

    @Test("a bad config is refused before any process starts")
    func refusedConfig() throws {
        let dir = "/tmp/ft-ctl-launchbad-\(getpid())"
        let (status, text, _) = try runTool("ft-launch", ["start", "--nodes", "3", "--ec", "3+1", "--run-dir", dir])
        #expect(status == .exited(64), "\(text)")
        #expect(text.contains("bad config: ec 3+1 needs groups of 4 nodes, and the job has only 3"), "\(text)")
        #expect(!FileManager.default.fileExists(atPath: dir))
    }
}
