"""Approximate top-k for live sessions on large catalogues: a maximum-inner-product index of the output items.

A live click's exact top k reads every item's output vector (h·Wyᵀ + By over all n items: 400 MB of
float32 at a million items and 100 units, about 20 ms per click). The model's order is the order of
the logits o_i = h·Wy_i + By_i, an inner product of [h | 1] with [Wy_i | By_i]: the bias folded in as
one more dimension, so that maximum inner product search (MIPS) over the augmented item vectors ranks
as the model does. Two reductions of MIPS to a search faiss does (Johnson et al., "Billion-scale
similarity search with GPUs", 2019; the faiss-cpu package, the `index` extra):
- metric='euclidean': nearest neighbours after the transformation of Bachrach et al. (RecSys 2014,
  "Speeding up the Xbox recommender system using a Euclidean transformation for inner-product
  spaces"): with Φ = max_i ‖v_i‖², item v_i ↦ [v_i | sqrt(Φ − ‖v_i‖²)] and query q ↦ [q | 0] give
  ‖q − v_i‖² = ‖q‖² + Φ − 2 q·v_i, so the nearest items are those of largest inner product;
- metric='inner_product': the inner product as the similarity itself (Morozov & Babenko, NeurIPS
  2018, "Non-metric similarity graphs for maximum inner product search").
and two index structures: IVF, an inverted file (Jégou et al., TPAMI 2011, "Product quantization for
nearest neighbor search", its IVF without quantization): k-means cells of the items, a query scans
the items of its n_probe nearest cells; and HNSW (Malkov & Yashunin, TPAMI 2020, "Efficient and
robust approximate nearest neighbor search using hierarchical navigable small world graphs"), a graph
searched greedily. benchmarks/catalog_scale.py measured them (benchmarks/README.md): on trained
models IVF with the Euclidean reduction found the most of the exact top 20 per millisecond, and
built in seconds where HNSW took minutes, and HNSW's recall stopped growing with its search effort
(a query's greedy walk ends in the wrong region); IVF is the default.

The index only proposes `candidates` items; live.py rescores them exactly with the model's logits, so
the order among the returned items and their logits are the model's own, and only an item the search
missed can differ from the exact top k.

An index is built from a network's output weights and can be saved to a file (written atomically)
with a fingerprint of what it was built from: the model's lineage, a digest of Wy and By, and the
index's structural hyper-parameters. A saved index is used only when its fingerprint matches;
otherwise it is built again (and the file rewritten).
"""
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

from atomicfile import write_atomically

METRICS = ('euclidean', 'inner_product')
MAGIC = b'GRU4REC-ITEMS\x00'
VERSION = 1


def require_faiss():
    """faiss, imported when an index is first used: serving without one does not need it."""
    try:
        import faiss
    except ImportError:
        raise ImportError('an approximate item index needs faiss: pip install faiss-cpu (or the gru4rec '
                          "package's `index` extra), or serve with index='exact'") from None
    return faiss


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f'{name}={value!r}: give a positive integer')
    return int(value)


