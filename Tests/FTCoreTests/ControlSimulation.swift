import Testing
@testable import FTCore

/// A deterministic simulation of the control plane: one `CoordinatorInstance`
/// (crashed and restarted, or paused, at random moments), N simulated SMPs in
/// erasure-coding groups with their workers, a launcher that kills what the
/// coordinator declared dead and replaces lost nodes, a network that drops,
/// delays, duplicates and partitions, a manual clock, and faults at seeded
/// random times: workers killed, stopped (alive but silent) or stuck (alive,
/// heartbeats flowing, no progress), every worker killed at once, nodes killed
/// or stopped (zombies), the coordinator killed in any phase or paused (its
/// clock jumps: on waking it ticks before it reads what queued up).
/// Invariants are checked after every event; `replay` names a failing seed.
struct ControlSimulation {
    struct Envelope {
        var at: Double
        var seq: Int
        var from: String
        var to: String
        var message: ControlMessage
        var epoch: UInt64
        /// The sending SMP's process (its connection, to which the coordinator answers a fence); 0 otherwise.
        var pid = 0
    }

    struct SMP {
        var id: String
        var index: Int
        var workers: [String]
        var rankOffset: Int
        var pid: Int
        var running = true      // process exists
        var stopped = false     // SIGSTOP
        var epoch: UInt64 = 0
        var committed: Int?
        var staged: Int?
        /// A replacement that holds nothing until it is rebuilt.
        var empty = false
        var rebuildDoneAt: Double?
        var rebuildStep: Int?
        var nextHeartbeat = 0.0
        var nextHello = 0.0
        var welcomed = false
        /// The chunk size of the EC layout this process got (0: none yet); its
        /// `protected` says it, and a new one protects the staged round again.
        var layoutChunk = 0
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
        /// SIGSTOP: alive, silent, not training.
        var stopped = false
        /// Hung in a step: heartbeats flow, no progress.
        var stuckSince: Double?
        var lastHeardCoordinator = 0.0
    }

    let seed: UInt64
    var rng: SplitMix64
    var now = 0.0
    var coordinator: CoordinatorInstance
    var coordinatorDownUntil: Double?
    var coordinatorPausedUntil: Double?
    var smps: [String: SMP] = [:]
    var workers: [String: Worker] = [:]
    /// Old incarnations of nodes (zombies, stopped), by pid.
    var zombies: [Int: SMP] = [:]
    var queue: [Envelope] = []
    var queueSorted = true
    /// The member ids in order (they never change).
    let smpIDs: [String]
    let workerKeys: [String]
    var seq = 0
    var nextPid = 1000
    var partitioned: [String: Double] = [:]  // member -> until
    var dropRate = 0.02
    var dupRate = 0.02
    var maxDelay = 0.004
    var faultsUntil = 20.0
    var nextFault = 1.0
    var nextStep = 0.0
    var nextLauncherLook = 0.0
    /// Which fault kinds to draw from (all by default).
    var faultKinds = Array(0...11)
    let steps = 600
    let stepSeconds = 0.05

    // Observations for the invariants.
    var protectedSeen: [UInt64: [String: Set<Int>]] = [:]
    var restoredInEpoch: [UInt64: Int?] = [:]
    var fenced: Set<String> = []
    var fencedPids: [String: Int] = [:]
    /// When each member last sent heartbeats that the network carried (for false accusations).
    var lastCarried: [String: [Double]] = [:]
    var lastFailureSeen: CoordinatorInstance.FailureReport?
    var log: [String] = []
    var violations: [String] = []
    var faultCounts: [String: Int] = [:]

