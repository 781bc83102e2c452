import FTControl
import FTCore
import FTLauncher
import FTSystem
import Foundation
import Testing

/// The event log, the Prometheus endpoint (scraped by a real Prometheus), and
/// what `ftctl` makes of them, with real processes.
@Suite("Observability (real processes)", .serialized)
struct ObservabilityTests {
    static let prometheusBinary = "/usr/bin/prometheus"
    static let promtool = "/usr/bin/promtool"

    /// A job of 4 nodes, RS(3+1), one toy worker each, serving metrics on a free loopback port.
    func makeJob(_ tag: String, steps: Int) throws -> LocalJob {
        try LocalJob(tag: tag, nodes: 4, workersPerNode: 1, steps: steps, stateKiB: 256, stepMs: 5) { o in
            o.erasure = (3, 1)
            o.metrics = "127.0.0.1:0"
            o.totalSteps = steps
        }
    }

    func killNode(_ job: LocalJob, _ n: Int) {
        if let pid = job.workerPID(node: n, worker: 0) { kill(pid, SIGKILL) }
        kill(job.smps[n].pid, SIGKILL)
    }

    func lastOutcome(_ job: LocalJob) -> String? { (job.status()?["last_failure"] as? [String: Any])?["outcome"] as? String }

    /// Kills node `n` like a host dying, waits until the coordinator no longer takes it for
    /// alive, starts its replacement (the launcher's part) and waits for the job to resume.
    func replaceNode(_ job: LocalJob, _ n: Int, sourceLocation: SourceLocation = #_sourceLocation) throws {
        killNode(job, n)
        #expect(waitUntil(seconds: 20) {
            ((job.status()?["nodes"] as? [[String: Any]]) ?? []).contains { $0["id"] as? String == "n\(n)" && $0["smp"] as? String != "alive" }
        }, "\(job.logs)", sourceLocation: sourceLocation)
        try job.inner.startSMP(node: n)
        #expect(waitUntil(seconds: 60) { lastOutcome(job) == "resumed" }, "\(job.logs)", sourceLocation: sourceLocation)
    }

    /// Runs `command` with /bin/sh: its exit status and its output (stdout and stderr).
    func shell(_ command: String, timeout: Double = 30) -> (FTSystem.ExitStatus?, String) {
        let out = "/tmp/ft-sh-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).out"
        defer { unlink(out) }
        guard let p = try? ChildProcess(arguments: ["/bin/sh", "-c", command], environment: ProcessInfo.processInfo.environment,
                                        outputPath: out) else { return (nil, "") }
        let status = p.wait(timeoutSeconds: timeout)
        if status == nil { p.kill(SIGKILL); p.wait(timeoutSeconds: 5) }
        return (status, readText(out))
    }

    /// GET `url` with curl: status code and body.
    func httpGet(_ url: String) -> (Int, String)? {
        let (status, out) = shell("curl -s -m 5 -w '\\n%{http_code}' '\(url)'")
        guard status == .exited(0), let nl = out.lastIndex(of: "\n"), let code = Int(out[out.index(after: nl)...]) else { return nil }
        return (code, String(out[..<nl]))
    }

    @Test("the event log has every event of a node kill and a coordinator kill, in order, and ftctl events prints them",
          .timeLimit(.minutes(4)))
    func eventLog() throws {
        let job = try makeJob("ev", steps: 900)
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { jsonInt(job.status()?["committed_step"]) >= 60 }, "\(job.logs)")
        try replaceNode(job, 1)
        let committed = jsonInt(job.status()?["committed_step"])
        #expect(waitUntil(seconds: 30) { jsonInt(job.status()?["committed_step"]) > committed + 20 }, "\(job.logs)")
        // The status: the step rate and the time to the last step; the durability
        // estimate, its window now the recovery just measured.
        #expect(waitUntil(seconds: 10) { ((job.status()?["step_rate_per_s"] as? Double) ?? -1) > 0 }, "no step rate")
        let running = try #require(job.status())
        #expect(jsonInt(running["total_steps"]) == 900 && jsonInt(running["eta_s"]) >= 0, "\(running)")
        let durability = try #require(running["durability"] as? [String: Any])
        let loss = try #require(durability["loss_per_failure"] as? Double)
        #expect(loss > 0 && loss < 1e-3, "\(durability)")  // RS(3+1), a window of seconds, a rate near 0.004 a day
        #expect(durability["window_measured"] as? Bool == true && jsonInt(durability["node_failures_seen"]) == 1, "\(durability)")
        #expect(((durability["node_failures_per_day"] as? Double) ?? 0) > DurabilityEstimate.defaultNodeFailuresPerDay, "\(durability)")
        job.coordinator!.kill(SIGKILL)
        job.coordinator!.wait(timeoutSeconds: 5)
        try job.startCoordinator()
        #expect(waitUntil(seconds: 30) { lastOutcome(job) == "resumed" && (job.status()?["state"] as? String) == "running" }, "\(job.logs)")
        #expect(waitUntil(seconds: 150) { job.coordinator?.poll() != nil }, "job did not end\n\(job.logs)")

        let (events, skipped) = try EventLog.read(runDirectory: job.dir)
        #expect(skipped <= 1)  // at most the line a SIGKILL tore
        let kinds = events.map(\.kind.rawValue)
        func index(_ kind: JobEvent.Kind, after start: Int = 0, _ match: (JobEvent) -> Bool = { _ in true }) -> Int? {
            events.indices.first { $0 >= start && events[$0].kind == kind && match(events[$0]) }
        }
        // The first coordinator's life: up, the four members, the start, commits.
        let up = try #require(index(.coordinatorUp), "\(kinds)")
        for n in 0..<4 { #expect(index(.member, after: up) { $0.what == "n\(n)" } != nil, "\(kinds)") }
        let start = try #require(index(.start, after: up), "\(kinds)")
        let commit = try #require(index(.commit, after: start), "\(kinds)")
        // The node kill: a failure of smp n1, then its phases, a replacement member, resumed.
        let failure = try #require(index(.failure, after: commit) { $0.what == "n1" && $0.member == "smp" }, "\(kinds)")
        var at = failure
        for phase in ["detect", "plan", "rebuild", "restart", "resume"] {
            let p = try #require(index(.phase, after: at) { $0.phase == phase && $0.what == "n1" }, "no \(phase) after \(at): \(kinds)")
            at = p
        }
        #expect(index(.member, after: failure) { $0.what == "n1" && ($0.detail ?? "").contains("replaces pid") } != nil, "\(kinds)")
        let resumed = try #require(index(.resumed, after: failure) { $0.what == "n1" }, "\(kinds)")
        #expect(events[resumed].stepsLost != nil && events[resumed].seconds != nil)
        // The coordinator kill: a second coordinator_up, a failure of kind coordinator, resumed, then the end.
        let up2 = try #require(index(.coordinatorUp, after: resumed + 1), "\(kinds)")
        #expect(events[up2].pid != events[up].pid)
        let coord = try #require(index(.failure, after: up2) { $0.member == "coordinator" }, "\(kinds)")
        let resumed2 = try #require(index(.resumed, after: coord), "\(kinds)")
        let stopped = try #require(index(.stopped, after: resumed2), "\(kinds)")
        #expect(events[stopped].failed == false)
        #expect(events.map(\.time) == events.map(\.time).sorted(), "times out of order")
        #expect(zip(events, events.dropFirst()).allSatisfy { $0.epoch <= $1.epoch || $1.kind == .coordinatorUp }, "epochs went back")

        let (status, text, err) = try runTool("ftctl", ["events", job.dir])
        #expect(status == .exited(0), "\(err)")
        for word in ["coordinator_up", "member", "start", "commit", "failure", "phase", "resumed", "stopped", "smp n1"] {
            #expect(text.contains(word), "ftctl events lacks '\(word)':\n\(text)")
        }
    }

    @Test("a real Prometheus scrapes a running job: commits rise, a killed node is counted, the recovery histogram has its sample; promtool accepts /metrics",
          .enabled(if: FileManager.default.isExecutableFile(atPath: prometheusBinary), "needs Debian's prometheus package (scripts/setup.sh installs it)"),
          .timeLimit(.minutes(4)))
    func prometheusScrapes() throws {
        let job = try makeJob("prom", steps: 100_000)
        defer { job.cleanUp() }
        #expect(waitUntil(seconds: 60) { jsonInt(job.status()?["committed_step"]) >= 20 }, "\(job.logs)")
        let url = try #require(job.status()?["metrics_url"] as? String, "no metrics_url in the status")
        #expect(url == readText(job.dir + "/metrics.endpoint").trimmingCharacters(in: .whitespacesAndNewlines))

        // The exposition itself: promtool's lint accepts it; a wrong path is a 404.
        let (code, body) = try #require(httpGet(url))
        #expect(code == 200)
        for name in ["ft_snapshot_rounds_committed_total", "ft_commit_latency_seconds_bucket", "ft_steps_since_commit",
                     "ft_node_protected_bytes{node=\"n0\"}", "ft_node_shared_memory_bytes{node=\"n3\"}", "ft_ec_group_health{group=\"0\",state=\"ok\"} 1",
                     "ft_failures_total{kind=\"smp\"} 0", "ft_snapshot_blocked_seconds_count"] {
            #expect(body.contains(name), "no \(name) in\n\(body.prefix(3000))")
        }
        try body.write(toFile: job.dir + "/metrics.txt", atomically: true, encoding: .utf8)
        let lint = shell("\(Self.promtool) check metrics < '\(job.dir)/metrics.txt'")
        #expect(lint.0 == .exited(0), "promtool: \(lint.1)")
        #expect(httpGet(url.replacingOccurrences(of: "/metrics", with: "/other"))?.0 == 404)

        // A real Prometheus, on a free port, scraping every 500 ms.
        let dir = job.dir + "/prometheus"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let target = url.replacingOccurrences(of: "http://", with: "").replacingOccurrences(of: "/metrics", with: "")
        try """
            global:
              scrape_interval: 500ms
              evaluation_interval: 500ms
            scrape_configs:
              - job_name: ft
                static_configs:
                  - targets: ['\(target)']
            """.write(toFile: dir + "/prometheus.yml", atomically: true, encoding: .utf8)
        let port = try freePort()
        let prometheus = try ChildProcess(
            arguments: [Self.prometheusBinary, "--config.file=\(dir)/prometheus.yml", "--storage.tsdb.path=\(dir)/data",
                        "--web.listen-address=127.0.0.1:\(port)"],
            environment: ProcessInfo.processInfo.environment, outputPath: dir + "/prometheus.log")
        defer {
            prometheus.kill(SIGTERM)
            if prometheus.wait(timeoutSeconds: 10) == nil { prometheus.kill(SIGKILL); prometheus.wait(timeoutSeconds: 5) }
        }
        let api = "http://127.0.0.1:\(port)/api/v1/query?query="
        func query(_ q: String) -> Double? {
            guard let (code, text) = httpGet(api + (q.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? q)), code == 200,
                  let o = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any],
                  let data = o["data"] as? [String: Any], let result = (data["result"] as? [[String: Any]])?.first,
                  let value = result["value"] as? [Any], value.count == 2, let s = value[1] as? String else { return nil }
            return Double(s)
        }
        let first = try #require(waitUntil(seconds: 60) { query("ft_snapshot_rounds_committed_total") != nil } ? query("ft_snapshot_rounds_committed_total") : nil,
                                 "Prometheus never scraped the job\n\(readText(dir + "/prometheus.log").suffix(2000))")
        #expect(waitUntil(seconds: 20) { (query("ft_snapshot_rounds_committed_total") ?? 0) > first + 5 }, "commits do not rise")
        #expect(query("ft_failures_total{kind=\"smp\"}") == 0)

        try replaceNode(job, 2)
        #expect(waitUntil(seconds: 20) { query("ft_failures_total{kind=\"smp\"}") == 1 }, "the failure is not in Prometheus")
        let rebuilds = "ft_recovery_phase_seconds_count{phase=\"rebuild\"}"
        #expect(waitUntil(seconds: 20) { query(rebuilds) == 1 }, "rebuild samples: \(String(describing: query(rebuilds)))")
        #expect((query("ft_recovery_phase_seconds_sum{phase=\"rebuild\"}") ?? -1) > 0)
        #expect(waitUntil(seconds: 20) { query("ft_ec_group_health{group=\"0\",state=\"ok\"}") == 1 })
        let after = query("ft_snapshot_rounds_committed_total") ?? 0
        #expect(waitUntil(seconds: 20) { (query("ft_snapshot_rounds_committed_total") ?? 0) > after }, "commits stopped after the recovery")
    }
}
