import FTCore
import FTErasure
import FTPersist
import FTSystem
import Foundation
import Testing

// MARK: fixture: a persisted step of a small DP job, built from whole tensors

/// A job of `nodes.count` nodes × `workersPerNode` workers, one data-parallel
/// group (worker `i` is DP rank `i` of all of them), each worker registering
/// the same tensors: replicated ones (sliced across ranks exactly as
/// `ShardLayout` cuts them) and per-rank ones (whole on every rank, different
/// bytes). The whole tensors are kept (`expected`, by exported name) to
/// compare an export against; the node images are built from them as the SMP
/// builds them (`NodeImage` manifest, then every worker's slot) and written
/// with `PartWriter`, parity computed with `ReedSolomon` per `ParityPlacement`.
struct ExportJobFixture {
    static let job = "export-test-job"
    static let blockBytes = 4096
    static let chunkBytes = 4096

    let nodes: [String]
    let workersPerNode: Int
    let k: Int
    let m: Int
    let step: Int
    var registrations: [WorkerRegistration] = []
    /// Exported name -> (spec, whole bytes).
    var expected: [String: (spec: TensorSpec, bytes: [UInt8])] = [:]
    var images: [String: [UInt8]] = [:]
    var parity: [String: [UInt8]] = [:]
    var ecChunk = 0

    var dpSize: Int { nodes.count * workersPerNode }
    var groups: [[String]] { k == 0 ? [] : stride(from: 0, to: nodes.count, by: k + m).map { Array(nodes[$0..<$0 + k + m]) } }

    /// The tensors every rank registers. Odd element counts so that slices
    /// are uneven; `emb` spans several chunks per rank; `scale` (one element)
    /// leaves some ranks an empty slice.
    static func specs(bf16: Bool = true) -> [TensorSpec] {
        var specs = [
            TensorSpec(name: "params", dtype: .f32, shape: [37, 5], role: .param, replicated: true),
            TensorSpec(name: "emb", dtype: .f16, shape: [20011], role: .param, replicated: true),
            TensorSpec(name: "adam_m", dtype: .f32, shape: [37, 5], role: .optimizer, replicated: true),
            TensorSpec(name: "scale", dtype: .f64, shape: [], role: .param, replicated: true),
            TensorSpec(name: "rng", dtype: .u8, shape: [16], role: .rng, replicated: false),
            TensorSpec(name: "step", dtype: .i64, shape: [1], role: .meta, replicated: false),
            TensorSpec(name: "counts", dtype: .i32, shape: [3, 2], role: .meta, replicated: false),
        ]
        if bf16 { specs.insert(TensorSpec(name: "norm", dtype: .bf16, shape: [3, 7], role: .param, replicated: true), at: 2) }
        return specs
    }

    /// `tweak(rank, &specs)` changes what one rank registers (for the tests of disagreeing slices).
    init(nodes: Int, workersPerNode: Int, k: Int = 0, m: Int = 0, step: Int = 120, seed: UInt64, bf16: Bool = true,
         tweak: (Int, inout [TensorSpec]) -> Void = { _, _ in }) throws {
        self.nodes = (0..<nodes).map { "n\($0)" }
        self.workersPerNode = workersPerNode
        self.k = k
        self.m = m
        self.step = step
        var rng = SplitMix64(seed: seed)
        let D = nodes * workersPerNode
        // The whole tensors: replicated ones once, per-rank ones per rank.
        var wholeShared: [String: [UInt8]] = [:]
        var rankSlots: [[UInt8]] = []
        var rankCRCs: [[UInt32]] = []
        for rank in 0..<D {
            var specs = Self.specs(bf16: bf16)
            tweak(rank, &specs)
            let reg = WorkerRegistration(workerID: "w\(rank)", dpRank: rank, dpSize: D, chunkBytes: Self.chunkBytes, specs: specs)
            registrations.append(reg)
            let layout = reg.layout
            var slot = Self.randomBytes(layout.slotBytes, &rng)  // padding between tensors: garbage, never exported
            var crcs = [UInt32](repeating: 0, count: layout.chunkCount)
            for entry in layout.entries {
                let whole: [UInt8]
                if entry.spec.replicated {
                    let key = entry.spec.name
                    if wholeShared[key] == nil || wholeShared[key]!.count != entry.spec.byteCount {
                        wholeShared[key] = Self.values(entry.spec, &rng)
                        expected[key] = (entry.spec, wholeShared[key]!)
                    }
                    whole = wholeShared[key]!
                } else {
                    whole = Self.values(entry.spec, &rng)
                    expected["\(entry.spec.name)@rank\(rank)"] = (entry.spec, whole)
                }
                let stored = Array(whole[entry.storedRange])
                slot.replaceSubrange(entry.slotOffset..<entry.slotOffset + stored.count, with: stored)
                for c in 0..<entry.chunkCount {
                    let r = layout.chunkRange(entry, chunk: c)
                    crcs[entry.firstChunk + c] = CRC32C.checksum(stored[r])
                }
            }
            rankSlots.append(slot)
            rankCRCs.append(crcs)
        }
        for (n, node) in self.nodes.enumerated() {
            let ranks = n * workersPerNode..<(n + 1) * workersPerNode
            let image = NodeImage(step: step, entries: ranks.map {
                NodeImage.Entry(registration: registrations[$0], slotBytes: registrations[$0].layout.slotBytes, crcs: rankCRCs[$0])
            })
            images[node] = image.manifest() + ranks.flatMap { rankSlots[$0] }
        }
        if k > 0 { try computeParity() }
    }

