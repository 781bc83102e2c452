import Foundation
import Testing
@testable import FTCore

/// Inputs that crashed a fuzz target (`fuzz/run`), kept as regression tests:
/// each is checked the way its target checks every input.
@Suite("Fuzz regressions")
struct FuzzRegressionTests {
    /// fuzz/run wire (crash-2a4c1b75…): a sender of 110 bytes that are not
    /// UTF-8 decoded to 330 bytes of U+FFFD, which encoding cut at 255 bytes
    /// mid-character: the envelope did not round-trip. Such a sender is now refused.
    @Test("wire: a sender that is not UTF-8 is refused (it did not round-trip)")
    func nonUTF8Sender() throws {
        let frame = try #require(Data(base64Encoded: "RlRXAAIAcAACAAAAAAAAAG4AAjAi//////////////////////////////////////////////////////////////////////////////////////////////////8AAAAFAAAAAAAAAAEAAAAAAAAAAAIBAAAAAAAAAAMAAAAAAAAA"))
        let error = #expect(throws: WireError.self) { try WireEnvelope(decoding: Array(frame)) }
        #expect(error?.code == .badValue)
        // Every valid sender round-trips, the longest included.
        let longest = String(repeating: "é", count: 127)  // 254 bytes
        let e = WireEnvelope(type: 1, epoch: 2, sender: longest, payload: [1])
        #expect(try WireEnvelope(decoding: e.encoded()) == e)
    }
}
