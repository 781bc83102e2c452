import Testing
@testable import FTCore

@Suite("Failure detector")
struct FailureDetectorTests {
    @Test("alive, then suspect after two silent intervals, then dead once after the timeout")
    func lifecycle() {
        var d = FailureDetectorInstance(interval: 0.1, timeout: 0.5)
        d.heard("n0", now: 10)
        d.heard("n1", now: 10)
        #expect(d.liveness("n0", now: 10.15) == .alive)
        #expect(d.liveness("n0", now: 10.25) == .suspect)
        #expect(d.tick(now: 10.4).isEmpty)
        d.heard("n1", now: 10.45)
        let dead = d.tick(now: 10.55)
        #expect(dead.map(\.id) == ["n0"])
        #expect(abs(dead[0].silentFor - 0.55) < 1e-9)
        #expect(!d.isTracked("n0"))
        #expect(d.tick(now: 10.6).isEmpty, "reported once")
        #expect(d.tick(now: 11).map(\.id) == ["n1"])
    }

    @Test("a death reported by someone else is acted on at once: the member is forgotten, no timeout follows")
    func reported() {
        var d = FailureDetectorInstance()
        d.heard("n0/w0", now: 0)
        d.forget("n0/w0")
        #expect(d.tick(now: 100).isEmpty)
        #expect(d.liveness("n0/w0", now: 0) == nil)
    }

    @Test("late or reordered heartbeats never move the clock back; the oldest silence is reported first")
    func ordering() {
        var d = FailureDetectorInstance(interval: 0.1, timeout: 0.5)
        d.heard("a", now: 5)
        d.heard("a", now: 4)  // a delayed duplicate
        d.heard("b", now: 4.8)
        #expect(d.lastHeard("a") == 5)
        #expect(d.tick(now: 6).map(\.id) == ["b", "a"])
    }
}
