"""Class imbalance: class weights (and their files), the balanced sampler, post-hoc logit adjustment through
model.json → Classifier → export graph, balanced metrics against scikit-learn, the long-tailed subset."""
from __future__ import annotations

import json
import math

import pytest
import torch

from imgrec.config import RunConfig, validate
from imgrec.data.dataset import ImageData
from imgrec.data.imbalance import (class_weights, imbalance_hint, imbalance_ratio, logit_adjust_entry,
                                   long_tail_indices, read_weights_file)
from imgrec.data.memory import BatchLoader
from imgrec.errors import ConfigError, ModelFileError
from imgrec.eval.metrics import balanced_accuracy, confusion_matrix, summarize
from imgrec.modeldir import ModelMeta

from conftest import assert_clean_error, run_cli

CLASSES = ["a", "b", "c"]


# -- class weights -------------------------------------------------------------------------------------
def test_weight_modes_match_their_formulas():
    counts = [1000, 100, 10]
    inv = class_weights("inverse", counts, CLASSES)
    expect = torch.tensor([1 / 1000, 1 / 100, 1 / 10])
    assert torch.allclose(inv, expect * 3 / expect.sum(), rtol=1e-6)
    beta = 0.999
    eff = torch.tensor([(1 - beta) / (1 - beta ** n) for n in counts])
    assert torch.allclose(class_weights("effective", counts, CLASSES, beta), eff * 3 / eff.sum(), rtol=1e-5)
    assert torch.equal(class_weights("auto", counts, CLASSES), class_weights("effective", counts, CLASSES))
    assert class_weights("none", counts, CLASSES) is None and class_weights(None, counts, CLASSES) is None
    # effective number is gentler than inverse frequency for large classes, uniform at beta 0
    assert inv[2] / inv[0] == pytest.approx(100, rel=1e-5)
    assert 10 < class_weights("auto", counts, CLASSES)[2] / class_weights("auto", counts, CLASSES)[0] < 100
    assert torch.allclose(class_weights("effective", counts, CLASSES, 0.0), torch.ones(3))
    # an empty class gets a finite weight
    assert torch.isfinite(class_weights("inverse", [10, 0, 5], CLASSES)).all()


@pytest.mark.parametrize("name,text", [
    ("w.json", '{"a": 1, "b": 2.5, "c": 4}'),
    ("w.yaml", "a: 1\nb: 2.5\nc: 4\n"),
    ("w.csv", "class,weight\na,1\nb,2.5\nc,4\n"),
    ("w.json", "[1, 2.5, 4]"),
])
def test_weights_file_formats(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    assert read_weights_file(p, CLASSES).tolist() == [1, 2.5, 4]
    w = class_weights(str(p), [1, 1, 1], CLASSES)
    assert torch.allclose(w, torch.tensor([1, 2.5, 4]) * 3 / 7.5)


@pytest.mark.parametrize("name", ["w.csv", "w.json", "w.yaml"])
def test_weights_file_saved_by_excel_with_a_byte_order_mark(tmp_path, name):
    """Excel's "CSV UTF-8" (and Notepad's UTF-8) put a byte-order mark before the header and end lines with
    CRLF: the header is still a header, as it is for a CSV image list (one reader, imgrec.safeio)."""
    text = {"w.csv": "class,weight\r\na,1\r\nb,2.5\r\nc,4\r\n", "w.json": '{"a": 1, "b": 2.5, "c": 4}',
            "w.yaml": "a: 1\nb: 2.5\nc: 4\n"}[name]
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8-sig"))
    assert p.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_weights_file(p, CLASSES).tolist() == [1, 2.5, 4]


def test_weights_file_size_nesting_and_encoding_are_one_line(tmp_path):
    for name, data, needle in [("big.csv", b"a,1\n" * (5 << 20), "larger than 16 MB"),
                               ("deep.json", b"[" * 200_000 + b"]" * 200_000, "nested more than"),
                               ("deep.yaml", b"a: " + b"[" * 5000 + b"]" * 5000, "nested more than"),
                               ("latin1.csv", "classe,poids\né,1\n".encode("latin-1"), "not UTF-8")]:
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ConfigError) as e:
            read_weights_file(p, CLASSES)
        assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("name,text,needle", [
    ("w.json", '{"a": 1, "b": 2, "zebra": 3}', "unknown class 'zebra'"),
    ("w.json", '{"a": 1, "b": -2, "c": 3}', "class 'b' must be a finite number ≥ 0"),
    ("w.json", "[1, 2]", "2 class weights for 3 classes"),
    ("w.json", '{"a": 1, "b": 2}', "no weight for class 'c'"),
    ("w.yaml", "a: 1\nb: heavy\nc: 3\n", "not a number"),
    ("w.json", '{"a": 0, "b": 0, "c": 0}', "every class weight is zero"),
    ("w.json", '{"a": 1,', "not valid JSON"),
    ("w.csv", "a,1\nb,2,3\nc,1\n", "row 2"),
    ("w.json", '{"a": 1, "b": NaN, "c": 3}', "finite"),
])
def test_weights_file_errors(tmp_path, name, text, needle):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(ConfigError, match=None) as e:
        read_weights_file(p, CLASSES)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_options_validated_in_one_line(tmp_path):
    for over, needle in [({"sampler": "oversample"}, "sampler"), ({"class_weights": str(tmp_path / "nope.json")},
                         "no such file"), ({"class_weight_beta": 1.0}, "class_weight_beta"),
                         ({"logit_adjust": 1.0, "sampler": "balanced"}, "logit_adjust"),
                         ({"logit_adjust": -1}, "logit_adjust"), ({"best_metric": "f2"}, "best_metric"),
                         ({"long_tail": 0.5}, "long_tail")]:
        cfg = RunConfig()
        cfg.update(over)
        with pytest.raises(ConfigError, match=needle):
            validate(cfg)


