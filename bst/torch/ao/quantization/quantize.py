"""propagate_qconfig_, prepare_qat and convert: the eager-mode QAT workflow.

    model.train()
    fuse_modules_qat(model, [["conv", "bn", "relu"], ...], inplace=True)
    model.qconfig = get_default_qat_qconfig(pow2=True)       # per-module overrides win
    prepare_qat(model, inplace=True)                          # swaps modules, attaches output quantizers
    model.apply(disable_fake_quant); calibrate; model.apply(enable_fake_quant)
    ... train ...
    qmodel = convert(model.eval(), example_inputs=(x,))       # int8 weights, int32 bias, scales
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from bst.torch.ao.nn.intrinsic.qat.conv_fused import ConvBn2d
from bst.torch.ao.nn.qat.activation import TableActivation, set_input_qparams
from bst.torch.ao.nn.qat.conv import Conv2d, set_input_scale
from bst.torch.ao.nn.quantized.functional_modules import FloatFunctional
from bst.torch.ao.nn.quantized.reference import Quantize

from .fake_quantize import FakeQuantizeBase, disable_observer, fake_quant_enabled, output_quantizer, qparams_of
from .mappings import get_default_convert_module_mappings, get_default_qat_module_mappings
from .qconfig import QConfig
from .stubs import QuantStub


def _check_qconfig(qconfig, where):
    if qconfig is not None and not isinstance(qconfig, QConfig):
        raise ValueError(f"{where}: qconfig={qconfig!r} must be a QConfig or None")
    return qconfig


def propagate_qconfig_(module: nn.Module,
                       qconfig_dict: dict[type[nn.Module] | str, QConfig | None] | None = None) -> nn.Module:
    """Give every submodule a ``qconfig`` attribute, in place.

    Precedence, strongest first: the module's own ``qconfig`` attribute, ``qconfig_dict[qualified name]``,
    ``qconfig_dict[module type]``, then the parent's qconfig. ``None`` means "stay float" and is inherited
    like any other value (a child can still opt back in with its own qconfig).
    """
    qconfig_dict = qconfig_dict or {}

    def visit(mod, inherited, name):
        qconfig = qconfig_dict.get(type(mod), inherited)
        qconfig = qconfig_dict.get(name, qconfig)
        if "qconfig" in mod.__dict__:
            qconfig = mod.__dict__["qconfig"]
        mod.qconfig = _check_qconfig(qconfig, name or "model")
        for child_name, child in mod.named_children():
            visit(child, qconfig, f"{name}.{child_name}" if name else child_name)

    visit(module, None, "")
    return module


def _output_quantizer_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook for mapped modules that do not apply their output quantizer themselves."""
    return module.activation_post_process(output)


# The public name of the hook `prepare_qat` registers (pickles of prepared models refer to `_output_quantizer_hook`;
# an allowlist for safe unpickling lists this object).
output_quantizer_hook = _output_quantizer_hook


def _swap(module, mapping):
    for name, child in module.named_children():
        if type(child) in mapping and getattr(child, "qconfig", None) is not None:
            setattr(module, name, mapping[type(child)].from_float(child))
        else:
            _swap(child, mapping)


def _attach_output_quantizers(module, qat_types):
    for child in module.children():
        _attach_output_quantizers(child, qat_types)
    qconfig = getattr(module, "qconfig", None)
    if qconfig is None or qconfig.activation is None:
        return
    takes_output = isinstance(module, (QuantStub, FloatFunctional)) or type(module) in qat_types
    if not takes_output or isinstance(module._modules.get("activation_post_process"), FakeQuantizeBase):
        return
    module.activation_post_process = qconfig.activation()
    applies_itself = isinstance(module, (QuantStub, FloatFunctional)) or getattr(module, "_quantizes_own_output", False)
    if not applies_itself:
        module.register_forward_hook(_output_quantizer_hook)


def prepare_qat(model: nn.Module, mapping: dict[type[nn.Module], type[nn.Module]] | None = None,
                inplace: bool = False,
                qconfig_dict: dict[type[nn.Module] | str, QConfig | None] | None = None) -> nn.Module:
    """Swap modules that have a qconfig for their QAT versions and attach output quantizers.

    ``mapping``: float type -> QAT type with ``from_float`` (default `get_default_qat_module_mappings`).
    Output quantizers (``activation_post_process`` = ``qconfig.activation()``) go on every swapped module,
    every `QuantStub` and every `FloatFunctional` with a qconfig. The model must be in training mode.
    """
    if not model.training:
        raise ValueError("model: prepare_qat needs a model in training mode (BN statistics, observers); "
                         "call model.train() first")
    if not inplace:
        model = copy.deepcopy(model)
    propagate_qconfig_(model, qconfig_dict)
    if all(getattr(m, "qconfig", None) is None for m in model.modules()):
        raise ValueError("qconfig: no module has one; set model.qconfig = get_default_qat_qconfig() "
                         "(or pass qconfig_dict) before prepare_qat")
    mapping = get_default_qat_module_mappings() if mapping is None else mapping
    _swap(model, mapping)
    _attach_output_quantizers(model, set(mapping.values()))
    return model


