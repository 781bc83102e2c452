import ArgumentParser
import FTControl
import FTCore
import FTZMQ
import Foundation

struct FTCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ftctl",
        abstract: "Operate a fault-tolerant training job.",
        subcommands: [Status.self, Keygen.self])
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

FTCtl.main()
