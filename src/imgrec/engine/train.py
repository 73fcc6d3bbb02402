"""``imgrec train`` as a library call: data → model → Trainer → run directory, then the final test number."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from imgrec.config import RunConfig, load_yaml, validate
from imgrec.device import cpu_has_fast_bf16, pick_device, usable_cores
from imgrec.engine import distributed
# re-exported: callers (the audit, tests, benchmarks) import these from here
from imgrec.engine.choices import choose_logit_adjust, choose_temperature, choose_unknown  # noqa: F401
from imgrec.engine.choices import choose_val_thresholds  # noqa: F401
from imgrec.engine.run import build_loaders, model_meta, run  # noqa: F401
from imgrec.modeldir import default_run_dir  # noqa: F401

__all__ = ["auto_recipe", "build_loaders", "choose_logit_adjust", "choose_temperature", "choose_unknown",
           "choose_val_thresholds", "default_run_dir", "model_meta", "recipe_from_settings", "resolve_config", "train"]


def auto_recipe(device: str = "auto") -> tuple[str, str]:
    """The default recipe for this machine (see ``imgrec.engine.recipes.choose_recipe``) and why."""
    from imgrec.engine.recipes import choose_recipe
    dev = pick_device(device)
    return choose_recipe(dev.type, dev.type == "cpu" and cpu_has_fast_bf16(), usable_cores())


def resolve_config(recipe: str | None = None, config_file: str | None = None, overrides: dict | None = None,
                   adapt: bool = True) -> RunConfig:
    """Defaults ← recipe ← config file ← ``overrides``: the one resolution ``imgrec train`` and the Python API
    share (the command line's flags are ``overrides`` under their config names: ``--model`` is ``name``).

    Which recipe, and whether the data adapts it, is decided by :func:`recipe_from_settings` from the explicit
    settings alone; ``cfg.recipe_reason`` says why, and ``imgrec train`` prints it. Unless a recipe was named or
    ``adapt`` is false, what depends on the data (batch, lr, epochs, validation, image size, a pretrained start) is then
    chosen from it for every setting not given (``adapt_config``); ``cfg.data_recipe`` says what and why.
    """
    from imgrec.engine.recipes import get_recipe

    cfg = RunConfig()
    file_cfg = load_yaml(config_file) if config_file else {}
    overrides = dict(overrides or {})
    recipe, reason, named = recipe_from_settings(recipe, file_cfg, overrides)
    if recipe is not None:
        cfg.update(get_recipe(recipe), source=f"recipe {recipe}")
        cfg.recipe, cfg.recipe_reason = recipe, reason
    cfg.update(file_cfg, source=str(config_file))
    cfg.update(overrides, source="command line")
    validate(cfg)
    if adapt and not named:
        adapt_config(cfg, explicit_keys(file_cfg, overrides))
        validate(cfg)
    from imgrec.models import model_info
    model_info(cfg.model.name)  # an unknown name fails now, listing the choices
    return cfg


def recipe_from_settings(recipe: str | None, file_cfg: dict, overrides: dict) -> tuple[str | None, str | None, bool]:
    """(recipe, reason, named) from the explicit settings: a recipe named (argument or the config file's
    ``recipe``) is taken as it is (``named``: the data does not adapt it); a model named (``name`` in the
    overrides or the config file) keeps the defaults, adapted to the data, since the machine's recipe is tuned
    for its own network; otherwise the recipe chosen for this machine (``auto_recipe``)."""
    recipe = recipe or file_cfg.get("recipe")
    if recipe:
        return recipe, "chosen with --recipe", True
    if any(m is not None for m in (overrides.get("name"), file_cfg.get("name"),
                                   (file_cfg.get("model") or {}).get("name"))):
        return None, None, False
    device = overrides.get("device") or (file_cfg.get("train") or {}).get("device") or file_cfg.get("device")
    recipe, reason = auto_recipe(device or "auto")
    return recipe, reason, False


def explicit_keys(*layers: dict) -> set[str]:
    """The setting names given in config layers (flat ``{"lr": …}`` or nested ``{"train": {"lr": …}}``)."""
    keys: set[str] = set()
    for layer in layers:
        for k, v in (layer or {}).items():
            if k in ("data", "model", "train") and isinstance(v, dict):
                keys.update(v)
            else:
                keys.add(k)
    return keys


def adapt_config(cfg: RunConfig, explicit: set[str], probe=None) -> None:
    """Change the settings that depend on the data, per ``imgrec.engine.recipes.adapt_to_data``, leaving the
    ``explicit`` ones alone; records what changed and why in ``cfg.data_recipe``. ``probe``: the data's
    ``DataProbe`` (default: probed from ``cfg.data.data``)."""
    from imgrec.data.probe import probe_source
    from imgrec.engine.recipes import adapt_to_data
    d, m, t = cfg.data, cfg.model, cfg.train
    if probe is None:
        probe = probe_source(d.data, val_split=d.val_split, data_dir=d.data_dir)
    if probe is None:
        return
    current = {"name": m.name, "pretrained": m.pretrained, "weights": m.weights, "probe": m.probe,
               "image_size": d.image_size,
               **{k: getattr(t, k) for k in ("batch_size", "lr", "optimizer", "epochs", "val_last", "crop_padding",
                                             "tta_flip", "amp")}}
    changes, reason = adapt_to_data(probe, current, explicit)
    for key, value in changes.items():
        section = next(s for s in (m, d, t) if key in {f.name for f in dataclasses.fields(s)})
        setattr(section, key, value)
    cfg.data_recipe = {"reason": reason, "changes": changes, "probe": probe.to_dict()}


def train(cfg: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, evaluate_test: bool = True, extend_epochs: int | None = None,
          callbacks: list | None = None) -> dict:
    """Train per ``cfg`` into run directory ``out``; returns a summary (best val accuracy, test accuracy, times).

    With ``resume`` the run's saved config.yaml governs and ``cfg`` is ignored, except that
    ``extend_epochs`` may raise the number of epochs of a run (a finished one included). ``callbacks``: your own
    ``imgrec.engine.callbacks.Callback`` objects, called after imgrec's own.

    A run folder that did not exist before is removed again when the run fails before writing anything into it
    (a bad dataset, an unknown option), so the next run does not get a ``-2`` name beside an empty folder.
    """
    out = Path(out)
    created = not out.exists()
    try:
        return run(cfg, out, resume=resume, overwrite=overwrite, progress=progress, evaluate_test=evaluate_test,
                      extend_epochs=extend_epochs, user_callbacks=list(callbacks or []))
    except BaseException:
        if created and out.is_dir() and distributed.env_rank() == 0:
            for stale in out.glob(".imgrec-write-test-*"):
                stale.unlink(missing_ok=True)
            if not any(out.iterdir()):
                out.rmdir()
        raise
