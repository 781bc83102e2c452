import FTErasure
import FTLauncher
import FTSystem
import FTZMQ
import Foundation

/// `ft-bench ec-cluster`: erasure coding across real local SMPs.
///
/// For each code (RS(3+1) on 4 nodes, RS(4+2) on 6) and snapshot size S per
/// node, one job of real processes (coordinator, SMPs, one toy worker per node
/// whose whole state is per-rank, so each node's image is S) takes a few
/// snapshots spaced apart; each SMP logs the time from "all local workers
/// staged s" to "commit(s) arrived" and how long it spent folding chunks into
/// parity. Then one node is killed and restarted empty, and (for m = 2) two;
/// the replacements log how long the rebuild from parity took.
///
/// Floors, measured in this process in the same run: memcpy of S bytes; raw
/// ISA-L single-row updates on chunks of the same length; writing S bytes to
/// a file on local disk with fsync and reading them back after evicting them
/// from the page cache (`posix_fadvise(DONTNEED)`).
///
/// With `hosts = .netns` every node, and the coordinator, runs on a host of
/// its own (a network namespace: `NetnsHosts`), the SMPs' data planes on TCP
/// with CURVE between them; then the floor also has the transport ceiling
/// between such hosts, measured after the job on namespaces made for it:
/// the round's and the rebuild's streams (`ECTraffic`: which node sends how
/// many bytes to which) over plain TCP, one process per node
/// (`TransportCeiling`).
public struct ECClusterBench {
    public enum Hosts: String, Sendable, CaseIterable {
        /// Every process on this host: data planes on ipc sockets (or `dataHost`).
        case local
        /// A network namespace per node (and for the coordinator).
        case netns
    }

    public var binaries: String
    public var sizesMiB = [256, 1024]
    public var codes: [(k: Int, m: Int)] = [(3, 1), (4, 2)]
    /// The largest size tried for codes other than RS(3+1) (memory: 6 nodes × (2 slots + worker + parity)).
    public var maxMiBForWideCodes = 256
    public var rounds = 3
    public var diskDirectory = "/tmp"
    /// SMP data planes on `tcp://dataHost:*` with CURVE; then the floor also
    /// has one CURVE stream over that address (`curve_zmq_gbps_*`).
    public var dataHost: String?
    public var hosts = Hosts.local

    public init(binaries: String) { self.binaries = binaries }

    /// Why `hosts = .netns` cannot run here, or nil when it can.
    public static var netnsUnavailableReason: String? { NetnsHosts.unavailableReason }

    struct Measured {
        var commitMs: [Double] = []
        var foldGBps: [Double] = []
        var repairMs: [Int: [Double]] = [:]
        /// The nodes' image bytes, from their commit lines.
        var imageBytes: [Int] = []
    }

