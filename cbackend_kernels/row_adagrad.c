// Adagrad (with heavy-ball momentum when ${momentum_on}) on the rows ${rows} of the weights and their
// state (w, acc[, vel]: ${n_state} arrays), in place when ${inplace}, else on copies (cbackend.RowAdagrad).
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
    const npy_intp AHEAD = 8;
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
    for (npy_intp i = 0; i < k; i++) {
        if (i + AHEAD < k) {  // the rows are scattered over memory: ask for later ones early
            npy_intp p = index[(i + AHEAD) * is0];
            if (p < 0) p += n;
            for (npy_intp b = 0; b < row_bytes; b += 64)
                for (int s = 0; s < n_state; s++)
                    __builtin_prefetch((char*)PyArray_DATA(*state_out[s]) + p * row_bytes + b, 1);
        }
        npy_intp r = index[i * is0];
        if (i > 0 && r == index[(i - 1) * is0])  // a repeat (the padding row filling the list) steps by 0
            continue;
        if (r < 0) r += n;
        const dtype_${grad}* __restrict__ gr = (const dtype_${grad}*)PyArray_DATA(g) + i * L;
        dtype_${w}* __restrict__ wr = (dtype_${w}*)PyArray_DATA(w) + r * L;
        dtype_${w}* __restrict__ ar = (dtype_${w}*)PyArray_DATA(*state_out[1]) + r * L;
#if ${momentum_on}
        dtype_${w}* __restrict__ vr = (dtype_${w}*)PyArray_DATA(*state_out[2]) + r * L;
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
    Py_DECREF(g);
}
