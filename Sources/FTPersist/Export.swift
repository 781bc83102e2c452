import FTCore
import FTErasure
import FTSystem
import Foundation

/// Exports a persisted step as one safetensors file that users' tools read
/// (`safetensors.safe_open`, `safetensors.torch.load_file`, …), and a small
/// JSON beside it (`OUT.json`) that says where it came from.
///
/// Every node's image of the step is loaded (`ImageLoader`: CRC-checked
/// blocks, decoded from the group's parity when a node's own part is
/// damaged), its manifest parsed (`NodeImage`), every worker's slot checked
/// chunk by chunk against the manifest's CRC32Cs, and every tensor
/// reassembled whole:
///
/// - A **replicated** tensor (`TensorSpec.replicated`: the same bytes on every
///   data-parallel rank, each rank storing its slice) is exported once, under
///   its registered name, its bytes the concatenation of the slices of ranks
///   `0..<D` in order (`ShardLayout.storedRange`: rank `r` stores elements
///   `r·e/D ..< (r+1)·e/D`). Every rank must hold it, with the same dtype,
///   shape and role.
/// - A **per-rank** tensor (not replicated: RNG state, data-loader position,
///   counters; whatever the worker registered without the replicated flag) is
///   exported once per DP rank that holds it, as `NAME@rankR` (`rng@rank3`),
///   always suffixed, even with a single rank, so a name says what it is.
///
/// In the file the tensors are ordered by element size, largest first (so
/// each starts aligned to its element), then as they first appear going
/// through ranks 0..<D in registration order; the data section has no holes.
/// `__metadata__` holds `step`, `job`, `format` (`pt`, what Hugging Face's
/// loaders look for), `producer`, `dp_size`. Bytes are written as the workers
/// registered them: little-endian on every platform this builds for.
///
/// Memory stays small whatever the step's size: each node's image is read
/// twice (first only up to the end of its manifest, then whole) and its slot
/// bytes go straight to their place in the output file. Both files are
/// written to a temporary name and fsynced, then renamed into place (the
/// safetensors file first, then its JSON; their directory fsynced): a reader
/// sees the old file or the whole new one, and a failed export leaves no
/// temporary file.
public struct SafetensorsExporter {
    public let root: String
    public var blockBytes = PersistedPart.defaultBlockBytes
    /// What it is doing, for a progress display (called on the caller's thread).
    public var progress: (ExportEvent) -> Void = { _ in }

    public init(root: String) { self.root = root }

    /// Exports `step` (default: the newest durable step) to `output` and
    /// `output + ".json"`. Throws, leaving no file behind, when the step
    /// cannot be had whole.
    public func export(step requested: Int? = nil, to output: String) throws(ExportError) -> ExportSummary {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: root, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw ExportError(.noDurableStep, "no persist directory at \(root)")
        }
        let catalog = PersistCatalog(root: root)
        let step = try Self.choose(step: requested, in: catalog)
        let nodes = catalog.nodes(of: step)
        let job = catalog.job(of: step) ?? ""
        var loader = ImageLoader(catalog: catalog)
        loader.blockBytes = blockBytes

        // Pass 1: every node's manifest.
        var images: [(node: String, image: NodeImage, manifest: [UInt8])] = []
        for node in nodes {
            let (image, manifest) = try readManifest(loader, step: step, node: node, catalog: catalog)
            images.append((node, image, manifest))
        }
        let plan = try ExportPlan(images: images.map { ($0.node, $0.image) })
        let imageBytes = images.map { $0.image.layout.total }
        progress(.plan(step: step, job: job, nodes: nodes, imageBytes: imageBytes.reduce(0, +),
                       tensors: plan.tensors.count, tensorBytes: plan.dataBytes))

