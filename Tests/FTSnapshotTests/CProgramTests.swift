import FTSMP
import FTSystem
@testable import FTWorker
import Foundation
import Testing

/// The C interface from a process that is not Swift: `ft_worker_test.c` is
/// compiled against `ft_worker.h` and linked with `libFTWorkerC.so` (built
/// beside this test bundle), then run as DP ranks 0 and 1 against a real SMP.
@Suite("C interface (a C program linked with libFTWorkerC.so)")
struct CProgramTests {
    static let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("ft_worker_test.c").path
    static let header = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Sources/CFTWorker/include").path

    /// Compiles the program once per test into `dir`; the library must have been built (swift build).
    static func compile(into dir: String) throws -> String {
        let library = executableDirectory + "/libFTWorkerC.so"
        try #require(FileManager.default.fileExists(atPath: library), "\(library) is missing: build the package (swift build) first")
        let output = dir + "/ft_worker_test"
        let compilers: [String] = ["/usr/bin/cc", "/usr/bin/clang", "/usr/bin/gcc"]
        let cc = try #require(compilers.first { access($0, X_OK) == 0 }, "no C compiler")
        let result = try run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", header, source, "-o", output,
                              "-L", executableDirectory, "-lFTWorkerC", "-Wl,-rpath," + executableDirectory])
        try #require(result.status == 0, "compiling ft_worker_test.c failed:\n\(result.output)")
        return output
    }

    /// Runs a command to its end (at most 120 s); its exit status and output.
    static func run(_ arguments: [String], environment: [String: String] = [:]) throws -> (status: Int32, output: String) {
        let dir = FileManager.default.temporaryDirectory.path
        let log = dir + "/ft-c-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).log"
        defer { unlink(log) }
        var env = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("FT_") }
        env.merge(environment) { $1 }
        let child = try ChildProcess(arguments: arguments, environment: env, outputPath: log)
        guard let status = child.wait(timeoutSeconds: 120) else {
            child.kill(SIGKILL)
            child.wait(timeoutSeconds: 5)
            return (-1, "timed out after 120 s\n" + ((try? String(contentsOfFile: log, encoding: .utf8)) ?? ""))
        }
        let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        if case .exited(let code) = status { return (code, output) }
        return (-2, "\(status)\n" + output)
    }

    @Test("registers, snapshots and restores DP slices and an external tensor; bytes come back exactly")
    func registerSnapshotRestore() throws {
        let smp = try InProcessSMP(tag: "cabi")
        defer { smp.stop() }
        let program = try Self.compile(into: smp.directory)
        // Phase 1: both ranks snapshot steps 1-3 at once.
        let results = (0..<2).map { _ in Locked<(Int32, String)>((-3, "did not run")) }  // FTWorker's, through @testable
        let group = DispatchGroup()
        for rank in 0..<2 {
            group.enter()
            Thread {
                var env = smp.environment(rank: rank)
                env["FT_TEST_BARRIER_DIR"] = smp.directory
                let r = (try? Self.run([program, "snapshot", "3"], environment: env)) ?? (-3, "could not start")
                results[rank].set(r)
                group.leave()
            }.start()
        }
        group.wait()
        for (status, output) in results.map({ $0.get() }) { #expect(status == 0, "snapshot run: \(output)") }
        // Phase 2: each rank "restarted": it restores step 3, its peer's slices included.
        for rank in 0..<2 {
            let (status, output) = try Self.run([program, "restore", "3"], environment: smp.environment(rank: rank, restarts: 1))
            #expect(status == 0, "restore run of rank \(rank): \(output)")
        }
    }

    @Test("bad arguments and calls out of order get stable codes and a sentence naming the tensor")
    func misuse() throws {
        let smp = try InProcessSMP(tag: "cabim")
        defer { smp.stop() }
        let program = try Self.compile(into: smp.directory)
        let (status, output) = try Self.run([program, "misuse"], environment: smp.environment(rank: 0, size: 1, worker: "m0"))
        #expect(status == 0, "\(output)")
    }

    @Test("without the FT_* environment the client reports FT_E_NO_ENVIRONMENT")
    func alone() throws {
        let dir = NSTemporaryDirectory() + "ft-cabi-alone-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let program = try Self.compile(into: dir)
        let (status, output) = try Self.run([program, "alone"])
        #expect(status == 0, "\(output)")
    }
}

extension InProcessSMP {
    /// The FT_* environment of a worker process of this SMP.
    func environment(rank: Int, size: Int = 2, worker: String? = nil, restarts: Int = 0) -> [String: String] {
        ["FT_JOB_ID": jobID, "FT_WORKER_ID": worker ?? "w\(rank)", "FT_DP_RANK": "\(rank)", "FT_DP_SIZE": "\(size)",
         "FT_SMP_ENDPOINT": server.boundEndpoint, "FT_RESTART_COUNT": "\(restarts)"]
    }
}
