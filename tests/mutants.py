"""Mutation audit: apply deliberate bugs one at a time to a copy of the repository and check that the tests which
claim the behaviour catch each one.

    .venv/bin/python tests/mutants.py              # every mutant (make mutants), ~10 min on 2 cores
    .venv/bin/python tests/mutants.py --list       # the table of mutants and their tests, no runs
    .venv/bin/python tests/mutants.py --only kernel-norm-topk,spec-bonus-from-p_k

Each mutant is a list of exact (file, old, new) substitutions; `old` must occur exactly once in the current source,
so a stale entry fails loudly instead of silently testing nothing. The repository (glm5/, tests/, pyproject.toml,
...) is copied to a temporary folder; every pytest run there uses this interpreter with PYTHONPATH and the working
directory pointing at the copy, no bytecode files (an edit and its revert within one second would otherwise be
able to reuse a stale .pyc), its own kernel cache (GLM5_CACHE_DIR: a mutated decode_layer.c builds its own library),
and a probe plugin that aborts the session unless `glm5` is imported from the copy (the editable install of the
checkout must not shadow it). Before the mutants, each test selection must pass on the unmutated copy (the
baseline); a selection that does not is reported and its mutants cannot count as caught.

A mutant is CAUGHT when one of its selections fails (pytest exit code 1), MISSED when all pass. Other exit codes
(collection or usage errors, no tests selected) and timeouts are ERRORs of the harness entry, not catches.
The exit status is 0 only when every mutant was caught.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPY = ["glm5", "tests", "benchmarks", "pyproject.toml", "Makefile", "README.md"]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info", "*.so")
PROBE = '''\
"""pytest plugin written by tests/mutants.py: abort unless glm5 is imported from this copy."""
import os

import pytest


def pytest_sessionstart(session):
    import glm5

    root = os.path.realpath(os.environ["GLM5_MUTANT_ROOT"])
    where = os.path.realpath(glm5.__file__)
    if not where.startswith(root + os.sep):
        raise pytest.UsageError(f"glm5 is imported from {where}, not from the mutated copy {root}")
'''


@dataclass(frozen=True)
class Mutant:
    name: str
    claim: str
    """What the suite claims (and the mutant breaks)."""
    edits: tuple[tuple[str, str, str], ...]
    """(file relative to the root, exact old text, new text)."""
    tests: tuple[str, ...]
    """pytest selections, each one run (arguments as on a command line: node ids, files, -k expressions)."""


MUTANTS: list[Mutant] = [
    # --- the audit rows (issue 20) --------------------------------------------------------------------------
    Mutant(
        "kernel-norm-topk",
        "native kernel honours norm_topk_prob=False (fused step == model forward)",
        (
            (
                "glm5/kernels/decode_layer.c",
                "weights[j] = (a->norm_topk ? weights[j] / (sum + 1e-20f) : weights[j]) * a->route_scale;",
                "weights[j] = (weights[j] / (sum + 1e-20f)) * a->route_scale;",
            ),
        ),
        ("tests/test_engine_fused.py -k 'native and no-norm-topk'",),
    ),
    Mutant(  # invisible with one shared expert (its width is then moe_intermediate_size)
        "kernel-shared-expert-width",
        "the kernel runs a shared expert of n_shared_experts x moe_intermediate_size",
        (
            (
                "glm5/engine/fused.py",
                "ffn_inter=0 if L.down is None else L.down.weight.shape[1],",
                "ffn_inter=0 if L.down is None else (cfg.moe_intermediate_size if L.moe is not None else "
                "L.down.weight.shape[1]),",
            ),
        ),
        ("tests/test_engine_fused.py -k 'native and two-shared'",),
    ),
    Mutant(
        "spec-bonus-from-p_k",
        "after k accepted drafts the bonus token is drawn from p_{k+1}",
        (
            (
                "glm5/engine/speculative.py",
                "residual = torch.cat([(target_probs[:, :k] - draft_probs).clamp_min(0.0), "
                "target_probs[:, k:]], dim=1)",
                "residual = torch.cat([(target_probs[:, :k] - draft_probs).clamp_min(0.0), target_probs[:, k - 1 : k]],"
                " dim=1)",
            ),
        ),
        ("tests/test_speculative.py -k bonus",),
    ),
    Mutant(
        "mtp-inputs-swapped",
        "MTP: eh_proj([enorm(embedding) ; hnorm(hidden)]), in the model and in the fused drafting step",
        (
            (
                "glm5/model/model.py",
                "torch.cat([self.enorm(next_emb), self.hnorm(h_prev)], dim=-1)",
                "torch.cat([self.hnorm(h_prev), self.enorm(next_emb)], dim=-1)",
            ),
            (
                "glm5/engine/fused.py",
                "torch.cat([self._rms_norm(emb, module.enorm), self._rms_norm(hidden, module.hnorm)], -1)",
                "torch.cat([self._rms_norm(hidden, module.hnorm), self._rms_norm(emb, module.enorm)], -1)",
            ),
        ),
        ("tests/test_mtp_reference.py",),
    ),
    Mutant(  # each half alone: the model's own MTP forward, then the kernel's drafting step
        "mtp-inputs-swapped-model",
        "as above, in GLM5ForCausalLM only (model(..., mtp_depth) and model.mtp_forward)",
        (
            (
                "glm5/model/model.py",
                "torch.cat([self.enorm(next_emb), self.hnorm(h_prev)], dim=-1)",
                "torch.cat([self.hnorm(h_prev), self.enorm(next_emb)], dim=-1)",
            ),
        ),
        ("tests/test_mtp_reference.py -k 'forward or model'",),
    ),
    Mutant(
        "mtp-inputs-swapped-fused",
        "as above, in FusedDecoder.mtp_forward only (the native kernel's drafting step)",
        (
            (
                "glm5/engine/fused.py",
                "torch.cat([self._rms_norm(emb, module.enorm), self._rms_norm(hidden, module.hnorm)], -1)",
                "torch.cat([self._rms_norm(hidden, module.hnorm), self._rms_norm(emb, module.enorm)], -1)",
            ),
        ),
        ("tests/test_mtp_reference.py -k native",),
    ),
    Mutant(
        "fp8-grid-transposed",
        "whole-block FP8 dequantisation reads scale_inv[i // 128, j // 128]",
        (
            (
                "glm5/checkpoint/fp8.py",
                "* s[..., :, None, :, None]",
                "* s.mT.reshape(s.shape)[..., :, None, :, None]",
            ),
        ),
        ("tests/test_fp8.py -k 'per_block or by_blocks'",),
    ),
    Mutant(
        "serve-tokens-first-delta",
        "glm5:generation_tokens counts every streamed token, not only the first delta's",
        (
            (
                "glm5/serve/core.py",
                "                if num_new:\n"
                "                    metrics.generation_tokens.inc(num_new)\n"
                "                    if last is None:\n",
                "                if num_new:\n"
                "                    if last is None:\n"
                "                        metrics.generation_tokens.inc(num_new)\n",
            ),
        ),
        ("tests/test_serve.py -k metrics",),
    ),
    Mutant(
        "serve-graceful-timeout-0",
        "shutdown drains: open streams finish within the configured graceful timeout",
        (
            (
                "glm5/serve/server.py",  # ServerThread's: the drain deadline is the graceful timeout
                "self.server = draining_server(config, app, graceful_timeout_s)",
                "self.server = draining_server(config, app, 0.0)",
            ),
        ),
        ("tests/test_serve.py -k graceful",),
    ),
    Mutant(
        "async-close-no-abort",
        "closing an async stream early aborts its request and frees its blocks",
        (
            (
                "glm5/engine/async_engine.py",
                "            if not finished:\n                self.engine.abort_request(request_id)\n",
                "            if not finished:\n                pass\n",
            ),
        ),
        ("tests/test_engine_frontends.py -k stops_listening", "tests/test_serve.py -k disconnect"),
    ),
    # --- more claims of the suite -----------------------------------------------------------------------------
    Mutant(
        "mtp-pre-norm-hidden",
        "MTP depth 0 takes the main model's final-norm output (as vLLM feeds it)",
        (("glm5/model/model.py", "        h_prev = hidden\n", "        h_prev = h\n"),),
        ("tests/test_mtp_reference.py -k forward",),
    ),
    Mutant(
        "shared-expert-scaled",
        "the shared expert is added unscaled (routed_scaling_factor applies to routed experts only)",
        (
            (
                "glm5/model/moe.py",
                "            y = y + self.shared_experts(x)\n",
                "            y = y + self.shared_experts(x) * self.gate.routed_scaling_factor\n",
            ),
        ),
        ("tests/test_model_parity.py -k sparse",),
    ),
    Mutant(
        "router-bias-in-weights",
        "e_score_correction_bias changes which experts are chosen, never their weights",
        (
            (
                "glm5/model/moe.py",
                "        weights = scores.gather(1, topk_idx)\n",
                "        weights = choice.gather(1, topk_idx)\n",
            ),
        ),
        ("tests/test_model_parity.py -k sparse",),
    ),
    Mutant(
        "rope-half-split",
        "GLM-5 ropes interleaved pairs (x[2i], x[2i+1]), not the two halves",
        (
            (
                "glm5/model/layers.py",
                "        x1, x2 = x[..., 0::2], x[..., 1::2]\n",
                "        x1, x2 = x.chunk(2, dim=-1)\n",
            ),
        ),
        ("tests/test_model_parity.py -k sparse",),
    ),
    Mutant(
        "indexer-causal-off-by-one",
        "the indexer may select the query's own position (keys <= t are visible)",
        (
            (
                "glm5/model/attention.py",
                "hidden = keys.view(1, 1, -1) > pos.q_pos[:, s0:s1, None]",
                "hidden = keys.view(1, 1, -1) >= pos.q_pos[:, s0:s1, None]",
            ),
        ),
        ("tests/test_model_parity.py -k sparse",),
    ),
    Mutant(
        "fp8-scale-divides",
        "weight_scale_inv is a multiplier (W = W_fp8 * scale_inv), also on ragged edges",
        (
            (
                "glm5/checkpoint/fp8.py",
                "    return (q.float() * s).to(dtype)\n",
                "    return (q.float() / s).to(dtype)\n",
            ),
        ),
        ("tests/test_fp8.py -k 'multiplier or e4m3_bound or per_block'",),
    ),
    Mutant(
        "top-p-drops-crossing-token",
        "top-p keeps the smallest set whose mass reaches top_p (the token crossing it included)",
        (
            (
                "glm5/engine/sampling.py",
                "        before = probs_sorted.cumsum(-1) - probs_sorted  # mass of strictly more likely tokens\n",
                "        before = probs_sorted.cumsum(-1)\n",
            ),
        ),
        ("tests/test_sampling.py",),
    ),
    Mutant(
        "fsdp-grad-averaged",
        "FSDP sums gradients (the loss is already normalised by the global token count)",
        (
            (
                "glm5/train/parallel.py",
                "module.set_gradient_divide_factor(1.0)",
                "module.set_gradient_divide_factor(float(ctx.world_size))",
            ),
        ),
        ("tests/test_parallel.py -k fsdp",),
    ),
    Mutant(
        "rl-dead-worker-leases-lost",
        "a dead rollout worker's leases are requeued, every prompt group ends exactly once",
        (
            (
                "glm5/rl/buffer.py",
                "                self.requeue(i, self.leases[i].samples)\n",
                "                self.leases.pop(i)\n",
            ),
        ),
        ("tests/test_rl_buffer.py",),
    ),
    # --- data-parallel attention + EP, RL on a multi-process rollout engine (issue 16) ---------------------
    Mutant(
        "dp-alltoall-own-layer",
        "an expert owner runs each peer's tokens with the experts of the layer that peer is in",
        (
            (
                "glm5/engine/sharding.py",
                "experts = self.layers[meta[s][1]].experts",
                "experts = self.layers[meta[self.rank][1]].experts",
            ),
        ),
        ("tests/test_dp.py -k dp2_ep2_alltoall",),
    ),
    Mutant(
        "dp-allgather-own-layer",
        "all-gather dispatch: each DP rank's tokens run through the experts of its own layer",
        (
            (
                "glm5/engine/sharding.py",
                "n, layer = meta[s][0], meta[s][1]",
                "n, layer = meta[s][0], meta[self.rank][1]",
            ),
        ),
        ("tests/test_dp.py -k dp2_ep2_allgather",),
    ),
    Mutant(
        "dp-route-ignores-prefix",
        "the front rank routes a request to the DP rank whose cache holds its prefix",
        (("glm5/engine/dp.py", "hit = len(m.cache.match_prefix(", "hit = 0 * len(m.cache.match_prefix("),),
        ("tests/test_dp.py -k prefix_hit",),
    ),
    Mutant(
        "rl-dead-rollout-rank-not-replaced",
        "a dead rank of a multi-process rollout engine is replaced, nothing lost",
        (
            (
                "glm5/rl/rollout.py",
                "if not isinstance(exc, EngineDeadError) or self.engine_factory is None:",
                "if True:",
            ),
        ),
        ("tests/test_dp_rl.py -k killed",),
    ),
    # --- the training step's fast paths (tests/test_train_fastpath.py) -------------------------------------
    Mutant(
        "fused-ce-no-one-hot",
        "the fused head + cross-entropy gives the gradients of F.cross_entropy (softmax minus one-hot)",
        (("glm5/model/loss.py", "grad[rows, t_safe] -= 1.0", "grad[rows, t_safe] -= 0.0"),),
        ("tests/test_train_fastpath.py -k fused_cross_entropy_equals",),
    ),
    Mutant(
        "indexer-loss-wrong-columns",
        "the indexer loss from every key's scores takes the selected keys' columns",
        (
            (
                "glm5/model/attention.py",
                "logits = logits if idx_c is None else logits.gather(-1, idx_c)",
                "logits = logits if idx_c is None else logits[..., : idx_c.shape[-1]]",
            ),
        ),
        ("tests/test_train_fastpath.py -k indexer_loss_from_every",),
    ),
    Mutant(
        "moe-cast-once-wrong-dtype",
        "MoE experts cast once under autocast compute exactly what per-call autocast casts compute",
        (("glm5/model/moe.py", "dtype = torch.get_autocast_dtype(device)", "dtype = torch.float16"),),
        ("tests/test_train_fastpath.py -k moe_experts_cast",),
    ),
]


# ------------------------------------------------------------------------------------------------- machinery
def apply(root: Path, edits: tuple[tuple[str, str, str], ...]) -> dict[Path, str]:
    """Apply the substitutions under root; returns the original texts. Raises unless each old text occurs once."""
    originals: dict[Path, str] = {}
    for rel, old, new in edits:
        path = root / rel
        text = path.read_text()
        originals.setdefault(path, text)
        count = text.count(old)
        if count != 1:
            raise ValueError(f"{rel}: the mutation's old text occurs {count} times (expected once): {old!r}")
        path.write_text(text.replace(old, new))
    return originals


def check_edits(root: Path = ROOT) -> list[str]:
    """Every mutant's edits against the sources under root, without writing: the problems found."""
    problems = []
    for m in MUTANTS:
        texts: dict[str, str] = {}
        for rel, old, new in m.edits:
            path = root / rel
            if not path.exists():
                problems.append(f"{m.name}: {rel} does not exist")
                continue
            text = texts.setdefault(rel, path.read_text())
            if text.count(old) != 1:
                problems.append(f"{m.name}: {rel}: old text occurs {text.count(old)} times: {old[:80]!r}")
            else:
                texts[rel] = text.replace(old, new)
    return problems


