import FTControl
import FTCore
import FTSystem
import FTZMQ
import Foundation
import Synchronization

/// A job of real processes on this host: a coordinator and `nodes` SMPs, each
/// spawning its workers, with per-job CURVE keys: all on loopback, or with
/// `netns` each on a host of its own (a network namespace with its own
/// address: `NetnsHosts`), the coordinator on one more and every spare on its
/// own. Each SMP
/// (a node: the SMP and its workers) and the coordinator run in a process
/// group of their own. Every process it starts is recorded in
/// `RUN_DIR/job.pids` (the SMPs record their workers in `RUN_DIR/pids`) and
/// `stop()` ends exactly those, by PID.
public final class LocalJob: @unchecked Sendable {
    public struct Options: Sendable {
        public var nodes = 2
        public var workersPerNode = 1
        /// The worker command, without the FT_* environment the SMP adds.
        public var workerCommand: [String] = []
        public var curve = true
        public var lingerMs = 1000
        public var heartbeatMs = 100
        public var timeoutMs = 500
        /// Erasure coding across nodes, e.g. (3, 1).
        public var erasure: (k: Int, m: Int)?
        /// Extra environment of the first SMP of a node (not of its replacements).
        public var smpEnvironment: [Int: [String: String]] = [:]
        /// Extra environment of every SMP (and so of every worker).
        public var environment: [String: String] = [:]
        /// The coordinator's loopback port (nil: a free one).
        public var coordinatorPort: Int?
        /// Spare SMPs started in standby; a lost node is taken over by one while any is left.
        public var spares = 0
        /// Workers snapshot every this many steps (FT_SNAPSHOT_INTERVAL).
        public var snapshotInterval = 1
        /// The floor of a recovery phase's deadline in seconds (nil: the coordinator's default).
        public var phaseTimeout: Double?
        /// Each SMP's shared-memory budget in bytes (`ft-smp --memory-limit`; nil: its default).
        public var memoryLimit: Int?
        /// Each SMP's data endpoint on `tcp://dataHost:*` (CURVE with the job's
        /// keys) instead of its private ipc socket (`ft-smp --data-endpoint`).
        public var dataHost: String?
        /// Every node, spare and the coordinator on a host of its own: a
        /// network namespace with its own address on a bridge (`NetnsHosts`;
        /// needs root). SMPs serve their data planes on their host's address,
        /// found from the route to the coordinator (`--data-endpoint auto`).
        public var netns = false
        /// Every node and spare a job step of its own on a host of this Slurm
        /// allocation, the coordinator beside the launcher on the batch host
        /// (`SlurmAllocation`; the run directory on a filesystem every host sees).
        public var slurm: SlurmAllocation?
        /// The coordinator's Prometheus endpoint (`ft-coordinator --metrics`): nil, a
        /// free port on its host's address (written to RUN_DIR/metrics.endpoint);
        /// "off"; or HOST:PORT.
        public var metrics: String?
        /// The job's last step, when known (`ft-coordinator --total-steps`).
        public var totalSteps: Int?
        /// The durability estimate's prior rate (`ft-coordinator --node-failures-per-day`; nil: its default).
        public var nodeFailuresPerDay: Double?
        /// The persistent tier (`ft-smp --persist-dir`, `ft-coordinator
        /// --persist-every/--persist-seconds`): nil directory, off.
        public var persistDirectory: String?
        public var persistEvery: Int?
        public var persistSeconds: Double?
        public var persistKeep: Int?
        public var persistMbps: Double?
        /// A cold restart: the first SMPs load this persisted step from `persistDirectory` (`--resume-step`).
        public var resumeStep: Int?
        /// Where ft-coordinator and ft-smp are.
        public var binaries: String
        public var runDirectory: String
        public var jobID: String

        public init(binaries: String, runDirectory: String, jobID: String) {
            self.binaries = binaries
            self.runDirectory = runDirectory
            self.jobID = jobID
        }
    }

