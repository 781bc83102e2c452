import FTCore
import FTSystem
import Foundation
import Logging
import Testing
@testable import FTSMP

/// The SMP's child supervisor on its own, with /bin/sh as the worker.
@Suite("Worker supervisor")
struct WorkerSupervisorTests {
    func supervisor(_ script: String, workers: Int = 1, maxRestarts: Int = 100) throws -> (WorkerSupervisor, String) {
        let dir = "/tmp/ft-supervisor-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        for sub in ["logs", "pids", "stacks"] { try FileManager.default.createDirectory(atPath: dir + "/" + sub, withIntermediateDirectories: true) }
        let config = SMPConfiguration(jobID: "sup", nodeID: "n0", runDirectory: dir, workerCount: workers,
                                      workerCommand: ["/bin/sh", "-c", script], maxRestarts: maxRestarts)
        return (WorkerSupervisor(config: config, smpEndpoint: "ipc:///nonexistent", logger: Logger(label: "test")), dir)
    }

    /// Waits (bounded, not timed) until worker `id` exits, and reaps it.
    func waitReap(_ s: WorkerSupervisor, _ id: String) throws -> (exit: WorkerSupervisor.Exit, status: String) {
        for _ in 0..<3000 {
            if let r = s.reap(id) { return (r.exit, r.status) }
            usleep(10_000)
        }
        throw StoreError(.internalError, "worker \(id) did not exit in 30 s")
    }

    @Test("an exit 0 is finished, a failure is the server's to decide, and the local budget bounds restarts")
    func exits() throws {
        let (s, dir) = try supervisor("exit ${FT_RESTART_COUNT:-0}")  // the first run exits 0
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try s.startAll(epoch: 0)
        #expect(try waitReap(s, "w0").exit == .finished)
        #expect(s.allFinished)
        #expect(readText(dir + "/pids/history").contains("n0 w0 "))

        let (f, dir2) = try supervisor("exit 3", maxRestarts: 1)
        defer { try? FileManager.default.removeItem(atPath: dir2) }
        try f.startAll(epoch: 0)
        let (exit, status) = try waitReap(f, "w0")
        #expect(exit == .failed, "exit 3 was not a failure: \(exit)")
        #expect(status.contains("3"), "\(status)")
        try f.restartAfterFailure("w0", epoch: 0)  // within the budget of 1: started again
        #expect(f.restarts["w0"] == 1 && f.children["w0"] != nil)
        _ = try waitReap(f, "w0")
        try f.restartAfterFailure("w0", epoch: 0)  // past it: counted as finished, not started
        #expect(f.children["w0"] == nil && f.allFinished)
    }

    @Test("a replacement order kills the named incarnation, which is then reaped as replaced; an order about a gone incarnation changes nothing")
    func replacement() throws {
        let (s, dir) = try supervisor("exec sleep 60", workers: 2)
        defer {
            s.stopAll()
            try? FileManager.default.removeItem(atPath: dir)
        }
        try s.startAll(epoch: 0)
        let pid = try #require(s.children["w1"]?.pid)
        try s.replace(ControlMessage.WorkerRestart(worker: "w1", pid: Int(pid) + 1_000_000), epoch: 0)  // another incarnation
        #expect(s.children["w1"]?.pid == pid && s.children["w1"]?.poll() == nil)
        try s.replace(ControlMessage.WorkerRestart(worker: "w9", pid: 0), epoch: 0)  // not a worker of this node
        #expect(s.children["w9"] == nil)
        try s.replace(ControlMessage.WorkerRestart(worker: "w1", pid: Int(pid)), epoch: 0)
        #expect(try waitReap(s, "w1").exit == .replaced)
        #expect(s.restarts["w1"] == 1)
        try s.spawn(workerID: "w1", epoch: 0)  // what the server does on .replaced
        #expect(s.children["w1"].map { $0.pid != pid } == true)
        #expect(s.children["w0"]?.poll() == nil)  // the other worker never noticed
    }
}
