import FTControl
import FTCore
import FTWorker
import FTSystem
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
    /// Back to the initial state of step 0. The loop calls it before a fresh
    /// start, so a model built under a coordinator may leave its tensors
    /// unwritten until then (or until a restore overwrites them).
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

/// The training loop of a worker under a coordinator (ARCHITECTURE.md, "Recovery"):
/// restore and resume when told; every step compute, agree with the other
/// ranks whether to snapshot, wait for the copy only if the update needs it,
/// update, snapshot; on a pause abandon the step at once and wait.
public struct CoordinatedTrainingLoop {
    public let model: Trainable
    public let client: SnapshotClient
    public let control: WorkerControl
    public let ring: RingCollective
    public let steps: Int
    /// Snapshot when at least this many steps passed since the last one (1:
    /// every step).
    public let snapshotInterval: Int
    /// At a due step whose previous round is still in flight: wait for it
    /// (true, the default: at most one round in flight, so a failure loses at
    /// most about one interval of steps) or skip this snapshot and try again
    /// next step (false: training never waits on a commit, but a failure
    /// while rounds are slow, or while the coordinator is gone, loses more).
    public let waitForPreviousRound: Bool
    /// Test fault injection: hang forever in this step (see `hangForever`).
    public var hangAtStep: Int?
    /// Test fault injection at moments another process picks
    /// (`FT_FAULT_TRIGGER_DIR`): before each step the loop looks for
    /// `hang-rank-R` and `kill-mid-copy-rank-R` (R its DP rank) there, removes
    /// the file (one incarnation acts on it), and hangs in that step or dies
    /// halfway through the next snapshot's copy. Unlike the step-based faults,
    /// these fire in whichever incarnation runs when the file appears.
    public var faultTriggerDirectory: String?
    public let say: (String) -> Void

