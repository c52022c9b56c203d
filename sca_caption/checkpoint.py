"""Training checkpoints: one torch file, written atomically, loadable with ``weights_only=True``.

The file holds a dict of tensors and plain values only (dict, list, tuple, str, int, float, bool,
None), so ``torch.load(path, weights_only=True)`` reads it without running pickled code:

    format         "sca-caption-checkpoint/2"
    model          the model's state dict (its ``encoder.prefix_fingerprint`` names the features it reads)
    optimizer      the optimizer's state dict
    epoch, step    the epoch in progress (0-based) and the optimizer steps taken so far
                   (the learning rate is a function of the step: no scheduler state)
    data_order     (N,) int64: the order in which this epoch visits the training samples
    data_position  how many entries of ``data_order`` have been trained on
    rng            ``capture_rng_state()``: Python, NumPy, torch CPU and CUDA generator states
    config         the experiment config as a plain nested dict (the model's backbone and layers included)
    vocab          the vocabulary's words in id order
    extra          trainer bookkeeping in plain values (best score, epochs without improvement, ...)
    checksum       SHA-256 of everything above (``_checksum``), checked on loading; files saved
                   before it was recorded have none and load without the check

Everything loads on the CPU (the trainer moves the model and optimizer; the RNG states must stay
there). ``load_checkpoint`` refuses a file whose contents differ from its checksum (a flipped
byte), model weights that are not finite (NaN or infinity), and a file made for another vocabulary or config with a one-line
``CheckpointError`` that names the file and every differing key; ``load_captioner`` is the one way
to rebuild a trained model from a file.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from sca_caption.config import ExperimentConfig, recorded
from sca_caption.data.errors import DataError
from sca_caption.data.input_files import open_regular
from sca_caption.data.vocab import Vocab
from sca_caption.io_utils import FileKind, atomic_write
from sca_caption.models.backbones import BackbonePrefix, build_backbone
from sca_caption.models.captioner import SCACaptioner
from sca_caption.models.errors import ModelConfigError
from sca_caption.errors import SCACaptionError, first_line

FORMAT = "sca-caption-checkpoint/2"
PLAIN_SCALARS = (str, int, float, bool, type(None), torch.dtype, torch.device)


class CheckpointError(SCACaptionError):
    """A checkpoint that cannot be written, read, or used for this run; the message is one line."""


@dataclass
class Checkpoint:
    """Everything needed to resume training, or to rebuild the model for captioning."""

    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    epoch: int
    step: int
    data_order: Tensor
    data_position: int
    rng: dict[str, Any]
    config: dict[str, Any]
    vocab: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically: after a crash, ``path`` holds the previous file;
    a failed write (a full disk) is one ``OutputError`` line and leaves no temporary file."""
    payload: dict[str, Any] = {"format": FORMAT}
    payload.update({f.name: getattr(checkpoint, f.name) for f in fields(checkpoint)})
    payload["vocab"] = list(checkpoint.vocab)
    _require_plain(payload, path, "checkpoint")
    payload["checksum"] = _checksum(payload)
    with atomic_write(path, "wb") as handle:
        try:
            torch.save(payload, handle)
        except RuntimeError as error:  # torch reports a failed write (a full disk) as its own RuntimeError
            if isinstance(error.__context__, OSError):
                raise error.__context__ from None  # atomic_write: one line, the old file kept
            raise


