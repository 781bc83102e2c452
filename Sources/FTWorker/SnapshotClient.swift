import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation

/// A failure seen by the worker library: a stable code, a sentence naming the
/// worker (and for corruption the tensor and chunk), and the cause.
public struct SnapshotError: CodedError {
    public enum Code: String, Sendable {
        /// The SMP refused a request; `smpCode` holds its `StoreError` code.
        case refused
        /// A chunk's bytes do not match their CRC32C.
        case corrupt
        /// No reply from the SMP in time.
        case timeout
        /// A transport or shared-memory failure.
        case transport
        /// The API was used out of order (e.g. snapshot before register).
        case misuse
        /// Given up on request (a restore the coordinator superseded).
        case interrupted
    }

    public var code: Code
    public var message: String
    /// For `.refused`: the SMP's error code.
    public var smpCode: String?
    /// For `.corrupt`: where.
    public var corruption: Corruption?

    public struct Corruption: Sendable, Equatable {
        public var worker: String
        public var tensor: String
        public var chunk: Int
        public var expected: UInt32
        public var actual: UInt32
    }

    public var description: String { "\(code.rawValue): \(message)" }

    public init(code: Code, message: String, smpCode: String? = nil, corruption: Corruption? = nil) {
        self.code = code
        self.message = message
        self.smpCode = smpCode
        self.corruption = corruption
    }
}

/// One tensor the training loop owns, registered for snapshots.
public struct RegisteredTensor: @unchecked Sendable {
    public var spec: TensorSpec
    /// The live bytes; must be `spec.byteCount` long and stay valid. Empty
    /// for an external tensor.
    public var buffer: UnsafeMutableRawBufferPointer
    /// The caller copies this tensor's stored bytes into the slot itself
    /// (device memory the library cannot read, e.g. a CUDA tensor copied
    /// device-to-host straight into the slot), and says when they landed
    /// (`SnapshotClient.externalCopiesLanded`); the library checksums them
    /// there. A restore writes it into the buffer given by `setRestoreBuffer`.
    public var external: Bool

    public init(spec: TensorSpec, buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count == spec.byteCount, "buffer of \(buffer.count) bytes for \(spec.name) of \(spec.byteCount) bytes")
        self.spec = spec
        self.buffer = buffer
        external = false
    }

    /// A tensor whose bytes the caller copies into the slot (see `external`).
    public init(externalSpec spec: TensorSpec) {
        self.spec = spec
        buffer = UnsafeMutableRawBufferPointer(start: nil, count: 0)
        external = true
    }
}

/// Where this worker's SMP is and who the worker is; read from the
/// environment the SMP spawns workers with.
public struct WorkerIdentity: Sendable {
    public var jobID: String
    public var workerID: String
    public var dpRank: Int
    public var dpSize: Int
    public var smpEndpoint: String
    /// How many times the SMP restarted this worker before (0 on first start).
    public var restartCount: Int
    /// The job's key directory (FT_KEYS_DIR): slices fetched from SMP data
    /// endpoints on TCP go over CURVE with `worker.key` (`DataPlaneKeys`).
    public var keysDirectory: String?

    public init(jobID: String, workerID: String, dpRank: Int, dpSize: Int, smpEndpoint: String, restartCount: Int = 0,
                keysDirectory: String? = nil) {
        self.jobID = jobID
        self.workerID = workerID
        self.dpRank = dpRank
        self.dpSize = dpSize
        self.smpEndpoint = smpEndpoint
        self.restartCount = restartCount
        self.keysDirectory = keysDirectory
    }

    public static let environmentKeys = ["FT_JOB_ID", "FT_WORKER_ID", "FT_DP_RANK", "FT_DP_SIZE", "FT_SMP_ENDPOINT"]

    /// From FT_JOB_ID, FT_WORKER_ID, FT_DP_RANK, FT_DP_SIZE, FT_SMP_ENDPOINT,
    /// FT_RESTART_COUNT and FT_KEYS_DIR; nil with the missing names when not under an SMP.
    public static func fromEnvironment(_ env: [String: String] = ProcessInfo.processInfo.environment) -> Result<WorkerIdentity, SnapshotError> {
        let missing = environmentKeys.filter { env[$0] == nil }
        guard missing.isEmpty, let rank = Int(env["FT_DP_RANK"]!), let size = Int(env["FT_DP_SIZE"]!) else {
            return .failure(SnapshotError(code: .misuse, message: "not started by ft-smp: missing or invalid \(missing.isEmpty ? "FT_DP_RANK/FT_DP_SIZE" : missing.joined(separator: ", "))"))
        }
        return .success(WorkerIdentity(jobID: env["FT_JOB_ID"]!, workerID: env["FT_WORKER_ID"]!, dpRank: rank, dpSize: size,
                                       smpEndpoint: env["FT_SMP_ENDPOINT"]!, restartCount: Int(env["FT_RESTART_COUNT"] ?? "0") ?? 0,
                                       keysDirectory: env["FT_KEYS_DIR"]))
    }
}

/// The worker side of the snapshot path (ARCHITECTURE.md, "Snapshot path").
///
/// `register` once; after each optimizer update call `snapshot(step:)`, which
/// returns at once: a background thread asks the SMP for the free slot, copies
/// every tensor's stored bytes into it (CRC32C per chunk, computed on the bytes
/// just written while they are in cache), then reports `staged`. Before the
/// next optimizer update call `waitBeforeUpdate(touching:)`: it blocks only
/// while a tensor the update will overwrite has not been copied yet. If the SMP
/// says the previous round has not committed, the snapshot is skipped and
/// counted instead of blocking. `restore()` reads the committed slot, checks
/// every chunk's CRC, gathers the other DP ranks' slices of replicated
/// tensors from the SMP, and returns the step restored.
///
/// Thread-safety: call it from the training thread; the copy runs on the
/// library's own thread, which ends when the client is released.
public final class SnapshotClient: @unchecked Sendable {
    let engine: SnapshotEngine

    public init(identity: WorkerIdentity, chunkBytes: Int = ShardLayout.defaultChunkBytes,
                requestTimeoutMilliseconds: Int = 30_000) throws {
        engine = try SnapshotEngine(identity: identity, chunkBytes: chunkBytes, requestTimeoutMilliseconds: requestTimeoutMilliseconds)
    }

    deinit { engine.shutdown() }

    public typealias Stats = SnapshotStats

    public var identity: WorkerIdentity { engine.identity }
    public var stats: Stats { engine.stats }

