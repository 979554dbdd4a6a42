"""statecast.arch.transformer and the attention pieces of statecast.arch.layers: logits and
hidden-state parity with transformers' GPT-2 / Llama / Mistral / Qwen2, KV-state handoff
(parallel vs step by step, chunked prefill, batches), the shared layers against their
transformers counterparts, traceability, low precision."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from factories import run_steps
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from statecast.arch import layers
from statecast.arch.layers import Attention, Rope, apply_rope, attention_bias, repeat_kv, rope_inv_freq
from statecast.arch.transformer import KVState, Transformer, TransformerConfig
from statecast.families import FAMILIES
from statecast.families.tables import to_canonical_state

V = 97
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # short original context: every band of a 16-dim head is hit
LINEAR = {"rope_type": "linear", "factor": 2.0}


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- helpers


def gpt2_cfg(**kw) -> TransformerConfig:
    base = dict(vocab_size=V, d_model=48, n_layer=3, n_head=4, n_kv_head=4, head_dim=12, d_ffn=96, norm="layernorm",
                norm_eps=1e-5, mlp="plain", act="gelu_new", positions="learned", max_positions=40, qkv_bias=True,
                o_bias=True, mlp_bias=True, tie_embeddings=True)
    return TransformerConfig(**{**base, **kw})


def llama_cfg(**kw) -> TransformerConfig:
    # GQA (4 query heads on 2 kv heads) and head_dim 16 != 48 / 4
    base = dict(vocab_size=V, d_model=48, n_layer=3, n_head=4, n_kv_head=2, head_dim=16, d_ffn=80, norm="rmsnorm",
                norm_eps=1e-6, mlp="gated", act="silu", positions="rope", max_positions=64, rope_theta=10000.0)
    return TransformerConfig(**{**base, **kw})


def hf_model(arch: str, cfg: TransformerConfig):
    """The transformers model with the same hyper-parameters as ``cfg`` (random init)."""
    if arch == "gpt2":
        hc = GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        n_inner=cfg.d_ffn, n_positions=cfg.max_positions, layer_norm_epsilon=cfg.norm_eps,
                        activation_function=cfg.act, tie_word_embeddings=cfg.tie_embeddings,
                        scale_attn_weights=cfg.attn_scale is None, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(hc).eval()
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                  intermediate_size=cfg.d_ffn, rms_norm_eps=cfg.norm_eps, hidden_act=cfg.act,
                  max_position_embeddings=cfg.max_positions, tie_word_embeddings=cfg.tie_embeddings,
                  rope_parameters={**(cfg.rope_scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_theta},
                  bos_token_id=0, eos_token_id=1, pad_token_id=None)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)).eval()
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=cfg.sliding_window)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False)).eval()
    raise ValueError(arch)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Spread every tensor well away from the init (norm scales around 1, biases nonzero),
    so that a swapped or transposed tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "wte" in name or "embed" in name or "wpe" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def pair(arch: str, cfg: TransformerConfig, seed: int = 0):
    """(transformers model, our model) with the same random weights, mapped through the
    converter's name table."""
    hf = hf_model(arch, cfg)
    randomize(hf, seed)
    fmt = FAMILIES["transformer"].arch(arch).formats[0]
    state = to_canonical_state(fmt, hf.state_dict())
    ours = Transformer(cfg).eval()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    ours.load_state_dict(state, strict=True)
    return hf, ours


def make_model(cfg: TransformerConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg).eval()
    randomize(model, seed)
    return model


def ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=2e-6):
    """Max abs difference within ``tol`` times the reference's magnitude (at least 1): a few
    float32 ulps per layer, whatever the logits' scale. tol=0: exactly equal."""
    torch.testing.assert_close(a, b, atol=tol * max(1.0, b.abs().max().item()), rtol=0)


ARCHS = {
    "gpt2": ("gpt2", gpt2_cfg()),
    "gpt2-untied-unscaled": ("gpt2", gpt2_cfg(tie_embeddings=False, attn_scale=1.0, act="gelu_pytorch_tanh")),
    "llama-gqa-tied-llama3": ("llama", llama_cfg(tie_embeddings=True, rope_scaling=LLAMA3)),
    "llama-mha-untied-linear": ("llama", llama_cfg(n_kv_head=4, head_dim=12, rope_scaling=LINEAR, rope_theta=500.0)),
    "llama-bias-gelu": ("llama", llama_cfg(qkv_bias=True, o_bias=True, mlp_bias=True, act="gelu")),
    "mistral-window": ("mistral", llama_cfg(sliding_window=5)),
    "qwen2-qkv-bias": ("qwen2", llama_cfg(qkv_bias=True, n_kv_head=1)),
}


