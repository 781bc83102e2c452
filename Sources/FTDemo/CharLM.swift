import FTBLAS
import FTCore
import FTErasure
import FTTraining
import FTWorker
import Foundation

/// The demo workload: a character-level language model that really learns on
/// CPU. Bengio-style MLP: the previous `context` characters are embedded,
/// concatenated, passed through a tanh hidden layer with dropout, and a
/// softmax over the vocabulary predicts the next one. Trained with AdamW.
///
/// Data parallel: each rank draws its own batch (a seeded per-rank RNG picks
/// the positions and the dropout mask), gradients and the loss are summed over
/// the ring in rank order, and every rank applies the same update, so the
/// parameters are identical everywhere and a run is reproducible bit for bit.
///
/// State (all of it goes through the snapshot store):
/// - `params`, `adam_m`, `adam_v`: f32, replicated (snapshotted as DP slices);
/// - `rng` (per rank), `samples` (per rank: examples drawn so far), `step`.
public final class CharLM: Trainable, @unchecked Sendable {
    public struct Config: Sendable, Equatable {
        public var context = 16
        public var embedding = 24
        public var hidden = 256
        public var batch = 64
        public var dropout: Float = 0.1
        public var learningRate: Float = 3e-3
        public var beta1: Float = 0.9
        public var beta2: Float = 0.999
        public var epsilon: Float = 1e-8
        public var weightDecay: Float = 0.01
        public var reportEvery = 50
        public var seed: UInt64 = 1234
        public init() {}
    }

    public let config: Config
    public let corpus: Corpus
    public let rank: Int
    public let worldSize: Int
    let vocab: Int
    let inputWidth: Int
    /// Offsets of the parameter blocks in `params`.
    let embOffset = 0, w1Offset: Int, b1Offset: Int, w2Offset: Int, b2Offset: Int
    public let parameterCount: Int

    // Registered state.
    let params: UnsafeMutableBufferPointer<Float>
    let adamM: UnsafeMutableBufferPointer<Float>
    let adamV: UnsafeMutableBufferPointer<Float>
    let rngState: UnsafeMutableBufferPointer<UInt64>
    let samples: UnsafeMutableBufferPointer<Int64>
    let stepCounter: UnsafeMutableBufferPointer<Int64>

    // Scratch (not state).
    let grads: UnsafeMutableBufferPointer<Float>  // parameterCount + 1 (the loss)
    let x: UnsafeMutableBufferPointer<Float>
    let indices: UnsafeMutableBufferPointer<Int32>
    let targets: UnsafeMutableBufferPointer<Int32>
    let hpre: UnsafeMutableBufferPointer<Float>
    let hact: UnsafeMutableBufferPointer<Float>
    let mask: UnsafeMutableBufferPointer<Float>
    let logits: UnsafeMutableBufferPointer<Float>
    let dh: UnsafeMutableBufferPointer<Float>
    let dx: UnsafeMutableBufferPointer<Float>
    /// What `computeGradients` drew, written to the state in `applyUpdate`.
    var pendingRNG: UInt64 = 0
    var lastLoss: Float = .nan

    public init(config: Config = Config(), corpus: Corpus, rank: Int, worldSize: Int) {
        self.config = config
        self.corpus = corpus
        self.rank = rank
        self.worldSize = worldSize
        vocab = corpus.vocabulary.count
        inputWidth = config.context * config.embedding
        w1Offset = vocab * config.embedding
        b1Offset = w1Offset + inputWidth * config.hidden
        w2Offset = b1Offset + config.hidden
        b2Offset = w2Offset + config.hidden * vocab
        parameterCount = b2Offset + vocab
        func floats(_ n: Int) -> UnsafeMutableBufferPointer<Float> {
            let b = UnsafeMutableBufferPointer<Float>.allocate(capacity: max(n, 1))
            b.initialize(repeating: 0)
            return b
        }
        params = floats(parameterCount)
        adamM = floats(parameterCount)
        adamV = floats(parameterCount)
        rngState = .allocate(capacity: 1)
        samples = .allocate(capacity: 1)
        stepCounter = .allocate(capacity: 1)
        grads = floats(parameterCount + 1)
        let b = config.batch
        x = floats(b * inputWidth)
        indices = .allocate(capacity: b * config.context)
        targets = .allocate(capacity: b)
        hpre = floats(b * config.hidden)
        hact = floats(b * config.hidden)
        mask = floats(b * config.hidden)
        logits = floats(b * vocab)
        dh = floats(b * config.hidden)
        dx = floats(b * inputWidth)
        BLAS.configure()
        reset()
    }

    deinit {
        for p in [params, adamM, adamV, grads, x, hpre, hact, mask, logits, dh, dx] { p.deallocate() }
        rngState.deallocate(); samples.deallocate(); stepCounter.deallocate()
        indices.deallocate(); targets.deallocate()
    }

