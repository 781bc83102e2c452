import Foundation

/// A small HTTP/1.1 server for Prometheus scrapes: `GET /metrics` answers the
/// exposition text, anything else 404 (405 for other methods), each on its
/// own connection (`Connection: close`). One thread accepts and answers in
/// turn; a client gets 2 s to send its request line. It never touches the
/// coordinator's state: `body` reads what the coordinator's loop published.
public final class MetricsHTTPServer: @unchecked Sendable {
    public let host: String
    public private(set) var port: Int = 0
    private let fd: Int32
    private let body: @Sendable () -> String
    private var thread: Thread?
    private let stopping = NSLock()
    private var stopped = false

    /// `address`: `HOST:PORT` (IPv4; port 0 picks a free one).
    public init(address: String, body: @escaping @Sendable () -> String) throws {
        guard let colon = address.lastIndex(of: ":"), let p = Int(address[address.index(after: colon)...]), (0...65535).contains(p) else {
            throw MetricsServerError("metrics address '\(address)' is not HOST:PORT")
        }
        host = String(address[..<colon])
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(p).bigEndian)
        guard inet_pton(AF_INET, host, &addr.sin_addr) == 1 else {
            throw MetricsServerError("metrics address '\(address)': '\(host)' is not an IPv4 address")
        }
        self.body = body
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw MetricsServerError("socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 16) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw MetricsServerError("cannot serve metrics on \(address): \(reason)")
        }
        var got = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &got) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        port = Int(UInt16(bigEndian: got.sin_port))
        let t = Thread { [self] in serve() }
        t.name = "metrics-http"
        thread = t
        t.start()
    }

    /// The URL Prometheus scrapes.
    public var url: String { "http://\(host):\(port)/metrics" }

    /// Stops accepting (the thread ends at its next connection or within 200 ms).
    public func stop() {
        stopping.withLock { stopped = true }
    }

    deinit { close(fd) }

    private var isStopped: Bool { stopping.withLock { stopped } }

    private func serve() {
        while !isStopped {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 200) > 0 else { continue }
            let client = accept(fd, nil, nil)
            guard client >= 0 else { continue }
            answer(client)
            close(client)
        }
    }

    private func answer(_ client: Int32) {
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(client, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        // The request line and headers (at most 8 KiB; the body, if any, is not read).
        var request: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 2048)
        while request.count < 8192, !request.containsHeaderEnd {
            let n = recv(client, &buf, buf.count, 0)
            if n <= 0 { break }
            request += buf[0..<n]
        }
        let line = String(decoding: request.prefix { $0 != 13 && $0 != 10 }, as: UTF8.self).split(separator: " ")
        let status: String
        var text: String
        var type = "text/plain; charset=utf-8"
        if line.count >= 2, line[0] == "GET", line[1] == "/metrics" || line[1].hasPrefix("/metrics?") {
            status = "200 OK"
            text = body()
            type = "text/plain; version=0.0.4; charset=utf-8"
        } else if line.count >= 2, line[0] != "GET" {
            status = "405 Method Not Allowed"
            text = "only GET /metrics\n"
        } else {
            status = "404 Not Found"
            text = "not found: this server answers GET /metrics\n"
        }
        let head = "HTTP/1.1 \(status)\r\nContent-Type: \(type)\r\nContent-Length: \(text.utf8.count)\r\nConnection: close\r\n\r\n"
        let bytes = Array((head + text).utf8)
        var sent = 0
        while sent < bytes.count {
            let n = bytes[sent...].withUnsafeBytes { send(client, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { break }
            sent += n
        }
    }
}

public struct MetricsServerError: Error, CustomStringConvertible {
    public let description: String
    init(_ d: String) { description = d }
}

extension Array where Element == UInt8 {
    fileprivate var containsHeaderEnd: Bool {
        guard count >= 4 else { return false }
        for i in 0...(count - 4) where self[i] == 13 && self[i + 1] == 10 && self[i + 2] == 13 && self[i + 3] == 10 { return true }
        return false
    }
}
