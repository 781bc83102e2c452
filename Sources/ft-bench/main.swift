import ArgumentParser
import FTBenchKit
import FTSystem
import Foundation

struct FTBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ft-bench",
        abstract: "Measures the fault-tolerance system against floors measured in the same run.",
        discussion: """
            Each section prints a table, or with --json one object: \
            {"section", "machine", "figures", "ratios"}. Figures carry their unit in \
            their name; ratios compare the system with a floor (memcpy, raw ISA-L, disk) \
            measured in the same run, so they hold on a noisy machine. Build with \
            `swift build -c release` before trusting any number.
            """,
        subcommands: [EC.self, Snapshot.self, Detect.self, ECCluster.self, Rounds.self, Torch.self, Persist.self, TCPStream.self])
}

struct OutputOptions: ParsableArguments {
    @Flag(help: "Print one JSON object on stdout instead of a table.")
    var json = false

    /// Runs a bench (its progress lines go to stderr) and prints its report.
    func emit(_ section: String, _ run: (_ progress: @escaping (String) -> Void) throws -> BenchReport) throws {
        let report = try run { line in FileHandle.standardError.write(Data("ft-bench \(section): \(line)\n".utf8)) }
        print(json ? report.json() : report.text(), terminator: json ? "\n" : "")
    }
}

struct EC: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Reed-Solomon encode and reconstruct: the codec vs raw ISA-L calls vs memcpy.",
        discussion: "Codes RS(4+2), RS(8+2), RS(3+1). ratios.encode_vs_isal and ratios.reconstruct_vs_isal are the lowest over the codes.")

    @OptionGroup var output: OutputOptions

    @Option(help: "Chunk size in MiB.")
    var chunkMib = 4

    @Option(help: "Timed repetitions per measurement (the median is reported).")
    var repetitions = 20

    func validate() throws {
        guard chunkMib >= 1 && chunkMib <= 256 else { throw ValidationError("--chunk-mib must be in 1...256") }
        guard repetitions >= 1 else { throw ValidationError("--repetitions must be at least 1") }
    }

    func run() throws {
        var bench = ECBench()
        bench.chunkBytes = chunkMib << 20
        bench.repetitions = repetitions
        try output.emit("ec") { try bench.run(progress: $0) }
    }
}

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "One worker's snapshot path into a real SMP vs memcpy: staging, asynchronous blocking, restore.",
        discussion: """
            The SMP runs on a thread of this process and is reached exactly as ft-smp is (ipc://, \
            POSIX shared memory). ratios.staging_vs_memcpy, ratios.blocked_vs_copy and \
            ratios.restore_vs_memcpy are for the 1 GiB shard; other sizes carry a suffix.
            --client python adds ratios.python_blocked_vs_copy and ratios.python_staging_vs_swift.
            """)

    @OptionGroup var output: OutputOptions

    @Option(help: "Shard sizes in MiB, comma-separated.")
    var sizesMib = "256,1024"

    @Option(help: "Simulated compute per step in ms for the asynchronous loop (default: 1.5 x the staging time).")
    var stepMs: Double?

    @Option(help: "Timed repetitions of staging and restore (the median is reported).")
    var repetitions = 5

    @Option(help: "Steps of the asynchronous loop.")
    var steps = 8

    @Option(help: "swift: the Swift worker library only; python: also the same shard through ft_torch (python/bench/snapshot_client.py), in the same run.")
    var client = "swift"

    @Option(help: "The Python interpreter for --client python.")
    var python = "python3"

    func parsedSizes() throws -> [Int] {
        let parts = sizesMib.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !parts.isEmpty, parts.allSatisfy({ $0 != nil && $0! >= 1 && $0! <= 8192 }) else {
            throw ValidationError("--sizes-mib takes sizes in MiB between 1 and 8192, e.g. 256,1024")
        }
        return parts.map { $0! << 20 }
    }

    func validate() throws {
        _ = try parsedSizes()
        guard repetitions >= 1, steps >= 1 else { throw ValidationError("--repetitions and --steps must be at least 1") }
        if let stepMs, stepMs < 0 { throw ValidationError("--step-ms must not be negative") }
        guard ["swift", "python"].contains(client) else { throw ValidationError("--client is swift or python, not '\(client)'") }
        if client == "python" { _ = try pythonClient() }
    }

    func pythonClient() throws -> (interpreter: String, script: String) {
        guard let script = repositoryFile("python/bench/snapshot_client.py") else {
            throw ValidationError("python/bench/snapshot_client.py not found above \(executableDirectory)")
        }
        guard let interpreter = ChildProcess.resolve(python) else { throw ValidationError("\(python) not found in PATH") }
        return (interpreter, script)
    }

    func run() throws {
        var bench = SnapshotBench()
        bench.sizes = try parsedSizes()
        bench.repetitions = repetitions
        bench.asyncSteps = steps
        bench.stepSeconds = stepMs.map { $0 / 1000 }
        if client == "python" { bench.python = try pythonClient() }
        try output.emit("snapshot") { try bench.run(progress: $0) }
    }
}

