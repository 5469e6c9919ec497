// BPR-max of each row of the scores ${Y} (the target of row i in column i, the columns that count marked
// by ${cols}, regularisation weight ${bpreg}), a row at a time while it is in cache: the loss per row in
// ${out}, or with grad ${grad} the gradient w.r.t. the scores of the losses weighted by ${g}
// (cbackend.RowBPRMax has the formulas).
{
    typedef dtype_${Y} T;
    const npy_intp M = PyArray_DIM(${Y}, 0), N = PyArray_DIM(${Y}, 1);
    if (PyArray_DIM(${cols}, 0) != N) {
        PyErr_SetString(PyExc_ValueError, "RowBPRMax: cols must have one entry per column of the scores");
        ${fail}
    }
    PyArrayObject* y = PyArray_GETCONTIGUOUS(${Y});  // new references (copies if strided)
    if (!y) { ${fail} }
    PyArrayObject* c = PyArray_GETCONTIGUOUS(${cols});
    if (!c) { Py_DECREF(y); ${fail} }
    ${allocate}
    const double lambda = (double)*(dtype_${bpreg}*)PyArray_DATA(${bpreg});
    const dtype_${cols}* __restrict__ cr = (const dtype_${cols}*)PyArray_DATA(c);
    std::vector<T> scratch(N);
    T* __restrict__ e = scratch.data();
    for (npy_intp i = 0; i < M; i++) {
        const T* __restrict__ yr = (const T*)PyArray_DATA(y) + i * N;
#if ${grad}
        T* __restrict__ o = (T*)PyArray_DATA(${out}) + i * N;
#else
        T* __restrict__ o = e;
#endif
        const T d = i < N ? yr[i] : 0;
        // The largest score among the negatives (the target and the padded columns left out).
        T m = -std::numeric_limits<T>::max();
        #pragma omp simd reduction(max:m)
        for (npy_intp j = 0; j < N; j++)
            m = (cr[j] != 0 && j != i && yr[j] > m) ? yr[j] : m;
        // exp of at most 0: the negatives are at most m, and the target, which may be far above
        // them, must not overflow before its weight 0 applies (taken out after the loop).
        double Z = 0;
        #pragma omp simd reduction(+:Z)
        for (npy_intp j = 0; j < N; j++) {
            const T x = std::exp(std::min(yr[j] - m, (T)0)) * cr[j];
            o[j] = x;
            Z += x;
        }
        if (i < N) {
            Z -= o[i];
            o[i] = 0;
        }
        const T z = (T)Z;
        double A = 0, B = 0;
        #pragma omp simd reduction(+:A, B)
        for (npy_intp j = 0; j < N; j++) {
            const T sj = o[j] / z;
            o[j] = sj;
            A += sj / (1 + std::exp(yr[j] - d));
            B += sj * yr[j] * yr[j];
        }
#if ${grad}
        // s_j is kept in the output row until this last pass overwrites it with the gradient.
        const T gi = *(dtype_${g}*)PyArray_GETPTR1(${g}, i);
        const T inv = (T)(1.0 / (A + 1e-24)), a = (T)A, b = (T)B, l = (T)lambda;
        double target = 0;
        #pragma omp simd reduction(+:target)
        for (npy_intp j = 0; j < N; j++) {
            const T sj = o[j], yj = yr[j];
            const T sig = 1 / (1 + std::exp(yj - d));
            target += sj * sig * (1 - sig);
            o[j] = gi * (-(sj * (sig - a) - sj * sig * (1 - sig)) * inv + l * sj * (yj * yj - b + 2 * yj));
        }
        if (i < N) o[i] = (T)(gi * -target * inv);
#else
        *((T*)PyArray_DATA(${out}) + i) = (T)(-log(A + 1e-24) + lambda * B);
#endif
    }
    Py_DECREF(y);
    Py_DECREF(c);
}