    /// Test-only fault injection: the copier kills its own process with
    /// SIGKILL halfway through copying the first snapshot at or after this step.
    public var killMidCopyAtStep: Int? {
        get { engine.killMidCopyAtStep }
        set { engine.killMidCopyAtStep = newValue }
    }

    /// Registers the tensors with the SMP and maps the two slots. Returns the
    /// step the SMP holds committed for this worker (after a restart), if any.
    @discardableResult
    public func register(_ tensors: [RegisteredTensor]) throws -> Int? { try engine.register(tensors) }

    /// Starts the snapshot of `step` and returns at once. If the previous
    /// round is still finishing (its `staged` reply outstanding), waits for it.
    public func snapshot(step: Int) throws { try engine.snapshot(step: step) }

    /// Blocks while any tensor in `names` (all tensors when nil) has not been
    /// copied by the round in flight. Call it before the optimizer update.
    /// Rethrows a failure of the round.
    public func waitBeforeUpdate(touching names: [String]? = nil) throws { try engine.waitBeforeUpdate(touching: names) }

    /// The same for the first `count` registered tensors (registration order).
    public func waitCopied(count: Int) throws { try engine.waitCopied(count: count) }

    /// Blocks until the round in flight is over (staged reply received or
    /// skipped). For tests, benchmarks and a clean shutdown.
    public func waitForRound() throws { try engine.waitForRound() }

    /// Restores every registered tensor from the SMP's committed snapshot and
    /// returns its step, or nil when nothing is committed (a fresh start).
    /// Every chunk's CRC is checked; a mismatch throws `.corrupt` naming the
    /// worker, tensor and chunk, and leaves the tensors partly written.
    public func restore() throws -> Int? { try engine.restore(expecting: nil, sources: []) }

    /// Restores exactly `step`, as the coordinator decided; `sources[r]` is
    /// the data endpoint of the SMP holding rank r's slices (empty: all local).
    /// Throws if the node cannot give back that step.
    ///
    /// `abandon` is asked while a peer's answer is awaited: when it says yes
    /// (the coordinator moved on, e.g. a source died), the restore stops at
    /// once with `.interrupted` instead of waiting out the peer timeout.
    ///
    /// `liveStateIs: step` says the registered tensors in memory hold exactly
    /// what the snapshot of `step` copied (this worker took that snapshot, or
    /// restored it, and has changed nothing since: a step abandoned before its
    /// update). Then nothing is copied: every chunk of this rank's own slot is
    /// checksummed in place against the committed CRCs, and only if one
    /// differs (or a tensor is external) is the whole restore done. A survivor
    /// of a failure thus rejoins in milliseconds instead of moving its whole
    /// state, and the replaced workers have the sources to themselves.
    public func restore(step: Int, sources: [String], liveStateIs live: Int? = nil,
                        abandon: @escaping () -> Bool = { false }) throws {
        engine.abandonRestore = abandon
        defer { engine.abandonRestore = { false } }
        let restored = try engine.restore(expecting: step, sources: sources, keepLive: live == step)
        guard restored == step else {
            throw SnapshotError(code: .refused, message: "restored \(restored.map(String.init) ?? "nothing"), the coordinator asked for step \(step)")
        }
    }

    /// Whether a snapshot can start now: no copy of ours in flight and no
    /// round pending (staged, not committed) on our node. Data-parallel ranks
    /// agree on it collectively before they snapshot, so all or none do.
    public func canSnapshot() throws -> Bool { try engine.canSnapshot() }

    /// Whether a snapshot can start now for a worker whose last snapshot (or
    /// restore) was `previous`: no copy of ours in flight, and `previous`
    /// committed on our node or no round pending there. A round of the step
    /// about to be taken, staged already by a faster rank of the node, does
    /// not count: ranks that wait for their previous round need no barrier.
    public func canSnapshot(after previous: Int?) throws -> Bool { try engine.canSnapshot(after: previous) }

    // MARK: external tensors (the caller copies them into the slot)

    /// The shared-memory slot `index` (0 or 1) as mapped here, for a caller
    /// that copies external tensors into it (and may pin it for DMA).
    public func slot(_ index: Int) throws -> UnsafeMutableRawBufferPointer { try engine.slot(index) }

    /// Where registered tensor `index`'s stored bytes go in a slot, and which
    /// bytes of the tensor they are (a replicated tensor stores its DP slice).
    public func placement(ofTensor index: Int) throws -> (slotOffset: Int, sourceRange: Range<Int>) {
        try engine.placement(ofTensor: index)
    }

    /// Blocks until the round in flight knows its slot; nil when there is no
    /// round in flight or the SMP skipped it (nothing to copy).
    public func roundSlot() throws -> Int? { try engine.roundSlot() }

    /// The caller's copies of the external tensors of the round in flight
    /// have landed in its slot (`ok`), or failed (the round fails).
    public func externalCopiesLanded(ok: Bool = true) { engine.externalCopiesLanded(ok: ok) }

    /// Where the next restore writes external tensor `index` (nil: nowhere yet).
    public func setRestoreBuffer(_ buffer: UnsafeMutableRawBufferPointer?, forTensor index: Int) throws {
        try engine.setRestoreBuffer(buffer, forTensor: index)
    }

    /// The step this worker's node holds committed (nil: none), as its SMP says.
    public func committedStepOnSMP() throws -> Int? {
        let (reply, _) = try engine.request(.roundQuery)
        guard case .roundReply(let committed, _) = reply else {
            throw SnapshotError(code: .transport, message: "unexpected reply to a round query: \(reply)")
        }
        return committed
    }

    func request(_ message: SMPMessage) throws -> (SMPMessage, [ZMQMessage]) { try engine.request(message) }

    /// Replies from SMPs dropped because they answered an earlier request (one given up on).
    public var staleReplies: Int { engine.staleReplyCount }
}

/// Counters of one worker's snapshot path.
public struct SnapshotStats: Sendable, Equatable {
    public var snapshotsStaged = 0
    public var snapshotsSkipped = 0
    public var lastCommittedStep: Int?
    /// Seconds the training thread spent in `waitBeforeUpdate` and `snapshot`.
    public var blockedSeconds = 0.0
    /// Seconds the last copy took (begin to staged reply).
    public var lastRoundSeconds = 0.0
    /// How the last restore went.
    public var lastRestore: RestoreTiming?
}

