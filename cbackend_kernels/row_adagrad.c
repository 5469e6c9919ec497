// Adagrad (with heavy-ball momentum when ${momentum_on}) on the rows ${rows} of the weights and their
// state (w, acc[, vel]: ${n_state} arrays), in place when ${inplace}, else on copies (cbackend.RowAdagrad), on
// up to ${threads} threads. The gradient: ${grad}, a row per index; or, with ${sources} sources, the sum of
// each source's rows that land on the index's place (the rows ${values} scattered to the places ${places}).
{
    PyArrayObject* state_in[] = {${state_in}};
    PyArrayObject** state_out[] = {${state_out}};
    const int n_state = ${n_state};
    for (int s = 0; s < n_state; s++) {
        Py_XDECREF(*state_out[s]);
#if ${inplace}
        *state_out[s] = state_in[s];
        Py_INCREF(*state_out[s]);
#else
        *state_out[s] = (PyArrayObject*)PyArray_NewCopy(state_in[s], NPY_CORDER);
        if (!*state_out[s]) { ${fail} }
#endif
    }
    PyArrayObject* w = *state_out[0];
    // A vector is a column: its rows are one wide.
    #define GRU4REC_WIDTH(v) (PyArray_NDIM(v) == 2 ? PyArray_DIM(v, 1) : 1)
    const npy_intp n = PyArray_DIM(w, 0), L = GRU4REC_WIDTH(w), k = PyArray_DIM(${rows}, 0);
    const dtype_${w} lr = ${learning_rate}, momentum = ${momentum}, eps = ${epsilon};
    for (int s = 0; s < n_state; s++) {
        PyArrayObject* v = *state_out[s];
        if (!PyArray_IS_C_CONTIGUOUS(v) || GRU4REC_WIDTH(v) != L || PyArray_DIM(v, 0) != n) {
            PyErr_SetString(PyExc_ValueError, "RowAdagrad: the weights and their state must be C-contiguous matrices of one shape");
            ${fail}
        }
    }
    // held: new references released at the end (or on failure): the contiguous gradient, or each source's
    // contiguous rows and its places as npy_intp.
    const int n_sources = ${sources};
    PyArrayObject* held[2 * ${sources} + 1] = {NULL};
#define GRU4REC_RELEASE for (int q = 0; q < 2 * ${sources} + 1; q++) Py_XDECREF(held[q]);
#if ${sources}
    PyArrayObject* values_in[] = {${values}};
    PyArrayObject* places_in[] = {${places}};
    for (int q = 0; q < n_sources; q++) {
        held[2 * q] = (PyArrayObject*)PyArray_FROMANY((PyObject*)values_in[q], PyArray_TYPE(w), 1, 2, NPY_ARRAY_CARRAY_RO);
        held[2 * q + 1] = held[2 * q] ? (PyArrayObject*)PyArray_FROMANY((PyObject*)places_in[q], NPY_INTP, 1, 1,
                                                                         NPY_ARRAY_CARRAY_RO) : NULL;
        if (!held[2 * q + 1]) { GRU4REC_RELEASE ${fail} }
        if (PyArray_DIM(held[2 * q], 0) != PyArray_DIM(held[2 * q + 1], 0) || GRU4REC_WIDTH(held[2 * q]) != L) {
            GRU4REC_RELEASE
            PyErr_SetString(PyExc_ValueError, "RowAdagrad: each source needs one row of the weights' width per place");
            ${fail}
        }
        const npy_intp* at = (const npy_intp*)PyArray_DATA(held[2 * q + 1]);
        for (npy_intp j = 0; j < PyArray_DIM(held[2 * q + 1], 0); j++)
            if (at[j] < -k || at[j] >= k) {
                PyErr_Format(PyExc_IndexError, "RowAdagrad: place %ld out of bounds for %ld indices", (long)at[j], (long)k);
                GRU4REC_RELEASE
                ${fail}
            }
    }
#else
    if (PyArray_DIM(${grad}, 0) != k || GRU4REC_WIDTH(${grad}) != L) {
        PyErr_SetString(PyExc_ValueError, "RowAdagrad: the gradient must have one row of the weights' width per index");
        ${fail}
    }
    held[0] = PyArray_GETCONTIGUOUS(${grad});  // a copy if strided
    if (!held[0]) { ${fail} }
#endif
    #undef GRU4REC_WIDTH
    const npy_intp is0 = PyArray_STRIDE(${rows}, 0) / sizeof(dtype_${rows});
    const dtype_${rows}* index = (const dtype_${rows}*)PyArray_DATA(${rows});
    const npy_intp row_bytes = L * sizeof(dtype_${w});
    for (npy_intp i = 0; i < k; i++) {  // every index checked before any row changes
        const npy_intp r = index[i * is0];
        if (r < -n || r >= n) {
            GRU4REC_RELEASE
            PyErr_Format(PyExc_IndexError, "RowAdagrad: index %ld out of bounds for %ld rows", (long)r, (long)n);
            ${fail}
        }
    }
    // Each index's rows of each source, in the sources' order: first[q * k + i] the first, then after[q][j]
    // (-1: none), so that the sum adds them in the order in which scatters into zeros would.
    std::vector<npy_intp> first((size_t)n_sources * k, -1), after;
    std::vector<size_t> after_start(n_sources + 1, 0);
    for (int q = 0; q < n_sources; q++) after_start[q + 1] = after_start[q] + PyArray_DIM(held[2 * q + 1], 0);
    after.resize(after_start[n_sources]);
    for (int q = 0; q < n_sources; q++) {
        const npy_intp* at = (const npy_intp*)PyArray_DATA(held[2 * q + 1]);
        for (npy_intp j = PyArray_DIM(held[2 * q + 1], 0) - 1; j >= 0; j--) {
            const npy_intp i = at[j] < 0 ? at[j] + k : at[j];
            after[after_start[q] + j] = first[(size_t)q * k + i];
            first[(size_t)q * k + i] = j;
        }
    }
    // The rows' steps, in pieces of rows that the calling thread and, with ${threads} > 1, the process's
    // workers claim as they come (the rows are distinct: no two threads write one row).
    struct Steps : worker_pool::Task {
        typedef dtype_${w} T;
        const dtype_${rows}* index;
        npy_intp is0, n, L, k, row_bytes;
        char* state[3];
        const T* grad;              // k x L, or NULL: the sources' rows summed per index
        const T* values[${sources} + 1];
        const npy_intp *first, *after;
        const size_t* after_start;
        T* sums;                    // a row of L for each thread, sum_stride apart (on cache lines of its own)
        npy_intp sum_stride;
        T lr, momentum, eps;
        std::atomic<npy_intp> claimed{0}, done{0};
        npy_intp piece;             // rows a claim takes
        enum : npy_intp { AHEAD = 8 };

        void run(int tid) override {
            npy_intp p;
            while ((p = claimed.fetch_add(piece)) < k) {
                step(p, std::min(k, p + piece), sums + (size_t)tid * sum_stride);
                done.fetch_add(std::min(k, p + piece) - p, std::memory_order_release);
            }
            while (done.load(std::memory_order_acquire) < k) worker_pool::spin_pause();
        }

        // Index i's gradient: its row of grad, or its sources' rows summed into sum.
        const T* gradient(npy_intp i, T* __restrict__ sum) const {
            if (grad) return grad + i * L;
            for (npy_intp j = 0; j < L; j++) sum[j] = 0;
            for (int q = 0; q < ${sources}; q++)
                for (npy_intp j = first[(size_t)q * k + i]; j >= 0; j = after[after_start[q] + j]) {
                    const T* __restrict__ v = values[q] + j * L;
                    for (npy_intp c = 0; c < L; c++) sum[c] += v[c];
                }
            return sum;
        }

        void step(npy_intp first_index, npy_intp end, T* sum) {
            for (npy_intp i = first_index; i < end; i++) {
                if (i + AHEAD < end) {  // the rows are scattered over memory: ask for later ones early
                    npy_intp p = index[(i + AHEAD) * is0];
                    if (p < 0) p += n;
                    for (npy_intp b = 0; b < row_bytes; b += 64)
                        for (int s = 0; s < ${n_state}; s++) __builtin_prefetch(state[s] + p * row_bytes + b, 1);
                }
                npy_intp r = index[i * is0];
                if (i > 0 && r == index[(i - 1) * is0])  // a repeat (the padding row filling the list) steps by 0
                    continue;
                if (r < 0) r += n;
                const T* __restrict__ gr = gradient(i, sum);
                dtype_${w}* __restrict__ wr = (dtype_${w}*)state[0] + r * L;
                dtype_${w}* __restrict__ ar = (dtype_${w}*)state[1] + r * L;
#if ${momentum_on}
                dtype_${w}* __restrict__ vr = (dtype_${w}*)state[2] + r * L;
                for (npy_intp j = 0; j < L; j++) {
                    dtype_${w} a = ar[j] + gr[j] * gr[j];
                    ar[j] = a;
                    vr[j] = momentum * vr[j] - lr * gr[j] / sqrt(a + eps);
                    wr[j] += vr[j];
                }
#else
                for (npy_intp j = 0; j < L; j++) {
                    dtype_${w} a = ar[j] + gr[j] * gr[j];
                    ar[j] = a;
                    wr[j] -= lr * gr[j] / sqrt(a + eps);
                }
#endif
            }
        }
    } steps;
    steps.index = index, steps.is0 = is0, steps.n = n, steps.L = L, steps.k = k, steps.row_bytes = row_bytes;
    for (int s = 0; s < n_state; s++) steps.state[s] = (char*)PyArray_DATA(*state_out[s]);
    steps.grad = n_sources ? NULL : (const dtype_${w}*)PyArray_DATA(held[0]);
    for (int q = 0; q < n_sources; q++) steps.values[q] = (const dtype_${w}*)PyArray_DATA(held[2 * q]);
    steps.first = first.data(), steps.after = after.data(), steps.after_start = after_start.data();
    steps.sum_stride = (L * (npy_intp)sizeof(dtype_${w}) + 127) / 128 * 128 / (npy_intp)sizeof(dtype_${w});
    std::vector<dtype_${w}> sums((size_t)${threads} * steps.sum_stride + 128 / sizeof(dtype_${w}));
    steps.sums = (dtype_${w}*)(((uintptr_t)sums.data() + 127) / 128 * 128);
    steps.lr = lr, steps.momentum = momentum, steps.eps = eps;
    // Pieces of 128 rows, fewer where rows are wide (a dense matrix's, all its rows): a few hundred KB each, so
    // that the threads end together.
    steps.piece = std::max<npy_intp>(8, std::min<npy_intp>(128, 32768 / std::max<npy_intp>(L, 1)));
    // A step of few rows is not worth waking a worker for.
    worker_pool::run(&steps, k * L >= 32768 ? ${threads} : 1);
    GRU4REC_RELEASE
#undef GRU4REC_RELEASE
}