def load_checkpoint(
    path: str | Path,
    *,
    expect_config: Mapping[str, Any] | None = None,
    expect_vocab: Sequence[str] | None = None,
) -> Checkpoint:
    """Read a checkpoint onto the CPU and check it is the one this run expects.

    ``expect_config`` may be partial (e.g. ``{"model": {...}}``): every value in it must equal the
    checkpoint's config (read by ``config.recorded``) at the same key. Each mismatch, corrupt or
    foreign file is a one-line ``CheckpointError`` naming the file.
    """
    payload = _verified(Path(path), _read(Path(path)))
    if not isinstance(payload["config"], Mapping):
        raise CheckpointError(f"{path}: its config is {type(payload['config']).__name__}, not a mapping of sections")
    payload["config"] = recorded(payload["config"])  # keys added since it was written, as the run had them
    differences = []
    if expect_vocab is not None and list(expect_vocab) != payload["vocab"]:
        differences.append(_vocab_difference(payload["vocab"], list(expect_vocab)))
    if expect_config is not None:
        differences += _config_differences(payload["config"], expect_config)
    if differences:
        raise CheckpointError(f"{path}: checkpoint does not match this run: " + "; ".join(differences))
    return Checkpoint(**{f.name: payload[f.name] for f in fields(Checkpoint)})


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's ``random``, NumPy's global generator and torch's CPU and CUDA
    generators, as tensors and plain values."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Undo ``capture_rng_state``. CUDA states are restored when as many CUDA devices are visible
    as were captured; otherwise they are left alone (a run moved to other hardware cannot repeat
    its random draws anyway)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


