"""`from_pretrained` / `save_pretrained`: a model <-> a checkpoint folder in the published GLM-5 layout.

Loading streams: the model is built on the meta device, every name, shape and dtype of the checkpoint is
checked against it from the shard headers alone (nothing allocated yet), then the parameters are allocated
once and each checkpoint tensor is read, converted (cast / FP8 dequantised or quantised) and copied straight
into its place, shard by shard. Per-expert tensors are copied into their slice of the fused [E, ...] expert
parameters, so experts that span shards need no staging copy. Peak memory is the model plus one tensor
plus the memory-mapped pages of one shard, never two copies of the weights. A tensor the model holds whole, in
the file's dtype and shape (everything but the per-expert slices of the fused expert banks, when the dtypes
match), is not copied at all: the parameter is a view of the shard mapped copy-on-write, whose pages are read on
first use (ShardReader.mapped; writing into it, e.g. an optimizer step, copies the touched pages into the
process and never reaches the file). After loading, freed heap memory is returned to the OS. On any error the
half-built model is dropped; nothing the caller holds is modified.

This module works on nn.Modules generically, through state dicts and the name table; it never imports
glm5.model (the model's `from_pretrained` passes itself in as `build`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from glm5.checkpoint import fp8 as fp8_format
from glm5.checkpoint.files import (
    CONFIG_FILE,
    CheckpointError,
    CheckpointFolder,
    TensorInfo,
    TensorSpec,
    dtype_name,
    release_free_memory,
    write_checkpoint,
)
from glm5.checkpoint.hf import is_glm5_name, is_shared_copy, layer_index, to_hf_state_dict
from glm5.config import GLM5Config

FP8_MODES = ("dequantize", "keep")
_FLOAT_SOURCES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_ROUTER_WEIGHT = "mlp.gate.weight"
_ROUTER_BIAS = "mlp.gate.e_score_correction_bias"


def resolve_dtype(dtype: torch.dtype | str | None, cfg: GLM5Config) -> torch.dtype:
    """None -> the config's dtype (`dtype` / `torch_dtype` of config.json); strings like 'bfloat16' too."""
    value = cfg.torch_dtype if dtype is None else dtype
    resolved = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point or resolved.itemsize < 2:
        raise ValueError(
            f"dtype {value!r} is not a float dtype to load weights in (use bfloat16, float16 or float32)"
        )
    return resolved


# --- loading --------------------------------------------------------------------------------------
def open_checkpoint(
    path: str | os.PathLike[str], fp8: str, prepare: Callable | None
) -> tuple[CheckpointFolder, GLM5Config]:
    """Check the loading options, open the folder and read its config (quantization_config validated; an MTP
    layer the shards lack dropped from the config). Shared by the one-process and the sharded loaders."""
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8={fp8!r}: choose one of {FP8_MODES}")
    if fp8 == "keep" and prepare is None:
        raise ValueError("fp8='keep' needs `prepare`, the function that swaps FP8 modules into the model")
    folder = CheckpointFolder(path)
    config_path = os.path.join(folder.path, CONFIG_FILE)
    try:
        cfg = GLM5Config.from_hf_config(folder.config)
        fp8_format.parse_quantization_config(cfg.extra.get("quantization_config"), source=config_path)
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    return folder, _without_absent_mtp(cfg, folder)


def build_and_match(
    folder: CheckpointFolder,
    cfg: GLM5Config,
    build: Callable,
    dtype: torch.dtype | str | None,
    fp8: str,
    prepare: Callable | None,
) -> tuple[nn.Module, list]:
    """The model of `cfg` on the meta device, in the loading dtype (routers fp32, FP8 modules swapped in for
    "keep"), and the checkpoint's tensors matched against its HF names, shapes and dtypes: every check that
    needs no data, before anything is allocated. Shared by the one-process and the sharded loaders."""
    with torch.device("meta"):
        model = build(cfg)
    model.to(resolve_dtype(dtype, cfg))
    _routers_to_fp32(model)
    if fp8 == "keep":
        prepare(model)
    expected = {n: (tuple(t.shape), t.dtype) for n, t in to_hf_state_dict(model.state_dict(), cfg).items()}
    return model, _match(folder, expected, cfg)