# ---------------------------------------------------------------------------------------------------
# convert

_GRID_PRESERVING = (nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d, nn.ReLU,
                    nn.Dropout, nn.Flatten, nn.Upsample)


class _InputTracer:
    """One forward pass that records, for each quantized consumer, which quantizer made its inputs.

    Output tensors of fake quantizers are tagged by identity; grid-preserving modules (max-pool, nearest
    upsampling, identity, ReLU, ...) pass the tag on. Consumers: QAT convs (their input) and
    FloatFunctionals (all inputs).
    """

    def __init__(self, model, conv_types):
        self.model = model
        self.tags = {}  # id(tensor) -> (tensor, quantizer); the tensor is kept alive so ids stay unique
        self.inputs = {}  # consumer -> [quantizer or None, ...]
        self.handles = []
        self.functionals = [m for m in model.modules() if isinstance(m, FloatFunctional)]
        for m in model.modules():
            if isinstance(m, FakeQuantizeBase):
                self.handles.append(m.register_forward_hook(self._tag))
            elif isinstance(m, _GRID_PRESERVING) and getattr(m, "mode", "nearest") == "nearest":
                self.handles.append(m.register_forward_hook(self._pass_on))
            elif isinstance(m, tuple(conv_types)):
                self.handles.append(m.register_forward_pre_hook(self._consume))

    def _source(self, t):
        hit = self.tags.get(id(t)) if isinstance(t, torch.Tensor) else None
        return hit[1] if hit is not None and hit[0] is t else None

    def _tag(self, module, inputs, output):
        self.tags[id(output)] = (output, module)

    def _pass_on(self, module, inputs, output):
        source = self._source(inputs[0]) if inputs else None
        if source is not None:
            self.tags[id(output)] = (output, source)

    def _consume(self, module, inputs):
        self.inputs[module] = [self._source(inputs[0])]

    def _record_functional(self, module, tensors):
        self.inputs[module] = [self._source(t) for t in tensors]

    @torch.no_grad()
    def run(self, example_inputs):
        quantizers = [m for m in self.model.modules() if isinstance(m, FakeQuantizeBase)]
        observing = [bool(q.observer_enabled[0]) for q in quantizers]
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            for q in quantizers:
                q.disable_observer()
            self.model.eval()
            for f in self.functionals:
                f._input_recorder = self._record_functional
            self.model(*example_inputs)
        finally:
            for f in self.functionals:
                f.__dict__.pop("_input_recorder", None)
            for h in self.handles:
                h.remove()
            for q, on in zip(quantizers, observing):
                q.enable_observer(on)
            for m, training in modes:
                m.training = training
        return self.inputs


def trace_input_quantizers(model: nn.Module, example_inputs: tuple, consumer_types: Iterable[type[nn.Module]] = ()
                           ) -> dict[nn.Module, list[FakeQuantizeBase | None]]:
    """One forward pass (observers off, eval mode, state restored) that maps every FloatFunctional, and every
    module of ``consumer_types``, to the fake quantizers that produced its inputs (None where an input does not
    come straight from one, through grid-preserving modules such as max-pool or nearest upsampling)."""
    if not isinstance(example_inputs, tuple):
        raise ValueError(f"example_inputs: a tuple of model inputs is expected, got {type(example_inputs).__name__}")
    return _InputTracer(model, set(consumer_types)).run(example_inputs)