    public let options: Options
    public let endpoint: String
    public private(set) var coordinator: ChildProcess?
    public private(set) var smps: [ChildProcess] = []
    /// Spares still in standby.
    public private(set) var spares: [(index: Int, process: ChildProcess)] = []
    private let coordinatorArgs: [String]
    /// The job's hosts when it runs on network namespaces.
    public let hosts: NetnsHosts?
    /// The Slurm host of each role ("coordinator", "n0", "spare0", …) when it runs on Slurm.
    public let slurmHosts: [String: String]
    /// Slurm step names of the `srun` processes this job started, by their pid.
    private var stepNames: [Int32: String] = [:]
    private var stepCount = 0
    /// `scancel`s started and not waited for.
    private var background: [ChildProcess] = []

    public var dir: String { options.runDirectory }
    public var job: String { options.jobID }

    public init(_ options: Options) throws {
        self.options = options
        Self.live.withLock { $0[options.runDirectory] = options.jobID }
        try FileManager.default.createDirectory(atPath: options.runDirectory, withIntermediateDirectories: true)
        if options.curve { try JobKeys.generate(in: options.runDirectory + "/keys", nodes: (0..<options.nodes).map { "n\($0)" }) }
        try (options.jobID + "\n").write(toFile: options.runDirectory + "/job.id", atomically: true, encoding: .utf8)
        let port = try options.coordinatorPort ?? Self.freePort()
        hosts = options.netns
            ? try NetnsHosts(roles: ["coordinator"] + (0..<options.nodes).map { "n\($0)" } + (0..<options.spares).map { "spare\($0)" },
                             runDirectory: options.runDirectory)
            : nil
        let roles = try options.slurm?.plan(nodes: options.nodes, spares: options.spares) ?? [:]
        slurmHosts = roles
        let coordinatorAddress = hosts?.host("coordinator").address
            ?? options.slurm.flatMap { s in roles["coordinator"].flatMap { s.addresses[$0] } } ?? "127.0.0.1"
        endpoint = "tcp://\(coordinatorAddress):\(port)"
        coordinatorArgs = [options.binaries + "/ft-coordinator", "--job-id", options.jobID, "--nodes", "\(options.nodes)",
                           "--workers-per-node", "\(options.workersPerNode)", "--endpoint", endpoint, "--run-dir", options.runDirectory,
                           "--linger-ms", "\(options.lingerMs)", "--heartbeat-ms", "\(options.heartbeatMs)", "--timeout-ms", "\(options.timeoutMs)"]
            + (options.curve ? ["--keys", options.runDirectory + "/keys"] : [])
            + (options.erasure.map { ["--ec", "\($0.k)+\($0.m)"] } ?? [])
            + ["--snapshot-interval", "\(options.snapshotInterval)"]
            + (options.phaseTimeout.map { ["--phase-timeout", "\($0)"] } ?? [])
            + (options.totalSteps.map { ["--total-steps", "\($0)"] } ?? [])
            + (options.nodeFailuresPerDay.map { ["--node-failures-per-day", "\($0)"] } ?? [])
            + (options.persistDirectory != nil ? (options.persistEvery.map { ["--persist-every", "\($0)"] } ?? [])
                + (options.persistSeconds.map { ["--persist-seconds", "\($0)"] } ?? []) : [])
            + (options.metrics == "off" ? [] : ["--metrics", options.metrics ?? "\(coordinatorAddress):0"])
        do {
            try startCoordinator()
            for n in 0..<options.nodes { smps.append(try startSMP(node: n, environment: options.smpEnvironment[n] ?? [:], resume: true)) }
            if options.spares > 0 { try FileManager.default.createDirectory(atPath: dir + "/spares", withIntermediateDirectories: true) }
            for i in 0..<options.spares {
                let args = smpArguments(node: "spare\(i)", rankOffset: 0) + ["--standby", dir + "/spares/spare\(i).assign", "--"] + options.workerCommand
                spares.append((i, try spawn("spare\(i)", args, environment: smpEnvironment([:]), output: dir + "/spare\(i).log")))
            }
            try writePIDs()
        } catch {
            stop(removeFiles: false)
            throw error
        }
    }

