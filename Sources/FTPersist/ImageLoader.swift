import FTCore
import FTErasure
import Foundation

/// Reads a node's image of a persisted step back, every byte checked:
/// from its own part when that is intact, else decoded from the parts of
/// its EC group (data and parity, each block checked against its CRC).
/// Bytes go to `sink(imageOffset, bytes)` in increasing offsets; after a
/// fallback to decoding, the sink sees the image again from offset 0 (and,
/// decoded, up to `k * chunkBytes`: past the image's end the bytes are the
/// zero padding). Never a partial load: it either returns, every byte
/// delivered having passed its check, or throws.
public struct ImageLoader {
    public let catalog: PersistCatalog
    public var blockBytes = PersistedPart.defaultBlockBytes
    /// Lines for the log (a damaged part, a decode).
    public var log: (String) -> Void = { _ in }

    public init(catalog: PersistCatalog) { self.catalog = catalog }

    public struct Loaded: Sendable {
        /// Whether the image came from the node's own part (else: decoded from its group's).
        public var fromOwnPart: Bool
        /// Bytes delivered (a decode delivers whole chunks: up to k * chunkBytes).
        public var bytesRead: Int
    }

    public func load(step: Int, node: String, sink: (Int, UnsafeRawBufferPointer) throws -> Void) throws -> Loaded {
        let dir = PersistPaths.partDirectory(catalog.root, step: step, node: node)
        var ownProblem = "no readable part"
        if let part = catalog.parts[step]?[node] {
            // What the sink throws is the caller's and ends the load; only the part's own problems fall back to decoding.
            var sinkThrew = false
            do {
                let n = try Self.stream(file: dir + "/" + PersistPaths.imageFile, bytes: part.imageBytes, blockBytes: part.blockBytes,
                                        crcs: part.imageCRCs, name: "\(node)'s image of step \(step)") { offset, bytes in
                    do { try sink(offset, bytes) } catch {
                        sinkThrew = true
                        throw error
                    }
                }
                return Loaded(fromOwnPart: true, bytesRead: n)
            } catch let e as PersistError where !sinkThrew {
                ownProblem = e.message
            }
        } else if let why = catalog.unreadable.first(where: { $0.step == step && $0.node == node })?.reason {
            ownProblem = why
        }
        log("\(node)'s part of step \(step) cannot be used (\(ownProblem)); decoding it from its group's parts")
        do {
            let n = try decode(step: step, node: node, sink: sink)
            return Loaded(fromOwnPart: false, bytesRead: n)
        } catch let e as PersistError {
            throw PersistError(e.code, "\(node)'s own part of step \(step) cannot be used (\(ownProblem)), and decoding it failed: \(e.message)")
        }
    }

    /// Streams `bytes` of `file` block by block, each checked against its CRC before it goes to `sink`.
    static func stream(file: String, bytes: Int, blockBytes: Int, crcs: [UInt32], name: String,
                       sink: (Int, UnsafeRawBufferPointer) throws -> Void) throws -> Int {
        let fd = open(file, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw PersistError(.damaged, "\(file): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, Int(st.st_size) == bytes else {
            throw PersistError(.damaged, "\(file) has \(st.st_size) bytes, its manifest says \(bytes) (cut short or overwritten)")
        }
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blockBytes, alignment: 4096)
        defer { buffer.deallocate() }
        var offset = 0, block = 0
        while offset < bytes {
            let n = min(blockBytes, bytes - offset)
            try readFully(fd, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: offset, file: file)
            let view = UnsafeRawBufferPointer(rebasing: buffer[0..<n])
            guard CRC32C.checksum(view) == crcs[block] else {
                throw PersistError(.damaged, "\(name): block \(block) (bytes \(offset)..<\(offset + n)) fails its CRC32C")
            }
            try sink(offset, view)
            offset += n
            block += 1
        }
        return bytes
    }