    public func run(progress: (String) -> Void = { _ in }) throws -> BenchReport {
        if hosts == .netns {
            if let reason = Self.netnsUnavailableReason { throw BenchError(.unavailable, "--hosts netns: \(reason)") }
            guard dataHost == nil else { throw BenchError(.unavailable, "--hosts netns puts each data plane on its host's address: no --data-host") }
        }
        var report = BenchReport(section: "ec-cluster")
        report.table = [["code", "nodes", "MiB/node", "commit ms", "commit GB/s", "memcpy GB/s", "ipc GB/s", "loopback GB/s", "curve GB/s", "fold GB/s",
                         "ISA-L row GB/s", "repair 1 ms", "repair 2 ms", "disk write ms", "disk read ms"]
                        + (hosts == .netns ? ["tcp round ms", "tcp rebuild ms"] : [])]
        // Between namespaces the data planes use CURVE: its one-stream floor too.
        let curveHost = dataHost ?? (hosts == .netns ? "127.0.0.1" : nil)
        for code in codes {
            for mib in sizesMiB where code == (3, 1) || mib <= maxMiBForWideCodes {
                let bytes = mib << 20
                let nodes = code.k + code.m
                let tag = "rs\(code.k)_\(code.m)_\(mib)mib"
                progress("RS(\(code.k)+\(code.m)), \(nodes) nodes, \(mib) MiB per node: floors")
                let memcpyGBps = measureMemcpy(bytes)
                let chunk = (bytes + code.k - 1) / code.k
                let rawRow = measureRawRowUpdate(k: code.k, m: code.m, chunkBytes: chunk)
                let disk = try measureDisk(bytes)
                let loopback = try measureStream(bytes, over: "tcp://127.0.0.1:*")
                let ipc = try measureStream(bytes, over: "ipc:///tmp/ft-bench-stream-\(getpid()).sock")
                let curve = try curveHost.map { try measureStream(bytes, over: "tcp://\($0):*", curve: true) }
                progress("RS(\(code.k)+\(code.m)), \(nodes) nodes, \(mib) MiB per node: the job")
                let m = try measureJob(k: code.k, m: code.m, bytes: bytes, progress: progress)
                let commit = median(m.commitMs)
                let commitGBps = Double(bytes) / (commit / 1000) / 1e9
                let fold = median(m.foldGBps)
                report.figure("commit_ms_p50_\(tag)", commit)
                report.figure("commit_gbps_per_node_\(tag)", commitGBps)
                report.figure("memcpy_gbps_\(tag)", memcpyGBps)
                report.figure("encode_fold_gbps_\(tag)", fold)
                report.figure("encode_isal_row_gbps_\(tag)", rawRow)
                report.figure("disk_write_fsync_ms_\(tag)", disk.write * 1000)
                report.figure("disk_read_cold_ms_\(tag)", disk.read * 1000)
                report.figure("loopback_zmq_gbps_\(tag)", loopback)
                report.figure("ipc_zmq_gbps_\(tag)", ipc)
                if let curve {
                    report.figure("curve_zmq_gbps_\(tag)", curve)
                    report.ratio("commit_vs_curve_\(tag)", commitGBps / curve)
                }
                for (lost, ms) in m.repairMs.sorted(by: { $0.key < $1.key }) {
                    report.figure("repair_\(lost)_nodes_ms_\(tag)", median(ms))
                }
                let repair1 = m.repairMs[1].map(median) ?? .nan
                var transport: (round: Double, rebuild: Double)?
                if hosts == .netns {
                    progress("RS(\(code.k)+\(code.m)), \(mib) MiB per node: raw TCP between namespaces, the round's and the rebuild's streams")
                    let image = m.imageBytes.max() ?? bytes
                    let round = ECTraffic.round(k: code.k, m: code.m, imageBytes: image)
                    let rebuild = ECTraffic.rebuild(k: code.k, m: code.m, imageBytes: image, lost: Self.victims(lost: 1, nodes: nodes)[0])
                    let t = try measureTransport([round, rebuild], nodes: nodes, tag: tag)
                    transport = (t[0], t[1])
                    report.figure("transport_tcp_round_gbps_\(tag)", Double(round.totalBytes) / t[0] / 1e9)
                    report.figure("transport_tcp_round_ms_\(tag)", t[0] * 1000)
                    report.figure("transport_tcp_rebuild_gbps_\(tag)", Double(rebuild.totalBytes) / t[1] / 1e9)
                    report.figure("transport_tcp_rebuild_ms_\(tag)", t[1] * 1000)
                    report.figure("round_mb_\(tag)", Double(round.totalBytes) / 1e6)
                    report.figure("rebuild_mb_\(tag)", Double(rebuild.totalBytes) / 1e6)
                    // The time the ceiling allows for the bytes, over the time the system took.
                    report.ratio("commit_vs_transport_\(tag)", t[0] * 1000 / commit)
                    report.ratio("rebuild_vs_transport_\(tag)", t[1] * 1000 / repair1)
                    if code == (3, 1) && mib == 1024 {
                        report.ratio("commit_vs_transport", t[0] * 1000 / commit)
                        report.ratio("rebuild_vs_transport", t[1] * 1000 / repair1)
                    }
                }
                report.ratio("commit_vs_memcpy_\(tag)", commitGBps / memcpyGBps)
                report.ratio("encode_vs_isal_\(tag)", fold / rawRow)
                report.ratio("repair_vs_disk_read_\(tag)", disk.read * 1000 / repair1)
                report.ratio("commit_vs_loopback_\(tag)", commitGBps / loopback)
                report.ratio("commit_vs_ipc_\(tag)", commitGBps / ipc)
                if code == (3, 1) && mib == 1024 {
                    report.ratio("commit_vs_memcpy", commitGBps / memcpyGBps)
                    report.ratio("encode_vs_isal", fold / rawRow)
                    report.ratio("repair_vs_disk_read", disk.read * 1000 / repair1)
                }
                report.table.append(["RS(\(code.k)+\(code.m))", "\(nodes)", "\(mib)", f(commit), f(commitGBps), f(memcpyGBps), f(ipc), f(loopback), curve.map(f) ?? "-", f(fold), f(rawRow),
                                     f(repair1), f(m.repairMs[2].map(median) ?? .nan), f(disk.write * 1000), f(disk.read * 1000)]
                                    + (transport.map { [f($0.round * 1000), f($0.rebuild * 1000)] } ?? []))
            }
        }
        report.notes.append("All nodes share this machine's cores and memory bandwidth: a real cluster gives each node its own. "
                            + "commit = staged to committed per node (median over nodes and rounds); fold = in-system parity folding "
                            + "at the holders; repair = the replacement's rebuild from parity; disk read after evicting the file "
                            + "from the page cache; ipc = one ZeroMQ stream of 4 MiB zero-copy frames over an ipc:// socket, the "
                            + "transport the SMPs' data endpoints use (its ceiling on this machine, with nothing else running; during "
                            + "a round every node sends m × S at once over the same cores); loopback = the same over tcp://127.0.0.1. "
                            + "Ratios without a suffix are RS(3+1) at 1 GiB per node.")
        if hosts == .netns {
            report.notes.append("--hosts netns: the coordinator and every node on a network namespace of its own (veth pairs on a "
                                + "bridge), the SMPs' data planes on TCP with CURVE between them (curve = one CURVE stream over "
                                + "127.0.0.1, its floor). The transport ceiling, measured after each job between namespaces made "
                                + "for it: the streams of one round (each node's data chunks to its rows' parity holders) and of "
                                + "the rebuild of n1 (the replacement fetching every frame of its image and parity from k "
                                + "survivors), with the bytes the SMPs' own round and rebuild cores move, over plain TCP sockets "
                                + "(no ZeroMQ, no CURVE, the bytes neither checked nor folded), one process per node, one "
                                + "connection per stream, all streams at once, 4 MiB writes; median of 3 (round_mb_*, "
                                + "rebuild_mb_*: the bytes; transport_tcp_*: time, and all streams' bytes over it). "
                                + "commit_vs_transport_* = the ceiling's time for a round's "
                                + "bytes over the median commit time; rebuild_vs_transport_* = its time for a rebuild's bytes "
                                + "over the rebuild time.")
        }
        if let dataHost {
            report.notes.append("Data planes on tcp://\(dataHost):* with CURVE (--data-host): the transport is the curve stream "
                                + "(the same stream with CURVE encryption, curve_zmq_gbps_*), and commit_vs_curve_* compares with it.")
        }
        return report
    }

