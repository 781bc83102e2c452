import FTLauncher
import FTSystem
import Foundation
import Synchronization

/// The transport ceiling between network-namespace hosts: `ECTraffic` moved
/// over plain TCP sockets (no ZeroMQ, no CURVE, nothing done with the bytes),
/// one process per node in the node's namespace, one connection per stream,
/// every stream at once. Each process is `ft-bench tcp-stream`
/// (`TCPStreamNode`) started under `nsenter`; they connect, say they are
/// ready, and start sending together once a file appears.
public struct TransportCeiling {
    /// The ft-bench executable.
    public var binary: String
    public var repetitions = 3
    public var port = 7300

    public init(binary: String) { self.binary = binary }

    /// Seconds `traffic` takes between `hosts` (roles "n0", "n1", …): from
    /// the first process's start to the last byte received, median over the
    /// repetitions. `directory` holds the processes' files.
    public func seconds(_ traffic: ECTraffic, on hosts: NetnsHosts, directory: String) throws -> Double {
        var times: [Double] = []
        for rep in 0..<repetitions {
            let dir = directory + "/\(rep)"
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            times.append(try once(traffic, on: hosts, directory: dir, port: port + rep))
        }
        return median(times)
    }

    func once(_ traffic: ECTraffic, on hosts: NetnsHosts, directory dir: String, port: Int) throws -> Double {
        let go = dir + "/go"
        unlink(go)
        var started: [(node: Int, process: ChildProcess)] = []
        defer {
            for (_, p) in started where p.poll() == nil {
                p.kill(SIGKILL)
                p.wait(timeoutSeconds: 5)
            }
        }
        for n in traffic.activeNodes {
            let role = "n\(n)"
            let incoming = traffic.received(by: n).count
            var args = [binary, "tcp-stream", "--accept", "\(incoming)", "--ready", dir + "/ready-\(role)", "--go", go]
            if incoming > 0 { args += ["--listen", "\(hosts.host(role).address):\(port)"] }
            for s in traffic.sent(by: n) { args += ["--send", "\(hosts.host("n\(s.to)").address):\(port):\(s.bytes)"] }
            started.append((n, try ChildProcess(arguments: hosts.command(role, args), environment: ProcessInfo.processInfo.environment,
                                                outputPath: dir + "/\(role).out")))
        }
        func output(_ n: Int) -> String { (try? String(contentsOfFile: dir + "/n\(n).out", encoding: .utf8)) ?? "" }
        // Every process listening and connected to its peers.
        let deadline = monotonicSeconds() + 60
        while !started.allSatisfy({ access(dir + "/ready-n\($0.node)", F_OK) == 0 }) {
            if let ended = started.first(where: { $0.process.poll() != nil }) {
                throw BenchError(.unexpectedOutcome, "tcp-stream on n\(ended.node) ended before the start: \(output(ended.node).suffix(2000))")
            }
            if monotonicSeconds() > deadline { throw BenchError(.timeout, "the tcp-stream processes were not ready within 60 s") }
            usleep(2000)
        }
        guard FileManager.default.createFile(atPath: go, contents: nil) else { throw BenchError(.io, "cannot create \(go)") }
        // Generous: 20 MB/s at the least.
        let limit = 60 + Double(traffic.totalBytes) / 20e6
        var goSeen: [Double] = []
        var ends: [Double] = []
        for (n, p) in started {
            guard let status = p.wait(timeoutSeconds: limit) else {
                throw BenchError(.timeout, "tcp-stream on n\(n) did not finish within \(Int(limit)) s")
            }
            let text = output(n)
            guard status.isSuccess, let line = text.split(separator: "\n").last(where: { $0.hasPrefix("{") }),
                  let o = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                  let seen = o["go"] as? Double, let end = o["end"] as? Double else {
                throw BenchError(.unexpectedOutcome, "tcp-stream on n\(n): \(status): \(text.suffix(2000))")
            }
            let expected = traffic.received(by: n).reduce(0) { $0 + $1.bytes }
            guard jsonInt(o["received"]) == expected else {
                throw BenchError(.unexpectedOutcome, "tcp-stream on n\(n) received \(jsonInt(o["received"])) bytes, not \(expected)")
            }
            goSeen.append(seen)
            ends.append(end)
        }
        return ends.max()! - goSeen.min()!
    }
}

/// One node of a `TransportCeiling` measurement (`ft-bench tcp-stream`):
/// listens for `accept` connections and reads each to its end; connects to
/// every `sends` target; creates `readyPath` once all of that is set up;
/// waits for `goPath` to exist; then sends each target its bytes, every
/// stream on a thread of its own, 4 MiB per `write`. Returns a JSON line:
/// bytes received and sent, when it saw the go file, when its last stream
/// ended (CLOCK_MONOTONIC seconds, the same in every namespace).
public struct TCPStreamNode: Sendable {
    public struct Target: Sendable {
        public var host: String
        public var port: Int
        public var bytes: Int

