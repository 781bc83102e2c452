import FTCore
import FTErasure

/// A seeded simulation of the data plane under the real coordinator: one EC
/// group of `k + m` SMPs, each running the real cores (`ECRoundInstance`,
/// `RebuildInstance`) over byte arrays (images of a few hundred bytes, frames
/// of a few dozen, the real ISA-L codec and CRC32C), one worker per node, and
/// the real `CoordinatorInstance`, which they speak the control protocol to
/// (hellos, heartbeats, `protected`, `rebuilt`, `ready`; its `commit`,
/// `abort`, `pause`, `restore`, `restartWorkers`, `rebuild`, `ecLayout`,
/// `resume` and `fenced` drive them; every envelope carries its sender's
/// epoch, so the epoch fence of `ecChunk` frames sees the coordinator's own
/// epochs). The workers train in lockstep and snapshot every step at which no
/// round is pending anywhere. The data plane drops, delays, duplicates,
/// reorders and corrupts frames and cuts links for a while; control links
/// are ordered and lossless (TCP). Nodes crash and pause; the coordinator
/// finds out by its own heartbeat timeouts; a launcher replaces each node it
/// declared dead with an empty process under the same id (a paused one lives
/// on as a zombie of the fenced incarnation), which says hello and rebuilds on
/// the coordinator's order. Bytes of committed images are flipped at rest
/// (and repaired from parity before anyone restores them).
///
/// Invariants, checked after every event (`violations`):
/// - a commit (seen as the coordinator sends it, at a failure too): every
///   live node holds the step's image and the correct parity of every row it
///   holds parity of, none of it folded from a fenced incarnation; the truth
///   of a commit is what the nodes staged (a lost node's too);
/// - a rebuilt node's image and parity equal the original's;
/// - a restore reads the committed step, the same on every node, byte for byte;
/// - a fenced incarnation's frame is never kept by a node restored after the fence;
/// - parity is held for at most `ECRoundInstance.maxParitySteps` steps, and a
///   fetch job holds at most `window` frames in flight and `window × k` answers;
/// - the layout the coordinator sends is the group's (k, m, chunk length).
///
/// Liveness: once faults stop, rounds commit again (unless flipped bytes and
/// a lost node left more than m erasures in a row).
///
/// A round is sent again when no ack came for half a second
/// (`ECRoundInstance.stallResend`, `resendAfter` here, 10 s in the SMP): a
/// dropped or corrupt frame is never acked, and the coordinator aborts only
/// rounds some node protected, so without it a round every node lost a frame
/// of would stay pending for ever (found here). Resent frames carry the epoch
/// the round was staged in (`ECRoundInstance.Frame.epoch`), also after the
/// node learned a newer one.
struct ECSimulation {
    // MARK: messages

    enum Body {
        // data plane
        case chunk(step: Int, row: Int, dataIndex: Int, offset: Int, length: Int, crc: UInt32, bytes: [UInt8])
        case ack(step: Int, row: Int, dataIndex: Int, error: String)
        case fetch(step: Int, row: Int, index: Int, offset: Int, length: Int)
        case data(step: Int, row: Int, index: Int, offset: Int, crc: UInt32, error: String, bytes: [UInt8])
        // control plane (coordinator <-> SMPs and workers)
        case control(ControlMessage)

        var isDataPlane: Bool {
            if case .control = self { return false }
            return true
        }
    }

    /// `fromInc`/`toInc`: a node's incarnation, or a worker's pid.
    struct Message {
        var at: Double
        var seq: Int
        var from: String
        var fromInc: Int
        var to: String
        var toInc: Int
        var epoch: UInt64
        var body: Body
    }

    static let coordinator = "coord"

    // MARK: nodes

    struct AnswerKey: Hashable {
        var row: Int
        var offset: Int
        var index: Int
    }

    struct Job {
        var core: RebuildInstance
        var answers: [AnswerKey: [UInt8]] = [:]
        var prefix: [UInt8] = []
        var image: [UInt8] = []
    }

    /// The node's one worker (rank = the node's position).
    struct Worker {
        enum Phase { case hello, waiting, running, gone }
        var pid: Int
        var phase = Phase.hello
        var epoch: UInt64 = 0
        var step = 0
        /// A restore order being carried out (read from the SMP once its image passes its CRCs).
        var restoring: Int??
        /// Restored, ready sent (again at `readyAgainAt` until resumed).
        var readyStep: Int??
        var readyAgainAt = 0.0
        /// When the worker reads again an image that failed its CRCs (its SMP repairs it meanwhile).
        var readAgainAt = 0.0
        var nextHello = 0.0
        var nextHeartbeat = 0.0
    }

    struct Node {
        var name: String
        var inc: Int
        var position: Int
        var epoch: UInt64 = 0
        var round: ECRoundInstance
        var parity: [Int: [Int: [UInt8]]] = [:]
        /// Parity folded from a fenced incarnation: step -> row -> the epoch that fenced it.
        var taint: [Int: [Int: UInt64]] = [:]
        var images: [Int: [UInt8]] = [:]
        var committed: Int?
        /// The step staged and not yet committed, aborted or restored away.
        var staged: Int?
        /// The epoch it was staged in: a round protected later (the layout came
        /// late) carries it, so holders in a newer epoch refuse it.
        var stagedEpoch: UInt64 = 0
        /// The epoch of the last restore order it carried out.
        var restoredEpoch: UInt64 = 0
        /// Peers' incarnations, from the coordinator's layout (their data endpoints).
        var view: [String: Int] = [:]
        var rebuild: Job?
        var repair: Job?
        var repairFailed: Int?
        var pausedUntil: Double?
        var zombieDiesAt: Double?
        var welcomed = false
        /// Whether this incarnation got the coordinator's layout: before it, as in
        /// the SMP, it sends no chunks, refuses frames (`no EC layout`), and reports
        /// a staged round `protected` under no layout (chunk 0), which the
        /// coordinator must not count.
        var hasLayout = false
        /// When its heartbeats start to carry its image size (an SMP says 0 until
        /// every worker registered, which can be after the job started: the
        /// coordinator's layout then comes after the first rounds are staged).
        var sizesAt = 0.0
        var nextHello = 0.0
        var nextHeartbeat = 0.0
        var worker: Worker
    }

    // MARK: state

    let seed: UInt64
    let k: Int
    let m: Int
    var n: Int { k + m }
    let chunkBytes: Int
    let frameBytes: Int
    let window: Int
    let codec: ReedSolomon
    var placement: ParityPlacement { ParityPlacement(k: k, m: m) }
    var names: [String]
    var slotBytes: [String: Int] = [:]
    var manifestPad: [String: Int] = [:]

