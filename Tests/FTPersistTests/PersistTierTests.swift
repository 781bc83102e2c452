import FTCore
import FTErasure
import FTPersist
import FTSystem
import Foundation
import Testing

// MARK: fixtures

/// A synthetic job: every node's image (seeded random bytes of different
/// sizes) and, with erasure coding, every node's parity rows computed here
/// with `ReedSolomon.encode`, exactly as `ParityPlacement` places them.
struct PersistFixture {
    static let job = "persist-test-job"
    static let blockBytes = 4096

    let k: Int
    let m: Int
    let nodes: [String]
    let groups: [[String]]
    let chunk: Int
    let images: [String: [UInt8]]
    /// A node's parity chunks, in `parityRows(of:)` order, `chunk` bytes each.
    let parity: [String: [UInt8]]

    /// `nodeCount` nodes n0, n1, ... (a multiple of k + m with erasure
    /// coding; k = m = 0 without), each image of a size drawn from `sizes`.
    init(k: Int, m: Int, nodeCount: Int, sizes: ClosedRange<Int>, seed: UInt64) throws {
        var rng = SplitMix64(seed: seed)
        self.k = k
        self.m = m
        let nodes = (0..<nodeCount).map { "n\($0)" }
        self.nodes = nodes
        var images: [String: [UInt8]] = [:]
        for node in nodes {
            let size = sizes.lowerBound + Int(rng.next() % UInt64(sizes.count))
            images[node] = randomBytes(size, &rng)
        }
        self.images = images
        guard k > 0 else {
            groups = []
            chunk = 0
            parity = [:]
            return
        }
        let n = k + m
        try #require(nodeCount % n == 0)
        let groups = stride(from: 0, to: nodeCount, by: n).map { Array(nodes[$0..<$0 + n]) }
        self.groups = groups
        let chunk = ParityPlacement.chunkBytes(forNodeBytes: nodes.map { images[$0]!.count }, k: k)
        self.chunk = chunk
        let placement = ParityPlacement(k: k, m: m)
        let codec = try ReedSolomon(dataCount: k, parityCount: m)
        var parity: [String: [UInt8]] = [:]
        for group in groups {
            var rows: [[[UInt8]]] = []  // row -> parity index -> chunk
            for r in 0..<n {
                // The row's k data chunks: chunk c of each contributor (zero padded).
                var data = [UInt8](repeating: 0, count: k * chunk)
                for (d, q) in placement.dataContributors(row: r).enumerated() {
                    let c = try #require(placement.dataRows(of: q).firstIndex(of: r))
                    let image = images[group[q]]!
                    let lo = min(c * chunk, image.count), hi = min((c + 1) * chunk, image.count)
                    data.replaceSubrange(d * chunk..<d * chunk + (hi - lo), with: image[lo..<hi])
                }
                var out = [UInt8](repeating: 0, count: m * chunk)
                try data.withUnsafeBytes { dv in
                    try out.withUnsafeMutableBytes { pv in
                        try codec.encode(data: (0..<k).map { UnsafeRawBufferPointer(rebasing: dv[$0 * chunk..<($0 + 1) * chunk]) },
                                         parity: (0..<m).map { UnsafeMutableRawBufferPointer(rebasing: pv[$0 * chunk..<($0 + 1) * chunk]) })
                    }
                }
                rows.append((0..<m).map { Array(out[$0 * chunk..<($0 + 1) * chunk]) })
            }
            for (q, id) in group.enumerated() {
                parity[id] = placement.parityRows(of: q).flatMap { rows[$0.row][$0.parityIndex] }
            }
        }
        self.parity = parity
    }

    var placement: ParityPlacement { ParityPlacement(k: k, m: m) }

    func position(of node: String) -> Int { groups.first { $0.contains(node) }?.firstIndex(of: node) ?? 0 }

    /// The manifest a writer is handed: CRC fields empty.
    func template(_ node: String, step: Int, imageBytes: Int) -> PersistedPart {
        guard k > 0, let group = groups.first(where: { $0.contains(node) }) else {
            return PersistedPart(job: Self.job, node: node, step: step, k: 0, m: 0, chunkBytes: 0, group: [], position: 0,
                                 nodes: nodes, imageBytes: imageBytes, blockBytes: Self.blockBytes, imageCRCs: [],
                                 parityRows: [], writtenAt: 0)
        }
        let q = group.firstIndex(of: node)!
        return PersistedPart(job: Self.job, node: node, step: step, k: k, m: m, chunkBytes: chunk, group: group, position: q,
                             nodes: nodes, imageBytes: imageBytes, blockBytes: Self.blockBytes, imageCRCs: [],
                             parityRows: placement.parityRows(of: q).map { .init(row: $0.row, parityIndex: $0.parityIndex, crcs: []) },
                             writtenAt: 0)
    }

