import FTSystem

/// The workload the chaos harness runs (`chaos/run --worker`).
public enum ChaosWorker: Sendable, Equatable {
    /// `ft-demo-trainer`, the Swift char LM (or its synthetic state).
    case demo
    /// The PyTorch GPT example under ft_torch: `python` runs `script`
    /// (python/examples/gpt.py), one worker per node (four torch processes
    /// already fill this machine's two cores).
    case torch(python: String, script: String)

    /// Scenarios whose faults the worker injects into itself (the Swift
    /// training loop's FT_FAULT_* variables): only the demo trainer has them.
    public static let selfInflicted: Set<String> = ["kill-worker-mid-copy", "stuck-worker"]

    public func supports(_ scenario: String) -> Bool {
        self == .demo || !Self.selfInflicted.contains(scenario)
    }

    /// The worker command for `steps` steps, or nil for the demo trainer's (the runner's own).
    func command(steps: Int) -> [String]? {
        guard case .torch(let python, let script) = self else { return nil }
        return [python, script, "--steps", "\(steps)", "--report-every", "50"]
    }

    /// A PyTorch worker's restart rebuilds its process group (and a lost
    /// node's new process imports torch first): recovery phases get longer.
    func configure(_ o: inout LocalJob.Options) {
        if case .torch = self { o.phaseTimeout = 60 }
    }

    /// The job shape for this workload.
    func adjust(_ shape: ChaosRunner.Shape) -> ChaosRunner.Shape {
        guard case .torch = self else { return shape }
        var s = shape
        s.workersPerNode = 1
        return s
    }

    /// The torch worker of this source tree: `python` (a name in PATH or a
    /// path) running python/examples/gpt.py; nil with the reason when either
    /// is missing.
    public static func torch(python: String) -> Result<ChaosWorker, ChaosRunner.ChaosError> {
        guard let script = repositoryFile("python/examples/gpt.py") else {
            return .failure(.init(.usage, "python/examples/gpt.py not found above \(executableDirectory)"))
        }
        guard let interpreter = ChildProcess.resolve(python) else { return .failure(.init(.usage, "\(python) not found in PATH")) }
        return .success(.torch(python: interpreter, script: script))
    }
}
