import FTCore
import FTErasure
import FTSystem
import FTZMQ
import Foundation

/// Thrown when a collective (or a step) is abandoned because the control
/// plane paused the job.
public struct Interrupted: CodedError {
    public enum Code: String, Sendable { case interrupted }
    public var code: Code { .interrupted }
    public var message: String { "abandoned: the control plane paused the job" }
    public var description: String { message }
    public init() {}
}

/// A data-parallel collective over TCP: every rank listens on a PULL socket
/// and pushes to the next rank of the ring.
///
/// `allreduceSum` adds in a fixed order — rank 0's values, plus rank 1's, plus
/// rank 2's, … — and hands every rank the same bits, so a run is reproducible
/// bit for bit for a given world size. The values travel once around the ring
/// to be summed and once more to be shared (2(N−1) hops): simple, and fast
/// enough for a demo model on one host.
///
/// Every message carries the epoch and a sequence number; a message from an
/// abandoned collective (older epoch or sequence) is dropped. A receive waits
/// on the socket *and* the interrupt descriptor, so a pause abandons the
/// collective at once (`Interrupted`), whatever the peers do.
public final class RingCollective: @unchecked Sendable {
    /// The default bound on one collective message (1 GiB of gradients).
    public static let defaultMaxMessageBytes = 1 << 30
    public let rank: Int
    public let worldSize: Int
    private let context: ZMQContext
    private let pull: ZMQSocket
    private var push: ZMQSocket?
    public let endpoint: String
    private var epoch: UInt64 = 0
    private let jobTag: UInt64
    private var sequence: UInt64 = 0
    /// How long a receive may wait with no message before failing (a peer that
    /// died without the coordinator noticing); the interrupt normally comes first.
    public var receiveTimeoutSeconds = 60.0
    /// Told when a receive starts waiting (with the rank it waits for: the
    /// previous one in the ring) and when it is over (nil): the worker's
    /// heartbeat carries it, so a hang can be traced to the rank holding it up.
    public var onWait: ((Int?) -> Void)?

    /// `job` tags every message, so a process of another job that reaches this
    /// port (a stale one, a reused port) is ignored.
    /// `maxMessageBytes`: the largest buffer `allreduceSum` is given (a peer's
    /// larger message is dropped by libzmq before it is allocated).
    public init(rank: Int, worldSize: Int, job: String = "", host: String = "127.0.0.1",
                maxMessageBytes: Int = RingCollective.defaultMaxMessageBytes) throws {
        precondition(worldSize >= 1 && (0..<worldSize).contains(rank))
        jobTag = UInt64(CRC32C.checksum(Array(job.utf8))) | UInt64(job.utf8.count) << 32
        self.rank = rank
        self.worldSize = worldSize
        context = try ZMQContext()
        pull = try context.socket(.pull, maxMessageBytes: maxMessageBytes)
        try pull.setLinger(milliseconds: 0)
        endpoint = try pull.bind("tcp://\(host):*")
    }

    deinit {
        push?.close()
        pull.close()
    }

    /// Connects to the next rank for `epoch`, dropping anything left from before.
    public func connect(peers: [String], epoch: UInt64) throws {
        precondition(peers.count == worldSize, "\(peers.count) peers for a world of \(worldSize)")
        push?.close()
        push = nil
        self.epoch = epoch
        sequence = 0
        guard worldSize > 1 else { return }
        let p = try context.socket(.push, maxMessageBytes: ZMQSocket.sendOnlyMaxMessageBytes)  // sends only
        try p.setLinger(milliseconds: 0)
        try p.setSendHighWaterMark(16)
        try p.connect(peers[(rank + 1) % worldSize])
        push = p
    }

