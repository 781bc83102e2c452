import FTCore
import FTErasure
import FTPersist
import FTSMP
import FTSystem
import FTWorker
import Foundation
import Logging
import Synchronization

/// `ft-bench persist`: the persistent tier (`PartWriter`, `ImageLoader`)
/// against the disk it writes to, measured in the same run, in the same
/// directory.
///
/// One node's part of a committed step: an image of `imageBytes` (random
/// bytes) and, as a node of an RS(3+1) group holds, one parity chunk of
/// `ceil(image / 3)` (`ParityPlacement.chunkBytes`).
///
/// 1. `persist_vs_disk_write`: `PartWriter.write` of that part (image.bin,
///    parity.bin, part.json; a CRC32C per block, every file fsynced, the
///    renames and directory fsyncs) against the bench's own sequential
///    write of the same number of bytes to one file in the same directory,
///    in writes of the same block size from the same memory, then one
///    fsync. Throughput over throughput, medians of `repeats`, the two
///    alternating; dirty pages are flushed, the previous files removed and
///    a ballast file of the same bytes written and deleted (`ballast`)
///    before each timed write.
/// 2. `disk_restore_vs_read`: `ImageLoader.load` of the part's image into a
///    sink that copies into a pre-faulted buffer, against reading image.bin
///    with plain 1 MiB reads straight into a pre-faulted buffer; before each,
///    a ballast of the image's size, then the file is evicted from the page cache (`posix_fadvise(DONTNEED)`,
///    the files being fsynced) and its residency is checked with `mincore`
///    (`echo 1 > /proc/sys/vm/drop_caches`, as root, if fadvise left pages).
/// 3. `blocked_vs_copy_while_persisting`: a real SMP on a thread of this
///    process (as `ft-bench snapshot`) and one worker (`SnapshotClient`)
///    whose shard is `imageBytes`, in a training loop (compute, then
///    `waitBeforeUpdate`, the update, `snapshot`): the time the loop is
///    blocked per snapshot while a `PartWriter` writes a part of the same
///    size on another thread, over the copy time of one snapshot (synchronous
///    staging, median). What is emulated: the persist reads a buffer of its
///    own of the image's size (a stand-in for the committed slots the SMP
///    pins; same bytes moved) and is started by the bench, not by a
///    coordinator's `persist`; the SMP runs without a coordinator, so it
///    neither pins the slot nor holds the next commit back, and every
///    snapshot during the persist copies in full (in a job, the one after
///    the persisted step stages and the later ones are skipped until the
///    persist ends): the worst case for contention. Also reported: the
///    same loop without a persist, and each snapshot's round (begin, copy
///    with CRCs, staged) with and without, which says whether the blocked
///    time is a copy slowed down by the persist.
public struct PersistBench: Sendable {
    public var imageBytes = 1 << 30
    /// Where the bench makes its temporary directory (removed at the end).
    public var directory = "/tmp"
    public var repeats = 5
    public var blockBytes = PersistedPart.defaultBlockBytes
    /// The EC layout whose parity share the part carries.
    public var k = 3
    public var m = 1
    /// Steps of the training loop without a persist.
    public var asyncSteps = 8
    /// Compute per step; nil: 1.5 × the measured staging time (as `ft-bench snapshot`).
    public var stepSeconds: Double?
    /// Write and delete a ballast file before each timed write or read of phases 1 and 2 (`ballast`).
    public var warmPageCacheMemory = true
    /// Where the ballast goes (set by `run`: its temporary directory).
    var ballastDirectory = "/tmp"

    public init() {}

    public func run(progress: (String) -> Void = { _ in }) throws -> BenchReport {
        guard imageBytes >= 1 << 20, repeats >= 1, asyncSteps >= 1 else {
            throw BenchError(.unavailable, "persist bench: image of at least 1 MiB, at least one repeat and one step")
        }
        let root = try makeTemporaryDirectory(in: directory)
        defer { try? FileManager.default.removeItem(atPath: root) }
        var bench = self
        bench.ballastDirectory = root
        return try bench.measure(root: root, progress: progress)
    }