    init(seed: UInt64, nodes: Int = 4, workersPerNode: Int = 2, erasure: (k: Int, m: Int)? = (2, 2)) {
        self.seed = seed
        rng = SplitMix64(seed: seed)
        coordinator = CoordinatorInstance(settings: Self.settings(nodes: nodes, workersPerNode: workersPerNode, erasure: erasure))
        smpIDs = (0..<nodes).map { "n\($0)" }
        workerKeys = smpIDs.flatMap { n in (0..<workersPerNode).map { "\(n)/w\($0)" } }.sorted()
        for n in 0..<nodes {
            let id = "n\(n)"
            let locals = (0..<workersPerNode).map { "w\($0)" }
            nextPid += 1
            smps[id] = SMP(id: id, index: n, workers: locals, rankOffset: n * workersPerNode, pid: nextPid)
            for (i, w) in locals.enumerated() {
                nextPid += 1
                workers["\(id)/\(w)"] = Worker(key: "\(id)/\(w)", node: id, local: w, rank: n * workersPerNode + i, pid: nextPid)
            }
        }
    }

    static func settings(nodes: Int, workersPerNode: Int, erasure: (k: Int, m: Int)?) -> CoordinatorSettings {
        var settings = CoordinatorSettings(jobID: "sim", nodes: nodes, workersPerNode: workersPerNode)
        settings.phaseTimeout = 2
        settings.roundTimeout = 1
        settings.startGrace = 1
        settings.erasure = erasure
        settings.watchdog.floor = 1
        settings.watchdog.initialBound = 3
        return settings
    }

    var replay: String { "swift test --filter 'ControlSimulationTests' with ControlSimulation(seed: \(seed))" }

    mutating func roll() -> Double { Double(rng.next() % 1_000_000) / 1_000_000 }
    mutating func pick<T>(_ xs: [T]) -> T? { xs.isEmpty ? nil : xs[Int(rng.next() % UInt64(xs.count))] }

    // MARK: network

    mutating func send(from: String, to: String, _ m: ControlMessage, epoch: UInt64, pid: Int? = nil) {
        if let until = partitioned[from], until > now { return }
        if let until = partitioned[to], until > now { return }
        if roll() < dropRate && now < faultsUntil { return }
        // By incarnation: a zombie's heartbeat is not its replacement's.
        let incarnation = "\(from)#\(pid ?? smps[from]?.pid ?? workers[from]?.pid ?? 0)"
        switch (to, m) {
        case ("coordinator", .smpHeartbeat), ("coordinator", .workerHeartbeat):
            lastCarried[incarnation, default: []].append(now)
            if lastCarried[incarnation]!.count > 8 { lastCarried[incarnation]!.removeFirst() }
        default: break
        }
        let copies = roll() < dupRate && now < faultsUntil ? 2 : 1
        for _ in 0..<copies {
            seq += 1
            queueSorted = false
            queue.append(Envelope(at: now + roll() * maxDelay, seq: seq, from: from, to: to, message: m, epoch: epoch,
                                  pid: pid ?? smps[from]?.pid ?? 0))
        }
    }

    func inventory(_ s: SMP) -> ControlMessage.SMPInventory {
        .init(node: s.id, pid: s.pid, dataEndpoint: "tcp://\(s.id)-\(s.pid)", workers: s.workers, rankOffset: s.rankOffset,
              committedStep: s.empty ? nil : s.committed, stagedStep: s.empty ? nil : s.staged,
              // A simulated SMP reports protected(s) as it stages s.
              protectedStep: s.empty ? nil : s.staged, layoutChunkBytes: s.committed == nil && s.staged == nil ? 0 : 4096)
    }

    mutating func sendHello(_ node: String) {
        let s = smps[node]!
        send(from: node, to: "coordinator", .smpHello(inventory(s)), epoch: s.epoch)
    }

    mutating func sendWorkerHello(_ key: String) {
        let w = workers[key]!
        send(from: key, to: "coordinator", .workerHello(.init(node: w.node, worker: w.local, rank: w.rank,
                                                               worldSize: workers.count, pid: w.pid, collectiveEndpoint: "ring://\(w.rank)")),
             epoch: w.epoch)
    }

    // MARK: coordinator side

    var coordinatorUp: Bool { coordinatorDownUntil == nil && coordinatorPausedUntil == nil }

