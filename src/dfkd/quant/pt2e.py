"""Integer models on torchao's PT2E flow: export, prepare, calibrate or train, convert, save.

The model is captured whole with `torch.export` (normalization included, so the integer
program takes [0, 1] pixels like the float one), annotated by a quantizer, observed on
calibration inputs (or trained with fake quantization, QAT), and converted into a graph of
integer weights with quantize/dequantize steps around the integer operators; inductor
(`torch.compile`) lowers that graph to oneDNN int8 kernels on x86.

Schemes:
- int8-static: int8 weights (per channel) and int8 activations whose ranges come from the
  calibration inputs (torchao's X86InductorQuantizer, its default config).
- int8-dynamic: int8 weights; activation ranges are measured on each batch at run time, so
  calibration does not matter (the same quantizer, is_dynamic=True).
- int4-weight: weights rounded to 4 bits per output channel (symmetric, -8..7) and computed in
  float; activations stay float. torchao's x86 quantizer has no weight-only config, so this one
  is a small `Quantizer` of our own on the same flow.

torchao is an optional dependency (`pip install 'dfkd[quant]'`); importing this module without
it is fine, using it is a one-line error.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import statistics
import time
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from dfkd.errors import DfkdError, require_one_of
from dfkd.hooks import eval_mode
from dfkd.io import atomic_path
from dfkd.models.classifier import Classifier, InputSpec, new_classifier

SCHEMES = ("int8-static", "int8-dynamic", "int4-weight")
_AFFINE_OPS = ("conv1d", "conv2d", "conv3d", "linear")


def require_torchao():
    """The torchao modules this flow uses, or a one-line error saying how to get them."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")  # CPU builds warn about missing CUDA kernels
            import torchao.quantization.pt2e as pt2e
            import torchao.quantization.pt2e.quantize_pt2e as flow
            import torchao.quantization.pt2e.quantizer as api
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    except ImportError as e:
        raise DfkdError(f"quantization needs torchao ({e}); install it with "
                        "pip install 'dfkd[quant]'") from None
    return pt2e, flow, api, x86


def check_scheme(scheme: str) -> None:
    require_one_of("scheme", scheme, SCHEMES)


def _export(module: torch.nn.Module, shape, device) -> torch.export.ExportedProgram:
    """`module` captured for inputs of `shape` with any batch size (the example has 2: a batch
    of 1 would be specialized)."""
    example = torch.rand(2, *shape, device=device)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def export_float(model: Classifier) -> torch.fx.GraphModule:
    """The whole classifier as an exported graph with a dynamic batch dimension."""
    try:
        with eval_mode(model):
            program = _export(model, model.spec.shape, model.mean.device)
    except Exception as e:  # noqa: BLE001  (export errors are long; one line says what to do)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DfkdError(f"torch.export could not capture the model ({first}); quantization "
                        "needs a model without data-dependent Python control flow") from None
    return program.module()


def quantizer(scheme: str, *, qat: bool = False):
    check_scheme(scheme)
    _, _, _, x86 = require_torchao()
    if scheme == "int4-weight":
        return _int4_weight_quantizer(qat)
    config = x86.get_default_x86_inductor_quantization_config(
        is_qat=qat, is_dynamic=scheme == "int8-dynamic")
    return x86.X86InductorQuantizer().set_global(config)


