"""The benchmark runner's resume cache (scores.json) is keyed by everything that decides a score: the roma_peft
source, library versions, the model files, the data and the run's settings. A cache made under one key is never
mixed into a run under another; it is reused when nothing changed. Training and scoring are faked (fast)."""

import json
import shutil
from dataclasses import asdict

import pytest

import roma_peft
from roma_peft.benchmark import runner
from roma_peft.benchmark.suite import shipped_model_path

VARIANT = runner.Variant(name="manifold", regularizer="manifold", roma_lambda=10.0)


def _splits(n: int = 3) -> dict:
    return {
        name: [{"id": f"{name}-{i}", "question": f"q{i}", "options": ["a", "b"], "label": 0} for i in range(n)]
        for name in ("train", "dev", "test")
    }


def _context(tmp_path, splits=None, **config) -> runner.Context:
    """What ``prepare`` makes, without the model loads, base scores and embeddings; then the cache is loaded."""
    cfg = runner.BenchmarkConfig(out=str(tmp_path), progress=False, **config)
    ctx = runner.Context(cfg, str(shipped_model_path()), None, splits or _splits(), base={}, embeddings={})
    runner._load_scores(ctx)
    return ctx


@pytest.fixture
def trainings(monkeypatch):
    """Fake training (returns the variant) and scoring; records every training run."""
    calls = []

    def train_variant(ctx, variant, seed, output_dir=None):
        calls.append((variant.name, seed))
        return variant, {}

    monkeypatch.setattr(runner, "train_variant", train_variant)
    monkeypatch.setattr(runner, "evaluate", lambda ctx, model, split: 0.5 if split == "dev" else 0.25)
    return calls


def test_cache_is_reused_when_nothing_changed(tmp_path, trainings, capsys):
    first = _context(tmp_path)
    assert runner.scores_of(first, VARIANT, 0, ("dev", "test")) == {"dev": 0.5, "test": 0.25}
    assert trainings == [("manifold", 0)]
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["key"] == first.cache_key and set(saved["key"]) == {"code", "libraries", "model", "data", "settings"}

    again = _context(tmp_path)
    assert "resuming: 1 finished runs" in capsys.readouterr().out
    assert runner.scores_of(again, VARIANT, 0, ("dev", "test")) == {"dev": 0.5, "test": 0.25}
    assert trainings == [("manifold", 0)], "a cached score was trained again although nothing changed"
    # settings that only decide WHICH runs are made (seeds, grids, output) keep the cache valid
    more = _context(tmp_path, seeds=(0, 1, 2, 3), lr_grid=(1e-2,), ablations=False, figures=False)
    runner.scores_of(more, VARIANT, 0, ("dev",))
    assert trainings == [("manifold", 0)]


def _edit_code(monkeypatch):
    monkeypatch.setattr(runner, "_source_hash", lambda: "0" * 64)  # as after an edit of the trainer


def _upgrade_torch(monkeypatch):
    real = runner._library_versions
    monkeypatch.setattr(runner, "_library_versions", lambda: {**real(), "torch": "99.0"})


def _other_model(monkeypatch):
    monkeypatch.setattr(runner, "_model_hash", lambda path: "1" * 64)


@pytest.mark.parametrize(
    "change, context_kwargs, message",
    [
        (_edit_code, {}, "roma_peft source code"),
        (_upgrade_torch, {}, 'library versions: torch "'),
        (_other_model, {}, "model files"),
        (None, {"epochs": 1.0}, "run settings: epochs 2.0 -> 1.0"),
        (None, {"batch_size": 8}, "run settings: batch_size 32 -> 8"),
        (None, {"num_layers": 1}, "run settings: num_layers 5 -> 1"),
        (None, {"max_train": 2}, "run settings: max_train null -> 2"),
        (None, {"splits": _splits(4)}, "data splits: dev"),
    ],
    ids=["code", "library", "model", "epochs", "batch_size", "num_layers", "max_train", "data"],
)
def test_cache_made_under_another_key_is_not_reused(
    tmp_path, trainings, capsys, monkeypatch, change, context_kwargs, message
):
    old = _context(tmp_path)
    runner.scores_of(old, VARIANT, 0, ("dev",))
    assert len(trainings) == 1
    old_file = json.loads((tmp_path / "scores.json").read_text())
    capsys.readouterr()

    if change is not None:
        change(monkeypatch)
    new = _context(tmp_path, **context_kwargs)
    out = capsys.readouterr().out
    assert "NOT resuming" in out and message in out, out
    assert new.scores == {}
    runner.scores_of(new, VARIANT, 0, ("dev",))
    assert len(trainings) == 2, "a score made under another key was reused"
    # the new file holds only the new run, under the new key; the old file is kept aside, untouched
    now = json.loads((tmp_path / "scores.json").read_text())
    assert now["key"] == new.cache_key != old.cache_key and len(now["scores"]) == 1
    kept = [p for p in tmp_path.glob("scores.*.json")]
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == old_file and kept[0].name in out


def test_a_scores_file_without_a_full_key_is_not_reused(tmp_path, trainings, capsys):
    ctx = _context(tmp_path)
    runner.scores_of(ctx, VARIANT, 0, ("dev",))
    path = runner._scores_file(ctx)
    payload = json.loads(path.read_text())
    # written by the runner before this fix: a fingerprint of model, data, epochs and batch size only
    path.write_text(json.dumps({"fingerprint": "abc", "scores": payload["scores"]}))
    new = _context(tmp_path)
    assert new.scores == {} and "older runner" in capsys.readouterr().out


def test_every_setting_but_the_documented_exceptions_is_in_the_key(tmp_path):
    ctx = _context(tmp_path)
    fields = set(asdict(ctx.config))
    assert runner._NOT_IN_CACHE_KEY <= fields
    assert set(ctx.cache_key["settings"]) == fields - runner._NOT_IN_CACHE_KEY
    assert set(ctx.cache_key["libraries"]) >= {
        "torch",
        "transformers",
        "peft",
        "sentence-transformers",
        "scikit-learn",
        "numpy",
    }


def test_source_hash_covers_every_python_file_of_the_package(tmp_path, monkeypatch):
    copy = tmp_path / "roma_peft"
    package = runner.Path(roma_peft.__file__).resolve().parent
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    original = runner._source_hash()
    monkeypatch.setattr(roma_peft, "__file__", str(copy / "__init__.py"))
    assert runner._source_hash() == original  # same files, same hash (paths are relative)
    for edited in (copy / "trainer.py", copy / "regularizers.py", copy / "benchmark" / "runner.py"):
        text = edited.read_text()
        edited.write_text(text + "\n# an edit\n")
        assert runner._source_hash() != original, f"an edit of {edited.name} did not change the source hash"
        edited.write_text(text)
    (copy / "notes.txt").write_text("not code")
    assert runner._source_hash() == original