/// What a restore moved and how long it took: this worker's own slot, then
/// the other ranks' slices of replicated tensors.
public struct RestoreTiming: Sendable, Equatable, CustomStringConvertible {
    public var ownBytes: Int
    public var ownSeconds: Double
    public var sliceBytes: Int
    public var sliceSeconds: Double
    /// SMPs the slices came from.
    public var sources: Int
    /// Bytes of this rank's own slot found already in the live tensors and
    /// checked in place instead of copied (`restore(step:sources:liveStateIs:)`).
    public var keptBytes: Int = 0

    public var description: String {
        func mib(_ b: Int) -> String { String(format: "%.1f MiB", Double(b) / 1_048_576) }
        if keptBytes > 0 {
            return "live state kept: own slot \(mib(keptBytes)) checked in place in \(Int(ownSeconds * 1000)) ms"
        }
        return "own slot \(mib(ownBytes)) in \(Int(ownSeconds * 1000)) ms, slices \(mib(sliceBytes)) from \(sources) SMPs in \(Int(sliceSeconds * 1000)) ms"
    }
}

/// The state and the copier thread behind a `SnapshotClient`. The thread
/// holds the engine; `shutdown()` ends the thread, which releases it.
final class SnapshotEngine: @unchecked Sendable {
    typealias Stats = SnapshotStats

    /// Test-only fault injection: the copier kills its own process with
    /// SIGKILL halfway through copying the first snapshot at or after this step.
    public var killMidCopyAtStep: Int?

    public let identity: WorkerIdentity
    /// Asked while a peer's slice is awaited during a restore (see `SnapshotClient.restore(step:sources:abandon:)`).
    var abandonRestore: () -> Bool = { false }
    private let context: ZMQContext
    /// The DEALER to this worker's SMP (replaced when a reply may be left in flight on it).
    private var socket: ZMQSocket
    private let rpcLock = NSLock()
    private var peers: [String: ZMQSocket] = [:]
    /// The id of the last request sent (under `rpcLock`); a reply carries its request's id.
    private var lastRequestID: UInt64 = 0
    /// Replies dropped because they answered an earlier request (given up on).
    private var staleReplies = 0
    var staleReplyCount: Int {
        rpcLock.lock()
        defer { rpcLock.unlock() }
        return staleReplies
    }

    private func nextRequestID() -> UInt64 {
        lastRequestID &+= 1
        if lastRequestID == 0 { lastRequestID = 1 }
        return lastRequestID
    }
    private let requestTimeoutMilliseconds: Int
    private let chunkBytes: Int
    /// The largest frame this worker's sockets accept (`ZMQ_MAXMSGSIZE`): an
    /// SMP envelope, and once registered the largest slice of a replicated
    /// tensor any rank stores (a slice reply carries one in a single frame).
    private var maxFrameBytes = SMPMessage.maxFrameBytes(bulkFrameBytes: 0)

    private var tensors: [RegisteredTensor] = []
    private var layout: ShardLayout?
    private var slots: [SharedMemorySegment] = []
    /// Where a restore writes each external tensor (by registration index).
    private var restoreBuffers: [Int: UnsafeMutableRawBufferPointer] = [:]

    // Copier state, guarded by `condition`.
    private let condition = NSCondition()
    private var pendingStep: Int?
    private var roundActive = false
    /// Tensors (in layout order) whose bytes are safely in the slot (or
    /// skipped); the copier steps over external tensors.
    private var copiedCount = 0
    /// The slot of the round in flight once the SMP said which (nil: not yet,
    /// or skipped: `roundSlotKnown` tells).
    private var currentSlot: Int?
    private var roundSlotKnown = false
    /// The caller's copies of external tensors landed in the round's slot.
    private var externalLanded = false
    private var externalFailed = false
    private var roundError: SnapshotError?
    private var stopping = false
    private var _stats = Stats()
    private var copier: Thread?
    /// Set when a restore starts: the background pre-fault of the tensors
    /// begun at `register` stops there (the restore's writes fault the rest).
    private let prefaultStop = Locked(false)
    /// Tensors smaller than this in all are not pre-faulted (see `register`).
    static let prefaultMinimumBytes = 16 << 20
    private var loadedDataKeys: DataPlaneKeys?

    /// Copy granularity: small enough that the CRC reads the bytes back from L2.
    static let copyPiece = 256 << 10

    public init(identity: WorkerIdentity, chunkBytes: Int = ShardLayout.defaultChunkBytes,
                requestTimeoutMilliseconds: Int = 30_000) throws {
        self.identity = identity
        self.chunkBytes = chunkBytes
        self.requestTimeoutMilliseconds = requestTimeoutMilliseconds
        context = try ZMQContext()
        socket = try context.socket(.dealer, maxMessageBytes: maxFrameBytes)
        try socket.setLinger(milliseconds: 0)
        try socket.boundBulkReceives()
        try socket.connect(identity.smpEndpoint)
    }

    /// The largest slice of a replicated tensor that any rank of `dpSize` stores:
    /// ceil(elements / dpSize) elements (slices are cut on element boundaries).
    static func largestSlice(_ specs: [TensorSpec], dpSize: Int) -> Int {
        specs.filter(\.replicated).map { ($0.elementCount + dpSize - 1) / dpSize * $0.dtype.size }.max() ?? 0
    }

    deinit {
        for p in peers.values { p.close() }
        socket.close()
    }

    func shutdown() {
        condition.lock()
        stopping = true
        condition.broadcast()
        condition.unlock()
    }

    public var stats: Stats {
        condition.lock()
        defer { condition.unlock() }
        return _stats
    }

    // MARK: register