def _int4_weight_quantizer(qat: bool):
    pt2e, _, api, _ = require_torchao()
    observer = pt2e.PerChannelMinMaxObserver
    if qat:
        ctr = pt2e.FakeQuantize.with_args(
            observer=pt2e.MovingAveragePerChannelMinMaxObserver, quant_min=-8, quant_max=7,
            dtype=torch.int8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    else:
        ctr = observer.with_args(quant_min=-8, quant_max=7, dtype=torch.int8,
                                 qscheme=torch.per_channel_symmetric, ch_axis=0)
    spec = api.QuantizationSpec(dtype=torch.int8, quant_min=-8, quant_max=7,
                                qscheme=torch.per_channel_symmetric, ch_axis=0,
                                is_dynamic=False, observer_or_fake_quant_ctr=ctr)

    class Int4WeightOnly(api.Quantizer):
        """Annotates the weight of every convolution and linear layer, nothing else."""

        def annotate(self, model):
            for node in model.graph.nodes:
                name = getattr(node.target, "__name__", "").split(".")[0]
                if node.op == "call_function" and name in _AFFINE_OPS:
                    node.meta["quantization_annotation"] = api.QuantizationAnnotation(
                        # the input's entry (None: stays float) is read by QAT's conv-BN fusion
                        input_qspec_map={node.args[0]: None, node.args[1]: spec},
                        _annotated=True)
            return model

        def validate(self, model):
            return None

    return Int4WeightOnly()


@torch.no_grad()
def quantize_static(model: Classifier, scheme: str, calibration: torch.Tensor,
                    batch_size: int = 256) -> torch.fx.GraphModule:
    """Post-training quantization: observe `calibration` (pixels in [0, 1]), then convert."""
    _, flow, _, _ = require_torchao()
    prepared = flow.prepare_pt2e(export_float(model), quantizer(scheme))
    observe(prepared, calibration, batch_size)
    return convert(prepared)


def prepare_qat(model: Classifier, scheme: str) -> torch.fx.GraphModule:
    """A copy of the model with fake quantization, ready to train (BatchNorm frozen at its
    statistics: synthetic batches must not overwrite them). The copy shares no storage with
    `model`, which stays the float teacher."""
    pt2e, flow, _, _ = require_torchao()
    prepared = flow.prepare_qat_pt2e(export_float(copy.deepcopy(model)),
                                     quantizer(scheme, qat=True))
    pt2e.move_exported_model_to_eval(prepared)
    prepared.requires_grad_(True)
    return prepared



@torch.no_grad()
def observe(prepared: torch.fx.GraphModule, x: torch.Tensor, batch_size: int = 256) -> None:
    device = _device(prepared)
    for i in range(0, len(x), batch_size):
        prepared(x[i:i + batch_size].to(device))


def set_observers(prepared: torch.fx.GraphModule, enabled: bool) -> None:
    """Freeze (or thaw) the quantization ranges of a QAT model."""
    pt2e, _, _, _ = require_torchao()
    prepared.apply(pt2e.enable_observer if enabled else pt2e.disable_observer)


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    _, flow, _, _ = require_torchao()
    converted = flow.convert_pt2e(prepared)
    _drop_unused_constants(converted)
    return converted


def _drop_unused_constants(gm: torch.fx.GraphModule) -> None:
    """Convert leaves the float weights it replaced on the module; remove them so that saved
    programs hold only what the graph reads."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner, _, leaf = name.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            delattr(module, leaf)
    gm.recompile()


def _device(gm: torch.nn.Module) -> torch.device:
    for t in list(gm.parameters()) + list(gm.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of a float or converted model on pixels x (on the model's device), on the CPU."""
    device = _device(model)
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(x), batch_size)])