    /// `args` run on `role`'s host: in its namespace, as a Slurm step of its own
    /// on its host (the coordinator runs beside the launcher), or as they are on one host.
    private func placed(_ role: String, _ args: [String]) -> [String] {
        if let slurm = options.slurm {
            guard role != "coordinator", let host = slurmHosts[role] else { return args }
            stepCount += 1
            pendingStepName = "ft-\(options.jobID)-\(role)-\(stepCount)"
            return slurm.stepCommand(host: host, name: pendingStepName!, args)
        }
        return hosts.map { $0.command(role, args) } ?? args
    }

    /// The step name `placed` gave the process about to start.
    private var pendingStepName: String?

    /// Starts `args` on `role`'s host, recording its Slurm step.
    private func spawn(_ role: String, _ args: [String], environment: [String: String], output: String) throws -> ChildProcess {
        pendingStepName = nil
        let p = try ChildProcess(arguments: placed(role, args), environment: environment, newProcessGroup: true, outputPath: output)
        if let name = pendingStepName { stepNames[p.pid] = name }
        return p
    }

    /// The address of `role`'s host (127.0.0.1 on one host).
    public func address(of role: String) -> String {
        if let slurm = options.slurm, let host = slurmHosts[role] { return slurm.addresses[host] ?? host }
        return hosts?.host(role).address ?? "127.0.0.1"
    }

    private func smpArguments(node: String, rankOffset: Int) -> [String] {
        [options.binaries + "/ft-smp", "--job-id", options.jobID, "--node-id", node, "--run-dir", options.runDirectory,
         "--workers", "\(options.workersPerNode)", "--coordinator", endpoint,
         "--rank-offset", "\(rankOffset)", "--world-size", "\(options.nodes * options.workersPerNode)",
         "--heartbeat-ms", "\(options.heartbeatMs)", "--timeout-ms", "\(options.timeoutMs)"]
            + (options.curve ? ["--keys", options.runDirectory + "/keys"] : [])
            + (options.memoryLimit.map { ["--memory-limit", "\($0)"] } ?? [])
            + (options.persistDirectory.map { ["--persist-dir", $0] } ?? [])
            + (options.persistKeep.map { ["--persist-keep", "\($0)"] } ?? [])
            + (options.persistMbps.map { ["--persist-mbps", "\($0)"] } ?? [])
            + (options.dataHost.map { ["--data-endpoint", "tcp://\($0):*"] + (options.curve ? [] : ["--insecure"]) } ?? [])
            + ((options.netns || options.slurm != nil) && options.dataHost == nil ? ["--data-endpoint", "auto"] + (options.curve ? [] : ["--insecure"]) : [])
    }

    private func smpEnvironment(_ extra: [String: String]) -> [String: String] {
        var env = ProcessInfo.processInfo.environment.merging(options.environment) { $1 }.merging(extra) { $1 }
        env["FT_SNAPSHOT_INTERVAL"] = "\(options.snapshotInterval)"
        // For workers on the C interface (ft_torch): the library beside these
        // binaries, and torch.distributed's rendezvous (a port per epoch).
        let library = options.binaries + "/libFTWorkerC.so"
        if env["FT_WORKER_LIB"] == nil, FileManager.default.fileExists(atPath: library) { env["FT_WORKER_LIB"] = library }
        // torch.distributed's store on rank 0's host (n0's: a spare that takes n0 over elsewhere does not move it).
        env["FT_MASTER_ADDR"] = env["FT_MASTER_ADDR"] ?? address(of: "n0")
        env["FT_MASTER_PORT_BASE"] = env["FT_MASTER_PORT_BASE"] ?? "\(masterPorts.base)"
        env["FT_MASTER_PORT_SPAN"] = env["FT_MASTER_PORT_SPAN"] ?? "\(masterPorts.span)"
        return env
    }