def test_cli_bad_weights_file_is_one_line(tmp_path):
    bad = tmp_path / "w.json"
    bad.write_text('{"T-shirt/top": 1, "Unicorn": 2}')
    r = run_cli("train", "--model", "simple_cnn", "--train-limit", "500", "--val-split", "100", "--epochs", "1",
                "--class-weights", bad, "--out", tmp_path / "run", "--quiet")
    assert_clean_error(r, "unknown class 'Unicorn'", str(bad))
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


# -- sampler -------------------------------------------------------------------------------------------
def _data(counts):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return ImageData(torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8), labels)


def test_balanced_sampler_is_balanced_and_reproducible():
    data = _data([900, 90, 10])
    loader = BatchLoader(data, 100, [0.5], [0.5], shuffle=True, seed=3, sampler="balanced")
    loader.set_epoch(2)
    order = loader.order()
    assert len(order) == len(data) and len(loader) == 10
    freq = torch.bincount(data.labels[order], minlength=3).float() / len(order)
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.04)
    # a global order from (seed, epoch) only: a resumed run, or another rank, computes the same one
    again = BatchLoader(data, 100, [0.5], [0.5], shuffle=True, seed=3, sampler="balanced")
    again.set_epoch(2)
    assert torch.equal(again.order(), order)
    batches = [y for _, y in loader.iterate(0)]
    assert torch.equal(torch.cat(batches[4:]), torch.cat([y for _, y in again.iterate(4)]))
    again.set_epoch(3)
    assert not torch.equal(again.order(), order)
    # the default is unchanged: a permutation
    plain = BatchLoader(data, 100, [0.5], [0.5], shuffle=True, seed=3)
    plain.set_epoch(2)
    assert torch.equal(plain.order().sort().values, torch.arange(len(data)))


# -- metrics against scikit-learn ------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_metrics_match_sklearn():
    from sklearn.metrics import balanced_accuracy_score, f1_score
    g = torch.Generator().manual_seed(0)
    target = torch.cat([torch.zeros(200), torch.ones(30), torch.full((5,), 3)]).long()  # class 2 absent
    logits = torch.randn(len(target), 4, generator=g) + 2 * torch.nn.functional.one_hot(target, 4)
    s = summarize(logits, target, list("wxyz"), top_k=2)
    pred = logits.argmax(1).numpy()
    assert s["balanced_acc"] == pytest.approx(balanced_accuracy_score(target.numpy(), pred), abs=1e-12)
    assert s["macro_f1"] == pytest.approx(f1_score(target.numpy(), pred, average="macro", labels=range(4),
                                                   zero_division=0), abs=1e-12)
    assert math.isnan(balanced_accuracy(confusion_matrix(torch.tensor([], dtype=torch.long),
                                                         torch.tensor([], dtype=torch.long), 3)))


