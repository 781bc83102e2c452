import FTControl
import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation
import Logging

/// Worker processes: spawning, exits, replacement on the coordinator's order, shutdown, status.
extension SMPServer {
    // MARK: children

    func spawn(workerID: String) throws {
        let dpRank = config.rankOffset + (Int(workerID.dropFirst()) ?? 0)
        var env = ProcessInfo.processInfo.environment.merging(config.extraEnvironment) { $1 }
        env["FT_JOB_ID"] = config.jobID
        env["FT_NODE_ID"] = config.nodeID
        env["FT_WORKER_ID"] = workerID
        env["FT_DP_RANK"] = "\(dpRank)"
        env["FT_DP_SIZE"] = "\(config.worldSize ?? config.workerCount)"
        if let c = config.coordinatorEndpoint { env["FT_COORDINATOR_ENDPOINT"] = c }
        if let k = config.keysDirectory { env["FT_KEYS_DIR"] = k }
        env["FT_SMP_ENDPOINT"] = boundEndpoint
        env["FT_RESTART_COUNT"] = "\(restarts[workerID, default: 0])"
        env["FT_RUN_DIR"] = config.runDirectory
        env["FT_HEARTBEAT_MS"] = "\(Int(config.heartbeatInterval * 1000))"
        // A Swift worker that crashes (or gets SIGQUIT) writes every thread's backtrace here.
        env["SWIFT_BACKTRACE"] = env["SWIFT_BACKTRACE"]
            ?? "enable=yes,interactive=no,threads=all,output-to=\(config.runDirectory)/stacks"
        env.merge(Self.torchrunEnvironment(env, rank: dpRank, localRank: dpRank - config.rankOffset, localWorldSize: config.workerCount,
                                           epoch: channel?.epoch ?? 0)) { $1 }
        let child = try ChildProcess(arguments: config.workerCommand, environment: env,
                                     outputPath: config.runDirectory + "/logs/\(config.nodeID)-\(workerID).log")
        children[workerID] = child
        writeFile(config.runDirectory + "/pids/\(config.nodeID)-\(workerID).pid", "\(child.pid)\n")
        // Every worker ever started, for a stop that also ends workers of a
        // replaced (stopped, later continued) SMP of this node.
        appendLine(config.runDirectory + "/pids/history", "\(config.nodeID) \(workerID) \(child.pid)")
        logger.info("worker started", metadata: ["worker": "\(workerID)", "pid": "\(child.pid)",
                                                 "restarts": "\(restarts[workerID, default: 0])"])
    }

    /// torchrun's variables, so that a torch.distributed script runs under
    /// ft-smp as under torchrun: RANK, WORLD_SIZE, LOCAL_RANK,
    /// LOCAL_WORLD_SIZE, and MASTER_ADDR / MASTER_PORT when the launcher gave
    /// FT_MASTER_ADDR / FT_MASTER_PORT_BASE: the port is FT_MASTER_PORT_BASE
    /// + epoch mod FT_MASTER_PORT_SPAN (default 64), fresh in every epoch
    /// (ft_torch sets it again for the epoch it restores in).
    static func torchrunEnvironment(_ env: [String: String], rank: Int, localRank: Int, localWorldSize: Int,
                                    epoch: UInt64) -> [String: String] {
        var out = ["RANK": "\(rank)", "WORLD_SIZE": env["FT_DP_SIZE"] ?? "1", "LOCAL_RANK": "\(localRank)",
                   "LOCAL_WORLD_SIZE": "\(localWorldSize)"]
        if let address = env["FT_MASTER_ADDR"] { out["MASTER_ADDR"] = address }
        if let base = env["FT_MASTER_PORT_BASE"].flatMap(Int.init) {
            let span = max(1, env["FT_MASTER_PORT_SPAN"].flatMap(Int.init) ?? 64)
            out["MASTER_PORT"] = "\(base + Int(epoch % UInt64(span)))"
        }
        return out
    }

    func childExited(_ id: String) throws {
        guard let child = children[id], let status = child.poll() else { return }
        children[id] = nil
        requestOwners = requestOwners.filter { $0.value.worker != id }  // its processes are gone
        store.workerExited(id)
        let committed = store.workers[id]?.lastCommitted
        logger.info("worker exited", metadata: ["worker": "\(id)", "pid": "\(child.pid)", "status": "\(status)",
                                                "committed": "\(committed.map(String.init) ?? "none")"])
        if let order = replacing.removeValue(forKey: id) {
            // Ended on the coordinator's order: its replacement starts now.
            order.dumper?.kill(SIGKILL)
            restarts[id, default: 0] += 1
            try spawn(workerID: id)
            return
        }
        if status.isSuccess {
            finished.insert(id)
            return
        }
        if let channel {
            // The coordinator decides what happens next (and restarts it through us).
            channel.send(.childExited(worker: id, pid: Int(child.pid), status: "\(status)"))
            return
        }
        guard totalRestarts < config.maxRestarts else {
            logger.error("worker \(id) failed and the restart budget (\(config.maxRestarts)) is spent; not restarting")
            finished.insert(id)
            return
        }
        totalRestarts += 1
        restarts[id, default: 0] += 1
        try spawn(workerID: id)
    }

