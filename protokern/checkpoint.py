"""Checkpoint files: safe loading and atomic writing (a support module: it knows files, not models).

Used by the trainer (``protokern.train``), explanations (``protokern.explain``, whose ``model_from_checkpoint``
rebuilds a model) and push records. A checkpoint
holds only tensors and plain values (dicts, lists, tuples, str, int, float, bool, None, torch dtypes and
devices), so it is always read with ``torch.load(weights_only=True)``: a file holding anything else (a pickled
object whose loading could run code) is refused with :class:`CheckpointError` before any of it is built.
Checkpoints of the first format (NumPy RNG state stored as a NumPy array) still load: the three NumPy globals
that an array needs are allowed for them, and nothing else.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
import warnings
import zipfile
from collections import OrderedDict

import numpy as np
import torch

from protokern.utils import first_line

__all__ = ["BEST", "CheckpointError", "EXPLANATIONS_DIR", "FORMAT", "GALLERY_DIR", "INTERPRETABILITY_FILE",
           "INTERRUPTED", "LAST", "PART_LOCALISATION_FILE", "PRUNED", "PUSH_DIR", "atomic_save", "atomic_write_text",
           "check_safe_types", "find_checkpoint", "load_checkpoint", "nonfinite_tensors",
           "safe_load", "save_checkpoint"]

# A run folder's layout (``python -m protokern.train`` writes it; push, the explanations and the trainer find
# their files by these names): checkpoints, then push's folders (PUSH_DIR/epoch_NNN) and the explanations'.
LAST, BEST, INTERRUPTED, PRUNED = "last.pt", "best.pt", "interrupted.pt", "pruned.pt"
PUSH_DIR, EXPLANATIONS_DIR, GALLERY_DIR = "push", "explanations", "gallery"
PART_LOCALISATION_FILE, INTERPRETABILITY_FILE = "part_localisation.json", "interpretability.json"
FORMAT = 2  # 1: NumPy RNG state as a NumPy array (needs an allowlist); 2: tensors and plain values only

# exact types: a subclass (NumPy's float64 and str_, a defaultdict) passes isinstance but not weights_only loading
_PLAIN = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)
# what a format-1 checkpoint needs beyond tensors and plain values: NumPy's uint32 RNG key array
_NUMPY_ARRAY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
try:  # NumPy 2 names it numpy._core.multiarray._reconstruct, NumPy 1 numpy.core.multiarray._reconstruct
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - NumPy 1
    from numpy.core.multiarray import _reconstruct
_NUMPY_ARRAY_GLOBALS.append(_reconstruct)
_NUMPY_ARRAY_NAMES = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
                      "numpy.dtype", "numpy.dtypes.UInt32DType"}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing pieces, corrupt, unsafe, or not a checkpoint."""