    var rng: SplitMix64
    var now = 0.0
    var seq = 0
    var inFlight: [Message] = []
    /// When the last message on each ordered (control) link is due.
    var linkDue: [String: Double] = [:]
    var nodes: [String: Node] = [:]
    /// Replaced incarnations still running (paused when replaced).
    var zombies: [Node] = []
    /// Crashed (or exited) current incarnations, and when.
    var dead: [String: Double] = [:]
    var cuts: [Set<String>: Double] = [:]
    var nextWorkerPid = 100_000

    // coordinator
    var coordinator: CoordinatorInstance
    var fencedAt: [String: UInt64] = [:]  // "name#inc" -> epoch
    /// What each node staged last for each step (by the incarnation that staged it).
    var stagedBy: [String: [Int: [UInt8]]] = [:]
    var committed: Int?
    var truth: [Int: [String: [UInt8]]] = [:]
    var nextStepAt = 0.0
    var lastCommitAt = 0.0
    var commits = 0
    var commitsAtFailure = 0
    var repairs = 0
    var resends = 0
    var replacements = 0
    /// Failures the coordinator detected (each started a recovery).
    var recoveries: Int { coordinator.failureCount }

    // faults
    var faultsUntil = 9.0
    var dropRate: Double
    var dupRate: Double
    var corruptRate: Double
    var faultCounts: [String: Int] = [:]
    /// A crash or pause while flipped bytes at rest left some row with more
    /// than m erasures: memory cannot recover that (the job would stop).
    var beyondM = false

    var violations: [String] = []
    var log: [String] = []

    static let fetchTimeout = 0.4
    static let crcBlock = 16
    static let stepSeconds = 0.05
    /// The workers snapshot at most every this many steps (and only when no round is pending).
    static let snapshotEvery = 5
    static let resendAfter = 0.5
    static let dt = 0.02

    static func settings(k: Int, m: Int) -> CoordinatorSettings {
        var s = CoordinatorSettings(jobID: "ec-sim", nodes: k + m, workersPerNode: 1)
        s.erasure = (k, m)
        s.heartbeatInterval = 0.15
        s.heartbeatTimeout = 0.6
        s.roundTimeout = 3
        // The slowest rebuilds (8-byte frames, a window of one, fetch timeouts) take seconds.
        s.phaseTimeout = 8
        // A rebuild from exactly k survivors fails on any frame corrupt in transfer (each
        // holder is the only one of its index): ordered again while faults last.
        s.phaseRetries = 20
        return s
    }

    init(seed: UInt64) {
        self.seed = seed
        rng = SplitMix64(seed: seed &* 0x9E37_79B9 &+ 17)
        let codes = [(2, 1), (2, 2), (3, 1), (3, 2), (4, 2)]
        (k, m) = codes[Int(seed % UInt64(codes.count))]
        codec = try! ReedSolomon(dataCount: k, parityCount: m)
        let count = k + m
        names = (0..<count).map { "n\($0)" }
        frameBytes = [8, 16, 24, 40][Int(rng.next() % 4)]
        window = 1 + Int(rng.next() % 3)
        dropRate = [0, 0.005, 0.02, 0.05][Int(rng.next() % 4)]
        dupRate = [0, 0.02, 0.05][Int(rng.next() % 3)]
        corruptRate = [0, 0.01, 0.03][Int(rng.next() % 3)]
        var sizes: [Int] = []
        for name in names {
            let slot = 20 + Int(rng.next() % 180), pad = Int(rng.next() % 40)
            slotBytes[name] = slot
            manifestPad[name] = pad
            sizes.append(16 + 4 * ((slot + Self.crcBlock - 1) / Self.crcBlock) + pad + slot)
        }
        chunkBytes = ParityPlacement.chunkBytes(forNodeBytes: sizes, k: k)
        coordinator = CoordinatorInstance(settings: Self.settings(k: k, m: m))
        for (p, name) in names.enumerated() {
            nodes[name] = freshNode(name, position: p, inc: 0)
            nodes[name]!.nextHello = Double(rng.next() % 100) / 1000
            nodes[name]!.sizesAt = Double(rng.next() % 800) / 1000
            nodes[name]!.worker.nextHello = Double(rng.next() % 100) / 1000
        }
    }

    mutating func freshNode(_ name: String, position: Int, inc: Int) -> Node {
        nextWorkerPid += 1
        return Node(name: name, inc: inc, position: position,
                    round: ECRoundInstance(k: k, m: m, chunkBytes: chunkBytes, frameBytes: frameBytes, members: names, position: position,
                                           stallResend: Self.resendAfter),
                    worker: Worker(pid: nextWorkerPid))
    }

    /// A node incarnation's process id (as its hello and the coordinator's view name it).
    func pid(_ node: Node) -> Int { 1000 * (node.position + 1) + node.inc }
    func endpoint(_ node: Node) -> String { "tcp://\(node.name)#\(node.inc)" }
    func imageBytes(_ name: String) -> Int { manifestBytes(name) + slotBytes[name]! }

    // MARK: images

    func crcCount(_ name: String) -> Int { (slotBytes[name]! + Self.crcBlock - 1) / Self.crcBlock }
    func manifestBytes(_ name: String) -> Int { 4 + 8 + 4 + 4 * crcCount(name) + manifestPad[name]! }

    /// Node `name`'s image of `step` staged in `epoch` (a different epoch
    /// gives different bytes: a re-run step is not assumed identical).
    func image(_ name: String, step: Int, epoch: UInt64) -> [UInt8] {
        var r = SplitMix64(seed: seed ^ UInt64(step) &* 0x1000193 ^ epoch &* 0x51_7CC1 ^ UInt64(names.firstIndex(of: name)!) &* 0xABCDEF)
        let slot = (0..<slotBytes[name]!).map { _ in UInt8(truncatingIfNeeded: r.next()) }
        var w = ByteWriter()
        w.u32(UInt32(manifestBytes(name) - 4))
        w.i64(Int64(step))
        w.u32(UInt32(manifestBytes(name) + slot.count))
        for i in 0..<crcCount(name) {
            let block = Array(slot[i * Self.crcBlock..<min(slot.count, (i + 1) * Self.crcBlock)])
            w.u32(Self.crc(block))
        }
        w.bytes([UInt8](repeating: 0xEE, count: manifestPad[name]!))
        return w.buffer + slot
    }

    static func crc(_ bytes: [UInt8]) -> UInt32 { bytes.withUnsafeBytes { CRC32C.checksum($0) } }

