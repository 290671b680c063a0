"""Offline reading of TensorFlow Lite flatbuffers: the operator list and the constant tensors.

A ``.tflite`` file is a flatbuffer holding one or more subgraphs; each subgraph lists tensors (name,
shape, type, and for constants an index into a table of raw buffers) and operators (a builtin code,
the indices of their input and output tensors, and an options table such as a convolution's strides
and padding). :func:`read_tflite` turns the first subgraph into plain Python and numpy values so
that a model's weights can be mapped onto Flax parameters, and so that the graph can be checked
against the architecture it is supposed to have.

Nothing here touches the network: the file is read from a path the caller gives, which may be the
``.tflite`` itself, a directory containing it, or a Python wheel (a zip archive) that ships it, such
as ``pyopen_wakeword-1.1.0-py3-none-*.whl`` from ``pip download --no-deps pyopen-wakeword==1.1.0``.

Parsing uses the ``tflite`` package (the flatbuffer schema compiled to Python), imported lazily so
that the rest of the library does not depend on it.

Examples:
  >>> wheel = "pyopen_wakeword-1.1.0-py3-none-manylinux_2_35_x86_64.whl"
  >>> graph = read_tflite(find_tflite(wheel, "embedding_model.tflite"))  # doctest: +SKIP
  >>> [op.name for op in graph.operators][:3]  # doctest: +SKIP
  ['PAD', 'CONV_2D', 'LEAKY_RELU']
"""

from __future__ import annotations

import importlib
import os
import zipfile
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

# TFLite TensorType codes -> numpy dtypes (the subset that appears in float models).
_NUMPY_DTYPES = {
    0: np.float32,
    1: np.float16,
    2: np.int32,
    3: np.uint8,
    4: np.int64,
    6: np.bool_,
    7: np.int16,
    9: np.int8,
    10: np.float64,
}

# TFLite's Padding enum.
PADDING_NAMES = {0: "SAME", 1: "VALID"}


class TFLiteTensor(NamedTuple):
  """One tensor of a subgraph.

  Attributes:
    name: the tensor's name in the converted graph.
    shape: its static shape (batch dimensions are usually 1).
    dtype: the numpy dtype.
    data: the constant's value as a read-only numpy array of ``shape``, or ``None`` for activations.
  """
  name: str
  shape: Tuple[int, ...]
  dtype: Any
  data: Optional[np.ndarray]


class TFLiteOperator(NamedTuple):
  """One operator of a subgraph, in execution order.

  Attributes:
    name: the builtin operator name, e.g. ``"CONV_2D"``.
    inputs: indices into the subgraph's tensors (``-1`` marks an omitted optional input).
    outputs: indices into the subgraph's tensors.
    options: the builtin options as a dict of plain values, e.g. ``{"Padding": 1, "StrideH": 1}``.
  """
  name: str
  inputs: Tuple[int, ...]
  outputs: Tuple[int, ...]
  options: Dict[str, Any]


class TFLiteGraph(NamedTuple):
  """The first subgraph of a ``.tflite`` model.

  Attributes:
    tensors: every tensor, indexed as the operators refer to them.
    operators: the operators in execution order.
    inputs: indices of the graph's input tensors.
    outputs: indices of the graph's output tensors.
  """
  tensors: Tuple[TFLiteTensor, ...]
  operators: Tuple[TFLiteOperator, ...]
  inputs: Tuple[int, ...]
  outputs: Tuple[int, ...]

  def constant(self, index: int) -> np.ndarray:
    """The value of constant tensor ``index``; raises ValueError if it is an activation."""
    tensor = self.tensors[index]
    if tensor.data is None:
      raise ValueError(f"tensor {index} ({tensor.name!r}) is not a constant of the graph.")
    return tensor.data


def _import_tflite_schema():
  try:
    return importlib.import_module("tflite")
  except ImportError as error:
    raise ImportError(
        "reading .tflite files needs the flatbuffer schema package `tflite`; install it with "
        "`pip install tflite==2.18.0`.") from error


