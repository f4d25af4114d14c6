"""Nothing a resume, an export or an eval reads executes code (issue 27).

A pickle can call any function it names: a crafted ``data_state_0.pt`` read with ``torch.load(weights_only=False)``
ran ``os.system``. So every pickle in a checkpoint is read in one of two ways, each with an explicit allow-list of
the globals (classes, functions) that the file may name:

- **torch files** (``*.pt``, ``*.bin``, ``*.pkl``: the data state, accelerate's optimizer, scheduler and RNG states,
  DeepSpeed's ZeRO shards) with ``torch.load(weights_only=True)``, torch's own restricted unpickler. The project
  reads its files through :func:`load`; accelerate, DeepSpeed (``engine.load_checkpoint``, ``zero_to_fp32``) and
  torch's DCP read theirs inside :func:`weights_only_loads`, which sets torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
  (read by ``torch.load`` on every call, and stronger than a caller's ``weights_only=False``: accelerate's
  ``load_custom_state`` and DeepSpeed's ``TorchCheckpointEngine.load`` pass that).
- **DCP metadata** (``.metadata`` of an FSDP sharded checkpoint, a plain pickle that torch's ``FileSystemReader``
  reads with ``pickle.load``) with a ``pickle.Unpickler`` whose ``find_class`` knows only DCP's metadata classes
  (the "restricting globals" pattern of the ``pickle`` documentation), in :func:`audit`, before torch reads it.

:func:`audit` reads every pickle of a checkpoint that way before anything is loaded from it (on the main process
when the resume chooses it, or at its load when it came another way, the Hub; before ``hf-streamlm export``/``eval``
read ZeRO or FSDP shards): a file that names anything else is refused in one line that names it, for every rank at
once (the main process's verdict is shared), where a refusal in the middle of ``load_state`` would
leave the other ranks waiting in DeepSpeed's collectives, and accelerate would swallow it for the RNG states
(``load_accelerator_state``: "Could not load random states", and the resume would go on, no longer exact).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_streamlm.config import ConfigError

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
UNFORCE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # set by a user, it would make torch refuse both (RuntimeError)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
DCP_METADATA = ".metadata"
PICKLED = (*TORCH_SUFFIXES, ".distcp")  # .distcp: DCP's, its non-tensor items pickled (read through .metadata)


def numpy_globals() -> list:
    """What a pickled numpy array names: accelerate's own allow-list for its RNG states
    (``accelerate.utils.other.TORCH_SAFE_GLOBALS``), with the name numpy 1.x wrote ``_reconstruct`` under."""
    core = np._core if hasattr(np, "_core") else np.core
    # A dtype is rebuilt as an instance of its class (numpy >= 1.25): every class of numbers, strings and records,
    # not ObjectDType (arrays of Python objects).
    kinds = [t for t in vars(np.dtypes).values() if isinstance(t, type) and issubclass(t, np.dtype)
             and t is not np.dtypes.ObjectDType]
    names = [core.multiarray._reconstruct, np.ndarray, np.dtype, *kinds]
    return [*names, (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]


def data_state_globals() -> list:
    """``data_state_<rank>.pt`` (``loader.state_dict()``): numpy arrays, and ``bytes``, which pickle protocol 2 (the one
    ``torch.save`` writes) names for an empty one's data; ``bytes(...)`` makes a byte string, nothing else."""
    return [*numpy_globals(), bytes]


def deepspeed_globals() -> list:
    """What DeepSpeed 0.19's ZeRO-2/3 optimizer shards name besides tensors (``zero_pp_rank_*_optim_states.pt``, read
    in ``engine.load_checkpoint`` and ``zero_to_fp32``): the ZeRO stage, the loss scaler (static in fp32/bf16,
    dynamic in fp16) and the address of each parameter's fragment: an enum and plain records."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError as e:
        raise ConfigError("a checkpoint written by DeepSpeed (ZeRO shards in pytorch_model/) is read with DeepSpeed's "
                          "classes: pip install 'hf_streamlm[deepspeed]'") from e

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def allowed_globals(file: Path) -> list:
    """The allow-list for one torch file of a checkpoint, by its name."""
    if file.name.startswith("data_state_"):
        return data_state_globals()
    if file.parent.name == "pytorch_model" and file.suffix == ".pt":  # hf_streamlm.train.zero.CHECKPOINT_TAG
        return [*numpy_globals(), *deepspeed_globals()]
    return numpy_globals()  # accelerate's files: optimizer, scheduler (custom_checkpoint_N.pkl), RNG, scaler


def checkpoint_globals(path: Path) -> list:
    """Every torch file of checkpoint ``path`` may name these (:func:`weights_only_loads` around accelerate's
    ``load_state`` and the weights' readers); DeepSpeed is imported only for a checkpoint that holds its shards."""
    deepspeed = any(Path(path).glob("pytorch_model/*.pt"))
    return [*data_state_globals(), *(deepspeed_globals() if deepspeed else [])]


def load(file: Path, allow: list | None = None, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(file, weights_only=True)`` with ``allow`` (default: by the file's name) allowed; a file that names
    anything else is refused with a one-line :class:`ConfigError` naming it."""
    file = Path(file)
    try:
        with torch.serialization.safe_globals(allowed_globals(file) if allow is None else allow):
            return torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise ConfigError(refusal(file, err)) from None


@contextmanager
def weights_only_loads(allow: list) -> Iterator[None]:
    """Inside: every ``torch.load`` in this process reads with ``weights_only=True``, whatever its caller passes,
    allowing torch's own globals and ``allow``; for libraries that ask for ``weights_only=False`` (accelerate's
    custom state, DeepSpeed's checkpoint engine and ``zero_to_fp32``). Process-wide while it lasts (an environment
    variable): it is held around a resume's ``load_state`` and an export's read of the weights, nothing else runs
    then. A refusal that :func:`audit` did not see first (a file changed meanwhile) ends in a one-line error."""
    saved = {name: os.environ.pop(name, None) for name in (FORCE, UNFORCE)}
    os.environ[FORCE] = "1"
    try:
        with torch.serialization.safe_globals(allow):
            yield
    except pickle.UnpicklingError as err:
        raise ConfigError(refusal(None, err)) from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def refusal(file: Path | None, err: Exception) -> str:
    """One line: which file, what it would have needed, what to do."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    named = [name for pattern in (r"GLOBAL (\S+) (?:was not an allowed global|whose module)", r"global '([^']+)'",
                                  r"but got <class '([^']+)'>")
             for name in re.findall(pattern, message)]
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line.startswith("Check the documentation")]
    where = f"checkpoint file {file}" if file else "a checkpoint file"
    if named:
        why = (f"it names {', '.join(dict.fromkeys(named))}, which a checkpoint of hf_streamlm, accelerate or DeepSpeed "
               "never holds (unpickling it could run code)")
    else:  # an opcode torch's reader does not take, a file cut short, not a torch file
        why = f"it cannot be read as a weights-only pickle ({lines[-1][:200] if lines else type(err).__name__})"
    return f"{where} refused: {why}; use a checkpoint you trust, or start a new runtime.output_dir"


