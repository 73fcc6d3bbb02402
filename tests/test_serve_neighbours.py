"""imgrec serve's nearest training images: ``/v1/predict?neighbours=K`` and ``/v1/model``'s ``neighbours``, against
a real uvicorn server over the session's trained model (whose directory has ``neighbours.safetensors``); the
pictures found through the run's own data settings, or not found; models without a bank; the batcher asking
for features only for the requests that want them. The page's panel is in test_serve_browser.py."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from imgrec.serve.app import ServeSettings, create_app, load_classifier  # noqa: E402
from imgrec.serve.runner import load_neighbours  # noqa: E402
from liveserver import LiveServer, wait_until  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


def _files(*pngs: bytes):
    return [("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]


@pytest.fixture(scope="module")
def classifier(trained_run):
    return load_classifier(trained_run[0])


@pytest.fixture(scope="module")
def train_images(classifier):
    """The training split as the server resolves the bank's indices into it."""
    from imgrec.eval.neighbours import load_training_images
    return load_training_images(classifier.meta)


@pytest.fixture(scope="module")
def server(classifier, trained_run):
    settings = ServeSettings(max_files=4)
    nb = load_neighbours(classifier, trained_run[0], settings)
    assert nb is not None and nb.missing is None
    with LiveServer(create_app(classifier, settings, nb), settings) as s:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            # the pictures are read in the background after start-up: wait for that event
            wait_until(lambda: c.get("/v1/model").json()["neighbours"]["pictures_ready"], "pictures read")
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def test_pngs(fmnist_arrays):
    _, _, xt, _ = fmnist_arrays
    return [_png(xt[i]) for i in range(3)]


def test_model_info_says_neighbours_with_pictures(client, server):
    info = client.get("/v1/model").json()["neighbours"]
    assert info == {"rows": len(server.state.neighbours.bank), "max_k": 16, "pictures": True, "pictures_ready": True}
    assert info["rows"] > 0


def test_neighbours_come_with_labels_similarities_and_thumbnails(client, classifier, test_pngs, train_images):
    r = client.post("/v1/predict?neighbours=5", files=_files(*test_pngs[:2]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["neighbours"]) == 2
    for near in body["neighbours"]:
        assert len(near) == 5
        sims = [n["similarity"] for n in near]
        assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims)
        for n in near:
            assert set(n) == {"index", "label", "similarity", "thumbnail"}
            assert n["label"] in classifier.classes
            assert n["thumbnail"].startswith("data:image/png;base64,")
            im = Image.open(io.BytesIO(base64.b64decode(n["thumbnail"].split(",", 1)[1])))
            assert im.format == "PNG" and max(im.size) <= 64
            # the thumbnail is the training image the index names (28 px: not shrunk)
            assert np.array_equal(np.asarray(im), train_images[n["index"], 0].numpy())
    # the neighbours look like the image: most of them carry the predicted label
    for pred, near in zip(body["predictions"], body["neighbours"]):
        assert sum(n["label"] == pred[0]["label"] for n in near) >= 3


