import FTCore
import Foundation

/// A picture of a job's life from its event log (`JobEvent`s): a standalone
/// SVG 1.1 document, about 1200 pixels wide, no external resources.
///
/// One time axis (seconds since the first event) is shared by, top to bottom:
/// - markers: a red triangle at each failure, labelled with what failed, and
///   a brown diamond where a coordinator started again;
/// - the committed step over time (a line through the commits, the failures'
///   and resumes' steps and the starts; thinned to a few points a pixel);
/// - each sampled commit as a tick (aborted snapshot rounds as orange marks);
/// - each recovery as a bar from its failure to `resumed`, split into its
///   phases (a phase ends at its event and lasts its `seconds`);
/// - a lane per node, a segment per incarnation (`member` events), labelled
///   with its pid and endpoint; a failed incarnation ends in a cross.
/// Under the axis: a legend, and the recoveries side by side to one scale
/// (a sub-second recovery is a sliver on an hour-long axis), phase by phase.
public enum Timeline {
    /// The recovery phases in order, with their colours.
    public static let phases: [(name: String, colour: String)] = [
        ("detect", "#f28e2b"), ("plan", "#b07aa1"), ("rebuild", "#4e79a7"), ("restart", "#59a14f"), ("resume", "#76b7b2"),
    ]

    public static func svg(_ events: [JobEvent], title: String) -> String {
        let model = Model(events)
        var picture = Picture(model: model, title: title)
        return picture.render()
    }

    /// `seconds` as a duration: `0.35 s`, `12.4 s`, `4m 05s`, `1h 02m 03s`.
    public static func duration(_ seconds: Double) -> String {
        let s = max(0, seconds)
        if s < 10 { return String(format: "%.2f s", s) }
        if s < 60 { return String(format: "%.1f s", s) }
        let whole = Int(s.rounded())
        if whole < 3600 { return String(format: "%dm %02ds", whole / 60, whole % 60) }
        return String(format: "%dh %02dm %02ds", whole / 3600, whole % 3600 / 60, whole % 60)
    }

    /// Unix seconds as UTC to the millisecond: `2026-12-03T10:00:01.234Z`.
    public static func utc(_ time: Double) -> String {
        let ms = Int((time * 1000).rounded())
        let (seconds, fraction) = ms.quotientAndRemainder(dividingBy: 1000)
        return MillisecondLogHandler.timestamp(timespec(tv_sec: seconds, tv_nsec: fraction * 1_000_000))
    }

    /// Orders node names as people do: n2 before n10.
    static func nodeOrder(_ a: String, _ b: String) -> Bool {
        func split(_ s: String) -> (String, Int?) {
            let digits = s.reversed().prefix { $0.isASCII && $0.isNumber }
            return (String(s.dropLast(digits.count)), digits.isEmpty ? nil : Int(String(digits.reversed())))
        }
        let (pa, na) = split(a), (pb, nb) = split(b)
        if pa != pb { return pa < pb }
        if let na, let nb, na != nb { return na < nb }
        return a < b
    }
}

// MARK: - What the picture shows

extension Timeline {
    /// The job's life, read from its events; times are seconds since the first event.
    struct Model {
        struct Failure {
            var t: Double
            var what: String
            var member: String?
            var detail: String?
            var step: Int?
            var label: String { [member, what].compactMap { $0 }.joined(separator: " ") }
        }

        struct Phase {
            var name: String
            var start: Double
            var end: Double
            var seconds: Double
            var detail: String?
            var tip: String { "\(name) \(String(format: "%.3f", seconds)) s\(detail.map { ": \($0)" } ?? "")" }
        }

        struct Recovery {
            enum Outcome: Equatable { case resumed, stopped, open }
            var start: Double
            var end: Double
            var failures: [Int] = []
            var phases: [Phase] = []
            var seconds: Double?
            var stepsLost: Int?
            var restoredStep: Int?
            var outcome: Outcome = .open
            /// The whole recovery: the coordinator's own figure when it resumed, else from the detection
            /// (the first failure event; the detect phase lies before it) to the end.
            var total: Double { seconds ?? (end - (failures.isEmpty ? start : detectedAt)) }
            var detectedAt = 0.0
            /// What the breakdown draws: the total, or the phases end to end where they add up to more.
            var extent: Double { max(total, phases.reduce(0) { $0 + $1.seconds }) }
        }

        struct Incarnation {
            var node: String
            var pid: Int?
            var detail: String?
            var start: Double
            var end: Double
            var failed = false
            var replacement = false
            var open = true
        }

