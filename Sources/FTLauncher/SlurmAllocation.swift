import FTSystem
import Foundation

/// A Slurm allocation as the launcher sees it from inside (`sbatch`, or
/// `salloc` then `srun`): its hosts, their addresses, and how a job step is
/// started on one of them and ended.
///
/// The plan: the coordinator runs beside the launcher, on the batch host (the
/// allocation's first host, where Slurm runs the batch script). Node `i`
/// runs on host `i` (n0 shares the batch host), spare `j` on host
/// `nodes + j`; hosts beyond those stay idle. Each SMP (or standby spare) is
/// a job step of its own (`srun --nodes=1 --ntasks=1 --nodelist=HOST
/// --overlap`), so a lost node ends only its own step; the SMP spawns the
/// workers inside that step. A step is ended with `scancel --signal`:
/// ending the local `srun` would leave the remote step running. Addresses are
/// Slurm's own (`NodeAddr` from `scontrol show node`), the ones its daemons
/// reach the hosts by. The run directory must be on a filesystem every host
/// of the allocation sees (spares read their assignment there, SMPs write
/// their logs and PIDs there).
public struct SlurmAllocation: Sendable, Equatable {
    public var jobID: String
    /// Hostnames in allocation order; the first is the batch host.
    public var hosts: [String]
    /// The address of each host (`NodeAddr`).
    public var addresses: [String: String]
    /// The directory `sbatch` was called from (default parent of the run directory).
    public var submitDirectory: String?

    public init(jobID: String, hosts: [String], addresses: [String: String], submitDirectory: String? = nil) {
        self.jobID = jobID
        self.hosts = hosts
        self.addresses = addresses
        self.submitDirectory = submitDirectory
    }

    public struct PlanError: Error, CustomStringConvertible, Equatable {
        public var description: String
        public init(_ description: String) { self.description = description }
    }

