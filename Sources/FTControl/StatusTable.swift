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
