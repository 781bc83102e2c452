import FTCore
import FTSystem
import Foundation

/// What `cluster/launch` (`ft-launch start`) starts: read from a small
/// `key = value` file, then overridden by flags, then checked as a whole
/// before any process starts.
///
///     # cluster/example.conf
///     nodes = 4
///     workers_per_node = 2
///     ec = 3+1              # or "none"
///     spares = 1
///     snapshot_interval = 1
///     steps = 2000          # for the default worker command
///     worker_command = /path/to/ft-demo-trainer --steps 2000   # default: ft-demo-trainer
///     port = 0              # the coordinator's loopback port (0: a free one)
///     run_dir = /tmp/ft-job
///     job_id = myjob
///     heartbeat_ms = 100
///     timeout_ms = 500
///     phase_timeout = 60    # seconds a recovery phase may take at least (default 5; 60 for PyTorch workers)
///     memory_limit = 8G     # shared memory per node for snapshots (default: derived from the machine)
///     data_host = 10.0.0.2  # SMP data planes on tcp://ADDRESS:* with CURVE (default: private ipc sockets)
///     hosts = netns         # every node, spare and the coordinator on a network-namespace host of its own (default: local);
///                           # slurm: inside a Slurm allocation, a job step per node and spare (cluster/slurm/ft-job.sbatch)
///     metrics = auto        # the coordinator's Prometheus endpoint: auto (a free port on its host's address, written to
///                           # RUN_DIR/metrics.endpoint), HOST:PORT, or off
///     node_failures_per_day = 0.004   # the durability estimate's prior rate (ftctl status)
///     persist_dir = /data/ft-persist  # the persistent tier: each SMP writes its part of a committed step here
///                                     # (a node-local disk or a shared filesystem; default: off)
///     persist_every = 500   # ... every 500 committed steps (and/or:)
///     persist_seconds = 600 # ... every 10 minutes
///     persist_keep = 2      # the newest steps each node keeps on disk
///     persist_mbps = 1000   # the most MB/s each SMP writes (default: no cap)
public struct ClusterConfig: Equatable, Sendable {
    public var nodes = 4
    public var workersPerNode = 2
    public var erasure: ErasureCode? = ErasureCode(k: 3, m: 1)
    public var spares = 0
    public var snapshotInterval = 1
    public var steps = 2000
    /// Empty: the demo trainer next to the launcher, with `steps`.
    public var workerCommand: [String] = []
    public var port = 0
    public var runDirectory: String?
    public var jobID: String?
    public var heartbeatMs = 100
    public var timeoutMs = 500
    /// The floor of a recovery phase's deadline in seconds (nil: the
    /// coordinator's default). A PyTorch worker's restart (a process group
    /// and DDP rebuilt, a lost node's new process importing torch) needs more.
    public var phaseTimeout: Double?
    /// Each node's shared-memory budget for snapshot slots in bytes (nil: the
    /// SMP's default, derived from the machine). A worker whose slots would
    /// not fit is refused, and a job still starting stops at once saying so.
    public var memoryLimit: Int?
    /// The persistent tier (README, "Persistent tier"): nil directory, off.
    public var persistDirectory: String?
    public var persistEvery: Int?
    public var persistSeconds: Double?
    public var persistKeep = 2
    public var persistMbps: Double?
    /// Serve each SMP's data plane (EC chunks, fetches, slices) on
    /// `tcp://ADDRESS:*`, with CURVE, as nodes on separate hosts must; nil:
    /// a private ipc socket per SMP (one host).
    public var dataHost: String?
    /// Where the job's processes run: `local` (one host, loopback), or
    /// `netns`: every node, spare and the coordinator on a host of its own,
    /// a network namespace with its own address (root only); or `slurm`:
    /// inside a Slurm allocation, every node and spare a job step on a host
    /// of its own (`SlurmAllocation`).
    public var hosts = Hosts.local
    /// The coordinator's metrics endpoint: nil (`auto`), a free port on the
    /// coordinator host's address; `off`; or `HOST:PORT`.
    public var metrics: String?
    /// The durability estimate's prior failure rate per node per day (nil: the coordinator's default, 0.004).
    public var nodeFailuresPerDay: Double?

    public enum Hosts: String, Equatable, Sendable, CaseIterable {
        case local
        case netns
        case slurm
    }

