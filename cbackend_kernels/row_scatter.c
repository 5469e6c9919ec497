// ${x}[${idx}[i], :] ${op} ${y}[i, :] for every i in order, in place; ${out} is ${x} (cbackend.RowScatter).
{
    npy_intp n = PyArray_DIM(${x}, 0), L = PyArray_DIM(${x}, 1), k = PyArray_DIM(${idx}, 0);
    if (PyArray_DIM(${y}, 0) != k || PyArray_DIM(${y}, 1) != L) {
        PyErr_SetString(PyExc_ValueError, "RowScatter: y must have one row of x's width per index");
        ${fail}
    }
    npy_intp xs0 = PyArray_STRIDE(${x}, 0) / sizeof(dtype_${x}), xs1 = PyArray_STRIDE(${x}, 1) / sizeof(dtype_${x});
    npy_intp ys0 = PyArray_STRIDE(${y}, 0) / sizeof(dtype_${y}), ys1 = PyArray_STRIDE(${y}, 1) / sizeof(dtype_${y});
    npy_intp is0 = PyArray_STRIDE(${idx}, 0) / sizeof(dtype_${idx});
    const dtype_${idx}* index = (const dtype_${idx}*)PyArray_DATA(${idx});
    for (npy_intp i = 0; i < k; i++) {
        npy_intp r = index[i * is0];
        if (r < 0) r += n;
        if (r < 0 || r >= n) {
            PyErr_Format(PyExc_IndexError, "RowScatter: index %ld out of bounds for %ld rows", (long)index[i * is0], (long)n);
            ${fail}
        }
        dtype_${x}* __restrict__ xr = (dtype_${x}*)PyArray_DATA(${x}) + r * xs0;
        const dtype_${y}* __restrict__ yr = (const dtype_${y}*)PyArray_DATA(${y}) + i * ys0;
        if (xs1 == 1 && ys1 == 1) {
            for (npy_intp j = 0; j < L; j++) xr[j] ${op} yr[j];
        } else {
            for (npy_intp j = 0; j < L; j++) xr[j * xs1] ${op} yr[j * ys1];
        }
    }
    Py_XDECREF(${out});
    ${out} = ${x};
    Py_INCREF(${out});
}
