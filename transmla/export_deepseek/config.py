"""config.json of the export: DeepSeek-V3 with dense MLPs in every layer and no query compression."""

from __future__ import annotations

from typing import Any


def deepseek_config(ours: dict[str, Any], rank: int, theta: float, eps: float, interleave: bool, dtype: str) -> dict[str, Any]:
    """A DeepSeek-V3 config for a converted (transmla) config dict.

    Mixture-of-experts fields are present (stock loaders read them) but unused: first_k_dense_replace equals the
    number of layers, so every layer builds a dense MLP of `intermediate_size`. `num_key_value_heads` equals the
    query heads because kv_b_proj already yields one key and value per head.
    """
    layers = ours["num_hidden_layers"]
    heads = ours["num_attention_heads"]
    head_dim = ours["head_dim"]
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": ours["vocab_size"],
        "hidden_size": ours["hidden_size"],
        "intermediate_size": ours["intermediate_size"],
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "q_lora_rank": None,
        "kv_lora_rank": rank,
        "qk_nope_head_dim": head_dim,
        "qk_rope_head_dim": ours["qk_rope_head_dim"],
        "v_head_dim": head_dim,
        "first_k_dense_replace": layers,
        "moe_layer_freq": 1,
        "n_routed_experts": 1,
        "n_shared_experts": 1,
        "num_experts_per_tok": 1,
        "n_group": 1,
        "topk_group": 1,
        "moe_intermediate_size": ours["intermediate_size"],
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "num_nextn_predict_layers": 0,
        "hidden_act": ours.get("hidden_act", "silu"),
        "max_position_embeddings": ours["max_position_embeddings"],
        "initializer_range": ours.get("initializer_range", 0.02),
        "rms_norm_eps": eps,
        "use_cache": True,
        "pad_token_id": ours.get("pad_token_id"),
        "bos_token_id": ours.get("bos_token_id"),
        "eos_token_id": ours.get("eos_token_id"),
        "tie_word_embeddings": False,
        # Both spellings: transformers >= 5 reads rope_parameters, older loaders rope_theta / rope_scaling.
        "rope_theta": theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_interleave": interleave,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
