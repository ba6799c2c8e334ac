// The Python module fusedbn._C: importing it loads this library, which runs
// the operator registrations (ops.cpp, the backends, autograd.cpp). Its own
// functions answer questions the Python side must not answer a second time.
#include <Python.h>

#include <exception>

#include "glue.h"
#include "kernels/cpu_dispatch.h"

namespace {

// cpu_isa() -> "avx512" | "avx2" | "baseline": the copy of the CPU kernels
// this process runs (FUSEDBN_CPU_ISA caps it).
PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(fusedbn::cpu::isa_name());
}

// is_invertible(activation, negative_slope, alpha) -> bool: whether
// inplace=True takes it.
PyObject* is_invertible(PyObject*, PyObject* args) {
  const char* name = nullptr;
  double slope = 0, alpha = 0;
  if (!PyArg_ParseTuple(args, "sdd", &name, &slope, &alpha)) return nullptr;
  try {
    return PyBool_FromLong(fusedbn::is_invertible(name, slope, alpha));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set of the CPU kernels in use."},
    {"is_invertible", is_invertible, METH_VARARGS,
     "is_invertible(activation, negative_slope, alpha): whether inplace=True takes it."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&def);
}
