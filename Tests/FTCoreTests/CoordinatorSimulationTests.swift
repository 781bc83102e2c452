import Foundation
import Testing
@testable import FTCore

@Suite("Control plane simulation")
struct ControlSimulationTests {
    /// Seeds in the test command; `FT_SIM_SEEDS=N` (and `FT_SIM_FIRST_SEED`) runs more.
    static var seeds: ClosedRange<UInt64> {
        let env = ProcessInfo.processInfo.environment
        let first = env["FT_SIM_FIRST_SEED"].flatMap(UInt64.init) ?? 1
        let count = env["FT_SIM_SEEDS"].flatMap(UInt64.init) ?? 500
        return first...(first + max(count, 1) - 1)
    }

    @Test("hundreds of seeded runs with every fault kind keep every invariant and end in resume or a reported stop")
    func manySeeds() {
        var outcomes: [String: Int] = [:]
        var faults: [String: Int] = [:]
        var recoveries = 0
        var failedReasons: [String: Int] = [:]
        for seed in Self.seeds {
            // Two layouts: RS(2+2), and RS(3+1) where two lost nodes are already too many.
            var sim = ControlSimulation(seed: seed, erasure: seed % 2 == 0 ? (2, 2) : (3, 1))
            sim.run(until: 40)
            let failure = { (what: String) in
                "seed \(seed) (replay: FT_SIM_FIRST_SEED=\(seed) FT_SIM_SEEDS=1 swift test --filter manySeeds): \(what)\n"
                    + sim.log.suffix(60).joined(separator: "\n")
            }
            #expect(sim.violations.isEmpty, "\(failure(sim.violations.joined(separator: "; ")))")
            if !sim.violations.isEmpty { return }
            let state = sim.coordinator.state
            #expect(state == .running || state == .stopped || state == .failed, "\(failure("ended \(state)"))")
            if state == .running {
                // (The job may finish just as the simulation ends.)
                let phases = Set(sim.workers.values.map(\.phase))
                #expect(phases.isSubset(of: [.running, .done]), "\(failure("coordinator running but workers are \(phases)"))")
            }
            if state == .failed {
                let reason = sim.coordinator.stopReason ?? ""
                // Only what memory cannot recover, or a crash loop, may stop the job.
                let legit = reason.contains("more than the") || reason.contains("in a row")
                #expect(legit, "\(failure("stopped for another reason: \(reason)"))")
                failedReasons[reason.contains("in a row") ? "crash loop" : "more than m lost", default: 0] += 1
            }
            outcomes[state.rawValue, default: 0] += 1
            for (k, v) in sim.faultCounts { faults[k, default: 0] += v }
            recoveries += sim.coordinator.failureCount
        }
        print("control-plane simulation: \(Self.seeds.count) seeds, outcomes \(outcomes.sorted { $0.key < $1.key }), "
            + "stops \(failedReasons.sorted { $0.key < $1.key }), \(recoveries) failures handled, faults \(faults.sorted { $0.key < $1.key })")
        // The runs exercised both ends: recoveries that resumed and stops with a report.
        #expect((outcomes["stopped"] ?? 0) + (outcomes["running"] ?? 0) > 0)
        #expect(recoveries > Self.seeds.count)
        if Self.seeds.count >= 100 { #expect((outcomes["failed"] ?? 0) > 0, "no run lost more than m nodes of a group") }
    }

    /// A quiet simulation (no random faults, no drops) run to a running job with a committed step.
    func quiet(seed: UInt64, nodes: Int = 4, workersPerNode: Int = 2, erasure: (k: Int, m: Int)? = (2, 2)) -> ControlSimulation {
        var sim = ControlSimulation(seed: seed, nodes: nodes, workersPerNode: workersPerNode, erasure: erasure)
        sim.faultsUntil = 0
        sim.dropRate = 0
        sim.dupRate = 0
        sim.run(until: 3)
        return sim
    }

    /// Runs until the coordinator orders `node` to replace `worker` (the order, as sent), at most `within` seconds.
    func awaitRestartOrder(_ sim: inout ControlSimulation, node: String, worker: String, within: Double) -> ControlMessage.WorkerRestart? {
        let end = sim.now + within
        while sim.now < end {
            sim.run(until: sim.now + 0.02)
            for e in sim.queue where e.to == node {
                if case .restartWorkers(let list) = e.message, let order = list.first(where: { $0.worker == worker }) { return order }
            }
        }
        return nil
    }

    @Test("a worker killed while running is restarted and every worker restores the committed step")
    func workerKill() throws {
        var sim = quiet(seed: 7)
        #expect(sim.coordinator.state == .running)
        #expect(sim.coordinator.committedStep != nil)
        let epoch = sim.coordinator.epoch
        sim.killWorker("n1/w0")
        sim.run(until: 6)
        #expect(sim.violations.isEmpty, "\(sim.violations)")
        #expect(sim.coordinator.state == .running)
        #expect(sim.coordinator.epoch == epoch + 1)
        let report = try #require(sim.coordinator.lastFailure)
        #expect(report.what == "n1/w0")
        #expect(report.detectedBy.contains("reported by SMP n1"))
        #expect(report.outcome == "resumed")
        #expect(report.phases.map(\.phase) == [.detect, .plan, .rebuild, .restart, .resume])
        #expect(sim.restoredInEpoch[epoch + 1] != nil)
    }

    @Test("without erasure coding an SMP silenced past the timeout stops the job with a report; continued, it is fenced and changes nothing")
    func smpStopped() {
        var sim = quiet(seed: 11, nodes: 3, erasure: nil)
        #expect(sim.coordinator.state == .running)
        sim.smps["n2"]!.stopped = true
        sim.run(until: 4)
        #expect(sim.coordinator.state == .failed)
        let reason = sim.coordinator.stopReason ?? ""
        #expect(reason.contains("n2"))
        #expect(reason.contains("last committed"))
        #expect(sim.coordinator.lastFailure?.detectedBy.contains("heartbeat timeout") == true)
        let before = sim.fingerprint()
        sim.smps["n2"]!.stopped = false
        sim.run(until: 5)
        #expect(sim.coordinator.nodes["n2"]?.state == .fenced)
        #expect(sim.fingerprint() == before)
        #expect(sim.violations.isEmpty, "\(sim.violations)")
    }

    @Test("a node killed with erasure coding is replaced by the launcher, rebuilt, and the job resumes from the committed step")
    func nodeKill() throws {
        var sim = quiet(seed: 12)
        let committed = try #require(sim.coordinator.committedStep)
        sim.smps["n2"]!.running = false
        for w in ["w0", "w1"] { sim.workers["n2/\(w)"]!.phase = .gone }
        sim.run(until: 7)
        #expect(sim.violations.isEmpty, "\(sim.violations)")
        #expect(sim.coordinator.state == .running)
        let report = try #require(sim.coordinator.failureHistory.last)
        #expect(report.what == "n2" && report.outcome == "resumed")
        #expect((report.restoredStep ?? -1) >= committed)
        #expect(report.phases.contains { $0.phase == .rebuild && $0.reason.contains("rebuilt n2") })
    }

    @Test("a node lost after every survivor protected the round in flight: that round commits at the failure and is the step restored")
    func commitAtFailure() throws {
        // RS(3+1): the three survivors' protected(s) cover the lost node's chunks (their parity folded them).
        func run(survivorsProtect: Bool) throws -> (sim: ControlSimulation, step: Int) {
            var sim = quiet(seed: 14, erasure: (3, 1))
            var step: Int?
            for _ in 0..<200 where step == nil {
                sim.run(until: sim.now + 0.01)
                step = sim.queue.lazy.compactMap { e -> Int? in
                    if e.from == "n3", e.to == "coordinator", case .protected(let s, _) = e.message { s } else { nil }
                }.first
            }
            let s = try #require(step, "no round started within 2 s")
            // n3 dies before its own protected(s) arrives (and, without protection, so does n0's).
            sim.queue.removeAll { e in
                guard e.to == "coordinator", case .protected = e.message else { return false }
                return e.from == "n3" || (!survivorsProtect && e.from == "n0")
            }
            sim.smps["n3"]!.running = false
            for w in ["w0", "w1"] { sim.workers["n3/\(w)"]!.phase = .gone }
            sim.run(until: sim.now + 5)
            #expect(sim.violations.isEmpty, "\(sim.violations)")
            #expect(sim.coordinator.state == .running)
            return (sim, s)
        }
        let (sim, s) = try run(survivorsProtect: true)
        let report = try #require(sim.coordinator.failureHistory.first { $0.what.hasPrefix("n3") && $0.outcome == "resumed" })
        #expect(report.restoredStep == s)
        #expect((sim.coordinator.committedStep ?? -1) >= s)
        // One survivor had not protected it: the step before is restored.
        let (sim2, s2) = try run(survivorsProtect: false)
        let report2 = try #require(sim2.coordinator.failureHistory.first { $0.what.hasPrefix("n3") && $0.outcome == "resumed" })
        #expect(report2.restoredStep == s2 - 1)
    }

    @Test("a coordinator stopped for 3 s (its clock jumps; it ticks before it reads) declares no failure, and the job goes on")
    func coordinatorPause() {
        var sim = quiet(seed: 13)
        let failures = sim.coordinator.failureCount
        let epoch = sim.coordinator.epoch
        let step = sim.workers.values.map(\.step).max()!
        sim.coordinatorPausedUntil = sim.now + 3
        sim.run(until: 9)
        #expect(sim.violations.isEmpty, "\(sim.violations)")
        #expect(sim.coordinator.failureCount == failures, "\(sim.log.suffix(20))")
        #expect(sim.coordinator.epoch == epoch)
        #expect(sim.coordinator.detector.stalls == 1)
        #expect(sim.coordinator.state == .running)
        #expect(sim.workers.values.map(\.step).max()! > step + 10, "training went on after the pause")
    }

    @Test("the coordinator killed in every phase of a node's recovery: the next one finishes it from the SMPs' reports")
    func coordinatorCrashInEveryPhase() throws {
        for (i, phase) in ["detect", "rebuild", "restart"].enumerated() {
            var sim = quiet(seed: 20 + UInt64(i))
            let committed = try #require(sim.coordinator.committedStep)
            sim.smps["n1"]!.running = false
            for w in ["w0", "w1"] { sim.workers["n1/\(w)"]!.phase = .gone }
            // Run until the recovery reaches the phase, then kill the coordinator.
            var guardCount = 0
            while guardCount < 1000 {
                guardCount += 1
                sim.run(until: sim.now + 0.01)
                let done = sim.coordinator.lastFailure?.phases.map(\.phase.rawValue) ?? []
                let inRecovery = sim.coordinator.state == .recovering
                if phase == "detect" && inRecovery { break }
                if phase == "rebuild" && inRecovery && !done.contains("rebuild") && sim.smps["n1"]!.empty && sim.smps["n1"]!.rebuildStep != nil { break }
                if phase == "restart" && inRecovery && done.contains("rebuild") { break }
            }
            #expect(guardCount < 1000, "never reached the \(phase) phase")
            sim.coordinatorDownUntil = sim.now + 0.2
            sim.run(until: sim.now + 8)
            #expect(sim.violations.isEmpty, "\(phase): \(sim.violations)")
            #expect(sim.coordinator.state == .running, "\(phase): \(sim.coordinator.state) \(sim.log.suffix(30))")
            #expect((sim.coordinator.committedStep ?? -1) >= committed, "\(phase): committed step kept")
            #expect(sim.coordinator.lastFailure?.kind == "coordinator" || sim.coordinator.failureHistory.contains { $0.kind == "coordinator" })
        }
    }

    @Test("a node lost while the coordinator is down is found after the start grace, replaced and rebuilt; no worker starts fresh")
    func nodeLostWhileCoordinatorDown() throws {
        var sim = quiet(seed: 31)
        let committed = try #require(sim.coordinator.committedStep)
        sim.coordinatorDownUntil = sim.now + 0.3
        sim.run(until: sim.now + 0.1)
        // The node dies between the two coordinators: nobody declared it; it never says hello again.
        sim.smps["n3"]!.running = false
        for w in ["w0", "w1"] { sim.workers["n3/\(w)"]!.phase = .gone }
        sim.run(until: sim.now + 8)
        #expect(sim.violations.isEmpty, "\(sim.violations)")
        #expect(sim.coordinator.state == .running, "\(sim.log.suffix(30))")
        #expect((sim.coordinator.committedStep ?? -1) >= committed)
        let takeover = try #require(sim.coordinator.failureHistory.first { $0.kind == "coordinator" })
        #expect(takeover.detectedBy.contains("never heard from n3"), "\(takeover.detectedBy)")
        #expect(takeover.outcome == "resumed")
        #expect((takeover.restoredStep ?? -1) >= committed)
    }

    @Test("a stuck worker (heartbeats alive, no progress) is named by the watchdog, its stack saved, and it is replaced")
    func stuckWorker() throws {
        var sim = quiet(seed: 41)
        sim.run(until: 6)  // long enough to learn the step time
        let pid = sim.workers["n2/w1"]!.pid
        sim.workers["n2/w1"]!.stuckSince = sim.now
        let restart = try #require(awaitRestartOrder(&sim, node: "n2", worker: "w1", within: 10))
        #expect(restart.pid == pid && restart.saveStack)
        let report = try #require(sim.coordinator.lastFailure)
        #expect(report.what == "n2/w1")
        #expect(report.detectedBy.contains("step-progress watchdog"))
        #expect(report.detectedBy.contains("rank 5 (n2/w1)"), "\(report.detectedBy)")
        sim.run(until: sim.now + 5)
        #expect(sim.violations.isEmpty, "\(sim.violations)")
        #expect(sim.coordinator.state == .running)
        #expect(sim.workers["n2/w1"]!.pid != pid, "the stuck process was replaced")
    }

    @Test("a stopped worker (alive, silent) is declared dead and its SMP is told to end that very process before respawning it")
    func stoppedWorker() throws {
        var sim = quiet(seed: 43)
        let pid = sim.workers["n0/w1"]!.pid
        sim.workers["n0/w1"]!.stopped = true
        let restart = try #require(awaitRestartOrder(&sim, node: "n0", worker: "w1", within: 6))
        #expect(restart.pid == pid && !restart.saveStack)
        sim.run(until: sim.now + 3)
        #expect(sim.violations.isEmpty, "\(sim.violations)")
        #expect(sim.coordinator.state == .running)
        #expect(sim.coordinator.failureHistory.last?.detectedBy.contains("heartbeat timeout") == true)
    }

    @Test("every worker of the job killed at once is one failure event, not one per worker")
    func killAllWorkers() throws {
        var sim = ControlSimulation(seed: 51, nodes: 4, workersPerNode: 3)
        var settings = sim.coordinator.settings
        settings.maxFailuresWithoutResume = 3  // fewer than the 12 deaths
        sim.coordinator = CoordinatorInstance(settings: settings)
        sim.faultsUntil = 0
        sim.dropRate = 0
        sim.dupRate = 0
        sim.run(until: 3)
        let committed = try #require(sim.coordinator.committedStep)
        for key in sim.liveWorkers() { sim.killWorker(key) }
        sim.run(until: 8)
        #expect(sim.violations.isEmpty, "\(sim.violations)")
        #expect(sim.coordinator.state == .running, "\(sim.coordinator.stopReason ?? "")")
        #expect((sim.coordinator.failureHistory.last?.restoredStep ?? -1) >= committed)
    }

    @Test("an old incarnation's hello (it knows an epoch, another pid) is fenced and never displaces the live SMP; a fresh process's is a restart")
    func zombieHello() {
        var c = CoordinatorInstance(settings: CoordinatorSettings(jobID: "z", nodes: 1, workersPerNode: 1))
        let inventory = { (pid: Int) in
            ControlMessage.SMPInventory(node: "n0", pid: pid, dataEndpoint: "tcp://n0", workers: ["w0"], rankOffset: 0,
                                        committedStep: nil, stagedStep: nil)
        }
        _ = c.receive(.smpHello(inventory(100)), from: "n0", epoch: 0, now: 0)
        _ = c.receive(.workerHello(.init(node: "n0", worker: "w0", rank: 0, worldSize: 1, pid: 101, collectiveEndpoint: "ring://0")),
                      from: "n0/w0", epoch: 0, now: 0)
        #expect(c.state == .recovering || c.state == .running)
        let epoch = c.epoch
        // pid 99 says hello as n0 and has been welcomed before (epoch > 0): a zombie.
        let out = c.receive(.smpHello(inventory(99)), from: "n0", epoch: epoch, now: 0.1)
        #expect(out.contains { if case .send("n0", .fenced) = $0 { true } else { false } }, "\(out)")
        #expect(c.nodes["n0"]?.pid == 100 && c.nodes["n0"]?.state == .alive)
        #expect(c.epoch == epoch)
        // A fresh process (epoch 0) under the id: the SMP was restarted; a failure.
        _ = c.receive(.smpHello(inventory(102)), from: "n0", epoch: 0, now: 0.2)
        #expect(c.epoch > epoch)
        #expect(c.lastFailure?.detectedBy.contains("restarted as pid 102") == true)
    }

    @Test("an exit report of an incarnation the coordinator already replaced is not a new failure; its replacement's is")
    func staleExit() {
        var c = CoordinatorInstance(settings: CoordinatorSettings(jobID: "x", nodes: 1, workersPerNode: 1))
        _ = c.receive(.smpHello(.init(node: "n0", pid: 10, dataEndpoint: "tcp://n0", workers: ["w0"], rankOffset: 0,
                                      committedStep: nil, stagedStep: nil)), from: "n0", epoch: 0, now: 0)
        _ = c.receive(.workerHello(.init(node: "n0", worker: "w0", rank: 0, worldSize: 1, pid: 11, collectiveEndpoint: "r")),
                      from: "n0/w0", epoch: 0, now: 0)
        _ = c.receive(.ready(restoredStep: nil), from: "n0/w0", epoch: c.epoch, now: 0.1)
        #expect(c.state == .running)
        // While it runs, the exit of another (older) process under its name is not its death.
        _ = c.receive(.childExited(worker: "w0", pid: 5, status: "signal 9"), from: "n0", epoch: c.epoch, now: 0.15)
        #expect(c.failureCount == 0 && c.state == .running)
        _ = c.receive(.childExited(worker: "w0", pid: 11, status: "signal 9"), from: "n0", epoch: c.epoch, now: 0.2)
        #expect(c.failureCount == 1 && c.workers["n0/w0"]?.state == .restarting)
        // The same exit reported twice: nothing new.
        _ = c.receive(.childExited(worker: "w0", pid: 11, status: "signal 9"), from: "n0", epoch: c.epoch, now: 0.3)
        #expect(c.failureCount == 1)
        // Its replacement (pid 12) dies before it said hello: a new failure.
        _ = c.receive(.childExited(worker: "w0", pid: 12, status: "exit 1"), from: "n0", epoch: c.epoch, now: 1.5)
        #expect(c.failureCount == 2)
    }

    @Test("a worker that exits before it joins a starting job is started again, and its third exit stops the job naming it")
    func exitsBeforeJoining() {
        var c = CoordinatorInstance(settings: CoordinatorSettings(jobID: "x", nodes: 2, workersPerNode: 1))
        _ = c.receive(.smpHello(.init(node: "n0", pid: 10, dataEndpoint: "tcp://n0", workers: ["w0"], rankOffset: 0,
                                      committedStep: nil, stagedStep: nil)), from: "n0", epoch: 0, now: 0)
        // An exit reported by a node that has not said hello starts nothing: it is asked to say hello.
        #expect(c.receive(.childExited(worker: "w0", pid: 9, status: "exit 1"), from: "n1", epoch: 0, now: 0.1) == [.send(to: "n1", .helloRequired)])
        // A worker the node does not run starts nothing.
        #expect(c.receive(.childExited(worker: "w7", pid: 9, status: "exit 1"), from: "n0", epoch: 0, now: 0.1).isEmpty)
        for i in 1..<CoordinatorInstance.maxStartExits {
            let out = c.receive(.childExited(worker: "w0", pid: 10 + i, status: "exit 1"), from: "n0", epoch: 0, now: Double(i))
            #expect(out.contains(.send(to: "n0", .restartWorkers([.init(worker: "w0", pid: 0)]))), "\(out)")
            #expect(c.state == .starting)
        }
        _ = c.receive(.childExited(worker: "w0", pid: 20, status: "signal 6"), from: "n0", epoch: 0, now: 5)
        #expect(c.state == .failed)
        #expect(c.stopReason == "worker n0/w0 exited 3 times before it joined the job (last: signal 6); see its log")
    }

    @Test("a registration refused for lack of memory stops a starting job at once with the SMP's reason; in a running job it is logged")
    func startRefused() {
        func started() -> CoordinatorInstance {
            var c = CoordinatorInstance(settings: CoordinatorSettings(jobID: "x", nodes: 1, workersPerNode: 1))
            _ = c.receive(.smpHello(.init(node: "n0", pid: 10, dataEndpoint: "tcp://n0", workers: ["w0"], rankOffset: 0,
                                          committedStep: nil, stagedStep: nil)), from: "n0", epoch: 0, now: 0)
            return c
        }
        var c = started()
        _ = c.receive(.startRefused(worker: "w0", reason: "needs 8 bytes; 4 left"), from: "n0", epoch: 0, now: 0.1)
        #expect(c.state == .failed && c.stopReason == "worker n0/w0 cannot start: needs 8 bytes; 4 left")
        // Only an SMP may say so.
        var d = started()
        #expect(throws: WireError.self) { try d.validate(.startRefused(worker: "w0", reason: "r"), from: "n0/w0") }
        _ = d.receive(.workerHello(.init(node: "n0", worker: "w0", rank: 0, worldSize: 1, pid: 11, collectiveEndpoint: "r")),
                      from: "n0/w0", epoch: 0, now: 0)
        _ = d.receive(.ready(restoredStep: nil), from: "n0/w0", epoch: d.epoch, now: 0.1)
        #expect(d.state == .running)
        let out = d.receive(.startRefused(worker: "w0", reason: "r"), from: "n0", epoch: d.epoch, now: 0.2)
        #expect(d.state == .running && out == [.log("worker n0/w0 could not register: r")])
    }

    @Test("the job's start restores nothing: it is no measure of the recovery rate, which later deadlines use")
    func startIsNoRate() {
        var c = CoordinatorInstance(settings: CoordinatorSettings(jobID: "x", nodes: 1, workersPerNode: 1))
        _ = c.receive(.smpHello(.init(node: "n0", pid: 10, dataEndpoint: "tcp://n0", workers: ["w0"], rankOffset: 0,
                                      committedStep: nil, stagedStep: nil)), from: "n0", epoch: 0, now: 0)
        _ = c.receive(.smpHeartbeat(dataBytes: 1 << 30, parityBytes: 0), from: "n0", epoch: 0, now: 0.05)
        _ = c.receive(.workerHello(.init(node: "n0", worker: "w0", rank: 0, worldSize: 1, pid: 11, collectiveEndpoint: "r")),
                      from: "n0/w0", epoch: 0, now: 0.1)
        _ = c.receive(.ready(restoredStep: nil), from: "n0/w0", epoch: c.epoch, now: 0.2)
        #expect(c.state == .running)
        #expect(c.recoveryRate == c.settings.recoveryBytesPerSecond, "1 GiB 'restored' at the start counted as \(c.recoveryRate) B/s")
    }

    /// A coordinator of 2 nodes with a worker each, started (every hello, every ready) at t = 0.1.
    static func runningTwoNodeJob(_ settings: CoordinatorSettings) -> CoordinatorInstance {
        var c = CoordinatorInstance(settings: settings)
        for (i, n) in ["n0", "n1"].enumerated() {
            _ = c.receive(.smpHello(.init(node: n, pid: 10 + i, dataEndpoint: "tcp://\(n)", workers: ["w0"], rankOffset: i,
                                          committedStep: nil, stagedStep: nil)), from: n, epoch: 0, now: 0)
            _ = c.receive(.workerHello(.init(node: n, worker: "w0", rank: i, worldSize: 2, pid: 20 + i, collectiveEndpoint: "r\(i)")),
                          from: "\(n)/w0", epoch: 0, now: 0)
        }
        for n in ["n0", "n1"] { _ = c.receive(.ready(restoredStep: nil), from: "\(n)/w0", epoch: c.epoch, now: 0.1) }
        return c
    }

    @Test("a commit's latency is never negative, also when a stall of the coordinator moved the round's start forward")
    func commitLatencyAfterStall() {
        var c = Self.runningTwoNodeJob(CoordinatorSettings(jobID: "s", nodes: 2, workersPerNode: 1))
        var now = 0.1
        while now < 1.0 {  // members heard on time
            now += 0.05
            for m in ["n0", "n1", "n0/w0", "n1/w0"] {
                _ = c.receive(m.contains("/") ? .workerHeartbeat(step: 1, running: true, skipped: 0, activity: .idle)
                                              : .smpHeartbeat(dataBytes: 1000, parityBytes: 0), from: m, epoch: c.epoch, now: now)
            }
            _ = c.tick(now: now)
        }
        #expect(c.state == .running)
        // The coordinator stalls 3 s; the first message it reads after is n0's protected (the
        // round starts then), and the tick after it moves every start forward by the gap.
        now += 3
        _ = c.receive(.protected(step: 2, layoutChunkBytes: 0), from: "n0", epoch: c.epoch, now: now)
        _ = c.tick(now: now)
        _ = c.receive(.protected(step: 2, layoutChunkBytes: 0), from: "n1", epoch: c.epoch, now: now + 0.001)
        #expect(c.committedStep == 2)
        #expect((c.lastCommitLatency ?? -1) >= 0, "latency \(String(describing: c.lastCommitLatency))")
    }

    @Test("with erasure coding a round counts only protected under the layout sent last: not before any layout, not under a replaced one")
    func protectedNeedsTheLayout() throws {
        var settings = CoordinatorSettings(jobID: "l", nodes: 2, workersPerNode: 1)
        settings.erasure = (1, 1)
        var c = Self.runningTwoNodeJob(settings)
        #expect(c.state == .running)
        #expect(c.lastLayout == nil)  // no size said yet
        func protect(_ step: Int, chunk: Int, at now: Double) -> [CoordinatorInstance.Directive] {
            c.receive(.protected(step: step, layoutChunkBytes: chunk), from: "n0", epoch: c.epoch, now: now)
                + c.receive(.protected(step: step, layoutChunkBytes: chunk), from: "n1", epoch: c.epoch, now: now)
        }
        func commits(_ out: [CoordinatorInstance.Directive]) -> Bool { out.contains { if case .send(_, .commit) = $0 { true } else { false } } }
        // Before any layout: every node's round is unprotected; nothing commits.
        #expect(!commits(protect(2, chunk: 0, at: 0.2)))
        #expect(c.committedStep == nil)
        // The sizes come in, the layout goes out; the SMPs protect the staged round under it.
        var out = c.receive(.smpHeartbeat(dataBytes: 1000, parityBytes: 0), from: "n0", epoch: c.epoch, now: 0.3)
        out += c.receive(.smpHeartbeat(dataBytes: 1000, parityBytes: 0), from: "n1", epoch: c.epoch, now: 0.3)
        let chunk = try #require(c.lastLayout?.chunkBytes)
        #expect(out.contains { if case .send(_, .ecLayout) = $0 { true } else { false } })
        #expect(!commits(protect(2, chunk: chunk + 64, at: 0.4)))  // some other layout's
        #expect(commits(protect(2, chunk: chunk, at: 0.5)))
        #expect(c.committedStep == 2)
        // n0 protected round 4; then a node's size grows and the chunk with it: n0's
        // protected no longer holds, and n1's under the new layout alone commits nothing.
        _ = c.receive(.protected(step: 4, layoutChunkBytes: chunk), from: "n0", epoch: c.epoch, now: 0.6)
        out = c.receive(.smpHeartbeat(dataBytes: 5000, parityBytes: 0), from: "n1", epoch: c.epoch, now: 0.7)
        let grown = try #require(c.lastLayout?.chunkBytes)
        #expect(grown > chunk)
        #expect(!commits(c.receive(.protected(step: 4, layoutChunkBytes: grown), from: "n1", epoch: c.epoch, now: 0.8)))
        #expect(commits(c.receive(.protected(step: 4, layoutChunkBytes: grown), from: "n0", epoch: c.epoch, now: 0.9)))
        #expect(c.committedStep == 4)
    }

    @Test("a restarted coordinator commits a round every SMP's hello says it protected, and restores that step")
    func restartCommitsProtectedRound() throws {
        var n1Chunk = 4096
        var erasure: (k: Int, m: Int)?
        let hello = { (node: String, committed: Int?, staged: Int?, protected: Int?) in
            ControlMessage.smpHello(.init(node: node, pid: 7, dataEndpoint: "tcp://\(node)", workers: ["w0"], rankOffset: node == "n0" ? 0 : 1,
                                          committedStep: committed, stagedStep: staged, protectedStep: protected,
                                          layoutChunkBytes: node == "n1" ? n1Chunk : 4096))
        }
        // The field survives the wire.
        let (decoded, _) = try ControlMessage.decode(hello("n0", 4, 5, 5).envelope(sender: "n0", epoch: 2).encoded())
        #expect(decoded == hello("n0", 4, 5, 5))
        func start(_ p1: Int?) -> (CoordinatorInstance, [CoordinatorInstance.Directive]) {
            var settings = CoordinatorSettings(jobID: "r", nodes: 2, workersPerNode: 1)
            settings.erasure = erasure
            var c = CoordinatorInstance(settings: settings)
            var out = c.receive(hello("n0", 4, 5, 5), from: "n0", epoch: 3, now: 0)
            out += c.receive(hello("n1", 4, 5, p1), from: "n1", epoch: 3, now: 0)
            for (i, n) in ["n0", "n1"].enumerated() {
                out += c.receive(.workerHello(.init(node: n, worker: "w0", rank: i, worldSize: 2, pid: 10 + i, collectiveEndpoint: "r\(i)")),
                                 from: "\(n)/w0", epoch: 3, now: 0)
            }
            return (c, out)
        }
        let (c, out) = start(5)
        #expect(c.committedStep == 5)
        #expect(out.contains { if case .send("n1", .commit(step: 5)) = $0 { true } else { false } })
        #expect(out.contains { if case .send("n0/w0", .restore(step: 5, _)) = $0 { true } else { false } })
        // One node had not protected it: step 4 stays the committed one.
        let (c2, out2) = start(nil)
        #expect(c2.committedStep == 4)
        #expect(!out2.contains { if case .send(_, .commit(step: 5)) = $0 { true } else { false } })
        // With erasure coding: under one layout it commits; n1 protected it under
        // another (its hello's chunk size differs), and it does not.
        erasure = (1, 1)
        #expect(start(5).0.committedStep == 5)
        n1Chunk = 8192
        #expect(start(5).0.committedStep == 4)
    }

    @Test("a fresh coordinator rebuilds its view from the SMPs and resumes without losing the committed step")
    func coordinatorRestart() {
        var sim = quiet(seed: 21)
        let committed = sim.coordinator.committedStep
        #expect(committed != nil)
        sim.coordinatorDownUntil = sim.now + 0.1
        sim.run(until: 6)
        #expect(sim.violations.isEmpty, "\(sim.violations)")
        #expect(sim.coordinator.state == .running)
        #expect((sim.coordinator.committedStep ?? -1) >= committed!)
        #expect(sim.coordinator.failureHistory.contains { $0.kind == "coordinator" && $0.outcome == "resumed" })
    }

    @Test("a restore phase held up by a worker that never restores (alive, deaf) ends it as hung instead of waiting forever")
    func deafWorkerInRestart() throws {
        var sim = quiet(seed: 61)
        // n3/w0 hangs, then another worker dies: the recovery's restore reaches a deaf worker.
        sim.workers["n3/w0"]!.stuckSince = sim.now
        sim.killWorker("n1/w1")
        sim.run(until: sim.now + 12)
        #expect(sim.violations.isEmpty, "\(sim.violations)")
        #expect(sim.coordinator.state == .running, "\(sim.coordinator.stopReason ?? "") \(sim.log.suffix(20))")
        #expect(sim.coordinator.failureHistory.contains { $0.what == "n3/w0" && $0.detectedBy.contains("hung") })
    }
}
