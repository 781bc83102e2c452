/// The erasure-coding round of one SMP, at both ends (ARCHITECTURE.md,
/// "Erasure coding across nodes"): as a *data holder* it sends each of its k
/// data chunks, frame by frame, to its row's parity holders and waits for
/// their acks; as a *parity holder* it folds its peers' frames into its parity
/// of each row it holds, acks a chunk once every frame of it is in, and holds
/// parity for at most `maxParitySteps` steps. `protected(s)` is due when this
/// node's chunks of `s` are acked by every holder and its own parity of `s` is
/// complete.
///
/// A value type: events and `now` in, `Directive`s out. It deals with steps,
/// rows, offsets and lengths; the shell moves the bytes (computes a frame's
/// CRC, sends it zero-copy, folds it with ISA-L, keeps the parity buffers).
///
/// Wire (`SMPMessage`): `ecChunk(step, row, dataIndex, offset, length, crc)`
/// plus the frame's bytes, answered by `ecAck(step, row, dataIndex, error)`:
/// empty once the whole chunk is folded (again for every duplicate frame of
/// a complete chunk, so a resent round is acked), or the reason a frame was
/// refused. The envelope's epoch is the epoch the round was staged in (`Frame.epoch`,
/// also on resends, whatever epoch the sender learned since): a holder refuses a
/// frame of an epoch older than its own (`fenced`), so an SMP that was
/// replaced and comes back (a zombie) folds nothing into anyone's parity, and
/// a round of a voided epoch is never folded into parity of the same step
/// number re-run in the next one.
///
/// Legal transitions: `startRound` (re)starts the outgoing round of a step;
/// acks and frames may arrive in any order, duplicated, or for steps that are
/// gone (ignored or refused); `commit`, `abort` and `restore` drop parity.
public struct ECRoundInstance: Sendable {
    public let k: Int
    public let m: Int
    public let chunkBytes: Int
    public let frameBytes: Int
    /// This node's position in its group, and the group's members by position.
    public let position: Int
    public let members: [String]
    public var placement: ParityPlacement { ParityPlacement(k: k, m: m) }
    public var node: String { members[position] }

    /// Steps parity is held for at once: the committed step's (what a rebuild
    /// decodes from), the round in flight, and the next one, whose chunks can
    /// come from a peer that saw the commit before this node did. A fourth
    /// cannot come: the round after next needs this node's own `protected` of
    /// the next, so it processed that commit first.
    public static let maxParitySteps = 3
    /// How soon a round refused for a transient reason (no layout yet, an old
    /// step's parity not yet dropped) is sent again.
    public static let resendDelay = 0.1
    /// A round not yet protected that got no ack for this long is sent again,
    /// the chunks still owed to the holders that owe them (holders ack what they
    /// folded already and fold what is missing):
    /// a frame or an ack lost with a connection (a peer's socket reconnecting)
    /// would otherwise leave the round pending, and the coordinator aborts a
    /// round only once some node protected it. Found by the data-plane
    /// simulation under the real coordinator.
    public let stallResend: Double

    /// A chunk whose ack is awaited.
    public struct PendingAck: Sendable, Hashable, Comparable {
        public var row: Int
        public var dataIndex: Int
        public var node: String
        public static func < (a: Self, b: Self) -> Bool { (a.row, a.dataIndex, a.node) < (b.row, b.dataIndex, b.node) }
    }

    public struct Outgoing: Sendable, Equatable {
        public var step: Int
        /// The coordinator's epoch when the round was staged.
        public var epoch: UInt64
        public var imageBytes: Int
        public var pending: Set<PendingAck>
        public var resendAt: Double?
        /// When the round is sent again for want of progress (set at the first
        /// tick after a send, pushed back by every ack).
        public var stallAt: Double?
    }

    /// One frame of one data chunk to send: image bytes `imageRange` are the
    /// frame's bytes (empty for an empty chunk: a header alone announces it).
    public struct Frame: Sendable, Equatable {
        public var step: Int
        /// The epoch the round was staged in: the frame's envelope carries it.
        public var epoch: UInt64
        public var row: Int
        public var dataIndex: Int
        public var offset: Int
        /// The whole chunk's byte count.
        public var length: Int
        public var imageRange: Range<Int>
        /// Peers to send it to.
        public var to: [String]
        /// This node's parity index of the row, when it folds the frame itself.
        public var foldLocally: Int?
    }