    /// MASTER_PORT of epoch e is `base + e mod span`: ports below the
    /// ephemeral range, all free when the job started.
    private lazy var masterPorts: (base: Int, span: Int) = Self.freePortRange(span: 32, seed: options.jobID)

    /// `span` consecutive loopback ports in 20000-32767 that are free now,
    /// searched from a place that depends on `seed` (jobs side by side differ).
    static func freePortRange(span: Int, seed: String) -> (base: Int, span: Int) {
        let first = 20000, last = 32767 - span
        let hash = seed.utf8.reduce(UInt32(2_166_136_261)) { ($0 ^ UInt32($1)) &* 16_777_619 }  // FNV-1a
        let start = first + Int(hash % UInt32(last - first))
        for offset in stride(from: 0, to: last - first, by: span) {
            let base = first + (start - first + offset) % (last - first)
            if (base..<base + span).allSatisfy({ ClusterConfig.portUnavailable($0) == nil }) { return (base, span) }
        }
        return (start, span)  // none entirely free: a rendezvous that fails is a failure, and the next epoch moves on
    }

    /// A lost node's replacement: a spare in standby if one is left (it is
    /// told the node's identity), otherwise the node's SMP started again.
    /// Returns what it did.
    @discardableResult
    public func replaceNode(_ n: Int) throws -> String {
        // A spare that ended on its own (it crashed, or its launcher went) is no spare.
        spares.removeAll { $0.process.poll() != nil }
        guard !spares.isEmpty else {
            try startSMP(node: n)
            return "started a replacement SMP for n\(n)"
        }
        let spare = spares.removeFirst()
        hostOfNode[n] = "spare\(spare.index)"
        let path = dir + "/spares/spare\(spare.index).assign"
        // Written whole then renamed: the spare never reads half an assignment.
        try "n\(n) \(n * options.workersPerNode)\n".write(toFile: path + ".tmp", atomically: false, encoding: .utf8)
        guard rename(path + ".tmp", path) == 0 else { throw SystemError("rename \(path)", errno: errno) }
        retired.append(smps[n])
        smps[n] = spare.process
        try writePIDs()
        return "spare\(spare.index) (pid \(spare.process.pid)) took over n\(n)"
    }

    /// Ends, with SIGKILL to its process group (the SMP and its workers), the
    /// SMP the coordinator declared dead as node `n`: the one with
    /// `declaredPID` if this job started it, or when the pid is unknown (0: a
    /// restarted coordinator never heard from the node) whatever runs as `n`.
    /// Returns what it did, nil when nothing of ours was running.
    public func killNode(_ n: Int, declaredPID: Int32) -> String? {
        if let slurm = options.slurm {
            // The pid is the remote SMP's; the step is ended where it runs (SIGKILL to the
            // local srun would leave it running there).
            // The local srun may have ended (it lost its host) while the step lives on
            // there (a partition): the step is looked up whatever srun's state.
            let smp = smps[n]
            guard let name = stepNames[smp.pid] else { return nil }
            let id = slurm.steps(named: name)[name]
            guard id != nil || smp.poll() == nil else { return nil }
            // Not waited for: the replacement starts now, whatever the lost host's state.
            background.removeAll { $0.poll() != nil }
            if let id, let p = slurm.signalInBackground(steps: [id], "KILL") { background.append(p) }
            smp.kill(SIGKILL)
            return "ended n\(n)'s step \(id ?? name) (scancel --signal=KILL): declared dead"
        }
        let candidates = declaredPID > 0 ? (smps + retired + spares.map(\.process)).filter { $0.pid == declaredPID } : [smps[n]]
        guard let smp = candidates.first, smp.poll() == nil else { return nil }
        kill(-smp.pid, SIGKILL)  // its process group: the SMP and the workers it started
        smp.kill(SIGKILL)
        return "killed n\(n)'s SMP (pid \(smp.pid)) and its workers: declared dead"
    }

