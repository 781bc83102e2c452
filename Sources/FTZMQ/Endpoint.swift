#if canImport(Glibc)
import Glibc
#endif

/// What a ZeroMQ endpoint exposes: whether only this host can reach it.
public enum ZMQEndpoint {
    /// Whether binding `endpoint` listens on this host only: `ipc://` and
    /// `inproc://`, or `tcp://` on a loopback address (127.0.0.0/8, `[::1]`,
    /// `localhost`). A wildcard (`*`, `0.0.0.0`, `[::]`), an interface name
    /// or any other address is reachable from the network.
    public static func isLoopbackOnly(_ endpoint: String) -> Bool {
        if endpoint.hasPrefix("ipc://") || endpoint.hasPrefix("inproc://") { return true }
        guard endpoint.hasPrefix("tcp://") else { return false }
        var host = Substring(endpoint.dropFirst("tcp://".count))
        // A source address (tcp://SRC;DEST) is not what is bound.
        if let semicolon = host.firstIndex(of: ";") { host = host[host.index(after: semicolon)...] }
        if host.hasPrefix("[") {
            guard let close = host.firstIndex(of: "]") else { return false }
            return host[host.index(after: host.startIndex)..<close] == "::1"
        }
        guard let colon = host.lastIndex(of: ":") else { return false }
        host = host[..<colon]
        if host == "localhost" { return true }
        let octets = host.split(separator: ".", omittingEmptySubsequences: false)
        guard octets.count == 4, octets.allSatisfy({ UInt8($0) != nil }) else { return false }
        return octets[0] == "127"
    }

    /// The host of a `tcp://HOST:PORT` endpoint (without brackets), nil for
    /// any other transport.
    public static func host(of endpoint: String) -> String? {
        guard endpoint.hasPrefix("tcp://") else { return nil }
        var rest = Substring(endpoint.dropFirst("tcp://".count))
        if let semicolon = rest.firstIndex(of: ";") { rest = rest[rest.index(after: semicolon)...] }
        guard let colon = rest.lastIndex(of: ":") else { return nil }
        let host = rest[..<colon]
        return String(host.hasPrefix("[") && host.hasSuffix("]") ? host.dropFirst().dropLast() : host)
    }

    /// The IPv4 address of this host's interface that the routing table
    /// sends `destination` (an IPv4 address) through: what a peer there sees
    /// as this host. No packet is sent (a UDP socket is only connected).
    /// nil when `destination` is not an IPv4 address or no route reaches it.
    public static func sourceAddress(toward destination: String) -> String? {
        var to = sockaddr_in()
        to.sin_family = sa_family_t(AF_INET)
        to.sin_port = in_port_t(UInt16(9).bigEndian)
        guard inet_pton(AF_INET, destination, &to.sin_addr) == 1 else { return nil }
        let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        let connected = withUnsafePointer(to: &to) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { return nil }
        var local = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let named = withUnsafeMutablePointer(to: &local) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard named == 0 else { return nil }
        var text = [CChar](repeating: 0, count: Int(INET_ADDRSTRLEN))
        guard inet_ntop(AF_INET, &local.sin_addr, &text, socklen_t(text.count)) != nil else { return nil }
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
