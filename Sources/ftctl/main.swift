import ArgumentParser
import FTControl
import FTCore
import FTSystem
import FTZMQ
import Foundation

struct FTCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ftctl",
        abstract: "Operate a fault-tolerant training job.",
        subcommands: [Status.self, Events.self, TimelineCommand.self, Keygen.self, ExportCommand.self])
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the job: state, epoch, committed step, nodes, workers, the last failure and its recovery.",
        discussion: """
            Asks the coordinator (--endpoint, or RUN_DIR/coordinator.endpoint with --run-dir).
            --json prints one object of schema 1 (see the README, "ftctl status"). If the \
            coordinator does not answer within --timeout, ftctl says so and exits 2.
            """)

    @Option(help: "Coordinator endpoint, e.g. tcp://127.0.0.1:5555.")
    var endpoint: String?

    @Option(help: "Job run directory (reads coordinator.endpoint; keys from RUN_DIR/keys unless --keys).")
    var runDir: String?

    @Option(help: "Directory with the job's CURVE keys (coordinator.pub, operator.key: the read-only key; default RUN_DIR/keys).")
    var keys: String?

    @Flag(help: "Print one JSON object (schema 1) instead of a table.")
    var json = false

    @Flag(help: "Refresh in place every --interval seconds until interrupted.")
    var watch = false

    @Option(help: "Seconds to wait for the coordinator's answer.")
    var timeout = 2.0

    @Option(help: "Seconds between refreshes with --watch.")
    var interval = 1.0

    func validate() throws {
        guard endpoint != nil || runDir != nil else { throw ValidationError("give --endpoint or --run-dir") }
        guard timeout > 0 && timeout <= 600 else { throw ValidationError("--timeout must be in (0, 600] seconds") }
        guard interval >= 0.1 else { throw ValidationError("--interval must be at least 0.1 seconds") }
        if json && watch { throw ValidationError("--json and --watch do not go together") }
    }

    func run() throws {
        let target: String
        if let endpoint {
            target = endpoint
        } else {
            let path = runDir! + "/coordinator.endpoint"
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
                throw ValidationError("no coordinator endpoint at \(path) (is the job running there?)")
            }
            target = text.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        var keyDir = keys
        if keyDir == nil, let runDir, FileManager.default.fileExists(atPath: runDir + "/keys/operator.key") { keyDir = runDir + "/keys" }
        let jobKeys = try keyDir.map { try JobKeys.load(from: $0, role: .operator) }
        let context = try ZMQContext()
        repeat {
            let socket = try context.socket(.dealer, maxMessageBytes: ControlMessage.maxFrameBytes)
            try socket.setLinger(milliseconds: 0)
            if let jobKeys { try socket.makeCurveClient(serverKey: jobKeys.serverPublicKey, keys: jobKeys.member) }
            try socket.connect(target)
            try socket.send([ControlMessage.statusQuery.envelope(sender: "ftctl", epoch: 0).encoded()], dontWait: true)
            let reply = try socket.receive(timeoutMilliseconds: Int(timeout * 1000))
            socket.close()
            guard let frame = reply?.first, case .statusReply(let answer)? = try? ControlMessage.decode(frame).0 else {
                FileHandle.standardError.write(Data("ftctl: no answer from the coordinator at \(target) within \(timeout) s (is it running? are the keys right?)\n".utf8))
                throw ExitCode(2)
            }
            // The spares are the launcher's: from the run directory.
            let text = runDir.map { StatusTable.adding(spares: StatusTable.spares(runDirectory: $0), to: answer) } ?? answer
            if json {
                print(text)
            } else {
                // Unbuffered: with --watch each refresh must reach a pipe or a file at once.
                let table = StatusTable.render(json: text)
                FileHandle.standardOutput.write(Data(((watch ? "\u{1B}[H\u{1B}[2J" : "") + table).utf8))
            }
            if watch { usleep(UInt32(interval * 1_000_000)) }
        } while watch
    }
}

struct Keygen: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate a job's CURVE keys into a directory (coordinator.key, coordinator.pub, smp.key, smp.pub, worker.key, the read-only operator.key, and smp-NODE.key/.pub per --node; mode 0600).")

    @Argument(help: "The directory to create or fill.")
    var directory: String

    @Option(help: ArgumentHelp("A node of the job (repeatable): its SMP gets a key of its own (smp-NODE.key, smp-NODE.pub) and may then speak only for that node; the shared smp.key is then only what SMP data endpoints serve with.", valueName: "node-id"))
    var node: [String] = []

    func run() throws {
        try JobKeys.generate(in: directory, nodes: node)
        print("keys written to \(directory)")
    }
}

/// A failure of a command, said in one sentence (ArgumentParser prints `Error: …` and exits 1).
struct CommandFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The text of RUN_DIR/events.jsonl, or an error that says which of the two is missing.
func eventLogText(runDirectory: String) throws -> String {
    var isDirectory: ObjCBool = false
    guard FileManager.default.fileExists(atPath: runDirectory, isDirectory: &isDirectory), isDirectory.boolValue else {
        throw CommandFailure("no run directory at \(runDirectory)")
    }
    let path = EventLog.path(runDirectory: runDirectory)
    guard FileManager.default.fileExists(atPath: path) else {
        throw CommandFailure("no event log at \(path) (the coordinator writes it from its start; did a job run in \(runDirectory)?)")
    }
    do {
        return try String(contentsOfFile: path, encoding: .utf8)
    } catch {
        throw CommandFailure("cannot read \(path): \(error.localizedDescription)")
    }
}

