"""ArchInfo from config alone, on the meta device, across architecture families."""

from __future__ import annotations

import json

import pytest

from studio.arch import ArchInfo
from studio.models import load_config
from conftest import CONFIGS

# Published parameter counts of the real models these configs describe.
EXPECTED = {
    "llama2-7b": dict(total=6_738_415_616, kv_heads=32, head_dim=128, tied=False, d_ff=11008),
    "llama3-8b": dict(total=8_030_261_248, kv_heads=8, head_dim=128, tied=False, d_ff=14336),
    "llama3-70b": dict(total=70_553_706_496, kv_heads=8, head_dim=128, tied=False, d_ff=28672),
    "mistral-7b": dict(total=7_241_732_096, kv_heads=8, head_dim=128, tied=False, d_ff=14336),
    "smollm2-135m": dict(total=134_515_008, kv_heads=3, head_dim=64, tied=True, d_ff=1536),
    "qwen2-0.5b": dict(total=494_032_768, kv_heads=2, head_dim=64, tied=True, d_ff=4864),
    "gpt2": dict(total=124_439_808, kv_heads=12, head_dim=64, tied=True, d_ff=3072),
    "pythia-160m": dict(total=162_322_944, kv_heads=12, head_dim=64, tied=False, d_ff=3072),
    "gemma-2b": dict(total=2_506_172_416, kv_heads=1, head_dim=256, tied=True, d_ff=16384),
}


def arch(name: str) -> ArchInfo:
    return ArchInfo.from_config(load_config(str(CONFIGS / f"{name}.json")))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_family_shapes_match_published_models(name):
    info = arch(name)
    want = EXPECTED[name]
    assert info.total_params == want["total"]
    assert info.num_kv_heads == want["kv_heads"]
    assert info.head_dim == want["head_dim"]
    assert info.tie_word_embeddings is want["tied"]
    assert info.intermediate_size == want["d_ff"]
    assert (info.lm_head_params == 0) is want["tied"]
    # Parameter bookkeeping closes: blocks' linears + embeddings + head <= total.
    assert info.linear_params + info.embedding_params + info.lm_head_params <= info.total_params


def test_gqa_key_value_width_is_kv_heads_times_head_dim():
    info = arch("llama3-8b")
    (k,) = [g for g in info.block_linears if g.leaf == "k_proj"]
    assert (k.in_features, k.out_features, k.count) == (4096, 1024, 32)
    assert info.kv_dim == 1024


def test_qwen2_reports_qkv_bias_but_no_o_proj_bias():
    bias = {g.leaf: g.bias for g in arch("qwen2-0.5b").block_linears}
    assert bias["q_proj"] and bias["k_proj"] and bias["v_proj"]
    assert not bias["o_proj"]


def test_gpt2_conv1d_fused_qkv_and_shared_leaf_names():
    info = arch("gpt2")
    shapes = {(g.path, g.kind): (g.in_features, g.out_features) for g in info.block_linears}
    assert shapes[("attn.c_attn", "conv1d")] == (768, 2304)
    assert shapes[("mlp.c_proj", "conv1d")] == (3072, 768)
    # 'c_proj' names two different modules; PEFT's suffix match would pick both.
    assert {g.path for g in info.matching(["c_proj"])} == {"attn.c_proj", "mlp.c_proj"}


def test_neox_fused_query_key_value():
    info = arch("pythia-160m")
    assert "query_key_value" in info.target_leaves
    assert info.matching(["query_key_value"])[0].out_features == 3 * 768


def test_json_round_trip_is_lossless():
    info = arch("gemma-2b")
    again = ArchInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert again == info


def test_config_without_model_type_is_a_clear_error(tmp_path):
    from studio.models import ModelSourceError

    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelSourceError, match="model_type"):
        load_config(str(bad))