def find_tflite(path: PathLike, filename: str) -> bytes:
  """The bytes of ``filename`` found at ``path``, without any download.

  Args:
    path: the ``.tflite`` file itself, a directory searched recursively for ``filename`` (for
      example an unpacked wheel, or the directory ``pip download`` wrote the wheel into), or a
      ``.whl``/``.zip`` archive containing a member whose base name is ``filename``.
    filename: the base name to look for, e.g. ``"embedding_model.tflite"``.

  Returns:
    The file's contents.

  Raises:
    ValueError: if ``path`` does not exist or holds no such file.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ValueError(
        f"{path!r} does not exist; pass the .tflite file, a directory containing it, or the "
        "wheel from `pip download --no-deps pyopen-wakeword==1.1.0 -d DIR`.")
  if os.path.isfile(path) and zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      members = [n for n in archive.namelist() if os.path.basename(n) == filename]
      if not members:
        raise ValueError(f"the archive {path!r} has no member named {filename!r}.")
      return archive.read(sorted(members)[0])
  if os.path.isfile(path):
    with open(path, "rb") as f:
      return f.read()
  found = []
  for root, _, files in os.walk(path):
    if filename in files:
      found.append(os.path.join(root, filename))
    found.extend(os.path.join(root, name) for name in files if name.endswith(".whl"))
  direct = sorted(p for p in found if os.path.basename(p) == filename)
  if direct:
    return find_tflite(direct[0], filename)
  for wheel in sorted(p for p in found if p.endswith(".whl")):
    try:
      return find_tflite(wheel, filename)
    except ValueError:
      continue
  raise ValueError(
      f"no {filename!r} (nor a wheel containing it) under the directory {path!r}; fill it with "
      "`pip download --no-deps pyopen-wakeword==1.1.0 -d DIR`.")


def _options_dict(tflite, operator) -> Dict[str, Any]:
  """The operator's builtin options table as a dict of its scalar and vector fields."""
  options_type = operator.BuiltinOptionsType()
  if not options_type:
    return {}
  names = {v: k for k, v in vars(tflite.BuiltinOptions).items() if not k.startswith("_")}
  class_name = names[options_type]
  options_class = getattr(importlib.import_module(f"tflite.{class_name}"), class_name)
  table = operator.BuiltinOptions()
  options = options_class()
  options.Init(table.Bytes, table.Pos)
  result = {}
  for attribute in dir(options):
    if not attribute[:1].isupper() or attribute.startswith(("Init", "GetRoot")):
      continue
    if attribute.endswith(("Length", "IsNone")) or "BufferHasIdentifier" in attribute:
      continue
    try:
      value = getattr(options, attribute)()
    except TypeError:  # Element accessors that need an index; their AsNumpy twin is read instead.
      continue
    if isinstance(value, np.ndarray):
      value = tuple(int(v) for v in value)
    result[attribute.removesuffix("AsNumpy")] = value
  return result


def read_tflite(model: Union[bytes, PathLike]) -> TFLiteGraph:
  """Parses the first subgraph of a ``.tflite`` flatbuffer.

  Args:
    model: the file's bytes (e.g. from :func:`find_tflite`) or the path of a ``.tflite`` file.

  Returns:
    A :class:`TFLiteGraph` whose constant tensors are numpy arrays copied out of the buffer.

  Raises:
    ValueError: if the bytes are not a TFLite model or use a tensor type this reader does not know.
  """
  tflite = _import_tflite_schema()
  if not isinstance(model, (bytes, bytearray)):
    with open(os.fspath(model), "rb") as f:
      model = f.read()
  model = bytes(model)
  if len(model) < 8 or model[4:8] != b"TFL3":
    raise ValueError("not a TensorFlow Lite flatbuffer (the file identifier 'TFL3' is missing).")
  root = tflite.Model.GetRootAsModel(model, 0)
  if root.SubgraphsLength() < 1:
    raise ValueError("the TFLite model has no subgraph.")
  graph = root.Subgraphs(0)
  op_names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}

  tensors = []
  for i in range(graph.TensorsLength()):
    tensor = graph.Tensors(i)
    if tensor.Type() not in _NUMPY_DTYPES:
      raise ValueError(f"tensor {i} has TFLite type code {tensor.Type()}, which is not supported.")
    dtype = _NUMPY_DTYPES[tensor.Type()]
    shape = tuple(int(s) for s in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
    buffer = root.Buffers(tensor.Buffer())
    data = None
    if buffer is not None and buffer.DataLength():
      data = np.frombuffer(buffer.DataAsNumpy().tobytes(), dtype).reshape(shape)
    tensors.append(TFLiteTensor(tensor.Name().decode(), shape, np.dtype(dtype), data))

  operators = []
  for i in range(graph.OperatorsLength()):
    operator = graph.Operators(i)
    code = root.OperatorCodes(operator.OpcodeIndex())
    # Codes above 127 live in BuiltinCode only; older files fill DeprecatedBuiltinCode only.
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    operators.append(
        TFLiteOperator(
            name=op_names.get(builtin, f"CUSTOM_{builtin}"),
            inputs=tuple(int(t) for t in operator.InputsAsNumpy()),
            outputs=tuple(int(t) for t in operator.OutputsAsNumpy()),
            options=_options_dict(tflite, operator),
        ))
  return TFLiteGraph(
      tensors=tuple(tensors),
      operators=tuple(operators),
      inputs=tuple(int(t) for t in graph.InputsAsNumpy()),
      outputs=tuple(int(t) for t in graph.OutputsAsNumpy()),
  )