# --------------------------------------------------------------------------- config / layout


def test_config_roundtrip_and_validation():
    cfg = llama_cfg(rope_scaling=LLAMA3, sliding_window=7)
    uni = cfg.to_unified()
    assert uni["layer_kinds"] == ["attention"] * 3 and uni["rope_scaling"] == LLAMA3
    assert TransformerConfig.from_unified({**uni, "family": "transformer"}) == cfg
    assert hash(cfg) == hash(TransformerConfig.from_unified(uni))  # frozen; the dict stays out of the hash
    scaling = dict(LLAMA3)
    c = llama_cfg(rope_scaling=scaling)
    scaling["factor"] = 1.0
    assert c.rope_scaling["factor"] == 8.0  # copied, not aliased
    assert TransformerConfig.from_unified(gpt2_cfg().to_unified()) == gpt2_cfg()

    with pytest.raises(ValueError, match="layer_kinds"):
        TransformerConfig.from_unified({**uni, "layer_kinds": ["attention", "mamba", "attention"]})
    with pytest.raises(ValueError, match="lacks"):
        TransformerConfig.from_unified({k: v for k, v in uni.items() if k != "head_dim"})
    bad = [
        dict(norm="batchnorm"), dict(act="swiglu"), dict(mlp="moe"), dict(positions="alibi"), dict(n_kv_head=3),
        dict(sliding_window=0), dict(head_dim=15), dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}),
        dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), dict(positions="none", rope_scaling=LINEAR),
        dict(d_model=0),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            llama_cfg(**kw)


def test_state_dict_names_and_shapes():
    C, Fd, L = 48, 96, 3
    expected = {"embed.weight": (V, C), "pos_embed.weight": (40, C), "final_norm.weight": (C,), "final_norm.bias": (C,)}
    for i in range(L):
        p = f"layers.{i}."
        for n in ("mixer_norm", "mlp_norm"):
            expected.update({p + n + ".weight": (C,), p + n + ".bias": (C,)})
        for n in "qkvo":
            expected.update({p + f"attn.{n}.weight": (C, C), p + f"attn.{n}.bias": (C,)})
        expected.update({p + "mlp.up.weight": (Fd, C), p + "mlp.up.bias": (Fd,),
                         p + "mlp.down.weight": (C, Fd), p + "mlp.down.bias": (C,)})
    shapes = {k: tuple(v.shape) for k, v in Transformer(gpt2_cfg()).state_dict().items()}
    assert shapes == expected  # tied: no lm_head.weight

    cfg = llama_cfg(qkv_bias=True)  # Qwen2-style: q/k/v biases, no o bias
    shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    assert shapes["lm_head.weight"] == (V, 48) and "pos_embed.weight" not in shapes
    assert shapes["layers.0.attn.q.weight"] == (64, 48) and shapes["layers.0.attn.k.weight"] == (32, 48)
    assert shapes["layers.0.attn.o.weight"] == (48, 64) and shapes["layers.0.attn.k.bias"] == (32,)
    assert "layers.0.attn.o.bias" not in shapes and "layers.0.mixer_norm.bias" not in shapes
    assert shapes["layers.2.mlp.gate.weight"] == (80, 48) and "layers.2.mlp.gate.bias" not in shapes


def test_meta_build_then_load():
    """Family.build(..., "meta") + load_state_dict(assign=True): no init, real rope tables."""
    cfg = llama_cfg(rope_scaling=LLAMA3)
    ref = make_model(cfg)
    with torch.device("meta"):
        meta = Transformer(cfg)
    assert meta.embed.weight.is_meta and not meta.rope.inv_freq.is_meta
    meta.load_state_dict(ref.state_dict(), assign=True)
    x = ids(1, 6)
    with torch.inference_mode():
        close(meta.eval()(x)[0], ref(x)[0], tol=0)


def test_reset_parameters():
    model = Transformer(gpt2_cfg())
    model.reset_parameters(generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.layers[0].mixer_norm.weight, torch.ones(48))
    assert torch.equal(model.layers[0].attn.q.bias, torch.zeros(48))
    assert 0.015 < model.layers[1].mlp.up.weight.std().item() < 0.025
    assert 0.015 < model.pos_embed.weight.std().item() < 0.025


