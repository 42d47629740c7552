"""The QAT settings of a model as one type: QATConfig, with its defaults, its checks, the command-line flags made from
it (train.py, val.py --ptq and qat_report.py take the same five) and the record a checkpoint stores.

A recipe is given as a yaml path or a mapping (None: data/quant/default.yaml); prepare_yolo_qat records the config it
used on the model (`model.qat_config`) with the recipe loaded, so the record holds the whole recipe, not a file name
that may change or be missing where the checkpoint is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from bst.torch.ao.quantization.fake_quant_ops import ROUNDINGS
from bst.torch.ao.quantization.pow2 import POW2_ROUNDINGS
from utils.general import UserError


def _setting(default, flag, help, choices=None):
    """A QATConfig field and the command-line flag that sets it (its dest is the flag's name with underscores)."""
    return field(default=default, metadata={"flag": flag, "help": help, "choices": choices})


@dataclass(frozen=True)
class QATConfig:
    bn_folding: bool = _setting(False, "--bn-folding", "keep BN live with simulated folding; without it BN is "
                                "folded into the conv before quantization")
    pow2: bool = _setting(False, "--pow2-scale", "every weight and activation scale is a power of two")
    pow2_rounding: str = _setting("ceil", "--pow2-rounding", "log2 rounding of pow2 scales: ceil never clips the "
                                  "observed range, round is nearest", POW2_ROUNDINGS)
    rounding: str = _setting("half_even", "--rounding", "how every quantizer rounds ties: half_even (torch, ONNX "
                             "QuantizeLinear) or half_up (shift hardware: add 2^(k-1), shift right by k); half_up "
                             "models export --include integer only", ROUNDINGS)
    recipe: str | Path | dict | None = _setting(None, "--qat-recipe", "per-module QAT recipe yaml "
                                                "(data/quant/*.yaml); default: data/quant/default.yaml")

    def __post_init__(self):
        for f in fields(self):
            problem = _problem(f.name, getattr(self, f.name), loaded=False)
            if problem:
                raise UserError(f"{f.metadata['flag']} {getattr(self, f.name)!r}: must be {problem[1]}")

    # ------------------------------------------------------------------------------------------ command line

    @staticmethod
    def add_arguments(parser, prefix=""):
        """Add the five flags to an argparse parser or group; `prefix` starts each help text (e.g. "with --ptq: ")."""
        for f in fields(QATConfig):
            kw = {"action": "store_true"} if f.type == "bool" else {
                "type": str, "default": "" if f.default is None else f.default}
            if f.metadata["choices"]:
                kw["choices"] = list(f.metadata["choices"])
            parser.add_argument(f.metadata["flag"], help=prefix + f.metadata["help"], **kw)

    @staticmethod
    def dests() -> dict:
        """{argparse dest: field name} of the flags add_arguments makes."""
        return {_dest(f): f.name for f in fields(QATConfig)}

    @classmethod
    def from_options(cls, opt) -> QATConfig:
        """The config the flags in `opt` (argparse's Namespace, or a dict, of their dests) give; absent ones keep their
        defaults, an empty --qat-recipe is the default recipe."""
        values = dict(opt) if isinstance(opt, dict) else vars(opt)
        given = {name: values[dest] for dest, name in cls.dests().items() if dest in values}
        if given.get("recipe") == "":
            given["recipe"] = None
        return cls(**given)

    def flags_given(self) -> list[str]:
        """The flags that set something other than the default, as typed ('--pow2-scale', '--rounding half_up')."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out.append(f.metadata["flag"] if isinstance(value, bool) or f.name == "recipe"
                           else f"{f.metadata['flag']} {value}")
        return out

    @staticmethod
    def flag(name: str) -> str:
        """The command-line flag of a field ('pow2' -> '--pow2-scale')."""
        return next(f.metadata["flag"] for f in fields(QATConfig) if f.name == name)

    # ------------------------------------------------------------------------------------------ recipe

    @property
    def recipe_name(self) -> str:
        """The recipe's file name ('default' for the default recipe), as logs and records name it."""
        if isinstance(self.recipe, dict):
            return str(self.recipe.get("file", "default"))
        return Path(str(self.recipe)).name if self.recipe else "default"

    @property
    def shares_concat_scales(self) -> bool:
        """The loaded recipe's concat: {share_input_scales: true}."""
        recipe = self.recipe if isinstance(self.recipe, dict) else {}
        return bool((recipe.get("concat") or {}).get("share_input_scales"))

    # ------------------------------------------------------------------------------------------ checkpoint record

    def record(self) -> dict:
        """What a checkpoint stores: plain data (the loaded recipe whole), read back by from_record."""
        if not isinstance(self.recipe, dict):
            raise ValueError("QATConfig.record(): the recipe is not loaded; record a model's config (model.qat_config)")
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_record(cls, record, required=None, extra=(), name="config") -> QATConfig:
        """A config from a checkpoint's record (`name` in messages), checked before any of it is used. Settings not
        `required` (default: all are) take their defaults where the record lacks them: models quantized before a
        setting existed used what is now its default; such records may also hold a null recipe. Keys other than the
        settings and `extra` are refused. Raises BadRecord(what, right)."""
        if not isinstance(record, dict):
            raise BadRecord(f"'{name}' is a {type(record).__name__}", "a mapping of the QAT settings")
        names = [f.name for f in fields(cls)]
        required = names if required is None else required
        for key in record:
            if key not in names and key not in extra:
                raise BadRecord(f"the setting {key!r:.40} is unknown", f"one of {', '.join(names)}")
        for key in names:
            null_recipe = key not in required
            if key not in record:
                if key in required:
                    raise BadRecord(f"the setting '{key}' is missing", _problem(key, object(), True, null_recipe)[1])
            elif _problem(key, record[key], True, null_recipe):
                raise BadRecord(f"the setting '{key}' is {record[key]!r:.60}",
                                _problem(key, record[key], True, null_recipe)[1])
        return cls(**{k: v for k, v in record.items() if k in names})


class BadRecord(ValueError):
    """A checkpoint's QAT record that cannot be read: `what` it holds and what it must be (`right`)."""

    def __init__(self, what, right):
        super().__init__(f"{what}; it must be {right}")
        self.what, self.right = what, right


def _dest(f) -> str:
    return f.metadata["flag"].lstrip("-").replace("-", "_")


def _problem(name, value, loaded, null_recipe=True):
    """None when `value` is a valid `name` setting, else (value, what it must be). A loaded record's recipe is a
    mapping (or null in records that allowed it); a config's may also be a yaml path."""
    if name in ("bn_folding", "pow2"):
        return None if isinstance(value, bool) else (value, "true or false")
    if name == "pow2_rounding":
        return None if value in POW2_ROUNDINGS else (value, f"one of {', '.join(POW2_ROUNDINGS)}")
    if name == "rounding":
        return None if value in ROUNDINGS else (value, f"one of {', '.join(ROUNDINGS)}")
    if loaded:
        ok = isinstance(value, dict) or value is None and null_recipe
        return None if ok else (value, "a recipe mapping or null" if null_recipe else "a recipe mapping")
    return None if value is None or isinstance(value, (str, Path, dict)) else (value, "a recipe yaml or mapping")
