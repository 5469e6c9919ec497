// BPR-max of each row of the scores (the target of row i in column i, the columns that count marked by
// ${cols}, regularisation weight ${bpreg}), a row at a time while it is in cache: the loss per row in
// ${loss}, and with grad ${grad} also the gradient w.r.t. ${X} of the losses weighted by ${g} in ${dX}.
// The scores are ${X} itself, or with elu ${elu} its ELU of alpha ${alpha} (cbackend.RowBPRMax has the
// formulas).
{
    typedef dtype_${X} T;
    const npy_intp M = PyArray_DIM(${X}, 0), N = PyArray_DIM(${X}, 1);
    if (PyArray_DIM(${cols}, 0) != N) {
        PyErr_SetString(PyExc_ValueError, "RowBPRMax: cols must have one entry per column of the scores");
        ${fail}
    }
    PyArrayObject* x = PyArray_GETCONTIGUOUS(${X});  // new references (copies if strided)
    if (!x) { ${fail} }
    PyArrayObject* c = PyArray_GETCONTIGUOUS(${cols});
    if (!c) { Py_DECREF(x); ${fail} }
    ${allocate}
    const double lambda = (double)*(dtype_${bpreg}*)PyArray_DATA(${bpreg});
    const T alpha = (T)${alpha};
    const dtype_${cols}* __restrict__ cr = (const dtype_${cols}*)PyArray_DATA(c);
    // Per row: the scores (when computed here), sigma(d - y_j), and exp then the softmax weights s_j
    // (kept in the gradient's row instead, where there is one, until the last pass overwrites them).
    std::vector<T> scratch(3 * N);
    T* __restrict__ y_elu = scratch.data();
    T* __restrict__ sig = y_elu + N;
    for (npy_intp i = 0; i < M; i++) {
        const T* __restrict__ xr = (const T*)PyArray_DATA(x) + i * N;
#if ${elu}
        // max(x, 0) + alpha expm1(min(x, 0)), as the graph of losses._elu writes it.
        #pragma omp simd
        for (npy_intp j = 0; j < N; j++)
            y_elu[j] = xr[j] > 0 ? xr[j] : alpha * std::expm1(std::min(xr[j], (T)0));
        const T* __restrict__ yr = y_elu;
#else
        const T* __restrict__ yr = xr;
#endif
#if ${grad}
        T* __restrict__ o = (T*)PyArray_DATA(${dX}) + i * N;
#else
        T* __restrict__ o = sig + N;
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
            const T e = std::exp(std::min(yr[j] - m, (T)0)) * cr[j];
            o[j] = e;
            Z += e;
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
            const T sg = 1 / (1 + std::exp(yr[j] - d));
            o[j] = sj;
            sig[j] = sg;
            A += sj * sg;
            B += sj * yr[j] * yr[j];
        }
        *((T*)PyArray_DATA(${loss}) + i) = (T)(-log(A + 1e-24) + lambda * B);
#if ${grad}
        const T gi = *(dtype_${g}*)PyArray_GETPTR1(${g}, i);
        const T inv = (T)(1.0 / (A + 1e-24)), a = (T)A, b = (T)B, l = (T)lambda;
        double target = 0;
        #pragma omp simd reduction(+:target)
        for (npy_intp j = 0; j < N; j++) {
            const T sj = o[j], yj = yr[j], sg = sig[j];
            target += sj * sg * (1 - sg);
            T dj = gi * (-(sj * (sg - a) - sj * sg * (1 - sg)) * inv + l * sj * (yj * yj - b + 2 * yj));
#if ${elu}
            // The ELU's derivative: 1 above 0, alpha exp(x) = y + alpha below, the mean of the two at 0.
            dj *= xr[j] > 0 ? (T)1 : xr[j] < 0 ? yj + alpha : (1 + alpha) / 2;
#endif
            o[j] = dj;
        }
        if (i < N) {
            T di = (T)(gi * -target * inv);
#if ${elu}
            di *= xr[i] > 0 ? (T)1 : xr[i] < 0 ? yr[i] + alpha : (1 + alpha) / 2;
#endif
            o[i] = di;
        }
#endif
    }
    Py_DECREF(x);
    Py_DECREF(c);
}
