"""save_quantized / load_quantized: round trips and every kind of bad file."""
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import kquant
from kquant.checkpoint import CheckpointError, read_metadata


class Net(nn.Module):
    """Linear layers (with and without bias, K not a multiple of the group), a norm, and
    a persistent non-float buffer, so every kind of tensor goes through the file."""

    def __init__(self, k=100, hidden=64):
        super().__init__()
        self.fc1 = nn.Linear(k, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, 10)
        self.register_buffer("steps", torch.tensor([3, 1, 4], dtype=torch.int64))

    def forward(self, x):
        h = torch.relu(self.fc2(self.norm(self.fc1(x))))
        return self.head(h) + self.steps.sum()


def fresh(seed, **kw):
    torch.manual_seed(seed)
    return Net(**kw)


STATIC8 = kquant.QuantConfig(weight_bits=8, activations="static")
STATIC4 = kquant.QuantConfig(weight_bits=4, group_size=32, activations="static")
ASYM4 = kquant.QuantConfig(weight_bits=4, group_size=32, symmetric=False, activations="none")
ASYM8 = kquant.QuantConfig(weight_bits=8, group_size=64, symmetric=False, activations="none")
MIXED = kquant.QuantConfig(weight_bits=8, overrides={"fc2": "w4a16", "head": None})
CASES = {"w8a8": ("w8a8", None), "w8a16": ("w8a16", None), "w4a16": ("w4a16", None), "w4a8": ("w4a8", None),
         "static8": (STATIC8, None), "static4": (STATIC4, None), "asym4": (ASYM4, None), "asym8": (ASYM8, None),
         "skip": ("w4a8", ["head", "fc1"]), "overrides": (MIXED, None),
         "w3a16": ("w3a16", None), "w2a16": ("w2a16", None), "w3a8": ("w3a8", None), "ternary": ("ternary", None),
         "mixed_low": (kquant.QuantConfig(weight_bits=3, group_size=32, overrides={"fc2": "w2a16", "head": "w8a8"}),
                       None)}


def quantized(config, skip=None, seed=0):
    model = fresh(seed)
    calib = [torch.randn(4, 100) for _ in range(2)]
    return kquant.quantize_(model, config, calib_data=calib, skip=skip, progress=False)


@pytest.fixture
def saved(tmp_path):
    model = quantized("w4a16")
    path = tmp_path / "m.safetensors"
    kquant.save_quantized(model, path)
    return model, path


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_bit_identical(case, tmp_path):
    config, skip = CASES[case]
    model = quantized(config, skip)
    x = torch.randn(7, 100)
    y = model(x)
    path = tmp_path / "m.safetensors"
    assert kquant.save_quantized(model, path) == str(path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind
    target = fresh(1)  # different random init: everything must come from the file
    with torch.no_grad():
        target.steps.zero_()
    out = kquant.load_quantized(target, path)
    assert out is target
    assert torch.equal(target(x), y)
    for name, m in model.named_modules():
        t = target.get_submodule(name) if name else target
        assert type(t) is type(m)
        if isinstance(m, kquant.QuantLinear):
            a, b = m.packed_weight(), t.packed_weight()
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
            assert (a.zeros is None) == (b.zeros is None)
            assert (m.act_scale is None) == (t.act_scale is None)
            if m.act_scale is not None:
                assert torch.equal(m.act_scale, t.act_scale)
    sd_a, sd_b = model.state_dict(), target.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_file_contents(saved):
    model, path = saved
    meta = read_metadata(path)
    assert meta["format"] == "kquant" and meta["format_version"] == str(kquant.FORMAT_VERSION)
    layers = {c["name"]: c for c in meta["layers"]}
    assert layers["fc1"] == {"name": "fc1", "bits": 4, "group_size": 128, "symmetric": True, "activations": "none",
                             "in_features": 100, "out_features": 64, "bias": True,
                             "bias_dtype": "torch.float32", "input_scale": False, "calibration": None,
                             "adapter_rank": None}
    assert layers["fc2"]["bias"] is False
    tensors = load_file(path)
    assert tensors["fc1.qweight"].dtype == torch.uint8 and list(tensors["fc1.qweight"].shape) == [64, 64]
    assert torch.equal(tensors["fc1.qweight"], model.fc1.canonical_qweight())
    assert "fc2.bias" not in tensors and "fc1.zeros" not in tensors and "fc1.act_scale" not in tensors
    assert {"norm.weight", "norm.bias", "steps"} <= set(tensors)
    assert not any(k.endswith(".weight") and k.split(".")[0] in layers for k in tensors)  # no float copies


def test_bf16_model(tmp_path):
    model = fresh(0).to(torch.bfloat16)
    kquant.quantize_(model, "w8a16", progress=False)
    x = torch.randn(3, 100, dtype=torch.bfloat16)
    y = model(x)
    kquant.save_quantized(model, tmp_path / "m.safetensors")
    target = fresh(1).to(torch.bfloat16)
    kquant.load_quantized(target, tmp_path / "m.safetensors")
    assert target.fc1.bias.dtype == torch.bfloat16
    assert torch.equal(target(x), y)


def test_tied_weights_saved_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.body = nn.Linear(16, 16)
            self.dec = nn.Linear(16, 20, bias=False)
            self.dec.weight = self.emb.weight

        def forward(self, ids):
            return self.dec(self.body(self.emb(ids)))

    torch.manual_seed(0)
    model = kquant.quantize_(Tied(), "w8a16", skip=["dec"], progress=False)
    ids = torch.randint(0, 20, (2, 5))
    y = model(ids)
    path = tmp_path / "t.safetensors"
    kquant.save_quantized(model, path)
    assert read_metadata(path)["aliases"] in ({"emb.weight": "dec.weight"}, {"dec.weight": "emb.weight"})
    target = Tied()
    kquant.load_quantized(target, path)
    assert torch.equal(target(ids), y)
    assert target.dec.weight is target.emb.weight


def test_load_into_already_quantized_model(saved):
    model, path = saved
    target = quantized("w4a16", seed=5)
    kquant.load_quantized(target, path)
    x = torch.randn(2, 100)
    assert torch.equal(target(x), model(x))


def test_overwrite_is_atomic(saved, tmp_path):
    model, path = saved
    other = quantized("w8a8", seed=3)
    kquant.save_quantized(other, path)
    assert read_metadata(path)["layers"][0]["bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# ----------------------------------------------------------------------------- bad files
def load_fresh(path, **kw):
    return kquant.load_quantized(fresh(1), path, **kw)


def header_len(path):
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1, -100, "half"])
def test_truncated(saved, keep):
    _, path = saved
    data = path.read_bytes()
    n = len(data) // 2 if keep == "half" else (len(data) + keep if keep < 0 else keep)
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=r"truncated|corrupt"):
        load_fresh(path)


