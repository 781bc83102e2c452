import FTControl
import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation
import Logging
import Synchronization

/// Erasure-coding state of one SMP (ARCHITECTURE.md, "Erasure coding across
/// nodes"). The decisions are the cores' (`ECRoundInstance`: the round at a
/// data holder and at a parity holder; `RebuildInstance`: rebuilds and
/// repairs); this shell owns what they leave out: the parity buffers, the
/// peer sockets, the answers a rebuild holds, and the ISA-L codec.
final class ErasureState {
    var layout: ECLayout
    let group: Int
    let position: Int
    let codec: ReedSolomon
    var placement: ParityPlacement { layout.placement }
    var members: [String] { layout.groups[group] }
    var chunkBytes: Int { layout.chunkBytes }

    var round: ECRoundInstance
    /// Parity buffers (`chunkBytes` each) the round core holds: step -> row -> bytes.
    var buffers: [Int: [Int: UnsafeMutableRawBufferPointer]] = [:]
    /// Parity buffers of dropped steps, kept (faulted in) for the next rounds: at most m.
    var spareParity: [UnsafeMutableRawBufferPointer] = []
    var peers: [String: ZMQSocket] = [:]
    /// The image of the round being sent (its manifest and entries), for resends.
    var outgoingImage: (step: Int, manifest: [UInt8], entries: [ImageEntry])?
    /// When each round started protecting (for the staged-to-committed time).
    var stagedAt: [Int: Double] = [:]
    /// Bytes folded and seconds spent folding, per step.
    var foldStats: [Int: (bytes: Int, seconds: Double)] = [:]
    /// The rebuild in progress on a replacement node.
    var rebuilding: FetchJob?
    /// The repair of corrupt chunks in progress (one at a time).
    var repairing: FetchJob?
    /// Repairs that failed, by worker: (step, reason, attempts); the next restore of that
    /// step tries again, and after `repairAttempts` a restore of it is refused with the reason.
    var failedRepairs: [String: (step: Int, reason: String, attempts: Int)] = [:]
    /// Repairs of one worker's step tried before its failure is final.
    static let repairAttempts = 3

    /// Bytes per frame of a bulk transfer (1-4 MiB). `FT_EC_FRAME_BYTES`
    /// overrides it (4 KiB...64 MiB), so tests can spread a small image over many frames.
    static let frameBytes: Int = {
        guard let v = ProcessInfo.processInfo.environment["FT_EC_FRAME_BYTES"].flatMap(Int.init) else { return 4 << 20 }
        return min(max(v, 4096), 64 << 20)
    }()
    /// Frames of a rebuild in flight at once (each asks k survivors): about 32 MiB, 2...16 frames.
    static var rebuildWindow: Int { min(16, max(2, (32 << 20) / frameBytes)) }
    /// How long a rebuild waits for one frame from one survivor before asking another.
    static let fetchTimeout = 5.0
    static let noLayout = ECRoundInstance.noLayout

    init(layout: ECLayout, node: String) throws {
        guard let (g, p) = layout.locate(node) else { throw SMPError(.notInLayout, "node \(node) is in no EC group of the layout") }
        self.layout = layout
        group = g
        position = p
        codec = try ReedSolomon(dataCount: layout.k, parityCount: layout.m)
        // A chunk is acked once all of it is folded, and a node's chunks stream to their
        // holders side by side, so the first ack can come as late as the whole round's
        // end: allow everything this node sends (k chunks to up to m holders each) at
        // 50 MB/s before taking the round for stalled (10 s at least). A stall then
        // resends only the chunks still owed. (At 1 GiB per node over CURVE here, a
        // round's first pass took ~19 s; the earlier chunk-sized allowance, 10 s,
        // sent it whole a second time.)
        let outgoing = Double(layout.chunkBytes) * Double(layout.k * layout.m)
        round = ECRoundInstance(k: layout.k, m: layout.m, chunkBytes: layout.chunkBytes, frameBytes: Self.frameBytes,
                                members: layout.groups[g], position: p, stallResend: max(10, outgoing / 50e6))
        // Received frames are malloc'd by libzmq (4 MiB each): keep such blocks
        // off mmap and untrimmed, so they are reused rather than faulted in anew
        // for every frame (page faults cost more than the fold).
        _ = keepFreedBlocks(below: 32 << 20, trimAbove: 512 << 20)
    }

    deinit {
        for (_, rows) in buffers { for (_, b) in rows { b.deallocate() } }
        for b in spareParity { b.deallocate() }
        for s in peers.values { s.close() }
    }

    var parityBytesHeld: Int { round.parityChunksHeld * chunkBytes }

    /// A core for fetching codeword bytes of `step` from this node's group.
    func fetchCore(step: Int, lost: Set<String>, purpose: RebuildInstance.Purpose) -> RebuildInstance {
        RebuildInstance(step: step, lost: lost, purpose: purpose, k: layout.k, m: layout.m, chunkBytes: chunkBytes,
                        frameBytes: Self.frameBytes, members: members, position: position, window: Self.rebuildWindow,
                        timeout: Self.fetchTimeout)
    }

    /// The earliest time a core wants to be woken (a resend, a fetch deadline).
    var wakeAt: Double? { [round.wakeAt, rebuilding?.core.wakeAt, repairing?.core.wakeAt].compactMap { $0 }.min() }
}

/// A rebuild or a repair in progress: its core, the answers it holds (until
/// their frame is decoded), and where decoded image bytes go.
final class FetchJob {
    struct AnswerKey: Hashable {
        var row: Int
        var offset: Int
        var index: Int
    }
    var core: RebuildInstance
    let started: Double
    var answers: [AnswerKey: [ZMQMessage]] = [:]
    /// The image's first bytes (a rebuild's manifest).
    var prefix = UnsafeMutableRawBufferPointer.allocate(byteCount: 0, alignment: 64)
    var parsed: NodeImage?
    /// Image byte ranges and where they go (a slot's memory; nil: the manifest, already read).
    var targets: [(range: Range<Int>, base: UnsafeMutableRawPointer?)] = []
    /// A repair's worker and the chunks to check once it is over.
    var repairWorker: String?
    /// A repair's corrupt chunks as they were before it (slot ranges and bytes):
    /// a repair that fails says whether the decode changed them at all.
    var corruptBefore: [(range: Range<Int>, bytes: [UInt8])] = []
    /// Which attempt at this repair this is (1 for the first).
    var attempt = 1

    init(core: RebuildInstance, started: Double) {
        self.core = core
        self.started = started
    }

    deinit { prefix.deallocate() }
}

/// Zero-copy frames handed to libzmq and not yet released by it: slot and
/// parity memory must not be unmapped or freed while this is above zero.
enum ZeroCopyFrames {
    static let outstanding = Atomic<Int>(0)

    /// A frame over `bytes`, counted until libzmq releases it.
    static func frame(_ bytes: UnsafeRawBufferPointer) -> ZMQFrame {
        outstanding.add(1, ordering: .relaxed)
        return .noCopy(bytes, release: { outstanding.subtract(1, ordering: .releasing) })
    }

    /// Waits, at most 2 s, until libzmq has released every zero-copy frame
    /// (call it once the sockets that sent them are closed, before the memory
    /// they point into is unmapped or freed).
    static func quiesce(logger: Logger) {
        let deadline = monotonicSeconds() + 2
        while outstanding.load(ordering: .acquiring) > 0 && monotonicSeconds() < deadline { usleep(1000) }
        let left = outstanding.load(ordering: .acquiring)
        if left > 0 { logger.warning("\(left) zero-copy frames still held by libzmq after 2 s; unmapping anyway") }
    }
}