    func measure(root: String, progress: (String) -> Void) throws -> BenchReport {
        var report = BenchReport(section: "persist")
        let mib = imageBytes >> 20

        progress("image of \(mib) MiB: allocating and pre-faulting")
        let image = AlignedBuffer(count: imageBytes)
        image.randomize(seed: 11)
        let chunk = ParityPlacement.chunkBytes(forNodeBytes: [imageBytes], k: k)
        let parityRows = ParityPlacement(k: k, m: m).parityRows(of: 0)
        let parity = AlignedBuffer(count: chunk * parityRows.count)
        parity.randomize(seed: 12)
        let part = template(step: 1, chunk: chunk, rows: parityRows)
        let totalBytes = imageBytes + parity.count

        // Floors of the CPU work a persist and a load add to the disk's.
        let crcSeconds = median((0..<3).map { _ in timeSeconds { _ = CRC32C.checksum(UnsafeRawBufferPointer(image.bytes)) } })
        // The loads' destination (freed before phase 3, which allocates the worker's shard and the SMP's slots).
        var targetBuffer: AlignedBuffer? = AlignedBuffer(count: imageBytes)
        let target = targetBuffer!
        let memcpySeconds = median((0..<3).map { _ in timeSeconds { memcpy(target.base, image.base, imageBytes) } })

        // 1. Writing.
        let cpuWrites = CPUSample()
        let writeRoot = root + "/write"
        let rawPath = root + "/raw-write.bin"
        var persistT: [Double] = [], rawT: [Double] = []
        var written = 0
        for r in 0..<repeats {
            // Alternate which goes first, so that drift in the disk's speed falls on both.
            for which in (r % 2 == 0 ? [0, 1] : [1, 0]) {
                try ballast([image.bytes, parity.bytes])
                if which == 0 {
                    progress("write \(r + 1)/\(repeats): PartWriter, \(totalBytes >> 20) MiB")
                    var p = part
                    p.step = r + 1
                    let result = try persist(p, root: writeRoot, image: image, parity: parity, chunk: chunk)
                    persistT.append(result.seconds)
                    progress("  PartWriter: \(rate(totalBytes, result.seconds))")
                    written = result.bytes
                    if r + 1 < repeats { removeStep(root: writeRoot, step: r + 1) }
                } else {
                    progress("write \(r + 1)/\(repeats): raw sequential write + fsync, \(totalBytes >> 20) MiB")
                    rawT.append(try rawWrite(path: rawPath, [image.bytes, parity.bytes]))
                    progress("  raw write: \(rate(totalBytes, rawT.last!))")
                    unlink(rawPath)
                }
            }
        }
        guard written == totalBytes else {
            throw BenchError(.mismatch, "PartWriter wrote \(written) bytes, the part has \(totalBytes)")
        }
        settle()

        let busyWrites = CPUSample().since(cpuWrites)

        // 2. Reading back (the last persisted part).
        let cpuReads = CPUSample()
        let step = repeats
        let catalog = PersistCatalog(root: writeRoot)
        guard catalog.parts[step]?[part.node] != nil else {
            throw BenchError(.unexpectedOutcome, "the catalog of \(writeRoot) has no part of step \(step): \(catalog.unreadable)")
        }
        let partDir = PersistPaths.partDirectory(writeRoot, step: step, node: part.node)
        let imagePath = partDir + "/" + PersistPaths.imageFile
        var loadT: [Double] = [], readT: [Double] = []
        var resident: [Double] = []
        var droppedCaches = false
        for r in 0..<repeats {
            for which in (r % 2 == 0 ? [0, 1] : [1, 0]) {
                memset(target.base, 0, imageBytes)
                try ballast([image.bytes])
                let e = try evict(partDir, imagePath)
                resident.append(e.resident)
                droppedCaches = droppedCaches || e.dropped
                if which == 0 {
                    progress("read \(r + 1)/\(repeats): ImageLoader.load, \(mib) MiB (resident before: \(pct(e.resident)))")
                    var loaded = 0
                    let t = try timeSeconds {
                        let l = try ImageLoader(catalog: catalog).load(step: step, node: part.node) { offset, bytes in
                            guard offset + bytes.count <= imageBytes else {
                                throw BenchError(.unexpectedOutcome, "the loader delivered bytes \(offset)..<\(offset + bytes.count) of a \(imageBytes)-byte image")
                            }
                            memcpy(target.base + offset, bytes.baseAddress!, bytes.count)
                            loaded += bytes.count
                        }
                        guard l.fromOwnPart else { throw BenchError(.unexpectedOutcome, "the image was decoded, not read from its own part") }
                    }
                    guard loaded == imageBytes, memcmp(target.base, image.base, imageBytes) == 0 else {
                        throw BenchError(.mismatch, "the loaded image differs from the persisted one (\(loaded) bytes delivered)")
                    }
                    loadT.append(t)
                    progress("  ImageLoader.load: \(rate(imageBytes, t))")
                } else {
                    progress("read \(r + 1)/\(repeats): raw sequential read, \(mib) MiB (resident before: \(pct(e.resident)))")
                    readT.append(try rawRead(path: imagePath, into: target))
                    progress("  raw read: \(rate(imageBytes, readT.last!))")
                    guard memcmp(target.base, image.base, imageBytes) == 0 else {
                        throw BenchError(.mismatch, "the raw read of \(imagePath) differs from the persisted image")
                    }
                }
            }
        }
        removeStep(root: writeRoot, step: step)
        settle()
        withExtendedLifetime(target) {}
        targetBuffer = nil

        let busyReads = CPUSample().since(cpuReads)

        // 3. Training while persisting.
        let cpuTraining = CPUSample()
        let training = try measureTraining(root: root + "/smp-persist", persistImage: image, parity: parity, chunk: chunk,
                                           template: part, progress: progress)

        let busyTraining = CPUSample().since(cpuTraining)

        // The report.
        let persistGBps = Double(totalBytes) / median(persistT) / 1e9
        let rawWriteGBps = Double(totalBytes) / median(rawT) / 1e9
        let loadGBps = Double(imageBytes) / median(loadT) / 1e9
        let rawReadGBps = Double(imageBytes) / median(readT) / 1e9
        report.figure("image_bytes", Double(imageBytes))
        report.figure("parity_bytes", Double(parity.count))
        report.figure("persist_bytes", Double(totalBytes))
        report.figure("block_bytes", Double(blockBytes))
        report.figure("repeats", Double(repeats))
        report.figure("crc32c_gbps", Double(imageBytes) / crcSeconds / 1e9)
        report.figure("memcpy_gbps", Double(imageBytes) / memcpySeconds / 1e9)
        report.figure("persist_ms", median(persistT) * 1e3)
        report.figure("persist_gbps", persistGBps)
        report.figure("disk_write_fsync_ms", median(rawT) * 1e3)
        report.figure("disk_write_fsync_gbps", rawWriteGBps)
        report.figure("persist_gbps_min", Double(totalBytes) / (persistT.max() ?? .nan) / 1e9)
        report.figure("persist_gbps_max", Double(totalBytes) / (persistT.min() ?? .nan) / 1e9)
        report.figure("disk_write_fsync_gbps_min", Double(totalBytes) / (rawT.max() ?? .nan) / 1e9)
        report.figure("disk_write_fsync_gbps_max", Double(totalBytes) / (rawT.min() ?? .nan) / 1e9)
        report.figure("restore_ms", median(loadT) * 1e3)
        report.figure("restore_gbps", loadGBps)
        report.figure("disk_read_cold_ms", median(readT) * 1e3)
        report.figure("disk_read_cold_gbps", rawReadGBps)
        report.figure("restore_gbps_min", Double(imageBytes) / (loadT.max() ?? .nan) / 1e9)
        report.figure("restore_gbps_max", Double(imageBytes) / (loadT.min() ?? .nan) / 1e9)
        report.figure("disk_read_cold_gbps_min", Double(imageBytes) / (readT.max() ?? .nan) / 1e9)
        report.figure("disk_read_cold_gbps_max", Double(imageBytes) / (readT.min() ?? .nan) / 1e9)
        report.figure("page_cache_resident_before_read_max", resident.max() ?? .nan)
        report.figure("drop_caches_used", droppedCaches ? 1 : 0)
        report.figure("ballast_before_each", warmPageCacheMemory ? 1 : 0)
        report.figure("other_cpu_cores_writes", busyWrites.other)
        report.figure("other_cpu_cores_reads", busyReads.other)
        report.figure("other_cpu_cores_training", busyTraining.other)
        report.figure("steal_cores_writes", busyWrites.steal)
        report.figure("steal_cores_reads", busyReads.steal)
        report.figure("steal_cores_training", busyTraining.steal)
        report.figure("snapshot_bytes", Double(training.shardBytes))
        report.figure("snapshot_copy_ms", training.copySeconds * 1e3)
        report.figure("step_compute_ms", training.stepSeconds * 1e3)
        report.figure("blocked_ms_per_snapshot", median(training.blockedPlain) * 1e3)
        report.figure("blocked_ms_per_snapshot_mean", mean(training.blockedPlain) * 1e3)
        report.figure("blocked_ms_per_snapshot_while_persisting", median(training.blockedPersisting) * 1e3)
        report.figure("blocked_ms_per_snapshot_while_persisting_mean", mean(training.blockedPersisting) * 1e3)
        report.figure("blocked_ms_per_snapshot_while_persisting_p90", percentile(training.blockedPersisting, 90) * 1e3)
        report.figure("blocked_ms_per_snapshot_while_persisting_max", (training.blockedPersisting.max() ?? .nan) * 1e3)
        report.figure("blocked_mean_vs_copy_while_persisting", mean(training.blockedPersisting) / training.copySeconds)
        report.figure("snapshot_round_ms", median(training.roundsPlain) * 1e3)
        report.figure("snapshot_round_ms_while_persisting", median(training.roundsPersisting) * 1e3)
        report.figure("snapshot_round_ms_while_persisting_max", (training.roundsPersisting.max() ?? .nan) * 1e3)
        report.figure("snapshots_while_persisting", Double(training.blockedPersisting.count))
        report.figure("snapshots_skipped", Double(training.skipped))
        report.figure("persist_ms_while_training", median(training.persistSeconds) * 1e3)
        report.figure("persist_gbps_while_training", Double(totalBytes) / median(training.persistSeconds) / 1e9)
        // The same ratios repeat by repeat (each persist with the raw write next to it in time): how far they scatter.
        let writePairs = zip(persistT, rawT).map { $1 / $0 }
        let readPairs = zip(loadT, readT).map { $1 / $0 }
        report.figure("persist_vs_disk_write_per_repeat_min", writePairs.min() ?? .nan)
        report.figure("persist_vs_disk_write_per_repeat_median", median(writePairs))
        report.figure("persist_vs_disk_write_per_repeat_max", writePairs.max() ?? .nan)
        report.figure("disk_restore_vs_read_per_repeat_min", readPairs.min() ?? .nan)
        report.figure("disk_restore_vs_read_per_repeat_median", median(readPairs))
        report.figure("disk_restore_vs_read_per_repeat_max", readPairs.max() ?? .nan)
        report.ratio("persist_vs_disk_write", persistGBps / rawWriteGBps)
        report.ratio("disk_restore_vs_read", loadGBps / rawReadGBps)
        report.ratio("blocked_vs_copy_while_persisting", median(training.blockedPersisting) / training.copySeconds)
        report.ratio("blocked_vs_copy", median(training.blockedPlain) / training.copySeconds)

        report.table = [["measure", "system", "floor", "ratio", "bar"]]
        report.table.append(["write \(totalBytes >> 20) MiB (GB/s)", f(persistGBps), f(rawWriteGBps), f(persistGBps / rawWriteGBps), ">= 0.7"])
        report.table.append(["restore \(mib) MiB cold (GB/s)", f(loadGBps), f(rawReadGBps), f(loadGBps / rawReadGBps), ">= 0.7"])
        report.table.append(["blocked/snapshot persisting (ms)", f(median(training.blockedPersisting) * 1e3), f(training.copySeconds * 1e3),
                             String(format: "%.4f", median(training.blockedPersisting) / training.copySeconds), "<= 0.1"])
        report.table.append(["blocked/snapshot no persist (ms)", f(median(training.blockedPlain) * 1e3), f(training.copySeconds * 1e3),
                             String(format: "%.4f", median(training.blockedPlain) / training.copySeconds), ""])
        report.notes.append("persist_vs_disk_write: PartWriter (image \(mib) MiB + RS(\(k)+\(m)) parity \(parity.count >> 20) MiB, CRC32C per "
                            + "\(blockBytes >> 10) KiB block, fsync per file, renames) over one sequential write of the same bytes in "
                            + "\(blockBytes >> 10) KiB writes + fsync, same directory; disk_restore_vs_read: ImageLoader.load (CRC check, copy "
                            + "into a buffer) over plain reads into a buffer, both after evicting the file from the page cache; medians of "
                            + "\(repeats). blocked_vs_copy_while_persisting: median time a training loop blocked per snapshot (in-process SMP, "
                            + "\(training.shardBytes >> 20) MiB shard, \(f(training.stepSeconds * 1e3)) ms compute per step) while a PartWriter "
                            + "wrote a part of the same size on another thread, over the synchronous copy time of one snapshot; blocked_vs_copy: "
                            + "the same without a persist.")
        return report
    }