        // The header, then pass 2: every node's slots into place.
        let metadata = ["step": String(step), "job": job, "format": "pt", "producer": "ftctl export", "dp_size": String(plan.dpSize)]
        let header = try Self.header(plan.tensors, metadata: metadata)
        let file = try AtomicFile(path: output)
        var side: AtomicFile?
        var decoded: [String] = []
        let sidecarPath = output + ".json"
        do throws(ExportError) {
            try file.truncate(to: header.count + plan.dataBytes)
            try file.write(header, at: 0)
            for (i, entry) in images.enumerated() {
                let started = monotonicSeconds()
                progress(.nodeStarted(node: entry.node, index: i, count: images.count, imageBytes: imageBytes[i]))
                let own = try copySlots(loader, step: step, node: entry.node, manifest: entry.manifest, total: imageBytes[i],
                                        segments: plan.segments[i], workers: plan.workers, file: file, dataStart: header.count)
                if !own { decoded.append(entry.node) }
                progress(.nodeDone(node: entry.node, index: i, count: images.count, imageBytes: imageBytes[i],
                                   seconds: monotonicSeconds() - started, decoded: !own))
            }
            try file.sync()

            // The JSON beside it, synced before either file is renamed into place.
            let sidecar = Sidecar(step: step, job: job, persistDir: Self.absolute(root), safetensors: Self.absolute(output),
                                  nodes: nodes, decodedNodes: decoded, dpSize: plan.dpSize, tensorBytes: plan.dataBytes,
                                  fileBytes: header.count + plan.dataBytes, tensors: plan.tensors)
            let json: Data
            do {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
                encoder.keyEncodingStrategy = .convertToSnakeCase
                json = try encoder.encode(sidecar) + Data("\n".utf8)
            } catch {
                throw ExportError(.io, "cannot encode \(sidecarPath): \(error)")
            }
            let sideFile = try AtomicFile(path: sidecarPath)
            side = sideFile
            try sideFile.write(Array(json), at: 0)
            try sideFile.sync()
            try file.publish()
            try sideFile.publish()
        } catch {
            file.discard()
            side?.discard()
            throw error
        }
        return ExportSummary(step: step, job: job, output: output, metadataFile: sidecarPath, tensors: plan.tensors,
                             tensorBytes: plan.dataBytes, fileBytes: header.count + plan.dataBytes, nodes: nodes, decodedNodes: decoded)
    }

    // MARK: choosing the step

    static func choose(step requested: Int?, in catalog: PersistCatalog) throws(ExportError) -> Int {
        let durable = catalog.durableSteps
        let durableText = durable.isEmpty ? "none" : durable.prefix(8).map(String.init).joined(separator: ", ")
        guard let step = requested else {
            guard let newest = durable.first else {
                let steps = PersistCatalog.steps(in: catalog.root)
                if steps.isEmpty { throw ExportError(.noDurableStep, "no durable step in \(catalog.root): it holds no step directory") }
                let why = steps.suffix(3).reversed().map { s in "step \(s): \(catalog.notDurable(s) ?? Self.unreadableText(catalog, step: s))" }
                throw ExportError(.noDurableStep, "no durable step in \(catalog.root) (\(why.joined(separator: "; ")))")
            }
            return newest
        }
        guard catalog.parts[step] != nil else {
            let unreadable = catalog.unreadable.filter { $0.step == step }
            if !unreadable.isEmpty {
                throw ExportError(.stepNotFound, "step \(step) in \(catalog.root) has no readable part (\(Self.unreadableText(catalog, step: step))); durable steps: \(durableText)")
            }
            throw ExportError(.stepNotFound, "step \(step) is not in \(catalog.root); durable steps: \(durableText)")
        }
        if let why = catalog.notDurable(step) {
            throw ExportError(.notDurable, "step \(step) in \(catalog.root) is not durable: \(why); durable steps: \(durableText)")
        }
        return step
    }

    private static func unreadableText(_ catalog: PersistCatalog, step: Int) -> String {
        let bad = catalog.unreadable.filter { $0.step == step }
        if bad.isEmpty { return "no part" }
        return bad.map { "\($0.node): \($0.reason)" }.joined(separator: "; ")
    }

    // MARK: pass 1

    /// Thrown by the sink once the manifest is in: ends a load early.
    private struct ManifestComplete: Error {}

    /// The node's manifest, from the first bytes of its image.
    func readManifest(_ loader: ImageLoader, step: Int, node: String, catalog: PersistCatalog) throws(ExportError) -> (NodeImage, [UInt8]) {
        // The most the image can be: its part says, else its group's chunks do.
        let part = catalog.parts[step]?[node]
        let template = part ?? catalog.parts[step]?.values.first { $0.hasErasureCoding && $0.group.contains(node) }
        let limit = part.map(\.imageBytes) ?? template.map { $0.k * $0.chunkBytes } ?? WireLimits.maxBytes
        var bytes: [UInt8] = []
        var need: Int?
        var complete = false
        let lines = LoaderLines()
        var loader = loader
        loader.log = { lines.append($0) }
        do {
            _ = try loader.load(step: step, node: node) { offset, view in
                if offset == 0 { bytes.removeAll(keepingCapacity: true); need = nil }  // a restart from the parity
                guard offset == bytes.count else { return }
                bytes.append(contentsOf: view)
                if need == nil, bytes.count >= 4 {
                    let n = try NodeImage.manifestLength(prefix: bytes.prefix(4))
                    guard n <= limit else {
                        throw ExportError(.badImage, "node \(node)'s image of step \(step) names a manifest of \(n) bytes, more than the image's \(limit)")
                    }
                    need = n
                }
                if let need, bytes.count >= need { throw ManifestComplete() }
            }
        } catch is ManifestComplete {
            complete = true
        } catch let error as ExportError {
            throw error
        } catch {
            throw Self.unloadable(node, step: step, error, lines: lines.lines)
        }
        guard complete, let need else {
            throw ExportError(.badImage, "node \(node)'s image of step \(step) is shorter than its manifest (\(bytes.count) bytes)")
        }
        let manifest = Array(bytes.prefix(need))
        let image: NodeImage
        do {
            image = try NodeImage.parse(manifest)
        } catch {
            throw ExportError(.badImage, "node \(node)'s image of step \(step) has a bad manifest: \(error.message)")
        }
        guard image.step == step else {
            throw ExportError(.badImage, "node \(node)'s image in the directory of step \(step) says step \(image.step)")
        }
        let total = image.layout.total
        if let part, total != part.imageBytes {
            throw ExportError(.badImage, "node \(node)'s image of step \(step): its manifest adds up to \(total) bytes, its part says \(part.imageBytes)")
        } else if total > limit {
            throw ExportError(.badImage, "node \(node)'s image of step \(step): its manifest adds up to \(total) bytes, more than its group's chunks hold (\(limit))")
        }
        return (image, manifest)
    }

    /// The loader's error, and what it logged before (why the node's own part could not be used).
    static func unloadable(_ node: String, step: Int, _ error: any Error, lines: [String]) -> ExportError {
        let why = (error as? PersistError)?.message ?? (error as? ErasureError).map { "\($0)" } ?? "\(error)"
        let before = lines.isEmpty ? "" : " (after: " + lines.joined(separator: "; ") + ")"
        return ExportError(.unloadable, "node \(node)'s image of step \(step) cannot be loaded: \(why)\(before)")
    }

    /// Lines a loader logs, kept for an error message.
    final class LoaderLines {
        var lines: [String] = []
        func append(_ line: String) { lines.append(line) }
    }

    // MARK: pass 2

    /// Streams the node's image, checks every chunk of every slot against its
    /// CRC32C and writes it to its place in the file. Returns whether the
    /// image came from the node's own part (false: decoded from parity).
    func copySlots(_ loader: ImageLoader, step: Int, node: String, manifest: [UInt8], total: Int,
                   segments: [ExportPlan.Segment], workers: [ExportPlan.Worker], file: AtomicFile, dataStart: Int) throws(ExportError) -> Bool {
        var received = [Int](repeating: 0, count: segments.count)
        var crcs = [UInt32](repeating: 0, count: segments.count)
        var high = 0
        var loader = loader
        let lines = LoaderLines()
        let progress = progress
        loader.log = { line in
            lines.append(line)
            progress(.note(line))
        }
        let loaded: ImageLoader.Loaded
        do {
            loaded = try loader.load(step: step, node: node) { offset, view in
                if offset < high {  // a fallback to decoding: the image again from its start
                    for i in received.indices { received[i] = 0; crcs[i] = 0 }
                }
                high = offset + view.count
                let end = min(high, total)
                guard offset < end else { return }
                if offset < manifest.count {
                    let n = min(end, manifest.count) - offset
                    let same = manifest.withUnsafeBytes { m in memcmp(m.baseAddress! + offset, view.baseAddress!, n) == 0 }
                    guard same else {
                        throw ExportError(.badImage, "node \(node)'s image of step \(step) changed while it was read (its manifest differs)")
                    }
                }
                var i = Self.firstSegment(segments, endingAfter: offset)
                while i < segments.count, segments[i].imageRange.lowerBound < end {
                    let s = segments[i]
                    let lo = max(offset, s.imageRange.lowerBound), hi = min(end, s.imageRange.upperBound)
                    // Bytes of a chunk arrive in order; a gap leaves it short (reported below).
                    if lo < hi, lo - s.imageRange.lowerBound == received[i] {
                        let piece = UnsafeRawBufferPointer(rebasing: view[(lo - offset)..<(hi - offset)])
                        crcs[i] = CRC32C.checksum(piece, continuing: crcs[i])
                        try file.write(piece, at: dataStart + s.destination + received[i])
                        received[i] += hi - lo
                    }
                    i += 1
                }
            }
        } catch let error as ExportError {
            throw error
        } catch {
            throw Self.unloadable(node, step: step, error, lines: lines.lines)
        }
        for (i, s) in segments.enumerated() {
            let w = workers[s.worker]
            let what = "worker \(w.registration.workerID) (node \(node), DP rank \(w.registration.dpRank)), tensor '\(w.layout.entries[s.entry].spec.name)' chunk \(s.chunk)"
            guard received[i] == s.imageRange.count else {
                throw ExportError(.unloadable, "node \(node)'s image of step \(step): \(what) was not delivered whole (\(received[i]) of \(s.imageRange.count) bytes)")
            }
            guard crcs[i] == s.crc else {
                throw ExportError(.corrupt, "node \(node)'s image of step \(step): \(what) fails its CRC32C (\(Self.hex(crcs[i])), the manifest says \(Self.hex(s.crc)))")
            }
        }
        return loaded.fromOwnPart
    }

    /// The first segment whose image range ends after `offset`.
    static func firstSegment(_ segments: [ExportPlan.Segment], endingAfter offset: Int) -> Int {
        var lo = 0, hi = segments.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if segments[mid].imageRange.upperBound <= offset { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    static func hex(_ v: UInt32) -> String {
        let s = String(v, radix: 16)
        return "0x" + String(repeating: "0", count: 8 - s.count) + s
    }

    // MARK: the file

    /// The 8-byte length, then the JSON header padded with spaces to a multiple of 8.
    static func header(_ tensors: [ExportedTensor], metadata: [String: String]) throws(ExportError) -> [UInt8] {
        var object: [String: Any] = ["__metadata__": metadata]
        for t in tensors {
            guard let dtype = t.dtype.safetensorsName else {
                throw ExportError(.unsupportedDType, "tensor '\(t.name)' has dtype \(t.dtype), which safetensors cannot hold")
            }
            object[t.name] = ["dtype": dtype, "shape": t.shape, "data_offsets": [t.dataOffsets.lowerBound, t.dataOffsets.upperBound]] as [String: Any]
        }
        var json: [UInt8]
        do {
            json = Array(try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys, .withoutEscapingSlashes]))
        } catch {
            throw ExportError(.io, "cannot encode the safetensors header: \(error)")
        }
        while (8 + json.count) % 8 != 0 { json.append(0x20) }
        var out: [UInt8] = []
        out.reserveCapacity(8 + json.count)
        var n = UInt64(json.count).littleEndian
        withUnsafeBytes(of: &n) { out.append(contentsOf: $0) }
        out.append(contentsOf: json)
        return out
    }

    static func absolute(_ path: String) -> String {
        let full = path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
        return URL(fileURLWithPath: full).standardizedFileURL.path
    }

    /// The JSON beside the safetensors file.
    struct Sidecar: Encodable {
        var format = 1
        var producer = "ftctl export"
        var step: Int
        var job: String
        var persistDir: String
        var safetensors: String
        var nodes: [String]
        var decodedNodes: [String]
        var dpSize: Int
        var tensorBytes: Int
        var fileBytes: Int
        var tensors: [String: Tensor]

        struct Tensor: Encodable {
            var tensor: String
            var rank: Int?
            var role: String
            var dtype: String
            var safetensorsDtype: String
            var shape: [Int]
            var bytes: Int
            var replicated: Bool
            var dataOffsets: [Int]
        }

        init(step: Int, job: String, persistDir: String, safetensors: String, nodes: [String], decodedNodes: [String],
             dpSize: Int, tensorBytes: Int, fileBytes: Int, tensors: [ExportedTensor]) {
            self.step = step
            self.job = job
            self.persistDir = persistDir
            self.safetensors = safetensors
            self.nodes = nodes
            self.decodedNodes = decodedNodes
            self.dpSize = dpSize
            self.tensorBytes = tensorBytes
            self.fileBytes = fileBytes
            self.tensors = Dictionary(uniqueKeysWithValues: tensors.map { t in
                (t.name, Tensor(tensor: t.tensor, rank: t.rank, role: t.role.description, dtype: t.dtype.description,
                                safetensorsDtype: t.dtype.safetensorsName ?? "", shape: t.shape, bytes: t.bytes,
                                replicated: t.replicated, dataOffsets: [t.dataOffsets.lowerBound, t.dataOffsets.upperBound]))
            })
        }
    }
}