    /// Reads the allocation this process runs in: `SLURM_JOB_ID`,
    /// `SLURM_JOB_NODELIST` expanded by `scontrol show hostnames`, and each
    /// host's `NodeAddr`. Fails with a sentence outside an allocation.
    public static func current(environment env: [String: String] = ProcessInfo.processInfo.environment) throws -> SlurmAllocation {
        guard let job = env["SLURM_JOB_ID"], !job.isEmpty, let list = env["SLURM_JOB_NODELIST"] ?? env["SLURM_NODELIST"] else {
            throw PlanError("hosts = slurm runs inside a Slurm allocation (sbatch cluster/slurm/ft-job.sbatch, or srun inside salloc): SLURM_JOB_ID and SLURM_JOB_NODELIST are not set")
        }
        let hosts = try scontrol(["show", "hostnames", list]).split(separator: "\n").map { String($0).trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        guard !hosts.isEmpty else { throw PlanError("scontrol show hostnames \(list) named no host") }
        if let count = env["SLURM_JOB_NUM_NODES"] ?? env["SLURM_NNODES"], let n = Int(count), n != hosts.count {
            throw PlanError("SLURM_JOB_NUM_NODES is \(n), but \(list) expands to \(hosts.count) hosts")
        }
        var addresses: [String: String] = [:]
        for h in hosts { addresses[h] = try nodeAddress(scontrol(["show", "node", "-o", h]), host: h) }
        // The batch script runs on the allocation's first host; under salloc+srun the
        // launcher may run elsewhere, so say where it is when that differs.
        if let here = env["SLURMD_NODENAME"], let i = hosts.firstIndex(of: here), i != 0 {
            var reordered = hosts
            reordered.remove(at: i)
            reordered.insert(here, at: 0)
            return SlurmAllocation(jobID: job, hosts: reordered, addresses: addresses, submitDirectory: env["SLURM_SUBMIT_DIR"])
        }
        return SlurmAllocation(jobID: job, hosts: hosts, addresses: addresses, submitDirectory: env["SLURM_SUBMIT_DIR"])
    }

    /// `NodeAddr=` of one `scontrol show node -o` line (the host name when absent).
    static func nodeAddress(_ line: String, host: String) throws -> String {
        for field in line.split(whereSeparator: { $0 == " " || $0 == "\n" }) where field.hasPrefix("NodeAddr=") {
            let v = String(field.dropFirst("NodeAddr=".count))
            if !v.isEmpty && v != "(null)" { return v }
        }
        guard line.contains("NodeName=\(host)") else { throw PlanError("scontrol show node \(host) did not describe it: \(line.prefix(200))") }
        return host
    }

    /// Checks that the allocation holds the job: `nodes + spares` hosts at
    /// least, before anything starts. Returns the host of each role.
    public func plan(nodes: Int, spares: Int) throws -> [String: String] {
        let needed = nodes + spares
        guard hosts.count >= needed else {
            throw PlanError("the allocation has \(hosts.count) host\(hosts.count == 1 ? "" : "s") (\(hosts.joined(separator: ","))), "
                + "and the job needs one per node and one per spare: \(nodes) + \(spares) = \(needed); submit with sbatch --nodes=\(needed)")
        }
        var roles = ["coordinator": hosts[0]]
        for i in 0..<nodes { roles["n\(i)"] = hosts[i] }
        for j in 0..<spares { roles["spare\(j)"] = hosts[nodes + j] }
        return roles
    }

    /// The `srun` command line that runs `command` as a job step of its own on `host`.
    public func stepCommand(host: String, name: String, _ command: [String]) -> [String] {
        [Self.tool("srun"), "--jobid=\(jobID)", "--nodes=1", "--ntasks=1", "--nodelist=\(host)", "--overlap",
         "--kill-on-bad-exit=0", "--input=none", "--job-name=\(name)", "--quiet"] + command
    }

    /// The job's steps whose name starts with `prefix`: step id ("JOB.STEP") by name.
    public func steps(named prefix: String) -> [String: String] {
        guard let out = try? Self.run([Self.tool("squeue"), "-h", "-s", "-j", jobID, "-o", "%i %j"]) else { return [:] }
        var steps: [String: String] = [:]
        for line in out.split(separator: "\n") {
            let parts = line.split(separator: " ", maxSplits: 1).map(String.init)
            if parts.count == 2, parts[1].hasPrefix(prefix) { steps[parts[1]] = parts[0] }
        }
        return steps
    }

    /// Sends `signal` to every process of these steps (`scancel --signal`); returns whether scancel succeeded.
    @discardableResult
    public func signal(steps ids: [String], _ signal: String) -> Bool {
        guard !ids.isEmpty else { return true }
        return (try? Self.run([Self.tool("scancel"), "--signal=\(signal)"] + ids.sorted())) != nil
    }

    /// Starts `scancel --signal` for these steps without waiting for it: to a
    /// step on a host that is gone, it takes as long as slurmctld's timeout.
    /// The caller reaps the process.
    public func signalInBackground(steps ids: [String], _ signal: String) -> ChildProcess? {
        guard !ids.isEmpty else { return nil }
        return try? ChildProcess(arguments: [Self.tool("scancel"), "--signal=\(signal)"] + ids.sorted(),
                                 environment: ProcessInfo.processInfo.environment, outputPath: "/dev/null")
    }

    static func scontrol(_ args: [String]) throws -> String {
        do {
            return try run([tool("scontrol")] + args)
        } catch {
            throw PlanError("scontrol \(args.joined(separator: " ")) failed: \(error)")
        }
    }

    static func tool(_ name: String) -> String { ChildProcess.resolve(name) ?? name }

    /// Runs a Slurm command to its end (at most 30 s); its standard output, or an error with its output.
    static func run(_ args: [String]) throws -> String {
        let out = NSTemporaryDirectory() + "ft-slurm-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).out"
        defer { unlink(out) }
        let p = try ChildProcess(arguments: args, environment: ProcessInfo.processInfo.environment, outputPath: out)
        guard let status = p.wait(timeoutSeconds: 30) else {
            p.kill(SIGKILL)
            p.wait(timeoutSeconds: 5)
            throw PlanError("\(args[0]) did not answer within 30 s")
        }
        let text = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        guard status.isSuccess else { throw PlanError("\(args.joined(separator: " ")): \(status): \(text.prefix(400))") }
        return text
    }
}
