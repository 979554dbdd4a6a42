"""statecast.arch.mamba2: the chunked SSD against the float64 sequential reference, parallel vs
recurrent agreement, split prompts, parity with transformers' Mamba2ForCausalLM (both its
chunked forward and its cached step), and where dt is clamped (time_step_limit)."""

from __future__ import annotations

import math

import pytest
import torch
from factories import parallel_and_steps, run_steps
from transformers import Mamba2Config as HfMamba2Config
from transformers import Mamba2ForCausalLM

import statecast.arch.mamba2 as mamba2_module
from statecast.arch.mamba2 import Mamba2, Mamba2Config, Mamba2Mixer, Mamba2State, ssd_chunked, ssd_sequential, ssd_step
from statecast.families.mamba2 import HF, config_from_hf
from statecast.families.tables import to_canonical_state

V = 97
# 2 groups of 4 heads, chunk 8: every test prompt spans several chunks
SMALL = Mamba2Config(vocab_size=V, d_model=32, n_layer=2, n_heads=8, head_dim=8, d_state=16, n_groups=2, chunk_size=8,
                     tie_embeddings=False)

pytestmark = pytest.mark.usefixtures("one_thread")


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init schedule (A_log = log(1..H), D = 1, zero biases, unit
    norms) so that each one matters in the comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(".D") or "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.normal_(0, 1.0, generator=g)


def make_model(cfg: Mamba2Config = SMALL, seed: int = 0) -> Mamba2:
    model = Mamba2(cfg)
    model.reset_parameters(generator=torch.Generator().manual_seed(seed))
    perturb_(model, seed + 100)
    return model.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the larger magnitude (floor 1)."""
    return (a.double() - b.double()).abs().max().item() / max(1.0, a.abs().max().item(), b.abs().max().item())


def hf_pair(cfg: Mamba2Config = SMALL, seed: int = 0, **hf_kw):
    """transformers' Mamba2ForCausalLM and ours holding the same (perturbed) weights."""
    torch.manual_seed(seed)
    hf_cfg = HfMamba2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                            num_heads=cfg.n_heads, head_dim=cfg.head_dim, expand=cfg.d_inner // cfg.d_model,
                            n_groups=cfg.n_groups, state_size=cfg.d_state, chunk_size=cfg.chunk_size,
                            tie_word_embeddings=cfg.tie_embeddings, **hf_kw)
    hf = Mamba2ForCausalLM(hf_cfg).eval()
    perturb_(hf, seed + 100)
    ucfg = config_from_hf(hf_cfg.to_dict() | {"time_step_limit": list(hf_cfg.time_step_limit)})
    ours = Mamba2(Mamba2Config.from_unified(ucfg)).eval()
    state = to_canonical_state(HF, hf.state_dict())
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    ours.load_state_dict(state, strict=True)
    return hf, ours


# --------------------------------------------------------------------------- config / layout


def test_config_roundtrip_state_and_names():
    uni = SMALL.to_unified()
    assert uni["layer_kinds"] == ["mamba2"] * 2 and SMALL.d_inner == 64
    assert Mamba2Config.from_unified({**uni, "family": "mamba2"}) == SMALL
    with pytest.raises(ValueError, match="n_groups"):
        Mamba2Config.from_unified({**uni, "n_groups": 3})
    with pytest.raises(ValueError, match="layer_kinds"):
        Mamba2Config.from_unified({**uni, "layer_kinds": ["mamba", "mamba"]})
    with pytest.raises(ValueError, match="dt limits"):
        Mamba2Config.from_unified({**uni, "dt_limit_min": 0.5, "dt_limit_max": 0.1})
    model = Mamba2(SMALL)
    H, P, N, G, W, E, C = 8, 8, 16, 2, 4, 64, 32
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("layers.0.")}
    assert shapes == {"layers.0.mixer_norm.weight": (C,), "layers.0.mamba.in_proj.weight": (2 * E + 2 * G * N + H, C),
                      "layers.0.mamba.conv1d.weight": (E + 2 * G * N, 1, W), "layers.0.mamba.conv1d.bias": (E + 2 * G * N,),
                      "layers.0.mamba.dt_bias": (H,), "layers.0.mamba.A_log": (H,), "layers.0.mamba.D": (H,),
                      "layers.0.mamba.norm.weight": (E,), "layers.0.mamba.out_proj.weight": (C, E)}
    st = model.init_state(3)
    assert st.conv.shape == (2, 3, E + 2 * G * N, W - 1) and st.ssm.shape == (2, 3, H, P, N)
    assert st.ssm.dtype == torch.float32 and not st.conv.any() and not st.ssm.any()
    assert model.state_layers() == {"conv": (0, 1), "ssm": (0, 1)}
    mixer = model.layers[0].mamba
    assert torch.equal(mixer.A_log, torch.log(torch.arange(1.0, H + 1))) and torch.equal(mixer.D, torch.ones(H))
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    with torch.device("meta"):
        assert Mamba2(SMALL).layers[0].mamba.A_log.is_meta