    static func u32(_ b: [UInt8], _ at: Int) -> Int { Int(b[at]) | Int(b[at + 1]) << 8 | Int(b[at + 2]) << 16 | Int(b[at + 3]) << 24 }

    /// The slot's 16-byte blocks that fail the CRCs the image's manifest lists.
    func badBlocks(_ img: [UInt8], name: String) -> [Range<Int>] {
        let mb = manifestBytes(name)
        let slot = Array(img[mb...])
        return (0..<crcCount(name)).compactMap { i in
            let r = i * Self.crcBlock..<min(slot.count, (i + 1) * Self.crcBlock)
            return Self.crc(Array(slot[r])) == UInt32(Self.u32(img, 16 + 4 * i)) ? nil : r
        }
    }

    /// The correct parity of every row for the images `images` (by node).
    func encode(_ images: [String: [UInt8]]) -> [[UInt8]] {
        var data = Array(repeating: Array(repeating: [UInt8](), count: k), count: n)
        for (p, name) in names.enumerated() {
            let img = images[name]!
            for c in 0..<k {
                let (row, di) = placement.place(chunk: c, of: p)
                var chunk = Array(img[min(img.count, c * chunkBytes)..<min(img.count, (c + 1) * chunkBytes)])
                chunk += [UInt8](repeating: 0, count: chunkBytes - chunk.count)
                data[row][di] = chunk
            }
        }
        return (0..<n).flatMap { try! codec.encode(data[$0]) }  // row r's parity j at r * m + j
    }

    // MARK: running

    mutating func note(_ s: String) { log.append("\(Int((now * 1000).rounded()))ms " + s) }

    mutating func violation(_ s: String) {
        note("VIOLATION " + s)
        violations.append("t=\(Int((now * 1000).rounded()))ms " + s)
    }

    mutating func chance(_ p: Double) -> Bool { p > 0 && Double(rng.next() % 1_000_000) / 1_000_000 < p }

    mutating func send(from: String, fromInc: Int, epoch e: UInt64, to: String, toInc: Int, _ body: Body) {
        var delay = 0.001 + Double(rng.next() % 30) / 1000
        guard body.isDataPlane else {
            // A control link is ordered and lossless (TCP).
            let link = from + ">" + to
            let at = max(now + delay, linkDue[link] ?? 0)
            linkDue[link] = at
            seq += 1
            inFlight.append(Message(at: at, seq: seq, from: from, fromInc: fromInc, to: to, toInc: toInc, epoch: e, body: body))
            return
        }
        if now < faultsUntil {
            if chance(dropRate) { faultCounts["drop", default: 0] += 1; return }
            if cuts.keys.contains(where: { $0 == [from, to] }) { faultCounts["cut", default: 0] += 1; return }
            if chance(0.05) { delay += Double(rng.next() % 300) / 1000 }
        }
        var b = body
        if now < faultsUntil, chance(corruptRate) {
            switch b {
            case .chunk(let s, let r, let d, let o, let l, let c, var bytes) where !bytes.isEmpty:
                bytes[Int(rng.next() % UInt64(bytes.count))] ^= 0x5A
                b = .chunk(step: s, row: r, dataIndex: d, offset: o, length: l, crc: c, bytes: bytes)
                faultCounts["corrupt frame", default: 0] += 1
            case .data(let s, let r, let i, let o, let c, let err, var bytes) where !bytes.isEmpty:
                bytes[Int(rng.next() % UInt64(bytes.count))] ^= 0x5A
                b = .data(step: s, row: r, index: i, offset: o, crc: c, error: err, bytes: bytes)
                faultCounts["corrupt frame", default: 0] += 1
            default: break
            }
        }
        seq += 1
        inFlight.append(Message(at: now + delay, seq: seq, from: from, fromInc: fromInc, to: to, toInc: toInc, epoch: e, body: b))
        if now < faultsUntil, chance(dupRate) {
            seq += 1
            inFlight.append(Message(at: now + delay + Double(rng.next() % 50) / 1000, seq: seq, from: from, fromInc: fromInc, to: to,
                                    toInc: toInc, epoch: e, body: b))
            faultCounts["duplicate", default: 0] += 1
        }
    }

    mutating func toCoordinator(_ node: Node, _ m: ControlMessage) {
        send(from: node.name, fromInc: node.inc, epoch: node.epoch, to: Self.coordinator, toInc: 0, .control(m))
    }

    mutating func workerToCoordinator(_ node: Node, _ m: ControlMessage) {
        send(from: "\(node.name)/w0", fromInc: node.worker.pid, epoch: node.worker.epoch, to: Self.coordinator, toInc: 0, .control(m))
    }

    /// Runs until `end` (simulated seconds).
    mutating func run(until end: Double) {
        while now < end && violations.isEmpty {
            now += Self.dt
            // Messages due, in time order (ties by sequence).
            let due = inFlight.filter { $0.at <= now }.sorted { ($0.at, $0.seq) < ($1.at, $1.seq) }
            inFlight.removeAll { $0.at <= now }
            for msg in due {
                deliver(msg)
            }
            for name in names { tickNode(name) }
            for i in zombies.indices { tickZombie(i) }
            zombies.removeAll { z in z.zombieDiesAt.map { now >= $0 } ?? false }
            train()
            apply(coordinator.tick(now: now))
            launcher()
            check()
            if now < faultsUntil { injectFaults() } else { cuts = [:] }
            cuts = cuts.filter { $0.value > now }
        }
    }

    // MARK: faults

    /// Every node up and known alive, the job running: a fault may come.
    var allUp: Bool {
        dead.isEmpty && coordinator.state == .running
            && names.allSatisfy { nodes[$0]!.pausedUntil == nil && nodes[$0]!.worker.phase == .running && coordinator.nodes[$0]?.state == .alive }
    }

    /// Flipped bytes not yet repaired and a node lost (or paused long enough
    /// to be replaced): a row with more than m erasures cannot be recovered.
    mutating func noteBeyondM(lost: String) {
        for row in 0..<n {
            var erasures = 0
            for (p, x) in names.enumerated() {
                if x == lost { erasures += 1; continue }
                guard placement.codewordIndex(of: p, row: row) < k, let c = nodes[x]!.committed, let img = nodes[x]!.images[c] else { continue }
                let chunk = placement.dataRows(of: p).firstIndex(of: row)!
                let range = chunk * chunkBytes..<(chunk + 1) * chunkBytes
                if badBlocks(img, name: x).contains(where: { range.overlaps(($0.lowerBound + manifestBytes(x))..<($0.upperBound + manifestBytes(x))) }) {
                    erasures += 1
                }
            }
            if erasures > m {
                beyondM = true
                note("beyond m: row \(row) has \(erasures) erasures (flipped bytes at rest and a lost node)")
            }
        }
    }

