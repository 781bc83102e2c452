import FTLauncher
import FTSystem
import Foundation

/// A real Slurm cluster on this machine for the tests: munge, `slurmctld` in
/// the root namespace, and one `slurmd` per network-namespace host (its own
/// NodeName, NodeAddr, spool directory and pid file), from Debian's packages
/// (scripts/setup.sh installs them). Job ids start at a random number, so the
/// job's segments (`ft-slurm<JOBID>-…`) and the Epilog that removes them never
/// meet another run's. Every daemon runs in the foreground as a
/// child of the test; `stop()` ends them by PID, ends whatever else runs in
/// the hosts' namespaces (they are the test's own), and removes the
/// namespaces, the bridge and the files, also after a test that failed.
final class SlurmCluster: @unchecked Sendable {
    let dir: String
    let hosts: NetnsHosts
    let names: [String]
    let conf: String
    private var daemons: [ChildProcess] = []
    private var slurmds: [String: ChildProcess] = [:]

    /// Why such a cluster cannot be made here, or nil when it can.
    static var unavailableReason: String? {
        if let reason = NetnsHosts.unavailableReason { return reason }
        for tool in ["slurmctld", "slurmd", "sbatch", "squeue", "sacct", "scancel", "munged", "setpriv"]
        where ChildProcess.resolve(tool) == nil && ChildProcess.resolve("/usr/sbin/" + tool) == nil {
            return "\(tool) is not installed (scripts/setup.sh installs slurm-wlm and munge)"
        }
        return nil
    }

    /// The environment Slurm's commands need to find this cluster.
    var environment: [String: String] {
        var env = ProcessInfo.processInfo.environment
        env["SLURM_CONF"] = conf
        return env
    }

    init(hosts count: Int, epilog: String) throws {
        dir = "/tmp/ft-slurm-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir + "/spool", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: dir + "/state", withIntermediateDirectories: true)
        chmod(dir, 0o755)
        names = (0..<count).map { "h\($0)" }
        conf = dir + "/slurm.conf"
        hosts = try NetnsHosts(roles: names, runDirectory: dir)
        do {
            try startMunge()
            let ctldPort = try freePort(), slurmdPort = try freePort()
            var text = """
                ClusterName=ft\(hosts.tag)
                SlurmctldHost=\(Self.shortHostname())(\(hosts.bridgeAddress))
                AuthType=auth/munge
                AuthInfo=socket=\(dir)/munge/socket
                CredType=cred/munge
                SlurmUser=root
                SlurmctldPort=\(ctldPort)
                SlurmdPort=\(slurmdPort)
                StateSaveLocation=\(dir)/state
                SlurmdSpoolDir=\(dir)/spool/%n
                SlurmctldPidFile=\(dir)/slurmctld.pid
                SlurmdPidFile=\(dir)/slurmd-%n.pid
                SlurmctldLogFile=\(dir)/slurmctld.log
                SlurmdLogFile=\(dir)/slurmd-%n.log
                ProctrackType=proctrack/linuxproc
                TaskPlugin=task/none
                MailProg=/bin/true
                SelectType=select/linear
                JobCompType=jobcomp/filetxt
                JobCompLoc=\(dir)/jobcomp.txt
                Epilog=\(epilog)
                ReturnToService=2
                SlurmdTimeout=10
                KillWait=10
                MinJobAge=600
                FirstJobId=\(UInt32.random(in: 100_000...999_999))

                """
            for name in names { text += "NodeName=\(name) NodeAddr=\(hosts.host(name).address) CPUs=2 State=UNKNOWN\n" }
            text += "PartitionName=main Nodes=\(names.joined(separator: ",")) Default=YES MaxTime=INFINITE State=UP\n"
            try text.write(toFile: conf, atomically: true, encoding: .utf8)
            daemons.append(try ChildProcess(arguments: ["/usr/sbin/slurmctld", "-D", "-f", conf], environment: environment,
                                            newProcessGroup: true, outputPath: dir + "/slurmctld.out"))
            for name in names {
                slurmds[name] = try ChildProcess(arguments: hosts.command(name, ["/usr/sbin/slurmd", "-D", "-f", conf, "-N", name]),
                                                 environment: environment, newProcessGroup: true, outputPath: dir + "/slurmd-\(name).out")
            }
            guard waitUntil(seconds: 60, { run(["sinfo", "-h", "-o", "%t"]).split(separator: "\n").map(String.init) == ["idle"] }) else {
                throw SystemError("the Slurm nodes did not come up idle: \(run(["sinfo", "-h"]))\n\(readText(dir + "/slurmctld.log").suffix(2000))", errno: ETIMEDOUT)
            }
        } catch {
            stop()
            throw error
        }
    }