        /// "HOST:PORT:BYTES".
        public init?(_ text: String) {
            let parts = text.split(separator: ":").map(String.init)
            guard parts.count == 3, let port = Int(parts[1]), let bytes = Int(parts[2]), (1...65535).contains(port), bytes >= 0 else { return nil }
            (host, self.port, self.bytes) = (parts[0], port, bytes)
        }
    }

    public var listen: (host: String, port: Int)?
    public var accept = 0
    public var sends: [Target] = []
    public var readyPath: String
    public var goPath: String
    public var bufferBytes = 4 << 20

    public init(readyPath: String, goPath: String) {
        self.readyPath = readyPath
        self.goPath = goPath
    }

    final class Tally: @unchecked Sendable {
        let state = Mutex<(received: Int, sent: Int, end: Double, error: String?)>((0, 0, 0, nil))
        let done = DispatchGroup()

        func finished(received: Int = 0, sent: Int = 0, error: String? = nil) {
            let now = monotonicSeconds()
            state.withLock {
                $0.received += received
                $0.sent += sent
                $0.end = max($0.end, now)
                if $0.error == nil { $0.error = error }
            }
            done.leave()
        }
    }

    public func run() throws -> String {
        let tally = Tally()
        let bufferBytes = self.bufferBytes
        if accept > 0 {
            guard let listen else { throw BenchError(.unexpectedOutcome, "tcp-stream: --accept without --listen") }
            let listener = try Self.socket(listen.host, listen.port, listening: true)
            for _ in 0..<accept { tally.done.enter() }
            let count = accept
            Thread {
                for i in 0..<count {
                    let fd = Glibc.accept(listener, nil, nil)
                    guard fd >= 0 else {
                        let e = errno
                        for _ in i..<count { tally.finished(error: "accept: errno \(e)") }
                        return
                    }
                    Thread {
                        let buffer = UnsafeMutableRawPointer.allocate(byteCount: bufferBytes, alignment: 4096)
                        defer { buffer.deallocate(); close(fd) }
                        var got = 0
                        while true {
                            let n = read(fd, buffer, bufferBytes)
                            if n > 0 { got += n } else if n < 0 && errno == EINTR { continue } else { break }
                        }
                        tally.finished(received: got)
                    }.start()
                }
                close(listener)
            }.start()
        }
        // Peers may not listen yet: retry for a while.
        var connections: [(fd: Int32, bytes: Int)] = []
        for t in sends {
            let deadline = monotonicSeconds() + 30
            while true {
                do {
                    connections.append((try Self.socket(t.host, t.port, listening: false), t.bytes))
                    break
                } catch {
                    if monotonicSeconds() > deadline { throw error }
                    usleep(5000)
                }
            }
        }
        guard FileManager.default.createFile(atPath: readyPath, contents: nil) else { throw BenchError(.io, "cannot create \(readyPath)") }
        let waitUntil = monotonicSeconds() + 120
        while access(goPath, F_OK) != 0 {
            if monotonicSeconds() > waitUntil { throw BenchError(.timeout, "tcp-stream: no \(goPath) within 120 s") }
            usleep(200)
        }
        let go = monotonicSeconds()
        let source = AlignedBuffer(count: bufferBytes, fill: 0x5A)
        for (fd, bytes) in connections {
            tally.done.enter()
            Thread {
                var left = bytes
                var failure: String?
                while left > 0 {
                    let n = write(fd, source.base, min(left, bufferBytes))
                    if n > 0 { left -= n } else if n < 0 && errno == EINTR { continue } else { failure = "write: errno \(errno)"; break }
                }
                shutdown(fd, Int32(SHUT_WR))
                close(fd)
                tally.finished(sent: bytes - left, error: failure)
            }.start()
        }
        tally.done.wait()
        let s = tally.state.withLock { $0 }
        if let error = s.error { throw BenchError(.io, "tcp-stream: \(error)") }
        return withExtendedLifetime(source) {
            "{\"received\": \(s.received), \"sent\": \(s.sent), \"go\": \(String(format: "%.6f", go)), \"end\": \(String(format: "%.6f", max(s.end, go)))}"
        }
    }

    /// A TCP socket bound and listening on, or connected to, `host:port`.
    static func socket(_ host: String, _ port: Int, listening: Bool) throws -> Int32 {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        guard inet_pton(AF_INET, host, &address.sin_addr) == 1 else { throw BenchError(.unexpectedOutcome, "not an IPv4 address: \(host)") }
        let fd = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw BenchError(.io, "socket: errno \(errno)") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let rc = withUnsafePointer(to: &address) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { a in
                listening ? (bind(fd, a, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 ? Glibc.listen(fd, 64) : -1)
                          : connect(fd, a, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard rc == 0 else {
            let e = errno
            close(fd)
            throw BenchError(.io, "\(listening ? "listen on" : "connect to") \(host):\(port): errno \(e)")
        }
        return fd
    }
}