    mutating func injectFaults() {
        let allUp = allUp
        if allUp, chance(0.004) {
            let name = names[Int(rng.next() % UInt64(n))]
            note("crash \(name)#\(nodes[name]!.inc)")
            noteBeyondM(lost: name)
            dead[name] = now
            faultCounts["crash", default: 0] += 1
        } else if allUp, chance(0.003) {
            let name = names[Int(rng.next() % UInt64(n))]
            let d = 0.2 + Double(rng.next() % 2000) / 1000
            nodes[name]!.pausedUntil = now + d
            note("pause \(name)#\(nodes[name]!.inc) for \(d) s")
            noteBeyondM(lost: name)
            faultCounts["pause", default: 0] += 1
        }
        if chance(0.003) {
            let a = names[Int(rng.next() % UInt64(n))], b = names[Int(rng.next() % UInt64(n))]
            if a != b {
                cuts[[a, b]] = now + 0.3 + Double(rng.next() % 2500) / 1000
                note("cut \(a) - \(b)")
                faultCounts["partition", default: 0] += 1
            }
        }
        if self.allUp, chance(0.004) {
            // (Only while every node is up: a flip during a recovery is a second erasure.)
            let name = names[Int(rng.next() % UInt64(n))]
            if let c = nodes[name]!.committed, var img = nodes[name]!.images[c] {
                let at = manifestBytes(name) + Int(rng.next() % UInt64(slotBytes[name]!))
                img[at] ^= 0x01
                nodes[name]!.images[c] = img
                note("flip a byte of \(name)'s committed image of step \(c) at \(at)")
                faultCounts["flip at rest", default: 0] += 1
            }
        }
        if chance(0.01) {
            // A slice or restore read: the node checks its committed image.
            let name = names[Int(rng.next() % UInt64(n))]
            if dead[name] == nil, nodes[name]!.pausedUntil == nil { _ = verifyCommitted(name) }
        }
    }

    // MARK: launcher and training

    /// As the launcher does: a node the coordinator declared dead (this
    /// incarnation) is replaced by an empty SMP under its id, with a new
    /// worker; a paused one cannot be killed and lives on as a zombie.
    mutating func launcher() {
        for name in names {
            let old = nodes[name]!
            guard let known = coordinator.nodes[name], known.state == .dead || known.state == .fenced, known.pid == pid(old) else { continue }
            let key = "\(name)#\(old.inc)"
            if fencedAt[key] == nil { fencedAt[key] = coordinator.epoch }
            if dead[name] == nil {
                // Paused (or cut off): it runs on later as a zombie of a replaced incarnation.
                var z = old
                z.zombieDiesAt = (old.pausedUntil ?? now) + 1.0
                zombies.append(z)
            }
            dead[name] = nil
            var fresh = freshNode(name, position: old.position, inc: old.inc + 1)
            fresh.nextHello = now + 0.05 + Double(rng.next() % 100) / 1000
            fresh.sizesAt = now + Double(rng.next() % 800) / 1000
            fresh.worker.nextHello = now + 0.05 + Double(rng.next() % 100) / 1000
            nodes[name] = fresh
            replacements += 1
            note("launcher: \(name)#\(old.inc) declared dead in epoch \(coordinator.epoch); replaced by \(name)#\(fresh.inc)")
        }
    }

    /// The workers step in lockstep (a collective) while every one runs, and
    /// snapshot every step at which no round is pending on any node.
    mutating func train() {
        guard now >= nextStepAt, dead.isEmpty,
              names.allSatisfy({ nodes[$0]!.pausedUntil == nil && nodes[$0]!.worker.phase == .running }) else { return }
        nextStepAt = now + Self.stepSeconds
        let step = nodes[names[0]]!.worker.step + 1
        for name in names { nodes[name]!.worker.step = step }
        guard step % Self.snapshotEvery == 0,
              names.allSatisfy({ nodes[$0]!.staged == nil && nodes[$0]!.committed.map { $0 < step } ?? true }) else { return }
        note("stage \(step) (epochs \(names.map { nodes[$0]!.epoch }))")
        for name in names {
            var node = nodes[name]!
            let img = image(name, step: step, epoch: node.epoch)
            node.images[step] = img
            node.staged = step
            node.stagedEpoch = node.epoch
            stagedBy[name, default: [:]][step] = img
            if node.hasLayout {
                runRound(&node, node.round.startRound(step: step, imageBytes: img.count, epoch: node.epoch), received: [])
            } else {
                faultCounts["round staged before the layout", default: 0] += 1
                toCoordinator(node, .protected(step: step, layoutChunkBytes: 0))
            }
            nodes[name] = node
        }
    }

    // MARK: coordinator

    mutating func coordinatorReceive(_ msg: Message) {
        guard case .control(let m) = msg.body else { return }
        apply(coordinator.receive(m, from: msg.from, epoch: msg.epoch, now: now), replyTo: (msg.from, msg.fromInc))
    }

    /// The coordinator's directives: messages go out (a reply to the process
    /// that spoke, the rest to each member's current process); commits are
    /// observed to take their truth.
    mutating func apply(_ directives: [CoordinatorInstance.Directive], replyTo: (String, Int)? = nil) {
        let atFailure = directives.contains { if case .log(let l) = $0 { l.contains("committed at the failure") } else { false } }
        var committedNow: Set<Int> = []
        for d in directives {
            switch d {
            case .log(let line):
                note("coordinator: " + line)
            case .refused(let sender, let error):
                violation("the coordinator refused a message from \(sender): \(error)")
            case .send(let to, let m):
                if case .commit(let s) = m, !committedNow.contains(s) {
                    committedNow.insert(s)
                    observeCommit(s, atFailure: atFailure)
                }
                let name = String(to.split(separator: "/")[0])
                guard let node = nodes[name] else { violation("the coordinator sends to \(to)"); continue }
                let inc: Int
                if let r = replyTo, r.0 == to { inc = r.1 } else { inc = to.contains("/") ? node.worker.pid : node.inc }
                send(from: Self.coordinator, fromInc: 0, epoch: coordinator.epoch, to: to, toInc: inc, .control(m))
            }
        }
    }

