"""fgic.syncbn: N gloo processes on CPU must reproduce plain BatchNorm on the global batch, eager and compiled, with
one collective per layer forward and one backward."""

import datetime
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fgic import syncbn
from fgic.syncbn import AllReduceBatchNorm, convert_sync_batchnorm

N, STEPS, TOL = 7, 2, 1e-12  # global batch (7 splits unevenly over 2 or 3 ranks), train steps
CHECKS = ("out", "xgrad", "eval")  # per-sample results, concatenated over ranks in the parent


def _make_net() -> nn.Sequential:
    """Small float64 net covering BN2d, BN2d(momentum=None, affine=False), BN1d(no running stats)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5, momentum=None, affine=False), nn.Flatten(),
        nn.Linear(5 * 4 * 4, 6), nn.BatchNorm1d(6, track_running_stats=False),
    ).double()
    with torch.no_grad():  # non-trivial affine parameters
        for m in net.modules():
            if isinstance(m, _BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, N, 3, 6, 6, generator=g, dtype=torch.float64) * 2 + 0.5
    proj = torch.randn(STEPS, N, 6, generator=g, dtype=torch.float64)  # loss = sum(out * proj)
    return x, proj


def _run(net, x, proj, step=None) -> dict:
    """STEPS train forward/backward passes (param grads accumulate) through `step` (default: net, else e.g. its
    compiled form), then one eval pass."""
    outs, xgrads = [], []
    for xs, ps in zip(x, proj):
        xs = xs.clone().requires_grad_()
        out = (step or net)(xs)
        (out * ps).sum().backward()
        outs.append(out.detach())
        xgrads.append(xs.grad)
    net.eval()
    with torch.no_grad():  # stop before the last BN: without running stats it uses local batch stats
        ev = net[:-1](x[0])
    return {"out": torch.stack(outs), "xgrad": torch.stack(xgrads), "eval": ev,
            "grads": {k: p.grad for k, p in net.named_parameters()}, "state": net.state_dict()}


def _worker(rank: int, world: int, port: int, outdir) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        x, proj = _data()
        idx = torch.tensor_split(torch.arange(N), world)[rank]  # contiguous slice of the batch
        res = {}
        for kind in ("sync", "plain", "compiled"):
            net = _make_net()
            if kind != "plain":
                net = convert_sync_batchnorm(net)
            # fullgraph: a graph break (a host read such as .item(), an eager collective) fails the compile. aot_eager:
            # dynamo and AOT autograd trace forward and backward, without inductor's code generation (minutes here)
            step = torch.compile(net, backend="aot_eager", fullgraph=True) if kind == "compiled" else None
            r = _run(net, x[:, idx], proj[:, idx], step)
            for g in r["grads"].values():  # global loss = sum of local losses
                dist.all_reduce(g)
            res[kind] = r
        res["collectives"] = _collectives(x[0, idx])

        # Only rank 0 holds data: empty local batches must work, and a global count of 1 must raise.
        z = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        bn = AllReduceBatchNorm(3, momentum=None).double()
        res["empty_out"] = bn(z if rank == 0 else z[:0]).detach()
        res["empty_state"] = bn.state_dict()
        try:
            bn(z[:1] if rank == 0 else z[:0])
            res["error"] = None
        except ValueError as e:
            res["error"] = str(e)
        torch.save(res, outdir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _collectives(x) -> dict:
    """The functional collectives one BatchNorm layer's training forward and backward issue."""
    calls = {"forward": [], "backward": []}
    phase = "forward"

    def counted(name):
        def op(*args):
            calls[phase].append(name)
            return getattr(torch.ops._c10d_functional, name)(*args)
        return op
    real = syncbn._c10d
    syncbn._c10d = SimpleNamespace(wait_tensor=real.wait_tensor, **{n: counted(n) for n in
                                                                    ("all_gather_into_tensor", "all_reduce")})
    try:
        x = x.clone().requires_grad_()
        out = convert_sync_batchnorm(nn.BatchNorm2d(3).double())(x)
        phase = "backward"
        out.pow(2).sum().backward()
    finally:
        syncbn._c10d = real
    return calls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    """Per-rank result dicts of one multi-process run."""
    world, outdir = request.param, tmp_path_factory.mktemp(f"world{request.param}")
    mp.spawn(_worker, args=(world, _free_port(), outdir), nprocs=world, join=True)
    return [torch.load(outdir / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def reference():
    """One process, plain BatchNorm, the whole global batch."""
    return _run(_make_net(), *_data())


def _max_diff(a, b) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _diffs(ranks, ref, kind) -> dict:
    """Max abs difference of every compared quantity between the ranks and the reference."""
    d = {k: _max_diff(torch.cat([r[kind][k] for r in ranks], dim=1 if k != "eval" else 0), ref[k])
         for k in CHECKS}
    for r in ranks:
        for group in ("grads", "state"):
            assert r[kind][group].keys() == ref[group].keys()
            for name, t in r[kind][group].items():
                d[f"{group}.{name}"] = max(d.get(f"{group}.{name}", 0.0), _max_diff(t, ref[group][name]))
    return d


@pytest.mark.e2e
def test_matches_global_batchnorm(ranks, reference):
    diffs = _diffs(ranks, reference, "sync")
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, bad
    assert all(int(r["sync"]["state"][f"{i}.num_batches_tracked"]) == STEPS for r in ranks for i in (1, 4))


@pytest.mark.e2e
def test_compiled_matches_global_batchnorm_in_one_graph(ranks, reference):
    """torch.compile(fullgraph=True) of the converted net traces it whole (no graph break, the collectives in the
    graph, forward and backward) and gives the eager statistics and gradients."""
    diffs = _diffs(ranks, reference, "compiled")
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, bad


@pytest.mark.e2e
def test_one_collective_per_layer_each_way(ranks):
    for r in ranks:
        assert r["collectives"] == {"forward": ["all_gather_into_tensor"], "backward": ["all_reduce"]}


@pytest.mark.e2e
def test_unsynchronized_batchnorm_differs(ranks, reference):
    # Guards against a vacuous comparison: per-process BN statistics are clearly different.
    diffs = _diffs(ranks, reference, "plain")
    assert diffs["state.1.running_mean"] > 1e-3 and diffs["state.4.running_var"] > 1e-3
    assert diffs["out"] > 1e-3 and diffs["xgrad"] > 1e-3


@pytest.mark.e2e
def test_empty_local_batch_and_global_count_one(ranks):
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = nn.BatchNorm1d(3, momentum=None).double()
    assert _max_diff(ranks[0]["empty_out"], ref(z).detach()) <= TOL
    for r in ranks:
        assert r["empty_out"].shape[0] == (5 if r is ranks[0] else 0)
        for k, t in ref.state_dict().items():
            assert _max_diff(r["empty_state"][k], t) <= TOL, k
        assert "Expected more than 1 value per channel when training" in r["error"]


def _bn_pair(**kw):
    torch.manual_seed(3)
    ref = nn.BatchNorm2d(4, **kw)
    bn = AllReduceBatchNorm(4, **kw)
    bn.load_state_dict(ref.state_dict())
    return ref, bn


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_single_process_training_matches_batchnorm(momentum, dtype, tol):
    """Without a process group the same statistics code runs with the all-reduces skipped."""
    assert not dist.is_initialized()
    ref, bn = (m.to(dtype) for m in _bn_pair(momentum=momentum))
    for _ in range(2):
        x = torch.randn(3, 4, 5, 5, dtype=dtype) * 3 + 1
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [m(xi) for m, xi in zip((ref, bn), xs)]
        for o in outs:
            o.pow(2).sum().backward()
        assert outs[1].dtype == dtype
        torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=tol, atol=tol)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad, rtol=tol, atol=tol)
    for k, t in ref.state_dict().items():
        torch.testing.assert_close(bn.state_dict()[k], t, rtol=tol, atol=tol, msg=k)


