"""Reading and writing state_dicts: safetensors (no pickle), atomic writes, clear errors."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Union

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
