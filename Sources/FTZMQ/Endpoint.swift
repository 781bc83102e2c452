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
}
