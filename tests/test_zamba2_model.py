"""Zamba2: the hybrid model against transformers' Zamba2ForCausalLM (with its cache), shared
blocks used in turn with per-use adapters, our parallel path against our steps (prompts longer
than the Mamba-2 chunk, split prompts), the dt clamp transformers applies on one path only, and
the layout / config maps, the shared blocks read from under any of their layers (adapters
with them) and written back there."""

from __future__ import annotations

import factories
import pytest
import torch
from test_zamba_model import placed_round_trip

from statecast.arch.zamba2 import Zamba2, Zamba2Config
from statecast.convert.loading import load_model
from statecast.convert.pull import pull
from statecast.errors import StatecastError
from statecast.families.zamba2 import config_from_hf, hf_config


def _pair(root, **kw):
    from transformers import Zamba2ForCausalLM

    src = factories.hf_zamba2(root / "src", **kw)
    info = pull(str(src), out=root / "unified", progress=False)
    ours, _ = load_model(info["path"])
    return ours, Zamba2ForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), src


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(ours, transformers' model, source): hybrid layers 1, 3, 5 of 6 running blocks 0, 1, 0;
    rank-4 adapters on q/k/v and the MLP; rotary positions; Mamba-2 chunks of 16."""
    return _pair(tmp_path_factory.mktemp("zamba2"), seed=41)


def _against_transformers(ours, ref, T: int = 40, prompt: int = 30):
    from transformers import DynamicCache

    ids = torch.randint(0, 200, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], ref(ids, use_cache=False).logits, rtol=1e-5, atol=2e-4)
        cache = DynamicCache(config=ref.config)  # prompt (longer than a chunk), then single steps, both cached
        ref_prompt = ref(ids[:, :prompt], cache=cache, use_cache=True).logits
        ours_prompt, s = ours(ids[:, :prompt])
        torch.testing.assert_close(ours_prompt, ref_prompt, rtol=1e-5, atol=2e-4)
        for t in range(prompt, T):
            ref_step = ref(ids[:, t : t + 1], cache=cache, use_cache=True).logits
            ours_step, s = ours(ids[:, t : t + 1], s)
            torch.testing.assert_close(ours_step, ref_step, rtol=1e-5, atol=2e-4)


def test_logits_and_cached_steps_match_transformers(pair, one_thread):
    ours, ref, _ = pair
    _against_transformers(ours, ref)


def test_blocks_in_turn_adapters_per_use(pair):
    ours, ref, src = pair
    cfg = ours.cfg
    assert cfg.layer_kinds == ("mamba2", "hybrid") * 3 and cfg.shared_blocks == (None, 0, None, 1, None, 0)
    names = set(ours.state_dict())
    assert {n.split(".")[1] for n in names if n.startswith("shared.")} == {"0", "1"}
    for i in (1, 3, 5):  # each use has its own adapters and linear; the mixers are the Mamba-2 family's
        assert {f"layers.{i}.attn_adapter.{p}.{c}.weight" for p in "qkv" for c in ("down", "up")} <= names
        assert {f"layers.{i}.mlp_adapter.down.weight", f"layers.{i}.mlp_adapter.up.weight",
                f"layers.{i}.shared_proj.weight", f"layers.{i}.mamba.dt_bias"} <= names
    assert not any("adapter" in n for n in names if n.startswith(("shared.", "layers.0.", "layers.2.")))
    assert {"shared.0.mlp.gate.weight", "shared.0.mlp.up.weight"} <= names  # gate_up_proj split
    # the adapters are what transformers runs at that use: slot j of the block, j the hybrid index
    ref_block = ref.model.layers[1].shared_transformer  # block 0, holding slots 0 and 2
    torch.testing.assert_close(ours.layers[5].attn_adapter["k"].down.weight,
                               ref_block.self_attn.linear_k_adapter_list[2][0].weight, rtol=0, atol=0)
    torch.testing.assert_close(ours.layers[3].mlp_adapter.up.weight,
                               ref.model.layers[3].shared_transformer.feed_forward.gate_up_proj_adapter_list[1][1].weight,
                               rtol=0, atol=0)
    state = ours.init_state(2)
    assert state.key.shape[0] == 3 and state.conv.shape[0] == 6 and state.ssm.shape[1:] == (2, 8, 8, 8)
    assert ours.state_layers()["key"] == (1, 3, 5)
    _, s = ours(torch.tensor([[1, 2, 3]]))
    assert not torch.equal(s.key[0], s.key[2])  # block 0's two uses attend at their own depths


@pytest.mark.parametrize("T", [1, 7, 37])
@pytest.mark.parametrize("warm", [0, 5])
def test_parallel_equals_steps(pair, T, warm, one_thread):
    ours, _, _ = pair
    lp, sp, ls, ss = factories.parallel_and_steps(ours, 200, T, warm=warm)
    torch.testing.assert_close(lp, ls, rtol=1e-4, atol=3e-4)
    for a, b in zip(sp, ss):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=3e-4)


def test_split_prompt_equals_whole(pair, one_thread):
    ours, _, _ = pair
    ids = torch.randint(0, 200, (2, 50), generator=torch.Generator().manual_seed(3))
    # one piece is a single token (the step): every piece under the step's rule (no dt clamp)
    with torch.no_grad(), ours.parallel_as_step():
        whole, s_whole = ours(ids)
        parts, s = [], None
        for a, b in ((0, 3), (3, 21), (21, 22), (22, 50)):  # pieces across chunk boundaries
            logits, s = ours(ids[:, a:b], s)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-4, atol=3e-4)
    for a, b in zip(s, s_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=3e-4)


def test_dt_clamp_as_transformers(tmp_path, one_thread):
    """transformers' default time_step_min 0.001 clamps dt on its whole-sequence path and not
    in its cached step: we mirror both (so our own parallel and step paths differ there, as
    transformers' forward and generate do)."""
    ours, ref, _ = _pair(tmp_path, seed=42, dt_min=0.001, layers=4, hybrid=(1, 3))
    assert ours.cfg.dt_limit_min == 0.001
    _against_transformers(ours, ref)
    ids = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(20))
    with torch.no_grad():
        clamped = ours(ids)[0]
        steps = factories.run_steps(ours, ids, None)[0]
        with ours.parallel_as_step() as rules:
            unclamped = ours(ids)[0]
    assert (clamped - steps).abs().max() > 1e-3  # the clamp binds in this random model
    torch.testing.assert_close(unclamped, steps, rtol=1e-4, atol=3e-4)  # the step's rule on both paths
    assert rules == ["Mamba-2 dt limit [0.001, inf] not applied (the reference's step does not clamp)"]


def test_config_round_trip_and_refusals(pair):
    ours, ref, _ = pair
    hf = ref.config.to_dict()
    ucfg = Zamba2Config.from_unified(config_from_hf(hf)).to_unified()
    assert ucfg == ours.cfg.to_unified()
    back = hf_config(ucfg, hf)
    assert config_from_hf(back) == config_from_hf(hf) and back["num_mem_blocks"] == 2
    assert back["layers_block_type"] == hf["layers_block_type"]
    untied = {**hf, "tie_word_embeddings": False}  # a block per hybrid layer, with slots it never runs
    with pytest.raises(ValueError, match="tie_word_embeddings false with 3 hybrid layers and num_mem_blocks 2"):
        config_from_hf(untied)
    with pytest.raises(ValueError, match="num_attention_heads 5 does not divide"):
        config_from_hf({**hf, "num_attention_heads": 5})
    odd = {**ucfg, "shared_blocks": [None, 1, None, 0, None, 0]}  # not j % num_mem_blocks
    with pytest.raises(StatecastError, match="runs block j % num_mem_blocks"):
        hf_config(odd)
    with pytest.raises(ValueError, match="Zamba2Config.layer_kinds must list one of"):
        Zamba2Config.from_unified({**ucfg, "layer_kinds": ["mamba"] * 6})
    Zamba2(Zamba2Config.from_unified(ucfg))  # builds


@pytest.mark.parametrize("holders", [[5], [1, 5]], ids=["last-sorting-only", "every-copy"])
def test_shared_block_under_any_of_its_layers(holders, tmp_path, one_thread):
    """Block 0 (run by layers 1 and 5, adapter slots 0 and 2 inside it) stored under layer 5
    only, as Zyphra's Zamba2 checkpoints (saved by older code, which kept the tied name that
    sorts last) hold their blocks, or under both: read, run and written back there; block 1
    stays under layer 3."""
    src = factories.restore_shared(factories.hf_zamba2(tmp_path / "src", seed=43), "shared_transformer", {1: holders})
    placed_round_trip(src, tmp_path, "Zamba2ForCausalLM", [holders, [3]])
