/// How often a job should expect a failure that the nodes' memory cannot
/// repair, and how many steps a repaired failure costs.
///
/// The job's state lives in the memory of its nodes, protected by
/// Reed-Solomon RS(k+m) across `groups` groups of `n = k + m` nodes: a group
/// survives any `m` lost nodes. After a node fails its group is short of one
/// part for a *window* `W`: detection, a replacement's start and the rebuild
/// from parity, until the group holds all `n` parts again. Memory alone
/// cannot recover (the job falls back to a checkpoint on storage, if it has
/// one) when `m` more nodes of that group fail within the window.
///
/// The model: every node fails independently, as a Poisson process of rate
/// λ per node (`nodeFailuresPerDay`), and a rebuilt node is as good as new.
/// With `p = 1 − exp(−λW)`, the chance that one given node fails within W,
///
///     lossPerFailure = P(Binomial(n − 1, p) ≥ m)
///                    = Σ_{j=m}^{n−1} C(n−1, j) p^j (1 − p)^(n−1−j)
///     lossPerDay     = groups · n · λ · lossPerFailure
///
/// `lossPerDay` is first order: it counts each failure that opens a window
/// in which `m` more of its group fail, so a run of overlapping windows in
/// one group, with more than `m + 1` failures, may count more than once: a
/// correction of relative order `n·p`, negligible for windows of minutes
/// and rates of failures per node-year. Failures that share a cause (a rack,
/// a switch, a power feed) are not independent; a layout that puts a group's
/// nodes behind one such cause makes the real figure worse than this one.
///
/// Pure arithmetic on the standard library (FTCore imports no libm): the
/// exponentials come from `expMinus1` and `exponential` below.
public struct DurabilityEstimate: Sendable, Equatable {
    /// About 4·10⁻³ failures per node per day (one node in 250 each day), the
    /// order reported for GPU nodes in large-cluster training.
    public static let defaultNodeFailuresPerDay = 4e-3
    /// The weight of the default rate against what a job observes, in
    /// node-days: 250 node-days at 4·10⁻³ a day count as one failure seen.
    public static let defaultPriorNodeDays = 250.0

    /// EC groups in the job.
    public let groups: Int
    /// Data and parity parts of a group: each group has `n = k + m` nodes.
    public let k: Int
    public let m: Int
    /// λ: failures per node per day.
    public let nodeFailuresPerDay: Double
    /// W: seconds from a failure until the lost node is rebuilt (detection,
    /// rebuild, restart).
    public let windowSeconds: Double

    public init(groups: Int, k: Int, m: Int,
                nodeFailuresPerDay: Double = DurabilityEstimate.defaultNodeFailuresPerDay,
                windowSeconds: Double) {
        precondition(groups >= 1 && k >= 1 && m >= 0, "needs at least one group of at least one data node")
        precondition(nodeFailuresPerDay >= 0 && nodeFailuresPerDay.isFinite, "the failure rate must be finite and not negative")
        precondition(windowSeconds >= 0 && windowSeconds.isFinite, "the window must be finite and not negative")
        self.groups = groups
        self.k = k
        self.m = m
        self.nodeFailuresPerDay = nodeFailuresPerDay
        self.windowSeconds = windowSeconds
    }

    public var n: Int { k + m }

    /// λW: expected failures of one node within the window.
    var failuresPerWindow: Double { nodeFailuresPerDay * windowSeconds / 86_400 }

    /// p = 1 − exp(−λW): the chance that one given node fails within the window.
    public var nodeFailureInWindow: Double { -Self.expMinus1(-failuresPerWindow) }

    /// P(memory alone cannot recover | a node failed): at least `m` of the
    /// other `n − 1` nodes of its group fail within the window.
    public var lossPerFailure: Double {
        Self.upperTail(atLeast: m, trials: n - 1, p: nodeFailureInWindow, q: Self.exponential(-failuresPerWindow))
    }

    /// Expected node failures per day in the whole job: groups · n · λ.
    public var failuresPerDay: Double { Double(groups) * Double(n) * nodeFailuresPerDay }

