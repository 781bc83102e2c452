import FTCore
import FTSystem
import FTZMQ
import Foundation
import Synchronization

/// A worker's side of the control plane, on its own thread with its own
/// socket: it says hello, heartbeats every interval (whatever the training
/// thread does: computing, copying, restoring), and turns the coordinator's
/// messages into instructions for the training loop.
///
/// `pause` (or a `restore`, `stop` or `fenced`) sets `isPaused` and makes
/// `interruptFD` readable at once, so a collective waiting on the network
/// returns immediately instead of waiting out a timeout. The training loop
/// then asks `nextInstruction()`.
///
/// A coordinator that goes silent for `coordinatorTimeout` is not a pause: the
/// worker *holds* (`isHeld`) at its next step boundary, abandoning nothing,
/// and carries on when the coordinator is heard again, whatever its epoch (a
/// restarted coordinator sends a restore, which interrupts as usual). The
/// silence is judged by a `FailureDetectorInstance`, so a stall of this
/// process itself (SIGSTOP, an overloaded host) is not taken for the
/// coordinator's.
///
/// Heartbeats carry the step, whether the loop trains, and what it is doing
/// (`setActivity`), for the coordinator's step-progress watchdog. The largest
/// gap between two heartbeats (a hello to a restarted coordinator counts as
/// one) is logged at shutdown (and any gap over 0.3 s
/// when it happens). The thread runs at a real-time priority where allowed
/// (`ThreadPriority`): it sleeps in `poll` but must wake on time on a host
/// whose cores train.
public final class WorkerControl: @unchecked Sendable {
    public enum Instruction: Sendable, Equatable {
        /// Restore `step` (nil: initialize fresh); `sources[r]`: the SMP data endpoint of rank r.
        case restore(step: Int?, sources: [String], epoch: UInt64)
        case resume(fromStep: Int, peers: [String], epoch: UInt64)
        case stop(reason: String, failed: Bool)
        case fenced(reason: String)
    }

    public let info: ControlMessage.WorkerInfo
    private let coordinatorEndpoint: String
    private let keys: JobKeys?
    private let interval: Double
    private let coordinatorTimeout: Double
    private let condition = NSCondition()
    private var instructions: [Instruction] = []
    private let paused = Atomic<Bool>(true)
    private let held = Atomic<Bool>(false)
    private let stopping = Atomic<Bool>(false)
    private let interruptPipe: (read: Int32, write: Int32)
    private var step = 0
    private var skipped = 0
    private var snapshots = 0
    private var blockedSeconds = 0.0
    private var running = false
    private var activity = WorkerActivity.Kind.idle
    private var waitingOn = -1
    private var activitySince = monotonicSeconds()
    private var resumedEpoch: UInt64 = 0
    private var thread: Thread?
    private let done = DispatchSemaphore(value: 0)
    private var pendingOut: [ControlMessage] = []
    /// Where the control thread's notes go (the worker's log).
    private let log: (String) -> Void
    /// The largest gap between two heartbeats sent so far, in seconds.
    public var largestHeartbeatGap: Double { Double(largestGapMs.load(ordering: .relaxed)) / 1000 }
    private let largestGapMs = Atomic<Int>(0)

