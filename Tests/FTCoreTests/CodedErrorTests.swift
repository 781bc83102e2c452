import FTErasure
import Foundation
import Testing
@testable import FTCore

@Suite("One error vocabulary")
struct CodedErrorTests {
    @Test("every error carries a stable snake_case code; an error of another library is 'unexpected'")
    func codes() throws {
        let errors: [any Error] = [
            StoreError(.outOfRange, "x"), WireError(.badMagic, "x"), ECConfigError(.unevenGroups, "x"),
            ErasureError(.tooManyMissing, "x"),
        ]
        #expect(errors.map(errorCode) == ["out_of_range", "bad_magic", "uneven_groups", "too_many_missing"])
        for e in errors { #expect(errorCode(e).allSatisfy { $0.isLowercase || $0 == "_" || $0.isNumber }) }
        #expect(errorCode(CocoaError(.fileNoSuchFile)) == "unexpected")
        // Codes are what callers compare: a reworded message is still the same error kind.
        #expect(StoreError(.busy, "one wording").codeName == StoreError(.busy, "another").codeName)
    }
}
