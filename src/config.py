"""What a config is: composed from conf/ (the stage CLIs through :func:`compose_config`, ``python -m src.train``
through Hydra), checked once against the one schema (:data:`SCHEMA`), and the part of it that defines a result,
with its one hash.

A bad value anywhere in the config (a typo on the command line, a broken conf file) becomes one
line naming the key, the value and what is allowed, raised as ``ConfigError`` (exit code 2)
before a run directory, a checkpoint or a record is touched; the code below never checks it again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from numbers import Integral, Real

from omegaconf import DictConfig, ListConfig, OmegaConf

from src.cell import Cell
from src.runinfo import REPO, UserError, check_dvc_lock

# ``model.precision``: Lightning's precision of the cell's training (float32, or bfloat16 autocast with the
# transformer's grid and sampler in float32); src.run.fingerprint runs the same autocast.
PRECISIONS = ("32-true", "bf16-mixed")


def model_config(model: str) -> DictConfig:
    """conf/model/<model>.yaml as it stands: what tools outside a run read of a model (its family, transform and
    precision)."""
    return OmegaConf.load(REPO / "conf" / "model" / f"{model}.yaml")


def precision_of(config: dict) -> str:
    """The training precision a record's config names: ``model.precision``, or ``trainer.precision`` in records
    made before it became a model key (all float32)."""
    return str((config.get("model") or {}).get("precision") or (config.get("trainer") or {}).get("precision")
               or "32-true")


class ConfigError(UserError):
    """A config value outside what is allowed: one line, exit code 2."""

    exit_code = 2


# ------------------------------------------------------------------ what a result is

# Keys that change where a run writes or how it talks, not what it computes.
NON_RESULT_KEYS = ("paths", "quiet", "resume", "hydra", "guard")


def result_config(cfg) -> dict:
    """The resolved config minus the keys that do not change the result."""
    if isinstance(cfg, DictConfig):  # drop before resolving: paths.run_dir itself resolves this hash
        return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k not in NON_RESULT_KEYS]),
                                      resolve=True)
    return {k: v for k, v in dict(cfg).items() if k not in NON_RESULT_KEYS}


def result_hash(cfg, salt: str = "") -> str:
    """The one hash of a result-defining config (sha256 hex), salted with the code's result fingerprint where
    checkpoints must not cross code that changes results; its first 10 characters name an exploratory run's
    directory (``${config_hash:}``), so runs of different configs never share one."""
    return hashlib.sha256((json.dumps(result_config(cfg), sort_keys=True) + salt).encode()).hexdigest()


def _config_hash(*, _root_) -> str:
    return result_hash(_root_)[:10]


def _cell(*, _root_) -> str:
    return Cell.of(_root_).name


# registered on import, as every config is composed after it: ``${config_hash:}``, ``${cell:}`` (an exploratory run's dir)
for _name, _resolver in (("config_hash", _config_hash), ("cell", _cell)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)


def compose_config(overrides: list[str], config_name: str = "config"):
    """Compose ``conf/<config_name>.yaml`` with Hydra's compose API (no run dir, no ``outputs/``).

    Used by the stage CLIs that are not Hydra apps; a bad override becomes a ``UserError``, a bad value a
    ``ConfigError`` (:func:`validate`).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    try:
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides))
    except MissingConfigException as e:
        group = (e.missing_cfg_file or "").split("/")[0]
        given = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith(group + "=")), "?")
        choices = ", ".join(e.options) if e.options else "see conf/"
        raise UserError(f"unknown {group} '{given}'; choose one of: {choices}") from None
    except (HydraException, ValueError) as e:
        raise UserError(" ".join(str(e).split())) from None
    validate(cfg, run=False)  # a run validates again with its own overrides (src.train)
    return cfg


def stage_main(argv: list[str] | None, work) -> None:
    """Entry point of a stage CLI: compose the config from ``argv``, run ``work(cfg)`` and print the
    line it returns; a ``UserError`` becomes one ``error:`` line on stderr and exit status 1."""
    try:
        if "DVC_STAGE" in os.environ:
            check_dvc_lock()
        cfg = compose_config(sys.argv[1:] if argv is None else argv)
        print(work(cfg))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


