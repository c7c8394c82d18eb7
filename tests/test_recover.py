"""kquant.recover: distillation from the float model into a quantized one."""
import copy

import pytest
import torch
from torch import nn

import kquant
from kquant.recover import RecoveryError, distill_loss


class Tiny(nn.Module):
    def __init__(self, k=64, h=96):
        super().__init__()
        self.up = nn.Linear(k, h)
        self.norm = nn.LayerNorm(h)
        self.down = nn.Linear(h, 16)

    def forward(self, x):
        return self.down(torch.relu(self.norm(self.up(x))))


def _setup(preset="w4a16", seed=0):
    torch.manual_seed(seed)
    fp = Tiny()
    data = [torch.randn(32, 64) for _ in range(4)]
    q = kquant.quantize_(copy.deepcopy(fp), preset, progress=False)
    return fp, q, data


def _codes(model):
    return {n: m.packed_weight().qweight.clone() for n, m in model.named_modules()
            if isinstance(m, kquant.QuantLinear)}


@pytest.mark.parametrize("trainable", [("scales",), ("lora",), ("norms", "biases"), ("scales", "lora", "norms")])
def test_recovery_lowers_the_loss_and_keeps_the_codes(trainable):
    fp, q, data = _setup()
    teacher_state = copy.deepcopy(fp.state_dict())
    codes = _codes(q)
    r = kquant.recover(q, fp, data, steps=40, trainable=trainable, lr=3e-3, progress=False)
    assert r.final_loss < 0.9 * r.initial_loss, r
    assert len(r.losses) == r.steps == 40 and not r.stopped_early and r.trained_parameters > 0
    assert all(isinstance(m, kquant.QuantLinear) for m in (q.up, q.down))  # packed again
    for n, c in _codes(q).items():
        assert torch.equal(c, codes[n]), f"{n}: packed codes changed"
    for k, v in fp.state_dict().items():
        assert torch.equal(v, teacher_state[k]), "the teacher changed"
    assert not any(p.requires_grad for p in q.parameters() if p is not q.norm.weight and p is not q.norm.bias)
    assert q.norm.weight.requires_grad  # restored as it was
    with torch.no_grad():
        err = sum(float(distill_loss(q(x), fp(x), x)) for x in data) / len(data)
    assert abs(err - r.final_loss) < 1e-5  # the reported loss is the packed model's


def test_training_weights_may_move_codes():
    fp, q, data = _setup("w4a8")
    codes = _codes(q)
    r = kquant.recover(q, fp, data, steps=30, trainable=("weights", "scales"), lr={"weights": 1e-3}, progress=False)
    assert r.final_loss < r.initial_loss
    assert any(not torch.equal(c, codes[n]) for n, c in _codes(q).items())


def test_adapters_kept_separate_round_trip_and_merge(tmp_path):
    fp, q, data = _setup()
    kquant.recover(q, fp, data, steps=20, trainable="lora", lora_rank=4, progress=False)
    assert q.up.lora_A.shape == (4, 64) and "adapter_rank=4" in repr(q.up)
    x = torch.randn(5, 64)
    path = kquant.save_quantized(q, tmp_path / "m.safetensors")
    back = kquant.load_quantized(Tiny(), path)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    merged = copy.deepcopy(q)
    for m in (merged.up, merged.down):
        m.merge_adapter()
        assert m.lora_A is None
    r = kquant.recover(copy.deepcopy(q), fp, data, steps=1, trainable="norms", lr=0.0, progress=False)
    assert r.steps == 1


def test_merge_lora_option():
    fp, q, data = _setup()
    kquant.recover(q, fp, data, steps=10, trainable="lora", merge_lora=True, progress=False)
    assert q.up.lora_A is None and q.down.lora_A is None


def test_deterministic_with_a_seed_and_early_stop():
    fp, q, data = _setup()
    a = kquant.recover(copy.deepcopy(q), fp, data, steps=15, trainable="scales", seed=3, progress=False)
    b = kquant.recover(copy.deepcopy(q), fp, data, steps=15, trainable="scales", seed=3, progress=False)
    assert a.losses == b.losses
    c = kquant.recover(copy.deepcopy(q), fp, data, steps=500, trainable="biases", lr=0.0, patience=5, progress=False)
    assert c.stopped_early and c.steps < 20


def test_errors():
    fp, q, data = _setup()
    other = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 16))
    with pytest.raises(RecoveryError, match="not the same architecture"):
        kquant.recover(q, other, data, progress=False)
    wrong = Tiny(k=32)
    with pytest.raises(RecoveryError, match=r"up is \[96, 64\] in the model but \[96, 32\]"):
        kquant.recover(q, wrong, data, progress=False)
    with pytest.raises(RecoveryError, match="teacher must be the float model"):
        kquant.recover(q, q, data, progress=False)
    with pytest.raises(RecoveryError, match="no QuantLinear layer"):
        kquant.recover(copy.deepcopy(fp), fp, data, progress=False)
    with pytest.raises(ValueError, match="trainable must name"):
        kquant.recover(q, fp, data, trainable=("scales", "everything"), progress=False)
    with pytest.raises(ValueError, match="steps must be"):
        kquant.recover(q, fp, data, steps=-1, progress=False)
    with pytest.raises(ValueError, match="nothing to train"):
        kquant.recover(q, fp, data, steps=0, progress=False)
    with pytest.raises(ValueError, match="data is empty"):
        kquant.recover(q, fp, [], progress=False)
    with pytest.raises(TypeError, match="list of batches"):
        kquant.recover(q, fp, data[0], progress=False)
    with pytest.raises(ValueError, match="lr must be"):
        kquant.recover(q, fp, data, lr={"everything": 1.0}, progress=False)
    with pytest.raises(ValueError, match="rank must be"):
        q.up.add_adapter(0)
    assert isinstance(q.up, kquant.QuantLinear) and q.up.lora_A is None  # nothing changed by the errors


class Stack(nn.Module):
    """Repeated residual blocks (the shape of a transformer's layers)."""

    def __init__(self, k=48, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(k), nn.Linear(k, 2 * k), nn.GELU(), nn.Linear(2 * k, k))
                                    for _ in range(depth))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def test_block_by_block_phase():
    torch.manual_seed(0)
    fp = Stack()
    data = [torch.randn(4, 10, 48) for _ in range(3)]
    q = kquant.quantize_(copy.deepcopy(fp), "w4a8", progress=False)
    r = kquant.recover(q, fp, data, steps=0, block_steps=15, trainable=("scales", "norms"), lr=3e-3, progress=False)
    assert len(r.block_losses) == 45 and r.steps == 0
    for j in range(3):  # every block's own loss falls
        assert min(r.block_losses[15 * j + 10:15 * j + 15]) < r.block_losses[15 * j]
    assert r.final_loss < r.initial_loss
    assert all(isinstance(b[1], kquant.QuantLinear) for b in q.blocks)
