import FTControl
import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation

/// A node's snapshot as erasure coding sees it: a manifest (what the node's
/// workers registered, and each slot's chunk CRCs for the step) followed by
/// every worker's slot for that step, in worker order — one virtual buffer of
/// `count` bytes, cut into the group's `k` chunks of `chunkBytes` (zeros past
/// the end). Rebuilding a lost node gives back this buffer; its manifest says
/// how to turn it back into workers' slots.
struct NodeImage {
    struct Entry {
        var registration: WorkerRegistration
        var slotBytes: Int
        var crcs: [UInt32]
    }

    static let magic: UInt32 = 0x4654_4E49  // "FTNI"

    var step: Int
    var entries: [Entry]

    func manifest() -> [UInt8] {
        var w = ByteWriter()
        w.u32(Self.magic)
        w.i64(Int64(step))
        w.u32(UInt32(entries.count))
        for e in entries {
            w.blob(SMPMessage.register(e.registration).envelope(sender: "").payload)
            w.i64(Int64(e.slotBytes))
            w.u32(UInt32(e.crcs.count))
            for c in e.crcs { w.u32(c) }
        }
        let body = w.buffer
        var out = ByteWriter()
        out.u32(UInt32(body.count))
        out.bytes(body)
        return out.buffer
    }

    /// The manifest's length without building the CRC values (they are fixed size).
    static func manifestSize(_ entries: [(WorkerRegistration, Int, Int)]) -> Int {
        NodeImage(step: 0, entries: entries.map { Entry(registration: $0.0, slotBytes: $0.1, crcs: Array(repeating: 0, count: $0.2)) })
            .manifest().count
    }

    static func parse(_ bytes: UnsafeRawBufferPointer) throws -> NodeImage {
        guard bytes.count >= 4 else { throw SMPError("rebuilt image too short") }
        let length = Int(bytes.load(as: UInt32.self).littleEndian)
        guard length + 4 <= bytes.count else { throw SMPError("rebuilt manifest length \(length) exceeds the image") }
        var r = ByteReader(Array(bytes[4..<4 + length]))
        guard try r.u32(field: "magic") == magic else { throw SMPError("rebuilt image has no manifest (bad magic)") }
        let step = Int(try r.i64(field: "step"))
        let count = Int(try r.u32(field: "entries"))
        var entries: [Entry] = []
        for _ in 0..<count {
            let payload = try r.blob(field: "registration")
            guard case .register(let reg) = try SMPMessage(WireEnvelope(type: 1, epoch: 0, sender: "", payload: payload)) else {
                throw SMPError("bad registration in the manifest")
            }
            let slotBytes = Int(try r.i64(field: "slot bytes"))
            let n = Int(try r.u32(field: "crc count"))
            var crcs: [UInt32] = []
            for _ in 0..<n { crcs.append(try r.u32(field: "crc")) }
            entries.append(Entry(registration: reg, slotBytes: slotBytes, crcs: crcs))
        }
        return NodeImage(step: step, entries: entries)
    }
}

/// Erasure-coding state of one SMP (DESIGN.md, "Erasure coding across nodes"):
/// parity it holds for other nodes (by step), and the round it is protecting.
final class ErasureState {
    var layout: ECLayout
    let group: Int
    let position: Int
    let codec: ReedSolomon
    var placement: ParityPlacement { layout.placement }
    var members: [String] { layout.groups[group] }
    var chunkBytes: Int { layout.chunkBytes }

    /// Parity chunks held, per step: row -> (parity index, bytes).
    var parity: [Int: [Int: (index: Int, bytes: UnsafeMutableRawBufferPointer)]] = [:]
    /// Data indexes folded so far, per step and row.
    var folded: [Int: [Int: Set<Int>]] = [:]
    /// The round being protected: step, its image pieces, acks still missing.
    var outgoing: (step: Int, manifest: [UInt8], pending: Set<String>)?
    var peers: [String: ZMQSocket] = [:]
    static let noLayout = "no EC layout"
    /// When to send the outgoing round again (a holder had no layout yet).
    var resendAt: Double?
    /// When each round started protecting (for the staged-to-committed time).
    var stagedAt: [Int: Double] = [:]
    /// Bytes folded and seconds spent folding, per step.
    var foldStats: [Int: (bytes: Int, seconds: Double)] = [:]

