import FTCore
import FTSMP
import FTSystem
import FTWorker
import FTZMQ
import Glibc
import Testing

@Suite("One error vocabulary (shell modules)")
struct CodedErrorShellTests {
    @Test("system, ZeroMQ, SMP and worker-library errors carry stable codes")
    func codes() throws {
        let errors: [any Error] = [
            SystemError("open /x", errno: ENOENT), SystemError("odd", errno: 4095),
            ZMQError(.addressInUse, errno: EADDRINUSE, operation: "bind", message: "taken"),
            SMPError(.notHeld, "n0 does not hold step 3"),
            SnapshotError(code: .timeout, message: "no reply"),
        ]
        #expect(errors.map(errorCode) == ["enoent", "errno_4095", "address_in_use", "not_held", "timeout"])
        // A node id the SMP cannot take is a coded refusal, not a string to match.
        #expect(throws: SMPError.self) { try SMPConfiguration.validateID("bad id", "node") }
        do {
            try SMPConfiguration.validateID("bad id", "node")
        } catch {
            #expect(error.code == .invalidIdentifier)
        }
    }
}
