import FTSystem
import Foundation

/// Keeps a local job whole while it runs: a node the coordinator declared
/// lost gets a replacement SMP (a spare in standby while the job has one,
/// otherwise the same node id restarted empty; either rebuilds from parity),
/// and a dead coordinator is restarted on the same endpoint (it rebuilds its
/// view from the SMPs). A replacement that ends before it takes over is
/// started again after a pause that doubles from 1 s to 10 s (a Slurm step
/// on a host that is gone fails at once).
///
/// Declared dead means made dead: the process group of an SMP the coordinator
/// declared dead (its SMP and workers) is SIGKILLed before the node is
/// replaced, so a hung or cut-off node never holds its memory or its workers
/// up. A node a restarted coordinator never heard from (reported with pid 0)
/// is ended whatever runs as it. `killDeclaredDead = false` leaves them alone
/// (a zombie then finds itself fenced when it speaks again).
public final class Supervisor: @unchecked Sendable {
    public let job: LocalJob
    public var killDeclaredDead = true
    /// The reports acted on, per node: "coordinator pid/dead SMP pid".
    private var handled: [Int: String] = [:]
    /// Per node: the pause before the next replacement of one that died, and when the last started.
    private var retries: [Int: (delay: Double, at: Double)] = [:]

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
        // A job that ended (completed, or stopped as unrecoverable) is not kept whole any
        // more; what its dead SMPs held (SIGKILLed, they could not free it) is freed.
        guard let state = status["state"] as? String, state != "stopped" && state != "failed" else {
            let freed = job.freeMemoryOfEndedSMPs()
            if freed > 0 { actions.append("freed \(freed) shared-memory segments of SMPs that died") }
            return actions
        }
        let coordinator = jsonInt(status["coordinator_pid"])
        let nodes = (status["nodes"] as? [[String: Any]]) ?? []
        // An SMP that ended before the coordinator ever heard from it (it crashed at
        // start): nobody will declare it; start it again.
        let known = Set(nodes.compactMap { $0["id"] as? String })
        for (index, smp) in job.smps.enumerated() where !known.contains("n\(index)") && smp.poll() != nil {
            do {
                try job.startSMP(node: index)
                actions.append("restarted n\(index)'s SMP, which ended before it joined (\(smp.status!))")
            } catch {
                actions.append("could not restart n\(index): \(error)")
            }
        }
        for n in nodes {
            guard let id = n["id"] as? String, let index = Int(id.dropFirst()), index < job.smps.count else { continue }
            let state = n["smp"] as? String ?? ""
            let pid = Int32(jsonInt(n["pid"]))
            let report = "\(coordinator)/\(pid)"
            // A new report, or the replacement started for the last one died before it took over
            // (then again after a pause that doubles, 1 s to 10 s: on Slurm, a step on a host
            // that is gone fails at once, again and again).
            guard state == "dead" || state == "fenced", handled[index] != report || job.smps[index].poll() != nil else { continue }
            let now = monotonicSeconds()
            if handled[index] == report {
                let (delay, at) = retries[index] ?? (0.5, 0)
                guard now - at >= delay else { continue }
                retries[index] = (min(delay * 2, 10), now)
            } else {
                retries[index] = nil
            }
            handled[index] = report
            if killDeclaredDead, let ended = job.killNode(index, declaredPID: pid) { actions.append(ended) }
            guard job.options.erasure != nil else { continue }
            do {
                actions.append(try job.replaceNode(index))
            } catch {
                actions.append("could not replace \(id): \(error)")
            }
        }
        return actions
    }

    private var jobEnded: Bool {
        (try? String(contentsOfFile: job.dir + "/status.json", encoding: .utf8)) != nil
    }
}
