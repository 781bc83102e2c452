import FTSystem
import Foundation

/// Keeps a local job whole while it runs: a node the coordinator declared
/// lost gets a replacement SMP (the same node id, restarted empty, which
/// rebuilds from parity), and a dead coordinator is restarted on the same
/// endpoint (it rebuilds its view from the SMPs).
public final class Supervisor: @unchecked Sendable {
    public let job: LocalJob
    private var replaced: [Int: Int32] = [:]

    public init(job: LocalJob) { self.job = job }

    /// One look; call it every few hundred milliseconds. Returns what it did.
    @discardableResult
    public func tick() -> [String] {
        var actions: [String] = []
        if let c = job.coordinator, c.poll() != nil, !jobEnded {
            if (try? job.startCoordinator()) != nil { actions.append("restarted the coordinator (it had ended: \(c.status!))") }
            return actions
        }
        guard let status = job.status(timeout: 0.5) else { return actions }
        for n in (status["nodes"] as? [[String: Any]]) ?? [] {
            guard let id = n["id"] as? String, let index = Int(id.dropFirst()), index < job.smps.count else { continue }
            let state = n["smp"] as? String ?? ""
            let pid = Int32(jsonInt(n["pid"]))
            if (state == "dead" || state == "fenced"), replaced[index] != pid, job.options.erasure != nil {
                replaced[index] = pid
                if (try? job.startSMP(node: index)) != nil { actions.append("started a replacement SMP for \(id)") }
            }
        }
        return actions
    }

    private var jobEnded: Bool {
        (try? String(contentsOfFile: job.dir + "/status.json", encoding: .utf8)) != nil
    }
}
