// Adagrad (with heavy-ball momentum when ${momentum_on}) on the rows ${rows} of the weights and their
// state (w, acc[, vel]: ${n_state} arrays), in place when ${inplace}, else on copies (cbackend.RowAdagrad), on
// up to ${threads} threads.
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
    if (PyArray_DIM(${grad}, 0) != k || GRU4REC_WIDTH(${grad}) != L) {
        PyErr_SetString(PyExc_ValueError, "RowAdagrad: the gradient must have one row of the weights' width per index");
        ${fail}
    }
    #undef GRU4REC_WIDTH
    PyArrayObject* g = PyArray_GETCONTIGUOUS(${grad});  // a new reference (a copy if strided)
    if (!g) { ${fail} }
    const npy_intp is0 = PyArray_STRIDE(${rows}, 0) / sizeof(dtype_${rows});
    const dtype_${rows}* index = (const dtype_${rows}*)PyArray_DATA(${rows});
    const npy_intp row_bytes = L * sizeof(dtype_${w});
    for (npy_intp i = 0; i < k; i++) {  // every index checked before any row changes
        const npy_intp r = index[i * is0];
        if (r < -n || r >= n) {
            Py_DECREF(g);
            PyErr_Format(PyExc_IndexError, "RowAdagrad: index %ld out of bounds for %ld rows", (long)r, (long)n);
            ${fail}
        }
    }
    // The rows' steps, in pieces of PIECE rows that the calling thread and, with ${threads} > 1, the process's
    // workers claim as they come (the rows are distinct: no two threads write one row).
    struct Steps : worker_pool::Task {
        const dtype_${rows}* index;
        npy_intp is0, n, L, k, row_bytes;
        char* state[3];
        const dtype_${grad}* grad;
        dtype_${w} lr, momentum, eps;
        std::atomic<npy_intp> claimed{0}, done{0};
        enum : npy_intp { PIECE = 128, AHEAD = 8 };

        void run(int) override {
            npy_intp p;
            while ((p = claimed.fetch_add(PIECE)) < k) {
                step(p, std::min(k, p + PIECE));
                done.fetch_add(std::min(k, p + PIECE) - p, std::memory_order_release);
            }
            while (done.load(std::memory_order_acquire) < k) worker_pool::spin_pause();
        }

        void step(npy_intp first, npy_intp end) {
            for (npy_intp i = first; i < end; i++) {
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
                const dtype_${grad}* __restrict__ gr = grad + i * L;
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
    steps.grad = (const dtype_${grad}*)PyArray_DATA(g);
    steps.lr = lr, steps.momentum = momentum, steps.eps = eps;
    // A step of few rows is not worth waking a worker for.
    worker_pool::run(&steps, k * L >= 32768 ? ${threads} : 1);
    Py_DECREF(g);
}
