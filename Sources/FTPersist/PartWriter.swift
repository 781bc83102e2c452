import FTCore
import FTErasure
import FTSystem
import Foundation
import Synchronization

/// Set from any thread to stop a persist between blocks.
public final class PersistCancel: Sendable {
    private let flag = Atomic<Bool>(false)
    public init() {}
    public func cancel() { flag.store(true, ordering: .relaxed) }
    public var isCancelled: Bool { flag.load(ordering: .relaxed) }
}

/// Writes one node's part of a committed step (`PersistedPart`) from memory
/// that stays put while it runs (the SMP pins the slots and parity it reads):
/// into a temporary directory, block by block with a CRC32C each, at most
/// `bytesPerSecond`, every file fsynced, the manifest last, then renamed into
/// place and the step directory fsynced. Any failure removes what it wrote.
/// Runs on the caller's thread (the SMP's persist thread); `cancel` stops it
/// between blocks.
public struct PartWriter: Sendable {
    public struct Result: Sendable {
        public var part: PersistedPart
        public var bytes: Int
        public var seconds: Double
    }

    public let root: String
    public var blockBytes = PersistedPart.defaultBlockBytes
    /// Bandwidth cap (bytes per second; nil: none).
    public var bytesPerSecond: Double?

    public init(root: String, bytesPerSecond: Double? = nil) {
        self.root = root
        self.bytesPerSecond = bytesPerSecond
    }

