import FTControl
import FTCore
import FTSystem
import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import Testing

/// A job's log: four nodes start, train, smp n1 dies at 30.6 s and spare0
/// takes its place (phases, a fenced message from the old pid, resumed), a
/// snapshot round aborts, the coordinator restarts at 45 s (its members
/// announced again), worker n2/w1 fails and the job resumes again, and stops.
func syntheticJobEvents(t0: Double = 1_796_292_000) -> [JobEvent] {
    var events: [JobEvent] = []
    func add(_ t: Double, _ kind: JobEvent.Kind, _ epoch: UInt64, step: Int? = nil, what: String? = nil, member: String? = nil,
             phase: String? = nil, seconds: Double? = nil, stepsLost: Int? = nil, pid: Int? = nil, failed: Bool? = nil, detail: String? = nil) {
        events.append(JobEvent(time: t0 + t, kind: kind, epoch: epoch, step: step, what: what, member: member, phase: phase,
                               seconds: seconds, stepsLost: stepsLost, pid: pid, failed: failed, detail: detail))
    }
    add(0, .coordinatorUp, 0, pid: 4100)
    for n in 0..<4 { add(0.5 + 0.1 * Double(n), .member, 0, what: "n\(n)", pid: 4201 + n, detail: "tcp://127.0.0.1:4000\(n)") }
    add(1.0, .start, 1, detail: "4 nodes, 8 workers")
    for s in 2...30 { add(Double(s), .commit, 1, step: (s - 1) * 10) }
    add(30.6, .failure, 1, step: 290, what: "n1", member: "smp", detail: "heartbeat timeout (silent 512 ms)")
    add(30.6, .phase, 2, phase: "detect", seconds: 0.512, detail: "heartbeat timeout")
    add(30.61, .phase, 2, phase: "plan", seconds: 0.01, detail: "rebuild n1 from parity")
    add(31.0, .member, 2, what: "n1", pid: 4305, detail: "spare0 tcp://127.0.0.1:40100")
    add(32.45, .phase, 2, phase: "rebuild", seconds: 1.84, detail: "n1: 64 MiB")
    add(33.0, .fenced, 2, what: "n1", pid: 4202)
    add(33.4, .phase, 2, phase: "restart", seconds: 0.95)
    add(33.75, .phase, 2, phase: "resume", seconds: 0.35)
    add(33.75, .resumed, 2, step: 290, seconds: 3.15, stepsLost: 6)
    for s in 34...44 { add(Double(s), .commit, 2, step: 290 + (s - 33) * 10) }
    add(40.2, .abort, 2, step: 360, detail: "round timed out")
    add(45.0, .coordinatorUp, 2, pid: 4500)
    for (n, pid) in [4201, 4305, 4203, 4204].enumerated() { add(45.3, .member, 2, what: "n\(n)", pid: pid, detail: "tcp://127.0.0.1:4000\(n)") }
    add(45.6, .start, 3, step: 400, detail: "coordinator restarted")
    for s in 46...52 { add(Double(s), .commit, 3, step: 400 + (s - 45) * 10) }
    add(52.3, .failure, 3, step: 470, what: "n2/w1", member: "worker", detail: "reported by SMP n2: exited with signal 9")
    add(52.3, .phase, 4, phase: "detect", seconds: 0.05)
    add(52.31, .phase, 4, phase: "plan", seconds: 0.002)
    add(52.31, .phase, 4, phase: "rebuild", seconds: 0, detail: "nothing to rebuild")
    add(53.0, .phase, 4, phase: "restart", seconds: 0.69)
    add(53.2, .phase, 4, phase: "resume", seconds: 0.2)
    add(53.2, .resumed, 4, step: 470, seconds: 0.9, stepsLost: 2)
    for s in 54...61 { add(Double(s), .commit, 4, step: 470 + (s - 53) * 10) }
    add(62, .stopped, 4, failed: false, detail: "all workers finished")
    return events
}

/// The SVG as an XML tree (fails the test when it does not parse).
func parseSVG(_ svg: String) throws -> XMLElement {
    let document = try XMLDocument(xmlString: svg, options: [])
    let root = try #require(document.rootElement())
    #expect(root.name == "svg")
    #expect(root.uri == "http://www.w3.org/2000/svg")
    // (attribute(forName:) misses attributes of an element in a default namespace in swift-corelibs-foundation)
    #expect(root.attributes?.first { $0.name == "version" }?.stringValue == "1.1")
    return root
}

/// Elements whose class list holds `name`.
func elements(_ root: XMLElement, class name: String) throws -> [XMLElement] {
    try root.nodes(forXPath: ".//*[contains(concat(' ', @class, ' '), ' \(name) ')]").compactMap { $0 as? XMLElement }
}

func texts(_ root: XMLElement) throws -> [String] {
    try root.nodes(forXPath: ".//*[local-name()='text']").compactMap(\.stringValue)
}