    func measureJob(k: Int, m: Int, bytes: Int, progress: (String) -> Void) throws -> Measured {
        let nodes = k + m
        var o = LocalJob.Options(binaries: binaries, runDirectory: "/tmp/ft-bench-ec-\(getpid())-\(k)\(m)-\(bytes >> 20)",
                                 jobID: "ecb\(getpid())x\(k)\(m)x\(bytes >> 20)")
        o.nodes = nodes
        o.workersPerNode = 1
        o.erasure = (k, m)
        o.timeoutMs = 3000  // large copies on a shared 2-core machine must not look like deaths
        o.dataHost = dataHost
        o.netns = hosts == .netns
        o.heartbeatMs = 200
        let stepMs = max(2000, (bytes >> 20) * 12)
        o.workerCommand = [binaries + "/ft-toy-worker", "--steps", "1000000", "--state-kib", "\(bytes >> 11)", "--no-replicate",
                           "--step-ms", "\(stepMs)"]
        let job = try LocalJob(o)
        defer { job.stop(removeFiles: ProcessInfo.processInfo.environment["FT_KEEP_BENCH_DIRS"] == nil) }
        var result = Measured()
        func smpLog(_ n: Int) -> String { (try? String(contentsOfFile: job.dir + "/smp-n\(n).log", encoding: .utf8)) ?? "" }
        func waitFor(_ seconds: Double, _ what: String, _ condition: () -> Bool) throws {
            let deadline = monotonicSeconds() + seconds
            while !condition() {
                if job.status()?["state"] as? String == "failed" {
                    throw BenchError(.unexpectedOutcome, "the job failed while waiting for \(what):\n\(job.logs.suffix(6000))")
                }
                if monotonicSeconds() > deadline { throw BenchError(.timeout, "\(what) did not happen within \(Int(seconds)) s:\n\(job.logs.suffix(4000))") }
                usleep(50_000)
            }
        }
        try waitFor(240, "\(rounds) committed rounds") { jsonInt(job.status()?["committed_step"]) >= rounds }
        for n in 0..<nodes {
            for line in smpLog(n).split(separator: "\n") where line.contains("committed") && line.contains("staged_to_committed_ms=") {
                let fields = Dictionary(uniqueKeysWithValues: line.split(separator: " ").compactMap { f -> (String, String)? in
                    let kv = f.split(separator: "=", maxSplits: 1)
                    return kv.count == 2 ? (String(kv[0]), String(kv[1])) : nil
                })
                if let ms = fields["staged_to_committed_ms"].flatMap(Double.init) { result.commitMs.append(ms) }
                if let b = fields["image_bytes"].flatMap(Int.init) { result.imageBytes.append(b) }
                if let b = fields["folded_bytes"].flatMap(Double.init), let t = fields["fold_ms"].flatMap(Double.init), t > 0 {
                    result.foldGBps.append(b / (t / 1000) / 1e9)
                }
            }
        }
        // Repairs: one node, then (m = 2) two at once.
        for lost in 1...min(m, 2) {
            progress("RS(\(k)+\(m)): killing \(lost) node\(lost > 1 ? "s" : "") and rebuilding")
            let victims = Self.victims(lost: lost, nodes: nodes)
            let epoch = jsonInt(job.status()?["epoch"])
            // SMP logs append across replacements: wait for one more rebuild line than now.
            func rebuilds(_ n: Int) -> Int { smpLog(n).components(separatedBy: "rebuilt node").count - 1 }
            let before = Dictionary(uniqueKeysWithValues: victims.map { ($0, rebuilds($0)) })
            for n in victims {
                if let pid = job.workerPID(node: n, worker: 0) { kill(pid, SIGKILL) }
                kill(job.smps[n].pid, SIGKILL)
            }
            // Like the launcher: start replacements once the nodes are known lost.
            try waitFor(30, "the detection of \(victims)") {
                let ns = (job.status()?["nodes"] as? [[String: Any]]) ?? []
                return victims.allSatisfy { v in ns.contains { $0["id"] as? String == "n\(v)" && $0["smp"] as? String != "alive" } }
            }
            for n in victims { try job.startSMP(node: n) }
            try waitFor(240, "the rebuild of \(victims)") {
                guard let s = job.status(), jsonInt(s["epoch"]) > epoch, s["state"] as? String == "running" else { return false }
                return victims.allSatisfy { rebuilds($0) > before[$0]! }
            }
            for n in victims {
                let lines = smpLog(n).split(separator: "\n").filter { $0.contains("rebuilt node") }
                if let line = lines.last, let ms = line.split(separator: " ").first(where: { $0.hasPrefix("ms=") }).flatMap({ Double($0.dropFirst(3)) }) {
                    result.repairMs[lost, default: []].append(ms)
                }
            }
            try waitFor(240, "a commit after the rebuild") { jsonInt(job.status()?["committed_step"]) > rounds + lost }
        }
        return result
    }

