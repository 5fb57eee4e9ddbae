"""The MTP module vs an independent reference from the checkpoint's tensors (docs/model.md § Multi-token prediction).

The reference takes layer N = num_hidden_layers of `hf_state_dict()` by its published names and computes one MTP
step the way vLLM's `DeepSeekMultiTokenPredictorLayer` and SGLang's `DeepseekModelNextN` consume the checkpoint:

    e  = RMSNorm(embed_tokens[token t+1]; enorm)      h = RMSNorm(h_t; hnorm)
    u  = eh_proj([e ; h])                             (embedding first, hidden second)
    u' = decoder layer N (causal attention over the sequence of u)
    logits = lm_head(RMSNorm(u'; shared_head.norm))

h_t is what vLLM's main model returns, the output of the final `model.norm` (DeepseekV2Model.forward ends in
`self.norm(hidden_states, residual)`); here it is computed by hand from the last decoder layer's output. Further
depths feed back u' (before shared_head.norm) with the token one step further on. The norms, the concatenation
and the projections are written out on raw tensors; the decoder layer itself is a fresh `DecoderLayer` filled from
the layer-N tensors (its arithmetic is covered by the HF parity tests). The reference does not zero the embedding
at position 0 as vLLM does (SGLang does not; neither does glm5), so every position is compared.

Compared with: `model(ids, mtp_depth=...)` (training / evaluation), `model.mtp_forward` over a paged cache (the
engine's drafter without the kernel) and `FusedDecoder.mtp_forward` (the drafter with the native kernel).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from configs import MICRO

from glm5 import GLM5ForCausalLM
from glm5.engine.fused import FusedDecoder
from glm5.engine.kv_cache import PagedLatentCache
from glm5.model.attention import AttentionOptions
from glm5.model.cache import Positions
from glm5.model.layers import RotaryEmbedding
from glm5.model.model import DecoderLayer

pytestmark = pytest.mark.usefixtures("one_thread")

# 16 indexer heads: exact ties between indexer scores (which torch.topk and the kernel break differently) are
# ~1e-5 likely; 12 tokens > index_topk = 8, so the MTP layer's sparse selection is exercised.
CFG = MICRO.replace(index_n_heads=16)
T = 12


def noisy_model(seed: int = 0) -> GLM5ForCausalLM:
    """Random weights with every norm moved off 1 (enorm != hnorm, model.norm not the identity), router biases on."""
    torch.manual_seed(seed)
    model = GLM5ForCausalLM(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.1)
        # distinct, far-from-one norm weights: swapping enorm/hnorm or skipping model.norm changes everything
        for norm in (model.mtp[0].enorm, model.mtp[0].hnorm, model.model.norm, model.mtp[0].shared_head.norm):
            norm.weight.copy_(torch.rand_like(norm.weight) * 1.5 + 0.25)
    return model


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.double()
    return (weight.double() * x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Reference:
    """One MTP step from the HF-named tensors of layer N (see the module docstring)."""

    def __init__(self, model: GLM5ForCausalLM) -> None:
        cfg = model.config
        self.cfg = cfg
        self.hf = {k: v.detach().clone() for k, v in model.hf_state_dict().items()}
        self.p = f"model.layers.{cfg.num_hidden_layers}."
        self.eps = cfg.rms_norm_eps
        self.layer = self._decoder_layer()
        self.rotary = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.rope_theta)

    def _decoder_layer(self) -> DecoderLayer:
        """A fresh decoder layer N filled from the checkpoint names (per-expert tensors stacked by hand)."""
        cfg, p, hf = self.cfg, self.p, self.hf
        layer = DecoderLayer(cfg, cfg.num_hidden_layers, has_indexer=True).eval()
        mtp_only = ("enorm.", "hnorm.", "eh_proj.", "shared_head.")
        sd = {}
        for name, t in hf.items():
            if not name.startswith(p):
                continue
            local = name[len(p) :]
            if local.startswith(mtp_only) or ".experts." in f".{local}":
                continue
            sd[local] = t
        E = cfg.n_routed_experts
        ex = p + "mlp.experts.{}.{}_proj.weight"
        sd["mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([hf[ex.format(e, "gate")], hf[ex.format(e, "up")]]) for e in range(E)]
        )
        sd["mlp.experts.down_proj"] = torch.stack([hf[ex.format(e, "down")] for e in range(E)])
        layer.load_state_dict(sd, strict=True)
        return layer

    def final_norm(self, pre_norm: torch.Tensor) -> torch.Tensor:
        """What vLLM's main model hands the MTP layer: the last layer's output through `model.norm`."""
        return rms_norm(pre_norm, self.hf["model.norm.weight"], self.eps)

    @torch.no_grad()
    def step(self, h_prev: torch.Tensor, next_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h_prev [B, S, D], next_ids [B, S] (positions 0..S-1) -> (u' before shared_head.norm, logits)."""
        hf, p, eps = self.hf, self.p, self.eps
        e = rms_norm(hf["model.embed_tokens.weight"][next_ids], hf[p + "enorm.weight"], eps)
        h = rms_norm(h_prev, hf[p + "hnorm.weight"], eps)
        u = torch.cat([e, h], dim=-1) @ hf[p + "eh_proj.weight"].T  # embedding first, hidden second
        S = next_ids.shape[1]
        pos = Positions.shared(0, S, next_ids.device)
        rope = self.rotary(pos.q_pos, u.dtype)
        out, _, _ = self.layer(u, rope, pos, AttentionOptions())
        logits = rms_norm(out, hf[p + "shared_head.norm.weight"], eps) @ hf["lm_head.weight"].T
        return out, logits


