import FTSystem
import Foundation

/// Keeps a local job whole while it runs: a node the coordinator declared
/// lost gets a replacement SMP (a spare in standby while the job has one,
/// otherwise the same node id restarted empty; either rebuilds from parity),
/// and a dead coordinator is restarted on the same endpoint (it rebuilds its
/// view from the SMPs).
public final class Supervisor: @unchecked Sendable {
    public let job: LocalJob
    private var replaced: [Int: Int32] = [:]

    /// The status document of the last tick that got one.
    public private(set) var lastStatus: [String: Any]?

    public init(job: LocalJob) { self.job = job }

    /// One look; call it every few hundred milliseconds (or more often: a
    /// look costs one status query, at most `statusTimeout`). Returns what it did.
    @discardableResult
    public func tick(statusTimeout: Double = 0.25) -> [String] {
        var actions: [String] = []
        if let c = job.coordinator, c.poll() != nil, !jobEnded {
            if (try? job.startCoordinator()) != nil { actions.append("restarted the coordinator (it had ended: \(c.status!))") }
            return actions
        }
        guard let status = job.status(timeout: statusTimeout) else { return actions }
        lastStatus = status
        for n in (status["nodes"] as? [[String: Any]]) ?? [] {
            guard let id = n["id"] as? String, let index = Int(id.dropFirst()), index < job.smps.count else { continue }
            let state = n["smp"] as? String ?? ""
            let pid = Int32(jsonInt(n["pid"]))
            if (state == "dead" || state == "fenced"), replaced[index] != pid, job.options.erasure != nil {
                replaced[index] = pid
                do {
                    actions.append(try job.replaceNode(index))
                } catch {
                    actions.append("could not replace \(id): \(error)")
                }
            }
        }
        return actions
    }

    private var jobEnded: Bool {
        (try? String(contentsOfFile: job.dir + "/status.json", encoding: .utf8)) != nil
    }
}
