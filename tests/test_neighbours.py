import logging

import numpy as np
import pytest
import torch

from roma_peft.embeddings import DEFAULT_EMBEDDING_MODEL, embed_samples, load_embedding_model
from roma_peft.neighbours import Neighbourhood, NeighbourhoodConfig, build_neighbourhood
from roma_peft.scoring import ScoreResult

N, DIM, D = 40, 6, 5


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    samples = [{"id": f"x{i}", "question": f"question {i}", "options": ["a", "b"], "label": 0}
               for i in range(N)]
    emb = rng.standard_normal((N, DIM)).astype(np.float32)
    ok = rng.random(N) < 0.5
    ok[:2] = True
    routing = torch.randn(N, D)
    return samples, emb, ok, routing


def brute_knn(emb, ok, i, k):
    d = np.linalg.norm(emb - emb[i], axis=1)
    cand = [j for j in np.argsort(d, kind="stable") if ok[j] and j != i]
    return cand[:k], d


def test_knn_matches_brute_force_and_gaussian_weights(data):
    samples, emb, ok, routing = data
    nb = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(k=3, sigma=1.3), routing=routing,
                             progress=False)
    assert nb.neighbour_index.dtype == torch.int64 and nb.weights.dtype == torch.float32
    assert nb.neighbour_index.shape == (N, 3)
    for i in range(N):  # every training sample, in S or not, gets k neighbours from S \ {i}
        want, d = brute_knn(emb, ok, i, 3)
        got = nb.neighbour_index[i].tolist()
        assert got == want
        sim = np.exp(-d[want] ** 2 / (2 * 1.3 ** 2))
        np.testing.assert_allclose(nb.weights[i].numpy(), sim / sim.sum(), rtol=1e-5)
    assert nb.sigma == 1.3


def test_sigma_from_data_is_median_knn_distance(data):
    samples, emb, ok, _ = data
    nb = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(k=3), progress=False)
    dists = [brute_knn(emb, ok, i, 3)[1][brute_knn(emb, ok, i, 3)[0]] for i in range(N)]
    assert nb.sigma == pytest.approx(float(np.median(np.concatenate(dists))), rel=1e-5)


def test_eps_ball_and_empty_neighbourhood(data, caplog):
    samples, emb, ok, routing = data
    emb = emb.copy()
    emb[5] += 100.0  # an outlier: its eps-ball is empty
    cfg = NeighbourhoodConfig(method="eps", eps=0.5, sigma=1.5)
    with caplog.at_level(logging.WARNING):
        nb = build_neighbourhood(samples, ok, emb, cfg, routing=routing, progress=False)
    assert "x5" in nb.empty_ids and "x5" in nb.metadata["empty_ids"] and "no successful neighbour" in caplog.text
    assert torch.isfinite(nb.weights).all()
    assert nb.weights[5].sum() == 0 and not nb.mask[5].any()
    t, w, m = nb.lookup(torch.tensor([5]))
    assert (t == 0).all() and (w == 0).all() and not m.any()
    for i in range(N):
        d = np.linalg.norm(emb - emb[i], axis=1)
        sim = np.exp(-d ** 2 / (2 * 1.5 ** 2))
        want = {j for j in range(N) if ok[j] and j != i and sim[j] >= 0.5}
        got = {j for j in nb.neighbour_index[i].tolist() if j >= 0}
        assert got == want
        if got:
            assert nb.weights[i].sum().item() == pytest.approx(1.0, abs=1e-6)


def test_random_control(data):
    samples, emb, ok, _ = data
    a = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(method="random", seed=1), progress=False)
    b = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(method="random", seed=1), progress=False)
    c = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(method="random", seed=2), progress=False)
    knn = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(), progress=False)
    assert torch.equal(a.neighbour_index, b.neighbour_index)
    assert not torch.equal(a.neighbour_index, c.neighbour_index)
    assert not torch.equal(a.neighbour_index, knn.neighbour_index)
    for i, row in enumerate(a.neighbour_index.tolist()):
        assert len(set(row)) == 3 and i not in row and all(ok[j] for j in row)
    torch.testing.assert_close(a.weights.sum(1), torch.ones(N))


