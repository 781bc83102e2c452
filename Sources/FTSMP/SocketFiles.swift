import FTCore
import FTSystem
import FTZMQ
import Foundation
import Logging

/// The SMP's socket files and who is on the other end: binding an `ipc://`
/// endpoint privately (0600 file, 0700 directory) and the credentials of
/// the process behind a received frame.
enum SocketFiles {
    /// Binds `socket` to `endpoint`; an `ipc://` socket file is made 0600, in a
    /// directory that is made 0700 when it is the run directory's sockets
    /// directory (a warning when another one is open to others).
    static func bindPrivately(_ socket: ZMQSocket, _ endpoint: String, runDirectory: String, what: String, logger: Logger) throws -> String {
        guard endpoint.hasPrefix("ipc://") else { return try socket.bind(endpoint) }
        let path = String(endpoint.dropFirst(6))
        let directory = URL(fileURLWithPath: path).deletingLastPathComponent().standardized.path
        let own = URL(fileURLWithPath: runDirectory).appendingPathComponent(SMPConfiguration.socketDirectoryName).standardized.path
        if directory == own {
            try makePrivateDirectory(directory)
        } else if let open = openToOthers(directory) {
            logger.warning("\("the \(what) socket directory \(directory) is open to other users (mode \(open)); its socket file is 0600 and every request's peer is checked")")
        }
        // A socket file left by a crashed SMP of this node would make bind fail.
        unlink(path)
        let bound = try socket.bind(endpoint)
        guard chmod(path, 0o600) == 0 else { throw SystemError("chmod 0600 \(path)", errno: errno) }
        return bound
    }

    /// The credentials of the process that sent `frame` over an ipc socket:
    /// taken when the connection was accepted (libzmq's Peer-Address), else
    /// asked of its descriptor now.
    static func peer(of frame: ZMQMessage) -> PeerCredentials? {
        frame.property("Peer-Address").flatMap(PeerCredentials.init(peerAddress:)) ?? frame.sourceDescriptor.flatMap(PeerCredentials.init(socket:))
    }

    /// Makes `path` a directory of mode 0700 owned by this user (created if
    /// missing); throws when it belongs to someone else.
    static func makePrivateDirectory(_ path: String) throws {
        if mkdir(path, 0o700) != 0 && errno != EEXIST { throw SystemError("mkdir \(path)", errno: errno) }
        var st = stat()
        guard lstat(path, &st) == 0 else { throw SystemError("stat \(path)", errno: errno) }
        guard (st.st_mode & S_IFMT) == S_IFDIR, st.st_uid == geteuid() else {
            throw SMPError(.unsafeDirectory, "\(path) must be a directory owned by uid \(geteuid()) (it is mode \(String(st.st_mode, radix: 8)), uid \(st.st_uid))")
        }
        if st.st_mode & 0o077 != 0, chmod(path, 0o700) != 0 { throw SystemError("chmod 0700 \(path)", errno: errno) }
    }

    /// The mode of `path` in octal when group or others may enter it, nil otherwise.
    static func openToOthers(_ path: String) -> String? {
        var st = stat()
        guard stat(path, &st) == 0, st.st_mode & 0o011 != 0 else { return nil }
        return String(st.st_mode & 0o777, radix: 8)
    }
}