def test_mixer_interface_for_hybrids():
    """The constructor and forward the hybrids compose: plain dimensions in, (out, conv, ssm) out."""
    mixer = Mamba2Mixer(32, 64, 16, 8, 8, 2, 4, chunk_size=8, norm_before_gate=True, time_step_limit=(0.0, 1.0))
    x = torch.randn(2, 11, 32)
    out, conv, ssm = mixer(x, torch.zeros(2, 64 + 2 * 2 * 16, 3), torch.zeros(2, 8, 8, 16))
    assert out.shape == (2, 11, 32) and conv.shape == (2, 128, 3) and ssm.shape == (2, 8, 8, 16)
    with pytest.raises(ValueError, match="n_heads \\* head_dim"):
        Mamba2Mixer(32, 60, 16, 8, 8, 2, 4)


# --------------------------------------------------------------------------- SSD


def _ssd_inputs(B=2, T=45, H=6, P=4, G=3, N=5, seed=0, extreme=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, P, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(B, T, H, generator=g) * 2 - 2)
    A = -torch.exp(torch.randn(H, generator=g) + 1.0)
    if extreme:  # per-token decays from ~1 (dt|A| ~ 1e-4) to far below float32's range (dt|A| ~ 1e3)
        dt = torch.exp(torch.empty(B, T, H).uniform_(math.log(1e-4), math.log(20.0), generator=g))
        A = -torch.exp(torch.empty(H).uniform_(math.log(0.5), math.log(50.0), generator=g))
    Bm, Cm = torch.randn(B, T, G, N, generator=g), torch.randn(B, T, G, N, generator=g)
    h = torch.randn(B, H, P, N, generator=g)
    return x, dt, A, Bm, Cm, h


@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_ssd_chunked_matches_sequential(chunk, extreme):
    """Chunks of 1, 7 (45 = 6 x 7 + 3: the last chunk partial), 16, and one chunk for all:
    float64 agrees to float64 rounding, float32 to float32 rounding, with 3 groups of 2 heads."""
    args = _ssd_inputs(extreme=extreme, seed=int(extreme))
    ref_y, ref_h = ssd_sequential(*(t.double() for t in args))
    y64, h64 = ssd_chunked(*(t.double() for t in args), chunk=chunk)
    assert rel(y64, ref_y) < 1e-12 and rel(h64, ref_h) < 1e-12
    y, h = ssd_chunked(*args, chunk=chunk)
    assert y.dtype == torch.float32 and torch.isfinite(y).all() and torch.isfinite(h).all()
    assert rel(y, ref_y) < 2e-6 and rel(h, ref_h) < 2e-6


def test_ssd_long_prompt_many_chunks():
    """A long prompt (1000 tokens, 15 chunks of 64 and a partial one) whose decays sum far
    beyond float32's exp range over the prompt: finite, and equal to the float64 recurrence."""
    args = _ssd_inputs(B=1, T=1000, H=4, P=8, G=2, N=16, seed=3)
    x, dt, A, Bm, Cm, h = args
    assert (dt * A).sum(1).min() < -200  # exp of the whole cumulative sum underflows float32 (below -104)
    ref_y, ref_h = ssd_sequential(*(t.double() for t in args))
    y, hn = ssd_chunked(*args, chunk=64)
    assert rel(y, ref_y) < 2e-6 and rel(hn, ref_h) < 2e-6