    /// Starts (or restarts, as the replacement of a lost node) the SMP of node `n`.
    @discardableResult
    /// `resume`: the job's first SMPs of a cold restart load `options.resumeStep`
    /// (a replacement is rebuilt by the coordinator instead).
    public func startSMP(node n: Int, environment extra: [String: String] = [:], resume: Bool = false) throws -> ChildProcess {
        let args = smpArguments(node: "n\(n)", rankOffset: n * options.workersPerNode)
            + (resume ? options.resumeStep.map { ["--resume-step", "\($0)"] } ?? [] : []) + ["--"] + options.workerCommand
        let smp = try spawn("n\(n)", args, environment: smpEnvironment(extra), output: options.runDirectory + "/smp-n\(n).log")
        hostOfNode[n] = "n\(n)"
        if n < smps.count {
            retired.append(smps[n])
            smps[n] = smp
            try writePIDs()
        }
        return smp
    }

    /// Frees the shared memory of every SMP of this job that has ended (by the
    /// pid in its segments' names: a live SMP's are never touched). Returns how
    /// many segments were freed.
    @discardableResult
    public func freeMemoryOfEndedSMPs() -> Int {
        let ended = (smps + retired + spares.map(\.process)).filter { $0.poll() != nil }.map(\.pid)
        var freed = 0
        for name in RecordedProcesses.segments(job: job) where ended.contains(where: { name.contains("-p\($0)-") }) {
            if SharedMemorySegment.unlink(name: "/" + name) { freed += 1 }
        }
        return freed
    }

    /// The host node `n` runs on now: "n<n>" (its own), or the spare's ("spare<i>") that took it over.
    public private(set) var hostOfNode: [Int: String] = [:]

    /// SMP processes replaced by `startSMP` (still ended by `stop()`).
    public private(set) var retired: [ChildProcess] = []

    /// `RUN_DIR/job.pids`: one "ROLE PID" line per process this object
    /// started, current and past (SMPs record their workers in `RUN_DIR/pids`).
    private func writePIDs() throws {
        var pids = "launcher \(getpid())\n"
        for c in coordinators { pids += "coordinator \(c.pid)\n" }
        for (n, s) in smps.enumerated() { pids += "smp-n\(n) \(s.pid)\n" }
        for s in spares { pids += "spare\(s.index) \(s.process.pid)\n" }
        for s in retired { pids += "retired-smp \(s.pid)\n" }
        try pids.write(toFile: options.runDirectory + "/job.pids", atomically: true, encoding: .utf8)
    }

    private var coordinators: [ChildProcess] = []

    /// Starts (or restarts) the coordinator on the job's endpoint.
    public func startCoordinator() throws {
        let c = try spawn("coordinator", coordinatorArgs, environment: ProcessInfo.processInfo.environment, output: options.runDirectory + "/coordinator.log")
        coordinator = c
        coordinators.append(c)
        if !smps.isEmpty { try writePIDs() }
    }

    public func workerPID(node: Int, worker: Int) -> Int32? {
        Int32(Self.read(dir + "/pids/n\(node)-w\(worker).pid").trimmingCharacters(in: .whitespacesAndNewlines))
    }

    public func workerLog(node: Int, worker: Int) -> String { Self.read(dir + "/logs/n\(node)-w\(worker).log") }

