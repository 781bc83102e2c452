import FTControl
import FTCore
import FTSystem
import FTZMQ
import Foundation
import Logging

/// The SMP's child supervisor: the worker processes of one node.
///
/// It owns their processes (a pidfd each, polled by the server's loop), their
/// pid files and the node's start history, restart counts, the local restart
/// budget, and the coordinator's replacement orders (a hung worker's stack
/// dump, then its kill, then its respawn once its exit is seen). It knows
/// nothing of snapshots, sockets or the coordinator: the server hands it what
/// was decided (`replace`) and hears back what happened to a child (`reap`).
final class WorkerSupervisor {
    /// What became of a child whose exit was seen.
    enum Exit: Equatable {
        /// Ended on the coordinator's order: start its replacement (`spawn`).
        case replaced
        /// Exited 0: done.
        case finished
        /// Failed or was killed by something else; the server decides (the
        /// coordinator, or `restartAfterFailure` without one).
        case failed
    }

    private let config: SMPConfiguration
    private let logger: Logger
    /// The workers' socket, for `FT_SMP_ENDPOINT`.
    private let smpEndpoint: String
    private(set) var children: [String: ChildProcess] = [:]
    private(set) var restarts: [String: Int] = [:]
    private(set) var finished: Set<String> = []
    private var totalRestarts = 0
    /// Workers being ended on the coordinator's order, respawned when their
    /// exit is seen; `killAt`: when a stack dump still running is cut short.
    private var replacing: [String: (pid: Int32, killAt: Double?, dumper: ChildProcess?)] = [:]

    init(config: SMPConfiguration, smpEndpoint: String, logger: Logger) {
        self.config = config
        self.smpEndpoint = smpEndpoint
        self.logger = logger
    }

    /// Every spawned worker has exited 0.
    var allFinished: Bool { config.workerCount > 0 && finished.count == config.workerCount }

    /// Starts the node's workers, w0..w(N-1). `epoch`, here and below: the
    /// job's epoch now (torchrun's MASTER_PORT moves with it).
    func startAll(epoch: UInt64) throws {
        for i in 0..<config.workerCount { try spawn(workerID: "w\(i)", epoch: epoch) }
    }

    /// The descriptors to poll, in order: each running worker's pidfd (the
    /// ids, for `reap`), then each running stack dump's.
    func pollItems() -> (items: [ZMQPoller.Item], workers: [String]) {
        let ids = children.keys.sorted()
        var items = ids.map { ZMQPoller.Item(fileDescriptor: children[$0]!.pidfd, .readable) }
        for id in replacing.keys.sorted() { if let d = replacing[id]?.dumper { items.append(.init(fileDescriptor: d.pidfd, .readable)) } }
        return (items, ids)
    }

