"""`draftflow ingest --from DIR`: publish existing feature files into a store.

Two input formats, recognised per file:
- DraftFlow sample files (`*.safetensors`, e.g. another store's `samples/`): the
  four features by name (FP8 ones with their scales), re-checksummed as they are put
  into the new store.
- SpecForge offline features (`*.ckpt`): a dict with `input_ids`, `loss_mask`,
  `hidden_state` (the target's final hidden state, the lm_head input) and
  `aux_hidden_state` ([T, 3H]), leading batch dims of 1 allowed. Loaded with
  `torch.load(weights_only=True)`, which refuses to unpickle arbitrary objects.

Hidden features are stored in features.dtype whatever the file holds (FP8 files are
decoded, FP8 stores encode). Files are taken in sorted name order, which fixes the sample indices. Ingest is
the producer role without a target: the same manifest, provenance and signing.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from draftflow.features_codec import decode_features, encode_features
from draftflow.records import FEATURE_NAMES
from draftflow.stores.base import StoreError
from draftflow.stores.sample_file import read_sample_file

log = logging.getLogger("draftflow.ingest")

SPECFORGE_KEYS = {"input_ids": "input_ids", "loss_mask": "loss_mask", "aux_hidden_state": "aux_hidden",
                  "hidden_state": "last_hidden"}


def list_feature_files(src: Path) -> list[Path]:
    if not src.is_dir():
        raise ValueError(f"--from {src}: no such folder")
    files = sorted(p for p in src.rglob("*") if p.suffix in (".safetensors", ".ckpt") and p.is_file()
                   and not p.name.startswith("."))
    if not files:
        raise ValueError(f"--from {src}: no *.safetensors or *.ckpt feature files found")
    return files


def _squeeze_batch(t: torch.Tensor, dims: int, path: Path, name: str) -> torch.Tensor:
    while t.dim() > dims and t.shape[0] == 1:
        t = t[0]
    if t.dim() != dims:
        raise ValueError(f"{path}: {name!r} has shape {list(t.shape)}, expected {dims} dimension(s)")
    return t


def read_feature_file(path: Path, feature_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The four features of one file, validated and in DraftFlow's dtypes."""
    if path.suffix == ".ckpt":
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: refused to load: it holds objects other than tensors and plain "
                             f"containers ({str(e).splitlines()[0]})") from None
        except Exception as e:
            raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a dict of tensors, found {type(raw).__name__}")
        missing = [k for k in SPECFORGE_KEYS if k not in raw]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; a SpecForge feature file has "
                             f"{sorted(SPECFORGE_KEYS)}")
        feats = {ours: raw[theirs] for theirs, ours in SPECFORGE_KEYS.items()}
    else:
        try:
            feats, _ = read_sample_file(path)
        except StoreError as e:
            raise ValueError(str(e)) from None
        missing = [k for k in FEATURE_NAMES if k not in feats]
        if missing:
            raise ValueError(f"{path}: missing feature(s) {missing}; expected {list(FEATURE_NAMES)}")
        feats = decode_features(feats, torch.float32, str(path))  # a file of an FP8 store
    for name, t in feats.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: {name!r} is a {type(t).__name__}, expected a tensor")
    ids = _squeeze_batch(feats["input_ids"], 1, path, "input_ids").to(torch.int64)
    mask = _squeeze_batch(feats["loss_mask"], 1, path, "loss_mask")
    aux = _squeeze_batch(feats["aux_hidden"], 2, path, "aux_hidden")
    last = _squeeze_batch(feats["last_hidden"], 2, path, "last_hidden")
    t = ids.shape[0]
    if mask.shape[0] != t or aux.shape[0] != t or last.shape[0] != t:
        raise ValueError(f"{path}: features disagree on the token count (input_ids {t}, loss_mask "
                         f"{mask.shape[0]}, aux {aux.shape[0]}, last {last.shape[0]})")
    if aux.shape[1] != 3 * last.shape[1]:
        raise ValueError(f"{path}: aux hidden width {aux.shape[1]} is not 3 x the hidden size {last.shape[1]}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{path}: loss_mask must hold only 0 and 1")
    return encode_features({"input_ids": ids.contiguous(), "loss_mask": mask.to(torch.uint8).contiguous(),
                            "aux_hidden": aux.contiguous(), "last_hidden": last.contiguous()}, feature_dtype)


class IngestedSample:
    """The token ids and loss mask of one file: enough for the vocab and data hash."""

    def __init__(self, sample_id: str, index: int, path: Path, input_ids: torch.Tensor, loss_mask: torch.Tensor):
        self.sample_id, self.index, self.path = sample_id, index, path
        self.input_ids, self.loss_mask = input_ids, loss_mask
