"""Recipe steps: one dataclass per compression method, each serializable to JSON and back unchanged.

A step's ``method`` names it in JSON (``{"method": "gptq", "bits": 4, "group_size": 64}``); a :class:`Recipe` is a
list of steps run in order plus the calibration data they share. The recipe is recorded in the saved model's
config (``config.json`` key ``compression_recipe``) so a checkpoint says how it was made.

Each step checks its own values when built (``__post_init__``) and its fit to a model with
:meth:`CompressionConfig.validate_for` (group sizes that divide every linear width, N:M runs that fit, layer counts),
both through :mod:`hf_compress_prompt.validation`. A field's ``metadata`` holds its ``help`` (the CLI's option
help) and, where it applies, ``positive`` (an integer >= 1) and ``choices``; the CLI builds its options from them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from torch import nn

from ..data import get_corpus
from ..errors import UserInputError
from ..validation import check_bits, check_group_size_value, parse_sparsity, resolve_group_size
from .blocks import find_decoder_layers, find_linear_layers, linear_weight

__all__ = [
    "LAYER_SCORES",
    "CalibrationConfig",
    "CompressionConfig",
    "GPTQConfig",
    "LayerDropConfig",
    "MagnitudeConfig",
    "RTNConfig",
    "Recipe",
    "SparseGPTConfig",
    "WandaConfig",
    "check_linears",
    "step_from_dict",
    "step_types",
]

LAYER_SCORES = ("angular_distance", "block_influence")


def _check_fraction(name: str, value: float, low: float = 0.0, high: float = 1.0) -> None:
    if not isinstance(value, (int, float)) or not low < value < high:
        raise UserInputError(f"{name}={value!r} must lie in ({low:g}, {high:g})")


@dataclass
class CalibrationConfig:
    """The calibration data shared by a recipe's steps."""

    dataset: str = field(default="c4", metadata={"help": "corpus name (hf_compress_prompt.data.list_corpora())"})
    split: str = field(default="train", metadata={"help": "split to sample from (never the evaluation split)"})
    nsamples: int = field(default=64, metadata={"help": "number of calibration windows (the papers use 128)",
                                                "positive": True})
    seqlen: int = field(default=512, metadata={"help": "tokens per window (the papers use 2048)", "positive": True})
    seed: int = field(default=0, metadata={"help": "seed of the window sampler"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass through a block", "positive": True})

    def __post_init__(self):
        corpus = get_corpus(self.dataset)  # unknown names fail here, before any work
        if self.split not in corpus.splits:
            raise UserInputError(f"dataset {self.dataset!r} has no split {self.split!r}; choose one of {', '.join(corpus.splits)}")
        for name in ("nsamples", "seqlen", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserInputError(f"calibration {name}={value!r} must be a positive integer")
        if self.seqlen < 2:
            raise UserInputError(f"calibration seqlen={self.seqlen} must be at least 2")


_STEPS: dict[str, type[CompressionConfig]] = {}


@dataclass
class CompressionConfig:
    """Base of every recipe step. Subclasses set ``method`` and declare their fields."""

    method: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.method:
            if cls.method in _STEPS:
                raise ValueError(f"a recipe step named {cls.method!r} is already defined")
            _STEPS[cls.method] = cls

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    def validate_for(self, model: nn.Module) -> None:
        """Every check of this step against ``model`` that can fail, run by ``compress_`` before any work (a group
        size that does not divide a layer's width, an N:M run that does not fit, more layers dropped than there are).
        The base class checks nothing; each method checks what its fields ask of the model."""

    @property
    def quantizes(self) -> bool:
        return getattr(self, "bits", None) is not None

    @property
    def prunes(self) -> bool:
        return getattr(self, "sparsity", None) is not None


@dataclass
class RTNConfig(CompressionConfig):
    """Round-to-nearest weight quantization (no calibration data)."""

    method: ClassVar[str] = "rtn"
    needs_calibration: ClassVar[bool] = False
    bits: int = field(default=4, metadata={"help": "bits per weight: 2, 3, 4 or 8"})
    group_size: int = field(default=-1, metadata={"help": "input columns per group; -1 = per output channel"})
    symmetric: bool = field(default=False, metadata={"help": "symmetric grid (zero point in the middle)"})
    lm_head: bool = field(default=False, metadata={
        "help": "also round-to-nearest quantize the output head (LM head) with the same group size; a head tied to "
                "the input embedding is untied first (the embedding stays in floating point)"})
    lm_head_bits: int | None = field(default=None, metadata={
        "help": "bits for the output head (lm_head=True); default: the step's bits. 8 keeps the head almost exact"})

    def __post_init__(self):
        check_bits(self.bits)
        check_group_size_value(self.group_size)
        check_bits(self.lm_head_bits, name="lm_head_bits", allow_none=True)

    def validate_for(self, model: nn.Module) -> None:
        check_linears(self, model, group_size=self.group_size, lm_head=self.lm_head)


@dataclass
class GPTQConfig(CompressionConfig):
    """GPTQ weight quantization (Frantar et al. 2023)."""

    method: ClassVar[str] = "gptq"
    bits: int = field(default=4, metadata={"help": "bits per weight: 2, 3, 4 or 8"})
    group_size: int = field(default=-1, metadata={"help": "input columns per group; -1 = per output channel"})
    symmetric: bool = field(default=False, metadata={"help": "symmetric grid (zero point in the middle)"})
    act_order: bool = field(default=True, metadata={
        "help": "visit columns by decreasing Hessian diagonal (static groups: the same format and kernels as without); "
                "on SmolLM2 4-bit g64 it is 7% better than without, which only ties round-to-nearest"})
    damp: float = field(default=0.01, metadata={"help": "damping as a fraction of the mean Hessian diagonal"})
    block_size: int = field(default=128, metadata={"help": "columns per lazy-update block", "positive": True})
    true_sequential: bool = field(default=True, metadata={"help": "quantize a block's linears in forward order"})
    lm_head: bool = field(default=False, metadata={
        "help": "also round-to-nearest quantize the output head (LM head) with the same group size; a head tied to "
                "the input embedding is untied first (the embedding stays in floating point)"})
    lm_head_bits: int | None = field(default=None, metadata={
        "help": "bits for the output head (lm_head=True); default: the step's bits. 8 keeps the head almost exact"})

    def __post_init__(self):
        check_bits(self.bits)
        check_group_size_value(self.group_size)
        check_bits(self.lm_head_bits, name="lm_head_bits", allow_none=True)
        _check_fraction("damp", self.damp, 0, 10)
        _check_positive(self, "block_size")

    def validate_for(self, model: nn.Module) -> None:
        check_linears(self, model, group_size=self.group_size, lm_head=self.lm_head)


@dataclass
class SparseGPTConfig(CompressionConfig):
    """SparseGPT pruning (Frantar & Alistarh 2023); with ``bits``, the joint sparse + quantized mode."""

    method: ClassVar[str] = "sparsegpt"
    sparsity: float | str = field(default=0.5, metadata={"help": "fraction in (0, 1) or N:M such as '2:4'"})
    bits: int | None = field(default=None, metadata={"help": "also quantize the kept weights to this many bits"})
    group_size: int = field(default=-1, metadata={"help": "quantization group size when bits is set"})
    symmetric: bool = field(default=False, metadata={"help": "symmetric quantization grid"})
    damp: float = field(default=0.01, metadata={"help": "damping as a fraction of the mean Hessian diagonal"})
    block_size: int = field(default=128, metadata={"help": "columns per mask-selection block", "positive": True})
    true_sequential: bool = field(default=True, metadata={"help": "prune a block's linears in forward order"})

    def __post_init__(self):
        parse_sparsity(self.sparsity)
        check_bits(self.bits, allow_none=True)
        check_group_size_value(self.group_size)
        _check_fraction("damp", self.damp, 0, 10)
        _check_positive(self, "block_size")

    def validate_for(self, model: nn.Module) -> None:
        check_linears(self, model, group_size=self.group_size if self.bits is not None else None,
                       sparsity=self.sparsity)


@dataclass
class WandaConfig(CompressionConfig):
    """Wanda pruning (Sun et al. 2024): |W| times input norm, per output row; no weight update."""

    method: ClassVar[str] = "wanda"
    sparsity: float | str = field(default=0.5, metadata={"help": "fraction in (0, 1) or N:M such as '2:4'"})
    true_sequential: bool = field(default=False, metadata={"help": "prune a block's linears in forward order"})

    def __post_init__(self):
        parse_sparsity(self.sparsity)

    def validate_for(self, model: nn.Module) -> None:
        check_linears(self, model, sparsity=self.sparsity)


@dataclass
class MagnitudeConfig(CompressionConfig):
    """Magnitude pruning (no calibration data)."""

    method: ClassVar[str] = "magnitude"
    needs_calibration: ClassVar[bool] = False
    sparsity: float | str = field(default=0.5, metadata={"help": "fraction in (0, 1) or N:M such as '2:4'"})

    def __post_init__(self):
        parse_sparsity(self.sparsity)

    def validate_for(self, model: nn.Module) -> None:
        check_linears(self, model, sparsity=self.sparsity)


@dataclass
class LayerDropConfig(CompressionConfig):
    """Remove whole decoder layers, chosen by index or by how little they change the hidden states."""

    method: ClassVar[str] = "layer_drop"
    num_layers: int | None = field(default=None, metadata={"help": "how many layers to remove", "positive": True})
    fraction: float | None = field(default=None, metadata={"help": "or the fraction of layers to remove"})
    layers: list[int] | None = field(default=None, metadata={"help": "or exactly these layer indices"})
    score: str = field(
        default="angular_distance",
        metadata={"help": "angular_distance (drop the contiguous run that turns the stream least, Gromov et al.) or "
                  "block_influence (drop the single layers with the lowest influence, ShortGPT)",
                  "choices": LAYER_SCORES},
    )

    def __post_init__(self):
        given = [x is not None for x in (self.num_layers, self.fraction, self.layers)]
        if sum(given) != 1:
            raise UserInputError("layer_drop needs exactly one of num_layers, fraction or layers")
        if self.fraction is not None:
            _check_fraction("fraction", self.fraction)
        if self.num_layers is not None and (not isinstance(self.num_layers, int) or self.num_layers < 1):
            raise UserInputError(f"num_layers={self.num_layers!r} must be a positive integer")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise UserInputError(f"layers={self.layers!r} must be a non-empty list of distinct indices")
        if self.score not in LAYER_SCORES:
            raise UserInputError(f"score={self.score!r}; use {' or '.join(LAYER_SCORES)}")

    def validate_for(self, model: nn.Module) -> None:
        _, layers = find_decoder_layers(model)
        n = len(layers)
        count = self.count(n)
        if count >= n:
            raise UserInputError(f"layer_drop would remove {count} of {n} layers; keep at least one")
        if self.layers is not None and any(not 0 <= i < n for i in self.layers):
            raise UserInputError(f"layer_drop layers={self.layers} are out of range 0..{n - 1}")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.layers is None

    def count(self, num_layers: int) -> int:
        """How many of ``num_layers`` layers this step removes (a fraction rounds to the nearest count, at least 1)."""
        if self.layers is not None:
            return len(self.layers)
        if self.num_layers is not None:
            return self.num_layers
        return max(1, round(self.fraction * num_layers))


def _check_positive(step: CompressionConfig, name: str) -> None:
    value = getattr(step, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserInputError(f"{name}={value!r} must be a positive integer")


def _output_head(model: nn.Module, step: CompressionConfig) -> nn.Linear:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise UserInputError(f"{step.method}: lm_head=True, but {type(model).__name__} has no linear output head")
    return head


def check_linears(step: CompressionConfig, model: nn.Module, *, group_size: int | None = None,
                   sparsity: float | str | None = None, lm_head: bool = False) -> None:
    """``group_size`` (quantizing steps) divides the width of every block linear (and of the output head with
    ``lm_head``), and a ``sparsity`` of N:M fits every block linear's width. An error names the step, the first layer
    that does not fit and, for group sizes, every size that fits the whole model (one size serves all layers)."""
    path, layers = find_decoder_layers(model)
    linears = [(f"{path}.{i}.{name}", linear_weight(module).shape[1])
               for i, block in enumerate(layers) for name, module in find_linear_layers(block).items()]
    pattern = parse_sparsity(sparsity) if sparsity is not None else None
    head_width = _output_head(model, step).in_features if lm_head else None
    widths = [w for _, w in linears] + ([head_width] if head_width is not None else [])
    for name, width in linears:
        try:
            if group_size is not None:
                resolve_group_size(group_size, width, widths=widths)
            if pattern is not None:
                pattern.check_width(width)
        except UserInputError as exc:
            raise UserInputError(f"{step.method} on {name}: {exc}") from None
    if head_width is not None and group_size is not None:
        try:
            resolve_group_size(group_size, head_width, widths=widths)
        except UserInputError as exc:
            raise UserInputError(f"{step.method} on the output head: {exc}") from None


def step_types() -> dict[str, type[CompressionConfig]]:
    """Method name -> config class of every registered recipe step, sorted by name."""
    return dict(sorted(_STEPS.items()))


def step_from_dict(data: dict) -> CompressionConfig:
    """The step that ``to_dict`` wrote; an unknown method or an unknown key is an error."""
    if not isinstance(data, dict) or "method" not in data:
        raise UserInputError(f"a recipe step must be an object with a 'method' key, got {data!r}")
    data = dict(data)
    method = data.pop("method")
    cls = _STEPS.get(method)
    if cls is None:
        raise UserInputError(f"unknown compression method {method!r}; choose one of {', '.join(sorted(_STEPS))}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserInputError(f"unknown keys {unknown} for method {method!r}; known keys: {', '.join(sorted(known))}")
    return cls(**data)


@dataclass
class Recipe:
    """Steps run in order (e.g. SparseGPT 50% then GPTQ 4-bit) on shared calibration data."""

    steps: list[CompressionConfig]
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self):
        if not self.steps:
            raise UserInputError("a recipe needs at least one step")
        for step in self.steps:
            if not isinstance(step, CompressionConfig):
                raise UserInputError(f"recipe step {step!r} is not a compression config")
        if sum(s.quantizes for s in self.steps) > 1:
            raise UserInputError("a recipe may quantize only once; merge the quantizing steps")

    def to_dict(self) -> dict:
        return {"steps": [s.to_dict() for s in self.steps], "calibration": dataclasses.asdict(self.calibration)}

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        unknown = sorted(set(data) - {"steps", "calibration"})
        if unknown:
            raise UserInputError(f"unknown recipe keys {unknown}; a recipe has 'steps' and 'calibration'")
        calibration = data.get("calibration") or {}
        known = {f.name for f in dataclasses.fields(CalibrationConfig)}
        if set(calibration) - known:
            raise UserInputError(f"unknown calibration keys {sorted(set(calibration) - known)}; known: {', '.join(sorted(known))}")
        return cls([step_from_dict(s) for s in data.get("steps", [])], CalibrationConfig(**calibration))

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """Reads a recipe from a ``.json`` or ``.yaml``/``.yml`` file."""
        path = Path(path)
        if not path.is_file():
            raise UserInputError(f"recipe file {str(path)!r} does not exist")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:
            raise UserInputError(f"recipe file {str(path)!r} cannot be parsed ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserInputError(f"recipe file {str(path)!r} must hold an object with 'steps'")
        return cls.from_dict(data)
