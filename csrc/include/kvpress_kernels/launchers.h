// Declarations of the extern "C" launchers implemented in csrc/*.cu, and the hook that adds
// their Python bindings to the module.
#pragma once
#include <cstdint>

struct _object;
typedef _object PyObject;

// Adds the launcher bindings (defined in csrc/launchers_bind.cpp or a .cu file) to module `m`.
void kvpk_register_launchers(PyObject* m);