    /// Sums `values` over all ranks in rank order; every rank gets the sum.
    public func allreduceSum(_ values: UnsafeMutableBufferPointer<Float>, interrupt: Int32) throws {
        guard worldSize > 1 else { return }
        sequence += 1
        let bytes = UnsafeMutableRawBufferPointer(values)
        // Reduce: 0 -> 1 -> ... -> N-1, each adding its own values to the running sum.
        if rank > 0 {
            let incoming = try receive(phase: 0, count: bytes.count, interrupt: interrupt)
            incoming.withUnsafeBytes { raw in
                let acc = raw.bindMemory(to: Float.self)
                for i in 0..<values.count { values[i] = acc[i] + values[i] }
            }
        }
        if rank < worldSize - 1 {
            try send(phase: 0, bytes)
        }
        // Share: N-1 -> 0 -> 1 -> ... -> N-2.
        if rank == worldSize - 1 {
            try send(phase: 1, bytes)
        } else {
            let total = try receive(phase: 1, count: bytes.count, interrupt: interrupt)
            total.withUnsafeBytes { raw in _ = memcpy(bytes.baseAddress!, raw.baseAddress!, bytes.count) }
            if rank < worldSize - 2 { try send(phase: 1, bytes) }
        }
    }

    /// True on every rank when `flag` is true on every rank (a barrier too).
    /// Used to take collective decisions, like whether this step snapshots.
    public func allAgree(_ flag: Bool, interrupt: Int32) throws -> Bool {
        guard worldSize > 1 else { return flag }
        var v: [Float] = [flag ? 1 : 0]
        try v.withUnsafeMutableBufferPointer { try allreduceSum($0, interrupt: interrupt) }
        return Int(v[0]) == worldSize  // exact: small integers are exact in Float
    }

    private func send(phase: UInt8, _ payload: UnsafeMutableRawBufferPointer) throws {
        var header = [UInt8](repeating: 0, count: 25)
        withUnsafeBytes(of: epoch.littleEndian) { header.replaceSubrange(0..<8, with: $0) }
        withUnsafeBytes(of: sequence.littleEndian) { header.replaceSubrange(8..<16, with: $0) }
        header[16] = phase
        withUnsafeBytes(of: jobTag.littleEndian) { header.replaceSubrange(17..<25, with: $0) }
        try push!.send([.bytes(header), .bytes(Array(payload))])
    }

    private func receive(phase: UInt8, count: Int, interrupt: Int32) throws -> ZMQMessage {
        let deadline = monotonicSeconds() + receiveTimeoutSeconds
        onWait?((rank + worldSize - 1) % worldSize)
        defer { onWait?(nil) }
        while true {
            let ready = try ZMQPoller.poll([.init(pull, .readable), .init(fileDescriptor: interrupt, .readable)], timeoutMilliseconds: 1000)
            if ready[1].isReadable { throw Interrupted() }
            if !ready[0].isReadable {
                if monotonicSeconds() > deadline {
                    throw SnapshotError(code: .timeout, message: "rank \(rank): no collective message for \(Int(receiveTimeoutSeconds)) s")
                }
                continue
            }
            guard let frames = try pull.receiveMessages(timeoutMilliseconds: 0), frames.count == 2, frames[0].count == 25 else { continue }
            let h = frames[0].bytes
            let tag = h[17..<25].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * $1.offset) }
            if tag != jobTag { continue }  // another job's process
            let e = h[0..<8].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * $1.offset) }
            let q = h[8..<16].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * $1.offset) }
            // Left over from an abandoned collective (older epoch or sequence): drop.
            if e < epoch || (e == epoch && q < sequence) { continue }
            // Each rank hears only from the previous one, in order: anything else is a bug.
            guard e == epoch, q == sequence, h[16] == phase, frames[1].count == count else {
                throw SnapshotError(code: .transport, message: "rank \(rank): collective message epoch \(e) seq \(q) phase \(h[16]) "
                    + "(\(frames[1].count) bytes) while waiting for epoch \(epoch) seq \(sequence) phase \(phase) (\(count) bytes)")
            }
            return frames[1]
        }
    }
}