    func spawn(workerID: String, epoch: UInt64) throws {
        let dpRank = config.rankOffset + (Int(workerID.dropFirst()) ?? 0)
        var env = ProcessInfo.processInfo.environment.merging(config.extraEnvironment) { $1 }
        env["FT_JOB_ID"] = config.jobID
        env["FT_NODE_ID"] = config.nodeID
        env["FT_WORKER_ID"] = workerID
        env["FT_DP_RANK"] = "\(dpRank)"
        env["FT_DP_SIZE"] = "\(config.worldSize ?? config.workerCount)"
        if let c = config.coordinatorEndpoint { env["FT_COORDINATOR_ENDPOINT"] = c }
        if let k = config.keysDirectory { env["FT_KEYS_DIR"] = k }
        env["FT_SMP_ENDPOINT"] = smpEndpoint
        // The address peers on other hosts reach this one at (the data plane's): workers
        // bind their collectives there. On one host (ipc data plane), loopback.
        if let host = ZMQEndpoint.host(of: config.dataEndpoint), host != "*", host != "0.0.0.0" { env["FT_HOST_ADDR"] = host }
        env["FT_RESTART_COUNT"] = "\(restarts[workerID, default: 0])"
        env["FT_RUN_DIR"] = config.runDirectory
        env["FT_HEARTBEAT_MS"] = "\(Int(config.heartbeatInterval * 1000))"
        // A Swift worker that crashes (or gets SIGQUIT) writes every thread's backtrace here.
        env["SWIFT_BACKTRACE"] = env["SWIFT_BACKTRACE"]
            ?? "enable=yes,interactive=no,threads=all,output-to=\(config.runDirectory)/stacks"
        env.merge(Self.torchrunEnvironment(env, rank: dpRank, localRank: dpRank - config.rankOffset, localWorldSize: config.workerCount,
                                           epoch: epoch)) { $1 }
        let child = try ChildProcess(arguments: config.workerCommand, environment: env,
                                     outputPath: config.runDirectory + "/logs/\(config.nodeID)-\(workerID).log")
        children[workerID] = child
        SMPFiles.write(config.runDirectory + "/pids/\(config.nodeID)-\(workerID).pid", "\(child.pid)\n")
        // Every worker ever started, for a stop that also ends workers of a
        // replaced (stopped, later continued) SMP of this node.
        SMPFiles.appendLine(config.runDirectory + "/pids/history", "\(config.nodeID) \(workerID) \(child.pid)")
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

    /// The exit of worker `id`, if its process has ended (nil while it runs).
    func reap(_ id: String) -> (exit: Exit, pid: Int32, status: String)? {
        guard let child = children[id], let status = child.poll() else { return nil }
        children[id] = nil
        if let order = replacing.removeValue(forKey: id) {
            order.dumper?.kill(SIGKILL)
            restarts[id, default: 0] += 1
            return (.replaced, child.pid, "\(status)")
        }
        if status.isSuccess {
            finished.insert(id)
            return (.finished, child.pid, "\(status)")
        }
        return (.failed, child.pid, "\(status)")
    }

    /// Without a coordinator: restarts a failed worker while the node's
    /// restart budget lasts; past it, counts the worker as finished.
    func restartAfterFailure(_ id: String, epoch: UInt64) throws {
        guard totalRestarts < config.maxRestarts else {
            logger.error("worker \(id) failed and the restart budget (\(config.maxRestarts)) is spent; not restarting")
            finished.insert(id)
            return
        }
        totalRestarts += 1
        restarts[id, default: 0] += 1
        try spawn(workerID: id, epoch: epoch)
    }

    /// The coordinator declared `r.worker` dead: if that incarnation still
    /// runs, end it (saving its stack first when asked) and respawn it once
    /// its exit is seen; if none runs, start one now. An order about an
    /// incarnation that is gone (a newer one runs) changes nothing.
    func replace(_ r: ControlMessage.WorkerRestart, epoch: UInt64) throws {
        guard (0..<config.workerCount).contains(where: { "w\($0)" == r.worker }) else {
            logger.warning("the coordinator asked to restart worker '\(r.worker)', which this node does not run")
            return
        }
        guard let child = children[r.worker] else {
            guard replacing[r.worker] == nil else { return }
            restarts[r.worker, default: 0] += 1
            try spawn(workerID: r.worker, epoch: epoch)
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
    private func startStackDump(worker: String, pid: Int32) -> ChildProcess? {
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

    /// SIGKILL to every worker, waiting for each to end (at most 10 s each);
    /// their exits are not reported (the coordinator ordered them). Returns
    /// their ids, for `spawn` once the node's memory is what they should restore.
    func killAllAndWait() -> [String] {
        for (_, order) in replacing { order.dumper?.kill(SIGKILL) }
        replacing.removeAll()
        let ids = children.keys.sorted()
        for id in ids {
            let child = children[id]!
            child.kill(SIGKILL)
            if child.wait(timeoutSeconds: 10) == nil { logger.error("worker \(id) (pid \(child.pid)) did not end 10 s after SIGKILL") }
            restarts[id, default: 0] += 1
        }
        children.removeAll()
        return ids
    }

    /// SIGTERM to every worker, SIGKILL to one that ignores it for 5 s; stack dumps are cut short.
    func stopAll() {
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
    }
}

/// Small file writes of the SMP's records (pid files, the start history).
enum SMPFiles {
    static func appendLine(_ path: String, _ line: String) {
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        guard fd >= 0 else { return }
        defer { close(fd) }
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }  // one write: lines never interleave
    }

    static func write(_ path: String, _ text: String) {
        _ = FileManager.default.createFile(atPath: path, contents: Data(text.utf8))
    }
}
