import FTCore
import Foundation
import Synchronization
import Testing
@testable import FTBenchKit

@Suite("EC traffic pattern (the transport ceiling's streams)")
struct ECTrafficTests {
    @Test("RS(3+1) round: every node sends a chunk to each other node")
    func roundRS31() {
        let image = 3 << 20 + 4096  // not a multiple of the frame: the last frame is short
        let t = ECTraffic.round(k: 3, m: 1, imageBytes: image, frameBytes: 1 << 20)
        let chunk = ParityPlacement.chunkBytes(forNodeBytes: [image], k: 3)
        #expect(t.streams.count == 12)
        for from in 0..<4 {
            #expect(Set(t.sent(by: from).map(\.to)) == Set((0..<4).filter { $0 != from }))
            // The node's k chunks, one to each row's holder; the last chunk is what the image leaves.
            #expect(t.sent(by: from).reduce(0) { $0 + $1.bytes } == image)
            #expect(t.sent(by: from).allSatisfy { $0.bytes <= chunk })
        }
        #expect(t.totalBytes == 4 * image)
        #expect(t.activeNodes == [0, 1, 2, 3])
    }

    @Test("RS(4+2) round: each node sends m times its image, only to its rows' parity holders")
    func roundRS42() {
        let image = 8 << 20
        let t = ECTraffic.round(k: 4, m: 2, imageBytes: image, frameBytes: 1 << 20)
        let placement = ParityPlacement(k: 4, m: 2)
        for from in 0..<6 {
            #expect(t.sent(by: from).reduce(0) { $0 + $1.bytes } == 2 * image)
            let holders = Set(placement.dataRows(of: from).flatMap { placement.parityHolders(row: $0) })
            #expect(Set(t.sent(by: from).map(\.to)) == holders)
        }
    }

    @Test("rebuild: the replacement fetches k chunks of every row, its first frame twice")
    func rebuild() {
        let image = 6 << 20
        let frame = 1 << 20
        let chunk = ParityPlacement.chunkBytes(forNodeBytes: [image], k: 3)
        let t = ECTraffic.rebuild(k: 3, m: 1, imageBytes: image, lost: 1, frameBytes: frame)
        // Every stream goes to n1, from each survivor (k = 3 = all of them).
        #expect(t.streams.allSatisfy { $0.to == 1 })
        #expect(Set(t.streams.map(\.from)) == [0, 2, 3])
        // 4 rows × k chunks, plus the prefix (the manifest's frame) from k holders.
        #expect(t.totalBytes == 4 * 3 * chunk + 3 * frame)
        #expect(t.activeNodes == [0, 1, 2, 3])

        // RS(4+2): 5 survivors, k = 4 of them asked per row (the lowest codeword indexes).
        let wide = ECTraffic.rebuild(k: 4, m: 2, imageBytes: 8 << 20, lost: 1, frameBytes: frame)
        let wideChunk = ParityPlacement.chunkBytes(forNodeBytes: [8 << 20], k: 4)
        #expect(wide.totalBytes == 6 * 4 * wideChunk + 4 * frame)
        #expect(wide.streams.allSatisfy { $0.to == 1 && $0.from != 1 })
    }
}

@Suite("tcp-stream node (the transport ceiling's process)")
struct TCPStreamNodeTests {
    @Test("targets parse as HOST:PORT:BYTES")
    func targets() {
        let t = TCPStreamNode.Target("10.20.0.3:7300:1024")
        #expect(t?.host == "10.20.0.3" && t?.port == 7300 && t?.bytes == 1024)
        #expect(TCPStreamNode.Target("10.20.0.3:7300") == nil)
        #expect(TCPStreamNode.Target("10.20.0.3:0:5") == nil)
        #expect(TCPStreamNode.Target("10.20.0.3:7300:-1") == nil)
    }

    @Test("two nodes on loopback: every byte sent arrives, the report says so")
    func loopback() throws {
        let dir = NSTemporaryDirectory() + "ft-tcp-stream-test-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = FileManager.default.createFile(atPath: dir + "/go", contents: nil)  // go at once
        let port = 20000 + Int(getpid() % 20000)
        var receiver = TCPStreamNode(readyPath: dir + "/ready-r", goPath: dir + "/go")
        receiver.listen = ("127.0.0.1", port)
        receiver.accept = 1
        receiver.bufferBytes = 64 << 10
        var sender = TCPStreamNode(readyPath: dir + "/ready-s", goPath: dir + "/go")
        sender.sends = [TCPStreamNode.Target("127.0.0.1:\(port):\(3 << 20 + 17)")!]
        sender.bufferBytes = 64 << 10
        let result = Mutex<String?>(nil)
        let done = DispatchSemaphore(value: 0)
        let listening = receiver
        Thread {
            let line = try? listening.run()
            result.withLock { $0 = line }
            done.signal()
        }.start()
        let sent = try #require(try JSONSerialization.jsonObject(with: Data(sender.run().utf8)) as? [String: Any])
        #expect(sent["sent"] as? Int == 3 << 20 + 17)
        #expect(done.wait(timeout: .now() + 30) == .success)
        let line = try #require(result.withLock { $0 })
        let received = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(received["received"] as? Int == 3 << 20 + 17)
        #expect(try #require(received["end"] as? Double) >= (try #require(received["go"] as? Double)))
    }
}
