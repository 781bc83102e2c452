import Testing
@testable import FTCore

/// Deterministic simulations of the control plane: one `CoordinatorInstance`,
/// N simulated SMPs with workers, a simulated network that drops, delays,
/// duplicates and partitions, a manual clock, faults at seeded random times.
/// Invariants are checked after every event.
struct ControlSimulation {
    struct Envelope {
        var at: Double
        var seq: Int
        var from: String
        var to: String
        var message: ControlMessage
        var epoch: UInt64
    }

    struct SMP {
        var id: String
        var workers: [String]
        var rankOffset: Int
        var running = true      // process exists
        var stopped = false     // SIGSTOP
        var epoch: UInt64 = 0
        var committed: Int?
        var staged: Int?
        var nextHeartbeat = 0.0
        var pendingSpawns: [(String, Double)] = []
    }

    enum WorkerPhase: Equatable { case hello, waiting, running, done, gone }

    struct Worker {
        var key: String
        var node: String
        var local: String
        var rank: Int
        var pid: Int
        var phase: WorkerPhase = .hello
        var epoch: UInt64 = 0
        var step = 0
        var readyAt: Double?
        var readyStep: Int??
        var resumedEpoch: UInt64 = 0
        var nextHeartbeat = 0.0
    }

    let seed: UInt64
    var rng: SplitMix64
    var now = 0.0
    var coordinator: CoordinatorInstance
    var smps: [String: SMP] = [:]
    var workers: [String: Worker] = [:]
    var queue: [Envelope] = []
    var seq = 0
    var nextPid = 1000
    var partitioned: [String: Double] = [:]  // member -> until
    var dropRate = 0.02
    var dupRate = 0.02
    var maxDelay = 0.004
    var faultsUntil = 20.0
    var nextFault = 1.0
    var nextStep = 0.0
    let steps = 400

    // Observations for the invariants.
    var protectedSeen: [UInt64: [String: Set<Int>]] = [:]
    var restoredInEpoch: [UInt64: Int?] = [:]
    var fenced: Set<String> = []
    var fencedPids: [String: Int] = [:]
    var log: [String] = []
    var violations: [String] = []

    init(seed: UInt64, nodes: Int = 3, workersPerNode: Int = 2) {
        self.seed = seed
        rng = SplitMix64(seed: seed)
        var settings = CoordinatorSettings(jobID: "sim", nodes: nodes, workersPerNode: workersPerNode)
        settings.phaseTimeout = 2
        settings.roundTimeout = 1
        coordinator = CoordinatorInstance(settings: settings)
        for n in 0..<nodes {
            let id = "n\(n)"
            let locals = (0..<workersPerNode).map { "w\($0)" }
            smps[id] = SMP(id: id, workers: locals, rankOffset: n * workersPerNode)
            for (i, w) in locals.enumerated() {
                nextPid += 1
                workers["\(id)/\(w)"] = Worker(key: "\(id)/\(w)", node: id, local: w, rank: n * workersPerNode + i, pid: nextPid)
            }
        }
        for id in smps.keys.sorted() { sendHello(id) }
    }

    mutating func roll() -> Double { Double(rng.next() % 1_000_000) / 1_000_000 }

    // MARK: network

    mutating func send(from: String, to: String, _ m: ControlMessage, epoch: UInt64) {
        if let until = partitioned[from], until > now { return }
        if let until = partitioned[to], until > now { return }
        if roll() < dropRate && now < faultsUntil { return }
        let copies = roll() < dupRate && now < faultsUntil ? 2 : 1
        for _ in 0..<copies {
            seq += 1
            queue.append(Envelope(at: now + roll() * maxDelay, seq: seq, from: from, to: to, message: m, epoch: epoch))
        }
    }

    mutating func sendHello(_ node: String) {
        let s = smps[node]!
        send(from: node, to: "coordinator", .smpHello(.init(node: node, pid: 1, dataEndpoint: "tcp://\(node)", workers: s.workers,
                                                             rankOffset: s.rankOffset, committedStep: s.committed, stagedStep: s.staged,
                                                             // A simulated SMP reports protected(s) as it stages s.
                                                             protectedStep: s.staged)),
             epoch: s.epoch)
    }

