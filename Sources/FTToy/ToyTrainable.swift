import FTTraining
import FTWorker
import Foundation

/// The toy state as a `Trainable`: a step "computes" for `stepMilliseconds`
/// (interrupted at once by a pause) and the update rewrites every byte. This
/// is the demo trainer's synthetic mode and the test workload.
public final class ToyTrainable: Trainable, @unchecked Sendable {
    public let model: ToyModel
    public let stepMilliseconds: Double
    public let reportEvery: Int

    public init(model: ToyModel, stepMilliseconds: Double, reportEvery: Int = 50) {
        self.model = model
        self.stepMilliseconds = stepMilliseconds
        self.reportEvery = reportEvery
    }

    public var tensors: [RegisteredTensor] { model.tensors.map { RegisteredTensor(spec: $0.0, buffer: $0.1) } }
    public var step: Int { model.step }
    public func reset() { model.reset() }

    public func computeGradients(step s: Int, collective: RingCollective, interrupt: Int32) throws {
        guard stepMilliseconds > 0 else { return }
        var p = pollfd(fd: interrupt, events: Int16(POLLIN), revents: 0)
        if poll(&p, 1, Int32(stepMilliseconds.rounded(.up))) > 0 { throw Interrupted() }
    }

    public func applyUpdate(step s: Int) { model.apply(step: s) }
    public var hash: String { model.hash }
    public func report(step s: Int) -> String? { s % reportEvery == 0 ? "step=\(s)" : nil }
}
