import Foundation
import Testing
@testable import FTCore

/// Inputs that crashed a fuzz target (`fuzz/run`), kept as regression tests:
/// each is checked the way its target checks every input.
@Suite("Fuzz regressions")
struct FuzzRegressionTests {
    /// fuzz/run wire (crash-2a4c1b75…): a sender of 110 bytes that are not
    /// UTF-8 decoded to 330 bytes of U+FFFD, which encoding cut at 255 bytes
    /// mid-character: the envelope did not round-trip. Such a sender is now refused.
    @Test("wire: a sender that is not UTF-8 is refused (it did not round-trip)")
    func nonUTF8Sender() throws {
        let frame = try #require(Data(base64Encoded: "RlRXAAIAcAACAAAAAAAAAG4AAjAi//////////////////////////////////////////////////////////////////////////////////////////////////8AAAAFAAAAAAAAAAEAAAAAAAAAAAIBAAAAAAAAAAMAAAAAAAAA"))
        let error = #expect(throws: WireError.self) { try WireEnvelope(decoding: Array(frame)) }
        #expect(error?.code == .badValue)
        // Every valid sender round-trips, the longest included.
        let longest = String(repeating: "é", count: 127)  // 254 bytes
        let e = WireEnvelope(type: 1, epoch: 2, sender: longest, payload: [1])
        #expect(try WireEnvelope(decoding: e.encoded()) == e)
    }

    /// fuzz/run coordinator (crash-8063e2f6…): a member's envelope carried an
    /// epoch near UInt64.max; a coordinator taking over adopts the largest
    /// epoch it hears and adds one, which trapped. Envelopes now carry at most
    /// `WireLimits.maxEpoch`.
    @Test("coordinator: an epoch past WireLimits.maxEpoch is refused; the largest allowed survives a takeover")
    func hugeEpoch() throws {
        let huge = WireEnvelope(type: 1, epoch: .max, sender: "n0", payload: [])
        let error = #expect(throws: WireError.self) { try WireEnvelope(decoding: huge.encoded()) }
        #expect(error?.code == .outOfRange)
        let largest = WireEnvelope(type: 1, epoch: WireLimits.maxEpoch, sender: "n0", payload: [])
        #expect(try WireEnvelope(decoding: largest.encoded()) == largest)

        var c = CoordinatorInstance(settings: CoordinatorSettings(jobID: "t", nodes: 1, workersPerNode: 1))
        _ = c.receive(.smpHello(.init(node: "n0", pid: 10, dataEndpoint: "tcp://d", workers: ["w0"], rankOffset: 0, committedStep: 5,
                                      stagedStep: nil, protectedStep: nil, layoutChunkBytes: 0)),
                      from: "n0", epoch: WireLimits.maxEpoch, now: 0)
        _ = c.receive(.workerHello(.init(node: "n0", worker: "w0", rank: 0, worldSize: 1, pid: 11, collectiveEndpoint: "r")),
                      from: "n0/w0", epoch: WireLimits.maxEpoch, now: 0.01)
        _ = c.tick(now: 30)
        #expect(c.epoch > WireLimits.maxEpoch)  // adopted, then raised by the takeover
    }

    /// fuzz/run control (CI at stop 29; the input was not kept): a worker
    /// heartbeat's blocked time is sent as whole microseconds and read back
    /// as seconds. Truncating seconds * 1e6 turned 249 µs into 248, so the
    /// message did not round-trip. The encoder now rounds, and the decoder
    /// takes at most `WireLimits.maxMicroseconds`, below which the round trip is exact.
    @Test("control: a worker heartbeat's blocked time survives a round trip, every microsecond count below 10^5 and the largest allowed")
    func blockedMicroseconds() throws {
        func heartbeat(_ micros: Int) -> ControlMessage {
            .workerHeartbeat(step: 3, running: true, skipped: 0, activity: .idle, snapshots: 1,
                             blockedSeconds: Double(micros) / 1e6)
        }
        var broken: [Int] = []
        for us in Array(0..<100_000) + [WireLimits.maxMicroseconds - 1, WireLimits.maxMicroseconds] {
            let m = heartbeat(us)
            let again = try ControlMessage.decode(m.envelope(sender: "n0/w0", epoch: 3).encoded()).0
            if again != m { broken.append(us) }
        }
        #expect(broken.isEmpty, "blocked times that did not round-trip: \(broken.prefix(5)) (of \(broken.count))")
        // Past the bound: sent as the bound, never refused.
        let huge = ControlMessage.workerHeartbeat(step: 3, running: true, skipped: 0, activity: .idle, snapshots: 1, blockedSeconds: 1e300)
        let decoded = try ControlMessage.decode(huge.envelope(sender: "n0/w0", epoch: 3).encoded()).0
        #expect(decoded == heartbeat(WireLimits.maxMicroseconds))
    }
}
