import ArgumentParser
import FTControl
import FTCore
import FTSystem
import FTToy
import FTTraining
import FTWorker
import Foundation

/// A worker for tests and benchmarks of the snapshot path: it trains the
/// deterministic toy state, snapshots every step, and restores from its SMP
/// when it starts after a crash. It prints `restored step=S hash=H` on
/// restore and `final step=N hash=H` at the end.
struct ToyWorker: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ft-toy-worker",
        abstract: "Deterministic toy training loop that snapshots every step (started by ft-smp).",
        discussion: """
            Reads its identity from the FT_* environment ft-smp sets. Test fault injection:
            FT_FAULT_KILL_MID_COPY_STEP=S makes the first incarnation (FT_RESTART_COUNT=0) \
            SIGKILL itself halfway through copying step S into its slot.
            """)

    @Option(help: "Steps to train.")
    var steps = 100

    @Option(help: "Size of each replicated tensor (parameters, moments) in KiB.")
    var stateKib = 1024

    @Option(help: "Simulated compute per step, in milliseconds.")
    var stepMs = 0.0

    @Flag(help: "Register parameters and moments as per-rank (not DP-sliced): each node snapshots all of its state.")
    var noReplicate = false

    func validate() throws {
        guard steps >= 1 else { throw ValidationError("--steps must be at least 1") }
        guard stateKib >= 1 && stateKib <= 16 << 20 else { throw ValidationError("--state-kib must be in 1...16777216") }
        guard stepMs >= 0 else { throw ValidationError("--step-ms must not be negative") }
    }

    func run() throws {
        try? setParentDeathSignal(SIGKILL)  // never outlive the SMP
        let identity: WorkerIdentity
        switch WorkerIdentity.fromEnvironment() {
        case .success(let id): identity = id
        case .failure(let error): throw ValidationError(error.message)
        }
        let client = try SnapshotClient(identity: identity)
        let env = ProcessInfo.processInfo.environment
        // (Under a coordinator, the training loop reads the fault variables itself.)
        if env["FT_COORDINATOR_ENDPOINT"] == nil, identity.restartCount == 0, let s = env["FT_FAULT_KILL_MID_COPY_STEP"].flatMap(Int.init) {
            client.killMidCopyAtStep = s
        }
        let model = ToyModel(elements: stateKib * 256, dpRank: identity.dpRank, replicated: !noReplicate)
        try client.register(model.tensors.map { RegisteredTensor(spec: $0.0, buffer: $0.1) })
        if env["FT_COORDINATOR_ENDPOINT"] != nil {
            let code = try CoordinatedTrainingLoop.runUnderCoordinator(
                model: ToyTrainable(model: model, stepMilliseconds: stepMs), client: client, steps: steps, say: say)
            if code != 0 { throw ExitCode(code) }
            return
        }
        var first = 1
        if let step = try client.restore() {
            say("restored step=\(step) hash=\(model.hash)")
            first = step + 1
        } else {
            say("fresh start")
        }
        if first <= steps {
            for s in first...steps {
                if stepMs > 0 { usleep(UInt32(stepMs * 1000)) }
                try client.waitBeforeUpdate()
                model.apply(step: s)
                try client.snapshot(step: s)
                if s % 50 == 0 {
                    say("step=\(s)")
                            }
            }
        }
        try client.waitForRound()
        let stats = client.stats
        say("final step=\(model.step) hash=\(model.hash) staged=\(stats.snapshotsStaged) skipped=\(stats.snapshotsSkipped)")
    }
}

/// Writes a line to stdout at once (the SMP's log file is read while we run).
func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

ToyWorker.main()