    /// Bytes from "N", "NK", "NM", "NG" or "NT" (powers of 1024), nil if malformed or not positive.
    public static func parseBytes(_ text: String) -> Int? {
        var t = text.trimmingCharacters(in: .whitespaces).uppercased()
        if t.hasSuffix("IB") { t.removeLast(2) } else if t.hasSuffix("B") { t.removeLast() }
        let shifts: [Character: Int] = ["K": 10, "M": 20, "G": 30, "T": 40]
        var shift = 0
        if let last = t.last, let s = shifts[last] { shift = s; t.removeLast() }
        guard let n = Int(t), n > 0, n <= Int.max >> shift else { return nil }
        return n << shift
    }

    public struct ErasureCode: Equatable, Sendable {
        public var k: Int
        public var m: Int
        public init(k: Int, m: Int) { self.k = k; self.m = m }

        /// "K+M", or nil for "none".
        public static func parse(_ text: String) throws(ConfigError) -> ErasureCode? {
            let t = text.trimmingCharacters(in: .whitespaces)
            if t == "none" || t == "off" { return nil }
            let parts = t.split(separator: "+")
            guard parts.count == 2, let k = Int(parts[0]), let m = Int(parts[1]) else {
                throw ConfigError(.badValue, "ec must be K+M (e.g. 3+1) or none, not '\(text)'")
            }
            return ErasureCode(k: k, m: m)
        }
    }

    /// A configuration refused before anything starts: the key or line, and why.
    public typealias ConfigError = CodedMessage<ConfigErrorCode>

    public enum ConfigErrorCode: String, Sendable {
        /// A line of a config file that is not `key = value`.
        case syntax
        /// A key the configuration does not have.
        case unknownKey = "unknown_key"
        /// A value of the wrong form or outside its range.
        case badValue = "bad_value"
        /// Values that are fine alone but not together (EC groups and nodes, spares without EC).
        case inconsistent
        /// A binary or the worker command that is not an executable file.
        case missingExecutable = "missing_executable"
        /// The coordinator's port is taken.
        case portUnavailable = "port_unavailable"
        /// The run directory belongs to a job that is still running.
        case runDirectoryInUse = "run_directory_in_use"
        /// What the configuration asks for cannot be had on this machine (namespaces without root).
        case unavailable
    }

    public init() {}

    static let keys: Set<String> = ["nodes", "workers_per_node", "ec", "spares", "snapshot_interval", "steps", "worker_command",
                                    "port", "run_dir", "job_id", "heartbeat_ms", "timeout_ms", "phase_timeout",
                                    "memory_limit", "data_host", "hosts", "metrics", "node_failures_per_day",
                                    "persist_dir", "persist_every", "persist_seconds", "persist_keep", "persist_mbps"]

    /// Applies a config file's text (`key = value` lines; `#` starts a comment).
    public mutating func apply(file text: String, name: String = "config") throws(ConfigError) {
        for (i, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
            guard !line.trimmingCharacters(in: .whitespaces).isEmpty else { continue }
            guard let eq = line.firstIndex(of: "=") else {
                throw ConfigError(.syntax, "\(name):\(i + 1): expected key = value, got '\(raw)'")
            }
            let key = line[..<eq].trimmingCharacters(in: .whitespaces)
            let value = line[line.index(after: eq)...].trimmingCharacters(in: .whitespaces)
            do {
                try set(key, value)
            } catch {
                throw ConfigError(error.code, "\(name):\(i + 1): \(error.message)")
            }
        }
    }