    public enum Directive: Sendable, Equatable {
        /// Send (and fold locally) one frame of this node's image.
        case send(Frame)
        /// A zeroed parity buffer of `chunkBytes` for this step and row.
        case allocateParity(step: Int, row: Int, parityIndex: Int)
        /// Every parity buffer of the step can go.
        case freeParity(step: Int)
        /// Fold the received frame (its bytes, at `offset` of the chunk) into
        /// the parity of `row` for `step` (codec row `parityIndex`).
        case fold(step: Int, row: Int, parityIndex: Int, dataIndex: Int, offset: Int)
        case ack(to: String, step: Int, row: Int, dataIndex: Int, error: String)
        case protected(step: Int)
        /// A refused frame or ack, a round that cannot be sent: for the log.
        case warning(String)
    }

    public private(set) var outgoing: Outgoing?
    /// Parity held: step -> row -> codec parity index.
    public private(set) var parity: [Int: [Int: Int]] = [:]
    /// Data indexes folded completely, per step and row.
    public private(set) var folded: [Int: [Int: Set<Int>]] = [:]
    public struct ChunkKey: Sendable, Hashable {
        public var step: Int
        public var row: Int
        public var dataIndex: Int
    }
    /// Frames folded so far of chunks not yet complete: offsets and bytes.
    public private(set) var partial: [ChunkKey: (offsets: Set<Int>, bytes: Int)] = [:]
    /// Frames refused, counted (`refused_requests` in the status).
    public private(set) var refusedFrames = 0

    /// `stallResend`: seconds without an ack before the round is sent again.
    public init(k: Int, m: Int, chunkBytes: Int, frameBytes: Int, members: [String], position: Int, stallResend: Double = 10) {
        precondition(members.count == k + m && (0..<k + m).contains(position) && frameBytes > 0 && stallResend > 0)
        self.stallResend = stallResend
        self.k = k
        self.m = m
        self.chunkBytes = chunkBytes
        self.frameBytes = frameBytes
        self.members = members
        self.position = position
    }

    /// Whether every parity chunk this node holds for `step` has all k data chunks folded in.
    public func parityComplete(step: Int) -> Bool {
        placement.parityRows(of: position).allSatisfy { folded[step]?[$0.row]?.count == k }
    }

    /// Whether this node holds the complete parity of `row` for `step`.
    public func holdsCompleteParity(step: Int, row: Int) -> Bool { folded[step]?[row]?.count == k }

    /// Parity chunks held now (each `chunkBytes`).
    public var parityChunksHeld: Int { parity.values.reduce(0) { $0 + $1.count } }

    // MARK: data holder

    /// Every local worker staged `step` in `epoch` (or a resend is due): send
    /// each data chunk of an image of `imageBytes`, frame by frame, to its
    /// row's parity holders, folding locally where this node holds parity itself.
    public mutating func startRound(step: Int, imageBytes: Int, epoch: UInt64) -> [Directive] {
        send(step: step, imageBytes: imageBytes, epoch: epoch, only: nil)
    }

    /// The round's frames; `only`: a resend, of the chunks whose acks are
    /// still awaited, to the holders that owe them (and local folds not done).
    private mutating func send(step: Int, imageBytes: Int, epoch: UInt64, only: Set<PendingAck>?) -> [Directive] {
        guard imageBytes <= chunkBytes * k else {
            outgoing = nil
            return [.warning("image of \(imageBytes) bytes exceeds k × chunk (\(k) × \(chunkBytes)); waiting for a larger layout")]
        }
        var out: [Directive] = []
        var pending = Set<PendingAck>()
        for c in 0..<k {
            let (row, dataIndex) = placement.place(chunk: c, of: position)
            let start = min(c * chunkBytes, imageBytes)  // an empty chunk past the image's end: an empty range at its end
            let length = min(chunkBytes, imageBytes - start)
            let holders = placement.parityHolders(row: row)
            let remote = holders.filter { $0 != position }.map { members[$0] }
                .filter { only?.contains(PendingAck(row: row, dataIndex: dataIndex, node: $0)) ?? true }
            for node in remote { pending.insert(PendingAck(row: row, dataIndex: dataIndex, node: node)) }
            let localIndex = holders.firstIndex(of: position)
            let localDone = localIndex == nil || folded[step]?[row]?.contains(dataIndex) == true
            if only != nil && remote.isEmpty && localDone { continue }  // acked everywhere, folded here
            var offset = 0
            repeat {
                let n = min(frameBytes, length - offset)
                var local: Int?
                if let localIndex, case .fold = admitLocal(step: step, row: row, dataIndex: dataIndex, offset: offset, count: n,
                                                           length: length, parityIndex: localIndex, out: &out) {
                    local = localIndex
                }
                out.append(.send(Frame(step: step, epoch: epoch, row: row, dataIndex: dataIndex, offset: offset, length: length,
                                       imageRange: start + offset..<start + offset + n, to: remote, foldLocally: local)))
                offset += n
            } while offset < length
        }
        outgoing = Outgoing(step: step, epoch: epoch, imageBytes: imageBytes, pending: pending, resendAt: nil, stallAt: nil)
        out += checkProtected(step: step)
        return out
    }

