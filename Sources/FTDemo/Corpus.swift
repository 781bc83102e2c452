import FTCore
import Foundation

/// Text for the demo model, as tokens over its character vocabulary.
public struct Corpus: Sendable {
    public let vocabulary: [Character]
    public let tokens: [Int]
    private let index: [Character: Int]

    public init(text: String) throws {
        let chars = Array(text)
        let vocab = Array(Set(chars)).sorted()
        guard vocab.count >= 2, chars.count >= 256 else {
            throw CorpusError(.unsuitable, "a corpus needs at least 256 characters and 2 distinct ones (got \(chars.count) and \(vocab.count))")
        }
        guard vocab.count <= 256 else {
            throw CorpusError(.unsuitable, "the corpus uses \(vocab.count) distinct characters; the demo model takes at most 256")
        }
        let map = Dictionary(uniqueKeysWithValues: vocab.enumerated().map { ($1, $0) })
        vocabulary = vocab
        index = map
        tokens = chars.map { map[$0]! }
    }

    /// A user's text file (UTF-8).
    public init(file path: String) throws {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw CorpusError(.unreadable, "cannot read \(path) as UTF-8 text")
        }
        try self.init(text: text)
    }

    public func encode(_ s: String) -> [Int] { s.compactMap { index[$0] } }

    /// The built-in corpus: English-like sentences about this system from a
    /// small seeded grammar, the same on every machine, about 200 KB. It has
    /// enough structure (words, agreement, punctuation) for the loss to fall
    /// well below the uniform ln(|V|) within a few hundred steps.
    public static func builtIn() -> Corpus {
        try! Corpus(text: generateBuiltInText())
    }

    static func generateBuiltInText(bytes: Int = 200_000) -> String {
        let subjects = ["the coordinator", "a worker", "the snapshot process", "every node", "the job", "each rank",
                        "the parity holder", "a spare node", "the operator", "the training loop", "the control plane"]
        let verbs = ["keeps", "copies", "restores", "protects", "encodes", "detects", "commits", "rebuilds", "pauses",
                     "resumes", "fences", "reports"]
        let objects = ["the state in memory", "its shard of the parameters", "the last committed step", "a lost node",
                       "the optimizer moments", "every chunk with a checksum", "the parity of its group", "the epoch",
                       "a stalled process", "the random state", "the data position", "the snapshot slots"]
        let tails = ["before the next step", "within a second", "without touching the disk", "after a failure",
                     "while the gradients flow", "bit for bit", "in the background", "when the epoch changes"]
        let joins = [", and then ", " while ", " because ", ". then "]
        var rng = SplitMix64(seed: 20_261_128)
        func pick(_ a: [String]) -> String { a[Int(rng.next() % UInt64(a.count))] }
        var out = ""
        while out.utf8.count < bytes {
            var sentence = "\(pick(subjects)) \(pick(verbs)) \(pick(objects))"
            if rng.next() % 2 == 0 { sentence += " \(pick(tails))" }
            if rng.next() % 3 == 0 { sentence += pick(joins) + "\(pick(subjects)) \(pick(verbs)) \(pick(objects))" }
            out += sentence.prefix(1).uppercased() + sentence.dropFirst() + ".\n"
        }
        return out
    }
}

/// A training text the demo cannot use.
public typealias CorpusError = CodedMessage<CorpusErrorCode>

public enum CorpusErrorCode: String, Sendable {
    /// Too short, or more distinct characters than the model's vocabulary.
    case unsuitable
    /// Not readable as UTF-8 text.
    case unreadable
}
