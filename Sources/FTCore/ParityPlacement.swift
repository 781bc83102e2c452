/// Where the Reed-Solomon chunks of one EC group live (ARCHITECTURE.md, "Erasure
/// coding across nodes"). A pure description, the same on every node.
///
/// A group has `n = k + m` nodes (positions `0..<n`) and `n` rows. In row `r`
/// the parity chunks sit on positions `(r + j) mod n` for `j < m` (parity `j`
/// of the row), and the other `k` positions, in increasing order, give data
/// chunks `0..<k` of the row. Every node is a data contributor in exactly `k`
/// rows: its snapshot bytes are cut into `k` chunks of `chunkBytes` (the last
/// padded with zeros), chunk `c` going to the `c`-th row it contributes to.
/// Every node holds `m` parity chunks, so parity costs `m/k` of the data.
public struct ParityPlacement: Sendable, Equatable {
    public let k: Int
    public let m: Int
    public var n: Int { k + m }

    public init(k: Int, m: Int) {
        precondition(k >= 1 && m >= 1)
        self.k = k
        self.m = m
    }

    /// Positions holding the parity chunks of row `r`, by parity index.
    public func parityHolders(row r: Int) -> [Int] { (0..<m).map { (r + $0) % n } }

    /// Positions giving the data chunks of row `r`, by data index.
    public func dataContributors(row r: Int) -> [Int] {
        let holders = Set(parityHolders(row: r))
        return (0..<n).filter { !holders.contains($0) }
    }

    /// The rows where `position` gives data, in order: chunk `c` goes to `[c]`.
    public func dataRows(of position: Int) -> [Int] {
        (0..<n).filter { !parityHolders(row: $0).contains(position) }
    }

    /// The rows where `position` holds parity, with its parity index there.
    public func parityRows(of position: Int) -> [(row: Int, parityIndex: Int)] {
        (0..<n).compactMap { r in parityHolders(row: r).firstIndex(of: position).map { (r, $0) } }
    }

    /// Where chunk `c` of `position` goes: its row and its data index in that row.
    public func place(chunk c: Int, of position: Int) -> (row: Int, dataIndex: Int) {
        let row = dataRows(of: position)[c]
        return (row, dataContributors(row: row).firstIndex(of: position)!)
    }

    /// The codeword index (0..<k data, k..<n parity) of `position` in row `r`.
    public func codewordIndex(of position: Int, row r: Int) -> Int {
        if let d = dataContributors(row: r).firstIndex(of: position) { return d }
        return k + parityHolders(row: r).firstIndex(of: position)!
    }

    /// The position holding codeword index `i` of row `r`.
    public func position(ofCodewordIndex i: Int, row r: Int) -> Int {
        i < k ? dataContributors(row: r)[i] : parityHolders(row: r)[i - k]
    }

    /// Chunk length for nodes of `bytes` snapshot bytes: a k-th of the largest,
    /// rounded up to 64 bytes.
    public static func chunkBytes(forNodeBytes bytes: [Int], k: Int) -> Int {
        let largest = bytes.max() ?? 0
        let per = (largest + k - 1) / max(k, 1)
        return max(64, (per + 63) / 64 * 64)
    }
}

/// The EC layout of a job as the coordinator hands it to the SMPs.
public struct ECLayout: Sendable, Equatable {
    public var k: Int
    public var m: Int
    public var chunkBytes: Int
    /// Each group's node ids, by position, and their data endpoints.
    public var groups: [[String]]
    public var endpoints: [String: String]

    public init(k: Int, m: Int, chunkBytes: Int, groups: [[String]], endpoints: [String: String]) {
        self.k = k
        self.m = m
        self.chunkBytes = chunkBytes
        self.groups = groups
        self.endpoints = endpoints
    }

    public var placement: ParityPlacement { ParityPlacement(k: k, m: m) }

    /// The group of `node` and its position in it.
    public func locate(_ node: String) -> (group: Int, position: Int)? {
        for (g, members) in groups.enumerated() { if let p = members.firstIndex(of: node) { return (g, p) } }
        return nil
    }

