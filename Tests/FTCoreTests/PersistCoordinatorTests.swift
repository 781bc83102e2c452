import Testing
@testable import FTCore

/// The coordinator's side of the persistent tier: when a persist is ordered,
/// the commit it holds back, when a step is durable, and the recovery from
/// disk when memory cannot recover.
@Suite("Coordinator: the persistent tier")
struct PersistCoordinatorTests {
    typealias Directive = CoordinatorInstance.Directive

    static func sends(_ out: [Directive], _ match: (String, ControlMessage) -> Bool) -> Bool {
        out.contains { if case .send(let to, let m) = $0 { match(to, m) } else { false } }
    }

    static func commits(_ out: [Directive]) -> Bool { sends(out) { _, m in if case .commit = m { true } else { false } } }

    static func persistOrders(_ out: [Directive]) -> [Int] {
        out.compactMap { if case .send(_, .persist(let s, _, _)) = $0 { s } else { nil } }
    }

    /// n1 falls silent while n0 keeps heartbeating, until the recovery is under
    /// way without n1: the time then and the directives of the ticks.
    static func loseN1(_ c: inout CoordinatorInstance, from start: Double) -> (Double, [Directive]) {
        var now = start
        var orders: [Directive] = []
        while now < 2, c.state == .running || c.nodes["n1"]?.state == .alive {
            now += 0.1
            _ = c.receive(.smpHeartbeat(dataBytes: 1000, parityBytes: 0), from: "n0", epoch: c.epoch, now: now)
            _ = c.receive(.workerHeartbeat(step: 3, running: false, skipped: 0, activity: .idle), from: "n0/w0", epoch: c.epoch, now: now)
            orders += c.tick(now: now)
        }
        return (now, orders)
    }

    func protect(_ c: inout CoordinatorInstance, _ step: Int, at now: Double) -> [Directive] {
        c.receive(.protected(step: step, layoutChunkBytes: 0), from: "n0", epoch: c.epoch, now: now)
            + c.receive(.protected(step: step, layoutChunkBytes: 0), from: "n1", epoch: c.epoch, now: now)
    }

    @Test("a persist is ordered every P commits; the next commit waits for every node's answer; a step every node wrote is durable")
    func persistHoldsTheNextCommit() {
        var settings = CoordinatorSettings(jobID: "p", nodes: 2, workersPerNode: 1)
        settings.persistEvery = 2
        var c = ControlSimulationTests.runningTwoNodeJob(settings)
        #expect(c.state == .running)
        var out = protect(&c, 1, at: 0.2)
        #expect(Self.commits(out) && c.committedStep == 1)
        #expect(Self.persistOrders(out) == [1, 1], "the first commit is persisted on both nodes")
        #expect(Self.sends(out) { _, m in m == .persist(step: 1, nodes: ["n0", "n1"], durable: nil) })
        #expect(c.persisting?.step == 1)
        // Round 2 is protected everywhere, and waits: the slots of step 1 are being written.
        out = protect(&c, 2, at: 0.3)
        #expect(!Self.commits(out) && c.committedStep == 1)
        out = c.receive(.persisted(step: 1, bytes: 100, error: ""), from: "n0", epoch: c.epoch, now: 0.4)
        #expect(!Self.commits(out) && c.durableStep == nil)
        out = c.receive(.persisted(step: 1, bytes: 100, error: ""), from: "n1", epoch: c.epoch, now: 0.5)
        #expect(c.durableStep == 1 && c.persistedStep == 1)
        #expect(Self.commits(out) && c.committedStep == 2, "the waiting round commits once the persist is over")
        #expect(Self.persistOrders(out).isEmpty, "step 2 is 1 commit after the last persist, P = 2")
        // Round 3 commits and is persisted (2 commits since step 1).
        out = protect(&c, 3, at: 0.6)
        #expect(Self.persistOrders(out) == [3, 3])
        #expect(Self.sends(out) { _, m in m == .persist(step: 3, nodes: ["n0", "n1"], durable: 1) }, "the order names the durable step to keep")
        // n0's disk is full: not durable (without EC every node's part is needed), the flag is up, commits go on.
        _ = c.receive(.persisted(step: 3, bytes: 0, error: "out_of_space: write /d/image.bin: No space left on device"), from: "n0",
                      epoch: c.epoch, now: 0.7)
        out = c.receive(.persisted(step: 3, bytes: 100, error: ""), from: "n1", epoch: c.epoch, now: 0.8)
        #expect(c.durableStep == 1 && c.persistedStep == 1)
        #expect(c.persistErrors["n0"]?.hasPrefix("out_of_space") == true)
        #expect(c.persisting == nil)
        out = protect(&c, 4, at: 0.9)
        #expect(Self.commits(out) && c.committedStep == 4)
    }

