// A product in pieces on the process's workers (cbackend.ThreadedProduct with split=True): the Gemm code's BLAS
// call, with the same arguments (column-major C = alpha op(A) op(B) + beta C, m x n), cut along C's longer side
// into a piece per thread, each a one-thread BLAS call on the thread that claims it.
namespace split_product {

static inline void blas(char* ta, char* tb, const int* m, const int* n, const int* k, const float* alpha,
                        const float* A, const int* lda, const float* B, const int* ldb, const float* beta, float* C,
                        const int* ldc) {
    sgemm_(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

static inline void blas(char* ta, char* tb, const int* m, const int* n, const int* k, const double* alpha,
                        const double* A, const int* lda, const double* B, const int* ldb, const double* beta,
                        double* C, const int* ldc) {
    dgemm_(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

template <typename T>
struct Pieces : worker_pool::Task {
    char ta, tb;
    int m, n, k, lda, ldb, ldc, piece, n_pieces;
    bool along_n;  // pieces of C's columns (else of its rows)
    T alpha, beta;
    const T *A, *B;
    T* C;
    std::atomic<int> claimed{0}, done{0};

    void run(int tid) override {
        int p;
        while ((p = claimed.fetch_add(1)) < n_pieces) {
            const int lo = p * piece, w = std::min(along_n ? n : m, lo + piece) - lo;
            char a = ta, b = tb;
            if (along_n)  // C[:, lo:lo+w] from op(B)'s columns lo:lo+w
                blas(&a, &b, &m, &w, &k, &alpha, A, &lda, B + (size_t)lo * (tb == 'N' ? ldb : 1), &ldb, &beta,
                     C + (size_t)lo * ldc, &ldc);
            else  // C[lo:lo+w, :] from op(A)'s rows lo:lo+w
                blas(&a, &b, &w, &n, &k, &alpha, A + (size_t)lo * (ta == 'N' ? 1 : lda), &lda, B, &ldb, &beta,
                     C + lo, &ldc);
            done.fetch_add(1, std::memory_order_release);
        }
        if (tid == 0)
            while (done.load(std::memory_order_acquire) < n_pieces) worker_pool::spin_pause();
    }
};

// sgemm_'s (dgemm_'s) arguments, on up to `threads` threads; one BLAS call where one thread is to be had.
template <typename T>
static void gemm(int threads, char* ta, char* tb, const int* m, const int* n, const int* k, const T* alpha,
                 const T* A, const int* lda, const T* B, const int* ldb, const T* beta, T* C, const int* ldc) {
    if (threads < 2 || (*m < 32 && *n < 32)) {
        blas(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    Pieces<T> task;
    task.ta = *ta == 'n' ? 'N' : *ta == 't' ? 'T' : *ta, task.tb = *tb == 'n' ? 'N' : *tb == 't' ? 'T' : *tb;
    task.m = *m, task.n = *n, task.k = *k, task.lda = *lda, task.ldb = *ldb, task.ldc = *ldc;
    task.along_n = *n >= *m;
    const int side = task.along_n ? *n : *m;
    task.piece = ((side + threads - 1) / threads + 15) / 16 * 16;  // whole vectors of 16 floats a piece
    task.n_pieces = (side + task.piece - 1) / task.piece;
    task.alpha = *alpha, task.beta = *beta, task.A = A, task.B = B, task.C = C;
    worker_pool::run(&task, std::min(threads, task.n_pieces));
}

}  // namespace split_product
