import ArgumentParser
import FTBenchKit
import FTSystem
import Foundation

struct FTBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ft-bench",
        abstract: "Measures the fault-tolerance system against floors measured in the same run.",
        discussion: """
            Each section prints a table, or with --json one object:
            {"section", "machine", "figures", "ratios"}. Figures carry their unit in
            their name; ratios compare the system with a floor (memcpy, raw ISA-L, disk)
            measured in the same run, so they hold on a noisy machine. Build with
            `swift build -c release` before trusting any number.
            """,
        subcommands: [EC.self, Snapshot.self, Detect.self, ECCluster.self])
}

struct OutputOptions: ParsableArguments {
    @Flag(help: "Print one JSON object on stdout instead of a table.")
    var json = false
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
        let report = try bench.run(progress: { line in
            FileHandle.standardError.write(Data("ft-bench ec: \(line)\n".utf8))
        })
        print(output.json ? report.json() : report.text(), terminator: output.json ? "\n" : "")
    }
}

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "One worker's snapshot path into a real SMP vs memcpy: staging, asynchronous blocking, restore.",
        discussion: """
            The SMP runs on a thread of this process and is reached exactly as ft-smp is (ipc://,
            POSIX shared memory). ratios.staging_vs_memcpy, ratios.blocked_vs_copy and
            ratios.restore_vs_memcpy are for the 1 GiB shard; other sizes carry a suffix.
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
    }

    func run() throws {
        var bench = SnapshotBench()
        bench.sizes = try parsedSizes()
        bench.repetitions = repetitions
        bench.asyncSteps = steps
        bench.stepSeconds = stepMs.map { $0 / 1000 }
        let report = try bench.run(progress: { line in
            FileHandle.standardError.write(Data("ft-bench snapshot: \(line)\n".utf8))
        })
        print(output.json ? report.json() : report.text(), terminator: output.json ? "\n" : "")
    }
}

struct Detect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Failure detection latency: worker SIGKILL (reported by its SMP) and SMP SIGSTOP (heartbeat timeout).",
        discussion: """
            Starts real jobs (ft-coordinator, two ft-smp, ft-toy-worker from this binary's directory)
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
        let report = try bench.run(progress: { line in
            FileHandle.standardError.write(Data("ft-bench detect: \(line)\n".utf8))
        })
        print(output.json ? report.json() : report.text(), terminator: output.json ? "\n" : "")
    }
}

struct ECCluster: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ec-cluster",
        abstract: "Erasure coding across real local SMPs: staged-to-committed, parity folding, node repair, against memcpy, raw ISA-L and disk.",
        discussion: """
            Starts real jobs (ft-coordinator, ft-smp, ft-toy-worker from this binary's directory): RS(3+1) on 4 nodes
            and RS(4+2) on 6. ratios.commit_vs_memcpy, ratios.encode_vs_isal and ratios.repair_vs_disk_read
            (cold disk read time over repair time) are for RS(3+1) at 1 GiB per node.
            """)

    @OptionGroup var output: OutputOptions

    @Option(help: "Snapshot sizes per node in MiB, comma-separated.")
    var sizesMib = "256,1024"

    @Option(help: "Largest size tried for RS(4+2) on 6 nodes, in MiB (memory).")
    var maxWideMib = 256

    @Option(help: "Directory of the disk file for the disk floor.")
    var diskDir = "/tmp"

    func run() throws {
        var bench = ECClusterBench(binaries: executableDirectory)
        let sizes = sizesMib.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !sizes.isEmpty, sizes.allSatisfy({ $0 >= 1 && $0 <= 4096 }) else {
            throw ValidationError("--sizes-mib takes sizes in MiB between 1 and 4096")
        }
        bench.sizesMiB = sizes
        bench.maxMiBForWideCodes = maxWideMib
        bench.diskDirectory = diskDir
        let report = try bench.run(progress: { line in
            FileHandle.standardError.write(Data("ft-bench ec-cluster: \(line)\n".utf8))
        })
        print(output.json ? report.json() : report.text(), terminator: output.json ? "\n" : "")
    }
}

FTBench.main()