def test_lookup_returns_routing_rows(data):
    samples, emb, ok, routing = data
    nb = build_neighbourhood(samples, ok, emb, routing=routing, progress=False)
    idx = nb.index_of(["x3", "x7"])
    t, w, m = nb.lookup(idx)
    assert t.shape == (2, 3, D) and w.shape == (2, 3) and m.all()
    torch.testing.assert_close(t[0], routing[nb.neighbour_index[3]])
    new = torch.randn(N, D)
    nb.set_routing(new, spec="refreshed")
    torch.testing.assert_close(nb.lookup(idx)[0][1], new[nb.neighbour_index[7]])
    assert nb.metadata["routing_spec"] == "refreshed"
    with pytest.raises(ValueError, match="shape"):
        nb.set_routing(torch.randn(N + 1, D))
    with pytest.raises(ValueError, match="not in this neighbourhood"):
        nb.index_of(["nope"])


def test_accepts_score_result_and_id_set(data):
    samples, emb, ok, _ = data
    ids = [s["id"] for s in samples]
    res = ScoreResult(ids=ids[::-1], kind="multiple_choice", pred=[0] * N, pred_norm=[0] * N,
                      correct=list(ok[::-1]), correct_norm=[False] * N)
    a = build_neighbourhood(samples, res, emb, progress=False)
    b = build_neighbourhood(samples, {i for i, o in zip(ids, ok) if o}, emb, progress=False)
    assert torch.equal(a.neighbour_index, b.neighbour_index)
    assert a.successful.tolist() == ok.tolist()


def test_save_load_and_invalidation(tmp_path, data):
    samples, emb, ok, routing = data
    cfg = NeighbourhoodConfig(k=2)
    nb = build_neighbourhood(samples, ok, emb, cfg, routing=routing, routing_spec="layers=-2:,pos=last",
                             progress=False)
    nb.save(str(tmp_path))
    back = Neighbourhood.load(str(tmp_path), samples=samples, config=NeighbourhoodConfig(k=2))
    assert back.ids == nb.ids and back.sigma == nb.sigma
    for name in ("neighbour_index", "weights", "routing", "successful"):
        assert torch.equal(getattr(back, name), getattr(nb, name))
    assert back.metadata["embedding_model"] == DEFAULT_EMBEDDING_MODEL
    assert back.metadata["routing_spec"] == "layers=-2:,pos=last"
    changed = [dict(s) for s in samples]
    changed[4]["question"] = "something else"
    with pytest.raises(ValueError, match="stale neighbourhood.*different data"):
        Neighbourhood.load(str(tmp_path), samples=changed)
    with pytest.raises(ValueError, match=r"different config.*'k': \(2, 3\)"):
        Neighbourhood.load(str(tmp_path), config=NeighbourhoodConfig(k=3))
    with pytest.raises(ValueError, match="no saved neighbourhood"):
        Neighbourhood.load(str(tmp_path / "missing"))


def test_bad_input_errors(data):
    samples, emb, ok, _ = data
    with pytest.raises(ValueError, match="S is empty.*Check that the labels"):
        build_neighbourhood(samples, np.zeros(N, bool), emb, progress=False)
    few = np.zeros(N, bool)
    few[:3] = True
    with pytest.raises(ValueError, match=r"k=3 is larger than \|S\|-1=2"):
        build_neighbourhood(samples, few, emb, progress=False)
    with pytest.raises(ValueError, match=r"k=3 is larger than \|S\|-1=2"):
        build_neighbourhood(samples, few, emb, NeighbourhoodConfig(method="random"), progress=False)
    for eps in (0.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=r"eps must be in \(0, 1\]"):
            build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(method="eps", eps=eps), progress=False)
    for sigma in (0.0, -1.0):
        with pytest.raises(ValueError, match="sigma must be > 0"):
            build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(sigma=sigma), progress=False)
    with pytest.raises(ValueError, match="method must be"):
        build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(method="umap"), progress=False)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(k=0), progress=False)
    with pytest.raises(ValueError, match=r"embeddings must have shape \(N=40"):
        build_neighbourhood(samples, ok, emb[:-1], progress=False)
    with pytest.raises(ValueError, match="bool array"):
        build_neighbourhood(samples, ok[:-1], emb, progress=False)
    dup = samples + [dict(samples[0])]
    with pytest.raises(ValueError, match="duplicate id"):
        build_neighbourhood(dup, np.ones(N + 1, bool), np.zeros((N + 1, DIM)), progress=False)


def test_default_embedding_model_offline_embeds_question_not_options():
    samples = [
        {"question": "What colour is the sky?", "options": ["blue", "green"], "label": 0},
        {"question": "What colour is the sky?", "options": ["car", "house"], "label": 1},
        {"question": "How do I bake sourdough bread?", "options": ["blue", "green"], "label": 0},
    ]
    e = embed_samples(samples, progress=False)
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(e[0], e[1], atol=1e-5)  # options are not embedded
    assert e[0] @ e[2] < 0.5


