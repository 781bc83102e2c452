/// A worker's registration with its node's SMP.
public struct WorkerRegistration: Sendable, Equatable {
    public var workerID: String
    public var dpRank: Int
    public var dpSize: Int
    public var chunkBytes: Int
    public var specs: [TensorSpec]

    public init(workerID: String, dpRank: Int, dpSize: Int, chunkBytes: Int = ShardLayout.defaultChunkBytes, specs: [TensorSpec]) {
        self.workerID = workerID
        self.dpRank = dpRank
        self.dpSize = dpSize
        self.chunkBytes = chunkBytes
        self.specs = specs
    }

    public var layout: ShardLayout { ShardLayout(specs: specs, dpRank: dpRank, dpSize: dpSize, chunkBytes: chunkBytes) }
}

/// A request the store refused: a stable code and a sentence. The SMP sends
/// it back to the worker as an error reply and keeps serving everyone else.
public struct StoreError: CodedError, Equatable {
    public enum Code: String, Sendable, CaseIterable {
        case unknownWorker = "unknown_worker"
        case invalidRegistration = "invalid_registration"
        case registrationMismatch = "registration_mismatch"
        case stepNotIncreasing = "step_not_increasing"
        case noWriteInProgress = "no_write_in_progress"
        case sizeMismatch = "size_mismatch"
        case nothingCommitted = "nothing_committed"
        case unknownTensor = "unknown_tensor"
        case corrupt = "corrupt"
        case malformed = "malformed"
        /// An offset, length, index, row or step outside what the receiver's layout allows.
        case outOfRange = "out_of_range"
        /// The registration would take the node's shared memory past its budget
        /// (`ft-smp --memory-limit`), or /dev/shm cannot hold it.
        case memoryLimit = "memory_limit"
        /// An erasure-coding chunk for a round the receiver does not expect (not
        /// the current or the next one): refused without allocating anything.
        case unexpectedRound = "unexpected_round"
        /// A bounded queue is full (requests held during a rebuild).
        case busy = "busy"
        /// An erasure-coding frame from an epoch older than the receiver's: its
        /// sender was replaced (a zombie) and may change nothing anyone keeps.
        case fenced = "fenced"
        /// A request its peer may not send: a worker's request on the data
        /// endpoint, a peer's on the workers' socket, or a worker's request from
        /// a process that is not that worker (SO_PEERCRED).
        case unauthorized = "unauthorized"
        case internalError = "internal"
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code.rawValue): \(message)" }
}

/// Decides when a staged step becomes committed. The single replaceable piece
/// of the snapshot path: on one node without a coordinator, `LocalCommitRule`
/// commits a step once every local worker staged it; the coordinator's global
/// commit replaces it with a rule that reports `protected(s)` and waits.
public protocol CommitRule: Sendable {
    /// Called when every registered worker of the node has staged `step`.
    /// Returns true to commit it now.
    func allStaged(step: Int) -> Bool
    /// Whether a fully staged round is reported to someone who may commit it.
    /// Such a round must survive its workers' deaths until it is committed or
    /// aborted: the commit may already be on its way.
    var roundsAreReported: Bool { get }
}

/// "Committed" on one node means "all local workers staged this step".
public struct LocalCommitRule: CommitRule {
    public init() {}
    public func allStaged(step: Int) -> Bool { true }
    public var roundsAreReported: Bool { false }
}

/// Under a coordinator: a step commits only on its global `commit(s)`.
public struct CoordinatorCommitRule: CommitRule {
    public init() {}
    public func allStaged(step: Int) -> Bool { false }
    public var roundsAreReported: Bool { true }
}

/// The SMP's bookkeeping for its workers' snapshot slots, as a value type with
/// no I/O: it takes requests and returns outcomes; the SMP shell does the
/// shared memory and the messaging.
///
/// Each worker has two slots (double buffering). A slot is `empty`,
/// `writing(s)` while the worker copies step `s` into it, `staged(s)` when the
/// copy is complete and its chunk CRCs are known, or `committed(s)`.
///
/// Legal transitions, per slot:
///
///     empty      -> writing(s)     begin(s), on a slot that is not committed
///     writing(s) -> staged(s)      staged(s)
///     writing(s) -> empty          worker exit or re-registration (torn copy dropped)
///     staged(s)  -> committed(s)   the commit rule commits s
///     staged(s)  -> empty          worker exit or re-registration, when the round was
///                                  never reported; otherwise abort(s) or a restore
///                                  of another step
///     committed  -> empty          the other slot commits a newer step (previous version freed)
///
/// Invariants: at most one slot of a worker is committed; a committed slot is
/// never written (begin always picks the other slot); a step is committed only
/// when every registered worker has it staged; restore reads only a committed
/// slot, so a torn copy can never be restored.
public struct SnapshotStoreInstance: Sendable {
    public enum SlotState: Sendable, Equatable {
        case empty
        case writing(step: Int)
        case staged(step: Int, crcs: [UInt32])
        case committed(step: Int, crcs: [UInt32])