# -- long tail, hint ---------------------------------------------------------------------------------------
def test_long_tail_indices_and_hint():
    labels = torch.arange(10).repeat_interleave(500)
    idx = long_tail_indices(labels, 10, 100)
    counts = torch.bincount(labels[idx], minlength=10).tolist()
    assert counts[0] == 500 and counts[-1] == 5
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert counts[4] == math.ceil(500 * 100 ** (-4 / 9))
    assert torch.equal(idx, long_tail_indices(labels, 10, 100))  # deterministic
    assert imbalance_ratio(counts) == 100 and imbalance_ratio([3, 0]) is None
    hint = imbalance_hint(counts, [str(i) for i in range(10)])
    assert hint.startswith("hint:") and "100:1" in hint and "--class-weights auto" in hint and "\n" not in hint
    assert imbalance_hint([100, 50], ["a", "b"]) is None


# -- logit adjustment end to end -------------------------------------------------------------------------
def test_logit_adjustment_travels_with_the_model(tmp_path, capsys):
    from imgrec.engine.train import resolve_config, train
    from imgrec.infer.export import ExportGraph
    from imgrec.infer.predictor import Classifier

    out = tmp_path / "la"
    cfg = resolve_config(None, None, {"name": "simple_cnn", "epochs": 1, "train_limit": 1500, "val_split": 300,
                                      "batch_size": 128, "long_tail": 10, "logit_adjust": 1.0, "threads": 1})
    summary = train(cfg, out, progress=False)
    meta = json.loads((out / "model.json").read_text())
    counts = meta["data"]["counts"]["train"]
    assert counts[0] / counts[-1] == pytest.approx(10, rel=0.15)
    la = meta["inference"]["logit_adjust"]
    assert la["tau"] == 1.0 and la["prior"] == pytest.approx([c / sum(counts) for c in counts])
    assert meta["format_version"] == 3
    assert {"val_balanced_acc", "val_macro_f1", "test_macro_f1", "test_balanced_acc"} <= set(meta["metrics"])
    assert 0 <= summary["test_balanced_acc"] <= 1

    clf = Classifier.load(out, device="cpu", amp="none")
    raw_meta = ModelMeta.from_dict({**meta, "inference": {"tta_flip": meta["inference"]["tta_flip"]}})
    raw = Classifier(clf.model, raw_meta, device="cpu", amp="none")
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    bias = -torch.log(torch.tensor(la["prior"]))
    assert torch.allclose(clf.logits(images), raw.logits(images) + bias, atol=1e-5)
    # the export graph (ONNX and TorchScript are traced from it) holds the same adjustment
    graph = ExportGraph(clf.model, clf.meta).eval()
    with torch.no_grad():
        _, g_logits = graph(images.permute(0, 2, 3, 1).contiguous())
    assert torch.allclose(g_logits, clf.logits(images), atol=1e-4)
    # the adjustment favours rare classes: the last class's bias is the largest
    assert int(bias.argmax()) == len(counts) - 1

    # --logit-adjust auto: τ from the grid, chosen on the validation split with the raw logits
    from imgrec.data.dataset import load_data
    from imgrec.data.imbalance import TAU_GRID
    from imgrec.engine.train import choose_logit_adjust
    from imgrec.eval.metrics import best_logit_adjustment
    bundle = load_data("fashion-mnist", val_split=300, progress=False)
    bundle.val = bundle.val.subset(long_tail_indices(bundle.val.labels, 10, 10))
    bundle.counts["train"] = counts
    m = ModelMeta.from_dict(meta)
    tau = choose_logit_adjust(out, bundle, m, torch.device("cpu"), "none")
    raw_logits = raw.logits(bundle.val.images)
    assert (tau, ) == best_logit_adjustment(raw_logits, bundle.val.labels, la["prior"], TAU_GRID)[:1]
    assert tau in TAU_GRID and (m.logit_bias is None) == (tau == 0)


def test_train_prints_the_imbalance_hint(tmp_path, capsys):
    from imgrec.engine.train import resolve_config, train
    cfg = resolve_config(None, None, {"name": "simple_cnn", "epochs": 1, "train_limit": 1000, "val_split": 200,
                                      "long_tail": 20, "threads": 1, "class_weights": None})
    train(cfg, tmp_path / "h", progress=True, evaluate_test=False)
    err = capsys.readouterr().err
    hints = [ln for ln in err.splitlines() if ln.startswith("hint:")]
    assert len(hints) == 1 and "imbalanced" in hints[0]