    /// Registers the tensors with the SMP and maps the two slots. Returns the
    /// step the SMP holds committed for this worker (after a restart), if any.
    @discardableResult
    public func register(_ tensors: [RegisteredTensor]) throws -> Int? {
        guard layout == nil else { throw SnapshotError(code: .misuse, message: "register called twice") }
        let registration = WorkerRegistration(workerID: identity.workerID, dpRank: identity.dpRank, dpSize: identity.dpSize,
                                              chunkBytes: chunkBytes, specs: tensors.map(\.spec))
        // A new process's tensors are mostly fresh memory that its first restore
        // writes at full speed: fault their pages in meanwhile (a replacement's SMP
        // answers the registration only once it has rebuilt the node), never
        // reading or writing a byte of them.
        let fresh = tensors.filter { !$0.external && $0.buffer.count > 0 }
        if fresh.reduce(0, { $0 + $1.buffer.count }) >= Self.prefaultMinimumBytes {
            let stop = prefaultStop
            let thread = Thread { for t in fresh where !stop.get() { populateForWrite(t.buffer, stop: { stop.get() }) } }
            thread.name = "ft-prefault"
            thread.start()
        }
        let (reply, _) = try request(.register(registration))
        guard case .registered(let names, let slotBytes, let committed) = reply, names.count == 2 else {
            throw unexpected(reply, "register")
        }
        let layout = registration.layout
        guard slotBytes == layout.slotBytes else {
            throw SnapshotError(code: .refused, message: "SMP slot size \(slotBytes) differs from the layout's \(layout.slotBytes)")
        }
        do {
            slots = try names.map { try SharedMemorySegment.open(name: $0, count: slotBytes, writable: true, prefault: true) }
        } catch {
            throw SnapshotError(code: .transport, message: "mapping the snapshot slots: \(error)")
        }
        self.tensors = tensors
        self.layout = layout
        // Slice replies carry a whole slice in one frame: admit the largest one from now on.
        maxFrameBytes = SMPMessage.maxFrameBytes(bulkFrameBytes: Self.largestSlice(registration.specs, dpSize: identity.dpSize))
        rpcLock.lock()
        resetLocalSocket()
        rpcLock.unlock()
        condition.lock()
        _stats.lastCommittedStep = committed
        condition.unlock()
        let thread = Thread { self.copierLoop() }
        thread.name = "ft-snapshot-copier"
        thread.start()
        copier = thread
        return committed
    }

    // MARK: snapshot path

    /// Starts the snapshot of `step` and returns at once. If the previous
    /// round is still finishing (its `staged` reply outstanding), waits for it.
    public func snapshot(step: Int) throws {
        guard layout != nil else { throw SnapshotError(code: .misuse, message: "snapshot before register") }
        let start = monotonicSeconds()
        condition.lock()
        defer {
            _stats.blockedSeconds += monotonicSeconds() - start
            condition.unlock()
        }
        while roundActive || pendingStep != nil { condition.wait() }
        if let error = roundError {
            roundError = nil
            throw error
        }
        pendingStep = step
        roundActive = true
        copiedCount = 0
        currentSlot = nil
        roundSlotKnown = false
        externalLanded = false
        externalFailed = false
        condition.broadcast()
    }

    /// Blocks while any tensor in `names` (all tensors when nil) has not been
    /// copied by the round in flight. Call it before the optimizer update.
    /// Rethrows a failure of the round.
    public func waitBeforeUpdate(touching names: [String]? = nil) throws {
        guard let layout else { return }
        let needed: Int
        let needsExternal: Bool
        if let names {
            let set = Set(names)
            needed = (layout.entries.lastIndex { set.contains($0.spec.name) } ?? -1) + 1
            needsExternal = tensors.contains { $0.external && set.contains($0.spec.name) }
        } else {
            needed = layout.entries.count
            needsExternal = tensors.contains(where: \.external)
        }
        let start = monotonicSeconds()
        condition.lock()
        defer {
            _stats.blockedSeconds += monotonicSeconds() - start
            condition.unlock()
        }
        while roundActive && (copiedCount < needed || (needsExternal && !externalLanded && !(roundSlotKnown && currentSlot == nil)))
            && roundError == nil { condition.wait() }
        if let error = roundError {
            roundError = nil
            throw error
        }
    }

    func waitCopied(count: Int) throws {
        guard let layout else { throw SnapshotError(code: .misuse, message: "wait before register") }
        guard (0...layout.entries.count).contains(count) else {
            throw SnapshotError(code: .misuse, message: "wait for \(count) tensors of \(layout.entries.count) registered")
        }
        try waitBeforeUpdate(touching: layout.entries.prefix(count).map(\.spec.name))
    }

    /// Blocks until the round in flight is over (staged reply received or
    /// skipped). For tests, benchmarks and a clean shutdown.
    public func waitForRound() throws {
        condition.lock()
        defer { condition.unlock() }
        while roundActive { condition.wait() }
        if let error = roundError {
            roundError = nil
            throw error
        }
    }

    private func copierLoop() {
        while true {
            condition.lock()
            while pendingStep == nil && !stopping { condition.wait() }
            if stopping {
                condition.unlock()
                return
            }
            let step = pendingStep!
            pendingStep = nil
            condition.unlock()

            let start = monotonicSeconds()
            var failure: SnapshotError?
            var staged = false
            var committed: Int?
            do {
                (staged, committed) = try runRound(step: step)
            } catch let e as SnapshotError {
                failure = e
            } catch {
                failure = SnapshotError(code: .transport, message: "\(error)")
            }
            condition.lock()
            if staged { _stats.snapshotsStaged += 1 } else if failure == nil { _stats.snapshotsSkipped += 1 }
            if let committed { _stats.lastCommittedStep = committed }
            _stats.lastRoundSeconds = monotonicSeconds() - start
            roundError = failure
            copiedCount = layout!.entries.count
            roundSlotKnown = true
            roundActive = false
            condition.broadcast()
            condition.unlock()
        }
    }

