"""Triton segmented LoRA shrink/expand against float64 oracles, under the interpreter on CPU (real on GPU)."""

import pytest
import torch
from kernel_cases import LORA_CASES, MIXES, TOLERANCE, make_lora, rel_err

from quiver.kernels import lora, reference, torch_lora

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

def check_shrink(c, *, bias=None, activation=None, out_dtype=torch.float32):
    n_proj, _, r_max, _ = c["a"].shape
    out = torch.full((n_proj, c["x"].shape[0], r_max), float("nan"), dtype=out_dtype, device=c["x"].device)
    lora.lora_shrink(c["x"], c["a"], seg_starts=c["seg_starts"], seg_slots=c["seg_slots"], ranks=c["ranks"],
                     out=out, bias=bias, activation=activation)
    ref = reference.lora_shrink(c["x"].cpu(), c["a"].cpu(), c["per_token"], c["ranks"].tolist(),
                                 bias=None if bias is None else bias.cpu(), activation=activation)
    defined = ~ref.isnan()
    out = out.cpu()
    assert out[~defined].isnan().all(), "wrote rows of no-adapter tokens or columns beyond a rank"
    assert rel_err(out[defined], ref[defined]) < TOLERANCE[c["x"].dtype]
    return ref


def check_expand(c, buf, *, bias=None):
    y = c["y"].clone()
    lora.lora_expand(y, buf, c["b"], out_offsets=c["offsets"], seg_starts=c["seg_starts"], seg_slots=c["seg_slots"],
                     ranks=c["ranks"], scales=c["scales"], bias=bias)
    ref = reference.lora_expand(c["y"].cpu(), buf.cpu(), c["b"].cpu(), c["per_token"], c["ranks"].tolist(),
                                 c["scales"].tolist(), c["offsets"], bias=None if bias is None else bias.cpu())
    untouched = torch.tensor([w < 0 for w in c["per_token"]])
    assert torch.equal(y.cpu()[untouched], c["y"].cpu()[untouched])
    assert rel_err(y, ref) < TOLERANCE[y.dtype]


def shrink_then_expand(c):
    """Shrink into an fp32 buffer, then expand from the float64 shrink result (so each op is judged alone)."""
    ref_buf = check_shrink(c)
    check_expand(c, ref_buf.nan_to_num(0.0).float().to(c["x"].device))


@pytest.mark.parametrize("mix,n_proj,dtype", LORA_CASES, ids=[f"{m}-P{p}-{str(d)[6:]}" for m, p, d in LORA_CASES])
def test_lora_mixes(mix, n_proj, dtype):
    n_tokens = {"huge": 80, "zipf": 200}.get(mix, 24)
    c = make_lora(mix, n_proj, dtype, seed=MIXES.index(mix), n_tokens=n_tokens, n_slots=32,
                  h_in=40, out_dims=[24, 8, 8])
    shrink_then_expand(c)


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "silu", "tanh"])
def test_bottleneck_bias_and_activation(activation):
    gen = torch.Generator().manual_seed(7)
    c = make_lora("uniform", 1, torch.float32, seed=11, n_tokens=10, n_slots=4, h_in=24, out_dims=[24])
    n_slots, r_max = c["a"].shape[1], c["a"].shape[2]
    down_bias = torch.randn(n_slots, r_max, generator=gen)
    ref_buf = check_shrink(c, bias=down_bias, activation=activation)
    check_expand(c, ref_buf.nan_to_num(0.0).float(), bias=torch.randn(n_slots, 24, generator=gen))


@pytest.mark.parametrize("mix", ["distinct", "no_adapter"])
def test_bottleneck_apply_in_place(mix):
    """Triton's bottleneck_apply with x = y (as the adapter layers call it): every row's delta is that of its
    input before any delta, and rows without an adapter stay as they were."""
    gen = torch.Generator().manual_seed(13)
    c = make_lora(mix, 1, torch.float32, seed=12, n_tokens=12, n_slots=16, h_in=24, out_dims=[24])
    down_bias, up_bias = torch.randn(16, c["a"].shape[2], generator=gen), torch.randn(16, 24, generator=gen)
    buf = reference.lora_shrink(c["y"], c["a"], c["per_token"], c["ranks"].tolist(), bias=down_bias, activation="gelu")
    want = reference.lora_expand(c["y"], buf.nan_to_num(0.0), c["b"], c["per_token"], c["ranks"].tolist(),
                                 c["scales"].tolist(), c["offsets"], bias=up_bias)
    y = c["y"].clone()
    lora.bottleneck_apply(y, y, c["a"], c["b"], seg_starts=c["seg_starts"], seg_slots=c["seg_slots"], sizes=c["ranks"],
                          scales=c["scales"], down_bias=down_bias, up_bias=up_bias, activation="gelu")
    assert rel_err(y, want) < TOLERANCE[torch.float32]
    untouched = torch.tensor([w < 0 for w in c["per_token"]])
    assert torch.equal(y[untouched], c["y"][untouched])


