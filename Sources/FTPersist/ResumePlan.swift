import FTCore
import Foundation

/// Which persisted step a cold restart (`ft-launch start --resume DIR`)
/// loads: the newest durable step whose every node's image reads back with
/// every block passing its CRC (decoded from its group where its own part is
/// damaged). A step that fails is skipped for the next older durable one,
/// and the reason kept; the job's shape must be the step's (the same node
/// count and EC code): resharding is not done.
public struct ResumePlan: Sendable {
    public var step: Int
    public var nodes: [String]
    public var job: String
    /// Newer steps passed over, and why.
    public var skipped: [(step: Int, reason: String)]

    /// `nodes`, `erasure`: the job to be started. `progress`: a line per node checked.
    public static func choose(root: String, nodes: Int, erasure: (k: Int, m: Int)?,
                              progress: @escaping (String) -> Void = { _ in }) throws(PersistError) -> ResumePlan {
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: root, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw PersistError(.noDurableStep, "\(root) is not a directory")
        }
        let catalog = PersistCatalog(root: root)
        var skipped: [(Int, String)] = []
        for (step, why) in catalog.parts.keys.sorted(by: >).compactMap({ s in catalog.notDurable(s).map { (s, $0) } }) {
            skipped.append((step, "not durable: \(why)"))
        }
        let durable = catalog.durableSteps
        guard let newest = durable.first else {
            throw PersistError(.noDurableStep, "\(root) holds no durable step (steps there: \(PersistCatalog.steps(in: root)); "
                + (skipped.map { "step \($0.0): \($0.1)" }.joined(separator: "; ")) + ")")
        }
        // The job's shape is the newest durable step's: a different one is refused, not resharded.
        let shape = catalog.parts[newest]!.values.first!
        guard shape.nodes.count == nodes else {
            throw PersistError(.mismatch, "step \(newest) in \(root) was persisted by \(shape.nodes.count) nodes; this job has \(nodes) "
                + "(resuming needs the same node count: start it with --nodes \(shape.nodes.count))")
        }
        let persistedEC = shape.hasErasureCoding ? "RS(\(shape.k)+\(shape.m))" : "no erasure coding"
        let wantedEC = erasure.map { "RS(\($0.k)+\($0.m))" } ?? "no erasure coding"
        guard persistedEC == wantedEC else {
            throw PersistError(.mismatch, "step \(newest) in \(root) was persisted with \(persistedEC); this job has \(wantedEC) (give the same --ec)")
        }
        for step in durable {
            let parts = catalog.parts[step]!.values
            guard parts.allSatisfy({ $0.nodes == shape.nodes && $0.k == shape.k && $0.m == shape.m }) else {
                skipped.append((step, "its layout differs from step \(newest)'s"))
                continue
            }
            var loader = ImageLoader(catalog: catalog)
            loader.log = { progress("  " + $0) }
            do {
                for node in shape.nodes {
                    let loaded = try loader.load(step: step, node: node) { _, _ in }
                    progress("step \(step): \(node) reads back (\(loaded.bytesRead >> 20) MiB\(loaded.fromOwnPart ? "" : ", decoded from its group"))")
                }
                return ResumePlan(step: step, nodes: shape.nodes, job: shape.job, skipped: skipped)
            } catch {
                let e = error as? PersistError
                skipped.append((step, e?.message ?? "\(error)"))
                progress("step \(step) cannot be loaded (\(e?.message ?? "\(error)")); trying an older durable step")
            }
        }
        throw PersistError(.noDurableStep, "no durable step in \(root) can be loaded: "
            + skipped.map { "step \($0.0): \($0.1)" }.joined(separator: "; "))
    }
}