def test_model_json_logit_adjust_checked():
    base = {"format": "imgrec-model", "format_version": 3, "model": {"name": "simple_cnn"}, "classes": CLASSES,
            "image_size": 28, "channels": 1, "mean": [0.5], "std": [0.5]}
    ok = ModelMeta.from_dict({**base, "inference": {"logit_adjust": {"tau": 1.0, "prior": [0.5, 0.3, 0.2]}}})
    assert ok.logit_bias == pytest.approx([-math.log(p) for p in (0.5, 0.3, 0.2)])
    assert ModelMeta.from_dict(base).logit_bias is None
    assert ModelMeta.from_dict({**base, "format_version": 2}).logit_bias is None  # older files still load
    for bad in ({"tau": 1.0, "prior": [0.5, 0.5]}, {"tau": 1.0, "prior": [0.5, 0.5, 0.0]}, {"prior": [1, 1, 1]}):
        with pytest.raises(ModelFileError, match="logit_adjust"):
            ModelMeta.from_dict({**base, "inference": {"logit_adjust": bad}})
    assert logit_adjust_entry([10, 0], 0) == {}
    assert logit_adjust_entry([3, 0], 1.0)["logit_adjust"]["prior"] == [0.75, 0.25]


def test_logit_adjust_auto_picks_tau_on_the_given_split():
    from imgrec.data.imbalance import TAU_GRID
    from imgrec.eval.metrics import best_logit_adjustment
    g = torch.Generator().manual_seed(1)
    prior = torch.tensor([0.7, 0.2, 0.1])
    target = torch.arange(3).repeat_interleave(200)
    # a model that learnt the training prior: its logits carry log(prior) on top of the evidence
    logits = 1.5 * torch.nn.functional.one_hot(target, 3) + torch.randn(600, 3, generator=g) + torch.log(prior)
    tau, score = best_logit_adjustment(logits, target, prior, TAU_GRID)
    scores = {t: balanced_accuracy(confusion_matrix((logits - t * torch.log(prior)).argmax(1), target, 3))
              for t in TAU_GRID}
    assert score == pytest.approx(max(scores.values())) and scores[tau] == pytest.approx(score)
    assert tau == min(t for t, s in scores.items() if s >= score - 1e-12)  # ties: the smallest τ
    assert score > scores[0.0]  # removing the prior helps here
    cfg = RunConfig()
    cfg.update({"logit_adjust": "auto"})
    validate(cfg)
    from imgrec.cli.train import _tau
    assert _tau("auto") == "auto" and _tau("0.5") == 0.5


# -- deferred re-weighting and the logit-adjusted loss ---------------------------------------------------
def test_logit_adjusted_loss_equals_hand_computation():
    from imgrec.engine.losses import LogitAdjustedLoss, build_loss
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0]])
    y = torch.tensor([0, 2, 1])
    prior = [0.7, 0.2, 0.1]
    for tau in (1.0, 0.5):
        loss = build_loss("classification", 0.0, logit_prior=prior, logit_tau=tau)
        assert isinstance(loss, LogitAdjustedLoss)
        hand = 0.0
        for z, t in zip(logits.tolist(), y.tolist()):
            adj = [zi + tau * math.log(p) for zi, p in zip(z, prior)]
            hand += -(adj[t] - math.log(sum(math.exp(a) for a in adj)))
        assert float(loss(logits, y)) == pytest.approx(hand / 3, rel=1e-6)
    # with weights and label smoothing: CrossEntropyLoss's own rules on the adjusted logits
    w, eps = torch.tensor([1.0, 2.0, 3.0]), 0.1
    shifted = logits + torch.log(torch.tensor(prior))
    want = torch.nn.functional.cross_entropy(shifted, y, weight=w, label_smoothing=eps)
    got = build_loss("classification", eps, w, logit_prior=prior, logit_tau=1.0)(logits, y)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    # τ 0 or no prior: the plain cross-entropy
    assert type(build_loss("classification", 0.0, logit_prior=prior, logit_tau=0.0)) is torch.nn.CrossEntropyLoss
    # the prior term gives a frequent class (0) part of its margin, and a rare one (2) must earn more: the
    # network's own logits learn larger margins for rare classes (the balanced posterior)
    ce = torch.nn.functional.cross_entropy
    assert float(loss(logits[:1], y[:1])) < float(ce(logits[:1], y[:1]))
    assert float(loss(logits[1:2], y[1:2])) > float(ce(logits[1:2], y[1:2]))


