"""Successful neighbourhoods: k-NN, eps-ball and random over S, Gaussian weights, lookup, persistence, errors."""

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
    samples = [{"id": f"x{i}", "question": f"question {i}", "options": ["a", "b"], "label": 0} for i in range(N)]
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
    """Every sample gets its k nearest members of S (itself excluded), weighted by the normalised Gaussian."""
    samples, emb, ok, routing = data
    nb = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(k=3, sigma=1.3), routing=routing, progress=False)
    assert nb.neighbour_index.dtype == torch.int64 and nb.weights.dtype == torch.float32
    assert nb.neighbour_index.shape == (N, 3)
    for i in range(N):  # every training sample, in S or not, gets k neighbours from S \ {i}
        want, d = brute_knn(emb, ok, i, 3)
        got = nb.neighbour_index[i].tolist()
        assert got == want
        sim = np.exp(-(d[want] ** 2) / (2 * 1.3**2))
        np.testing.assert_allclose(nb.weights[i].numpy(), sim / sim.sum(), rtol=1e-5)
    assert nb.sigma == 1.3


def test_sigma_from_data_is_median_knn_distance(data):
    """sigma=None is the median distance from each sample to its k nearest successful neighbours."""
    samples, emb, ok, _ = data
    nb = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(k=3), progress=False)
    dists = [brute_knn(emb, ok, i, 3)[1][brute_knn(emb, ok, i, 3)[0]] for i in range(N)]
    assert nb.sigma == pytest.approx(float(np.median(np.concatenate(dists))), rel=1e-5)


def _outlier_eps_ball(data):
    """An eps-ball neighbourhood where sample 5 is an outlier (its ball is empty), and the shifted embeddings."""
    samples, emb, ok, routing = data
    emb = emb.copy()
    emb[5] += 100.0
    cfg = NeighbourhoodConfig(method="eps", eps=0.5, sigma=1.5)
    return build_neighbourhood(samples, ok, emb, cfg, routing=routing, progress=False), emb


def test_empty_eps_ball_is_listed_and_warned(data, caplog):
    """A sample without any successful neighbour is named in empty_ids and in a warning."""
    with caplog.at_level(logging.WARNING):
        nb, _ = _outlier_eps_ball(data)
    assert "x5" in nb.empty_ids and "x5" in nb.metadata["empty_ids"] and "no successful neighbour" in caplog.text


def test_empty_eps_ball_has_zero_weights_and_lookup(data):
    """A sample without neighbours has weight 0, no mask and zero targets: no manifold term, never NaN."""
    nb, _ = _outlier_eps_ball(data)
    assert torch.isfinite(nb.weights).all()
    assert nb.weights[5].sum() == 0 and not nb.mask[5].any()
    t, w, m = nb.lookup(torch.tensor([5]))
    assert (t == 0).all() and (w == 0).all() and not m.any()


def test_eps_ball_holds_every_member_of_s_above_eps(data):
    """N(i) is exactly the members of S (not i) with Gaussian similarity >= eps; weights sum to 1."""
    samples, _, ok, _ = data
    nb, emb = _outlier_eps_ball(data)
    for i in range(N):
        d = np.linalg.norm(emb - emb[i], axis=1)
        sim = np.exp(-(d**2) / (2 * 1.5**2))
        want = {j for j in range(N) if ok[j] and j != i and sim[j] >= 0.5}
        got = {j for j in nb.neighbour_index[i].tolist() if j >= 0}
        assert got == want
        if got:
            assert nb.weights[i].sum().item() == pytest.approx(1.0, abs=1e-6)


def _random_method(data, seed):
    samples, emb, ok, _ = data
    return build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(method="random", seed=seed), progress=False)


def test_random_method_is_a_seeded_draw(data):
    """method="random" gives the same neighbours for a seed, others for another seed, and not the k-NN ones."""
    samples, emb, ok, _ = data
    a, b, c = _random_method(data, 1), _random_method(data, 1), _random_method(data, 2)
    knn = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(), progress=False)
    assert torch.equal(a.neighbour_index, b.neighbour_index)
    assert not torch.equal(a.neighbour_index, c.neighbour_index)
    assert not torch.equal(a.neighbour_index, knn.neighbour_index)


def test_random_method_draws_k_distinct_members_of_s(data):
    """Each sample gets k distinct successful samples other than itself, weights summing to 1."""
    ok = data[2]
    a = _random_method(data, 1)
    for i, row in enumerate(a.neighbour_index.tolist()):
        assert len(set(row)) == 3 and i not in row and all(ok[j] for j in row)
    torch.testing.assert_close(a.weights.sum(1), torch.ones(N))


@pytest.fixture
def knn_with_routing(data):
    samples, emb, ok, routing = data
    return build_neighbourhood(samples, ok, emb, routing=routing, progress=False), routing


