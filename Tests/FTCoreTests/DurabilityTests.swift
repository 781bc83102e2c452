import Foundation
import Testing
@testable import FTCore

@Suite("Durability estimate")
struct DurabilityTests {
    static func relativeError(_ a: Double, _ b: Double) -> Double { a == b ? 0 : abs(a - b) / max(abs(a), abs(b)) }

    static let ps: [Double] = [0.3, 0.05, 1e-3, 1e-6, 1e-9, 1e-12]

    @Test("the tail matches closed forms written out by hand, tiny p included")
    func closedForms() {
        for p in Self.ps {
            let q = 1 - p
            // RS(1+1): the one other node fails.
            #expect(DurabilityEstimate.upperTail(atLeast: 1, trials: 1, p: p, q: q) == p, "p = \(p)")
            // RS(2+2): two or three of the other three, 3p²q + p³ (= 1 − q³ − 3pq², without the cancellation).
            let rs22 = 3 * p * p * q + p * p * p
            #expect(Self.relativeError(DurabilityEstimate.upperTail(atLeast: 2, trials: 3, p: p, q: q), rs22) < 1e-9, "p = \(p)")
            // RS(3+2): two or more of the other four.
            let rs32 = 6 * p * p * q * q + 4 * p * p * p * q + p * p * p * p
            #expect(Self.relativeError(DurabilityEstimate.upperTail(atLeast: 2, trials: 4, p: p, q: q), rs32) < 1e-9, "p = \(p)")
            // RS(3+1): any of the other three.
            let rs31 = p * (3 - 3 * p + p * p)  // 1 − q³
            #expect(Self.relativeError(DurabilityEstimate.upperTail(atLeast: 1, trials: 3, p: p, q: q), rs31) < 1e-9, "p = \(p)")
        }
        // Where 1 − q³ − 3pq² does not cancel, it agrees with the form used above.
        let p = 0.3, q = 0.7
        #expect(abs((1 - q * q * q - 3 * p * q * q) - (3 * p * p * q + p * p * p)) < 1e-15)
    }

    @Test("the estimate turns a rate and a window into p = 1 − exp(−λW) and the loss figures")
    func estimate() throws {
        let e = DurabilityEstimate(groups: 16, k: 2, m: 2, nodeFailuresPerDay: 4e-3, windowSeconds: 60)
        #expect(e.n == 4)
        let x = 4e-3 * 60 / 86_400
        let p = x - x * x / 2 + x * x * x / 6  // the series of 1 − exp(−x); the next term is 10⁻³⁵ of x
        #expect(Self.relativeError(e.nodeFailureInWindow, p) < 1e-14)
        let q = 1 - p
        let loss = 3 * p * p * q + p * p * p
        #expect(Self.relativeError(e.lossPerFailure, loss) < 1e-9)
        #expect(Self.relativeError(e.failuresPerDay, 16 * 4 * 4e-3) < 1e-15)
        #expect(Self.relativeError(e.lossPerDay, 16 * 4 * 4e-3 * loss) < 1e-9)
        #expect(Self.relativeError(e.daysBetweenLosses, 1 / (16 * 4 * 4e-3 * loss)) < 1e-9)
        #expect(e.nodeFailuresPerDay == DurabilityEstimate.defaultNodeFailuresPerDay)

        // A large window: p no longer tiny, compared with libm.
        let big = DurabilityEstimate(groups: 1, k: 6, m: 2, nodeFailuresPerDay: 2.4, windowSeconds: 3600)
        let pBig = -expm1(-0.1)
        #expect(Self.relativeError(big.nodeFailureInWindow, pBig) < 1e-14)
        let tail = 1 - pow(1 - pBig, 7) - 7 * pBig * pow(1 - pBig, 6)
        #expect(Self.relativeError(big.lossPerFailure, tail) < 1e-12)

        // No parity: every failure is a loss. No window or no failures: none is.
        #expect(DurabilityEstimate(groups: 4, k: 8, m: 0, windowSeconds: 60).lossPerFailure == 1)
        #expect(DurabilityEstimate(groups: 4, k: 8, m: 1, windowSeconds: 0).lossPerFailure == 0)
        let never = DurabilityEstimate(groups: 4, k: 8, m: 1, nodeFailuresPerDay: 0, windowSeconds: 60)
        #expect(never.lossPerDay == 0)
        #expect(never.daysBetweenLosses == .infinity)
    }