    // MARK: writing

    func template(step: Int, chunk: Int, rows: [(row: Int, parityIndex: Int)]) -> PersistedPart {
        let group = (0..<(k + m)).map { "n\($0)" }
        return PersistedPart(job: "ft-bench-persist", node: "n0", step: step, k: k, m: m, chunkBytes: chunk, group: group, position: 0,
                             nodes: group, imageBytes: imageBytes, blockBytes: blockBytes, imageCRCs: [],
                             parityRows: rows.map { .init(row: $0.row, parityIndex: $0.parityIndex, crcs: []) }, writtenAt: 0)
    }

    func persist(_ part: PersistedPart, root: String, image: AlignedBuffer, parity: AlignedBuffer, chunk: Int,
                 cancel: PersistCancel? = nil) throws -> PartWriter.Result {
        var writer = PartWriter(root: root)
        writer.blockBytes = blockBytes
        let rows = (0..<part.parityRows.count).map { UnsafeRawBufferPointer(parity.slice($0 * chunk, chunk)) }
        return try writer.write(part: part, image: { range in [UnsafeRawBufferPointer(image.slice(range.lowerBound, range.count))] },
                                parity: rows, cancel: cancel)
    }

    /// The floor: the image's and the parity's bytes, one file, `blockBytes` per write, one fsync.
    func rawWrite(path: String, _ sources: [UnsafeMutableRawBufferPointer]) throws -> Double {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw BenchError(.io, "cannot create \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var failure: Int32 = 0
        let t = timeSeconds {
            for source in sources {
                var offset = 0
                while offset < source.count, failure == 0 {
                    let n = min(blockBytes, source.count - offset)
                    var done = 0
                    while done < n {
                        let w = Glibc.write(fd, source.baseAddress! + offset + done, n - done)
                        if w < 0 {
                            if errno == EINTR { continue }
                            failure = errno
                            break
                        }
                        done += w
                    }
                    offset += n
                }
            }
            if failure == 0, fsync(fd) != 0 { failure = errno }
        }
        guard failure == 0 else { throw BenchError(.io, "writing \(path): \(String(cString: strerror(failure)))") }
        return t
    }

    // MARK: reading

    /// The floor: plain reads of `blockBytes` straight into `target`.
    func rawRead(path: String, into target: AlignedBuffer) throws -> Double {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw BenchError(.io, "cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL)  // the hint the loader gives too
        var failure: String?
        let t = timeSeconds {
            var done = 0
            while done < target.count {
                let n = Glibc.read(fd, target.base + done, min(blockBytes, target.count - done))
                if n < 0, errno == EINTR { continue }
                guard n > 0 else {
                    failure = n == 0 ? "end of file at \(done)" : String(cString: strerror(errno))
                    break
                }
                done += n
            }
        }
        if let failure { throw BenchError(.io, "reading \(path): \(failure)") }
        return t
    }

    /// Evicts the part's files from the page cache; returns the fraction of
    /// the image still resident (mincore) and whether drop_caches was needed.
    func evict(_ partDir: String, _ imagePath: String) throws -> (resident: Double, dropped: Bool) {
        for name in [PersistPaths.imageFile, PersistPaths.parityFile, PersistPaths.manifestFile] {
            let fd = open(partDir + "/" + name, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { continue }
            fdatasync(fd)  // already fsynced by PartWriter; clean pages are what DONTNEED drops
            _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
            close(fd)
        }
        var resident = try residentFraction(imagePath)
        var dropped = false
        if resident > 0.01, geteuid() == 0 {
            sync()
            let fd = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC)
            if fd >= 0 {
                _ = Glibc.write(fd, "1", 1)
                close(fd)
                dropped = true
                resident = try residentFraction(imagePath)
            }
        }
        return (resident, dropped)
    }

    /// The fraction of `path`'s pages in the page cache.
    func residentFraction(_ path: String) throws -> Double {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw BenchError(.io, "cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_size > 0 else { return 0 }
        let size = Int(st.st_size)
        guard let map = mmap(nil, size, PROT_READ, MAP_SHARED, fd, 0), map != MAP_FAILED else {
            throw BenchError(.io, "cannot map \(path): \(String(cString: strerror(errno)))")
        }
        defer { munmap(map, size) }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let pages = (size + page - 1) / page
        var vec = [UInt8](repeating: 0, count: pages)
        guard mincore(map, size, &vec) == 0 else { throw BenchError(.io, "mincore \(path): \(String(cString: strerror(errno)))") }
        return Double(vec.reduce(0) { $0 + Int($1 & 1) }) / Double(pages)
    }

    // MARK: training while persisting

    struct Training {
        var shardBytes: Int
        var copySeconds: Double
        var stepSeconds: Double
        var blockedPlain: [Double]
        var blockedPersisting: [Double]
        /// The snapshots' rounds (begin, copy with CRCs, staged) in the loop.
        var roundsPlain: [Double]
        var roundsPersisting: [Double]
        var persistSeconds: [Double]
        var skipped: Int
    }

    /// The persist thread's outcome.
    final class PersistRun: Sendable {
        let running = Atomic<Bool>(true)
        let outcome = Mutex<Result<Written, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
    }

    struct Unchecked<T>: @unchecked Sendable { let value: T }

    struct Written: Sendable {
        var bytes: Int
        var seconds: Double
    }

    func measureTraining(root: String, persistImage: AlignedBuffer, parity: AlignedBuffer, chunk: Int, template: PersistedPart,
                         progress: (String) -> Void) throws -> Training {
        try withSMP { server, jobID in
            let size = imageBytes
            let half = size / 2
            progress("training: a \(size >> 20) MiB shard, allocating and registering")
            let params = AlignedBuffer(count: half)
            let moments = AlignedBuffer(count: size - half)
            params.randomize(seed: 1)
            moments.randomize(seed: 2)
            let client = try SnapshotClient(identity: WorkerIdentity(jobID: jobID, workerID: "w0", dpRank: 0, dpSize: 1,
                                                                     smpEndpoint: server.boundEndpoint))
            try client.register([
                RegisteredTensor(spec: TensorSpec(name: "params", dtype: .u8, shape: [half], role: .param, replicated: false),
                                 buffer: params.bytes),
                RegisteredTensor(spec: TensorSpec(name: "moments", dtype: .u8, shape: [size - half], role: .optimizer, replicated: false),
                                 buffer: moments.bytes),
            ])
            var step = 0
            // The copy time of one snapshot: synchronous staging, no persist running.
            progress("training: copy time of one snapshot (synchronous staging), \(repeats + 1) times")
            var staging: [Double] = []
            for r in 0...repeats {
                step += 1
                let s = step
                let t = try timeSeconds {
                    try client.snapshot(step: s)
                    try client.waitForRound()
                }
                if r > 0 { staging.append(t) }  // the first one faults the slots' pages in
            }
            let copy = median(staging)
            let compute = stepSeconds ?? copy * 1.5
            let skippedBefore = client.stats.snapshotsSkipped

            /// One step of the loop after a snapshot was issued: compute,
            /// wait, update, next snapshot. Returns the time blocked and
            /// how long the previous snapshot's round took (begin, copy, staged).
            func trainingStep() throws -> (blocked: Double, round: Double) {
                let before = client.stats.blockedSeconds
                spin(seconds: compute)
                try client.waitBeforeUpdate()
                params.base.storeBytes(of: UInt64(step), as: UInt64.self)
                step += 1
                try client.snapshot(step: step)  // returns once the previous round is over
                let stats = client.stats
                return (stats.blockedSeconds - before, stats.lastRoundSeconds)
            }

            progress("training: \(asyncSteps) steps of \(String(format: "%.1f", compute * 1e3)) ms compute, no persist")
            var plain: [Double] = []
            step += 1
            try client.snapshot(step: step)
            var plainRounds: [Double] = []
            for _ in 0..<asyncSteps {
                let s = try trainingStep()
                plain.append(s.blocked)
                plainRounds.append(s.round)
            }
            try client.waitForRound()

            var persisting: [Double] = []
            var persistingRounds: [Double] = []
            var persistSeconds: [Double] = []
            let image = Unchecked(value: (persistImage, parity))
            for r in 0..<repeats {
                // No ballast here: the persist meets memory as the SMP's would.
                settle()
                progress("training while persisting \(r + 1)/\(repeats): \((persistImage.count + parity.count) >> 20) MiB")
                let run = PersistRun()
                let countBefore = persisting.count
                var stepPart = template
                stepPart.step = r + 1
                let part = stepPart
                let bench = self
                let thread = Thread {
                    ThreadPriority.lowerCurrentThread()  // as the SMP's persist thread runs (`Persister`)
                    let (img, par) = image.value
                    let result = Result<Written, any Error>(catching: {
                        let w = try bench.persist(part, root: root, image: img, parity: par, chunk: chunk)
                        return Written(bytes: w.bytes, seconds: w.seconds)
                    })
                    run.outcome.withLock { $0 = result }
                    run.running.store(false, ordering: .releasing)
                    run.done.signal()
                }
                thread.name = "ft-persist"
                thread.stackSize = 1 << 20
                thread.start()
                // Every step whose snapshot was issued while the persist ran
                // (its copy overlaps the persist) counts.
                step += 1
                try client.snapshot(step: step)
                while run.running.load(ordering: .acquiring) {
                    let s = try trainingStep()
                    persisting.append(s.blocked)
                    persistingRounds.append(s.round)
                }
                try client.waitForRound()
                run.done.wait()
                switch run.outcome.withLock({ $0 })! {
                case .success(let w):
                    persistSeconds.append(w.seconds)
                    let mine = persisting.suffix(from: countBefore), rounds = persistingRounds.suffix(from: countBefore)
                    progress("  persist: \(rate(w.bytes, w.seconds)); \(mine.count) snapshots, blocked ms: "
                             + mine.map { String(format: "%.1f", $0 * 1e3) }.joined(separator: " ")
                             + "; their rounds ms: " + rounds.map { String(format: "%.0f", $0 * 1e3) }.joined(separator: " "))
                case .failure(let e): throw e
                }
                removeStep(root: root, step: r + 1)
            }
            guard !persisting.isEmpty else { throw BenchError(.unexpectedOutcome, "no snapshot was taken while a persist ran") }
            return Training(shardBytes: size, copySeconds: copy, stepSeconds: compute, blockedPlain: plain, blockedPersisting: persisting,
                            roundsPlain: plainRounds, roundsPersisting: persistingRounds,
                            persistSeconds: persistSeconds, skipped: client.stats.snapshotsSkipped - skippedBefore)
        }
    }

    /// A real SMP on a thread of this process (no workers of its own, no
    /// coordinator), stopped and cleaned up afterwards.
    func withSMP<T>(_ body: (_ server: SMPServer, _ jobID: String) throws -> T) throws -> T {
        try InProcessSMP.with(directory: "/tmp/ft-bench-persist-smp-\(getpid())", jobID: "benchp\(getpid())") { server, jobID, _ in
            try body(server, jobID)
        }
    }

    // MARK: helpers

    /// CPU time on this machine outside this process (other processes, and
    /// the kernel's threads such as writeback) and time stolen by the host,
    /// between two samples, in cores: how busy the machine was with work not
    /// the bench's.
    struct CPUSample {
        var at = monotonicSeconds()
        var busy = 0.0, steal = 0.0, own = 0.0

        init() {
            let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
            if let line = (try? String(contentsOfFile: "/proc/stat", encoding: .utf8))?.split(separator: "\n").first {
                let v = line.split(separator: " ").dropFirst().compactMap { Double($0) }
                if v.count >= 8 {
                    busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / ticks  // user nice system irq softirq
                    steal = v[7] / ticks
                }
            }
            var usage = rusage()
            getrusage(RUSAGE_SELF.rawValue, &usage)
            own = Double(usage.ru_utime.tv_sec) + Double(usage.ru_utime.tv_usec) * 1e-6
                + Double(usage.ru_stime.tv_sec) + Double(usage.ru_stime.tv_usec) * 1e-6
        }

        func since(_ start: CPUSample) -> (other: Double, steal: Double) {
            let dt = max(at - start.at, 1e-9)
            return (max(0, (busy - start.busy) - (own - start.own)) / dt, (steal - start.steal) / dt)
        }
    }

    func makeTemporaryDirectory(in parent: String) throws -> String {
        var template = Array((parent + "/ft-bench-persist-XXXXXX").utf8CString)
        guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) != nil else {
            throw BenchError(.io, "cannot make a directory in \(parent): \(String(cString: strerror(errno)))")
        }
        return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Dirty pages out (what an earlier phase left must not land in the next one's fsync).
    func settle() { sync() }

    /// Untimed, right before each timed write or read: writes a file of the
    /// bytes about to be measured, fsyncs, deletes it and syncs. On a VM
    /// that hands memory free for a few seconds back to its host (free page
    /// reporting), the page cache of the next write or read would otherwise
    /// fault that memory back in at the host's pace: measured here at
    /// 0.3-0.7 GB/s, which made the same write take 1 s or 6 s at random.
    /// After the ballast the measured I/O gets memory just freed, as on a
    /// machine whose free memory is its own; the system and the floor alike.
    func ballast(_ sources: [UnsafeMutableRawBufferPointer]) throws {
        settle()
        guard warmPageCacheMemory else { return }
        let path = ballastDirectory + "/ballast.bin"
        _ = try rawWrite(path: path, sources)
        unlink(path)
        settle()
    }

    /// Busy CPU work for `seconds`, standing in for a step's compute.
    private func spin(seconds: Double) {
        let end = monotonicSeconds() + seconds
        var x: UInt64 = 1
        while monotonicSeconds() < end {
            for _ in 0..<1000 { x = x &* 6_364_136_223_846_793_005 &+ 1 }
        }
        if x == 42 { print("") }  // keep the loop
    }

    private func mean(_ v: [Double]) -> Double { v.isEmpty ? .nan : v.reduce(0, +) / Double(v.count) }
    private func f(_ v: Double) -> String { v.isFinite ? String(format: "%.2f", v) : "-" }
    private func rate(_ bytes: Int, _ seconds: Double) -> String {
        String(format: "%.2f s, %.3f GB/s", seconds, Double(bytes) / seconds / 1e9)
    }
    private func pct(_ v: Double) -> String { String(format: "%.1f%%", v * 100) }
}

/// Removes a step directory the bench wrote.
private func removeStep(root: String, step: Int) {
    try? FileManager.default.removeItem(atPath: PersistPaths.stepDirectory(root, step: step))
}
