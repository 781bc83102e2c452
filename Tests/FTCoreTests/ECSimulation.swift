import FTCore
import FTErasure

/// A seeded simulation of the data plane: one EC group of `k + m` SMPs, each
/// running the real cores (`ECRoundInstance`, `RebuildInstance`) over byte
/// arrays (images of a few hundred bytes, frames of a few dozen, the real
/// ISA-L codec and CRC32C), driven by a small committing coordinator, over a
/// network that drops, delays, duplicates, reorders and corrupts frames and
/// cuts links for a while. Nodes crash (and are replaced and rebuilt), pause
/// (and come back as zombies of a replaced incarnation, or in time), and have
/// bytes of their committed image flipped at rest (and repair them from
/// parity before anyone restores them).
///
/// Invariants, checked after every event (`violations`):
/// - a commit: every live node holds the step's image and the correct parity
///   of every row it holds parity of;
/// - a rebuilt node's image and parity equal the original's;
/// - a restore reads the committed step, the same on every node, byte for byte;
/// - a fenced incarnation's frame is never kept by a node that knows of the fence;
/// - parity is held for at most `ECRoundInstance.maxParitySteps` steps, and a
///   fetch job holds at most `window` frames in flight and `window × k` answers.
///
/// Liveness: once faults stop, rounds commit again.
struct ECSimulation {
    // MARK: messages

    enum Body {
        // data plane
        case chunk(step: Int, row: Int, dataIndex: Int, offset: Int, length: Int, crc: UInt32, bytes: [UInt8])
        case ack(step: Int, row: Int, dataIndex: Int, error: String)
        case fetch(step: Int, row: Int, index: Int, offset: Int, length: Int)
        case data(step: Int, row: Int, index: Int, offset: Int, crc: UInt32, error: String, bytes: [UInt8])
        // coordinator to node
        case stage(step: Int)
        case commit(step: Int)
        case abort(step: Int)
        case restore(step: Int?, view: [String: Int])
        case rebuild(step: Int, lost: Set<String>, view: [String: Int])
        // node to coordinator
        case protected(step: Int)
        case rebuilt(step: Int, error: String)

        var isDataPlane: Bool {
            switch self {
            case .chunk, .ack, .fetch, .data: true
            default: false
            }
        }
    }

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

    struct Node {
        var name: String
        var inc: Int
        var position: Int
        var epoch: UInt64
        var round: ECRoundInstance
        var parity: [Int: [Int: [UInt8]]] = [:]
        /// Parity folded from a fenced incarnation: step -> row -> the epoch that fenced it.
        var taint: [Int: [Int: UInt64]] = [:]
        var images: [Int: [UInt8]] = [:]
        var committed: Int?
        var view: [String: Int]
        var rebuild: Job?
        var repair: Job?
        var repairFailed: Int?
        var pausedUntil: Double?
        var zombieDiesAt: Double?
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
    var nodes: [String: Node] = [:]
    /// Replaced incarnations still running (paused when replaced).
    var zombies: [Node] = []
    var dead: [String: Double] = [:]
    var cuts: [Set<String>: Double] = [:]

    // coordinator
    var epoch: UInt64 = 1
    var incarnation: [String: Int] = [:]
    var fencedAt: [String: UInt64] = [:]  // "name#inc" -> epoch
    var committed: Int?
    var truth: [Int: [String: [UInt8]]] = [:]
    var roundStep: Int?
    var roundStarted = 0.0
    var roundProtected: Set<String> = []
    var nextStep = 1
    var nextRoundAt = 0.2
    var recovery: (lost: Set<String>, rebuilt: Set<String>, retryAt: [String: Double])?
    var restorePending: Set<String> = []
    var lastCommitAt = 0.0
    var commits = 0
    var commitsAtFailure = 0
    var recoveries = 0
    var repairs = 0

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

    static let detectDelay = 0.5
    static let roundTimeout = 3.0
    static let fetchTimeout = 0.4
    static let crcBlock = 16

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
        for (p, name) in names.enumerated() {
            incarnation[name] = 0
            nodes[name] = freshNode(name, position: p, inc: 0)
        }
    }

    func freshNode(_ name: String, position: Int, inc: Int) -> Node {
        Node(name: name, inc: inc, position: position, epoch: epoch,
             round: ECRoundInstance(k: k, m: m, chunkBytes: chunkBytes, frameBytes: frameBytes, members: names, position: position),
             view: incarnation)
    }

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

