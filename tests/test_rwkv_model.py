"""statecast.arch.rwkv: parallel vs recurrent agreement, state handoff, parity with
transformers' RwkvForCausalLM, WKV numerics at extreme values, low-precision weights."""

from __future__ import annotations

import math

import pytest
import torch
from factories import parallel_and_steps, run_steps
from transformers import RwkvConfig as HfRwkvConfig
from transformers import RwkvForCausalLM

from statecast.arch.rwkv import (
    WKV_CHUNK,
    Rwkv,
    RwkvConfig,
    RwkvState,
    wkv_chunked,
    wkv_sequential,
)
from statecast.families.rwkv import HF
from statecast.families.tables import to_canonical_state

K = WKV_CHUNK
V = 97
SMALL = RwkvConfig(vocab_size=V, d_model=48, n_layer=3, d_attn=40, d_ffn=96)  # A != C on purpose


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(cfg: RwkvConfig = SMALL, seed: int = 0) -> Rwkv:
    """A random model with its time-mix parameters spread wider than the init schedule."""
    g = torch.Generator().manual_seed(seed)
    model = Rwkv(cfg)
    model.reset_parameters(generator=g)
    with torch.no_grad():
        for layer in model.layers:
            tm = layer.time_mix
            tm.decay.add_(torch.randn(tm.decay.shape, generator=g))
            tm.bonus.add_(torch.randn(tm.bonus.shape, generator=g))
            for p in (tm.mix_k, tm.mix_v, tm.mix_r, layer.mlp.mix_k, layer.mlp.mix_r):
                p.copy_(torch.rand(p.shape, generator=g))
        model.embed.weight.normal_(0, 1.0, generator=g)
    return model.eval()


def assert_same_state(a: RwkvState, b: RwkvState, atol: float = 1e-5):
    """Same represented state: shift inputs equal, S/Z and log Z equal (num*e^max, den*e^max)."""
    torch.testing.assert_close(a.ffn_x, b.ffn_x, atol=atol, rtol=0)
    torch.testing.assert_close(a.att_x, b.att_x, atol=atol, rtol=0)
    torch.testing.assert_close(a.att_num / a.att_den, b.att_num / b.att_den, atol=atol, rtol=0)
    log_z_a = a.att_max + torch.log(a.att_den)
    log_z_b = b.att_max + torch.log(b.att_den)
    torch.testing.assert_close(log_z_a, log_z_b, atol=atol, rtol=atol)


# --------------------------------------------------------------------------- config / layout


def test_config_roundtrip_and_names():
    uni = SMALL.to_unified()
    assert uni["layer_kinds"] == ["rwkv"] * 3 and uni["version"] == 4
    assert RwkvConfig.from_unified({**uni, "family": "rwkv"}) == SMALL
    with pytest.raises(ValueError):
        RwkvConfig.from_unified({**uni, "version": 5})

    model = Rwkv(SMALL)
    C, A, Fd, L = SMALL.d_model, SMALL.d_attn, SMALL.d_ffn, SMALL.n_layer
    expected = {
        "embed.weight": (V, C),
        "embed_norm.weight": (C,),
        "embed_norm.bias": (C,),
        "final_norm.weight": (C,),
        "final_norm.bias": (C,),
        "lm_head.weight": (V, C),
    }
    for i in range(L):
        p = f"layers.{i}."
        for n in ("mixer_norm", "mlp_norm"):
            expected[p + n + ".weight"] = (C,)
            expected[p + n + ".bias"] = (C,)
        expected.update(
            {
                p + "time_mix.decay": (A,),
                p + "time_mix.bonus": (A,),
                p + "time_mix.mix_k": (C,),
                p + "time_mix.mix_v": (C,),
                p + "time_mix.mix_r": (C,),
                p + "time_mix.key.weight": (A, C),
                p + "time_mix.value.weight": (A, C),
                p + "time_mix.receptance.weight": (A, C),
                p + "time_mix.output.weight": (C, A),
                p + "mlp.mix_k": (C,),
                p + "mlp.mix_r": (C,),
                p + "mlp.up.weight": (Fd, C),
                p + "mlp.down.weight": (C, Fd),
                p + "mlp.receptance.weight": (C, C),
            }
        )
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected

    tied = Rwkv(RwkvConfig(vocab_size=V, d_model=C, n_layer=1, d_attn=A, d_ffn=Fd, tie_embeddings=True))
    assert "lm_head.weight" not in tied.state_dict()
    logits, _ = tied(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, V)


