import CFTWorker
import FTControl
import FTCore
import FTWorker
import Foundation

// The control half of the C interface (ft_worker.h): the coordinator's
// instructions as events behind a pollable descriptor, over `WorkerControl`.

/// One event handed out to C (restore, resume, stop, fenced, pause).
final class EventBox {
    let kind: Int32
    let epoch: UInt64
    let step: Int64
    let failed: Bool
    let reason: ContiguousArray<CChar>
    let sources: [String]

    init(kind: Int32, epoch: UInt64, step: Int64 = -1, failed: Bool = false, reason: String = "", sources: [String] = []) {
        self.kind = kind
        self.epoch = epoch
        self.step = step
        self.failed = failed
        self.reason = ContiguousArray(reason.utf8CString)
        self.sources = sources
        sourceStrings = sources.map { ContiguousArray($0.utf8CString) }
    }

    let sourceStrings: [ContiguousArray<CChar>]

    convenience init(_ instruction: WorkerControl.Instruction) {
        switch instruction {
        case .restore(let step, let sources, let epoch):
            self.init(kind: FT_EVENT_RESTORE, epoch: epoch, step: Int64(step ?? -1), sources: sources)
        case .resume(let from, _, let epoch):
            self.init(kind: FT_EVENT_RESUME, epoch: epoch, step: Int64(from))
        case .stop(let reason, let failed):
            self.init(kind: FT_EVENT_STOP, epoch: 0, failed: failed, reason: reason)
        case .fenced(let reason):
            self.init(kind: FT_EVENT_FENCED, epoch: 0, reason: reason)
        }
    }
}

/// A worker's control link, its queue of events and the pipe that is
/// readable while the queue is not empty.
final class ControlBox: @unchecked Sendable {
    let control: WorkerControl
    private let lock = NSLock()
    private var events: [EventBox] = []
    private var wasPaused = false
    let pipe: (read: Int32, write: Int32)

    init(control: WorkerControl) throws {
        self.control = control
        var fds: [Int32] = [0, 0]
        guard Glibc.pipe(&fds) == 0 else { throw ABIFailure(.transport, "pipe: errno \(errno)") }
        for fd in fds { _ = fcntl(fd, F_SETFL, O_NONBLOCK) }
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        pipe = (fds[0], fds[1])
    }

    deinit {
        close(pipe.read)
        close(pipe.write)
    }

    /// On the control thread: queue what changed (a pause as an event, then
    /// the instructions), and make the descriptor readable.
    func changed() {
        let paused = control.isPaused
        let epoch = control.epoch
        var new: [EventBox] = []
        lock.withLock {
            if paused && !wasPaused { new.append(EventBox(kind: FT_EVENT_PAUSE, epoch: epoch)) }
            wasPaused = paused
        }
        while let i = control.pollInstruction() { new.append(EventBox(i)) }
        guard !new.isEmpty else { return }
        lock.withLock { events += new }
        var b: UInt8 = 1
        _ = write(pipe.write, &b, 1)
    }

    func next() -> EventBox? {
        var buf = [UInt8](repeating: 0, count: 64)
        while read(pipe.read, &buf, buf.count) > 0 {}
        return lock.withLock {
            guard !events.isEmpty else { return nil }
            let e = events.removeFirst()
            if !events.isEmpty {
                var b: UInt8 = 1
                _ = write(pipe.write, &b, 1)  // still readable: more to take
            }
            return e
        }
    }

    /// Called by the C caller's `running`: a resume clears the pause.
    func markRunning() {
        lock.withLock { wasPaused = false }
        control.markRunning()
    }
}

@_cdecl("ft_control_open")
public func ft_control_open(_ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    abiCall {
        guard let out else { throw ABIFailure.invalid("out is NULL") }
        out.pointee = nil
        let env = ProcessInfo.processInfo.environment
        guard let endpoint = env["FT_COORDINATOR_ENDPOINT"], !endpoint.isEmpty else {
            throw ABIFailure(.noEnvironment, "FT_COORDINATOR_ENDPOINT is not set: no coordinator (ft-smp --coordinator)")
        }
        let identity: WorkerIdentity
        switch WorkerIdentity.fromEnvironment(env) {
        case .success(let i): identity = i
        case .failure(let e): throw ABIFailure(.noEnvironment, e.message)
        }
        let keys = try env["FT_KEYS_DIR"].map { try JobKeys.load(from: $0, role: .worker) }
        // The same timing as a Swift worker's (CoordinatedTrainingLoop.runUnderCoordinator).
        let heartbeat = env["FT_HEARTBEAT_MS"].flatMap(Double.init).map { $0 / 1000 } ?? 0.1
        let control = try WorkerControl(
            info: .init(node: env["FT_NODE_ID"] ?? "n0", worker: identity.workerID, rank: identity.dpRank,
                        worldSize: identity.dpSize, pid: Int(getpid()), collectiveEndpoint: ""),
            coordinatorEndpoint: endpoint, keys: keys, heartbeatInterval: heartbeat, coordinatorTimeout: max(1.0, 10 * heartbeat),
            log: { line in FileHandle.standardError.write(Data((line + "\n").utf8)) })
        let box = try ControlBox(control: control)
        control.onChange = { [weak box] in box?.changed() }
        control.start()
        out.pointee = handle(box)
    }
}

