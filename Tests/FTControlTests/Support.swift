import FTControl
import FTLauncher
import FTCore
import FTSystem
import FTToy
import FTZMQ
import Foundation
import Testing

var productsDirectory: String { executableDirectory }

func readText(_ path: String) -> String { (try? String(contentsOfFile: path, encoding: .utf8)) ?? "" }

/// The last `lines` lines above debug of the coordinator's and every SMP's
/// log in a job's run directory: what a failed expectation about a job prints.
func jobLogs(_ runDirectory: String, lines: Int = 40) -> String {
    let files = ((try? FileManager.default.contentsOfDirectory(atPath: runDirectory)) ?? [])
        .filter { $0 == "coordinator.log" || ($0.hasPrefix("smp-") && $0.hasSuffix(".log")) || ($0.hasPrefix("spare") && $0.hasSuffix(".log")) }
        .sorted()
    return files.map { f in
        let kept = readText(runDirectory + "/" + f).split(separator: "\n").filter { !$0.contains(" debug ") }.suffix(lines)
        return "--- \(f)\n" + kept.joined(separator: "\n")
    }.joined(separator: "\n")
}

@discardableResult
func waitUntil(seconds: Double, _ condition: () -> Bool) -> Bool {
    let deadline = monotonicSeconds() + seconds
    while monotonicSeconds() < deadline {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}

func freePort() throws -> Int { try FTLauncher.LocalJob.freePort() }

/// Jobs of real processes share two cores: one at a time, whatever suite they
/// are in, so that timing-based detection (500 ms) is not fooled by load.
/// A test's time limit includes its wait here, behind every process test
/// queued before it: none of them has less than 3 minutes (one of 2 minutes
/// ran out in CI, behind jobs that held this for 4 minutes in all).
let realProcessJobs = Gate()

/// A lock that may be released by another thread than the one that took it.
final class Gate: @unchecked Sendable {
    private let semaphore = DispatchSemaphore(value: 1)
    func lock() { semaphore.wait() }
    func unlock() { semaphore.signal() }
}

/// A job of toy workers for the tests, over `FTLauncher.LocalJob`.
@dynamicMemberLookup
final class LocalJob: @unchecked Sendable {
    let inner: FTLauncher.LocalJob
    let steps: Int
    let stateKiB: Int

    init(tag: String, nodes: Int, workersPerNode: Int, steps: Int, stateKiB: Int = 64, stepMs: Int = 5,
         lingerMs: Int = 1000, curve: Bool = true, command: [String]? = nil,
         configure: (inout FTLauncher.LocalJob.Options) -> Void = { _ in }) throws {
        var o = FTLauncher.LocalJob.Options(binaries: productsDirectory,
                                            runDirectory: "/tmp/ft-ctl-\(tag)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))",
                                            jobID: "c\(tag)\(getpid())x\(UInt32.random(in: 0...999_999))")
        o.nodes = nodes
        o.workersPerNode = workersPerNode
        o.lingerMs = lingerMs
        o.curve = curve
        o.workerCommand = command
            ?? [productsDirectory + "/ft-toy-worker", "--steps", "\(steps)", "--state-kib", "\(stateKiB)", "--step-ms", "\(stepMs)"]
        configure(&o)
        realProcessJobs.lock()
        do {
            inner = try FTLauncher.LocalJob(o)
        } catch {
            realProcessJobs.unlock()
            throw error
        }
        self.steps = steps
        self.stateKiB = stateKiB
    }

    subscript<T>(dynamicMember path: KeyPath<FTLauncher.LocalJob, T>) -> T { inner[keyPath: path] }

    var nodes: Int { inner.options.nodes }
    var workersPerNode: Int { inner.options.workersPerNode }
    func status(timeout: Double = 1) -> [String: Any]? { inner.status(timeout: timeout) }
    func workerPID(node: Int, worker: Int) -> Int32? { inner.workerPID(node: node, worker: worker) }
    func workerLog(node: Int, worker: Int) -> String { inner.workerLog(node: node, worker: worker) }
    func startCoordinator() throws { try inner.startCoordinator() }
    /// Ends what the job started; FT_KEEP_TEST_DIRS=1 keeps its run directory (logs) for a look.
    func cleanUp() {
        inner.stop(removeFiles: ProcessInfo.processInfo.environment["FT_KEEP_TEST_DIRS"] == nil)
        realProcessJobs.unlock()
    }

    /// Expected final hash of every rank: the same toy training, uninterrupted, in this process.
    func expectedFinalHashes() -> [String] {
        (0..<(nodes * workersPerNode)).map { rank in
            let m = ToyModel(elements: stateKiB * 256, dpRank: rank)
            for s in 1...steps { m.apply(step: s) }
            return m.hash
        }
    }

    /// A field (`data`, `endpoint`, …) of node `node`'s first SMP's "smp up" log line.
    func smpUpField(node: Int, _ name: String) throws -> String {
        let log = readText(inner.dir + "/smp-n\(node).log")
        let up = try #require(log.split(separator: "\n").first { $0.contains("smp up") }, "\(log)")
        let prefix = name + "="
        let field: Substring? = up.split(separator: " ").first { $0.hasPrefix(prefix) }
        let value = try #require(field, "\(up)")
        return String(value.dropFirst(prefix.count))
    }

    func finalHash(node: Int, worker: Int) -> String? {
        workerLog(node: node, worker: worker).split(separator: "\n").last { $0.hasPrefix("final step=\(steps) ") }
            .flatMap { $0.split(separator: " ").first { $0.hasPrefix("hash=") } }.map { String($0.dropFirst(5)) }
    }
}

func int(_ v: Any?) -> Int { (v as? Int) ?? Int((v as? Double) ?? -999) }
