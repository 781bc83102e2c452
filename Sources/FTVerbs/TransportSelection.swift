import Logging

/// Which inter-node data transport a process uses, and why.
public enum DataTransportChoice: Sendable, Equatable {
    /// RDMA over the named device.
    case rdma(device: String)
    /// ZeroMQ over TCP, with the reason RDMA was not used.
    case tcp(reason: String)
}

extension RDMADevices {
    /// Picks RDMA when a usable device exists and `preferRDMA` is set, TCP
    /// otherwise, and logs exactly one line saying which and why.
    public static func chooseTransport(preferRDMA: Bool = true, logger: Logger) -> DataTransportChoice {
        guard preferRDMA else {
            logger.info("data plane: TCP (RDMA disabled by configuration)")
            return .tcp(reason: "RDMA disabled by configuration")
        }
        switch discover() {
        case .success(let devices):
            guard let device = devices.first(where: { $0.openError == nil && $0.portCount > 0 }) else {
                let reason = "no RDMA device with a usable port"
                logger.info("data plane: TCP (\(reason))")
                return .tcp(reason: reason)
            }
            logger.info("data plane: RDMA on \(device.name)", metadata: ["guid": "\(String(device.guid, radix: 16))"])
            return .rdma(device: device.name)
        case .failure(let unavailable):
            logger.info("data plane: TCP (\(unavailable.message))",
                        metadata: ["rdma.code": "\(unavailable.code.rawValue)", "rdma.errno": "\(unavailable.errno)"])
            return .tcp(reason: unavailable.message)
        }
    }
}