struct Rounds: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The cost of a snapshot every step for a small state: per-round commit latency and step time vs snapshots off.",
        discussion: """
            ft-demo-trainer with synthetic state on 4 nodes x 2 workers, three ways in one run: snapshots off, a \
            snapshot every step without erasure coding, and with RS(3+1). figures.commit_ms_p50/p99: each SMP's \
            time from all its workers staged to the commit (RS(3+1) job); ratios.step_every1_*_vs_off.
            """)

    @OptionGroup var output: OutputOptions

    @Option(help: "Steps per job.")
    var steps = 600

    @Option(help: "Simulated compute per step in ms.")
    var stepMs = 10.0

    @Option(help: "Synthetic state per worker in MiB.")
    var stateMb = 1

    func validate() throws {
        guard steps >= 100 else { throw ValidationError("--steps must be at least 100") }
        guard stepMs >= 0, stateMb >= 1 else { throw ValidationError("--step-ms must not be negative, --state-mb at least 1") }
    }

    func run() throws {
        var bench = RoundsBench(binaries: executableDirectory)
        bench.steps = steps
        bench.stepMs = stepMs
        bench.stateMB = stateMb
        try output.emit("rounds") { try bench.run(progress: $0) }
    }
}

struct Torch: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The GPT example (python/examples/gpt.py) as a protected job: the cost of snapshots, and a recovery by phase.",
        discussion: """
            4 nodes x 1 worker, RS(3+1), DDP over gloo on CPU. For each model size and interval N, one job whose \
            blocks of steps take turns without snapshots and with a snapshot every N steps (ratios.step_everyN_vs_off_MODEL: \
            wall time per step with over without); then a job that loses node n1 midway: figures.recovery_* (the coordinator's phases) \
            and figures.restart_* (the restart phase split by the workers' timestamps, the process-group rebuild \
            among them), and figures.recovered_hash_equal (1: bit-exact with the uninterrupted run).
            """)

    @OptionGroup var output: OutputOptions

    @Option(help: "Steps per job.")
    var steps = 200

    @Option(help: "Snapshot intervals to measure, comma-separated.")
    var intervals = "1,10"

    @Option(help: "Steps per block of the alternating runs (without, then with snapshots).")
    var block = 25

    @Flag(help: "Only the default model (skip the larger one).")
    var baseOnly = false

    @Flag(help: "Skip the recovery run.")
    var noRecovery = false

    @Flag(help: "Only the recovery run (and the one uninterrupted run its reference hash comes from).")
    var recoveryOnly = false

    @Option(help: "The Python interpreter.")
    var python = "python3"

    func validate() throws {
        guard steps >= 20 else { throw ValidationError("--steps must be at least 20") }
        guard block >= 2, steps >= 4 * block else { throw ValidationError("--block must be at least 2 and --steps at least 4 blocks") }
        guard !(noRecovery && recoveryOnly) else { throw ValidationError("give at most one of --no-recovery and --recovery-only") }
        guard !parsedIntervals.isEmpty, parsedIntervals.allSatisfy({ $0 >= 1 }) else { throw ValidationError("--intervals takes positive integers, e.g. 1,10") }
        guard repositoryFile("python/examples/gpt.py") != nil else { throw ValidationError("python/examples/gpt.py not found above \(executableDirectory)") }
        guard ChildProcess.resolve(python) != nil else { throw ValidationError("\(python) not found in PATH") }
    }

    var parsedIntervals: [Int] { intervals.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) } }

    func run() throws {
        var bench = TorchBench(binaries: executableDirectory, python: ChildProcess.resolve(python)!, script: repositoryFile("python/examples/gpt.py")!)
        bench.steps = steps
        bench.intervals = parsedIntervals
        bench.recovery = !noRecovery
        bench.block = block
        if recoveryOnly { bench.intervals = [1]; bench.models = Array(bench.models.prefix(1)) }
        if baseOnly { bench.models = Array(bench.models.prefix(1)) }
        try output.emit("torch") { try bench.run(progress: $0) }
    }
}

