import Testing
@testable import FTCore

@Suite("Wire envelope")
struct WireTests {
    let sample = WireEnvelope(type: 7, epoch: 0x0001_0304_0506_0708, sender: "smp-node-3", payload: Array(0..<200).map { UInt8($0) })

    @Test("round-trips every field")
    func roundTrip() throws {
        let decoded = try WireEnvelope(decoding: sample.encoded())
        #expect(decoded == sample)
        let empty = WireEnvelope(type: 0, epoch: 0, sender: "")
        #expect(try WireEnvelope(decoding: empty.encoded()) == empty)
    }

    @Test("layout is little-endian with the documented offsets")
    func layout() {
        let bytes = sample.encoded()
        #expect(Array(bytes[0..<4]) == [0x46, 0x54, 0x57, 0x00])
        #expect(Array(bytes[4..<6]) == [UInt8(WireEnvelope.version), 0])
        #expect(Array(bytes[6..<8]) == [7, 0])
        #expect(Array(bytes[8..<16]) == [8, 7, 6, 5, 4, 3, 1, 0])
        #expect(Array(bytes[16..<18]) == [10, 0])
        #expect(bytes.count == 22 + 10 + 200)
    }

    @Test("every truncation is a typed error")
    func truncations() {
        let bytes = sample.encoded()
        for cut in 0..<bytes.count {
            #expect(throws: WireError.self, "cut at \(cut)") { try WireEnvelope(decoding: Array(bytes[..<cut])) }
        }
    }

    @Test("bad magic, other versions, trailing bytes and huge lengths are refused with their codes")
    func refusals() {
        var bytes = sample.encoded()
        bytes[0] = 0x47
        #expect(code(bytes) == .badMagic)
        bytes = sample.encoded()
        bytes[4] = UInt8(WireEnvelope.version + 1)
        #expect(code(bytes) == .unsupportedVersion)
        #expect(code(sample.encoded() + [0]) == .trailingBytes)
        bytes = sample.encoded()
        let payloadLengthAt = 18 + 10
        bytes[payloadLengthAt + 3] = 0xFF
        #expect(code(bytes) == .badLength)
    }

    @Test("random bytes never crash the decoder (seeded)")
    func fuzz() {
        var state: UInt64 = 0xC0FFEE
        func next() -> UInt64 { state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407; return state >> 33 }
        let valid = sample.encoded()
        for _ in 0..<5000 {
            var bytes: [UInt8]
            if next() % 2 == 0 {
                bytes = (0..<Int(next() % 64)).map { _ in UInt8(truncatingIfNeeded: next()) }
            } else {
                bytes = valid
                for _ in 0..<Int(1 + next() % 4) { bytes[Int(next() % UInt64(bytes.count))] = UInt8(truncatingIfNeeded: next()) }
            }
            _ = try? WireEnvelope(decoding: bytes)
        }
    }

    @Test("ByteReader checks lengths and booleans")
    func reader() throws {
        var w = ByteWriter()
        w.u8(1); w.u16(2); w.u32(3); w.u64(4); w.i64(-5); w.bool(true); w.string("héllo"); w.blob([9, 9])
        var r = ByteReader(w.buffer)
        #expect(try r.u8(field: "a") == 1)
        #expect(try r.u16(field: "b") == 2)
        #expect(try r.u32(field: "c") == 3)
        #expect(try r.u64(field: "d") == 4)
        #expect(try r.i64(field: "e") == -5)
        #expect(try r.bool(field: "f"))
        #expect(try r.string(field: "g") == "héllo")
        #expect(try r.blob(field: "h") == [9, 9])
        #expect(r.remaining == 0)
        #expect(throws: WireError.self) { try r.u8(field: "past the end") }
        var bad = ByteReader([2])
        #expect(throws: WireError(.badValue, "flag: 2 is not a boolean")) { try bad.bool(field: "flag") }
    }

    private func code(_ bytes: [UInt8]) -> WireError.Code? {
        do { _ = try WireEnvelope(decoding: bytes); return nil } catch { return error.code }
    }
}