    public init(info: ControlMessage.WorkerInfo, coordinatorEndpoint: String, keys: JobKeys?,
                heartbeatInterval: Double = 0.1, coordinatorTimeout: Double = 1.0,
                log: @escaping (String) -> Void = { _ in }) throws {
        self.info = info
        interval = heartbeatInterval
        self.coordinatorTimeout = coordinatorTimeout
        self.log = log
        self.coordinatorEndpoint = coordinatorEndpoint
        self.keys = keys
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw SystemError("pipe", errno: errno) }
        for fd in fds { _ = fcntl(fd, F_SETFL, O_NONBLOCK) }
        interruptPipe = (fds[0], fds[1])
    }

    deinit {
        close(interruptPipe.read)
        close(interruptPipe.write)
    }

    /// Readable while the training loop must stop what it is doing.
    public var interruptFD: Int32 { interruptPipe.read }

    /// Called on the control thread after every change the training loop may
    /// want to see: an instruction queued, a pause. Set before `start()`.
    /// (The C interface turns it into a pollable descriptor.)
    public var onChange: (@Sendable () -> Void)?

    /// The next instruction, if one is waiting; never blocks.
    public func pollInstruction() -> Instruction? {
        condition.withLock { instructions.isEmpty ? nil : instructions.removeFirst() }
    }

    /// True from a pause until the next resume.
    public var isPaused: Bool { paused.load(ordering: .acquiring) }

    /// True while the coordinator is silent: hold at the next step boundary.
    public var isHeld: Bool { held.load(ordering: .acquiring) }

    /// The epoch of the last message from the coordinator.
    public var epoch: UInt64 { condition.withLock { currentEpoch } }
    private var currentEpoch: UInt64 = 0

    public func start() {
        let t = Thread { [self] in self.loop() }
        t.name = "ft-control"
        t.start()
        thread = t
    }

    public func shutdown() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        if thread != nil { done.wait() }
        log("control: largest heartbeat gap \(Int(largestHeartbeatGap * 1000)) ms (pid \(getpid()))")
    }

    /// Blocks until the coordinator says what to do next.
    public func nextInstruction() -> Instruction {
        condition.lock()
        defer { condition.unlock() }
        while instructions.isEmpty { condition.wait() }
        return instructions.removeFirst()
    }

    /// Whether an instruction is waiting for `nextInstruction()`.
    public var hasPendingInstruction: Bool { condition.withLock { !instructions.isEmpty } }

    /// The training loop reached `step` (sent with the next heartbeat).
    public func setStep(_ s: Int) { condition.withLock { step = s } }

    /// Snapshots skipped so far (sent with the next heartbeat).
    public func setSkipped(_ n: Int) { condition.withLock { skipped = n } }

    /// Snapshots staged so far and the training time they blocked, in all
    /// (sent with the next heartbeat; the coordinator's metrics take the differences).
    public func setSnapshotStats(staged: Int, blockedSeconds: Double) {
        condition.withLock {
            snapshots = staged
            self.blockedSeconds = blockedSeconds
        }
    }

    /// What the training thread does now (sent with every heartbeat, with how long it has done it).
    public func setActivity(_ kind: WorkerActivity.Kind, waitingOn rank: Int = -1) {
        condition.withLock {
            guard kind != activity || rank != waitingOn else { return }
            activity = kind
            waitingOn = rank
            activitySince = monotonicSeconds()
        }
    }

    /// Restored (nil: initialized fresh) and ready to resume.
    public func ready(restoredStep: Int?) { enqueue(.ready(restoredStep: restoredStep)) }

    /// The ordered restore failed; waiting for the next order.
    public func restoreFailed(_ reason: String) { enqueue(.restoreFailed(reason: String(reason.prefix(1000)))) }

    /// Finished the last step (said again every half second until the stop comes:
    /// a coordinator that restarted meanwhile may have missed it).
    public func done(finalStep: Int) {
        condition.withLock { finished = finalStep }
        log("control: largest heartbeat gap \(largestGapMs.load(ordering: .relaxed)) ms (pid \(getpid()))")
    }
    private var finished: Int?

    /// The loop is training again after a resume; clears the interrupt.
    public func markRunning() {
        var buf = [UInt8](repeating: 0, count: 64)
        while read(interruptPipe.read, &buf, buf.count) > 0 {}
        condition.withLock { running = true }
        paused.store(false, ordering: .releasing)
    }

    private func enqueue(_ m: ControlMessage) { condition.withLock { pendingOut.append(m) } }

    private func interrupt() {
        paused.store(true, ordering: .releasing)
        condition.withLock { running = false }
        var b: UInt8 = 1
        _ = write(interruptPipe.write, &b, 1)
        onChange?()
    }

    private func deliver(_ i: Instruction) {
        condition.lock()
        instructions.append(i)
        condition.broadcast()
        condition.unlock()
        onChange?()
    }

    private func loop() {
        defer { done.signal() }
        // Raised first, then the context made here: libzmq's I/O thread inherits the scheduling.
        let priority = ThreadPriority.raiseCurrentThread()
        if case .unchanged = priority { log("control: heartbeat thread scheduling \(priority)") }
        let context: ZMQContext
        let link: CoordinatorLink
        do {
            context = try ZMQContext()
            link = try CoordinatorLink(context: context, endpoint: coordinatorEndpoint, memberID: info.key, keys: keys)
        } catch {
            log("control: cannot reach the coordinator at \(coordinatorEndpoint): \(error); stopping")
            deliver(.stop(reason: "no control link: \(error)", failed: true))
            return
        }
        defer { link.close(); withExtendedLifetime(context) {} }
        var nextBeat = 0.0
        var nextHello = 0.0
        var nextDone = 0.0
        var lastBeat: Double?
        var welcomed = false
        // The coordinator's silence, judged like any peer's (a stall of ours grants it a grace period).
        var silence = FailureDetectorInstance(interval: interval, timeout: coordinatorTimeout)
        silence.heard("coordinator", now: monotonicSeconds())
        while !stopping.load(ordering: .acquiring) {
            let now = monotonicSeconds()
            if !welcomed && now >= nextHello {
                link.send(.workerHello(info))
                // A hello says "alive" too: re-introducing itself to a restarted
                // coordinator is not a gap in this worker's liveness.
                if let last = lastBeat {
                    if Int((now - last) * 1000) > largestGapMs.load(ordering: .relaxed) { largestGapMs.store(Int((now - last) * 1000), ordering: .relaxed) }
                    lastBeat = now
                }
                nextHello = now + 0.5
            }
            if now >= nextBeat {
                let (s, r, k, a, n, b) = condition.withLock {
                    (step, running, skipped, WorkerActivity(activity, waitingOn: waitingOn, milliseconds: Int((now - activitySince) * 1000)),
                     snapshots, blockedSeconds)
                }
                if welcomed {
                    link.send(.workerHeartbeat(step: s, running: r, skipped: k, activity: a, snapshots: n, blockedSeconds: b))
                    if let last = lastBeat {
                        let gap = now - last
                        if Int(gap * 1000) > largestGapMs.load(ordering: .relaxed) { largestGapMs.store(Int(gap * 1000), ordering: .relaxed) }
                        if gap > 0.3 { log("control: no heartbeat sent for \(Int(gap * 1000)) ms (pid \(getpid()))") }
                    }
                    lastBeat = now
                }
                nextBeat = now + interval
            }
            for m in condition.withLock({ () -> [ControlMessage] in defer { pendingOut.removeAll() }; return pendingOut }) {
                link.send(m)
            }
            if welcomed, now >= nextDone, let final = condition.withLock({ finished }) {
                link.send(.workerDone(finalStep: final))
                nextDone = now + 0.5
            }
            let tick = silence.tick(now: now)
            if tick.dead.contains(where: { $0.id == "coordinator" }) {
                // The coordinator went silent: hold at the next step boundary and wait for it.
                held.store(true, ordering: .releasing)
                log("control: the coordinator has been silent for \(Int(tick.dead[0].silentFor * 1000)) ms; holding at the next step boundary")
            }
            // Until the next heartbeat is due (and never long: the silence check runs every turn).
            let due = min(nextBeat, welcomed ? nextBeat : nextHello, monotonicSeconds() + interval / 2)
            _ = try? ZMQPoller.poll([.init(link.socket, .readable)], timeoutMilliseconds: max(1, Int(((due - monotonicSeconds()) * 1000).rounded(.up))))
            let messages = link.drain()
            if !messages.isEmpty {
                condition.withLock { currentEpoch = link.epoch }
                silence.heard("coordinator", now: monotonicSeconds())
                if held.exchange(false, ordering: .acquiringAndReleasing) { log("control: the coordinator is back; carrying on") }
            }
            for (message, messageEpoch) in messages {
                switch message {
                case .welcome:
                    welcomed = true
                case .ack:
                    welcomed = true
                case .helloRequired:
                    welcomed = false
                    nextHello = 0
                case .pause:
                    if messageEpoch > resumedEpoch { interrupt() }
                case .restore(let s, let sources):
                    condition.withLock { finished = nil }
                    interrupt()
                    deliver(.restore(step: s, sources: sources, epoch: messageEpoch))
                case .resume(let from, let peers):
                    let isRunning = condition.withLock { running }
                    if !isRunning && messageEpoch > resumedEpoch {
                        resumedEpoch = messageEpoch
                        deliver(.resume(fromStep: from, peers: peers, epoch: messageEpoch))
                    }
                case .stop(let reason, let failed):
                    interrupt()
                    deliver(.stop(reason: reason, failed: failed))
                case .fenced(let reason):
                    interrupt()
                    deliver(.fenced(reason: reason))
                default:
                    break
                }
            }
        }
    }
}