def test_init_state_and_random_init_logits():
    model = Rwkv(SMALL).eval()
    st = model.init_state(2)
    assert st.ffn_x.shape == st.att_x.shape == (3, 2, 48)
    assert st.att_num.shape == st.att_den.shape == st.att_max.shape == (3, 2, 40)
    assert st.att_num.dtype == torch.float32 and bool((st.att_max == -1e38).all())
    with torch.no_grad():
        logits, _ = model(torch.randint(0, V, (2, 20)))
    assert torch.isfinite(logits).all()
    assert logits.std() > 1e-3  # not degenerate
    assert (logits.argmax(-1) != logits.argmax(-1)[0, 0]).any()


# --------------------------------------------------------------------------- parallel vs recurrent


@pytest.mark.parametrize("T", [1, 5, K - 1, K, K + 1, 3 * K + 7])
@pytest.mark.parametrize("with_state", [False, True])
def test_parallel_matches_steps(T, with_state):
    model = make_model()
    # with_state: a state in the recurrent form (den >= 1, running max)
    lp, sp, ls, ss = parallel_and_steps(model, V, T, warm=9 if with_state else 0)
    with torch.no_grad():
        assert lp.shape == (2, T, V)
        assert (lp - ls).abs().max() < 1e-5
        assert_same_state(sp, ss)
        # continuing from either state gives the same logits, in both modes
        nxt = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(T + 1))
        a, _ = model(nxt, sp)
        b, _ = model(nxt, ss)
        c, _ = run_steps(model, nxt, sp)
        assert (a - b).abs().max() < 1e-5
        assert (a - c).abs().max() < 1e-5