        var t0 = 0.0
        var span = 1.0
        var steps: [(t: Double, step: Int)] = []
        var commits: [Double] = []
        var aborts: [(t: Double, step: Int?, detail: String?)] = []
        var failures: [Failure] = []
        var recoveries: [Recovery] = []
        var nodes: [String] = []
        var incarnations: [Incarnation] = []
        /// Worker failures, on their node's lane.
        var workerFailures: [(t: Double, node: String, what: String)] = []
        var fenced: [(t: Double, node: String, pid: Int?)] = []
        /// Coordinators that started after the first event.
        var coordinatorRestarts: [(t: Double, pid: Int?)] = []
        var stopped: (t: Double, detail: String?, failed: Bool)?
        var isEmpty = true

        init(_ raw: [JobEvent]) {
            guard !raw.isEmpty else { return }
            isEmpty = false
            // Stable by time: a log is appended in order, but a clock step must not scramble the picture.
            let events = raw.enumerated().sorted { ($0.element.time, $0.offset) < ($1.element.time, $1.offset) }.map(\.element)
            t0 = events[0].time
            span = max(events[events.count - 1].time - t0, 1e-3)
            var openRecovery: Int?
            var current: [String: Int] = [:]  // node -> index of its open incarnation
            var nodeSet = Set<String>()

            func endIncarnation(_ node: String, at t: Double, failed: Bool) {
                if let i = current.removeValue(forKey: node) {
                    incarnations[i].end = t
                    incarnations[i].failed = failed
                    incarnations[i].open = false
                } else if failed {
                    // Failed before any member event said who it was (the log began later): from the lane's last end.
                    let from = incarnations.last { $0.node == node }?.end ?? 0
                    incarnations.append(Incarnation(node: node, start: from, end: t, failed: true, open: false))
                }
                nodeSet.insert(node)
            }
            func recoveryIndex(startingAt t: Double) -> Int {
                if let openRecovery { return openRecovery }
                recoveries.append(Recovery(start: t, end: t))
                openRecovery = recoveries.count - 1
                return recoveries.count - 1
            }

            for (index, e) in events.enumerated() {
                let t = e.time - t0
                switch e.kind {
                case .coordinatorUp:
                    if index > 0 { coordinatorRestarts.append((t, e.pid)) }
                case .start:
                    steps.append((t, e.step ?? 0))
                case .commit:
                    commits.append(t)
                    if let s = e.step { steps.append((t, s)) }
                case .abort:
                    aborts.append((t, e.step, e.detail))
                case .failure:
                    let what = e.what ?? "?"
                    failures.append(Failure(t: t, what: what, member: e.member, detail: e.detail, step: e.step))
                    if let s = e.step { steps.append((t, s)) }
                    let r = recoveryIndex(startingAt: t)
                    if recoveries[r].failures.isEmpty { recoveries[r].detectedAt = t }
                    recoveries[r].failures.append(failures.count - 1)
                    let names = what.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
                    if e.member == "smp" {
                        for node in names { endIncarnation(node, at: t, failed: true) }
                    } else if e.member == "worker" {
                        for name in names { workerFailures.append((t, String(name.prefix { $0 != "/" }), name)) }
                    }
                case .phase:
                    let seconds = max(0, e.seconds ?? 0)
                    let start = max(0, t - seconds)  // a phase that began before the log did starts with the picture
                    let r = recoveryIndex(startingAt: start)
                    recoveries[r].phases.append(Phase(name: e.phase ?? "?", start: start, end: t, seconds: seconds, detail: e.detail))
                case .resumed:
                    let r = recoveryIndex(startingAt: max(0, t - max(0, e.seconds ?? 0)))
                    recoveries[r].end = t
                    recoveries[r].seconds = e.seconds
                    recoveries[r].stepsLost = e.stepsLost
                    recoveries[r].restoredStep = e.step
                    recoveries[r].outcome = .resumed
                    openRecovery = nil
                    if let s = e.step { steps.append((t, s)) }
                case .member:
                    guard let node = e.what else { break }
                    if let i = current[node] {
                        if incarnations[i].pid == e.pid { break }  // the same process, announced again (a restarted coordinator)
                        endIncarnation(node, at: t, failed: false)
                    }
                    let replacement = incarnations.contains { $0.node == node }
                    incarnations.append(Incarnation(node: node, pid: e.pid, detail: e.detail, start: t, end: t, replacement: replacement))
                    current[node] = incarnations.count - 1
                    nodeSet.insert(node)
                case .fenced:
                    if let what = e.what { fenced.append((t, String(what.prefix { $0 != "/" }), e.pid)) }
                case .persisted, .persistFailed:
                    break  // the disk tier: in the event log, not drawn
                case .stopped:
                    stopped = (t, e.detail, e.failed ?? false)
                    if let r = openRecovery {
                        recoveries[r].end = t
                        recoveries[r].outcome = .stopped
                        openRecovery = nil
                    }
                    for node in current.keys { endIncarnation(node, at: t, failed: false) }
                }
            }
            if let r = openRecovery { recoveries[r].end = span }
            for i in incarnations.indices where incarnations[i].open { incarnations[i].end = span }
            for r in recoveries.indices {
                let earliest = recoveries[r].phases.map(\.start).min() ?? recoveries[r].start
                recoveries[r].start = min(recoveries[r].start, earliest)
            }
            nodes = nodeSet.sorted(by: Timeline.nodeOrder)
            // Only on lanes that exist (a worker's name need not start with its node's).
            workerFailures.removeAll { !nodeSet.contains($0.node) }
            fenced.removeAll { !nodeSet.contains($0.node) }
        }
    }
}