    /// Expected failures per day that memory cannot recover (first order, see
    /// the type's comment): groups · n · λ · lossPerFailure.
    public var lossPerDay: Double { failuresPerDay * lossPerFailure }

    /// 1 / lossPerDay; infinity when no loss is possible.
    public var daysBetweenLosses: Double { 1 / lossPerDay }

    // MARK: the failure rate from what the job saw

    /// The posterior mean of the failure rate, per node per day, under a
    /// Gamma prior: a prior rate λ₀ counted as `priorNodeDays` (E₀) of
    /// exposure, that is λ₀·E₀ failures seen, updated by Poisson
    /// observations of `observedFailures` over `observedNodeDays`:
    ///
    ///     λ = (λ₀·E₀ + failures) / (E₀ + node-days)
    ///
    /// No observations give back the prior; long exposure, the observed rate.
    public static func posteriorRate(prior: Double = DurabilityEstimate.defaultNodeFailuresPerDay,
                                     priorNodeDays: Double = DurabilityEstimate.defaultPriorNodeDays,
                                     observedFailures: Int, observedNodeDays: Double) -> Double {
        precondition(prior >= 0 && prior.isFinite && priorNodeDays > 0 && priorNodeDays.isFinite)
        precondition(observedFailures >= 0 && observedNodeDays >= 0 && observedNodeDays.isFinite)
        return (prior * priorNodeDays + Double(observedFailures)) / (priorNodeDays + observedNodeDays)
    }

    /// This estimate with its rate, taken as the prior, updated by what the
    /// job saw (`posteriorRate`).
    public func updated(observedFailures: Int, observedNodeDays: Double,
                        priorNodeDays: Double = DurabilityEstimate.defaultPriorNodeDays) -> DurabilityEstimate {
        DurabilityEstimate(groups: groups, k: k, m: m,
                           nodeFailuresPerDay: Self.posteriorRate(prior: nodeFailuresPerDay, priorNodeDays: priorNodeDays,
                                                                  observedFailures: observedFailures,
                                                                  observedNodeDays: observedNodeDays),
                           windowSeconds: windowSeconds)
    }

    // MARK: steps a repaired failure costs

    /// Steps a failure costs on average when memory does recover: the job
    /// resumes from the last committed round and runs again the steps since.
    /// With a round taken every `I` steps (`snapshotInterval`) and committed
    /// `L` steps later (`stepsPerCommitLatency`: commit latency × step rate),
    /// a failure after a uniformly random step loses
    ///
    ///     E[steps lost] = (I − 1)/2 + L
    ///
    /// The failure comes u = 0 … I − 1 steps after the last round taken,
    /// (I − 1)/2 on average; when u < L (chance L/I) that round is not yet
    /// committed and the one before it, I steps older, is used: I · L/I = L.
    /// Exact for a whole L ≤ I; for a fractional L, the average over where
    /// in the step the commit lands.
    public static func expectedStepsLost(snapshotInterval: Int, stepsPerCommitLatency: Double) -> Double {
        precondition(snapshotInterval >= 1 && stepsPerCommitLatency >= 0 && stepsPerCommitLatency.isFinite)
        return Double(snapshotInterval - 1) / 2 + stepsPerCommitLatency
    }

    // MARK: arithmetic

    /// P(X ≥ `atLeast`) for X ~ Binomial(`trials`, p), with `q` = 1 − p
    /// given by the caller (it knows it more precisely than 1 − p when p is
    /// near 1). The upper tail is summed term by term, never as one minus
    /// the lower tail, so that a tiny result (p ≈ 10⁻⁹) keeps its digits;
    /// the terms are carried as significand and binary exponent, so a huge
    /// C(n, j) times a tiny pʲ neither overflows nor underflows on the way.
    static func upperTail(atLeast m: Int, trials: Int, p: Double, q: Double) -> Double {
        precondition(trials >= 0 && (0...1).contains(p) && (0...1).contains(q))
        if m <= 0 { return 1 }
        if m > trials || p == 0 { return 0 }
        if q == 0 { return 1 }
        let pp = ScaledDouble(p), qq = ScaledDouble(q), ratio = pp / qq
        var term = pp.power(m) * qq.power(trials - m)
        for i in 0..<m { term = term * ScaledDouble(Double(trials - i) / Double(i + 1)) }  // C(trials, m)
        var terms = [term]
        for j in m..<trials {
            term = term * ScaledDouble(Double(trials - j) / Double(j + 1)) * ratio
            terms.append(term)
        }
        let top = terms.map(\.exponent).max()!
        var sum = 0.0
        for t in terms.reversed() {  // the smallest first
            sum += ScaledDouble(significand: t.significand, exponent: t.exponent - top).double
        }
        return min(1, (ScaledDouble(sum) * ScaledDouble(significand: 1, exponent: top)).double)
    }