    @Test("large groups: the upper tail and the lower tail add up to one, where the terms leave Double's range")
    func largeGroups() {
        let trials = 254  // RS(k+m) with n = 255, ISA-L's bound
        for p in [1e-9, 1e-3, 0.3, 0.5, 0.97, 0.999, 1 - 1e-9] {
            let q = 1 - p
            for m in [1, 2, 50, 127, 200, 254] {
                let upper = DurabilityEstimate.upperTail(atLeast: m, trials: trials, p: p, q: q)
                // P(X ≤ m − 1) = P(trials − X ≥ trials − m + 1), trials − X ~ Binomial(trials, q).
                let lower = DurabilityEstimate.upperTail(atLeast: trials - m + 1, trials: trials, p: q, q: p)
                #expect(upper >= 0 && upper <= 1 && lower >= 0 && lower <= 1, "p = \(p), m = \(m)")
                #expect(abs(upper + lower - 1) < 1e-12, "p = \(p), m = \(m): \(upper) + \(lower)")
            }
        }
        // The first term of the tail, 254 p q²⁵³ ≈ 10⁻⁷⁵⁷, underflows a Double; the tail is 1 − q²⁵⁴.
        #expect(abs(DurabilityEstimate.upperTail(atLeast: 1, trials: 254, p: 0.999, q: 0.001) - 1) < 1e-12)
        // 42 failures out of 254 at p = 10⁻⁹: about 10⁻³²⁵, below the smallest subnormal.
        #expect(DurabilityEstimate.upperTail(atLeast: 42, trials: 254, p: 1e-9, q: 1 - 1e-9) == 0)
        #expect(DurabilityEstimate.upperTail(atLeast: 255, trials: 254, p: 0.5, q: 0.5) == 0)
        #expect(DurabilityEstimate.upperTail(atLeast: 0, trials: 254, p: 0.5, q: 0.5) == 1)
    }

    @Test("exp and expm1 from the standard library alone agree with libm")
    func exponentials() {
        var xs: [Double] = [0, -0.0, 1e-300, -1e-300, 1e-20, -1e-20, 1e-9, -2.7e-9, 0.3466, -0.3466, 0.9999999, -0.9999999, 1.0000001, -1.0000001,
                            0.5, -0.5, 1, -1, 10, -10, 100, -100, 700, -700, 709.7, -708]
        var rng = SplitMix64(seed: 11)
        for _ in 0..<2000 {
            let u = Double(rng.next() >> 11) * 0x1p-53
            xs.append(-700 + 1409 * u)
            xs.append((u - 0.5) * 2)
            xs.append((u - 0.5) * 1e-6)
        }
        for x in xs {
            #expect(Self.relativeError(DurabilityEstimate.exponential(x), exp(x)) < 1e-15, "exp(\(x))")
            #expect(Self.relativeError(DurabilityEstimate.expMinus1(x), expm1(x)) < 1e-15, "expm1(\(x))")
        }
        #expect(DurabilityEstimate.exponential(-746) == 0)
        #expect(DurabilityEstimate.exponential(710) == .infinity)
        #expect(DurabilityEstimate.expMinus1(-746) == -1)
        #expect(DurabilityEstimate.exponential(.nan).isNaN)
    }

    struct Layout: Sendable, CustomTestStringConvertible {
        var k: Int, m: Int, perDay: Double, windowSeconds: Double
        var testDescription: String { "RS(\(k)+\(m)), λW = \(perDay * windowSeconds / 86_400)" }
    }