def load_pretrained(
    path: str | os.PathLike,
    build: Callable[[GLM5Config], nn.Module],
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    fp8: str = "dequantize",
    prepare: Callable[[nn.Module], object] | None = None,
    on_filled: Callable[[nn.Module, str], None] | None = None,
) -> nn.Module:
    """Build `build(config)` on the meta device and fill it from the checkpoint folder at `path`.

    dtype: of the floating-point weights (default: the config's); routers and their bias stay fp32.
    fp8: "dequantize" turns e4m3 weights into `dtype`; "keep" needs `prepare`, which swaps FP8 modules into
      the meta model (glm5.model.fp8.quantize_model); e4m3 weights are then copied as they are and BF16 weights
      of the quantised split are quantised on the way in.
    on_filled(model, module_path): called as soon as every tensor of a module is read (the loader then holds
      no reference to them: e.g. glm5.kernels.formats converts each expert bank as it completes, so the
      unconverted banks never all sit in memory at once).
    Raises CheckpointError (a ValueError) naming the file and tensor for any mismatch.
    """
    folder, cfg = open_checkpoint(path, fp8, prepare)
    model, reads = build_and_match(folder, cfg, build, dtype, fp8, prepare)  # all checks before allocating

    materialize(model, device)
    own = model.state_dict(keep_vars=True)
    targets = to_hf_state_dict(own, cfg)
    own_ids = {id(t) for t in own.values()}
    filled = None
    if on_filled is not None:
        owners = {
            id(t): path
            for path, m in model.named_modules()
            for t in (*m._parameters.values(), *m._buffers.values())
            if t is not None
        }
        module_of = {r.name: owners.get(id(_base(targets[r.name]))) for r in reads}
        remaining: dict[str, int] = {}
        for path in module_of.values():
            if path is not None:
                remaining[path] = remaining.get(path, 0) + 1

        def filled(name: str) -> None:
            path = module_of.get(name)
            if path is not None:
                remaining[path] -= 1
                if not remaining[path]:
                    on_filled(model, path)

    del own
    with torch.no_grad():
        _stream(folder, reads, targets, own_ids, filled)
    _reset_non_persistent_buffers(model)
    release_free_memory()
    if not any(t.dtype == fp8_format.FP8_DTYPE for t in model.state_dict().values()):
        cfg.extra.pop("quantization_config", None)  # the weights in memory are no longer quantised
    return model.eval()


def _without_absent_mtp(cfg: GLM5Config, folder: CheckpointFolder) -> GLM5Config:
    """transformers drops the MTP layer when it saves; load such a checkpoint as a model without MTP."""
    if not cfg.num_nextn_predict_layers:
        return cfg
    n = cfg.num_hidden_layers
    if any((layer_index(name) or 0) >= n for name in folder.tensors if not is_shared_copy(name, cfg)):
        return cfg
    warnings.warn(
        f"{folder.path}: the checkpoint has no MTP layer (model.layers.{n}.*) although config.json sets "
        f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}; loading the model without MTP",
        stacklevel=4,  # the caller of GLM5ForCausalLM.from_pretrained
    )
    return cfg.replace(num_nextn_predict_layers=0)


def materialize(model: nn.Module, device: torch.device | str | None) -> None:
    """Module.to_empty(device) (default CPU) without torch.empty_like: on meta tensors that runs torch._refs,
    whose first use imports sympy -- ~30 MB of Python objects and code a serving process would hold for nothing."""
    where = torch.device(device) if device is not None else torch.device("cpu")
    model._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=where))


