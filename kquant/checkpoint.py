"""Quantized checkpoints: safetensors files (no pickle) with integrity checks.

File contents:

* for every ``QuantLinear`` named ``L``: ``L.qweight`` (canonical layout, see
  :mod:`kquant.format`), ``L.scales``, ``L.zeros`` (asymmetric only), ``L.bias`` (if any),
  ``L.act_scale`` (static activations only), ``L.input_scale`` (equalized layers holding
  one), ``L.lora_A`` and ``L.lora_B`` (layers keeping a low-rank adapter);
* every other entry of the model's ``state_dict`` (float weights of skipped layers,
  embeddings, norms, persistent buffers), under its state-dict name; tensors that share
  storage (tied weights) are stored once and listed under ``aliases``.
* header metadata (all strings): ``format`` = ``"kquant"``, ``format_version``
  (= :data:`kquant.format.FORMAT_VERSION`), ``kquant_version``, ``layers`` (JSON list of
  per-layer configs, each with its ``calibration`` record: method, parameters, chosen alpha),
  ``digests`` (JSON: tensor name -> sha256 of dtype, shape and bytes), ``aliases`` (JSON),
  ``auto_plan`` (JSON, only for a model quantized by :func:`kquant.auto_quantize`: its
  ``AutoPlan``, restored as ``model.kquant_plan`` on load),
  ``signature`` (only in signed files, see below) and ``meta_digest`` (sha256 over all other
  metadata).

:func:`load_quantized` checks the file (size, header, version, digests, signature) and the
target model (every layer present with the right shape, no tensor on the meta device) before
touching the model: any problem raises :class:`CheckpointError` (a ``ValueError``) naming the
file and what is wrong.

What the checks protect against
-------------------------------
The digests are plain sha256 sums stored in the file itself. They catch accidental damage:
corruption (flipped bits, bad disks, broken transfers), truncation, trailing bytes, and
any edit that does not recompute them (a changed tensor, a changed header or metadata
field). They do **not** authenticate the file: anyone who can write it can change a tensor
or a layer's config (say its activations from ``"dynamic"`` to ``"none"``), recompute the
digests with the same formula, and the file loads without complaint.

To detect deliberate edits, sign the file with a secret key:
``save_quantized(model, path, key=...)`` stores ``signature`` = HMAC-SHA256 of all the
metadata (which holds every tensor's sha256, so the signature covers the tensors too), and
``load_quantized(model, path, key=...)`` raises :class:`CheckpointError` when the signature
is missing (an unsigned or stripped file) or does not match (an edited file, or another
key). When ``key`` is None, both functions take the key from the environment variable
``KQUANT_CHECKPOINT_KEY`` (as UTF-8 text) if it is set and not empty. A signed file loaded
without a key gets the integrity checks only: it still loads, and nothing then says who
wrote it. A signature proves only that someone holding the key wrote the file; keep the key
secret, and out of the files it signs.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import tempfile
import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .config import QuantConfig
from .format import FORMAT_VERSION, PackedWeight
from .nn import QuantLinear, set_module

__all__ = ["save_quantized", "load_quantized", "CheckpointError", "read_metadata", "check_save_path", "KEY_ENV"]

FORMAT_NAME = "kquant"
_QL_TENSORS = ("qweight", "scales", "zeros", "bias", "act_scale", "input_scale", "lora_A", "lora_B")
_MAX_HEADER = 100 << 20  # a header larger than this is corrupt, not big
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}

PathLike = Union[str, os.PathLike]
Key = Union[bytes, str, None]
KEY_ENV = "KQUANT_CHECKPOINT_KEY"
_SIGNATURE = "signature"  # metadata entry of signed files: "hmac-sha256:<hex>"


class CheckpointError(ValueError):
    """A checkpoint is unreadable, tampered with, from another format version, or does not
    match the model it is loaded into."""


# ----------------------------------------------------------------------------- helpers
def _digest(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{str(t.dtype)}:{list(t.shape)}:".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _meta_body(meta: Dict[str, str], skip: Tuple[str, ...]) -> bytes:
    return json.dumps({k: v for k, v in meta.items() if k not in skip}, sort_keys=True).encode()


def _meta_digest(meta: Dict[str, str]) -> str:
    return hashlib.sha256(_meta_body(meta, ("meta_digest",))).hexdigest()


def _signature(meta: Dict[str, str], key: bytes) -> str:
    body = _meta_body(meta, ("meta_digest", _SIGNATURE))
    return "hmac-sha256:" + hmac.new(key, body, hashlib.sha256).hexdigest()


def _resolve_key(key: Key) -> Optional[bytes]:
    """``key`` as bytes; when None, ``$KQUANT_CHECKPOINT_KEY`` (None if unset or empty)."""
    if key is None:
        key = os.environ.get(KEY_ENV) or None
        if key is None:
            return None
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"key must be bytes or str, got {type(key).__name__}")
    if not key:
        raise ValueError("key must not be empty")
    return bytes(key)


def check_save_path(path: PathLike) -> str:
    """Raise a clear error naming ``path`` when a checkpoint cannot be saved there
    (IsADirectoryError, FileNotFoundError for a missing folder, NotADirectoryError,
    PermissionError); returns the folder it goes into. Writes nothing."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; give a file path such as "
                                f"{os.path.join(path, 'model.kq.safetensors')}")
    if not os.path.exists(folder):
        raise FileNotFoundError(f"cannot save {path}: folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"cannot save {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot save {path}: folder {folder} is not writable")
    return folder


def temp_file_beside(path: PathLike) -> str:
    """Create an empty temp file in the folder of ``path`` (after :func:`check_save_path`),
    which also proves the folder writable where permission bits say nothing (root, read-only
    mounts); returns its path. The caller renames or removes it."""
    path = os.fspath(path)
    folder = check_save_path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".kquant-", suffix=".tmp", dir=folder)
    except OSError as e:  # name the checkpoint, not the temp file
        raise type(e)(f"cannot save {path}: cannot create a file in {folder}: {e.strerror}") from None
    os.close(fd)
    return tmp


def _first_meta_tensor(model: nn.Module) -> Optional[str]:
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            return name
    return None


def _quant_layers(model: nn.Module) -> List[Tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def _layer_config(name: str, m: QuantLinear) -> Dict[str, object]:
    return {"name": name, "bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric,
            "activations": m.activations, "in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "bias_dtype": str(m.bias.dtype) if m.bias is not None else None,
            "input_scale": m.input_scale is not None, "calibration": m.calibration,
            "adapter_rank": None if m.lora_A is None else int(m.lora_A.shape[0])}


# ----------------------------------------------------------------------------- save
@torch.no_grad()
def save_quantized(model: nn.Module, path: PathLike, *, key: Key = None) -> str:
    """Write ``model`` (with its ``QuantLinear`` layers) to a safetensors file at ``path``.

    The write is atomic (temp file in the same folder, then rename). A path that is a
    directory, or in a folder that does not exist or is not writable, raises before anything
    is written. With ``key`` (bytes or str; default ``$KQUANT_CHECKPOINT_KEY`` if set) the
    metadata, and through the tensor digests the tensors, are signed with HMAC-SHA256 (see
    the module docstring). Returns the path.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, QuantLinear):
        raise TypeError("save_quantized saves a model holding QuantLinear layers; wrap a single layer in "
                        "an nn.Module (e.g. nn.Sequential(layer))")
    path = os.fspath(path)
    secret = _resolve_key(key)
    check_save_path(path)  # before the work, so a bad path fails fast
    tensors: Dict[str, torch.Tensor] = {}
    layers = []
    ql_keys = set()
    for name, m in _quant_layers(model):
        packed = m.packed_weight()
        layers.append(_layer_config(name, m))
        parts = {"qweight": packed.qweight, "scales": packed.scales, "zeros": packed.zeros,
                 "bias": m.bias, "act_scale": m.act_scale, "input_scale": m.input_scale,
                 "lora_A": m.lora_A, "lora_B": m.lora_B}
        for k, t in parts.items():
            key = f"{name}.{k}"
            ql_keys.add(key)
            if t is not None:
                tensors[key] = t.detach().to("cpu").contiguous().clone()
    # every other state_dict entry; shared storage (tied weights) is stored once
    aliases: Dict[str, str] = {}
    seen: Dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        if key in ql_keys or _owner_is_ql(model, key):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(t).__name__}, not a tensor; "
                            f"save_quantized stores tensors only")
        ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset()) \
            if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.detach().to("cpu").contiguous().clone()
    import kquant
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "kquant_version": getattr(kquant, "__version__", "unknown"),
        "layers": json.dumps(layers),
        "digests": json.dumps({k: _digest(t) for k, t in tensors.items()}, sort_keys=True),
        "aliases": json.dumps(aliases, sort_keys=True),
    }
    plan = getattr(model, "kquant_plan", None)
    if plan is not None:  # before the digest and signature, which then cover it
        meta["auto_plan"] = json.dumps(plan.to_dict() if hasattr(plan, "to_dict") else plan, sort_keys=True,
                                       allow_nan=False)
    if secret is not None:
        meta[_SIGNATURE] = _signature(meta, secret)
    meta["meta_digest"] = _meta_digest(meta)
    tmp = temp_file_beside(path)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _owner_is_ql(model: nn.Module, key: str) -> bool:
    owner = key.rpartition(".")[0]
    try:
        return isinstance(model.get_submodule(owner), QuantLinear) if owner else isinstance(model, QuantLinear)
    except AttributeError:
        return False


# ----------------------------------------------------------------------------- read + verify
def _read_header(path: str) -> Tuple[Dict[str, dict], Dict[str, str]]:
    """Parse and sanity-check the safetensors header ourselves, for clear errors."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: file is truncated or empty ({size} bytes; a safetensors file "
                                  f"starts with an 8-byte header length)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > _MAX_HEADER or 8 + hlen > size:
            raise CheckpointError(f"{path}: corrupt or truncated header (header length {hlen} bytes, file "
                                  f"{size} bytes)")
        raw = f.read(hlen)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a kquant checkpoint (the header has no '__metadata__' entry)")
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a kquant checkpoint (metadata 'format' is "
                              f"{meta.get('format')!r}, expected {FORMAT_NAME!r})")
    data_len = size - 8 - hlen
    end_max = 0
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            nbytes = _ST_DTYPES[dtype]
            for d in shape:
                nbytes *= int(d)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r}: {info!r}") from None
        if not (0 <= start <= end) or end - start != nbytes:
            raise CheckpointError(f"{path}: corrupt header: tensor {key!r} {dtype} {shape} needs {nbytes} bytes "
                                  f"but its offsets are [{start}, {end}]")
        if end > data_len:
            raise CheckpointError(f"{path}: file is truncated: tensor {key!r} ends at data byte {end} but only "
                                  f"{data_len} data bytes are present")
        end_max = max(end_max, end)
    if end_max != data_len:
        raise CheckpointError(f"{path}: corrupt file: {data_len} data bytes but the header describes {end_max}")
    return header, meta


def read_metadata(path: PathLike, *, key: Key = None) -> Dict[str, object]:
    """The checked metadata of a kquant checkpoint (layers, digests, aliases parsed from JSON).

    With ``key`` (default ``$KQUANT_CHECKPOINT_KEY`` if set) the file must carry a matching
    signature; without one a signed file gets the integrity checks only."""
    path = os.fspath(path)
    key = _resolve_key(key)
    header, meta = _read_header(path)
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: written with kquant format version {version!r}; this kquant reads "
                              f"version {FORMAT_VERSION}")
    if meta.get("meta_digest") != _meta_digest(meta):
        raise CheckpointError(f"{path}: metadata was modified after saving (meta_digest mismatch)")
    if key is not None:
        if _SIGNATURE not in meta:
            raise CheckpointError(f"{path}: the file is not signed (no {_SIGNATURE!r} in its metadata), but a key "
                                  f"was given (key argument or ${KEY_ENV}): it cannot be authenticated")
        if not hmac.compare_digest(str(meta[_SIGNATURE]), _signature(meta, key)):
            raise CheckpointError(f"{path}: signature does not match: the file was modified after signing, or "
                                  f"signed with another key")
    out: Dict[str, object] = dict(meta)
    for k in ("layers", "digests", "aliases"):
        try:
            out[k] = json.loads(meta[k])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: metadata {k!r} is missing or corrupt ({e})") from None
    if "auto_plan" in meta:
        try:
            out["auto_plan"] = json.loads(meta["auto_plan"])
        except (TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: metadata 'auto_plan' is corrupt ({e})") from None
    names = set(header)
    if set(out["digests"]) != names:
        missing = sorted(set(out["digests"]) - names)
        extra = sorted(names - set(out["digests"]))
        raise CheckpointError(f"{path}: tensor list does not match the saved digests (missing: {missing[:5]}, "
                              f"unexpected: {extra[:5]})")
    return out


def _load_tensors(path: str, digests: Dict[str, str]) -> Dict[str, torch.Tensor]:
    from safetensors import safe_open
    tensors = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"{path}: cannot read tensors ({type(e).__name__}: {e})") from None
    for key, t in tensors.items():
        if _digest(t) != digests.get(key):
            raise CheckpointError(f"{path}: tensor {key!r} ({t.dtype} {list(t.shape)}) does not match its saved "
                                  f"sha256 digest: the file is corrupted or was modified")
    return tensors