def make_copy() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="glm5-mutants-"))
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp / name, ignore=IGNORE)
        elif src.exists():
            shutil.copy2(src, tmp / name)
    (tmp / "_mutant_probe.py").write_text(PROBE)
    return tmp


def env_for(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update(
        PYTHONPATH=str(copy),
        PYTHONDONTWRITEBYTECODE="1",
        GLM5_CACHE_DIR=str(copy / ".cache"),
        GLM5_MUTANT_ROOT=str(copy),
    )
    return env


def run_selection(copy: Path, selection: str, timeout: float, fail_fast: bool) -> tuple[str, float, str]:
    """-> (status: pass / fail / timeout / error rc=N, seconds, output tail)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "_mutant_probe",
        *(["-x"] if fail_fast else []),
        *shlex.split(selection),
    ]
    start = time.monotonic()
    try:
        out = subprocess.run(
            cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-1500:]
        return (
            "timeout",
            time.monotonic() - start,
            tail.decode(errors="replace") if isinstance(tail, bytes) else tail,
        )
    secs = time.monotonic() - start
    tail = (out.stdout + out.stderr)[-3000:]
    status = {0: "pass", 1: "fail"}.get(out.returncode, f"error rc={out.returncode}")
    return status, secs, tail


def failed_tests(tail: str) -> list[str]:
    return [
        ln.split(" ", 1)[1].split(" - ")[0]
        for ln in tail.splitlines()
        if ln.startswith(("FAILED ", "ERROR "))
    ]


def check_imports_from(copy: Path) -> None:
    code = "import glm5, glm5.kernels.native as n; print(glm5.__file__); print(n.SOURCE)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=copy, env=env_for(copy), capture_output=True, text=True
    )
    paths = out.stdout.split()
    if (
        out.returncode
        or len(paths) != 2
        or not all(Path(p).resolve().is_relative_to(copy.resolve()) for p in paths)
    ):
        raise SystemExit(f"the copy is not what gets imported: {out.stdout!r} {out.stderr[-500:]!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the mutants and their tests, run nothing")
    ap.add_argument("--only", default="", help="comma-separated mutant names")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    ap.add_argument(
        "--all-failures", action="store_true", help="run every selected test (no -x) and list failures"
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run (default 300)")
    args = ap.parse_args(argv)

    chosen = [m for m in MUTANTS if not args.only or m.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutants: {sorted(unknown)}")
    if args.list:
        for m in chosen:
            print(f"{m.name:28} {m.claim}\n{'':28} edits: {', '.join(e[0] for e in m.edits)}")
            for t in m.tests:
                print(f"{'':28} tests: {t}")
        return 0
    problems = check_edits()
    if problems:
        print("stale mutations (fix the list):\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2

    copy = make_copy()
    print(f"copy: {copy}", flush=True)
    try:
        check_imports_from(copy)
        baseline: dict[str, str] = {}
        if not args.no_baseline:
            for sel in dict.fromkeys(t for m in chosen for t in m.tests):
                status, secs, tail = run_selection(copy, sel, args.timeout, fail_fast=False)
                baseline[sel] = status
                print(f"baseline  {status:8} {secs:6.1f}s  {sel}", flush=True)
                if status != "pass":
                    print("    " + "\n    ".join(tail.splitlines()[-15:]), flush=True)
        rows = []
        for m in chosen:
            originals = apply(copy, m.edits)
            try:
                results = []
                for sel in m.tests:
                    status, secs, tail = run_selection(
                        copy, sel, args.timeout, fail_fast=not args.all_failures
                    )
                    results.append((sel, status, secs, failed_tests(tail)))
                    if status.startswith("error") or status == "timeout":
                        print(f"    {m.name}: {sel}: {status}\n    " + "\n    ".join(tail.splitlines()[-12:]))
            finally:
                for path, text in originals.items():
                    path.write_text(text)
            if any(baseline.get(sel, "pass") != "pass" for sel, *_ in results):
                verdict = "BASELINE FAILS"
            elif any(status == "fail" for _, status, _, _ in results):
                verdict = "CAUGHT"
            elif all(status == "pass" for _, status, _, _ in results):
                verdict = "MISSED"
            else:
                verdict = "ERROR"
            rows.append((m, verdict, results))
            secs = sum(r[2] for r in results)
            print(f"{verdict:14} {secs:6.1f}s  {m.name}", flush=True)
            for sel, status, _, failed in results:
                print(f"{'':24}{status:8} {sel}", flush=True)
                for test in failed:
                    print(f"{'':28}failed: {test}", flush=True)
    finally:
        if args.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)

    print("\n| mutation | claim | tests | result |\n|---|---|---|---|")
    for m, verdict, results in rows:
        tests = "<br>".join(f"`{sel}`: {status}" for sel, status, _, _ in results)
        print(f"| {m.name} | {m.claim} | {tests} | {verdict} |")
    caught = sum(v == "CAUGHT" for _, v, _ in rows)
    print(f"\n{caught} of {len(rows)} mutants caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
