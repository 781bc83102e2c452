import FTControl
import FTCore
import FTSystem
import FTToy
import FTZMQ
import Foundation
import Testing

var productsDirectory: String {
    let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    return (exe as NSString).deletingLastPathComponent
}

func readText(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }

@discardableResult
func waitUntil(seconds: Double, _ condition: () -> Bool) -> Bool {
    let deadline = monotonicSeconds() + seconds
    while monotonicSeconds() < deadline {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}

/// A free loopback TCP port (bound and released; good enough for tests that start at once).
func freePort() throws -> Int {
    let ctx = try ZMQContext()
    let s = try ctx.socket(.router)
    try s.setLinger(milliseconds: 0)
    let endpoint = try s.bind("tcp://127.0.0.1:*")
    s.close()
    return Int(endpoint.split(separator: ":").last!)!
}

/// A local job of real processes: a coordinator and `nodes` SMPs, each with
/// `workersPerNode` toy workers. Every process is recorded and ended by PID.
final class LocalJob: @unchecked Sendable {
    let dir: String
    let job: String
    let nodes: Int
    let workersPerNode: Int
    let steps: Int
    let stateKiB: Int
    let endpoint: String
    var coordinator: ChildProcess?
    var smps: [ChildProcess] = []
    var coordinatorArgs: [String]

    init(tag: String, nodes: Int, workersPerNode: Int, steps: Int, stateKiB: Int = 64, stepMs: Int = 5,
         lingerMs: Int = 1000, curve: Bool = true) throws {
        dir = "/tmp/ft-ctl-\(tag)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        job = "c\(tag)\(getpid())x\(UInt32.random(in: 0...999_999))"
        self.nodes = nodes
        self.workersPerNode = workersPerNode
        self.steps = steps
        self.stateKiB = stateKiB
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        if curve { _ = try JobKeys.generate(in: dir + "/keys") }
        endpoint = "tcp://127.0.0.1:\(try freePort())"
        coordinatorArgs = [productsDirectory + "/ft-coordinator", "--job-id", job, "--nodes", "\(nodes)",
                           "--workers-per-node", "\(workersPerNode)", "--endpoint", endpoint, "--run-dir", dir,
                           "--linger-ms", "\(lingerMs)"] + (curve ? ["--keys", dir + "/keys"] : [])
        try startCoordinator()
        for n in 0..<nodes {
            var args = [productsDirectory + "/ft-smp", "--job-id", job, "--node-id", "n\(n)", "--run-dir", dir,
                        "--workers", "\(workersPerNode)", "--coordinator", endpoint,
                        "--rank-offset", "\(n * workersPerNode)", "--world-size", "\(nodes * workersPerNode)"]
            if curve { args += ["--keys", dir + "/keys"] }
            args += ["--", productsDirectory + "/ft-toy-worker", "--steps", "\(steps)", "--state-kib", "\(stateKiB)", "--step-ms", "\(stepMs)"]
            smps.append(try ChildProcess(arguments: args, environment: ProcessInfo.processInfo.environment,
                                         outputPath: dir + "/smp-n\(n).log"))
        }
    }

    func startCoordinator() throws {
        coordinator = try ChildProcess(arguments: coordinatorArgs, environment: ProcessInfo.processInfo.environment,
                                       outputPath: dir + "/coordinator.log")
    }

    func workerPID(node: Int, worker: Int) -> Int32? {
        Int32(readText(dir + "/pids/n\(node)-w\(worker).pid").trimmingCharacters(in: .whitespacesAndNewlines))
    }

    func workerLog(node: Int, worker: Int) -> String { readText(dir + "/logs/n\(node)-w\(worker).log") }

    /// The coordinator's status document, or nil when it does not answer.
    func status(timeout: Double = 1) -> [String: Any]? {
        guard let ctx = try? ZMQContext(), let s = try? ctx.socket(.dealer) else { return nil }
        defer { s.close() }
        try? s.setLinger(milliseconds: 0)
        if let keys = try? JobKeys.load(from: dir + "/keys") { try? s.makeCurveClient(serverKey: keys.serverPublicKey, keys: keys.member) }
        guard (try? s.connect(endpoint)) != nil else { return nil }
        try? s.send([ControlMessage.statusQuery.envelope(sender: "test", epoch: 0).encoded()], dontWait: true)
        guard let reply = try? s.receive(timeoutMilliseconds: Int(timeout * 1000)), let frame = reply.first,
              case .statusReply(let text)? = try? ControlMessage.decode(frame).0,
              let o = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else { return nil }
        return o
    }

    /// Expected final hash of every rank: the same toy training, uninterrupted, in this process.
    func expectedFinalHashes() -> [String] {
        (0..<(nodes * workersPerNode)).map { rank in
            let m = ToyModel(elements: stateKiB * 256, dpRank: rank)
            for s in 1...steps { m.apply(step: s) }
            return m.hash
        }
    }

    func finalHash(node: Int, worker: Int) -> String? {
        workerLog(node: node, worker: worker).split(separator: "\n").last { $0.hasPrefix("final step=\(steps) ") }
            .flatMap { $0.split(separator: " ").first { $0.hasPrefix("hash=") } }.map { String($0.dropFirst(5)) }
    }

    var logs: String {
        var out = "== coordinator\n" + readText(dir + "/coordinator.log")
        for n in 0..<nodes { out += "== smp n\(n)\n" + readText(dir + "/smp-n\(n).log") }
        return out
    }

    /// Ends every process this job started, by recorded PID, and removes its files.
    func cleanUp() {
        for n in 0..<nodes {
            for w in 0..<workersPerNode { if let pid = workerPID(node: n, worker: w) { kill(pid, SIGCONT); kill(pid, SIGKILL) } }
        }
        for smp in smps where smp.poll() == nil {
            kill(smp.pid, SIGCONT)
            smp.kill(SIGKILL)
            smp.wait(timeoutSeconds: 5)
        }
        if let c = coordinator, c.poll() == nil {
            c.kill(SIGKILL)
            c.wait(timeoutSeconds: 5)
        }
        for name in ((try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? []) where name.hasPrefix("ft-\(job)-") {
            _ = SharedMemorySegment.unlink(name: "/" + name)
        }
        try? FileManager.default.removeItem(atPath: dir)
    }
}

func int(_ v: Any?) -> Int { (v as? Int) ?? Int((v as? Double) ?? -999) }