def test_trailing_garbage(saved):
    _, path = saved
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    with pytest.raises(CheckpointError, match="corrupt file"):
        load_fresh(path)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_flipped_data_bytes(saved, where):
    model, path = saved
    data = bytearray(path.read_bytes())
    start = 8 + header_len(path)
    pos = {"start": start, "middle": (start + len(data)) // 2, "end": len(data) - 1}[where]
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))
    target = fresh(1)
    with pytest.raises(CheckpointError, match="tensor '.*' .*digest"):
        kquant.load_quantized(target, path)
    assert isinstance(target.fc1, nn.Linear)  # the model was not touched


def test_every_flipped_header_byte_is_caught(saved):
    _, path = saved
    good = path.read_bytes()
    n = header_len(path)
    bad = path.with_name("bad.safetensors")
    # every 5th byte (a spread over names, dtypes, shapes, offsets, metadata, padding);
    # a low-bit flip keeps the JSON text plausible, a high-bit flip breaks UTF-8
    for i, pos in enumerate(range(8, 8 + n, 5)):
        data = bytearray(good)
        data[pos] ^= 0x80 if i % 4 == 3 else 0x01
        bad.write_bytes(bytes(data))
        with pytest.raises(CheckpointError):
            load_fresh(bad)
    # the 8-byte length prefix too
    for pos in range(8):
        data = bytearray(good)
        data[pos] ^= 0x04
        bad.write_bytes(bytes(data))
        with pytest.raises(CheckpointError):
            load_fresh(bad)


def rewrite(path, edit_meta=None, edit_tensors=None, redigest=False):
    """Re-save the file with edited metadata/tensors (optionally recomputing meta_digest)."""
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    if redigest:
        from kquant.checkpoint import _meta_digest
        meta["meta_digest"] = _meta_digest(meta)
    save_file(tensors, path, metadata=meta)


def test_wrong_version(saved):
    _, path = saved
    rewrite(path, lambda m: m.update(format_version="99"), redigest=True)
    with pytest.raises(CheckpointError, match=r"version '99'.*reads version 1"):
        load_fresh(path)