    mutating func note(_ s: String) { log.append(String(format: "%7.3f ", now) + s) }

    mutating func violation(_ s: String) {
        note("VIOLATION " + s)
        violations.append(String(format: "t=%.3f ", now) + s)
    }

    mutating func chance(_ p: Double) -> Bool { p > 0 && Double(rng.next() % 1_000_000) / 1_000_000 < p }

    mutating func send(from: String, fromInc: Int, epoch e: UInt64, to: String, toInc: Int, _ body: Body) {
        var delay = 0.001 + Double(rng.next() % 30) / 1000
        if body.isDataPlane, now < faultsUntil {
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
        if body.isDataPlane, now < faultsUntil, chance(dupRate) {
            seq += 1
            inFlight.append(Message(at: now + delay + Double(rng.next() % 50) / 1000, seq: seq, from: from, fromInc: fromInc, to: to,
                                    toInc: toInc, epoch: e, body: b))
            faultCounts["duplicate", default: 0] += 1
        }
    }

    mutating func toCoordinator(_ node: Node, _ body: Body) {
        send(from: node.name, fromInc: node.inc, epoch: node.epoch, to: Self.coordinator, toInc: 0, body)
    }

    mutating func toNode(_ name: String, _ body: Body) {
        send(from: Self.coordinator, fromInc: 0, epoch: epoch, to: name, toInc: incarnation[name]!, body)
    }

    /// Runs until `end` (simulated seconds).
    mutating func run(until end: Double) {
        let dt = 0.02
        while now < end && violations.isEmpty {
            now += dt
            // Messages due, in time order (ties by sequence).
            let due = inFlight.filter { $0.at <= now }.sorted { ($0.at, $0.seq) < ($1.at, $1.seq) }
            inFlight.removeAll { $0.at <= now }
            for msg in due {
                deliver(msg)
                check()
            }
            for name in names { tickNode(name) }
            for i in zombies.indices { tickZombie(i) }
            zombies.removeAll { z in z.zombieDiesAt.map { now >= $0 } ?? false }
            coordinatorTick()
            check()
            if now < faultsUntil { injectFaults() } else { cuts = [:] }
            cuts = cuts.filter { $0.value > now }
        }
    }

    // MARK: faults

    var allUp: Bool { dead.isEmpty && recovery == nil && nodes.values.allSatisfy { $0.pausedUntil == nil } && restorePending.isEmpty }

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
        if allUp, chance(0.004) {
            // (Only while every node is up: a flip during a recovery is a second erasure.)
            let name = names[Int(rng.next() % UInt64(n))]
            if dead[name] == nil, let c = nodes[name]!.committed, var img = nodes[name]!.images[c] {
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

    // MARK: coordinator

    mutating func coordinatorTick() {
        // Detection: a crashed or paused node, silent for `detectDelay`.
        do {
            var newly: Set<String> = []
            for (name, at) in dead where now - at >= Self.detectDelay && recovery?.lost.contains(name) != true { newly.insert(name) }
            for name in names {
                if nodes[name]!.pausedUntil != nil, dead[name] == nil,
                   recovery?.lost.contains(name) != true, pausedSince(name) >= Self.detectDelay { newly.insert(name) }
            }
            if !newly.isEmpty { startRecovery(newly) }
        }
        if var r = recovery {
            for name in r.lost.sorted() where !r.rebuilt.contains(name) {
                if let at = r.retryAt[name], now >= at {
                    r.retryAt[name] = nil
                    note("rebuild of \(name) ordered again")
                    toNode(name, .rebuild(step: committed ?? -1, lost: r.lost, view: incarnation))
                }
            }
            recovery = r
            return
        }
        if !restorePending.isEmpty { return }
        if let s = roundStep, now - roundStarted > Self.roundTimeout {
            note("round \(s) aborted (deadline)")
            for name in names { toNode(name, .abort(step: s)) }
            roundStep = nil
            nextRoundAt = now + 0.1
        }
        if roundStep == nil, now >= nextRoundAt {
            roundStep = nextStep
            nextStep += 1
            roundStarted = now
            roundProtected = []
            note("round \(roundStep!) starts (epoch \(epoch))")
            for name in names { toNode(name, .stage(step: roundStep!)) }
        }
    }

    var pauseStarted: [String: Double] = [:]
    func pausedSince(_ name: String) -> Double { pauseStarted[name].map { now - $0 } ?? 0 }

    mutating func startRecovery(_ newly: Set<String>) {
        let lost = newly.union(recovery?.lost ?? [])
        // As the coordinator does: a round every surviving node protected commits
        // before the recovery is planned (the lost nodes' images decode from parity).
        if recovery == nil, let s = roundStep, lost.count <= m, names.allSatisfy({ lost.contains($0) || roundProtected.contains($0) }) {
            commitAtFailure(s, lost: lost)
        }
        epoch += 1
        recoveries += 1
        note("recovery in epoch \(epoch): lost \(lost.sorted()), committed \(committed.map(String.init) ?? "none")")
        roundStep = nil
        restorePending = []
        for name in newly.sorted() {
            let old = nodes[name]!
            fencedAt["\(name)#\(old.inc)"] = epoch
            if dead[name] == nil {
                // Paused: it runs on later as a zombie of a replaced incarnation.
                var z = old
                z.zombieDiesAt = (old.pausedUntil ?? now) + 1.0
                zombies.append(z)
            }
            dead[name] = nil
            incarnation[name] = old.inc + 1
            nodes[name] = freshNode(name, position: old.position, inc: old.inc + 1)
            pauseStarted[name] = nil
        }
        guard lost.count <= m else {
            violation("more than m nodes lost at once: the fault schedule allows at most one")
            return
        }
        recovery = (lost, [], [:])
        for name in names where !lost.contains(name) { toNode(name, .restore(step: committed, view: incarnation)) }
        for name in lost.sorted() {
            if let c = committed {
                toNode(name, .rebuild(step: c, lost: lost, view: incarnation))
            } else {
                recovery!.rebuilt.insert(name)
            }
        }
        finishRecoveryIfDone()
    }

    mutating func finishRecoveryIfDone() {
        guard let r = recovery, r.rebuilt == r.lost else { return }
        recovery = nil
        note("recovery done; every node restores \(committed.map(String.init) ?? "none")")
        // The replacements restore too (they hold what they rebuilt).
        restorePending = Set(names)
        for name in r.lost.sorted() { toNode(name, .restore(step: committed, view: incarnation)) }
        restoreReads()
    }

    /// Every node's workers restore the committed step once its image passes its CRCs.
    mutating func restoreReads() {
        for name in restorePending.sorted() {
            guard dead[name] == nil, nodes[name]!.pausedUntil == nil, nodes[name]!.epoch == epoch else { continue }
            guard let c = committed else {
                restorePending.remove(name)
                continue
            }
            guard verifyCommitted(name) else { continue }
            let img = nodes[name]!.images[c]
            if nodes[name]!.committed != c || img != truth[c]![name] {
                violation("\(name) restores step \(nodes[name]!.committed.map(String.init) ?? "none"), not the committed \(c) as it was")
            }
            restorePending.remove(name)
        }
        if restorePending.isEmpty {
            nextStep = max(nextStep, (committed ?? 0) + 1)
            nextRoundAt = now + 0.1
        }
    }

    mutating func coordinatorReceive(_ msg: Message) {
        guard msg.epoch == epoch, incarnation[msg.from] == msg.fromInc else { return }  // fenced or stale
        switch msg.body {
        case .protected(let step):
            guard step == roundStep, recovery == nil else { return }
            roundProtected.insert(msg.from)
            guard roundProtected.count == n else { return }
            commit(step)
        case .rebuilt(let step, let error):
            guard var r = recovery, r.lost.contains(msg.from), step == committed else { return }
            if !error.isEmpty {
                note("rebuild of \(msg.from) failed: \(error)")
                r.retryAt[msg.from] = now + 0.5
                recovery = r
                return
            }
            let node = nodes[msg.from]!
            if node.images[step] != truth[step]![msg.from] { violation("\(msg.from) rebuilt step \(step) with other bytes") }
            checkParity(of: msg.from, step: step, what: "rebuilt")
            r.rebuilt.insert(msg.from)
            recovery = r
            finishRecoveryIfDone()
        default:
            return
        }
    }

    mutating func commit(_ step: Int) {
        var images: [String: [UInt8]] = [:]
        for name in names {
            guard let img = nodes[name]!.images[step] else {
                if dead[name] == nil { violation("commit of \(step): \(name) does not hold it") }
                return
            }
            images[name] = img
        }
        truth[step] = images
        for name in names where dead[name] == nil {
            checkParity(of: name, step: step, what: "commit of")
        }
        committed = step
        truth = truth.filter { $0.key >= step }
        roundStep = nil
        commits += 1
        lastCommitAt = now
        nextRoundAt = now + 0.05
        note("commit \(step)")
        for name in names { toNode(name, .commit(step: step)) }
    }

    /// Commits `step` without the lost nodes: their images of it are what they
    /// staged in this epoch, which the rebuild must decode byte for byte.
    mutating func commitAtFailure(_ step: Int, lost: Set<String>) {
        var images: [String: [UInt8]] = [:]
        for name in names {
            if lost.contains(name) {
                images[name] = image(name, step: step, epoch: epoch)
            } else if let img = nodes[name]!.images[step] {
                images[name] = img
            } else {
                violation("commit of \(step) at a failure: survivor \(name) does not hold it")
                return
            }
        }
        truth[step] = images
        for name in names where !lost.contains(name) { checkParity(of: name, step: step, what: "commit at a failure of") }
        committed = step
        truth = truth.filter { $0.key >= step }
        roundStep = nil
        commits += 1
        commitsAtFailure += 1
        lastCommitAt = now
        note("commit \(step) at the failure of \(lost.sorted())")
        for name in names where !lost.contains(name) { toNode(name, .commit(step: step)) }
    }

    /// `name` holds correct parity of `step` for every row it holds parity of.
    mutating func checkParity(of name: String, step: Int, what: String) {
        guard let images = truth[step] else { return }
        let parity = encode(images)
        let p = names.firstIndex(of: name)!
        for (row, j) in placement.parityRows(of: p) {
            if nodes[name]!.parity[step]?[row] != parity[row * m + j] || !nodes[name]!.round.holdsCompleteParity(step: step, row: row) {
                violation("\(what) \(step): \(name)'s parity of row \(row) is not the parity of the images")
            }
        }
    }

    // MARK: nodes

    mutating func deliver(_ msg: Message) {
        if msg.to == Self.coordinator {
            coordinatorReceive(msg)
            return
        }
        if let zi = zombies.firstIndex(where: { $0.name == msg.to && $0.inc == msg.toInc }) {
            var z = zombies[zi]
            if let until = z.pausedUntil, now < until {
                zombies[zi].pausedUntil = until  // still paused: it reads its queue when it wakes
                inFlight.append(Message(at: until + 0.001, seq: msg.seq, from: msg.from, fromInc: msg.fromInc, to: msg.to,
                                        toInc: msg.toInc, epoch: msg.epoch, body: msg.body))
                return
            }
            handle(&z, msg)
            zombies[zi] = z
            return
        }
        guard var node = nodes[msg.to], node.inc == msg.toInc, dead[msg.to] == nil else { return }
        if let until = node.pausedUntil, now < until {
            inFlight.append(Message(at: until + 0.001, seq: msg.seq, from: msg.from, fromInc: msg.fromInc, to: msg.to,
                                    toInc: msg.toInc, epoch: msg.epoch, body: msg.body))
            return
        }
        handle(&node, msg)
        nodes[msg.to] = node
        if !restorePending.isEmpty { restoreReads() }
    }

    mutating func tickNode(_ name: String) {
        guard dead[name] == nil, var node = nodes[name] else { return }
        if let until = node.pausedUntil {
            if pauseStarted[name] == nil { pauseStarted[name] = now }
            guard now >= until else { return }
            node.pausedUntil = nil
            pauseStarted[name] = nil
            note("\(name)#\(node.inc) resumes in time")
        }
        tick(&node)
        nodes[name] = node
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

    mutating func tick(_ node: inout Node) {
        runRound(&node, node.round.tick(now: now), received: [])
        if var job = node.rebuild {
            let d = job.core.tick(now: now)
            runFetch(&node, &job, d, isRebuild: true)
        }
        if var job = node.repair {
            let d = job.core.tick(now: now)
            runFetch(&node, &job, d, isRebuild: false)
        }
    }

    mutating func sendData(_ node: Node, to: String, _ body: Body) {
        send(from: node.name, fromInc: node.inc, epoch: node.epoch, to: to, toInc: node.view[to] ?? 0, body)
    }

    mutating func handle(_ node: inout Node, _ msg: Message) {
        if msg.from == Self.coordinator {
            guard msg.epoch >= node.epoch else { return }
            node.epoch = msg.epoch
        }
        switch msg.body {
        case .stage(let step):
            guard node.committed.map({ $0 < step }) ?? true else { return }
            let img = image(node.name, step: step, epoch: msg.epoch)
            node.images[step] = img
            runRound(&node, node.round.startRound(step: step, imageBytes: img.count), received: [])
        case .commit(let step):
            runRound(&node, node.round.commit(step: step), received: [])
            if node.images[step] != nil { node.committed = step }
            node.images = node.images.filter { $0.key >= step }
        case .abort(let step):
            runRound(&node, node.round.abort(step: step), received: [])
            if node.committed != step { node.images[step] = nil }
        case .restore(let step, let view):
            node.view = view
            runRound(&node, node.round.restore(step: step), received: [])
            node.images = node.images.filter { $0.key == step }
            if let step, node.images[step] != nil { node.committed = step }
        case .rebuild(let step, let lost, let view):
            node.view = view
            if node.rebuild?.core.step == step && node.rebuild?.core.isOver == false { return }
            var job = Job(core: RebuildInstance(step: step, lost: lost, purpose: .node, k: k, m: m, chunkBytes: chunkBytes,
                                                frameBytes: frameBytes, members: names, position: node.position, window: window,
                                                timeout: Self.fetchTimeout))
            job.prefix = [UInt8](repeating: 0, count: min(frameBytes, chunkBytes))
            let d = job.core.start(now: now)
            runFetch(&node, &job, d, isRebuild: true)
        case .chunk(let step, let row, let di, let offset, let length, let crc, let bytes):
            let d = node.round.onChunkFrame(from: msg.from, epoch: msg.epoch, ownEpoch: node.epoch, step: step, row: row, dataIndex: di,
                                            offset: offset, length: length, frameBytes: bytes.count, crcMatches: Self.crc(bytes) == crc,
                                            committedStep: node.committed)
            if d.contains(where: { if case .ack(_, _, _, _, let e) = $0 { e.hasPrefix("fenced") } else { false } }) {
                faultCounts["zombie frame refused", default: 0] += 1
            }
            let fenced = fencedAt["\(msg.from)#\(msg.fromInc)"]
            if fenced != nil, d.contains(where: { if case .fold = $0 { true } else { false } }) {
                node.taint[step, default: [:]][row] = fenced
            }
            runRound(&node, d, received: bytes, replyTo: (msg.from, msg.fromInc))
        case .ack(let step, let row, let di, let error):
            runRound(&node, node.round.onAck(from: msg.from, step: step, row: row, dataIndex: di, error: error, now: now), received: [])
        case .fetch(let step, let row, let index, let offset, let length):
            let (bytes, error) = serve(node, step: step, row: row, index: index, offset: offset, length: length)
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
        case .protected, .rebuilt:
            return
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
                    sendData(node, to: to, .chunk(step: f.step, row: f.row, dataIndex: f.dataIndex, offset: f.offset, length: f.length,
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
                toCoordinator(node, .protected(step: step))
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
                    node.round.installRebuiltParity(step: step)
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

    mutating func check() {
        for node in Array(nodes.values) + zombies {
            if node.parity.count > ECRoundInstance.maxParitySteps {
                violation("\(node.name)#\(node.inc) holds parity of \(node.parity.count) steps \(node.parity.keys.sorted())")
            }
            for job in [node.rebuild, node.repair].compactMap({ $0 }) {
                if job.core.inFlight.count > window || job.answers.count > window * k {
                    violation("\(node.name) holds \(job.core.inFlight.count) frames in flight, \(job.answers.count) answers")
                }
            }
        }
        for node in nodes.values where dead[node.name] == nil {
            for (step, rows) in node.taint {
                for (row, e) in rows where node.epoch >= e && node.parity[step]?[row] != nil {
                    violation("\(node.name) keeps parity of step \(step) row \(row) folded from a frame fenced in epoch \(e)")
                }
            }
        }
    }
}
