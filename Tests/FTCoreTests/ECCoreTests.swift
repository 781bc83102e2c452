import Testing
@testable import FTCore

/// Hand-built sequences for the data-plane cores (`ECRoundInstance`,
/// `RebuildInstance`, `NodeImageLayout`), and the regressions the data-plane
/// simulation found.
@Suite("Data plane cores")
struct ECCoreTests {
    let members = ["a", "b", "c"]

    @Test("a round sends every frame of its k chunks and is protected once every holder acked and its own parity is complete")
    func roundProtected() throws {
        // RS(2+1): position 0 gives data in rows 1 and 2, holds parity of row 0.
        var a = ECRoundInstance(k: 2, m: 1, chunkBytes: 64, frameBytes: 16, members: members, position: 0)
        let out = a.startRound(step: 5, imageBytes: 100, epoch: 1)
        let frames = out.compactMap { if case .send(let f) = $0 { f } else { nil } }
        #expect(frames.count == 4 + 3)  // 64 bytes in 4 frames, 36 in 3
        #expect(frames.allSatisfy { $0.foldLocally == nil && $0.to.count == 1 })
        #expect(!out.contains(.protected(step: 5)))
        // Its own parity of row 0: both data chunks of b and c, in frames.
        var d: [ECRoundInstance.Directive] = []
        for (sender, index) in [("b", 0), ("c", 1)] {
            for offset in stride(from: 0, to: 64, by: 32) {
                d += a.onChunkFrame(from: sender, epoch: 1, ownEpoch: 1, step: 5, row: 0, dataIndex: index, offset: offset, length: 64,
                                    frameBytes: 32, crcMatches: true, committedStep: 4)
            }
        }
        #expect(d.contains(.ack(to: "b", step: 5, row: 0, dataIndex: 0, error: "")))
        #expect(a.parityComplete(step: 5))
        var acks: [ECRoundInstance.Directive] = []
        for f in frames where f.offset == 0 {
            acks += a.onAck(from: f.to[0], step: 5, row: f.row, dataIndex: f.dataIndex, error: "", now: 1)
        }
        #expect(acks == [.protected(step: 5)])
    }

    @Test("a duplicate frame is folded once, and a duplicate of a complete chunk is acked again")
    func duplicates() {
        var a = ECRoundInstance(k: 2, m: 1, chunkBytes: 64, frameBytes: 64, members: members, position: 0)
        func frame() -> [ECRoundInstance.Directive] {
            a.onChunkFrame(from: "b", epoch: 1, ownEpoch: 1, step: 1, row: 0, dataIndex: 0, offset: 0, length: 64, frameBytes: 64,
                           crcMatches: true, committedStep: nil)
        }
        let first = frame()
        #expect(first.filter { if case .fold = $0 { true } else { false } }.count == 1)
        let again = frame()
        #expect(again == [.ack(to: "b", step: 1, row: 0, dataIndex: 0, error: "")])
    }

    @Test("a frame from an epoch older than the holder's is refused (fenced) and folds nothing")
    func fencedFrame() throws {
        var a = ECRoundInstance(k: 2, m: 1, chunkBytes: 64, frameBytes: 64, members: members, position: 0)
        let out = a.onChunkFrame(from: "b", epoch: 2, ownEpoch: 3, step: 9, row: 0, dataIndex: 0, offset: 0, length: 64, frameBytes: 64,
                                 crcMatches: true, committedStep: 8)
        #expect(!out.contains { if case .fold = $0 { true } else { false } })
        let ack = try #require(out.compactMap { if case .ack(_, _, _, _, let e) = $0 { e } else { nil } }.first)
        #expect(ack.hasPrefix("fenced"))
        #expect(a.parity.isEmpty)
    }

    @Test("a refused round for a transient reason is sent again after a short delay, once")
    func resend() {
        var a = ECRoundInstance(k: 2, m: 1, chunkBytes: 64, frameBytes: 64, members: members, position: 0)
        _ = a.startRound(step: 3, imageBytes: 90, epoch: 1)
        _ = a.onAck(from: "b", step: 3, row: 1, dataIndex: 0, error: ECRoundInstance.noLayout, now: 10)
        #expect(a.wakeAt == 10 + ECRoundInstance.resendDelay)
        #expect(a.tick(now: 10.05).isEmpty)
        let again = a.tick(now: 10.2)
        #expect(again.contains { if case .send = $0 { true } else { false } })
        #expect(a.wakeAt == nil)
    }