class IndexSetting:
    """What the index settings share: their search-time values, fingerprint, build and load."""

    SEARCH_PARAMS = ()  # hyper-parameters used only when searching (an index built with others is the same)

    def get_params(self):
        return dict(self._params)

    def __repr__(self):
        return f'{type(self).__name__}({", ".join(f"{k}={v!r}" for k, v in self._params.items())})'

    def _store(self, metric, **params):
        if metric not in METRICS:
            raise ValueError(f'metric={metric!r}: give one of {METRICS}')
        self._params = {'metric': metric}
        for name, value in params.items():
            self._params[name] = None if value is None and name == 'n_lists' else _positive(name, value)
        self.__dict__.update(self._params)

    def fingerprint(self, lineage, Wy, By):
        """What an index of this setting built from these weights is recognised by."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(np.ascontiguousarray(Wy, dtype=np.float32).data)
        digest.update(np.ascontiguousarray(By, dtype=np.float32).data)
        structure = {k: v for k, v in self._params.items() if k not in self.SEARCH_PARAMS}
        return dict(structure, kind=type(self).__name__, lineage=lineage, weights=digest.hexdigest(),
                    shape=list(Wy.shape), radius=radius(Wy, By))

    def build(self, Wy, By, lineage=None):
        """The index of the items whose output rows are Wy (n x L) and biases By (n)."""
        faiss = require_faiss()
        vectors = augmented_items(Wy, By, self.metric)  # n x (L + 1) or n x (L + 2)
        metric = faiss.METRIC_L2 if self.metric == 'euclidean' else faiss.METRIC_INNER_PRODUCT
        return ItemIndex(self._build(faiss, vectors, metric), self, self.fingerprint(lineage, Wy, By))

    def load_or_build(self, path, Wy, By, lineage=None):
        """The index saved at `path` when it was built from these weights with this setting; else a
        new one, saved there (atomically). Returns (index, whether it was built)."""
        fingerprint = self.fingerprint(lineage, Wy, By)
        path = Path(path)
        if path.exists():
            saved = ItemIndex.load(path, self)
            if saved.fingerprint == fingerprint:
                return saved, False
        index = self.build(Wy, By, lineage)
        try:
            index.save(path)
        except OSError as e:  # e.g. a read-only model directory: serve, and build again next time
            warnings.warn(f'the item index is not saved: {e}', stacklevel=2)
        return index, True


class IVF(IndexSetting):
    """The hyper-parameters of an inverted-file index over a model's output items (this object is the
    setting; build() returns the built ItemIndex).

    n_lists: k-means cells (default 4 sqrt(n)); n_probe: the cells a query scans (recall vs time per
    query); candidates: how many items the search proposes for exact rescoring (at least k + the
    excluded history are always asked for); metric: 'euclidean' or 'inner_product' (see the module
    docstring). The scanned items are stored as they are (float32), so their distances are exact and
    candidates beyond k add nothing (an 8-bit scalar quantizer, a quarter of the bytes, was slower per
    click here). The defaults were measured in benchmarks/README.md ("Catalogues of a million items").
    """

    SEARCH_PARAMS = ('n_probe', 'candidates')

    def __init__(self, n_lists=None, n_probe=128, candidates=100, metric='euclidean'):
        self._store(metric, n_lists=n_lists, n_probe=n_probe, candidates=candidates)

    def _build(self, faiss, vectors, metric):
        n_lists = min(self.n_lists or int(4 * np.sqrt(len(vectors))), len(vectors))
        d = vectors.shape[1]
        coarse = faiss.IndexFlatL2(d) if metric == faiss.METRIC_L2 else faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(coarse, d, n_lists, metric)
        index.cp.min_points_per_centroid = 1  # a small catalogue has fewer than faiss's 39 per cell: no warning
        index.cp.max_points_per_centroid = 64  # k-means on a sample of 64 items per cell: seconds at 1M items
        index.train(vectors)
        index.add(vectors)
        return index

    def search_parameters(self, faiss, n):
        params = faiss.SearchParametersIVF()
        params.nprobe = self.n_probe
        return params


class HNSW(IndexSetting):
    """The hyper-parameters of an HNSW graph over a model's output items. M: graph neighbours per node;
    ef_construction: the candidate list while building; ef_search: the candidate list while searching;
    candidates, metric: as IVF's."""

    SEARCH_PARAMS = ('ef_search', 'candidates')

    def __init__(self, M=32, ef_construction=100, ef_search=160, candidates=100, metric='euclidean'):
        self._store(metric, M=M, ef_construction=ef_construction, ef_search=ef_search, candidates=candidates)

    def _build(self, faiss, vectors, metric):
        index = faiss.IndexHNSWFlat(vectors.shape[1], self.M, metric)
        index.hnsw.efConstruction = self.ef_construction
        index.add(vectors)
        return index

    def search_parameters(self, faiss, n):
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search, n)
        return params