@Suite("Timeline")
struct TimelineTests {
    @Test("the synthetic job: a failure mark, the five phases in colour and in the legend, a lane per node, the replacement's pid")
    func syntheticJob() throws {
        let svg = Timeline.svg(syntheticJobEvents(), title: "job synth <&> \"q\"")
        let root = try parseSVG(svg)
        let words = try texts(root)
        #expect(words.contains { $0.hasPrefix("job synth <&> \"q\" — 2 failures — 1m 02s") }, "\(words.prefix(3))")

        let failures = try elements(root, class: "failure")
        #expect(failures.count == 2)
        #expect(failures.contains { ($0.stringValue ?? "").contains("smp n1") })
        #expect(try elements(root, class: "worker-failure").count == 1)

        for (name, colour) in Timeline.phases {
            let marks = try elements(root, class: "phase-\(name)")
            #expect(marks.count >= 2, "\(name)")
            #expect(marks.allSatisfy { $0.xmlString.contains("fill=\"\(colour)\"") }, "\(name)")
        }
        let legend = try #require(try elements(root, class: "legend").first)
        let legendWords = try texts(legend)
        for (name, colour) in Timeline.phases {
            #expect(legendWords.contains(name))
            #expect(legend.xmlString.contains("fill=\"\(colour)\""))
        }

        let lanes = try elements(root, class: "lane")
        #expect(lanes.count == 4)
        for (k, lane) in lanes.enumerated() { #expect(try texts(lane).first == "n\(k)") }
        let replacements = try elements(root, class: "replacement")
        #expect(replacements.count == 1)
        let replacement = replacements.first?.stringValue ?? ""
        #expect(replacement.contains("pid 4305"))
        #expect(words.contains { $0.hasPrefix("pid 4305") })
        // n1's first incarnation failed; every node's incarnations: n1 two, the others one (announced again, same pid).
        #expect(try elements(lanes[1], class: "incarnation").count == 2)
        for k in [0, 2, 3] { #expect(try elements(lanes[k], class: "incarnation").count == 1, "n\(k)") }

        #expect(try elements(root, class: "coordinator-up").count == 2)  // the marker row and the axis
        #expect(try elements(root, class: "recovery").count == 2)
        #expect(try elements(root, class: "abort").count == 1)
        #expect(try elements(root, class: "fenced").count == 1)
        #expect(words.contains { $0.hasSuffix("resumed at step 290, 6 steps lost") }, "\(words)")
    }

    @Test("no events: a valid picture that says so")
    func empty() throws {
        let root = try parseSVG(Timeline.svg([], title: "job empty"))
        #expect(try texts(root).contains("no events"))
    }

    @Test("a job without failures: no failure marks, a recovery lane that says so")
    func noFailures() throws {
        let events = syntheticJobEvents().filter { $0.time < 1_796_292_000 + 30 }
        let root = try parseSVG(Timeline.svg(events, title: "calm"))
        #expect(try elements(root, class: "failure").isEmpty)
        #expect(try texts(root).contains("no failures"))
        #expect(try texts(root).contains { $0.hasPrefix("calm — 0 failures") })
    }

    @Test("a quarter of a million commits are thinned: the picture stays small")
    func manyCommits() throws {
        var events = [JobEvent(time: 1000, kind: .start, epoch: 1)]
        for s in 1...250_000 { events.append(JobEvent(time: 1000 + Double(s) * 0.01, kind: .commit, epoch: 1, step: s)) }
        let svg = Timeline.svg(events, title: "busy")
        #expect(svg.utf8.count < 200_000, "\(svg.utf8.count) bytes")
        _ = try parseSVG(svg)
    }

    @Test("text that is not XML-safe is escaped; characters XML does not allow are dropped")
    func escaping() throws {
        let events = [JobEvent(time: 5, kind: .failure, epoch: 1, what: "n0</text><script>", member: "smp", detail: "a\u{1}b & 'c'"),
                      JobEvent(time: 5.5, kind: .phase, epoch: 2, phase: "re\"build <x>", seconds: 0.2),
                      JobEvent(time: 6, kind: .stopped, epoch: 1, failed: true, detail: "<&>")]
        let root = try parseSVG(Timeline.svg(events, title: "t\u{0}<"))
        #expect(try texts(root).contains { $0.contains("n0</text><script>") })
        #expect(try root.nodes(forXPath: "//*[local-name()='script']").isEmpty)
    }

    @Test("an event for people: UTC to the millisecond, epoch, kind, the fields that are set")
    func describeLines() throws {
        let line = EventLog.describe(JobEvent(time: 1_796_292_001.234, kind: .failure, epoch: 3, step: 12, what: "n1", member: "smp",
                                              detail: "heartbeat timeout"))
        #expect(line == "2026-12-03T10:00:01.234Z  e3   failure         smp n1 (heartbeat timeout)  committed 12")
        #expect(EventLog.describe(JobEvent(time: 1_796_292_000, kind: .commit, epoch: 12, step: 7))
            == "2026-12-03T10:00:00.000Z  e12  commit          step 7")
    }
}

@Suite("ftctl timeline and events", .serialized)
struct TimelineCommandTests {
    /// A run directory holding the synthetic job's events.jsonl, and a torn last line.
    func runDirectory() throws -> String {
        let dir = "/tmp/ft-timeline-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let text = syntheticJobEvents().map { EventLog.line($0) + "\n" }.joined() + "{\"time\":1796292063,\"ki"
        try text.write(toFile: EventLog.path(runDirectory: dir), atomically: true, encoding: .utf8)
        try "synth\n".write(toFile: dir + "/job.id", atomically: true, encoding: .utf8)
        return dir
    }

    func cleanUp(_ dir: String) {
        if ProcessInfo.processInfo.environment["FT_KEEP_TEST_DIRS"] == nil {
            try? FileManager.default.removeItem(atPath: dir)
        } else {
            print("kept \(dir)")
        }
    }

    @Test("ftctl events: readable lines (the torn line counted), --json the raw lines")
    func events() throws {
        let dir = try runDirectory()
        defer { cleanUp(dir) }
        let count = syntheticJobEvents().count
        let (status, text, _) = try runTool("ftctl", ["events", dir])
        #expect(status == .exited(0), "\(text)")
        let lines = text.split(separator: "\n")
        #expect(lines.count == count + 1)
        #expect(lines.contains { $0.hasPrefix("2026-12-03T10:00:30.600Z  e1   failure         smp n1 (heartbeat timeout (silent 512 ms))  committed 290") },
                "\(text)")
        #expect(lines.contains { $0.contains("member          n1 (spare0 tcp://127.0.0.1:40100)  pid 4305") })
        #expect(lines.last == "(1 line skipped: torn (a crash while writing) or not an event)")

        let (jsonStatus, json, _) = try runTool("ftctl", ["events", dir, "--json"])
        #expect(jsonStatus == .exited(0))
        let raw = json.split(separator: "\n").filter { $0.hasPrefix("{") }
        #expect(raw.count == count)
        #expect(raw.allSatisfy { (try? JSONSerialization.jsonObject(with: Data($0.utf8))) != nil })
    }