    mutating func sendWorkerHello(_ key: String) {
        let w = workers[key]!
        send(from: key, to: "coordinator", .workerHello(.init(node: w.node, worker: w.local, rank: w.rank,
                                                               worldSize: workers.count, pid: w.pid, collectiveEndpoint: "ring://\(w.rank)")),
             epoch: w.epoch)
    }

    // MARK: coordinator side

    mutating func apply(_ directives: [CoordinatorInstance.Directive]) {
        for d in directives {
            switch d {
            case .log(let line): log.append(stamp(now) + " " + line)
            case .send(let to, let m):
                checkOutgoing(to: to, m)
                send(from: "coordinator", to: to, m, epoch: coordinator.epoch)
            }
        }
    }

    mutating func checkOutgoing(to: String, _ m: ControlMessage) {
        switch m {
        case .commit(let s):
            // Invariant: never a commit unless every node protected s in the current epoch
            // (a commit re-sent while rebuilding the view after a coordinator restart excepted).
            if coordinator.state == .running {
                for node in smps.keys where !(protectedSeen[coordinator.epoch]?[node]?.contains(s) ?? false) {
                    violations.append("commit(\(s)) in epoch \(coordinator.epoch) but \(node) never protected it in that epoch")
                }
            }
        case .restore(let s, _) where workers[to] != nil:
            // Invariant: one restore step per epoch, and the worker's SMP holds it.
            if let previous = restoredInEpoch[coordinator.epoch], previous != s {
                violations.append("epoch \(coordinator.epoch): restore \(String(describing: s)) after restore \(String(describing: previous))")
            }
            restoredInEpoch[coordinator.epoch] = s
        case .fenced:
            fenced.insert(to)
            if let w = workers[to] { fencedPids[to] = w.pid }
        default: break
        }
    }

    func fingerprint() -> String {
        var parts = ["\(coordinator.epoch)", coordinator.state.rawValue, "\(String(describing: coordinator.committedStep))"]
        for n in coordinator.nodes.values.sorted(by: { $0.id < $1.id }) {
            parts.append("\(n.id):\(alive(n.state)):\(String(describing: n.protectedStep)):\(String(describing: n.committedStep))")
        }
        for w in coordinator.workers.values.sorted(by: { $0.info.key < $1.info.key }) {
            parts.append("\(w.info.key):\(alive(w.state)):\(w.ready)")
        }
        return parts.joined(separator: "|")
    }

    /// Dead and fenced are one state for the job (fenced only records that the zombie spoke).
    func alive(_ s: CoordinatorInstance.MemberState) -> String { s == .fenced ? "dead" : s.rawValue }

    mutating func deliverToCoordinator(_ e: Envelope) {
        if case .protected(let s) = e.message {
            protectedSeen[e.epoch, default: [:]][e.from, default: []].insert(s)
        }
        let zombie = fenced.contains(e.from) && (smps[e.from] != nil || fencedPids[e.from] == workers[e.from]?.pid)
        let before = fingerprint()
        let directives = coordinator.receive(e.message, from: e.from, epoch: e.epoch, now: now)
        if zombie, !isHello(e.message), fingerprint() != before {
            violations.append("fenced \(e.from) changed the coordinator's state with \(e.message)")
        }
        apply(directives)
    }

    func isHello(_ m: ControlMessage) -> Bool {
        if case .workerHello = m { return true }
        return false
    }

    // MARK: members

    mutating func deliverToSMP(_ e: Envelope) {
        guard var s = smps[e.to], s.running, !s.stopped else { return }
        s.epoch = max(s.epoch, e.epoch)
        switch e.message {
        case .commit(let step): s.committed = step; s.staged = nil
        case .abort(let step): if s.staged == step { s.staged = nil }
        case .restore(let step, _):
            if let step, s.staged == step { s.committed = step }
            s.staged = nil
        case .restartWorkers(let ids):
            for id in ids {
                let key = "\(s.id)/\(id)"
                if workers[key]?.phase == .gone { s.pendingSpawns.append((id, now + 0.02)) }
            }
        case .helloRequired:
            smps[e.to] = s
            sendHello(e.to)
            return
        case .fenced, .stop:
            s.running = false
            for w in s.workers { workers["\(s.id)/\(w)"]?.phase = .gone }
        default: break
        }
        smps[e.to] = s
    }

