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
        var events: [JobEvent] = []
        var skipped = 0
        let d = JSONDecoder()
        for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
            if let e = try? d.decode(JobEvent.self, from: Data(line.utf8)) { events.append(e) } else { skipped += 1 }
        }
        return (events, skipped)
    }

    /// Reads `RUN_DIR/events.jsonl`.
    public static func read(runDirectory: String) throws -> (events: [JobEvent], skipped: Int) {
        parse(try String(contentsOfFile: runDirectory + "/" + fileName, encoding: .utf8))
    }
}
