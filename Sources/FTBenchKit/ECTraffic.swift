import FTCore

/// The bytes an erasure-coding round and a node's rebuild move between the
/// nodes of one group, stream by stream (sender, receiver, bytes), as the
/// SMPs' own cores direct them: `ECRoundInstance.startRound` on every node
/// (each data chunk to its row's parity holders), and `RebuildInstance`
/// driven to its end with every fetch answered (the replacement asks k
/// survivors of every row for each frame). Only payload bytes: headers, acks
/// and fetch requests are left out. What a transport ceiling must carry to
/// be compared with a round or a rebuild.
public struct ECTraffic: Sendable, Equatable {
    public struct Stream: Sendable, Hashable {
        /// Group positions (node `n<from>` of a one-group job).
        public var from: Int
        public var to: Int
        public var bytes: Int
    }

    public let nodes: Int
    /// One per (sender, receiver) pair that moves any bytes, sorted.
    public let streams: [Stream]

    public var totalBytes: Int { streams.reduce(0) { $0 + $1.bytes } }
    public func sent(by node: Int) -> [Stream] { streams.filter { $0.from == node } }
    public func received(by node: Int) -> [Stream] { streams.filter { $0.to == node } }
    /// The nodes that send or receive anything: the processes of the traffic.
    public var activeNodes: [Int] { (0..<nodes).filter { n in streams.contains { $0.from == n || $0.to == n } } }

    init(nodes: Int, bytes: [Pair: Int]) {
        self.nodes = nodes
        streams = bytes.filter { $0.value > 0 }.map { Stream(from: $0.key.from, to: $0.key.to, bytes: $0.value) }
            .sorted { ($0.from, $0.to) < ($1.from, $1.to) }
    }

    struct Pair: Hashable {
        var from: Int
        var to: Int
    }

    /// The SMPs' frame (`ErasureState.frameBytes` without `FT_EC_FRAME_BYTES`).
    public static let defaultFrameBytes = 4 << 20

    static func members(_ n: Int) -> [String] { (0..<n).map { "n\($0)" } }

    /// One round of RS(k+m) in which every node's image is `imageBytes` long.
    public static func round(k: Int, m: Int, imageBytes: Int, frameBytes: Int = defaultFrameBytes) -> ECTraffic {
        let members = members(k + m)
        let chunk = ParityPlacement.chunkBytes(forNodeBytes: [imageBytes], k: k)
        var bytes: [Pair: Int] = [:]
        for position in 0..<k + m {
            var core = ECRoundInstance(k: k, m: m, chunkBytes: chunk, frameBytes: frameBytes, members: members, position: position)
            for case .send(let frame) in core.startRound(step: 1, imageBytes: imageBytes, epoch: 1) {
                for node in frame.to { bytes[Pair(from: position, to: members.firstIndex(of: node)!), default: 0] += frame.imageRange.count }
            }
        }
        return ECTraffic(nodes: k + m, bytes: bytes)
    }

    /// The rebuild of the node at `lost` (its replacement fetches every frame
    /// of its image and parity from survivors) when every image is
    /// `imageBytes` long and the manifest `manifestBytes`.
    public static func rebuild(k: Int, m: Int, imageBytes: Int, lost: Int, manifestBytes: Int = 4096,
                               frameBytes: Int = defaultFrameBytes) -> ECTraffic {
        let members = members(k + m)
        let chunk = ParityPlacement.chunkBytes(forNodeBytes: [imageBytes], k: k)
        var core = RebuildInstance(step: 1, lost: [members[lost]], purpose: .node, k: k, m: m, chunkBytes: chunk, frameBytes: frameBytes,
                                   members: members, position: lost, window: 16, timeout: 1e9)
        var bytes: [Pair: Int] = [:]
        var work = core.start(now: 0)[...]
        while let d = work.popFirst() {
            switch d {
            case .fetch(let node, let step, let row, let index, let offset, let length):
                bytes[Pair(from: members.firstIndex(of: node)!, to: lost), default: 0] += length
                work += core.onAnswer(from: node, step: step, row: row, index: index, offset: offset, error: nil, now: 0).directives
            case .readPrefix:
                work += core.prefixRead(manifestBytes: manifestBytes, now: 0)
            case .parseManifest:
                work += core.bodyPlanned(imageBytes: imageBytes, now: 0)
            case .failed(let reason):
                preconditionFailure("rebuild pattern of RS(\(k)+\(m)): \(reason)")
            case .decode, .growPrefix, .reserveParity, .finished, .warning:
                continue
            }
        }
        return ECTraffic(nodes: k + m, bytes: bytes)
    }
}
