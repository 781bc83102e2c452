import FTSystem
import Foundation

/// A job's hosts as network namespaces on this machine: each host (the
/// coordinator's, every node's, every spare's) is a namespace with its own
/// IPv4 address, joined to the others by a veth pair on a bridge in the root
/// namespace. Traffic between hosts crosses two veths and the bridge, as it
/// crosses NICs and a switch between machines; the root namespace (the
/// launcher, `ftctl`) reaches every host through the bridge's address.
///
/// Names carry a tag unique to the run (`ft<tag>-n0`, `ft<tag>b`, …), so runs
/// side by side do not collide. Before anything is created, its name is
/// appended to `RUN_DIR/netns`: `NetnsHosts.remove(recordIn:)` deletes what
/// that file names, whoever created it (a launcher that died, a test that
/// failed halfway through its set-up).
///
/// Faults of the network act on a host's link, the veth end on the bridge:
/// `setLink(_:up:)` cuts a host off (a partition) and mends it;
/// `throttle(_:megabitsPerSecond:)` limits its bandwidth both ways with `tbf`
/// (this kernel has no `netem`).
///
/// Needs root (namespaces, links); `unavailableReason` says why not.
public final class NetnsHosts: @unchecked Sendable {
    public struct Host: Sendable, Equatable {
        /// "coordinator", "n0", "spare0", …
        public var role: String
        /// The namespace, under /run/netns.
        public var namespace: String
        /// The host's IPv4 address.
        public var address: String
        /// The veth end on the bridge (in the root namespace): its link.
        public var link: String
    }

    public let tag: String
    public let bridge: String
    /// The bridge's address: the root namespace as seen from the hosts.
    public let bridgeAddress: String
    public private(set) var hosts: [String: Host] = [:]
    private let record: String
    private let log: String

    /// Why namespaces cannot be made here, or nil when they can.
    public static var unavailableReason: String? {
        if getuid() != 0 { return "network namespaces need root (uid \(getuid()))" }
        for tool in ["ip", "nsenter", "tc"] where ChildProcess.resolve(tool) == nil { return "\(tool) is not installed" }
        return nil
    }