# --------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("case", list(ARCHS))
def test_logits_and_hidden_states_match_transformers(case):
    arch, cfg = ARCHS[case]
    hf, ours = pair(arch, cfg)
    x = ids(2, 12)  # 12 > sliding window 5 for Mistral
    with torch.inference_mode():
        ref = hf(x, output_hidden_states=True)
        logits, state, hidden = ours(x, output_hidden=True)
        last = ours.final_norm(hidden[-1])
    assert logits.abs().max() > 1.0  # a random model that computes something
    close(logits, ref.logits)
    # transformers: [embeddings, block 0 .. block L-2 outputs, final_norm(block L-1 output)]
    assert len(ref.hidden_states) == cfg.n_layer + 1 and len(hidden) == cfg.n_layer
    for i in range(cfg.n_layer - 1):
        close(hidden[i], ref.hidden_states[i + 1])
    close(last, ref.hidden_states[-1])
    assert state.key.shape == (cfg.n_layer, 2, cfg.n_kv_head, 12, cfg.head_dim)


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa-tied-llama3", "mistral-window", "qwen2-qkv-bias"])
def test_steps_match_transformers_cache(case):
    """Prefill, then single tokens, against transformers with its DynamicCache (Mistral's
    keeps only the sliding window; ours keeps everything and masks)."""
    arch, cfg = ARCHS[case]
    hf, ours = pair(arch, cfg, seed=1)
    x = ids(2, 14, seed=1)
    with torch.inference_mode():
        out = hf(x[:, :6], use_cache=True)
        cache, ref = out.cache, [out.logits]
        for t in range(6, 14):
            out = hf(x[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            ref.append(out.logits)
        logits, state = ours(x[:, :6])
        mine = [logits]
        for t in range(6, 14):
            logits, state = ours.step(x[:, t], state)
            mine.append(logits[:, None])
    close(torch.cat(mine, 1), torch.cat(ref, 1))
    assert state.key.shape[3] == 14


# --------------------------------------------------------------------------- state handoff


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa-tied-llama3", "mistral-window"])
def test_parallel_steps_and_chunks_agree(case):
    _, cfg = ARCHS[case]
    model = make_model(cfg)
    x = ids(2, 11, seed=2)
    with torch.inference_mode():
        full, s_full = model(x)
        stepped, s_step = run_steps(model, x, None)
        a, s = model(x[:, :4])  # chunked prefill: 4 + 5 + 2, with T > 1 on a non-empty past
        b, s = model(x[:, 4:9], s)
        c, s = model(x[:, 9:], s)
    close(stepped, full)
    close(torch.cat([a, b, c], 1), full)
    for other in (s_step, s):
        close(other.key, s_full.key, tol=1e-6)
        close(other.value, s_full.value, tol=1e-6)


def test_batch_rows_are_independent():
    model = make_model(llama_cfg(sliding_window=4))
    x = ids(3, 7, seed=3)
    with torch.inference_mode():
        logits, state = model(x[:, :5])
        logits2, state = model(x[:, 5:], state)
        for r in range(3):
            one, s1 = model(x[r : r + 1, :5])
            one2, s1 = model(x[r : r + 1, 5:], s1)
            close(one, logits[r : r + 1])
            close(one2, logits2[r : r + 1])
            close(s1.key, state.key[:, r : r + 1], tol=1e-6)


def test_state_is_never_mutated_and_init_state():
    model = make_model(gpt2_cfg())
    empty = model.init_state(2)
    assert empty.key.shape == (3, 2, 4, 0, 12) and empty.key.dtype == torch.float32
    x = ids(2, 6, seed=4)
    with torch.inference_mode():
        _, state = model(x[:, :4], empty)
        before = KVState(state.key.clone(), state.value.clone())
        _, new = model(x[:, 4:], state)
        _, new2 = model.step(x[:, 4], state)
    assert torch.equal(state.key, before.key) and torch.equal(state.value, before.value)
    assert new.key.shape[3] == 6 and new2.key.shape[3] == 5
    assert new.key.data_ptr() != state.key.data_ptr()
    assert model.step(x[:, 0], None)[0].shape == (2, V)
    assert model.step(x[:, :1], None)[0].shape == (2, 1, V)


def test_autograd_path_matches_inference_path():
    """With autograd on, keys/values are concatenated then stacked (no ``out=``, no in-place
    adds); the results are the same and gradients flow."""
    model = make_model(llama_cfg(sliding_window=3, mlp_bias=True))
    x = ids(2, 7, seed=5)
    with torch.inference_mode():
        ref, ref_state = model(x[:, :5])
        ref2, _ = model(x[:, 5:], ref_state)
    logits, state = model(x[:, :5])
    logits2, _ = model(x[:, 5:], state)
    close(logits.detach(), ref, tol=0)
    close(logits2.detach(), ref2, tol=0)
    (logits.sum() + logits2.sum()).backward()
    assert model.layers[0].attn.q.weight.grad.abs().sum() > 0


def test_learned_positions_past_the_table_raise():
    model = make_model(gpt2_cfg(max_positions=8))
    x = ids(1, 9)
    with torch.inference_mode():
        _, state = model(x[:, :8])  # exactly fills the table
        with pytest.raises(ValueError, match="max_positions=8"):
            model.step(x[:, 8], state)
        with pytest.raises(ValueError, match="max_positions=8"):
            model(x)
    rope_model = make_model(llama_cfg(max_positions=4))  # rope: max_positions is informative only
    with torch.inference_mode():
        assert rope_model(x)[0].shape == (1, 9, V)


def test_bfloat16_runs_and_stays_close():
    for cfg in (gpt2_cfg(), llama_cfg(rope_scaling=LLAMA3, sliding_window=5)):
        model = make_model(cfg)
        x = ids(2, 10, seed=6)
        with torch.inference_mode():
            ref, _ = model(x)
            model16 = make_model(cfg).to(torch.bfloat16)
            logits, state = model16(x)
            stepped, _ = run_steps(model16, x, None)
        assert logits.dtype == torch.bfloat16 and state.key.dtype == torch.bfloat16
        scale = ref.abs().max()
        assert (logits.float() - ref).abs().max() < 0.1 * scale
        assert (stepped.float() - logits.float()).abs().max() < 0.1 * scale
        agree = (logits.float().argmax(-1) == ref.argmax(-1)).float().mean()
        assert agree > 0.8


# --------------------------------------------------------------------------- tracing (ONNX export path)


def test_traced_graph_is_one_path_for_all_lengths():
    """torch.jit.trace at one (T, P) replays at others: no Python branch on the past length
    or on T bakes into the graph (what ``torch.onnx.export`` records), P = 0 included."""
    class Step(torch.nn.Module):  # plain tensors in and out, as the ONNX graph has them
        def __init__(self):
            super().__init__()
            self.model = make_model(llama_cfg(sliding_window=4, rope_scaling=LLAMA3))

        def forward(self, input_ids, key, value):
            logits, state = self.model(input_ids, KVState(key, value))
            # traced, the new state is per layer (layers.LayerStack); eagerly, a stack
            return logits, torch.stack(list(state.key)), torch.stack(list(state.value))

    fn = Step().eval()
    model = fn.model

    x = ids(2, 12, seed=7)
    with torch.inference_mode():
        _, s5 = model(x[:, :5])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the shape checks skipped while tracing
        traced = torch.jit.trace(fn, (x[:, 5:8], s5.key, s5.value), check_trace=False)
        empty = model.init_state(2)
        for T, P in ((1, 5), (4, 0), (1, 0), (7, 5)):
            past = (s5.key[:, :, :, :P], s5.value[:, :, :, :P]) if P else (empty.key, empty.value)
            got = traced(x[:, P : P + T], *past)
            want = fn(x[:, P : P + T], *past)
            for g, w in zip(got, want):
                close(g, w)


# --------------------------------------------------------------------------- layers


def reference_attention(q, k, v, past_len, window, scale):
    """Loops over positions: q [B, H, T, D], k, v [B, Hkv, S, D] (kv head of query head h: h // G)."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    out = torch.zeros_like(q)
    for h in range(H):
        for t in range(T):
            pos = past_len + t
            lo = 0 if window is None else max(0, pos - window + 1)
            keys, vals = k[:, h // G, lo : pos + 1], v[:, h // G, lo : pos + 1]
            w = torch.softmax((keys @ q[:, h, t, :, None]).squeeze(-1) * scale, -1)
            out[:, h, t] = (w[..., None] * vals).sum(1)
    return out


@pytest.mark.parametrize("G,window,P,T", [(1, None, 0, 5), (3, None, 4, 1), (2, 3, 0, 6), (2, 3, 5, 4), (4, 2, 3, 1)])
def test_attention_against_reference(G, window, P, T):
    """Attention on its own, as Jamba uses it (no positional encoding): causal mask offset by
    the past, sliding window, grouped-query heads, returned keys/values = past + new."""
    torch.manual_seed(0)
    Hkv, D, C, B = 2, 8, 20, 2
    attn = Attention(C, Hkv * G, Hkv, D, qkv_bias=True, sliding_window=window).eval()
    x = torch.randn(B, T, C)
    pk, pv = torch.randn(B, Hkv, P, D), torch.randn(B, Hkv, P, D)
    with torch.inference_mode():
        out, key, value = attn(x, pk, pv)
        q = attn.q(x).view(B, T, Hkv * G, D).transpose(1, 2)
        k_new = attn.k(x).view(B, T, Hkv, D).transpose(1, 2)
        v_new = attn.v(x).view(B, T, Hkv, D).transpose(1, 2)
        close(key, torch.cat([pk, k_new], 2), tol=0)
        close(value, torch.cat([pv, v_new], 2), tol=0)
        ref = reference_attention(q, key, value, P, window, D**-0.5)
        close(out, attn.o(ref.transpose(1, 2).reshape(B, T, -1)))


def test_attention_bias_matches_transformers_mask_functions():
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    for T, P, W in ((4, 0, None), (1, 6, None), (3, 5, 4), (5, 0, 2), (1, 7, 3)):
        bias = attention_bias(T, P, W, torch.float32)
        if bias is None:  # the is_causal path: only for an empty past within the window
            assert P == 0 and (W is None or T <= W)
            bias = torch.where(torch.arange(T)[None, :] <= torch.arange(T)[:, None], 0.0, -math.inf)
        fn = causal_mask_function if W is None else sliding_window_causal_mask_function(W)
        zero = torch.tensor(0)
        want = fn(zero, zero, torch.arange(T)[:, None] + P, torch.arange(P + T)[None, :])  # [T, S], vectorised
        assert torch.equal(bias == 0, want.expand(T, P + T))


@pytest.mark.parametrize("scaling", [None, LINEAR, LLAMA3])
def test_rope_matches_transformers(scaling):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = llama_cfg(rope_scaling=scaling, rope_theta=5000.0)
    hc = hf_model("llama", dataclasses.replace(cfg, n_layer=1)).config
    hf_rope = LlamaRotaryEmbedding(hc)
    rope = Rope(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.equal(rope.inv_freq, hf_rope.inv_freq)
    pos = torch.arange(3, 40)
    x = torch.randn(2, pos.numel(), 4, 16)  # [B, T, H, D]
    cos, sin = rope.cos_sin(pos)
    hf_cos, hf_sin = hf_rope(x, pos[None])
    assert torch.equal(cos, hf_cos[0]) and torch.equal(sin, hf_sin[0])
    ref, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), hf_cos, hf_sin)
    assert torch.equal(apply_rope(x, cos[:, None], sin[:, None]), ref.transpose(1, 2))
    # batched positions [B, T]
    cos_b, _ = rope.cos_sin(torch.stack([pos, pos + 1]))
    assert cos_b.shape == (2, pos.numel(), 16) and torch.equal(cos_b[1, :-1], cos[1:])
    assert rope_inv_freq(16, 5000.0, scaling).dtype == torch.float32


def test_activations_and_mlps_match_transformers():
    from transformers.activations import ACT2FN

    x = torch.linspace(-10, 10, 2001)
    for name, fn in layers.ACTIVATIONS.items():
        close(fn(x.clone()), ACT2FN[name](x), tol=5e-7)
        close(fn(x.clone(), True), ACT2FN[name](x), tol=5e-7)
    assert torch.equal(repeat_kv(torch.arange(6.0).view(1, 2, 3, 1), 2)[0, :, :, 0],
                       torch.tensor([[0.0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]))
    torch.manual_seed(0)
    mlp = layers.GatedMLP(8, 12, "silu", bias=True)
    x = torch.randn(2, 3, 8)
    want = mlp.down(torch.nn.functional.silu(mlp.gate(x)) * mlp.up(x))
    close(mlp(x), want, tol=0)
    with torch.inference_mode():
        close(mlp(x), want, tol=0)  # the in-place form
    plain = layers.MLP(8, 12, "gelu_new")
    close(plain(x), plain.down(ACT2FN["gelu_new"](plain.up(x))), tol=1e-6)
    with pytest.raises(ValueError):
        layers.MLP(8, 12, "swish")
    assert isinstance(layers.make_norm("rmsnorm", 8, 1e-6), layers.RMSNorm)
    assert isinstance(layers.make_norm("layernorm", 8, 1e-5), torch.nn.LayerNorm)
