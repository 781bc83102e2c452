import FTLauncher
import FTSystem
import Foundation
import Testing

/// The demo trainer as a job of real processes.
@Suite("Demo trainer", .serialized)
struct DemoTrainerTests {
    static let steps = 120
    static func command() -> [String] {
        [productsDirectory + "/ft-demo-trainer", "--steps", "\(steps)", "--report-every", "10", "--hidden", "64", "--batch", "32"]
    }

    /// Runs a job to its end and returns every worker's log, by rank.
    func run(tag: String, nodes: Int, workersPerNode: Int, during: ((LocalJob) throws -> Void)? = nil) throws -> [String] {
        let job = try LocalJob(tag: tag, nodes: nodes, workersPerNode: workersPerNode, steps: Self.steps, command: Self.command())
        defer { job.cleanUp() }
        try during?(job)
        #expect(waitUntil(seconds: 150) { job.coordinator?.poll() != nil }, "job did not end\n\(job.logs)")
        #expect(job.coordinator?.status == .exited(0), "\(job.logs)")
        return (0..<nodes).flatMap { n in (0..<workersPerNode).map { w in job.workerLog(node: n, worker: w) } }
    }

    /// The `step=S loss=L hash=H` lines by step (the last one printed for each step).
    func curve(_ log: String) -> [Int: String] {
        var out: [Int: String] = [:]
        for line in log.split(separator: "\n") where line.hasPrefix("step=") {
            if let s = Int(line.dropFirst(5).prefix { $0 != " " }) { out[s] = String(line) }
        }
        return out
    }

    func final(_ log: String) -> String? {
        log.split(separator: "\n").last { $0.hasPrefix("final step=") }.map { String($0.split(separator: " ").prefix(3).joined(separator: " ")) }
    }

    @Test("the same configuration run twice gives bit-identical hashes at every printed step, for 1, 2 and 4 workers",
          .timeLimit(.minutes(6)), arguments: [(1, 1), (2, 1), (2, 2)].map { [$0.0, $0.1] })
    func deterministic(shape: [Int]) throws {
        let (nodes, perNode) = (shape[0], shape[1])
        let first = try run(tag: "det\(nodes)\(perNode)a", nodes: nodes, workersPerNode: perNode)
        let second = try run(tag: "det\(nodes)\(perNode)b", nodes: nodes, workersPerNode: perNode)
        let reference = curve(first[0])
        #expect(reference.count == Self.steps / 10 + 1, "\(first[0])")
        for (rank, log) in (first + second).enumerated() {
            #expect(curve(log) == reference, "rank \(rank % first.count) of run \(rank / first.count + 1) differs")
            #expect(final(log) != nil && final(log) == final(first[0]))
        }
        // It learns: the loss falls well below its start.
        let losses = reference.keys.sorted().compactMap { s in reference[s]!.split(separator: " ").first { $0.hasPrefix("loss=") }.flatMap { Double($0.dropFirst(5)) } }
        #expect(losses.last! < losses.first! * 0.75, "loss \(losses)")
    }

    @Test("a run whose workers are all killed and restored from memory has the same loss curve and final hash as an uninterrupted one",
          .timeLimit(.minutes(6)))
    func allWorkersKilled() throws {
        let reference = try run(tag: "ref", nodes: 2, workersPerNode: 1)
        let recovered = try run(tag: "kill", nodes: 2, workersPerNode: 1) { job in
            #expect(waitUntil(seconds: 60) { jsonInt(job.status()?["committed_step"]) >= Self.steps / 3 }, "\(job.logs)")
            for n in 0..<2 { if let pid = job.workerPID(node: n, worker: 0) { kill(pid, SIGKILL) } }
            #expect(waitUntil(seconds: 60) {
                (job.status()?["last_failure"] as? [String: Any])?["outcome"] as? String == "resumed"
            }, "\(job.logs)")
        }
        let expected = curve(reference[0])
        for (rank, log) in recovered.enumerated() {
            #expect(log.contains("restored step="), "rank \(rank) never restored\n\(log)")
            for (step, line) in curve(log) { #expect(line == expected[step], "rank \(rank) step \(step): \(line) vs \(expected[step] ?? "none")") }
            #expect(final(log) == final(reference[0]), "rank \(rank)")
        }
    }
}

@Suite("The README's demo")
struct ReadmeDemoTests {
    @Test("ft-launch demo kills a node midway, recovers from memory and ends with equal hashes", .timeLimit(.minutes(6)))
    func demo() throws {
        realProcessJobs.lock()
        defer { realProcessJobs.unlock() }
        let dir = "/tmp/ft-demo-test-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let (status, output, _) = try runTool("ft-launch", ["demo", "--steps", "80", "--run-dir", dir], timeout: 300)
        #expect(status == .exited(0), "\(output.suffix(4000))")
        #expect(output.contains("killed node n1"))
        #expect(output.contains("rebuilt n1 from parity"))
        #expect(output.contains("EQUAL") && !output.contains("DIFFERENT"))
        for phase in ["detect", "plan", "rebuild", "restart", "resume"] { #expect(output.contains("  \(phase) ")) }
    }
}
