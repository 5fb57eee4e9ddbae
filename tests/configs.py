"""A micro GLM-5 config shared by the unit tests: every mechanism present (dense + MoE layers, an IndexCache
shared layer, MTP), small enough that a forward takes milliseconds. 8 indexer heads keep exact score ties rare."""

from glm5 import GLM5Config

MICRO = GLM5Config.from_preset("tiny").replace(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=3,
    intermediate_size=96,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=32,
    kv_lora_rank=24,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    index_n_heads=8,
    index_head_dim=16,
    index_topk=8,
    index_topk_pattern="FFS",
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
)

FRONTEND = MICRO.replace(
    vocab_size=1024,
    num_hidden_layers=2,
    index_topk_pattern=None,
    max_position_embeddings=512,
    torch_dtype="float32",
)
"""The model behind the front-end tests (LLM, server, lm-eval): a vocabulary for a tokenizer trained on the fly."""


CHECKPOINT = GLM5Config.from_preset("tiny").replace(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=3,
    intermediate_size=48,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    index_n_heads=2,
    index_head_dim=8,
    index_topk=4,
    index_topk_pattern="FFS",
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=8,
)
"""A smaller 3-layer config (FFS IndexCache pattern, 4 experts) for checkpoint names and folders: every tensor
kind, a few kilobytes."""


# Every FP8 split falls on 128-blocks for TP2, EP2 and TP2 x EP2 (8 heads of 32+32 / 32+32 / 32; dense 256;
# shared expert 512 = 4 x 128).
FP8_ALIGNED = MICRO.replace(
    num_attention_heads=8,
    num_key_value_heads=8,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    v_head_dim=32,
    index_head_dim=32,
    intermediate_size=256,
    moe_intermediate_size=512,
    num_hidden_layers=2,
    index_topk_pattern="FS",
)


def stdlib_tokenizer(vocab_size: int = 1024, num_files: int = 10):
    """A BPE tokenizer with the GLM special tokens, trained in about a second on a few stdlib modules."""
    import sysconfig
    from pathlib import Path

    from glm5.tokenizer import GLM5Tokenizer
    from glm5.tokenizer.tokenizer import default_corpus_files

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in default_corpus_files() if f.parent == root][:num_files]
    return GLM5Tokenizer.train(files, vocab_size=vocab_size)


def random_model(cfg, tok, seed: int = 0):  # noqa: ANN001, ANN201
    """An eval-mode model of `cfg` with random weights (seeded) and the tokenizer's eos ids."""
    import torch

    from glm5 import GLM5ForCausalLM

    torch.manual_seed(seed)
    return GLM5ForCausalLM(cfg.replace(eos_token_id=tok.eos_token_ids)).eval()


def biased_model(cfg, seed: int = 0):  # noqa: ANN001, ANN201
    """An eval-mode model of `cfg` with random weights (seeded) and small non-zero router biases, so that the
    bias-corrected expert choice is exercised."""
    import torch

    from glm5 import GLM5ForCausalLM

    torch.manual_seed(seed)
    model = GLM5ForCausalLM(cfg).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0.0, 0.05)
    return model