@torch.no_grad()
def freeze_qparams(model: nn.Module, example_inputs: tuple) -> nn.Module:
    """Freeze a QAT model's quantization parameters for evaluation and export; returns `model`.

    Observers off (a lazily computed observer, e.g. MSE, turns its statistics into qparams now), then one
    traced forward (`trace_input_quantizers`) tells every QAT conv the scale of the per-tensor quantizer that
    feeds it, so that in eval mode it adds its bias on the int32 grid ``input_scale * weight_scale`` exactly as
    `convert` and every export do. Evaluation and export must both start from this function: it is what
    makes them compute the same integers. A conv whose input does not come straight from a per-tensor fake
    quantizer keeps its float bias. Likewise every QAT `TableActivation` learns the qparams of the quantizer feeding
    it, so that in eval mode it computes through the lookup table `convert` makes of it. Observers stay off;
    re-enable them to keep calibrating."""
    if not isinstance(example_inputs, tuple):
        raise ValueError(f"example_inputs: a tuple of model inputs is expected, got {type(example_inputs).__name__}")
    model.apply(disable_observer)
    conv_types = (Conv2d, ConvBn2d)
    inputs = _InputTracer(model, (*conv_types, TableActivation)).run(example_inputs)
    for m in model.modules():
        if isinstance(m, (*conv_types, TableActivation)):
            source = _per_tensor_source(inputs, m)
            if isinstance(m, TableActivation):
                set_input_qparams(m, None if source is None else qparams_of(source))
            else:
                set_input_scale(m, None if source is None else float(qparams_of(source)[0]))
    return model


def _per_tensor_source(inputs, module):
    """The enabled per-tensor fake quantizer that made `module`'s first input, or None."""
    source = (inputs.get(module) or [None])[0]
    return source if source is not None and fake_quant_enabled(source) and not source.is_per_channel else None


def _swap_converted(module, mapping, inputs, prefix=""):
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        build = mapping.get(type(child))
        if build is None and isinstance(child, FakeQuantizeBase):
            # a quantizer no converted module takes over (the output quantizer of a module left in float, e.g. an
            # activation whose table cannot be made): its frozen quantize-dequantize
            setattr(module, name, Quantize.from_fake_quant(child))
            continue
        if getattr(child, "_needs_input_qparams", False) and build is not None:
            source = _per_tensor_source(inputs, child)
            if source is not None and fake_quant_enabled(output_quantizer(child)):
                setattr(module, name, build(child, qparams_of(source)))
                continue
            build = None  # no table without both quantizers: the function stays float, its quantizer a Quantize
        if build is None:
            _swap_converted(child, mapping, inputs, full)
            continue
        if isinstance(child, (QuantStub, FloatFunctional)) and not isinstance(
                child._modules.get("activation_post_process"), FakeQuantizeBase):
            continue  # no quantizer attached: stays float
        if hasattr(child, "weight_fake_quant"):
            sources = inputs.get(child)
            source = sources[0] if sources else None
            input_qparams = qparams_of(source)[:2] if source is not None else None
            setattr(module, name, build(child, input_qparams=input_qparams))
        else:
            converted = build(child)
            if isinstance(child, FloatFunctional):  # input qparams of the traced call, for export tools
                converted.input_qparams = [None if q is None else qparams_of(q)[:2] for q in inputs.get(child, [])]
            setattr(module, name, converted)


def convert(model: nn.Module, example_inputs: tuple | None = None,
            mapping: dict[type[nn.Module], Callable[..., nn.Module]] | None = None, inplace: bool = False,
            remove_qconfig: bool = True) -> nn.Module:
    """Replace QAT modules by converted reference modules (`bst.torch.ao.nn.quantized`).

    Each conv gets int8 weights (BN folded from its running statistics), its weight/output scales
    and zero points, and, when ``example_inputs`` (a tuple of model inputs) is given, the scale and
    zero point of the quantizer that produced its input plus the int32 bias on that grid. Without
    ``example_inputs`` input qparams and ``bias_int32`` stay None (the float bias is kept).
    Quantizer state is read as it is: disable observers first to convert frozen scales. A fake quantizer that
    no converted module takes over (the output quantizer of a module that stays float) becomes a `Quantize`
    with its frozen qparams (the identity when its fake quantization is off). A QAT `TableActivation` becomes a
    converted lookup table when ``example_inputs`` shows a per-tensor quantizer feeding it and its own output
    quantizer is on; otherwise its function stays float between its quantizers.
    """
    if not inplace:
        model = copy.deepcopy(model)
    mapping = get_default_convert_module_mappings() if mapping is None else mapping
    inputs = {}
    if example_inputs is not None:
        if not isinstance(example_inputs, tuple):
            raise ValueError("example_inputs: a tuple of model inputs is expected, "
                             f"got {type(example_inputs).__name__}")
        conv_types = {t for t, build in mapping.items()
                      if getattr(t, "_quantizes_own_output", False) or getattr(t, "_needs_input_qparams", False)}
        inputs = _InputTracer(model, conv_types).run(example_inputs)
    _swap_converted(model, mapping, inputs)
    if remove_qconfig:
        for m in model.modules():
            m.__dict__.pop("qconfig", None)
    return model