    /// The coordinator sends `commit(step)`: the truth of the step is what
    /// every node staged (a lost node's too, at a failure); every live node
    /// holds it and the correct parity.
    mutating func observeCommit(_ step: Int, atFailure: Bool) {
        let lost = Set(coordinator.nodes.values.filter { $0.state != .alive }.map(\.id))
        var images: [String: [UInt8]] = [:]
        for name in names {
            guard let img = stagedBy[name]?[step] else {
                violation("commit of \(step): \(name) never staged it")
                return
            }
            images[name] = img
            if !lost.contains(name), dead[name] == nil, nodes[name]!.images[step] != img {
                violation("commit of \(step): \(name) does not hold the image it staged")
            }
        }
        truth[step] = images
        truth = truth.filter { $0.key >= step }
        let parity = encode(images)
        for name in names where !lost.contains(name) && dead[name] == nil {
            checkParity(nodes[name]!, step: step, what: atFailure ? "commit at a failure of" : "commit of", parity: parity)
            if let rows = nodes[name]!.taint[step], !rows.isEmpty {
                violation("commit of \(step): \(name)'s parity of rows \(rows.keys.sorted()) was folded from a fenced incarnation's frames")
            }
        }
        committed = step
        commits += 1
        if atFailure { commitsAtFailure += 1 }
        lastCommitAt = now
        note("commit \(step)" + (atFailure ? " at the failure of \(lost.sorted())" : ""))
    }

    /// `node` holds correct parity of `step` for every row it holds parity of.
    mutating func checkParity(_ node: Node, step: Int, what: String, parity: [[UInt8]]? = nil) {
        guard let images = truth[step] else { return }
        let parity = parity ?? encode(images)
        for (row, j) in placement.parityRows(of: node.position) {
            if node.parity[step]?[row] != parity[row * m + j] || !node.round.holdsCompleteParity(step: step, row: row) {
                violation("\(what) \(step): \(node.name)'s parity of row \(row) is not the parity of the images")
            }
        }
    }

    // MARK: nodes

    func inventory(_ node: Node) -> ControlMessage.SMPInventory {
        .init(node: node.name, pid: pid(node), dataEndpoint: endpoint(node), workers: ["w0"], rankOffset: node.position,
              committedStep: node.committed, stagedStep: node.staged, protectedStep: nil, layoutChunkBytes: 0)
    }

    func workerInfo(_ node: Node) -> ControlMessage.WorkerInfo {
        .init(node: node.name, worker: "w0", rank: node.position, worldSize: n, pid: node.worker.pid, collectiveEndpoint: "ring://\(node.position)")
    }

    mutating func deliver(_ msg: Message) {
        if msg.to == Self.coordinator {
            coordinatorReceive(msg)
            return
        }
        let toWorker = msg.to.contains("/")
        let name = toWorker ? String(msg.to.split(separator: "/")[0]) : msg.to
        if !toWorker, let zi = zombies.firstIndex(where: { $0.name == name && $0.inc == msg.toInc }) {
            var z = zombies[zi]
            if let until = z.pausedUntil, now < until {
                // Still paused: it reads its queue when it wakes.
                inFlight.append(Message(at: until + 0.001, seq: msg.seq, from: msg.from, fromInc: msg.fromInc, to: msg.to,
                                        toInc: msg.toInc, epoch: msg.epoch, body: msg.body))
                return
            }
            handle(&z, msg)
            checkBounds(z)
            zombies[zi] = z
            return
        }
        guard var node = nodes[name], dead[name] == nil, toWorker ? node.worker.pid == msg.toInc : node.inc == msg.toInc else { return }
        if let until = node.pausedUntil, now < until {
            inFlight.append(Message(at: until + 0.001, seq: msg.seq, from: msg.from, fromInc: msg.fromInc, to: msg.to,
                                    toInc: msg.toInc, epoch: msg.epoch, body: msg.body))
            return
        }
        if toWorker {
            guard case .control(let m) = msg.body else { return }
            workerHandle(&node, m, epoch: msg.epoch)
        } else {
            handle(&node, msg)
        }
        checkBounds(node)
        if nodes[name]?.inc == node.inc { nodes[name] = node }
        if toWorker, dead[name] == nil, nodes[name]!.worker.restoring != nil { workerReads(name) }
    }

    mutating func tickNode(_ name: String) {
        guard dead[name] == nil, var node = nodes[name] else { return }
        if let until = node.pausedUntil {
            guard now >= until else { return }
            node.pausedUntil = nil
            note("\(name)#\(node.inc) resumes in time")
        }
        tick(&node)
        tickWorker(&node)
        nodes[name] = node
        if node.worker.restoring != nil { workerReads(name) }
    }

    mutating func tickZombie(_ i: Int) {
        var z = zombies[i]
        if let until = z.pausedUntil {
            guard now >= until else { return }
            z.pausedUntil = nil
            note("\(z.name)#\(z.inc) resumes as a zombie")
        }
        tick(&z)
        zombies[i] = z
    }

    /// The SMP's loop: hello until welcomed, heartbeats, the round (resent
    /// when not protected in time), rebuild and repair jobs.
    mutating func tick(_ node: inout Node) {
        if !node.welcomed, now >= node.nextHello {
            node.nextHello = now + 0.5
            toCoordinator(node, .smpHello(inventory(node)))
        }
        if node.welcomed, now >= node.nextHeartbeat {
            node.nextHeartbeat = now + coordinator.settings.heartbeatInterval
            let parityBytes = node.parity.values.reduce(0) { $0 + $1.count * chunkBytes }
            toCoordinator(node, .smpHeartbeat(dataBytes: now >= node.sizesAt ? imageBytes(node.name) : 0, parityBytes: parityBytes))
        }
        let d = node.round.tick(now: now)
        if d.contains(where: { if case .send = $0 { true } else { false } }) { resends += 1 }
        runRound(&node, d, received: [])
        if var job = node.rebuild {
            let d = job.core.tick(now: now)
            runFetch(&node, &job, d, isRebuild: true)
        }
        if var job = node.repair {
            let d = job.core.tick(now: now)
            runFetch(&node, &job, d, isRebuild: false)
        }
    }

    /// The worker: hello until welcomed, heartbeats, ready again until resumed.
    mutating func tickWorker(_ node: inout Node) {
        switch node.worker.phase {
        case .gone:
            return
        case .hello:
            guard now >= node.worker.nextHello else { return }
            node.worker.nextHello = now + 0.3
            workerToCoordinator(node, .workerHello(workerInfo(node)))
        case .waiting, .running:
            if now >= node.worker.nextHeartbeat {
                node.worker.nextHeartbeat = now + coordinator.settings.heartbeatInterval
                let running = node.worker.phase == .running
                workerToCoordinator(node, .workerHeartbeat(step: node.worker.step, running: running, skipped: 0,
                                                           activity: WorkerActivity(running ? .computing : .idle, milliseconds: 5)))
            }
            if case .some(let step) = node.worker.readyStep, now >= node.worker.readyAgainAt {
                node.worker.readyAgainAt = now + 0.5
                workerToCoordinator(node, .ready(restoredStep: step))
            }
        }
    }