struct Detect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Failure detection latency: worker SIGKILL (reported by its SMP) and SMP SIGSTOP (heartbeat timeout).",
        discussion: """
            Starts real jobs (ft-coordinator, two ft-smp, ft-toy-worker from this binary's directory) \
            on loopback. figures.detect_sigkill_ms_p50/p99 and figures.detect_sigstop_ms_p50/p99.
            """)

    @OptionGroup var output: OutputOptions

    @Option(help: "SIGKILL trials.")
    var killTrials = 10

    @Option(help: "SIGSTOP trials (each starts a fresh job: a stopped SMP without erasure coding ends it).")
    var stopTrials = 5

    func validate() throws {
        guard killTrials >= 1, stopTrials >= 1 else { throw ValidationError("trials must be at least 1") }
    }

    func run() throws {
        var bench = DetectBench(binaries: executableDirectory)
        bench.killTrials = killTrials
        bench.stopTrials = stopTrials
        try output.emit("detect") { try bench.run(progress: $0) }
    }
}

struct ECCluster: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ec-cluster",
        abstract: "Erasure coding across real local SMPs: staged-to-committed, parity folding, node repair, against memcpy, raw ISA-L and disk.",
        discussion: """
            Starts real jobs (ft-coordinator, ft-smp, ft-toy-worker from this binary's directory): RS(3+1) on 4 nodes \
            and RS(4+2) on 6. ratios.commit_vs_memcpy, ratios.encode_vs_isal and ratios.repair_vs_disk_read \
            (cold disk read time over repair time) are for RS(3+1) at 1 GiB per node. \
            --hosts netns puts every node on a network namespace of its own (data planes on TCP with CURVE) and \
            measures the transport ceiling between such hosts in the same run: the round's and the rebuild's streams \
            over plain TCP, one process per node; ratios.commit_vs_transport and ratios.rebuild_vs_transport are the \
            ceiling's time for the bytes over the system's (RS(3+1), 1 GiB per node).
            """)

    @OptionGroup var output: OutputOptions

    @Option(help: "Snapshot sizes per node in MiB, comma-separated.")
    var sizesMib = "256,1024"

    @Option(help: "Largest size tried for RS(4+2) on 6 nodes, in MiB (memory).")
    var maxWideMib = 256

    @Option(help: "Directory of the disk file for the disk floor.")
    var diskDir = "/tmp"

    @Option(help: ArgumentHelp("SMP data planes on tcp://ADDRESS:* with CURVE (as on separate hosts) instead of ipc; adds the floor of one CURVE stream over that address.", valueName: "address"))
    var dataHost: String?

    @Option(help: ArgumentHelp("local: every process on this host; netns: each node and the coordinator on a network namespace of its own (needs root), with the transport ceiling between them.", valueName: "local|netns"))
    var hosts = "local"

    @Option(help: "Codes to run, comma-separated K+M (RS(3+1) on 4 nodes, RS(4+2) on 6).")
    var codes = "3+1,4+2"

    func parsedCodes() throws -> [(k: Int, m: Int)] {
        let parsed = codes.split(separator: ",").map { c -> (k: Int, m: Int)? in
            let p = c.trimmingCharacters(in: .whitespaces).split(separator: "+").compactMap { Int($0) }
            return p.count == 2 && p[0] >= 1 && p[1] >= 1 && p[0] + p[1] <= 16 ? (p[0], p[1]) : nil
        }
        guard !parsed.isEmpty, parsed.allSatisfy({ $0 != nil }) else { throw ValidationError("--codes takes K+M codes, e.g. 3+1,4+2") }
        return parsed.map { $0! }
    }

    func validate() throws {
        _ = try parsedCodes()
        guard let h = ECClusterBench.Hosts(rawValue: hosts) else { throw ValidationError("--hosts is local or netns, not '\(hosts)'") }
        if h == .netns {
            if let reason = ECClusterBench.netnsUnavailableReason { throw ValidationError("--hosts netns cannot run here: \(reason)") }
            if dataHost != nil { throw ValidationError("--hosts netns puts each data plane on its host's address: give no --data-host") }
        }
    }

    func run() throws {
        var bench = ECClusterBench(binaries: executableDirectory)
        bench.dataHost = dataHost
        bench.hosts = ECClusterBench.Hosts(rawValue: hosts)!
        bench.codes = try parsedCodes()
        let sizes = sizesMib.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !sizes.isEmpty, sizes.allSatisfy({ $0 >= 1 && $0 <= 4096 }) else {
            throw ValidationError("--sizes-mib takes sizes in MiB between 1 and 4096")
        }
        bench.sizesMiB = sizes
        bench.maxMiBForWideCodes = maxWideMib
        bench.diskDirectory = diskDir
        try output.emit("ec-cluster") { try bench.run(progress: $0) }
    }
}