    public init(model: Trainable, client: SnapshotClient, control: WorkerControl, ring: RingCollective, steps: Int,
                snapshotInterval: Int = 1, waitForPreviousRound: Bool = true, say: @escaping (String) -> Void) {
        self.model = model
        self.client = client
        self.control = control
        self.ring = ring
        self.steps = steps
        self.snapshotInterval = max(1, snapshotInterval)
        self.waitForPreviousRound = waitForPreviousRound
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
        // The step of the last snapshot (or restore): the same on every rank,
        // because every rank restores the same step and agrees on each snapshot.
        var lastSnapshot = 0
        // The step whose snapshot the registered tensors hold exactly, nil when
        // unknown (a new process, a restore that failed partway). A step
        // abandoned before its update leaves it as it was, so a survivor told
        // to restore that step keeps its state (`liveStateIs`).
        var liveStep: Int?
        ring.onWait = { [control] rank in control.setActivity(rank == nil ? .computing : .collective, waitingOn: rank ?? -1) }
        while true {
            control.setActivity(.idle)
            switch control.nextInstruction() {
            case .restore(let step, let sources, let epoch):
                control.setActivity(.restoring)
                if let step {
                    // Given up as soon as the coordinator moves on (a newer epoch or
                    // instruction): a dead source must not hold the recovery up.
                    let movedOn = { [control] in control.epoch != epoch || control.hasPendingInstruction }
                    var failure: Error?
                    var live = liveStep
                    liveStep = nil
                    for attempt in 1...3 {
                        do {
                            defer { live = nil }  // a failed attempt may have written part of the tensors
                            try client.restore(step: step, sources: sources, liveStateIs: live, abandon: movedOn)
                            failure = nil
                            break
                        } catch {
                            failure = error
                            say("restore of step \(step) failed (epoch \(epoch), attempt \(attempt)): \(error)")
                            if movedOn() || (error as? SnapshotError)?.code == .interrupted { break }
                        }
                    }
                    if let failure {
                        // A source may have died meanwhile: the coordinator says what to
                        // restore next (a new epoch, or the same again); do not crash.
                        if !movedOn() { control.restoreFailed("\(failure)") }
                        continue
                    }
                    say("restored step=\(step) hash=\(model.hash) epoch=\(epoch)"
                        + (client.stats.lastRestore.map { " (\($0))" } ?? ""))
                    lastSnapshot = step
                    liveStep = step
                } else {
                    // Never throw away progress: a fresh start is refused while this
                    // node's SMP holds a committed step (the coordinator must restore it).
                    if let held = try? client.committedStepOnSMP() {
                        say("refusing a fresh start (epoch \(epoch)): the SMP holds committed step \(held)")
                        continue
                    }
                    lastSnapshot = 0
                    liveStep = nil
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
                            try holdWhileCoordinatorSilent()
                            if control.isPaused { throw Interrupted() }
                            control.setActivity(.computing)
                            if s == hangAtStep { hangForever() }
                            if let dir = faultTriggerDirectory { checkFaultTriggers(dir, step: s) }
                            try model.computeGradients(step: s, collective: ring, interrupt: control.interruptFD)
                            // Only due steps ask the ranks (every rank knows which steps are due).
                            let due = s - lastSnapshot >= snapshotInterval
                            var ready = due ? try client.canSnapshot() : false
                            var pollMicroseconds: UInt32 = 100
                            if due && !ready && waitForPreviousRound { control.setActivity(.snapshotWait) }
                            while due && !ready && waitForPreviousRound {
                                // The previous round is still being protected (or the coordinator
                                // that commits it is gone): wait rather than run ahead of it.
                                // Each look may ask the SMP, which is busy protecting that very
                                // round: back off to one look every 5 ms.
                                if control.isPaused { throw Interrupted() }
                                usleep(pollMicroseconds)
                                pollMicroseconds = min(pollMicroseconds * 2, 5000)
                                ready = try client.canSnapshot()
                            }
                            control.setActivity(.computing)
                            let snapshotNow = due ? try ring.allAgree(ready, interrupt: control.interruptFD) : false
                            control.setActivity(.snapshotWait)
                            try client.waitBeforeUpdate()
                            control.setActivity(.computing)
                            liveStep = nil
                            model.applyUpdate(step: s)
                            liveStep = s
                            if snapshotNow {
                                try client.snapshot(step: s)
                                lastSnapshot = s
                                control.setSnapshotStats(staged: client.stats.snapshotsStaged, blockedSeconds: client.stats.blockedSeconds)
                            } else if due {
                                skipped += 1
                                control.setSkipped(skipped)
                            }
                            control.setStep(s)
                            if let line = model.report(step: s) { say(line) }
                        }
                    }
                    control.setActivity(.snapshotWait)
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
    /// At a step boundary while the coordinator is silent: wait for it (a
    /// pause or another instruction ends the wait), abandoning nothing.
    func holdWhileCoordinatorSilent() throws {
        guard control.isHeld else { return }
        control.setActivity(.held)
        say("holding at step=\(model.step): the coordinator is silent")
        while control.isHeld {
            if control.isPaused { throw Interrupted() }
            usleep(5_000)
        }
        say("carrying on at step=\(model.step)")
    }

    private func checkFaultTriggers(_ dir: String, step: Int) {
        let rank = client.identity.dpRank
        if unlink("\(dir)/hang-rank-\(rank)") == 0 { hangForever() }
        if unlink("\(dir)/kill-mid-copy-rank-\(rank)") == 0 {
            say("fault injection: dying halfway through the copy of the snapshot of step \(step) or later")
            client.killMidCopyAtStep = step
        }
    }

    /// Test fault injection (`FT_FAULT_HANG_STEP`): a step that never ends,
    /// deaf to pauses, while the control thread keeps heartbeating: what a
    /// deadlocked collective or a stuck kernel looks like from outside.
    func hangForever() -> Never {
        say("fault injection: hanging in step \(model.step + 1) at \(monotonicSeconds())")
        while true { sleep(3600) }
    }

    /// Sets up everything a worker started by `ft-smp` under a coordinator
    /// needs (the ring, the control thread from the FT_* environment) and runs
    /// the loop. `client` must have registered `model.tensors`. Returns the
    /// process exit code: 0 when the job completed, 1 when it was stopped as
    /// failed, 3 when this worker was fenced.
    ///
    /// Environment besides the FT_* identity: `FT_SNAPSHOT_INTERVAL=N`
    /// snapshots every N steps (default 1); `FT_SNAPSHOT_SKIP_IF_BUSY=1` skips
    /// a due snapshot whose previous round is still in flight instead of
    /// waiting for it (see `waitForPreviousRound`). Test fault injection:
    /// `FT_FAULT_KILL_MID_COPY_STEP=S` (with `FT_FAULT_RANK=R`, only on DP rank
    /// R) makes the first incarnation SIGKILL itself halfway through copying
    /// the first snapshot at or after step S; `FT_FAULT_HANG_STEP=S` (with
    /// `FT_FAULT_RANK`) makes the first incarnation hang in step S, its
    /// heartbeats alive (a stuck worker for the step-progress watchdog);
    /// `FT_FAULT_TRIGGER_DIR=DIR` does either whenever a file appears (see
    /// `faultTriggerDirectory`).
    public static func runUnderCoordinator(model: Trainable, client: SnapshotClient, steps: Int,
                                           environment env: [String: String] = ProcessInfo.processInfo.environment,
                                           say: @escaping (String) -> Void) throws -> Int32 {
        let identity = client.identity
        let interval = env["FT_SNAPSHOT_INTERVAL"].map { Int($0) ?? 0 } ?? 1
        guard interval >= 1 else {
            throw SnapshotError(code: .misuse, message: "FT_SNAPSHOT_INTERVAL must be a positive number of steps, not '\(env["FT_SNAPSHOT_INTERVAL"]!)'")
        }
        if identity.restartCount == 0, let s = env["FT_FAULT_KILL_MID_COPY_STEP"].flatMap(Int.init),
           env["FT_FAULT_RANK"].flatMap(Int.init).map({ $0 == identity.dpRank }) ?? true {
            client.killMidCopyAtStep = s
        }
        guard let coordinator = env["FT_COORDINATOR_ENDPOINT"] else {
            throw SnapshotError(code: .misuse, message: "FT_COORDINATOR_ENDPOINT is not set (ft-smp --coordinator)")
        }
        // On this host's address for peers (FT_HOST_ADDR, from the SMP), loopback on one host.
        let ring = try RingCollective(rank: identity.dpRank, worldSize: identity.dpSize, job: identity.jobID,
                                      host: env["FT_HOST_ADDR"] ?? "127.0.0.1")
        let keys = try env["FT_KEYS_DIR"].map { try JobKeys.load(from: $0, role: .worker) }
        let heartbeat = env["FT_HEARTBEAT_MS"].flatMap(Double.init).map { $0 / 1000 } ?? 0.1
        let control = try WorkerControl(
            info: .init(node: env["FT_NODE_ID"] ?? "n0", worker: identity.workerID, rank: identity.dpRank,
                        worldSize: identity.dpSize, pid: Int(getpid()), collectiveEndpoint: ring.endpoint),
            coordinatorEndpoint: coordinator, keys: keys, heartbeatInterval: heartbeat,
            coordinatorTimeout: max(1.0, 10 * heartbeat), log: { say($0) })
        control.start()
        defer { control.shutdown() }
        var loop = CoordinatedTrainingLoop(model: model, client: client, control: control, ring: ring, steps: steps,
                                          snapshotInterval: interval, waitForPreviousRound: env["FT_SNAPSHOT_SKIP_IF_BUSY"] != "1", say: say)
        let faultRank = env["FT_FAULT_RANK"].flatMap(Int.init).map { $0 == identity.dpRank } ?? true
        if identity.restartCount == 0, faultRank, let s = env["FT_FAULT_HANG_STEP"].flatMap(Int.init) { loop.hangAtStep = s }
        loop.faultTriggerDirectory = env["FT_FAULT_TRIGGER_DIR"]
        switch try loop.run() {
        case .completed: return 0
        case .stopped(_, let failed): return failed ? 1 : 0
        case .fenced: return 3
        }
    }
}