def augmented_items(Wy, By, metric):
    """The items as vectors whose inner product with [h | 1] is the logit h·Wy_i + By_i (n x (L + 1));
    for the Euclidean reduction one more dimension, sqrt(max‖v‖² − ‖v_i‖²), puts them all at the
    same distance from the origin (n x (L + 2))."""
    items = np.zeros((len(Wy), Wy.shape[1] + 1 + (metric == 'euclidean')), dtype=np.float32)
    items[:, :Wy.shape[1]], items[:, Wy.shape[1]] = Wy, By
    if metric == 'euclidean':
        norms = np.einsum('ij,ij->i', items, items, dtype=np.float64)  # n
        items[:, -1] = np.sqrt(norms.max() - norms)
    return items


def radius(Wy, By):
    """The largest norm of the items' vectors [Wy_i | By_i], as a float that a JSON header keeps exactly."""
    return float(np.sqrt((np.einsum('ij,ij->i', Wy, Wy, dtype=np.float64) + By.astype(np.float64) ** 2).max()))


def queries(H, metric, radius):
    """The states H (M x L) as queries [h | 1] (M x (L + 1)); for the Euclidean reduction [h | 1 | 0]
    scaled to the items' radius: the order of the inner products does not change with a query's scale,
    and a query at the items' distance from the origin sees their differences, where one near the
    origin (a small state) sees every item at about the same distance."""
    q = np.zeros((len(H), H.shape[1] + 1 + (metric == 'euclidean')), dtype=np.float32)
    q[:, :H.shape[1]], q[:, H.shape[1]] = H, 1
    if metric == 'euclidean':
        q *= radius / np.linalg.norm(q, axis=1, keepdims=True)
    return q


class ItemIndex:
    """A built index of a model's output items; search(H, n) proposes n candidate items per state."""

    def __init__(self, index, setting, fingerprint):
        self.index, self.setting, self.fingerprint = index, setting, fingerprint
        self.n_items = index.ntotal
        self.radius = fingerprint.get('radius')  # None in a file of another kind, which never matches

    def search(self, H, n):
        """The indices of about the n items of largest logit for each state (M x L), nearest first:
        M x n, -1 where the search found fewer."""
        n = min(int(n), self.n_items)
        params = self.setting.search_parameters(require_faiss(), n)
        _, found = self.index.search(queries(H, self.setting.metric, self.radius), n, params=params)  # M x n
        return found

    def save(self, path):
        """Writes the index and its fingerprint to `path` (atomically)."""
        header = json.dumps(self.fingerprint, sort_keys=True).encode()
        payload = require_faiss().serialize_index(self.index)  # uint8 array

        def write(partial):
            with open(partial, 'wb') as f:
                f.write(MAGIC + VERSION.to_bytes(4, 'little') + len(header).to_bytes(8, 'little') + header)
                f.write(payload.data)
        write_atomically(path, write, action='save the item index')

    @classmethod
    def load(cls, path, setting):
        """An index saved by save(), searched with `setting`'s search-time values."""
        blob = Path(path).read_bytes()
        start = len(MAGIC) + 12
        if blob[:len(MAGIC)] != MAGIC or len(blob) < start:
            raise ValueError(f'{str(path)!r} is not a GRU4Rec item index (no {MAGIC!r} header): remove it '
                             'and it is built again')
        version = int.from_bytes(blob[len(MAGIC):len(MAGIC) + 4], 'little')
        if version != VERSION:
            raise ValueError(f'{str(path)!r} is an item index of format {version}, not {VERSION}: remove it '
                             'and it is built again')
        end = start + int.from_bytes(blob[len(MAGIC) + 4:start], 'little')
        try:
            fingerprint = json.loads(blob[start:end])
            index = require_faiss().deserialize_index(np.frombuffer(blob, dtype=np.uint8, offset=end))
        except (ValueError, RuntimeError) as e:  # faiss raises RuntimeError for a damaged payload
            raise ValueError(f'{str(path)!r} is a damaged item index ({e}): remove it and it is built again') from None
        if not isinstance(fingerprint, dict):
            raise ValueError(f'{str(path)!r} is a damaged item index (its header is not an object): remove it '
                             'and it is built again')
        return cls(index, setting, fingerprint)
