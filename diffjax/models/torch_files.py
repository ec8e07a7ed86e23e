"""Reading weight files without torch: `torch.save` archives (zip and legacy formats, TorchScript),
plain pickles of torch modules (NVlabs/edm's network-snapshot-*.pkl) and safetensors.

torch files are pickles; they are read with a restricted unpickler that maps the few torch globals
describing tensors (storages, `_rebuild_tensor_v2`, parameters) to numpy and refuses every other
global, so no code from the file is run. In `load_module_pickle` the classes of pickled modules (EDM's
`torch_utils.persistence` classes, torch.nn containers) become `PickledObject`s: a class name and the
instance's attributes, with no method of the original class. safetensors files are a JSON header and
raw little-endian data, memory-mapped here with numpy.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes  # a jax dependency: numpy's bfloat16
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        if name == "BFloat16Storage":
            self.dtype = np.dtype(ml_dtypes.bfloat16)
        elif name in _STORAGE_DTYPES:
            self.dtype = np.dtype(_STORAGE_DTYPES[name])
        else:
            raise pickle.UnpicklingError(f"unsupported torch storage type torch.{name}")


class _Storage:
    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.array: np.ndarray | None = None


class _TensorRef:
    """A tensor whose storage may not be read yet (legacy files store data after the pickle)."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialize(self) -> np.ndarray:
        flat = self.storage.array
        if not self.size:
            return np.array(flat[self.offset], dtype=self.storage.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
        if last >= flat.size:
            raise ValueError(f"tensor of size {self.size} runs past its storage ({flat.size} elements)")
        if isinstance(flat, np.memmap) and self.stride == _contiguous_strides(self.size):
            # read the bytes rather than copy them out of the map: mapped pages would count as
            # resident memory a second time while the checkpoint is converted
            offset = flat.offset + self.offset * flat.itemsize
            count = int(np.prod(self.size))
            data = np.fromfile(flat.filename, dtype=flat.dtype, count=count, offset=offset)
            return data.reshape(self.size).astype(self.storage.dtype, copy=False)
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.size, strides=[s * flat.itemsize for s in self.stride], writeable=False
        )
        return np.array(view, dtype=self.storage.dtype)


def _contiguous_strides(size: tuple) -> tuple:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


# TorchScript pickles store typed lists and tags through these helpers; they only rebuild plain values.
_JIT_LIST_BUILDERS = {
    "build_intlist": list,
    "build_doublelist": list,
    "build_boollist": list,
    "build_tensorlist": list,
    "restore_type_tag": lambda value, type_str: value,
}


class _ScriptObject:
    """A TorchScript module instance: its attributes, nothing else."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["__state__"] = state


class _Namespace(_ScriptObject):
    """An argparse.Namespace as plain attributes."""


def _reconstruct(cls, base, state):
    """copyreg's default reduction of plain class instances, allowed only for the classes above."""
    if cls is not _Namespace or base is not object:
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r} from {base!r}")
    return _Namespace()


_PLAIN_GLOBALS = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}


class PickledObject:
    """An instance of a class known here by its name only (`class_name`): its attributes (the
    pickled state) as plain data. None of the original class's code exists or runs."""

    class_name = ""

    def __init__(self, class_name: str = "", state: dict | None = None):
        if class_name:
            self.class_name = class_name
        self.__dict__.update(state or {})

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"state of a {self.class_name} is a {type(state).__name__}, not a dict")
        self.__dict__.update(state)

    def __repr__(self):
        return f"PickledObject({self.class_name!r})"


def _reconstruct_persistent(meta):
    """EDM's `torch_utils.persistence._reconstruct_persistent_obj`, without the class's source code
    that the pickle carries (`meta["module_src"]`, never read)."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("malformed torch_utils.persistence object")
    return PickledObject(str(meta["class_name"]), meta["state"])


def _numpy_dtype(name, align=False, copy=False):
    dtype = np.dtype(name)
    if dtype.kind not in "biufc":
        raise pickle.UnpicklingError(f"refusing numpy dtype {dtype} (numbers only)")
    return dtype


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"refusing numpy scalar of dtype {dtype!r} (numbers only)")
    return np.frombuffer(data, dtype)[0]


class _NumericArray(np.ndarray):
    """The array a pickled numpy array is rebuilt into: its dtype must be numeric (a pickled object
    array would unpickle arbitrary objects)."""

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) != 5 or not isinstance(state[2], np.dtype):
            raise pickle.UnpicklingError("malformed numpy array state")
        _numpy_dtype(state[2])
        super().__setstate__(state)


def _numpy_array(subtype, shape, typecode):
    """numpy's `_reconstruct`, for plain ndarrays only; the data arrives in __setstate__."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing numpy array subtype {subtype!r}")
    return np.ndarray.__new__(_NumericArray, shape, np.uint8)


def _storage_from_bytes(data: bytes) -> _Storage:
    """`torch.storage._load_from_bytes`: a storage pickled on its own is a legacy torch.save stream."""
    storage = _read_legacy(io.BytesIO(data), "<pickled storage>", buffer=data)
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a pickled storage holds a {type(storage).__name__}")
    return storage


