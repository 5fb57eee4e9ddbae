"""A micro GLM-5 config shared by the unit tests: every mechanism present (dense + MoE layers, an IndexCache
shared layer, MTP), small enough that a forward takes milliseconds. 8 indexer heads keep exact score ties rare."""

from glm5 import GLM5Config

MICRO = GLM5Config.from_preset("tiny").replace(
    vocab_size=256, hidden_size=64, num_hidden_layers=3, intermediate_size=96, num_attention_heads=2,
    num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=12, index_n_heads=8, index_head_dim=16, index_topk=8, index_topk_pattern="FFS",
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
)  # fmt: skip