// MARK: - what an export reports

/// One tensor of the exported file.
public struct ExportedTensor: Sendable, Equatable {
    /// Its name in the file: the registered name, `NAME@rankR` for a per-rank tensor.
    public var name: String
    /// The name the workers registered.
    public var tensor: String
    /// The DP rank of a per-rank tensor; nil for a replicated one (whole, from every rank's slice).
    public var rank: Int?
    public var dtype: DType
    public var shape: [Int]
    public var role: TensorRole
    public var replicated: Bool
    /// Its bytes in the file's data section (after the header).
    public var dataOffsets: Range<Int>
    public var bytes: Int { dataOffsets.count }
}

public struct ExportSummary: Sendable {
    public var step: Int
    public var job: String
    public var output: String
    public var metadataFile: String
    /// In header order (as they first appear going through ranks 0..<D).
    public var tensors: [ExportedTensor]
    public var tensorBytes: Int
    public var fileBytes: Int
    public var nodes: [String]
    /// Nodes whose image was decoded from their group's parity.
    public var decodedNodes: [String]
}

public enum ExportEvent: Sendable {
    /// The step, read from every node's manifest.
    case plan(step: Int, job: String, nodes: [String], imageBytes: Int, tensors: Int, tensorBytes: Int)
    case nodeStarted(node: String, index: Int, count: Int, imageBytes: Int)
    case nodeDone(node: String, index: Int, count: Int, imageBytes: Int, seconds: Double, decoded: Bool)
    /// A line of the loader's (a damaged part, a decode).
    case note(String)
}