    /// A holder's ack (or refusal) of one of this node's chunks.
    public mutating func onAck(from node: String, step: Int, row: Int, dataIndex: Int, error: String, now: Double) -> [Directive] {
        guard error.isEmpty else {
            let out: [Directive] = [.warning("\(node) refused chunk \(row)/\(dataIndex) of step \(step): \(error)")]
            if Self.isTransient(error), outgoing?.step == step, outgoing?.resendAt == nil {
                // It has not got the layout yet, or not yet dropped an old step's parity:
                // send the round again shortly (holders ignore the frames they already folded).
                outgoing!.resendAt = now + Self.resendDelay
            }
            return out
        }
        guard outgoing?.step == step else { return [] }
        outgoing!.pending.remove(PendingAck(row: row, dataIndex: dataIndex, node: node))
        outgoing!.stallAt = now + stallResend
        return checkProtected(step: step)
    }

    /// The error texts a holder answers that are worth a resend.
    public static let noLayout = "no EC layout"
    static func isTransient(_ error: String) -> Bool {
        error == noLayout || error.hasPrefix(StoreError.Code.unexpectedRound.rawValue)
    }

    /// When the next resend is due (for the shell's poll timeout).
    public var wakeAt: Double? { [outgoing?.resendAt, outgoing?.stallAt].compactMap { $0 }.min() }

    /// Time passes: a due resend (transient refusal, or no ack for
    /// `stallResend` seconds) sends the round again.
    public mutating func tick(now: Double) -> [Directive] {
        guard let o = outgoing else { return [] }
        let stall = o.stallAt ?? now + stallResend  // set at the first tick after a send
        outgoing!.stallAt = stall
        guard now >= stall || o.resendAt.map({ now >= $0 }) == true else { return [] }
        // Only what is owed: a chunk every holder acked is not sent again (a whole-round
        // resend doubled a slow round's traffic).
        return send(step: o.step, imageBytes: o.imageBytes, epoch: o.epoch, only: o.pending)
    }

    private mutating func checkProtected(step: Int) -> [Directive] {
        guard let o = outgoing, o.step == step, o.pending.isEmpty, parityComplete(step: step) else { return [] }
        outgoing = nil
        return [.protected(step: step)]
    }

    // MARK: parity holder

    private enum LocalAdmission { case fold, skip }

    /// A local frame: folded unless it already is (folding twice would cancel it).
    private mutating func admitLocal(step: Int, row: Int, dataIndex: Int, offset: Int, count: Int, length: Int, parityIndex: Int,
                                     out: inout [Directive]) -> LocalAdmission {
        if folded[step]?[row]?.contains(dataIndex) == true { return .skip }
        let key = ChunkKey(step: step, row: row, dataIndex: dataIndex)
        if partial[key]?.offsets.contains(offset) == true { return .skip }
        if parity[step]?[row] == nil {
            parity[step, default: [:]][row] = parityIndex
            out.append(.allocateParity(step: step, row: row, parityIndex: parityIndex))
        }
        record(key, offset: offset, count: count, length: length)
        return .fold
    }

    private mutating func record(_ key: ChunkKey, offset: Int, count: Int, length: Int) {
        var state = partial[key] ?? ([], 0)
        state.offsets.insert(offset)
        state.bytes += count
        if state.bytes >= length {
            partial[key] = nil
            folded[key.step, default: [:]][key.row, default: []].insert(key.dataIndex)
        } else {
            partial[key] = state
        }
    }