    /// The nodes killed to measure the rebuild of `lost` nodes.
    static func victims(lost: Int, nodes: Int) -> [Int] { (0..<lost).map { ($0 * 2 + 1) % nodes } }

    /// Seconds each of `traffics` takes over plain TCP between namespaces
    /// made for the purpose (a host per node, like the job's), removed after.
    func measureTransport(_ traffics: [ECTraffic], nodes: Int, tag: String) throws -> [Double] {
        let dir = "/tmp/ft-bench-tcp-\(getpid())-\(tag)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let hosts = try NetnsHosts(roles: (0..<nodes).map { "n\($0)" }, runDirectory: dir)
        defer {
            hosts.remove()
            if ProcessInfo.processInfo.environment["FT_KEEP_BENCH_DIRS"] == nil { try? FileManager.default.removeItem(atPath: dir) }
        }
        let ceiling = TransportCeiling(binary: binaries + "/ft-bench")
        return try traffics.enumerated().map { i, t in try ceiling.seconds(t, on: hosts, directory: dir + "/traffic\(i)") }
    }

    /// One ZeroMQ PUSH -> PULL stream over `endpoint` (loopback TCP, or an
    /// ipc socket like the SMPs' data endpoints; `curve`: CURVE encrypted, no
    /// ZAP handler): `bytes` in 4 MiB zero-copy frames (like the SMPs'
    /// transfers), median of 3, in GB/s.
    func measureStream(_ bytes: Int, over endpoint: String, curve: Bool = false) throws -> Double {
        let frame = 4 << 20
        let count = max(1, bytes / frame)
        let source = AlignedBuffer(count: frame, fill: 7)
        let context = try ZMQContext()
        let pull = try context.socket(.pull, maxMessageBytes: frame)
        let push = try context.socket(.push, maxMessageBytes: ZMQSocket.sendOnlyMaxMessageBytes)  // sends only
        defer {
            push.close()
            pull.close()
        }
        try pull.setLinger(milliseconds: 0)
        try push.setLinger(milliseconds: 0)
        try push.setSendHighWaterMark(16)
        if curve {
            let server = try CurveKeyPair.generate()
            try pull.makeCurveServer(server)
            try push.makeCurveClient(serverKey: server.publicKey, keys: try CurveKeyPair.generate())
        }
        if endpoint.hasPrefix("ipc://") { unlink(String(endpoint.dropFirst(6))) }  // left by a run that crashed
        let bound = try pull.bind(endpoint)
        defer { if endpoint.hasPrefix("ipc://") { unlink(String(endpoint.dropFirst(6))) } }
        try push.connect(bound)
        var times: [Double] = []
        for _ in 0..<3 {
            let sender = Thread {
                let view = UnsafeRawBufferPointer(start: source.base, count: frame)
                for _ in 0..<count { try? push.send([.noCopy(view, release: {})]) }
            }
            let t = try timeSeconds { () throws -> Void in
                sender.start()
                for _ in 0..<count { _ = try pull.receiveMessages() }
            }
            times.append(t)
        }
        return withExtendedLifetime(source) { Double(count * frame) / median(times) / 1e9 }
    }