    /// Creates a host per role, in order, each with an address on a /16 of
    /// its own in 10.0.0.0/8 (one no interface of this machine uses). On
    /// failure everything made so far is removed and the error thrown.
    public init(roles: [String], runDirectory: String) throws {
        if let reason = Self.unavailableReason { throw SystemError("network namespaces: \(reason)", errno: EPERM) }
        precondition(!roles.isEmpty && roles.count < 60_000 && Set(roles).count == roles.count)
        record = runDirectory + "/netns"
        log = runDirectory + "/netns.log"
        // 6 characters: bridge and veth names stay within IFNAMSIZ - 1 = 15.
        var random = SystemRandomNumberGenerator()
        tag = String(String(UInt32.random(in: 0...UInt32.max, using: &random) ^ UInt32(getpid()), radix: 36).suffix(6))
        bridge = "ft\(tag)b"
        // Runs starting side by side take turns: each picks a /16 no interface uses yet and
        // puts it on its bridge before the next looks (an exclusive lock until this init ends).
        let lockPath = FileManager.default.fileExists(atPath: "/run/lock") ? "/run/lock/ft-netns.lock" : "/tmp/ft-netns.lock"
        let lock = open(lockPath, O_CREAT | O_RDWR | O_CLOEXEC, 0o600)
        if lock >= 0 { _ = flock(lock, LOCK_EX) }
        defer { if lock >= 0 { close(lock) } }  // closing releases it
        let used = Self.output(["ip", "-4", "-o", "addr", "show"]) + Self.output(["ip", "-4", "route", "show"])
        let seed = Int(tag.unicodeScalars.reduce(UInt32(0)) { $0 &* 31 &+ $1.value } % 200)
        let second = (0..<200).map { 20 + (seed + $0) % 200 }.first { !used.contains(" 10.\($0).") && !used.contains("\n10.\($0).") } ?? 20 + seed
        bridgeAddress = "10.\(second).0.1"
        // What an earlier job in this run directory left (its launcher died) goes first: the record is started anew.
        Self.remove(recordIn: runDirectory)
        guard FileManager.default.createFile(atPath: record, contents: nil) else { throw SystemError("create \(record)", errno: errno) }
        do {
            try note("bridge \(bridge)")
            try ip(["link", "add", bridge, "type", "bridge"])
            try ip(["addr", "add", bridgeAddress + "/16", "dev", bridge])
            try ip(["link", "set", bridge, "up"])
            for (i, role) in roles.enumerated() {
                let n = i + 2
                let host = Host(role: role, namespace: "ft\(tag)-\(role)", address: "10.\(second).\(n >> 8).\(n & 255)",
                                link: "ft\(tag)h\(i)")
                try note("netns \(host.namespace)")
                try ip(["netns", "add", host.namespace])
                try note("link \(host.link)")
                try ip(["link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.namespace])
                try ip(["link", "set", host.link, "master", bridge, "up"])
                try ip(["-n", host.namespace, "addr", "add", host.address + "/16", "dev", "eth0"])
                try ip(["-n", host.namespace, "link", "set", "eth0", "up"])
                try ip(["-n", host.namespace, "link", "set", "lo", "up"])
                try ip(["-n", host.namespace, "route", "add", "default", "via", bridgeAddress])
                hosts[role] = host
            }
        } catch {
            Self.remove(recordIn: runDirectory)
            throw error
        }
    }

    public func host(_ role: String) -> Host {
        guard let h = hosts[role] else { preconditionFailure("no host \(role)") }
        return h
    }

    /// `command` run with only its network in `role`'s namespace (nsenter
    /// execs it: the pid is the command's own).
    public func command(_ role: String, _ command: [String]) -> [String] {
        ["nsenter", "--net=/run/netns/" + host(role).namespace, "--"] + command
    }

    /// Cuts `role`'s host off the network (its link down), or mends it.
    public func setLink(_ role: String, up: Bool) throws {
        try ip(["link", "set", host(role).link, up ? "up" : "down"])
    }

    /// Limits `role`'s link to `megabitsPerSecond` each way with `tbf`
    /// (nil: no limit).
    public func throttle(_ role: String, megabitsPerSecond: Int?) throws {
        let h = host(role)
        for (namespace, device) in [(nil, h.link), (h.namespace, "eth0")] as [(String?, String)] {
            let at = namespace.map { ["-n", $0] } ?? []
            _ = try? run(["tc"] + at + ["qdisc", "del", "dev", device, "root"], quiet: true)
            if let rate = megabitsPerSecond {
                // A bucket of ~4 ms at the rate (at least 64 KiB), a queue of 100 ms.
                let burst = max(64 << 10, rate * 1_000_000 / 8 / 250)
                try run(["tc"] + at + ["qdisc", "add", "dev", device, "root", "tbf", "rate", "\(rate)mbit", "burst", "\(burst)",
                                       "latency", "100ms"])
            }
        }
    }

    /// Deletes every namespace, link and bridge `RUN_DIR/netns` names (those
    /// already gone are skipped), then the record; should any deletion fail,
    /// the record keeps what is left, for the next `remove` or `leftovers`.
    /// Returns what it deleted.
    @discardableResult
    public static func remove(recordIn runDirectory: String) -> [String] {
        let entries = recorded(runDirectory)
        guard !entries.isEmpty else {
            unlink(runDirectory + "/netns")
            return []
        }
        var removed: [String] = []
        // Namespaces first (their veth pairs go with them), then links left in the root, then the bridge.
        for kind in ["netns", "link", "bridge"] {
            for e in entries where e.kind == kind && exists(e) {
                let args = kind == "netns" ? ["ip", "netns", "delete", e.name] : ["ip", "link", "delete", e.name]
                if (try? ChildProcess(arguments: args, environment: [:], outputPath: "/dev/null").wait(timeoutSeconds: 10))?.isSuccess == true {
                    removed.append("\(kind) \(e.name)")
                }
            }
        }
        let left = entries.filter(exists)
        if left.isEmpty {
            unlink(runDirectory + "/netns")
        } else {
            try? left.map { "\($0.kind) \($0.name)\n" }.joined().write(toFile: runDirectory + "/netns", atomically: true, encoding: .utf8)
        }
        return removed
    }

    /// What `RUN_DIR/netns` records and still exists on this machine ("KIND NAME").
    public static func leftovers(recordIn runDirectory: String) -> [String] {
        recorded(runDirectory).filter(exists).map { "\($0.kind) \($0.name)" }
    }

    /// The record's entries: ("netns" | "link" | "bridge", name).
    private static func recorded(_ runDirectory: String) -> [(kind: String, name: String)] {
        let text = (try? String(contentsOfFile: runDirectory + "/netns", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            let p = line.split(separator: " ").map(String.init)
            guard p.count == 2, ["netns", "link", "bridge"].contains(p[0]), !p[1].isEmpty, !p[1].contains("/") else { return nil }
            return (p[0], p[1])
        }
    }

    private static func exists(_ e: (kind: String, name: String)) -> Bool {
        FileManager.default.fileExists(atPath: (e.kind == "netns" ? "/run/netns/" : "/sys/class/net/") + e.name)
    }

    /// The TCP sockets of `pid`'s network namespace (every socket of it, not
    /// only the process's) bound or connected to a loopback address
    /// (127.0.0.0/8, ::1, ::ffff:127.x): "LOCAL -> REMOTE" in /proc's hex.
    /// On a namespace host, where every peer is another host, there must be none.
    public static func loopbackSockets(namespaceOf pid: Int32) -> [String] {
        var found: [String] = []
        for file in ["tcp", "tcp6"] {
            let text = (try? String(contentsOfFile: "/proc/\(pid)/net/\(file)", encoding: .utf8)) ?? ""
            for line in text.split(separator: "\n").dropFirst() {
                let fields = line.split(separator: " ")
                guard fields.count > 3 else { continue }
                let ends = [fields[1], fields[2]].map { $0.split(separator: ":").first.map(String.init) ?? "" }
                if ends.contains(where: isLoopback) { found.append("\(fields[1]) -> \(fields[2])") }
            }
        }
        return found
    }

    /// Whether a /proc/net/tcp{,6} address (hex, in the kernel's byte order) is loopback.
    static func isLoopback(_ hex: String) -> Bool {
        switch hex.count {
        case 8: return hex.hasSuffix("7F")  // IPv4, little-endian words: 127.x.y.z ends in 7F
        case 32: return hex == "00000000000000000000000001000000" || (hex.hasPrefix("0000000000000000FFFF0000") && hex.hasSuffix("7F"))
        default: return false
        }
    }

    /// Removes everything this object made.
    public func remove() {
        Self.remove(recordIn: String(record.dropLast("/netns".count)))
    }

    private func note(_ line: String) throws {
        guard let h = FileHandle(forWritingAtPath: record) else { throw SystemError("open \(record)", errno: errno) }
        defer { try? h.close() }
        try h.seekToEnd()
        try h.write(contentsOf: Data((line + "\n").utf8))
        try h.synchronize()
    }

    private func ip(_ args: [String]) throws { try run(["ip"] + args) }

    private func run(_ args: [String], quiet: Bool = false) throws {
        let p = try ChildProcess(arguments: args, environment: ["PATH": "/usr/sbin:/usr/bin:/sbin:/bin"], outputPath: log)
        guard let status = p.wait(timeoutSeconds: 20) else {
            p.kill(SIGKILL)
            throw SystemError("\(args.joined(separator: " ")): no answer in 20 s", errno: ETIMEDOUT)
        }
        guard status.isSuccess || quiet else {
            let tail = (try? String(contentsOfFile: log, encoding: .utf8))?.split(separator: "\n").last.map(String.init) ?? ""
            throw SystemError("\(args.joined(separator: " ")): \(status) (\(tail))", errno: EIO)
        }
    }

    /// What a command printed (stdout and stderr), after a newline; "" when it
    /// could not run or took more than 10 s.
    public static func output(_ args: [String]) -> String {
        let path = NSTemporaryDirectory() + "ft-netns-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).out"
        defer { unlink(path) }
        guard let p = try? ChildProcess(arguments: args, environment: ["PATH": "/usr/sbin:/usr/bin:/sbin:/bin"], outputPath: path),
              p.wait(timeoutSeconds: 10) != nil else { return "" }
        return "\n" + ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "")
    }
}
