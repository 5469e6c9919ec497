// The cross-entropy of the softmax of each row of ${X} (the target of row i in column i), a row at a time
// while it is in cache: the loss per row in ${loss}, and with grad ${grad} also the gradient w.r.t. ${X} of
// the losses weighted by ${g} in ${dX} (cbackend.RowCrossEntropy has the formulas). The softmax as
// RowSoftmax computes it: the max, exp(x - max), their sum in double, the division.
{
    typedef dtype_${X} T;
    const npy_intp M = PyArray_DIM(${X}, 0), N = PyArray_DIM(${X}, 1);
    if (M > N) {
        PyErr_SetString(PyExc_ValueError, "RowCrossEntropy: row i's target is column i, so rows must not outnumber columns");
        ${fail}
    }
    PyArrayObject* x = PyArray_GETCONTIGUOUS(${X});  // a new reference (a copy if strided)
    if (!x) { ${fail} }
    ${allocate}
    std::vector<T> scratch(${grad} ? 0 : N);  // the exps of a row, where there is no gradient to hold them
    for (npy_intp i = 0; i < M; i++) {
        const T* __restrict__ xr = (const T*)PyArray_DATA(x) + i * N;
#if ${grad}
        T* __restrict__ o = (T*)PyArray_DATA(${dX}) + i * N;
#else
        T* __restrict__ o = scratch.data();
#endif
        T m = xr[0];
        #pragma omp simd reduction(max:m)
        for (npy_intp j = 0; j < N; j++) m = xr[j] > m ? xr[j] : m;
        double Z = 0;
        #pragma omp simd reduction(+:Z)
        for (npy_intp j = 0; j < N; j++) {
            const T e = std::exp(xr[j] - m);
            o[j] = e;
            Z += e;
        }
        const T z = (T)Z, target = o[i] / z;
        *((T*)PyArray_DATA(${loss}) + i) = -std::log(target + (T)1e-24);
#if ${grad}
        const T scale = *(dtype_${g}*)PyArray_GETPTR1(${g}, i) * (target / (target + (T)1e-24));
        #pragma omp simd
        for (npy_intp j = 0; j < N; j++) o[j] = scale * (o[j] / z);
        o[i] = scale * (target - 1);
#endif
    }
    Py_DECREF(x);
}