    func measureMemcpy(_ bytes: Int) -> Double {
        let src = AlignedBuffer(count: bytes, fill: 1)
        let dst = AlignedBuffer(count: bytes, fill: 2)
        let t = (0..<3).map { _ in timeSeconds { memcpy(dst.base, src.base, bytes) } }
        return Double(bytes) / median(t) / 1e9
    }

    func measureRawRowUpdate(k: Int, m: Int, chunkBytes: Int) -> Double {
        let buffer = AlignedBuffer(count: (k + m) * chunkBytes)
        buffer.randomize(seed: 3)
        let chunks = (0..<(k + m)).map { buffer.slice($0 * chunkBytes, chunkBytes) }
        let raw = ISALBaseline(k: k, m: m, chunks: chunks, missing: [0])
        let t = (0..<3).map { _ in timeSeconds { for d in 0..<k { raw.updateRow(dataIndex: d) } } }
        return Double(k * chunkBytes) / median(t) / 1e9
    }

    /// Write with fsync, evict from the page cache, read back.
    func measureDisk(_ bytes: Int) throws -> (write: Double, read: Double) {
        let path = diskDirectory + "/ft-bench-disk-\(getpid()).bin"
        defer { unlink(path) }
        let buffer = AlignedBuffer(count: 64 << 20)
        buffer.randomize(seed: 9)
        let fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0o600)
        guard fd >= 0 else { throw BenchError(.io, "cannot create \(path): errno \(errno)") }
        let write = timeSeconds {
            var left = bytes
            while left > 0 {
                let n = Glibc.write(fd, buffer.base, min(left, buffer.count))
                if n <= 0 { break }
                left -= n
            }
            fsync(fd)
        }
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
        close(fd)
        let rfd = open(path, O_RDONLY)
        guard rfd >= 0 else { throw BenchError(.io, "cannot read \(path)") }
        posix_fadvise(rfd, 0, 0, POSIX_FADV_DONTNEED)
        let target = AlignedBuffer(count: bytes)
        let read = timeSeconds {
            var done = 0
            while done < bytes {
                let n = Glibc.read(rfd, target.base + done, bytes - done)
                if n <= 0 { break }
                done += n
            }
        }
        close(rfd)
        return (write, read)
    }

    private func f(_ v: Double) -> String { v.isFinite ? String(format: "%.1f", v) : "-" }
}