/// Why an export failed: a stable code and a sentence.
public typealias ExportError = CodedMessage<ExportErrorCode>

public enum ExportErrorCode: String, Sendable {
    /// No durable step in the directory (or no directory).
    case noDurableStep = "no_durable_step"
    /// The step asked for is not in the directory.
    case stepNotFound = "step_not_found"
    /// The step asked for is there but not durable (too few parts).
    case notDurable = "not_durable"
    /// A node's image cannot be had (its part damaged and its group's not enough; the message says which and why).
    case unloadable = "unloadable"
    /// A node's manifest does not parse or does not agree with itself or its part.
    case badImage = "bad_image"
    /// A chunk of a worker's slot fails the CRC32C its manifest recorded.
    case corrupt = "corrupt"
    /// The workers' tensors do not fit together: slices of a tensor that
    /// disagree (dtype, shape, role, DP size), a DP rank missing or held twice,
    /// two tensors with one exported name.
    case inconsistent = "inconsistent"
    /// A dtype with no safetensors name.
    case unsupportedDType = "unsupported_dtype"
    /// The output cannot be written.
    case io = "io"
}

extension DType {
    /// The dtype's name in a safetensors header, or nil when the format has
    /// none (such a tensor is refused: `ExportErrorCode.unsupportedDType`).
    /// Exhaustive on purpose: a new dtype does not compile until it is mapped here.
    public var safetensorsName: String? {
        switch self {
        case .f32: "F32"
        case .f16: "F16"
        case .bf16: "BF16"
        case .f64: "F64"
        case .i32: "I32"
        case .i64: "I64"
        case .u8: "U8"
        }
    }
}

