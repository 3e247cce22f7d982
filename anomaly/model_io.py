"""Fitted-model files: the fitted tensors (safetensors) and plain-value metadata (JSON). Data, never code.

A file names its method; the class comes from the allow-list :data:`anomaly.methods.METHODS`, a nested
component (the backbone) is built by the key it sits under (:data:`COMPONENTS`), and every other value
must be a plain JSON value that the constructor's signature admits. Nothing read from the file is
imported, instantiated by name, unpickled or interpolated, so loading a file from anyone cannot run
their code. The frozen pretrained backbone's weights are not stored (they come from its config, as at
training time); everything fitted or trained is.
"""

import inspect
import json
import math
import os
import re
import stat
import types
import typing
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import get_class
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from anomaly.backbones import FeatureExtractor, PatchFeatures
from anomaly.calibration import Calibration
from anomaly.data.preprocessing import Preprocessing
from anomaly.errors import ConfigError, ModelFileError
from anomaly.methods import METHODS
from anomaly.methods.tiling import Tiling, tile_model

FORMAT_VERSION = 2
COMPONENTS: dict[str, type[nn.Module]] = {  # constructor key -> the class built from the mapping there
    "backbone": FeatureExtractor,
    "features": PatchFeatures,
}
RETIRED_ARGUMENTS = {  # method -> keys that older files hold and that are no longer model values: dropped
    "patchcore": ("spill_dir",),  # a run setting now (paths.spill_dir): where one machine has room
}
MODEL_FILE_NAME = "model.safetensors"  # what anomaly-train writes into its run dir
GOOD_FILE_HINT = (
    "Use the model.safetensors that anomaly-train wrote into its run dir, or re-run anomaly-train."
)


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module  # eval mode; images [B, 3, H, W] in [0, 1] after `preprocessing` -> AnomalyOutput
    method: str  # its name in anomaly.methods.METHODS
    preprocessing: Preprocessing  # what turns a raw image into the model's input
    calibration: Calibration | None  # fitted on normal images only; None when the run had none
    config: dict  # the plain constructor values the model was rebuilt from
    lineage: list[dict]  # the updates (anomaly-update) that led to this file, oldest first; [] if fitted
    tiling: Tiling | None  # the tiles the model fits and scores (anomaly.methods.tiling); None: whole images


def save_model(
    model: nn.Module,
    method: str,
    model_config: Mapping,
    preprocessing: Preprocessing,
    path: Path,
    calibration: Calibration | None = None,
    lineage: list[dict] | None = None,
    tiling: Tiling | None = None,
) -> None:
    """Writes ``model``'s fitted state and what rebuilds it (``tiling``: the tiling that wraps it).

    ``model_config`` is the resolved method model config (Hydra's ``_target_`` keys allowed: each must
    name the class the allow-list builds at that place, so that the file loads as it was trained). The file
    is complete or not there: it is written beside ``path`` and then renamed onto it, so that a failure
    (a full disk, a kill) leaves any earlier file whole and no partial one. The same model gives the same
    bytes (sorted keys), so that two seeded runs can be compared by their files.
    """
    config = _plain_config(METHODS.get(method), dict(model_config), f"method {method!r}")
    skipped = _unstored_prefixes(model)
    state = {
        key: value.detach().contiguous().cpu()
        for key, value in model.state_dict().items()
        if not key.startswith(skipped)
    }
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "method": method,
        "model": json.dumps(config, sort_keys=True),
        "preprocessing": json.dumps(preprocessing.to_dict(), sort_keys=True),
        "calibration": json.dumps(calibration.to_dict() if calibration else None, sort_keys=True),
        "lineage": json.dumps(lineage or [], sort_keys=True),  # a record: never used to build anything
        "tiling": json.dumps(tiling.to_dict() if tiling else None, sort_keys=True),
    }
    _write_atomically(state, metadata, path)


