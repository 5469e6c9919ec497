// ${out} = ${x}[${idx}]: each row (of a vector: each entry) copied once, the rows AHEAD indices on asked for
// early (cbackend.RowGather).
{
    const bool matrix = PyArray_NDIM(${x}) == 2;
    const npy_intp n = PyArray_DIM(${x}, 0), L = matrix ? PyArray_DIM(${x}, 1) : 1, k = PyArray_DIM(${idx}, 0);
    const npy_intp s0 = PyArray_STRIDE(${x}, 0), s1 = matrix ? PyArray_STRIDE(${x}, 1) : s0, AHEAD = 8;
    const npy_intp is0 = PyArray_STRIDE(${idx}, 0) / sizeof(dtype_${idx});
    const dtype_${idx}* index = (const dtype_${idx}*)PyArray_DATA(${idx});
    ${allocate}
    const char* base = (const char*)PyArray_DATA(${x});
    dtype_${out}* o = (dtype_${out}*)PyArray_DATA(${out});
    for (npy_intp i = 0; i < k; i++) {
        if (matrix && i + AHEAD < k) {
            npy_intp p = index[(i + AHEAD) * is0];
            if (p >= 0 && p < n)
                for (npy_intp b = 0; b < L * s1; b += 64) __builtin_prefetch(base + p * s0 + b, 0);
        }
        npy_intp r = index[i * is0];
        if (r < 0) r += n;
        if (r < 0 || r >= n) {
            PyErr_Format(PyExc_IndexError, "index %ld is out of bounds for axis 0 with size %ld",
                         (long)index[i * is0], (long)n);
            ${fail}
        }
        const char* row = base + r * s0;
        if (!matrix)
            o[i] = *(const dtype_${x}*)row;
        else if (s1 == (npy_intp)sizeof(dtype_${x}))
            memcpy(o + i * L, row, L * sizeof(dtype_${x}));
        else
            for (npy_intp j = 0; j < L; j++) o[i * L + j] = *(const dtype_${x}*)(row + j * s1);
    }
}
