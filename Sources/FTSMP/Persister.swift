import FTCore
import FTPersist
import FTSystem
import Foundation
import Synchronization

/// The persistent tier at one SMP: writes this node's part of a committed
/// step (`PersistedPart`) on a thread of its own, one at a time, while the
/// event loop goes on. The slots it reads are pinned in the store (a
/// snapshot that would overwrite one is skipped) and the coordinator commits
/// no further round until every node answered; the parity it writes is a
/// copy taken on the event loop when the persist starts (parity buffers are
/// reused once the next round commits, and dropped with a layout change).
final class Persister {
    struct Job {
        var part: PersistedPart
        var manifest: [UInt8]
        var layout: NodeImageLayout
        var bases: [UnsafeRawPointer]
        var parity: [UnsafeMutableRawBufferPointer]
    }

    struct Outcome: Sendable {
        var step: Int
        var result: Result<PartWriter.Result, PersistError>
    }

    let root: String
    let keep: Int
    /// The newest durable step when the persist in progress was ordered: retention spares it.
    var keepDurable: Int?
    let bytesPerSecond: Double?
    private var thread: Thread?
    /// What the persist thread shares with the loop.
    final class Shared: Sendable {
        let finished = Mutex<Outcome?>(nil)
    }
    private let shared = Shared()
    private var cancel = PersistCancel()
    private var parity: [UnsafeMutableRawBufferPointer] = []
    /// The step being written, and since when.
    private(set) var running: (step: Int, started: Double)?

    init(root: String, keep: Int, bytesPerSecond: Double?) {
        self.root = root
        self.keep = keep
        self.bytesPerSecond = bytesPerSecond
    }

    var isRunning: Bool { running != nil }

    func start(_ job: Job) {
        precondition(running == nil)
        running = (job.part.step, monotonicSeconds())
        parity = job.parity
        cancel = PersistCancel()
        let writer = PartWriter(root: root, bytesPerSecond: bytesPerSecond)
        let cancel = cancel
        let box = UncheckedBox(job)
        let t = Thread { [shared] in
            // Bulk work: it must not take a core from training or the snapshot copies.
            ThreadPriority.lowerCurrentThread()
            let job = box.value
            let m = UnsafeMutableRawBufferPointer.allocate(byteCount: job.manifest.count, alignment: 8)
            defer { m.deallocate() }
            m.copyBytes(from: job.manifest)
            let result: Result<PartWriter.Result, PersistError>
            do throws(PersistError) {
                let r = try writer.write(part: job.part, image: { range in
                    job.layout.pieces(range).map { p in
                        switch p.source {
                        case .manifest: UnsafeRawBufferPointer(rebasing: m[p.offset..<p.offset + p.count])
                        case .slot(let i): UnsafeRawBufferPointer(start: job.bases[i] + p.offset, count: p.count)
                        }
                    }
                }, parity: job.parity.map { UnsafeRawBufferPointer($0) }, cancel: cancel)
                result = .success(r)
            } catch {
                result = .failure(error)
            }
            shared.finished.withLock { $0 = Outcome(step: job.part.step, result: result) }
        }
        t.name = "ft-persist"
        t.stackSize = 1 << 20
        thread = t
        t.start()
    }

    /// The persist that ended since the last call, if one did (its parity copies freed).
    func poll() -> Outcome? {
        guard let outcome = shared.finished.withLock({ o -> Outcome? in defer { o = nil }; return o }) else { return nil }
        release()
        return outcome
    }

    /// Stops a persist in progress and waits for its thread (before the slots go).
    func stopAndWait() {
        guard running != nil else { return }
        cancel.cancel()
        while shared.finished.withLock({ $0 == nil }) { usleep(2000) }
        _ = poll()
    }

    private func release() {
        for b in parity { b.deallocate() }
        parity = []
        running = nil
        thread = nil
    }
}

/// Moves a value that is not `Sendable` (raw pointers into memory that stays
/// put while the thread runs) into a thread.
struct UncheckedBox<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

/// Takes a node image's bytes as a loader delivers them (`ImageLoader`: in
/// increasing offsets, possibly again from 0 after a fallback) and puts them
/// into freshly registered slots: the manifest first (then the workers it
/// names are registered and their slots allocated), then each slot's bytes.
final class ImageSink {
    private let memory: NodeMemory
    private var prefix: [UInt8] = []
    private(set) var image: NodeImage?
    private var layout: NodeImageLayout?
    private var bases: [UnsafeMutableRawPointer] = []

    init(memory: NodeMemory) { self.memory = memory }

    func accept(_ offset: Int, _ bytes: UnsafeRawBufferPointer) throws {
        var offset = offset
        var bytes = bytes
        if image == nil {
            // Bytes of the manifest, gathered until it is whole.
            if offset <= prefix.count, offset + bytes.count > prefix.count {
                prefix += bytes[(prefix.count - offset)...]
            }
            guard prefix.count >= 4 else { return }
            let length = try NodeImage.manifestLength(prefix: prefix)
            guard prefix.count >= length else { return }
            let parsed = try NodeImage.parse(prefix)
            layout = NodeImageLayout(manifestBytes: length, slotBytes: parsed.entries.map(\.slotBytes))
            bases = try memory.slotsForRebuild(parsed)
            image = parsed
            // What came with the manifest's last bytes goes on to the slots.
            let skip = max(0, length - offset)
            guard skip < bytes.count else { return }
            bytes = UnsafeRawBufferPointer(rebasing: bytes[skip...])
            offset += skip
        }
        guard let layout else { return }
        for piece in layout.pieces(offset..<offset + bytes.count) {
            guard case .slot(let i) = piece.source else { continue }
            let from = piece.imageOffset - offset
            (bases[i] + piece.offset).copyMemory(from: bytes.baseAddress! + from, byteCount: piece.count)
        }
    }
}
