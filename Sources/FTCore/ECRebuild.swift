/// Fetching and decoding codeword bytes from a group's survivors
/// (ARCHITECTURE.md, "Erasure coding across nodes", "Recovery" step 3): a
/// replacement node's rebuild of its image and parity, and the repair of a
/// range found corrupt on a live node (a chunk that fails its CRC is an
/// erasure too). Driven by the SMP's event loop, so heartbeats and the
/// coordinator's messages keep flowing while frames are in flight.
///
/// The work is cut into tasks, one frame (`frameBytes`) of one row each: ask
/// k holders of the row (never this node, a lost node or one that failed) for
/// the frame's byte range (`ecFetch`), decode it as soon as k answers
/// (`ecChunkData`) are in, straight into its destination, and drop the
/// answers. At most `window` tasks are in flight, so at most `window × k`
/// answers are held. A holder that does not answer within `timeout` is not
/// asked again in this job; one that answers a frame with an error or a bad
/// CRC is not asked for that frame again. Either way the frame goes to
/// another holder, or the job fails with the reason.
///
/// A rebuild (`.node`) has two phases: the first bytes of the image (the
/// manifest says which workers and slots to create, and how long the image
/// is), then the rest of the image and this node's parity of every row it
/// holds. A repair (`.ranges`) fetches only the ranges it is given.
///
/// A value type: events and `now` in, `Directive`s out; the shell keeps the
/// answers' bytes (`onAnswer` says whether to) and decodes with ISA-L. Tasks
/// are started in queue order and holders asked in codeword-index order, so
/// a run replays exactly.
public struct RebuildInstance: Sendable {
    public enum Purpose: Sendable, Equatable {
        /// Rebuild the node: manifest first, then image and parity.
        case node
        /// Repair these ranges of this node's data chunks (row, range in the chunk).
        case ranges([(row: Int, range: Range<Int>)])

        public static func == (a: Purpose, b: Purpose) -> Bool {
            switch (a, b) {
            case (.node, .node): true
            case (.ranges(let x), .ranges(let y)): x.count == y.count && zip(x, y).allSatisfy { $0.row == $1.row && $0.range == $1.range }
            default: false
            }
        }
    }

    public enum Destination: Sendable, Hashable {
        /// The image's first bytes (from this image offset on), to read the manifest.
        case prefix(Int)
        /// The image from this byte offset on.
        case image(Int)
        /// This node's parity buffer of a row.
        case parity(row: Int)
    }

    public enum Phase: Sendable, Equatable { case manifest, body, done, failed(String) }

    public struct Key: Sendable, Hashable, Comparable {
        public var row: Int
        public var offset: Int
        public init(row: Int, offset: Int) {
            self.row = row
            self.offset = offset
        }
        public static func < (a: Key, b: Key) -> Bool { (a.row, a.offset) < (b.row, b.offset) }
    }

    public struct Task: Sendable, Equatable {
        public var row: Int
        public var offset: Int
        public var length: Int
        public var destination: Destination
        /// Outstanding requests: codeword index -> (node, deadline).
        public var requested: [Int: Request] = [:]
        /// Indexes answered well (the shell holds their bytes).
        public var have: Set<Int> = []
        /// Indexes that failed for this task.
        public var tried: Set<Int> = []
        public var key: Key { Key(row: row, offset: offset) }
    }
    public struct Request: Sendable, Equatable {
        public var node: String
        public var deadline: Double
    }

    /// Decode one frame: the answers of `have` (k codeword indexes) into
    /// codeword index `mine` of `row`, `length` bytes, to `destination`.
    public struct Decode: Sendable, Equatable {
        public var row: Int
        public var offset: Int
        public var length: Int
        public var destination: Destination
        public var have: [Int]
        public var mine: Int
    }

    public enum Directive: Sendable, Equatable {
        case fetch(node: String, step: Int, row: Int, index: Int, offset: Int, length: Int)
        case decode(Decode)
        /// The prefix (`bytes` long) is decoded: read the manifest's length
        /// from it and call `prefixRead(manifestBytes:)`.
        case readPrefix(bytes: Int)
        /// The manifest is longer than the prefix: grow the prefix buffer to
        /// this size, keeping the bytes it holds (the rest is queued).
        case growPrefix(bytes: Int)
        /// The manifest is in the prefix: parse it, create the slots, and call
        /// `bodyPlanned(imageBytes:)`.
        case parseManifest
        /// A zeroed parity buffer of `row` to decode into.
        case reserveParity(row: Int)
        /// Every frame is decoded.
        case finished
        case failed(String)
        case warning(String)
    }

    public let step: Int
    public let lost: Set<String>
    public let purpose: Purpose
    public let k: Int
    public let m: Int
    public let chunkBytes: Int
    public let frameBytes: Int
    public let members: [String]
    public let position: Int
    public let window: Int
    public let timeout: Double
    public var placement: ParityPlacement { ParityPlacement(k: k, m: m) }
    public var node: String { members[position] }