    mutating func apply(_ directives: [CoordinatorInstance.Directive]) {
        for d in directives {
            switch d {
            case .log(let line):
                log.append(stamp(now) + " " + line)
                if line.contains("nothing left to wait for") { violations.append("a recovery phase waited on an empty set: \(line)") }
            case .refused(let sender, let error):
                violations.append("the coordinator refused a legitimate message from \(sender): \(error)")
            case .send(let to, let m):
                checkOutgoing(to: to, m)
                send(from: "coordinator", to: to, m, epoch: coordinator.epoch)
            }
        }
        checkFailureReport()
    }

    /// Every SMP process that holds a committed step (live or stopped, not a replacement).
    var committedHeld: [Int] {
        smps.values.filter { $0.running && !$0.empty }.compactMap(\.committed)
    }

    mutating func checkOutgoing(to: String, _ m: ControlMessage) {
        switch m {
        case .commit(let s):
            // Never a commit unless every node protected s in the current epoch
            // (a commit re-sent while rebuilding the view after a coordinator restart excepted).
            if coordinator.state == .running {
                for node in smps.keys where !(protectedSeen[coordinator.epoch]?[node]?.contains(s) ?? false) {
                    violations.append("commit(\(s)) in epoch \(coordinator.epoch) but \(node) never protected it in that epoch")
                }
            } else if coordinator.state == .recovering, coordinator.lastFailure?.kind != "coordinator" {
                // A commit at a failure: every node the coordinator still counts alive protected s.
                for node in smps.keys where coordinator.nodes[node]?.state == .alive
                    && !protectedSeen.values.contains(where: { $0[node]?.contains(s) ?? false }) {
                    violations.append("commit(\(s)) at a failure (epoch \(coordinator.epoch)) but the surviving \(node) never protected it")
                }
            }
        case .restore(let s, _) where workers[to] != nil:
            // One restore step per epoch, and the worker's SMP holds it.
            if let previous = restoredInEpoch[coordinator.epoch], previous != s {
                violations.append("epoch \(coordinator.epoch): restore \(String(describing: s)) after restore \(String(describing: previous))")
            }
            restoredInEpoch[coordinator.epoch] = s
            // Never a fresh start while any SMP holds a committed step.
            if s == nil, let held = committedHeld.max() {
                violations.append("\(to) told to start fresh (restore nothing) while an SMP holds committed step \(held)")
            }
        case .fenced:
            fenced.insert(to)
            if let w = workers[to] { fencedPids[to] = w.pid }
        default: break
        }
    }