class _EasyDict(dict):
    """dnnlib.EasyDict as a plain dict."""


_TORCH_CONTAINERS = ("ModuleDict", "ModuleList", "Sequential", "ParameterDict", "ParameterList")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, persistent_load):
        super().__init__(file)
        self._persistent_load = persistent_load

    def persistent_load(self, pid):
        return self._persistent_load(pid)

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch.jit._pickle" and name in _JIT_LIST_BUILDERS:
            return _JIT_LIST_BUILDERS[name]
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module.startswith("__torch__."):
            return type(name, (_ScriptObject,), {"__module__": module})
        if (module, name) == ("argparse", "Namespace"):  # DiT's training checkpoints store their args
            return _Namespace
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstruct
        if (module, name) in _PLAIN_GLOBALS:
            return _PLAIN_GLOBALS[(module, name)]
        return self._module_pickle_global(module, name)

    def _module_pickle_global(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"refusing to unpickle global {module}.{name}: a weight file is read as tensors and plain "
            "data only (no code is run)"
        )


class _ModulePickleUnpickler(_RestrictedUnpickler):
    """Also the globals a plain `pickle.dump` of torch modules uses (storages as nested torch.save
    streams, EDM's persistent classes, torch.nn containers, numpy scalars in init kwargs)."""

    def __init__(self, file):
        super().__init__(file, _no_persistent_ids)

    def _module_pickle_global(self, module: str, name: str):
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return _reconstruct_persistent
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if module == "torch.nn.modules.container" and name in _TORCH_CONTAINERS:
            return type(name, (PickledObject,), {"class_name": name, "__module__": __name__})
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _numpy_scalar
        if (module, name) == ("numpy", "dtype"):
            return _numpy_dtype
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _numpy_array
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("dnnlib.util", "EasyDict"):
            return _EasyDict
        return super()._module_pickle_global(module, name)


def _no_persistent_ids(pid):
    raise pickle.UnpicklingError("unexpected persistent id")


def _materialize(obj: Any) -> Any:
    if isinstance(obj, _TensorRef):
        return obj.materialize()
    if isinstance(obj, _NumericArray):
        return np.array(obj)  # a plain ndarray
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    if isinstance(obj, (_ScriptObject, PickledObject)):
        for k, v in list(obj.__dict__.items()):
            obj.__dict__[k] = _materialize(v)
    return obj


def _zip_member_array(zf: zipfile.ZipFile, path: Path, name: str, dtype: np.dtype) -> np.ndarray:
    """A stored (uncompressed) zip member as a read-only memory map; compressed members are read."""
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        return np.frombuffer(zf.read(name), dtype)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if header[:4] != b"PK\x03\x04":
        raise ValueError(f"{str(path)!r}: corrupt zip member {name}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    offset = info.header_offset + 30 + name_len + extra_len
    count = info.file_size // dtype.itemsize
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def _load_zip(path: Path) -> tuple[Any, bool]:
    """(unpickled object, is_torchscript) from a torch zip archive (torch.save >= 1.6 or TorchScript).

    Storages are memory-mapped (torch writes them uncompressed), so a checkpoint is not held twice:
    each tensor is copied out of the map once."""
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise ValueError(f"{str(path)!r} is a zip but not a torch archive (no unique <dir>/data.pkl)")
        root = pkls[0][: -len("data.pkl")]
        big_endian = f"{root}byteorder" in names and zf.read(f"{root}byteorder").strip() == b"big"
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            if pid[0] != "storage":
                raise pickle.UnpicklingError(f"unknown persistent id {pid[0]!r}")
            _, stype, key, _location, _numel = pid[:5]
            if key not in storages:
                st = _Storage(stype.dtype)
                stored = stype.dtype.newbyteorder(">" if big_endian else "<")
                st.array = _zip_member_array(zf, path, f"{root}data/{key}", stored)
                storages[key] = st
            return storages[key]

        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), persistent_load).load()
        return _materialize(obj), any(n.startswith(f"{root}code/") for n in names)


def _load_legacy(path: Path) -> Any:
    """A torch.save file in the legacy (< 1.6) format: magic, protocol, sys info, pickle, storages."""
    with open(path, "rb") as f:
        return _materialize(_read_legacy(f, str(path)))