// MARK: - Drawing

extension Timeline {
    struct Picture {
        let model: Model
        let title: String
        var body = ""

        static let width = 1200.0
        static let left = 96.0
        static let right = 1160.0
        static let font = "DejaVu Sans, Verdana, Helvetica, Arial, sans-serif"
        static let red = "#d62728"
        static let coordinatorColour = "#8c564b"
        static let abortColour = "#e08214"
        static let unaccounted = "#d9d9d9"

        init(model: Model, title: String) {
            self.model = model
            self.title = title
        }

        func x(_ t: Double) -> Double { Self.left + (Self.right - Self.left) * t / model.span }

        mutating func render() -> String {
            guard !model.isEmpty else { return emptyPicture() }
            let failures = model.failures.count
            let tail = " — \(failures) failure\(failures == 1 ? "" : "s") — \(Timeline.duration(model.span))"
            header(Picture.shorten(title, toWidth: Self.width - 40 - Picture.textWidth(tail, size: 18), size: 18) + tail, [
                "\(Timeline.utc(model.t0)) to \(Timeline.utc(model.t0 + model.span))",
                "\(model.commits.count) sampled commit\(model.commits.count == 1 ? "" : "s")",
                model.coordinatorRestarts.isEmpty ? nil : "coordinator started again \(model.coordinatorRestarts.count)×",
                model.stopped.map { "stopped\($0.failed ? " (failed)" : ""): \($0.detail ?? "")" },
            ].compactMap { $0 }.joined(separator: " · "))
            var y = 58.0
            y = markers(top: y)
            let chartTop = y
            y = stepsPanel(top: y + 4, height: 190)
            y = commitStrip(top: y + 8)
            y = recoveryLane(top: y + 8)
            y = nodeLanes(top: y + 12)
            let chartBottom = y
            guides(top: chartTop, bottom: chartBottom)
            y = axis(top: chartBottom + 6)
            y = legend(top: y + 10)
            y = breakdown(top: y + 14)
            return document(height: (y + 16).rounded())
        }

        // MARK: pieces

        func document(height: Double) -> String {
            """
            <?xml version="1.0" encoding="UTF-8"?>
            <svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="\(Int(Self.width))" height="\(Int(height))" \
            viewBox="0 0 \(Int(Self.width)) \(Int(height))" font-family="\(Self.font)" font-size="11">
            <rect x="0" y="0" width="\(Int(Self.width))" height="\(Int(height))" fill="#ffffff"/>
            \(body)</svg>

            """
        }

        mutating func emptyPicture() -> String {
            header("\(title) — no events", "the event log holds no events")
            body += rect(Self.left, 70, Self.right - Self.left, 180, fill: "#f7f7f7", stroke: "#cccccc", dashed: true)
            body += text("no events", x: (Self.left + Self.right) / 2, y: 165, size: 28, colour: "#888888", anchor: "middle")
            body += text("(has the coordinator written RUN_DIR/events.jsonl yet?)", x: (Self.left + Self.right) / 2, y: 190,
                         size: 12, colour: "#888888", anchor: "middle")
            return document(height: 280)
        }

        mutating func header(_ headline: String, _ subtitle: String) {
            body += text(headline, x: 20, y: 28, size: 18, weight: "bold", colour: "#222222")
            body += text(Picture.shorten(subtitle, toWidth: Self.width - 40, size: 11), x: 20, y: 47, size: 11, colour: "#666666")
        }

