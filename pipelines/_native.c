/* The module stub of fastload's C helpers (_jpeg.c, _samples.c, _resample.c): built as an extension module
 * only so that pip compiles and installs the shared library. Python never imports it:
 * fastload/pipelines/native.py loads the library for ctypes and, by symbol name, for numba. */
#include <Python.h>

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "ctypes-only helpers", -1, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