    /// A member declared dead by timeout while its heartbeats were reaching the coordinator is a false accusation.
    mutating func checkFailureReport() {
        guard let f = coordinator.lastFailure, f.what != lastFailureSeen?.what || f.detectedAt != lastFailureSeen?.detectedAt else { return }
        lastFailureSeen = f
        guard f.outcome == "in progress", f.detectedBy.contains("heartbeat timeout") else { return }
        // A heartbeat that left long enough ago to be in (the network delays at most a few ms),
        // and recently enough that the member was not silent for the timeout.
        let pid = coordinator.nodes[f.what]?.pid ?? coordinator.workers[f.what]?.info.pid ?? 0
        if let sent = lastCarried["\(f.what)#\(pid)"]?.last(where: { $0 <= now - 0.03 }), now - sent < 0.8 * coordinator.settings.heartbeatTimeout {
            violations.append("\(f.what) declared dead (\(f.detectedBy)) though a heartbeat of it left \(Int((now - sent) * 1000)) ms ago")
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
        let zombieSMP = e.pid != 0 && zombies[e.pid] != nil
        if case .protected(let s, _) = e.message, !zombieSMP {
            protectedSeen[e.epoch, default: [:]][e.from, default: []].insert(s)
        }
        let zombie = zombieSMP || (workers[e.from] != nil && fenced.contains(e.from) && fencedPids[e.from] == workers[e.from]?.pid)
        let before = zombie ? fingerprint() : ""
        var directives = coordinator.receive(e.message, from: e.from, epoch: e.epoch, now: now)
        if zombie, !isHello(e.message), fingerprint() != before {
            violations.append("fenced \(e.from) (pid \(e.pid)) changed the coordinator's state with \(e.message)")
        }
        if zombieSMP {
            // Answers go to the zombie's own connection (as the server routes them): a fence ends it.
            directives.removeAll { d in
                guard case .send(e.from, let m) = d else { return false }
                if case .fenced = m, zombies[e.pid]!.running {
                    zombies[e.pid]!.running = false
                    log.append(stamp(now) + " zombie \(e.from) (pid \(e.pid)) fenced: it exits")
                }
                return true
            }
        }
        apply(directives)
    }

    func isHello(_ m: ControlMessage) -> Bool {
        switch m {
        case .workerHello, .smpHello: true
        default: false
        }
    }

    // MARK: members

    mutating func deliverToSMP(_ e: Envelope) {
        guard var s = smps[e.to], s.running, !s.stopped else { return }
        s.epoch = max(s.epoch, e.epoch)
        switch e.message {
        case .welcome, .ack: s.welcomed = true
        case .ecLayout(let layout) where layout.chunkBytes != s.layoutChunk:
            s.layoutChunk = layout.chunkBytes
            if let step = s.staged {
                smps[e.to] = s
                send(from: s.id, to: "coordinator", .protected(step: step, layoutChunkBytes: s.layoutChunk), epoch: s.epoch)
                return
            }
        case .commit(let step): if s.staged == step || s.committed == step { s.committed = step; s.staged = nil }
        case .abort(let step): if s.staged == step { s.staged = nil }
        case .restore(let step, _):
            if let step, s.staged == step { s.committed = step }
            s.staged = nil
        case .rebuild(let step, _):
            if step == nil {
                s.empty = false
                smps[e.to] = s
                send(from: s.id, to: "coordinator", .rebuilt(step: nil, error: ""), epoch: s.epoch)
                return
            }
            if s.rebuildStep != step { s.rebuildStep = step; s.rebuildDoneAt = now + 0.05 + roll() * 0.3 }
        case .restartWorkers(let list):
            for r in list {
                let key = "\(s.id)/\(r.worker)"
                guard var w = workers[key] else { continue }
                if w.phase == .gone {
                    if !s.pendingSpawns.contains(where: { $0.0 == r.worker }) { s.pendingSpawns.append((r.worker, now + 0.02)) }
                } else if r.pid != 0 && w.pid == r.pid {
                    // Declared dead but alive (stopped, stuck, cut off): made dead, then respawned.
                    w.phase = .gone
                    w.stopped = false
                    w.stuckSince = nil
                    workers[key] = w
                    s.pendingSpawns.append((r.worker, now + 0.02))
                }
            }
        case .helloRequired:
            s.welcomed = false
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
        guard var w = workers[e.to], w.phase != .gone, !w.stopped else { return }
        if w.phase == .done {
            // A worker that finished keeps its state and waits for the stop; a coordinator
            // that lost track of it (restarted) gets its hello, and it restores and finishes again.
            switch e.message {
            case .helloRequired: sendWorkerHello(e.to)
            case .restore, .welcome: w.phase = .waiting
            default: return
            }
            if w.phase == .done { return }
        }
        guard let s = smps[w.node], s.running, !s.stopped else { return }  // a stopped node's workers stop too
        w.epoch = max(w.epoch, e.epoch)
        w.lastHeardCoordinator = now
        switch e.message {
        case .welcome: if w.phase == .hello { w.phase = .waiting }
        case .pause: if w.phase == .running && e.epoch > w.resumedEpoch && w.stuckSince == nil { w.phase = .waiting }
        case .restore(let step, _):
            guard w.stuckSince == nil else { break }  // deaf: stuck in its step
            if w.phase == .running { w.phase = .waiting }
            if w.phase == .hello { w.phase = .waiting }
            // The SMP holds the step committed, or staged with its commit still in flight
            // (the worker's restore request carries the step, and the SMP commits it).
            if let step {
                if s.empty || (s.committed != step && s.staged != step) {
                    violations.append("\(w.key) told to restore step \(step), its SMP holds \(s.empty ? "nothing (not rebuilt)" : String(describing: s.committed))")
                }
                if s.staged == step { smps[w.node]!.committed = step; smps[w.node]!.staged = nil }
            }
            w.readyStep = .some(step)
            w.readyAt = now + 0.01 + roll() * 0.02
        case .resume(let from, _):
            guard w.phase != .running, w.stuckSince == nil else { break }
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

    mutating func liveWorkers() -> [String] {
        workers.values.filter { $0.phase != .gone && $0.phase != .done && !$0.stopped && $0.stuckSince == nil
            && smps[$0.node]!.running && !smps[$0.node]!.stopped }.map(\.key).sorted()
    }

    mutating func killWorker(_ key: String) {
        workers[key]!.phase = .gone
        let node = workers[key]!.node
        send(from: node, to: "coordinator", .childExited(worker: workers[key]!.local, pid: workers[key]!.pid, status: "signal 9"),
             epoch: smps[node]!.epoch)
    }

    mutating func injectFault() {
        guard let choice = pick(faultKinds) else { return }
        switch choice {
        case 0, 1:
            // SIGKILL a worker: its SMP sees the exit at once.
            guard let key = pick(liveWorkers()) else { return }
            fault("kill worker \(key)")
            killWorker(key)
        case 2:
            // SIGSTOP a worker: alive, silent; continued later unless made dead first.
            guard let key = pick(liveWorkers()) else { return }
            workers[key]!.stopped = true
            fault("SIGSTOP worker \(key)")
            continueWorkerAt[key] = now + 0.2 + roll() * 2
        case 3:
            // A worker hangs in its step, heartbeats flowing.
            guard let key = pick(liveWorkers().filter { workers[$0]!.phase == .running }) else { return }
            workers[key]!.stuckSince = now
            fault("stuck worker \(key)")
        case 4:
            // SIGKILL every worker at once.
            fault("kill all workers")
            for key in liveWorkers() { killWorker(key) }
        case 5:
            // SIGKILL a node: its SMP and workers.
            guard let id = pick(smps.values.filter { $0.running && !$0.stopped }.map(\.id).sorted()) else { return }
            fault("kill node \(id)")
            smps[id]!.running = false
            for w in smps[id]!.workers { workers["\(id)/\(w)"]!.phase = .gone }
        case 6:
            // SIGSTOP a node past the timeout; continued later (a zombie if the launcher left it).
            guard let id = pick(smps.values.filter { $0.running && !$0.stopped }.map(\.id).sorted()) else { return }
            smps[id]!.stopped = true
            fault("SIGSTOP node \(id)")
            continueAt[smps[id]!.pid] = now + 0.6 + roll() * 2
        case 7:
            // Partition a worker from the coordinator for a while.
            guard let key = pick(workers.keys.sorted()) else { return }
            partitioned[key] = now + roll() * 0.8
            fault("partition \(key) until \(stamp(partitioned[key]!))")
        case 8:
            // Partition an SMP briefly (below the timeout, mostly).
            guard let id = pick(smps.keys.sorted()) else { return }
            partitioned[id] = now + roll() * 0.6
            fault("partition \(id) until \(stamp(partitioned[id]!))")
        case 9, 10:
            // The coordinator dies (in whatever phase) and is restarted a little later, empty
            // (not once the job ended: the launcher ends with it).
            guard coordinatorUp, coordinator.state != .failed, coordinator.state != .stopped else { return }
            fault("kill coordinator (\(coordinator.state.rawValue))")
            coordinatorDownUntil = now + 0.1 + roll() * 0.4
        default:
            // The coordinator is paused (its clock jumps): on waking it ticks before it reads.
            guard coordinatorUp else { return }
            let d = 0.3 + roll() * 2.7
            fault("pause coordinator for \(Int(d * 1000)) ms (\(coordinator.state.rawValue))")
            coordinatorPausedUntil = now + d
        }
    }

    mutating func fault(_ what: String) {
        log.append(stamp(now) + " FAULT " + what)
        faultCounts[String(what.split(separator: " ").prefix(2).joined(separator: " ")), default: 0] += 1
    }

    var continueAt: [Int: Double] = [:]
    var continueWorkerAt: [String: Double] = [:]

    // MARK: launcher

    /// The launcher's look at the coordinator's status: a node declared dead
    /// is killed (unless, half the time, it cannot be reached: a zombie) and
    /// replaced by an empty SMP under its id; a dead coordinator is restarted.
    mutating func launcherLook() {
        // A job that ended is left alone (the launcher ends with it).
        guard coordinatorUp, coordinator.state != .failed, coordinator.state != .stopped else { return }
        for n in coordinator.nodes.values.sorted(by: { $0.id < $1.id }) where n.state == .dead || n.state == .fenced {
            guard var s = smps[n.id], s.pid == n.pid || n.pid == 0 || !s.running else { continue }
            if s.running && s.stopped && roll() < 0.5 {
                zombies[s.pid] = s  // unreachable: left alive, to be fenced when it speaks
                log.append(stamp(now) + " launcher: \(n.id) (pid \(s.pid)) left alone (a zombie)")
            } else if s.running {
                log.append(stamp(now) + " launcher: killed \(n.id) (pid \(s.pid))")
            }
            for w in s.workers where workers["\(n.id)/\(w)"]!.phase != .gone { workers["\(n.id)/\(w)"]!.phase = .gone }
            nextPid += 1
            s = SMP(id: n.id, index: s.index, workers: s.workers, rankOffset: s.rankOffset, pid: nextPid, empty: true,
                    nextHeartbeat: now + 0.05 + roll() * 0.1)
            s.pendingSpawns = s.workers.map { ($0, now + 0.05 + roll() * 0.1) }
            smps[n.id] = s
            log.append(stamp(now) + " launcher: replacement of \(n.id) is pid \(s.pid)")
        }
    }

    // MARK: run

    mutating func run(until end: Double) {
        let dt = 0.02
        while now < end {
            now += dt
            if let until = coordinatorDownUntil, now >= until {
                coordinatorDownUntil = nil
                coordinator = CoordinatorInstance(settings: coordinator.settings)
                lastFailureSeen = nil
                log.append(stamp(now) + " coordinator restarted")
            }
            if let until = coordinatorPausedUntil, now >= until {
                coordinatorPausedUntil = nil
                // Woken from its poll's timeout: it ticks before it reads what queued up.
                apply(coordinator.tick(now: now))
                log.append(stamp(now) + " coordinator continued")
            }
            // Deliver due messages in order.
            if !queueSorted {
                queue.sort { ($0.at, $0.seq) < ($1.at, $1.seq) }
                queueSorted = true
            }
            var held: [Envelope] = []
            var next = 0
            while next < queue.count, queue[next].at <= now {
                let first = queue[next]
                next += 1
                if first.to == "coordinator" {
                    if coordinatorDownUntil != nil { continue }  // lost with the process
                    if coordinatorPausedUntil != nil { held.append(first); continue }  // waits in the socket
                    deliverToCoordinator(first)
                } else if smps[first.to] != nil {
                    deliverToSMP(first)
                } else {
                    deliverToWorker(first)
                }
                checkInvariants()
            }
            // Messages sent meanwhile were appended (and unsorted the queue): drop the delivered ones.
            queue.removeFirst(next)
            if !held.isEmpty {
                queue += held
                queueSorted = false
            }
            // Faults.
            if now >= nextFault && now < faultsUntil {
                injectFault()
                nextFault = now + 0.5 + roll() * 2.5
            }
            for (pid, at) in continueAt where at <= now {
                continueAt[pid] = nil
                if let id = smps.values.first(where: { $0.pid == pid })?.id { smps[id]!.stopped = false; log.append(stamp(now) + " SIGCONT \(id)") }
                if let z = zombies[pid] {
                    // The zombie speaks as it was: fenced by the coordinator, it changes nothing.
                    log.append(stamp(now) + " SIGCONT zombie \(z.id) (pid \(pid))")
                    send(from: z.id, to: "coordinator", .smpHeartbeat(dataBytes: 1, parityBytes: 0), epoch: z.epoch, pid: pid)
                    if let s = z.staged { send(from: z.id, to: "coordinator", .protected(step: s, layoutChunkBytes: z.layoutChunk), epoch: z.epoch, pid: pid) }
                    send(from: z.id, to: "coordinator", .childExited(worker: "w0", pid: 1, status: "signal 9"), epoch: z.epoch, pid: pid)
                }
            }
            for (key, at) in continueWorkerAt where at <= now {
                continueWorkerAt[key] = nil
                if workers[key]?.stopped == true { workers[key]!.stopped = false; log.append(stamp(now) + " SIGCONT \(key)") }
            }
            if now >= nextLauncherLook {
                launcherLook()
                nextLauncherLook = now + 0.1
            }
            // SMP behaviour: hello until welcomed, heartbeats, spawns, rebuilds.
            for id in smpIDs {
                guard var s = smps[id], s.running, !s.stopped else { continue }
                if !s.welcomed && now >= s.nextHello {
                    smps[id] = s
                    sendHello(id)
                    s = smps[id]!
                    s.nextHello = now + 0.5
                }
                if s.welcomed && now >= s.nextHeartbeat {
                    send(from: id, to: "coordinator", .smpHeartbeat(dataBytes: s.empty ? 0 : 1000, parityBytes: 0), epoch: s.epoch)
                    s.nextHeartbeat = now + 0.1
                }
                if let at = s.rebuildDoneAt, at <= now, let step = s.rebuildStep {
                    s.rebuildDoneAt = nil
                    // Any k others of the group hold the step: rebuilt; else it fails with the reason.
                    let group = coordinator.settings.erasure.map { ec in (0..<(ec.k + ec.m)).map { "n\((s.index / (ec.k + ec.m)) * (ec.k + ec.m) + $0)" } } ?? []
                    let sources = group.filter { $0 != id && smps[$0]!.running && !smps[$0]!.empty
                        && (smps[$0]!.committed == step || smps[$0]!.staged == step) }
                    let k = coordinator.settings.erasure?.k ?? 0
                    if sources.count >= k {
                        s.empty = false
                        s.committed = step
                        s.staged = nil
                        send(from: id, to: "coordinator", .rebuilt(step: step, error: ""), epoch: s.epoch)
                    } else {
                        send(from: id, to: "coordinator", .rebuilt(step: step, error: "only \(sources.count) of \(k) sources"), epoch: s.epoch)
                    }
                }
                for (local, at) in s.pendingSpawns where at <= now {
                    let key = "\(id)/\(local)"
                    nextPid += 1
                    workers[key]!.pid = nextPid
                    workers[key]!.phase = .hello
                    workers[key]!.epoch = 0
                    workers[key]!.readyAt = nil
                    workers[key]!.stopped = false
                    workers[key]!.stuckSince = nil
                    workers[key]!.lastHeardCoordinator = now
                    smps[id] = s
                    sendWorkerHello(key)
                    s = smps[id]!
                }
                s.pendingSpawns.removeAll { $0.1 <= now }
                smps[id] = s
            }
            // Worker behaviour: hello, heartbeats (with activity), ready.
            let blocked = workers.values.contains { $0.phase == .running && ($0.stuckSince != nil || $0.stopped) }
            for key in workerKeys {
                guard var w = workers[key], w.phase != .gone, !w.stopped,
                      smps[w.node]!.running, !smps[w.node]!.stopped else { continue }
                if w.phase == .hello && w.epoch == 0 && now >= w.nextHeartbeat {
                    workers[key] = w
                    sendWorkerHello(key)
                    w = workers[key]!
                    w.nextHeartbeat = now + 0.3
                } else if now >= w.nextHeartbeat {
                    let activity: WorkerActivity
                    if let since = w.stuckSince {
                        activity = WorkerActivity(.computing, milliseconds: Int((now - since) * 1000))
                    } else if w.phase == .running && blocked {
                        activity = WorkerActivity(.collective, waitingOn: (w.rank + workers.count - 1) % workers.count, milliseconds: 100)
                    } else {
                        activity = WorkerActivity(w.phase == .running ? .computing : .idle, milliseconds: 5)
                    }
                    send(from: key, to: "coordinator", .workerHeartbeat(step: w.step, running: w.phase == .running, skipped: 0, activity: activity),
                         epoch: w.epoch)
                    w.nextHeartbeat = now + 0.1
                    if w.phase == .done && Int((now * 10).rounded()) % 5 == 0 {
                        // Said again until the stop comes (a coordinator that restarted may have missed it).
                        send(from: key, to: "coordinator", .workerDone(finalStep: w.step), epoch: w.epoch)
                    }
                }
                if let at = w.readyAt, at <= now, let step = w.readyStep {
                    w.readyAt = nil
                    send(from: key, to: "coordinator", .ready(restoredStep: step), epoch: w.epoch)
                    w.readyAt = now + 0.5  // re-announce until resumed (a lost ready is retried)
                }
                workers[key] = w
            }
            // Training: all workers step in lockstep (the collective), unless one is
            // stopped or stuck, or any holds for a silent coordinator.
            let running = workers.values.filter { $0.phase == .running }
            let holding = running.contains { now - $0.lastHeardCoordinator > 1.0 }
            if now >= nextStep, running.count == workers.count, !blocked, !holding, Set(running.map(\.epoch)).count == 1 {
                nextStep = now + stepSeconds
                let step = running[0].step + 1
                for k in workers.keys { workers[k]!.step = step }
                if step >= steps {
                    for k in workers.keys.sorted() {
                        workers[k]!.phase = .done
                        send(from: k, to: "coordinator", .workerDone(finalStep: step), epoch: workers[k]!.epoch)
                    }
                } else if smps.values.allSatisfy({ $0.staged == nil }) {
                    // The collective decision: snapshot only when no round is pending anywhere.
                    for id in smps.keys.sorted() where smps[id]!.running && !smps[id]!.stopped && !smps[id]!.empty {
                        smps[id]!.staged = step
                        send(from: id, to: "coordinator", .protected(step: step, layoutChunkBytes: smps[id]!.layoutChunk), epoch: smps[id]!.epoch)
                    }
                }
            }
            if coordinatorUp { apply(coordinator.tick(now: now)) }
            checkInvariants()
            if !violations.isEmpty { return }
        }
    }

    mutating func checkInvariants() {
        guard coordinatorDownUntil == nil && coordinatorPausedUntil == nil else { return }
        // A zombie is never the node's process in the coordinator's view.
        if !zombies.isEmpty {
            for (pid, z) in zombies where z.running && coordinator.nodes[z.id]?.state == .alive && coordinator.nodes[z.id]?.pid == pid {
                violations.append("zombie \(z.id) (pid \(pid)) is alive in the coordinator's view")
            }
        }
        // A coordinator past its start never reports "nothing committed" while SMPs hold a committed step it knows of.
        if coordinator.committedStep == nil, coordinator.state == .running, coordinator.takesOverRunningJob, let held = committedHeld.min(), held > 0 {
            violations.append("the coordinator runs with no committed step while every SMP holds step \(held) or later")
        }
    }
}

/// Milliseconds, for the simulation log.
func stamp(_ t: Double) -> String { "\(Int((t * 1000).rounded()))ms" }
