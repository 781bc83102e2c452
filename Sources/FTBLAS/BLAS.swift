import CBLAS

/// Single-precision matrix products over OpenBLAS's CBLAS, row-major.
///
/// OpenBLAS runs single-threaded here (`configure()`): a data-parallel job has
/// one process per core already, and a fixed thread count keeps the reduction
/// order, and so the bits, the same from run to run.
public enum BLAS {
    /// Pins OpenBLAS to one thread. Call once before the first product.
    public static func configure() {
        openblas_set_num_threads(1)
    }

    /// `C = alpha · op(A) · op(B) + beta · C`, where `op(X)` is X or Xᵀ;
    /// op(A) is m×k, op(B) is k×n, C is m×n, all row-major with the given
    /// leading dimensions.
    @inline(__always)
    public static func sgemm(transposeA: Bool = false, transposeB: Bool = false, m: Int, n: Int, k: Int,
                             alpha: Float = 1, a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
                             beta: Float = 0, c: UnsafeMutablePointer<Float>, ldc: Int) {
        cblas_sgemm(CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
                    Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }
}