        public var crcs: [UInt32] {
            switch self {
            case .staged(_, let c), .committed(_, let c): c
            default: []
            }
        }

        public var step: Int? {
            switch self {
            case .empty: nil
            case .writing(let s), .staged(let s, _), .committed(let s, _): s
            }
        }
    }

    public struct Worker: Sendable, Equatable {
        public var registration: WorkerRegistration
        public var layout: ShardLayout
        public var slots: [SlotState] = [.empty, .empty]
        public var lastStaged: Int?
        public var lastCommitted: Int?
        /// Snapshots skipped because the previous round had not committed yet.
        public var skipped = 0
        /// Staged rounds dropped because another worker moved past them.
        public var aborted = 0

        public var committedSlot: Int? {
            slots.firstIndex { if case .committed = $0 { true } else { false } }
        }
    }

    public enum RegisterOutcome: Sendable, Equatable {
        /// A worker seen for the first time: the shell allocates two slots of `slotBytes`.
        case new(slotBytes: Int)
        /// A restarted worker with the same registration: its slots and committed step stand.
        case rejoined(committedStep: Int?)
    }

    public enum BeginOutcome: Sendable, Equatable {
        /// Copy step `s` into this slot.
        case write(slot: Int)
        /// Do not snapshot this step: the previous round has not committed.
        case skip(reason: String)
    }

    /// Where a worker's committed snapshot is.
    public struct RestorePoint: Sendable, Equatable {
        public var step: Int
        public var slot: Int
        public var crcs: [UInt32]
    }

    public private(set) var workers: [String: Worker] = [:]
    /// Slots being written to disk (the persistent tier), by worker: a
    /// snapshot that would overwrite one is skipped instead.
    public private(set) var pinned: [String: Int] = [:]
    /// The node's last committed step.
    public private(set) var committedStep: Int?
    private let rule: any CommitRule

    public init(rule: any CommitRule = LocalCommitRule()) {
        self.rule = rule
    }

    // MARK: requests

    public mutating func register(_ registration: WorkerRegistration) throws(StoreError) -> RegisterOutcome {
        try Self.validate(registration)
        if let existing = workers[registration.workerID] {
            guard existing.registration == registration else {
                throw StoreError(.registrationMismatch,
                                 "worker \(registration.workerID) registered again with different tensors or DP placement; "
                                     + "the SMP holds snapshots for the first registration (\(existing.layout.slotBytes) bytes per slot)")
            }
            dropUncommitted(registration.workerID, keepStaged: rule.roundsAreReported)
            return .rejoined(committedStep: workers[registration.workerID]!.lastCommitted)
        }
        for other in workers.values where other.registration.dpSize == registration.dpSize
            && other.registration.dpRank == registration.dpRank {
            throw StoreError(.invalidRegistration,
                             "DP rank \(registration.dpRank) of \(registration.dpSize) is already held by worker \(other.registration.workerID)")
        }
        let layout = registration.layout
        workers[registration.workerID] = Worker(registration: registration, layout: layout)
        // A worker that joins late has nothing committed; the node's step no longer covers everyone.
        committedStep = nil
        return .new(slotBytes: layout.slotBytes)
    }

    public mutating func begin(worker id: String, step: Int) throws(StoreError) -> BeginOutcome {
        guard var w = workers[id] else { throw Self.unknown(id) }
        if let last = w.lastStaged, step <= last {
            throw StoreError(.stepNotIncreasing, "worker \(id): snapshot step \(step) is not after its last staged step \(last)")
        }
        if let last = w.lastCommitted, step <= last {
            throw StoreError(.stepNotIncreasing, "worker \(id): snapshot step \(step) is not after its committed step \(last)")
        }
        if let writing = w.slots.compactMap({ if case .writing(let s) = $0 { s } else { nil } }).first, step <= writing {
            throw StoreError(.stepNotIncreasing, "worker \(id): snapshot step \(step) is not after step \(writing) being written")
        }
        // A copy that was begun and never staged is abandoned by a newer begin.
        for i in 0..<2 { if case .writing = w.slots[i] { w.slots[i] = .empty } }
        if let index = w.slots.firstIndex(where: { if case .staged = $0 { true } else { false } }) {
            let pending = w.slots[index].step!
            if roundCannotCommit(pending, except: id) {
                // Another worker moved past `pending` without staging it: that
                // round can never commit. Drop it rather than skip forever.
                w.slots[index] = .empty
                w.aborted += 1
            } else {
                w.skipped += 1
                workers[id] = w
                return .skip(reason: "step \(pending) is staged but not committed yet")
            }
        }
        let slot = w.committedSlot.map { 1 - $0 } ?? 0
        if pinned[id] == slot {
            w.skipped += 1
            workers[id] = w
            return .skip(reason: "slot \(slot) holds step \(w.slots[slot].step.map(String.init) ?? "none") being persisted")
        }
        w.slots[slot] = .writing(step: step)
        workers[id] = w
        return .write(slot: slot)
    }

