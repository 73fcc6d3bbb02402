"""The Muon optimizer for convolution filters (imgrec.engine.muon) and its wiring into training."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from imgrec.config import RunConfig, TrainConfig, validate
from imgrec.engine.muon import ConvMuon, muon_groups, orthogonalize
from imgrec.engine.trainer import build_optimizer, build_scheduler


@pytest.mark.parametrize("shape", [(16, 72), (72, 16), (8, 8)])
def test_orthogonalize_flattens_the_spectrum(shape):
    torch.manual_seed(0)
    # a badly conditioned matrix: singular values spread over three orders of magnitude
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    s = torch.logspace(0, -3, k)
    g = u[:, :k] @ torch.diag(s) @ v[:k, :]
    o = orthogonalize(g)
    assert o.shape == g.shape
    sv = torch.linalg.svdvals(o)
    assert sv.max() < 1.3 and sv[: k // 2].min() > 0.5  # the large directions all land near 1
    # same singular vectors: the top direction of g is kept
    assert torch.dot(o @ v[0], u[:, 0]).item() > 0.5


def _net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.LazyLinear(4))


def _batch():
    g = torch.Generator().manual_seed(2)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def _steps(model, opt, n):
    x, y = _batch()
    for _ in range(n):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_groups_split_filters_from_the_rest():
    model = _net()
    model(_batch()[0])  # materialise the lazy layer
    groups = muon_groups(model, weight_decay=5e-4, muon_lr=0.2, lr=0.4)
    muon = [p for g in groups if g["muon"] for p in g["params"]]
    assert [p.shape for p in muon] == [model[0].weight.shape]
    decayed = [p for g in groups if not g["muon"] and g["weight_decay"] > 0 for p in g["params"]]
    assert [p.shape for p in decayed] == [model[4].weight.shape]  # the linear weight; BN and biases undecayed
    assert {g["peak_lr"] for g in groups} == {0.2, 0.4}


def test_filters_keep_their_norm_and_move_by_lr():
    model = _net()
    model(_batch()[0])
    opt = ConvMuon(muon_groups(model, 0.0, muon_lr=0.1, lr=0.1), lr=0.1)
    w0 = model[0].weight.detach().clone()
    _steps(model, opt, 1)
    w1 = model[0].weight.detach()
    rows = w1.size(0)
    # one step: rescaled to √rows, then an update of Frobenius norm ≈ lr·√rows (semi-orthogonal, rows ≤ cols)
    rescaled = w0 * rows ** 0.5 / w0.norm()
    rel = (w1 - rescaled).norm() / rescaled.norm()
    assert 0.05 < rel < 0.15
    _steps(model, opt, 5)
    assert abs(model[0].weight.norm().item() - rows ** 0.5) < 0.2 * rows ** 0.5


def test_sgd_groups_match_torch_sgd():
    a = _net()
    a(_batch()[0])
    b = copy.deepcopy(a)
    rest = lambda m: [p for n, p in m.named_parameters() if not n.startswith("0.")]  # noqa: E731
    for p in (a[0].weight, b[0].weight):
        p.requires_grad_(False)
    ours = ConvMuon([{"params": rest(a), "muon": False, "weight_decay": 1e-2}], lr=0.05, momentum=0.9)
    ref = torch.optim.SGD(rest(b), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    _steps(a, ours, 4)
    _steps(b, ref, 4)
    for pa, pb in zip(rest(a), rest(b)):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_sgd_runs_step_as_torch_sgd_and_resume_its_checkpoints():
    """--optimizer sgd builds ConvMuon's SGD groups (no torch._dynamo import): the same updates as
    torch.optim.SGD with the same groups, and a state dict written by torch.optim.SGD (a checkpoint of an earlier
    SGD run) resumes into it and goes on as torch.optim.SGD would."""
    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    a = _net()
    a(_batch()[0])
    b = copy.deepcopy(a)
    ours = build_optimizer(a, cfg)
    assert isinstance(ours, ConvMuon) and not any(g["muon"] for g in ours.param_groups)
    decay = [p for p in b.parameters() if p.ndim >= 2]
    ref = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4},
                           {"params": [p for p in b.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                          lr=0.05, momentum=0.9, nesterov=True)
    _steps(a, ours, 3)
    _steps(b, ref, 3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    c = copy.deepcopy(b)
    resumed = build_optimizer(c, cfg)
    resumed.load_state_dict(copy.deepcopy(ref.state_dict()))
    _steps(b, ref, 3)
    _steps(c, resumed, 3)
    for pb, pc in zip(b.parameters(), c.parameters()):
        torch.testing.assert_close(pb, pc, rtol=1e-5, atol=1e-6)


def test_state_dict_resumes_exactly():
    a = _net()
    a(_batch()[0])
    cfg = TrainConfig(optimizer="muon", lr=0.1, muon_lr=0.2, scheduler="onecycle")
    opt = build_optimizer(a, cfg)
    assert isinstance(opt, ConvMuon)
    sched = build_scheduler(opt, cfg, total_steps=10)
    peaks = [g["peak_lr"] for g in opt.param_groups]
    for _ in range(3):
        _steps(a, opt, 1)
        sched.step()
    b = copy.deepcopy(a)
    opt_b = build_optimizer(b, cfg)
    sched_b = build_scheduler(opt_b, cfg, total_steps=10)
    # deep copies, as a checkpoint file gives (load_state_dict keeps the tensors it is given)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    sched_b.load_state_dict(copy.deepcopy(sched.state_dict()))
    for _ in range(3):
        _steps(a, opt, 1)
        sched.step()
        _steps(b, opt_b, 1)
        sched_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    # one-cycle peaks at each group's own rate
    assert peaks == [0.2, 0.1, 0.1]
    assert max(sched.get_last_lr()) <= 0.2


def test_config_accepts_muon_and_rejects_unknown_optimizers():
    cfg = RunConfig()
    cfg.train.optimizer = "muon"
    validate(cfg)
    cfg.train.optimizer = "lion"
    with pytest.raises(Exception, match="optimizer must be one of"):
        validate(cfg)


_NO_DYNAMO = """
import sys, torch
from imgrec.config import TrainConfig
from imgrec.engine.trainer import build_optimizer, build_scheduler
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 4))
for name in ("muon", "sgd"):
    cfg = TrainConfig(optimizer=name, compile={compile})
    opt = build_optimizer(net, cfg)
    sched = build_scheduler(opt, cfg, 10)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        net(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
        sched.step()
    opt.load_state_dict(opt.state_dict())
print("torch._dynamo" in sys.modules)
"""


@pytest.mark.parametrize("compile_", [False, True])
def test_muon_and_sgd_runs_do_not_import_dynamo_unless_they_compile(compile_):
    """torch.optim's wrappers import torch._dynamo (about a second) on their first call; a run that compiles
    nothing skips it (Muon's and imgrec's SGD steps need no dynamo; torch's own SGD and Adam steps import it
    anyway), and one that compiles keeps torch's wrappers as they are."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _NO_DYNAMO.replace("{compile}", str(compile_))],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(compile_)]