def test_lookup_returns_the_neighbours_routing_rows(knn_with_routing):
    """lookup(index_of(ids)) gives (B, k, D) targets: the stored routing rows of each sample's neighbours."""
    nb, routing = knn_with_routing
    t, w, m = nb.lookup(nb.index_of(["x3", "x7"]))
    assert t.shape == (2, 3, D) and w.shape == (2, 3) and m.all()
    torch.testing.assert_close(t[0], routing[nb.neighbour_index[3]])


def test_set_routing_replaces_the_targets(knn_with_routing):
    """set_routing swaps in refreshed routing vectors and records their spec."""
    nb, _ = knn_with_routing
    new = torch.randn(N, D)
    nb.set_routing(new, spec="refreshed")
    torch.testing.assert_close(nb.lookup(nb.index_of(["x7"]))[0][0], new[nb.neighbour_index[7]])
    assert nb.metadata["routing_spec"] == "refreshed"


def test_set_routing_refuses_another_row_count(knn_with_routing):
    """Routing for another number of samples is refused naming the shape."""
    with pytest.raises(ValueError, match="shape"):
        knn_with_routing[0].set_routing(torch.randn(N + 1, D))


def test_index_of_an_unknown_id_is_refused(knn_with_routing):
    """A sample id that is not in the neighbourhood raises a clear error."""
    with pytest.raises(ValueError, match="not in this neighbourhood"):
        knn_with_routing[0].index_of(["nope"])


def test_accepts_score_result_and_id_set(data):
    """S can be given as a ScoreResult (any row order) or a set of ids: the same neighbourhood."""
    samples, emb, ok, _ = data
    ids = [s["id"] for s in samples]
    res = ScoreResult(
        ids=ids[::-1],
        kind="multiple_choice",
        pred=[0] * N,
        pred_norm=[0] * N,
        correct=list(ok[::-1]),
        correct_norm=[False] * N,
    )
    a = build_neighbourhood(samples, res, emb, progress=False)
    b = build_neighbourhood(samples, {i for i, o in zip(ids, ok) if o}, emb, progress=False)
    assert torch.equal(a.neighbour_index, b.neighbour_index)
    assert a.successful.tolist() == ok.tolist()


@pytest.fixture
def saved(tmp_path, data):
    """A k=2 neighbourhood with routing saved to tmp_path: (nb, samples)."""
    samples, emb, ok, routing = data
    nb = build_neighbourhood(
        samples, ok, emb, NeighbourhoodConfig(k=2), routing=routing, routing_spec="layers=-2:,pos=last", progress=False
    )
    nb.save(str(tmp_path))
    return nb, samples


def test_save_and_load_round_trip(tmp_path, saved):
    """load() gives back every tensor, sigma, the embedding model and the routing spec."""
    nb, samples = saved
    back = Neighbourhood.load(str(tmp_path), samples=samples, config=NeighbourhoodConfig(k=2))
    assert back.ids == nb.ids and back.sigma == nb.sigma
    for name in ("neighbour_index", "weights", "routing", "successful"):
        assert torch.equal(getattr(back, name), getattr(nb, name))
    assert back.metadata["embedding_model"] == DEFAULT_EMBEDDING_MODEL
    assert back.metadata["routing_spec"] == "layers=-2:,pos=last"


def test_load_refuses_other_data(tmp_path, saved):
    """A neighbourhood built for other questions is refused as stale."""
    changed = [dict(s) for s in saved[1]]
    changed[4]["question"] = "something else"
    with pytest.raises(ValueError, match="stale neighbourhood.*different data"):
        Neighbourhood.load(str(tmp_path), samples=changed)


def test_load_refuses_another_config_naming_the_field(tmp_path, saved):
    """A neighbourhood built with k=2 asked for with k=3 names the changed field."""
    with pytest.raises(ValueError, match=r"different config.*'k': \(2, 3\)"):
        Neighbourhood.load(str(tmp_path), config=NeighbourhoodConfig(k=3))


def test_load_of_a_missing_folder_says_so(tmp_path):
    """Loading from a folder without a neighbourhood says there is none."""
    with pytest.raises(ValueError, match="no saved neighbourhood"):
        Neighbourhood.load(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="eps", eps=0.0), r"eps must be in \(0, 1\]"),
        (dict(method="eps", eps=-0.2), r"eps must be in \(0, 1\]"),
        (dict(method="eps", eps=1.5), r"eps must be in \(0, 1\]"),
        (dict(sigma=0.0), "sigma must be > 0"),
        (dict(sigma=-1.0), "sigma must be > 0"),
        (dict(method="umap"), "method must be"),
        (dict(k=0), "k must be a positive integer"),
        (dict(search_algorithm="ivf"), "unknown search_algorithm 'ivf'"),
        (dict(search_algorithm="hnsw", hnsw_ef_search=0), "hnsw_ef_search must be a positive integer"),
        (dict(method="eps", search_algorithm="hnsw", max_neighbours=None), "needs max_neighbours"),
    ],
)
def test_bad_config_fails_when_built(kwargs, message):
    """Each invalid NeighbourhoodConfig value raises a ValueError naming it when the config is created."""
    with pytest.raises(ValueError, match=message):
        NeighbourhoodConfig(**kwargs)


