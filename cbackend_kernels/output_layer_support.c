// Support code of cbackend.OutputLayer: the training step's output layer (the scored columns' logits, the
// loss and its gradient, the three products) worked through in column chunks by the calling thread and
// the process's worker threads (worker_pool.c) at once.
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

// The scores of a few columns at once, read from their rows wherever they are: BLAS would need the rows
// gathered into one matrix first, and at these shapes (a few dozen rows of h, a few hundred columns a
// chunk) it runs well below the machine's rate. Here JB columns' rows are multiplied with h^T (K x Mp,
// the batch's rows in the vector lanes, zero past M) by broadcasting each row's values: JB x V vectors of
// the columns' scores stay in registers for the whole sum over K (benchmarks/README.md, "The scores from
// the rows where they are").
#ifdef __AVX512F__
constexpr int VECTOR_BYTES = 64, SCORE_COLUMNS = 5;  // 32 vector registers: 5 x 4 sums, 4 of h^T
#else
constexpr int VECTOR_BYTES = 32, SCORE_COLUMNS = 3;  // 16: 3 x 4 sums, 4 of h^T
#endif

template <typename T> struct Vector;
template <> struct Vector<float> { typedef float type __attribute__((vector_size(VECTOR_BYTES), aligned(4))); };
template <> struct Vector<double> { typedef double type __attribute__((vector_size(VECTOR_BYTES), aligned(8))); };

// tile[q][lb, lb + V lanes) = sum over k of row q's k-th value times h^T's row k, for the JB rows `row`.
template <typename T, int JB, int V>
static inline void score_lanes(const T* const* row, int K, const T* __restrict__ hT, int Mp, int lb,
                               T* __restrict__ tile) {
    typedef typename Vector<T>::type vec;
    constexpr int VL = VECTOR_BYTES / sizeof(T);
    vec sum[JB][V];
    for (int q = 0; q < JB; q++)
        for (int v = 0; v < V; v++) sum[q][v] = vec{};
    for (int k = 0; k < K; k++) {
        vec hk[V];
        for (int v = 0; v < V; v++) hk[v] = *(const vec*)(hT + (size_t)k * Mp + lb + VL * v);
        for (int q = 0; q < JB; q++) {
            const T w = row[q][k];
            for (int v = 0; v < V; v++) sum[q][v] += w * hk[v];
        }
    }
    for (int q = 0; q < JB; q++)
        for (int v = 0; v < V; v++) *(vec*)(tile + (size_t)q * Mp + lb + VL * v) = sum[q][v];
}

// tile[q][0, Mp) for the JB rows `row`: every lane of h^T, four vectors at a time, then two, then one.
template <typename T, int JB>
static inline void score_columns(const T* const* row, int K, const T* hT, int Mp, T* tile) {
    constexpr int VL = VECTOR_BYTES / sizeof(T);
    int lb = 0;
    for (; lb + 4 * VL <= Mp; lb += 4 * VL) score_lanes<T, JB, 4>(row, K, hT, Mp, lb, tile);
    for (; lb + 2 * VL <= Mp; lb += 2 * VL) score_lanes<T, JB, 2>(row, K, hT, Mp, lb, tile);
    for (; lb < Mp; lb += VL) score_lanes<T, JB, 1>(row, K, hT, Mp, lb, tile);
}

// The layer: X = h W^T + offset for the scored columns' rows W = table[rows] (M x N scores), the loss of
// each row and its gradient G w.r.t. X weighted by g, dh = G W, dW = G^T h and db = the column sums of G.
// The scores are kept transposed, a column's M scores in a row of Mp (the batch's rows in the vector lanes),
// so that the rows' maxima and sums over a chunk of columns are lane-wise. Columns go in chunks through two
// phases: (1) score and sum each row's chunk (with the chunk's own maximum), (2) once every chunk is scored,
// the gradient from the rows' totals, and the products.
template <typename T, bool BPR_MAX, bool ELU>
struct Layer : worker_pool::Task {
    int M, N, K, chunk, n_chunks, threads;
    int Mp;                 // M rounded up to whole vectors
    T alpha;
    double lambda;
    const T* h;             // M x K
    const T* hT;            // K x Mp: h^T, zero past M
    const char* table;      // table rows of K values, row_stride bytes apart, value_stride within a row
    npy_intp row_stride, value_stride;
    const npy_intp* rows;   // N
    const T* offset;        // N
    const T* cols;          // N (BPR-max: the columns that count)
    const T* g;             // M: the rows' weights
    const T* target;        // Mp (BPR-max: each row's target score)
    T *W, *X, *E, *S;       // N x K gathered rows; N x Mp scores, exps (then G), sigmas (BPR-max)
    double* partial;        // n_chunks x M x 5: each chunk's row maximum and sums
    double* total;          // threads x M x 5: each thread's copy of the rows' totals
    char* work;             // threads x work_bytes: each thread's tile and lane arrays
    size_t work_bytes;
    T* loss;                // M
    T* dh;                  // M x K: the sum, in chunk order, of
    T* dh_parts;            // n_chunks x M x K: each chunk's G W (summed in a fixed order: the same result
                            // whichever thread computed which chunk)
    T* dW;                  // N x K
    T* db;                  // N
    std::atomic<int> claimed1{0}, done1{0}, claimed2{0}, done2{0};