    /// The worker carries out its restore order: it reads its SMP's image of
    /// the step once the image passes its CRCs (a flipped byte is repaired
    /// first), which must be the committed step's as it was.
    mutating func workerReads(_ name: String) {
        guard var node = nodes[name], case .some(let step) = node.worker.restoring, now >= node.worker.readAgainAt else { return }
        if let s = step {
            guard node.images[s] != nil else {
                violation("\(name)/w0 told to restore step \(s); its SMP holds \(node.committed.map(String.init) ?? "nothing")")
                return
            }
            if node.committed != s {
                // Staged, with its commit still in flight: the restore request commits it.
                runRound(&node, node.round.commit(step: s), received: [])
                node.committed = s
                node.staged = nil
                node.images = node.images.filter { $0.key >= s }
                nodes[name] = node
            }
            guard verifyCommitted(name) else {
                nodes[name]!.worker.readAgainAt = now + 0.25
                return
            }
            node = nodes[name]!
            guard let t = truth[s]?[name] else {
                violation("\(name)/w0 told to restore step \(s), which was never committed")
                return
            }
            if node.images[s] != t { violation("\(name) restores step \(s) with other bytes than the committed") }
        }
        node.worker.restoring = nil
        node.worker.readyStep = .some(step)
        node.worker.readyAgainAt = now + 0.5
        workerToCoordinator(node, .ready(restoredStep: step))
        nodes[name] = node
    }

    mutating func workerHandle(_ node: inout Node, _ m: ControlMessage, epoch: UInt64) {
        guard node.worker.phase != .gone else { return }
        node.worker.epoch = max(node.worker.epoch, epoch)
        switch m {
        case .welcome:
            if node.worker.phase == .hello { node.worker.phase = .waiting }
        case .pause:
            if node.worker.phase == .running { node.worker.phase = .waiting }
        case .restore(let step, _):
            node.worker.phase = .waiting
            node.worker.restoring = .some(step)
            node.worker.readyStep = nil
        case .resume(let from, _):
            guard node.worker.phase != .running else { return }
            node.worker.phase = .running
            node.worker.step = from - 1
            node.worker.restoring = nil
            node.worker.readyStep = nil
        case .helloRequired:
            node.worker.phase = .hello
            node.worker.nextHello = now
        case .fenced, .stop:
            note("\(node.name)/w0 (pid \(node.worker.pid)) told \(m): it exits")
            node.worker.phase = .gone
        default:
            break
        }
    }

    mutating func sendData(_ node: Node, to: String, _ body: Body) {
        send(from: node.name, fromInc: node.inc, epoch: node.epoch, to: to, toInc: node.view[to] ?? 0, body)
    }

    mutating func handle(_ node: inout Node, _ msg: Message) {
        guard case .control(let cm) = msg.body else { return dataPlane(&node, msg) }
        guard msg.epoch >= node.epoch else { return }
        node.epoch = msg.epoch
        switch cm {
        case .welcome, .ack:
            node.welcomed = true
        case .helloRequired:
            node.welcomed = false
            node.nextHello = now
        case .fenced, .stop:
            note("\(node.name)#\(node.inc) told \(cm): it exits")
            if nodes[node.name]?.inc == node.inc {
                dead[node.name] = now
            } else {
                node.zombieDiesAt = now
            }
        case .ecLayout(let layout):
            if layout.k != k || layout.m != m || layout.groups != [names] || layout.chunkBytes != chunkBytes {
                violation("the coordinator's layout is RS(\(layout.k)+\(layout.m)) of \(layout.chunkBytes)-byte chunks over \(layout.groups); "
                    + "the group's is RS(\(k)+\(m)) of \(chunkBytes) over \(names)")
            }
            for (peer, ep) in layout.endpoints {
                if let inc = ep.split(separator: "#").last.flatMap({ Int($0) }) { node.view[peer] = inc }
            }
            if !node.hasLayout {
                node.hasLayout = true
                // The SMP protects the round it staged without a layout now.
                if let s = node.staged, let img = node.images[s] {
                    runRound(&node, node.round.startRound(step: s, imageBytes: img.count, epoch: node.stagedEpoch), received: [])
                }
            }
        case .commit(let step):
            runRound(&node, node.round.commit(step: step), received: [])
            if node.images[step] != nil { node.committed = step }
            if let s = node.staged, s <= step { node.staged = nil }
            node.images = node.images.filter { $0.key >= step }
        case .abort(let step):
            runRound(&node, node.round.abort(step: step), received: [])
            if node.committed != step { node.images[step] = nil }
            if node.staged == step { node.staged = nil }
        case .restore(let step, _):
            runRound(&node, node.round.restore(step: step), received: [])
            node.images = node.images.filter { $0.key == step }
            if let step, node.images[step] != nil { node.committed = step }
            node.staged = nil
            node.restoredEpoch = node.epoch
        case .rebuild(let step, let lost):
            guard let step else {
                toCoordinator(node, .rebuilt(step: nil, error: ""))
                return
            }
            if node.rebuild?.core.step == step && node.rebuild?.core.isOver == false { return }
            var job = Job(core: RebuildInstance(step: step, lost: Set(lost), purpose: .node, k: k, m: m, chunkBytes: chunkBytes,
                                                frameBytes: frameBytes, members: names, position: node.position, window: window,
                                                timeout: Self.fetchTimeout))
            job.prefix = [UInt8](repeating: 0, count: min(frameBytes, chunkBytes))
            let d = job.core.start(now: now)
            runFetch(&node, &job, d, isRebuild: true)
        case .restartWorkers(let list):
            for r in list where r.worker == "w0" && (node.worker.phase == .gone || r.pid == node.worker.pid) {
                nextWorkerPid += 1
                note("\(node.name)#\(node.inc) restarts its worker (pid \(node.worker.pid) -> \(nextWorkerPid))")
                node.worker = Worker(pid: nextWorkerPid, nextHello: now + 0.02)
            }
        default:
            break
        }
    }