// MARK: - the plan

/// Which tensors a step exports and where every chunk of every worker's slot
/// goes: a pure function of the nodes' manifests.
public struct ExportPlan: Sendable {
    public struct Worker: Sendable {
        public var node: String
        public var registration: WorkerRegistration
        public var layout: ShardLayout
    }

    /// One chunk of a slot: where it is in its node's image, where it goes in
    /// the data section, and the CRC32C its manifest recorded.
    public struct Segment: Sendable, Equatable {
        public var imageRange: Range<Int>
        public var destination: Int
        public var crc: UInt32
        /// Index into `workers`, into that worker's layout entries, and the chunk of that entry.
        public var worker: Int
        public var entry: Int
        public var chunk: Int
    }

    public var dpSize: Int
    public var workers: [Worker]
    /// In header order.
    public var tensors: [ExportedTensor]
    public var dataBytes: Int
    /// Per image (in the order given), its slots' chunks in image order.
    public var segments: [[Segment]]

    public init(images: [(node: String, image: NodeImage)]) throws(ExportError) {
        var workers: [Worker] = []
        var located: [(image: Int, slotStart: Int, crcs: [UInt32])] = []
        for (n, (node, image)) in images.enumerated() {
            let imageLayout = image.layout
            for (i, e) in image.entries.enumerated() {
                let r = e.registration
                try Self.validate(r, node: node)
                let layout = r.layout
                guard e.slotBytes == layout.slotBytes, e.crcs.count == layout.chunkCount else {
                    throw ExportError(.badImage, "node \(node)'s manifest: worker \(r.workerID) has a slot of \(e.slotBytes) bytes and \(e.crcs.count) chunk CRCs, its registration makes \(layout.slotBytes) and \(layout.chunkCount)")
                }
                workers.append(Worker(node: node, registration: r, layout: layout))
                located.append((n, imageLayout.slotStart(i), e.crcs))
            }
        }
        guard let first = workers.first else { throw ExportError(.inconsistent, "the step's images hold no worker") }
        func who(_ w: Worker) -> String { "worker \(w.registration.workerID) (node \(w.node))" }

        // One data-parallel group: every rank once.
        let dpSize = first.registration.dpSize
        if let other = workers.first(where: { $0.registration.dpSize != dpSize }) {
            throw ExportError(.inconsistent, "workers disagree on the DP size: \(who(first)) has \(dpSize), \(who(other)) has \(other.registration.dpSize)")
        }
        var byRank: [Int: Int] = [:]
        for (w, worker) in workers.enumerated() {
            if let prior = byRank[worker.registration.dpRank] {
                throw ExportError(.inconsistent, "DP rank \(worker.registration.dpRank) of \(dpSize) is held by both \(who(workers[prior])) and \(who(worker))")
            }
            byRank[worker.registration.dpRank] = w
        }
        let missing = (0..<dpSize).filter { byRank[$0] == nil }
        guard missing.isEmpty else {
            throw ExportError(.inconsistent, "no worker of DP rank \(Self.list(missing)) of \(dpSize) in the step's images (they hold ranks \(Self.list(byRank.keys.sorted())))")
        }

        // The tensors, as they first appear going through the ranks.
        var tensors: [ExportedTensor] = []
        var specs: [TensorSpec] = []
        var index: [String: Int] = [:]
        var holders: [Int: [Int]] = [:]  // replicated tensor -> ranks that hold its slice
        var entryTensor: [[Int]] = Array(repeating: [], count: workers.count)
        for rank in 0..<dpSize {
            let w = byRank[rank]!
            for spec in workers[w].registration.specs {
                let name = spec.replicated ? spec.name : "\(spec.name)@rank\(rank)"
                guard name != "__metadata__" else {
                    throw ExportError(.inconsistent, "\(who(workers[w])) registers a tensor named '__metadata__', a name safetensors reserves")
                }
                if let t = index[name] {
                    guard spec.replicated, tensors[t].replicated, tensors[t].tensor == spec.name else {
                        throw ExportError(.inconsistent, "two tensors would be exported as '\(name)': '\(tensors[t].tensor)' of DP rank \(tensors[t].rank ?? holders[t]?.first ?? 0) and '\(spec.name)' of \(who(workers[w])) (DP rank \(rank))")
                    }
                    guard specs[t] == spec else {
                        let r0 = holders[t]![0]
                        throw ExportError(.inconsistent, "the slices of tensor '\(spec.name)' disagree: DP rank \(r0) registered it as \(Self.describe(specs[t])), DP rank \(rank) (\(who(workers[w]))) as \(Self.describe(spec))")
                    }
                    holders[t]!.append(rank)
                    entryTensor[w].append(t)
                } else {
                    index[name] = tensors.count
                    if spec.replicated { holders[tensors.count] = [rank] }
                    entryTensor[w].append(tensors.count)
                    tensors.append(ExportedTensor(name: name, tensor: spec.name, rank: spec.replicated ? nil : rank, dtype: spec.dtype,
                                                  shape: spec.shape, role: spec.role, replicated: spec.replicated, dataOffsets: 0..<0))
                    specs.append(spec)
                }
            }
        }
        for (t, ranks) in holders.sorted(by: { $0.key < $1.key }) where ranks.count != dpSize {
            let lacking = (0..<dpSize).filter { !ranks.contains($0) }
            let worker = workers[byRank[lacking[0]]!]
            let how = worker.registration.specs.contains { $0.name == tensors[t].tensor } ? "registers '\(tensors[t].tensor)' as per-rank" : "has no tensor '\(tensors[t].tensor)'"
            throw ExportError(.inconsistent, "the slices of replicated tensor '\(tensors[t].tensor)' disagree: DP rank \(Self.list(lacking)) of \(dpSize) holds none (\(who(worker)) \(how))")
        }

        // Data offsets: element size descending, so every tensor starts aligned to its element.
        let order = tensors.indices.sorted { a, b in
            tensors[a].dtype.size != tensors[b].dtype.size ? tensors[a].dtype.size > tensors[b].dtype.size : a < b
        }
        var offset = 0
        for t in order {
            let n = specs[t].byteCount
            tensors[t].dataOffsets = offset..<offset + n
            offset += n
        }

        // Every chunk of every slot to its place.
        var segments: [[Segment]] = Array(repeating: [], count: images.count)
        for (w, worker) in workers.enumerated() {
            let (n, slotStart, crcs) = located[w]
            for (e, entry) in worker.layout.entries.enumerated() {
                let base = tensors[entryTensor[w][e]].dataOffsets.lowerBound + entry.storedRange.lowerBound
                for c in 0..<entry.chunkCount {
                    let range = worker.layout.chunkRange(entry, chunk: c)
                    let start = slotStart + entry.slotOffset + range.lowerBound
                    segments[n].append(Segment(imageRange: start..<start + range.count, destination: base + range.lowerBound,
                                               crc: crcs[entry.firstChunk + c], worker: w, entry: e, chunk: c))
                }
            }
        }
        for n in segments.indices { segments[n].sort { $0.imageRange.lowerBound < $1.imageRange.lowerBound } }
        self.dpSize = dpSize
        self.workers = workers
        self.tensors = tensors
        self.dataBytes = offset
        self.segments = segments
    }

