import ArgumentParser
import FTControl
import FTSMP
import FTZMQ
import Foundation
import Logging

struct FTSMPCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ft-smp",
        abstract: "The snapshot management process of one node.",
        discussion: """
            Owns the node's snapshot memory (two pre-faulted POSIX shared-memory slots per \
            worker, mode 0600, named /ft-<job>-<node>-p<pid>-<worker>-s<slot>), spawns the node's \
            workers with the FT_* environment the worker library reads, restarts a worker \
            that dies (its committed snapshot stays in memory), and serves snapshots and \
            restores over ZeroMQ. Logs go to stderr; worker output to RUN_DIR/logs, PIDs \
            to RUN_DIR/pids. SIGTERM stops the workers and frees all shared memory; so does \
            a clean end, when every spawned worker exits 0.

            A spare (--standby FILE, given instead of a node's identity) starts, then waits \
            until FILE exists and holds "NODE_ID RANK_OFFSET": it then takes that node's \
            place (a launcher assigns it when a node is lost); it ends if its parent ends \
            before that.

            Example:
              ft-smp --job-id demo --node-id n0 --run-dir /tmp/ft-demo --workers 2 -- ft-toy-worker --steps 100
            """)

    @Option(help: "Job id (A-Z a-z 0-9 - _); part of every shared-memory name.")
    var jobId: String

    @Option(help: "This node's id (A-Z a-z 0-9 - _); with --standby, a placeholder until assigned.")
    var nodeId: String

    @Option(help: "Be a spare: wait until this file holds \"NODE_ID RANK_OFFSET\", then take that node's place.")
    var standby: String?

    @Option(help: "Run directory for the endpoint socket, logs and PID files.")
    var runDir: String

    @Option(help: "Endpoint workers connect to (default: ipc://RUN_DIR/sockets/NODE-pPID.smp.sock; that directory is made 0700, the socket 0600, and each request must come from the worker it names).")
    var endpoint: String?

    @Option(help: "Where peers reach this SMP (EC chunks, fetches, other nodes' workers' slices); needs --coordinator. Default: ipc://RUN_DIR/sockets/NODE-pPID.data.sock (one host; the socket 0600, each peer of the job's uid). A tcp://ADDR:PORT (or :*) for nodes on other hosts, or auto: tcp on the address of this host's interface toward the coordinator, port free. With --keys it is CURVE, admitting only the job's SMP and worker keys; without --keys it needs --insecure.")
    var dataEndpoint: String?

    @Flag(help: "Allow a tcp --endpoint the network can reach, or a tcp --data-endpoint without --keys: requests there carry no credentials the SMP can check, so anyone who reaches it can read and void snapshots. Logged at every start.")
    var insecure = false

    @Option(help: "Number of workers to spawn.")
    var workers: Int = 1

    @Option(help: "Most worker restarts in total before the SMP stops restarting.")
    var maxRestarts: Int = 100

    @Option(help: "Coordinator endpoint (tcp://HOST:PORT). Without it, a step commits when every local worker staged it.")
    var coordinator: String?

    @Option(help: "Directory with the job's CURVE keys (coordinator.pub, smp.key, smp.pub; its workers get worker.key from it). A tcp --data-endpoint serves with smp.key.")
    var keys: String?

    @Option(help: "Global DP rank of this node's first worker.")
    var rankOffset: Int = 0

    @Option(help: "DP size of the whole job (default: --workers).")
    var worldSize: Int?

    @Option(help: "Heartbeat interval to the coordinator, in milliseconds (its --heartbeat-ms).")
    var heartbeatMs: Int = 100

    @Option(help: "The coordinator's heartbeat timeout in milliseconds (its --timeout-ms); longer heartbeat gaps than 0.3× of it are logged.")
    var timeoutMs: Int = 500

    @Option(help: "Milliseconds the event loop may go without turning before heartbeats stop (a hung SMP is then replaced; default: the larger of 10000 and twice --timeout-ms).")
    var hangMs: Int?

    /// The hang bound in force: given, or derived from the timeout.
    var hangBound: Int { hangMs ?? max(10_000, 2 * timeoutMs) }

    @Option(help: "Most shared memory (bytes) this SMP allocates for its workers' slots; a registration past it is refused (default: 90% of /dev/shm's free space at start).")
    var memoryLimit: Int?

    @Option(help: "The persistent tier: write this node's part of each step the coordinator orders persisted under this directory (a node-local disk or a shared filesystem), as DIR/step-NNNNNNNNNNNN/NODE/{part.json,image.bin,parity.bin}.")
    var persistDir: String?

    @Option(help: "Keep this node's parts of the newest N persisted steps in --persist-dir; older ones are removed.")
    var persistKeep = 2

    @Option(help: "Most MB/s (10^6 bytes) the persist thread writes (default: no cap).")
    var persistMbps: Double?

    @Option(help: "Before the workers start, load this persisted step from --persist-dir into the slots (decoded from the node's EC group's parts if this node's part is damaged or missing); the coordinator then restores the workers from it. ft-launch start --resume sets it.")
    var resumeStep: Int?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: Logger.Level = .info

    @Argument(parsing: .postTerminator, help: "The worker command, after --.")
    var workerCommand: [String] = []

    func validate() throws {
        guard workers >= 0 && workers <= 1024 else { throw ValidationError("--workers must be in 0...1024") }
        guard workers == 0 || !workerCommand.isEmpty else {
            throw ValidationError("give the worker command after --, e.g. -- ft-toy-worker --steps 100")
        }
        guard maxRestarts >= 0 else { throw ValidationError("--max-restarts must be at least 0") }
        guard rankOffset >= 0 else { throw ValidationError("--rank-offset must be at least 0") }
        if let worldSize, worldSize < rankOffset + workers {
            throw ValidationError("--world-size \(worldSize) is smaller than --rank-offset + --workers (\(rankOffset + workers))")
        }
        if keys != nil && coordinator == nil { throw ValidationError("--keys is for the coordinator link; give --coordinator too") }
        guard heartbeatMs >= 1, timeoutMs > heartbeatMs else { throw ValidationError("--timeout-ms must exceed --heartbeat-ms (at least 1)") }
        if let hangMs, hangMs <= timeoutMs { throw ValidationError("--hang-ms (\(hangMs)) must exceed --timeout-ms (\(timeoutMs))") }
        if let memoryLimit, memoryLimit < 1 { throw ValidationError("--memory-limit must be a positive number of bytes") }
        guard persistKeep >= 1 else { throw ValidationError("--persist-keep must be at least 1") }
        if let persistMbps, !(persistMbps > 0) { throw ValidationError("--persist-mbps must be a positive number") }
        if resumeStep != nil && persistDir == nil { throw ValidationError("--resume-step loads from --persist-dir; give it too") }
        if let resumeStep, resumeStep < 0 { throw ValidationError("--resume-step must be a step (0 or more)") }
        if let dataEndpoint {
            guard coordinator != nil else { throw ValidationError("--data-endpoint is for peers of a job with a coordinator; give --coordinator too") }
            guard dataEndpoint.hasPrefix("tcp://") || dataEndpoint.hasPrefix("ipc://") || dataEndpoint == "auto" else {
                throw ValidationError("--data-endpoint must be tcp://ADDR:PORT, ipc://PATH or auto, not '\(dataEndpoint)'")
            }
            if dataEndpoint == "auto", coordinator.flatMap(ZMQEndpoint.host(of:)) == nil {
                throw ValidationError("--data-endpoint auto takes this host's address from the route to the coordinator: --coordinator must be tcp://ADDRESS:PORT")
            }
            if dataEndpoint.hasPrefix("tcp://") || dataEndpoint == "auto", keys == nil, !insecure {
                throw ValidationError("--data-endpoint \(dataEndpoint) without --keys would serve every tensor to whoever reaches it: "
                    + "give --keys (CURVE), leave it out (a private ipc socket), or give --insecure on a network you trust")
            }
        }
        if let endpoint, !insecure, !ZMQEndpoint.isLoopbackOnly(endpoint) {
            throw ValidationError("--endpoint \(endpoint) can be reached from the network, where workers' requests cannot be "
                + "authenticated: leave it out (a private ipc socket), use 127.0.0.1, or give --insecure on a network you trust")
        }
    }

    func run() throws {
        let level = logLevel
        LoggingSystem.bootstrap { label in MillisecondLogHandler(label: label, level: level) }
        var nodeId = self.nodeId
        var rankOffset = self.rankOffset
        if let standby {
            let parent = getppid()
            Logger(label: "ft-smp.spare").info("spare waiting for an assignment in \(standby)", metadata: ["pid": "\(getpid())"])
            while true {
                if let text = try? String(contentsOfFile: standby, encoding: .utf8) {
                    let parts = text.split(whereSeparator: { $0 == " " || $0 == "\n" })
                    guard parts.count == 2, let offset = Int(parts[1]) else {
                        throw ValidationError("\(standby) must hold \"NODE_ID RANK_OFFSET\", not '\(text)'")
                    }
                    nodeId = String(parts[0])
                    rankOffset = offset
                    break
                }
                if getppid() != parent { return }  // the launcher is gone: nothing will assign us
                usleep(10_000)
            }
        }
        let logger = Logger(label: "ft-smp.\(nodeId)")
        if let endpoint, !ZMQEndpoint.isLoopbackOnly(endpoint) {
            logger.warning("INSECURE: workers' endpoint \(endpoint) is reachable from the network (--insecure): anyone who reaches it can read and void this node's snapshots")
        }
        var config = SMPConfiguration(jobID: jobId, nodeID: nodeId, endpoint: endpoint, runDirectory: runDir,
                                      workerCount: workers, workerCommand: workerCommand, maxRestarts: maxRestarts)
        config.coordinatorEndpoint = coordinator
        config.keysDirectory = keys
        if var dataEndpoint {
            if dataEndpoint == "auto" {
                let coordinatorHost = coordinator.flatMap(ZMQEndpoint.host(of:)) ?? ""
                guard let address = ZMQEndpoint.sourceAddress(toward: coordinatorHost) else {
                    throw ValidationError("--data-endpoint auto: no IPv4 route from this host to the coordinator's address \(coordinatorHost)")
                }
                dataEndpoint = "tcp://\(address):*"
                logger.info("data endpoint on \(address), this host's address toward the coordinator")
            }
            config.dataEndpoint = dataEndpoint
            if dataEndpoint.hasPrefix("tcp://") && keys == nil {
                logger.warning("INSECURE: data endpoint \(dataEndpoint) has no CURVE (--insecure without --keys): anyone who reaches it can read every tensor and inject parity")
            }
        }
        config.rankOffset = rankOffset
        config.worldSize = worldSize
        config.heartbeatInterval = Double(heartbeatMs) / 1000
        config.heartbeatTimeout = Double(timeoutMs) / 1000
        config.hangBound = Double(hangBound) / 1000
        config.memoryLimit = memoryLimit
        config.persistDirectory = persistDir
        config.persistKeep = persistKeep
        config.persistBytesPerSecond = persistMbps.map { $0 * 1e6 }
        config.resumeStep = resumeStep
        let code: Int32
        do {
            let server = try SMPServer(config: config, logger: logger, watchSignals: true)
            code = try server.run()
        } catch let error as SMPError {
            throw ValidationError(error.description)
        }
        if code != 0 { throw ExitCode(code) }
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}

FTSMPCommand.main()