    init(layout: ECLayout, node: String) throws {
        guard let (g, p) = layout.locate(node) else { throw SMPError("node \(node) is in no EC group of the layout") }
        self.layout = layout
        group = g
        position = p
        codec = try ReedSolomon(dataCount: layout.k, parityCount: layout.m)
    }

    deinit {
        for (_, rows) in parity { for (_, p) in rows { p.bytes.deallocate() } }
        for s in peers.values { s.close() }
    }

    var parityBytesHeld: Int { parity.values.reduce(0) { $0 + $1.count * chunkBytes } }

    /// The parity buffer of `row` for `step`, allocated (zeroed, pre-faulted) on first use.
    func parityBuffer(step: Int, row: Int) -> UnsafeMutableRawBufferPointer? {
        guard let index = placement.parityHolders(row: row).firstIndex(of: position) else { return nil }
        if let existing = parity[step]?[row] { return existing.bytes }
        let b = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkBytes, alignment: 64)
        memset(b.baseAddress!, 0, chunkBytes)
        parity[step, default: [:]][row] = (index, b)
        return b
    }

    /// Whether every parity chunk this node holds for `step` has all k data chunks folded in.
    func parityComplete(step: Int) -> Bool {
        placement.parityRows(of: position).allSatisfy { folded[step]?[$0.row]?.count == layout.k }
    }

    /// Drops parity of the steps `keep` rejects.
    func dropParity(where reject: (Int) -> Bool) {
        for step in parity.keys where reject(step) {
            for (_, p) in parity[step]! { p.bytes.deallocate() }
            parity[step] = nil
            folded[step] = nil
        }
        if let o = outgoing, reject(o.step) { outgoing = nil }
    }
}

extension SMPServer {
    // MARK: the node image

    /// The workers in image order with their slot (for `step`) and CRCs.
    func imageEntries(step: Int, committedOnly: Bool) -> [(id: String, slot: Int, entry: NodeImage.Entry)]? {
        var out: [(String, Int, NodeImage.Entry)] = []
        for (id, w) in store.workers.sorted(by: { $0.key < $1.key }) {
            guard let slot = w.slots.firstIndex(where: {
                switch $0 {
                case .committed(step, _): true
                case .staged(step, _): !committedOnly
                default: false
                }
            }) else { return nil }
            out.append((id, slot, NodeImage.Entry(registration: w.registration, slotBytes: w.layout.slotBytes, crcs: w.slots[slot].crcs)))
        }
        return out
    }

    /// Bytes of this node's image (manifest and one version of every slot).
    var imageBytes: Int {
        guard !store.workers.isEmpty else { return 0 }
        let ws = store.workers.sorted { $0.key < $1.key }
        return NodeImage.manifestSize(ws.map { ($0.value.registration, $0.value.layout.slotBytes, $0.value.layout.chunkCount) })
            + ws.reduce(0) { $0 + $1.value.layout.slotBytes }
    }

    /// The pieces of the image's byte range `range` (manifest, then slots), each a view of memory.
    func imagePieces(manifest: [UInt8], entries: [(id: String, slot: Int, entry: NodeImage.Entry)], range: Range<Int>,
                     manifestPointer: UnsafeRawPointer) -> [UnsafeRawBufferPointer] {
        var pieces: [UnsafeRawBufferPointer] = []
        var offset = 0
        func take(_ base: UnsafeRawPointer, _ count: Int) {
            let lo = max(range.lowerBound, offset), hi = min(range.upperBound, offset + count)
            if lo < hi { pieces.append(UnsafeRawBufferPointer(start: base + (lo - offset), count: hi - lo)) }
            offset += count
        }
        take(manifestPointer, manifest.count)
        for e in entries { take(UnsafeRawPointer(segments[e.id]![e.slot].base), e.entry.slotBytes) }
        return pieces
    }