def test_config_changed_after_creation_is_checked_by_build(data):
    """A config made invalid after creation is still refused by build_neighbourhood."""
    samples, emb, ok, _ = data
    config = NeighbourhoodConfig()
    config.k = 0
    with pytest.raises(ValueError, match="k must be a positive integer"):
        build_neighbourhood(samples, ok, emb, config, progress=False)


def test_empty_successful_set_is_refused_with_advice(data):
    """No correct base answer: S is empty, and the error lists what to check."""
    samples, emb, _, _ = data
    with pytest.raises(ValueError, match="S is empty.*Check that the labels"):
        build_neighbourhood(samples, np.zeros(N, bool), emb, progress=False)


@pytest.mark.parametrize("method", ["knn", "random"])
def test_k_larger_than_s_is_refused(data, method):
    """k must leave room in S for a sample that excludes itself."""
    samples, emb, _, _ = data
    few = np.zeros(N, bool)
    few[:3] = True
    with pytest.raises(ValueError, match=r"k=3 is larger than \|S\|-1=2"):
        build_neighbourhood(samples, few, emb, NeighbourhoodConfig(method=method), progress=False)


def test_embeddings_of_another_length_are_refused(data):
    """Embeddings must have one row per sample."""
    samples, emb, ok, _ = data
    with pytest.raises(ValueError, match=r"embeddings must have shape \(N=40"):
        build_neighbourhood(samples, ok, emb[:-1], progress=False)


def test_correct_mask_of_another_length_is_refused(data):
    """A bool success mask must have one entry per sample."""
    samples, emb, ok, _ = data
    with pytest.raises(ValueError, match="bool array"):
        build_neighbourhood(samples, ok[:-1], emb, progress=False)


def test_duplicate_sample_ids_are_refused(data):
    """Neighbourhoods refer to samples by id, so ids must be unique."""
    samples = data[0]
    dup = samples + [dict(samples[0])]
    with pytest.raises(ValueError, match="duplicate id"):
        build_neighbourhood(dup, np.ones(N + 1, bool), np.zeros((N + 1, DIM)), progress=False)


def test_default_embedding_model_offline_embeds_question_not_options():
    """The packaged embedding model works offline, gives unit vectors and embeds the question, not the options."""
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
    """An embedding model path that does not load is named in the error."""
    bad = tmp_path / "no_such_model"
    with pytest.raises(ValueError, match=f"tried '{bad}'"):
        load_embedding_model(str(bad))


# ------------------------------------------------------------------ approximate search (faiss HNSW)


def _needs_faiss():
    return pytest.importorskip(
        "faiss",
        reason="faiss not installed (optional extra [fast]: pip install faiss-cpu); "
        "the approximate search_algorithm='hnsw' cannot be tested",
    )


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
    """HNSW on 400 samples: recall >= 0.99, same weights where the neighbours agree, recorded as approximate."""
    _needs_faiss()
    samples, emb, ok = bigger
    exact = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(k=3), progress=False)
    approx = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(k=3, search_algorithm="hnsw"), progress=False)
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
    """The approximate eps-ball finds >= 99% of the exact ball and never a sample outside it."""
    _needs_faiss()
    samples, emb, ok = bigger
    kw = {"method": "eps", "eps": 0.5, "sigma": 0.8, "max_neighbours": 400}
    exact = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(**kw), progress=False)
    approx = build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(search_algorithm="hnsw", **kw), progress=False)
    got = [set(r[r >= 0].tolist()) for r in approx.neighbour_index.numpy()]
    want = [set(r[r >= 0].tolist()) for r in exact.neighbour_index.numpy()]
    assert sum(len(w) for w in want) > 0
    hit = sum(len(g & w) for g, w in zip(got, want)) / sum(len(w) for w in want)
    assert hit >= 0.99 and all(g <= w for g, w in zip(got, want))  # never a sample outside the ball


def test_approximate_search_is_part_of_the_config_hash(tmp_path, data):
    """Exact algorithms share a hash; an approximate one and its parameters change it, and load checks it."""
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


def test_hnsw_without_faiss_says_how_to_install_it(data, monkeypatch):
    """search_algorithm="hnsw" without faiss raises ImportError with the pip command."""
    samples, emb, ok, _ = data
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        build_neighbourhood(samples, ok, emb, NeighbourhoodConfig(search_algorithm="hnsw"), progress=False)