def test_fallback_eval_mode():
    ref, bn = _bn_pair()
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    bn.load_state_dict(ref.state_dict())
    ref.eval(), bn.eval()
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(ref(x), bn(x))
    assert int(bn.num_batches_tracked) == 0


def test_convert_resnet18():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(weights=None)
    model.layer1[0].bn1.weight.requires_grad_(False)
    model.layer2.eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    before = model.state_dict()
    modes = [m.training for m in model.modules()]

    conv = convert_sync_batchnorm(model, "cpu")
    bns = [m for m in conv.modules() if isinstance(m, _BatchNorm)]
    assert n_bn == 20 and len(bns) == n_bn and all(type(m) is AllReduceBatchNorm for m in bns)
    after = conv.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == t.data_ptr() and torch.equal(after[k], t) for k, t in before.items())
    assert [m.training for m in conv.modules()] == modes
    assert not conv.layer1[0].bn1.weight.requires_grad and conv.layer1[0].bn2.weight.requires_grad
    # Already converted layers are left alone; checkpoints load both ways.
    assert convert_sync_batchnorm(conv, "cpu").layer1[0].bn1 is conv.layer1[0].bn1
    tv.models.resnet18(weights=None).load_state_dict(conv.state_dict())


def test_convert_standalone_and_cuda():
    bn = nn.BatchNorm3d(2, eps=1e-3, momentum=None, affine=False).eval()
    out = convert_sync_batchnorm(bn, "cpu")
    assert type(out) is AllReduceBatchNorm and not out.training
    assert (out.eps, out.momentum, out.affine, out.track_running_stats) == (1e-3, None, False, True)
    assert out.running_mean is bn.running_mean
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert type(convert_sync_batchnorm(model, "cuda")[1]) is AllReduceBatchNorm  # torch's syncs the host per layer