# ------------------------------------------------------------------ validation

def _int(lo: int | None = None):
    def check(v):
        ok = isinstance(v, Integral) and not isinstance(v, bool) and (lo is None or v >= lo)
        return ok, f"an integer{f' >= {lo}' if lo is not None else ''}"
    return check


def _real(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    def check(v):
        ok = isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
        bounds = []
        if lo is not None:
            bounds.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None:
            bounds.append(f"{'<' if hi_open else '<='} {hi:g}")
        return ok, "a finite number" + (f" {' and '.join(bounds)}" if bounds else "")
    return check


def _one_of(*choices):
    def check(v):  # 32 from the command line is an int, "32" in a file a string: both are the same choice
        return v in choices or (not isinstance(v, bool) and str(v) in map(str, choices)), \
            "one of " + ", ".join(map(str, choices))
    return check


def _bool(v):
    return isinstance(v, bool), "true or false"


def _milestones(v):
    ok = isinstance(v, (list, ListConfig)) and all(isinstance(m, Real) and not isinstance(m, bool) and m > 0 for m in v)
    return ok, "a list of positive numbers (fractions of max_steps below 1, absolute steps from 1 on)"


def _devices(v):
    ok = (isinstance(v, Integral) and not isinstance(v, bool) and v >= 1) or v == "auto"
    return ok, "an integer >= 1 or auto"


def _optional_int(lo: int):
    inner = _int(lo)

    def check(v):
        return (v is None or inner(v)[0]), f"null or an integer >= {lo}"
    return check


def _transform(v):
    from src.stn.grids import GRIDS  # the registry of grid generators: every transform a model can name

    return v is None or (isinstance(v, str) and v in GRIDS), "null or one of " + ", ".join(sorted(GRIDS))


# dotted key → check(value) -> (ok, what is allowed). Keys of conf/data/* are checked by the data code.
SCHEMA = {
    "seed": _int(0),
    "resume": _bool,
    "quiet": _bool,
    "loader.batch_size": _int(1),
    "loader.eval_batch_size": _int(1),
    "loader.mode": _one_of("fresh", "fixed"),
    "loader.on_device": _bool,
    "loader.train_digits": _one_of("train", "train+val"),  # train+val: the 60k digits, nothing held out
    "optim.lr": _real(0, lo_open=True),
    "optim.momentum": _real(0, 1, hi_open=True),
    "optim.weight_decay": _real(0),
    "optim.milestones": _milestones,
    "optim.gamma": _real(0, 1, lo_open=True),
    "optim.loc_lr_mult": _real(0),
    "trainer.max_steps": _int(1),
    "trainer.val_check_interval": _int(1),
    "trainer.limit_val_batches": _optional_int(1),
    "trainer.devices": _devices,
    "trainer.deterministic": _one_of(True, False, "warn"),
    "trainer.tf32": _bool,
    "model.precision": _one_of(*PRECISIONS),
    "model.transform": _transform,
    "data.canvas": _int(28),
    "data.st_downsample": _one_of(1, 2),
    "data.gen_seed": _int(0),
    "budget.rule": _one_of("match", "none"),
    "budget.tol": _real(0),
    "stn.align_corners": _bool,
    "stn.padding_mode": _one_of("zeros", "border", "reflection"),
    "stn.proj_eps": _real(0, lo_open=True),
    "stn.tps_grid": _int(2),
    "stn.tps_span": _real(0, lo_open=True),
    "stn.downsample_mode": _one_of("avgpool2", "sample_half"),
    "stn.loc_downsample": _one_of("avgpool2", "bilinear"),
    "eval.table_ckpt": _one_of("last", "best"),
    "guard.loss_factor": _real(1, lo_open=True),
    "guard.patience": _int(1),
    "guard.chance_err": _real(0, 100),
    "guard.min_phase_steps": _int(0),
}


def validate(cfg: DictConfig, run: bool = True) -> None:
    """Check types and ranges of every key in ``SCHEMA`` that the config has, and the keys that must agree; raise
    ``ConfigError``. ``run``: also that a batch fits in the training set (a stage that trains nothing, with
    ``mnist.sizes`` of a test, has no batch to fit)."""
    for key, check in SCHEMA.items():
        node = OmegaConf.select(cfg, key, default="__absent__", throw_on_missing=False)
        if isinstance(node, str) and node == "__absent__":
            continue
        try:
            value = OmegaConf.select(cfg, key)
        except Exception as e:  # noqa: BLE001 - an unresolvable interpolation is a bad value too
            raise ConfigError(f"{key}: cannot be resolved ({' '.join(str(e).split())})") from None
        ok, allowed = check(value)
        if not ok:
            raise ConfigError(f"{key}={value!r} is not allowed; it must be {allowed}")
    if OmegaConf.select(cfg, "loader.train_digits", default="train") != "train" and cfg.loader.mode != "fresh":
        raise ConfigError(f"loader.train_digits={cfg.loader.train_digits} is not allowed with loader.mode="
                          f"{cfg.loader.mode}; it needs loader.mode=fresh")
    t = OmegaConf.select(cfg, "trainer", default=None)
    if t is not None and t.max_steps % t.val_check_interval:
        raise ConfigError(f"trainer.max_steps={t.max_steps} must be a multiple of trainer.val_check_interval="
                          f"{t.val_check_interval} (a checkpoint and a curve row at every validation)")
    # every training batch is drawn from the training split, whose size conf/mnist.yaml fixes (sizes[0])
    sizes = OmegaConf.select(cfg, "mnist.sizes", default=None)
    n_train = sizes[0] if isinstance(sizes, (list, ListConfig)) and sizes else None
    batch = OmegaConf.select(cfg, "loader.batch_size", default=None)
    if run and isinstance(n_train, Integral) and isinstance(batch, Integral) and batch > n_train:
        raise ConfigError(f"loader.batch_size={batch} is not allowed; it must be at most the training set size, "
                          f"{n_train:,} images (mnist.sizes[0])")


# ------------------------------------------------------------------ keys added on the command line

def config_keys(cfg, prefix: str = "") -> list[str]:
    """Every dotted key of a config (dicts walked, lists and values as leaves), without resolving anything."""
    keys = []
    for k in cfg.keys() if isinstance(cfg, DictConfig) else []:
        key = f"{prefix}{k}"
        keys.append(key)
        node = cfg._get_node(k)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_interpolation():
            keys.extend(config_keys(node, key + "."))
    return keys


def added_keys(overrides: list[str], groups) -> list | None:
    """The overrides among ``overrides`` that add (``+``) or force-add (``++``) a value key: Hydra's parsed
    overrides, config groups (``+experiment=literal``, one of ``groups``) and Hydra's own keys left out.
    None where an override does not parse (Hydra reports it itself)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    adds = [o for o in overrides if o.startswith("+")]
    if not adds:
        return []
    try:
        parsed = OverridesParser.create().parse_overrides(adds)
    except Exception:  # noqa: BLE001 - a malformed override: Hydra's own message
        return None
    root = lambda key: key.split("/")[0].split(".")[0]  # noqa: E731
    return [o for o in parsed if o.package is None and "/" not in o.key_or_group
            and root(o.key_or_group) != "hydra" and o.key_or_group not in groups]


def check_added_keys(added: list, base: DictConfig) -> None:
    """Refuse a ``+key=value`` or ``++key=value`` whose key the config (``base``, composed without them) lacks:
    nothing reads such a key, so a misspelt one (``+trainer.max_step=10``, Hydra's own advice for
    ``trainer.max_step``) would start a run of the defaults. One line naming the key, exit code 2."""
    import difflib

    for o in added:
        key = o.key_or_group
        node = OmegaConf.select(base, key, default="__absent__", throw_on_missing=False,
                                throw_on_resolution_failure=False)
        if not (isinstance(node, str) and node == "__absent__"):
            continue  # an existing key: `++` sets it, `+` is Hydra's error
        known = [k for k in config_keys(base) if not k.startswith("hydra")]
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]}?" if close else "; `python -m src.train --cfg job` lists every key"
        raise ConfigError(f"{o.input_line}: unknown key {key} (the config has no such key and nothing would "
                          f"read it){hint}")