    mutating func dataPlane(_ node: inout Node, _ msg: Message) {
        switch msg.body {
        case .chunk(let step, let row, let di, _, _, _, _) where !node.hasLayout:
            send(from: node.name, fromInc: node.inc, epoch: node.epoch, to: msg.from, toInc: msg.fromInc,
                 .ack(step: step, row: row, dataIndex: di, error: ECRoundInstance.noLayout))
        case .chunk(let step, let row, let di, let offset, let length, let crc, let bytes):
            let d = node.round.onChunkFrame(from: msg.from, epoch: msg.epoch, ownEpoch: node.epoch, step: step, row: row, dataIndex: di,
                                            offset: offset, length: length, frameBytes: bytes.count, crcMatches: Self.crc(bytes) == crc,
                                            committedStep: node.committed)
            if d.contains(where: { if case .ack(_, _, _, _, let e) = $0 { e.hasPrefix("fenced") } else { false } }) {
                faultCounts["fenced frame refused", default: 0] += 1
            }
            let fenced = fencedAt["\(msg.from)#\(msg.fromInc)"]
            if fenced != nil, d.contains(where: { if case .fold = $0 { true } else { false } }) {
                node.taint[step, default: [:]][row] = fenced
            }
            runRound(&node, d, received: bytes, replyTo: (msg.from, msg.fromInc))
        case .ack(let step, let row, let di, let error):
            runRound(&node, node.round.onAck(from: msg.from, step: step, row: row, dataIndex: di, error: error, now: now), received: [])
        case .fetch(let step, let row, let index, let offset, let length):
            let (bytes, error) = node.hasLayout ? serve(node, step: step, row: row, index: index, offset: offset, length: length)
                : ([], ECRoundInstance.noLayout)
            send(from: node.name, fromInc: node.inc, epoch: node.epoch, to: msg.from, toInc: msg.fromInc,
                 .data(step: step, row: row, index: index, offset: offset, crc: Self.crc(bytes), error: error, bytes: bytes))
            if error.hasPrefix(StoreError.Code.corrupt.rawValue), nodes[node.name]?.inc == node.inc {
                nodes[node.name] = node
                _ = verifyCommitted(node.name)  // and it repairs itself
                node = nodes[node.name]!
            }
        case .data(let step, let row, let index, let offset, let crc, let error, let bytes):
            for isRebuild in [true, false] {
                guard var job = isRebuild ? node.rebuild : node.repair,
                      let task = job.core.inFlight[RebuildInstance.Key(row: row, offset: offset)], job.core.step == step,
                      task.requested[index]?.node == msg.from else { continue }
                var problem: String? = error.isEmpty ? nil : error
                if problem == nil, bytes.count != task.length { problem = "sent \(bytes.count) bytes, \(task.length) asked" }
                if problem == nil, Self.crc(bytes) != crc { problem = "a frame failed its CRC32C" }
                let (keep, d) = job.core.onAnswer(from: msg.from, step: step, row: row, index: index, offset: offset, error: problem, now: now)
                if keep { job.answers[AnswerKey(row: row, offset: offset, index: index)] = bytes }
                runFetch(&node, &job, d, isRebuild: isRebuild)
                break
            }
        case .control:
            break
        }
    }

    /// What a holder answers to a fetch: its codeword bytes, or an error.
    func serve(_ node: Node, step: Int, row: Int, index: Int, offset: Int, length: Int) -> ([UInt8], String) {
        let layout = ECLayout(k: k, m: m, chunkBytes: chunkBytes, groups: [names], endpoints: [:])
        do throws(StoreError) {
            try layout.checkFetch(position: node.position, row: row, index: index, offset: offset, length: length)
        } catch {
            return ([], "\(error)")
        }
        if index >= k {
            guard let p = node.parity[step]?[row], node.round.holdsCompleteParity(step: step, row: row) else {
                return ([], "no complete parity of row \(row) for step \(step)")
            }
            return (Array(p[offset..<offset + length]), "")
        }
        guard let img = node.images[step] else { return ([], "does not hold step \(step)") }
        let c = placement.dataRows(of: node.position).firstIndex(of: row)!
        let lo = c * chunkBytes + offset
        // Bytes that fail their CRC at rest are not served (they would decode into garbage).
        let mb = manifestBytes(node.name)
        if badBlocks(img, name: node.name).contains(where: { $0.lowerBound + mb < lo + length && lo < $0.upperBound + mb }) {
            return ([], "\(StoreError.Code.corrupt.rawValue): bytes of step \(step) fail their CRC32C at rest")
        }
        var out = Array(img[min(img.count, lo)..<min(img.count, lo + length)])
        out += [UInt8](repeating: 0, count: length - out.count)
        return (out, "")
    }

    mutating func runRound(_ node: inout Node, _ directives: [ECRoundInstance.Directive], received: [UInt8],
                           replyTo: (String, Int)? = nil) {
        for d in directives {
            switch d {
            case .send(let f):
                guard let img = node.images[f.step] else {
                    violation("\(node.name) sends step \(f.step) it does not hold")
                    continue
                }
                let bytes = Array(img[f.imageRange])
                if let j = f.foldLocally { fold(&node, step: f.step, row: f.row, parityIndex: j, dataIndex: f.dataIndex, offset: f.offset, bytes) }
                for to in f.to {
                    // Stamped with the epoch the round was staged in (`Frame.epoch`), as the SMP does.
                    send(from: node.name, fromInc: node.inc, epoch: f.epoch, to: to, toInc: node.view[to] ?? 0,
                         .chunk(step: f.step, row: f.row, dataIndex: f.dataIndex, offset: f.offset, length: f.length,
                                crc: Self.crc(bytes), bytes: bytes))
                }
            case .allocateParity(let step, let row, _):
                node.parity[step, default: [:]][row] = [UInt8](repeating: 0, count: chunkBytes)
            case .freeParity(let step):
                node.parity[step] = nil
                node.taint[step] = nil
            case .fold(let step, let row, let j, let di, let offset):
                fold(&node, step: step, row: row, parityIndex: j, dataIndex: di, offset: offset, received)
            case .ack(let to, let step, let row, let di, let error):
                send(from: node.name, fromInc: node.inc, epoch: node.epoch, to: to, toInc: replyTo?.1 ?? node.view[to] ?? 0,
                     .ack(step: step, row: row, dataIndex: di, error: error))
            case .protected(let step):
                toCoordinator(node, .protected(step: step, layoutChunkBytes: chunkBytes))
            case .warning:
                break
            }
        }
    }

    mutating func fold(_ node: inout Node, step: Int, row: Int, parityIndex: Int, dataIndex: Int, offset: Int, _ bytes: [UInt8]) {
        guard var p = node.parity[step]?[row] else {
            violation("\(node.name) folds into parity of step \(step) row \(row) it never allocated")
            return
        }
        guard offset + bytes.count <= p.count else {
            violation("\(node.name) folds a frame past its parity buffer")
            return
        }
        p.withUnsafeMutableBytes { pb in
            bytes.withUnsafeBytes { b in
                try! codec.update(parityRow: parityIndex, dataIndex: dataIndex, chunk: b,
                                  parity: UnsafeMutableRawBufferPointer(rebasing: pb[offset..<offset + bytes.count]))
            }
        }
        node.parity[step]![row] = p
    }