    private func startMunge() throws {
        let m = dir + "/munge"
        try FileManager.default.createDirectory(atPath: m, withIntermediateDirectories: true)
        var key = [UInt8](repeating: 0, count: 1024)
        for i in key.indices { key[i] = UInt8.random(in: 0...255) }
        guard FileManager.default.createFile(atPath: m + "/munge.key", contents: Data(key)) else {
            throw SystemError("create \(m)/munge.key", errno: errno)
        }
        guard let pw = getpwnam("munge") else { throw SystemError("no munge user (install munge)", errno: ENOENT) }
        for path in [m, m + "/munge.key"] { chown(path, pw.pointee.pw_uid, pw.pointee.pw_gid) }
        chmod(m, 0o700)
        chmod(m + "/munge.key", 0o400)
        // setpriv execs munged: the pid is munged's own.
        daemons.append(try ChildProcess(
            arguments: ["setpriv", "--reuid=munge", "--regid=munge", "--clear-groups", "/usr/sbin/munged", "--foreground", "--force",
                        "--num-threads=10", "--key-file=\(m)/munge.key", "--socket=\(m)/socket", "--pid-file=\(m)/munged.pid",
                        "--log-file=\(m)/munged.log", "--seed-file=\(m)/munged.seed"],
            environment: ProcessInfo.processInfo.environment, newProcessGroup: true, outputPath: dir + "/munged.out"))
        guard waitUntil(seconds: 10, { FileManager.default.fileExists(atPath: m + "/socket") }) else {
            throw SystemError("munged did not start: \(readText(dir + "/munged.out"))\(readText(m + "/munged.log"))", errno: ETIMEDOUT)
        }
    }

    static func shortHostname() -> String {
        var buffer = [UInt8](repeating: 0, count: 256)
        gethostname(&buffer, buffer.count)
        let name = String(decoding: buffer.prefix { $0 != 0 }, as: UTF8.self)
        return String(name.split(separator: ".").first ?? "localhost")
    }

    /// Runs a Slurm command against this cluster; its output (stdout and stderr).
    @discardableResult
    func run(_ args: [String], timeout: Double = 30) -> String {
        let out = dir + "/cmd-\(UInt32.random(in: 0...UInt32.max)).out"
        defer { unlink(out) }
        guard let p = try? ChildProcess(arguments: args, environment: environment, outputPath: out) else { return "" }
        if p.wait(timeoutSeconds: timeout) == nil {
            p.kill(SIGKILL)
            p.wait(timeoutSeconds: 5)
        }
        return readText(out)
    }

    /// The pids in `host`'s namespace.
    func pids(on host: String) -> [Int32] {
        NetnsHosts.output(["ip", "netns", "pids", hosts.host(host).namespace]).split(separator: "\n").compactMap { Int32($0) }
    }

    /// The pids in `host`'s namespace other than its slurmd.
    func jobPIDs(on host: String) -> [Int32] {
        pids(on: host).filter { $0 != slurmds[host]?.pid }
    }

    /// Kills every process of `host` with SIGKILL, its slurmd included: the host is gone.
    func killHost(_ host: String) -> Int {
        let victims = pids(on: host)
        for pid in victims { kill(pid, SIGKILL) }
        slurmds[host]?.wait(timeoutSeconds: 5)
        return victims.count
    }

    func stop() {
        for name in names where hosts.hosts[name] != nil {
            for pid in pids(on: name) { kill(pid, SIGKILL) }
        }
        for p in Array(slurmds.values) + daemons.reversed() {
            p.kill(SIGKILL)
            p.wait(timeoutSeconds: 5)
        }
        hosts.remove()
        if ProcessInfo.processInfo.environment["FT_KEEP_TEST_DIRS"] == nil { try? FileManager.default.removeItem(atPath: dir) }
    }
}