    mutating func deliverToWorker(_ e: Envelope) {
        guard var w = workers[e.to], w.phase != .gone, w.phase != .done else { return }
        guard let s = smps[w.node], s.running, !s.stopped else { return }  // a stopped node's workers stop too
        w.epoch = max(w.epoch, e.epoch)
        switch e.message {
        case .welcome: if w.phase == .hello { w.phase = .waiting }
        case .pause: if w.phase == .running && e.epoch > w.resumedEpoch { w.phase = .waiting }
        case .restore(let step, _):
            if w.phase == .running { w.phase = .waiting }
            if w.phase == .hello { w.phase = .waiting }
            // The SMP holds the step committed, or staged with its commit still in flight
            // (the worker's restore request carries the step, and the SMP commits it).
            if let step, smps[w.node]!.committed != step && smps[w.node]!.staged != step {
                violations.append("\(w.key) told to restore step \(step), its SMP holds \(String(describing: smps[w.node]!.committed))")
            }
            w.readyStep = .some(step)
            w.readyAt = now + 0.01 + roll() * 0.02
        case .resume(let from, _):
            guard w.phase != .running else { break }
            w.resumedEpoch = e.epoch
            w.phase = .running
            w.step = from - 1
            w.readyAt = nil
        case .helloRequired:
            w.phase = .hello
            workers[e.to] = w
            sendWorkerHello(e.to)
            return
        case .fenced, .stop: w.phase = .gone
        default: break
        }
        workers[e.to] = w
    }

    // MARK: faults

    mutating func injectFault() {
        let choice = rng.next() % 10
        switch choice {
        case 0...4:
            // SIGKILL a worker: its SMP sees the exit at once.
            let alive = workers.values.filter { $0.phase != .gone && $0.phase != .done && smps[$0.node]!.running && !smps[$0.node]!.stopped }
                .map(\.key).sorted()
            guard !alive.isEmpty else { return }
            let key = alive[Int(rng.next() % UInt64(alive.count))]
            workers[key]!.phase = .gone
            log.append(stamp(now) + " FAULT kill worker \(key)")
            let node = workers[key]!.node
            send(from: node, to: "coordinator", .childExited(worker: workers[key]!.local, status: "signal 9"), epoch: smps[node]!.epoch)
        case 5:
            // SIGSTOP an SMP past the timeout, SIGCONT it later.
            let alive = smps.values.filter { $0.running && !$0.stopped }.map(\.id).sorted()
            guard !alive.isEmpty else { return }
            let id = alive[Int(rng.next() % UInt64(alive.count))]
            smps[id]!.stopped = true
            log.append(stamp(now) + " FAULT SIGSTOP \(id)")
            continueAt[id] = now + 0.6 + roll()
        case 6...7:
            // Partition a worker from the coordinator for a while.
            let keys = workers.keys.sorted()
            let key = keys[Int(rng.next() % UInt64(keys.count))]
            partitioned[key] = now + roll() * 0.8
            log.append(stamp(now) + " FAULT partition \(key) until \(partitioned[key]!)")
        default:
            // Partition an SMP briefly (below the timeout, mostly).
            let ids = smps.keys.sorted()
            let id = ids[Int(rng.next() % UInt64(ids.count))]
            partitioned[id] = now + roll() * 0.6
            log.append(stamp(now) + " FAULT partition \(id) until \(partitioned[id]!)")
        }
    }

    var continueAt: [String: Double] = [:]

    // MARK: run