    /// The coordinator declared `r.worker` dead: if that incarnation still
    /// runs, end it (saving its stack first when asked) and respawn it once
    /// its exit is seen; if none runs, start one now. An order about an
    /// incarnation that is gone (a newer one runs) changes nothing.
    func replaceWorker(_ r: ControlMessage.WorkerRestart) throws {
        guard (0..<config.workerCount).contains(where: { "w\($0)" == r.worker }) else {
            logger.warning("the coordinator asked to restart worker '\(r.worker)', which this node does not run")
            return
        }
        guard let child = children[r.worker] else {
            guard replacing[r.worker] == nil else { return }
            restarts[r.worker, default: 0] += 1
            try spawn(workerID: r.worker)
            return
        }
        guard r.pid != 0, Int(child.pid) == r.pid, replacing[r.worker] == nil else { return }
        if r.saveStack, let dumper = startStackDump(worker: r.worker, pid: child.pid) {
            logger.warning("worker \(r.worker) (pid \(child.pid)) is hung: saving its stack, then killing it")
            replacing[r.worker] = (child.pid, monotonicSeconds() + 15, dumper)
        } else {
            logger.warning("worker \(r.worker) (pid \(child.pid)) was declared dead: killing it")
            child.kill(SIGKILL)
            replacing[r.worker] = (child.pid, nil, nil)
        }
    }

    /// Thread backtraces of a hung worker, to `RUN_DIR/stacks/NODE-WORKER-pPID.txt`:
    /// `gdb` attached to it (every thread, native frames, demangled when
    /// swift-demangle is at hand). Without gdb, SIGQUIT: a Swift worker's
    /// runtime writes its own backtraces there (SWIFT_BACKTRACE, set at spawn).
    func startStackDump(worker: String, pid: Int32) -> ChildProcess? {
        let dir = config.runDirectory + "/stacks"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let file = "\(dir)/\(config.nodeID)-\(worker)-p\(pid).txt"
        guard ChildProcess.resolve("gdb") != nil else {
            logger.info("gdb is not installed: asking worker \(worker) to write its own backtraces (SIGQUIT)")
            kill(pid, SIGQUIT)
            return nil
        }
        let script = "echo \"# \(config.nodeID)/\(worker) pid \(pid), declared hung by the coordinator's step-progress watchdog\"; "
            + "timeout 10 gdb -batch -nx -p \(pid) -ex 'thread apply all bt' </dev/null 2>&1 | "
            + "if command -v swift-demangle >/dev/null; then swift-demangle --simplified; else cat; fi"
        do {
            return try ChildProcess(arguments: ["/bin/sh", "-c", script], environment: ProcessInfo.processInfo.environment, outputPath: file)
        } catch {
            logger.warning("could not start gdb for worker \(worker): \(error)")
            return nil
        }
    }

    /// Workers whose stack dump is over (or took too long) are killed now.
    func endReplacedWorkers() {
        let now = monotonicSeconds()
        for (id, order) in replacing {
            guard let dumper = order.dumper else {
                if order.killAt == nil, let child = children[id], child.pid == order.pid { child.kill(SIGKILL) }
                continue
            }
            guard dumper.poll() != nil || (order.killAt.map { now > $0 } ?? false) else { continue }
            if dumper.poll() == nil { dumper.kill(SIGKILL) } else { logger.info("stack of worker \(id) (pid \(order.pid)) saved to \(config.runDirectory)/stacks") }
            replacing[id] = (order.pid, nil, nil)
            if let child = children[id], child.pid == order.pid { child.kill(SIGKILL) }
        }
    }

    func shutdown() {
        for (_, order) in replacing { order.dumper?.kill(SIGKILL) }
        for (id, child) in children {
            child.kill(SIGTERM)
            if child.wait(timeoutSeconds: 5) == nil {
                logger.warning("worker \(id) ignored SIGTERM for 5 s; SIGKILL")
                child.kill(SIGKILL)
                child.wait(timeoutSeconds: 5)
            }
        }
        children.removeAll()
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
                                        "skipped": w.skipped, "aborted": w.aborted, "restarts": restarts[id, default: 0]]
            entry["last_staged"] = w.lastStaged ?? -1
            entry["last_committed"] = w.lastCommitted ?? -1
            entry["pid"] = children[id].map { Int($0.pid) } ?? -1
            workers.append(entry)
        }
        let object: [String: Any] = ["job": config.jobID, "node": config.nodeID, "committed_step": store.committedStep ?? -1,
                                     "malformed_frames": malformedFrames, "refused_requests": refusedRequests + refusedChunks + (erasure?.round.refusedFrames ?? 0),
                                     "unauthorized_requests": unauthorizedRequests,
                                     "memory_limit": memoryLimit, "shared_memory_bytes": sharedMemoryBytes, "workers": workers]
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self)
    }

    func appendLine(_ path: String, _ line: String) {
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        guard fd >= 0 else { return }
        defer { close(fd) }
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }  // one write: lines never interleave
    }

    func writeFile(_ path: String, _ text: String) {
        _ = FileManager.default.createFile(atPath: path, contents: Data(text.utf8))
    }
}
