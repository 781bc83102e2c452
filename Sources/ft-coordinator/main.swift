import ArgumentParser
import FTControl
import FTCore
import FTSystem
import FTZMQ
import Foundation
import Logging

struct FTCoordinatorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ft-coordinator",
        abstract: "The job's coordinator: membership, failure detection, snapshot commit, recovery.",
        discussion: """
            SMPs and workers connect to it as ZeroMQ DEALERs. With --keys, every connection is \
            CURVE-encrypted and only clients presenting one of the job's client keys are admitted, \
            each sending only what its role may (smp.key, worker.key; operator.key reads the status). \
            An --endpoint that the network can reach (not 127.0.0.0/8, [::1] or ipc://) needs \
            --keys, or --insecure on a network you trust (then every start logs a warning). \
            It writes RUN_DIR/coordinator.endpoint and coordinator.pid at start and \
            RUN_DIR/status.json at exit. Exit status: 0 when the job completed or on SIGTERM, \
            1 when it stopped the job as unrecoverable.

            Example:
              ft-coordinator --job-id demo --nodes 2 --workers-per-node 2 --run-dir /tmp/ft-demo \\
                  --endpoint tcp://127.0.0.1:5555 --keys /tmp/ft-demo/keys
            """)

    @Option(help: "Job id.")
    var jobId: String

    @Option(help: "Number of nodes (SMPs) in the job.")
    var nodes: Int

    @Option(help: "Workers per node.")
    var workersPerNode: Int

    @Option(help: "Endpoint to bind (tcp://127.0.0.1:PORT; PORT * picks a free one).")
    var endpoint = "tcp://127.0.0.1:*"

    @Option(help: "Run directory (coordinator.endpoint, coordinator.pid, status.json).")
    var runDir: String?

    @Option(help: "Directory with the job's CURVE keys (coordinator.key, coordinator.pub, smp.key, worker.key, operator.key); see `ftctl keygen`.")
    var keys: String?

    @Flag(help: "Allow a non-loopback --endpoint without --keys: anyone who reaches it can read the job's status and send control messages. Logged at every start.")
    var insecure = false

    @Option(help: "Heartbeat interval in milliseconds.")
    var heartbeatMs = 100

    @Option(help: "Silence after which an SMP or worker is dead, in milliseconds.")
    var timeoutMs = 500

    @Option(help: "The floor of a recovery phase's deadline in seconds: a phase may take this plus 3× its bytes at the measured recovery rate before it is retried (then escalated).")
    var phaseTimeout = 5.0

    @Option(help: "The recovery rate assumed before one is measured, in MB/s (rebuild and restore deadlines).")
    var recoveryMbps = 100.0

    @Option(help: "A restarted coordinator waits this many milliseconds for every node's hello; then nodes still silent are lost and replaced (default: the larger of 2000 and twice --timeout-ms).")
    var startGraceMs: Int?

    /// The start grace in force: given, or derived from the timeout (a grace
    /// shorter than the timeout would call a merely slow node silent).
    var startGrace: Int { startGraceMs ?? max(2000, 2 * timeoutMs) }

    @Option(help: "With 2 nodes or more: when no member at all has been heard for half the timeout and one times out, this coordinator is the one cut off (its host partitioned); it declares nobody for up to this many milliseconds, then everyone silent (default: the larger of 10000 and 20 × --timeout-ms).")
    var isolationLimitMs: Int?

    @Option(help: "Step-progress watchdog: steps may stop completing for max(this floor, --hang-multiplier × p99 step time) milliseconds before the job is hung.")
    var hangFloorMs = 3000

    @Option(help: "Step-progress watchdog: the multiple of the p99 step time.")
    var hangMultiplier = 5.0

    @Option(help: "Step-progress watchdog: the bound in milliseconds until 5 step times are known.")
    var hangInitialMs = 30_000

    @Option(help: "Erasure coding across nodes as K+M (e.g. 3+1): groups of K+M consecutive nodes survive M lost nodes each.")
    var ec: String?

    @Option(help: "The workers' snapshot interval in steps (FT_SNAPSHOT_INTERVAL), shown by ftctl status.")
    var snapshotInterval = 1

    @Option(help: "The persistent tier: order every SMP to write the committed step to its --persist-dir once this many steps were committed since the last one (the SMPs need --persist-dir). Off unless this or --persist-seconds is given.")
    var persistEvery: Int?

    @Option(help: "The persistent tier: persist the committed step once this many seconds passed since the last persist was ordered.")
    var persistSeconds: Double?

    @Option(help: "After the job ends, keep answering this many milliseconds (members get the stop, ftctl a last status).")
    var lingerMs = 1000

    @Option(help: "Serve Prometheus metrics (GET /metrics) on HOST:PORT, IPv4 (port 0: a free one, written to RUN_DIR/metrics.endpoint). Off without it. The metrics name nodes, steps and failures, no tensor data; a non-loopback HOST is open to anyone who reaches it.")
    var metrics: String?

    @Option(help: "The durability estimate's prior failure rate, in failures per node per day (default 0.004, about what large GPU clusters report); updated with the node failures this job sees.")
    var nodeFailuresPerDay = DurabilityEstimate.defaultNodeFailuresPerDay

    @Option(help: "The job's last step, when known: ftctl status shows the time to it at the measured step rate.")
    var totalSteps: Int?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: Logger.Level = .info

    func validate() throws {
        guard nodes >= 1 else { throw ValidationError("--nodes must be at least 1") }
        guard snapshotInterval >= 1 else { throw ValidationError("--snapshot-interval must be at least 1") }
        if let persistEvery, persistEvery < 1 { throw ValidationError("--persist-every must be at least 1 step") }
        if let persistSeconds, !(persistSeconds > 0) { throw ValidationError("--persist-seconds must be positive") }
        guard workersPerNode >= 1 else { throw ValidationError("--workers-per-node must be at least 1") }
        guard heartbeatMs >= 1, timeoutMs > heartbeatMs else { throw ValidationError("--timeout-ms must exceed --heartbeat-ms (>= 1)") }
        guard endpoint.hasPrefix("tcp://") || endpoint.hasPrefix("ipc://") else {
            throw ValidationError("--endpoint must be tcp://HOST:PORT or ipc://PATH")
        }
        if keys == nil, !insecure, !ZMQEndpoint.isLoopbackOnly(endpoint) {
            throw ValidationError("--endpoint \(endpoint) can be reached from the network: give --keys (CURVE; see `ftctl keygen`), "
                + "or --insecure on a network you trust")
        }
        guard phaseTimeout > 0 else { throw ValidationError("--phase-timeout must be positive") }
        guard recoveryMbps > 0 else { throw ValidationError("--recovery-mbps must be positive") }
        if let isolationLimitMs, isolationLimitMs <= timeoutMs {
            throw ValidationError("--isolation-limit-ms (\(isolationLimitMs)) must exceed --timeout-ms (\(timeoutMs))")
        }
        if let startGraceMs, startGraceMs <= timeoutMs {
            throw ValidationError("--start-grace-ms (\(startGraceMs)) must exceed --timeout-ms (\(timeoutMs))")
        }
        guard hangFloorMs > 0, hangInitialMs > 0, hangMultiplier >= 1 else {
            throw ValidationError("--hang-floor-ms and --hang-initial-ms must be positive and --hang-multiplier at least 1")
        }
        if ec != nil { _ = try parsedEC() }
        if let totalSteps, totalSteps < 1 { throw ValidationError("--total-steps must be at least 1") }
        guard nodeFailuresPerDay >= 0, nodeFailuresPerDay.isFinite, nodeFailuresPerDay < 100 else {
            throw ValidationError("--node-failures-per-day must be a rate in [0, 100), not \(nodeFailuresPerDay)")
        }
        if let metrics {
            guard let colon = metrics.lastIndex(of: ":"), Int(metrics[metrics.index(after: colon)...]).map({ (0...65535).contains($0) }) == true,
                  !metrics[..<colon].isEmpty else {
                throw ValidationError("--metrics takes HOST:PORT (IPv4, port 0 for a free one), e.g. 127.0.0.1:9400, not '\(metrics)'")
            }
        }
    }

    func parsedEC() throws -> (k: Int, m: Int)? {
        guard let ec else { return nil }
        let parts = ec.split(separator: "+").map { Int($0) }
        guard parts.count == 2, let k = parts[0], let m = parts[1] else { throw ValidationError("--ec takes K+M, e.g. 3+1") }
        do {
            _ = try ECLayout.groups(of: (0..<nodes).map { "n\($0)" }, k: k, m: m)
        } catch {
            throw ValidationError(error.description)
        }
        return (k, m)
    }

    func run() throws {
        let level = logLevel
        LoggingSystem.bootstrap { label in MillisecondLogHandler(label: label, level: level) }
        var settings = CoordinatorSettings(jobID: jobId, nodes: nodes, workersPerNode: workersPerNode)
        settings.heartbeatInterval = Double(heartbeatMs) / 1000
        settings.heartbeatTimeout = Double(timeoutMs) / 1000
        settings.phaseTimeout = phaseTimeout
        settings.recoveryBytesPerSecond = recoveryMbps * 1e6
        settings.startGrace = Double(startGrace) / 1000
        settings.isolationLimit = isolationLimitMs.map { Double($0) / 1000 }
        settings.watchdog.floor = Double(hangFloorMs) / 1000
        settings.watchdog.multiplier = hangMultiplier
        settings.watchdog.initialBound = Double(hangInitialMs) / 1000
        settings.erasure = try parsedEC()
        settings.persistEvery = persistEvery
        settings.persistSeconds = persistSeconds
        settings.snapshotInterval = snapshotInterval
        var config = CoordinatorServerConfig(settings: settings, endpoint: endpoint, keysDirectory: keys, runDirectory: runDir)
        config.lingerSeconds = Double(lingerMs) / 1000
        config.metricsAddress = metrics
        config.totalSteps = totalSteps
        config.nodeFailuresPerDay = nodeFailuresPerDay
        // The failure detector's loop must turn on time on a loaded host (it sleeps in poll
        // otherwise); raised before the server makes its context, whose I/O thread inherits it.
        let priority = ThreadPriority.raiseCurrentThread(priority: ThreadPriority.eventLoop)
        let logger = Logger(label: "ft-coordinator")
        logger.info("scheduling: \(priority)")
        if keys == nil, !ZMQEndpoint.isLoopbackOnly(endpoint) {
            logger.warning("INSECURE: \(endpoint) is reachable from the network without CURVE keys (--insecure): anyone who reaches it can read the job's status and send control messages")
        }
        let server = try CoordinatorServer(config: config, logger: logger, watchSignals: true)
        let state = try server.run()
        if state == .failed { throw ExitCode(1) }
    }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}

FTCoordinatorCommand.main()