    /// One round: begin, copy with CRCs, staged. Returns (staged, committed step).
    private func runRound(step: Int) throws -> (Bool, Int?) {
        let layout = layout!
        let (reply, _) = try request(.begin(step: step))
        guard case .beginReply(let slotIndex, _) = reply else { throw unexpected(reply, "begin") }
        condition.withLock {
            currentSlot = slotIndex
            roundSlotKnown = true
            condition.broadcast()
        }
        guard let slotIndex else {
            markCopied(layout.entries.count)
            return (false, nil)
        }
        let slot = slots[slotIndex]
        var crcs = [UInt32](repeating: 0, count: layout.chunkCount)
        let totalBytes = layout.entries.reduce(0) { $0 + $1.storedBytes }
        var copiedBytes = 0
        for (index, entry) in layout.entries.enumerated() {
            if tensors[index].external || entry.storedBytes == 0 {
                markCopied(index + 1)  // external: the caller's, checksummed below once they landed
                continue
            }
            let src = UnsafeRawPointer(tensors[index].buffer.baseAddress!) + entry.storedRange.lowerBound
            let dst = slot.base + entry.slotOffset
            for chunk in 0..<entry.chunkCount {
                let range = layout.chunkRange(entry, chunk: chunk)
                var crc: UInt32 = 0
                var offset = range.lowerBound
                while offset < range.upperBound {
                    let n = min(Self.copyPiece, range.upperBound - offset)
                    // The CRC reads the piece into cache; the copy then streams it
                    // to the slot without reading the slot's lines first.
                    crc = CRC32C.checksum(UnsafeRawBufferPointer(start: src + offset, count: n), continuing: crc)
                    copyNonTemporal(dst + offset, src + offset, n)
                    offset += n
                    copiedBytes += n
                    if let killStep = killMidCopyAtStep, step >= killStep, copiedBytes * 2 >= totalBytes {
                        // Fault injection: die with the slot half written.
                        kill(getpid(), SIGKILL)
                    }
                }
                crcs[entry.firstChunk + chunk] = crc
            }
            markCopied(index + 1)
        }
        if tensors.contains(where: \.external) {
            try awaitExternalCopies(step: step)
            for (index, entry) in layout.entries.enumerated() where tensors[index].external {
                for chunk in 0..<entry.chunkCount {
                    let range = layout.chunkRange(entry, chunk: chunk)
                    crcs[entry.firstChunk + chunk] = CRC32C.checksum(UnsafeRawBufferPointer(start: slot.base + entry.slotOffset + range.lowerBound,
                                                                                             count: range.count))
                }
            }
        }
        let (stagedReply, _) = try request(.staged(step: step, slot: slotIndex, crcs: crcs))
        guard case .stagedReply(let committed) = stagedReply else { throw unexpected(stagedReply, "staged") }
        return (true, committed)
    }

    /// Waits until the caller says its external copies of `step` landed.
    private func awaitExternalCopies(step: Int) throws {
        condition.lock()
        defer { condition.unlock() }
        while !externalLanded && !externalFailed && !stopping { condition.wait() }
        guard externalLanded else {
            throw SnapshotError(code: .transport, message: "the external copies of step \(step) did not land in the slot")
        }
    }

    func externalCopiesLanded(ok: Bool) {
        condition.withLock {
            if ok { externalLanded = true } else { externalFailed = true }
            condition.broadcast()
        }
    }

    func roundSlot() throws -> Int? {
        condition.lock()
        defer { condition.unlock() }
        while roundActive && !roundSlotKnown && roundError == nil { condition.wait() }
        if let error = roundError { throw error }
        return roundActive ? currentSlot : nil
    }

    func slot(_ index: Int) throws -> UnsafeMutableRawBufferPointer {
        guard layout != nil else { throw SnapshotError(code: .misuse, message: "slot before register") }
        guard (0..<slots.count).contains(index) else { throw SnapshotError(code: .misuse, message: "no slot \(index) (there are \(slots.count))") }
        return UnsafeMutableRawBufferPointer(start: slots[index].base, count: slots[index].count)
    }

    func placement(ofTensor index: Int) throws -> (slotOffset: Int, sourceRange: Range<Int>) {
        guard let layout else { throw SnapshotError(code: .misuse, message: "placement before register") }
        guard layout.entries.indices.contains(index) else {
            throw SnapshotError(code: .misuse, message: "no tensor \(index) (\(layout.entries.count) registered)")
        }
        let entry = layout.entries[index]
        return (entry.slotOffset, entry.storedRange)
    }

    func setRestoreBuffer(_ buffer: UnsafeMutableRawBufferPointer?, forTensor index: Int) throws {
        guard layout != nil else { throw SnapshotError(code: .misuse, message: "setRestoreBuffer before register") }
        guard tensors.indices.contains(index), tensors[index].external else {
            throw SnapshotError(code: .misuse, message: "tensor \(index) is not an external tensor")
        }
        if let buffer {
            guard buffer.count == tensors[index].spec.byteCount else {
                throw SnapshotError(code: .misuse, message: "restore buffer of \(buffer.count) bytes for \(tensors[index].spec.name) of \(tensors[index].spec.byteCount) bytes")
            }
        }
        restoreBuffers[index] = buffer
    }

    private func markCopied(_ n: Int) {
        condition.lock()
        copiedCount = n
        condition.broadcast()
        condition.unlock()
    }

    // MARK: restore