    /// Writes `part` (its CRC fields are filled in here): image bytes
    /// `0..<part.imageBytes` come from `image(range)` as contiguous pieces,
    /// parity row i from `parity[i]` (`part.chunkBytes` each).
    public func write(part template: PersistedPart, image: (Range<Int>) -> [UnsafeRawBufferPointer],
                      parity: [UnsafeRawBufferPointer], cancel: PersistCancel? = nil,
                      progress: (Int) -> Void = { _ in }) throws(PersistError) -> Result {
        let started = monotonicSeconds()
        var part = template
        part.blockBytes = blockBytes
        let stepDir = PersistPaths.stepDirectory(root, step: part.step)
        let tmp = stepDir + "/.\(part.node).tmp-\(getpid())"
        let final = PersistPaths.partDirectory(root, step: part.step, node: part.node)
        for attempt in 1... {
            try Self.makeDirectories(stepDir)
            Self.removeTree(tmp)
            if mkdir(tmp, 0o700) == 0 { break }
            let code = errno
            // Another node's failed write removes the step directory when it
            // is empty: it may have gone between the two calls.
            if code == ENOENT, attempt < 3 { continue }
            _ = rmdir(stepDir)  // only if empty
            throw Self.ioError("mkdir \(tmp)", code)
        }
        var written = 0
        do throws(PersistError) {
            var pace = Pacer(bytesPerSecond: bytesPerSecond)
            // image.bin
            part.imageCRCs = try writeFile(tmp + "/" + PersistPaths.imageFile, bytes: part.imageBytes, cancel: cancel) { range in
                image(range)
            } after: { n in
                written += n
                progress(written)
                pace.account(n)
            }
            // parity.bin
            guard parity.count == part.parityRows.count, parity.allSatisfy({ $0.count == part.chunkBytes }) else {
                throw PersistError(.io, "\(parity.count) parity buffers for \(part.parityRows.count) rows of \(part.chunkBytes) bytes")
            }
            let chunk = part.chunkBytes
            var rowCRCs: [[UInt32]] = []
            let all = try writeFile(tmp + "/" + PersistPaths.parityFile, bytes: parity.count * chunk, cancel: cancel, blockAligned: chunk) { range in
                let row = range.lowerBound / chunk
                let lo = range.lowerBound - row * chunk
                return [UnsafeRawBufferPointer(rebasing: parity[row][lo..<lo + range.count])]
            } after: { n in
                written += n
                progress(written)
                pace.account(n)
            }
            let perRow = PersistedPart.blockCount(chunk, blockBytes: blockBytes)
            for i in 0..<parity.count { rowCRCs.append(Array(all[i * perRow..<(i + 1) * perRow])) }
            for i in part.parityRows.indices { part.parityRows[i].crcs = rowCRCs[i] }
            part.writtenAt = Date().timeIntervalSince1970
            try part.validate()
            // part.json last: a part directory with a manifest has every file.
            let json: Data
            do {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.sortedKeys]
                json = try encoder.encode(part)
            } catch {
                throw PersistError(.io, "cannot encode the manifest: \(error)")
            }
            let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: json.count, alignment: 8)
            defer { raw.deallocate() }
            json.copyBytes(to: raw)
            let source: (Range<Int>) -> [UnsafeRawBufferPointer] = { r in [UnsafeRawBufferPointer(rebasing: raw[r])] }
            _ = try writeFile(tmp + "/" + PersistPaths.manifestFile, bytes: raw.count, cancel: nil, source: source, after: { _ in })
            try Self.fsyncDirectory(tmp)
            // Into place. A part of this node already there (an older
            // incarnation's) is moved aside (a directory cannot be renamed
            // over a non-empty one) and removed only once the new one is in
            // place, or put back if that fails: the node is without a part
            // between two renames, not for as long as removing one takes.
            var aside: String?
            if FileManager.default.fileExists(atPath: final) {
                let old = stepDir + "/.\(part.node).old-\(getpid())"
                Self.removeTree(old)
                guard rename(final, old) == 0 else {
                    let code = errno
                    throw Self.ioError("rename \(final)", code)
                }
                aside = old
            }
            guard rename(tmp, final) == 0 else {
                let code = errno
                if let aside { _ = rename(aside, final) }
                throw Self.ioError("rename \(tmp) to \(final)", code)
            }
            if let aside { Self.removeTree(aside) }
            try Self.fsyncDirectory(stepDir)
            try Self.fsyncDirectory(root)
        } catch {
            Self.removeTree(tmp)
            _ = rmdir(stepDir)  // only if empty
            throw error
        }
        return Result(part: part, bytes: written, seconds: monotonicSeconds() - started)
    }

    /// Writes `bytes` bytes from `source` in blocks (a block never crosses a
    /// multiple of `blockAligned`), returns every block's CRC32C, fsyncs.
    private func writeFile(_ path: String, bytes: Int, cancel: PersistCancel?, blockAligned: Int? = nil,
                           source: (Range<Int>) -> [UnsafeRawBufferPointer], after: (Int) -> Void) throws(PersistError) -> [UInt32] {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            let code = errno
            throw Self.ioError("open \(path)", code)
        }
        defer { close(fd) }
        var crcs: [UInt32] = []
        var offset = 0
        while offset < bytes {
            if let cancel, cancel.isCancelled { throw PersistError(.cancelled, "persist cancelled") }
            var end = min(bytes, offset + blockBytes)
            if let a = blockAligned { end = min(end, (offset / a + 1) * a) }
            var crc: UInt32 = 0
            let pieces = source(offset..<end)
            // Pieces that do not cover the block exactly would leave a file
            // that disagrees with its manifest: refuse before writing any.
            let given = pieces.reduce(0) { $0 + $1.count }
            guard given == end - offset else {
                throw PersistError(.io, "\(path): \(given) bytes handed over for bytes \(offset)..<\(end)")
            }
            for piece in pieces {
                guard var p = piece.baseAddress, piece.count > 0 else { continue }
                crc = CRC32C.checksum(piece, continuing: crc)
                var left = piece.count
                while left > 0 {
                    let n = Foundation.write(fd, p, left)
                    if n < 0 {
                        let code = errno
                        if code == EINTR { continue }
                        throw Self.ioError("write \(path)", code)
                    }
                    p += n
                    left -= n
                }
            }
            crcs.append(crc)
            after(end - offset)
            offset = end
        }
        guard fsync(fd) == 0 else {
            let code = errno
            throw Self.ioError("fsync \(path)", code)
        }
        return crcs
    }

    static func ioError(_ what: String, _ code: Int32) -> PersistError {
        let text = String(cString: strerror(code))
        switch code {
        case ENOSPC, EDQUOT: return PersistError(.outOfSpace, "\(what): \(text) (the disk is full)")
        case EACCES, EPERM, EROFS: return PersistError(.unwritable, "\(what): \(text)")
        default: return PersistError(.io, "\(what): \(text)")
        }
    }

    static func fsyncDirectory(_ path: String) throws(PersistError) {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else {
            let code = errno
            throw ioError("open \(path)", code)
        }
        defer { close(fd) }
        guard fsync(fd) == 0 else {
            let code = errno
            throw ioError("fsync \(path)", code)
        }
    }

    /// `mkdir -p` whose error keeps the failing call's errno (a full disk
    /// is out_of_space, a read-only one unwritable). Something there that is
    /// not a directory is left to the next mkdir inside it to report.
    static func makeDirectories(_ path: String) throws(PersistError) {
        if FileManager.default.fileExists(atPath: path) { return }
        let parent = (path as NSString).deletingLastPathComponent
        if !parent.isEmpty, parent != path { try makeDirectories(parent) }
        if mkdir(path, 0o777) != 0 {
            let code = errno
            guard code == EEXIST else { throw ioError("cannot create \(path)", code) }
        }
    }

    static func removeTree(_ path: String) { try? FileManager.default.removeItem(atPath: path) }

    /// Keeps this node's parts of the newest `keep` steps in `root` (those at
    /// or before `newest`), removes its older ones and any temporary
    /// directory it left, and step directories that end up empty.
    ///
    /// `sparing`: a step never removed (the newest durable one: when the steps
    /// after it failed on another node, this node's part of it is still needed).
    public static func prune(root: String, node: String, keep: Int, newest: Int, sparing: Int? = nil) {
        let steps = PersistCatalog.steps(in: root)
        let mine = steps.filter { $0 <= newest && FileManager.default.fileExists(atPath: PersistPaths.partDirectory(root, step: $0, node: node) + "/" + PersistPaths.manifestFile) }
        let kept = Set(mine.suffix(max(1, keep)))
        for s in steps where s < newest && !kept.contains(s) && s != sparing {
            let dir = PersistPaths.stepDirectory(root, step: s)
            removeTree(PersistPaths.partDirectory(root, step: s, node: node))
            for e in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] where e.hasPrefix(".\(node).") { removeTree(dir + "/" + e) }
            _ = rmdir(dir)
        }
    }
}

/// Sleeps as needed to keep a stream of writes at most `bytesPerSecond`.
struct Pacer {
    let bytesPerSecond: Double?
    let started = monotonicSeconds()
    var bytes = 0

    init(bytesPerSecond: Double?) { self.bytesPerSecond = bytesPerSecond }

    mutating func account(_ n: Int) {
        bytes += n
        guard let rate = bytesPerSecond, rate > 0 else { return }
        let due = started + Double(bytes) / rate
        let now = monotonicSeconds()
        if due > now { usleep(UInt32(min(1.0, due - now) * 1e6)) }
    }
}
