import FTCore
import FTLauncher
import FTPersist
import FTSystem
import FTToy
import Foundation
import Testing

/// The persistent tier with real processes: a cold restart from disk after
/// every process of the job died, refusals of a resume that cannot be, and a
/// full disk that must not stop training.
@Suite("persistent tier (real processes)", .serialized)
struct PersistProcessTests {
    static var isRoot: Bool { getuid() == 0 }

    /// Waits for the job's coordinator to end (the job completed or stopped).
    static func awaitEnd(_ job: LocalJob, seconds: Double) -> Bool {
        waitUntil(seconds: seconds) { job.inner.coordinator?.poll() != nil }
    }

    static func finalStatus(_ job: LocalJob) -> [String: Any] {
        (try? JSONSerialization.jsonObject(with: Data(readText(job.inner.dir + "/status.json").utf8)) as? [String: Any]) ?? [:]
    }

    @Test("every process of a job SIGKILLed once a step is durable: ftctl export of the step, loaded with the safetensors package, equals the training's tensors; a cold restart from the persist directory ends bit-exact; a resume with another node count, or from a directory with no durable step, is refused saying why",
          .timeLimit(.minutes(5)))
    func coldRestart() throws {
        let persist = "/tmp/ft-ctl-persist-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: persist) }
        var first: LocalJob? = try LocalJob(tag: "cold", nodes: 4, workersPerNode: 1, steps: 400, stateKiB: 256, stepMs: 5) { o in
            o.erasure = (3, 1)
            o.persistDirectory = persist
            o.persistEvery = 20
        }
        defer { first?.cleanUp() }
        let job = try #require(first)
        var durable = -1
        #expect(waitUntil(seconds: 60) {
            durable = int((job.status()?["persist"] as? [String: Any])?["durable_step"])
            return durable >= 40
        }, "no durable step: \(jobLogs(job.inner.dir))")
        // Everything at once: the coordinator, every node's process group (SMP and workers).
        if let c = job.inner.coordinator { kill(c.pid, SIGKILL) }
        for smp in job.inner.smps { kill(-smp.pid, SIGKILL) }
        let expected = job.expectedFinalHashes()
        let options = job.inner.options
        job.cleanUp()
        first = nil

        let plan = try ResumePlan.choose(root: persist, nodes: 4, erasure: (3, 1))
        #expect(plan.step >= durable && plan.nodes == ["n0", "n1", "n2", "n3"])
        try exportMatchesTraining(persist: persist, step: plan.step, ranks: 4, elements: 256 * 256)
        let resumed = try LocalJob(tag: "cold2", nodes: 4, workersPerNode: 1, steps: 400, stateKiB: 256, stepMs: 5) { o in
            o.erasure = (3, 1)
            o.persistDirectory = persist
            o.persistEvery = 20
            o.resumeStep = plan.step
            o.workerCommand = options.workerCommand
        }
        defer { resumed.cleanUp() }
        #expect(Self.awaitEnd(resumed, seconds: 120), "the resumed job did not end: \(jobLogs(resumed.inner.dir))")
        let hashes = (0..<4).map { resumed.finalHash(node: $0, worker: 0) }
        #expect(hashes == expected.map { Optional($0) }, "\(jobLogs(resumed.inner.dir))")
        let end = Self.finalStatus(resumed)
        #expect(end["state"] as? String == "stopped")
        #expect(readText(resumed.inner.dir + "/smp-n0.log").contains("loaded step \(plan.step) from \(persist)"))
        // Its workers began from the persisted step, not from 0.
        #expect(resumed.workerLog(node: 0, worker: 0).contains("resume from=\(plan.step + 1)"), "\(resumed.workerLog(node: 0, worker: 0).suffix(800))")

        // Refused before anything starts: another node count; a directory without a durable step.
        let (status, output, _) = try runTool("ft-launch", ["start", "--nodes", "2", "--ec", "1+1", "--resume", persist,
                                                            "--run-dir", persist + "-x"], timeout: 60)
        #expect(status == .exited(2))
        #expect(output.contains("persisted by 4 nodes; this job has 2"), "\(output)")
        let empty = persist + "-empty"
        try FileManager.default.createDirectory(atPath: empty, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: empty) }
        let (status2, output2, _) = try runTool("ft-launch", ["start", "--resume", empty, "--run-dir", persist + "-y"], timeout: 60)
        #expect(status2 == .exited(2))
        #expect(output2.contains("no durable step"), "\(output2)")
    }

    /// `ftctl export` of the persisted step, loaded with the real `safetensors`
    /// package (Python), equals the toy workers' tensors at that step, recomputed
    /// here: the replicated ones whole (every rank's slice joined), the per-rank
    /// ones as NAME@rankR.
    func exportMatchesTraining(persist: String, step: Int, ranks: Int, elements: Int) throws {
        let out = persist + "-export"
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: out) }
        let file = out + "/model.safetensors"
        let (status, text, _) = try runTool("ftctl", ["export", "--from", persist, "--step", "\(step)", "--out", file], timeout: 120)
        try #require(status == .exited(0), "\(text)")
        let sidecar = try #require(try JSONSerialization.jsonObject(with: Data(readText(file + ".json").utf8)) as? [String: Any])
        #expect(int(sidecar["step"]) == step)
        let script = """
            import json, sys
            from safetensors.numpy import load_file
            tensors = load_file(sys.argv[1])
            for name, value in tensors.items():
                open(sys.argv[2] + "/" + name + ".bin", "wb").write(value.tobytes())
            print(json.dumps({name: [str(v.dtype), list(v.shape)] for name, v in tensors.items()}))
            """
        let python = try ChildProcess(arguments: ["python3", "-c", script, file, out], environment: ProcessInfo.processInfo.environment,
                                      outputPath: out + "/python.out")
        try #require(python.wait(timeoutSeconds: 60) == .exited(0), "\(readText(out + "/python.out"))")
        let shapes = try #require(try JSONSerialization.jsonObject(with: Data(readText(out + "/python.out").utf8)) as? [String: [Any]])
        let models = (0..<ranks).map { r in
            let m = ToyModel(elements: elements, dpRank: r)
            for s in 1...step { m.apply(step: s) }
            return m
        }
        var expected: [String: UnsafeMutableRawBufferPointer] = [:]
        for (spec, buffer) in models[0].tensors where spec.replicated { expected[spec.name] = buffer }
        for (r, m) in models.enumerated() {
            for (spec, buffer) in m.tensors where !spec.replicated { expected["\(spec.name)@rank\(r)"] = buffer }
        }
        #expect(Set(shapes.keys) == Set(expected.keys), "\(shapes.keys.sorted())")
        for (name, buffer) in expected {
            let got = try #require(FileManager.default.contents(atPath: out + "/" + name + ".bin"), "no \(name)")
            #expect(got == Data(UnsafeRawBufferPointer(buffer)), "\(name) differs from the training's tensor at step \(step)")
        }
    }

    @Test("a full disk while persisting: a clear log line, every node flagged out_of_space in the status, nothing torn left, and training goes on in memory to a bit-exact end",
          .enabled(if: isRoot, "mounts a tiny tmpfs as the persist directory: needs root"), .timeLimit(.minutes(5)))
    func fullDisk() throws {
        let persist = "/tmp/ft-ctl-full-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: persist, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: persist) }
        let mount = try ChildProcess(arguments: ["/bin/mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", persist],
                                     environment: ProcessInfo.processInfo.environment)
        try #require(mount.wait(timeoutSeconds: 10) == .exited(0), "mount failed")
        defer { _ = try? ChildProcess(arguments: ["/bin/umount", persist], environment: [:]).wait(timeoutSeconds: 10) }
        let job = try LocalJob(tag: "full", nodes: 4, workersPerNode: 1, steps: 300, stateKiB: 256, stepMs: 5) { o in
            o.erasure = (3, 1)
            o.persistDirectory = persist
            o.persistEvery = 25
        }
        defer { job.cleanUp() }
        #expect(Self.awaitEnd(job, seconds: 120), "\(jobLogs(job.inner.dir))")
        let end = Self.finalStatus(job)
        #expect(end["state"] as? String == "stopped", "\(jobLogs(job.inner.dir))")
        let p = try #require(end["persist"] as? [String: Any])
        #expect(int(p["durable_step"]) == -1)
        let errors = (p["errors"] as? [String: String]) ?? [:]
        #expect(errors.keys.sorted() == ["n0", "n1", "n2", "n3"], "\(p)")
        #expect(errors.values.allSatisfy { $0.hasPrefix("out_of_space:") }, "\(errors)")
        #expect(readText(job.inner.dir + "/smp-n1.log").contains("failed (out_of_space)"))
        #expect(readText(job.inner.dir + "/coordinator.log").contains("could not persist step"))
        let hashes = (0..<4).map { job.finalHash(node: $0, worker: 0) }
        #expect(hashes == job.expectedFinalHashes().map { Optional($0) })
        // No part, complete or torn, is left on the full disk.
        let left = (FileManager.default.enumerator(atPath: persist)?.allObjects as? [String]) ?? []
        #expect(left.filter { $0.contains(".tmp-") || $0.hasSuffix(".bin") }.isEmpty, "\(left)")
    }
}