def _write_atomically(state: dict[str, Tensor], metadata: dict[str, str], path: Path) -> None:
    """The safetensors file at ``path``, written beside it and renamed onto it once complete, with the
    mode of every other output (0o666 less the umask; safetensors alone writes 0o600) and its header's
    keys sorted (safetensors 0.8 writes the metadata in a random order: the same model, other bytes)."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
    mode = stat.S_IMODE(temporary.stat().st_mode)
    try:
        try:
            save_file(state, str(temporary), metadata=metadata)  # replaces the file: its own mode, 0o600
        except SafetensorError as error:
            raise _os_error(error, path) from error
        with temporary.open("r+b") as file:
            size = int.from_bytes(file.read(8), "little")
            entries = json.loads(file.read(size))
            header = json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
            if len(header) > size:  # the same entries as compact JSON: never longer than safetensors' own
                raise RuntimeError(f"cannot sort the safetensors header of {path}: nothing was written")
            file.seek(8)
            file.write(header.ljust(size))  # padded as safetensors pads: the tensors' offsets stay valid
            os.fsync(file.fileno())
        temporary.chmod(mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _os_error(error: SafetensorError, path: Path) -> Exception:
    """safetensors reports a failed write as a SafetensorError ("I/O error: No space left on device (os
    error 28)"), not an OSError: the OSError it was, naming ``path``, so that a full disk or a read-only
    folder is the user's error to fix (:func:`anomaly.errors.user_error`); any other as it is."""
    found = re.search(r"\(os error (\d+)\)", str(error))
    if found is None:
        return error
    code = int(found[1])
    return OSError(code, os.strerror(code), str(path))