def _routers_to_fp32(model: nn.Module) -> None:
    """Router weights stay fp32 whatever the load dtype (the bias buffer keeps itself fp32)."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if f"{name}.weight".endswith(_ROUTER_WEIGHT) and isinstance(weight, nn.Parameter):
            fp32 = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)  # see materialize
            module.weight = nn.Parameter(fp32, requires_grad=weight.requires_grad)


@dataclass(frozen=True)
class _Read:
    """One checkpoint tensor to read and where it goes."""

    name: str
    """Checkpoint tensor (also the target name: the loader copies into the same HF name)."""
    scale: str | None = None
    """Dequantise with this checkpoint scale (e4m3 source, float target)."""
    quantize_into: str | None = None
    """Quantise (float source, e4m3 target) and write the scale to this target."""


def _match(
    folder: CheckpointFolder, expected: dict[str, tuple[tuple[int, ...], torch.dtype]], cfg: GLM5Config
):
    """Check the checkpoint's names, shapes and dtypes against the model; return what to read, in file order."""
    tensors, used, reads = folder.tensors, set(), []
    where = (
        folder.index_path
        if os.path.exists(folder.index_path)
        else os.path.join(folder.path, "model.safetensors")
    )
    num_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    for info in tensors.values():  # layers the config lacks explain any other mismatch: report them first
        if (layer_index(info.name) or 0) >= num_layers and not is_shared_copy(info.name, cfg):
            raise CheckpointError(_unexpected(folder, info, cfg))
    for name, (shape, target_dtype) in expected.items():
        if name.endswith(fp8_format.SCALE_SUFFIX):
            continue  # filled with its weight
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(
                f"{where}: tensor {name!r} is missing; the model built from config.json needs it"
            )
        _check_shape(folder, info, shape)
        sname = fp8_format.scale_name(name)
        target_fp8 = target_dtype == fp8_format.FP8_DTYPE
        if info.dtype == fp8_format.FP8_DTYPE:
            _check_scale(folder, info, tensors.get(sname))
            used.add(sname)
            reads += [_Read(name), _Read(sname)] if target_fp8 else [_Read(name, scale=sname)]
        elif info.dtype in _FLOAT_SOURCES:
            if sname in tensors:
                raise CheckpointError(
                    f"{_path(folder, tensors[sname])}: tensor {sname!r} scales {name!r}, "
                    f"which is {info.dtype}, not float8_e4m3fn"
                )
            reads.append(_Read(name, quantize_into=sname if target_fp8 else None))
        else:
            raise CheckpointError(
                f"{_path(folder, info)}: tensor {name!r} has dtype {dtype_name(info.dtype)}; "
                "expected a float dtype or float8_e4m3fn with a weight_scale_inv"
            )
        used.add(name)
    for name, info in tensors.items():
        if name not in used and not is_shared_copy(name, cfg):
            raise CheckpointError(_unexpected(folder, info, cfg))
    order = {file: i for i, file in enumerate(folder.files)}
    return sorted(reads, key=lambda r: order[tensors[r.name].file])


def _path(folder: CheckpointFolder, info: TensorInfo) -> str:
    return os.path.join(folder.path, info.file)


def _check_shape(folder: CheckpointFolder, info: TensorInfo, shape: tuple[int, ...]) -> None:
    if info.shape != shape:
        raise CheckpointError(
            f"{_path(folder, info)}: tensor {info.name!r} has shape {list(info.shape)}, but config.json implies "
            f"{list(shape)}; config.json does not match the weights"
        )


def _check_scale(folder: CheckpointFolder, info: TensorInfo, scale: TensorInfo | None) -> None:
    sname = fp8_format.scale_name(info.name)
    if scale is None:
        raise CheckpointError(
            f"{_path(folder, info)}: tensor {info.name!r} is float8_e4m3fn but {sname!r} is missing"
        )
    expected = fp8_format.scale_shape(info.shape)
    if scale.dtype != torch.float32 or scale.shape != expected:
        raise CheckpointError(
            f"{_path(folder, scale)}: tensor {sname!r} is {dtype_name(scale.dtype)} {list(scale.shape)}; "
            f"a block-FP8 scale of {list(info.shape)} must be float32 {list(expected)}"
        )


def _unexpected(folder: CheckpointFolder, info: TensorInfo, cfg: GLM5Config) -> str:
    layer = layer_index(info.name)
    num_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if layer is not None and layer >= num_layers:
        return (
            f"{_path(folder, info)}: tensor {info.name!r} belongs to layer {layer}, but config.json has "
            f"{cfg.num_hidden_layers} layers + {cfg.num_nextn_predict_layers} MTP; config.json does not match "
            "the weights"
        )
    if not is_glm5_name(info.name, cfg):
        return f"{_path(folder, info)}: unknown tensor {info.name!r}; it is not a GLM-5 parameter"
    return (
        f"{_path(folder, info)}: tensor {info.name!r} has no place in the model built from config.json "
        "(e.g. an indexer on an IndexCache-shared layer, or a scale of a weight that is not quantised)"
    )


def _base(t: torch.Tensor) -> torch.Tensor:
    """The tensor a view was taken of (per-expert slices of a bank), or t itself."""
    return t._base if t._base is not None else t


def _stream(
    folder: CheckpointFolder,
    reads: list[_Read],
    targets: dict[str, torch.Tensor],
    own: set[int] | None = None,
    filled: Callable[[str], None] | None = None,
) -> None:
    """Fill `targets` from the checkpoint. A tensor that is one of the model's own parameters or buffers (its id
    in `own`), on the CPU, stored in the file in the model's dtype and shape, is not copied: the parameter is
    pointed at the shard's memory-mapped bytes (see ShardReader.mapped; copy-on-write, so writes stay in the
    process). The others (per-expert slices of the fused banks, converted or dequantised tensors) are copied,
    one at a time. Each target is dropped from `targets` once filled; `filled(name)` follows each read."""
    own = own or set()
    with folder.reader() as reader:
        for r in reads:
            _fill(reader, folder, r, targets, own)
            if filled is not None:
                filled(r.name)


