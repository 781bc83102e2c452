import FTControl
import FTCore
import FTWorker
import Foundation

/// What a training workload provides to the fault-tolerant training loop.
///
/// The rule that keeps snapshots consistent: `computeGradients` may read the
/// registered tensors but must not change them (a snapshot of the previous
/// step may still be copying them); every change to registered state, the
/// optimizer update and RNG and data-position bookkeeping alike, happens in
/// `applyUpdate`, which the loop calls only after `waitBeforeUpdate`.
public protocol Trainable: AnyObject {
    /// Everything that must survive a crash, registered once.
    var tensors: [RegisteredTensor] { get }
    /// The last completed step (0 before the first).
    var step: Int { get }
    /// Back to the initial state of step 0.
    func reset()
    /// Forward and backward of step `s`, including the gradient all-reduce.
    /// Throws `Interrupted` when the control plane pauses the job.
    func computeGradients(step s: Int, collective: RingCollective, interrupt: Int32) throws
    /// The optimizer update of step `s`.
    func applyUpdate(step s: Int)
    /// A digest of the state, printed for bit-exact comparisons.
    var hash: String { get }
    /// A progress line for step `s` (loss and so on), or nil.
    func report(step s: Int) -> String?
}

/// The training loop of a worker under a coordinator (DESIGN.md, "Recovery"):
/// restore and resume when told; every step compute, agree with the other
/// ranks whether to snapshot, wait for the copy only if the update needs it,
/// update, snapshot; on a pause abandon the step at once and wait.
public struct CoordinatedTrainingLoop {
    public let model: Trainable
    public let client: SnapshotClient
    public let control: WorkerControl
    public let ring: RingCollective
    public let steps: Int
    public let say: (String) -> Void

    public init(model: Trainable, client: SnapshotClient, control: WorkerControl, ring: RingCollective, steps: Int,
                say: @escaping (String) -> Void) {
        self.model = model
        self.client = client
        self.control = control
        self.ring = ring
        self.steps = steps
        self.say = say
    }

    public enum Outcome: Equatable {
        case completed
        case stopped(reason: String, failed: Bool)
        case fenced(reason: String)
    }

    /// Runs until the coordinator stops the job (after this worker finished, or
    /// because it failed) or fences this worker.
    public func run() throws -> Outcome {
        var skipped = 0
        var finished = false
        while true {
            switch control.nextInstruction() {
            case .restore(let step, let sources, let epoch):
                if let step {
                    do {
                        try client.restore(step: step, sources: sources)
                    } catch {
                        // A source may have died meanwhile: the coordinator will say
                        // what to restore next (a new epoch, or a retry); do not crash.
                        say("restore of step \(step) failed (epoch \(epoch)): \(error)")
                        continue
                    }
                    say("restored step=\(step) hash=\(model.hash) epoch=\(epoch)")
                } else {
                    model.reset()
                    say("fresh start epoch=\(epoch)")
                }
                control.setStep(model.step)
                control.ready(restoredStep: step)
            case .resume(let from, let peers, let epoch):
                try ring.connect(peers: peers, epoch: epoch)
                control.markRunning()
                say("resume from=\(from) epoch=\(epoch)")
                do {
                    if from <= steps {
                        for s in from...steps {
                            if control.isPaused { throw Interrupted() }
                            try model.computeGradients(step: s, collective: ring, interrupt: control.interruptFD)
                            let snapshotNow = try ring.allAgree(try client.canSnapshot(), interrupt: control.interruptFD)
                            try client.waitBeforeUpdate()
                            model.applyUpdate(step: s)
                            if snapshotNow {
                                try client.snapshot(step: s)
                            } else {
                                skipped += 1
                                control.setSkipped(skipped)
                            }
                            control.setStep(s)
                            if let line = model.report(step: s) { say(line) }
                        }
                    }
                    try client.waitForRound()
                    say("final step=\(model.step) hash=\(model.hash) skipped=\(skipped)")
                    finished = true
                    control.done(finalStep: model.step)
                } catch is Interrupted {
                    say("paused at step=\(model.step)")
                }
            case .stop(let reason, let failed):
                say("stop: \(reason)")
                return failed || !finished ? .stopped(reason: reason, failed: failed) : .completed
            case .fenced(let reason):
                say("fenced: \(reason)")
                return .fenced(reason: reason)
            }
        }
    }
}

extension CoordinatedTrainingLoop {
    /// Sets up everything a worker started by `ft-smp` under a coordinator
    /// needs (the ring, the control thread from the FT_* environment) and runs
    /// the loop. `client` must have registered `model.tensors`. Returns the
    /// process exit code: 0 when the job completed, 1 when it was stopped as
    /// failed, 3 when this worker was fenced.
    public static func runUnderCoordinator(model: Trainable, client: SnapshotClient, steps: Int,
                                           environment env: [String: String] = ProcessInfo.processInfo.environment,
                                           say: @escaping (String) -> Void) throws -> Int32 {
        let identity = client.identity
        guard let coordinator = env["FT_COORDINATOR_ENDPOINT"] else {
            throw SnapshotError(code: .misuse, message: "FT_COORDINATOR_ENDPOINT is not set (ft-smp --coordinator)")
        }
        let ring = try RingCollective(rank: identity.dpRank, worldSize: identity.dpSize, job: identity.jobID)
        let keys = try env["FT_KEYS_DIR"].map { try JobKeys.load(from: $0) }
        let control = try WorkerControl(
            info: .init(node: env["FT_NODE_ID"] ?? "n0", worker: identity.workerID, rank: identity.dpRank,
                        worldSize: identity.dpSize, pid: Int(getpid()), collectiveEndpoint: ring.endpoint),
            coordinatorEndpoint: coordinator, keys: keys)
        control.start()
        defer { control.shutdown() }
        let loop = CoordinatedTrainingLoop(model: model, client: client, control: control, ring: ring, steps: steps, say: say)
        switch try loop.run() {
        case .completed: return 0
        case .stopped(_, let failed): return failed ? 1 : 0
        case .fenced: return 3
        }
    }
}
