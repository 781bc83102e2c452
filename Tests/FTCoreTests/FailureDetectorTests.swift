import Testing
@testable import FTCore

@Suite("Failure detector")
struct FailureDetectorTests {
    /// Ticks every `step` seconds from `from` to `to` (a detector that keeps up), collecting the dead.
    func run(_ d: inout FailureDetectorInstance, from: Double, to: Double, step: Double = 0.05) -> [FailureDetectorInstance.Death] {
        var dead: [FailureDetectorInstance.Death] = []
        var t = from
        while t <= to + 1e-9 {
            dead += d.tick(now: t).dead
            t += step
        }
        return dead
    }

    @Test("alive, then suspect after two silent intervals, then dead once after the timeout")
    func lifecycle() {
        var d = FailureDetectorInstance(interval: 0.1, timeout: 0.5)
        d.heard("n0", now: 10)
        d.heard("n1", now: 10)
        #expect(d.liveness("n0", now: 10.15) == .alive)
        #expect(d.liveness("n0", now: 10.25) == .suspect)
        #expect(run(&d, from: 10, to: 10.4).isEmpty)
        d.heard("n1", now: 10.45)
        let dead = run(&d, from: 10.45, to: 10.55)
        #expect(dead.map(\.id) == ["n0"])
        #expect(abs(dead[0].silentFor - 0.55) < 1e-6)
        #expect(!d.isTracked("n0"))
        #expect(run(&d, from: 10.6, to: 10.6).isEmpty, "reported once")
        #expect(run(&d, from: 10.65, to: 11.05).map(\.id) == ["n1"])
        #expect(d.stalls == 0)
    }

    @Test("a death reported by someone else is acted on at once: the member is forgotten, no timeout follows")
    func reported() {
        var d = FailureDetectorInstance()
        d.heard("n0/w0", now: 0)
        d.forget("n0/w0")
        #expect(run(&d, from: 0, to: 5).isEmpty)
        #expect(d.liveness("n0/w0", now: 0) == nil)
    }

    @Test("late or reordered heartbeats never move the clock back; the oldest silence is reported first")
    func ordering() {
        var d = FailureDetectorInstance(interval: 0.1, timeout: 0.5)
        d.heard("a", now: 5)
        d.heard("a", now: 4)  // a delayed duplicate
        d.heard("b", now: 4.8)
        #expect(d.lastHeard("a") == 5)
        #expect(d.tick(now: 6).dead.map(\.id) == ["b", "a"])
    }

