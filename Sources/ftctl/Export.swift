import ArgumentParser
import FTPersist
import Foundation

struct ExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Export a persisted step's tensors to a safetensors file (and FILE.json beside it).",
        discussion: """
            Reads the step (default: the newest durable step) from a persist directory, every node's part \
            (a damaged part is decoded from its EC group's parity), checks every chunk against its CRC32C, \
            and writes every tensor whole to FILE: a replicated tensor (stored as one slice per DP rank) \
            under its own name, its slices joined in rank order; a per-rank tensor (RNG state, counters) \
            once per DP rank as NAME@rankR. __metadata__ holds step, job, format (pt), producer and \
            dp_size. FILE.json gives the step, the job id, the persist directory, the nodes (and which \
            were decoded), and per tensor its role, dtype, shape and bytes. Both files are written to a \
            temporary name, fsynced and renamed: a reader never sees half a file. Progress per node goes \
            to standard error for exports of 64 MiB or more (never with --quiet). On failure nothing is \
            written, ftctl prints one line (the error's code and why) and exits 1.
            Example: ftctl export --from /data/ft-persist --out model.safetensors
            Then in Python: from safetensors.numpy import load_file; load_file("model.safetensors")
            """)

    @Option(name: .customLong("from"), help: ArgumentHelp("The persist directory (holds step-NNNNNNNNNNNN/NODE/ parts).", valueName: "dir"))
    var from: String

    @Option(help: "The step to export (default: the newest durable step).")
    var step: Int?

    @Option(help: ArgumentHelp("The safetensors file to write; its metadata goes to FILE.json.", valueName: "file.safetensors"))
    var out: String

    @Flag(help: "No progress on standard error.")
    var quiet = false

    static let progressThreshold = 64 << 20

    func validate() throws {
        if let step, step < 0 { throw ValidationError("--step must be 0 or more") }
        guard !out.isEmpty, !out.hasSuffix("/") else { throw ValidationError("--out must name a file") }
    }

    func run() throws {
        var exporter = SafetensorsExporter(root: from)
        var large = false
        let quiet = quiet
        exporter.progress = { event in
            guard !quiet else { return }
            switch event {
            case .plan(let step, let job, let nodes, let imageBytes, let tensors, let tensorBytes):
                large = imageBytes >= Self.progressThreshold
                if large {
                    stderr("export: step \(step) of job \(job): \(nodes.count) node\(nodes.count == 1 ? "" : "s"), \(formatBytes(imageBytes)) to read, \(tensors) tensors of \(formatBytes(tensorBytes))")
                }
            case .nodeStarted:
                break
            case .nodeDone(let node, let index, let count, let imageBytes, let seconds, let decoded):
                if large {
                    let rate = seconds > 0 ? ", \(formatBytes(Int(Double(imageBytes) / seconds)))/s" : ""
                    stderr("export: [\(index + 1)/\(count)] \(node): \(formatBytes(imageBytes)) in \(String(format: "%.1f", seconds)) s\(rate)\(decoded ? " (decoded from parity)" : "")")
                }
            case .note(let line):
                stderr("export: \(line)")
            }
        }
        let summary: ExportSummary
        do {
            summary = try exporter.export(step: step, to: out)
        } catch {
            throw CommandFailure("\(error.codeName): \(error.message)")
        }
        let tensors = summary.tensors.count
        var line = "wrote \(summary.output): step \(summary.step) of job \(summary.job), \(tensors) tensor\(tensors == 1 ? "" : "s"), "
            + "\(summary.tensorBytes) bytes of tensor data (\(summary.fileBytes) bytes in all) from \(summary.nodes.count) node\(summary.nodes.count == 1 ? "" : "s")"
        if !summary.decodedNodes.isEmpty { line += " (\(summary.decodedNodes.joined(separator: ", ")) decoded from parity)" }
        print(line)
        print("wrote \(summary.metadataFile)")
    }
}

private func stderr(_ line: String) {
    FileHandle.standardError.write(Data((line + "\n").utf8))
}

/// 1536 -> "1.5 KiB".
func formatBytes(_ n: Int) -> String {
    let units = ["bytes", "KiB", "MiB", "GiB", "TiB"]
    var value = Double(n), unit = 0
    while value >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
    return unit == 0 ? "\(n) bytes" : String(format: "%.1f ", value) + units[unit]
}