def test_deferred_reweighting_switches_weights_by_epoch():
    from imgrec.config import TrainConfig
    from imgrec.engine.callbacks import Callback
    from imgrec.engine.trainer import Trainer

    class Seen(Callback):
        def __init__(self):
            self.weights = []

        def on_epoch_begin(self, trainer, epoch):
            w = trainer.loss_fn.weight
            self.weights.append(None if w is None else w.clone())

    torch.manual_seed(0)
    data = _data([40, 10, 5])
    data.images = torch.randint(0, 256, data.images.shape, dtype=torch.uint8)
    w = class_weights("effective", [40, 10, 5], CLASSES, 0.9999)

    def trainer(reweight_from, cb=()):
        cfg = TrainConfig(epochs=4, batch_size=16, class_weights="effective", reweight_from=reweight_from,
                          label_smoothing=0.0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        return Trainer(model, cfg, BatchLoader(data, 16, [0.5], [0.25], shuffle=True),
                       BatchLoader(data, 64, [0.5], [0.25]), device=torch.device("cpu"), amp=None,
                       callbacks=cb, class_weights=w)

    seen = Seen()
    tr = trainer(0.5, [seen])  # 4 epochs, weights from epoch index ceil(0.5·4) = 2 on
    assert tr.reweight_epoch == 2 and tr.loss_fn.weight is None
    tr.fit()
    assert seen.weights[0] is None and seen.weights[1] is None
    assert torch.equal(seen.weights[2], w) and torch.equal(seen.weights[3], w)
    # a run resumed after the switch re-weights at once (the switch follows the epoch, not the history)
    late = trainer(0.5)
    late.epoch = 3
    late._run_epoch()
    assert torch.equal(late.loss_fn.weight, w)
    # reweight_from 0: weighted from the start, never switched off
    assert torch.equal(trainer(0.0).loss_fn.weight, w)
    assert trainer(0.7).reweight_epoch == 3  # ceil(2.8): the last 25% of 4 epochs


def test_new_imbalance_options_validated_and_recorded(tmp_path, capsys):
    for over, needle in [({"reweight_from": 0.5}, "give class_weights"),
                         ({"reweight_from": 1.0, "class_weights": "auto"}, "reweight_from"),
                         ({"logit_adjust_loss": -1}, "logit_adjust_loss"),
                         ({"logit_adjust_loss": 1.0, "logit_adjust": 1.0}, "logit_adjust_loss"),
                         ({"logit_adjust_loss": 1.0, "class_weights": "auto"}, "logit_adjust_loss")]:
        cfg = RunConfig()
        cfg.update(over)
        with pytest.raises(ConfigError, match=needle):
            validate(cfg)
    from imgrec.cli import EXIT_BAD_INPUT, build_parser, main
    args = build_parser().parse_args(["train", "--class-weights", "auto", "--reweight-from", "0.7",
                                      "--logit-adjust-loss"])
    assert (args.reweight_from, args.logit_adjust_loss) == (0.7, 1.0)
    rc = main(["train", "--model", "simple_cnn", "--reweight-from", "0.7", "--out", str(tmp_path / "r")])
    assert rc == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give class_weights" in err[0]
    # end to end: the adjusted loss trains, predicts with raw logits (nothing in model.json's inference)
    from imgrec.engine.train import resolve_config, train
    cfg = resolve_config(None, None, {"name": "simple_cnn", "epochs": 1, "train_limit": 600, "val_split": 200,
                                      "long_tail": 10, "threads": 1, "logit_adjust_loss": 1.0})
    train(cfg, tmp_path / "la", progress=False, evaluate_test=False)
    meta = json.loads((tmp_path / "la" / "model.json").read_text())
    assert "logit_adjust" not in meta["inference"]
    assert meta["training"]["imbalance"]["logit_adjust_loss"] == 1.0
    assert "val_balanced_acc" in meta["metrics"]  # the best epoch is chosen by balanced accuracy