        /// Failure triangles and coordinator diamonds, labels staggered on three rows so that they do not overlap.
        mutating func markers(top: Double) -> Double {
            let rowHeight = 14.0
            let rows = 3
            guard !model.failures.isEmpty || !model.coordinatorRestarts.isEmpty else { return top }
            var rowEnds = Array(repeating: -Double.infinity, count: rows)
            var used = 1
            var items: [(t: Double, label: String, tip: String, failure: Bool)] = model.failures.map {
                ($0.t, $0.label, "failure: \($0.label) at \(String(format: "%.3f", $0.t)) s — \($0.detail ?? "")"
                    + ($0.step.map { " (committed step \($0))" } ?? ""), true)
            }
            items += model.coordinatorRestarts.map {
                ($0.t, "coordinator up", "coordinator started again\($0.pid.map { " (pid \($0))" } ?? "") at \(String(format: "%.3f", $0.t)) s", false)
            }
            items.sort { $0.t < $1.t }
            for item in items {
                let cx = x(item.t)
                let label = Picture.shorten(item.label, toWidth: 150, size: 10)
                let labelWidth = Picture.textWidth(label, size: 10)
                // Right of the mark, or left of it near the picture's right edge.
                let leftward = cx + 8 + labelWidth > Self.width - 8
                let from = leftward ? cx - 8 - labelWidth : cx - 6
                let row = rowEnds.firstIndex { $0 + 6 < from } ?? rowEnds.indices.min { rowEnds[$0] < rowEnds[$1] }!
                let fits = rowEnds[row] + 6 < from
                let cy = top + Double(row) * rowHeight + 6
                used = max(used, row + 1)
                var mark = item.failure ? triangle(cx, cy) : diamond(cx, cy, radius: 6, fill: Self.coordinatorColour)
                if fits {
                    mark += text(label, x: leftward ? cx - 8 : cx + 8, y: cy + 4, size: 10,
                                 colour: item.failure ? Self.red : Self.coordinatorColour, anchor: leftward ? "end" : nil)
                    rowEnds[row] = leftward ? cx + 6 : cx + 8 + labelWidth
                }
                body += group(item.failure ? "failure" : "coordinator-up", tip: item.tip, mark)
            }
            return top + Double(used) * rowHeight + 2
        }

        /// Dashed verticals from each failure and coordinator start down through the lanes.
        mutating func guides(top: Double, bottom: Double) {
            var out = ""
            for failure in model.failures {
                out += line(x(failure.t), top, x(failure.t), bottom, colour: Self.red, width: 0.8, dash: "4,3", opacity: 0.6)
            }
            for up in model.coordinatorRestarts {
                out += line(x(up.t), top, x(up.t), bottom, colour: Self.coordinatorColour, width: 0.8, dash: "1,3", opacity: 0.8)
            }
            body += out
        }

        mutating func stepsPanel(top: Double, height: Double) -> Double {
            let bottom = top + height
            let maxStep = max(1, model.steps.map(\.step).max() ?? 1)
            let tick = Picture.niceStep(Double(maxStep) / 5)
            let yMax = (Double(maxStep) / tick).rounded(.up) * tick
            func y(_ s: Double) -> Double { bottom - height * s / yMax }
            body += rect(Self.left, top, Self.right - Self.left, height, fill: "#fbfbfb", stroke: "#cccccc")
            var v = 0.0
            while v <= yMax + 1e-9 {
                body += line(Self.left, y(v), Self.right, y(v), colour: "#e6e6e6", width: 1)
                body += text(Picture.count(v), x: Self.left - 6, y: y(v) + 4, size: 10, colour: "#555555", anchor: "end")
                v += tick
            }
            body += "<text x=\"22\" y=\"\(f(top + height / 2))\" font-size=\"12\" fill=\"#333333\" text-anchor=\"middle\" "
                + "transform=\"rotate(-90 22 \(f(top + height / 2)))\">committed step</text>\n"
            if model.steps.isEmpty {
                body += text("no commits", x: Self.left + 10, y: bottom - 10, size: 12, colour: "#888888")
                return bottom
            }
            let points = Picture.thin(model.steps.map { (x($0.t), y(Double($0.step))) })
            body += "<polyline fill=\"none\" stroke=\"#1f4e79\" stroke-width=\"1.6\" stroke-linejoin=\"round\" points=\""
                + points.map { "\(f($0.0)),\(f($0.1))" }.joined(separator: " ") + "\"/>\n"
            if let last = model.steps.last {
                // Top left: where a line that starts at the bottom left seldom is.
                body += text("last step \(last.step)", x: Self.left + 6, y: top + 14, size: 10, colour: "#1f4e79")
            }
            return bottom
        }

        mutating func commitStrip(top: Double) -> Double {
            let height = 12.0
            laneLabel("commits", top: top, height: height)
            var seen = Set<Int>()
            var d = ""
            for t in model.commits where seen.insert(Int(x(t).rounded())).inserted {
                d += "M\(f(x(t))),\(f(top))v\(f(height))"
            }
            if !d.isEmpty { body += "<path d=\"\(d)\" stroke=\"#555555\" stroke-width=\"1\"/>\n" }
            for a in model.aborts {
                body += group("abort", tip: "snapshot round \(a.step.map(String.init) ?? "?") aborted: \(a.detail ?? "")",
                              cross(x(a.t), top + height / 2, size: 4, colour: Self.abortColour, width: 2))
            }
            return top + height
        }

