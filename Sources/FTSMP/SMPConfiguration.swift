import FTControl
import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation
import Logging

/// What an SMP is told at start.
public struct SMPConfiguration: Sendable {
    public var jobID: String
    public var nodeID: String
    /// Where workers reach the SMP: `ipc://…` (default: `RUN_DIR/sockets/`, a
    /// directory of mode 0700; the socket file is 0600) or `tcp://127.0.0.1:PORT`
    /// (tests only: over TCP no peer credentials can be checked).
    public var endpoint: String
    /// Logs, PID files and the endpoint socket live here.
    public var runDirectory: String
    /// Workers to spawn (0: workers are started by someone else and connect).
    public var workerCount: Int
    /// The command each worker runs; the SMP adds the FT_* environment.
    public var workerCommand: [String]
    /// Restart a worker that exits unsuccessfully, up to this many times in total.
    public var maxRestarts: Int
    public var extraEnvironment: [String: String]
    /// The coordinator to report to. Without one, a step commits when every
    /// local worker staged it and the SMP restarts dead workers itself.
    public var coordinatorEndpoint: String?
    /// CURVE keys of the job (`JobKeys` layout), for the coordinator link.
    public var keysDirectory: String?
    /// Global DP rank of this node's first worker, and the job's DP size.
    public var rankOffset = 0
    public var worldSize: Int?
    public var heartbeatInterval = 0.1
    /// The coordinator's heartbeat timeout (heartbeat gaps over 0.3× of it are logged).
    public var heartbeatTimeout = 0.5
    /// The event loop not turning for this long is a hang: heartbeats stop so
    /// that the coordinator replaces this SMP.
    public var hangBound = 10.0
    /// Where peers reach the SMP (EC frames, fetches, other nodes' workers'
    /// slices), with a coordinator: `ipc://` in the same private directory as
    /// the workers' socket (default, one host; the socket file 0600, each
    /// request's peer must be of the job's uid or root), or a `tcp://` address
    /// for nodes on other hosts: with `keysDirectory` it is a CURVE server
    /// that admits only the job's SMP and worker keys (`DataPlaneKeys`);
    /// without, nothing is checked (tests, `ft-smp --insecure`).
    public var dataEndpoint: String
    /// The most shared memory (bytes, both slots of every worker) this SMP
    /// allocates; a registration past it is refused (`memory_limit`). nil:
    /// `defaultMemoryLimit()`, taken at start.
    public var memoryLimit: Int?
    /// The persistent tier: where this SMP writes its parts of the steps the
    /// coordinator orders persisted (a node-local disk or a shared filesystem;
    /// nil: none), how many of its newest steps it keeps there, and the most
    /// bytes per second it writes (nil: no cap).
    public var persistDirectory: String?
    public var persistKeep = 2
    public var persistBytesPerSecond: Double?
    /// Load this persisted step from `persistDirectory` before the workers
    /// start (a cold restart: `ft-launch start --resume DIR`).
    public var resumeStep: Int?

    public init(jobID: String, nodeID: String, endpoint: String? = nil, runDirectory: String, workerCount: Int,
                workerCommand: [String], maxRestarts: Int = 100, extraEnvironment: [String: String] = [:]) {
        self.jobID = jobID
        self.nodeID = nodeID
        self.runDirectory = runDirectory
        // The pid keeps a stopped-then-continued SMP of this node (a zombie the
        // coordinator fences) from unlinking its replacement's socket file.
        self.endpoint = endpoint ?? "ipc://\(runDirectory)/\(Self.socketDirectoryName)/\(nodeID)-p\(getpid()).smp.sock"
        dataEndpoint = "ipc://\(runDirectory)/\(Self.socketDirectoryName)/\(nodeID)-p\(getpid()).data.sock"
        self.workerCount = workerCount
        self.workerCommand = workerCommand
        self.maxRestarts = maxRestarts
        self.extraEnvironment = extraEnvironment
    }

    /// The directory under the run directory that holds the workers' sockets (mode 0700).
    public static let socketDirectoryName = "sockets"

    /// The default budget: 90% of what /dev/shm has free when the SMP starts
    /// (every registration is also checked against what it has free then).
    public static func defaultMemoryLimit() -> Int {
        guard let space = try? SharedMemorySegment.space() else { return WireLimits.maxBytes }
        return space.free / 10 * 9
    }

    /// Job and node ids go into shared-memory names: keep them to [A-Za-z0-9_-].
    public static func validateID(_ id: String, _ what: String) throws(SMPError) {
        let ok = !id.isEmpty && id.utf8.count <= 48
            && id.utf8.allSatisfy { ($0 >= 48 && $0 <= 57) || ($0 >= 65 && $0 <= 90) || ($0 >= 97 && $0 <= 122) || $0 == 45 || $0 == 95 }
        guard ok else { throw SMPError(.invalidIdentifier, "\(what) '\(id)' must be 1-48 characters of A-Z, a-z, 0-9, '-' or '_'") }
    }
}

/// What stops the SMP from starting or from carrying out a data-plane step.
public typealias SMPError = CodedMessage<SMPErrorCode>

public enum SMPErrorCode: String, Sendable {
    /// A node or worker id outside 1-48 characters of A-Z, a-z, 0-9, '-', '_'.
    case invalidIdentifier = "invalid_identifier"
    /// A node the erasure-coding layout does not place, or whose data endpoint it lacks.
    case notInLayout = "not_in_layout"
    /// An erasure-coding request to an SMP of a job without erasure coding.
    case noErasureCoding = "no_erasure_coding"
    /// A step, or its parity, this SMP does not hold.
    case notHeld = "not_held"
    /// A rebuild's frames or image do not fit what it asked for.
    case rebuildInconsistent = "rebuild_inconsistent"
    /// The run directory is not a directory of the SMP's own uid.
    case unsafeDirectory = "unsafe_directory"
}