    public private(set) var phase: Phase
    public private(set) var queue: [Task] = []
    public private(set) var next = 0
    public private(set) var inFlight: [Key: Task] = [:]
    /// Holders that timed out (or could not be reached): not asked again.
    public private(set) var failedNodes: Set<String> = []
    public private(set) var prefixBytes = 0
    public private(set) var imageBytes = 0
    public private(set) var bytesDecoded = 0

    public init(step: Int, lost: Set<String>, purpose: Purpose, k: Int, m: Int, chunkBytes: Int, frameBytes: Int,
                members: [String], position: Int, window: Int, timeout: Double) {
        precondition(members.count == k + m && window >= 1 && frameBytes > 0)
        self.step = step
        self.lost = lost
        self.purpose = purpose
        self.k = k
        self.m = m
        self.chunkBytes = chunkBytes
        self.frameBytes = frameBytes
        self.members = members
        self.position = position
        self.window = window
        self.timeout = timeout
        phase = purpose == .node ? .manifest : .body
    }

    public var isOver: Bool {
        switch phase {
        case .done, .failed: true
        default: false
        }
    }

    /// Answers held now (each at most `frameBytes`): at most `window × k`.
    public var answersHeld: Int { inFlight.values.reduce(0) { $0 + $1.have.count } }

    /// The first requests.
    public mutating func start(now: Double) -> [Directive] {
        switch purpose {
        case .node:
            prefixBytes = min(frameBytes, chunkBytes)
            enqueueImage(0..<prefixBytes) { .prefix($0) }
        case .ranges(let ranges):
            for r in ranges {
                let base = placement.dataRows(of: position).firstIndex(of: r.row)! * chunkBytes
                enqueue(row: r.row, from: r.range.lowerBound, length: r.range.count) { .image(base + $0) }
            }
        }
        return pump(now: now)
    }

    /// Tasks of `length` bytes of `row` from chunk offset `from`, frame by frame.
    private mutating func enqueue(row: Int, from: Int, length: Int, destination: (Int) -> Destination) {
        var offset = from
        while offset < from + length {
            let n = min(frameBytes, from + length - offset)
            queue.append(Task(row: row, offset: offset, length: n, destination: destination(offset)))
            offset += n
        }
    }

    /// Tasks for image bytes `range` (across data chunks), frame by frame;
    /// `destination` gets the image offset.
    private mutating func enqueueImage(_ range: Range<Int>, destination: (Int) -> Destination) {
        let rows = placement.dataRows(of: position)
        var lo = range.lowerBound
        while lo < range.upperBound {
            let c = lo / chunkBytes
            let hi = min(range.upperBound, (c + 1) * chunkBytes)
            let base = c * chunkBytes
            enqueue(row: rows[c], from: lo - base, length: hi - lo) { destination(base + $0) }
            lo = hi
        }
    }

    /// A holder answered: `error` nil and the bytes good (`length` bytes, the
    /// CRC matches), or why not. `keep`: hold the answer's bytes for a later
    /// `.decode` (false: drop them, the answer was not expected or was bad).
    public mutating func onAnswer(from sender: String, step: Int, row: Int, index: Int, offset: Int, error: String?,
                                  now: Double) -> (keep: Bool, directives: [Directive]) {
        guard !isOver, step == self.step, var task = inFlight[Key(row: row, offset: offset)],
              task.requested[index]?.node == sender else { return (false, []) }
        task.requested[index] = nil
        var out: [Directive] = []
        var keep = false
        if let error {
            // Only this frame goes elsewhere: an error names these bytes (a chunk
            // corrupt at rest, a bad transfer), and the holder may serve every
            // other frame well. Silence (`tick`) gives a holder up for the job.
            out.append(.warning("row \(row) of step \(step), bytes at \(offset): \(sender): \(error); asking another holder"))
            task.tried.insert(index)
        } else {
            task.have.insert(index)
            keep = true
        }
        if task.have.count == k {
            inFlight[task.key] = nil
            bytesDecoded += task.length
            out.append(.decode(Decode(row: row, offset: offset, length: task.length, destination: task.destination,
                                      have: task.have.sorted(), mine: placement.codewordIndex(of: position, row: row))))
        } else {
            inFlight[task.key] = task
        }
        return (keep, out + pump(now: now))
    }

    /// A fetch could not be sent to `node` (no endpoint, socket error).
    public mutating func unreachable(_ node: String, now: Double) -> [Directive] {
        guard !isOver else { return [] }
        failedNodes.insert(node)
        for key in inFlight.keys.sorted() {
            for (index, r) in inFlight[key]!.requested where r.node == node {
                inFlight[key]!.requested[index] = nil
                inFlight[key]!.tried.insert(index)
            }
        }
        return pump(now: now)
    }

    /// A holder's endpoint changed (a new socket): ask again what was asked of it.
    public mutating func endpointChanged(_ node: String, now: Double) -> [Directive] {
        guard !isOver else { return [] }
        for key in inFlight.keys.sorted() {
            inFlight[key]!.requested = inFlight[key]!.requested.filter { $0.value.node != node }
        }
        return pump(now: now)
    }