@pytest.mark.parametrize(("segment", "chunk", "T"), [(7, 7, 45), (16, 8, 45), (12, 8, 33), (24, 5, 45), (256, 64, 1000)])
def test_ssd_segments_equal_one_segment(monkeypatch, segment, chunk, T):
    """Segments (SSD_SEGMENT rounded down to whole chunks: 7, 16, 8, 20 and 256 tokens, the
    last segment partial) change nothing but rounding: float64 equals the recurrence to
    float64 rounding."""
    args = [t.double() for t in _ssd_inputs(T=T, seed=7)]
    ref_y, ref_h = ssd_sequential(*args)
    monkeypatch.setattr(mamba2_module, "SSD_SEGMENT", segment)
    y, h = ssd_chunked(*args, chunk=chunk)
    assert y.shape == ref_y.shape and y.is_contiguous()
    assert rel(y, ref_y) < 1e-12 and rel(h, ref_h) < 1e-12


def test_ssd_step_is_the_recurrence():
    x, dt, A, Bm, Cm, h = (t.double() for t in _ssd_inputs(T=1))
    y, hn = ssd_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], h)
    R = 2  # heads per group
    for b in range(2):
        for head in range(6):
            g = head // R
            want_h = torch.exp(dt[b, 0, head] * A[head]) * h[b, head] + dt[b, 0, head] * torch.outer(x[b, 0, head], Bm[b, 0, g])
            assert torch.allclose(hn[b, head], want_h) and torch.allclose(y[b, head], want_h @ Cm[b, 0, g])


@pytest.mark.parametrize("segment", [256, 12])
def test_ssd_autograd(segment, monkeypatch):
    """Gradients through the chunked SSD equal the recurrence's; segment 12 with chunks of 6
    cuts 20 tokens into [6, 6 | 6, 2]: two segments, the second with a partial chunk."""
    monkeypatch.setattr(mamba2_module, "SSD_SEGMENT", segment)
    args = [t.clone().requires_grad_(True) for t in _ssd_inputs(T=20, seed=5)]
    y, h = ssd_chunked(*args, chunk=6)
    (y.square().sum() + h.sum()).backward()
    grads = [a.grad.clone() for a in args]
    ref = [t.detach().clone().requires_grad_(True) for t in args]
    ry, rh = ssd_sequential(*ref)
    (ry.square().sum() + rh.sum()).backward()
    for got, r in zip(grads, ref):
        assert rel(got, r.grad) < 1e-4


# --------------------------------------------------------------------------- model


@torch.no_grad()
@pytest.mark.parametrize("T", [1, 3, 8, 29])
def test_step_equals_parallel(T):
    model = make_model()
    lp, sp, ls, ss = parallel_and_steps(model, V, T, warm=2)
    assert rel(lp, ls) < 1e-5 and rel(sp.ssm, ss.ssm) < 1e-5 and rel(sp.conv, ss.conv) < 1e-6


@torch.no_grad()
@pytest.mark.parametrize("cut", [1, 2, 5, 8, 21])
def test_split_prompt_equals_whole(cut):
    """Prefill in two pieces (the first shorter than the conv, inside a chunk, on a chunk
    boundary, past several chunks) = one prefill; the state hands over, never mutated."""
    model = make_model(seed=1)
    ids = torch.randint(0, V, (2, 37), generator=torch.Generator().manual_seed(cut))
    whole, s_whole = model(ids)
    a, s_a = model(ids[:, :cut])
    before = Mamba2State(*(t.clone() for t in s_a))
    b, s_b = model(ids[:, cut:], s_a)
    assert all(torch.equal(x, y) for x, y in zip(before, s_a))
    assert rel(torch.cat([a, b], 1), whole) < 1e-5
    assert rel(s_b.ssm, s_whole.ssm) < 1e-5 and rel(s_b.conv, s_whole.conv) < 1e-6


@torch.no_grad()
@pytest.mark.parametrize(("segment", "T"), [(16, 33), (16, 34), (24, 29), (8, 45)])
def test_segmented_model_equals_one_segment_and_steps(monkeypatch, segment, T):
    """The whole-sequence path by segments (in_proj .. out_proj per SSD_SEGMENT tokens, conv
    inputs and state carried): 33 = 16 + 16 + 1 (a last segment shorter than the conv), 34,
    29 = 24 + 5, 45 = 5 x 8 + 5 (segments of one chunk) equal one segment and the steps."""
    model = make_model(seed=5)
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(T))
    _, warm = model(ids[:, :6])  # a non-empty conv and SSM state going in
    whole, s_whole = model(ids, warm)
    monkeypatch.setattr(mamba2_module, "SSD_SEGMENT", segment)
    seg, s_seg = model(ids, warm)
    assert rel(seg, whole) < 1e-5 and rel(s_seg.ssm, s_whole.ssm) < 1e-5 and rel(s_seg.conv, s_whole.conv) < 1e-6
    steps, s_steps = run_steps(model, ids, warm)
    assert rel(seg, steps) < 1e-5 and rel(s_seg.ssm, s_steps.ssm) < 1e-5 and rel(s_seg.conv, s_steps.conv) < 1e-6