@pytest.mark.parametrize("split", [1, 30, K, 2 * K + 3])
def test_prefill_then_step_equals_one_forward(split):
    model = make_model(seed=1)
    ids = torch.randint(0, V, (2, 2 * K + 20), generator=torch.Generator().manual_seed(split))
    with torch.no_grad():
        full, full_state = model(ids)
        pre, state = model(ids[:, :split])
        rest, state = run_steps(model, ids[:, split:], state)
        assert (torch.cat([pre, rest], 1) - full).abs().max() < 1e-5
        assert_same_state(state, full_state)
        # chunked prefill in two parallel pieces too
        a, st = model(ids[:, :split])
        b, st = model(ids[:, split:], st)
        assert (torch.cat([a, b], 1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("segment", [1, 7, K, 2 * K + 3])
def test_segmented_prefill_matches_one_pass(segment, monkeypatch):
    """forward() runs long inputs through the layers in segments: same logits, state, hidden."""
    import statecast.arch.rwkv as rwkv_mod

    model = make_model(seed=2)
    ids = torch.randint(0, V, (2, 3 * K + 5), generator=torch.Generator().manual_seed(segment))
    with torch.no_grad():
        _, st0 = model(ids[:, :7])
        monkeypatch.setattr(rwkv_mod, "PREFILL_SEGMENT", None)
        ref, ref_state, ref_hidden = model(ids, st0, output_hidden=True)
        monkeypatch.setattr(rwkv_mod, "PREFILL_SEGMENT", segment)
        logits, state, hidden = model(ids, st0, output_hidden=True)
    assert (logits - ref).abs().max() < 1e-5
    assert_same_state(state, ref_state)
    assert len(hidden) == len(ref_hidden)
    for h, r in zip(hidden, ref_hidden):
        assert h.shape == r.shape and (h - r).abs().max() < 1e-5


def test_backward_is_finite_and_matches_sequential():
    """The parallel path is differentiable (no in-place op on saved tensors, no 0/0 in the
    padding) and its gradients equal the step-by-step ones."""
    ids = torch.randint(0, V, (2, K + 5), generator=torch.Generator().manual_seed(9))
    grads = []
    for parallel in (True, False):
        model = make_model(seed=4)
        if parallel:
            logits, _ = model(ids)
        else:
            logits, _ = run_steps(model, ids, None)
        logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_step_shapes():
    model = make_model()
    with torch.no_grad():
        a, st = model.step(torch.tensor([3, 4]), None)
        b, st2 = model.step(torch.tensor([[3], [4]]), None)
    assert a.shape == (2, V) and b.shape == (2, 1, V)
    assert torch.equal(a, b[:, 0])
    assert st.att_num.shape == (3, 2, 40)


def test_output_hidden():
    model = make_model()
    ids = torch.randint(0, V, (2, 17))
    with torch.no_grad():
        logits, state, hidden = model(ids, output_hidden=True)
        assert len(hidden) == SMALL.n_layer
        assert all(h.shape == (2, 17, SMALL.d_model) for h in hidden)
        again = model.lm_head(model.final_norm(hidden[-1]))
        torch.testing.assert_close(again, logits, atol=1e-6, rtol=1e-6)
        plain, _ = model(ids)
        assert torch.equal(plain, logits)


# --------------------------------------------------------------------------- transformers parity


@pytest.fixture(scope="module")
def hf_pair():
    hf_cfg = HfRwkvConfig(
        vocab_size=V,
        hidden_size=48,
        num_hidden_layers=3,
        intermediate_size=96,
        rescale_every=0,
        context_length=256,
    )
    torch.manual_seed(0)
    hf = RwkvForCausalLM(hf_cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move away from the init schedule (HF's time_first init is all ones)
        for name, p in hf.named_parameters():
            if "time_" in name or "ln" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
        hf.rwkv.embeddings.weight.normal_(0, 1.0, generator=g)
    ours = Rwkv(RwkvConfig(vocab_size=V, d_model=48, n_layer=3, d_attn=48, d_ffn=96)).eval()
    ours.load_state_dict(to_canonical_state(HF, hf.state_dict()), strict=True)
    return hf, ours


def test_matches_transformers_whole_sequence(hf_pair):
    hf, ours = hf_pair
    ids = torch.randint(0, V, (2, 2 * K + 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids, use_cache=True)
        logits, state = ours(ids)
    assert (logits - ref.logits).abs().max() < 1e-4
    # HF state: five [B, C, L] tensors (ffn x, att x, num, den, max)
    hs = RwkvState(*(s.permute(2, 0, 1) for s in ref.state))
    assert_same_state(state, hs, atol=1e-4)


def test_matches_transformers_stepping(hf_pair):
    hf, ours = hf_pair
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # HF's one-token path broadcasts its [B, C] shift state against [B, 1, C] inputs,
        # which is only right for B == 1 (transformers 5.24): step HF one row at a time.
        rows = []
        for b in range(ids.shape[0]):
            hf_state, hf_logits = None, []
            for t in range(ids.shape[1]):
                out = hf(ids[b : b + 1, t : t + 1], state=hf_state, use_cache=True)
                hf_state = out.state
                hf_logits.append(out.logits[:, 0])
            rows.append(torch.stack(hf_logits, 1))
        hf_logits = torch.cat(rows, 0)
        step_logits, _ = run_steps(ours, ids, None)
        # prefill in parallel, then step: the handoff HF does not have, against HF's RNN
        pre, st = ours(ids[:, :25])
        rest, _ = run_steps(ours, ids[:, 25:], st)
    assert (step_logits - hf_logits).abs().max() < 1e-4
    assert (torch.cat([pre, rest], 1) - hf_logits).abs().max() < 1e-4


# --------------------------------------------------------------------------- WKV numerics


def _extreme_inputs(B=2, T=3 * K + 7, A=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.logspace(-3, math.log10(30), A)  # exp(decay) from 1e-3 to 30
    u = torch.empty(A).uniform_(-5, 5, generator=g)
    k = torch.empty(B, T, A).uniform_(-60, 60, generator=g)
    k[0, :, ::2] = torch.where(torch.arange(T)[:, None] % 13 == 0, 60.0, -60.0)  # spikes then deep lows
    k[1, : K // 2] = 60.0  # saturated start, then the rest far below it
    k[1, K // 2 :] -= 60.0
    k[1, K // 2 :].clamp_(min=-60)
    v = torch.randn(B, T, A, generator=g)
    return w, u, k, v


@pytest.mark.parametrize("seed", [0, 1])
def test_wkv_extreme_values(seed):
    w, u, k, v = _extreme_inputs(seed=seed)
    B, T, A = k.shape
    num, den, mx = torch.zeros(B, A), torch.zeros(B, A), torch.full((B, A), -1e38)
    d = torch.float64
    ref_state0 = (num.to(d), den.to(d), mx.to(d))
    ref, rn, rd, rm = wkv_sequential(w.to(d), u.to(d), k.to(d), v.to(d), *ref_state0)
    out, n2, d2, m2 = wkv_chunked(w, u, k, v, num, den, mx)
    assert torch.isfinite(out).all() and torch.isfinite(n2).all() and torch.isfinite(m2).all()
    assert ((out - ref).abs().max() / v.abs().max()) < 1e-5
    torch.testing.assert_close((n2 / d2).double(), rn / rd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close((m2 + torch.log(d2)).double(), rm + torch.log(rd), atol=1e-4, rtol=1e-5)

    # the float32 recurrence (the step path, = HF's rwkv_linear_attention_cpu) agrees to
    # its own precision: its running log-scale is rounded at |k| ~ 60 (ulp 4e-6) every step
    seq32, *_ = wkv_sequential(w, u, k, v, num, den, mx)
    assert torch.isfinite(seq32).all()
    assert ((seq32 - ref).abs().max() / v.abs().max()) < 1e-4

    # continuing from a mid-sequence state (both state forms) matches one long run
    half = T // 2
    # running-max form (exact, then stored as float32) and our normalised form
    _, *seq_state = wkv_sequential(w.to(d), u.to(d), k[:, :half].to(d), v[:, :half].to(d), *ref_state0)
    _, *par_state = wkv_chunked(w, u, k[:, :half], v[:, :half], num, den, mx)
    for st in ([s.float() for s in seq_state], par_state):
        tail, *_ = wkv_chunked(w, u, k[:, half:], v[:, half:], *st)
        assert torch.isfinite(tail).all()
        assert ((tail - ref[:, half:]).abs().max() / v.abs().max()) < 1e-5


@pytest.mark.parametrize("T", [K, 2 * K + 3])
def test_wkv_input_layouts(T):
    """Row-major and channel-major k/v (the model's layout) give the same result."""
    w, u, k, v = _extreme_inputs(T=T, seed=2)
    B, _, A = k.shape
    st = (torch.zeros(B, A), torch.zeros(B, A), torch.full((B, A), -1e38))
    k_cm = k.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # [B, T, A] view of [A, B, T] memory
    v_cm = v.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    a = wkv_chunked(w, u, k, v, *st)
    b = wkv_chunked(w, u, k_cm, v_cm, *st)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    ref, *_ = wkv_sequential(*(t.double() for t in (w, u, k, v, *st)))
    assert ((a[0] - ref).abs().max() / v.abs().max()) < 1e-5


def test_model_extreme_keys_parallel_equals_steps():
    """Whole model with huge key weights (k ~ +-60) and decays spanning 1e-3..30."""
    model = make_model(seed=3)
    with torch.no_grad():
        for layer in model.layers:
            tm = layer.time_mix
            A = tm.decay.shape[0]
            tm.decay.copy_(torch.linspace(math.log(1e-3), math.log(30), A)[torch.randperm(A)])
            tm.key.weight.mul_(40.0)
    ids = torch.randint(0, V, (2, 2 * K + 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, _, hid = model(ids[:, :8], output_hidden=True)
        lp, sp = model(ids)
        ls, ss = run_steps(model, ids, None)
    assert torch.isfinite(lp).all() and torch.isfinite(ls).all()
    assert (lp - ls).abs().max() < 1e-4 * max(1.0, lp.abs().max().item())
    # the step path's float32 running max drifts by ~ulp(|k|) per token (see above)
    assert_same_state(sp, ss, atol=1e-3)


# --------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights(dtype):
    model = make_model(seed=5)
    ids = torch.randint(0, V, (2, K + 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, _ = model(ids)
        low = make_model(seed=5).to(dtype)
        logits, state = low(ids)
        assert logits.dtype == dtype
        assert state.att_x.dtype == dtype and state.att_num.dtype == torch.float32
        assert torch.isfinite(logits).all()
        err = (logits.float() - ref).abs().max() / ref.abs().max()
        assert err < 0.1, err
        # top-1 mostly agrees
        assert (logits.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
        # the step path runs too and continues the parallel state
        nxt, _ = low.step(ids[:, 0], state)
        assert nxt.dtype == dtype and torch.isfinite(nxt).all()