    mutating func run(until end: Double) {
        let dt = 0.01
        while now < end {
            now += dt
            // Deliver due messages in order.
            queue.sort { ($0.at, $0.seq) < ($1.at, $1.seq) }
            while let first = queue.first, first.at <= now {
                queue.removeFirst()
                if first.to == "coordinator" { deliverToCoordinator(first) }
                else if smps[first.to] != nil { deliverToSMP(first) }
                else { deliverToWorker(first) }
                checkInvariants()
            }
            // Faults.
            if now >= nextFault && now < faultsUntil {
                injectFault()
                nextFault = now + 0.5 + roll() * 2.5
            }
            for (id, at) in continueAt where at <= now {
                continueAt[id] = nil
                smps[id]?.stopped = false
                log.append(stamp(now) + " SIGCONT \(id)")
            }
            // SMP behaviour: heartbeats, spawns.
            for id in smps.keys.sorted() {
                guard var s = smps[id], s.running, !s.stopped else { continue }
                if now >= s.nextHeartbeat {
                    send(from: id, to: "coordinator", .smpHeartbeat(dataBytes: 1, parityBytes: 0), epoch: s.epoch)
                    s.nextHeartbeat = now + 0.1
                }
                for (local, at) in s.pendingSpawns where at <= now {
                    let key = "\(id)/\(local)"
                    nextPid += 1
                    workers[key]!.pid = nextPid
                    workers[key]!.phase = .hello
                    workers[key]!.epoch = 0
                    workers[key]!.readyAt = nil
                    smps[id] = s
                    sendWorkerHello(key)
                    s = smps[id]!
                }
                s.pendingSpawns.removeAll { $0.1 <= now }
                smps[id] = s
            }
            // Worker behaviour: hello, heartbeats, ready.
            for key in workers.keys.sorted() {
                guard var w = workers[key], w.phase != .gone, w.phase != .done, smps[w.node]!.running, !smps[w.node]!.stopped else { continue }
                if w.phase == .hello && w.epoch == 0 && now >= w.nextHeartbeat {
                    workers[key] = w
                    sendWorkerHello(key)
                    w = workers[key]!
                    w.nextHeartbeat = now + 0.3
                } else if now >= w.nextHeartbeat {
                    send(from: key, to: "coordinator", .workerHeartbeat(step: w.step, running: w.phase == .running, skipped: 0), epoch: w.epoch)
                    w.nextHeartbeat = now + 0.1
                }
                if let at = w.readyAt, at <= now, let step = w.readyStep {
                    w.readyAt = nil
                    send(from: key, to: "coordinator", .ready(restoredStep: step), epoch: w.epoch)
                    w.readyAt = now + 0.5  // re-announce until resumed (a lost ready is retried)
                }
                workers[key] = w
            }
            // Training: all workers of the job step in lockstep (the collective).
            let running = workers.values.filter { $0.phase == .running }
            if now >= nextStep, running.count == workers.count, Set(running.map(\.epoch)).count == 1 {
                nextStep = now + 0.05
                let step = running[0].step + 1
                for k in workers.keys { workers[k]!.step = step }
                if step >= steps {
                    for k in workers.keys.sorted() {
                        workers[k]!.phase = .done
                        send(from: k, to: "coordinator", .workerDone(finalStep: step), epoch: workers[k]!.epoch)
                    }
                } else if smps.values.allSatisfy({ $0.staged == nil }) {
                    // The collective decision: snapshot only when no round is pending anywhere.
                    for id in smps.keys.sorted() where smps[id]!.running && !smps[id]!.stopped {
                        smps[id]!.staged = step
                        send(from: id, to: "coordinator", .protected(step: step), epoch: smps[id]!.epoch)
                    }
                }
            }
            apply(coordinator.tick(now: now))
            checkInvariants()
            if !violations.isEmpty { return }
        }
    }

    mutating func checkInvariants() {
        // Fenced processes are gone from the job: the coordinator never counts them alive.
        for id in fenced where smps[id] != nil {
            if coordinator.nodes[id]?.state == .alive { violations.append("fenced \(id) is alive in the coordinator's view") }
        }
    }
}

/// Milliseconds, for the simulation log.
func stamp(_ t: Double) -> String { "\(Int((t * 1000).rounded()))ms" }

@Suite("Control plane simulation")
struct CoordinatorSimulationTests {
    @Test("hundreds of seeded runs keep every invariant and end in resume or a reported stop")
    func manySeeds() {
        var outcomes: [String: Int] = [:]
        var recoveries = 0
        for seed in UInt64(1)...300 {
            var sim = ControlSimulation(seed: seed)
            sim.run(until: 40)
            let failure = { (what: String) in
                "seed \(seed): \(what)\n" + sim.log.suffix(40).joined(separator: "\n")
            }
            #expect(sim.violations.isEmpty, "\(failure(sim.violations.joined(separator: "; ")))")
            if !sim.violations.isEmpty { return }
            let state = sim.coordinator.state
            #expect(state == .running || state == .stopped || state == .failed, "\(failure("ended \(state)"))")
            if state == .running {
                let phases = Set(sim.workers.values.map(\.phase))
                #expect(phases == [.running], "\(failure("coordinator running but workers are \(phases)"))")
            }
            if state == .failed {
                #expect(sim.coordinator.stopReason?.isEmpty == false)
                #expect(sim.coordinator.lastFailure?.outcome.hasPrefix("stopped") == true)
            }
            outcomes[state.rawValue, default: 0] += 1
            recoveries += Int(sim.coordinator.epoch) - 2
        }
        print("control-plane simulation: 300 seeds, outcomes \(outcomes.sorted { $0.key < $1.key }), \(recoveries) recoveries (epochs raised)")
        // The runs exercised both ends: recoveries that resumed and stops with a report.
        #expect((outcomes["stopped"] ?? 0) + (outcomes["running"] ?? 0) > 0)
        #expect((outcomes["failed"] ?? 0) > 0)
    }

