import FTSMP
import FTSystem
import FTWorker
import Foundation
import Logging
import Testing

/// A fresh directory under /tmp for one test.
func makeRunDirectory(_ tag: String) -> String {
    let path = "/tmp/ft-test-\(tag)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

/// A job id no other test (or test run) uses.
func uniqueJobID(_ tag: String) -> String {
    "t\(tag)\(getpid())x\(UInt32.random(in: 0...UInt32.max))"
}

/// Shared-memory segments whose names start with /ft-<job>-.
func segments(ofJob job: String) -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? []).filter { $0.hasPrefix("ft-\(job)-") }
}

/// Polls `condition` every 5 ms until it holds or `seconds` pass.
@discardableResult
func waitUntil(seconds: Double, _ condition: () -> Bool) -> Bool {
    let deadline = monotonicSeconds() + seconds
    while monotonicSeconds() < deadline {
        if condition() { return true }
        usleep(5000)
    }
    return condition()
}

/// An SMP running on a thread of the test process (no spawned workers).
final class InProcessSMP: @unchecked Sendable {
    let server: SMPServer
    let directory: String
    let jobID: String
    private let done = DispatchSemaphore(value: 0)

    /// `coordinator`: an endpoint to report to (nobody need listen there); with
    /// one the SMP also opens its TCP data endpoint.
    init(tag: String, memoryLimit: Int? = nil, coordinator: String? = nil) throws {
        directory = makeRunDirectory(tag)
        jobID = uniqueJobID(tag)
        var logger = Logger(label: "test-smp")
        logger.logLevel = .warning
        var config = SMPConfiguration(jobID: jobID, nodeID: "n0", runDirectory: directory, workerCount: 0, workerCommand: [])
        config.memoryLimit = memoryLimit
        config.coordinatorEndpoint = coordinator
        server = try SMPServer(config: config, logger: logger, watchSignals: false)
        let thread = Thread { [server, done] in
            do { try server.run() } catch { print("in-process SMP failed: \(error)") }
            done.signal()
        }
        thread.start()
    }

    func identity(_ worker: String, rank: Int = 0, size: Int = 1) -> WorkerIdentity {
        WorkerIdentity(jobID: jobID, workerID: worker, dpRank: rank, dpSize: size, smpEndpoint: server.boundEndpoint)
    }

    /// Stops the SMP and waits for it; its shared memory is freed.
    func stop() {
        server.stop()
        done.wait()
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// The directory holding this package's built executables (beside the test bundle).
var productsDirectory: String { executableDirectory }

func readText(_ path: String) -> String {
    (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
}
