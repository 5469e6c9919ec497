// The output layer of a training step (cbackend.OutputLayer): the scores X = ${h} ${table}[${rows}]^T + ${offset}
// of the scored columns, the loss of each row (bpr_max ${bpr_max}: BPR-max with the columns ${cols_or_g} and
// weight ${bpreg}, with an ELU of alpha ${alpha} when elu ${elu}; else the cross-entropy of the softmax) in
// ${loss}, and from the gradient G w.r.t. X of the losses weighted by ${g}: ${dh} = G W, ${dW} = G^T h and
// ${db} = G's column sums, on up to ${threads} threads.
{
    typedef dtype_${h} T;
    const npy_intp M = PyArray_DIM(${h}, 0), K = PyArray_DIM(${h}, 1), N = PyArray_DIM(${rows}, 0);
    const npy_intp L = PyArray_DIM(${table}, 0);
    if (PyArray_DIM(${table}, 1) != K || PyArray_DIM(${offset}, 0) != N || PyArray_DIM(${g}, 0) != M
        || (${bpr_max} && PyArray_DIM(${cols_or_g}, 0) != N)) {
        PyErr_SetString(PyExc_ValueError, "OutputLayer: the table's rows must be as wide as h, and offset (and cols) "
                        "must have one entry per scored row, g one per row of h");
        ${fail}
    }
    if (M > N || N > INT_MAX / 4 || K > INT_MAX / 4 || M * N > INT_MAX || N * K > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "OutputLayer: row i's target is column i, so rows must not outnumber "
                        "columns (and every dimension must fit BLAS's int)");
        ${fail}
    }
    ${allocate}
    PyArrayObject* held[4] = {NULL, NULL, NULL, NULL};  // contiguous copies where an input is strided
    PyArrayObject* in[4] = {${h}, ${offset}, ${g}, ${cols_or_g}};
    for (int q = 0; q < 4; q++) {
        held[q] = PyArray_GETCONTIGUOUS(in[q]);
        if (!held[q]) {
            for (int r = 0; r < q; r++) Py_DECREF(held[r]);
            ${fail}
        }
    }
    // The scratch (kept in this node's struct from call to call): the gathered rows, the scores, the exps, the
    // sigmas, each chunk's dh, each chunk's row sums and each thread's totals, the rows' indices, the targets,
    // h^T and each thread's scratch (the batch's rows padded to whole vectors where they are lanes).
    const int threads = ${threads};
    const npy_intp lanes = output_layer::VECTOR_BYTES / sizeof(T), Mp = (M + lanes - 1) / lanes * lanes;
    // Eight chunks of columns (16 wide at least, a multiple of 16), whatever the threads: the same sums in the
    // same order, so the same results bit for bit on any number of threads.
    const npy_intp chunk = std::max<npy_intp>(16, (N + 7) / 8 + 15) / 16 * 16;
    const npy_intp n_chunks = (N + chunk - 1) / chunk;
    typedef output_layer::Layer<T, ${bpr_max}, ${elu}> Layer;
    const size_t sizes[] = {(size_t)(N * K) * sizeof(T), 3 * (size_t)(Mp * N) * sizeof(T),
                            (size_t)(n_chunks * M * K) * sizeof(T), (size_t)(n_chunks + threads) * M * 5 * sizeof(double),
                            (size_t)N * sizeof(npy_intp), (size_t)Mp * sizeof(T), (size_t)(K * Mp) * sizeof(T),
                            threads * Layer::work_size(Mp)};
    size_t total_bytes = 64;
    for (size_t s : sizes) total_bytes += (s + 63) / 64 * 64;
    if (${scratch}.size() < total_bytes) ${scratch}.resize(total_bytes);
    char* next = (char*)(((uintptr_t)${scratch}.data() + 63) / 64 * 64);
    char* region[8];
    for (int q = 0; q < 8; q++) {
        region[q] = next;
        next += (sizes[q] + 63) / 64 * 64;
    }
    npy_intp* rows = (npy_intp*)region[4];
    const npy_intp is0 = PyArray_STRIDE(${rows}, 0) / sizeof(dtype_${rows});
    const dtype_${rows}* index = (const dtype_${rows}*)PyArray_DATA(${rows});
    bool in_range = true;
    for (npy_intp j = 0; j < N; j++) {
        npy_intp r = index[j * is0];
        if (r < 0) r += L;
        if (r < 0 || r >= L) {
            PyErr_Format(PyExc_IndexError, "OutputLayer: index %ld is out of bounds for %ld rows",
                         (long)index[j * is0], (long)L);
            in_range = false;
            break;
        }
        rows[j] = r;
    }
    if (!in_range) {
        for (int q = 0; q < 4; q++) Py_DECREF(held[q]);
        ${fail}
    }
    Layer layer;
    layer.M = M, layer.N = N, layer.K = K, layer.chunk = chunk, layer.n_chunks = n_chunks, layer.threads = threads;
    layer.Mp = Mp;
    layer.alpha = (T)${alpha};