    /// Every node's parity chunks, in `parityRows(of:)` order.
    private mutating func computeParity() throws {
        let n = k + m
        try #require(nodes.count % n == 0)
        let chunk = ParityPlacement.chunkBytes(forNodeBytes: nodes.map { images[$0]!.count }, k: k)
        ecChunk = chunk
        let placement = ParityPlacement(k: k, m: m)
        let codec = try ReedSolomon(dataCount: k, parityCount: m)
        for group in groups {
            var rows: [[[UInt8]]] = []
            for r in 0..<n {
                let data: [[UInt8]] = try placement.dataContributors(row: r).map { q in
                    let c = try #require(placement.dataRows(of: q).firstIndex(of: r))
                    let image = images[group[q]]!
                    let lo = min(c * chunk, image.count), hi = min((c + 1) * chunk, image.count)
                    return Array(image[lo..<hi]) + [UInt8](repeating: 0, count: chunk - (hi - lo))
                }
                rows.append(try codec.encode(data))
            }
            for (q, id) in group.enumerated() {
                parity[id] = placement.parityRows(of: q).flatMap { rows[$0.row][$0.parityIndex] }
            }
        }
    }

    func template(_ node: String, step: Int) -> PersistedPart {
        let imageBytes = images[node]!.count
        guard let group = groups.first(where: { $0.contains(node) }) else {
            return PersistedPart(job: Self.job, node: node, step: step, k: 0, m: 0, chunkBytes: 0, group: [], position: 0, nodes: nodes,
                                 imageBytes: imageBytes, blockBytes: Self.blockBytes, imageCRCs: [], parityRows: [], writtenAt: 0)
        }
        let q = group.firstIndex(of: node)!
        return PersistedPart(job: Self.job, node: node, step: step, k: k, m: m, chunkBytes: ecChunk, group: group, position: q,
                             nodes: nodes, imageBytes: imageBytes, blockBytes: Self.blockBytes, imageCRCs: [],
                             parityRows: ParityPlacement(k: k, m: m).parityRows(of: q).map { .init(row: $0.row, parityIndex: $0.parityIndex, crcs: []) },
                             writtenAt: 0)
    }

    /// Writes every node's part (or those in `only`) of the fixture's step (or `step`).
    func write(root: String, step: Int? = nil, only: [String]? = nil) throws {
        for node in only ?? nodes {
            var writer = PartWriter(root: root)
            writer.blockBytes = Self.blockBytes
            let part = template(node, step: step ?? self.step)
            let image = images[node]!, bytes = parity[node] ?? [], chunk = ecChunk
            _ = try image.withUnsafeBytes { iv in
                try bytes.withUnsafeBytes { pv in
                    try writer.write(part: part, image: { [UnsafeRawBufferPointer(rebasing: iv[$0])] },
                                     parity: (0..<part.parityRows.count).map { UnsafeRawBufferPointer(rebasing: pv[$0 * chunk..<($0 + 1) * chunk]) })
                }
            }
        }
    }

    func imagePath(_ root: String, _ node: String, step: Int? = nil) -> String {
        PersistPaths.partDirectory(root, step: step ?? self.step, node: node) + "/" + PersistPaths.imageFile
    }

