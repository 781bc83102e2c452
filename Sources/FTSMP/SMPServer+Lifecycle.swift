import FTControl
import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation
import Logging

/// What the server does when a worker exits, its shutdown, and its status.
/// The worker processes themselves are the `WorkerSupervisor`'s.
extension SMPServer {
    // MARK: children

    /// A worker's process ended: what it held and staged is dropped from the
    /// store's view (its slots stay), and the coordinator hears of a failure
    /// (without one, the supervisor restarts it within the node's budget).
    func childExited(_ id: String) throws {
        guard let (exit, pid, status) = supervisor.reap(id) else { return }
        requestOwners = requestOwners.filter { $0.value.worker != id }  // its processes are gone
        store.workerExited(id)
        let committed = store.workers[id]?.lastCommitted
        logger.info("worker exited", metadata: ["worker": "\(id)", "pid": "\(pid)", "status": "\(status)",
                                                "committed": "\(committed.map(String.init) ?? "none")"])
        switch exit {
        case .replaced: try supervisor.spawn(workerID: id, epoch: channel?.epoch ?? 0)  // ended on the coordinator's order
        case .finished: break
        case .failed:
            if let channel {
                // The coordinator decides what happens next (and restarts it through us).
                channel.send(.childExited(worker: id, pid: Int(pid), status: status))
            } else {
                try supervisor.restartAfterFailure(id, epoch: 0)
            }
        }
    }

    func shutdown() {
        supervisor.stopAll()
        router.close()
        dataRouter?.close()
        quiesceZeroCopy()  // libzmq may still be reading slot memory: wait before unmapping it
        for (_, segs) in segments { for s in segs { SharedMemorySegment.unlink(name: s.name) } }
        segments.removeAll()
        channel?.shutdown()
        dataZAP?.stop()
        if config.endpoint.hasPrefix("ipc://") { unlink(String(config.endpoint.dropFirst(6))) }
        // Only our own record: a replacement of this node may have written its pid there.
        let pidFile = config.runDirectory + "/pids/\(config.nodeID).smp.pid"
        if (try? String(contentsOfFile: pidFile, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) == "\(getpid())" {
            unlink(pidFile)
        }
        logger.info("smp down; shared memory freed")
    }

    /// `/ft-JOB-NODE-pPID-WORKER-sSLOT`: the SMP's pid is in the name so that
    /// an SMP that was stopped, replaced and then continued (and fenced) frees
    /// only its own segments, never its replacement's.
    func segmentName(worker: String, slot: Int) -> String {
        "/ft-\(config.jobID)-\(config.nodeID)-p\(getpid())-\(worker)-s\(slot)"
    }

    // MARK: status

    /// The SMP's state as JSON (one object; keys documented in the README).
    func statusJSON() -> String {
        var workers: [[String: Any]] = []
        for (id, w) in store.workers.sorted(by: { $0.key < $1.key }) {
            let slots = w.slots.map { s -> String in
                switch s {
                case .empty: "empty"
                case .writing(let step): "writing(\(step))"
                case .staged(let step, _): "staged(\(step))"
                case .committed(let step, _): "committed(\(step))"
                }
            }
            var entry: [String: Any] = ["id": id, "dp_rank": w.registration.dpRank, "slots": slots,
                                        "slot_bytes": w.layout.slotBytes, "bytes_held": 2 * w.layout.slotBytes,
                                        "skipped": w.skipped, "aborted": w.aborted, "restarts": supervisor.restarts[id, default: 0]]
            entry["last_staged"] = w.lastStaged ?? -1
            entry["last_committed"] = w.lastCommitted ?? -1
            entry["pid"] = supervisor.children[id].map { Int($0.pid) } ?? -1
            workers.append(entry)
        }
        let object: [String: Any] = ["job": config.jobID, "node": config.nodeID, "committed_step": store.committedStep ?? -1,
                                     "malformed_frames": malformedFrames, "refused_requests": refusedRequests + refusedChunks + (erasure?.round.refusedFrames ?? 0),
                                     "unauthorized_requests": unauthorizedRequests,
                                     "memory_limit": memoryLimit, "shared_memory_bytes": sharedMemoryBytes, "workers": workers]
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self)
    }
}
