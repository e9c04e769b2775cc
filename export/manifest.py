"""The engines folder's manifest: what was exported, from what, and the hash of every file.

json + hashlib only (no torch, no onnx), so the torch-free runtime can validate a folder
before it opens a single graph. A changed, truncated, missing or swapped file, or a folder
made for another model or checkpoint, is one clear `UserError`, never a wrong image.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from soda.errors import UserError

FORMAT = 1
MANIFEST = "manifest.json"
_REQUIRED = ("format", "model", "model_hash", "weights", "weights_file", "weights_sha256", "opset", "artefacts",
             "schedule", "schedule_hash", "sampler", "tools", "files")
REEXPORT_HINT = "re-run `cli.py export` to rebuild it"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output; dynamic axes are strings ("B", "n")."""

    name: str
    shape: tuple
    dtype: str

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"])

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Artefact:
    """One ONNX graph: "embed", "modulation.{l}", "{module}.{l}", "final", or a block graph
    "block.{l}.{pattern}" / "block.{first}-{last}.{pattern}" (soda.blocks)."""

    name: str
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parity_max_abs: float | None
    # Where the graph's initializers lie in the weights file: (name, offset, length, dtype, shape)
    # each (export.weights_store); empty in folders made before it (each session then loads its own).
    initializers: tuple = ()

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass
class Manifest:
    """A validated manifest.json; `path(name)` gives an artefact's file in the folder."""

    folder: Path
    data: dict = field(repr=False)
    artefacts: dict[str, Artefact] = field(default_factory=dict)

    # plain fields, straight from the JSON
    @property
    def model(self) -> dict:
        return self.data["model"]

    @property
    def model_hash(self) -> str:
        return self.data["model_hash"]

    @property
    def weights(self) -> str:
        return self.data["weights"]

    @property
    def schedule_path(self) -> Path:
        return self.folder / self.data["schedule"]

    @property
    def schedule_hash(self) -> str:
        return self.data["schedule_hash"]

    @property
    def sampler(self) -> dict:
        return self.data["sampler"]

    @property
    def opset(self) -> int:
        return self.data["opset"]

    @property
    def trt(self) -> dict | None:
        return self.data.get("trt")

    @property
    def token_counts(self) -> list[int]:
        return list(self.data.get("token_counts", []))

    def path(self, name: str) -> Path:
        if name not in self.artefacts:
            raise UserError(f"{self.folder} has no artefact {name!r} (it has {', '.join(self.artefacts)})")
        return self.folder / self.artefacts[name].file

    def check_matches(self, model_hash: str | None = None, weights: str | None = None,
                      schedule_hash: str | None = None) -> None:
        """One clear error when the folder was exported for another model, checkpoint or schedule."""
        if model_hash is not None and model_hash != self.model_hash:
            raise UserError(f"{self.folder} was exported for model {self.model.get('name')} ({self.model_hash}), "
                            f"not model hash {model_hash}; {REEXPORT_HINT}")
        if weights is not None and weights != self.weights:
            raise UserError(f"{self.folder} was exported from weights {_short(self.weights)}, not {_short(weights)}; "
                            f"{REEXPORT_HINT}")
        if schedule_hash is not None and schedule_hash != self.schedule_hash:
            raise UserError(f"{self.folder} holds schedule {self.schedule_hash}, not {schedule_hash}; {REEXPORT_HINT}")

    def same_inputs(self, key: dict) -> bool:
        """True when `key` (see `reuse_key`) equals what this folder was made from."""
        return reuse_key(self.data) == key


def reuse_key(data: dict) -> dict:
    """What makes two exports identical: same weights, model, schedule, sampler, opset, tools."""
    key = {k: data.get(k) for k in ("format", "model_hash", "weights", "schedule_hash", "sampler", "opset", "tools")}
    key["blocks"] = (data.get("blocks") or {}).get("format")  # block graphs (soda.blocks) or none
    return key


def _short(weights_id: str) -> str:
    return weights_id if len(weights_id) <= 24 else weights_id[:16] + "..."


def load_manifest(folder: str | Path, verify: str = "sha256") -> Manifest:
    """Read and validate `folder/manifest.json`.

    verify: "sha256" (default) checks size then sha256 of every listed file; "size" checks
    presence and size only (fast, catches truncation, not a same-size swap).
    """
    if verify not in ("sha256", "size"):
        raise ValueError(f"verify must be 'sha256' or 'size', not {verify!r}")
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{folder} is not an export folder: {MANIFEST} not found (run `cli.py export` first)")
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath} is not valid JSON ({e}); {REEXPORT_HINT}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else None
        raise UserError(f"{mpath} has format {got}, this version reads format {FORMAT}; {REEXPORT_HINT}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise UserError(f"{mpath} lacks {', '.join(missing)}; {REEXPORT_HINT}")
    files = data["files"]
    _verify_files(folder, files, verify)
    artefacts = {}
    try:
        for name, a in data["artefacts"].items():
            if a["file"] not in files or files[a["file"]]["sha256"] != a["sha256"]:
                raise UserError(f"{mpath}: artefact {name} file {a['file']} is not among the hashed files")
            artefacts[name] = Artefact(name, a["file"], a["sha256"], tuple(TensorSpec.from_dict(t) for t in a["inputs"]),
                                       tuple(TensorSpec.from_dict(t) for t in a["outputs"]), a.get("parity_max_abs"),
                                       tuple((str(n), int(o), int(k), str(d), tuple(int(x) for x in s))
                                             for n, o, k, d, s in a.get("initializers", ())))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{mpath} has a malformed artefact entry ({e}); {REEXPORT_HINT}") from None
    for key, sha_key in ((data["weights_file"], "weights_sha256"),):
        if key not in files or files[key]["sha256"] != data[sha_key]:
            raise UserError(f"{mpath}: weights file {key} is not among the hashed files; {REEXPORT_HINT}")
    if data["schedule"] not in files:
        raise UserError(f"{mpath}: schedule file {data['schedule']} is not among the hashed files; {REEXPORT_HINT}")
    return Manifest(folder, data, artefacts)


def _verify_files(folder: Path, files: dict, verify: str) -> None:
    """Size first for every file (cheap), then sha256: a bad file is named in the error."""
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            raise UserError(f"{p} is missing from the export folder; {REEXPORT_HINT}")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise UserError(f"{p} has {size} bytes, the manifest says {meta['bytes']} (truncated or replaced); "
                            f"{REEXPORT_HINT}")
    if verify == "sha256":
        for rel, meta in files.items():
            if file_sha256(folder / rel) != meta["sha256"]:
                raise UserError(f"{folder / rel} does not match its sha256 in the manifest (changed or swapped); "
                                f"{REEXPORT_HINT}")


def describe_files(folder: Path, names: list[str]) -> dict:
    """{relative path: {"bytes", "sha256"}} for the manifest's `files` map."""
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": file_sha256(folder / n)} for n in names}


def write_manifest(folder: Path, data: dict) -> None:
    """Atomic write (unique temporary file + rename): a crash never leaves half a manifest."""
    from soda.outputs import write_json_atomic

    write_json_atomic(folder / MANIFEST, data)