    /// Keeps `slot` of worker `id` from being written until `unpinAll`.
    public mutating func pin(worker id: String, slot: Int) { pinned[id] = slot }
    public mutating func unpinAll() { pinned.removeAll() }

    public enum StagedOutcome: Sendable, Equatable {
        /// Other local workers have not staged this step yet.
        case waiting
        /// Every local worker staged the step and the rule committed it.
        case committed(step: Int)
        /// Every local worker staged the step; the commit is someone else's
        /// decision (the coordinator's): report `protected(step)`.
        case allStaged(step: Int)
    }

    /// Records a completed copy.
    public mutating func staged(worker id: String, step: Int, slot: Int, crcs: [UInt32]) throws(StoreError) -> StagedOutcome {
        guard var w = workers[id] else { throw Self.unknown(id) }
        guard (0..<2).contains(slot), w.slots[slot] == .writing(step: step) else {
            throw StoreError(.noWriteInProgress, "worker \(id): staged(step \(step), slot \(slot)) but that slot is \(w.slots[min(max(slot, 0), 1)])")
        }
        guard crcs.count == w.layout.chunkCount else {
            throw StoreError(.sizeMismatch, "worker \(id): \(crcs.count) chunk CRCs for a layout of \(w.layout.chunkCount) chunks")
        }
        w.slots[slot] = .staged(step: step, crcs: crcs)
        w.lastStaged = step
        workers[id] = w
        guard allHaveStaged(step) else { return .waiting }
        if rule.allStaged(step: step) {
            commit(step: step)
            return .committed(step: step)
        }
        return .allStaged(step: step)
    }

    /// Whether every registered worker holds `step` staged.
    public func allHaveStaged(_ step: Int) -> Bool {
        !workers.isEmpty && workers.values.allSatisfy { $0.slots.contains { if case .staged(step, _) = $0 { true } else { false } } }
    }

    /// The step every local worker holds staged (and not committed), if any.
    public var stagedStep: Int? {
        guard let any = workers.values.first?.slots.compactMap({ if case .staged(let s, _) = $0 { s } else { nil } }).first else { return nil }
        return allHaveStaged(any) ? any : nil
    }

    /// Drops a staged round the coordinator aborted.
    public mutating func abort(step: Int) {
        for id in workers.keys {
            for i in 0..<2 where workers[id]!.slots[i] == .staged(step: step, crcs: workers[id]!.slots[i].crcs) {
                workers[id]!.slots[i] = .empty
            }
            workers[id]!.lastStaged = workers[id]!.lastCommitted
        }
    }

    /// Before a restore of `step` (nil: nothing): commit `step` where it is
    /// staged on every worker (its commit is decided, its message may not have
    /// arrived), then drop every other uncommitted round. Returns whether the
    /// node now holds `step` committed (always true for nil).
    @discardableResult
    public mutating func prepareRestore(step: Int?) -> Bool {
        if let step, committedStep != step, allHaveStaged(step) { commit(step: step) }
        for id in workers.keys { dropUncommitted(id, keepStaged: false) }
        guard let step else { return true }
        return workers.values.allSatisfy { $0.lastCommitted == step }
    }

    /// Commits `step` on every worker that has it staged and frees the
    /// previous committed slot. Called by the commit rule, or by the shell on
    /// the coordinator's `commit(s)`.
    public mutating func commit(step: Int) {
        for id in workers.keys {
            var w = workers[id]!
            guard let i = w.slots.firstIndex(where: { if case .staged(step, _) = $0 { true } else { false } }),
                  case .staged(_, let crcs) = w.slots[i] else { continue }
            w.slots[i] = .committed(step: step, crcs: crcs)
            if case .committed = w.slots[1 - i] { w.slots[1 - i] = .empty }
            w.lastCommitted = step
            workers[id] = w
        }
        committedStep = step
    }

    /// Installs `step` as the committed snapshot of a worker from bytes
    /// rebuilt elsewhere (a replacement node rebuilt from parity): its slot
    /// `slot` holds them, checked against `crcs` by the caller.
    public mutating func installCommitted(worker id: String, step: Int, slot: Int, crcs: [UInt32]) throws(StoreError) {
        guard var w = workers[id] else { throw Self.unknown(id) }
        guard (0..<2).contains(slot), crcs.count == w.layout.chunkCount else {
            throw StoreError(.sizeMismatch, "worker \(id): \(crcs.count) CRCs for a layout of \(w.layout.chunkCount) chunks")
        }
        w.slots = [.empty, .empty]
        w.slots[slot] = .committed(step: step, crcs: crcs)
        w.lastCommitted = step
        w.lastStaged = step
        workers[id] = w
        committedStep = workers.values.allSatisfy({ $0.lastCommitted == step }) ? step : committedStep
    }