    /// Splits `nodes` (in order) into groups of `k + m`; a clear error when it does not divide.
    public static func groups(of nodes: [String], k: Int, m: Int) throws(ECConfigError) -> [[String]] {
        guard k >= 1, m >= 1 else { throw ECConfigError(.invalidParameters, "EC k+m needs k >= 1 and m >= 1, got \(k)+\(m)") }
        guard k + m <= 255 else { throw ECConfigError(.invalidParameters, "EC k+m must be at most 255, got \(k + m)") }
        guard nodes.count % (k + m) == 0 else {
            throw ECConfigError(.unevenGroups, "\(nodes.count) nodes cannot be divided into EC groups of k+m = \(k)+\(m) = \(k + m) nodes; "
                + "use a node count that is a multiple of \(k + m)")
        }
        return stride(from: 0, to: nodes.count, by: k + m).map { Array(nodes[$0..<$0 + k + m]) }
    }
}

/// An erasure-coding layout that cannot be built.
public typealias ECConfigError = CodedMessage<ECConfigErrorCode>

public enum ECConfigErrorCode: String, Sendable {
    /// k or m below 1, or k + m above 255 (ISA-L's limit).
    case invalidParameters = "invalid_parameters"
    /// The nodes do not divide into groups of k + m.
    case unevenGroups = "uneven_groups"
}

extension ECLayout {
    /// Checks an `ecChunk` frame's header, as received by the node at
    /// `position` of its group: a row of the group, a data index below k,
    /// that node a parity holder of the row, the chunk no longer than the
    /// layout's, and the frame (`frameBytes` at `offset`) within the chunk,
    /// without computing a sum that could overflow. `out_of_range` if not.
    public func checkChunkFrame(position: Int, step: Int, row: Int, dataIndex: Int, offset: Int, length: Int,
                                frameBytes: Int) throws(StoreError) {
        let n = k + m
        guard (0..<n).contains(row), (0..<k).contains(dataIndex) else {
            throw StoreError(.outOfRange, "chunk \(row)/\(dataIndex) of step \(step): rows are 0..<\(n), data indexes 0..<\(k)")
        }
        guard placement.parityHolders(row: row).contains(position) else {
            throw StoreError(.outOfRange, "chunk \(row)/\(dataIndex) of step \(step): position \(position) holds no parity of row \(row)")
        }
        guard (0...chunkBytes).contains(length), Checked.rangeFits(offset: offset, length: frameBytes, within: length) else {
            throw StoreError(.outOfRange, "chunk \(row)/\(dataIndex) of step \(step): a frame of \(frameBytes) bytes at \(offset) "
                + "in a chunk of \(length) bytes (the layout's chunk is \(chunkBytes))")
        }
    }

    /// Checks an `ecFetch` asked of the node at `position`: a row and a
    /// codeword index of the group that this node holds, and a non-empty
    /// byte range within the chunk (its end is never computed before it is
    /// known to fit: an offset near Int64.max trapped). `out_of_range` if not.
    public func checkFetch(position: Int, row: Int, index: Int, offset: Int, length: Int) throws(StoreError) {
        let n = k + m
        guard (0..<n).contains(row), (0..<n).contains(index) else {
            throw StoreError(.outOfRange, "row \(row), index \(index) out of range for \(n) nodes")
        }
        guard placement.position(ofCodewordIndex: index, row: row) == position else {
            throw StoreError(.outOfRange, "codeword index \(index) of row \(row) is not held at position \(position)")
        }
        guard length > 0, Checked.rangeFits(offset: offset, length: length, within: chunkBytes) else {
            throw StoreError(.outOfRange, "a range of \(length) bytes at \(offset) lies outside a chunk of \(chunkBytes) bytes")
        }
    }
}

/// Which rounds a parity holder allocates parity for (issue 13, "bounded
/// parity buffers"): a step already held, or one of at most `limit` steps
/// at once (the round being protected and the next one; a commit drops
/// older steps, so a holder never sees a third legitimate one). A step below
/// the highest held takes that one's place (the lowest uncommitted rounds
/// are the ones that can commit next); a step above them all is refused
/// (`unexpected_round`) before anything is allocated.
public enum ParitySteps {
    public enum Admission: Sendable, Equatable {
        case accept
        /// Accept, after dropping the parity of this (higher) step.
        case replace(Int)
    }

    public static func admit(_ step: Int, held: some Collection<Int>, limit: Int) throws(StoreError) -> Admission {
        if held.contains(step) || held.count < limit { return .accept }
        guard let highest = held.max(), step < highest else {
            throw StoreError(.unexpectedRound, "a chunk for step \(step), while parity is held for steps \(held.sorted()) "
                + "(at most \(limit) rounds at once)")
        }
        return .replace(highest)
    }
}