    /// A peer's frame of a data chunk: `frameBytes` bytes at `offset` of a
    /// chunk of `length`; `crcMatches` whether they match the header's CRC;
    /// `epoch` the sender's, `ownEpoch` this node's; `committedStep` this
    /// node's committed step. Folds it (the shell folds the bytes on `.fold`),
    /// acks a complete chunk, refuses a bad frame with its reason.
    public mutating func onChunkFrame(from sender: String, epoch: UInt64, ownEpoch: UInt64, step: Int, row: Int, dataIndex: Int,
                                      offset: Int, length: Int, frameBytes: Int, crcMatches: Bool,
                                      committedStep: Int?) -> [Directive] {
        func refuse(_ error: String, counted: Bool = true) -> [Directive] {
            if counted { refusedFrames += 1 }
            return [.warning("refused an EC chunk frame from \(sender): \(error)"),
                    .ack(to: sender, step: step, row: row, dataIndex: dataIndex, error: error)]
        }
        let layout = ECLayout(k: k, m: m, chunkBytes: chunkBytes, groups: [members], endpoints: [:])
        do throws(StoreError) {
            try layout.checkChunkFrame(position: position, step: step, row: row, dataIndex: dataIndex, offset: offset, length: length,
                                       frameBytes: frameBytes)
        } catch {
            return refuse("\(error)")
        }
        guard epoch >= ownEpoch else {
            return refuse("\(StoreError.Code.fenced.rawValue): a frame of epoch \(epoch), this node is in epoch \(ownEpoch)")
        }
        guard crcMatches else { return refuse("frame at \(offset): CRC32C mismatch in transfer", counted: false) }
        let complete = folded[step]?[row]?.contains(dataIndex) == true
        if complete {
            return [.ack(to: sender, step: step, row: row, dataIndex: dataIndex, error: "")] + checkOwn(step)
        }
        if let c = committedStep, step <= c {
            return refuse("step \(step) is not newer than the committed \(c)", counted: false)
        }
        var out: [Directive] = []
        if parity[step] == nil {
            do throws(StoreError) {
                if case .replace(let highest) = try ParitySteps.admit(step, held: parity.keys, limit: Self.maxParitySteps) {
                    out.append(.warning("dropped the parity of step \(highest) for a chunk of the earlier step \(step)"))
                    out += drop { $0 == highest }
                }
            } catch {
                return refuse("\(error)")
            }
        }
        let key = ChunkKey(step: step, row: row, dataIndex: dataIndex)
        if partial[key]?.offsets.contains(offset) == true { return out }  // a duplicate frame: no reply
        let parityIndex = placement.parityHolders(row: row).firstIndex(of: position)!
        if parity[step]?[row] == nil {
            parity[step, default: [:]][row] = parityIndex
            out.append(.allocateParity(step: step, row: row, parityIndex: parityIndex))
        }
        out.append(.fold(step: step, row: row, parityIndex: parityIndex, dataIndex: dataIndex, offset: offset))
        record(key, offset: offset, count: frameBytes, length: length)
        guard folded[step]?[row]?.contains(dataIndex) == true else { return out }
        return out + [.ack(to: sender, step: step, row: row, dataIndex: dataIndex, error: "")] + checkOwn(step)
    }

    private mutating func checkOwn(_ step: Int) -> [Directive] { checkProtected(step: step) }

    /// The coordinator committed `step`: older parity goes.
    public mutating func commit(step: Int) -> [Directive] { drop { $0 < step } }

    /// The round of `step` was aborted.
    public mutating func abort(step: Int) -> [Directive] { drop { $0 == step } }

    /// Recovery restores `step`: every other step's parity goes (any round in flight is void).
    public mutating func restore(step: Int?) -> [Directive] { drop { $0 != step } }

    /// A rebuild decoded this node's parity of `step` for every row it holds.
    public mutating func installRebuiltParity(step: Int) {
        for (row, index) in placement.parityRows(of: position) {
            parity[step, default: [:]][row] = index
            folded[step, default: [:]][row] = Set(0..<k)
        }
    }

    /// A rebuild will decode parity of `row` for `step` (its buffer, zeroed).
    public mutating func reserveParity(step: Int, row: Int) -> [Directive] {
        guard parity[step]?[row] == nil, let index = placement.parityHolders(row: row).firstIndex(of: position) else { return [] }
        parity[step, default: [:]][row] = index
        return [.allocateParity(step: step, row: row, parityIndex: index)]
    }

    /// Drops the parity (and the outgoing round) of the steps `reject` names.
    public mutating func drop(where reject: (Int) -> Bool) -> [Directive] {
        var out: [Directive] = []
        for step in parity.keys.sorted() where reject(step) {
            parity[step] = nil
            out.append(.freeParity(step: step))
        }
        for step in folded.keys where reject(step) { folded[step] = nil }
        partial = partial.filter { !reject($0.key.step) }
        if let o = outgoing, reject(o.step) { outgoing = nil }
        return out
    }
}