def _fill(
    reader, folder: CheckpointFolder, r: _Read, targets: dict[str, torch.Tensor], own: set[int]
) -> None:  # noqa: ANN001
    """One read of `_stream`: its target (and scale target) filled, then dropped from `targets`."""
    target = targets.pop(r.name)
    info = folder.tensors[r.name]
    if (
        id(target) in own
        and r.scale is None
        and r.quantize_into is None
        and target.device.type == "cpu"
        and (info.dtype, info.shape) == (target.dtype, tuple(target.shape))
    ):
        view = reader.mapped(r.name)
        if view is not None:
            target.data = view
            return
    tensor = reader.get(r.name)
    if r.scale is not None:
        tensor = fp8_format.dequantize(tensor, reader.get(r.scale), target.dtype)
    if r.quantize_into is not None:
        tensor, scale = fp8_format.quantize(tensor)
        targets.pop(r.quantize_into).copy_(scale)
    target.copy_(tensor)


def _reset_non_persistent_buffers(model: nn.Module) -> None:
    """Buffers that are not in the state dict (RoPE tables) are recomputed by their module's reset_parameters."""
    for name, module in model.named_modules():
        if module._non_persistent_buffers_set:
            if not hasattr(module, "reset_parameters"):
                raise RuntimeError(
                    f"{name or 'model'} has non-persistent buffers but no reset_parameters() to refill them"
                )
            module.reset_parameters()


# --- saving ---------------------------------------------------------------------------------------
def save_pretrained(
    state_dict: dict[str, torch.Tensor],
    cfg: GLM5Config,
    path: str | os.PathLike,
    fp8: bool = False,
    max_shard_size: int | str = "5GB",
) -> dict:
    """Write a model state dict as a checkpoint folder in the published layout; returns the index.

    Per-expert tensors, MTP as layers num_hidden_layers.. (without the shared embedding and head), weights in
    the model's dtype (that of lm_head; routers too, as published), `e_score_correction_bias` fp32. fp8=True
    writes the quantised split as e4m3 + `weight_scale_inv` and the published `quantization_config`; a model
    holding FP8 weights (glm5.model.fp8) is written as it is (fp8=True) or dequantised (fp8=False).
    """
    hf = to_hf_state_dict(state_dict, cfg)
    head = hf.get("lm_head.weight", hf.get("model.embed_tokens.weight"))
    main = head.dtype if head is not None else resolve_dtype(None, cfg)
    specs: list[TensorSpec] = []
    for name, tensor in hf.items():
        if not name.endswith(fp8_format.SCALE_SUFFIX):
            specs += _save_specs(name, tensor, hf.get(fp8_format.scale_name(name)), main, fp8)
    config = cfg.to_hf_config()
    config["dtype"] = dtype_name(main)
    config.pop("quantization_config", None)
    if fp8:
        config["quantization_config"] = fp8_format.quantization_config(cfg)
    return write_checkpoint(path, config, specs, max_shard_size)


def _save_specs(
    name: str, t: torch.Tensor, scale: torch.Tensor | None, main: torch.dtype, fp8: bool
) -> list[TensorSpec]:
    shape = tuple(t.shape)
    if t.dtype == fp8_format.FP8_DTYPE:
        assert scale is not None, f"{name}: an FP8 weight without its scale"
        if fp8:
            return [
                TensorSpec(name, shape, t.dtype, lambda: t.cpu()),
                TensorSpec(
                    fp8_format.scale_name(name), tuple(scale.shape), torch.float32, lambda: scale.cpu()
                ),
            ]
        return [TensorSpec(name, shape, main, lambda: fp8_format.dequantize(t, scale, main).cpu())]
    if fp8 and fp8_format.is_quantized(name) and t.dim() == 2:
        pending: dict[str, torch.Tensor] = {}

        def quantized() -> torch.Tensor:
            q, pending["scale"] = fp8_format.quantize(t.detach())
            return q.cpu()

        return [
            TensorSpec(name, shape, fp8_format.FP8_DTYPE, quantized),
            TensorSpec(
                fp8_format.scale_name(name),
                fp8_format.scale_shape(shape),
                torch.float32,
                lambda: pending.pop("scale").cpu(),
            ),
        ]
    dtype = (
        torch.float32 if name.endswith(_ROUTER_BIAS) else main if name.endswith(_ROUTER_WEIGHT) else t.dtype
    )
    return [TensorSpec(name, shape, dtype, lambda: t.detach().to("cpu", dtype))]