    /// Found by the data-plane simulation under the real coordinator: a
    /// round whose frames or acks were lost everywhere was never protected
    /// by anyone, so never aborted either, and no snapshot was taken again.
    @Test("a round that gets no ack for stallResend seconds is sent again, the chunks still owed only; each ack pushes that back")
    func stalledRoundIsResent() {
        var a = ECRoundInstance(k: 2, m: 1, chunkBytes: 64, frameBytes: 64, members: members, position: 0, stallResend: 2)
        let sent = a.startRound(step: 3, imageBytes: 90, epoch: 1).compactMap { if case .send(let f) = $0 { f } else { nil } }
        #expect(a.tick(now: 100).isEmpty)  // the clock starts at the first tick after a send
        #expect(a.wakeAt == 102)
        // One holder acks at 101: the next resend is due at 103, not 102.
        let f = sent[0]
        _ = a.onAck(from: f.to[0], step: 3, row: f.row, dataIndex: f.dataIndex, error: "", now: 101)
        #expect(a.tick(now: 102.5).isEmpty)
        let again = a.tick(now: 103).compactMap { if case .send(let f) = $0 { f } else { nil } }
        // The acked chunk (its one holder acked it) is not sent again; the other chunk is, whole.
        let owed = sent.filter { !($0.row == f.row && $0.dataIndex == f.dataIndex) }
        #expect(!owed.isEmpty && owed.count < sent.count)
        #expect(again.map { [$0.row, $0.dataIndex, $0.offset] } == owed.map { [$0.row, $0.dataIndex, $0.offset] })
        #expect(again.allSatisfy { $0.epoch == 1 && $0.to == owed[0].to })
        // Once every holder acked, nothing is owed: the round is protected (its own parity folded) and nothing is resent.
        for g in owed { _ = a.onAck(from: g.to[0], step: 3, row: g.row, dataIndex: g.dataIndex, error: "", now: 103.5) }
        #expect(a.tick(now: 200).isEmpty)
    }

    /// Found while the data-plane simulation was moved onto the real
    /// coordinator: a resend stamped with the epoch the sender knew *now*
    /// was folded by a holder already restored in that epoch, into parity of
    /// the same step number, which the next epoch re-ran with other bytes
    /// (its frames then looked like duplicates): wrong parity committed.
    @Test("a round's frames, resends included, carry the epoch it was staged in, and a holder in a later epoch refuses them")
    func resendKeepsStagingEpoch() throws {
        var a = ECRoundInstance(k: 2, m: 1, chunkBytes: 64, frameBytes: 64, members: members, position: 0)
        let first = a.startRound(step: 3, imageBytes: 90, epoch: 4).compactMap { if case .send(let f) = $0 { f } else { nil } }
        #expect(!first.isEmpty && first.allSatisfy { $0.epoch == 4 })
        _ = a.onAck(from: "b", step: 3, row: 1, dataIndex: 0, error: ECRoundInstance.noLayout, now: 10)
        // Meanwhile the node learned epoch 5 (a pause): the resend still says 4.
        let again = a.tick(now: 11).compactMap { if case .send(let f) = $0 { f } else { nil } }
        #expect(!again.isEmpty && again.allSatisfy { $0.epoch == 4 })
        // A holder restored in epoch 5 folds none of it.
        var b = ECRoundInstance(k: 2, m: 1, chunkBytes: 64, frameBytes: 64, members: members, position: 1)
        let f = try #require(again.first { $0.to.contains("b") })
        let out = b.onChunkFrame(from: "a", epoch: f.epoch, ownEpoch: 5, step: 3, row: f.row, dataIndex: f.dataIndex, offset: f.offset,
                                 length: f.length, frameBytes: f.imageRange.count, crcMatches: true, committedStep: 2)
        #expect(!out.contains { if case .fold = $0 { true } else { false } })
        #expect(b.parity.isEmpty)
    }