#if ${bpr_max}
    layer.lambda = (double)*(dtype_${bpreg}*)PyArray_DATA(${bpreg});
#else
    layer.lambda = 0;
#endif
    layer.h = (const T*)PyArray_DATA(held[0]);
    T* hT = (T*)region[6];
    for (npy_intp k = 0; k < K; k++)
        for (npy_intp i = 0; i < Mp; i++) hT[k * Mp + i] = i < M ? layer.h[i * K + k] : 0;
    layer.hT = hT;
    layer.work = region[7], layer.work_bytes = Layer::work_size(Mp);
    layer.table = (const char*)PyArray_DATA(${table});
    layer.row_stride = PyArray_STRIDE(${table}, 0), layer.value_stride = PyArray_STRIDE(${table}, 1);
    layer.rows = rows;
    layer.offset = (const T*)PyArray_DATA(held[1]);
    layer.g = (const T*)PyArray_DATA(held[2]);
    layer.cols = (const T*)PyArray_DATA(held[3]);
    layer.W = (T*)region[0];
    layer.X = (T*)region[1], layer.E = layer.X + Mp * N, layer.S = layer.E + Mp * N;
    layer.dh_parts = (T*)region[2];
    layer.partial = (double*)region[3], layer.total = layer.partial + n_chunks * M * 5;
    T* target = (T*)region[5];
    layer.target = target;
    layer.loss = (T*)PyArray_DATA(${loss}), layer.dh = (T*)PyArray_DATA(${dh});
    layer.dW = (T*)PyArray_DATA(${dW}), layer.db = (T*)PyArray_DATA(${db});
    std::fill(target, target + Mp, (T)0);
    if (${bpr_max}) {  // each row's target score, which every column's sigma reads
        for (npy_intp i = 0; i < M; i++) {
            const char* w = layer.table + rows[i] * layer.row_stride;
            const T* __restrict__ hi = layer.h + i * K;
            T dot = 0;
            if (layer.value_stride == (npy_intp)sizeof(T)) {
                const T* __restrict__ wi = (const T*)w;
                #pragma omp simd reduction(+:dot)
                for (npy_intp k = 0; k < K; k++) dot += hi[k] * wi[k];
            } else {
                for (npy_intp k = 0; k < K; k++) dot += hi[k] * *(const T*)(w + k * layer.value_stride);
            }
            const T v = dot + layer.offset[i], alpha = (T)${alpha};
            target[i] = ${elu} ? output_layer::elu(v, alpha) : v;
        }
    }
#if ${threads} > 1
    // Each thread's products run on that thread.
    if (scipy_openblas_get_num_threads() != 1) scipy_openblas_set_num_threads(1);
#endif
    worker_pool::run(&layer, threads);
    layer.finish();
    for (int q = 0; q < 4; q++) Py_DECREF(held[q]);
}