    /// Sets one key from its text.
    public mutating func set(_ key: String, _ value: String) throws(ConfigError) {
        func int() throws(ConfigError) -> Int {
            guard let v = Int(value) else { throw ConfigError(.badValue, "\(key) must be a whole number, not '\(value)'") }
            return v
        }
        switch key {
        case "nodes": nodes = try int()
        case "workers_per_node": workersPerNode = try int()
        case "ec": erasure = try ErasureCode.parse(value)
        case "spares": spares = try int()
        case "snapshot_interval": snapshotInterval = try int()
        case "steps": steps = try int()
        case "worker_command": workerCommand = value.split(separator: " ").map(String.init)
        case "port": port = try int()
        case "run_dir": runDirectory = value
        case "job_id": jobID = value
        case "heartbeat_ms": heartbeatMs = try int()
        case "timeout_ms": timeoutMs = try int()
        case "phase_timeout":
            guard let v = Double(value), v > 0 else { throw ConfigError(.badValue, "phase_timeout must be a positive number of seconds, not '\(value)'") }
            phaseTimeout = v
        case "memory_limit":
            guard let v = Self.parseBytes(value) else {
                throw ConfigError(.badValue, "memory_limit must be a positive size in bytes (e.g. 8G, 512M), not '\(value)'")
            }
            memoryLimit = v
        case "data_host": dataHost = value
        case "persist_dir": persistDirectory = value == "off" || value.isEmpty ? nil : value
        case "persist_every":
            let v = try int()
            guard v >= 1 else { throw ConfigError(.badValue, "persist_every must be at least 1 step, not '\(value)'") }
            persistEvery = v
        case "persist_seconds":
            guard let v = Double(value), v > 0 else { throw ConfigError(.badValue, "persist_seconds must be a positive number of seconds, not '\(value)'") }
            persistSeconds = v
        case "persist_keep":
            let v = try int()
            guard v >= 1 else { throw ConfigError(.badValue, "persist_keep must be at least 1, not '\(value)'") }
            persistKeep = v
        case "persist_mbps":
            guard let v = Double(value), v > 0 else { throw ConfigError(.badValue, "persist_mbps must be a positive number of MB/s, not '\(value)'") }
            persistMbps = v
        case "node_failures_per_day":
            guard let v = Double(value), v >= 0, v < 100 else {
                throw ConfigError(.badValue, "node_failures_per_day must be a rate in [0, 100) failures per node per day, not '\(value)'")
            }
            nodeFailuresPerDay = v
        case "metrics":
            if value == "auto" {
                metrics = nil
            } else if value == "off" {
                metrics = "off"
            } else {
                guard let colon = value.lastIndex(of: ":"), !value[..<colon].isEmpty,
                      Int(value[value.index(after: colon)...]).map({ (0...65535).contains($0) }) == true else {
                    throw ConfigError(.badValue, "metrics must be auto, off or HOST:PORT (e.g. 127.0.0.1:9400), not '\(value)'")
                }
                metrics = value
            }
        case "hosts":
            guard let v = Hosts(rawValue: value) else {
                throw ConfigError(.badValue, "hosts must be local, netns or slurm, not '\(value)'")
            }
            hosts = v
        default:
            throw ConfigError(.unknownKey, "unknown key '\(key)' (known: \(Self.keys.sorted().joined(separator: ", ")))")
        }
    }

