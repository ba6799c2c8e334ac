// The Python module fusedbn._C: importing it loads this library, which runs
// the operator registrations (ops.cpp, the backends, autograd.cpp). Its own
// functions answer questions the Python side must not answer a second time.
#include <Python.h>

#include <exception>
#include <vector>

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

// kernel_layout(sizes, strides) -> "NCS" | "NSC" | "copy" | "NSC copy": how
// the CPU kernels take a tensor with these sizes and strides (the glue's own
// choice; "NSC copy": a channels-last copy of a contiguous tensor, made in
// training and in the backward).
PyObject* kernel_layout(PyObject*, PyObject* args) {
  PyObject *sizes_obj = nullptr, *strides_obj = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &sizes_obj, &strides_obj)) return nullptr;
  auto ints = [](PyObject* seq, std::vector<int64_t>& out) {
    PyObject* fast = PySequence_Fast(seq, "kernel_layout: sizes and strides must be sequences");
    if (!fast) return false;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    for (Py_ssize_t i = 0; i < n; ++i) {
      const long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
      if (v == -1 && PyErr_Occurred()) break;
      out.push_back(v);
    }
    Py_DECREF(fast);
    return !PyErr_Occurred();
  };
  std::vector<int64_t> sizes, strides;
  if (!ints(sizes_obj, sizes) || !ints(strides_obj, strides)) return nullptr;
  try {
    return PyUnicode_FromString(fusedbn::kernel_layout(sizes, strides));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set of the CPU kernels in use."},
    {"is_invertible", is_invertible, METH_VARARGS,
     "is_invertible(activation, negative_slope, alpha): whether inplace=True takes it."},
    {"kernel_layout", kernel_layout, METH_VARARGS,
     "kernel_layout(sizes, strides): 'NCS', 'NSC', 'copy' or 'NSC copy', how the CPU kernels take such a tensor."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&def);
}
