import CVerbsShim
import FTCore
#if canImport(Glibc)
import Glibc
#endif

/// One RDMA device as libibverbs reports it.
public struct RDMADevice: Sendable, Equatable {
    public var name: String
    /// The node GUID in host byte order.
    public var guid: UInt64
    /// Physical ports; 0 when the device could not be opened (see `openError`).
    public var portCount: Int
    /// errno from opening or querying the device, nil when that worked.
    public var openError: Int32?
}

/// Why no RDMA transport can be used: a stable code, the errno behind it and
/// a sentence for the one log line that explains the fallback to TCP.
public struct RDMAUnavailable: CodedError, Equatable {
    public enum Code: String, Sendable {
        /// The kernel has no RDMA support (libibverbs: NULL with ENOSYS).
        case noKernelSupport = "no_kernel_support"
        /// The device list was read and is empty.
        case noDevice = "no_device"
        /// Devices exist but none could be opened.
        case noUsableDevice = "no_usable_device"
        /// The device list could not be read for another reason.
        case listFailed = "list_failed"
    }

    public var code: Code
    /// The errno from libibverbs, 0 when none applies.
    public var errno: Int32
    public var message: String

    public var description: String { "RDMA unavailable (\(code.rawValue)): \(message)" }
}

/// RDMA device discovery over libibverbs.
public enum RDMADevices {
    /// The RDMA devices of this host, or why there are none.
    public static func discover() -> Result<[RDMADevice], RDMAUnavailable> {
        var capacity = 16
        while true {
            var infos = [ft_verbs_device_info](repeating: ft_verbs_device_info(), count: capacity)
            var err: Int32 = 0
            let n = Int(ft_verbs_list_devices(&infos, Int32(capacity), &err))
            if n < 0 { return .failure(unavailable(listErrno: err)) }
            if n > capacity { capacity = n; continue }
            if n == 0 {
                return .failure(RDMAUnavailable(code: .noDevice, errno: 0,
                                                message: "libibverbs found no RDMA device; using TCP"))
            }
            let devices = infos[0..<n].map { info -> RDMADevice in
                var i = info
                let name = withUnsafeBytes(of: &i.name) { raw in
                    String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
                }
                return RDMADevice(name: name, guid: info.guid, portCount: Int(info.phys_port_cnt),
                                  openError: info.open_errno == 0 ? nil : info.open_errno)
            }
            if devices.allSatisfy({ $0.openError != nil }) {
                let detail = devices.map { "\($0.name): \(String(cString: strerror($0.openError!)))" }.joined(separator: ", ")
                return .failure(RDMAUnavailable(code: .noUsableDevice, errno: devices[0].openError!,
                                                message: "no RDMA device could be opened (\(detail)); using TCP"))
            }
            return .success(devices)
        }
    }

    static func unavailable(listErrno err: Int32) -> RDMAUnavailable {
        let text = String(cString: strerror(err))
        if err == ENOSYS {
            return RDMAUnavailable(code: .noKernelSupport, errno: err,
                                   message: "ibv_get_device_list failed with ENOSYS (\(text)): this kernel has no RDMA support "
                                       + "(no ib_uverbs, no soft-RoCE); using TCP")
        }
        return RDMAUnavailable(code: .listFailed, errno: err,
                               message: "ibv_get_device_list failed: \(text) (errno \(err)); using TCP")
    }

    /// State of one port, for a device that `discover()` returned.
    public struct PortState: Sendable, Equatable {
        /// `ibv_port_state`: 4 is ACTIVE.
        public var state: Int
        public var activeMTU: Int
        public var linkLayer: Int
        public var lid: UInt16
        public var isActive: Bool { state == 4 }
    }

    /// Queries port `port` (1-based) of device `name`; the errno on failure.
    public static func port(_ port: UInt8, of name: String) -> Result<PortState, RDMAUnavailable> {
        var info = ft_verbs_port_info()
        var err: Int32 = 0
        guard ft_verbs_query_port(name, port, &info, &err) == 0 else {
            return .failure(RDMAUnavailable(code: .noUsableDevice, errno: err,
                                            message: "port \(port) of \(name): \(String(cString: strerror(err)))"))
        }
        return .success(PortState(state: Int(info.state), activeMTU: Int(info.active_mtu),
                                  linkLayer: Int(info.link_layer), lid: info.lid))
    }
}
