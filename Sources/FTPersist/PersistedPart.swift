import FTCore
import Foundation

/// The persistent tier's files (README, "Persistent tier"): what one SMP
/// wrote of one committed step.
///
///     DIR/step-000000000120/n0/part.json   this file's manifest (below)
///     DIR/step-000000000120/n0/image.bin   the node image of step 120 (NodeImage:
///                                          manifest, then every worker's slot)
///     DIR/step-000000000120/n0/parity.bin  the node's parity chunks of step 120,
///                                          one per row it holds, in `parityRows` order
///
/// A part is written into `DIR/step-…/.n0.tmp-PID/`, every file fsynced, the
/// manifest last, then renamed to `n0` and the step directory fsynced: a
/// part directory either does not exist or is complete. Its bytes may still
/// rot, be cut short or be overwritten later, so every `blockBytes` of every
/// file carry a CRC32C here, and nothing is loaded that fails one.
///
/// A step is *durable* when, in every EC group, the nodes with an intact
/// part are at least `k` (the others' images decode from their data and
/// parity), or, without erasure coding, every node has one.
public struct PersistedPart: Codable, Sendable, Equatable {
    public static let formatVersion = 1
    public static let defaultBlockBytes = 1 << 20

    public var format: Int
    public var job: String
    public var node: String
    public var step: Int
    /// The EC layout the parity belongs to (k = 0: no erasure coding).
    public var k: Int
    public var m: Int
    public var chunkBytes: Int
    /// The node's EC group by position (empty without erasure coding) and its position in it.
    public var group: [String]
    public var position: Int
    /// Every node of the job when it was written (a cold restart needs all of them).
    public var nodes: [String]
    public var imageBytes: Int
    public var blockBytes: Int
    /// CRC32C of every `blockBytes` of image.bin (the last block shorter).
    public var imageCRCs: [UInt32]
    /// The rows whose parity chunk this node holds, and that chunk's parity index there.
    public var parityRows: [ParityRow]
    /// Seconds since 1970 when the part was complete.
    public var writtenAt: Double

    public struct ParityRow: Codable, Sendable, Equatable {
        public var row: Int
        public var parityIndex: Int
        /// CRC32C of every `blockBytes` of this row's chunk in parity.bin.
        public var crcs: [UInt32]

        public init(row: Int, parityIndex: Int, crcs: [UInt32]) {
            self.row = row
            self.parityIndex = parityIndex
            self.crcs = crcs
        }
    }

    public init(job: String, node: String, step: Int, k: Int, m: Int, chunkBytes: Int, group: [String], position: Int,
                nodes: [String], imageBytes: Int, blockBytes: Int, imageCRCs: [UInt32], parityRows: [ParityRow], writtenAt: Double) {
        format = Self.formatVersion
        self.job = job
        self.node = node
        self.step = step
        self.k = k
        self.m = m
        self.chunkBytes = chunkBytes
        self.group = group
        self.position = position
        self.nodes = nodes
        self.imageBytes = imageBytes
        self.blockBytes = blockBytes
        self.imageCRCs = imageCRCs
        self.parityRows = parityRows
        self.writtenAt = writtenAt
    }

    public var hasErasureCoding: Bool { k > 0 && m > 0 && !group.isEmpty }
    public var parityBytes: Int { parityRows.count * chunkBytes }

    /// Blocks of a file of `bytes`.
    public static func blockCount(_ bytes: Int, blockBytes: Int) -> Int { (bytes + blockBytes - 1) / blockBytes }

    /// The checks a manifest must pass before anything is read by it: sizes
    /// and counts that agree, bounds that no arithmetic on them can overflow.
    public func validate() throws(PersistError) {
        guard format == Self.formatVersion else { throw PersistError(.badManifest, "format \(format), this build reads \(Self.formatVersion)") }
        guard (0...WireLimits.maxStep).contains(step) else { throw PersistError(.badManifest, "step \(step)") }
        guard (4096...(64 << 20)).contains(blockBytes) else { throw PersistError(.badManifest, "block of \(blockBytes) bytes") }
        guard (0...WireLimits.maxBytes).contains(imageBytes), imageCRCs.count == Self.blockCount(imageBytes, blockBytes: blockBytes) else {
            throw PersistError(.badManifest, "image of \(imageBytes) bytes with \(imageCRCs.count) block CRCs")
        }
        guard nodes.contains(node) else { throw PersistError(.badManifest, "node \(node) is not among the job's nodes \(nodes)") }
        if k > 0 || m > 0 || !group.isEmpty {
            guard k >= 1, m >= 1, k + m == group.count, group.indices.contains(position), group[position] == node else {
                throw PersistError(.badManifest, "EC \(k)+\(m), group \(group), position \(position) do not agree")
            }
            guard (1...WireLimits.maxBytes).contains(chunkBytes), imageBytes <= k * chunkBytes else {
                throw PersistError(.badManifest, "chunk of \(chunkBytes) bytes for an image of \(imageBytes)")
            }
            let expected = ParityPlacement(k: k, m: m).parityRows(of: position)
            guard parityRows.map(\.row) == expected.map(\.row), parityRows.map(\.parityIndex) == expected.map(\.parityIndex) else {
                throw PersistError(.badManifest, "parity rows \(parityRows.map(\.row)) are not those of position \(position)")
            }
            for r in parityRows where r.crcs.count != Self.blockCount(chunkBytes, blockBytes: blockBytes) {
                throw PersistError(.badManifest, "parity row \(r.row) has \(r.crcs.count) block CRCs")
            }
        } else {
            guard parityRows.isEmpty else { throw PersistError(.badManifest, "parity rows without erasure coding") }
        }
    }
}

/// Names in a persist directory.
public enum PersistPaths {
    public static func stepDirectory(_ root: String, step: Int) -> String {
        let digits = String(step)
        return root + "/step-" + String(repeating: "0", count: max(0, 12 - digits.count)) + digits
    }

    public static func partDirectory(_ root: String, step: Int, node: String) -> String {
        stepDirectory(root, step: step) + "/" + node
    }

    /// The step a directory entry names (`step-000000000120` -> 120), if it is one.
    public static func step(ofEntry name: String) -> Int? {
        // Twelve digits and nothing else: Int() would also take "+…" or "-…",
        // naming a step whose directory is another one.
        let digits = name.utf8.dropFirst(5)
        guard name.hasPrefix("step-"), name.utf8.count == 17, digits.allSatisfy({ (0x30...0x39).contains($0) }) else { return nil }
        return Int(name.dropFirst(5))
    }

    public static let manifestFile = "part.json"
    public static let imageFile = "image.bin"
    public static let parityFile = "parity.bin"
}

public typealias PersistError = CodedMessage<PersistErrorCode>

public enum PersistErrorCode: String, Sendable {
    /// The directory cannot be created or written (permissions, a read-only filesystem).
    case unwritable = "unwritable"
    /// The disk is full (ENOSPC, EDQUOT): nothing was kept of the part.
    case outOfSpace = "out_of_space"
    /// An I/O error other than the above.
    case io = "io"
    /// A part.json that cannot be read or does not agree with itself.
    case badManifest = "bad_manifest"
    /// A file missing, shorter than its manifest says, or failing a block CRC.
    case damaged = "damaged"
    /// A node's image cannot be had: its part is damaged and too few of its group's are intact.
    case undecodable = "undecodable"
    /// No durable step in the directory (or none that fits the job).
    case noDurableStep = "no_durable_step"
    /// The directory holds another job, or a different node count or layout.
    case mismatch = "mismatch"
    /// The persist was cancelled (a rebuild, a restore, the SMP's end).
    case cancelled = "cancelled"
}
