// Python module entry of peftfast._C. Deliberately free of pybind11 and torch/extension.h (slow to compile): the
// ops register themselves with the dispatcher (TORCH_LIBRARY in ops.cpp) when this shared object is loaded, and
// Python reaches them through torch.ops.peftfast.*.
#include <Python.h>

static struct PyModuleDef peftfast_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                               "peftfast C++/CUDA ops (see torch.ops.peftfast)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&peftfast_c_module); }