def test_shrink_writes_out_dtype_of_input():
    c = make_lora("zipf", 3, torch.bfloat16, seed=5, n_tokens=12, n_slots=6, h_in=32, out_dims=[16, 8, 8])
    check_shrink(c, out_dtype=torch.bfloat16)


def test_ops_match_torch_path_end_to_end():
    """shrink → expand through Triton equals the torch serving path, P = 3 with mixed ranks."""
    c = make_lora("no_adapter", 3, torch.float32, seed=3, n_tokens=14, n_slots=5, h_in=32, out_dims=[16, 8, 8])
    kw = dict(seg_starts=c["seg_starts"], seg_slots=c["seg_slots"], ranks=c["ranks"])
    y_triton, y_torch = c["y"].clone(), c["y"].clone()
    for ops, y in ((lora, y_triton), (torch_lora, y_torch)):
        buf = torch.zeros(3, 14, c["a"].shape[2])
        ops.lora_shrink(c["x"], c["a"], out=buf, **kw)
        ops.lora_expand(y, buf, c["b"], out_offsets=c["offsets"], scales=c["scales"], **kw)
    assert rel_err(y_triton, y_torch) < 1e-5


def test_lora_apply_matches_torch_path():
    """The Triton lora_apply (shrink kernel, then expand kernel) equals the torch path's fused one."""
    c = make_lora("uniform", 1, torch.float32, seed=4, n_tokens=14, n_slots=5, h_in=32, out_dims=[16])
    kw = dict(seg_starts=c["seg_starts"], seg_slots=c["seg_slots"], ranks=c["ranks"], scales=c["scales"],
              out_offsets=c["offsets"])
    y_triton, y_torch = c["y"].clone(), c["y"].clone()
    lora.lora_apply(y_triton, c["x"], c["a"], c["b"], **kw)
    torch_lora.lora_apply(y_torch, c["x"], c["a"], c["b"], **kw)
    assert not torch.equal(y_torch, c["y"])
    assert rel_err(y_triton, y_torch) < 1e-5


def test_launcher_rejects_bad_inputs():
    c = make_lora("uniform", 3, torch.float32, seed=1, n_tokens=6, n_slots=3, h_in=16, out_dims=[8, 8, 8])
    kw = dict(seg_starts=c["seg_starts"], seg_slots=c["seg_slots"], ranks=c["ranks"])
    out = torch.empty(3, 6, c["a"].shape[2])
    with pytest.raises(TypeError, match="dtype"):
        lora.lora_shrink(c["x"].half(), c["a"], out=out, **kw)
    with pytest.raises(TypeError, match="seg_slots"):
        lora.lora_shrink(c["x"], c["a"], out=out, **{**kw, "seg_slots": c["seg_slots"].long()})
    with pytest.raises(ValueError, match="P == 1"):
        lora.lora_shrink(c["x"], c["a"], out=out, bias=torch.zeros(3, c["a"].shape[2]), **kw)
    with pytest.raises(ValueError, match="activation"):
        lora.lora_shrink(c["x"], c["a"], out=out, activation="swish", **kw)
    with pytest.raises(ValueError, match="out_offsets"):
        lora.lora_expand(c["y"], out, c["b"], out_offsets=[0, 8, 8], scales=c["scales"], **kw)
    with pytest.raises(TypeError, match="scales"):
        lora.lora_expand(c["y"], out, c["b"], out_offsets=c["offsets"], scales=c["scales"].double(), **kw)


def test_empty_batch_is_a_no_op():
    c = make_lora("uniform", 1, torch.float32, seed=2, n_tokens=4, n_slots=2, h_in=16, out_dims=[8])
    empty = torch.zeros(1, dtype=torch.int32)
    out = torch.full((1, 0, c["a"].shape[2]), 1.0)
    lora.lora_shrink(c["x"][:0], c["a"], seg_starts=empty, seg_slots=empty[:0], ranks=c["ranks"], out=out)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lora_mixes_gpu(mix, dtype):
    n_tokens = 2048 if mix in ("huge", "zipf") else 256
    c = make_lora(mix, 3, dtype, seed=100 + MIXES.index(mix), n_tokens=n_tokens, n_slots=512,
                  h_in=1024, out_dims=[1024, 256, 256], device="cuda")
    shrink_then_expand(c)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_bottleneck_gpu(activation):
    c = make_lora("zipf", 1, torch.bfloat16, seed=9, n_tokens=512, n_slots=64, h_in=1024, out_dims=[1024],
                  device="cuda")
    bias = torch.randn(64, c["a"].shape[2], device="cuda")
    ref_buf = check_shrink(c, bias=bias, activation=activation)
    check_expand(c, ref_buf.nan_to_num(0.0).float().cuda(), bias=torch.randn(64, 1024, device="cuda"))
