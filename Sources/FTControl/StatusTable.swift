import Foundation

/// `ftctl status` as a table, from the schema-1 JSON.
public enum StatusTable {
    public static func render(json: String) -> String {
        guard let o = try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any] else {
            return "ftctl: unreadable status\n"
        }
        func int(_ v: Any?) -> Int { (v as? Int) ?? Int((v as? Double) ?? -1) }
        let committed = int(o["committed_step"])
        let age = int(o["committed_age_ms"])
        var out = "job \(o["job"] as? String ?? "?")  state \(o["state"] as? String ?? "?")  epoch \(int(o["epoch"]))  "
        out += "committed step \(committed < 0 ? "none" : String(committed))"
        out += age < 0 ? "" : " (\(age) ms ago)"
        out += "  snapshot every \(int(o["snapshot_interval"])) step(s)\n"
        if let reason = o["stop_reason"] as? String { out += "stopped: \(reason)\n" }
        out += "\n"
        var rows = [["node", "smp", "pid", "data MiB", "parity MiB", "ec", "workers"]]
        for n in (o["nodes"] as? [[String: Any]]) ?? [] {
            let workers = ((n["workers"] as? [[String: Any]]) ?? []).map {
                "\($0["id"] as? String ?? "?")(r\(int($0["rank"]))) \($0["state"] as? String ?? "?") @\(int($0["step"]))"
            }.joined(separator: ", ")
            rows.append([n["id"] as? String ?? "?", n["smp"] as? String ?? "?", String(int(n["pid"])),
                         String(format: "%.1f", Double(int(n["data_bytes"])) / 1_048_576),
                         String(format: "%.1f", Double(int(n["parity_bytes"])) / 1_048_576),
                         n["ec_health"] as? String ?? "?", workers])
        }
        out += table(rows)
        if let spares = o["spares"] as? [[String: Any]], !spares.isEmpty {
            out += "spares: " + spares.map { s in
                let id = s["id"] as? String ?? "?"
                if let node = s["node"] as? String { return "\(id) took over \(node) (pid \(int(s["pid"])))" }
                return "\(id) standby (pid \(int(s["pid"])))"
            }.joined(separator: ", ") + "\n"
        }
        let rate = (o["step_rate_per_s"] as? Double) ?? Double(int(o["step_rate_per_s"]))
        if rate > 0 {
            out += "step rate \(String(format: "%.2f", rate))/s"
            let eta = int(o["eta_s"]), total = int(o["total_steps"])
            if eta >= 0, total > 0 { out += ", step \(total) in \(Self.duration(eta))" }
            out += "\n"
        }
        if let url = o["metrics_url"] as? String { out += "metrics \(url)\n" }
        if let p = o["persist"] as? [String: Any], (p["enabled"] as? Bool) == true {
            let durable = int(p["durable_step"]), persisted = int(p["persisted_step"]), running = int(p["in_progress_step"])
            out += "disk: durable step \(durable < 0 ? "none" : String(durable))"
            out += ", persisted by every node \(persisted < 0 ? "none" : String(persisted))"
            if running >= 0 { out += ", persisting step \(running)" }
            let last = (p["last_seconds"] as? Double) ?? Double(int(p["last_seconds"]))
            if last >= 0 { out += " (last took \(String(format: "%.1f", last)) s)" }
            out += "\n"
            for (node, error) in ((p["errors"] as? [String: String]) ?? [:]).sorted(by: { $0.key < $1.key }) {
                out += "disk: PERSIST FAILING on \(node): \(error)\n"
            }
        }
        if let d = o["durability"] as? [String: Any], let loss = d["loss_per_failure"] as? Double {
            let window = (d["window_s"] as? Double) ?? 0
            let perDay = (d["loss_per_day"] as? Double) ?? 0
            out += "durability: a node failure is beyond memory with p = \(String(format: "%.2e", loss))"
            out += " (window \(String(format: "%.1f", window)) s\((d["window_measured"] as? Bool) == true ? " measured" : " assumed"), "
            out += "\(String(format: "%.1e", (d["node_failures_per_day"] as? Double) ?? 0)) failures/node/day); "
            out += perDay > 0 ? "one such loss in \(Self.days(1 / perDay))" : "no loss expected"
            out += "; a recovered failure costs \(String(format: "%.1f", (d["expected_steps_lost_per_failure"] as? Double) ?? 0)) steps on average\n"
        }
        if let f = o["last_failure"] as? [String: Any] {
            out += "\nlast failure: \(f["kind"] as? String ?? "?") \(f["what"] as? String ?? "?"), \(f["detected_by"] as? String ?? "?"), "
            out += "\(int(f["age_ms"])) ms ago, epoch \(int(f["epoch"])): \(f["outcome"] as? String ?? "?")\n"
            var phases = [["phase", "ms", "reason"]]
            for p in (f["phases"] as? [[String: Any]]) ?? [] {
                phases.append([p["phase"] as? String ?? "?", String(format: "%.1f", (p["ms"] as? Double) ?? Double(int(p["ms"]))),
                               p["reason"] as? String ?? ""])
            }
            out += table(phases)
        } else {
            out += "\nlast failure: none\n"
        }
        out += "\nmalformed frames \(int(o["malformed_frames"])), unauthenticated \(int(o["unauthenticated"])), "
        out += "unauthorized \(int(o["unauthorized"])), "
        out += "fenced messages \(int(o["fenced_messages"])), aborted rounds \(int(o["aborted_rounds"])), "
        out += "skipped snapshots \(int(o["skipped_snapshots"]))\n"
        return out
    }

    static func days(_ d: Double) -> String {
        d >= 365 ? String(format: "%.3g years", d / 365) : d >= 1 ? String(format: "%.3g days", d) : String(format: "%.3g hours", d * 24)
    }

    static func duration(_ seconds: Int) -> String {
        seconds >= 3600 ? "\(seconds / 3600) h \(seconds % 3600 / 60) min" : seconds >= 60 ? "\(seconds / 60) min \(seconds % 60) s" : "\(seconds) s"
    }

    /// The job's spares, from its run directory (the launcher's record; the
    /// coordinator does not know them): each `{"id", "pid", "state": "standby" |
    /// "took over", "node": the node it took over, or null}`.
    public static func spares(runDirectory: String) -> [[String: Any]] {
        var out: [String: [String: Any]] = [:]
        var recorded: [String: Int] = [:]
        let pids = (try? String(contentsOfFile: runDirectory + "/job.pids", encoding: .utf8)) ?? ""
        for line in pids.split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count == 2, let pid = Int(f[1]) else { continue }
            recorded[String(f[0])] = pid
            if f[0].hasPrefix("spare") { out[String(f[0])] = ["id": String(f[0]), "pid": pid, "state": "standby", "node": NSNull()] }
        }
        let dir = runDirectory + "/spares"
        for file in ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []) where file.hasSuffix(".assign") {
            let id = String(file.dropLast(".assign".count))
            let text = (try? String(contentsOfFile: dir + "/" + file, encoding: .utf8)) ?? ""
            guard let node = text.split(separator: " ").first.map(String.init), !node.isEmpty else { continue }
            var s = out[id] ?? ["id": id, "pid": -1]
            s["state"] = "took over"
            let taken = node.trimmingCharacters(in: .whitespacesAndNewlines)
            s["node"] = taken
            if let pid = recorded["smp-" + taken] { s["pid"] = pid }  // it runs as that node's SMP now
            out[id] = s
        }
        return out.keys.sorted().map { out[$0]! }
    }

    /// The status JSON with the run directory's spares added.
    public static func adding(spares: [[String: Any]], to json: String) -> String {
        guard !spares.isEmpty, var o = try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any] else { return json }
        o["spares"] = spares
        guard let data = try? JSONSerialization.data(withJSONObject: o, options: [.sortedKeys]) else { return json }
        return String(decoding: data, as: UTF8.self)
    }

    static func table(_ rows: [[String]]) -> String {
        var widths = rows[0].map(\.count)
        for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
        var out = ""
        for (k, r) in rows.enumerated() {
            out += r.enumerated().map { i, c in i == r.count - 1 ? c : c.padding(toLength: widths[i], withPad: " ", startingAt: 0) }
                .joined(separator: "  ") + "\n"
            if k == 0 { out += widths.map { String(repeating: "-", count: $0) }.joined(separator: "  ") + "\n" }
        }
        return out
    }
}
