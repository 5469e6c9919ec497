// ${out} = the softmax of each row of ${x}, computed while the row is in cache: the max, exp(x - max),
// their sum (in double) and the division (cbackend.RowSoftmax).
{
    npy_intp M = PyArray_DIM(${x}, 0), N = PyArray_DIM(${x}, 1);
    PyArrayObject* contiguous = PyArray_GETCONTIGUOUS(${x});  // a new reference (a copy if strided)
    if (!contiguous) { ${fail} }
    ${allocate}
    for (npy_intp i = 0; i < M; i++) {
        const dtype_${x}* __restrict__ xr = (const dtype_${x}*)PyArray_DATA(contiguous) + i * N;
        dtype_${out}* __restrict__ o = (dtype_${out}*)PyArray_DATA(${out}) + i * N;
        // Vectorised max and sum (a NaN in the row makes the whole row NaN, as before).
        dtype_${x} m = xr[0];
        #pragma omp simd reduction(max:m)
        for (npy_intp j = 0; j < N; j++) m = xr[j] > m ? xr[j] : m;
        double sum = 0;
        #pragma omp simd reduction(+:sum)
        for (npy_intp j = 0; j < N; j++) {
            dtype_${out} e = exp(xr[j] - m);
            o[j] = e;
            sum += e;
        }
        dtype_${out} s = (dtype_${out})sum;
        for (npy_intp j = 0; j < N; j++) o[j] = o[j] / s;
    }
    Py_DECREF(contiguous);
}