    /// Restores every registered tensor from the SMP's committed snapshot and
    /// returns its step, or nil when nothing is committed (a fresh start).
    /// Every chunk's CRC is checked; a mismatch throws `.corrupt` naming the
    /// worker, tensor and chunk, and leaves the tensors partly written.
    func restore(expecting expected: Int?, sources: [String], keepLive: Bool = false) throws -> Int? {
        guard let layout else { throw SnapshotError(code: .misuse, message: "restore before register") }
        prefaultStop.set(true)
        // A round in flight is void: let it finish, and forget how it ended.
        condition.lock()
        while roundActive { condition.wait() }
        roundError = nil
        condition.unlock()
        let started = monotonicSeconds()
        let (reply, _) = try request(.restoreQuery(expected: expected))
        guard case .restoreReply(let point) = reply else { throw unexpected(reply, "restore") }
        guard let point else { return nil }
        guard point.crcs.count == layout.chunkCount, (0..<2).contains(point.slot) else {
            throw SnapshotError(code: .refused, message: "restore point does not match the layout")
        }
        let slot = slots[point.slot]
        if keepLive, point.step == expected, !tensors.contains(where: \.external), liveStateMatches(layout, crcs: point.crcs) {
            condition.lock()
            _stats.lastCommittedStep = point.step
            _stats.lastRestore = RestoreTiming(ownBytes: 0, ownSeconds: monotonicSeconds() - started, sliceBytes: 0, sliceSeconds: 0,
                                               sources: 0, keptBytes: layout.slotBytes)
            condition.unlock()
            return point.step
        }
        // The registered tensors, external ones pointing at their restore buffers.
        let destinations = try tensors.enumerated().map { index, t in
            guard t.external else { return t }
            guard let b = restoreBuffers[index] else {
                throw SnapshotError(code: .misuse, message: "no restore buffer for the external tensor \(t.spec.name)")
            }
            var d = t
            d.buffer = b
            return d
        }
        // Every chunk: check its CRC piece by piece (pulling the piece into
        // cache) and copy it from there. Training is paused during a restore,
        // so the chunks are split over this thread and one helper.
        struct Job: Sendable { var index: Int; var chunk: Int }
        var jobs: [Job] = []
        for (index, entry) in layout.entries.enumerated() {
            for chunk in 0..<entry.chunkCount { jobs.append(Job(index: index, chunk: chunk)) }
        }
        let workerID = identity.workerID
        let restoreChunk: @Sendable (Job) -> SnapshotError.Corruption? = { job in
            let entry = layout.entries[job.index]
            let src = UnsafeRawPointer(slot.base + entry.slotOffset)
            let dst = destinations[job.index].buffer.baseAddress! + entry.storedRange.lowerBound
            let range = layout.chunkRange(entry, chunk: job.chunk)
            var actual: UInt32 = 0
            var offset = range.lowerBound
            while offset < range.upperBound {
                let n = min(Self.copyPiece, range.upperBound - offset)
                actual = CRC32C.checksum(UnsafeRawBufferPointer(start: src + offset, count: n), continuing: actual)
                memcpy(dst + offset, src + offset, n)
                offset += n
            }
            let expected = point.crcs[entry.firstChunk + job.chunk]
            return actual == expected ? nil
                : .init(worker: workerID, tensor: entry.spec.name, chunk: job.chunk, expected: expected, actual: actual)
        }
        let half = jobs.count / 2
        let helperResult = Locked<SnapshotError.Corruption?>(nil)
        let helperDone = DispatchSemaphore(value: 0)
        let helperJobs = Array(jobs[half...])
        if !helperJobs.isEmpty && half > 0 {
            Thread {
                for j in helperJobs { if let c = restoreChunk(j) { helperResult.set(c); break } }
                helperDone.signal()
            }.start()
        } else {
            helperDone.signal()
        }
        var mine: SnapshotError.Corruption?
        for j in (half > 0 ? Array(jobs[..<half]) : jobs) { if let c = restoreChunk(j) { mine = c; break } }
        helperDone.wait()
        if let c = mine ?? helperResult.get() {
            throw corrupt(worker: c.worker, tensor: c.tensor, chunk: c.chunk, expected: c.expected, actual: c.actual)
        }
        let ownDone = monotonicSeconds()
        var fetches: [SliceFetch] = []
        for (index, entry) in layout.entries.enumerated() where entry.spec.replicated && identity.dpSize > 1 {
            for rank in 0..<identity.dpSize where rank != identity.dpRank {
                let endpoint = rank < sources.count && !sources[rank].isEmpty ? sources[rank] : ""
                let stored = ShardLayout.storedRange(of: entry.spec, dpRank: rank, dpSize: identity.dpSize).count
                for chunks in Self.slicePieces(storedBytes: stored, chunkBytes: chunkBytes) {
                    fetches.append(SliceFetch(spec: entry.spec, rank: rank, chunks: chunks, buffer: destinations[index].buffer,
                                              endpoint: endpoint))
                }
            }
        }
        let sliceBytes = try gatherSlices(fetches, step: point.step)
        condition.lock()
        _stats.lastCommittedStep = point.step
        _stats.lastRestore = RestoreTiming(ownBytes: layout.slotBytes, ownSeconds: ownDone - started, sliceBytes: sliceBytes,
                                           sliceSeconds: monotonicSeconds() - ownDone, sources: Set(fetches.map(\.endpoint)).count)
        condition.unlock()
        return point.step
    }

    /// Whether every chunk this rank stores, read from the live tensors, has
    /// the CRC the committed snapshot recorded for it (the SMP's copy is not
    /// read: a corruption at rest does not make live state wrong).
    private func liveStateMatches(_ layout: ShardLayout, crcs: [UInt32]) -> Bool {
        for (index, entry) in layout.entries.enumerated() where entry.chunkCount > 0 {
            guard let start = tensors[index].buffer.baseAddress else { return false }
            let base = UnsafeRawPointer(start) + entry.storedRange.lowerBound
            for chunk in 0..<entry.chunkCount {
                let range = layout.chunkRange(entry, chunk: chunk)
                let crc = CRC32C.checksum(UnsafeRawBufferPointer(start: base + range.lowerBound, count: range.count))
                if crc != crcs[entry.firstChunk + chunk] { return false }
            }
        }
        return true
    }

    /// A piece (`chunks`) of another rank's slice of a replicated tensor, and
    /// where to get it ("": this node's SMP).
    struct SliceFetch {
        var spec: TensorSpec
        var rank: Int
        var chunks: Range<Int>
        var buffer: UnsafeMutableRawBufferPointer
        var endpoint: String
    }

    /// Chunks asked for per request while gathering slices: each reply is
    /// received into a buffer of this size, which the allocator reuses (see
    /// `SMPMessage`).
    static let slicePieceChunks = 2

    /// Requests in flight per source while gathering slices.
    static let sliceWindow = 2

    /// Makes freed blocks below 16 MiB stay in malloc's heaps (and up to 256
    /// MiB of free space at a heap's top stay mapped), once per process: a
    /// slice reply's buffer is then reused for the next one. The setting is the
    /// whole process's (a PyTorch worker's CPU allocations too), taken at its
    /// first restore that gathers slices.
    static func keepReceiveBuffers() { _ = keptReceiveBuffers }
    private static let keptReceiveBuffers: Bool = keepFreedBlocks(below: 16 << 20, trimAbove: 256 << 20)

    /// The chunk ranges in which a slice of `storedBytes` is fetched: pieces of
    /// `slicePieceChunks` chunks, one empty piece for an empty slice (its reply
    /// still says the step).
    static func slicePieces(storedBytes: Int, chunkBytes: Int) -> [Range<Int>] {
        let chunks = (storedBytes + chunkBytes - 1) / chunkBytes
        guard chunks > 0 else { return [0..<0] }
        return stride(from: 0, to: chunks, by: slicePieceChunks).map { $0 ..< min($0 + slicePieceChunks, chunks) }
    }

    /// The bytes of the tensor that chunks `chunks` of rank `rank`'s slice cover.
    func pieceRange(of spec: TensorSpec, rank: Int, chunks: Range<Int>) -> Range<Int> {
        let stored = ShardLayout.storedRange(of: spec, dpRank: rank, dpSize: identity.dpSize)
        let lo = min(stored.lowerBound + chunks.lowerBound * chunkBytes, stored.upperBound)
        return lo ..< min(stored.lowerBound + chunks.upperBound * chunkBytes, stored.upperBound)
    }

    /// How long a source may take to answer a slice of `bytes`: generous, as
    /// every rank of the job gathers at once and a source answers in turn (a
    /// dead source makes the coordinator move on long before: `abandonRestore`).
    static func sliceTimeout(_ bytes: Int) -> Double { max(5, Double(bytes) / 20e6) }

