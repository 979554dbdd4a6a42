"""statecast.arch.mamba: parallel vs recurrent agreement, state handoff, parity with
transformers' MambaForCausalLM / FalconMambaForCausalLM / JambaMambaMixer, the selective
scan against the float64 sequential reference, low precision, the compiled scan and the
"auto" choice between it and the pure path."""

from __future__ import annotations

import math

import pytest
import torch
from factories import parallel_and_steps, run_steps
from transformers import FalconMambaConfig as HfFalconMambaConfig
from transformers import FalconMambaForCausalLM, JambaConfig, MambaForCausalLM
from transformers import MambaConfig as HfMambaConfig
from transformers.cache_utils import DynamicCache
from transformers.models.jamba.modeling_jamba import JambaMambaMixer

from statecast.arch.mamba import (
    SCAN_SEGMENT,
    Mamba,
    MambaConfig,
    MambaMixer,
    MambaState,
    compiled_scan_available,
    compiled_scan_status,
    selective_scan,
    selective_scan_compiled,
    selective_scan_sequential,
)
from statecast.families.mamba import FALCON_HF, HF
from statecast.families.tables import to_canonical_state

K = SCAN_SEGMENT
V = 97
SMALL = MambaConfig(vocab_size=V, d_model=32, n_layer=3, d_inner=64, d_state=8, d_conv=4, dt_rank=4, tie_embeddings=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter away from the init schedule (A_log = log(1..N), D = 1, zero
    biases, unit norms) so that each one matters in the comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(".D") or name.endswith("norm.weight") or "layernorm" in name or name.endswith("norm_f.weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.normal_(0, 1.0, generator=g)


def make_model(cfg: MambaConfig = SMALL, seed: int = 0) -> Mamba:
    model = Mamba(cfg)
    model.reset_parameters(generator=torch.Generator().manual_seed(seed))
    perturb_(model, seed + 100)
    return model.eval()


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Max abs difference within ``rel`` of the larger magnitude (floor 1)."""
    scale = max(1.0, a.abs().max().item(), b.abs().max().item())
    return (a.float() - b.float()).abs().max().item() <= rel * scale


def assert_same_state(a: MambaState, b: MambaState, rel: float = 1e-5):
    assert a.conv.shape == b.conv.shape and a.ssm.shape == b.ssm.shape
    assert close(a.conv, b.conv, rel), (a.conv - b.conv).abs().max()
    assert close(a.ssm, b.ssm, rel), (a.ssm - b.ssm).abs().max()


# --------------------------------------------------------------------------- config / layout


def test_config_roundtrip_and_validation():
    uni = SMALL.to_unified()
    assert uni["layer_kinds"] == ["mamba"] * 3
    assert MambaConfig.from_unified({**uni, "family": "mamba"}) == SMALL
    with pytest.raises(ValueError, match="layer_kinds"):
        MambaConfig.from_unified({**uni, "layer_kinds": ["mamba", "attention", "mamba"]})
    with pytest.raises(ValueError, match="lacks"):
        MambaConfig.from_unified({k: v for k, v in uni.items() if k != "dt_rank"})
    with pytest.raises(ValueError, match="bcdt_norm"):
        MambaConfig.from_unified({**uni, "bcdt_norm": "layernorm"})
    with pytest.raises(ValueError, match="d_conv"):
        MambaConfig.from_unified({**uni, "d_conv": 1})
    with pytest.raises(ValueError, match="d_state"):
        MambaConfig.from_unified({**uni, "d_state": 0})


@pytest.mark.parametrize("variant", ["untied", "tied", "falcon", "jamba_like"])
def test_state_dict_names(variant):
    base = {k: v for k, v in SMALL.to_unified().items() if k != "layer_kinds"}
    cfg = MambaConfig(
        **{
            **base,
            **{
                "untied": {},
                "tied": {"tie_embeddings": True},
                "falcon": {"bcdt_norm": "rms", "tie_embeddings": True},
                "jamba_like": {"bcdt_norm": "rms_weighted", "proj_bias": True, "conv_bias": False},
            }[variant],
        }
    )
    C, E, N, W, R, L = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.dt_rank, cfg.n_layer
    expected = {"embed.weight": (V, C), "final_norm.weight": (C,)}
    if not cfg.tie_embeddings:
        expected["lm_head.weight"] = (V, C)
    for i in range(L):
        p = f"layers.{i}."
        expected.update(
            {
                p + "mixer_norm.weight": (C,),
                p + "mamba.in_proj.weight": (2 * E, C),
                p + "mamba.conv1d.weight": (E, 1, W),
                p + "mamba.x_proj.weight": (R + 2 * N, E),
                p + "mamba.dt_proj.weight": (E, R),
                p + "mamba.dt_proj.bias": (E,),
                p + "mamba.A_log": (E, N),
                p + "mamba.D": (E,),
                p + "mamba.out_proj.weight": (C, E),
            }
        )
        if cfg.conv_bias:
            expected[p + "mamba.conv1d.bias"] = (E,)
        if cfg.proj_bias:
            expected[p + "mamba.in_proj.bias"] = (2 * E,)
            expected[p + "mamba.out_proj.bias"] = (C,)
        if cfg.bcdt_norm == "rms_weighted":
            expected[p + "mamba.dt_norm.weight"] = (R,)
            expected[p + "mamba.b_norm.weight"] = (N,)
            expected[p + "mamba.c_norm.weight"] = (N,)
    model = Mamba(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    logits, state = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, V) and torch.isfinite(logits).all()


def test_init_state_init_and_meta():
    model = Mamba(SMALL).eval()
    st = model.init_state(2)
    assert st.conv.shape == (3, 2, 64, 3) and st.conv.dtype == torch.float32
    assert st.ssm.shape == (3, 2, 64, 8) and st.ssm.dtype == torch.float32
    assert not st.conv.any() and not st.ssm.any()
    mixer = model.layers[0].mamba
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1.0, 9.0)).expand(64, 8))
    assert torch.equal(mixer.D, torch.ones(64))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    a, b = Mamba(SMALL), Mamba(SMALL)
    a.reset_parameters(torch.Generator().manual_seed(3))
    b.reset_parameters(torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with torch.no_grad():
        logits, _ = model(torch.randint(0, V, (2, 20)))
    assert torch.isfinite(logits).all() and logits.std() > 1e-3
    with torch.device("meta"):  # shapes only: no init runs
        meta = Mamba(SMALL)
    assert meta.layers[0].mamba.A_log.is_meta


# --------------------------------------------------------------------------- selective scan


def _scan_inputs(B=2, T=2 * K + 7, E=40, N=8, seed=0, extreme=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, E, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(B, T, E, generator=g) * 2 - 3)
    A = -torch.exp(torch.randn(E, N, generator=g) + 1.0)
    if extreme:  # decays from ~1 (dt*|A| ~ 1e-4) to far below float32's range (dt*|A| ~ 1e3)
        dt = torch.exp(torch.empty(B, T, E).uniform_(math.log(1e-4), math.log(20.0), generator=g))
        A = -torch.exp(torch.empty(E, N).uniform_(math.log(0.5), math.log(50.0), generator=g))
    Bm = torch.randn(B, T, N, generator=g)
    Cm = torch.randn(B, T, N, generator=g)
    h = torch.randn(B, E, N, generator=g)
    return x, dt, A, Bm, Cm, h


@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("segment", [None, 1, 5, 64])
def test_selective_scan_matches_sequential(segment, extreme):
    args = _scan_inputs(extreme=extreme, seed=int(extreme))
    ref_y, ref_h = selective_scan_sequential(*(t.double() for t in args))
    with torch.no_grad():
        y, h = selective_scan(*args, segment=segment)
    assert y.dtype == torch.float32 and h.shape == ref_h.shape
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert ((y - ref_y).abs().max() / ref_y.abs().max()) < 1e-5
    assert ((h - ref_h).abs().max() / ref_h.abs().max()) < 1e-5


def test_selective_scan_autograd_path():
    """With autograd recording the scan runs without out= buffers: same values, and its
    gradients equal those of the sequential reference."""
    args = [t.clone().requires_grad_(True) for t in _scan_inputs(T=K + 9, seed=2)]
    y, h = selective_scan(*args)
    with torch.no_grad():
        y0, h0 = selective_scan(*args)
    torch.testing.assert_close(y, y0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h, h0, atol=1e-6, rtol=1e-6)
    (y.square().mean() + h.square().mean()).backward()
    grads = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    ys, hs = selective_scan_sequential(*args)
    (ys.square().mean() + hs.square().mean()).backward()
    for g1, a in zip(grads, args):
        torch.testing.assert_close(g1, a.grad, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- parallel vs recurrent


@pytest.mark.parametrize("T", [2, 3, 9, K, 2 * K + 7])
@pytest.mark.parametrize("with_state", [False, True])
def test_parallel_matches_steps(T, with_state):
    lp, sp, ls, ss = parallel_and_steps(make_model(), V, T, warm=5 if with_state else 0)
    assert lp.shape == (2, T, V)
    assert close(lp, ls), (lp - ls).abs().max()
    assert_same_state(sp, ss)


@pytest.mark.parametrize("split", [1, 2, 3, K, K + 5])
def test_split_prompt_equals_one_call(split):
    """A prompt in pieces (parallel then steps, or two parallel calls) equals one call;
    splits shorter than the conv window (1, 2 < d_conv - 1 = 3) included."""
    model = make_model(seed=1)
    ids = torch.randint(0, V, (2, 2 * K + 11), generator=torch.Generator().manual_seed(split))
    with torch.no_grad():
        full, full_state = model(ids)
        a, st = model(ids[:, :split])
        b, st = model(ids[:, split:], st)
        assert close(torch.cat([a, b], 1), full)
        assert_same_state(st, full_state)
        pre, st = model(ids[:, : split + 1])
        rest, st = run_steps(model, ids[:, split + 1 : split + 9], st)
        assert close(torch.cat([pre, rest], 1), full[:, : split + 9])


def test_batch_rows_are_independent_and_state_untouched():
    model = make_model(seed=2)
    ids = torch.randint(0, V, (3, K + 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, st0 = model(torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(6)))
        copy = [t.clone() for t in st0]
        logits, st = model(ids, st0)
        for b, a in zip(copy, st0):
            assert torch.equal(b, a)
        for r in range(3):
            row, row_st = model(ids[r : r + 1], MambaState(st0.conv[:, r : r + 1], st0.ssm[:, r : r + 1]))
            assert close(row, logits[r : r + 1])
            assert close(row_st.ssm, st.ssm[:, r : r + 1]) and close(row_st.conv, st.conv[:, r : r + 1])


def test_step_shapes_and_output_hidden():
    model = make_model()
    with torch.no_grad():
        a, st = model.step(torch.tensor([3, 4]), None)
        b, _ = model.step(torch.tensor([[3], [4]]), None)
        assert a.shape == (2, V) and b.shape == (2, 1, V) and torch.equal(a, b[:, 0])
        assert st.ssm.shape == (3, 2, 64, 8) and st.ssm.dtype == torch.float32
        ids = torch.randint(0, V, (2, 17))
        logits, _, hidden = model(ids, output_hidden=True)
        assert len(hidden) == SMALL.n_layer and all(h.shape == (2, 17, SMALL.d_model) for h in hidden)
        torch.testing.assert_close(model.lm_head(model.final_norm(hidden[-1])), logits, atol=1e-6, rtol=1e-6)
        plain, _ = model(ids)
        assert torch.equal(plain, logits)


# --------------------------------------------------------------------------- transformers parity


def _hf_config(cls, tie: bool, **extra):
    return cls(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=3,
        state_size=8,
        expand=2,
        conv_kernel=4,
        time_step_rank=4,
        tie_word_embeddings=tie,
        **extra,
    )


def _pair(kind: str, tie: bool):
    torch.manual_seed(0)
    if kind == "mamba":
        hf = MambaForCausalLM(_hf_config(HfMambaConfig, tie)).eval()
        fmt, extra = HF, {}
    else:
        hf = FalconMambaForCausalLM(_hf_config(HfFalconMambaConfig, tie, mixer_rms_eps=1e-5)).eval()
        fmt, extra = FALCON_HF, {"bcdt_norm": "rms", "bcdt_norm_eps": 1e-5}
    perturb_(hf, 7)
    if not tie:
        with torch.no_grad():
            hf.lm_head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(8))
    base = {k: v for k, v in SMALL.to_unified().items() if k != "layer_kinds"}
    ours = Mamba(MambaConfig(**{**base, "tie_embeddings": tie, **extra})).eval()
    state = to_canonical_state(fmt, hf.state_dict())
    if tie:
        state.pop("lm_head.weight", None)
    ours.load_state_dict(state, strict=True)
    return hf, ours


@pytest.mark.parametrize("kind", ["mamba", "falcon"])
@pytest.mark.parametrize("tie", [True, False])
def test_matches_transformers(kind, tie):
    hf, ours = _pair(kind, tie)
    ids = torch.randint(0, V, (2, K + 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        logits, _, hidden = ours(ids, output_hidden=True)
    assert close(logits, ref.logits), (logits - ref.logits).abs().max()
    # HF: hidden_states[i] = residual stream after block i (no embedding entry), then norm_f
    assert len(ref.hidden_states) == SMALL.n_layer + 1
    for i, h in enumerate(hidden):
        assert close(h, ref.hidden_states[i]), (i, (h - ref.hidden_states[i]).abs().max())
    assert close(ours.final_norm(hidden[-1]), ref.hidden_states[-1])


@pytest.mark.parametrize("kind", ["mamba", "falcon"])
def test_steps_match_transformers_cache(kind):
    """HF prefill with use_cache, then one token at a time through its cache (the
    LinearAttentionLayer conv/recurrent states); ours: prefill, then step."""
    hf, ours = _pair(kind, tie=True)
    ids = torch.randint(0, V, (2, 14), generator=torch.Generator().manual_seed(3))
    P = 6
    with torch.no_grad():
        out = hf(ids[:, :P], use_cache=True)
        cache, hf_logits = out.cache, [out.logits]
        for t in range(P, ids.shape[1]):
            out = hf(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            hf_logits.append(out.logits)
        hf_logits = torch.cat(hf_logits, 1)
        pre, st = ours(ids[:, :P])
        rest, st = run_steps(ours, ids[:, P:], st)
    assert close(torch.cat([pre, rest], 1), hf_logits), (torch.cat([pre, rest], 1) - hf_logits).abs().max()
    for i in range(SMALL.n_layer):  # HF keeps the last W inputs, we keep W-1; the ssm state is the same
        assert close(st.conv[i], cache.layers[i].conv_states[0][..., 1:])
        assert close(st.ssm[i], cache.layers[i].recurrent_states[0])


def test_rms_weighted_mixer_matches_jamba():
    """bcdt_norm="rms_weighted" with proj/conv bias flags against JambaMambaMixer: whole
    sequence, and step by step against Jamba's cache path."""
    jc = JambaConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1,
        expert_layer_period=2, expert_layer_offset=1, num_experts=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
        mamba_proj_bias=True, mamba_conv_bias=False, rms_norm_eps=1e-5,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = JambaMambaMixer(jc, layer_idx=0).eval()
    perturb_(hf, 9)
    ours = MambaMixer(32, 64, 8, 4, 4, proj_bias=True, conv_bias=False, bcdt_norm="rms_weighted", bcdt_norm_eps=1e-5)
    rename = {"dt_layernorm.weight": "dt_norm.weight", "b_layernorm.weight": "b_norm.weight",
              "c_layernorm.weight": "c_norm.weight"}  # fmt: skip
    ours.load_state_dict({rename.get(k, k): v for k, v in hf.state_dict().items()}, strict=True)
    ours.eval()
    x = torch.randn(2, K + 5, 32, generator=torch.Generator().manual_seed(4))
    conv0, ssm0 = torch.zeros(2, 64, 3), torch.zeros(2, 64, 8)
    with torch.no_grad():
        ref = hf(x)
        out, conv, ssm = ours(x, conv0, ssm0)
        assert close(out, ref), (out - ref).abs().max()
        cache = DynamicCache(config=jc)
        hf_steps = [hf(x[:, :3], cache=cache)] + [hf(x[:, t : t + 1], cache=cache) for t in range(3, 9)]
        o, c, s = ours(x[:, :3], conv0, ssm0)
        steps = [o]
        for t in range(3, 9):
            o, c, s = ours(x[:, t : t + 1], c, s)
            steps.append(o)
    assert close(torch.cat(steps, 1), torch.cat(hf_steps, 1))
    assert close(torch.cat(steps, 1), ref[:, :9])
    assert close(s, cache.layers[0].recurrent_states[0])


# --------------------------------------------------------------------------- low precision


def test_bfloat16_model_runs_and_stays_close():
    model = make_model(seed=5)
    ids = torch.randint(0, V, (2, K + 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, _ = model(ids)
        low = make_model(seed=5).to(torch.bfloat16)
        logits, state = low(ids)
        steps, st2 = run_steps(low, ids[:, :6], None)
    assert logits.dtype == torch.bfloat16 and state.conv.dtype == torch.bfloat16
    assert state.ssm.dtype == torch.float32
    assert torch.isfinite(logits).all() and torch.isfinite(steps).all()
    err = (logits.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, err
    assert ((steps.float() - ref[:, :6]).abs().max() / ref.abs().max()) < 0.05
    agree = (logits.float().argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree > 0.8, agree


# --------------------------------------------------------------------------- compiled scan


@pytest.fixture(scope="module")
def compiled():
    """The compiled scan is a tested feature: the machines the suite runs on (this one, CI)
    have the C++ toolchain, so a missing compiler, a failed build or a failed self-check fails
    here. Built once per session (torch caches it on disk after that)."""
    import statecast.arch.mamba as mamba_mod

    assert mamba_mod._toolchain_missing() is None, mamba_mod._toolchain_missing()
    assert compiled_scan_available(), compiled_scan_status()


@pytest.mark.parametrize("E", [40, 64])
def test_compiled_scan_matches_pure(compiled, E):
    for extreme in (False, True):
        args = _scan_inputs(B=3, E=E, extreme=extreme, seed=E)
        ref_y, ref_h = selective_scan_sequential(*(t.double() for t in args))
        y, h = selective_scan_compiled(*args)
        assert ((y - ref_y).abs().max() / ref_y.abs().max()) < 1e-5
        assert ((h - ref_h).abs().max() / ref_h.abs().max()) < 1e-5


def test_compiled_scan_with_gate_and_out(compiled):
    """The fused form, y = (scan + D x) * silu(z), written over dt (out=dt)."""
    x, dt, A, Bm, Cm, h = _scan_inputs(B=2, E=40, seed=3)
    D = torch.randn(40)
    z = torch.randn(2, x.shape[1], 80)[..., 40:]  # a strided view, as in the mixer
    y_ref, h_ref = selective_scan(x, dt, A, Bm, Cm, h)
    y_ref = (y_ref + x * D) * torch.nn.functional.silu(z)
    buf = dt.clone()
    y, hT = selective_scan_compiled(x, buf, A, Bm, Cm, h, D, z, out=buf)
    assert y.data_ptr() == buf.data_ptr()
    assert close(y, y_ref) and close(hT, h_ref)


def test_compiled_path_in_model(compiled):
    """The model with scan_impl="compiled" (conv and scan kernels) equals the pure path,
    in one call and split into pieces shorter than the conv window; autograd falls back."""
    model = make_model(seed=6)
    ids = torch.randint(0, V, (2, 2 * K + 3), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref, ref_state = model(ids)
        model.set_kernels("compiled")
        try:
            logits, state = model(ids)
            a, st = model(ids[:, :2])
            b, st = model(ids[:, 2:], st)
        finally:
            model.set_kernels("torch")
    assert close(logits, ref) and close(state.ssm, ref_state.ssm) and close(state.conv, ref_state.conv)
    assert close(torch.cat([a, b], 1), ref) and close(st.ssm, ref_state.ssm)
    model.set_kernels("compiled")
    logits, _ = model(ids[:, :9])  # grad enabled, parameters require grad: the pure path
    logits.square().mean().backward()
    assert model.layers[0].mamba.A_log.grad is not None
    model.set_kernels("torch")
    with pytest.raises(ValueError):
        model.set_kernels("cuda")


def test_auto_kernels_choose_compiled_where_it_runs(compiled):
    """set_kernels("auto"): the compiled kernels for a float32 CPU model where they build and
    pass the self-check; the pure path, saying why, for another dtype or device."""
    model = make_model(seed=7)
    ids = torch.randint(0, V, (1, K + 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, _ = model(ids)
        assert model.set_kernels("auto") == "compiled"
        assert all(layer.mamba.scan_impl == "compiled" for layer in model.layers)
        got, _ = model(ids)
    assert close(got, ref)
    assert model.set_kernels("torch") == "torch"
    assert model.layers[0].mamba.scan_impl == "torch"
    used = model.set_kernels("auto", dtype=torch.bfloat16)
    assert used == "torch (compiled kernel unavailable: it computes in float32, the model in bfloat16)"
    assert model.layers[0].mamba.scan_impl == "torch"
    assert model.set_kernels("auto", device="meta").startswith("torch (compiled kernel unavailable: it runs on the CPU")


def test_auto_kernels_fall_back_with_the_reason(monkeypatch):
    """Where the kernels cannot run (no compiler, a failed build or self-check), "auto" is the
    pure path and says why; an explicit "compiled" is an error naming the same reason."""
    import statecast.arch.mamba as mamba_mod

    monkeypatch.setattr(mamba_mod, "_compiled", {"error": "compiled selective scan unavailable: no C++ compiler (c++ not found)"})
    assert compiled_scan_status() == "no C++ compiler (c++ not found)" and not compiled_scan_available()
    model = make_model(seed=8)
    assert model.set_kernels("auto") == "torch (compiled kernel unavailable: no C++ compiler (c++ not found))"
    assert model.layers[0].mamba.scan_impl == "torch"
    with pytest.raises(RuntimeError, match="unavailable: no C\\+\\+ compiler"):
        model.set_kernels("compiled")
    # built, but the self-check disagrees with the pure path
    monkeypatch.setattr(mamba_mod, "_compiled", {"op": object(), "status": "self-check failed: scan relative error 3.0e-01 against the pure path"})
    assert model.set_kernels("auto").endswith("(compiled kernel unavailable: self-check failed: scan relative error 3.0e-01 against the pure path)")
    with pytest.raises(RuntimeError, match="self-check failed"):
        model.set_kernels("compiled")


def test_self_check_catches_a_wrong_kernel(compiled, monkeypatch):
    """The self-check compares each kernel with the pure path: a kernel that computes
    something else (or fails) is reported, not used."""
    import statecast.arch.mamba as mamba_mod

    assert mamba_mod._self_check() is None
    real = mamba_mod.selective_scan_compiled

    def off(*args, **kwargs):
        y, h = real(*args, **kwargs)
        return y * 1.01, h

    monkeypatch.setattr(mamba_mod, "selective_scan_compiled", off)
    assert mamba_mod._self_check().startswith("self-check failed: scan relative error")

    def broken(*args, **kwargs):
        raise RuntimeError("illegal\ninstruction")

    monkeypatch.setattr(mamba_mod, "causal_conv_silu_compiled", broken)
    monkeypatch.setattr(mamba_mod, "selective_scan_compiled", real)
    assert mamba_mod._self_check() == "self-check failed: RuntimeError: illegal"
