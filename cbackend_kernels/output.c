// Makes ${out} a C-contiguous array of ${ndim} dimensions {${dims}}, keeping the previous call's array
// when it already is one.
{
    npy_intp out_dims[${ndim} ? ${ndim} : 1] = {${dims}};
    bool fits = ${out} && PyArray_NDIM(${out}) == ${ndim} && PyArray_IS_C_CONTIGUOUS(${out});
    for (int d = 0; fits && d < ${ndim}; d++) fits = PyArray_DIM(${out}, d) == out_dims[d];
    if (!fits) {
        Py_XDECREF(${out});
        ${out} = (PyArrayObject*)PyArray_EMPTY(${ndim}, out_dims, ${typenum}, 0);
        if (!${out}) { ${fail} }
    }
}