    /// Gathers other ranks' slices of replicated tensors, a piece of a few
    /// chunks per request: up to `sliceWindow`
    /// requests in flight to every source at once (an SMP answers its requests
    /// in order), each reply checked chunk by chunk and copied from cache into
    /// the tensor as it arrives. A source that does not answer its oldest
    /// request within `sliceTimeout` (counted from when its previous reply
    /// came: it answers in order), or as soon as
    /// `abandonRestore` says the coordinator moved on, fails the restore.
    /// Returns the bytes gathered.
    private func gatherSlices(_ fetches: [SliceFetch], step: Int) throws -> Int {
        guard !fetches.isEmpty else { return 0 }
        // Replies are malloc'd by libzmq's I/O thread, a window of them per source
        // at once: keep such blocks in the heap and reuse them, rather than fault
        // fresh pages in for each (glibc refuses a threshold above 32 MiB).
        Self.keepReceiveBuffers()
        rpcLock.lock()
        defer { rpcLock.unlock() }
        struct Source {
            var socket: ZMQSocket
            var queue: [SliceFetch]
            /// Requests sent and not yet answered, oldest first, with their ids.
            var inFlight: [(fetch: SliceFetch, id: UInt64)] = []
            /// When the oldest request in flight must be answered by.
            var deadline = 0.0
        }
        var sourcesByKey: [String: Source] = [:]
        for f in fetches {
            if sourcesByKey[f.endpoint] == nil {
                let socket: ZMQSocket
                if f.endpoint.isEmpty {
                    socket = self.socket
                } else if let existing = peers[f.endpoint] {
                    socket = existing
                } else {
                    socket = try context.socket(.dealer, maxMessageBytes: maxFrameBytes)
                    try socket.setLinger(milliseconds: 0)
                    try socket.boundBulkReceives()
                    try dataPlaneKeys(for: f.endpoint)?.secureClient(socket, for: f.endpoint)
                    try socket.connect(f.endpoint)
                    peers[f.endpoint] = socket
                }
                sourcesByKey[f.endpoint] = Source(socket: socket, queue: [])
            }
            sourcesByKey[f.endpoint]!.queue.append(f)
        }
        let keys = sourcesByKey.keys.sorted()
        var gathered = 0
        do {
            while keys.contains(where: { !sourcesByKey[$0]!.queue.isEmpty || !sourcesByKey[$0]!.inFlight.isEmpty }) {
                let now = monotonicSeconds()
                for key in keys {
                    while sourcesByKey[key]!.inFlight.count < Self.sliceWindow, !sourcesByKey[key]!.queue.isEmpty {
                        let f = sourcesByKey[key]!.queue.removeFirst()
                        let bytes = pieceRange(of: f.spec, rank: f.rank, chunks: f.chunks).count
                        let id = nextRequestID()
                        try sourcesByKey[key]!.socket.send([SMPMessage.fetchSlice(dpRank: f.rank, dpSize: identity.dpSize, tensor: f.spec.name,
                                                                                  chunks: f.chunks)
                            .envelope(sender: identity.workerID, epoch: id).encoded()])
                        if sourcesByKey[key]!.inFlight.isEmpty { sourcesByKey[key]!.deadline = now + Self.sliceTimeout(bytes) }
                        sourcesByKey[key]!.inFlight.append((f, id))
                    }
                    if let head = sourcesByKey[key]!.inFlight.first?.fetch, now > sourcesByKey[key]!.deadline {
                        throw SnapshotError(code: .timeout, message: "no slice of \(head.spec.name) for DP rank \(head.rank) from "
                            + "\(key.isEmpty ? identity.smpEndpoint : key) in time")
                    }
                }
                if abandonRestore() {
                    throw SnapshotError(code: .interrupted, message: "abandoned gathering slices: the coordinator moved on")
                }
                let busy = keys.filter { !sourcesByKey[$0]!.inFlight.isEmpty }
                let ready = try ZMQPoller.poll(busy.map { .init(sourcesByKey[$0]!.socket, .readable) }, timeoutMilliseconds: 20)
                for (i, key) in busy.enumerated() where ready[i].isReadable {
                    while !sourcesByKey[key]!.inFlight.isEmpty, let frames = try sourcesByKey[key]!.socket.receiveMessages(timeoutMilliseconds: 0) {
                        guard try isAnswer(frames, to: sourcesByKey[key]!.inFlight[0].id) else { continue }
                        let f = sourcesByKey[key]!.inFlight.removeFirst().fetch
                        gathered += try placeSlice(frames, of: f, step: step)
                        if let next = sourcesByKey[key]!.inFlight.first?.fetch {
                            let bytes = pieceRange(of: next.spec, rank: next.rank, chunks: next.chunks).count
                            sourcesByKey[key]!.deadline = monotonicSeconds() + Self.sliceTimeout(bytes)
                        }
                    }
                }
            }
        } catch {
            // Late replies must not be taken for the next requests': start afresh.
            for key in keys where !key.isEmpty {
                peers.removeValue(forKey: key)?.close()
            }
            if sourcesByKey[""].map({ !$0.inFlight.isEmpty }) ?? false { resetLocalSocket() }
            throw error
        }
        return gathered
    }

    /// The keys to fetch from `endpoint` with: nil for ipc or a job without
    /// keys; on TCP in a job with keys, `worker.key` (loaded once), or an
    /// error naming what could not be read.
    private func dataPlaneKeys(for endpoint: String) throws -> DataPlaneKeys? {
        guard endpoint.hasPrefix("tcp://"), let dir = identity.keysDirectory else { return nil }
        if let loadedDataKeys { return loadedDataKeys }
        do {
            loadedDataKeys = try DataPlaneKeys.load(from: dir, memberFile: "worker.key")
        } catch {
            throw SnapshotError(code: .misuse, message: "cannot fetch from \(endpoint) over CURVE: \(error)")
        }
        return loadedDataKeys
    }