def test_embedding_model_that_cannot_load_names_the_path(tmp_path):
    bad = tmp_path / "no_such_model"
    with pytest.raises(ValueError, match=f"tried '{bad}'"):
        load_embedding_model(str(bad))


# ------------------------------------------------------------------ approximate search (faiss HNSW)

def _needs_faiss():
    return pytest.importorskip(
        "faiss", reason="faiss not installed (optional extra [fast]: pip install faiss-cpu); "
                        "the approximate search_algorithm='hnsw' cannot be tested")


@pytest.fixture
def bigger():
    rng = np.random.default_rng(1)
    n, dim = 400, 16
    samples = [{"id": f"y{i}", "question": f"q {i}", "options": ["a", "b"], "label": 0} for i in range(n)]
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # unit vectors, like the sentence embeddings
    ok = rng.random(n) < 0.6
    return samples, emb, ok


def test_hnsw_matches_exact_knn_on_small_data(bigger):
    _needs_faiss()
    samples, emb, ok = bigger
    exact = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(k=3), progress=False)
    approx = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(k=3, search_algorithm="hnsw"),
                                 progress=False)
    e, a = exact.neighbour_index.numpy(), approx.neighbour_index.numpy()
    recall = np.mean([len(set(x) & set(y)) / 3 for x, y in zip(e, a)])
    assert recall >= 0.99
    same = (e == a).all(1)
    assert same.mean() >= 0.98
    torch.testing.assert_close(approx.weights[same], exact.weights[same], rtol=1e-4, atol=1e-6)
    assert approx.sigma == pytest.approx(exact.sigma, rel=1e-3)
    for i, row in enumerate(a):  # still: k distinct members of S, never the sample itself
        assert len(set(row)) == 3 and i not in row and all(ok[j] for j in row)
    assert approx.metadata["search"]["exact"] is False and approx.metadata["search"]["algorithm"] == "hnsw"
    assert exact.metadata["search"] == {"algorithm": "brute", "exact": True, "library": "scikit-learn"}


def test_hnsw_eps_ball_matches_exact(bigger):
    _needs_faiss()
    samples, emb, ok = bigger
    kw = {"method": "eps", "eps": 0.5, "sigma": 0.8, "max_neighbours": 400}
    exact = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(**kw), progress=False)
    approx = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(search_algorithm="hnsw", **kw),
                                 progress=False)
    got = [set(r[r >= 0].tolist()) for r in approx.neighbour_index.numpy()]
    want = [set(r[r >= 0].tolist()) for r in exact.neighbour_index.numpy()]
    assert sum(len(w) for w in want) > 0
    hit = sum(len(g & w) for g, w in zip(got, want)) / sum(len(w) for w in want)
    assert hit >= 0.99 and all(g <= w for g, w in zip(got, want))  # never a sample outside the ball


def test_approximate_search_is_part_of_the_config_hash(tmp_path, data):
    _needs_faiss()
    samples, emb, ok, _ = data
    brute, kd = NeighbourhoodConfig(), NeighbourhoodConfig(search_algorithm="kd_tree")
    hnsw = NeighbourhoodConfig(search_algorithm="hnsw")
    assert brute.hash() == kd.hash()  # exact algorithms are interchangeable
    assert hnsw.hash() != brute.hash()
    assert NeighbourhoodConfig(search_algorithm="hnsw", hnsw_ef_search=128).hash() != hnsw.hash()
    assert NeighbourhoodConfig(hnsw_ef_search=128).hash() == brute.hash()  # unused for exact search
    nb = build_neighbourhood(samples, ok, emb, hnsw, progress=False)
    assert nb.metadata["config_hash"] == hnsw.hash()
    nb.save(str(tmp_path))
    Neighbourhood.load(str(tmp_path), config=NeighbourhoodConfig(search_algorithm="hnsw"))
    with pytest.raises(ValueError, match=r"different config.*'search_algorithm': \('hnsw', 'brute'\)"):
        Neighbourhood.load(str(tmp_path), config=brute)


def test_hnsw_config_errors_and_missing_faiss(data, monkeypatch):
    samples, emb, ok, _ = data
    with pytest.raises(ValueError, match="unknown search_algorithm 'ivf'"):
        build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(search_algorithm="ivf"), progress=False)
    with pytest.raises(ValueError, match="hnsw_ef_search must be a positive integer"):
        build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(search_algorithm="hnsw", hnsw_ef_search=0),
                            progress=False)
    with pytest.raises(ValueError, match="needs max_neighbours"):
        build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(method="eps", search_algorithm="hnsw",
                                                                  max_neighbours=None), progress=False)
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(search_algorithm="hnsw"), progress=False)