    /// The coordinator's status document (schema 1), or nil when it does not answer in time.
    public func status(timeout: Double = 1) -> [String: Any]? {
        guard let ctx = try? ZMQContext(), let s = try? ctx.socket(.dealer, maxMessageBytes: ControlMessage.maxFrameBytes) else { return nil }
        defer { s.close() }
        try? s.setLinger(milliseconds: 0)
        if options.curve, let keys = try? JobKeys.load(from: dir + "/keys", role: .operator) {
            try? s.makeCurveClient(serverKey: keys.serverPublicKey, keys: keys.member)
        }
        guard (try? s.connect(endpoint)) != nil else { return nil }
        try? s.send([ControlMessage.statusQuery.envelope(sender: "launcher", epoch: 0).encoded()], dontWait: true)
        guard let reply = try? s.receive(timeoutMilliseconds: Int(timeout * 1000)), let frame = reply.first,
              case .statusReply(let text)? = try? ControlMessage.decode(frame).0,
              let o = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else { return nil }
        return o
    }

    public var logs: String {
        var out = "== coordinator\n" + Self.read(dir + "/coordinator.log")
        for n in 0..<options.nodes { out += "== smp n\(n)\n" + Self.read(dir + "/smp-n\(n).log") }
        return out
    }

    /// Jobs started in this process and not stopped yet (run directory -> job id).
    private static let live = Mutex<[String: String]>([:])

    /// Ends every process recorded by every job of this process not stopped
    /// yet (checked to belong to its job, as `stop` does) and frees its shared
    /// memory, from any thread: for a signal that ends the process. Returns
    /// the run directories, which are kept.
    public static func endEveryLiveJob() -> [String] {
        let jobs = live.withLock { $0 }
        for (dir, job) in jobs.sorted(by: { $0.key < $1.key }) {
            for pid in RecordedProcesses.all(runDirectory: dir) where RecordedProcesses.belongs(pid, toJob: job) {
                kill(pid, SIGCONT)
                kill(pid, SIGKILL)
            }
            RecordedProcesses.freeSharedMemory(job: job)
            NetnsHosts.remove(recordIn: dir)
        }
        return jobs.keys.sorted()
    }

    /// Ends every process this job started, by recorded PID (continuing any
    /// stopped one first), and frees the job's shared memory.
    public func stop(removeFiles: Bool = true) {
        _ = Self.live.withLock { $0.removeValue(forKey: dir) }
        if let slurm = options.slurm {
            endSteps(slurm)
            for p in background { if p.wait(timeoutSeconds: 5) == nil { p.kill(SIGKILL) } }
        }
        for pid in RecordedProcesses.workerPIDs(runDirectory: dir) where RecordedProcesses.belongs(pid, toJob: job) {
            kill(pid, SIGCONT)
            kill(pid, SIGKILL)
        }
        for p in smps + retired + spares.map(\.process) + coordinators where p.poll() == nil {
            kill(p.pid, SIGCONT)
            p.kill(SIGKILL)
            p.wait(timeoutSeconds: 5)
        }
        RecordedProcesses.freeSharedMemory(job: job)
        // Every process in them has ended: the hosts go (the record says what, should this object not know).
        NetnsHosts.remove(recordIn: dir)
        if removeFiles { try? FileManager.default.removeItem(atPath: dir) }
    }

    /// Ends this job's Slurm steps where they run: SIGTERM (an SMP frees its
    /// shared memory and ends its workers), then SIGKILL to what is left after 10 s.
    private func endSteps(_ slurm: SlurmAllocation) {
        let prefix = "ft-\(options.jobID)-"
        var ids = Array(slurm.steps(named: prefix).values)
        guard !ids.isEmpty else { return }
        slurm.signal(steps: ids, "TERM")
        let deadline = monotonicSeconds() + 10
        while monotonicSeconds() < deadline {
            ids = Array(slurm.steps(named: prefix).values)
            if ids.isEmpty { return }
            usleep(250_000)
        }
        slurm.signal(steps: ids, "KILL")
    }

    /// Recorded processes of this job still alive (workers included), and its shared-memory segments left.
    public func leftovers() -> (pids: [Int32], segments: [String]) {
        (RecordedProcesses.all(runDirectory: dir).filter { RecordedProcesses.belongs($0, toJob: job) },
         RecordedProcesses.segments(job: job))
    }