    /// Checks a slice reply and copies its bytes into the tensor, chunk by
    /// chunk (each checked, then copied while it is in cache).
    private func placeSlice(_ frames: [ZMQMessage], of f: SliceFetch, step: Int) throws -> Int {
        let (reply, _) = try SMPMessage.decode(frames[0].bytes)
        if case .error(let code, let text) = reply { throw SnapshotError(code: .refused, message: text, smpCode: code) }
        guard case .sliceReply(let sliceStep, let range, let crcs) = reply, frames.count == 2 else {
            throw unexpected(reply, "fetch slice \(f.spec.name) of rank \(f.rank)")
        }
        let expectedRange = pieceRange(of: f.spec, rank: f.rank, chunks: f.chunks)
        guard sliceStep == step, range == expectedRange, frames[1].count == range.count else {
            throw SnapshotError(code: .refused,
                                message: "slice of \(f.spec.name) from DP rank \(f.rank) is step \(sliceStep) bytes \(range) (\(frames[1].count) received); expected step \(step) bytes \(expectedRange)")
        }
        let chunks = range.isEmpty ? 0 : (range.count + chunkBytes - 1) / chunkBytes
        guard crcs.count == chunks else { throw SnapshotError(code: .refused, message: "slice CRC count \(crcs.count) != \(chunks)") }
        let firstChunk = f.chunks.lowerBound
        try frames[1].withUnsafeBytes { (data: UnsafeRawBufferPointer) throws(SnapshotError) in
            let dst = f.buffer.baseAddress! + range.lowerBound
            for c in 0..<chunks {
                var offset = c * chunkBytes
                let end = min(offset + chunkBytes, range.count)
                var actual: UInt32 = 0
                while offset < end {
                    let n = min(Self.copyPiece, end - offset)
                    actual = CRC32C.checksum(UnsafeRawBufferPointer(start: data.baseAddress! + offset, count: n), continuing: actual)
                    memcpy(dst + offset, data.baseAddress! + offset, n)
                    offset += n
                }
                guard actual == crcs[c] else {
                    throw corrupt(worker: "dp-rank-\(f.rank)", tensor: f.spec.name, chunk: firstChunk + c, expected: crcs[c], actual: actual)
                }
            }
        }
        return range.count
    }

    /// A fresh socket to this worker's SMP: a reply still in flight on the old
    /// one can never be taken for the answer to a later request.
    private func resetLocalSocket() {
        socket.close()
        if let fresh = try? context.socket(.dealer, maxMessageBytes: maxFrameBytes) {
            try? fresh.setLinger(milliseconds: 0)
            try? fresh.boundBulkReceives()
            try? fresh.connect(identity.smpEndpoint)
            socket = fresh
        }
    }

    private func corrupt(worker: String, tensor: String, chunk: Int, expected: UInt32, actual: UInt32) -> SnapshotError {
        SnapshotError(code: .corrupt,
                      message: "worker \(worker), tensor \(tensor), chunk \(chunk): CRC32C \(hex(actual)) does not match the recorded \(hex(expected))",
                      corruption: .init(worker: worker, tensor: tensor, chunk: chunk, expected: expected, actual: actual))
    }

    func canSnapshot() throws -> Bool {
        guard let (_, pending) = try roundState() else { return false }
        return !pending
    }

    func canSnapshot(after previous: Int?) throws -> Bool {
        guard let (committed, pending) = try roundState() else { return false }
        return !pending || previous == nil || (committed.map { $0 >= previous! } ?? false)
    }

    /// The node's committed step and whether a round is pending there; nil
    /// while a copy of ours is in flight.
    private func roundState() throws -> (committed: Int?, pending: Bool)? {
        let busy = condition.withLock { roundActive || pendingStep != nil }
        if busy { return nil }
        let (reply, _) = try request(.roundQuery)
        guard case .roundReply(let committed, let pending) = reply else { throw unexpected(reply, "round query") }
        return (committed, pending)
    }

    // MARK: messaging

    /// Sends one request and waits for its reply (the reply's extra frames too).
    /// A refusal from the SMP is thrown as `.refused` with its code.
    func request(_ message: SMPMessage) throws -> (SMPMessage, [ZMQMessage]) {
        rpcLock.lock()
        defer { rpcLock.unlock() }
        return try exchange(message, on: socket, endpoint: identity.smpEndpoint)
    }

    private func exchange(_ message: SMPMessage, on socket: ZMQSocket, endpoint: String,
                          timeoutMilliseconds: Int? = nil, abandon: (() -> Bool)? = nil) throws -> (SMPMessage, [ZMQMessage]) {
        let id = nextRequestID()
        let frame = message.envelope(sender: identity.workerID, epoch: id).encoded()
        try socket.send([frame])
        let timeout = timeoutMilliseconds ?? requestTimeoutMilliseconds
        let deadline = monotonicSeconds() + Double(timeout) / 1000
        var frames: [ZMQMessage]?
        while frames == nil {
            let left = Int(((deadline - monotonicSeconds()) * 1000).rounded(.up))
            guard left > 0 else { break }
            if let abandon, abandon() {
                throw SnapshotError(code: .interrupted, message: "abandoned waiting for \(endpoint): the coordinator moved on")
            }
            // With `abandon`, in 20 ms slices, asking between them whether to give up.
            frames = try socket.receiveMessages(timeoutMilliseconds: abandon == nil ? left : min(20, left))
            if let f = frames, !(try isAnswer(f, to: id)) { frames = nil }
        }
        guard let frames else {
            throw SnapshotError(code: .timeout, message: "no reply from the SMP at \(endpoint) within \(timeout) ms")
        }
        let (reply, _) = try SMPMessage.decode(frames[0].bytes)
        if case .error(let code, let text) = reply {
            throw SnapshotError(code: .refused, message: text, smpCode: code)
        }
        return (reply, Array(frames.dropFirst()))
    }

    /// Whether `frames` answer request `id`; a late reply to an earlier
    /// request is counted and dropped (false).
    private func isAnswer(_ frames: [ZMQMessage], to id: UInt64) throws -> Bool {
        guard let first = frames.first else { throw SnapshotError(code: .transport, message: "an empty reply") }
        let envelope = try WireEnvelope(decoding: first.bytes)
        if envelope.epoch == id { return true }
        staleReplies += 1
        return false
    }

    private func unexpected(_ reply: SMPMessage, _ what: String) -> SnapshotError {
        SnapshotError(code: .transport, message: "unexpected reply to \(what): \(reply)")
    }
}

/// A value behind a lock, for results handed between threads.
final class Locked<T>: @unchecked Sendable {
    private var value: T
    private let lock = NSLock()
    init(_ v: T) { value = v }
    func get() -> T { lock.lock(); defer { lock.unlock() }; return value }
    func set(_ v: T) { lock.lock(); value = v; lock.unlock() }
}

func hex(_ v: UInt32) -> String {
    let s = String(v, radix: 16)
    return "0x" + String(repeating: "0", count: 8 - s.count) + s
}
