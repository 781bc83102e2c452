import FTControl
import FTCore
import FTSystem
import FTZMQ
import Foundation
import Logging
import Synchronization

/// The SMP's link to the coordinator, on a thread of its own with a ZeroMQ
/// context of its own (ARCHITECTURE.md, "Failure detection": heartbeats never queue
/// behind bulk work, neither in the event loop nor in the I/O thread that
/// carries EC frames). The thread runs at a real-time priority where allowed
/// (`ThreadPriority`) and creates its context, so that libzmq's I/O thread
/// inherits that priority. It owns the DEALER to the coordinator: it says hello until welcomed (with the
/// inventory the event loop last gave it), heartbeats every interval with the
/// sizes the event loop last reported, and passes every message between the
/// coordinator and the event loop over an in-process PAIR socket that the
/// event loop polls with its other sockets. Rebuilds, restores, fetches,
/// prefaulting, CRCs and decoding run on the event loop and cannot delay a
/// heartbeat.
///
/// A heartbeat says "this SMP works", not only "this process exists": the
/// event loop calls `progress()` on every turn (and between pieces of long
/// work); if it has not for `hangBound` seconds, the thread withholds
/// heartbeats, so the coordinator declares the SMP dead and it is replaced
/// instead of holding the job up forever.
///
/// The largest gap between two heartbeats (a hello to a restarted coordinator
/// counts as one) is logged when the channel closes, and any gap over 0.3 ×
/// the coordinator's timeout when it happens.
final class ControlChannel: @unchecked Sendable {
    private let context: ZMQContext
    private let link: CoordinatorLink
    /// The event loop's end of the PAIR (poll it; `receive()` drains it).
    let inbox: ZMQSocket
    private let threadEnd: ZMQSocket
    private let interval: Double
    private let warnGap: Double
    private let hangBound: Double
    private let logger: Logger
    private let stopping = Atomic<Bool>(false)
    private let welcomedFlag = Atomic<Bool>(false)
    private let lastProgress = Atomic<UInt64>(0)
    private let dataBytes = Atomic<Int>(0)
    private let parityBytes = Atomic<Int>(0)
    private let sharedMemoryBytes = Atomic<Int>(0)
    private let lock = NSLock()
    private var hello: ControlMessage.SMPInventory?
    private let thread: Thread
    private let done = DispatchSemaphore(value: 0)
    /// The origin of `lastProgress` (milliseconds since it).
    private let started = monotonicSeconds()
    /// The largest gap between two heartbeats sent, in seconds.
    private(set) var largestGap = 0.0

    /// `timeout`: the coordinator's heartbeat timeout (gaps over 0.3× of it are logged).
    init(endpoint: String, memberID: String, keys: JobKeys?, interval: Double, timeout: Double,
         hangBound: Double, logger: Logger) throws {
        self.interval = interval
        warnGap = 0.3 * timeout
        self.hangBound = hangBound
        self.logger = logger
        // The thread raises itself, then makes the context and sockets (their I/O
        // thread inherits its scheduling), hands them over, and waits for `start()`.
        let made = Locked<Result<Sockets, Error>?>(nil)
        let ready = DispatchSemaphore(value: 0)
        let go = DispatchSemaphore(value: 0)
        let t = Thread { [go] in
            let priority = ThreadPriority.raiseCurrentThread()
            made.set(Result { try Sockets(endpoint: endpoint, memberID: memberID, keys: keys) })
            ready.signal()
            go.wait()
            guard let channel = made.channel else { return }
            channel.logger.info("control thread scheduling: \(priority)")
            channel.loop()
        }
        t.name = "ft-smp-control"
        t.start()
        ready.wait()
        let sockets: Sockets
        do {
            sockets = try made.get()!.get()
        } catch {
            go.signal()  // the thread ends: it has no channel
            throw error
        }
        context = sockets.context
        link = sockets.link
        inbox = sockets.inbox
        threadEnd = sockets.threadEnd
        self.go = go
        thread = t
        made.channel = self
        progress()
    }

    private let go: DispatchSemaphore

    /// What the control thread makes for itself.
    private struct Sockets {
        var context: ZMQContext
        var link: CoordinatorLink
        var inbox: ZMQSocket
        var threadEnd: ZMQSocket

        init(endpoint: String, memberID: String, keys: JobKeys?) throws {
            context = try ZMQContext()
            link = try CoordinatorLink(context: context, endpoint: endpoint, memberID: memberID, keys: keys)
            let address = "inproc://ft-control-\(memberID)-\(UInt32.random(in: 0...UInt32.max))"
            inbox = try context.socket(.pair, maxMessageBytes: nil)  // inproc
            try inbox.setLinger(milliseconds: 0)
            _ = try inbox.bind(address)
            threadEnd = try context.socket(.pair, maxMessageBytes: nil)  // inproc
            try threadEnd.setLinger(milliseconds: 0)
            try threadEnd.connect(address)
        }
    }

    /// Starts heartbeating (hellos first, until welcomed).
    func start() { go.signal() }

