// Before the product x . y in pieces (split_product::gemm): one OpenBLAS thread for each piece's call; ${threads}
// pieces from ${threshold} multiply-adds on, else the one call.
if (scipy_openblas_get_num_threads() != 1) scipy_openblas_set_num_threads(1);
const int split_threads = (double)PyArray_DIM(${x}, 0) * PyArray_DIM(${x}, 1) * PyArray_DIM(${y}, 1) >= ${threshold}.0
                          ? ${threads} : 1;