    @Test("a worker killed while running is restarted and every worker restores the committed step")
    func workerKill() {
        var sim = ControlSimulation(seed: 7)
        sim.faultsUntil = 0
        sim.dropRate = 0
        sim.dupRate = 0
        sim.run(until: 3)
        #expect(sim.coordinator.state == .running)
        let committed = sim.coordinator.committedStep
        #expect(committed != nil)
        let epoch = sim.coordinator.epoch
        sim.workers["n1/w0"]!.phase = .gone
        sim.send(from: "n1", to: "coordinator", .childExited(worker: "w0", status: "signal 9"), epoch: sim.smps["n1"]!.epoch)
        sim.run(until: 6)
        #expect(sim.violations.isEmpty, "\(sim.violations)")
        #expect(sim.coordinator.state == .running)
        #expect(sim.coordinator.epoch == epoch + 1)
        let report = sim.coordinator.lastFailure
        #expect(report?.what == "n1/w0")
        #expect(report?.detectedBy.contains("reported by SMP n1") == true)
        #expect(report?.outcome == "resumed")
        #expect(report?.phases.map(\.phase) == [.detect, .plan, .rebuild, .restart, .resume])
        #expect(sim.restoredInEpoch[epoch + 1] != nil)
    }

    @Test("an SMP silenced past the timeout stops the job with a report; continued, it is fenced and changes nothing")
    func smpStopped() {
        var sim = ControlSimulation(seed: 11)
        sim.faultsUntil = 0
        sim.dropRate = 0
        sim.dupRate = 0
        sim.run(until: 3)
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
        #expect(sim.fenced.contains("n2"))
        #expect(sim.fingerprint() == before)
        #expect(sim.violations.isEmpty, "\(sim.violations)")
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

    @Test("a restarted coordinator commits a round every SMP's hello says it protected, and restores that step")
    func restartCommitsProtectedRound() throws {
        let hello = { (node: String, committed: Int?, staged: Int?, protected: Int?) in
            ControlMessage.smpHello(.init(node: node, pid: 7, dataEndpoint: "tcp://\(node)", workers: ["w0"], rankOffset: node == "n0" ? 0 : 1,
                                          committedStep: committed, stagedStep: staged, protectedStep: protected))
        }
        // The field survives the wire.
        let (decoded, _) = try ControlMessage.decode(hello("n0", 4, 5, 5).envelope(sender: "n0", epoch: 2).encoded())
        #expect(decoded == hello("n0", 4, 5, 5))
        func start(_ p1: Int?) -> (CoordinatorInstance, [CoordinatorInstance.Directive]) {
            var c = CoordinatorInstance(settings: CoordinatorSettings(jobID: "r", nodes: 2, workersPerNode: 1))
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
    }

    @Test("a fresh coordinator rebuilds its view from the SMPs and resumes without losing the committed step")
    func coordinatorRestart() {
        var sim = ControlSimulation(seed: 21)
        sim.faultsUntil = 0
        sim.dropRate = 0
        sim.dupRate = 0
        sim.run(until: 3)
        let committed = sim.coordinator.committedStep
        #expect(committed != nil)
        // The coordinator process dies and a new one starts with no state.
        sim.coordinator = CoordinatorInstance(settings: sim.coordinator.settings)
        sim.queue.removeAll { $0.to == "coordinator" }
        sim.run(until: 6)
        #expect(sim.violations.isEmpty, "\(sim.violations)")
        #expect(sim.coordinator.state == .running)
        #expect((sim.coordinator.committedStep ?? -1) >= committed!)
        #expect(sim.coordinator.lastFailure?.kind == "coordinator")
    }
}
