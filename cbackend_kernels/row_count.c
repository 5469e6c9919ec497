// ${out}[i] = the number of entries of row i of ${x} that are ${op} ${t}[i] (cbackend.RowCount).
{
    npy_intp M = PyArray_DIM(${x}, 0), N = PyArray_DIM(${x}, 1);
    if (PyArray_DIM(${t}, 0) != M) {
        PyErr_SetString(PyExc_ValueError, "RowCount: one threshold per row");
        ${fail}
    }
    PyArrayObject* contiguous = PyArray_GETCONTIGUOUS(${x});  // a new reference (a copy if strided)
    if (!contiguous) { ${fail} }
    ${allocate}
    npy_intp ts = PyArray_STRIDE(${t}, 0) / sizeof(dtype_${t}), os = PyArray_STRIDE(${out}, 0) / sizeof(dtype_${out});
    for (npy_intp i = 0; i < M; i++) {
        const dtype_${x}* __restrict__ xr = (const dtype_${x}*)PyArray_DATA(contiguous) + i * N;
        const dtype_${x} threshold = ((const dtype_${t}*)PyArray_DATA(${t}))[i * ts];
        npy_int32 count = 0;
        for (npy_intp j = 0; j < N; j++) count += xr[j] ${op} threshold;
        ((dtype_${out}*)PyArray_DATA(${out}))[i * os] = count;
    }
    Py_DECREF(contiguous);
}