    /// exp(x) − 1, accurate to a few ulps also for |x| ≪ 1 (libm's expm1).
    static func expMinus1(_ x: Double) -> Double {
        if x.isNaN { return x }
        if abs(x) <= 1 { return expMinus1Series(x) }
        return exponential(x) - 1  // |exp(x) − 1| ≥ 0.63 here: no cancellation
    }

    /// exp(x), accurate to a few ulps (libm's exp): x = j·ln 2 + r with
    /// |r| ≤ ln 2 / 2 (ln 2 split in two so that j·ln 2 is exact), then
    /// exp(x) = 2ʲ · (1 + expm1(r)).
    static func exponential(_ x: Double) -> Double {
        if x.isNaN { return x }
        if x > 709.8 { return .infinity }
        if x < -745.2 { return 0 }
        let j = (x / ln2).rounded()
        let r = (x - j * ln2High) - j * ln2Low
        return ScaledDouble(1 + expMinus1Series(r)).scaled(by: Int(j)).double
    }

    /// The Taylor series of exp(r) − 1 for |r| ≤ 1, in Horner form, to the
    /// 22nd power: what is left out is below 10⁻²² of the sum.
    private static func expMinus1Series(_ r: Double) -> Double {
        var s = 1.0
        for i in stride(from: 22, through: 2, by: -1) { s = 1 + s * r / Double(i) }
        return r * s
    }

    private static let ln2 = 0.693_147_180_559_945_3
    /// ln 2 = ln2High + ln2Low, ln2High with 32 significant bits (fdlibm's split).
    private static let ln2High = Double(bitPattern: 0x3FE6_2E42_FEE0_0000)
    private static let ln2Low = Double(bitPattern: 0x3DEA_39EF_3579_3C76)
}

/// A number ≥ 0 as significand × 2^exponent, the significand in [1, 2) (0
/// for zero), the exponent any `Int`: long products neither overflow nor
/// underflow until turned back into a `Double`.
struct ScaledDouble {
    var significand: Double
    var exponent: Int

    init(significand: Double, exponent: Int) {
        if significand == 0 {
            (self.significand, self.exponent) = (0, 0)
        } else {
            (self.significand, self.exponent) = (significand.significand, exponent + significand.exponent)
        }
    }

    init(_ x: Double) {
        precondition(x >= 0 && x.isFinite)
        self.init(significand: x, exponent: 0)
    }

    static func * (a: ScaledDouble, b: ScaledDouble) -> ScaledDouble {
        ScaledDouble(significand: a.significand * b.significand, exponent: a.exponent + b.exponent)
    }

    static func / (a: ScaledDouble, b: ScaledDouble) -> ScaledDouble {
        precondition(b.significand != 0)
        return ScaledDouble(significand: a.significand / b.significand, exponent: a.exponent - b.exponent)
    }

    func scaled(by power: Int) -> ScaledDouble {
        ScaledDouble(significand: significand, exponent: exponent + power)
    }

    /// self^e for e ≥ 0, by repeated squaring.
    func power(_ e: Int) -> ScaledDouble {
        precondition(e >= 0)
        var result = ScaledDouble(1), base = self, e = e
        while e > 0 {
            if e & 1 == 1 { result = result * base }
            base = base * base
            e >>= 1
        }
        return result
    }

    /// The nearest `Double`: 0 or a subnormal below 2^−1022, infinity above the largest.
    var double: Double {
        if significand == 0 || exponent < -1100 { return 0 }
        if exponent > 1100 { return .infinity }
        return Double(sign: .plus, exponent: exponent, significand: significand)
    }
}