    @Test("an observer that stalled (its ticks far apart) accuses nobody: every member gets a fresh grace period")
    func observerStall() {
        var d = FailureDetectorInstance(interval: 0.1, timeout: 0.5)
        d.heard("a", now: 0)
        d.heard("b", now: 0)
        #expect(d.tick(now: 0.05).dead.isEmpty)
        // The observer was stopped for 3 s: heartbeats queued meanwhile are not read yet.
        let t = d.tick(now: 3.05)
        #expect(t.dead.isEmpty)
        #expect(abs((t.stalledFor ?? 0) - 3) < 1e-9)
        #expect(d.stalls == 1 && d.largestGap >= 3)
        // a keeps heartbeating (its queued heartbeats are read now); b stays silent and is
        // declared only after a full timeout (doubled by the stall) from the stall.
        #expect(d.effectiveTimeout == 1.0, "local health 1 doubles the timeout")
        var dead: [FailureDetectorInstance.Death] = []
        var at = 3.1
        while at < 4.3 {
            d.heard("a", now: at)
            dead += d.tick(now: at).dead
            if at < 4.05 { #expect(dead.isEmpty, "nobody declared at \(at)") }
            at += 0.05
        }
        #expect(dead.map(\.id) == ["b"])
    }

    @Test("local health rises with every stall, up to its cap, and falls back after a quiet period")
    func localHealth() {
        var d = FailureDetectorInstance(interval: 0.1, timeout: 0.5, healthDecay: 10)
        var t = 0.0
        _ = d.tick(now: t)
        for _ in 0..<6 {
            t += 1
            #expect(d.tick(now: t).stalledFor != nil)
        }
        #expect(d.localHealth == FailureDetectorInstance.maxLocalHealth)
        #expect(d.effectiveTimeout == 0.5 * Double(1 + FailureDetectorInstance.maxLocalHealth))
        // Quiet ticks: one level back per 10 s.
        _ = run(&d, from: t + 0.05, to: t + 10.1)
        #expect(d.localHealth == FailureDetectorInstance.maxLocalHealth - 1)
        _ = run(&d, from: t + 10.15, to: t + 60)
        #expect(d.localHealth == 0)
        #expect(d.effectiveTimeout == 0.5)
    }

    @Test("a gap just under the stall threshold is not a stall: a silent member is still declared")
    func belowThreshold() {
        var d = FailureDetectorInstance(interval: 0.1, timeout: 0.5)
        d.heard("a", now: 0)
        _ = d.tick(now: 0)
        _ = d.tick(now: 0.24)
        _ = d.tick(now: 0.48)
        #expect(d.tick(now: 0.72).dead.map(\.id) == ["a"])
        #expect(d.stalls == 0)
    }

    @Test("a coordinator cut off from every member at once declares nobody; when it hears one again every member gets a fresh grace period")
    func isolation() {
        var d = FailureDetectorInstance(interval: 0.1, timeout: 0.5)
        d.isolationLimit = 10
        for id in ["n0", "n1", "n0/w0", "n1/w0"] { d.heard(id, now: 0) }
        d.heard("n1", now: 0.05)  // staggered heartbeats: they cross the timeout in different ticks
        var isolatedTicks = 0
        var t = 0.1
        while t <= 3 {
            let tick = d.tick(now: t)
            #expect(tick.dead.isEmpty, "nobody is declared while nobody is heard (t = \(t))")
            if tick.isolatedFor != nil { isolatedTicks += 1 }
            t += 0.05
        }
        #expect(isolatedTicks > 40)
        #expect(d.isolatedSince != nil)
        // The link is back: n0 and its worker speak, n1 and its worker died meanwhile.
        d.heard("n0", now: 3.02)
        d.heard("n0/w0", now: 3.02)
        let mended = d.tick(now: 3.05)
        #expect(mended.dead.isEmpty)
        #expect(mended.isolationEnded.map { abs($0 - 2.5) < 0.06 } == true, "the isolation began when the first member timed out")
        #expect(d.localHealth == 1)
        var dead: [String] = []
        t = 3.1
        while t <= 5 {
            d.heard("n0", now: t)
            d.heard("n0/w0", now: t)
            dead += d.tick(now: t).dead.map(\.id)
            t += 0.05
        }
        #expect(dead.sorted() == ["n1", "n1/w0"], "the dead are declared a (raised) timeout after the cut mended")
    }

    @Test("an isolation that lasts isolationLimit is taken for what it looks like: every member is declared")
    func isolationPastItsLimit() {
        var d = FailureDetectorInstance(interval: 0.1, timeout: 0.5)
        d.isolationLimit = 2
        for id in ["n0", "n1", "n2"] { d.heard(id, now: 0) }
        #expect(run(&d, from: 0.05, to: 2.4).isEmpty)
        #expect(run(&d, from: 2.45, to: 2.7).map(\.id).sorted() == ["n0", "n1", "n2"])
    }

    @Test("with isolation on, one member that dies while the others talk is declared at its timeout, as without")
    func isolationKeepsSingleDeaths() {
        var d = FailureDetectorInstance(interval: 0.1, timeout: 0.5)
        d.isolationLimit = 10
        for id in ["n0", "n1", "n2"] { d.heard(id, now: 0) }
        var dead: [String] = []
        var t = 0.05
        while t <= 1 {
            d.heard("n1", now: t)
            d.heard("n2", now: t)
            let tick = d.tick(now: t)
            #expect(tick.isolatedFor == nil)
            dead += tick.dead.map(\.id)
            t += 0.05
        }
        #expect(dead == ["n0"])
    }
}

@Suite("Step-progress watchdog")
struct ProgressWatchdogTests {
    @Test("p99 is the nearest-rank 99th percentile, whatever the order")
    func percentile() {
        var rng = SplitMix64(seed: 3)
        for n in [1, 2, 50, 99, 100, 101, 256] {
            let values = (0..<n).map { _ in Double(rng.next() % 10_000) }
            let sorted = values.sorted()
            let expected = sorted[Int((Double(n) * 0.99).rounded(.up)) - 1]
            #expect(ProgressWatchdog.percentile99(values) == expected, "n = \(n)")
        }
    }