def test_a_training_image_finds_itself_first(client, server, train_images):
    """The bank's indices resolve to the images its features were computed from: a training image from the bank,
    uploaded, is its own nearest neighbour, at similarity 1 (float16 features)."""
    bank = server.state.neighbours.bank
    for row in (0, len(bank) // 2, len(bank) - 1):
        index = int(bank.index[row])
        png = _png(train_images[index].numpy().transpose(1, 2, 0))
        first = client.post("/v1/predict?neighbours=1", files=_files(png)).json()["neighbours"][0][0]
        assert first["index"] == index and first["similarity"] > 0.999, first
        assert first["label"] == server.state.classifier.classes[int(bank.labels[row])]


def test_the_answer_is_the_same_with_and_without_neighbours(client, test_pngs):
    plain = client.post("/v1/predict", files=_files(*test_pngs)).json()
    near = client.post("/v1/predict?neighbours=3", files=_files(*test_pngs)).json()
    assert "neighbours" not in plain  # the default costs and says nothing more
    for a, b in zip(plain["predictions"], near["predictions"]):
        assert [p["label"] for p in a] == [p["label"] for p in b]
        assert np.allclose([p["score"] for p in a], [p["score"] for p in b], atol=1e-6)
    assert np.allclose(plain["ood_scores"], near["ood_scores"], rtol=1e-5)
    assert plain["unknown"] == near["unknown"]


@pytest.mark.parametrize("k", ["17", "-1", "1000", "two", "1.5"])
def test_k_out_of_range_is_422_json_before_inference(client, server, test_pngs, k):
    passes = server.state.batcher.batches_run
    r = client.post(f"/v1/predict?neighbours={k}", files=_files(test_pngs[0]))
    assert r.status_code == 422 and "neighbours" in r.json()["detail"], r.text
    assert server.state.batcher.batches_run == passes


def test_zero_is_the_default(client, test_pngs):
    assert "neighbours" not in client.post("/v1/predict?neighbours=0", files=_files(test_pngs[0])).json()


def test_model_without_a_bank_says_so(classifier, test_pngs):
    """No neighbours (a model directory without a bank, an ONNX file): /v1/model says null and asking is a
    400 with the reason, while plain predictions go on."""
    settings = ServeSettings()
    with LiveServer(create_app(classifier, settings), settings) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.get("/v1/model").json()["neighbours"] is None
        r = c.post("/v1/predict?neighbours=3", files=_files(test_pngs[0]))
        assert r.status_code == 400 and "no bank of training features" in r.json()["detail"]
        assert c.post("/v1/predict", files=_files(test_pngs[0])).status_code == 200


@pytest.fixture(scope="module")
def moved_run(trained_run, tmp_path_factory):
    """The trained run as if its training data had been a folder that is gone now, and its classifier."""
    run = _copy_run(trained_run[0], tmp_path_factory.mktemp("moved") / "run")
    gone = str(run.parent / "gone" / "fashion")
    meta = json.loads((run / "model.json").read_text())
    meta["data"]["source"] = meta["config"]["data"]["data"] = gone
    (run / "model.json").write_text(json.dumps(meta))
    return run, load_classifier(run), gone


def test_without_the_training_images_labels_and_similarities_still_come(moved_run, test_pngs, capsys):
    run, clf, gone = moved_run
    settings = ServeSettings()
    nb = load_neighbours(clf, run, settings)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "without pictures" in err and gone in err and "--neighbours-data" in err, err
    with LiveServer(create_app(clf, settings, nb), settings) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.get("/v1/model").json()["neighbours"]["pictures"] is False
        r = c.post("/v1/predict?neighbours=4", files=_files(test_pngs[0]))
        near = r.json()["neighbours"][0]
        assert len(near) == 4 and all(n["thumbnail"] is None and n["label"] in clf.classes for n in near)
        assert all(0 < n["similarity"] <= 1 for n in near)
    assert gone not in r.text and str(run) not in r.text


def test_moved_training_data_is_found_with_neighbours_data(moved_run, capsys, train_images):
    """--neighbours-data in place of the recorded source: the run's own split settings still apply, so the
    indices name the same training images (the same thumbnails as from the original run)."""
    run, clf, _ = moved_run
    nb = load_neighbours(clf, run, ServeSettings(neighbours_data="fashion-mnist"))
    err = capsys.readouterr().err
    # one line names the absolute folder the pictures come from
    assert nb.missing is None and err.count("\n") == 1 and f"pictures from {nb.place}" in err, err
    nb.read_pictures()
    assert nb.info()["pictures_ready"] is True and nb.missing is None
    queries = nb.bank.features[[0, 7, 42]].astype(np.float32)
    for n in (row[0] for row in nb.lookup(queries, 1)):
        im = Image.open(io.BytesIO(base64.b64decode(n["thumbnail"].split(",", 1)[1])))
        assert np.array_equal(np.asarray(im), train_images[n["index"], 0].numpy())


def test_shutdown_waits_for_the_pictures_being_read(classifier, trained_run):
    """A server stopped while the training images are still being read waits for the read to end: a reader
    left inside torch when the interpreter exits aborts the process (exit 134 in place of 0 on Ctrl-C)."""
    import threading
    settings = ServeSettings()
    nb = load_neighbours(classifier, trained_run[0], settings)
    started, release, read = threading.Event(), threading.Event(), nb.read_pictures

    def gated_read():
        started.set()
        release.wait()
        read()

    nb.read_pictures = gated_read
    with LiveServer(create_app(classifier, settings, nb), settings) as s:
        assert started.wait(60), "the pictures were not read after start-up"
        state = s.state
        # let the read go only once the server has begun to stop
        threading.Thread(target=lambda: (wait_until(lambda: not state.ready, "shutdown"), release.set()),
                         daemon=True).start()
    assert s.thread is not None and not s.thread.is_alive()
    assert nb.pictures_read.is_set() and nb.missing is None and nb.info()["pictures_ready"] is True


def _copy_run(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def test_a_broken_bank_costs_the_lookup_not_the_server(classifier, trained_run, tmp_path, capsys):
    run = _copy_run(trained_run[0], tmp_path / "run")
    bank = run / "neighbours.safetensors"
    bank.write_bytes(bank.read_bytes()[:100])
    assert load_neighbours(classifier, run, ServeSettings()) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unavailable" in err and "corrupt" in err, err


def test_neighbours_data_for_a_model_without_a_bank_is_a_one_line_error(trained_run, tmp_path, capsys):
    from imgrec.cli import main
    run = _copy_run(trained_run[0], tmp_path / "run")
    meta = json.loads((run / "model.json").read_text())
    meta["inference"].pop("neighbours")
    (run / "model.json").write_text(json.dumps(meta))
    (run / "neighbours.safetensors").unlink()
    code = main(["serve", "--model", str(run), "--port", "0", "--neighbours-data", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--neighbours-data" in err and "no bank" in err, err


def test_the_batcher_asks_for_features_only_for_requests_that_want_them():
    from imgrec.serve.batcher import Batcher
    calls = []

    def forward(x, features=False):
        calls.append((int(x.shape[0]), features))
        return list(range(int(x.shape[0])))

    async def run():
        b = Batcher(forward, max_batch=8, max_wait_s=0.0)
        b.start()
        try:
            plain = await b.enqueue(np.zeros((2, 1, 4, 4), np.uint8))
            wanted = await b.enqueue(np.zeros((1, 1, 4, 4), np.uint8), features=True)
        finally:
            b.stop()
        return plain, wanted

    plain, wanted = asyncio.run(run())
    assert (plain, wanted) == ([0, 1], [0])
    assert calls == [(2, False), (1, True)]


@pytest.mark.parametrize("k", [1, 3, 7, 8, 50])
def test_top_is_a_stable_sort_cut_at_k(k):
    """The partition-then-sort lookup gives what a full stable sort gives, ties (by row) and k past the bank
    included."""
    from imgrec.infer.neighbours import Bank
    rng = np.random.default_rng(k)
    sims = rng.integers(0, 4, (5, 8)).astype(np.float32) / 4  # many ties
    got_sims, got_rows = Bank.top(sims, k)
    want_rows = np.argsort(-sims, axis=1, kind="stable")[:, :min(k, 8)]
    assert np.array_equal(got_rows, want_rows)
    assert np.array_equal(got_sims, np.take_along_axis(sims, want_rows, axis=1))


def test_the_server_and_the_library_share_one_float32_copy_of_the_bank():
    """The server's lookup is a view of the bank's float32 rows (10 MB for the default model), not a second copy,
    and finds what Bank.nearest finds."""
    import numpy as np

    from imgrec.infer.neighbours import Bank
    from imgrec.serve.neighbours import ServeNeighbours
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((50, 8)).astype(np.float32)
    bank = Bank(rows / np.linalg.norm(rows, axis=1, keepdims=True), np.arange(50) * 3, np.arange(50) % 2)
    serve = ServeNeighbours(bank, ["a", "b"], missing="no pictures here")
    q = rows[[4, 17]]
    answer = serve.lookup(q, 3)
    assert np.shares_memory(serve._bank32.numpy(), bank.features32())
    sims, found = bank.nearest(q, 3)
    assert [[a["index"] for a in row] for row in answer] == (bank.index[found]).tolist()
    assert [row[0]["index"] for row in answer] == [12, 51]  # each query's own row first


# -- where a model directory's recorded source may be read from (issue 36) ----------------------------------
def _run_recording(trained_run, root, source):
    """A copy of the trained run at ``root``/runs/x whose model.json records ``source`` as its training data."""
    run = _copy_run(trained_run[0], _mkdirs(root / "runs") / "x")
    meta = json.loads((run / "model.json").read_text())
    meta["data"]["source"] = meta["config"]["data"]["data"] = source
    (run / "model.json").write_text(json.dumps(meta))
    return run


def _mkdirs(p):
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """A small image folder next to where the runs go (what it holds matters not: the tests see where it is
    looked for and read from, not its pictures)."""
    root = tmp_path_factory.mktemp("project") / "photos"
    for c in ("a", "b"):
        _mkdirs(root / c)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / c / "0.png")
    return root


def _reads(monkeypatch):
    """The sources load_data is asked to read, each refused at once (the pictures themselves are not the point)."""
    import imgrec.data.dataset as dataset
    from imgrec.errors import DatasetError
    reads = []

    def load_data(spec, *a, **k):
        reads.append(spec)
        raise DatasetError(f"{spec}: read (test)")

    monkeypatch.setattr(dataset, "load_data", load_data)
    return reads


def test_a_relative_source_is_found_beside_the_model_directory_not_in_the_working_directory(
        trained_run, photo_folder, tmp_path, monkeypatch, capsys):
    """runs/x trained on photos/ next to runs/: found from any working directory, and the absolute path read is
    said in one line; the same relative name in the server's working directory is never read."""
    from imgrec.eval.neighbours import training_data
    project = photo_folder.parent
    run = _run_recording(trained_run, project, "photos")
    elsewhere = _mkdirs(tmp_path / "cwd")
    shutil.copytree(photo_folder, elsewhere / "photos")
    monkeypatch.chdir(elsewhere)
    clf = load_classifier(run)
    assert training_data(clf.meta, model_dir=run)["source"] == str(photo_folder.resolve())
    nb = load_neighbours(clf, run, ServeSettings())
    err = capsys.readouterr().err
    assert nb.missing is None and err == f"imgrec: nearest training images' pictures from {photo_folder.resolve()}\n"
    reads = _reads(monkeypatch)
    nb.read_pictures()
    assert reads == [str(photo_folder.resolve())]
    # without the copy beside the run, the working directory's photos/ is not taken instead
    run2 = _run_recording(trained_run, _mkdirs(tmp_path / "other"), "photos")
    nb2 = load_neighbours(load_classifier(run2), run2, ServeSettings())
    assert nb2.missing is not None and "photos" in nb2.missing and nb2.place is None


@pytest.mark.parametrize("where", ["/etc", "outside", "url", "link_out", "list"])
def test_a_handed_source_outside_the_model_tree_is_not_read(trained_run, photo_folder, tmp_path, where, capsys,
                                                            monkeypatch):
    """model.json pointing data.source at /etc, at a folder outside the model directory's tree (class names
    matching), through a symlink inside the tree, at a URL, or at a list: no file there is read (load_data is
    never called), the server says why in one line and answers without pictures; --neighbours-data naming the
    same folder reads it."""
    link = _mkdirs(tmp_path / "project") / "photos"
    link.symlink_to(photo_folder, target_is_directory=True)  # inside the tree, pointing out of it
    source = {"/etc": "/etc", "outside": str(photo_folder), "url": "s3://bucket/photos", "link_out": "photos",
              "list": [str(photo_folder)]}[where]
    run = _run_recording(trained_run, tmp_path / "project", source)
    clf = load_classifier(run)
    reads = _reads(monkeypatch)
    nb = load_neighbours(clf, run, ServeSettings())
    err = capsys.readouterr().err
    if where == "list":  # not a path at all: model.json's data settings are refused, the lookup with them
        assert nb is None and err.count("\n") == 1 and "unavailable" in err and "data.source" in err, err
        return
    assert nb.missing is not None and nb.place is None and err.count("\n") == 1 and "without pictures" in err, err
    nb.read_pictures()
    assert reads == [] and nb.info()["pictures"] is False
    if where == "outside":  # named explicitly, the same folder is read
        nb = load_neighbours(clf, run, ServeSettings(neighbours_data=str(photo_folder)))
        assert nb.missing is None and nb.place == str(photo_folder.resolve())
        nb.read_pictures()
        assert reads == [str(photo_folder)]


def test_explain_and_the_library_keep_to_the_same_rule(trained_run, tmp_path):
    """Neighbours (explain --neighbours, the report's gallery) refuses a handed /etc in one line."""
    from imgrec.errors import DatasetError
    from imgrec.eval.neighbours import Neighbours
    run = _run_recording(trained_run, tmp_path, "/etc")
    with pytest.raises(DatasetError, match="inside"):
        Neighbours(load_classifier(run), run)