    @Test("a persist that nobody answers holds commits back at most persistTimeout")
    func persistTimeout() {
        var settings = CoordinatorSettings(jobID: "p", nodes: 2, workersPerNode: 1)
        settings.persistEvery = 1
        settings.persistTimeout = 5
        var c = ControlSimulationTests.runningTwoNodeJob(settings)
        _ = protect(&c, 1, at: 0.2)
        #expect(!Self.commits(protect(&c, 2, at: 0.3)))
        var now = 0.3
        var out: [Directive] = []
        while now < 6 {  // heartbeats on time, no persisted
            now += 0.1
            for m in ["n0", "n1", "n0/w0", "n1/w0"] {
                _ = c.receive(m.contains("/") ? .workerHeartbeat(step: 3, running: true, skipped: 0, activity: .idle)
                                              : .smpHeartbeat(dataBytes: 1000, parityBytes: 0), from: m, epoch: c.epoch, now: now)
            }
            out += c.tick(now: now)
        }
        #expect(c.state == .running)
        #expect(c.committedStep == 2, "the round that waited commits once the persist timed out")
        #expect(c.persistErrors.keys.sorted() == ["n0", "n1"])
        #expect(!out.contains { if case .log(let l) = $0 { l.contains("aborted") } else { false } }, "no round aborted while it waited")
    }

    @Test("a node lost beyond what memory repairs: with a durable step every node loads it from disk, then every worker restores it")
    func recoveryFromDisk() throws {
        var settings = CoordinatorSettings(jobID: "p", nodes: 2, workersPerNode: 1)
        settings.persistEvery = 1
        var c = ControlSimulationTests.runningTwoNodeJob(settings)
        _ = protect(&c, 1, at: 0.2)
        _ = c.receive(.persisted(step: 1, bytes: 100, error: ""), from: "n0", epoch: c.epoch, now: 0.3)
        _ = c.receive(.persisted(step: 1, bytes: 100, error: ""), from: "n1", epoch: c.epoch, now: 0.3)
        #expect(c.durableStep == 1)
        _ = protect(&c, 2, at: 0.4)
        #expect(c.committedStep == 2)
        // n1's SMP dies: no erasure coding, so memory cannot rebuild it; step 1 is on disk.
        _ = c.receive(.childExited(worker: "w0", pid: 21, status: "killed"), from: "n1", epoch: c.epoch, now: 0.5)
        var (now, orders) = Self.loseN1(&c, from: 0.5)
        #expect(c.state == .recovering)
        #expect(c.committedStep == 1, "memory past the durable step is void")
        #expect(Self.sends(orders) { to, m in to == "n0" && m == .loadPersisted(step: 1) })
        let report = try #require(c.lastFailure)
        #expect(report.phases.contains { $0.phase == .plan && $0.reason.contains("loads durable step 1 from disk") })
        // n1's replacement says hello: it loads too; both answer; every worker restores step 1.
        orders = c.receive(.smpHello(.init(node: "n1", pid: 99, dataEndpoint: "tcp://n1b", workers: ["w0"], rankOffset: 1,
                                           committedStep: nil, stagedStep: nil)), from: "n1", epoch: c.epoch, now: now + 0.1)
        #expect(Self.sends(orders) { to, m in to == "n1" && m == .loadPersisted(step: 1) })
        _ = c.receive(.rebuilt(step: 1, error: ""), from: "n0", epoch: c.epoch, now: now + 0.2)
        orders = c.receive(.rebuilt(step: 1, error: ""), from: "n1", epoch: c.epoch, now: now + 0.3)
        #expect(Self.sends(orders) { _, m in m == .restore(step: 1, sources: []) })
        for (i, n) in ["n0", "n1"].enumerated() {
            _ = c.receive(.workerHello(.init(node: n, worker: "w0", rank: i, worldSize: 2, pid: 50 + i, collectiveEndpoint: "r\(i)")),
                          from: "\(n)/w0", epoch: c.epoch, now: now + 0.4)
            _ = c.receive(.ready(restoredStep: 1), from: "\(n)/w0", epoch: c.epoch, now: now + 0.5)
        }
        #expect(c.state == .running)
        #expect(c.lastFailure?.restoredStep == 1)
    }