# --------------------------------------------------------------------------------------------------
# Reading every pickle of a checkpoint before anything is loaded from it
# --------------------------------------------------------------------------------------------------


_audited: set[tuple] = set()  # checkpoints (and their files' sizes and times) this process has audited already


def audit(path: Path) -> None:
    """Read every pickle of checkpoint ``path`` the restricted way (torch files memory-mapped: their tensors are not
    read), and refuse the checkpoint in one line naming the first file that names a global outside its allow-list.
    Once per process for a checkpoint whose pickles keep their sizes and modification times (the resume's choice,
    then its load)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and (p.name == DCP_METADATA or p.suffix in PICKLED))
    seen = (path.resolve(), *((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if seen in _audited:
        return
    for file in files:
        if file.name == DCP_METADATA:
            metadata = dcp_metadata(file)
            distcp_items(file.parent, metadata)
        elif file.suffix in TORCH_SUFFIXES:
            try:
                load(file, mmap=zipfile.is_zipfile(file))  # mmap needs torch's zip format
            except ConfigError:
                raise
            except (RuntimeError, OSError, EOFError, ValueError, KeyError) as err:  # not a torch file, TorchScript, cut short
                raise ConfigError(refusal(file, err)) from None
    _audited.add(seen)


def audit_refusal(path: Path) -> str | None:
    """:func:`audit`'s refusal as a value (to share from the main process), or None."""
    try:
        audit(path)
    except ConfigError as err:
        return str(err)
    return None


def dcp_globals() -> dict[tuple[str, str], Any]:
    """What torch's DCP metadata (``Metadata``, pickled by ``FileSystemWriter``) names: its records, torch's sizes,
    dtypes and layouts, and paths."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    objects = [metadata.Metadata, metadata.TensorStorageMetadata, metadata.BytesStorageMetadata,
               metadata.ChunkStorageMetadata, metadata.TensorProperties, metadata.MetadataIndex, metadata.StorageMeta,
               metadata._MEM_FORMAT_ENCODING, filesystem._StorageInfo, torch.Size, torch.serialization._get_layout,
               pathlib.PurePosixPath, pathlib.PosixPath, pathlib.PureWindowsPath, pathlib.WindowsPath, OrderedDict]
    allowed = {(o.__module__, o.__qualname__): o for o in objects}
    allowed.update({("torch", name): getattr(torch, name) for name in dir(torch)
                    if isinstance(getattr(torch, name, None), torch.dtype)})
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed: dict[tuple[str, str], Any]):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return self.allowed[(module, name)]


def dcp_metadata(file: Path):
    """DCP's ``.metadata`` read with only :func:`dcp_globals` allowed."""
    try:
        with open(file, "rb") as f:
            return _RestrictedUnpickler(f, dcp_globals()).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as err:
        raise ConfigError(refusal(file, err)) from None


def distcp_items(folder: Path, metadata) -> None:
    """The non-tensor items of a DCP checkpoint (``BytesStorageMetadata``: an optimizer's hyperparameters, each
    ``torch.save``d into a ``.distcp`` file, which DCP's load planner reads with ``torch.load``), read the restricted
    way."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    storage = getattr(metadata, "storage_data", None) or {}
    for index, info in storage.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        if getattr(info, "transform_descriptors", None):  # compressed (DCP extensions): read by the forced load only
            continue
        file = folder / info.relative_path
        try:
            with open(file, "rb") as f:
                f.seek(info.offset)
                item = io.BytesIO(f.read(info.length))
            with torch.serialization.safe_globals(numpy_globals()):
                torch.load(item, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
            raise ConfigError(refusal(file, err)) from None