    /// Ends the thread and closes the sockets; logs the largest heartbeat gap.
    func shutdown() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        go.signal()  // if it was never started, it ends at once
        done.wait()
        threadEnd.close()
        inbox.close()
        link.close()
        logger.info("largest heartbeat gap \(Int(largestGap * 1000)) ms (pid \(getpid()))")
    }

    /// Welcomed by the coordinator (heartbeats flow); false until then and after a `helloRequired`.
    var welcomed: Bool { welcomedFlag.load(ordering: .acquiring) }

    /// The event loop is working: called on every turn and between pieces of long work.
    func progress() {
        lastProgress.store(UInt64(max(0, monotonicSeconds() - started) * 1000), ordering: .releasing)
    }

    /// The sizes the next heartbeats carry.
    func setSizes(data: Int, parity: Int, sharedMemory: Int) {
        dataBytes.store(data, ordering: .relaxed)
        parityBytes.store(parity, ordering: .relaxed)
        sharedMemoryBytes.store(sharedMemory, ordering: .relaxed)
    }

    /// The hello said until the coordinator welcomes this SMP.
    func setHello(_ inventory: ControlMessage.SMPInventory) { lock.withLock { hello = inventory } }

    /// Sends a message to the coordinator (stamped with the epoch the link knows).
    func send(_ message: ControlMessage) {
        _ = try? inbox.send([message.envelope(sender: "", epoch: 0).encoded()], dontWait: true)
    }

    /// Messages from the coordinator waiting now.
    func receive() -> [ControlMessage] {
        var out: [ControlMessage] = []
        while let frames = try? inbox.receiveNow() {
            guard let first = frames.first, let (message, envelope) = try? ControlMessage.decode(first) else { continue }
            epoch = max(epoch, envelope.epoch)
            out.append(message)
        }
        return out
    }

    /// The highest epoch of the messages `receive()` handed over.
    private(set) var epoch: UInt64 = 0

    private func loop() {
        defer { done.signal() }
        var nextBeat = 0.0
        var nextHello = 0.0
        var lastBeat: Double?
        var withholding = false
        while !stopping.load(ordering: .acquiring) {
            let now = monotonicSeconds()
            if welcomed, now >= nextBeat {
                let idle = now - started - Double(lastProgress.load(ordering: .acquiring)) / 1000
                if idle > hangBound {
                    if !withholding {
                        logger.error("the event loop has not turned for \(Int(idle * 1000)) ms: heartbeats withheld, so that the coordinator replaces this SMP")
                    }
                    withholding = true
                } else {
                    if withholding { logger.warning("the event loop turns again; heartbeats resume") }
                    withholding = false
                    link.send(.smpHeartbeat(dataBytes: dataBytes.load(ordering: .relaxed), parityBytes: parityBytes.load(ordering: .relaxed),
                                            sharedMemoryBytes: sharedMemoryBytes.load(ordering: .relaxed)))
                    if let last = lastBeat {
                        let gap = now - last
                        largestGap = max(largestGap, gap)
                        if gap > warnGap { logger.warning("no heartbeat sent for \(Int(gap * 1000)) ms (pid \(getpid()))") }
                    }
                    lastBeat = now
                }
                nextBeat = now + interval
            }
            if !welcomed, now >= nextHello {
                if let h = lock.withLock({ hello }) {
                    link.send(.smpHello(h))
                    // A hello says "alive" too: re-introducing itself to a restarted
                    // coordinator is not a gap in this SMP's liveness.
                    if let last = lastBeat { largestGap = max(largestGap, now - last); lastBeat = now }
                }
                nextHello = now + 0.5
            }
            let wait = max(1, Int(((welcomed ? nextBeat : min(nextHello, now + interval)) - monotonicSeconds()) * 1000))
            guard let ready = try? ZMQPoller.poll([.init(link.socket, .readable), .init(threadEnd, .readable)], timeoutMilliseconds: wait) else {
                continue
            }
            if ready[0].isReadable {
                for (message, epoch) in link.drain() {
                    switch message {
                    case .welcome, .ack:
                        welcomedFlag.store(true, ordering: .releasing)
                    case .helloRequired:
                        welcomedFlag.store(false, ordering: .releasing)
                        nextHello = 0
                    default:
                        break
                    }
                    _ = try? threadEnd.send([message.envelope(sender: "coordinator", epoch: epoch).encoded()], dontWait: true)
                }
            }
            if ready[1].isReadable {
                while let frames = try? threadEnd.receiveNow() {
                    guard let first = frames.first, let (message, _) = try? ControlMessage.decode(first) else { continue }
                    if case .smpHello = message { nextHello = monotonicSeconds() + 0.5 }
                    link.send(message)
                }
            }
        }
    }
}

/// A value handed from the control thread to its creator, and the channel back.
private final class Locked<T>: @unchecked Sendable {
    private var value: T
    private let lock = NSLock()
    weak var channel: ControlChannel? {
        get { lock.withLock { _channel } }
        set { lock.withLock { _channel = newValue } }
    }
    private weak var _channel: ControlChannel?
    init(_ v: T) { value = v }
    func get() -> T { lock.withLock { value } }
    func set(_ v: T) { lock.withLock { value = v } }
}
