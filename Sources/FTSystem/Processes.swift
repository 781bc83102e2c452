import CPlatform
#if canImport(Glibc)
import Glibc
#endif

/// How a child process ended.
public enum ExitStatus: Sendable, Equatable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32)

    public var description: String {
        switch self {
        case .exited(let code): "exit \(code)"
        case .signaled(let sig): "signal \(sig)\(sig == SIGKILL ? " (SIGKILL)" : sig == SIGTERM ? " (SIGTERM)" : "")"
        }
    }

    public var isSuccess: Bool { self == .exited(0) }
}

/// A child process started with `posix_spawn`, watched through a pidfd so
/// that its exit is seen at once by `poll` (no timeout, no SIGCHLD races).
public final class ChildProcess: @unchecked Sendable {
    public let pid: pid_t
    /// Readable once the child has exited; -1 where pidfds are unavailable.
    public let pidfd: Int32
    public private(set) var status: ExitStatus?

    /// Starts `arguments[0]` (a path, or a name looked up in PATH) with
    /// `environment`. `newProcessGroup` puts it in its own process group;
    /// `outputPath` receives its stdout and stderr (appended) instead of ours.
    public init(arguments: [String], environment: [String: String], newProcessGroup: Bool = false,
                outputPath: String? = nil) throws(SystemError) {
        precondition(!arguments.isEmpty)
        guard let path = Self.resolve(arguments[0]) else {
            throw SystemError("spawn \(arguments[0]): not found or not executable", errno: ENOENT)
        }
        let argv = arguments.map { strdup($0) } + [nil]
        let envp = environment.sorted { $0.key < $1.key }.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var err: Int32 = 0
        let pid = ft_spawn(path, argv, envp, newProcessGroup ? 1 : 0, outputPath, &err)
        guard pid > 0 else { throw SystemError("spawn \(path)", errno: err) }
        self.pid = pid
        self.pidfd = ft_pidfd_open(pid)
    }

    deinit { if pidfd >= 0 { close(pidfd) } }

    /// Reaps the child if it has exited; returns its status, or nil while it runs.
    @discardableResult
    public func poll() -> ExitStatus? {
        if let status { return status }
        var raw: Int32 = 0
        let rc = waitpid(pid, &raw, WNOHANG)
        guard rc == pid else { return nil }
        status = Self.decode(raw)
        return status
    }

    /// Waits for the child to exit, at most `timeoutSeconds`; nil on timeout.
    @discardableResult
    public func wait(timeoutSeconds: Double) -> ExitStatus? {
        let deadline = monotonicSeconds() + timeoutSeconds
        while true {
            if let s = poll() { return s }
            let left = deadline - monotonicSeconds()
            if left <= 0 { return nil }
            if pidfd >= 0 {
                var p = pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0)
                _ = Glibc.poll(&p, 1, Int32(min(left, 1) * 1000) + 1)
            } else {
                usleep(2000)
            }
        }
    }

    /// Sends `signal` to the child (only while it has not been reaped, so a
    /// recycled pid is never signalled).
    public func kill(_ signal: Int32) {
        if status == nil { _ = Glibc.kill(pid, signal) }
    }

    static func decode(_ raw: Int32) -> ExitStatus {
        let sig = raw & 0x7F
        return sig == 0 ? .exited((raw >> 8) & 0xFF) : .signaled(sig)
    }

    /// The path `posix_spawn` would run for `name`: itself when it has a slash, else the first match in PATH.
    public static func resolve(_ name: String) -> String? {
        if name.contains("/") { return access(name, X_OK) == 0 ? name : nil }
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
        for dir in path.split(separator: ":") {
            let candidate = "\(dir)/\(name)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }
}

/// The directory of the running executable (`/proc/self/exe`): where a
/// command finds its sibling binaries (`ft-smp`, `ft-coordinator`, …) and a
/// test bundle the package's built products.
public var executableDirectory: String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    let exe = n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
    guard let slash = exe.lastIndex(of: "/") else { return "." }
    return slash == exe.startIndex ? "/" : String(exe[..<slash])
}

/// `relative` (e.g. "python/examples/gpt.py") in the source tree this
/// executable was built in: the first directory above it that holds the
/// file (binaries live in `REPO/.build/...`). Nil when none does.
public func repositoryFile(_ relative: String, from directory: String = executableDirectory) -> String? {
    guard let resolved = realpath(directory, nil) else { return nil }
    var dir = String(cString: resolved)
    free(resolved)
    while !dir.isEmpty {
        if access(dir + "/" + relative, F_OK) == 0 { return dir + "/" + relative }
        guard let slash = dir.lastIndex(of: "/") else { break }
        dir = String(dir[..<slash])
    }
    return nil
}

/// SIGTERM / SIGINT (and others) as a file descriptor to poll.
public final class SignalWatcher: @unchecked Sendable {
    public let fd: Int32

    /// Blocks `signals` in the calling thread; call it before starting threads
    /// so that every thread inherits the mask.
    public init(signals: [Int32]) throws(SystemError) {
        fd = try sys("signalfd") { signals.withUnsafeBufferPointer { ft_signalfd($0.baseAddress, Int32($0.count)) } }
    }

    deinit { close(fd) }

    /// The next pending signal, or nil when none is pending.
    public func next() -> Int32? {
        let s = ft_signalfd_read(fd)
        return s > 0 ? s : nil
    }
}

/// Makes this process receive `signal` when its parent exits.
public func setParentDeathSignal(_ signal: Int32) throws(SystemError) {
    try sys("prctl(PR_SET_PDEATHSIG)") { ft_set_parent_death_signal(signal) }
}

/// Seconds on the monotonic clock (for shells and tests; cores take `now`).
public func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}

/// Who is at the other end of a connected Unix-domain socket (SO_PEERCRED).
public struct PeerCredentials: Sendable, Equatable {
    public var pid: Int32
    public var uid: UInt32

    public init(pid: Int32, uid: UInt32) {
        self.pid = pid
        self.uid = uid
    }

    /// From libzmq's ipc:// "Peer-Address" property, which ends in
    /// ":UID:GID:PID" (nil for any other form).
    public init?(peerAddress: String) {
        let fields = peerAddress.split(separator: ":", omittingEmptySubsequences: false).suffix(3)
        guard fields.count == 3, let uid = UInt32(fields[fields.startIndex]), let pid = Int32(fields[fields.startIndex + 2]), pid > 0 else {
            return nil
        }
        self.init(pid: pid, uid: uid)
    }

    /// The credentials of the process that connected `fd`, nil when `fd` is
    /// not a Unix-domain socket (TCP) or is closed.
    public init?(socket fd: Int32) {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        guard ft_peer_credentials(fd, &pid, &uid) == 0, pid > 0 else { return nil }
        self.init(pid: pid, uid: uid)
    }
}

/// The parent of process `pid` (from /proc/PID/stat), nil when it is gone.
public func parentProcess(of pid: Int32) -> Int32? {
    let fd = open("/proc/\(pid)/stat", O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var buffer = [UInt8](repeating: 0, count: 1024)
    let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
    guard n > 0 else { return nil }
    let text = String(decoding: buffer[..<n], as: UTF8.self)
    guard let end = text.lastIndex(of: ")") else { return nil }
    // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses; the last ')' ends it.
    let fields = text[text.index(after: end)...].split(separator: " ")
    guard fields.count >= 2, let ppid = Int32(fields[1]) else { return nil }
    return ppid
}
