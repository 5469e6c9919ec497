// scipy-openblas32's thread control (see cbackend.ThreadedProduct).
extern "C" void scipy_openblas_set_num_threads(int);
extern "C" int scipy_openblas_get_num_threads(void);
