import FTCore
import FTErasure
import Foundation

/// What a persist directory holds: per step, the nodes whose part has a
/// readable manifest (`part.json`, validated; the files' bytes are checked
/// when they are loaded), and which steps are durable.
public struct PersistCatalog: Sendable {
    public let root: String
    /// step -> node -> its part's manifest.
    public private(set) var parts: [Int: [String: PersistedPart]] = [:]
    /// Part directories whose manifest could not be used, and why.
    public private(set) var unreadable: [(step: Int, node: String, reason: String)] = []

    /// The step directories in `root`, oldest first.
    public static func steps(in root: String) -> [Int] {
        ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []).compactMap(PersistPaths.step(ofEntry:)).sorted()
    }

    public init(root: String) {
        self.root = root
        for step in Self.steps(in: root) {
            let dir = PersistPaths.stepDirectory(root, step: step)
            for node in ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted() where !node.hasPrefix(".") {
                do throws(PersistError) {
                    let part = try Self.readManifest(dir + "/" + node)
                    guard part.step == step, part.node == node else {
                        throw PersistError(.badManifest, "it says node \(part.node), step \(part.step)")
                    }
                    parts[step, default: [:]][node] = part
                } catch {
                    unreadable.append((step, node, error.message))
                }
            }
        }
    }

    public static func readManifest(_ partDirectory: String) throws(PersistError) -> PersistedPart {
        let path = partDirectory + "/" + PersistPaths.manifestFile
        guard let data = FileManager.default.contents(atPath: path) else { throw PersistError(.damaged, "\(path) is missing") }
        let part: PersistedPart
        do {
            part = try JSONDecoder().decode(PersistedPart.self, from: data)
        } catch {
            throw PersistError(.badManifest, "\(path) cannot be read: \(error)")
        }
        try part.validate()
        return part
    }

    /// Why `step` is not durable, or nil when it is: every node of the job
    /// has a part, or, with erasure coding, at least `k` nodes of every group.
    public func notDurable(_ step: Int) -> String? {
        guard let byNode = parts[step], let any = byNode.values.first else { return "no part of step \(step)" }
        let agreeing = byNode.values.filter { $0.job == any.job && $0.nodes == any.nodes && $0.k == any.k && $0.m == any.m && $0.chunkBytes == any.chunkBytes }
        guard agreeing.count == byNode.count else { return "the parts of step \(step) disagree on the job or its layout" }
        if !any.hasErasureCoding {
            let missing = any.nodes.filter { byNode[$0] == nil }
            return missing.isEmpty ? nil : "no part of \(missing.joined(separator: ", ")) (without erasure coding every node needs its own)"
        }
        let groups = stride(from: 0, to: any.nodes.count, by: any.k + any.m).map { Array(any.nodes[$0..<min(any.nodes.count, $0 + any.k + any.m)]) }
        for g in groups {
            let have = g.filter { byNode[$0] != nil }.count
            if have < any.k { return "group \(g.joined(separator: ",")) has \(have) parts of step \(step), fewer than k = \(any.k)" }
        }
        return nil
    }

    /// Durable steps, newest first.
    public var durableSteps: [Int] { parts.keys.sorted(by: >).filter { notDurable($0) == nil } }

    /// The job's nodes as step `step`'s parts name them.
    public func nodes(of step: Int) -> [String] { parts[step]?.values.first?.nodes ?? [] }
    public func job(of step: Int) -> String? { parts[step]?.values.first?.job }
}