def test_segmented_mixer_autograd(monkeypatch):
    """Gradients through the segmented whole-sequence mixer (out of place under autograd)
    equal those of one segment, for the input, the carried state and every parameter."""
    mixer = Mamba2Mixer(32, 64, 16, 8, 8, 2, 4, chunk_size=8, time_step_limit=(0.0, 1.0))
    g = torch.Generator().manual_seed(9)
    x, conv, ssm = torch.randn(2, 21, 32, generator=g), torch.randn(2, 128, 3, generator=g), torch.randn(2, 8, 8, 16, generator=g)

    def grads(segment):
        monkeypatch.setattr(mamba2_module, "SSD_SEGMENT", segment)
        mixer.zero_grad()
        ins = [t.clone().requires_grad_(True) for t in (x, conv, ssm)]
        out, c, h = mixer(*ins)
        (out.square().sum() + c.sum() + h.square().sum()).backward()
        return [t.grad for t in ins] + [p.grad.clone() for p in mixer.parameters()]

    for got, want in zip(grads(8), grads(256)):
        assert rel(got, want) < 1e-5


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_sequence_path_in_place_equals_autograd_path(norm_before_gate):
    """Without autograd the whole-sequence path works in place (conv silu, D skip, gated norm
    in y's buffer); with it, out of place through ``GatedRMSNorm``: the same function."""
    mixer = Mamba2Mixer(32, 64, 16, 8, 8, 2, 4, chunk_size=8, norm_before_gate=norm_before_gate)
    perturb_(mixer, 11)
    g = torch.Generator().manual_seed(10)
    x, conv, ssm = torch.randn(2, 19, 32, generator=g), torch.randn(2, 128, 3, generator=g), torch.randn(2, 8, 8, 16, generator=g)
    with torch.no_grad():
        fast = mixer(x, conv, ssm)
    slow = mixer(x, conv, ssm)
    assert slow[0].requires_grad
    for a, b in zip(fast, slow):
        assert rel(a, b.detach()) < 1e-6


