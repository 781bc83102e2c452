import ArgumentParser
import FTControl
import FTDemo
import FTSystem
import FTToy
import FTTraining
import FTWorker
import Foundation

struct DemoTrainer: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ft-demo-trainer",
        abstract: "The built-in workload: a character-level language model trained data-parallel with AdamW.",
        discussion: """
            Started by ft-smp under a coordinator (the FT_* environment), every rank trains on its \
            own batches, gradients are summed over a deterministic ring, and the full state \
            (parameters and Adam moments as DP-sliced replicated tensors, per-rank RNG and data \
            position) goes through the snapshot store, so a recovered run equals an \
            uninterrupted one bit for bit. It prints `step=S loss=L hash=H` every --report-every \
            steps and `final step=N hash=H` at the end.

            Without the FT_* environment it trains alone, without snapshots (to look at the \
            loss curve): ft-demo-trainer --steps 500

            --synthetic replaces the model by --state-mb of model-like state rewritten every \
            step after --step-ms of simulated compute, to measure snapshot and recovery costs \
            of large states.
            """)

    @Option(help: "Steps to train.")
    var steps = 1000

    @Option(help: "A UTF-8 text file to train on (default: the built-in corpus).")
    var corpus: String?

    @Option(help: "Print loss and parameter hash every this many steps.")
    var reportEvery = 50

    @Option(help: "Examples per rank per step.")
    var batch = 64

    @Option(help: "Hidden units.")
    var hidden = 256

    @Option(help: "Characters of context.")
    var context = 16

    @Option(help: "AdamW learning rate.")
    var lr: Float = 3e-3

    @Option(help: "Seed of the initial parameters and of the per-rank RNGs.")
    var seed: UInt64 = 1234

    @Option(help: "After training alone, print this many greedily sampled characters.")
    var sample = 0

    @Flag(help: "Synthetic mode: --state-mb of state, --step-ms of compute per step.")
    var synthetic = false

    @Option(help: "Synthetic mode: MiB of state per worker (parameters + optimizer state).")
    var stateMb = 64

    @Option(help: "Synthetic mode: simulated compute per step in milliseconds.")
    var stepMs = 10.0

    func validate() throws {
        guard steps >= 1 else { throw ValidationError("--steps must be at least 1") }
        guard reportEvery >= 1 else { throw ValidationError("--report-every must be at least 1") }
        guard batch >= 1, hidden >= 1, context >= 1 else { throw ValidationError("--batch, --hidden and --context must be at least 1") }
        guard lr > 0 else { throw ValidationError("--lr must be positive") }
        guard stateMb >= 1, stepMs >= 0 else { throw ValidationError("--state-mb must be at least 1 and --step-ms not negative") }
        if let corpus, !FileManager.default.isReadableFile(atPath: corpus) { throw ValidationError("cannot read --corpus \(corpus)") }
    }

    /// `initialized: false`: under a coordinator, which says before any step
    /// whether to start fresh (the loop resets the model) or restore.
    func makeModel(rank: Int, worldSize: Int, initialized: Bool = true) throws -> Trainable {
        if synthetic {
            return ToyTrainable(model: ToyModel(elements: stateMb << 17, dpRank: rank, initialized: initialized),
                                stepMilliseconds: stepMs, reportEvery: reportEvery)
        }
        var config = CharLM.Config()
        config.batch = batch
        config.hidden = hidden
        config.context = context
        config.learningRate = lr
        config.seed = seed
        config.reportEvery = reportEvery
        let text = try corpus.map { try Corpus(file: $0) } ?? Corpus.builtIn()
        return CharLM(config: config, corpus: text, rank: rank, worldSize: worldSize)
    }

    func run() throws {
        try? setParentDeathSignal(SIGKILL)
        guard case .success(let identity) = WorkerIdentity.fromEnvironment() else {
            try runAlone()
            return
        }
        guard ProcessInfo.processInfo.environment["FT_COORDINATOR_ENDPOINT"] != nil else {
            throw ValidationError("started by ft-smp without a coordinator: data-parallel training needs one (ft-smp --coordinator)")
        }
        let model = try makeModel(rank: identity.dpRank, worldSize: identity.dpSize, initialized: false)
        if let lm = model as? CharLM {
            say("model: char MLP, \(lm.parameterCount) parameters, state \(lm.stateBytes) bytes per worker before DP slicing; rank \(identity.dpRank) of \(identity.dpSize)")
        }
        let client = try SnapshotClient(identity: identity)
        try client.register(model.tensors)
        let code = try CoordinatedTrainingLoop.runUnderCoordinator(model: model, client: client, steps: steps, say: say)
        if code != 0 { throw ExitCode(code) }
    }

    /// Alone: no SMP, no snapshots, a ring of one.
    func runAlone() throws {
        let model = try makeModel(rank: 0, worldSize: 1)
        let ring = try RingCollective(rank: 0, worldSize: 1)
        try ring.connect(peers: [ring.endpoint], epoch: 1)
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw SystemError("pipe", errno: errno) }
        if let lm = model as? CharLM {
            say("model: char MLP, \(lm.parameterCount) parameters, vocabulary \(lm.corpus.vocabulary.count), corpus \(lm.corpus.tokens.count) characters (alone, no snapshots)")
        }
        let start = monotonicSeconds()
        for s in 1...steps {
            try model.computeGradients(step: s, collective: ring, interrupt: fds[0])
            model.applyUpdate(step: s)
            if let line = model.report(step: s) { say(line) }
        }
        let seconds = monotonicSeconds() - start
        say("final step=\(model.step) hash=\(model.hash) step_ms=\(String(format: "%.2f", seconds / Double(steps) * 1000))")
        if sample > 0, let lm = model as? CharLM { say("sample: " + lm.sample(prompt: "The coordinator ", count: sample).replacingOccurrences(of: "\n", with: " / ")) }
    }
}

func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

DemoTrainer.main()