@pytest.mark.parametrize("field,value,redigest,match", [
    ("group_size", 32, False, "metadata was modified"),
    # even with the metadata digest recomputed, the config must agree with the tensors
    ("bits", 8, True, r"layer 'fc1'|fc1: "),
])
def test_edited_metadata(saved, field, value, redigest, match):
    _, path = saved

    def edit(m):
        layers = json.loads(m["layers"])
        layers[0][field] = value
        m["layers"] = json.dumps(layers)

    rewrite(path, edit, redigest=redigest)
    with pytest.raises(CheckpointError, match=match):
        load_fresh(path)


def test_replaced_tensor_is_caught(saved):
    _, path = saved
    rewrite(path, edit_tensors=lambda t: t["norm.weight"].mul_(2))
    with pytest.raises(CheckpointError, match="'norm.weight'.*digest"):
        load_fresh(path)


def test_removed_tensor_is_caught(saved):
    _, path = saved
    rewrite(path, edit_tensors=lambda t: t.pop("fc1.scales"))
    with pytest.raises(CheckpointError, match="fc1.scales"):
        load_fresh(path)


def test_out_of_range_codes_with_valid_digests(tmp_path):
    # a hand-made file with consistent digests but an int8 code of -128 for symmetric weights
    model = quantized("w8a16")
    path = tmp_path / "m.safetensors"
    kquant.save_quantized(model, path)
    from kquant.checkpoint import _digest

    def edit_tensors(t):
        t["fc1.qweight"][0, 0] = -128

    def fix(m):
        d = json.loads(m["digests"])
        d["fc1.qweight"] = _digest(tensors_holder["t"]["fc1.qweight"])
        m["digests"] = json.dumps(d, sort_keys=True)

    tensors_holder = {}
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit_tensors(tensors)
    tensors_holder["t"] = tensors
    fix(meta)
    from kquant.checkpoint import _meta_digest
    meta["meta_digest"] = _meta_digest(meta)
    save_file(tensors, path, metadata=meta)
    with pytest.raises(CheckpointError, match=r"fc1.*-128 is not used"):
        load_fresh(path)


def test_not_a_kquant_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a kquant checkpoint"):
        load_fresh(path)
    path.write_bytes(b"hello, this is not a checkpoint at all" * 4)
    with pytest.raises(CheckpointError):
        load_fresh(path)
    with pytest.raises(FileNotFoundError):
        load_fresh(tmp_path / "nope.safetensors")


def test_shape_mismatch(saved):
    _, path = saved
    target = fresh(1)
    target.fc2 = nn.Linear(64, 48, bias=False)
    with pytest.raises(CheckpointError, match=r"layer 'fc2'.*\[64, 64\].*\[48, 64\]"):
        kquant.load_quantized(target, path)
    assert isinstance(target.fc1, nn.Linear)
    target = fresh(1, k=96)
    with pytest.raises(CheckpointError, match=r"layer 'fc1'"):
        kquant.load_quantized(target, path)


def test_float_tensor_shape_mismatch_leaves_model_untouched(saved):
    _, path = saved
    target = fresh(1)
    target.norm = nn.LayerNorm(64, elementwise_affine=True)
    target.register_buffer("steps", torch.zeros(4, dtype=torch.int64))
    with pytest.raises(CheckpointError, match=r"'steps' is \[3\] in the checkpoint but \[4\]"):
        kquant.load_quantized(target, path)
    assert isinstance(target.fc1, nn.Linear) and isinstance(target.fc2, nn.Linear)


def test_missing_layer(saved):
    _, path = saved
    target = fresh(1)
    del target.fc2
    with pytest.raises(CheckpointError, match="layer 'fc2'.*no module"):
        kquant.load_quantized(target, path)
    target = fresh(1)
    target.fc2 = nn.Identity()
    with pytest.raises(CheckpointError, match="layer 'fc2'.*Identity"):
        kquant.load_quantized(target, path)


def test_bias_mismatch(saved):
    _, path = saved
    target = fresh(1)
    target.fc2 = nn.Linear(64, 64, bias=True)
    with pytest.raises(CheckpointError, match="layer 'fc2'.*bias"):
        kquant.load_quantized(target, path)


def test_strict_extra_and_missing_float_tensors(saved):
    model, path = saved
    target = fresh(1)
    target.extra = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"missing tensors \['extra.bias', 'extra.weight'\]"):
        kquant.load_quantized(target, path)
    with pytest.warns(UserWarning, match="strict=False"):
        kquant.load_quantized(target, path, strict=False)
    x = torch.randn(2, 100)
    assert torch.equal(target(x), model(x))


