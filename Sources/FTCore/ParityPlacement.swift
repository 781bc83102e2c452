/// Where the Reed-Solomon chunks of one EC group live (DESIGN.md, "Erasure
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
        guard k >= 1, m >= 1 else { throw ECConfigError("EC k+m needs k >= 1 and m >= 1, got \(k)+\(m)") }
        guard k + m <= 255 else { throw ECConfigError("EC k+m must be at most 255, got \(k + m)") }
        guard nodes.count % (k + m) == 0 else {
            throw ECConfigError("\(nodes.count) nodes cannot be divided into EC groups of k+m = \(k)+\(m) = \(k + m) nodes; "
                + "use a node count that is a multiple of \(k + m)")
        }
        return stride(from: 0, to: nodes.count, by: k + m).map { Array(nodes[$0..<$0 + k + m]) }
    }
}

public struct ECConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}