    /// Writes `node`'s part of `step` (its own image, or `image`), the image
    /// handed over in uneven pieces.
    @discardableResult
    func write(_ node: String, step: Int, root: String, image override: [UInt8]? = nil, blockBytes: Int = PersistFixture.blockBytes,
               cancel: PersistCancel? = nil, parityBuffers: Int? = nil,
               pieces: (UnsafeRawBufferPointer, Range<Int>) -> [UnsafeRawBufferPointer] = PersistFixture.pieces,
               edit: (inout PersistedPart) -> Void = { _ in }) throws -> PartWriter.Result {
        let image = override ?? images[node]!
        var part = template(node, step: step, imageBytes: image.count)
        edit(&part)
        var writer = PartWriter(root: root)
        writer.blockBytes = blockBytes
        let bytes = parity[node] ?? []
        let rows = min(parityBuffers ?? part.parityRows.count, part.parityRows.count), chunk = self.chunk
        return try image.withUnsafeBytes { img in
            try bytes.withUnsafeBytes { pv in
                try writer.write(part: part, image: { pieces(img, $0) },
                                 parity: (0..<rows).map { UnsafeRawBufferPointer(rebasing: pv[$0 * chunk..<($0 + 1) * chunk]) },
                                 cancel: cancel)
            }
        }
    }

    /// A range of the image as two contiguous pieces of uneven length.
    static func pieces(_ image: UnsafeRawBufferPointer, _ r: Range<Int>) -> [UnsafeRawBufferPointer] {
        let mid = r.lowerBound + r.count / 3
        return [UnsafeRawBufferPointer(rebasing: image[r.lowerBound..<mid]), UnsafeRawBufferPointer(rebasing: image[mid..<r.upperBound])]
    }

    func writeAll(step: Int, root: String) throws {
        for node in nodes { try write(node, step: step, root: root) }
    }

    func imagePath(_ root: String, step: Int, _ node: String) -> String {
        PersistPaths.partDirectory(root, step: step, node: node) + "/" + PersistPaths.imageFile
    }

    func parityPath(_ root: String, step: Int, _ node: String) -> String {
        PersistPaths.partDirectory(root, step: step, node: node) + "/" + PersistPaths.parityFile
    }

    func manifestPath(_ root: String, step: Int, _ node: String) -> String {
        PersistPaths.partDirectory(root, step: step, node: node) + "/" + PersistPaths.manifestFile
    }

    /// The byte offset, in `node`'s image, of byte `offset` of its data chunk in `row`.
    func imageOffset(of node: String, row: Int, chunkOffset offset: Int) throws -> Int {
        let c = try #require(placement.dataRows(of: position(of: node)).firstIndex(of: row))
        return c * chunk + offset
    }

    /// The byte offset, in `node`'s parity.bin, of byte `offset` of its parity chunk of `row`.
    func parityOffset(of node: String, row: Int, chunkOffset offset: Int) throws -> Int {
        let i = try #require(placement.parityRows(of: position(of: node)).firstIndex { $0.row == row })
        return i * chunk + offset
    }
}

func randomBytes(_ count: Int, _ rng: inout SplitMix64) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    out.withUnsafeMutableBytes { raw in
        var i = 0
        while i < count {
            var v = rng.next()
            for _ in 0..<8 where i < count {
                raw[i] = UInt8(truncatingIfNeeded: v)
                v >>= 8
                i += 1
            }
        }
    }
    return out
}

/// What a load's sink saw: every byte checked against the image (past its
/// end, the zero padding) as it arrives, and the last pass assembled by
/// offset (after a fallback the sink sees the image again from offset 0).
final class Collector {
    let expected: [UInt8]
    /// How far a sink may be handed bytes (the image, or k * chunk when decoded).
    let limit: Int
    private(set) var bytes: [UInt8] = []
    private(set) var wrongBytes = 0
    private(set) var outOfBounds = 0
    private(set) var gaps = 0
    private(set) var passes = 0
    private(set) var covered = 0

    init(expected: [UInt8], limit: Int) {
        self.expected = expected
        self.limit = max(limit, expected.count)
        bytes = [UInt8](repeating: 0, count: self.limit)
    }

    func sink(_ offset: Int, _ view: UnsafeRawBufferPointer) {
        if offset == 0 {
            passes += 1
            covered = 0
        }
        if offset != covered { gaps += 1 }
        covered = max(covered, offset + view.count)
        guard offset >= 0, offset + view.count <= limit else {
            outOfBounds += 1
            return
        }
        for (i, b) in view.enumerated() {
            let at = offset + i
            if b != (at < expected.count ? expected[at] : 0) { wrongBytes += 1 }
            bytes[at] = b
        }
    }

    /// The image as assembled (the first `expected.count` bytes).
    var image: [UInt8] { Array(bytes.prefix(expected.count)) }

    /// Every byte the sink saw was right, none out of bounds, and the last
    /// pass covered the whole image without a gap.
    var isComplete: Bool { wrongBytes == 0 && outOfBounds == 0 && gaps == 0 && covered >= expected.count && image == expected }
}

/// Lines logged by a loader.
final class LogLines {
    var lines: [String] = []
}

