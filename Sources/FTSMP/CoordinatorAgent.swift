import FTControl
import FTCore
import FTSystem
import FTZMQ
import Foundation
import Logging

/// The SMP's side of the control plane (ARCHITECTURE.md, "Failure detection").
///
/// Owns the link to the coordinator (`ControlChannel`, on its own thread:
/// hellos until welcomed, heartbeats with the sizes last reported), the hello
/// it repeats (the node's inventory, kept current so that a coordinator that
/// restarts hears the truth at once), the last `protected` sent while that
/// round is still staged (a hello says it again), and when the sizes were
/// last worked out. Without a coordinator (a node on its own) it is there
/// and says nothing.
///
/// It decides nothing about the node: the coordinator's orders go to the
/// server (`orders()`), which hands each to the component it concerns; what
/// the components report comes back through `report`.
final class CoordinatorAgent {
    private let channel: ControlChannel?
    private let interval: Double
    /// The step of the last `protected` sent, while that round is still staged,
    /// and the layout chunk size it was protected under.
    private var lastProtected: (step: Int, layoutChunkBytes: Int)?
    private var sizesReportedAt = 0.0

    init(config: SMPConfiguration, logger: Logger) throws {
        interval = config.heartbeatInterval
        if let coordinator = config.coordinatorEndpoint {
            let keys = try config.keysDirectory.map { try JobKeys.load(from: $0, role: .smp, node: config.nodeID) }
            channel = try ControlChannel(endpoint: coordinator, memberID: config.nodeID, keys: keys,
                                         interval: config.heartbeatInterval, timeout: config.heartbeatTimeout,
                                         hangBound: config.hangBound, logger: logger)
        } else {
            channel = nil
        }
    }

    /// Whether there is a coordinator.
    var connected: Bool { channel != nil }

    /// The coordinator's epoch as this node last heard it (0 without one).
    var epoch: UInt64 { channel?.epoch ?? 0 }

    /// The socket the event loop polls for orders.
    var inbox: ZMQSocket? { channel?.inbox }

    /// Says hello with `inventory`, and starts heartbeating.
    func start(_ inventory: ControlMessage.SMPInventory) {
        sayHello(inventory)
        channel?.start()
    }

    /// The event loop is working (on every turn and between pieces of long work).
    func progress() { channel?.progress() }

    /// The sizes the heartbeats carry, worked out at most twice per heartbeat
    /// interval (the loop turns for every frame).
    func reportSizes(_ sizes: () -> (data: Int, parity: Int, sharedMemory: Int)) {
        let now = monotonicSeconds()
        guard let channel, now - sizesReportedAt >= interval / 2 else { return }
        sizesReportedAt = now
        let (data, parity, shm) = sizes()
        channel.setSizes(data: data, parity: parity, sharedMemory: shm)
    }

    /// Sends a message to the coordinator; remembers a `protected` for later hellos.
    func report(_ message: ControlMessage) {
        if case .protected(let step, let chunk) = message { lastProtected = (step, chunk) }
        channel?.send(message)
    }

    /// A round was aborted or a restore ordered: the `protected` sent is void.
    func forgetProtected() { lastProtected = nil }

    /// The `protected` the hello repeats: the last one sent, while `staged` is that
    /// step and the layout (`layoutChunkBytes`) is the one it was protected under.
    func protectedStep(staged: Int?, layoutChunkBytes: Int) -> Int? {
        lastProtected.flatMap { $0.step == staged && $0.layoutChunkBytes == layoutChunkBytes ? $0.step : nil }
    }

    /// The hello the control thread repeats until welcomed (always current).
    func updateHello(_ inventory: ControlMessage.SMPInventory) { channel?.setHello(inventory) }

    /// Says hello now (at start, and when the coordinator asks for one).
    func sayHello(_ inventory: ControlMessage.SMPInventory) {
        guard let channel else { return }
        channel.setHello(inventory)
        channel.send(.smpHello(inventory))
    }

    /// The coordinator's messages waiting now.
    func orders() -> [ControlMessage] { channel?.receive() ?? [] }

    /// Ends the link (logs the largest heartbeat gap).
    func shutdown() { channel?.shutdown() }
}