    public var step: Int { Int(stepCounter[0]) }

    /// Bytes of state per worker before DP slicing.
    public var stateBytes: Int { 3 * parameterCount * 4 + 24 }

    public func reset() {
        // The same initial parameters on every rank (a shared seed), Xavier-like scales.
        var init0 = SplitMix64(seed: config.seed)
        func fill(_ range: Range<Int>, scale: Float) {
            for i in range {
                let u = Float(init0.next() >> 40) / Float(1 << 24)  // [0, 1)
                params[i] = (u * 2 - 1) * scale
            }
        }
        fill(embOffset..<w1Offset, scale: 1)
        fill(w1Offset..<b1Offset, scale: (6 / Float(inputWidth + config.hidden)).squareRoot())
        for i in b1Offset..<w2Offset { params[i] = 0 }
        fill(w2Offset..<b2Offset, scale: (6 / Float(config.hidden + vocab)).squareRoot())
        for i in b2Offset..<parameterCount { params[i] = 0 }
        for i in 0..<parameterCount { adamM[i] = 0; adamV[i] = 0 }
        rngState[0] = config.seed &+ 0x9E37_79B9_7F4A_7C15 &* UInt64(rank + 1)
        samples[0] = 0
        stepCounter[0] = 0
    }

    public var tensors: [RegisteredTensor] {
        func raw<T>(_ b: UnsafeMutableBufferPointer<T>) -> UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(b) }
        return [
            RegisteredTensor(spec: TensorSpec(name: "params", dtype: .f32, shape: [parameterCount], role: .param, replicated: true), buffer: raw(params)),
            RegisteredTensor(spec: TensorSpec(name: "adam_m", dtype: .f32, shape: [parameterCount], role: .optimizer, replicated: true), buffer: raw(adamM)),
            RegisteredTensor(spec: TensorSpec(name: "adam_v", dtype: .f32, shape: [parameterCount], role: .optimizer, replicated: true), buffer: raw(adamV)),
            RegisteredTensor(spec: TensorSpec(name: "rng", dtype: .u8, shape: [8], role: .rng, replicated: false), buffer: raw(rngState)),
            RegisteredTensor(spec: TensorSpec(name: "samples", dtype: .i64, shape: [1], role: .meta, replicated: false), buffer: raw(samples)),
            RegisteredTensor(spec: TensorSpec(name: "step", dtype: .i64, shape: [1], role: .meta, replicated: false), buffer: raw(stepCounter)),
        ]
    }

    // MARK: training

    public func computeGradients(step s: Int, collective: RingCollective, interrupt: Int32) throws {
        let b = config.batch, c = config.context, e = config.embedding, h = config.hidden, v = vocab
        var rng = SplitMix64(seed: rngState[0])
        // Batch: random windows of the corpus.
        let text = corpus.tokens
        for i in 0..<b {
            let p = Int(rng.next() % UInt64(text.count - c - 1))
            for j in 0..<c { indices[i * c + j] = Int32(text[p + j]) }
            targets[i] = Int32(text[p + c])
        }
        // Embed and concatenate.
        for i in 0..<b {
            for j in 0..<c {
                let src = params.baseAddress! + embOffset + Int(indices[i * c + j]) * e
                (x.baseAddress! + i * inputWidth + j * e).update(from: src, count: e)
            }
        }
        // Hidden layer.
        let p = UnsafePointer(params.baseAddress!)
        BLAS.sgemm(m: b, n: h, k: inputWidth, a: x.baseAddress!, lda: inputWidth, b: p + w1Offset, ldb: h, c: hpre.baseAddress!, ldc: h)
        let keep = 1 - config.dropout
        for i in 0..<b {
            for j in 0..<h {
                let k = i * h + j
                let a = tanhf(hpre[k] + params[b1Offset + j])
                let u = Float(rng.next() >> 40) / Float(1 << 24)
                mask[k] = u < keep ? 1 / keep : 0
                hact[k] = a
                hpre[k] = a * mask[k]  // reuse: the dropped-out activations
            }
        }
        // Output layer and softmax cross-entropy.
        BLAS.sgemm(m: b, n: v, k: h, a: hpre.baseAddress!, lda: h, b: p + w2Offset, ldb: v, c: logits.baseAddress!, ldc: v)
        var loss: Float = 0
        let scale = 1 / Float(b)
        for i in 0..<b {
            let row = logits.baseAddress! + i * v
            var mx = -Float.infinity
            for j in 0..<v { row[j] += params[b2Offset + j]; mx = max(mx, row[j]) }
            var sum: Float = 0
            for j in 0..<v { row[j] = expf(row[j] - mx); sum += row[j] }
            let t = Int(targets[i])
            loss -= logf(row[t] / sum)
            for j in 0..<v { row[j] = row[j] / sum * scale }
            row[t] -= scale  // dlogits
        }
        // Backward.
        for i in 0..<(parameterCount + 1) { grads[i] = 0 }
        let g = grads.baseAddress!
        BLAS.sgemm(transposeA: true, m: h, n: v, k: b, a: hpre.baseAddress!, lda: h, b: logits.baseAddress!, ldb: v,
                   c: g + w2Offset, ldc: v)
        for i in 0..<b { for j in 0..<v { g[b2Offset + j] += logits[i * v + j] } }
        BLAS.sgemm(transposeB: true, m: b, n: h, k: v, a: logits.baseAddress!, lda: v, b: p + w2Offset, ldb: v,
                   c: dh.baseAddress!, ldc: h)
        for k in 0..<(b * h) {
            let a = hact[k]
            dh[k] = dh[k] * mask[k] * (1 - a * a)
        }
        for i in 0..<b { for j in 0..<h { g[b1Offset + j] += dh[i * h + j] } }
        BLAS.sgemm(transposeA: true, m: inputWidth, n: h, k: b, a: x.baseAddress!, lda: inputWidth, b: dh.baseAddress!, ldb: h,
                   c: g + w1Offset, ldc: h)
        BLAS.sgemm(transposeB: true, m: b, n: inputWidth, k: h, a: dh.baseAddress!, lda: h, b: p + w1Offset, ldb: h,
                   c: dx.baseAddress!, ldc: inputWidth)
        for i in 0..<b {
            for j in 0..<c {
                let dst = g + embOffset + Int(indices[i * c + j]) * e
                let src = dx.baseAddress! + i * inputWidth + j * e
                for q in 0..<e { dst[q] += src[q] }
            }
        }
        grads[parameterCount] = loss * scale
        // Data parallel: sum over ranks in rank order, then average.
        try collective.allreduceSum(grads, interrupt: interrupt)
        let inv = 1 / Float(worldSize)
        for i in 0..<(parameterCount + 1) { grads[i] *= inv }
        lastLoss = grads[parameterCount]
        pendingRNG = rng.state
    }

    public func applyUpdate(step s: Int) {
        precondition(s == step + 1, "update of step \(s) after step \(step)")
        let t = Double(s)
        let c1 = Float(1 / (1 - pow(Double(config.beta1), t)))
        let c2 = Float(1 / (1 - pow(Double(config.beta2), t)))
        let lr = config.learningRate, b1 = config.beta1, b2 = config.beta2, eps = config.epsilon, wd = config.weightDecay
        for i in 0..<parameterCount {
            let gi = grads[i]
            let m = b1 * adamM[i] + (1 - b1) * gi
            let v = b2 * adamV[i] + (1 - b2) * gi * gi
            adamM[i] = m
            adamV[i] = v
            params[i] -= lr * ((m * c1) / ((v * c2).squareRoot() + eps) + wd * params[i])
        }
        rngState[0] = pendingRNG
        samples[0] += Int64(config.batch)
        stepCounter[0] = Int64(s)
    }

    public var hash: String {
        [UnsafeRawBufferPointer(params), UnsafeRawBufferPointer(adamM), UnsafeRawBufferPointer(adamV)].map { buf in
            let s = String(CRC32C.checksum(buf), radix: 16)
            return String(repeating: "0", count: 8 - s.count) + s
        }.joined()
    }

    public func report(step s: Int) -> String? {
        guard s % config.reportEvery == 0 || s == 1 else { return nil }
        return "step=\(s) loss=\(String(format: "%.4f", lastLoss)) hash=\(hash)"
    }

    /// Greedy sample of `count` characters after `prompt`, for a look at what it learned.
    public func sample(prompt: String, count: Int) -> String {
        var window = corpus.encode(prompt)
        if window.count < config.context { window = Array(repeating: 0, count: config.context - window.count) + window }
        var out = prompt
        let e = config.embedding, h = config.hidden, v = vocab
        var hidden = [Float](repeating: 0, count: h)
        var logit = [Float](repeating: 0, count: v)
        for _ in 0..<count {
            let ctx = Array(window.suffix(config.context))
            var xin = [Float](repeating: 0, count: inputWidth)
            for j in 0..<config.context { for q in 0..<e { xin[j * e + q] = params[embOffset + Int(ctx[j]) * e + q] } }
            for j in 0..<h {
                var acc = params[b1Offset + j]
                for k in 0..<inputWidth { acc += xin[k] * params[w1Offset + k * h + j] }
                hidden[j] = tanhf(acc)
            }
            for j in 0..<v {
                var acc = params[b2Offset + j]
                for k in 0..<h { acc += hidden[k] * params[w2Offset + k * v + j] }
                logit[j] = acc
            }
            let next = logit.indices.max { logit[$0] < logit[$1] }!
            out.append(corpus.vocabulary[next])
            window.append(next)
        }
        return out
    }
}