        mutating func recoveryLane(top: Double) -> Double {
            let height = 18.0
            laneLabel("recovery", top: top, height: height)
            if model.recoveries.isEmpty {
                body += text("no failures", x: Self.left + 6, y: top + 13, size: 11, colour: "#888888")
                return top + height
            }
            for (i, r) in model.recoveries.enumerated() {
                let x0 = x(r.start), x1 = max(x(r.end), x0 + 2)
                var out = rect(x0, top, x1 - x0, height, fill: Self.unaccounted)
                for p in r.phases {
                    let px0 = x(p.start), px1 = max(x(p.end), px0 + 1.5)
                    out += group("phase phase-\(p.name)", tip: p.tip,
                                 rect(px0, top, px1 - px0, height, fill: Picture.phaseColour(p.name)))
                }
                out += rect(x0, top, x1 - x0, height, fill: "none", stroke: r.outcome == .resumed ? "#555555" : Self.red,
                            dashed: r.outcome != .resumed)
                let tip = "recovery \(i + 1): \(Timeline.duration(r.total))" + (r.outcome == .resumed ? "" : r.outcome == .stopped ? ", job stopped" : ", unfinished")
                body += group("recovery", tip: tip, out)
            }
            return top + height
        }

        mutating func nodeLanes(top: Double) -> Double {
            let pitch = 26.0, height = 17.0
            guard !model.nodes.isEmpty else {
                laneLabel("nodes", top: top, height: height)
                body += text("no member events", x: Self.left + 6, y: top + 13, size: 11, colour: "#888888")
                return top + height
            }
            for (k, node) in model.nodes.enumerated() {
                let laneTop = top + Double(k) * pitch
                body += "<g class=\"lane\">\n"
                defer { body += "</g>\n" }
                laneLabel(node, top: laneTop, height: height)
                body += line(Self.left, laneTop + height / 2, Self.right, laneTop + height / 2, colour: "#eeeeee", width: 1)
                for inc in model.incarnations where inc.node == node {
                    let x0 = x(inc.start), x1 = max(x(inc.end), x0 + 2)
                    let fill = inc.replacement ? "#4f6273" : "#9aabbb"
                    var out = rect(x0, laneTop, x1 - x0, height, fill: fill, radius: 2)
                    let saysSo = inc.detail?.contains("replace") == true  // the coordinator's member events say whom it replaces
                    let words = [inc.pid.map { "pid \($0)" } ?? "pid ?", inc.replacement && !saysSo ? "(replacement)" : nil, inc.detail].compactMap { $0 }
                    let label = Picture.shorten(words.joined(separator: " "), toWidth: x1 - x0 - 8, size: 10)
                    if !label.isEmpty {
                        out += text(label, x: x0 + 4, y: laneTop + 12.5, size: 10, colour: inc.replacement ? "#ffffff" : "#1b2733")
                    }
                    if inc.replacement { out += rect(x0, laneTop - 2, 2.5, height + 4, fill: "#222222") }
                    if inc.failed { out += cross(x1, laneTop + height / 2, size: 6, colour: Self.red, width: 2.5) }
                    let tip = "\(node): " + words.joined(separator: " ")
                        + String(format: ", %.3f s to %.3f s", inc.start, inc.end) + (inc.failed ? " (failed)" : "")
                    body += group(inc.replacement ? "incarnation replacement" : "incarnation", tip: tip, out)
                }
                for w in model.workerFailures where w.node == node {
                    body += group("worker-failure", tip: "worker \(w.what) failed at \(String(format: "%.3f", w.t)) s",
                                  ring(x(w.t), laneTop + height / 2))
                }
                for fe in model.fenced where fe.node == node {
                    let cx = x(fe.t), cy = laneTop + height + 3
                    body += group("fenced", tip: "refused a message of a replaced incarnation\(fe.pid.map { " (pid \($0))" } ?? "")",
                                  diamond(cx, cy, radius: 3, fill: "#7f7f7f"))
                }
            }
            return top + Double(model.nodes.count - 1) * pitch + height
        }

        mutating func axis(top: Double) -> Double {
            body += line(Self.left, top, Self.right, top, colour: "#333333", width: 1)
            let tick = Picture.niceTime(model.span / 8)
            var t = 0.0
            while t <= model.span + 1e-9 {
                body += line(x(t), top, x(t), top + 5, colour: "#333333", width: 1)
                body += text(Picture.clock(t, step: tick), x: x(t), y: top + 17, size: 10, colour: "#333333", anchor: "middle")
                t += tick
            }
            for up in model.coordinatorRestarts {
                let cx = x(up.t)
                body += group("coordinator-up", tip: "coordinator started again\(up.pid.map { " (pid \($0))" } ?? "")",
                              diamond(cx, top, radius: 5, fill: Self.coordinatorColour))
            }
            body += text("seconds since the first event (\(Timeline.utc(model.t0)))", x: (Self.left + Self.right) / 2, y: top + 34,
                         size: 11, colour: "#333333", anchor: "middle")
            return top + 34
        }

