import FTControl
import FTCore
import FTSystem
import FTZMQ
import Foundation

/// A job of real processes on this host: a coordinator and `nodes` SMPs, each
/// spawning its workers, all on loopback with per-job CURVE keys. Every
/// process it starts is recorded (the SMPs record their workers in
/// `RUN_DIR/pids`) and `stop()` ends exactly those, by PID.
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
    private let coordinatorArgs: [String]

    public var dir: String { options.runDirectory }
    public var job: String { options.jobID }

    public init(_ options: Options) throws {
        self.options = options
        try FileManager.default.createDirectory(atPath: options.runDirectory, withIntermediateDirectories: true)
        if options.curve { _ = try JobKeys.generate(in: options.runDirectory + "/keys") }
        endpoint = "tcp://127.0.0.1:\(try Self.freePort())"
        coordinatorArgs = [options.binaries + "/ft-coordinator", "--job-id", options.jobID, "--nodes", "\(options.nodes)",
                           "--workers-per-node", "\(options.workersPerNode)", "--endpoint", endpoint, "--run-dir", options.runDirectory,
                           "--linger-ms", "\(options.lingerMs)", "--heartbeat-ms", "\(options.heartbeatMs)", "--timeout-ms", "\(options.timeoutMs)"]
            + (options.curve ? ["--keys", options.runDirectory + "/keys"] : [])
            + (options.erasure.map { ["--ec", "\($0.k)+\($0.m)"] } ?? [])
        try startCoordinator()
        for n in 0..<options.nodes { smps.append(try startSMP(node: n, environment: options.smpEnvironment[n] ?? [:])) }
        try writePIDs()
    }

    /// Starts (or restarts, as the replacement of a lost node) the SMP of node `n`.
    @discardableResult
    public func startSMP(node n: Int, environment extra: [String: String] = [:]) throws -> ChildProcess {
        var args = [options.binaries + "/ft-smp", "--job-id", options.jobID, "--node-id", "n\(n)", "--run-dir", options.runDirectory,
                        "--workers", "\(options.workersPerNode)", "--coordinator", endpoint,
                        "--rank-offset", "\(n * options.workersPerNode)", "--world-size", "\(options.nodes * options.workersPerNode)"]
        if options.curve { args += ["--keys", options.runDirectory + "/keys"] }
        args += ["--"] + options.workerCommand
        let smp = try ChildProcess(arguments: args, environment: ProcessInfo.processInfo.environment.merging(extra) { $1 },
                                   outputPath: options.runDirectory + "/smp-n\(n).log")
        if n < smps.count {
            retired.append(smps[n])
            smps[n] = smp
            try writePIDs()
        }
        return smp
    }

    /// SMP processes replaced by `startSMP` (still ended by `stop()`).
    public private(set) var retired: [ChildProcess] = []

    private func writePIDs() throws {
        var pids = "coordinator \(coordinator!.pid)\n"
        for (n, s) in smps.enumerated() { pids += "smp-n\(n) \(s.pid)\n" }
        try pids.write(toFile: options.runDirectory + "/job.pids", atomically: true, encoding: .utf8)
    }

    /// Starts (or restarts) the coordinator on the job's endpoint.
    public func startCoordinator() throws {
        coordinator = try ChildProcess(arguments: coordinatorArgs, environment: ProcessInfo.processInfo.environment,
                                       outputPath: options.runDirectory + "/coordinator.log")
    }

    public func workerPID(node: Int, worker: Int) -> Int32? {
        Int32(Self.read(dir + "/pids/n\(node)-w\(worker).pid").trimmingCharacters(in: .whitespacesAndNewlines))
    }

    public func workerLog(node: Int, worker: Int) -> String { Self.read(dir + "/logs/n\(node)-w\(worker).log") }

    /// The coordinator's status document (schema 1), or nil when it does not answer in time.
    public func status(timeout: Double = 1) -> [String: Any]? {
        guard let ctx = try? ZMQContext(), let s = try? ctx.socket(.dealer) else { return nil }
        defer { s.close() }
        try? s.setLinger(milliseconds: 0)
        if options.curve, let keys = try? JobKeys.load(from: dir + "/keys") {
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

    /// Ends every process this job started, by recorded PID (continuing any
    /// stopped one first), and frees the job's shared memory.
    public func stop(removeFiles: Bool = true) {
        for n in 0..<options.nodes {
            for w in 0..<options.workersPerNode {
                if let pid = workerPID(node: n, worker: w), pid > 0 { kill(pid, SIGCONT); kill(pid, SIGKILL) }
            }
        }
        for smp in smps + retired where smp.poll() == nil {
            kill(smp.pid, SIGCONT)
            smp.kill(SIGKILL)
            smp.wait(timeoutSeconds: 5)
        }
        if let c = coordinator, c.poll() == nil {
            kill(c.pid, SIGCONT)
            c.kill(SIGKILL)
            c.wait(timeoutSeconds: 5)
        }
        for name in ((try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? []) where name.hasPrefix("ft-\(job)-") {
            _ = SharedMemorySegment.unlink(name: "/" + name)
        }
        if removeFiles { try? FileManager.default.removeItem(atPath: dir) }
    }

    /// A loopback TCP port that was free a moment ago.
    public static func freePort() throws -> Int {
        let ctx = try ZMQContext()
        let s = try ctx.socket(.router)
        try s.setLinger(milliseconds: 0)
        let endpoint = try s.bind("tcp://127.0.0.1:*")
        s.close()
        return Int(endpoint.split(separator: ":").last!)!
    }

    static func read(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }
}

/// An integer from a JSON value (Int or Double), -999 when absent.
public func jsonInt(_ v: Any?) -> Int { (v as? Int) ?? Int((v as? Double) ?? -999) }