func skippedNote(_ skipped: Int) -> String {
    "\(skipped) line\(skipped == 1 ? "" : "s") skipped: torn (a crash while writing) or not an event"
}

struct Events: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print a job's event log (RUN_DIR/events.jsonl), one line an event.",
        discussion: """
            Each line: the UTC time to the millisecond, the epoch, the kind (coordinator_up, start, commit, \
            abort, failure, phase, resumed, member, fenced, stopped) and the fields the event sets, e.g.
              2026-12-03T10:00:01.234Z  e3   commit          step 12
              2026-12-03T10:00:01.900Z  e3   failure         smp n1 (...)  committed 12
            Commits are sampled (at most one a second). Lines that do not parse (a line torn by a crash) \
            are skipped and counted at the end. --json prints the lines that parse as they are in the file \
            (the count of skipped lines goes to standard error). Works on a running or an ended job.
            """)

    @Argument(help: "The job's run directory (holds events.jsonl).")
    var runDir: String

    @Flag(help: "Print the raw JSON lines instead.")
    var json = false

    func run() throws {
        let lines = EventLog.lines(try eventLogText(runDirectory: runDir))
        let skipped = lines.count { $0.event == nil }
        var out = ""
        for (line, event) in lines {
            guard let event else { continue }
            out += (json ? String(line) : EventLog.describe(event)) + "\n"
        }
        FileHandle.standardOutput.write(Data(out.utf8))
        guard skipped > 0 else { return }
        if json {
            FileHandle.standardError.write(Data("ftctl: \(skippedNote(skipped))\n".utf8))
        } else {
            print("(\(skippedNote(skipped)))")
        }
    }
}

struct TimelineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "timeline",
        abstract: "Draw a job's life from its event log as an SVG picture (and a PNG with --png).",
        discussion: """
            Reads RUN_DIR/events.jsonl and draws, on one time axis (seconds since the first event): the \
            committed step, each sampled commit, each failure (what failed), each recovery split into its \
            phases (detect, plan, rebuild, restart, resume), a lane per node with its processes (pids; a \
            failed one ends in a cross, a replacement starts where it took over), and where a coordinator \
            started again; under the axis, the recoveries side by side to one scale. The header gives the \
            job, the number of failures and the whole time. The SVG is standalone (about 1200 pixels wide); \
            hovering a mark in a browser shows its details. --png needs rsvg-convert (Debian package \
            librsvg2-bin; scripts/setup.sh installs it).
            Example: ftctl timeline /tmp/job -o job.svg --png job.png
            """)

    @Argument(help: "The job's run directory (holds events.jsonl).")
    var runDir: String

    @Option(name: [.customShort("o"), .long], help: ArgumentHelp("Where to write the SVG (default: RUN_DIR/timeline.svg).", valueName: "file.svg"))
    var output: String?

    @Option(help: ArgumentHelp("Also write a PNG of the picture here (converted by rsvg-convert).", valueName: "file.png"))
    var png: String?

    @Option(help: "The title in the picture's header (default: the job id from RUN_DIR/job.id, else the directory's name).")
    var title: String?

    func run() throws {
        let converter = ChildProcess.resolve("rsvg-convert")
        if png != nil && converter == nil {
            throw CommandFailure("--png needs rsvg-convert, which is not installed (Debian: apt-get install librsvg2-bin, or scripts/setup.sh); the SVG alone needs nothing")
        }
        let (events, skipped) = EventLog.parse(try eventLogText(runDirectory: runDir))
        let jobID = (try? String(contentsOfFile: runDir + "/job.id", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
        let name = title ?? jobID.flatMap { $0.isEmpty ? nil : "job \($0)" } ?? URL(fileURLWithPath: runDir).standardizedFileURL.lastPathComponent
        let svgPath = output ?? runDir + "/timeline.svg"
        do {
            try Timeline.svg(events, title: name).write(toFile: svgPath, atomically: true, encoding: .utf8)
        } catch {
            throw CommandFailure("cannot write \(svgPath): \(error.localizedDescription)")
        }
        let failures = events.count { $0.kind == .failure }
        print("wrote \(svgPath): \(events.count) event\(events.count == 1 ? "" : "s"), \(failures) failure\(failures == 1 ? "" : "s")"
              + (skipped > 0 ? " (\(skippedNote(skipped)))" : ""))
        if let png, let converter { try convert(svgPath, to: png, with: converter) }
    }

    func convert(_ svg: String, to png: String, with converter: String) throws {
        let log = NSTemporaryDirectory() + "/ftctl-rsvg-\(getpid()).log"
        defer { unlink(log) }
        let child = try ChildProcess(arguments: [converter, "--background-color", "white", "-o", png, svg],
                                     environment: ProcessInfo.processInfo.environment, outputPath: log)
        guard let status = child.wait(timeoutSeconds: 120) else {
            child.kill(SIGKILL)
            child.wait(timeoutSeconds: 5)
            throw CommandFailure("rsvg-convert did not finish within 120 s")
        }
        guard status.isSuccess else {
            let said = ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
            throw CommandFailure("rsvg-convert failed (\(status)) converting \(svg) to \(png)\(said.isEmpty ? "" : ": " + said)")
        }
        print("wrote \(png)")
    }
}

FTCtl.main()
