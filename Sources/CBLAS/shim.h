#ifndef FT_CBLAS_SHIM_H
#define FT_CBLAS_SHIM_H
// OpenBLAS's CBLAS (Debian: libopenblas-dev). openblas_set_num_threads comes with it.
#include <cblas.h>
#endif
