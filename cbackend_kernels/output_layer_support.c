// Support code of cbackend.OutputLayer: the training step's output layer (the scored columns' logits, the
// loss and its gradient, the three products) worked through in column chunks by the calling thread and
// this module's worker threads (worker_pool.c) at once.
namespace output_layer {

using worker_pool::spin_pause;

// The ELU of alpha (the final activation elu-alpha), as the graph of losses._elu writes it, and its derivative
// read off its value: 1 above 0, alpha exp(x) = y + alpha below, the mean of the two at 0 (for alpha > 0 the
// value has the logit's sign).
template <typename T>
static inline T elu(T x, T alpha) {
    return x > 0 ? x : alpha * std::expm1(std::min(x, (T)0));
}

template <typename T>
static inline T elu_slope(T y, T alpha) {
    return y > 0 ? (T)1 : y < 0 ? y + alpha : (1 + alpha) / 2;
}

// Row-major C (m x n, ldc) = alpha op(A) op(B) + beta C through the Fortran BLAS, which is column-major:
// C^T = op(B)^T op(A)^T.
static inline void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda,
                        const float* B, int ldb, float beta, float* C, int ldc) {
    char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    sgemm_(&cb, &ca, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

static inline void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* A, int lda,
                        const double* B, int ldb, double beta, double* C, int ldc) {
    char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    dgemm_(&cb, &ca, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

// The layer: X = h W^T + offset for the scored columns' rows W = table[rows] (M x N scores), the loss of
// each row and its gradient G w.r.t. X weighted by g, dh = G W, dW = G^T h and db = the column sums of G.
// Columns go in chunks through two phases: (1) gather, score and sum each row's chunk (with the chunk's
// own maximum), (2) once every chunk is scored, the gradient from the rows' totals, and the products.
template <typename T, bool BPR_MAX, bool ELU>
struct Layer : worker_pool::Task {
    int M, N, K, chunk, n_chunks, threads;
    T alpha;
    double lambda;
    const T* h;             // M x K
    const char* table;      // table rows of K values, row_stride bytes apart, value_stride within a row
    npy_intp row_stride, value_stride;
    const npy_intp* rows;   // N
    const T* offset;        // N
    const T* cols;          // N (BPR-max: the columns that count)
    const T* g;             // M
    const T* target;        // M (BPR-max: each row's target score)
    T *W, *X, *E, *S;       // N x K gathered rows; M x N scores, exps (then G), sigmas (BPR-max)
    double* partial;        // n_chunks x M x 5: each chunk's row maximum and sums
    double* total;          // threads x M x 5: each thread's copy of the rows' totals
    T* loss;                // M
    T* dh;                  // M x K: the sum, in chunk order, of
    T* dh_parts;            // n_chunks x M x K: each chunk's G W (summed in a fixed order: the same result
                            // whichever thread computed which chunk)
    T* dW;                  // N x K
    T* db;                  // N
    std::atomic<int> claimed1{0}, done1{0}, claimed2{0}, done2{0};

    void run(int tid) override {
        int c;
        while ((c = claimed1.fetch_add(1)) < n_chunks) {
            score(c);
            done1.fetch_add(1, std::memory_order_release);
        }
        while (done1.load(std::memory_order_acquire) < n_chunks) spin_pause();
        double* tot = total + (size_t)tid * M * 5;
        totals(tot);
        while ((c = claimed2.fetch_add(1)) < n_chunks) {
            differentiate(c, tot);
            done2.fetch_add(1, std::memory_order_release);
        }
        while (done2.load(std::memory_order_acquire) < n_chunks) spin_pause();
    }

    void gather(int j0, int j1) {
        const npy_intp AHEAD = 8;
        for (int j = j0; j < j1; j++) {
            if (j + AHEAD < j1)
                for (npy_intp b = 0; b < K * value_stride; b += 64)
                    __builtin_prefetch(table + rows[j + AHEAD] * row_stride + b, 0);
            const char* src = table + rows[j] * row_stride;
            T* dst = W + (size_t)j * K;
            if (value_stride == (npy_intp)sizeof(T))
                memcpy(dst, src, K * sizeof(T));
            else
                for (int k = 0; k < K; k++) dst[k] = *(const T*)(src + k * value_stride);
        }
    }

    void score(int c) {
        const int j0 = c * chunk, j1 = std::min(N, j0 + chunk), n = j1 - j0;
        gather(j0, j1);
        gemm(false, true, M, n, K, (T)1, h, K, W + (size_t)j0 * K, K, (T)0, X + j0, N);
        const T* __restrict__ off = offset + j0;
        for (int i = 0; i < M; i++) {
            T* __restrict__ x = X + (size_t)i * N + j0;
            T* __restrict__ e = E + (size_t)i * N + j0;
            double* p = partial + ((size_t)c * M + i) * 5;
            if (!BPR_MAX) {
                // Softmax cross-entropy: the chunk's maximum and sum of exps.
                T m = -std::numeric_limits<T>::max();
                #pragma omp simd reduction(max:m)
                for (int j = 0; j < n; j++) {
                    x[j] += off[j];
                    m = x[j] > m ? x[j] : m;
                }
                double Z = 0;
                #pragma omp simd reduction(+:Z)
                for (int j = 0; j < n; j++) {
                    e[j] = std::exp(x[j] - m);
                    Z += e[j];
                }
                p[0] = m;
                p[1] = Z;
                continue;
            }
            // BPR-max: the scores (after the ELU, if any) replace the logits; the chunk's largest negative
            // (the target and the columns that do not count left out), its sums of exps (e), of e sigma,
            // of e y^2 and of e sigma (1 - sigma), sigma = sigma(d - y) with d the row's target score.
            const T* __restrict__ cr = cols + j0;
            T* __restrict__ s = S + (size_t)i * N + j0;
            const int own = i - j0;  // the target's column in this chunk (if 0 <= own < n)
            const T d = target[i], a = alpha;
            T m = -std::numeric_limits<T>::max();
            #pragma omp simd reduction(max:m)
            for (int j = 0; j < n; j++) {
                const T v = x[j] + off[j];
                const T y = ELU ? elu(v, a) : v;
                x[j] = y;
                m = (cr[j] != 0 && j != own && y > m) ? y : m;
            }
            double Z = 0, A = 0, B = 0, D = 0;
            #pragma omp simd reduction(+:Z, A, B, D)
            for (int j = 0; j < n; j++) {
                const T y = x[j];
                const T ej = std::exp(std::min(y - m, (T)0)) * cr[j] * (T)(j != own);
                const T sg = 1 / (1 + std::exp(y - d));
                e[j] = ej;
                s[j] = sg;
                Z += ej;
                A += ej * sg;
                B += ej * y * y;
                D += ej * sg * (1 - sg);
            }
            p[0] = m;
            p[1] = Z;
            p[2] = A;
            p[3] = B;
            p[4] = D;
        }
    }

    // Each row's totals over the chunks, every chunk's sums scaled to the row's maximum: the maximum, Z, and
    // for BPR-max the softmax-weighted sums A, B and D (sums / Z).
    void totals(double* tot) {
        for (int i = 0; i < M; i++) {
            double m = -std::numeric_limits<double>::max(), sums[4] = {0, 0, 0, 0};
            for (int c = 0; c < n_chunks; c++) m = std::max(m, partial[((size_t)c * M + i) * 5]);
            for (int c = 0; c < n_chunks; c++) {
                const double* p = partial + ((size_t)c * M + i) * 5;
                const double f = std::exp(p[0] - m);
                for (int q = 0; q < 4; q++) sums[q] += f * p[1 + q];
            }
            double* t = tot + (size_t)i * 5;
            t[0] = m;
            t[1] = sums[0];
            t[2] = sums[1] / sums[0];
            t[3] = sums[2] / sums[0];
            t[4] = sums[3] / sums[0];
        }
    }

    void differentiate(int c, const double* tot) {
        const int j0 = c * chunk, j1 = std::min(N, j0 + chunk), n = j1 - j0;
        T* __restrict__ bias = db + j0;
        for (int j = 0; j < n; j++) bias[j] = 0;
        for (int i = 0; i < M; i++) {
            const double* t = tot + (size_t)i * 5;
            const double* p = partial + ((size_t)c * M + i) * 5;
            const T scale = (T)(std::exp(p[0] - t[0]) / t[1]);  // e -> the softmax's weight
            const T* __restrict__ x = X + (size_t)i * N + j0;
            T* __restrict__ e = E + (size_t)i * N + j0;
            const int own = i - j0;
            const T gi = g[i];
            if (!BPR_MAX) {
                // g_i c_i (y_ij - [j == i]), y the softmax, c_i = y_ii / (y_ii + 1e-24).
                const T yt = (T)(std::exp(X[(size_t)i * N + i] - t[0]) / t[1]);
                const T k = gi * (yt / (yt + (T)1e-24));
                #pragma omp simd
                for (int j = 0; j < n; j++) e[j] = k * (e[j] * scale);
                if (own >= 0 && own < n) e[own] = k * (yt - 1);
            } else {
                const T* __restrict__ s = S + (size_t)i * N + j0;
                const T inv = (T)(1.0 / (t[2] + 1e-24)), a = (T)t[2], b = (T)t[3], l = (T)lambda, al = alpha;
                #pragma omp simd
                for (int j = 0; j < n; j++) {
                    const T sj = e[j] * scale, yj = x[j], sg = s[j];
                    T dj = gi * (-(sj * (sg - a) - sj * sg * (1 - sg)) * inv + l * sj * (yj * yj - b + 2 * yj));
                    if (ELU) dj *= elu_slope(yj, al);
                    e[j] = dj;
                }
                if (own >= 0 && own < n) {
                    const T yt = x[own];
                    T dt = (T)(gi * -t[4] * inv);
                    if (ELU) dt *= elu_slope(yt, al);
                    e[own] = dt;
                }
            }
            #pragma omp simd
            for (int j = 0; j < n; j++) bias[j] += e[j];
        }
        gemm(true, false, n, K, M, (T)1, E + j0, N, h, K, (T)0, dW + (size_t)j0 * K, K);
        gemm(false, false, M, K, n, (T)1, E + j0, N, W + (size_t)j0 * K, K, (T)0, dh_parts + (size_t)c * M * K, K);
    }

    // After run(): the rows' losses, and dh summed over the chunks.
    void finish() {
        const double* tot = total;  // tid 0's totals
        for (int i = 0; i < M; i++) {
            const double* t = tot + (size_t)i * 5;
            if (BPR_MAX)
                loss[i] = (T)(-std::log(t[2] + 1e-24) + lambda * t[3]);
            else
                loss[i] = -std::log((T)(std::exp(X[(size_t)i * N + i] - t[0]) / t[1]) + (T)1e-24);
        }
        std::copy(dh_parts, dh_parts + (size_t)M * K, dh);
        for (int c = 1; c < n_chunks; c++) {
            const T* part = dh_parts + (size_t)c * M * K;
            #pragma omp simd
            for (size_t q = 0; q < (size_t)M * K; q++) dh[q] += part[q];
        }
    }
};

}  // namespace output_layer