    /// Everything that can be checked before anything starts: numbers, the
    /// EC groups against the node count, the binaries, the worker command,
    /// the port, the run directory. `binaries`: where ft-coordinator and ft-smp are.
    public func validate(binaries: String) throws(ConfigError) {
        if let dataHost, dataHost.isEmpty || dataHost.contains(where: { "/ :*".contains($0) }) {
            throw ConfigError(.badValue, "data_host must be an IPv4 address or host name such as 127.0.0.1 or 10.0.0.2, not '\(dataHost)'")
        }
        if hosts == .netns, let reason = NetnsHosts.unavailableReason {
            throw ConfigError(.unavailable, "hosts = netns: \(reason)")
        }
        if hosts != .local, dataHost != nil {
            throw ConfigError(.inconsistent, "data_host names one address for every node; with hosts = \(hosts.rawValue) each SMP serves on its own host's address: leave data_host out")
        }
        if hosts == .slurm, let missing = ["srun", "scontrol", "squeue", "scancel"].first(where: { ChildProcess.resolve($0) == nil }) {
            throw ConfigError(.unavailable, "hosts = slurm: \(missing) is not installed (Slurm's client commands are needed on the batch host)")
        }
        guard nodes >= 1 && nodes <= 256 else { throw ConfigError(.badValue, "nodes must be in 1...256, not \(nodes)") }
        guard workersPerNode >= 1 && workersPerNode <= 64 else {
            throw ConfigError(.badValue, "workers_per_node must be in 1...64, not \(workersPerNode)")
        }
        if let ec = erasure {
            guard ec.k >= 1, ec.m >= 1, ec.k + ec.m <= 255 else { throw ConfigError(.badValue, "ec \(ec.k)+\(ec.m): K and M must be at least 1") }
            guard ec.k + ec.m <= nodes else {
                throw ConfigError(.inconsistent, "ec \(ec.k)+\(ec.m) needs groups of \(ec.k + ec.m) nodes, and the job has only \(nodes)")
            }
            guard nodes % (ec.k + ec.m) == 0 else {
                throw ConfigError(.inconsistent, "ec \(ec.k)+\(ec.m) cuts the nodes into groups of \(ec.k + ec.m): \(nodes) nodes do not divide into them")
            }
        }
        guard spares >= 0 && spares <= 64 else { throw ConfigError(.badValue, "spares must be in 0...64, not \(spares)") }
        guard spares == 0 || erasure != nil else {
            throw ConfigError(.inconsistent, "spares need ec: a spare rebuilds a lost node from its group's parity")
        }
        guard snapshotInterval >= 1 else { throw ConfigError(.badValue, "snapshot_interval must be at least 1 step, not \(snapshotInterval)") }
        guard steps >= 1 else { throw ConfigError(.badValue, "steps must be at least 1, not \(steps)") }
        guard heartbeatMs >= 10, timeoutMs >= 3 * heartbeatMs else {
            throw ConfigError(.badValue, "heartbeat_ms must be at least 10 and timeout_ms at least 3 heartbeats (have \(heartbeatMs) and \(timeoutMs))")
        }
        if let jobID {
            let ok = !jobID.isEmpty && jobID.count <= 32 && jobID.unicodeScalars.allSatisfy { CharacterSet.alphanumerics.contains($0) && $0.isASCII || $0 == "_" }
            guard ok else { throw ConfigError(.badValue, "job_id '\(jobID)' must be 1-32 characters of A-Z, a-z, 0-9 or _") }
        }
        for b in ["ft-coordinator", "ft-smp"] where access(binaries + "/" + b, X_OK) != 0 {
            throw ConfigError(.missingExecutable, "\(binaries)/\(b) is missing or not executable: build first (swift build -c release)")
        }
        let command = resolvedWorkerCommand(binaries: binaries)
        var isDirectory: ObjCBool = false
        guard let path = ChildProcess.resolve(command[0]), FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory),
              !isDirectory.boolValue else {
            throw ConfigError(.missingExecutable, "worker command '\(command[0])' is not an executable file, nor found in PATH")
        }
        guard port >= 0 && port <= 65535 else { throw ConfigError(.badValue, "port must be in 0...65535, not \(port)") }
        // (On namespace hosts the coordinator's host is a fresh namespace: every port is free there.)
        if port != 0, hosts == .local, let reason = Self.portUnavailable(port) {
            throw ConfigError(.portUnavailable, "port \(port) on 127.0.0.1 is not available (\(reason)): choose another, or 0 for a free one")
        }
        if let dir = runDirectory, FileManager.default.fileExists(atPath: dir + "/job.pids"),
           let job = try? String(contentsOfFile: dir + "/job.id", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines),
           RecordedProcesses.all(runDirectory: dir).contains(where: { RecordedProcesses.belongs($0, toJob: job) }) {
            throw ConfigError(.runDirectoryInUse, "run directory \(dir) belongs to job \(job), which is still running: stop it (cluster/stop \(dir)) or choose another")
        }
    }

    public func resolvedWorkerCommand(binaries: String) -> [String] {
        workerCommand.isEmpty ? [binaries + "/ft-demo-trainer", "--steps", "\(steps)", "--report-every", "100"] : workerCommand
    }

    /// Why binding 127.0.0.1:`port` fails, or nil when it is free.
    public static func portUnavailable(_ port: Int) -> String? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return String(cString: strerror(errno)) }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        return result == 0 ? nil : String(cString: strerror(errno))
    }

    /// The launcher's job options for this config.
    public func jobOptions(binaries: String, runDirectory: String, jobID: String) -> LocalJob.Options {
        var o = LocalJob.Options(binaries: binaries, runDirectory: runDirectory, jobID: jobID)
        o.nodes = nodes
        o.workersPerNode = workersPerNode
        o.erasure = erasure.map { ($0.k, $0.m) }
        o.spares = spares
        o.snapshotInterval = snapshotInterval
        o.workerCommand = resolvedWorkerCommand(binaries: binaries)
        o.coordinatorPort = port == 0 ? nil : port
        o.heartbeatMs = heartbeatMs
        o.timeoutMs = timeoutMs
        o.phaseTimeout = phaseTimeout
        o.memoryLimit = memoryLimit
        o.persistDirectory = persistDirectory
        // A directory with neither cadence persists every 100 committed steps.
        o.persistEvery = persistDirectory != nil && persistEvery == nil && persistSeconds == nil ? 100 : persistEvery
        o.persistSeconds = persistSeconds
        o.persistKeep = persistKeep
        o.persistMbps = persistMbps
        o.dataHost = dataHost
        o.netns = hosts == .netns
        o.metrics = metrics
        o.nodeFailuresPerDay = nodeFailuresPerDay
        // The default worker runs `steps`; a command of the user's own says its own.
        o.totalSteps = workerCommand.isEmpty ? steps : nil
        return o
    }
}
