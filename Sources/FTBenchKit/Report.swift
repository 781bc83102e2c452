import Foundation

/// One `ft-bench` section's result, in the format README.md describes under "Benchmarks":
/// `{"section", "machine", "figures", "ratios"}`. Figures carry their unit in
/// the name; ratios compare the system with a floor measured in the same run.
public struct BenchReport: Sendable {
    public var section: String
    public var machine: MachineInfo
    public var figures: [(String, Double)] = []
    public var ratios: [(String, Double)] = []
    /// Lines of the human-readable table.
    public var table: [[String]] = []
    public var notes: [String] = []

    public init(section: String, machine: MachineInfo = .current()) {
        self.section = section
        self.machine = machine
    }

    public mutating func figure(_ name: String, _ value: Double) { figures.append((name, value)) }
    public mutating func ratio(_ name: String, _ value: Double) { ratios.append((name, value)) }

    public func json() -> String {
        func object(_ pairs: [(String, Double)]) -> String {
            "{" + pairs.map { "\"\($0.0)\": \(format($0.1))" }.joined(separator: ", ") + "}"
        }
        return "{\"section\": \"\(section)\", \"machine\": \(machine.json()), "
            + "\"figures\": \(object(figures)), \"ratios\": \(object(ratios))}"
    }

    public func text() -> String {
        var out = "ft-bench \(section) on \(machine.summary)\n\n"
        out += renderTable(table)
        if !ratios.isEmpty {
            out += "\nratios (system / floor measured in this run):\n"
            let width = ratios.map(\.0.count).max() ?? 0
            for (name, value) in ratios {
                out += "  " + name.padding(toLength: width, withPad: " ", startingAt: 0) + "  " + String(format: "%.3f", value) + "\n"
            }
        }
        for note in notes { out += "\n" + note + "\n" }
        return out
    }

    private func format(_ v: Double) -> String {
        v.isFinite ? String(format: "%.6g", v) : "null"
    }
}

/// Renders rows as an aligned table; the first row is the header.
public func renderTable(_ rows: [[String]]) -> String {
    guard let header = rows.first else { return "" }
    var widths = header.map(\.count)
    for row in rows { for (i, cell) in row.enumerated() where i < widths.count { widths[i] = max(widths[i], cell.count) } }
    var out = ""
    for (r, row) in rows.enumerated() {
        let cells = row.enumerated().map { i, cell in
            i == 0 ? cell.padding(toLength: widths[i], withPad: " ", startingAt: 0)
                   : String(repeating: " ", count: widths[i] - cell.count) + cell
        }
        out += cells.joined(separator: "  ") + "\n"
        if r == 0 { out += widths.map { String(repeating: "-", count: $0) }.joined(separator: "  ") + "\n" }
    }
    return out
}

/// What the numbers were measured on.
public struct MachineInfo: Sendable {
    public var cpu: String
    public var cores: Int
    public var memoryGiB: Double
    public var kernel: String

    public static func current() -> MachineInfo {
        let cpuinfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        let cpu = cpuinfo.split(separator: "\n").first { $0.hasPrefix("model name") }
            .map { String($0.split(separator: ":", maxSplits: 1).last ?? "").trimmingCharacters(in: .whitespaces) } ?? "unknown"
        let mem = Double(ProcessInfo.processInfo.physicalMemory) / Double(1 << 30)
        var uts = utsname()
        uname(&uts)
        let release = withUnsafeBytes(of: &uts.release) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
        return MachineInfo(cpu: cpu, cores: ProcessInfo.processInfo.activeProcessorCount, memoryGiB: mem, kernel: release)
    }

    public var summary: String { "\(cpu), \(cores) cores, \(String(format: "%.1f", memoryGiB)) GiB, Linux \(kernel)" }

    func json() -> String {
        let escapedCPU = cpu.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
        return "{\"cpu\": \"\(escapedCPU)\", \"cores\": \(cores), \"memory_gib\": \(String(format: "%.1f", memoryGiB)), \"kernel\": \"\(kernel)\"}"
    }
}

/// Page-aligned memory, touched once at allocation so that timed loops never
/// page-fault (a fresh page costs more than the copy into it).
public final class AlignedBuffer: @unchecked Sendable {
    public let count: Int
    public let base: UnsafeMutableRawPointer

    public init(count: Int, fill: UInt8 = 0) {
        self.count = count
        base = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 4096)
        memset(base, Int32(fill), max(count, 1))
    }

    deinit { base.deallocate() }

    public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base, count: count) }

    public func slice(_ offset: Int, _ length: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: base + offset, count: length)
    }

    /// Fills with pseudo-random bytes from `seed` (xorshift; fast, not crypto).
    public func randomize(seed: UInt64) {
        var s = seed | 1
        let words = count / 8
        let p = base.bindMemory(to: UInt64.self, capacity: words)
        for i in 0..<words {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17
            p[i] = s
        }
        for i in words * 8..<count { s ^= s << 13; s ^= s >> 7; s ^= s << 17; base.storeBytes(of: UInt8(truncatingIfNeeded: s), toByteOffset: i, as: UInt8.self) }
    }
}

/// Times `body` and returns seconds.
@inline(never)
public func timeSeconds(_ body: () throws -> Void) rethrows -> Double {
    let clock = ContinuousClock()
    let start = clock.now
    try body()
    let d = clock.now - start
    return Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18
}

public func median(_ values: [Double]) -> Double {
    guard !values.isEmpty else { return .nan }
    let s = values.sorted()
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

/// The `p`-th percentile (0...100) by the nearest-rank method.
public func percentile(_ values: [Double], _ p: Double) -> Double {
    guard !values.isEmpty else { return .nan }
    let s = values.sorted()
    // Nearest rank: the smallest value with at least p% of the values at or below it.
    let rank = Int((p / 100 * Double(s.count)).rounded(.up)) - 1
    return s[min(max(rank, 0), s.count - 1)]
}