    mutating func runFetch(_ node: inout Node, _ job: inout Job, _ directives: [RebuildInstance.Directive], isRebuild: Bool) {
        var work = directives[...]
        var over = false
        while let d = work.popFirst() {
            switch d {
            case .fetch(let to, let step, let row, let index, let offset, let length):
                sendData(node, to: to, .fetch(step: step, row: row, index: index, offset: offset, length: length))
            case .decode(let t):
                var chunks = (0..<n).map { i in job.answers.removeValue(forKey: AnswerKey(row: t.row, offset: t.offset, index: i)) ?? [] }
                for i in 0..<n where !t.have.contains(i) { chunks[i] = [] }
                let missing = (0..<n).filter { !t.have.contains($0) }
                do {
                    try codec.reconstruct(&chunks, missing: missing)
                } catch {
                    work += job.core.fail("decode: \(error)")
                    continue
                }
                let bytes = chunks[t.mine]
                switch t.destination {
                case .prefix(let at):
                    job.prefix.replaceSubrange(at..<at + t.length, with: bytes)
                case .parity(let row):
                    node.parity[job.core.step]?[row]?.replaceSubrange(t.offset..<t.offset + t.length, with: bytes)
                case .image(let at):
                    for (i, b) in bytes.enumerated() where at + i < job.image.count { job.image[at + i] = b }
                }
            case .readPrefix:
                work += job.core.prefixRead(manifestBytes: Self.u32(job.prefix, 0) + 4, now: now)
            case .growPrefix(let bytes):
                job.prefix += [UInt8](repeating: 0, count: bytes - job.prefix.count)
            case .parseManifest:
                let step = Self.u32(job.prefix, 4)
                guard step == job.core.step else {
                    work += job.core.fail("image of step \(step)")
                    continue
                }
                let total = Self.u32(job.prefix, 12)
                job.image = [UInt8](repeating: 0, count: total)
                job.image.replaceSubrange(0..<job.prefix.count, with: job.prefix)
                work += job.core.bodyPlanned(imageBytes: total, now: now)
            case .reserveParity(let row):
                runRound(&node, node.round.reserveParity(step: job.core.step, row: row), received: [])
            case .finished:
                over = true
                if isRebuild {
                    let step = job.core.step
                    guard badBlocks(job.image, name: node.name).isEmpty else {
                        work += [.failed("rebuilt image fails its CRCs")]
                        continue
                    }
                    node.images[step] = job.image
                    node.committed = step
                    node.staged = nil
                    node.round.installRebuiltParity(step: step)
                    if let t = truth[step]?[node.name] {
                        if job.image != t { violation("\(node.name) rebuilt step \(step) with other bytes") }
                        checkParity(node, step: step, what: "rebuilt")
                    } else {
                        violation("\(node.name) rebuilt step \(step), which was never committed")
                    }
                    toCoordinator(node, .rebuilt(step: step, error: ""))
                } else {
                    // The repaired image is where the decode wrote it: the node's committed image.
                    node.images[job.core.step] = job.image
                    if badBlocks(job.image, name: node.name).isEmpty {
                        repairs += 1
                        if let t = truth[job.core.step]?[node.name], job.image != t { violation("\(node.name)'s repaired image differs from the original") }
                    } else {
                        node.repairFailed = job.core.step
                    }
                }
            case .failed(let reason):
                over = true
                if isRebuild {
                    toCoordinator(node, .rebuilt(step: job.core.step, error: reason))
                } else {
                    node.repairFailed = job.core.step
                }
            case .warning(let w):
                note("\(node.name): \(w)")
            }
        }
        if isRebuild { node.rebuild = over ? nil : job } else { node.repair = over ? nil : job }
    }

    /// The node checks its committed image; a bad block starts a repair.
    /// True when it is intact.
    mutating func verifyCommitted(_ name: String) -> Bool {
        var node = nodes[name]!
        defer { nodes[name] = node }
        guard let c = node.committed, let img = node.images[c] else { return true }
        let bad = badBlocks(img, name: name)
        if bad.isEmpty { return true }
        guard node.repair == nil else { return false }
        if node.repairFailed == c { node.repairFailed = nil }  // asked again: try again
        let layout = NodeImageLayout(manifestBytes: manifestBytes(name), slotBytes: [slotBytes[name]!])
        let rows = placement.dataRows(of: node.position)
        let ranges = bad.flatMap { layout.chunkRanges(slot: 0, range: $0, chunkBytes: chunkBytes) }.map { (row: rows[$0.chunk], range: $0.range) }
        var job = Job(core: RebuildInstance(step: c, lost: [], purpose: .ranges(ranges), k: k, m: m, chunkBytes: chunkBytes,
                                            frameBytes: frameBytes, members: names, position: node.position, window: window,
                                            timeout: Self.fetchTimeout))
        job.image = img
        note("\(name) repairs \(bad.count) blocks of step \(c)")
        let d = job.core.start(now: now)
        runFetch(&node, &job, d, isRebuild: false)
        return false
    }

    // MARK: invariants

    /// Parity held for at most `maxParitySteps` steps; fetch jobs within their window.
    mutating func checkBounds(_ node: Node) {
        if node.parity.count > ECRoundInstance.maxParitySteps {
            violation("\(node.name)#\(node.inc) holds parity of \(node.parity.count) steps \(node.parity.keys.sorted())")
        }
        for job in [node.rebuild, node.repair] {
            guard let job else { continue }
            if job.core.inFlight.count > window || job.answers.count > window * k {
                violation("\(node.name) holds \(job.core.inFlight.count) frames in flight, \(job.answers.count) answers")
            }
        }
    }

    mutating func check() {
        for name in names { checkBounds(nodes[name]!) }
        for z in zombies { checkBounds(z) }
        for name in names where dead[name] == nil {
            let node = nodes[name]!
            guard !node.taint.isEmpty else { continue }
            for (step, rows) in node.taint.sorted(by: { $0.key < $1.key }) {
                for (row, e) in rows.sorted(by: { $0.key < $1.key }) where node.restoredEpoch >= e && node.parity[step]?[row] != nil {
                    violation("\(name) keeps parity of step \(step) row \(row) folded from a frame fenced in epoch \(e)")
                }
            }
        }
    }
}
