/// One line of a job's event log (`RUN_DIR/events.jsonl`): what happened to
/// the job, as the coordinator decided it. The coordinator core emits them
/// (`CoordinatorInstance.Directive.event`); its shell stamps the wall-clock
/// time and appends one JSON object a line, and a restarted coordinator
/// appends to the same file. `ftctl events` prints the log, `ftctl timeline`
/// draws it.
///
/// Kinds and the fields each sets (every event has `time`, `kind`, `epoch`):
/// - `coordinator_up`: a coordinator process started (`pid`);
/// - `start`: every member is here, training starts (`step`: the step it
///   resumes from, nil for a fresh start; `detail`);
/// - `commit`: step `step` committed (sampled: at most one a second, and
///   always the first after a start or a recovery);
/// - `abort`: snapshot round `step` aborted (`detail`);
/// - `failure`: member `what` failed (`member`: smp or worker; `detail`: how
///   it was detected; `step`: the committed step then);
/// - `phase`: a recovery phase ended (`phase`: detect, plan, rebuild,
///   restart, resume; `seconds`; `detail`);
/// - `resumed`: the recovery ended, training resumes (`step`: the restored
///   step; `seconds`: the whole recovery; `steps_lost`);
/// - `member`: a process took a node's place (`what`: the node; `pid`;
///   `detail`: its data endpoint), at the start and for each replacement;
/// - `fenced`: a message of a replaced incarnation was refused (`what`, `pid`);
/// - `persisted`: step `step` became durable on disk (`seconds`: the persist's time; `detail`: the nodes);
/// - `persist_failed`: node `what` could not persist (`detail`: "code: reason", e.g. `out_of_space`);
/// - `stopped`: the job ended (`detail`: the reason; `failed`).
public struct JobEvent: Sendable, Equatable, Codable {
    public enum Kind: String, Sendable, Codable, CaseIterable {
        case coordinatorUp = "coordinator_up"
        case start, commit, abort, failure, phase, resumed, member, fenced, stopped, persisted
        case persistFailed = "persist_failed"
    }

    /// Seconds since 1970 (UTC), stamped by the shell.
    public var time: Double
    public var kind: Kind
    public var epoch: UInt64
    public var step: Int?
    public var what: String?
    /// smp or worker, for a failure.
    public var member: String?
    public var phase: String?
    public var seconds: Double?
    public var stepsLost: Int?
    public var pid: Int?
    public var failed: Bool?
    public var detail: String?

    public init(time: Double = 0, kind: Kind, epoch: UInt64, step: Int? = nil, what: String? = nil, member: String? = nil,
                phase: String? = nil, seconds: Double? = nil, stepsLost: Int? = nil, pid: Int? = nil, failed: Bool? = nil,
                detail: String? = nil) {
        self.time = time
        self.kind = kind
        self.epoch = epoch
        self.step = step
        self.what = what
        self.member = member
        self.phase = phase
        self.seconds = seconds
        self.stepsLost = stepsLost
        self.pid = pid
        self.failed = failed
        self.detail = detail
    }

    enum CodingKeys: String, CodingKey {
        case time, kind, epoch, step, what, member, phase, seconds, pid, failed, detail
        case stepsLost = "steps_lost"
    }
}