def test_save_bad_input(tmp_path):
    with pytest.raises(TypeError):
        kquant.save_quantized("model", tmp_path / "x.safetensors")
    with pytest.raises(TypeError):
        kquant.save_quantized(kquant.QuantLinear(4, 4), tmp_path / "x.safetensors")
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- signatures
def set_activations(name, value):
    def edit(m):
        layers = json.loads(m["layers"])
        next(c for c in layers if c["name"] == name)["activations"] = value
        m["layers"] = json.dumps(layers)
    return edit


def test_digests_alone_do_not_stop_a_deliberate_edit_a_key_does(tmp_path):
    # the documented limit of the unsigned digests: an edit that recomputes them loads
    model = quantized("w8a8")
    path = tmp_path / "m.safetensors"
    kquant.save_quantized(model, path, key=b"secret")
    rewrite(path, set_activations("fc1", "none"), redigest=True)
    assert load_fresh(path).fc1.activations == "none"  # no key: integrity checks only
    target = fresh(1)
    with pytest.raises(CheckpointError, match="signature does not match"):
        kquant.load_quantized(target, path, key=b"secret")
    assert isinstance(target.fc1, nn.Linear)  # the model was not touched


@pytest.mark.parametrize("key", [b"\x00secret\xff", "sécret"])
def test_signed_round_trip(tmp_path, key):
    model = quantized("w8a8")
    x = torch.randn(3, 100)
    path = tmp_path / "m.safetensors"
    kquant.save_quantized(model, path, key=key)
    assert read_metadata(path, key=key)["signature"].startswith("hmac-sha256:")
    assert torch.equal(kquant.load_quantized(fresh(1), path, key=key)(x), model(x))
    assert torch.equal(load_fresh(path)(x), model(x))  # without a key: integrity only
    with pytest.raises(CheckpointError, match="signature does not match"):
        load_fresh(path, key=b"another key")


def test_key_refuses_unsigned_and_stripped_files(saved):
    _, path = saved  # saved without a key
    with pytest.raises(CheckpointError, match="not signed"):
        load_fresh(path, key="k")
    kquant.save_quantized(quantized("w4a16"), path, key="k")
    rewrite(path, lambda m: m.pop("signature"), redigest=True)  # strip the signature, fix the digest
    with pytest.raises(CheckpointError, match="not signed"):
        load_fresh(path, key="k")
    load_fresh(path)  # still a sound unsigned file


def test_key_from_environment(tmp_path, monkeypatch):
    from kquant.checkpoint import KEY_ENV
    assert KEY_ENV == "KQUANT_CHECKPOINT_KEY"
    path = tmp_path / "m.safetensors"
    monkeypatch.setenv(KEY_ENV, "from-env")
    kquant.save_quantized(quantized("w4a16"), path)
    read_metadata(path, key="from-env")  # signed with the variable's key
    load_fresh(path)
    rewrite(path, set_activations("fc2", "dynamic"), redigest=True)
    with pytest.raises(CheckpointError, match="signature does not match"):
        load_fresh(path)
    monkeypatch.setenv(KEY_ENV, "")  # empty = unset
    assert load_fresh(path).fc2.activations == "dynamic"


def test_bad_keys(saved):
    model, path = saved
    with pytest.raises(TypeError, match="key must be bytes or str"):
        kquant.save_quantized(model, path, key=123)
    with pytest.raises(ValueError, match="must not be empty"):
        load_fresh(path, key=b"")


# ----------------------------------------------------------------------------- paths and models
def test_load_from_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory"):
        load_fresh(tmp_path)


def test_save_to_bad_paths_writes_nothing(tmp_path):
    model = quantized("w8a16")
    with pytest.raises(FileNotFoundError, match=r"cannot save .*nope.*m.safetensors: folder .*nope does not exist"):
        kquant.save_quantized(model, tmp_path / "nope" / "m.safetensors")
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory"):
        kquant.save_quantized(model, tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        kquant.save_quantized(model, tmp_path / "file" / "m.safetensors")
    assert os.listdir(tmp_path) == ["file"]


def test_load_into_meta_model_is_refused(saved):
    _, path = saved
    with torch.device("meta"):
        target = Net()
    with pytest.raises(CheckpointError, match=r"'fc1.weight' is on the meta device.*to_empty"):
        kquant.load_quantized(target, path)
    assert isinstance(target.fc1, nn.Linear)
    target = fresh(1)
    target.register_buffer("late", torch.empty(2, device="meta"))
    with pytest.raises(CheckpointError, match=r"'late' is on the meta device"):
        kquant.load_quantized(target, path, strict=False)
    assert isinstance(target.fc1, nn.Linear)