/// A fresh directory for one test; the caller removes it in a `defer`.
func makeTemporaryDirectory() throws -> String {
    let path = (NSTemporaryDirectory() as NSString).appendingPathComponent("ft-persist-test-\(getpid())-\(UUID().uuidString)")
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

func removeDirectory(_ path: String) { try? FileManager.default.removeItem(atPath: path) }

/// Entries anywhere under `root` that a writer leaves only while it runs.
func leftovers(_ root: String) -> [String] {
    let all = (FileManager.default.enumerator(atPath: root)?.allObjects as? [String]) ?? []
    return all.filter { ($0 as NSString).lastPathComponent.contains(".tmp-") || ($0 as NSString).lastPathComponent.contains(".old-") }
}

func entries(_ dir: String) -> [String] { ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted() }

/// XORs one byte of a file.
func flipByte(_ path: String, at offset: Int) throws {
    let fd = open(path, O_RDWR)
    try #require(fd >= 0, "open \(path)")
    defer { close(fd) }
    var b: UInt8 = 0
    try #require(pread(fd, &b, 1, off_t(offset)) == 1, "read byte \(offset) of \(path)")
    b ^= 0x5A
    try #require(pwrite(fd, &b, 1, off_t(offset)) == 1, "write byte \(offset) of \(path)")
}

func truncateFile(_ path: String, to bytes: Int) throws {
    try #require(truncate(path, off_t(bytes)) == 0, "truncate \(path)")
}

/// Loads `node` of `step` into a collector that checks every byte.
func loadChecked(_ loader: ImageLoader, _ fixture: PersistFixture, step: Int, node: String) throws -> (ImageLoader.Loaded, Collector) {
    let collector = Collector(expected: fixture.images[node]!, limit: fixture.k * fixture.chunk)
    let loaded = try loader.load(step: step, node: node, sink: collector.sink)
    return (loaded, collector)
}

/// The RS layouts the tests run over.
struct ECShape: Sendable, CustomTestStringConvertible {
    var k: Int
    var m: Int
    var groups: Int
    var testDescription: String { "RS(\(k)+\(m)), \(groups) group\(groups == 1 ? "" : "s")" }
}

// MARK: tests

@Suite("Persistent tier: a node's part on disk, read back checked or decoded from its group")
struct PersistTierTests {
    static let step = 120

    @Test("every part round-trips: listed, the step durable, each image read bit-exact from its own part",
          arguments: [ECShape(k: 3, m: 2, groups: 1), ECShape(k: 2, m: 1, groups: 2)])
    func roundTrip(shape: ECShape) throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let f = try PersistFixture(k: shape.k, m: shape.m, nodeCount: shape.groups * (shape.k + shape.m),
                                   sizes: 150_000...600_000, seed: 0xF00D + UInt64(shape.k))
        #expect(Set(f.images.values.map(\.count)).count == f.nodes.count, "images of different sizes")
        var results: [String: PartWriter.Result] = [:]
        for node in f.nodes { results[node] = try f.write(node, step: Self.step, root: root) }
        #expect(leftovers(root).isEmpty)

        let catalog = PersistCatalog(root: root)
        #expect(catalog.unreadable.isEmpty)
        #expect(Set(catalog.parts[Self.step]?.keys.map { $0 } ?? []) == Set(f.nodes))
        #expect(catalog.durableSteps == [Self.step])
        #expect(catalog.notDurable(Self.step) == nil)
        #expect(catalog.nodes(of: Self.step) == f.nodes)
        #expect(catalog.job(of: Self.step) == PersistFixture.job)
        for node in f.nodes {
            let written = try #require(results[node])
            let part = try #require(catalog.parts[Self.step]?[node])
            #expect(part == written.part, "the manifest on disk is the one the writer returned")
            #expect(part.blockBytes == PersistFixture.blockBytes)
            #expect(part.imageCRCs.count == PersistedPart.blockCount(f.images[node]!.count, blockBytes: part.blockBytes))
            #expect(part.imageCRCs.count > 30, "a few hundred KiB span many 4 KiB blocks")
            #expect(part.parityRows.count == f.m)
            #expect(part.parityRows.allSatisfy { $0.crcs.count == PersistedPart.blockCount(f.chunk, blockBytes: part.blockBytes) })
            #expect(written.bytes == f.images[node]!.count + f.m * f.chunk)
            let parityBytes = try FileManager.default.attributesOfItem(atPath: f.parityPath(root, step: Self.step, node))[.size] as? Int
            #expect(parityBytes == f.m * f.chunk)
        }

        let loader = ImageLoader(catalog: catalog)
        for node in f.nodes {
            let (loaded, got) = try loadChecked(loader, f, step: Self.step, node: node)
            #expect(loaded.fromOwnPart)
            #expect(loaded.bytesRead == f.images[node]!.count)
            #expect(got.passes == 1)
            #expect(got.isComplete, "\(node): \(got.wrongBytes) wrong bytes, \(got.gaps) gaps")
        }
    }

    @Test("a flipped byte in one node's image.bin is caught by its block CRC, and the image decodes bit-exact from the group",
          arguments: [1 << 20, 10_000])
    func flippedImageByte(segment: Int) throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let f = try PersistFixture(k: 3, m: 2, nodeCount: 5, sizes: 200_000...500_000, seed: 41)
        try f.writeAll(step: Self.step, root: root)
        let victim = "n1"
        let at = f.images[victim]!.count / 2 + 17
        try flipByte(f.imagePath(root, step: Self.step, victim), at: at)

        var loader = ImageLoader(catalog: PersistCatalog(root: root))
        loader.blockBytes = segment
        let log = LogLines()
        loader.log = { log.lines.append($0) }
        let (loaded, got) = try loadChecked(loader, f, step: Self.step, node: victim)
        #expect(!loaded.fromOwnPart)
        #expect(loaded.bytesRead == f.k * f.chunk)
        #expect(got.passes == 2, "the blocks before the flipped one, then the decoded image from offset 0")
        #expect(got.isComplete, "\(got.wrongBytes) wrong bytes, \(got.gaps) gaps, \(got.outOfBounds) out of bounds")
        #expect(log.lines.contains { $0.contains("CRC32C") && $0.contains(victim) })
        // The others still load from their own parts.
        for node in f.nodes where node != victim {
            let (other, collected) = try loadChecked(loader, f, step: Self.step, node: node)
            #expect(other.fromOwnPart)
            #expect(collected.isComplete)
        }
    }

    @Test("an image.bin cut short or deleted is decoded from the group")
    func truncatedOrDeletedImage() throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let f = try PersistFixture(k: 2, m: 1, nodeCount: 6, sizes: 100_000...400_000, seed: 7)
        try f.writeAll(step: Self.step, root: root)
        try truncateFile(f.imagePath(root, step: Self.step, "n0"), to: f.images["n0"]!.count - 1)
        try FileManager.default.removeItem(atPath: f.imagePath(root, step: Self.step, "n4"))

        let catalog = PersistCatalog(root: root)
        #expect(catalog.durableSteps == [Self.step], "the catalog reads manifests; bytes are checked when loaded")
        var loader = ImageLoader(catalog: catalog)
        loader.blockBytes = 6_000
        for node in ["n0", "n4"] {
            let (loaded, got) = try loadChecked(loader, f, step: Self.step, node: node)
            #expect(!loaded.fromOwnPart, "\(node)")
            #expect(got.isComplete, "\(node): \(got.wrongBytes) wrong bytes, \(got.gaps) gaps")
        }
    }

    @Test("an image.bin grown past its manifest's size is not trusted")
    func grownImage() throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let f = try PersistFixture(k: 2, m: 1, nodeCount: 3, sizes: 100_000...200_000, seed: 8)
        try f.writeAll(step: Self.step, root: root)
        let handle = try #require(FileHandle(forWritingAtPath: f.imagePath(root, step: Self.step, "n2")))
        try handle.seekToEnd()
        try handle.write(contentsOf: [1, 2, 3])
        try handle.close()
        let (loaded, got) = try loadChecked(ImageLoader(catalog: PersistCatalog(root: root)), f, step: Self.step, node: "n2")
        #expect(!loaded.fromOwnPart)
        #expect(got.isComplete)
    }

    enum ManifestDamage: String, CaseIterable, Sendable { case deleted, garbage, anotherNodes }

    @Test("a part whose part.json is gone or unusable is not listed; the step stays durable with k per group; the image decodes",
          arguments: ManifestDamage.allCases)
    func unusableManifest(damage: ManifestDamage) throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let f = try PersistFixture(k: 3, m: 2, nodeCount: 5, sizes: 150_000...300_000, seed: 99)
        try f.writeAll(step: Self.step, root: root)
        let path = f.manifestPath(root, step: Self.step, "n3")
        switch damage {
        case .deleted: try FileManager.default.removeItem(atPath: path)
        case .garbage: try Data("{\"format\": 1, \"job\": ".utf8).write(to: URL(fileURLWithPath: path))
        case .anotherNodes:
            try FileManager.default.removeItem(atPath: path)
            try FileManager.default.copyItem(atPath: f.manifestPath(root, step: Self.step, "n4"), toPath: path)
        }

        let catalog = PersistCatalog(root: root)
        #expect(catalog.parts[Self.step]?["n3"] == nil)
        #expect(catalog.parts[Self.step]?.count == 4)
        #expect(catalog.unreadable.map { $0.node } == ["n3"])
        #expect(catalog.durableSteps == [Self.step])
        let (loaded, got) = try loadChecked(ImageLoader(catalog: catalog), f, step: Self.step, node: "n3")
        #expect(!loaded.fromOwnPart)
        #expect(got.passes == 1)
        #expect(got.isComplete)
    }

    @Test("m whole parts of a group lost (one deleted, one cut short): both decode, the others read their own")
    func mPartsLost() throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let f = try PersistFixture(k: 3, m: 2, nodeCount: 5, sizes: 150_000...300_000, seed: 5)
        try f.writeAll(step: Self.step, root: root)
        try FileManager.default.removeItem(atPath: PersistPaths.partDirectory(root, step: Self.step, node: "n0"))
        try truncateFile(f.imagePath(root, step: Self.step, "n3"), to: 4096)
        let catalog = PersistCatalog(root: root)
        #expect(catalog.durableSteps == [Self.step])
        let loader = ImageLoader(catalog: catalog)
        for node in f.nodes {
            let (loaded, got) = try loadChecked(loader, f, step: Self.step, node: node)
            #expect(loaded.fromOwnPart == !["n0", "n3"].contains(node), "\(node)")
            #expect(got.isComplete, "\(node)")
        }
    }

    @Test("more than m of a row's chunks damaged: undecodable, and every byte delivered before was right")
    func moreThanMDamaged() throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        // Sizes close together, so every data chunk lies (mostly) inside its image.
        let f = try PersistFixture(k: 3, m: 2, nodeCount: 5, sizes: 300_000...310_000, seed: 3)
        try f.writeAll(step: Self.step, root: root)
        let victim = "n0"
        // The victim's second data row: its first decodes, this one cannot.
        let row = f.placement.dataRows(of: 0)[1]
        let offset = 5_000
        for q in f.placement.dataContributors(row: row) {
            let node = f.groups[0][q]
            try flipByte(f.imagePath(root, step: Self.step, node), at: f.imageOffset(of: node, row: row, chunkOffset: offset))
        }
        var loader = ImageLoader(catalog: PersistCatalog(root: root))
        loader.blockBytes = 8_192
        let got = Collector(expected: f.images[victim]!, limit: f.k * f.chunk)
        let error = #expect(throws: PersistError.self) { try loader.load(step: Self.step, node: victim, sink: got.sink) }
        #expect(error?.code == .undecodable)
        #expect(error?.message.contains("row \(row)") == true, "\(error?.message ?? "")")
        #expect(got.wrongBytes == 0 && got.outOfBounds == 0, "nothing wrong delivered before the failure")
        #expect(got.covered >= f.chunk, "the first row was decoded and delivered")
        #expect(got.covered <= f.chunk + offset, "nothing of the damaged segment was delivered")
        // A node whose own part is intact still reads it.
        let intact = try #require(f.placement.parityHolders(row: row).first)
        let (loaded, other) = try loadChecked(loader, f, step: Self.step, node: f.groups[0][intact])
        #expect(loaded.fromOwnPart && other.isComplete)
    }

    @Test("fewer than k parts in a group: not durable, with the reason; a missing image is undecodable; an intact part still loads")
    func fewerThanK() throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let f = try PersistFixture(k: 3, m: 2, nodeCount: 5, sizes: 100_000...200_000, seed: 11)
        try f.writeAll(step: Self.step, root: root)
        for node in ["n1", "n2", "n3"] { try FileManager.default.removeItem(atPath: f.manifestPath(root, step: Self.step, node)) }
        let catalog = PersistCatalog(root: root)
        #expect(catalog.durableSteps.isEmpty)
        let why = try #require(catalog.notDurable(Self.step))
        #expect(why.contains("fewer than k = 3"), "\(why)")
        let loader = ImageLoader(catalog: catalog)
        let got = Collector(expected: f.images["n2"]!, limit: f.k * f.chunk)
        let error = #expect(throws: PersistError.self) { try loader.load(step: Self.step, node: "n2", sink: got.sink) }
        #expect(error?.code == .undecodable)
        #expect(got.wrongBytes == 0 && got.outOfBounds == 0)
        let (loaded, intact) = try loadChecked(loader, f, step: Self.step, node: "n4")
        #expect(loaded.fromOwnPart && intact.isComplete)
        #expect(catalog.notDurable(Self.step + 1) != nil, "a step without parts is not durable")
    }

    @Test("durability is judged group by group")
    func durabilityPerGroup() throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let f = try PersistFixture(k: 2, m: 1, nodeCount: 6, sizes: 20_000...40_000, seed: 12)
        try f.writeAll(step: Self.step, root: root)
        // One part of each group gone: still k = 2 in each.
        try FileManager.default.removeItem(atPath: PersistPaths.partDirectory(root, step: Self.step, node: "n0"))
        try FileManager.default.removeItem(atPath: PersistPaths.partDirectory(root, step: Self.step, node: "n4"))
        #expect(PersistCatalog(root: root).durableSteps == [Self.step])
        // A second one of the second group: that group falls below k.
        try FileManager.default.removeItem(atPath: PersistPaths.partDirectory(root, step: Self.step, node: "n5"))
        let catalog = PersistCatalog(root: root)
        #expect(catalog.durableSteps.isEmpty)
        let why = try #require(catalog.notDurable(Self.step))
        #expect(why.contains("n3,n4,n5"), "\(why)")
        let (loaded, got) = try loadChecked(ImageLoader(catalog: catalog), f, step: Self.step, node: "n0")
        #expect(!loaded.fromOwnPart && got.isComplete, "the first group still decodes")
    }

    @Test("a damaged parity block on another node, with the node's own part damaged too (within m): still decodes, block sizes mixed")
    func damagedParityElsewhere() throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let f = try PersistFixture(k: 3, m: 2, nodeCount: 5, sizes: 250_000...300_000, seed: 21)
        // Each node with its own block size: the decode checks every member's blocks by that member's.
        for (node, blockBytes) in zip(f.nodes, [4096, 5000, 8192, 65536, 12_345]) {
            try f.write(node, step: Self.step, root: root, blockBytes: blockBytes)
        }
        let victim = "n0"
        try flipByte(f.imagePath(root, step: Self.step, victim), at: 0)
        // In each of the victim's rows, one more chunk is damaged: a parity
        // block of one holder in the first, a data block of another node in the others.
        let rows = f.placement.dataRows(of: 0)
        let holder = f.groups[0][f.placement.parityHolders(row: rows[0])[0]]
        try flipByte(f.parityPath(root, step: Self.step, holder), at: f.parityOffset(of: holder, row: rows[0], chunkOffset: 1_000))
        for row in rows.dropFirst() {
            let other = f.groups[0][try #require(f.placement.dataContributors(row: row).first { $0 != 0 })]
            try flipByte(f.imagePath(root, step: Self.step, other), at: f.imageOffset(of: other, row: row, chunkOffset: 50_000))
        }
        var loader = ImageLoader(catalog: PersistCatalog(root: root))
        loader.blockBytes = 16_384
        let (loaded, got) = try loadChecked(loader, f, step: Self.step, node: victim)
        #expect(!loaded.fromOwnPart)
        #expect(got.isComplete, "\(got.wrongBytes) wrong bytes, \(got.gaps) gaps")
    }

    @Test("without erasure coding: round trip, and a damaged or missing image is undecodable")
    func withoutErasureCoding() throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let f = try PersistFixture(k: 0, m: 0, nodeCount: 3, sizes: 100_000...300_000, seed: 1)
        try f.writeAll(step: Self.step, root: root)
        var catalog = PersistCatalog(root: root)
        #expect(catalog.durableSteps == [Self.step])
        #expect(catalog.parts[Self.step]?.values.allSatisfy { !$0.hasErasureCoding && $0.parityRows.isEmpty } == true)
        for node in f.nodes {
            let (loaded, got) = try loadChecked(ImageLoader(catalog: catalog), f, step: Self.step, node: node)
            #expect(loaded.fromOwnPart && got.isComplete)
        }
        try flipByte(f.imagePath(root, step: Self.step, "n1"), at: f.images["n1"]!.count - 1)
        let got = Collector(expected: f.images["n1"]!, limit: 0)
        let error = #expect(throws: PersistError.self) {
            try ImageLoader(catalog: catalog).load(step: Self.step, node: "n1", sink: got.sink)
        }
        #expect(error?.code == .undecodable)
        #expect(got.wrongBytes == 0 && got.outOfBounds == 0, "the blocks before the last were right; the last was not delivered")

        try FileManager.default.removeItem(atPath: PersistPaths.partDirectory(root, step: Self.step, node: "n2"))
        catalog = PersistCatalog(root: root)
        #expect(catalog.durableSteps.isEmpty)
        #expect(catalog.notDurable(Self.step)?.contains("n2") == true)
        let missing = #expect(throws: PersistError.self) {
            try ImageLoader(catalog: catalog).load(step: Self.step, node: "n2") { _, _ in }
        }
        #expect(missing?.code == .undecodable)
    }

    struct StopHere: Error {}

    @Test("an error the sink throws ends the load, with no fallback to decoding (even a PersistError)")
    func sinkErrorEndsLoad() throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let f = try PersistFixture(k: 2, m: 1, nodeCount: 3, sizes: 50_000...90_000, seed: 16)
        try f.writeAll(step: Self.step, root: root)
        var loader = ImageLoader(catalog: PersistCatalog(root: root))
        let log = LogLines()
        loader.log = { log.lines.append($0) }
        var calls = 0
        let cancelled = #expect(throws: PersistError.self) {
            try loader.load(step: Self.step, node: "n0") { _, _ in
                calls += 1
                if calls == 1 { throw PersistError(.cancelled, "the caller stops here") }
            }
        }
        #expect(cancelled?.code == .cancelled)
        #expect(calls == 1)
        calls = 0
        #expect(throws: StopHere.self) {
            try loader.load(step: Self.step, node: "n1") { _, _ in
                calls += 1
                if calls == 2 { throw StopHere() }
            }
        }
        #expect(calls == 2)
        #expect(log.lines.isEmpty, "\(log.lines)")
    }

    @Test("an empty image round-trips")
    func emptyImage() throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let f = try PersistFixture(k: 0, m: 0, nodeCount: 1, sizes: 0...0, seed: 2)
        try f.writeAll(step: 0, root: root)
        let (loaded, got) = try loadChecked(ImageLoader(catalog: PersistCatalog(root: root)), f, step: 0, node: "n0")
        #expect(loaded.fromOwnPart && loaded.bytesRead == 0 && got.wrongBytes == 0)
    }

    @Test("prune keeps a node's newest N steps, removes its older parts and temporaries, and step directories left empty")
    func prune() throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let f = try PersistFixture(k: 0, m: 0, nodeCount: 2, sizes: 5_000...20_000, seed: 4)
        for step in [10, 20, 30, 40, 50] { try f.writeAll(step: step, root: root) }
        // A temporary directory a crashed writer of n0 left in step 10.
        let stale = PersistPaths.stepDirectory(root, step: 10) + "/.n0.tmp-999999"
        try FileManager.default.createDirectory(atPath: stale, withIntermediateDirectories: false)

        PartWriter.prune(root: root, node: "n0", keep: 2, newest: 40)
        var catalog = PersistCatalog(root: root)
        #expect(catalog.parts.filter { $0.value["n0"] != nil }.keys.sorted() == [30, 40, 50], "n0 keeps 30, 40 and the newer 50")
        #expect(catalog.parts.filter { $0.value["n1"] != nil }.keys.sorted() == [10, 20, 30, 40, 50], "n1's parts are not n0's to prune")
        #expect(!FileManager.default.fileExists(atPath: stale))

        PartWriter.prune(root: root, node: "n1", keep: 2, newest: 40)
        catalog = PersistCatalog(root: root)
        #expect(PersistCatalog.steps(in: root) == [30, 40, 50], "steps 10 and 20 are empty now, and gone")
        #expect(catalog.durableSteps == [50, 40, 30])
        let (loaded, got) = try loadChecked(ImageLoader(catalog: catalog), f, step: 30, node: "n1")
        #expect(loaded.fromOwnPart && got.isComplete)
        // The newest durable step is spared, however old: the steps after it may have failed elsewhere.
        for step in [60, 70] { try f.writeAll(step: step, root: root) }
        PartWriter.prune(root: root, node: "n0", keep: 2, newest: 70, sparing: 30)
        catalog = PersistCatalog(root: root)
        #expect(catalog.parts.filter { $0.value["n0"] != nil }.keys.sorted() == [30, 60, 70], "30 spared, 40 and 50 pruned")
    }

    @Test("writing a node's part of a step again replaces the old incarnation's")
    func rewriteReplaces() throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let f = try PersistFixture(k: 0, m: 0, nodeCount: 2, sizes: 50_000...90_000, seed: 6)
        try f.writeAll(step: Self.step, root: root)
        var rng = SplitMix64(seed: 600)
        let second = randomBytes(123_457, &rng)
        let result = try f.write("n0", step: Self.step, root: root, image: second)
        #expect(entries(PersistPaths.stepDirectory(root, step: Self.step)) == ["n0", "n1"], "no old or temporary directory left")
        let catalog = PersistCatalog(root: root)
        #expect(catalog.parts[Self.step]?["n0"] == result.part)
        #expect(catalog.parts[Self.step]?["n0"]?.imageBytes == second.count)
        let got = Collector(expected: second, limit: 0)
        let loaded = try ImageLoader(catalog: catalog).load(step: Self.step, node: "n0", sink: got.sink)
        #expect(loaded.fromOwnPart && got.isComplete)
    }

    @Test("a directory under a regular file cannot be written: a PersistError, nothing left behind")
    func unwritableUnderFile() throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let file = root + "/plain-file"
        try Data("not a directory".utf8).write(to: URL(fileURLWithPath: file))
        let f = try PersistFixture(k: 2, m: 1, nodeCount: 3, sizes: 10_000...20_000, seed: 9)
        let error = #expect(throws: PersistError.self) { try f.write("n0", step: Self.step, root: file + "/sub") }
        #expect(error?.code == .unwritable || error?.code == .io, "\(String(describing: error))")
        #expect(entries(root) == ["plain-file"])
        #expect(leftovers(root).isEmpty)
    }

    @Test("a write that fails midway (a bad manifest, wrong parity buffers, cancelled) removes what it wrote")
    func failedWriteLeavesNothing() throws {
        let root = try makeTemporaryDirectory()
        defer { removeDirectory(root) }
        let f = try PersistFixture(k: 2, m: 1, nodeCount: 3, sizes: 60_000...80_000, seed: 10)

        let bad = #expect(throws: PersistError.self) {
            try f.write("n0", step: Self.step, root: root, edit: { $0.nodes = ["someone-else"] })
        }
        #expect(bad?.code == .badManifest)
        #expect(entries(root).isEmpty, "the step directory it created is gone too")

        let wrongParity = #expect(throws: PersistError.self) { try f.write("n0", step: Self.step, root: root, parityBuffers: 0) }
        #expect(wrongParity?.code == .io)
        #expect(entries(root).isEmpty)

        // An image source whose pieces fall short of the range asked for (or run past it).
        for delta in [-1, 1] {
            let short = #expect(throws: PersistError.self) {
                try f.write("n0", step: Self.step, root: root, pieces: { image, r in
                    let end = min(image.count, r.upperBound + delta)
                    return [UnsafeRawBufferPointer(rebasing: image[r.lowerBound..<end])]
                })
            }
            #expect(short?.code == .io, "\(delta)")
            #expect(entries(root).isEmpty)
        }
        // Empty pieces (even without an address) are nothing to write.
        try f.write("n2", step: Self.step, root: root, pieces: { image, r in
            [UnsafeRawBufferPointer(start: nil, count: 0)] + PersistFixture.pieces(image, r) + [UnsafeRawBufferPointer(rebasing: image[0..<0])]
        })
        let (loaded, got) = try loadChecked(ImageLoader(catalog: PersistCatalog(root: root)), f, step: Self.step, node: "n2")
        #expect(loaded.fromOwnPart && got.isComplete)
        try FileManager.default.removeItem(atPath: PersistPaths.stepDirectory(root, step: Self.step))

        let cancel = PersistCancel()
        cancel.cancel()
        let cancelled = #expect(throws: PersistError.self) { try f.write("n0", step: Self.step, root: root, cancel: cancel) }
        #expect(cancelled?.code == .cancelled)
        #expect(entries(root).isEmpty)

        // Another node's part in the step: a failed write leaves it alone.
        try f.write("n1", step: Self.step, root: root)
        _ = #expect(throws: PersistError.self) { try f.write("n0", step: Self.step, root: root, cancel: cancel) }
        #expect(entries(PersistPaths.stepDirectory(root, step: Self.step)) == ["n1"])
        #expect(leftovers(root).isEmpty)
    }

    @Test("step directory names: only step- and twelve digits")
    func stepNames() {
        #expect(PersistPaths.stepDirectory("/r", step: 120) == "/r/step-000000000120")
        #expect(PersistPaths.step(ofEntry: "step-000000000120") == 120)
        #expect(PersistPaths.step(ofEntry: "step-120") == nil)
        #expect(PersistPaths.step(ofEntry: "step-+00000000120") == nil)
        #expect(PersistPaths.step(ofEntry: "step--00000000120") == nil)
        #expect(PersistPaths.step(ofEntry: ".step-000000000120") == nil)
    }
}