    /// The registration checks the SMP makes (`SnapshotStore`), so that a
    /// crafted manifest cannot trap in `ShardLayout`'s arithmetic.
    static func validate(_ r: WorkerRegistration, node: String) throws(ExportError) {
        func bad(_ m: String) -> ExportError { ExportError(.badImage, "node \(node)'s manifest: worker \(r.workerID): \(m)") }
        guard r.dpSize >= 1, r.dpSize <= WireLimits.maxDPSize, (0..<r.dpSize).contains(r.dpRank) else {
            throw bad("DP rank \(r.dpRank) is not in 0..<\(r.dpSize)")
        }
        guard r.chunkBytes >= 4096, r.chunkBytes <= 64 << 20 else { throw bad("chunk size \(r.chunkBytes)") }
        guard r.specs.count <= WireLimits.maxTensors else { throw bad("\(r.specs.count) tensors") }
        var names = Set<String>()
        for s in r.specs {
            guard !s.name.isEmpty, names.insert(s.name).inserted else { throw bad("tensor name '\(s.name)' empty or registered twice") }
            guard s.shape.allSatisfy({ $0 >= 0 }), s.shape.count <= WireLimits.maxDimensions,
                  let bytes = s.checkedByteCount, bytes <= WireLimits.maxTensorBytes else {
                throw bad("tensor '\(s.name)' has shape \(s.shape) of \(s.dtype)")
            }
        }
    }

