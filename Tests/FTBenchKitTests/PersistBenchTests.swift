import Foundation
import Testing
@testable import FTBenchKit

@Suite("ft-bench persist")
struct PersistBenchTests {
    /// Runs the persist section at 8 MiB: this checks the output's shape
    /// and the correctness checks inside the bench (the loaded and read
    /// images equal the persisted one), not any timing.
    @Test("persist --json has the three ratios, positive, and its figures")
    func persistJSONSchema() throws {
        let parent = FileManager.default.temporaryDirectory.path
        let before = Set((try? FileManager.default.contentsOfDirectory(atPath: parent)) ?? []).filter { $0.hasPrefix("ft-bench-persist-") }
        var bench = PersistBench()
        bench.imageBytes = 8 << 20
        bench.directory = parent
        bench.repeats = 1
        bench.asyncSteps = 2
        bench.stepSeconds = 0.002
        let report = try bench.run()
        let object = try #require(try JSONSerialization.jsonObject(with: Data(report.json().utf8)) as? [String: Any])
        #expect(Set(object.keys) == ["section", "machine", "figures", "ratios"])
        #expect(object["section"] as? String == "persist")
        let ratios = try #require(object["ratios"] as? [String: Double])
        let figures = try #require(object["figures"] as? [String: Double])
        for key in ["persist_vs_disk_write", "disk_restore_vs_read", "blocked_vs_copy_while_persisting"] {
            let value = try #require(ratios[key], "missing ratios.\(key)")
            #expect(value > 0, "ratios.\(key) = \(value)")
        }
        #expect(ratios["blocked_vs_copy"] != nil)
        for key in ["image_bytes", "parity_bytes", "persist_bytes", "persist_gbps", "disk_write_fsync_gbps", "restore_gbps",
                    "disk_read_cold_gbps", "page_cache_resident_before_read_max", "snapshot_copy_ms", "step_compute_ms",
                    "blocked_ms_per_snapshot", "blocked_ms_per_snapshot_while_persisting", "snapshots_while_persisting"] {
            #expect(figures[key] != nil, "missing figures.\(key)")
        }
        // Exact values from the report itself (the JSON prints 6 significant digits).
        let exact = Dictionary(report.figures, uniquingKeysWith: { a, _ in a })
        #expect(exact["image_bytes"] == Double(8 << 20))
        // RS(3+1): the node's parity share is one chunk of image / 3 (rounded up to 64 bytes).
        let parityShare: Int = ((8 << 20) / 3 + 64) / 64 * 64
        #expect(exact["parity_bytes"] == Double(parityShare))
        #expect(exact["persist_bytes"] == Double((8 << 20) + parityShare))
        #expect((exact["snapshots_while_persisting"] ?? 0) >= 1)
        #expect(report.text().contains("persist_vs_disk_write"))
        // The temporary directory is gone.
        let after = Set((try? FileManager.default.contentsOfDirectory(atPath: parent)) ?? []).filter { $0.hasPrefix("ft-bench-persist-") }
        #expect(after.subtracting(before).isEmpty)
    }
}
