import FTControl
import FTCore
import FTSystem
import FTZMQ
import Foundation
import Logging

/// The coordinator's orders, each handed to the components it concerns; what
/// a worker's exit changes; the shutdown; the status.
extension SMPServer {
    // MARK: the coordinator's orders

    func obeyCoordinator() throws {
        for message in agent.orders() {
            switch message {
            case .welcome, .ack, .pause:
                break
            case .helloRequired:
                agent.sayHello(inventory)
            case .ecLayout(let layout):
                dataPlane?.applyLayout(layout)
            case .rebuild(let step, let lost):
                guard let dataPlane else {
                    agent.report(.rebuilt(step: step, error: ErasureState.noLayout))
                    continue
                }
                dataPlane.rebuild(step: step, lost: lost)  // reports `rebuilt` when done; the loop goes on meanwhile
            case .commit(let step):
                dataPlane?.commit(step: step)
                if memory.store.allHaveStaged(step) {
                    memory.commit(step: step)
                    logger.debug("committed step \(step)")
                } else if memory.store.committedStep != step {
                    logger.warning("commit(\(step)) but not every local worker holds it staged")
                }
            case .abort(let step):
                agent.forgetProtected()
                memory.abort(step: step)
                dataPlane?.abort(step: step)
                logger.info("snapshot round \(step) aborted by the coordinator")
            case .restore(let step, _):
                agent.forgetProtected()  // any staged round is void now
                dataPlane?.restore(step: step)
                if !memory.prepareRestore(step: step) {
                    logger.error("asked to restore step \(step.map(String.init) ?? "none"), which this node does not hold committed")
                }
            case .persist(let step, let nodes, let durable):
                startPersist(step: step, nodes: nodes, durable: durable)
            case .loadPersisted(let step):
                try reloadPersisted(step: step)
            case .restartWorkers(let list):
                for r in list { try supervisor.replace(r, epoch: agent.epoch) }
            case .fenced(let reason):
                logger.error("fenced by the coordinator: \(reason); stopping")
                exitCode = 3
                stopRequested = true
            case .stop(let reason, let failed):
                logger.info("job stopped by the coordinator: \(reason)", metadata: ["failed": "\(failed)"])
                exitCode = failed ? 1 : 0
                stopRequested = true
            default:
                logger.debug("ignored \(message.type) from the coordinator")
            }
        }
    }

    // MARK: children

    /// A worker's process ended: what it held and staged is dropped from the
    /// store's view (its slots stay), and the coordinator hears of a failure
    /// (without one, the supervisor restarts it within the node's budget).
    func childExited(_ id: String) throws {
        guard let (exit, pid, status) = supervisor.reap(id) else { return }
        workers.forget(worker: id)  // its processes are gone
        memory.workerExited(id)
        let committed = memory.store.workers[id]?.lastCommitted
        logger.info("worker exited", metadata: ["worker": "\(id)", "pid": "\(pid)", "status": "\(status)",
                                                "committed": "\(committed.map(String.init) ?? "none")"])
        switch exit {
        case .replaced: try supervisor.spawn(workerID: id, epoch: agent.epoch)  // ended on the coordinator's order
        case .finished: break
        case .failed:
            if agent.connected {
                // The coordinator decides what happens next (and restarts it through us).
                agent.report(.childExited(worker: id, pid: Int(pid), status: status))
            } else {
                try supervisor.restartAfterFailure(id, epoch: 0)
            }
        }
    }

    // MARK: the end

    func shutdown() {
        persister?.stopAndWait()  // it reads the slots
        supervisor.stopAll()
        workers.router.close()
        if let dataPlane {
            dataPlane.close()  // its sockets, then waits for libzmq to release zero-copy frames
        } else {
            ZeroCopyFrames.quiesce(logger: logger)  // slices sent from slot memory
        }
        memory.freeAll()
        agent.shutdown()
        if config.endpoint.hasPrefix("ipc://") { unlink(String(config.endpoint.dropFirst(6))) }
        // Only our own record: a replacement of this node may have written its pid there.
        let pidFile = config.runDirectory + "/pids/\(config.nodeID).smp.pid"
        if (try? String(contentsOfFile: pidFile, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) == "\(getpid())" {
            unlink(pidFile)
        }
        logger.info("smp down; shared memory freed")
    }

    // MARK: status

    /// The SMP's state as JSON (one object; keys documented in the README).
    func statusJSON() -> String {
        var workerList: [[String: Any]] = []
        for (id, w) in memory.store.workers.sorted(by: { $0.key < $1.key }) {
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
            workerList.append(entry)
        }
        let refused = workers.refusedRequests + refusedHeld + (dataPlane?.refusedFrames ?? 0)
        let object: [String: Any] = ["job": config.jobID, "node": config.nodeID, "committed_step": memory.store.committedStep ?? -1,
                                     "malformed_frames": malformedFrames, "refused_requests": refused,
                                     "unauthorized_requests": unauthorizedRequests,
                                     "memory_limit": memoryLimit, "shared_memory_bytes": memory.sharedMemoryBytes, "workers": workerList]
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self)
    }
}