@_cdecl("ft_control_close")
public func ft_control_close(_ control: OpaquePointer?) {
    guard let box: ControlBox = try? object(control, "control") else { return }
    box.control.shutdown()
    release(control, as: ControlBox.self)
}

@_cdecl("ft_control_fd")
public func ft_control_fd(_ control: OpaquePointer?) -> Int32 {
    guard let box: ControlBox = try? object(control, "control") else { return -1 }
    return box.pipe.read
}

@_cdecl("ft_control_next")
public func ft_control_next(_ control: OpaquePointer?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    abiCall {
        let box: ControlBox = try object(control, "control")
        guard let out else { throw ABIFailure.invalid("out is NULL") }
        out.pointee = box.next().map { handle($0) }
    }
}

@_cdecl("ft_control_state")
public func ft_control_state(_ control: OpaquePointer?, _ paused: UnsafeMutablePointer<Int32>?, _ held: UnsafeMutablePointer<Int32>?,
                             _ epoch: UnsafeMutablePointer<UInt64>?) -> Int32 {
    abiCall {
        let box: ControlBox = try object(control, "control")
        paused?.pointee = box.control.isPaused ? 1 : 0
        held?.pointee = box.control.isHeld ? 1 : 0
        epoch?.pointee = box.control.epoch
    }
}

@_cdecl("ft_control_set_activity")
public func ft_control_set_activity(_ control: OpaquePointer?, _ kind: Int32, _ waitingOn: Int64) -> Int32 {
    abiCall {
        let box: ControlBox = try object(control, "control")
        guard let k = UInt8(exactly: kind).flatMap(WorkerActivity.Kind.init(rawValue:)) else {
            throw ABIFailure.invalid("unknown activity \(kind)")
        }
        box.control.setActivity(k, waitingOn: Int(waitingOn))
    }
}

@_cdecl("ft_control_ready")
public func ft_control_ready(_ control: OpaquePointer?, _ restored: Int64) -> Int32 {
    abiCall { (try object(control, "control") as ControlBox).control.ready(restoredStep: restored < 0 ? nil : Int(restored)) }
}

@_cdecl("ft_control_running")
public func ft_control_running(_ control: OpaquePointer?) -> Int32 {
    abiCall { (try object(control, "control") as ControlBox).markRunning() }
}

@_cdecl("ft_control_report")
public func ft_control_report(_ control: OpaquePointer?, _ step: Int64, _ skipped: Int64) -> Int32 {
    abiCall {
        let box: ControlBox = try object(control, "control")
        box.control.setStep(Int(step))
        box.control.setSkipped(Int(skipped))
    }
}

@_cdecl("ft_control_report_snapshots")
public func ft_control_report_snapshots(_ control: OpaquePointer?, _ staged: Int64, _ blockedSeconds: Double) -> Int32 {
    abiCall {
        let box: ControlBox = try object(control, "control")
        box.control.setSnapshotStats(staged: Int(max(0, staged)), blockedSeconds: blockedSeconds)
    }
}

@_cdecl("ft_control_restore_failed")
public func ft_control_restore_failed(_ control: OpaquePointer?, _ reason: UnsafePointer<CChar>?) -> Int32 {
    abiCall {
        let box: ControlBox = try object(control, "control")
        box.control.restoreFailed(reason.map { String(cString: $0) } ?? "")
    }
}

@_cdecl("ft_control_done")
public func ft_control_done(_ control: OpaquePointer?, _ final: Int64) -> Int32 {
    abiCall { (try object(control, "control") as ControlBox).control.done(finalStep: Int(final)) }
}

// MARK: events

@_cdecl("ft_event_kind")
public func ft_event_kind(_ event: OpaquePointer?) -> Int32 { (try? object(event, "event") as EventBox)?.kind ?? 0 }

@_cdecl("ft_event_epoch")
public func ft_event_epoch(_ event: OpaquePointer?) -> UInt64 { (try? object(event, "event") as EventBox)?.epoch ?? 0 }

@_cdecl("ft_event_step")
public func ft_event_step(_ event: OpaquePointer?) -> Int64 { (try? object(event, "event") as EventBox)?.step ?? -1 }

@_cdecl("ft_event_failed")
public func ft_event_failed(_ event: OpaquePointer?) -> Int32 { (try? object(event, "event") as EventBox)?.failed == true ? 1 : 0 }

@_cdecl("ft_event_reason")
public func ft_event_reason(_ event: OpaquePointer?) -> UnsafePointer<CChar>? {
    guard let box: EventBox = try? object(event, "event") else { return nil }
    return box.reason.withUnsafeBufferPointer { $0.baseAddress }  // lives as long as the event
}

@_cdecl("ft_event_source_count")
public func ft_event_source_count(_ event: OpaquePointer?) -> Int { (try? object(event, "event") as EventBox)?.sources.count ?? 0 }

@_cdecl("ft_event_source")
public func ft_event_source(_ event: OpaquePointer?, _ index: Int) -> UnsafePointer<CChar>? {
    guard let box: EventBox = try? object(event, "event"), box.sourceStrings.indices.contains(index) else { return nil }
    return box.sourceStrings[index].withUnsafeBufferPointer { $0.baseAddress }  // lives as long as the event
}

@_cdecl("ft_event_free")
public func ft_event_free(_ event: OpaquePointer?) { release(event, as: EventBox.self) }