    /// Found by the data-plane simulation (seed 2 of the first version): a
    /// node whose manifest is longer than one chunk (many tensors, small
    /// chunks) could never be rebuilt ("manifest exceeds a chunk").
    @Test("a rebuild reads a manifest that spans data chunks from every row it lies in")
    func manifestAcrossChunks() throws {
        // RS(2+1), chunk 64, frames of 16: the image's first 100 bytes are the manifest.
        var r = RebuildInstance(step: 7, lost: ["a"], purpose: .node, k: 2, m: 1, chunkBytes: 64, frameBytes: 16, members: members,
                                position: 0, window: 8, timeout: 1)
        var out = r.start(now: 0)
        func answerAll(_ d: [RebuildInstance.Directive]) -> [RebuildInstance.Directive] {
            var next: [RebuildInstance.Directive] = []
            for case .fetch(let node, let step, let row, let index, let offset, _) in d {
                next += r.onAnswer(from: node, step: step, row: row, index: index, offset: offset, error: nil, now: 0).directives
            }
            return next
        }
        out = answerAll(out)
        #expect(out.contains(.readPrefix(bytes: 16)))
        out = r.prefixRead(manifestBytes: 100, now: 0)
        #expect(out.first == .growPrefix(bytes: 100))
        let rows = Set(out.compactMap { if case .fetch(_, _, let row, _, _, _) = $0 { row } else { nil } })
        #expect(rows == Set(ParityPlacement(k: 2, m: 1).dataRows(of: 0)))
        var decoded: [RebuildInstance.Destination] = []
        while !out.contains(.readPrefix(bytes: 100)) {
            let next = answerAll(out)
            decoded += next.compactMap { if case .decode(let t) = $0 { t.destination } else { nil } }
            try #require(!next.isEmpty)
            out = next
        }
        #expect(decoded.contains(.prefix(64)) && decoded.contains(.prefix(96)))
        #expect(r.prefixRead(manifestBytes: 100, now: 0) == [.parseManifest])
    }

    @Test("a holder that does not answer in time is given up, and the frame is asked of another")
    func swapSilentHolder() {
        // RS(2+3): a repair at position 0 asks 2 of the 4 others.
        var r = RebuildInstance(step: 1, lost: [], purpose: .ranges([(row: 1, range: 0..<16)]), k: 2, m: 3, chunkBytes: 64,
                                frameBytes: 16, members: ["a", "b", "c", "d", "e"], position: 0, window: 1, timeout: 1)
        let first = r.start(now: 0)
        let asked = first.compactMap { if case .fetch(let node, _, _, _, _, _) = $0 { node } else { nil } }
        #expect(asked.count == 2)
        let later = r.tick(now: 1.5)
        let swapped = later.compactMap { if case .fetch(let node, _, _, _, _, _) = $0 { node } else { nil } }
        #expect(swapped.count == 2 && Set(swapped).isDisjoint(with: asked))
        #expect(r.failedNodes == Set(asked))
        // No holder is left untried: the second timeout fails the job with the reason.
        let end = r.tick(now: 3)
        #expect(end.contains { if case .failed = $0 { true } else { false } })
    }

    /// Found by the data-plane simulation (seed 58, RS(3+2)): one survivor's
    /// byte flipped at rest made it "failed" for the whole rebuild, so a second
    /// such survivor in another row failed rebuilds that had k good chunks in
    /// every row.
    @Test("a holder that answers one frame with an error is still asked for the others")
    func errorIsPerFrame() {
        var r = RebuildInstance(step: 1, lost: [], purpose: .ranges([(row: 1, range: 0..<32)]), k: 2, m: 2, chunkBytes: 64,
                                frameBytes: 16, members: ["a", "b", "c", "d"], position: 0, window: 2, timeout: 1)
        let first = r.start(now: 0)
        let fetches = first.compactMap { if case .fetch(let node, _, _, let index, let offset, _) = $0 { (node, index, offset) } else { nil } }
        #expect(fetches.count == 4)  // two frames, two holders each
        let bad = fetches[0]
        let out = r.onAnswer(from: bad.0, step: 1, row: 1, index: bad.1, offset: bad.2, error: "corrupt: at rest", now: 0.1).directives
        #expect(r.failedNodes.isEmpty)
        // The frame goes to the third holder; the other frame still counts on the same holder.
        let again = out.compactMap { if case .fetch(let node, _, _, _, let offset, _) = $0 { (node, offset) } else { nil } }
        #expect(again.count == 1 && again[0].0 != bad.0 && again[0].1 == bad.2)
        let other = r.inFlight.values.first { $0.offset != bad.2 }
        #expect(other?.requested.values.contains { $0.node == bad.0 } == true)
    }

    @Test("image pieces and chunk ranges split at the manifest, slot and chunk boundaries")
    func imageLayout() {
        let l = NodeImageLayout(manifestBytes: 10, slotBytes: [20, 30])
        #expect(l.total == 60)
        #expect(l.pieces(5..<35).map(\.source) == [.manifest, .slot(0), .slot(1)])
        #expect(l.pieces(5..<35).map(\.count) == [5, 20, 5])
        #expect(l.chunkRange(2, chunkBytes: 25) == 50..<60)
        #expect(l.chunkRange(3, chunkBytes: 25) == 60..<60)
        let r = l.chunkRanges(slot: 1, range: 10..<25, chunkBytes: 25)
        #expect(r.map(\.chunk) == [1, 2] && r.map(\.range) == [15..<25, 0..<5])
    }
}