    /// Forgets a worker entirely (its registration could not be carried out).
    public mutating func remove(worker id: String) {
        workers[id] = nil
    }

    /// The worker's process ended (or restarted): a copy in flight is torn
    /// and dropped; the committed slot stands. A staged round is dropped too,
    /// unless it was reported (under a coordinator): then it stays until the
    /// coordinator commits it or restores something else.
    public mutating func workerExited(_ id: String) {
        dropUncommitted(id, keepStaged: rule.roundsAreReported)
    }

    /// The worker restores the committed step: every round of its own that is
    /// not committed is void.
    public mutating func discardUncommitted(worker id: String) {
        dropUncommitted(id, keepStaged: false)
    }

    private mutating func dropUncommitted(_ id: String, keepStaged: Bool = false) {
        guard var w = workers[id] else { return }
        for i in 0..<2 {
            switch w.slots[i] {
            case .writing: w.slots[i] = .empty
            case .staged where !keepStaged: w.slots[i] = .empty
            default: break
            }
        }
        if !keepStaged { w.lastStaged = w.lastCommitted }
        workers[id] = w
    }

    /// Whether round `step` can no longer commit: some other worker neither
    /// holds it staged nor can still stage it, because it already staged or
    /// began a later step.
    func roundCannotCommit(_ step: Int, except id: String) -> Bool {
        workers.contains { otherID, other in
            guard otherID != id else { return false }
            if other.slots.contains(where: { if case .staged(step, _) = $0 { true } else { false } }) { return false }
            if let last = other.lastStaged, last > step { return true }
            return other.slots.contains { if case .writing(let s) = $0 { s > step } else { false } }
        }
    }

    // MARK: queries

    public func restorePoint(worker id: String) throws(StoreError) -> RestorePoint? {
        guard let w = workers[id] else { throw Self.unknown(id) }
        guard let slot = w.committedSlot, case .committed(let step, let crcs) = w.slots[slot] else { return nil }
        return RestorePoint(step: step, slot: slot, crcs: crcs)
    }

    /// The worker holding DP rank `dpRank` of a group of `dpSize`.
    public func worker(dpRank: Int, dpSize: Int) -> Worker? {
        workers.values.first { $0.registration.dpRank == dpRank && $0.registration.dpSize == dpSize }
    }

    // MARK: helpers

    static func unknown(_ id: String) -> StoreError {
        StoreError(.unknownWorker, "no worker '\(id)' is registered with this SMP")
    }

    static func validate(_ r: WorkerRegistration) throws(StoreError) {
        func bad(_ m: String) -> StoreError { StoreError(.invalidRegistration, "worker \(r.workerID): \(m)") }
        guard !r.workerID.isEmpty else { throw StoreError(.invalidRegistration, "empty worker id") }
        guard r.dpSize >= 1, r.dpSize <= WireLimits.maxDPSize, (0..<r.dpSize).contains(r.dpRank) else {
            throw bad("DP rank \(r.dpRank) is not in 0..<\(r.dpSize) (DP size at most \(WireLimits.maxDPSize))")
        }
        guard r.chunkBytes >= 4096, r.chunkBytes <= 64 << 20 else { throw bad("chunk size \(r.chunkBytes) is not in 4 KiB...64 MiB") }
        guard !r.specs.isEmpty, r.specs.count <= WireLimits.maxTensors else { throw bad("\(r.specs.count) tensors registered (1...\(WireLimits.maxTensors))") }
        var names = Set<String>()
        for s in r.specs {
            guard !s.name.isEmpty, s.name.utf8.count <= 255 else { throw bad("tensor name '\(s.name)' must be 1-255 bytes") }
            guard names.insert(s.name).inserted else { throw bad("tensor '\(s.name)' registered twice") }
            guard s.shape.allSatisfy({ $0 >= 0 }), s.shape.count <= WireLimits.maxDimensions else { throw bad("tensor '\(s.name)' has shape \(s.shape)") }
            // Element count × dtype size, overflow-checked (a crafted shape must not trap).
            guard let bytes = s.checkedByteCount, bytes <= WireLimits.maxTensorBytes else {
                throw bad("tensor '\(s.name)' of shape \(s.shape) × \(s.dtype.size) bytes exceeds \(WireLimits.maxTensorBytes) bytes")
            }
        }
    }
}
