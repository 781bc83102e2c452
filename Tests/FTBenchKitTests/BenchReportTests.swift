import Foundation
import Testing
@testable import FTBenchKit

@Suite("ft-bench output")
struct BenchReportTests {
    /// Runs the ec section on tiny chunks: this checks the output's shape and
    /// the correctness checks inside the bench, not any timing.
    @Test("ec --json has the documented schema and keys")
    func ecJSONSchema() throws {
        var bench = ECBench()
        bench.chunkBytes = 64 << 10
        bench.repetitions = 1
        let report = try bench.run()
        let object = try #require(try JSONSerialization.jsonObject(with: Data(report.json().utf8)) as? [String: Any])
        #expect(Set(object.keys) == ["section", "machine", "figures", "ratios"])
        #expect(object["section"] as? String == "ec")
        let machine = try #require(object["machine"] as? [String: Any])
        #expect(machine["cores"] as? Int == ProcessInfo.processInfo.activeProcessorCount)
        let ratios = try #require(object["ratios"] as? [String: Double])
        let figures = try #require(object["figures"] as? [String: Double])
        for key in ["encode_vs_isal", "reconstruct_vs_isal"] {
            let value = try #require(ratios[key], "missing ratios.\(key)")
            #expect(value > 0)
        }
        for code in ["rs4_2", "rs8_2", "rs3_1"] {
            for name in ["memcpy_gbps", "encode_gbps", "encode_isal_gbps", "reconstruct_gbps", "reconstruct_isal_gbps"] {
                #expect(figures["\(name)_\(code)"] != nil, "missing figures.\(name)_\(code)")
            }
        }
        // The headline ratios are the minimum over the codes.
        let perCode = ["rs4_2", "rs8_2", "rs3_1"].compactMap { ratios["encode_vs_isal_\($0)"] }
        #expect(ratios["encode_vs_isal"] == perCode.min())
    }

    @Test("the table has a header, a rule and one row per code")
    func table() throws {
        var bench = ECBench()
        bench.chunkBytes = 4096
        bench.repetitions = 1
        bench.codes = [(3, 1)]
        let text = try bench.run().text()
        let lines = text.split(separator: "\n")
        #expect(lines.contains { $0.hasPrefix("code") && $0.contains("enc ratio") })
        #expect(lines.contains { $0.hasPrefix("RS(3+1)") })
        #expect(text.contains("encode_vs_isal"))
    }

    @Test("percentiles and medians")
    func stats() {
        #expect(median([3, 1, 2]) == 2)
        #expect(median([4, 1, 2, 3]) == 2.5)
        let hundred = Array(1...100).map(Double.init)
        #expect(percentile(hundred, 99) == 99)
        #expect(percentile(hundred, 100) == 100)
        #expect(percentile(hundred, 50) == 50)
        #expect(percentile([5], 99) == 5)
        #expect(median([]).isNaN)
    }
}