@torch.no_grad()
@pytest.mark.parametrize("tied", [False, True])
def test_matches_transformers_forward_and_cached_steps(tied):
    """Logits and per-layer hidden states equal transformers' chunked forward (62 tokens: 7
    full chunks of 8 and a partial one), and our steps equal its cached steps."""
    cfg = Mamba2Config(**{k: v for k, v in SMALL.to_unified().items() if k != "layer_kinds"} | {"tie_embeddings": tied})
    hf, ours = hf_pair(cfg, seed=2)
    ids = torch.randint(0, V, (2, 62), generator=torch.Generator().manual_seed(0))
    out = hf(ids, use_cache=False, output_hidden_states=True)
    logits, _, hidden = ours(ids, output_hidden=True)
    assert rel(logits, out.logits) < 1e-5
    for mine, theirs in zip(hidden, out.hidden_states[: cfg.n_layer]):
        assert rel(mine, theirs) < 1e-5
    # prefill 10 tokens, then 6 cached steps each way
    pre = hf(ids[:, :10], use_cache=True)
    cache, steps_hf = pre.cache, []
    for t in range(10, 16):
        o = hf(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = o.cache
        steps_hf.append(o.logits[:, 0])
    _, state = ours(ids[:, :10])
    steps, _ = run_steps(ours, ids[:, 10:16], state)
    assert rel(steps, torch.stack(steps_hf, 1)) < 1e-5


@torch.no_grad()
def test_time_step_limit_clamps_where_transformers_does():
    """With a limit that binds (dt_bias pushes softplus far above the max, and a minimum above
    the smallest dt), the whole-sequence path clamps and the step does not: both equal the
    corresponding transformers path, and therefore differ from each other."""
    hf, ours = hf_pair(seed=3, time_step_limit=(0.02, 0.3))
    assert ours.cfg.dt_limit_min == 0.02 and ours.cfg.dt_limit_max == 0.3
    for block, mine in zip(hf.backbone.layers, ours.layers):
        bias = torch.linspace(-6.0, 3.0, 8)  # softplus: 0.0025 .. 3.05, both limits bind
        block.mixer.dt_bias.copy_(bias)
        mine.mamba.dt_bias.copy_(bias)
    ids = torch.randint(0, V, (1, 20), generator=torch.Generator().manual_seed(1))
    assert rel(ours(ids)[0], hf(ids, use_cache=False).logits) < 1e-5  # chunked: clamped on both sides
    _, state = ours(ids[:, :4])
    steps, _ = run_steps(ours, ids[:, 4:9], state)
    cache = hf(ids[:, :4], use_cache=True).cache
    ref = []
    for t in range(4, 9):
        o = hf(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = o.cache
        ref.append(o.logits[:, 0])
    assert rel(steps, torch.stack(ref, 1)) < 1e-5  # step: unclamped on both sides
    assert rel(steps, ours(ids[:, :9])[0][:, 4:9]) > 1e-3  # so the two paths differ


@torch.no_grad()
def test_low_precision_runs_and_keeps_state_float32():
    model = make_model(seed=4).to(torch.bfloat16)
    ids = torch.randint(0, V, (2, 19), generator=torch.Generator().manual_seed(2))
    ref, _ = make_model(seed=4)(ids)
    logits, state = model(ids)
    assert logits.dtype == torch.bfloat16 and state.ssm.dtype == torch.float32 and state.conv.dtype == torch.bfloat16
    assert torch.isfinite(logits).all() and rel(logits.float(), ref) < 0.1
    step, _ = model.step(ids[:, 0], None)
    assert step.shape == (2, V) and torch.isfinite(step).all()


@pytest.mark.parametrize(("change", "message"), [
    ({"d_intermediate": 64}, "d_intermediate=64 (an MLP after every Mamba-2 mixer) is not supported"),
    ({"attn_layer_idx": [1]}, "hybrid state-spaces checkpoints (attn_layer_idx) are not supported"),
    ({"ssm_cfg": {"layer": "Mamba2", "headdim": 4, "ngroups": 4, "d_state": 8, "norm_before_gate": True}},
     "ssm_cfg.norm_before_gate=true is not supported"),
    ({"ssm_cfg": {"layer": "Mamba2", "headdim": 4, "ngroups": 4, "d_state": 8, "d_ssm": 32}},
     "ssm_cfg.d_ssm (a gated MLP beside the SSM) is not supported"),
    ({"ssm_cfg": {"layer": "Mamba2", "headdim": 4, "ngroups": 4, "d_state": 8, "dt_rank": 4}},
     "ssm_cfg has keys this Mamba-2 reader does not know: dt_rank"),
    ({"ssm_cfg": {"layer": "Mamba2", "headdim": 8, "ngroups": 4, "d_state": 8}},
     "config ssm_cfg.headdim=8 but the weights have 4"),
])
def test_native_variants_are_refused_by_name(tmp_path, change, message):
    """A state-spaces Mamba-2 checkpoint this family cannot read is refused naming the
    variant: exit 2, one line, nothing written; the Mamba-1 family does not claim it."""
    import factories
    from click.testing import CliRunner

    from statecast.cli import main

    src = factories.native_mamba2(tmp_path / "src", **change)
    r = CliRunner().invoke(main, ["pull", str(src), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert r.output.count("\n") == 1 and not (tmp_path / "out").exists()
    assert "Mamba1" not in r.output


def test_native_without_config_defaults_and_layer_from_tensors(tmp_path):
    """Without ssm_cfg.layer the mixers' dt_bias makes it Mamba-2; what ssm_cfg leaves out
    (d_conv, expand) is mamba_ssm's default."""
    import json

    import factories

    from statecast.convert.pull import pull
    from statecast.families import detect

    src = factories.native_mamba2(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["ssm_cfg"]["layer"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert detect(src).fmt.name == "mamba2-native"
    info = pull(str(src), out=tmp_path / "u", progress=False)
    ucfg = json.loads((tmp_path / "u" / "statecast.json").read_text())["config"]
    assert info["family"] == "mamba2" and ucfg["vocab_size"] == 304 and ucfg["d_conv"] == 4
    assert (ucfg["n_heads"], ucfg["head_dim"], ucfg["n_groups"], ucfg["d_state"]) == (16, 4, 4, 8)
    assert ucfg["dt_limit_min"] == 0.0 and ucfg["dt_limit_max"] is None