        mutating func legend(top: Double) -> Double {
            var cx = Self.left
            var cy = top + 6
            var out = ""
            func entry(_ label: String, _ mark: (Double, Double) -> String) {
                let width = 14 + 6 + Picture.textWidth(label, size: 10)
                if cx + width > Self.right + 30 {
                    cx = Self.left
                    cy += 18
                }
                out += mark(cx, cy) + text(label, x: cx + 20, y: cy + 4, size: 10, colour: "#333333")
                cx += width + 16
            }
            // What the picture holds: a job without failures gets no phase colours.
            if !model.recoveries.isEmpty {
                for p in Timeline.phases { entry(p.name) { rect($0, $1 - 6, 14, 12, fill: p.colour) } }
                entry("other (recovery)") { rect($0, $1 - 6, 14, 12, fill: Self.unaccounted, stroke: "#555555") }
            }
            if !model.failures.isEmpty { entry("failure") { triangle($0 + 7, $1) } }
            if model.incarnations.contains(where: \.failed) { entry("node's process failed") { cross($0 + 7, $1, size: 5, colour: Self.red, width: 2.5) } }
            if !model.workerFailures.isEmpty { entry("worker failed") { ring($0 + 7, $1) } }
            if model.incarnations.contains(where: \.replacement) {
                entry("replacement") {
                    rect($0, $1 - 6, 6, 12, fill: "#9aabbb") + rect($0 + 7, $1 - 6, 2.5, 12, fill: "#222222") + rect($0 + 9.5, $1 - 6, 4.5, 12, fill: "#4f6273")
                }
            }
            if !model.fenced.isEmpty { entry("fenced message") { diamond($0 + 7, $1, radius: 3, fill: "#7f7f7f") } }
            if !model.coordinatorRestarts.isEmpty { entry("coordinator up") { diamond($0 + 7, $1, radius: 6, fill: Self.coordinatorColour) } }
            entry("commit") { line($0 + 7, $1 - 6, $0 + 7, $1 + 6, colour: "#555555", width: 1) }
            if !model.aborts.isEmpty { entry("aborted round") { cross($0 + 7, $1, size: 4, colour: Self.abortColour, width: 2) } }
            body += "<g class=\"legend\">\n" + out + "</g>\n"
            return cy + 6
        }

        /// The recoveries to one scale, phase by phase (at most `rows`: the longest, in time order).
        mutating func breakdown(top: Double) -> Double {
            guard !model.recoveries.isEmpty else { return top }
            let rows = 6
            let shown = model.recoveries.indices.sorted { model.recoveries[$0].extent > model.recoveries[$1].extent }.prefix(rows).sorted()
            let longest = max(shown.map { model.recoveries[$0].extent }.max() ?? 0, 1e-3)
            let barLeft = 280.0, barWidth = 500.0
            var heading = "recoveries to one scale (longest \(Timeline.duration(longest)))"
            if shown.count < model.recoveries.count { heading += ", the \(rows) longest of \(model.recoveries.count)" }
            body += text(heading, x: 20, y: top + 10, size: 12, weight: "bold", colour: "#333333")
            var y = top + 20
            for i in shown {
                let r = model.recoveries[i]
                let what = r.failures.map { model.failures[$0].label }.joined(separator: ", ")
                let at = r.failures.first.map { model.failures[$0].t } ?? r.start
                let label = "#\(i + 1) at \(String(format: "%.1f", at)) s: \(what.isEmpty ? "(no failure event)" : what)"
                body += text(Picture.shorten(label, toWidth: barLeft - 30, size: 11), x: 20, y: y + 12, size: 11, colour: "#333333")
                var cx = barLeft
                let scale = barWidth / longest
                for p in r.phases {
                    let w = p.seconds * scale
                    var out = rect(cx, y, max(w, 1), 16, fill: Picture.phaseColour(p.name))
                    let full = "\(p.name) \(Picture.seconds(p.seconds))", short = Picture.seconds(p.seconds)
                    if Picture.textWidth(full, size: 10) + 6 < w {
                        out += text(full, x: cx + 3, y: y + 12, size: 10, colour: "#ffffff")
                    } else if Picture.textWidth(short, size: 10) + 6 < w {
                        out += text(short, x: cx + 3, y: y + 12, size: 10, colour: "#ffffff")
                    }
                    body += group("breakdown-phase phase-\(p.name)", tip: p.tip, out)
                    cx += w
                }
                let other = r.total - r.phases.reduce(0) { $0 + $1.seconds }
                if other * scale >= 1 {
                    body += group("breakdown-other", tip: "not in a phase: \(String(format: "%.3f", other)) s", rect(cx, y, other * scale, 16, fill: Self.unaccounted))
                    cx += other * scale
                }
                var summary = Timeline.duration(r.total) + (r.failures.isEmpty ? "" : " from detection")
                switch r.outcome {
                case .resumed:
                    if let s = r.restoredStep { summary += ", resumed at step \(s)" }
                    if let lost = r.stepsLost { summary += ", \(lost) step\(lost == 1 ? "" : "s") lost" }
                case .stopped: summary += ", the job stopped"
                case .open: summary += ", not resumed when the log ends"
                }
                let summaryX = max(cx, barLeft) + 8
                body += text(Picture.shorten(summary, toWidth: Self.width - 8 - summaryX, size: 11), x: summaryX, y: y + 12, size: 11,
                             colour: r.outcome == .resumed ? "#333333" : Self.red)
                y += 22
            }
            return y
        }