def find_model_file(path: str | Path) -> Path:
    """The model file that ``path`` names: a run dir (its ``model.safetensors``) or the file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE_NAME
    if not path.is_file():
        raise ModelFileError(
            f"Model file {path} does not exist: pass model=<run dir> or <run dir>/{MODEL_FILE_NAME}. "
            f"{GOOD_FILE_HINT}"
        )
    return path


def load_model(
    path: str | Path, device: str | torch.device = "cpu", backbone_weights_path: str | None = None
) -> LoadedModel:
    """Rebuilds the model that :func:`save_model` wrote (a run dir works too: :func:`find_model_file`).

    ``backbone_weights_path``: the pretrained backbone's weights file on this machine, in place of the one
    the file names (the frozen backbone's weights are not stored: they come from its config)."""
    path = find_model_file(path)
    metadata = _read_metadata(path)
    method = metadata.get("method")
    if method not in METHODS:
        message = f"{path} names method {method!r}; this version knows {sorted(METHODS)}. {GOOD_FILE_HINT}"
        raise ModelFileError(message)
    config = _json(metadata, "model", path)
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: its model config is not a mapping of values. {GOOD_FILE_HINT}")
    for key in RETIRED_ARGUMENTS.get(method, ()):
        config.pop(key, None)
    if backbone_weights_path is not None:
        config = _with_backbone_weights(config, backbone_weights_path, path)
    preprocessing_values = _json(metadata, "preprocessing", path)
    calibration_values = _json(metadata, "calibration", path)
    try:
        preprocessing = Preprocessing.from_dict(preprocessing_values)
        calibration = Calibration.from_dict(calibration_values)
        tiling = Tiling.from_dict(_json(metadata, "tiling", path) if "tiling" in metadata else None)
        cls = METHODS[method]
        # values only training needs (EfficientAD's teacher file): the file holds their result
        unused = {key: None for key in getattr(cls, "training_only_arguments", ()) if key in config}

        def build() -> nn.Module:
            return _build(cls, {**config, **unused}, f"{path}: method {method}")

        model = build() if tiling is None else tile_model(build, tiling)
    except (ValueError, TypeError) as error:  # ConfigError, and the constructors' own checks
        raise ModelFileError(
            f"{path} holds values this version cannot use: {error}. {GOOD_FILE_HINT}"
        ) from None
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise ModelFileError(f"{path}: its tensors cannot be read ({error}). {GOOD_FILE_HINT}") from None
    _check_tensors(state, path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of another shape than the config's layers
        raise ModelFileError(
            f"{path}: its tensors do not fit its config ({_first_line(error)}). {GOOD_FILE_HINT}"
        ) from None
    missing = [key for key in result.missing_keys if not key.startswith(_unstored_prefixes(model))]
    if missing or result.unexpected_keys:
        raise ModelFileError(
            f"{path} does not match its own config: missing tensors {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}. {GOOD_FILE_HINT}"
        )
    lineage = _json(metadata, "lineage", path)
    if not isinstance(lineage, list):
        raise ModelFileError(f"{path}: its lineage is not a list. {GOOD_FILE_HINT}")
    if (size := tiling.image_size if tiling else preprocessing.output_size) is not None:
        _probe(model, size, path)  # (images that keep their aspect ratio have no one size to probe)
    return LoadedModel(model.to(device).eval(), method, preprocessing, calibration, config, lineage, tiling)


def _with_backbone_weights(config: dict, weights_path: str, path: Path) -> dict:
    """``config`` whose pretrained backbone (under any component) loads ``weights_path``; ConfigError where
    the model has none (its backbone random and stored in the file, or no backbone)."""
    found = []

    def replaced(node: dict) -> dict:
        changed = dict(node)
        for key, value in node.items():
            pretrained = isinstance(value, dict) and (value.get("weights") or value.get("weights_path"))
            if key == "backbone" and pretrained:
                changed[key] = {**value, "weights_path": weights_path}
                found.append(key)
            elif key in COMPONENTS and key != "backbone" and isinstance(value, dict):
                changed[key] = replaced(value)
        return changed

    changed = replaced(config)
    if not found:
        raise ConfigError(
            f"backbone.weights_path={weights_path}: the model in {path} has no pretrained backbone whose "
            "weights come from a file (its own weights are in the model file); leave backbone.weights_path "
            "null"
        )
    return changed


def _read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ModelFileError(
            f"{path} is not a readable model file ({error}): expected a safetensors file written by "
            f"anomaly-train; it may be truncated or another kind of file. {GOOD_FILE_HINT}"
        ) from None
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ModelFileError(
            f"{path} has model format version {version}; this version of anomaly reads version "
            f"{FORMAT_VERSION} (version 1 files named Python classes to build, which is no longer read). "
            "Re-run anomaly-train with the same config to get a current file."
        )
    return metadata


def _json(metadata: dict[str, str], key: str, path: Path) -> object:
    """Metadata ``key`` as JSON values; NaN and ±Infinity (which Python's JSON reads) are refused: no
    number of a model file is ever non-finite."""
    try:
        return json.loads(metadata[key], parse_constant=_refuse_non_finite)
    except (KeyError, TypeError, ValueError) as error:
        message = f"{path}: metadata {key!r} is missing or not valid JSON of finite values ({error})."
        raise ModelFileError(f"{message} {GOOD_FILE_HINT}") from None


def _refuse_non_finite(constant: str) -> float:
    raise ValueError(f"non-finite number {constant}")


def _check_tensors(state: dict[str, Tensor], path: Path) -> None:
    """Every floating tensor finite: a NaN bank or covariance would score every image NaN."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise ModelFileError(
                f"{path}: tensor {key!r} {list(tensor.shape)} holds {count} non-finite value(s) (NaN or "
                f"infinity); the file is damaged. {GOOD_FILE_HINT}"
            )


def _probe(model: nn.Module, loaded_size: tuple[int, int], path: Path) -> None:
    """Scores one grey image of the model's input size: tensors whose shapes do not fit each other or the
    config (a resized bank, a map of another grid) fail here, named, before any real image is scored."""
    try:
        with torch.no_grad():
            output = model.eval()(torch.full((1, 3, *loaded_size), 0.5))
    except (RuntimeError, ValueError, IndexError) as error:
        raise ModelFileError(
            f"{path}: its tensors do not fit its config ({_first_line(error)}); the file is damaged or "
            f"was edited. {GOOD_FILE_HINT}"
        ) from None
    if not bool(torch.isfinite(output.anomaly_map).all() and torch.isfinite(output.image_score).all()):
        raise ModelFileError(
            f"{path}: a grey test image scores NaN or infinity with this model, so no score of it would "
            f"be a decision; its values are damaged. {GOOD_FILE_HINT}"
        )


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _unstored_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of pretrained frozen backbones: their weights come from the backbone config.
    A randomly initialised backbone cannot be recreated, so its weights are stored, once: the further
    places of a shared one (a tiling's positions) are rebuilt sharing it."""
    prefixes, seen = [], set()
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, FeatureExtractor):
            if module.pretrained or id(module) in seen:
                prefixes.append(f"{name}.")
            seen.add(id(module))
    return tuple(prefixes)


def _plain_config(cls: type | None, config: dict, where: str) -> dict:
    """``config`` without Hydra keys, checked as :func:`_build` will check it; raises ConfigError."""
    if cls is None:
        raise ConfigError(f"{where} is not one of the methods a model file can hold: {sorted(METHODS)}")
    target = config.pop("_target_", None)
    if target is not None and get_class(target) is not cls:
        raise ConfigError(f"{where}: _target_ {target} is not {cls.__module__}.{cls.__qualname__}")
    plain = {}
    for key, value in config.items():
        if key in COMPONENTS and isinstance(value, Mapping):
            plain[key] = _plain_config(COMPONENTS[key], dict(value), f"{where}.{key}")
        else:
            plain[key] = value
    _check_arguments(cls, plain, where)
    return plain


def _build(cls: type[nn.Module], config: dict, where: str) -> nn.Module:
    """``cls(**config)`` after checking every key and value; components are built by their key."""
    _check_arguments(cls, config, where)
    arguments = {
        key: _build(COMPONENTS[key], value, f"{where}.{key}") if key in COMPONENTS else value
        for key, value in config.items()
    }
    return cls(**arguments)


def _check_arguments(cls: type, config: dict, where: str) -> None:
    """Every key is a parameter of ``cls``; every value a plain value its annotation admits; a component
    (by key) is a mapping. Keys such as ``_target_``, ``_partial_`` or ``_args_`` are never parameters."""
    signature = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    for key, value in config.items():
        if key not in signature.parameters or key == "self":
            raise ConfigError(f"{where}: {key!r} is not a parameter of {cls.__name__}")
        if key in COMPONENTS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key} must be a mapping of values, got {type(value).__name__}")
        elif not _admits(hints.get(key, typing.Any), value):
            raise ConfigError(f"{where}.{key} = {value!r} is not a plain value of type {hints.get(key)}")


def _admits(annotation: object, value: object) -> bool:
    """Whether the plain JSON ``value`` fits ``annotation`` (int for float too, finite floats only; never
    bool for int)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_admits(arg, value) for arg in args)
    if annotation is typing.Any:
        return (
            value is None
            or isinstance(value, bool | int | float | str)
            or (isinstance(value, list) and all(_admits(typing.Any, item) for item in value))
        )
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    if origin in (list, tuple, Sequence):
        item = args[0] if args else typing.Any
        return isinstance(value, list) and all(_admits(item, entry) for entry in value)
    return False


def read_calibration(path: str | Path) -> Calibration | None:
    """The calibration a model file holds, without building its model (a finished run's guarantee)."""
    path = find_model_file(path)
    try:
        return Calibration.from_dict(_json(_read_metadata(path), "calibration", path))
    except ConfigError as error:
        raise ModelFileError(f"{path}: its calibration is not valid: {error}. {GOOD_FILE_HINT}") from None