struct Persist: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The persistent tier: PartWriter and ImageLoader against raw disk writes and reads, and training blocked while a persist runs.",
        discussion: """
            One node's part (an image of --size-mib and the parity chunk of an RS(3+1) node, image/3) in a temporary \
            directory under --dir (removed at the end). ratios.persist_vs_disk_write: PartWriter's throughput over a raw \
            sequential write + fsync of the same bytes in the same directory; ratios.disk_restore_vs_read: ImageLoader.load \
            over a raw read, both with the file evicted from the page cache; ratios.blocked_vs_copy_while_persisting: the \
            time a training loop (in-process SMP, a shard of the image's size) blocks per snapshot while a PartWriter writes \
            a part of that size on another thread, over the copy time of one snapshot. Medians of --repeats.
            """)

    @OptionGroup var output: OutputOptions

    @Option(help: "Node image size in MiB.")
    var sizeMib = 1024

    @Option(help: "Directory (on the filesystem to measure) in which a temporary directory is made and removed.")
    var dir = "/tmp"

    @Option(help: "Timed repetitions of each measurement (the median is reported).")
    var repeats = 5

    @Option(help: "Steps of the training loop without a persist.")
    var steps = 8

    @Option(help: "Simulated compute per training step in ms (default: 1.5 x the snapshot's copy time).")
    var stepMs: Double?

    @Flag(help: "Do not write and delete a ballast file of the same size before each timed write or read (on a VM that returns free memory to its host, page-cache allocation then runs at the host's fault rate).")
    var noBallast = false

    func validate() throws {
        guard sizeMib >= 1 && sizeMib <= 8192 else { throw ValidationError("--size-mib must be in 1...8192") }
        guard repeats >= 1, steps >= 1 else { throw ValidationError("--repeats and --steps must be at least 1") }
        if let stepMs, stepMs < 0 { throw ValidationError("--step-ms must not be negative") }
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: dir, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw ValidationError("--dir \(dir) is not a directory")
        }
    }

    func run() throws {
        var bench = PersistBench()
        bench.imageBytes = sizeMib << 20
        bench.directory = dir.count > 1 && dir.hasSuffix("/") ? String(dir.dropLast()) : dir
        bench.repeats = repeats
        bench.asyncSteps = steps
        bench.stepSeconds = stepMs.map { $0 / 1000 }
        bench.warmPageCacheMemory = !noBallast
        try output.emit("persist") { try bench.run(progress: $0) }
    }
}

/// One node of the transport ceiling of `ec-cluster --hosts netns`
/// (`TransportCeiling`), started by it in a node's namespace.
struct TCPStream: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tcp-stream",
        abstract: "One node of ec-cluster's raw TCP ceiling (started by ec-cluster --hosts netns).",
        shouldDisplay: false)

    @Option(help: ArgumentHelp("Listen on ADDRESS:PORT.", valueName: "address:port"))
    var listen: String?

    @Option(help: "Connections to accept, each read to its end.")
    var accept = 0

    @Option(help: ArgumentHelp("Send BYTES to ADDRESS:PORT (repeatable).", valueName: "address:port:bytes"))
    var send: [String] = []

    @Option(help: "File to create once listening and connected.")
    var ready: String

    @Option(help: "File whose appearance starts the sending.")
    var go: String

    func run() throws {
        var node = TCPStreamNode(readyPath: ready, goPath: go)
        if let listen {
            let parts = listen.split(separator: ":")
            guard parts.count == 2, let port = Int(parts[1]) else { throw ValidationError("--listen takes ADDRESS:PORT") }
            node.listen = (String(parts[0]), port)
        }
        node.accept = accept
        node.sends = try send.map { s in
            guard let t = TCPStreamNode.Target(s) else { throw ValidationError("--send takes ADDRESS:PORT:BYTES, not '\(s)'") }
            return t
        }
        print(try node.run())
    }
}

FTBench.main()