# ----------------------------------------------------------------------------- load
def _build_layer(path: str, model: nn.Module, cfg: dict, tensors: Dict[str, torch.Tensor]) -> QuantLinear:
    name = cfg.get("name")
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{path}: layer entry without a valid name: {cfg!r}")
    where = f"{path}: layer {name!r}"
    try:
        target = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{where}: the model has no module of that name (different architecture?)") from None
    if not isinstance(target, (nn.Linear, QuantLinear)):
        raise CheckpointError(f"{where}: the model has a {type(target).__name__} there, expected nn.Linear")
    in_f, out_f = cfg["in_features"], cfg["out_features"]
    if (target.in_features, target.out_features) != (in_f, out_f):
        raise CheckpointError(f"{where}: checkpoint layer is [{out_f}, {in_f}] (out, in) but the model's is "
                              f"[{target.out_features}, {target.in_features}]")
    has_bias = target.bias is not None
    if has_bias != bool(cfg["bias"]):
        raise CheckpointError(f"{where}: bias={cfg['bias']} in the checkpoint but bias={has_bias} in the model")
    try:
        qcfg = QuantConfig(weight_bits=cfg["bits"], group_size=cfg["group_size"], symmetric=cfg["symmetric"],
                           activations=cfg["activations"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: invalid layer config: {e}") from None
    if isinstance(target, QuantLinear):
        device = target.scales.device
        dtype = target.bias.dtype if target.bias is not None else torch.float32
    else:
        device, dtype = target.weight.device, target.weight.dtype

    def get(k, required):
        t = tensors.get(f"{name}.{k}")
        if t is None and required:
            raise CheckpointError(f"{where}: tensor {name}.{k} is missing from the file")
        if t is not None and not required:
            raise CheckpointError(f"{where}: unexpected tensor {name}.{k} for this layer's config")
        return t

    q = get("qweight", True)
    scales = get("scales", True)
    zeros = get("zeros", not qcfg.symmetric)
    bias = get("bias", has_bias)
    act_scale = get("act_scale", qcfg.activations == "static")
    input_scale = get("input_scale", bool(cfg.get("input_scale", False)))
    lora = [get(k, bool(cfg.get("adapter_rank"))) for k in ("lora_A", "lora_B")]
    try:
        mod = QuantLinear(in_f, out_f, has_bias, qcfg, name=name, device=device, dtype=dtype)
        mod.load_packed(PackedWeight(q, scales, zeros, qcfg.weight_bits, qcfg.group_size, in_f))
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if bias is not None:
        if tuple(bias.shape) != (out_f,) or not bias.is_floating_point():
            raise CheckpointError(f"{where}: bias must be a float tensor [{out_f}], got {bias.dtype} "
                                  f"{list(bias.shape)}")
        mod.bias.data.copy_(bias)
    if act_scale is not None:
        if act_scale.dtype != torch.float32 or tuple(act_scale.shape) != (1,) or not (
                torch.isfinite(act_scale).all() and act_scale.item() > 0):
            raise CheckpointError(f"{where}: act_scale must be a finite float32 [1] > 0, got {act_scale.dtype} "
                                  f"{list(act_scale.shape)}")
        mod.act_scale = act_scale.to(device)
    if input_scale is not None:
        try:
            mod.set_input_scale(input_scale)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{where}: {e}") from None
    if lora[0] is not None:
        try:
            mod.set_adapter(lora[0].to(device), lora[1].to(device))
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
    calibration = cfg.get("calibration")
    if calibration is not None and not isinstance(calibration, dict):
        raise CheckpointError(f"{where}: 'calibration' must be a JSON object, got {type(calibration).__name__}")
    mod.calibration = calibration
    return mod


@torch.no_grad()
def load_quantized(model: nn.Module, path: PathLike, strict: bool = True, *, key: Key = None) -> nn.Module:
    """Rebuild the checkpoint's ``QuantLinear`` layers inside ``model`` (a float model of
    the same architecture, or one already quantized the same way) and load every other
    tensor. Returns ``model``.

    Everything is checked before the model is changed. ``strict=False`` tolerates float
    tensors that are missing from the file or not in the model (with a warning); shape
    mismatches and quantized-layer problems always raise :class:`CheckpointError`.

    ``key`` (bytes or str; default ``$KQUANT_CHECKPOINT_KEY`` if set): the file must be
    signed with this key (see the module docstring). Without a key, a signed file is checked
    for integrity only, which cannot tell who wrote it.

    A checkpoint of a model quantized by :func:`kquant.auto_quantize` holds its plan, which is
    set as ``model.kquant_plan`` (an :class:`kquant.AutoPlan`).

    The model must have real storage: a model with a tensor on the meta device raises
    (create it on a real device, or call ``model.to_empty(device=...)`` first and initialize
    its non-persistent buffers, which the file does not hold).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    meta_name = _first_meta_tensor(model)
    if meta_name is not None:
        raise CheckpointError(f"{path}: cannot load into the model: its tensor {meta_name!r} is on the meta device "
                              f"(no storage, so nothing would be loaded); create the model on a real device, or call "
                              f"model.to_empty(device='cpu') first and then initialize its non-persistent buffers, "
                              f"which the file does not hold")
    meta = read_metadata(path, key=key)
    tensors = _load_tensors(path, meta["digests"])
    layers = meta["layers"]
    if not isinstance(layers, list):
        raise CheckpointError(f"{path}: metadata 'layers' is not a list")
    # phase 1: build and check everything, leave the model untouched
    new_layers = {}
    ql_keys = set()
    for cfg in layers:
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{path}: corrupt layer entry {cfg!r}")
        try:
            mod = _build_layer(path, model, cfg, tensors)
        except KeyError as e:
            raise CheckpointError(f"{path}: layer entry {cfg.get('name')!r} lacks field {e}") from None
        new_layers[cfg["name"]] = mod
        ql_keys.update(f"{cfg['name']}.{k}" for k in _QL_TENSORS)
    rest = {k: t for k, t in tensors.items() if k not in ql_keys}
    for alias, src in meta["aliases"].items():
        if src not in rest:
            raise CheckpointError(f"{path}: alias {alias!r} points to missing tensor {src!r}")
        rest[alias] = rest[src]
    model_sd = _float_state(model, set(new_layers))
    missing = sorted(set(model_sd) - set(rest))
    unexpected = sorted(set(rest) - set(model_sd))
    for key in sorted(set(rest) & set(model_sd)):
        want, got = model_sd[key], rest[key]
        if tuple(want.shape) != tuple(got.shape):
            raise CheckpointError(f"{path}: tensor {key!r} is {list(got.shape)} in the checkpoint but "
                                  f"{list(want.shape)} in the model")
        if want.is_floating_point() != got.is_floating_point():
            raise CheckpointError(f"{path}: tensor {key!r} is {got.dtype} in the checkpoint but {want.dtype} "
                                  f"in the model")
    plan = None
    if "auto_plan" in meta:
        from .auto import AutoPlan
        try:
            plan = AutoPlan.from_dict(meta["auto_plan"])
        except ValueError as e:
            raise CheckpointError(f"{path}: metadata 'auto_plan': {e}") from None
    if missing or unexpected:
        msg = (f"{path}: checkpoint does not match the model: missing tensors {missing[:8]}"
               f"{'...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
               f"{'...' if len(unexpected) > 8 else ''}")
        if strict:
            raise CheckpointError(msg)
        warnings.warn(msg + " (strict=False: ignored)", stacklevel=2)
    # phase 2: swap layers in, copy the other tensors
    for name, mod in new_layers.items():
        set_module(model, name, mod)
    for key in sorted(set(rest) & set(model_sd)):
        model_sd[key].copy_(rest[key])
    if plan is not None:
        model.kquant_plan = plan
    elif "kquant_plan" in vars(model):  # a plan for other layers than those now loaded
        del model.kquant_plan
    return model


def _float_state(model: nn.Module, ql_names: set) -> Dict[str, torch.Tensor]:
    """state_dict entries (live tensors) outside the layers about to become QuantLinear."""
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if owner in ql_names:
            continue
        if _owner_is_ql(model, key):
            continue
        out[key] = t.data if isinstance(t, nn.Parameter) else t
    return out
