import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import FTVerbs

@Suite("ibverbs discovery")
struct RDMADiscoveryTests {
    /// Whether the kernel exposes any RDMA device at all.
    var hostHasRDMA: Bool { access("/sys/class/infiniband", F_OK) == 0 }

    @Test("reports the devices, or no device with the reason, without crashing")
    func discover() {
        switch RDMADevices.discover() {
        case .success(let devices):
            #expect(hostHasRDMA, "devices reported on a host without /sys/class/infiniband: \(devices)")
            #expect(!devices.isEmpty)
        case .failure(let reason):
            #expect(!reason.message.isEmpty)
            #expect(reason.message.contains("using TCP"))
            if !hostHasRDMA {
                // The case of this project's machines: libibverbs returns NULL with ENOSYS.
                #expect([RDMAUnavailable.Code.noKernelSupport, .noDevice].contains(reason.code), "\(reason)")
            }
            if reason.code == .noKernelSupport {
                #expect(reason.errno == ENOSYS)
                #expect(reason.message.contains("ENOSYS"))
            }
        }
    }

    @Test("ENOSYS maps to 'no kernel support', other errnos to 'list failed'")
    func errnoMapping() {
        let nosys = RDMADevices.unavailable(listErrno: ENOSYS)
        #expect(nosys.code == .noKernelSupport)
        #expect(nosys.errno == ENOSYS)
        let perm = RDMADevices.unavailable(listErrno: EACCES)
        #expect(perm.code == .listFailed)
        #expect(perm.errno == EACCES)
        #expect(perm.description.contains("RDMA unavailable"))
    }

    @Test("querying a port of a device that does not exist is an error, not a crash")
    func portOfMissingDevice() throws {
        let port = RDMADevices.port(1, of: "no-such-device-0")
        let reason = try #require({ if case .failure(let r) = port { r } else { nil } }(), "a port of a nonexistent device was reported: \(port)")
        #expect(reason.errno != 0)
    }
}

import Logging
import Synchronization

/// Collects log lines in memory.
final class CapturingLogHandler: LogHandler, @unchecked Sendable {
    let lines = Mutex<[String]>([])
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) {
        lines.withLock { $0.append("\(event.level) \(event.message)") }
    }
}

@Suite("data transport choice")
struct TransportChoiceTests {
    @Test("without a usable RDMA device the choice is TCP, with one log line giving the reason",
          .enabled(if: access("/sys/class/infiniband", F_OK) != 0, "this host has /sys/class/infiniband, so RDMA may be chosen"))
    func fallsBackToTCP() throws {
        let handler = CapturingLogHandler()
        let logger = Logger(label: "test") { _ in handler }
        let choice = RDMADevices.chooseTransport(logger: logger)
        let reason = try #require({ if case .tcp(let r) = choice { r } else { nil } }(), "chose \(choice) on a host without RDMA")
        #expect(!reason.isEmpty)
        let lines = handler.lines.withLock { $0 }
        #expect(lines.count == 1)
        #expect(lines.first?.contains("data plane: TCP") == true)
        #expect(lines.first?.contains(reason) == true)
    }

    @Test("RDMA disabled by configuration is TCP and says so")
    func disabled() {
        let handler = CapturingLogHandler()
        let choice = RDMADevices.chooseTransport(preferRDMA: false, logger: Logger(label: "test") { _ in handler })
        #expect(choice == .tcp(reason: "RDMA disabled by configuration"))
        #expect(handler.lines.withLock { $0 }.count == 1)
    }
}