    /// Where a node's image holds the given stored bytes of `tensor` of the worker of `rank`.
    func imageOffset(rank: Int, tensor: String, byte: Int) throws -> (node: String, offset: Int) {
        let n = rank / workersPerNode
        let ranks = n * workersPerNode..<(n + 1) * workersPerNode
        let image = NodeImage(step: step, entries: ranks.map {
            NodeImage.Entry(registration: registrations[$0], slotBytes: registrations[$0].layout.slotBytes,
                            crcs: [UInt32](repeating: 0, count: registrations[$0].layout.chunkCount))
        })
        let entry = try #require(registrations[rank].layout.entry(named: tensor))
        return (nodes[n], image.layout.slotStart(rank - ranks.lowerBound) + entry.slotOffset + byte)
    }

    // MARK: values

    /// Plausible values of the dtype (floats that are numbers, not random bit patterns).
    static func values(_ spec: TensorSpec, _ rng: inout SplitMix64) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(spec.byteCount)
        func append<T>(_ v: T) { withUnsafeBytes(of: v) { out.append(contentsOf: $0) } }
        for _ in 0..<spec.elementCount {
            let x = Float(Double(rng.next() % 2_000_001) / 1000.0 - 1000.0)
            switch spec.dtype {
            case .f32: append(x.bitPattern.littleEndian)
            case .f64: append((Double(x) * 1.000001).bitPattern.littleEndian)
            case .f16: append(Float16(x / 16).bitPattern.littleEndian)
            case .bf16: append(UInt16(truncatingIfNeeded: x.bitPattern >> 16).littleEndian)
            case .i32: append(Int32(truncatingIfNeeded: Int64(bitPattern: rng.next())).littleEndian)
            case .i64: append(Int64(bitPattern: rng.next()).littleEndian)
            case .u8: append(UInt8(truncatingIfNeeded: rng.next()))
            }
        }
        return out
    }

    static func randomBytes(_ count: Int, _ rng: inout SplitMix64) -> [UInt8] {
        (0..<count).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
    }
}

// MARK: reading a safetensors file back

struct SafetensorsFile {
    struct Tensor {
        var dtype: String
        var shape: [Int]
        var bytes: [UInt8]
        var offsets: Range<Int>
    }

    var headerBytes: Int
    var tensors: [String: Tensor] = [:]
    var metadata: [String: String] = [:]