def _read_legacy(f, name: str, buffer: bytes | None = None) -> Any:
    """The object of a legacy torch.save stream `f`; with `buffer` (the bytes `f` reads), storages
    are views of it rather than copies (the tensors built on them copy once)."""
    try:
        magic = _RestrictedUnpickler(f, _no_persistent_ids).load()
    except Exception as e:  # noqa: BLE001 - any garbage here means "not a torch file"
        raise ValueError(f"{name!r} is neither a zip nor a legacy torch file: {e}") from e
    if magic != _LEGACY_MAGIC:
        raise ValueError(f"{name!r} is not a torch file (bad magic number)")
    _protocol = _RestrictedUnpickler(f, _no_persistent_ids).load()
    sys_info = _RestrictedUnpickler(f, _no_persistent_ids).load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise ValueError(f"{name!r} was saved on a big-endian machine; not supported")
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        if pid[0] != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {pid[0]!r}")
        _, stype, key, _location, _numel, view = pid
        if view is not None:
            raise pickle.UnpicklingError("storage views in legacy torch files are not supported")
        return storages.setdefault(key, _Storage(stype.dtype))

    obj = _RestrictedUnpickler(f, persistent_load).load()
    keys = _RestrictedUnpickler(f, _no_persistent_ids).load()
    for key in keys:
        st = storages[key]
        (count,) = np.frombuffer(f.read(8), "<i8")
        nbytes = int(count) * st.dtype.itemsize
        if buffer is not None and f.tell() + nbytes <= len(buffer):
            raw = np.frombuffer(buffer, np.uint8, nbytes, offset=f.tell())
            f.seek(nbytes, io.SEEK_CUR)
        else:
            raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise ValueError(f"{name!r} is truncated (storage {key})")
        st.array = np.frombuffer(raw, st.dtype.newbyteorder("<")).astype(st.dtype, copy=False)  # tensors copy it
    return obj


def load_module_pickle(path: str | os.PathLike) -> Any:
    """The object a plain pickle of torch modules holds (NVlabs/edm's network-snapshot-*.pkl: a dict
    with "ema", "loss_fn", ...), read without torch and without running pickled code: tensors become
    numpy arrays, modules `PickledObject`s; any other global is refused with an UnpicklingError
    naming the file and the global."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    with open(path, "rb") as f:
        try:
            obj = _ModulePickleUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{str(path)!r}: {e}") from e
    return _materialize(obj)


def is_module_pickle(path: str | os.PathLike) -> bool:
    """Whether `path` starts like a plain pickle (protocol 2 or later) and not like a legacy torch.save
    file (which is a pickle of its magic number first)."""
    magic = b"\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little")  # LONG1 of the magic number, any protocol
    with open(path, "rb") as f:
        head = f.read(32)
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and magic not in head


def _flatten_module(obj: Any, prefix: str = "") -> dict[str, Any]:
    """TorchScript module tree -> {"net.layers.mixed.conv.weight": array, ...} (arrays and ints)."""
    out: dict[str, Any] = {}
    for k, v in obj.__dict__.items():
        name = f"{prefix}{k}"
        if isinstance(v, _ScriptObject):
            out.update(_flatten_module(v, name + "."))
        elif isinstance(v, (np.ndarray, int, list, tuple)) and not isinstance(v, bool):
            out[name] = v
    return out


def load_torch_object(path: str | os.PathLike) -> Any:
    """The object a `torch.save` file holds (zip or legacy format), read without torch and without
    running pickled code: tensors become numpy arrays, containers stay dicts/lists/tuples, an
    argparse.Namespace becomes an object with its attributes; anything else is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    if zipfile.is_zipfile(path):
        obj, is_script = _load_zip(path)
        if is_script:
            raise ValueError(f"{str(path)!r} is a TorchScript archive, not a torch.save file")
        return obj
    return _load_legacy(path)


def read_torch_file(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """Read a torch file without torch: (flat {name: numpy array or int}, kind).

    kind is "torchscript" (module attributes, dotted names) or "state_dict".
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        obj, is_script = _load_zip(path)
    else:
        obj, is_script = _load_legacy(path), False
    if is_script or isinstance(obj, _ScriptObject):
        if not isinstance(obj, _ScriptObject):
            raise ValueError(f"{str(path)!r}: TorchScript archive without a module object")
        return _flatten_module(obj), "torchscript"
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict or TorchScript module")
    return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}, "state_dict"


# ----------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}


def read_safetensors(path: str | os.PathLike, *, copy: bool = True) -> dict[str, np.ndarray]:
    """{name: array} of a safetensors file (8-byte header length, JSON header, raw data), via a
    memory map; copy=False returns read-only views of the map."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file (header length {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{str(path)!r} is not a safetensors file (bad JSON header: {e})") from e
    start = 8 + n
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start) if size > start else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{str(path)!r}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        lo, hi = info["data_offsets"]
        shape = tuple(info["shape"])
        if hi - lo != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or hi > data.size:
            raise ValueError(f"{str(path)!r}: tensor {name!r} has inconsistent offsets {lo}..{hi} for {shape}")
        arr = data[lo:hi].view(dtype).reshape(shape)
        out[name] = np.array(arr) if copy else arr
    return out


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: array} from a safetensors file or a torch.save'd state dict (by content, not suffix)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    if is_safetensors(path):
        return read_safetensors(path)
    flat, kind = read_torch_file(path)
    if kind != "state_dict":
        raise ValueError(f"{str(path)!r} is a TorchScript archive, not a state dict")
    return flat


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether `path` starts like a safetensors file (a header length, then a JSON object)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= Path(path).stat().st_size - 8
