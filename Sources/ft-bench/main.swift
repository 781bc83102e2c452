import ArgumentParser
import FTBenchKit
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
        subcommands: [EC.self])
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

FTBench.main()
