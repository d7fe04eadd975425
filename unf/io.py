"""Reading and writing state_dicts: safetensors (no pickle), atomic writes, clear errors; model factories by
reference (``file.py:name``, ``module:name``)."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Union

import torch

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write) -> None:
    """Call ``write(tmp_path)`` and move the result into place, so ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_factory(ref: str, kind: str = "model") -> Callable:
    """``path/to/file.py:name`` or ``package.module:name`` -> the callable ``name`` (a model factory, e.g. a zoo
    manifest's ``info.architecture``). Raises ``ValueError`` saying what is wrong with ``ref``; ``kind`` names what
    the callable makes, in those messages."""
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"{kind} reference {ref!r} must look like 'file.py:factory' or 'package.module:factory'")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"{kind} file {str(path)!r} does not exist")
        name = f"unf_user_model_{abs(hash(str(path.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module  # dataclasses, pickling and tracing look modules up by name
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ValueError(f"{kind} file {str(path)!r} failed to import ({type(e).__name__}: {e})") from e
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"{kind} module {target!r} cannot be imported ({e})") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        names = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise ValueError(f"{target!r} has no callable {attr!r}; available: {', '.join(names)}")
    return factory


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: PathLike) -> None:
    """Save as safetensors (tied tensors are stored once per key; contiguous CPU copies)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def load_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file, or a ``.pt``/``.pth`` checkpoint with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {str(path)!r} could not be read ({type(e).__name__}: {e}); expected a "
                         ".safetensors file or a torch state_dict saved with torch.save") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {str(path)!r} does not hold a state_dict (name -> tensor)")
    return obj