    /// The shell could not decode or place a frame, or gave up: the job fails.
    public mutating func fail(_ reason: String) -> [Directive] {
        guard !isOver else { return [] }
        phase = .failed(reason)
        inFlight = [:]
        return [.failed(reason)]
    }

    /// The earliest deadline of a request in flight.
    public var wakeAt: Double? {
        inFlight.values.flatMap { $0.requested.values.map(\.deadline) }.min()
    }

    /// Time passes: holders past their deadline are given up for this job.
    public mutating func tick(now: Double) -> [Directive] { pump(now: now) }

    /// The manifest's length, read from the decoded prefix.
    public mutating func prefixRead(manifestBytes: Int, now: Double) -> [Directive] {
        guard phase == .manifest else { return [] }
        guard manifestBytes > prefixBytes else { return [.parseManifest] }
        // A manifest may span data chunks (many tensors, small chunks): it is
        // fetched from every row it lies in.
        guard manifestBytes <= k * chunkBytes else {
            return fail("rebuilt manifest of \(manifestBytes) bytes exceeds the image's k × chunk (\(k) × \(chunkBytes))")
        }
        let had = prefixBytes
        prefixBytes = manifestBytes
        enqueueImage(had..<manifestBytes) { .prefix($0) }
        return [.growPrefix(bytes: manifestBytes)] + pump(now: now)
    }

    /// The manifest is parsed and the slots exist: fetch the rest of the image
    /// (`imageBytes` long) and this node's parity.
    public mutating func bodyPlanned(imageBytes: Int, now: Double) -> [Directive] {
        guard phase == .manifest else { return [] }
        guard imageBytes <= k * chunkBytes else { return fail("rebuilt image of \(imageBytes) bytes exceeds k × chunk") }
        self.imageBytes = imageBytes
        phase = .body
        var out: [Directive] = []
        for row in 0..<placement.n {
            let mine = placement.codewordIndex(of: position, row: row)
            if mine < k {
                let base = placement.dataRows(of: position).firstIndex(of: row)! * chunkBytes
                enqueue(row: row, from: 0, length: max(0, min(chunkBytes, imageBytes - base))) { .image(base + $0) }
            } else {
                out.append(.reserveParity(row: row))
                enqueue(row: row, from: 0, length: chunkBytes) { _ in .parity(row: row) }
            }
        }
        return out + pump(now: now)
    }

    /// Timeouts, new requests, the end of a phase.
    private mutating func pump(now: Double) -> [Directive] {
        guard !isOver else { return [] }
        var out: [Directive] = []
        for key in inFlight.keys.sorted() {
            for (index, r) in inFlight[key]!.requested.sorted(by: { $0.key < $1.key }) where now > r.deadline {
                out.append(.warning("row \(key.row) of step \(step), bytes at \(key.offset): no answer from \(r.node) "
                    + "within \(timeout) s; asking another holder"))
                failedNodes.insert(r.node)
                inFlight[key]!.requested[index] = nil
                inFlight[key]!.tried.insert(index)
            }
        }
        while inFlight.count < window && next < queue.count {
            inFlight[queue[next].key] = queue[next]
            next += 1
        }
        for key in inFlight.keys.sorted() {
            var task = inFlight[key]!
            if let error = request(&task, now: now, out: &out) { return out + fail(error) }
            inFlight[key] = task
        }
        guard inFlight.isEmpty && next == queue.count else { return out }
        switch phase {
        case .manifest:
            return out + [.readPrefix(bytes: prefixBytes)]
        case .body:
            phase = .done
            return out + [.finished]
        case .done, .failed:
            return out
        }
    }

    /// Asks holders for the task's frame until k answers are in or on their way.
    private func request(_ task: inout Task, now: Double, out: inout [Directive]) -> String? {
        let mine = placement.codewordIndex(of: position, row: task.row)
        var index = 0
        while task.have.count + task.requested.count < k {
            while index < placement.n {
                let holder = members[placement.position(ofCodewordIndex: index, row: task.row)]
                if index != mine, !task.have.contains(index), task.requested[index] == nil, !task.tried.contains(index),
                   !lost.contains(holder), !failedNodes.contains(holder), holder != node { break }
                index += 1
            }
            guard index < placement.n else {
                return "row \(task.row) of step \(step), bytes \(task.offset)..<\(task.offset + task.length): only "
                    + "\(task.have.count + task.requested.count) of the \(k) chunks needed are reachable "
                    + "(lost \(lost.sorted()), failed \(failedNodes.sorted()))"
            }
            let holder = members[placement.position(ofCodewordIndex: index, row: task.row)]
            task.requested[index] = Request(node: holder, deadline: now + timeout)
            out.append(.fetch(node: holder, step: step, row: task.row, index: index, offset: task.offset, length: task.length))
        }
        return nil
    }
}