        mutating func laneLabel(_ label: String, top: Double, height: Double) {
            body += text(Picture.shorten(label, toWidth: Self.left - 14, size: 11), x: Self.left - 8, y: top + height / 2 + 4,
                         size: 11, colour: "#333333", anchor: "end")
        }

        // MARK: SVG elements

        func f(_ v: Double) -> String { String(format: "%.1f", v) }

        func text(_ s: String, x: Double, y: Double, size: Double, weight: String? = nil, colour: String, anchor: String? = nil) -> String {
            "<text x=\"\(f(x))\" y=\"\(f(y))\" font-size=\"\(f(size))\" fill=\"\(colour)\""
                + (weight.map { " font-weight=\"\($0)\"" } ?? "") + (anchor.map { " text-anchor=\"\($0)\"" } ?? "")
                + ">\(Picture.escape(s))</text>\n"
        }

        func rect(_ x: Double, _ y: Double, _ w: Double, _ h: Double, fill: String, stroke: String? = nil, dashed: Bool = false,
                  radius: Double = 0) -> String {
            "<rect x=\"\(f(x))\" y=\"\(f(y))\" width=\"\(f(max(w, 0)))\" height=\"\(f(h))\" fill=\"\(fill)\""
                + (radius > 0 ? " rx=\"\(f(radius))\"" : "")
                + (stroke.map { " stroke=\"\($0)\" stroke-width=\"1\"" } ?? "") + (dashed ? " stroke-dasharray=\"4,3\"" : "") + "/>\n"
        }

        func line(_ x1: Double, _ y1: Double, _ x2: Double, _ y2: Double, colour: String, width: Double, dash: String? = nil,
                  opacity: Double = 1) -> String {
            "<line x1=\"\(f(x1))\" y1=\"\(f(y1))\" x2=\"\(f(x2))\" y2=\"\(f(y2))\" stroke=\"\(colour)\" stroke-width=\"\(f(width))\""
                + (dash.map { " stroke-dasharray=\"\($0)\"" } ?? "") + (opacity < 1 ? " stroke-opacity=\"\(f(opacity))\"" : "") + "/>\n"
        }

        /// A worker's failure: a red ring on its node's lane (the node's processes live on).
        func ring(_ cx: Double, _ cy: Double) -> String {
            "<circle cx=\"\(f(cx))\" cy=\"\(f(cy))\" r=\"4.5\" fill=\"#ffffff\" stroke=\"\(Self.red)\" stroke-width=\"2\"/>\n"
        }

        /// A failure: a red triangle pointing down at `cx`.
        func triangle(_ cx: Double, _ cy: Double) -> String {
            path("M\(f(cx - 6)),\(f(cy - 5)) L\(f(cx + 6)),\(f(cy - 5)) L\(f(cx)),\(f(cy + 6)) Z", fill: Self.red)
        }

        func diamond(_ cx: Double, _ cy: Double, radius r: Double, fill: String) -> String {
            path("M\(f(cx)),\(f(cy - r)) L\(f(cx + r)),\(f(cy)) L\(f(cx)),\(f(cy + r)) L\(f(cx - r)),\(f(cy)) Z", fill: fill)
        }

        func path(_ d: String, fill: String) -> String { "<path d=\"\(d)\" fill=\"\(fill)\"/>\n" }

        func cross(_ cx: Double, _ cy: Double, size: Double, colour: String, width: Double) -> String {
            "<path d=\"M\(f(cx - size)),\(f(cy - size)) L\(f(cx + size)),\(f(cy + size)) M\(f(cx - size)),\(f(cy + size)) L\(f(cx + size)),\(f(cy - size))\" "
                + "stroke=\"\(colour)\" stroke-width=\"\(f(width))\" stroke-linecap=\"round\" fill=\"none\"/>\n"
        }