    // A thread's scratch: a tile of SCORE_COLUMNS x Mp scores, LANE_ARRAYS lane arrays of Mp in T (score's row
    // maxima, or differentiate's factors) and 4 in double (score's row sums).
    enum { LANE_ARRAYS = 5 };
    static size_t work_size(int Mp) {
        const size_t bytes = (size_t)Mp * (SCORE_COLUMNS + LANE_ARRAYS) * sizeof(T) + (size_t)Mp * 4 * sizeof(double);
        return (bytes + 63) / 64 * 64;
    }

    void run(int tid) override {
        int c;
        char* mine = work + (size_t)tid * work_bytes;
        while ((c = claimed1.fetch_add(1)) < n_chunks) {
            score(c, mine);
            done1.fetch_add(1, std::memory_order_release);
        }
        while (done1.load(std::memory_order_acquire) < n_chunks) spin_pause();
        double* tot = total + (size_t)tid * M * 5;
        totals(tot);
        while ((c = claimed2.fetch_add(1)) < n_chunks) {
            differentiate(c, tot, mine);
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

    // X's columns j0..j1 = h W[j0:j1]^T, with W's rows copied from the table (gathered first where the table's
    // rows are strided) for the products of the gradient.
    void product(int j0, int j1, T* tile) {
        const bool direct = value_stride == (npy_intp)sizeof(T);
        if (!direct) gather(j0, j1);
        const T* row[SCORE_COLUMNS];
        for (int j = j0; j < j1; j += SCORE_COLUMNS) {
            const int jn = std::min(SCORE_COLUMNS, j1 - j);
            for (int q = 0; q < SCORE_COLUMNS; q++) {  // past j1: the last column again, not stored
                const int at = j + std::min(q, jn - 1);
                row[q] = direct ? (const T*)(table + rows[at] * row_stride) : W + (size_t)at * K;
            }
            if (direct)
                for (int q = j + SCORE_COLUMNS; q < std::min(j1, j + 2 * SCORE_COLUMNS); q++)
                    for (npy_intp b = 0; b < K * (npy_intp)sizeof(T); b += 64)
                        __builtin_prefetch(table + rows[q] * row_stride + b, 0);
            T* out = jn == SCORE_COLUMNS ? X + (size_t)j * Mp : tile;
            score_columns<T, SCORE_COLUMNS>(row, K, hT, Mp, out);
            if (out == tile) memcpy(X + (size_t)j * Mp, tile, (size_t)jn * Mp * sizeof(T));
            if (direct)
                for (int q = 0; q < jn; q++) memcpy(W + (size_t)(j + q) * K, row[q], K * sizeof(T));
        }
    }

    void score(int c, char* mine) {
        const int j0 = c * chunk, j1 = std::min(N, j0 + chunk);
        T* tile = (T*)mine;
        product(j0, j1, tile);
        T* __restrict__ m = tile + (size_t)SCORE_COLUMNS * Mp;   // each row's maximum over the chunk
        double* __restrict__ sums = (double*)(m + LANE_ARRAYS * (size_t)Mp);  // Z, A, B, D (BPR-max) of each row
        double *__restrict__ Z = sums, *__restrict__ A = sums + Mp, *__restrict__ B = sums + 2 * Mp,
               *__restrict__ D = sums + 3 * Mp;
        for (int i = 0; i < Mp; i++) m[i] = -std::numeric_limits<T>::max(), Z[i] = A[i] = B[i] = D[i] = 0;
        if (!BPR_MAX) {
            // Softmax cross-entropy: each row's maximum over the chunk, and its sum of exps.
            for (int j = j0; j < j1; j++) {
                T* __restrict__ x = X + (size_t)j * Mp;
                const T o = offset[j];
                for (int i = 0; i < Mp; i++) {
                    x[i] += o;
                    m[i] = x[i] > m[i] ? x[i] : m[i];
                }
            }
            for (int j = j0; j < j1; j++) {
                const T* __restrict__ x = X + (size_t)j * Mp;
                T* __restrict__ e = E + (size_t)j * Mp;
                for (int i = 0; i < Mp; i++) {
                    e[i] = std::exp(x[i] - m[i]);
                    Z[i] += e[i];
                }
            }
        } else {
            // BPR-max: the scores (after the ELU, if any) replace the logits; each row's largest negative (its
            // target, column i, and the columns that do not count left out), its sums of exps (e), of e sigma,
            // of e y^2 and of e sigma (1 - sigma), sigma = sigma(d - y) with d the row's target score.
            const T a = alpha;
            for (int j = j0; j < j1; j++) {
                T* __restrict__ x = X + (size_t)j * Mp;
                const T o = offset[j];
                for (int i = 0; i < Mp; i++) {
                    const T v = x[i] + o;
                    x[i] = ELU ? elu(v, a) : v;
                }
                if (cols[j] == 0) continue;
                for (int i = 0; i < Mp; i++) m[i] = (i != j && x[i] > m[i]) ? x[i] : m[i];
            }
            for (int j = j0; j < j1; j++) {
                const T* __restrict__ x = X + (size_t)j * Mp;
                T* __restrict__ e = E + (size_t)j * Mp;
                T* __restrict__ s = S + (size_t)j * Mp;
                const T cr = cols[j];
                for (int i = 0; i < Mp; i++) {
                    const T y = x[i];
                    const T ej = std::exp(std::min(y - m[i], (T)0)) * cr * (T)(i != j);
                    const T sg = 1 / (1 + std::exp(y - target[i]));
                    e[i] = ej;
                    s[i] = sg;
                    Z[i] += ej;
                    A[i] += ej * sg;
                    B[i] += ej * y * y;
                    D[i] += ej * sg * (1 - sg);
                }
            }
        }
        for (int i = 0; i < M; i++) {
            double* p = partial + ((size_t)c * M + i) * 5;
            p[0] = m[i], p[1] = Z[i], p[2] = A[i], p[3] = B[i], p[4] = D[i];
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

    void differentiate(int c, const double* tot, char* mine) {
        const int j0 = c * chunk, j1 = std::min(N, j0 + chunk), n = j1 - j0;
        // Each row's factors for this chunk (zero past M, where the gradient is zero): scale turns e into the
        // softmax's weight; with g's weight k (cross-entropy: g_i c_i, c_i = y_ii / (y_ii + 1e-24)) or the
        // BPR-max sums a, b and 1 / (a + 1e-24).
        T* __restrict__ scale = (T*)mine + (size_t)SCORE_COLUMNS * Mp;
        T *__restrict__ k = scale + Mp, *__restrict__ a = scale + 2 * Mp, *__restrict__ b = scale + 3 * Mp,
          *__restrict__ inv = scale + 4 * Mp;
        for (int i = 0; i < Mp; i++) scale[i] = k[i] = a[i] = b[i] = inv[i] = 0;
        for (int i = 0; i < M; i++) {
            const double* t = tot + (size_t)i * 5;
            const double* p = partial + ((size_t)c * M + i) * 5;
            scale[i] = (T)(std::exp(p[0] - t[0]) / t[1]);
            if (BPR_MAX) {
                k[i] = g[i], a[i] = (T)t[2], b[i] = (T)t[3], inv[i] = (T)(1.0 / (t[2] + 1e-24));
            } else {
                const T yt = (T)(std::exp(X[(size_t)i * Mp + i] - t[0]) / t[1]);
                k[i] = g[i] * (yt / (yt + (T)1e-24));
                a[i] = yt;  // the target's softmax weight, for its own column
            }
        }
        const T l = (T)lambda, al = alpha;
        for (int j = j0; j < j1; j++) {
            const T* __restrict__ x = X + (size_t)j * Mp;
            T* __restrict__ e = E + (size_t)j * Mp;
            if (!BPR_MAX) {
                // g_i c_i (y_ij - [j == i]), y the softmax.
                for (int i = 0; i < Mp; i++) e[i] = k[i] * (e[i] * scale[i]);
                if (j < M) e[j] = k[j] * (a[j] - 1);
            } else {
                const T* __restrict__ s = S + (size_t)j * Mp;
                for (int i = 0; i < Mp; i++) {
                    const T sj = e[i] * scale[i], yj = x[i], sg = s[i];
                    T dj = k[i] * (-(sj * (sg - a[i]) - sj * sg * (1 - sg)) * inv[i]
                                   + l * sj * (yj * yj - b[i] + 2 * yj));
                    if (ELU) dj *= elu_slope(yj, al);
                    e[i] = dj;
                }
                if (j < M) {
                    const double* t = tot + (size_t)j * 5;
                    T dt = (T)(g[j] * -t[4] * inv[j]);
                    if (ELU) dt *= elu_slope(x[j], al);
                    e[j] = dt;
                }
            }
            T sum = 0;
            #pragma omp simd reduction(+:sum)
            for (int i = 0; i < Mp; i++) sum += e[i];
            db[j] = sum;
        }
        gemm(false, false, n, K, M, (T)1, E + (size_t)j0 * Mp, Mp, h, K, (T)0, dW + (size_t)j0 * K, K);
        gemm(true, false, M, K, n, (T)1, E + (size_t)j0 * Mp, Mp, W + (size_t)j0 * K, K, (T)0,
             dh_parts + (size_t)c * M * K, K);
    }

    // After run(): the rows' losses, and dh summed over the chunks.
    void finish() {
        const double* tot = total;  // tid 0's totals
        for (int i = 0; i < M; i++) {
            const double* t = tot + (size_t)i * 5;
            if (BPR_MAX)
                loss[i] = (T)(-std::log(t[2] + 1e-24) + lambda * t[3]);
            else
                loss[i] = -std::log((T)(std::exp(X[(size_t)i * Mp + i] - t[0]) / t[1]) + (T)1e-24);
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
