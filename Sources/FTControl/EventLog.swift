import FTCore
import Foundation

/// `RUN_DIR/events.jsonl`: the job's event log (`JobEvent`), one JSON object
/// a line, appended by the coordinator (a restarted one appends to the same
/// file). Each line is written with one `write(2)` on a file opened with
/// O_APPEND, so a crash leaves at most one torn last line, which readers skip.
public final class EventLog: @unchecked Sendable {
    public static let fileName = "events.jsonl"
    private let fd: Int32

    public init(runDirectory: String) throws {
        let path = runDirectory + "/" + Self.fileName
        fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o640)
        guard fd >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
    }

    deinit { close(fd) }

    /// Appends `event`, stamped now unless it has a time.
    public func append(_ event: JobEvent) {
        var e = event
        if e.time == 0 { e.time = Date().timeIntervalSince1970 }
        let line = Self.line(e) + "\n"
        _ = line.withCString { write(fd, $0, strlen($0)) }
    }

    /// One line (no newline), keys sorted.
    public static func line(_ event: JobEvent) -> String {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return (try? String(decoding: e.encode(event), as: UTF8.self)) ?? "{}"
    }

    /// Parses an event log; lines that do not parse (a line torn by a crash) are skipped and counted.
    public static func parse(_ text: String) -> (events: [JobEvent], skipped: Int) {
        let all = lines(text)
        let events = all.compactMap(\.event)
        return (events, all.count - events.count)
    }

    /// The log's non-empty lines as they are, each with its event, or nil where it does not parse.
    public static func lines(_ text: String) -> [(line: Substring, event: JobEvent?)] {
        let d = JSONDecoder()
        return text.split(separator: "\n", omittingEmptySubsequences: true).map { ($0, try? d.decode(JobEvent.self, from: Data($0.utf8))) }
    }

    /// `RUN_DIR/events.jsonl`.
    public static func path(runDirectory: String) -> String { runDirectory + "/" + fileName }

    /// Reads `RUN_DIR/events.jsonl`.
    public static func read(runDirectory: String) throws -> (events: [JobEvent], skipped: Int) {
        parse(try String(contentsOfFile: path(runDirectory: runDirectory), encoding: .utf8))
    }

    /// One event for people, on one line: UTC time to the millisecond, epoch, kind, and the fields that are set.
    ///
    ///     2026-12-03T10:00:01.234Z  e3  failure         smp n1 (heartbeat timeout (silent 512 ms))  committed 12
    public static func describe(_ e: JobEvent) -> String {
        let kind = e.kind.rawValue
        let kindWidth = JobEvent.Kind.allCases.map(\.rawValue.count).max() ?? kind.count
        var subject = [e.member, e.what, e.phase].compactMap { $0 }.joined(separator: " ")
        if let detail = e.detail { subject += (subject.isEmpty ? "" : " ") + "(\(detail))" }
        let stepLabel: String
        switch e.kind {
        case .failure: stepLabel = "committed"
        case .abort: stepLabel = "round"
        case .start: stepLabel = "from step"
        case .resumed: stepLabel = "at step"
        default: stepLabel = "step"
        }
        let fields: [String?] = [
            subject.isEmpty ? nil : subject,
            e.pid.map { "pid \($0)" },
            e.seconds.map { String(format: "%.3f s", $0) },
            e.step.map { "\(stepLabel) \($0)" },
            e.stepsLost.map { "\($0) step\($0 == 1 ? "" : "s") lost" },
            e.failed.map { $0 ? "failed" : "not failed" },
        ]
        let epoch = "e\(e.epoch)"
        return ([Timeline.utc(e.time), epoch.padding(toLength: max(epoch.count, 3), withPad: " ", startingAt: 0),
                 kind.padding(toLength: kindWidth, withPad: " ", startingAt: 0)] + fields.compactMap { $0 })
            .joined(separator: "  ").replacingOccurrences(of: " +$", with: "", options: .regularExpression)
    }
}