    @Test("without a durable step, a loss beyond memory stops the job and says there is none on disk")
    func noDurableStep() {
        var settings = CoordinatorSettings(jobID: "p", nodes: 2, workersPerNode: 1)
        settings.persistEvery = 1
        var c = ControlSimulationTests.runningTwoNodeJob(settings)
        _ = protect(&c, 1, at: 0.2)  // persist ordered, never answered
        var now = 0.2
        while now < 3, c.state != .failed {
            now += 0.1
            for m in ["n0", "n0/w0"] {
                _ = c.receive(m.contains("/") ? .workerHeartbeat(step: 3, running: true, skipped: 0, activity: .idle)
                                              : .smpHeartbeat(dataBytes: 1000, parityBytes: 0), from: m, epoch: c.epoch, now: now)
            }
            _ = c.tick(now: now)
        }
        #expect(c.state == .failed)
        #expect(c.stopReason?.contains("no durable step on disk") == true, "\(c.stopReason ?? "")")
    }

    @Test("a durable step that cannot be loaded is never used in part: every node goes back to the durable step before it")
    func olderDurableStep() {
        var settings = CoordinatorSettings(jobID: "p", nodes: 2, workersPerNode: 1)
        settings.persistEvery = 1
        var c = CoordinatorSimulationTestsShim.running(settings)
        for step in [1, 2] {
            _ = protect(&c, step, at: 0.1 + Double(step) / 10)
            for n in ["n0", "n1"] { _ = c.receive(.persisted(step: step, bytes: 100, error: ""), from: n, epoch: c.epoch, now: 0.15 + Double(step) / 10) }
        }
        #expect(c.durableSteps == [1, 2] && c.durableStep == 2)
        var (now, orders) = Self.loseN1(&c, from: 0.4)
        #expect(Self.sends(orders) { to, m in to == "n0" && m == .loadPersisted(step: 2) })
        orders = c.receive(.rebuilt(step: 2, error: "undecodable: row 1 has 2 of 2 parts damaged"), from: "n0", epoch: c.epoch, now: now + 0.1)
        #expect(Self.sends(orders) { to, m in to == "n0" && m == .loadPersisted(step: 1) })
        #expect(c.committedStep == 1 && c.durableStep == 1 && c.state == .recovering)
        // And when that one fails too, the job stops saying so.
        _ = c.receive(.rebuilt(step: 1, error: "undecodable"), from: "n0", epoch: c.epoch, now: now + 0.2)
        #expect(c.state == .failed)
        #expect(c.stopReason?.contains("no older durable step") == true)
    }
}

/// The running two-node job of the control-plane simulation.
enum CoordinatorSimulationTestsShim {
    static func running(_ settings: CoordinatorSettings) -> CoordinatorInstance { ControlSimulationTests.runningTwoNodeJob(settings) }
}