def _read_tensors(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """The live tensors the program's get_attr nodes read (parameters, buffers, or plain
    attributes that convert left), by name."""
    state = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    used = sorted({n.target for n in gm.graph.nodes if n.op == "get_attr"})
    return {name: state[name] if name in state else getattr(gm, name) for name in used}


def constants(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the program reads (integer weights, scales, zero points, float biases):
    what the model is on disk, without its graph."""
    return {k: t.detach().cpu().contiguous() for k, t in _read_tensors(gm).items()}


def float_constants(model: Classifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def pack_int4(t: torch.Tensor) -> torch.Tensor:
    """Values in -8..7, two per byte (low nibble first), as uint8; odd lengths padded."""
    flat = (t.flatten().to(torch.int16) & 0xF).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    low, high = packed & 0xF, packed >> 4
    flat = torch.stack([low, high], 1).flatten().to(torch.int16)
    flat = torch.where(flat > 7, flat - 16, flat).to(torch.int8)
    return flat[:math.prod(shape)].reshape(shape)


def serialize(tensors: dict[str, torch.Tensor], scheme: str | None = None,
              metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of `tensors`. Under int4-weight the int8 tensors (values -8..7)
    are packed two per byte, their shapes kept in the metadata (`int4_shapes`, JSON) so that
    unpack_int4 restores them."""
    metadata = dict(metadata or {})
    if scheme == "int4-weight":
        shapes = {k: list(t.shape) for k, t in tensors.items() if t.dtype == torch.int8}
        tensors = {k: pack_int4(t) if k in shapes else t for k, t in tensors.items()}
        metadata["int4_shapes"] = json.dumps(shapes)
    return safetensors_bytes(tensors, metadata=metadata or None)


def bytes_on_disk(tensors: dict[str, torch.Tensor], scheme: str | None = None) -> int:
    return len(serialize(tensors, scheme))


def activation_qparams(gm: torch.fx.GraphModule) -> dict[str, list]:
    """Static activation ranges: convert writes them into the graph as literal arguments
    (scale, zero point) of its per-tensor quantize/dequantize nodes, not as constants."""
    return {n.name: [n.args[1], n.args[2]] for n in gm.graph.nodes
            if n.op == "call_function" and n.target in _per_tensor_ops()}


def _per_tensor_ops():
    ops = torch.ops.quantized_decomposed
    return (ops.quantize_per_tensor.default, ops.dequantize_per_tensor.default)


def save_quantized(gm: torch.fx.GraphModule, model: Classifier, path: Path, scheme: str,
                   qat: bool, extra: dict[str, str] | None = None) -> int:
    """The converted model as one safetensors file that `load_quantized` turns back into the
    same program: its constants, its activation ranges, and what rebuilds its graph (the
    architecture, input spec, scheme and flow) in the metadata. The model's size on disk."""
    meta = {"format": "dfkd-quantized", "scheme": scheme, "flow": "qat" if qat else "ptq",
            "arch": model.arch, "spec": model.spec.to_json(),
            "activation_qparams": json.dumps(activation_qparams(gm)), **(extra or {})}
    data = serialize(constants(gm), scheme, meta)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return len(data)


def load_quantized(path: str | Path, device="cpu") -> torch.fx.GraphModule:
    """The program `save_quantized` wrote: the architecture is exported and converted again by
    the same flow (on random inputs), then every constant and activation range is replaced by
    the stored one. Needs the architecture's code (like the float model), unlike a .pt2."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise DfkdError(f"'{path}' is not a readable safetensors file ({e})") from None
    if meta.get("format") != "dfkd-quantized" or "activation_qparams" not in meta:
        raise DfkdError(f"'{path}' is not a quantized model written by dfkd quantize")
    shapes = json.loads(meta.get("int4_shapes", "{}"))
    stored = {k: unpack_int4(t, tuple(shapes[k])) if k in shapes else t
              for k, t in stored.items()}
    model = new_classifier(meta["arch"], InputSpec.from_json(meta["spec"])).to(device).eval()
    x = torch.rand(4, *model.spec.shape, device=device)
    if meta["flow"] == "qat":
        prepared = prepare_qat(model, meta["scheme"])
        observe(prepared, x)
        gm = convert(prepared)
    else:
        gm = quantize_static(model, meta["scheme"], x)
    current = _read_tensors(gm)
    if current.keys() != stored.keys():
        raise DfkdError(f"'{path}' does not fit the program its architecture exports to now "
                        f"(constants differ: {sorted(current.keys() ^ stored.keys())[:4]})")
    with torch.no_grad():
        for name, value in stored.items():
            target = current[name]
            if target.shape != value.shape or target.dtype != value.dtype:
                raise DfkdError(f"'{path}': constant {name} is {value.dtype} "
                                f"{tuple(value.shape)}, the program expects {target.dtype} "
                                f"{tuple(target.shape)}")
            target.copy_(value)
    ranges = json.loads(meta["activation_qparams"])
    nodes = {n.name: n for n in gm.graph.nodes if n.target in _per_tensor_ops()}
    if nodes.keys() != ranges.keys():
        raise DfkdError(f"'{path}' does not fit the program its architecture exports to now "
                        "(activation quantizers differ)")
    for name, (scale, zero_point) in ranges.items():
        node = nodes[name]
        node.args = (node.args[0], scale, zero_point, *node.args[3:])
    gm.recompile()
    return gm


def save_program(gm: torch.nn.Module, shape: tuple[int, ...], path: Path) -> int:
    """The converted model as a `torch.export` program (.pt2): one file that
    `torch.export.load(path).module()` runs in any PyTorch process, no dfkd needed."""
    torch.export.save(_export(gm, shape, _device(gm)), str(path))
    return path.stat().st_size


def load_program(path: Path) -> torch.nn.Module:
    require_torchao()  # registers the quantized operators some programs call
    return torch.export.load(str(path)).module()


@torch.inference_mode()
def latency_ms(model, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass on batch x, in milliseconds."""
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)