    /// Parses the file, checking what readers check: a header of the length it
    /// says, JSON, padded to 8; data offsets in bounds, without holes or overlaps.
    init(path: String) throws {
        let data = [UInt8](try #require(FileManager.default.contents(atPath: path)))
        try #require(data.count >= 8)
        let n = data[0..<8].enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
        headerBytes = 8 + n
        #expect(headerBytes % 8 == 0, "header padded to a multiple of 8")
        try #require(headerBytes <= data.count)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(data[8..<headerBytes])) as? [String: Any])
        var ranges: [Range<Int>] = []
        for (name, value) in object {
            if name == "__metadata__" {
                metadata = try #require(value as? [String: String])
                continue
            }
            let t = try #require(value as? [String: Any])
            let offsets = try #require(t["data_offsets"] as? [Int])
            try #require(offsets.count == 2 && offsets[0] <= offsets[1] && headerBytes + offsets[1] <= data.count)
            let range = offsets[0]..<offsets[1]
            ranges.append(range)
            tensors[name] = Tensor(dtype: try #require(t["dtype"] as? String), shape: try #require(t["shape"] as? [Int]),
                                   bytes: Array(data[headerBytes + range.lowerBound..<headerBytes + range.upperBound]), offsets: range)
        }
        var at = 0
        for r in ranges.sorted(by: { ($0.lowerBound, $0.upperBound) < ($1.lowerBound, $1.upperBound) }) {
            #expect(r.lowerBound == at, "data section without holes or overlaps")
            at = r.upperBound
        }
        #expect(headerBytes + at == data.count, "the data section ends the file")
    }
}

func exportTemporaryDirectory() throws -> String {
    var template = Array((NSTemporaryDirectory() + "/ft-export-test-XXXXXX").utf8CString)
    let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
    try #require(made != nil)
    return String(cString: made!)
}

func exportRemove(_ dir: String) { try? FileManager.default.removeItem(atPath: dir) }

func exportFlip(_ path: String, at offset: Int) throws {
    let fd = open(path, O_RDWR)
    try #require(fd >= 0, "open \(path)")
    defer { close(fd) }
    var b: UInt8 = 0
    try #require(pread(fd, &b, 1, off_t(offset)) == 1)
    b ^= 0xA5
    try #require(pwrite(fd, &b, 1, off_t(offset)) == 1)
}

func safetensorsName(_ dtype: DType) -> String {
    ["f32": "F32", "f16": "F16", "bf16": "BF16", "f64": "F64", "i32": "I32", "i64": "I64", "u8": "U8"][dtype.description]!
}

/// Every tensor of the file is the fixture's whole tensor, and nothing else is there.
func expectMatches(_ file: SafetensorsFile, _ f: ExportJobFixture) throws {
    #expect(Set(file.tensors.keys) == Set(f.expected.keys))
    for (name, (spec, bytes)) in f.expected {
        let t = try #require(file.tensors[name], "\(name) is in the file")
        #expect(t.dtype == safetensorsName(spec.dtype), "\(name)")
        #expect(t.shape == spec.shape, "\(name)")
        #expect(t.bytes == bytes, "\(name): the whole tensor, bit-exact")
        #expect(t.offsets.lowerBound % spec.dtype.size == 0, "\(name) starts aligned to its element")
    }
}

/// Writes `f` as a fixture for python/tests/test_export.py: `DIR/persist`
/// (the persist directory), `DIR/expected/<i>.bin` (each whole tensor's raw
/// bytes) and `DIR/expected.json` (step, job, per exported name its
/// safetensors dtype, shape and file).
func writePythonFixture(_ f: ExportJobFixture, root: String, to dir: String) throws {
    let fm = FileManager.default
    for name in ["persist", "expected", "expected.json"] { try? fm.removeItem(atPath: dir + "/" + name) }
    try fm.createDirectory(atPath: dir + "/expected", withIntermediateDirectories: true)
    try fm.copyItem(atPath: root, toPath: dir + "/persist")
    var tensors: [String: Any] = [:]
    for (i, (name, value)) in f.expected.sorted(by: { $0.key < $1.key }).enumerated() {
        let file = "expected/\(i).bin"
        try Data(value.bytes).write(to: URL(fileURLWithPath: dir + "/" + file))
        tensors[name] = ["dtype": safetensorsName(value.spec.dtype), "shape": value.spec.shape, "file": file,
                         "role": value.spec.role.description] as [String: Any]
    }
    let json = try JSONSerialization.data(withJSONObject: ["step": f.step, "job": ExportJobFixture.job, "nodes": f.nodes,
                                                           "damaged": ["n1"], "tensors": tensors] as [String: Any],
                                          options: [.sortedKeys, .prettyPrinted])
    try json.write(to: URL(fileURLWithPath: dir + "/expected.json"))
}

// MARK: tests

@Suite("Export: a persisted step as one safetensors file, every tensor whole")
struct ExportTests {
    @Test("two nodes without EC, DP size 2: replicated tensors joined from their slices, per-rank tensors once per rank")
    func twoNodesNoEC() throws {
        let root = try exportTemporaryDirectory()
        defer { exportRemove(root) }
        let f = try ExportJobFixture(nodes: 2, workersPerNode: 1, seed: 1)
        try f.write(root: root)
        let out = root + "/out/model.safetensors"
        try FileManager.default.createDirectory(atPath: root + "/out", withIntermediateDirectories: true)

        var events: [ExportEvent] = []
        var exporter = SafetensorsExporter(root: root)
        exporter.progress = { events.append($0) }
        let summary = try exporter.export(to: out)
        #expect(summary.step == f.step)
        #expect(summary.job == ExportJobFixture.job)
        #expect(summary.nodes == ["n0", "n1"])
        #expect(summary.decodedNodes.isEmpty)
        #expect(summary.tensors.count == f.expected.count)
        #expect(summary.tensorBytes == f.expected.values.reduce(0) { $0 + $1.bytes.count })
        #expect(events.count { if case .nodeDone = $0 { true } else { false } } == 2)

        let file = try SafetensorsFile(path: out)
        try expectMatches(file, f)
        #expect(file.metadata["step"] == "120")
        #expect(file.metadata["job"] == ExportJobFixture.job)
        #expect(file.metadata["dp_size"] == "2")
        #expect(Set(file.tensors.keys) == ["params", "emb", "norm", "adam_m", "scale", "rng@rank0", "rng@rank1", "step@rank0",
                                          "step@rank1", "counts@rank0", "counts@rank1"])
        let size = try FileManager.default.attributesOfItem(atPath: out)[.size] as? Int
        #expect(size == summary.fileBytes)