    @Test("a Monte Carlo of exponential failure times agrees within 4 standard errors",
          arguments: [Layout(k: 6, m: 2, perDay: 2.4, windowSeconds: 3600),
                      Layout(k: 3, m: 1, perDay: 0.24, windowSeconds: 3600),
                      Layout(k: 10, m: 4, perDay: 4.8, windowSeconds: 3600)])
    func monteCarlo(_ layout: Layout) {
        let e = DurabilityEstimate(groups: 1, k: layout.k, m: layout.m,
                                   nodeFailuresPerDay: layout.perDay, windowSeconds: layout.windowSeconds)
        let trials = 100_000
        var rng = SplitMix64(seed: UInt64(layout.k * 100 + layout.m))
        var losses = 0
        for _ in 0..<trials {
            // One node failed at time 0; the others, up then, fail after exponential times.
            var failed = 0
            for _ in 0..<(e.n - 1) {
                let u = (Double(rng.next() >> 11) + 1) * 0x1p-53  // in (0, 1]
                let seconds = -log(u) / layout.perDay * 86_400
                if seconds <= layout.windowSeconds { failed += 1 }
            }
            if failed >= layout.m { losses += 1 }
        }
        let exact = e.lossPerFailure
        let standardError = (exact * (1 - exact) / Double(trials)).squareRoot()
        let observed = Double(losses) / Double(trials)
        #expect(abs(observed - exact) < 4 * standardError, "observed \(observed), computed \(exact), SE \(standardError)")
        // The test tells the off-by-ones apart: m + 1 failures instead of m, or n trials instead of n − 1.
        let p = e.nodeFailureInWindow
        for wrong in [DurabilityEstimate.upperTail(atLeast: layout.m + 1, trials: e.n - 1, p: p, q: 1 - p),
                      DurabilityEstimate.upperTail(atLeast: layout.m, trials: e.n, p: p, q: 1 - p)] {
            #expect(abs(wrong - exact) > 10 * standardError)
        }
    }

    @Test("the Gamma-prior update: no observations give the prior, long exposure the observed rate")
    func bayesianUpdate() {
        let prior = DurabilityEstimate.defaultNodeFailuresPerDay
        #expect(Self.relativeError(DurabilityEstimate.posteriorRate(observedFailures: 0, observedNodeDays: 0), prior) < 1e-15)
        #expect(DurabilityEstimate.posteriorRate(prior: 0.01, priorNodeDays: 100, observedFailures: 0, observedNodeDays: 0) == 0.01)
        // The prior counts as one failure in 250 node-days.
        #expect(Self.relativeError(DurabilityEstimate.posteriorRate(observedFailures: 0, observedNodeDays: 250), prior / 2) < 1e-15)
        #expect(Self.relativeError(DurabilityEstimate.posteriorRate(observedFailures: 3, observedNodeDays: 250), 4 / 500.0) < 1e-15)
        // At an observed 10⁻² a day, the posterior closes in on it as exposure grows.
        var lastGap = Double.infinity
        for nodeDays in [100.0, 1e3, 1e4, 1e5, 1e6] {
            let posterior = DurabilityEstimate.posteriorRate(observedFailures: Int(nodeDays / 100), observedNodeDays: nodeDays)
            let gap = abs(posterior - 0.01)
            #expect(gap < lastGap, "\(nodeDays) node-days: \(posterior)")
            lastGap = gap
        }
        #expect(lastGap < 1e-5)
        // Updating an estimate changes its rate only.
        let e = DurabilityEstimate(groups: 8, k: 6, m: 2, windowSeconds: 120)
        let u = e.updated(observedFailures: 5, observedNodeDays: 250)
        #expect(u == DurabilityEstimate(groups: 8, k: 6, m: 2, nodeFailuresPerDay: 6 / 500.0, windowSeconds: 120))
        #expect(u.lossPerDay > e.lossPerDay)
        #expect(e.updated(observedFailures: 0, observedNodeDays: 0) == e)
    }

    @Test("steps lost: (I − 1)/2 + L, and the same by counting every failure step")
    func stepsLost() {
        #expect(DurabilityEstimate.expectedStepsLost(snapshotInterval: 1, stepsPerCommitLatency: 0) == 0)
        #expect(DurabilityEstimate.expectedStepsLost(snapshotInterval: 100, stepsPerCommitLatency: 0) == 49.5)
        #expect(DurabilityEstimate.expectedStepsLost(snapshotInterval: 100, stepsPerCommitLatency: 2.5) == 52)
        #expect(DurabilityEstimate.expectedStepsLost(snapshotInterval: 10, stepsPerCommitLatency: 3) == 7.5)
        // Rounds at multiples of I, each committed L steps later; a failure after step t resumes
        // from the newest round c with c + L ≤ t. Ten whole periods, after the first rounds committed.
        for interval in [1, 2, 7, 100] {
            for latency in 0...interval {
                var lost = 0
                let steps = 2 * interval..<12 * interval
                for t in steps { lost += t - (t - latency) / interval * interval }
                let mean = Double(lost) / Double(steps.count)
                let formula = DurabilityEstimate.expectedStepsLost(snapshotInterval: interval,
                                                                   stepsPerCommitLatency: Double(latency))
                #expect(abs(mean - formula) < 1e-12, "I = \(interval), L = \(latency)")
            }
        }
    }
}