    static func readFully(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: Int, file: String) throws(PersistError) {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw PersistError(.damaged, "\(file): short read at \(offset + done)") }
            done += n
        }
    }

    // MARK: decoding

    /// One group member's files, and which of their blocks passed their CRC.
    private final class Member {
        let part: PersistedPart
        let image: Int32
        let parity: Int32
        var badImage = Set<Int>()
        var badParity: [Int: Set<Int>] = [:]  // row -> blocks

        init(part: PersistedPart, dir: String) {
            self.part = part
            image = open(dir + "/" + PersistPaths.imageFile, O_RDONLY | O_CLOEXEC)
            parity = open(dir + "/" + PersistPaths.parityFile, O_RDONLY | O_CLOEXEC)
        }

        deinit {
            if image >= 0 { close(image) }
            if parity >= 0 { close(parity) }
        }

        /// Checks every block of both files (a missing or short file: all bad).
        func check() {
            let b = part.blockBytes
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: b, alignment: 4096)
            defer { buffer.deallocate() }
            func scan(_ fd: Int32, from start: Int, bytes: Int, crcs: [UInt32]) -> Set<Int> {
                var bad = Set<Int>()
                for (i, crc) in crcs.enumerated() {
                    let lo = i * b, n = min(b, bytes - lo)
                    let view = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
                    if fd < 0 || (try? ImageLoader.readFully(fd, into: view, at: start + lo, file: "")) == nil
                        || CRC32C.checksum(UnsafeRawBufferPointer(view)) != crc {
                        bad.insert(i)
                    }
                }
                return bad
            }
            badImage = scan(image, from: 0, bytes: part.imageBytes, crcs: part.imageCRCs)
            for (i, row) in part.parityRows.enumerated() {
                badParity[row.row] = scan(parity, from: i * part.chunkBytes, bytes: part.chunkBytes, crcs: row.crcs)
            }
        }

        func blocks(_ range: Range<Int>) -> ClosedRange<Int> { range.lowerBound / part.blockBytes...(range.upperBound - 1) / part.blockBytes }
    }

    /// Decodes `node`'s image of `step` from the other members of its group.
    func decode(step: Int, node: String, sink: (Int, UnsafeRawBufferPointer) throws -> Void) throws -> Int {
        let parts = catalog.parts[step] ?? [:]
        guard let template = parts.values.first(where: { $0.hasErasureCoding && $0.group.contains(node) }) else {
            throw PersistError(.undecodable, "no part of \(node)'s group persisted step \(step) with erasure coding: its image cannot be had")
        }
        let k = template.k, m = template.m, chunk = template.chunkBytes
        let group = template.group
        let p = group.firstIndex(of: node)!
        let placement = ParityPlacement(k: k, m: m)
        var members: [Int: Member] = [:]
        for (q, id) in group.enumerated() where q != p {
            guard let part = parts[id], part.group == group, part.k == k, part.m == m, part.chunkBytes == chunk else { continue }
            let member = Member(part: part, dir: PersistPaths.partDirectory(catalog.root, step: step, node: id))
            member.check()
            if !member.badImage.isEmpty || member.badParity.values.contains(where: { !$0.isEmpty }) {
                log("\(id)'s part of step \(step): \(member.badImage.count) image and \(member.badParity.values.reduce(0) { $0 + $1.count }) parity blocks fail their CRC32C (left out of the decode)")
            }
            members[q] = member
        }
        let codec = try ReedSolomon(dataCount: k, parityCount: m)
        let segment = blockBytes
        let buffers = (0..<(k + m)).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: segment, alignment: 64) }
        defer { for b in buffers { b.deallocate() } }
        var delivered = 0
        for (c, row) in placement.dataRows(of: p).enumerated() {
            var off = 0
            while off < chunk {
                let len = min(segment, chunk - off)
                var missing: [Int] = []
                var views: [UnsafeMutableRawBufferPointer] = []
                for i in 0..<(k + m) {
                    let view = UnsafeMutableRawBufferPointer(rebasing: buffers[i][0..<len])
                    views.append(view)
                    let q = placement.position(ofCodewordIndex: i, row: row)
                    guard q != p, let member = members[q], readCodeword(member, index: i, row: row, placement: placement,
                                                                        chunkOffset: off, into: view) else {
                        missing.append(i)
                        continue
                    }
                }
                let target = placement.codewordIndex(of: p, row: row)
                guard missing.count <= m else {
                    throw PersistError(.undecodable, "\(node)'s image of step \(step): row \(row) bytes \(off)..<\(off + len) have \(missing.count) of \(k + m) parts missing or damaged, more than m = \(m)")
                }
                try codec.reconstruct(views, missing: missing)
                try sink(c * chunk + off, UnsafeRawBufferPointer(views[target]))
                delivered += len
                off += len
            }
        }
        return delivered
    }

    /// Reads codeword `index` of `row` (a member's data chunk or parity
    /// chunk), bytes `chunkOffset..<+count`, if every block it touches passed.
    private func readCodeword(_ member: Member, index i: Int, row: Int, placement: ParityPlacement,
                              chunkOffset off: Int, into view: UnsafeMutableRawBufferPointer) -> Bool {
        let part = member.part, chunk = part.chunkBytes
        if i < placement.k {
            guard member.image >= 0, let c = placement.dataRows(of: part.position).firstIndex(of: row) else { return false }
            let lo = c * chunk + off, hi = lo + view.count
            let inImage = min(hi, part.imageBytes)
            if inImage > lo {
                guard member.badImage.isDisjoint(with: member.blocks(lo..<inImage)) else { return false }
                guard (try? Self.readFully(member.image, into: UnsafeMutableRawBufferPointer(rebasing: view[0..<inImage - lo]), at: lo, file: "")) != nil else { return false }
            }
            // Past the image's end a chunk is zero padding.
            let zeroFrom = max(0, inImage - lo)
            if zeroFrom < view.count { (view.baseAddress! + zeroFrom).initializeMemory(as: UInt8.self, repeating: 0, count: view.count - zeroFrom) }
            return true
        }
        guard member.parity >= 0, let r = part.parityRows.firstIndex(where: { $0.row == row }),
              member.badParity[row]?.isDisjoint(with: member.blocks(off..<off + view.count)) ?? false else { return false }
        return (try? Self.readFully(member.parity, into: view, at: r * chunk + off, file: "")) != nil
    }
}