// MARK: real filesystems

/// Mounts a small tmpfs for the length of a test (root only).
enum Tmpfs {
    @discardableResult
    static func run(_ arguments: [String]) -> Int32 {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        do { try process.run() } catch { return -1 }
        process.waitUntilExit()
        return process.terminationStatus
    }

    static func mount(_ dir: String, options: String) -> Bool { run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", dir]) == 0 }
    static func unmount(_ dir: String) { run(["umount", dir]) }

    /// Whether this process may mount a tmpfs (tried once, on a scratch directory).
    static let available: Bool = {
        guard getuid() == 0, let dir = try? makeTemporaryDirectory() else { return false }
        defer { removeDirectory(dir) }
        guard mount(dir, options: "size=64k") else { return false }
        unmount(dir)
        return true
    }()
}

@Suite("Persistent tier on a full or read-only filesystem",
       .enabled(if: Tmpfs.available, "mounting a tmpfs is not permitted here (needs root and CAP_SYS_ADMIN)"))
struct PersistFilesystemTests {
    @Test("a full disk gives out_of_space and leaves no temporary directory; the space is free again after")
    func outOfSpace() throws {
        let dir = try makeTemporaryDirectory()
        defer { removeDirectory(dir) }
        try #require(Tmpfs.mount(dir, options: "size=256k"))
        defer { Tmpfs.unmount(dir) }
        let f = try PersistFixture(k: 0, m: 0, nodeCount: 1, sizes: (1 << 20)...(1 << 20), seed: 13)
        let error = #expect(throws: PersistError.self) { try f.write("n0", step: 3, root: dir) }
        #expect(error?.code == .outOfSpace, "\(String(describing: error))")
        #expect(leftovers(dir).isEmpty)
        #expect(entries(dir).isEmpty, "the step directory it created is removed too")
        // What it wrote was freed: a small part fits now.
        var rng = SplitMix64(seed: 14)
        let small = randomBytes(100_000, &rng)
        try f.write("n0", step: 3, root: dir, image: small)
        let got = Collector(expected: small, limit: 0)
        let loaded = try ImageLoader(catalog: PersistCatalog(root: dir)).load(step: 3, node: "n0", sink: got.sink)
        #expect(loaded.fromOwnPart && got.isComplete)
    }

