/// The recovery planner: a pure function from what was lost to what to do
/// (ARCHITECTURE.md, "Recovery", step 2). "Nothing can be done" is a value with its
/// reason, never an exception deep inside the orchestrator.
public enum RecoveryPlanner {
    public struct Input: Sendable, Equatable {
        /// Every node of the job.
        public var nodes: [String]
        /// Nodes whose SMP (and so snapshot memory) is gone.
        public var lostNodes: Set<String>
        /// Workers that died, by node (local worker ids), on nodes that survive.
        public var lostWorkers: [String: [String]]
        public var committedStep: Int?
        /// Erasure-coding groups that can rebuild lost nodes' memory; empty when
        /// none is configured.
        public var ecGroups: [[String]]
        /// How many lost nodes per group erasure coding repairs (`m`).
        public var parityPerGroup: Int
        /// The newest step recoverable from the persistent tier (nil: none).
        public var durableStep: Int?

        public init(nodes: [String], lostNodes: Set<String>, lostWorkers: [String: [String]], committedStep: Int?,
                    ecGroups: [[String]] = [], parityPerGroup: Int = 0, durableStep: Int? = nil) {
            self.durableStep = durableStep
            self.nodes = nodes
            self.lostNodes = lostNodes
            self.lostWorkers = lostWorkers
            self.committedStep = committedStep
            self.ecGroups = ecGroups
            self.parityPerGroup = parityPerGroup
        }
    }

    public enum Plan: Sendable, Equatable {
        /// Replacements of `rebuildNodes` rebuild those nodes' data and parity
        /// from their EC groups; then every worker restores `step` (nil: the
        /// initial state); the SMPs listed respawn those of their workers that died.
        case restore(step: Int?, restartWorkers: [String: [String]], rebuildNodes: [String], reason: String)
        /// Memory cannot give back a consistent state, the persistent tier
        /// can: every node loads `step` from disk (its workers restarted),
        /// then every worker restores it.
        case restoreFromDisk(step: Int, reason: String)
        /// Neither memory nor disk can give back a consistent state: stop, with the reason.
        case unrecoverable(reason: String)
    }

    public static func plan(_ input: Input) -> Plan {
        let fromMemory = planFromMemory(input)
        guard case .unrecoverable(let reason) = fromMemory else { return fromMemory }
        guard let durable = input.durableStep else {
            return .unrecoverable(reason: reason + "; no durable step on disk")
        }
        let lost = (input.committedStep ?? durable) - durable
        return .restoreFromDisk(step: durable, reason: reason + "; every node loads durable step \(durable) from disk "
            + "(\(lost) committed step\(lost == 1 ? "" : "s") lost) and every worker restores it")
    }

    static func planFromMemory(_ input: Input) -> Plan {
        let step = input.committedStep.map { "step \($0)" } ?? "no committed step"
        if !input.lostNodes.isEmpty {
            let lost = input.lostNodes.sorted()
            if input.ecGroups.isEmpty || input.parityPerGroup == 0 {
                return .unrecoverable(reason: "node\(lost.count > 1 ? "s" : "") \(lost.joined(separator: ", ")) lost with \(lost.count > 1 ? "their" : "its") snapshot memory, "
                    + "and no erasure coding is configured to rebuild it; last committed: \(step)")
            }
            for (g, group) in input.ecGroups.enumerated() {
                let lostHere = group.filter { input.lostNodes.contains($0) }
                if lostHere.count > input.parityPerGroup {
                    return .unrecoverable(reason: "EC group \(g) (\(group.joined(separator: ", "))) lost \(lostHere.count) nodes "
                        + "(\(lostHere.joined(separator: ", "))), more than the \(input.parityPerGroup) it can repair; last committed: \(step)")
                }
            }
            let restarts = input.lostWorkers.filter { !$0.value.isEmpty && !input.lostNodes.contains($0.key) }.mapValues { $0.sorted() }
            return .restore(step: input.committedStep, restartWorkers: restarts, rebuildNodes: lost,
                            reason: "rebuild \(lost.joined(separator: ", ")) from parity (at most \(input.parityPerGroup) lost per group); "
                                + "then every worker restores \(step)")
        }
        let restarts = input.lostWorkers.filter { !$0.value.isEmpty }.mapValues { $0.sorted() }
        let count = restarts.values.reduce(0) { $0 + $1.count }
        let reason = count == 0
            ? "no process lost; every worker restores \(step)"
            : "respawn \(count) worker\(count == 1 ? "" : "s") on \(restarts.keys.sorted().joined(separator: ", ")); snapshot memory intact on every node; every worker restores \(step)"
        return .restore(step: input.committedStep, restartWorkers: restarts, rebuildNodes: [], reason: reason)
    }
}