    /// The job's namespaces, links and bridge that still exist (after `stop`: none).
    public func networkLeftovers() -> [String] { NetnsHosts.leftovers(recordIn: dir) }

    /// A loopback TCP port that was free a moment ago.
    public static func freePort() throws -> Int {
        let ctx = try ZMQContext()
        let s = try ctx.socket(.router, maxMessageBytes: ZMQSocket.sendOnlyMaxMessageBytes)  // bound for a moment, never read
        try s.setLinger(milliseconds: 0)
        let endpoint = try s.bind("tcp://127.0.0.1:*")
        s.close()
        return Int(endpoint.split(separator: ":").last!)!
    }

    static func read(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }
}

/// The PIDs a job recorded in its run directory, and checks that a PID still
/// names a process of that job before anything signals it (PIDs are reused).
public enum RecordedProcesses {
    /// `RUN_DIR/pids/history`: "NODE ROLE PID" for every SMP ("smp") and worker an SMP of the job started.
    static func history(_ dir: String) -> [(role: Substring, pid: Int32)] {
        LocalJob.read(dir + "/pids/history").split(separator: "\n").compactMap { line in
            let parts = line.split(separator: " ")
            guard parts.count == 3, let pid = Int32(parts[2]) else { return nil }
            return (parts[1], pid)
        }
    }

    /// Every worker any SMP of the job started (the history, plus the current pid files).
    public static func workerPIDs(runDirectory dir: String) -> [Int32] {
        var pids = history(dir).filter { $0.role != "smp" }.map(\.pid)
        for name in (try? FileManager.default.contentsOfDirectory(atPath: dir + "/pids")) ?? [] where name.hasSuffix(".pid") && !name.hasSuffix(".smp.pid") {
            if let pid = Int32(LocalJob.read(dir + "/pids/" + name).trimmingCharacters(in: .whitespacesAndNewlines)) { pids.append(pid) }
        }
        return Array(Set(pids)).sorted()
    }

    /// Every process of `RUN_DIR/job.pids` (but the launcher), every SMP and every worker.
    public static func all(runDirectory dir: String) -> [Int32] {
        var pids = workerPIDs(runDirectory: dir) + history(dir).filter { $0.role == "smp" }.map(\.pid)
        for line in LocalJob.read(dir + "/job.pids").split(separator: "\n") where !line.hasPrefix("launcher ") {
            if let pid = line.split(separator: " ").last.flatMap({ Int32($0) }) { pids.append(pid) }
        }
        return Array(Set(pids)).sorted()
    }

    /// Whether `pid` is alive and is a process of job `job`: its command line
    /// has `--job-id JOB` (coordinator, SMPs) or its environment `FT_JOB_ID=JOB` (workers).
    public static func belongs(_ pid: Int32, toJob job: String) -> Bool {
        guard pid > 0, kill(pid, 0) == 0 else { return false }
        func contents(_ file: String) -> [UInt8] {
            (try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/\(file)"))).map { [UInt8]($0) } ?? []
        }
        let args = contents("cmdline").split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        if let i = args.firstIndex(of: "--job-id"), i + 1 < args.count, args[i + 1] == job { return true }
        return contents("environ").split(separator: 0).contains { String(decoding: $0, as: UTF8.self) == "FT_JOB_ID=\(job)" }
    }

    /// The job's shared-memory segments still in /dev/shm.
    public static func segments(job: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? []).filter { $0.hasPrefix("ft-\(job)-") }.sorted()
    }

    public static func freeSharedMemory(job: String) {
        for name in segments(job: job) { _ = SharedMemorySegment.unlink(name: "/" + name) }
    }
}

/// An integer from a JSON value (Int or Double), -999 when absent.
public func jsonInt(_ v: Any?) -> Int { (v as? Int) ?? Int((v as? Double) ?? -999) }