    /// CRC32C of a large buffer in 64 MiB pieces, heartbeating between them.
    func checksumResponsively(_ buffer: UnsafeRawBufferPointer, continuing crc: UInt32) -> UInt32 {
        var c = crc
        var done = 0
        while done < buffer.count {
            let n = min(64 << 20, buffer.count - done)
            c = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: buffer[done..<done + n]), continuing: c)
            done += n
            keepAlive()
        }
        return c
    }

    // MARK: protecting a round

    /// Every local worker staged `step`: send each data chunk to its row's
    /// parity holders (folding locally where this node holds parity itself).
    func startProtecting(step: Int) {
        guard let ec = erasure else {
            link?.send(.protected(step: step))
            return
        }
        guard let entries = imageEntries(step: step, committedOnly: false) else { return }
        ec.stagedAt[step] = monotonicSeconds()
        let manifest = NodeImage(step: step, entries: entries.map(\.entry)).manifest()
        var pending = Set<String>()
        ec.outgoing = (step, manifest, [])
        let total = manifest.count + entries.reduce(0) { $0 + $1.entry.slotBytes }
        let L = ec.chunkBytes
        guard total <= L * ec.layout.k else {
            logger.error("image of \(total) bytes exceeds k × chunk (\(ec.layout.k) × \(L)); waiting for a larger layout")
            ec.outgoing = nil
            return
        }
        ec.outgoing!.manifest.withUnsafeBytes { mp in
            for c in 0..<ec.layout.k {
                let (row, dataIndex) = ec.placement.place(chunk: c, of: ec.position)
                let range = (c * L)..<min((c + 1) * L, total)
                let pieces = range.isEmpty ? [] : imagePieces(manifest: manifest, entries: entries, range: range, manifestPointer: mp.baseAddress!)
                var crc: UInt32 = 0
                for p in pieces { crc = checksumResponsively(p, continuing: crc) }
                for holder in ec.placement.parityHolders(row: row) {
                    let node = ec.members[holder]
                    if holder == ec.position {
                        fold(step: step, row: row, dataIndex: dataIndex, pieces: pieces)
                        continue
                    }
                    pending.insert("\(row)/\(dataIndex)/\(node)")
                    if let killStep = faultKillDuringECStep, step >= killStep, pending.count >= 2 {
                        // Test fault injection: die with the round half sent.
                        logger.warning("fault injection: SIGKILL during the EC round of step \(step)")
                        kill(getpid(), SIGKILL)
                    }
                    let header = SMPMessage.ecChunk(step: step, row: row, dataIndex: dataIndex, crc: crc).envelope(sender: config.nodeID).encoded()
                    // The slots stay staged, unmodified, until this round commits or aborts,
                    // which needs the holders' acks: the bytes can go without a copy.
                    let frames = [ZMQFrame.bytes(header)] + pieces.map { ZMQFrame.noCopy($0, release: {}) }
                    do {
                        try peer(node, ec).send(frames.isEmpty ? [.bytes(header)] : frames)
                    } catch {
                        logger.warning("EC chunk for \(node) not sent: \(error)")
                    }
                }
            }
        }
        ec.outgoing!.pending = pending
        checkProtected(step: step)
    }

    func peer(_ node: String, _ ec: ErasureState) throws -> ZMQSocket {
        if let s = ec.peers[node] { return s }
        guard let endpoint = ec.layout.endpoints[node] else { throw SMPError("no data endpoint for \(node)") }
        let s = try context.socket(.dealer)
        try s.setLinger(milliseconds: 0)
        try s.setSendHighWaterMark(0)
        try s.connect(endpoint)
        ec.peers[node] = s
        return s
    }

    /// Folds the pieces of one data chunk into this node's parity of `row`.
    @discardableResult
    func fold(step: Int, row: Int, dataIndex: Int, pieces: [UnsafeRawBufferPointer]) -> String {
        guard let ec = erasure else { return ErasureState.noLayout }
        if ec.folded[step]?[row]?.contains(dataIndex) == true { return "" }  // a duplicate: folding twice would cancel it
        guard let buffer = ec.parityBuffer(step: step, row: row), let index = ec.parity[step]?[row]?.index else {
            return "node \(config.nodeID) holds no parity of row \(row)"
        }
        var offset = 0
        let started = monotonicSeconds()
        defer {
            let s = ec.foldStats[step] ?? (0, 0)
            ec.foldStats[step] = (s.bytes + offset, s.seconds + monotonicSeconds() - started)
        }
        for p in pieces {
            guard offset + p.count <= buffer.count else { return "chunk longer than \(buffer.count) bytes" }
            // In 64 MiB pieces, heartbeating between them: a holder may fold a
            // gigabyte, and the coordinator must not take it for dead meanwhile.
            var done = 0
            while done < p.count {
                let n = min(64 << 20, p.count - done)
                do {
                    try ec.codec.update(parityRow: index, dataIndex: dataIndex,
                                        chunk: UnsafeRawBufferPointer(rebasing: p[done..<done + n]),
                                        parity: UnsafeMutableRawBufferPointer(rebasing: buffer[offset + done..<offset + done + n]))
                } catch {
                    return "\(error)"
                }
                done += n
                keepAlive()
            }
            offset += p.count
        }
        ec.folded[step, default: [:]][row, default: []].insert(dataIndex)
        return ""
    }

    /// A peer's data chunk arrived: check it, fold it, acknowledge.
    func receiveChunk(step: Int, row: Int, dataIndex: Int, crc: UInt32, frames: ArraySlice<ZMQMessage>) -> SMPMessage {
        var actual: UInt32 = 0
        for f in frames { f.withUnsafeBytes { actual = checksumResponsively($0, continuing: actual) } }
        guard actual == crc else {
            return .ecAck(step: step, row: row, dataIndex: dataIndex, error: "chunk CRC32C mismatch in transfer")
        }
        if let c = store.committedStep, step <= c, erasure?.folded[step]?[row]?.contains(dataIndex) != true {
            return .ecAck(step: step, row: row, dataIndex: dataIndex, error: "step \(step) is not newer than the committed \(c)")
        }
        var pieces: [UnsafeRawBufferPointer] = []
        var keep: [ZMQMessage] = []
        for f in frames { keep.append(f); f.withUnsafeBytes { pieces.append($0) } }
        let error = withExtendedLifetime(keep) { fold(step: step, row: row, dataIndex: dataIndex, pieces: pieces) }
        if error.isEmpty { checkProtected(step: step) }
        return .ecAck(step: step, row: row, dataIndex: dataIndex, error: error)
    }

    /// Acks from the holders of our chunks (and a pending resend).
    func drainPeerAcks() {
        guard let ec = erasure else { return }
        if let at = ec.resendAt, monotonicSeconds() >= at {
            ec.resendAt = nil
            if let step = ec.outgoing?.step { startProtecting(step: step) }
        }
        for (node, socket) in ec.peers {
            while let frames = try? socket.receiveNow() {
                guard let first = frames.first, let (message, _) = try? SMPMessage.decode(first),
                      case .ecAck(let step, let row, let index, let error) = message else { continue }
                guard error.isEmpty else {
                    logger.warning("\(node) refused chunk \(row)/\(index) of step \(step): \(error)")
                    if error == ErasureState.noLayout, ec.outgoing?.step == step {
                        // It has not got the layout yet: send the round again shortly
                        // (holders ignore the chunks they already folded).
                        ec.resendAt = monotonicSeconds() + 0.1
                    }
                    continue
                }
                if ec.outgoing?.step == step {
                    ec.outgoing!.pending.remove("\(row)/\(index)/\(node)")
                    checkProtected(step: step)
                }
            }
        }
    }

    /// protected(s): our chunks are at their holders and our parity of s is complete.
    func checkProtected(step: Int) {
        guard let ec = erasure, let o = ec.outgoing, o.step == step, o.pending.isEmpty, ec.parityComplete(step: step) else { return }
        ec.outgoing = nil
        link?.send(.protected(step: step))
    }

    // MARK: serving repairs

    /// Codeword index `index` of `row` for `step`, as this node holds it.
    func chunkBytes(step: Int, row: Int, index: Int) throws -> [UInt8] {
        guard let ec = erasure else { throw SMPError("no EC layout") }
        let holder = ec.placement.position(ofCodewordIndex: index, row: row)
        guard holder == ec.position else { throw SMPError("codeword index \(index) of row \(row) is not on \(config.nodeID)") }
        if index >= ec.layout.k {
            guard let p = ec.parity[step]?[row], ec.folded[step]?[row]?.count == ec.layout.k else {
                throw SMPError("no complete parity of row \(row) for step \(step) on \(config.nodeID)")
            }
            return Array(p.bytes)
        }
        guard let entries = imageEntries(step: step, committedOnly: false) else {
            throw SMPError("\(config.nodeID) does not hold step \(step)")
        }
        let manifest = NodeImage(step: step, entries: entries.map(\.entry)).manifest()
        let c = ec.placement.dataRows(of: ec.position).firstIndex(of: row)!
        let total = manifest.count + entries.reduce(0) { $0 + $1.entry.slotBytes }
        let L = ec.chunkBytes
        var out = [UInt8](repeating: 0, count: L)
        let range = (c * L)..<min((c + 1) * L, total)
        if !range.isEmpty {
            manifest.withUnsafeBytes { mp in
                var at = 0
                for p in imagePieces(manifest: manifest, entries: entries, range: range, manifestPointer: mp.baseAddress!) {
                    out.withUnsafeMutableBytes { o in _ = memcpy(o.baseAddress! + at, p.baseAddress!, p.count) }
                    at += p.count
                }
            }
        }
        return out
    }

    // MARK: rebuilding

    /// Fetches the chunks of `row` that survive (any k, not from `lost` nodes)
    /// and reconstructs the whole codeword.
    func reconstructRow(step: Int, row: Int, lost: Set<String>, exclude: Set<Int> = []) throws -> [[UInt8]] {
        guard let ec = erasure else { throw SMPError("no EC layout") }
        let n = ec.placement.n, k = ec.layout.k, L = ec.chunkBytes
        var chunks = [[UInt8]](repeating: [UInt8](repeating: 0, count: L), count: n)
        var have: [Int] = []
        for index in 0..<n where have.count < k && !exclude.contains(index) {
            let node = ec.members[ec.placement.position(ofCodewordIndex: index, row: row)]
            guard !lost.contains(node), node != config.nodeID else { continue }
            keepAlive()
            do {
                let bytes = try fetch(node: node, step: step, row: row, index: index)
                guard bytes.count == L else { throw SMPError("chunk of \(bytes.count) bytes, expected \(L)") }
                chunks[index] = bytes
                have.append(index)
            } catch {
                logger.warning("row \(row) of step \(step): no chunk \(index) from \(node): \(error)")
            }
        }
        guard have.count == k else {
            throw SMPError("row \(row) of step \(step): only \(have.count) of the \(k) chunks needed could be fetched")
        }
        let missing = (0..<n).filter { !have.contains($0) }
        try ec.codec.reconstruct(&chunks, missing: Array(missing.prefix(ec.layout.m)))
        if missing.count > ec.layout.m {
            // More than m not fetched (some merely unused): rebuild the rest from the completed data.
            let data = Array(chunks[0..<k])
            let parity = try ec.codec.encode(data)
            for i in missing.dropFirst(ec.layout.m) where i >= k { chunks[i] = parity[i - k] }
        }
        return chunks
    }

    func fetch(node: String, step: Int, row: Int, index: Int) throws -> [UInt8] {
        guard let ec = erasure, let endpoint = ec.layout.endpoints[node] else { throw SMPError("no endpoint for \(node)") }
        let s = try context.socket(.dealer)
        defer { s.close() }
        try s.setLinger(milliseconds: 0)
        try s.connect(endpoint)
        try s.send([SMPMessage.ecFetch(step: step, row: row, index: index).envelope(sender: config.nodeID).encoded()])
        guard let frames = try s.receiveMessages(timeoutMilliseconds: 2000) else {
            throw SMPError("no answer from \(endpoint) within 2 s")
        }
        let reply = try? SMPMessage.decode(frames[0].bytes).0
        if case .error(_, let message)? = reply { throw SMPError(message) }
        guard frames.count == 2, case .ecChunkData(_, _, _, let crc)? = reply else {
            throw SMPError("unexpected answer from \(endpoint)")
        }
        let bytes = frames[1].bytes
        guard CRC32C.checksum(bytes) == crc else { throw SMPError("chunk \(row)/\(index) from \(node) failed its CRC32C") }
        return bytes
    }

    /// A replacement node: rebuild its image and parity for `step` from the group.
    func rebuild(step: Int?, lost: [String]) -> String {
        guard let step else {
            logger.info("nothing committed: nothing to rebuild")
            return ""
        }
        guard let ec = erasure else { return "no EC layout" }
        let start = monotonicSeconds()
        let L = ec.chunkBytes, k = ec.layout.k
        var image = [UInt8](repeating: 0, count: k * L)
        do {
            for row in 0..<ec.placement.n {
                let codeword = try reconstructRow(step: step, row: row, lost: Set(lost))
                let mine = ec.placement.codewordIndex(of: ec.position, row: row)
                if mine < k {
                    let c = ec.placement.dataRows(of: ec.position).firstIndex(of: row)!
                    image.replaceSubrange(c * L..<(c + 1) * L, with: codeword[mine])
                } else {
                    let buffer = ec.parityBuffer(step: step, row: row)!
                    codeword[mine].withUnsafeBytes { _ = memcpy(buffer.baseAddress!, $0.baseAddress!, L) }
                    ec.folded[step, default: [:]][row] = Set(0..<k)
                }
            }
            // Back from the image to workers' slots.
            let parsed = try image.withUnsafeBytes { try NodeImage.parse($0) }
            guard parsed.step == step else { return "rebuilt image is of step \(parsed.step), not \(step)" }
            var offset = image.withUnsafeBytes { Int($0.load(as: UInt32.self).littleEndian) } + 4
            for e in parsed.entries {
                let id = e.registration.workerID
                if case .new(let bytes) = try store.register(e.registration) {
                    segments[id] = try (0..<2).map { try createSlot(name: segmentName(worker: id, slot: $0), count: bytes) }
                }
                let segment = segments[id]![0]
                guard offset + e.slotBytes <= image.count, segment.count == e.slotBytes else { return "image entry \(id) out of bounds" }
                image.withUnsafeBytes { _ = memcpy(segment.base, $0.baseAddress! + offset, e.slotBytes) }
                let layout = e.registration.layout
                for (i, entry) in layout.entries.enumerated() {
                    for chunk in 0..<entry.chunkCount {
                        let r = layout.chunkRange(entry, chunk: chunk)
                        let actual = CRC32C.checksum(UnsafeRawBufferPointer(start: segment.base + entry.slotOffset + r.lowerBound, count: r.count))
                        guard actual == e.crcs[entry.firstChunk + chunk] else {
                            return "rebuilt worker \(id), tensor \(layout.entries[i].spec.name), chunk \(chunk) fails its CRC32C"
                        }
                    }
                }
                try store.installCommitted(worker: id, step: step, slot: 0, crcs: e.crcs)
                offset += e.slotBytes
            }
            logger.info("rebuilt node \(config.nodeID) for step \(step) from parity",
                        metadata: ["bytes": "\(image.count)", "ms": "\(Int((monotonicSeconds() - start) * 1000))",
                                   "workers": "\(parsed.entries.count)"])
            return ""
        } catch {
            return "\(error)"
        }
    }

    // MARK: corruption is an erasure

    /// Checks a worker's committed slot; a chunk that fails its CRC is rebuilt
    /// from its row's other chunks (as if lost) and written back.
    func verifyAndRepair(worker id: String) throws(StoreError) {
        guard let ec = erasure, let point = try store.restorePoint(worker: id), let w = store.workers[id] else { return }
        let segment = segments[id]![point.slot]
        for entry in w.layout.entries {
            for chunk in 0..<entry.chunkCount {
                let r = w.layout.chunkRange(entry, chunk: chunk)
                let start = entry.slotOffset + r.lowerBound
                guard CRC32C.checksum(UnsafeRawBufferPointer(start: segment.base + start, count: r.count)) != point.crcs[entry.firstChunk + chunk] else { continue }
                logger.warning("worker \(id), tensor \(entry.spec.name), chunk \(chunk) fails its CRC32C; repairing from parity")
                guard let entries = imageEntries(step: point.step, committedOnly: true) else { continue }
                let manifestSize = NodeImage(step: point.step, entries: entries.map(\.entry)).manifest().count
                var base = manifestSize
                for e in entries { if e.id == id { break }; base += e.entry.slotBytes }
                let lo = base + start, hi = lo + r.count
                let L = ec.chunkBytes
                for c in (lo / L)...((hi - 1) / L) {
                    let row = ec.placement.dataRows(of: ec.position)[c]
                    let mine = ec.placement.codewordIndex(of: ec.position, row: row)
                    do {
                        let codeword = try reconstructRow(step: point.step, row: row, lost: [], exclude: [mine])
                        // Write back the part of chunk c that lies in this worker's slot.
                        let chunkLo = c * L
                        let from = max(chunkLo, base), to = min(chunkLo + L, base + w.layout.slotBytes)
                        if from < to {
                            codeword[mine].withUnsafeBytes { src in
                                _ = memcpy(segment.base + (from - base), src.baseAddress! + (from - chunkLo), to - from)
                            }
                        }
                    } catch {
                        throw StoreError(.corrupt, "worker \(id), tensor \(entry.spec.name), chunk \(chunk) fails its CRC32C and repair failed: \(error)")
                    }
                }
                guard CRC32C.checksum(UnsafeRawBufferPointer(start: segment.base + start, count: r.count)) == point.crcs[entry.firstChunk + chunk] else {
                    throw StoreError(.corrupt, "worker \(id), tensor \(entry.spec.name), chunk \(chunk) still fails its CRC32C after repair")
                }
                logger.info("repaired worker \(id), tensor \(entry.spec.name), chunk \(chunk) from parity")
            }
        }
    }
}
