import FTCore
import FTSystem
import FTZMQ
import Foundation
import Synchronization

/// A worker's side of the control plane, on its own thread: it says hello,
/// heartbeats every interval (also while the training thread computes), and
/// turns the coordinator's messages into instructions for the training loop.
///
/// `pause` (or a `restore`, `stop`, `fenced`, or the coordinator going silent
/// for the timeout) sets `isPaused` and makes `interruptFD` readable at once,
/// so a collective waiting on the network returns immediately instead of
/// waiting out a timeout. The training loop then asks `nextInstruction()`.
public final class WorkerControl: @unchecked Sendable {
    public enum Instruction: Sendable, Equatable {
        /// Restore `step` (nil: initialize fresh); `sources[r]`: the SMP data endpoint of rank r.
        case restore(step: Int?, sources: [String], epoch: UInt64)
        case resume(fromStep: Int, peers: [String], epoch: UInt64)
        case stop(reason: String, failed: Bool)
        case fenced(reason: String)
    }

    public let info: ControlMessage.WorkerInfo
    private let link: CoordinatorLink
    private let context: ZMQContext
    private let interval: Double
    private let coordinatorTimeout: Double
    private let condition = NSCondition()
    private var instructions: [Instruction] = []
    private let paused = Atomic<Bool>(true)
    private let stopping = Atomic<Bool>(false)
    private let interruptPipe: (read: Int32, write: Int32)
    private var step = 0
    private var skipped = 0
    private var running = false
    private var resumedEpoch: UInt64 = 0
    private var thread: Thread?
    private let done = DispatchSemaphore(value: 0)
    private var pendingOut: [ControlMessage] = []

    public init(info: ControlMessage.WorkerInfo, coordinatorEndpoint: String, keys: JobKeys?,
                heartbeatInterval: Double = 0.1, coordinatorTimeout: Double = 1.0) throws {
        self.info = info
        interval = heartbeatInterval
        self.coordinatorTimeout = coordinatorTimeout
        context = try ZMQContext()
        link = try CoordinatorLink(context: context, endpoint: coordinatorEndpoint, memberID: info.key, keys: keys)
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
        link.close()
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

    /// Restored (nil: initialized fresh) and ready to resume.
    public func ready(restoredStep: Int?) { enqueue(.ready(restoredStep: restoredStep)) }

    /// Finished the last step.
    public func done(finalStep: Int) { enqueue(.workerDone(finalStep: finalStep)) }

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
        var nextBeat = 0.0
        var nextHello = 0.0
        var welcomed = false
        var lost = false
        while !stopping.load(ordering: .acquiring) {
            let now = monotonicSeconds()
            if !welcomed && now >= nextHello {
                link.send(.workerHello(info))
                nextHello = now + 0.5
            }
            if now >= nextBeat {
                let (s, r, k) = condition.withLock { (step, running, skipped) }
                if welcomed { link.send(.workerHeartbeat(step: s, running: r, skipped: k)) }
                nextBeat = now + interval
            }
            for m in condition.withLock({ () -> [ControlMessage] in defer { pendingOut.removeAll() }; return pendingOut }) {
                link.send(m)
            }
            if now - link.lastHeard > coordinatorTimeout && !lost {
                // The coordinator went silent: stop at the next step boundary and wait for it.
                lost = true
                interrupt()
            }
            _ = try? ZMQPoller.poll([.init(link.socket, .readable)], timeoutMilliseconds: Int(interval * 500) + 1)
            let messages = link.drain()
            if !messages.isEmpty { condition.withLock { currentEpoch = link.epoch } }
            for (message, messageEpoch) in messages {
                lost = false
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