    @Test("ftctl timeline writes the SVG; a missing run directory or event log is a clear error")
    func timeline() throws {
        let dir = try runDirectory()
        defer { cleanUp(dir) }
        let (status, text, _) = try runTool("ftctl", ["timeline", dir, "-o", dir + "/job.svg"])
        #expect(status == .exited(0), "\(text)")
        #expect(text.contains("wrote \(dir)/job.svg: \(syntheticJobEvents().count) events, 2 failures (1 line skipped"), "\(text)")
        let root = try parseSVG(readText(dir + "/job.svg"))
        #expect(try texts(root).contains { $0.hasPrefix("job synth — 2 failures") })

        let (defaultStatus, _, _) = try runTool("ftctl", ["timeline", dir])
        #expect(defaultStatus == .exited(0) && FileManager.default.fileExists(atPath: dir + "/timeline.svg"))

        let (missing, missingText, _) = try runTool("ftctl", ["timeline", dir + "/nope"])
        #expect(missing != .exited(0) && missingText.contains("no run directory at \(dir)/nope"), "\(missingText)")
        try FileManager.default.createDirectory(atPath: dir + "/empty", withIntermediateDirectories: true)
        let (noLog, noLogText, _) = try runTool("ftctl", ["events", dir + "/empty"])
        #expect(noLog != .exited(0) && noLogText.contains("no event log at \(dir)/empty/events.jsonl"), "\(noLogText)")

        let (helpStatus, help, _) = try runTool("ftctl", ["timeline", "--help"])
        #expect(helpStatus == .exited(0) && help.contains("--png") && help.contains("rsvg-convert"))
    }

    @Test("ftctl timeline --png converts with rsvg-convert",
          .enabled(if: ChildProcess.resolve("rsvg-convert") != nil, "rsvg-convert is not installed (Debian package librsvg2-bin)"))
    func png() throws {
        let dir = try runDirectory()
        defer { cleanUp(dir) }
        let (status, text, _) = try runTool("ftctl", ["timeline", dir, "-o", dir + "/job.svg", "--png", dir + "/job.png"])
        #expect(status == .exited(0), "\(text)")
        let png = try Data(contentsOf: URL(fileURLWithPath: dir + "/job.png"))
        #expect(png.starts(with: [0x89, 0x50, 0x4E, 0x47]))
        let width = png.count > 24 ? png[16..<20].reduce(0) { $0 << 8 | Int($1) } : 0
        #expect(width == 1200)
    }
}
