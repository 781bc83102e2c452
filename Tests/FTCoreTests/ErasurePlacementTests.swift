import Testing
@testable import FTCore

@Suite("Parity placement and the recovery planner")
struct ErasurePlacementTests {
    static let codes: [(Int, Int)] = (2...6).flatMap { n in (1..<n).map { m in (n - m, m) } }

    @Test("parity rotates: each node holds m parity chunks and gives k data chunks, one per row", arguments: codes.map { [$0.0, $0.1] })
    func rotation(code: [Int]) {
        let p = ParityPlacement(k: code[0], m: code[1])
        for r in 0..<p.n {
            let holders = p.parityHolders(row: r), data = p.dataContributors(row: r)
            #expect(holders.count == p.m && data.count == p.k)
            #expect(Set(holders + data) == Set(0..<p.n))
            for i in 0..<p.n { #expect(p.position(ofCodewordIndex: p.codewordIndex(of: i, row: r), row: r) == i) }
        }
        for node in 0..<p.n {
            #expect(p.parityRows(of: node).count == p.m)
            let rows = p.dataRows(of: node)
            #expect(rows.count == p.k)
            for c in 0..<p.k {
                let (row, d) = p.place(chunk: c, of: node)
                #expect(row == rows[c] && p.dataContributors(row: row)[d] == node)
            }
        }
    }

    @Test("for groups up to 6 nodes, every loss pattern is a rebuild (at most m per group) or unrecoverable (more), never anything else")
    func everyLossPattern() throws {
        for (k, m) in Self.codes {
            let n = k + m
            for groupsCount in 1...2 {
                let nodes = (0..<(n * groupsCount)).map { "n\($0)" }
                let groups = try ECLayout.groups(of: nodes, k: k, m: m)
                for mask in 1..<(1 << nodes.count) {
                    let lost = Set(nodes.indices.filter { mask & (1 << $0) != 0 }.map { nodes[$0] })
                    let worst = groups.map { g in g.filter { lost.contains($0) }.count }.max()!
                    let plan = RecoveryPlanner.plan(.init(nodes: nodes, lostNodes: lost, lostWorkers: [:], committedStep: 7,
                                                          ecGroups: groups, parityPerGroup: m))
                    switch plan {
                    case .restore(let step, _, let rebuild, _):
                        #expect(worst <= m, "RS(\(k)+\(m)) lost \(lost.sorted()) planned a rebuild")
                        #expect(step == 7 && Set(rebuild) == lost)
                    case .unrecoverable(let reason):
                        #expect(worst > m, "RS(\(k)+\(m)) lost \(lost.sorted()): \(reason)")
                        #expect(reason.contains("EC group") && reason.contains("last committed: step 7"))
                    case .restoreFromDisk:
                        Issue.record("RS(\(k)+\(m)) lost \(lost.sorted()): a restore from disk planned with no durable step")
                    }
                    // With a durable step on disk, what memory cannot recover is loaded from disk; the rest is unchanged.
                    let withDisk = RecoveryPlanner.plan(.init(nodes: nodes, lostNodes: lost, lostWorkers: [:], committedStep: 7,
                                                              ecGroups: groups, parityPerGroup: m, durableStep: 5))
                    switch withDisk {
                    case .restore: #expect(worst <= m)
                    case .restoreFromDisk(let step, let reason):
                        #expect(worst > m && step == 5 && reason.contains("2 committed steps lost"), "\(reason)")
                    case .unrecoverable(let reason): Issue.record("unrecoverable with a durable step: \(reason)")
                    }
                }
            }
        }
    }

    @Test("node counts that do not divide into groups are a clear configuration error")
    func badGroups() throws {
        func code(_ nodes: Int, _ k: Int, _ m: Int) -> ECConfigError? {
            do { _ = try ECLayout.groups(of: (0..<nodes).map { "n\($0)" }, k: k, m: m); return nil } catch { return error }
        }
        #expect(code(3, 3, 1)?.code == .unevenGroups)
        #expect(code(2, 0, 2)?.code == .invalidParameters)
        #expect(code(256, 200, 56)?.code == .invalidParameters)
        let uneven = try #require(code(5, 2, 1))
        #expect(uneven.code == .unevenGroups && uneven.codeName == "uneven_groups")
        #expect(uneven.message.contains("5 nodes cannot be divided into EC groups of k+m = 2+1 = 3"))
        #expect(ParityPlacement.chunkBytes(forNodeBytes: [1000, 3001], k: 3) == 1024)
    }
}