    @Test("no inode left for the step directory, the part's or one of its files: out_of_space, nothing left behind",
          arguments: 1...5)
    func noInodeLeft(inodes: Int) throws {
        let dir = try makeTemporaryDirectory()
        defer { removeDirectory(dir) }
        // The mount's root takes one; then the step directory, the temporary one, image.bin, parity.bin, part.json.
        try #require(Tmpfs.mount(dir, options: "size=1m,nr_inodes=\(inodes)"))
        defer { Tmpfs.unmount(dir) }
        let f = try PersistFixture(k: 0, m: 0, nodeCount: 1, sizes: 10_000...10_000, seed: 17)
        let error = #expect(throws: PersistError.self) { try f.write("n0", step: 3, root: dir) }
        #expect(error?.code == .outOfSpace, "\(String(describing: error))")
        #expect(entries(dir).isEmpty)
    }

    @Test("a read-only filesystem gives unwritable, for a new step and for an existing one")
    func readOnly() throws {
        let dir = try makeTemporaryDirectory()
        defer { removeDirectory(dir) }
        try #require(Tmpfs.mount(dir, options: "size=1m"))
        defer { Tmpfs.unmount(dir) }
        let f = try PersistFixture(k: 0, m: 0, nodeCount: 2, sizes: 10_000...20_000, seed: 15)
        try f.write("n1", step: 5, root: dir)
        try #require(Tmpfs.run(["mount", "-o", "remount,ro", dir]) == 0)
        let existing = #expect(throws: PersistError.self) { try f.write("n0", step: 5, root: dir) }
        #expect(existing?.code == .unwritable, "\(String(describing: existing))")
        let fresh = #expect(throws: PersistError.self) { try f.write("n0", step: 6, root: dir) }
        #expect(fresh?.code == .unwritable, "\(String(describing: fresh))")
        #expect(entries(dir) == ["step-000000000005"])
        #expect(entries(PersistPaths.stepDirectory(dir, step: 5)) == ["n1"])
    }
}