    static func describe(_ s: TensorSpec) -> String {
        "\(s.dtype) \(s.shape) \(s.role)\(s.replicated ? " replicated" : " per-rank")"
    }

    static func list(_ xs: [Int]) -> String {
        xs.count <= 8 ? xs.map(String.init).joined(separator: ", ") : xs.prefix(8).map(String.init).joined(separator: ", ") + ", … (\(xs.count))"
    }
}

// MARK: - writing a file atomically

/// A file written under a temporary name in its directory, fsynced (`sync`),
/// then renamed over `path` (`publish`, the directory fsynced); `discard`
/// removes the temporary file.
final class AtomicFile {
    let path: String
    let temporary: String
    private var fd: Int32
    private var published = false

    init(path: String) throws(ExportError) {
        self.path = path
        let url = URL(fileURLWithPath: path)
        let directory = url.deletingLastPathComponent().path
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory), isDirectory.boolValue {
            throw ExportError(.io, "\(path) is a directory")
        }
        temporary = directory + "/." + url.lastPathComponent + ".tmp-\(getpid())"
        unlink(temporary)
        fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw Self.error("cannot write \(path) (creating \(temporary))", errno) }
    }

    deinit { if fd >= 0 { close(fd) } }

    func truncate(to bytes: Int) throws(ExportError) {
        guard ftruncate(fd, off_t(bytes)) == 0 else { throw Self.error("cannot size \(temporary) to \(bytes) bytes", errno) }
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws(ExportError) {
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw Self.error("cannot write \(temporary)", n < 0 ? errno : EIO) }
            done += n
        }
    }

    func write(_ bytes: [UInt8], at offset: Int) throws(ExportError) {
        let result: Result<Void, ExportError> = bytes.withUnsafeBytes { b in Result { () throws(ExportError) in try write(b, at: offset) } }
        try result.get()
    }

    func sync() throws(ExportError) {
        guard fsync(fd) == 0 else { throw Self.error("cannot fsync \(temporary)", errno) }
        close(fd)
        fd = -1
    }

    /// Renames the synced file into place and fsyncs its directory.
    func publish() throws(ExportError) {
        guard rename(temporary, path) == 0 else { throw Self.error("cannot rename \(temporary) to \(path)", errno) }
        published = true
        let directory = open(URL(fileURLWithPath: path).deletingLastPathComponent().path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if directory >= 0 {
            defer { close(directory) }
            guard fsync(directory) == 0 else { throw Self.error("cannot fsync the directory of \(path)", errno) }
        }
    }

    /// Removes the temporary file (not one already renamed into place).
    func discard() {
        if fd >= 0 { close(fd); fd = -1 }
        if !published { unlink(temporary) }
    }

    static func error(_ what: String, _ code: Int32) -> ExportError {
        let text = String(cString: strerror(code))
        return ExportError(.io, "\(what): \(text)\(code == ENOSPC || code == EDQUOT ? " (the disk is full)" : "")")
    }
}
