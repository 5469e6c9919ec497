// Before the product x . y: OpenBLAS gets ${threads} threads from ${threshold} multiply-adds on, else one.
{
    const double macs = (double)PyArray_DIM(${x}, 0) * PyArray_DIM(${x}, 1) * PyArray_DIM(${y}, 1);
    const int threads = macs >= ${threshold}.0 ? ${threads} : 1;
    if (scipy_openblas_get_num_threads() != threads) scipy_openblas_set_num_threads(threads);
}
