"""Shared fixtures: small real data from Fashion-MNIST, and one small trained model for the read-only tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # tests never touch the user's cache or the network
    cache = tmp_path_factory.mktemp("xdg-cache")
    old = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "IMGREC_OFFLINE", "MPLBACKEND")}
    os.environ["XDG_CACHE_HOME"] = str(cache)
    os.environ["IMGREC_OFFLINE"] = "1"
    os.environ["MPLBACKEND"] = "Agg"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def fmnist_arrays():
    """(train_x, train_y, test_x, test_y) numpy arrays of the real Fashion-MNIST."""
    from imgrec.data.named import load_named
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is missing: run `apt-get install dataset-fashion-mnist` (make test does)")
    x, y = load_named("fashion-mnist", "train")
    xt, yt = load_named("fashion-mnist", "test")
    return x, y, xt, yt



@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: request it, or the whole module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``. Small batches and single-image passes on a small
    shared CPU: OpenMP threads spinning against other processes made tests several times slower (measured:
    resnet18 backward 4.7 s -> 0.2 s under load; a tiny CNN trained 10x slower with 2 threads). The setting
    is process-wide, so it is put back after the module."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

def write_image_folder(root: Path, x: np.ndarray, y: np.ndarray, classes, per_class: int, offset: int = 0,
                       fmt_cycle=("png", "jpg")) -> Path:
    """An ImageFolder tree of real Fashion-MNIST images, alternating PNG and JPEG files."""
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(exist_ok=True)
        idx = np.nonzero(y == c)[0][offset:offset + per_class]
        for j, i in enumerate(idx):
            fmt = fmt_cycle[j % len(fmt_cycle)]
            Image.fromarray(x[i]).save(d / f"{i}.{fmt}", quality=95) if fmt == "jpg" else \
                Image.fromarray(x[i]).save(d / f"{i}.{fmt}")
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, fmnist_arrays):
    """A simple_cnn trained briefly on a Fashion-MNIST subset through the library (shared, read-only)."""
    from imgrec.engine.train import resolve_config, train
    out = tmp_path_factory.mktemp("runs") / "fm-simple"
    cfg = resolve_config(None, None, {"name": "simple_cnn", "epochs": 2, "train_limit": 8000, "val_split": 2000,
                                      "batch_size": 128, "lr": 3e-3}, model_given=True)
    summary = train(cfg, out, progress=False)
    return out, summary


def run_cli(*args, cwd=None, env=None, timeout=600, input=None):
    """Run ``imgrec`` as a subprocess; returns CompletedProcess with text output."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "imgrec.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=e, timeout=timeout, input=input)


def assert_clean_error(r, *needles):
    """A CLI failure as imgrec reports one: non-zero exit, no traceback, exactly one error line, last."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    # a progress banner may precede the error line
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("imgrec: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    for n in needles:
        assert n in errors[0], errors[0]



# Tests marked `slow` here rather than with @pytest.mark.slow beside them (those modules were being rewritten
# when the marker was applied; move the marks there when convenient). `make test-fast` leaves them out.
SLOW_TESTS = {
    "test_audit.py": ("test_audit_cli_finds_flipped_and_writes_everything", "test_audit_relabel_and_json",
                      "test_audit_python_api", "test_audit_named_dataset_writes_images_for_the_cleaned_list",
                      "test_audit_bad_input"),
    "test_defaults.py": ("test_a_small_user_folder_trains_well_with_no_options",
                         "test_audit_refuses_to_rank_when_its_fold_models_are_weak",
                         "test_colour_photos_fine_tune_cached_pretrained_weights",
                         "test_resume_shows_the_run_and_a_finished_run_says_so",
                         "test_the_recipe_line_says_what_was_chosen_and_why", "test_guard_rails_speak"),
    "test_calibration.py": ("test_no_calibrate_then_imgrec_calibrate",
                            "test_eval_json_and_text_show_calibration_before_and_after",
                            "test_overconfident_logits_get_their_factor_back"),
}


def pytest_collection_modifyitems(config, items):
    """``slow``: the tests `make test-fast` leaves out (they train for more than a few seconds, start
    processes that train or serve, or drive a browser). Browser tests are slow wherever they are."""
    for item in items:
        name = item.originalname if hasattr(item, "originalname") else item.name
        if item.get_closest_marker("browser") or name in SLOW_TESTS.get(item.path.name, ()):
            item.add_marker(pytest.mark.slow)

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under IMGREC_STRICT_TESTS=1 (set by .ci/run) a skipped test fails: a missing browser or package in CI
    must not pass silently. Skips that depend on the machine, not on an install (running as root), stay."""
    outcome = yield
    rep = outcome.get_result()
    if os.environ.get("IMGREC_STRICT_TESTS") == "1" and rep.skipped and "root" not in str(rep.longrepr):
        rep.outcome = "failed"
        rep.longrepr = f"skipped under IMGREC_STRICT_TESTS=1 (a missing install?): {rep.longrepr}"
