"""The device bundle: a released global model a device ranks with, without the training code.

One file, a zip archive (written by the operator's `server export`, installed by
`device install-bundle`):

    MANIFEST.json     format name and version, model format, SHA-256 of every other member
    model.onnx        the ranker: (1, L) left-padded item indices -> (num_items + 1,) scores
    model_config.json the ModelConfig the weights were trained with
    catalogue.txt     the item catalogue (common/catalogue.py), line i = item index i
    card.json         the model card: data, rounds, privacy guarantee (as the operator wrote it)

Beside it, `write_bundle` writes `NAME.sha256` in `sha256sum` format: the SHA-256 of the
whole file, for checking a copy out of band. Loading verifies every member against the
manifest (and the zip CRCs), and the whole file against an expected SHA-256 when one is
given or the `.sha256` file is beside it; any mismatch is refused with BundleError.

Why ONNX and not TorchScript: benchmarks/device.py measures both (docs/benchmarks.md).
Neither wins everywhere: per-request CPU time is about 20% lower with onnxruntime at
ML-100K/ML-1M catalogue sizes and about 20% higher at 100k items; the model files are
within 4% of each other (TorchScript smaller at small catalogues, ONNX at 100k). Both
are far below the latency targets. ONNX is chosen because TorchScript is deprecated in
torch 2.13 and because the exported ranker runs on onnxruntime alone, without torch or this project's
model code, so a device that only ranks can ship without the training stack.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedinterest.common.catalogue import Catalogue
from fedinterest.common.constants import PAD_ID
from fedinterest.common.errors import FedinterestError
from fedinterest.common.model import InterestModel, ModelConfig

BUNDLE_FORMAT = "fedinterest-bundle"
BUNDLE_VERSION = 1
MODEL_FORMAT = "onnx"
MIN_INPUT_LENGTH = 2  # shorter histories are left-padded: torch.export specialises lengths 0 and 1
_MANIFEST = "MANIFEST.json"
_MEMBERS = ("model.onnx", "model_config.json", "catalogue.txt", "card.json")


class BundleError(FedinterestError, ValueError):
    """A bundle that is missing, corrupted, or of a format this software does not read."""


class ScoringHead(nn.Module):
    """The exported computation: `InterestModel.score_last` for one history (eval mode)."""

    def __init__(self, model: InterestModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """(1, L) left-padded item indices -> (num_items + 1,) scores of the next item."""
        return self.model.score_last(items)[0]


def export_onnx(model: InterestModel) -> bytes:
    """The model's next-item scoring as ONNX bytes, history length dynamic in [2, max_len]."""
    import onnxscript  # noqa: F401  -- torch's ONNX exporter needs it; fail here with a clear ImportError

    config = model.config
    was_training = model.training
    model.eval()
    example = torch.randint(1, config.num_items + 1, (1, config.max_len), dtype=torch.int64)
    length = torch.export.Dim("length", min=MIN_INPUT_LENGTH, max=config.max_len)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on optional torchvision ops
            program = torch.onnx.export(
                ScoringHead(model), (example,), input_names=["items"], output_names=["scores"],
                dynamic_shapes=({1: length},), dynamo=True, verbose=False,
            )
    finally:
        model.train(was_training)
    assert program is not None  # dynamo=True always returns the ONNXProgram
    buffer = io.BytesIO()
    program.save(buffer)  # type: ignore[arg-type]  # annotated for paths only; save() writes a file object too
    return buffer.getvalue()


class OnnxRanker:
    """Scores the catalogue for a history with onnxruntime on one thread (no torch, no training code)."""

    def __init__(self, onnx_bytes: bytes, config: ModelConfig) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # a device ranks on one core, beside the app that asked
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.config = config
        self._session = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])

    @property
    def num_items(self) -> int:
        return self.config.num_items

    def scores(self, history: np.ndarray) -> np.ndarray:
        """(num_items + 1,) float32 scores after `history` (item indices, oldest first); PAD column -inf."""
        items = model_input(history, self.config.max_len)
        scores = self._session.run(None, {"items": items})[0]
        scores[PAD_ID] = -np.inf
        return scores