    @Test("the bound is learned from the job's own step times, with a floor; the first step after a restart is not one")
    func bound() {
        var s = ProgressWatchdog.Settings()
        s.floor = 1
        s.multiplier = 5
        s.warmupSteps = 3
        s.initialBound = 20
        var w = ProgressWatchdog(settings: s)
        #expect(w.overdue(now: 100) == nil, "not armed before a restart")
        w.restart(now: 0)
        w.observe(jobStep: 10, now: 0)
        #expect(w.bound == 20)
        w.observe(jobStep: 11, now: 5)  // includes the restart: not a step time
        for i in 1...3 { w.observe(jobStep: 11 + i, now: 5 + 0.4 * Double(i)) }
        #expect(abs((w.p99 ?? 0) - 0.4) < 1e-9)
        #expect(abs(w.bound - 2) < 1e-9, "5 × 0.4 s")
        #expect(w.overdue(now: 6.2 + 1.9) == nil)
        #expect(w.overdue(now: 6.2 + 2.1) != nil)
        w.shift(by: 10)  // the observer stalled: not the job's time
        #expect(w.overdue(now: 6.2 + 2.1 + 10 - 0.5) == nil)
        w.pause()
        #expect(w.overdue(now: 1000) == nil)
    }

    @Test("the culprit is where the collective waits lead: the rank computing; a round or a silent coordinator is not a worker's hang")
    func culprit() {
        func r(_ rank: Int, _ kind: WorkerActivity.Kind, on: Int = -1, ms: Int = 100, step: Int = 7) -> ProgressWatchdog.Rank {
            .init(key: "n\(rank / 2)/w\(rank % 2)", rank: rank, step: step, activity: WorkerActivity(kind, waitingOn: on, milliseconds: ms))
        }
        // Ring of 4: rank 2 is stuck computing; 3 waits on 2, 0 (share phase) on 3, 1 on 0.
        let ring = [r(0, .collective, on: 3), r(1, .collective, on: 0), r(2, .computing, ms: 9000), r(3, .collective, on: 2)]
        #expect(ProgressWatchdog.culprit(ring) == .culprit(key: "n1/w0", reason: "rank 2 (n1/w0) has been computing for 9000 ms after step 7"))
        // The waits lead to a rank waiting for the snapshot round: not a worker's hang.
        let round = [r(0, .collective, on: 1), r(1, .snapshotWait, ms: 9000)]
        if case .notAWorker = ProgressWatchdog.culprit(round) {} else { Issue.record("a pending round was blamed on a worker") }
        // A cycle of waits (a deadlocked collective): the rank furthest behind.
        let cycle = [r(0, .collective, on: 1, step: 9), r(1, .collective, on: 0, step: 8)]
        if case .culprit(let key, _) = ProgressWatchdog.culprit(cycle) { #expect(key == "n0/w1") } else { Issue.record("no culprit in a cycle") }
        #expect(ProgressWatchdog.culprit([]) == nil)
    }

}