def main_hidden(model: GLM5ForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the last decoder layer's output, the model's output) for ids, via a hook (no MTP involved)."""
    seen = {}
    hook = model.model.layers[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("h", o[0]))
    try:
        with torch.no_grad():
            out = model(ids, return_hidden=True)
    finally:
        hook.remove()
    return seen["h"], out.hidden_states


def tokens(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(1, CFG.vocab_size, (batch, T), generator=torch.Generator().manual_seed(seed))


def test_the_model_feeds_the_mtp_module_the_final_norm_output() -> None:
    model = noisy_model()
    ids = tokens()
    ref = Reference(model)
    pre, hidden = main_hidden(model, ids)
    torch.testing.assert_close(hidden, ref.final_norm(pre), rtol=1e-5, atol=1e-5)
    assert (pre - hidden).abs().max() > 0.1  # the norm is not the identity here, so the choice matters


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mtp_logits_of_the_forward_equal_the_reference(depth: int) -> None:
    """Depth d, position t: h from depth d-1 (depth 0: the final-norm output) and token t+d+1 -> token t+d+2."""
    model = noisy_model()
    ids = tokens()
    ref = Reference(model)
    pre, _ = main_hidden(model, ids)
    with torch.no_grad():
        out = model(ids, mtp_depth=depth)
    assert len(out.mtp_logits) == depth
    h = ref.final_norm(pre)
    for d in range(depth):
        S = T - d - 1  # positions whose next-token inputs exist
        h, logits = ref.step(h[:, :S], ids[:, d + 1 :])
        torch.testing.assert_close(out.mtp_logits[d][:, :S], logits, rtol=1e-4, atol=1e-4)


def test_a_swapped_or_shifted_input_is_seen_by_the_reference() -> None:
    """The reference is sensitive to what it pins down: the concatenation order and the next-token shift."""
    model = noisy_model()
    ids = tokens()
    ref = Reference(model)
    h = ref.final_norm(main_hidden(model, ids)[0])[:, : T - 1]
    _, good = ref.step(h, ids[:, 1:])
    p, hf = ref.p, ref.hf
    swapped = dict(hf)
    w = hf[p + "eh_proj.weight"]
    D = w.shape[0]
    # == eh_proj([h ; e]) with the real weight
    swapped[p + "eh_proj.weight"] = torch.cat([w[:, D:], w[:, :D]], 1)
    ref.hf = swapped
    _, bad = ref.step(h, ids[:, 1:])
    ref.hf = hf
    _, shifted = ref.step(h, ids[:, :-1])  # the current token instead of the next one
    assert (bad - good).abs().max() > 0.1 and (shifted - good).abs().max() > 0.1


KERNELS = [
    "model",
    pytest.param("native", marks=pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")),
]


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_engines_drafting_step_equals_the_reference(kernel: str) -> None:
    """The drafter's MTP step over a paged cache: prompt catch-up (T - 1 positions at once), then 2 recursive
    draft steps of one position each, as `MTPDrafter.propose` runs them."""
    model = noisy_model()
    ids = tokens()
    ref = Reference(model)
    h0 = ref.final_norm(main_hidden(model, ids)[0])
    mtp_layer = CFG.num_hidden_layers
    cache = PagedLatentCache(CFG, num_blocks=64, block_size=4, layers=[mtp_layer])
    for i in range(2):
        cache.add_sequence(i)
    fused = FusedDecoder(model, native_kernel=True) if kernel == "native" else None

    def mtp(hidden: torch.Tensor, next_ids: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache.prepare([0, 1], next_ids.tolist())
        if fused is not None:
            out = fused.mtp_forward(hidden, next_ids, cache, depth=depth)
            assert out is not None, "the native kernel did not run the MTP layer"
            return out
        with torch.no_grad():
            return model.mtp_forward(hidden, next_ids, cache, depth=depth)

    # catch-up: positions 0..T-2 (h_t, token t+1)
    n = T - 1
    got_h, got_logits = mtp(h0[:, :n], ids[:, 1:], 0)
    ref_h, ref_logits = ref.step(h0[:, :n], ids[:, 1:])
    torch.testing.assert_close(got_logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-4, atol=1e-4)
    # the last position: h_{T-1} with the sampled token; then two drafts, each feeding back the MTP output (before
    # shared_head.norm) and the previous draft at the next position. The draft entries attend to the cache's
    # exact entries and to each other, so the reference is one causal sequence of all the inputs so far.
    ctx_h, ctx_ids = h0, torch.cat([ids[:, 1:], torch.tensor([[7], [9]])], 1)
    got_h, got_logits = mtp(h0[:, n:], ctx_ids[:, n:], 0)

    def check() -> torch.Tensor:
        ref_h, ref_logits = ref.step(ctx_h, ctx_ids)
        torch.testing.assert_close(got_logits[:, -1], ref_logits[:, -1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_h[:, -1], ref_h[:, -1], rtol=1e-4, atol=1e-4)
        return ref_logits[:, -1].argmax(-1, keepdim=True)

    for depth in (1, 2):
        draft = check()
        ctx_h, ctx_ids = torch.cat([ctx_h, got_h[:, -1:]], 1), torch.cat([ctx_ids, draft], 1)
        got_h, got_logits = mtp(got_h[:, -1:], draft, depth)
    check()