        /// A group with a tooltip (`<title>`, shown by browsers on hover).
        func group(_ kind: String, tip: String, _ content: String) -> String {
            "<g class=\"\(Picture.escape(kind))\"><title>\(Picture.escape(tip))</title>\n\(content)</g>\n"
        }

        // MARK: helpers

        /// Text for XML character data and attribute values; characters XML 1.0 does not allow are dropped.
        static func escape(_ s: String) -> String {
            var out = ""
            out.reserveCapacity(s.utf8.count)
            for scalar in s.unicodeScalars {
                switch scalar {
                case "&": out += "&amp;"
                case "<": out += "&lt;"
                case ">": out += "&gt;"
                case "\"": out += "&quot;"
                case "'": out += "&apos;"
                case "\t", "\n", "\r": out += " "
                default:
                    let v = scalar.value
                    if v < 0x20 || (0xFFFE...0xFFFF).contains(v) || (0xD800...0xDFFF).contains(v) { continue }
                    out.unicodeScalars.append(scalar)
                }
            }
            return out
        }

        /// A rough width of `s` in pixels (the fonts are not known here).
        static func textWidth(_ s: String, size: Double) -> Double { Double(s.count) * size * 0.6 }

        /// `s` cut to about `width` pixels with an ellipsis; empty when not even a few characters fit.
        static func shorten(_ s: String, toWidth width: Double, size: Double) -> String {
            let fits = Int(width / (size * 0.6))
            if s.count <= fits { return s }
            return fits < 4 ? "" : String(s.prefix(fits - 1)) + "…"
        }

        static func phaseColour(_ name: String) -> String { Timeline.phases.first { $0.name == name }?.colour ?? "#999999" }

        static func seconds(_ s: Double) -> String { s < 1 ? String(format: "%.0f ms", s * 1000) : String(format: "%.2f s", s) }

        /// A step count on an axis: 1200, 15k, 2.5M.
        static func count(_ v: Double) -> String {
            if v >= 1_000_000 { return String(format: v.truncatingRemainder(dividingBy: 1_000_000) == 0 ? "%.0fM" : "%.1fM", v / 1_000_000) }
            if v >= 10_000 { return String(format: v.truncatingRemainder(dividingBy: 1000) == 0 ? "%.0fk" : "%.1fk", v / 1000) }
            return String(Int(v))
        }

        /// 1, 2 or 5 times a power of ten, at least `raw` (and at least 1: steps are whole).
        static func niceStep(_ raw: Double) -> Double {
            guard raw > 1 else { return 1 }
            let p = pow(10, floor(log10(raw)))
            return [1.0, 2, 5, 10].map { $0 * p }.first { $0 >= raw } ?? 10 * p
        }

        /// A tick interval in seconds, at least `raw`, that reads well on a clock.
        static func niceTime(_ raw: Double) -> Double {
            let candidates: [Double] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900,
                                        1800, 3600, 7200, 10800, 21600, 43200, 86400]
            return candidates.first { $0 >= raw } ?? 86400 * ceil(raw / 86400)
        }

        /// An axis label: `0.25s` below a second, `45s`, `2m30s`, `1h05m`.
        static func clock(_ t: Double, step: Double) -> String {
            if step < 1 { return String(format: step < 0.01 ? "%.3fs" : step < 0.1 ? "%.2fs" : "%.1fs", t) }
            let s = Int(t.rounded())
            if s < 60 { return "\(s)s" }
            if s < 3600 { return s % 60 == 0 ? "\(s / 60)m" : String(format: "%dm%02ds", s / 60, s % 60) }
            return s % 3600 == 0 ? "\(s / 3600)h" : String(format: "%dh%02dm", s / 3600, s % 3600 / 60)
        }

        /// At most four points a pixel column (the first, lowest, highest and last), in order: a line through
        /// a million commits costs what one through a few thousand does, and looks the same.
        static func thin(_ points: [(Double, Double)]) -> [(Double, Double)] {
            guard points.count > 2000 else { return points }
            var out: [(Double, Double)] = []
            var i = 0
            while i < points.count {
                let column = Int(points[i].0)
                var j = i
                while j + 1 < points.count && Int(points[j + 1].0) == column { j += 1 }
                let bucket = points[i...j].indices
                let low = bucket.min { points[$0].1 < points[$1].1 }!, high = bucket.max { points[$0].1 < points[$1].1 }!
                for k in Set([i, low, high, j]).sorted() { out.append(points[k]) }
                i = j + 1
            }
            return out
        }
    }
}