def model_input(history: np.ndarray, max_len: int) -> np.ndarray:
    """(1, L) int64: the last `max_len` items, left-padded with PAD_ID to at least MIN_INPUT_LENGTH."""
    tail = np.asarray(history, dtype=np.int64)[-max_len:]
    length = max(MIN_INPUT_LENGTH, len(tail))
    items = np.full((1, length), PAD_ID, dtype=np.int64)
    if len(tail):
        items[0, length - len(tail):] = tail
    return items


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle."""

    path: Path
    ranker: OnnxRanker
    catalogue: Catalogue
    model_config: ModelConfig
    card: dict[str, Any]
    sha256: str  # of the whole bundle file


def write_bundle(
    out_path: str | Path, *, state_dict: dict[str, torch.Tensor], model_config: ModelConfig,
    catalogue_ids: list[str] | tuple[str, ...], model_card: dict,
) -> Path:
    """Write a bundle file (and its `.sha256` beside it) atomically; returns the bundle's path."""
    out = Path(out_path)
    catalogue = Catalogue(list(catalogue_ids), source="write_bundle catalogue_ids")
    if len(catalogue) != model_config.num_items:
        raise BundleError(f"the catalogue has {len(catalogue)} items but the model config says num_items={model_config.num_items}")
    model = InterestModel(model_config)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise BundleError(f"the state dict does not fit the model config {asdict(model_config)}: {e}") from None
    members = {
        "model.onnx": export_onnx(model),
        "model_config.json": json.dumps(asdict(model_config), indent=2).encode("utf-8"),
        "catalogue.txt": "".join(f"{item}\n" for item in catalogue.ids).encode("utf-8"),
        "card.json": json.dumps(model_card, indent=2, sort_keys=True, default=str).encode("utf-8"),
    }
    manifest = {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "model_format": MODEL_FORMAT,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        for name, data in members.items():
            archive.writestr(name, data)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    digest = _sha256_file(tmp)
    os.replace(tmp, out)
    _checksum_path(out).write_text(f"{digest}  {out.name}\n", encoding="ascii")
    return out


def load_bundle(path: str | Path, *, expected_sha256: str | None = None) -> Bundle:
    """Read and verify a bundle; BundleError saying what is wrong when it is corrupted or not a bundle."""
    p = Path(path)
    if not p.is_file():
        raise BundleError(f"{p}: no bundle file here")
    return read_bundle_bytes(p.read_bytes(), source=p, expected_sha256=expected_sha256 or _sidecar_sha256(p))


def read_bundle_bytes(data: bytes, *, source: str | Path = "<bytes>", expected_sha256: str | None = None) -> Bundle:
    """Verify and load a bundle held in memory (e.g. from the device store)."""
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise BundleError(f"{source}: SHA-256 is {digest}, expected {expected_sha256.lower()}: the bundle is corrupted or not the one published")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            manifest = json.loads(archive.read(_MANIFEST))
            _check_manifest(manifest, source)
            members = {name: archive.read(name) for name in _MEMBERS}  # zipfile checks each member's CRC
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, EOFError, OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{source}: not a readable fedinterest bundle ({type(e).__name__}: {e})") from None
    for name, content in members.items():
        actual = hashlib.sha256(content).hexdigest()
        if actual != manifest["files"].get(name):
            raise BundleError(f"{source}: member {name} has SHA-256 {actual}, the manifest says {manifest['files'].get(name)}: corrupted")
    try:
        config = ModelConfig(**json.loads(members["model_config.json"]))
        ids = members["catalogue.txt"].decode("utf-8").split("\n")[:-1]
        catalogue = Catalogue(ids, source=f"{source}:catalogue.txt")
        card = json.loads(members["card.json"])
        ranker = OnnxRanker(members["model.onnx"], config)
    except Exception as e:  # anything here means the verified content is not what write_bundle writes
        raise BundleError(f"{source}: bundle content is invalid ({type(e).__name__}: {e})") from None
    if len(catalogue) != config.num_items:
        raise BundleError(f"{source}: catalogue has {len(catalogue)} items, the model {config.num_items}")
    return Bundle(path=Path(str(source)), ranker=ranker, catalogue=catalogue, model_config=config, card=card, sha256=digest)


def _check_manifest(manifest: object, source: str | Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{source}: not a {BUNDLE_FORMAT} file (its manifest names no such format)")
    if manifest.get("version") != BUNDLE_VERSION or manifest.get("model_format") != MODEL_FORMAT:
        raise BundleError(
            f"{source}: bundle version {manifest.get('version')} / model format {manifest.get('model_format')!r}; "
            f"this software reads version {BUNDLE_VERSION} / {MODEL_FORMAT!r}"
        )
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{source}: the manifest lists no member checksums")


def _checksum_path(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + ".sha256")


def _sidecar_sha256(bundle: Path) -> str | None:
    """The SHA-256 in `BUNDLE.sha256` when that file is beside the bundle."""
    sidecar = _checksum_path(bundle)
    if not sidecar.is_file():
        return None
    fields = sidecar.read_text(encoding="ascii", errors="replace").split()
    if not fields or len(fields[0]) != 64:
        raise BundleError(f"{sidecar}: not a sha256sum line")
    return fields[0]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
