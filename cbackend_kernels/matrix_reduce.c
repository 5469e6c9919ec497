// ${out} = the ${ufunc} of ${x} (a vector or a matrix) over its rows (by_row ${by_row}), its columns
// (by_column ${by_column}) or all of it; sums accumulate in double, a NaN makes a max or min NaN
// (cbackend.MatrixReduce).
{
    typedef ${acc} acc_t;
    // x seen as an M x N matrix (a vector is one row) with strides s0, s1 in elements.
#if ${is_vector}
    const npy_intp M = 1, N = PyArray_DIM(${x}, 0), s0 = 0, s1 = PyArray_STRIDE(${x}, 0) / (npy_intp)sizeof(dtype_${x});
#else
    const npy_intp M = PyArray_DIM(${x}, 0), N = PyArray_DIM(${x}, 1);
    const npy_intp s0 = PyArray_STRIDE(${x}, 0) / (npy_intp)sizeof(dtype_${x});
    const npy_intp s1 = PyArray_STRIDE(${x}, 1) / (npy_intp)sizeof(dtype_${x});
#endif
#if !${is_sum}
    if (${n_reduced} == 0) {
        PyErr_SetString(PyExc_ValueError, "zero-size array to reduction operation ${ufunc} which has no identity");
        ${fail}
    }
#endif
    ${allocate}
    const dtype_${x}* data = (const dtype_${x}*)PyArray_DATA(${x});
    dtype_${out}* o = (dtype_${out}*)PyArray_DATA(${out});
    const npy_intp os = ${out_ndim} ? PyArray_STRIDE(${out}, 0) / (npy_intp)sizeof(dtype_${out}) : 0;
    // One reduction of n entries from p on, `step` apart.
    auto reduce = [](const dtype_${x}* __restrict__ p, npy_intp n, npy_intp step) -> acc_t {
#if ${is_sum}
        double a = 0;
        if (step == 1) {
            #pragma omp simd reduction(+:a)
            for (npy_intp j = 0; j < n; j++) a += p[j];
        } else {
            for (npy_intp j = 0; j < n; j++) a += p[j * step];
        }
        return a;
#else
        acc_t a = ${init};
        int nan = 0;
        for (npy_intp j = 0; j < n; j++) { acc_t v = p[j * step]; a = ${update}; nan |= (v != v); }
        return nan ? NAN : a;
#endif
    };
#if ${by_column}
    acc_t* a_col = (acc_t*)malloc(sizeof(acc_t) * (N ? N : 1));
    if (!a_col) { PyErr_NoMemory(); ${fail} }
    int* nan = (int*)calloc(N ? N : 1, sizeof(int));
    if (!nan) { free(a_col); PyErr_NoMemory(); ${fail} }
    for (npy_intp j = 0; j < N; j++) a_col[j] = ${init};
    for (npy_intp i = 0; i < M; i++) {
        const dtype_${x}* __restrict__ xr = data + i * s0;
        if (s1 == 1) {
            #pragma omp simd
            for (npy_intp j = 0; j < N; j++) { acc_t a = a_col[j], v = xr[j]; a_col[j] = ${update}; nan[j] |= (v != v); }
        } else {
            for (npy_intp j = 0; j < N; j++) { acc_t a = a_col[j], v = xr[j * s1]; a_col[j] = ${update}; nan[j] |= (v != v); }
        }
    }
#if ${is_sum}
    for (npy_intp j = 0; j < N; j++) o[j * os] = a_col[j];
#else
    for (npy_intp j = 0; j < N; j++) o[j * os] = nan[j] ? NAN : a_col[j];
#endif
    free(a_col);
    free(nan);
#elif ${by_row}
    for (npy_intp i = 0; i < M; i++) o[i * os] = reduce(data + i * s0, N, s1);
#else
    // everything: rows, then the row results
    acc_t total = ${init};
    int nan_all = 0;
    for (npy_intp i = 0; i < M; i++) {
        acc_t a = total, v = reduce(data + i * s0, N, s1);
        total = ${update};
        nan_all |= (v != v);
    }
#if ${is_sum}
    o[0] = total;
#else
    o[0] = nan_all ? NAN : total;
#endif
#endif
}