        // The JSON beside it.
        let sidecarData = try #require(FileManager.default.contents(atPath: out + ".json"))
        let sidecar = try #require(try JSONSerialization.jsonObject(with: sidecarData) as? [String: Any])
        #expect(sidecar["step"] as? Int == 120)
        #expect(sidecar["job"] as? String == ExportJobFixture.job)
        #expect(sidecar["persist_dir"] as? String == URL(fileURLWithPath: root).standardizedFileURL.path)
        let tensors = try #require(sidecar["tensors"] as? [String: [String: Any]])
        #expect(Set(tensors.keys) == Set(f.expected.keys))
        let params = try #require(tensors["params"])
        #expect(params["role"] as? String == "param")
        #expect(params["dtype"] as? String == "f32")
        #expect(params["shape"] as? [Int] == [37, 5])
        #expect(params["bytes"] as? Int == 37 * 5 * 4)
        #expect(params["rank"] == nil)
        let rng = try #require(tensors["rng@rank1"])
        #expect(rng["role"] as? String == "rng")
        #expect(rng["rank"] as? Int == 1)
        #expect(rng["tensor"] as? String == "rng")
        #expect(tensors["norm"]?["dtype"] as? String == "bf16")
        // Nothing left behind but the two files.
        #expect(try FileManager.default.contentsOfDirectory(atPath: root + "/out").sorted() == ["model.safetensors", "model.safetensors.json"])
    }

    @Test("two nodes of two workers (DP size 4), an explicit step among several; the export replaces an older file")
    func explicitStep() throws {
        let root = try exportTemporaryDirectory()
        defer { exportRemove(root) }
        let older = try ExportJobFixture(nodes: 2, workersPerNode: 2, step: 40, seed: 2)
        let newer = try ExportJobFixture(nodes: 2, workersPerNode: 2, step: 80, seed: 3)
        try older.write(root: root)
        try newer.write(root: root)
        let out = root + "/m.safetensors"
        let exporter = SafetensorsExporter(root: root)
        #expect(try exporter.export(to: out).step == 80, "the newest durable step by default")
        try expectMatches(try SafetensorsFile(path: out), newer)
        let summary = try exporter.export(step: 40, to: out)
        #expect(summary.step == 40)
        let file = try SafetensorsFile(path: out)
        try expectMatches(file, older)
        #expect(file.metadata["step"] == "40")
        #expect(file.tensors["rng@rank3"] != nil)
    }

    @Test("RS(1+1) over two nodes: one node's image.bin damaged mid-stream, its image decoded from the other's parity")
    func damagedNodeRS11() throws {
        let root = try exportTemporaryDirectory()
        defer { exportRemove(root) }
        let f = try ExportJobFixture(nodes: 2, workersPerNode: 1, k: 1, m: 1, seed: 4)
        try f.write(root: root)
        // A byte of a late block: earlier blocks reach the sink before the fallback restarts it.
        let (node, at) = try f.imageOffset(rank: 0, tensor: "emb", byte: 9000)
        #expect(node == "n0")
        try #require(at > 2 * ExportJobFixture.blockBytes)
        try exportFlip(f.imagePath(root, node), at: at)

        var notes: [String] = []
        var exporter = SafetensorsExporter(root: root)
        exporter.progress = { if case .note(let line) = $0 { notes.append(line) } }
        let out = root + "/model.safetensors"
        let summary = try exporter.export(to: out)
        #expect(summary.decodedNodes == ["n0"])
        #expect(notes.contains { $0.contains("n0") && $0.contains("decoding") })
        try expectMatches(try SafetensorsFile(path: out), f)
        let sidecarData = try #require(FileManager.default.contents(atPath: out + ".json"))
        let sidecar = try #require(try JSONSerialization.jsonObject(with: sidecarData) as? [String: Any])
        #expect(sidecar["decoded_nodes"] as? [String] == ["n0"])
    }

    @Test("RS(2+1) over three nodes of two workers (DP size 6): a node's image.bin cut short, decoded from the group")
    func damagedNodeRS21() throws {
        let root = try exportTemporaryDirectory()
        defer { exportRemove(root) }
        let f = try ExportJobFixture(nodes: 3, workersPerNode: 2, k: 2, m: 1, seed: 5)
        try f.write(root: root)
        let path = f.imagePath(root, "n1")
        try #require(truncate(path, off_t(f.images["n1"]!.count - 5000)) == 0)
        let out = root + "/model.safetensors"
        let summary = try SafetensorsExporter(root: root).export(to: out)
        #expect(summary.decodedNodes == ["n1"])
        try expectMatches(try SafetensorsFile(path: out), f)
    }

    @Test("the fixture for python/tests/test_export.py: RS(2+1), three nodes, n1 damaged (written when FT_EXPORT_FIXTURE_DIR is set)")
    func pythonFixture() throws {
        let root = try exportTemporaryDirectory()
        defer { exportRemove(root) }
        // numpy has no bfloat16: the fixture leaves it out (the tests above cover it).
        let f = try ExportJobFixture(nodes: 3, workersPerNode: 2, k: 2, m: 1, step: 300, seed: 6, bf16: false)
        try f.write(root: root)
        let (node, at) = try f.imageOffset(rank: 2, tensor: "params", byte: 11)
        #expect(node == "n1")
        try exportFlip(f.imagePath(root, node), at: at)
        let out = root + "/check.safetensors"
        #expect(try SafetensorsExporter(root: root).export(to: out).decodedNodes == ["n1"])
        try expectMatches(try SafetensorsFile(path: out), f)
        try FileManager.default.removeItem(atPath: out)
        try FileManager.default.removeItem(atPath: out + ".json")
        if let dir = ProcessInfo.processInfo.environment["FT_EXPORT_FIXTURE_DIR"], !dir.isEmpty {
            try writePythonFixture(f, root: root, to: dir)
        }
    }

    // MARK: refusals

    @Test("no durable step: an empty directory, a missing one, a step with a node's part missing (no EC)")
    func noDurableStep() throws {
        let root = try exportTemporaryDirectory()
        defer { exportRemove(root) }
        let out = root + "/x.safetensors"
        let empty = try #require(throws: ExportError.self) { try SafetensorsExporter(root: root).export(to: out) }
        #expect(empty.code == .noDurableStep)
        let absent = try #require(throws: ExportError.self) { try SafetensorsExporter(root: root + "/nope").export(to: out) }
        #expect(absent.code == .noDurableStep)
        let f = try ExportJobFixture(nodes: 2, workersPerNode: 1, seed: 7)
        try f.write(root: root, only: ["n0"])
        let error = try #require(throws: ExportError.self) { try SafetensorsExporter(root: root).export(to: out) }
        #expect(error.code == .noDurableStep)
        #expect(error.message.contains("n1"), "says what is missing: \(error.message)")
        #expect(!FileManager.default.fileExists(atPath: out))
    }

    @Test("a step that is not there, or not durable, is refused with the durable steps listed")
    func stepNotFound() throws {
        let root = try exportTemporaryDirectory()
        defer { exportRemove(root) }
        let f = try ExportJobFixture(nodes: 2, workersPerNode: 1, seed: 8)
        try f.write(root: root)
        try f.write(root: root, step: 200, only: ["n1"])
        let exporter = SafetensorsExporter(root: root)
        let missing = try #require(throws: ExportError.self) { try exporter.export(step: 999, to: root + "/x.safetensors") }
        #expect(missing.code == .stepNotFound)
        #expect(missing.message.contains("999") && missing.message.contains("120"), "\(missing.message)")
        let partial = try #require(throws: ExportError.self) { try exporter.export(step: 200, to: root + "/x.safetensors") }
        #expect(partial.code == .notDurable)
        #expect(partial.message.contains("n0"), "\(partial.message)")
        #expect(try exporter.export(to: root + "/x.safetensors").step == 120)
    }

    @Test("a damaged node without EC cannot be loaded: the error names it and why; nothing is written")
    func unloadableNode() throws {
        let root = try exportTemporaryDirectory()
        defer { exportRemove(root) }
        let f = try ExportJobFixture(nodes: 2, workersPerNode: 1, seed: 9)
        try f.write(root: root)
        let (node, at) = try f.imageOffset(rank: 1, tensor: "emb", byte: 5000)
        try exportFlip(f.imagePath(root, node), at: at)
        let out = root + "/x.safetensors"
        let error = try #require(throws: ExportError.self) { try SafetensorsExporter(root: root).export(to: out) }
        #expect(error.code == .unloadable)
        #expect(error.message.contains("node n1") && error.message.contains("CRC32C"), "\(error.message)")
        #expect(!FileManager.default.fileExists(atPath: out))
        #expect(try FileManager.default.contentsOfDirectory(atPath: root).filter { $0.contains(".tmp-") }.isEmpty)
    }

    @Test("a slot chunk that does not match its manifest CRC (bytes persisted already corrupt) is refused")
    func corruptSlotChunk() throws {
        let root = try exportTemporaryDirectory()
        defer { exportRemove(root) }
        var f = try ExportJobFixture(nodes: 2, workersPerNode: 1, seed: 10)
        // Change a slot byte in the image itself: the part's block CRCs are computed over it, the manifest's chunk CRC is not.
        let (node, at) = try f.imageOffset(rank: 0, tensor: "params", byte: 3)
        f.images[node]![at] ^= 0xFF
        try f.write(root: root)
        let error = try #require(throws: ExportError.self) { try SafetensorsExporter(root: root).export(to: root + "/x.safetensors") }
        #expect(error.code == .corrupt)
        #expect(error.message.contains("'params'") && error.message.contains("w0"), "\(error.message)")
    }

    @Test("slices that disagree (shape, dtype, replicated on one rank and per-rank on another) are refused")
    func slicesDisagree() throws {
        let tweaks: [(String, (Int, inout [TensorSpec]) -> Void)] = [
            ("shape", { r, s in if r == 1 { s[0].shape = [5, 37] } }),
            ("dtype", { r, s in if r == 1 { s[0].dtype = .i32 } }),
            ("per-rank", { r, s in if r == 1 { s[0].replicated = false } }),
            ("missing", { r, s in if r == 1 { s.remove(at: 0) } }),
        ]
        for (what, tweak) in tweaks {
            let root = try exportTemporaryDirectory()
            defer { exportRemove(root) }
            let f = try ExportJobFixture(nodes: 2, workersPerNode: 1, seed: 11, tweak: tweak)
            try f.write(root: root)
            let error = try #require(throws: ExportError.self, "\(what)") { try SafetensorsExporter(root: root).export(to: root + "/x.safetensors") }
            #expect(error.code == .inconsistent, "\(what): \(error.message)")
            #expect(error.message.contains("'params'"), "\(what): \(error.message)")
        }
    }

    @Test("the plan refuses a DP rank held twice or missing, and DP sizes that disagree")
    func planRefusals() throws {
        let specs = [TensorSpec(name: "p", dtype: .f32, shape: [10], role: .param, replicated: true)]
        func image(_ regs: [WorkerRegistration]) -> NodeImage {
            NodeImage(step: 1, entries: regs.map { NodeImage.Entry(registration: $0, slotBytes: $0.layout.slotBytes, crcs: [UInt32](repeating: 0, count: $0.layout.chunkCount)) })
        }
        let r0 = WorkerRegistration(workerID: "a", dpRank: 0, dpSize: 2, chunkBytes: 4096, specs: specs)
        let r1 = WorkerRegistration(workerID: "b", dpRank: 1, dpSize: 2, chunkBytes: 4096, specs: specs)
        let twice = WorkerRegistration(workerID: "c", dpRank: 0, dpSize: 2, chunkBytes: 4096, specs: specs)
        let other = WorkerRegistration(workerID: "d", dpRank: 1, dpSize: 3, chunkBytes: 4096, specs: specs)
        let plan = try ExportPlan(images: [("n0", image([r0])), ("n1", image([r1]))])
        #expect(plan.tensors.map(\.name) == ["p"])
        #expect(plan.dataBytes == 40)
        #expect(plan.segments.map(\.count) == [1, 1])
        #expect(plan.segments[1][0].destination == 20, "rank 1's slice is the second half")
        let cases: [(String, [(String, NodeImage)])] = [
            ("rank 0", [("n0", image([r0])), ("n1", image([twice]))]),
            ("rank 1", [("n0", image([r0]))]),
            ("DP size", [("n0", image([r0])), ("n1", image([other]))]),
        ]
        for (says, images) in cases {
            let error = try #require(throws: ExportError.self) { _ = try ExportPlan(images: images.map { (node: $0.0, image: $0.1) }) }
            #expect(error.code == .inconsistent)
            #expect(error.message.contains(says), "\(error.message)")
        }
    }

    @Test("every dtype has a safetensors name")
    func dtypeNames() {
        for d in DType.allCases { #expect(d.safetensorsName == safetensorsName(d)) }
    }
}