def _read(path: Path) -> dict[str, Any]:
    """The checkpoint's dict on the CPU, checked for format and keys."""
    try:
        handle = open_regular(path, "checkpoint file")  # a FIFO would block torch.load forever
    except DataError as error:
        raise CheckpointError(str(error)) from None
    try:
        with handle:
            payload = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # its text advises weights_only=False: never repeat that
        if "Unsupported global" in str(error):
            raise CheckpointError(
                f"{path}: not a checkpoint this project can load safely (it holds pickled Python objects, "
                "not only tensors and plain values)"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?)") from None
    except Exception as error:  # torch raises RuntimeError, EOFError, ... here
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {first_line(error)}") from None
    found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
    if isinstance(found, str) and found.startswith(FORMAT.rsplit("/", 1)[0] + "/") and found != FORMAT:
        raise CheckpointError(f"{path}: a checkpoint of another sca-caption version ({found!r}; this one reads {FORMAT!r})")
    if found != FORMAT:
        raise CheckpointError(f"{path}: not an sca-caption checkpoint (expected format {FORMAT!r}, found {found!r})")
    missing = [f.name for f in fields(Checkpoint) if f.name not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return payload


def _verified(path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` less its checksum, which it matches, with model weights that are all finite."""
    stored = payload.pop("checksum", None)
    if stored is not None and stored != _checksum(payload):
        raise CheckpointError(f"{path}: its contents do not match the checksum saved with them (corrupted on disk or in a copy?)")
    if not isinstance(payload["model"], Mapping):
        raise CheckpointError(f"{path}: its model is {type(payload['model']).__name__}, not a mapping of tensors")
    for name, tensor in payload["model"].items():
        if isinstance(tensor, Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: model weight {name} holds NaN or infinite values; a model cannot be used from it")
    return payload


def _is_checkpoint_file(path: Path) -> bool:
    """Whether ``path`` is an sca-caption checkpoint (of this format, sound or not)."""
    try:
        _read(path)
    except CheckpointError:
        return False
    return True


CHECKPOINT_FILE = FileKind("an sca-caption checkpoint", _is_checkpoint_file)


def _checksum(payload: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint's dict: every key, plain value, and tensor's dtype, shape and
    bytes, in order."""
    digest = hashlib.sha256()

    def add(value: Any) -> None:
        if isinstance(value, Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{flat.dtype}{tuple(value.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
        elif isinstance(value, Mapping):
            digest.update(f"D{len(value)}".encode())
            for key, item in value.items():
                add(key)
                add(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                add(item)
        else:
            digest.update(f"V{type(value).__name__}:{value!r};".encode())

    add(payload)
    return digest.hexdigest()


def _require_plain(value: Any, path: str | Path, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would not read back, and dict keys other
    than str and int (which keep the file's contents easy to inspect and compare)."""
    if isinstance(value, (Tensor, *PLAIN_SCALARS)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{path}: cannot save {where}: key {key!r} is {type(key).__name__}, not str or int")
            _require_plain(item, path, f"{where}.{key}")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _require_plain(item, path, f"{where}[{index}]")
        return
    raise CheckpointError(
        f"{path}: cannot save {where}: a {type(value).__name__} is not a tensor or plain value "
        "(weights_only loading would refuse it); convert it to a dict or list first"
    )


def _vocab_difference(there: list[str], here: list[str]) -> str:
    first = next((i for i, (a, b) in enumerate(zip(there, here)) if a != b), min(len(there), len(here)))

    def word(words: list[str]) -> str:
        return repr(words[first]) if first < len(words) else "nothing"

    return (
        f"vocabulary differs ({len(there)} words there, {len(here)} here; "
        f"first difference at id {first}: {word(there)} there, {word(here)} here)"
    )


def _config_differences(there: Any, here: Any, prefix: str = "") -> list[str]:
    """'<key> is X there, Y here' for each leaf of ``here`` that differs in ``there``."""
    if isinstance(here, Mapping):
        if not isinstance(there, Mapping):
            return [f"{prefix} is {_short(there)} there, a mapping here"]
        differences = []
        for key, value in here.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in there:
                differences.append(f"{name} is absent there, {_short(value)} here")
            else:
                differences += _config_differences(there[key], value, name)
        return differences
    if _as_lists(there) != _as_lists(here):
        return [f"{prefix} is {_short(there)} there, {_short(here)} here"]
    return []


def _as_lists(value: Any) -> Any:
    """Tuples as lists, recursively, so (a, b) from a dataclass equals [a, b] from a file."""
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(_as_lists(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."



def load_captioner(path: str | Path, device: str | torch.device = "cpu") -> tuple[SCACaptioner, Vocab, ExperimentConfig]:
    """The trained captioner of a checkpoint file (eval mode, on ``device``), its vocabulary and
    its experiment config: the one way ``evaluate``, ``caption`` and the trainer's test scoring
    rebuild a model (``captioner_from``). Every problem is a one-line ``CheckpointError``."""
    return captioner_from(load_checkpoint(path), path, device)


def captioner_from(
    checkpoint: Checkpoint, source: str | Path, device: str | torch.device = "cpu"
) -> tuple[SCACaptioner, Vocab, ExperimentConfig]:
    """``load_captioner`` of a checkpoint in memory (``source`` names it in errors). The backbone
    stages inside the model come with the checkpoint, so the backbone is built without weights."""
    try:
        config = ExperimentConfig.from_dict(checkpoint.config, source=str(source))
        vocab = Vocab(checkpoint.vocab)
        model = SCACaptioner(config.model, len(vocab), build_backbone(config.model.backbone, weights=None))
    except (DataError, ModelConfigError, ValueError, TypeError) as err:  # a config or backbone this version lacks
        raise CheckpointError(f"{source}: {err}") from None
    try:
        model.load_state_dict(checkpoint.model)
    except RuntimeError as err:  # missing, unexpected or misshapen tensors
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise CheckpointError(f"{source}: model weights do not fit its config ({first[:200]})") from None
    return model.eval().to(device), vocab, config


def check_backbone_matches(path: str | Path, model: SCACaptioner, prefix: BackbonePrefix, weights: str) -> None:
    """Refuse a backbone prefix that computes other features than the model was trained on
    (``weights``: what the prefix was built with, named in the message)."""
    if model.encoder.features_fingerprint != prefix.fingerprint():
        raise CheckpointError(
            f"{path}: {model.config.backbone} with weights {weights!r} is not the backbone its features came from; "
            "pass the weights its feature cache was built with (or, for a checkpoint of an older sca-caption, "
            "`python -m sca_caption.export` it: export checks the backbone against the feature cache)"
        )