# ------------------------------------------------------------------------------------------------ writing
def _umask() -> int:
    """The process's umask: read from /proc/self/status (Linux), else set to 0 and restored at once (os.umask is
    the only other way to read it; it is process-global: a file another thread creates meanwhile gets no umask)."""
    try:
        with open("/proc/self/status", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write, mode: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: give it the mode open() would
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
            kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else \
                f"no {os.path.basename(path)} was written"
            reason = "disk full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
            raise OSError(error.errno, f"could not write {path} ({reason}); {kept}") from error
        raise


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: readers never see a
    partial file, and an interrupted or failed write (disk full: an ``OSError`` naming ``path``) leaves the
    previous file intact."""
    _atomic_write(path, lambda fh: torch.save(obj, fh), "wb")


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`atomic_save`."""
    _atomic_write(path, lambda fh: fh.write(text), "w")


def check_safe_types(obj, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` naming the first value of ``obj`` that ``torch.load(weights_only=True)`` would
    refuse (anything but tensors, str, int, float, bool, None, torch dtypes / devices / sizes, and dicts,
    lists and tuples of those)."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; checkpoints take str / int keys")
            check_safe_types(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_safe_types(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds only "
                    "tensors and plain values (weights_only loading refuses anything else)")


def nonfinite_tensors(obj, where: str = "") -> list[str]:
    """Paths (``[key][i]...``) of the floating-point tensors in ``obj`` holding NaN or +-inf."""
    if isinstance(obj, torch.Tensor):
        bad = obj.is_floating_point() and not bool(torch.isfinite(obj).all())
        return [where or "tensor"] if bad else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [path for key, value in items for path in nonfinite_tensors(value, f"{where}[{key!r}]")]


def save_checkpoint(state: dict, path: str) -> None:
    """Check that ``state`` holds only safe types (:func:`check_safe_types`), mark it with :data:`FORMAT` and
    write it atomically (:func:`atomic_save`)."""
    check_safe_types(state)
    atomic_save({**state, "format": FORMAT}, path)


# ------------------------------------------------------------------------------------------------ reading
def find_checkpoint(path: str, default: str = LAST) -> str:
    """``path`` if it is a file, else ``path/<default>``; raise ``FileNotFoundError`` if missing."""
    candidate = os.path.join(path, default) if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise FileNotFoundError(f"no checkpoint at {candidate}")
    return candidate


def _unsafe_globals(path: str) -> list[str] | None:
    """The globals a zip checkpoint's pickle names beyond the weights_only allowlist (read, never run)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint, or unreadable: treated as unknown
        return None


def safe_load(path: str, map_location="cpu", what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` with one-line errors (:class:`CheckpointError`) for empty,
    truncated, corrupt and unsafe files. Format-1 checkpoints (a NumPy array inside) load with NumPy's array
    globals allowed, nothing more."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} at {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty, not a {what} (a write that never finished?)")
    _check_crc(path, what)
    try:
        with warnings.catch_warnings():  # torch's note on a raw pickle's protocol: the error below says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):  # torch.save: a zip, or a pickle
            raise CheckpointError(f"{path} is not a {what}: neither torch.save's zip nor its pickle format (it "
                                  f"starts with {head!r}: a text file?)") from None
        unsafe = _unsafe_globals(path)
        if unsafe and set(unsafe) <= _NUMPY_ARRAY_NAMES:  # format 1: NumPy RNG state
            try:
                with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as numpy_error:  # an array of another dtype (its class is not listed)
                error, unsafe = numpy_error, None
        detail = f"it names {', '.join(unsafe)}" if unsafe else _weights_only_reason(error)
        raise CheckpointError(f"refused to load {path}: not a weights-only {what} ({detail}); protokern loads only "
                              "files of tensors and plain values, since unpickling anything else can run code. "
                              "Re-save the tensors of a file you trust with torch.save") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as error:  # noqa: BLE001 - torch.load fails in many ways on a damaged file
        first = first_line(error).split(". ")[0][:200]
        raise CheckpointError(f"{path} is not a readable {what} (truncated or corrupt?): "
                              f"{type(error).__name__}: {first}") from None


def _check_crc(path: str, what: str) -> None:
    """A ``CheckpointError`` naming the damaged member of a zip checkpoint (torch.save's format) whose data does
    not match its CRC-32: torch.load does not check them, and a flipped byte in a tensor loads silently. Members
    stored without one (CRC 0: ``torch.serialization.set_crc32_options(False)``) are not checked."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return  # not a (readable) zip: a raw pickle, or a damaged file that torch.load reports
    with archive:
        for member in archive.infolist():
            if member.CRC == 0:
                continue
            try:
                with archive.open(member) as fh:  # reading to the end checks the CRC
                    while fh.read(1 << 24):
                        pass
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
                why = "does not match its checksum" if "CRC" in str(error) else f"unreadable: {first_line(error)}"
                raise CheckpointError(f"{path} is not a readable {what} (corrupt: {member.filename} {why})") from None


def _weights_only_reason(error: Exception) -> str:
    """The weights-only unpickler's reason, from its long message."""
    text = str(error)
    reason = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__).split(" Please use")[0][:200]


def load_checkpoint(path: str, map_location="cpu", default: str = LAST) -> dict:
    """Load a protokern checkpoint (a run folder means ``folder/<default>``) safely (:func:`safe_load`);
    raise :class:`CheckpointError` if it is not one."""
    path = find_checkpoint(path, default)
    state = safe_load(path, map_location)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path} is not a protokern training checkpoint (no 'model' and 'step' entries)")
    if state.get("format", 1) > FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {state['format']}, newer than this protokern "
                              f"({FORMAT}): upgrade protokern")
    return state
