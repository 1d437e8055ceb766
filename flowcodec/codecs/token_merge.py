"""Token merging codec: compress token features ``(N, D)`` by merging similar tokens with
density-peaks clustering (DPC-KNN) and sending one entropy-coded latent per cluster.

:class:`TokenMergeCodec` (``"token-merge"``):

- **Clustering (DPC-KNN).** For each sample, every token gets a density from its
  ``neighbors`` nearest tokens (``exp(-mean d^2)``, distances scaled by ``1/sqrt(D)``) and
  a distance to the nearest denser token (the densest token takes its largest distance).
  The ``clusters`` tokens with the largest density x distance are the centres and every
  token joins its nearest centre. With ``keep_first`` token 0 (a class token) is a cluster
  of its own and the others form ``clusters - 1`` clusters. ``K = clusters`` is fixed per
  codec, that is per rate point.
- **Merging.** Each cluster's token is the mean of its members, weighted by
  ``exp(score)`` from a learned scorer when ``weighted`` (the scorer starts at zero: a
  plain mean).
- **Canonical labels.** Clusters are numbered by their first (lowest) position; cluster
  ``c`` travels in packet ``c % packets``.
- **Packets.** Packet ``p`` holds its clusters' member positions (the union of those
  positions by :func:`~flowcodec.codecs.positions.encode_positions`, then which of the
  packet's clusters each member belongs to by :func:`encode_assignment`) and the rANS
  payload of its clusters' latents under a factorized prior (an ``EntropyBottleneck``
  over the latent channels). A packet decodes on its own: a lost packet loses its
  clusters, whose positions get a learned fill, not the sample.
- **Restoration.** Each position gets its cluster's decoded hidden vector plus a learned
  embedding of the position, mapped back to width ``D``, so the tail sees ``N`` tokens in
  the order it expects.

The clustering is computed on detached features (it is a discrete choice); ``forward`` is
differentiable through the merge weights, the latent transform and the decoder. Its rate
estimate counts the clusters' latent bits plus the exact bits of the position and
assignment codes.

Example
-------
>>> import torch
>>> codec = TokenMergeCodec((17, 32), clusters=6, latent=8, packets=2).eval()
>>> out = codec(torch.randn(3, 17, 32))
>>> tuple(out.features.shape), tuple(codec.last_labels.shape)
((3, 17, 32), (3, 17))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from flowcodec.bitstream import Bitstream, BitstreamError
from flowcodec.codecs.base import CodecOutput, register_codec
from flowcodec.codecs.merge_codes import (
    assignment_bits,
    decode_assignment,
    decode_assignment_batch,
    decode_sizes,
    decode_sizes_batch,
    encode_assignment,
    encode_assignment_batch,
    encode_sizes,
    encode_sizes_batch,
    size_bits,
)
from flowcodec.codecs.positions import (
    decode_positions_batch,
    encode_positions_mask,
    position_bits,
)
from flowcodec.codecs.rans import frozen_tables
from flowcodec.codecs.token import TokenCodecBase, TokenDecoded, TokenSymbols
from flowcodec.errors import ConfigError

__all__ = ["TokenMergeCodec", "dpc_knn", "encode_assignment", "decode_assignment",
           "assignment_bits", "encode_sizes", "decode_sizes", "size_bits"]  # fmt: skip


# --- DPC-KNN -------------------------------------------------------------------------------
@torch.no_grad()
def dpc_knn(x: torch.Tensor, clusters: int, neighbors: int = 5) -> torch.Tensor:
    """Cluster each sample's tokens ``x`` ``(B, n, D)`` into ``clusters`` groups.

    Density-peaks clustering with a k-nearest-neighbour density: ``rho_i =
    exp(-mean_j d_ij^2)`` over the ``neighbors`` nearest tokens ``j``, ``delta_i`` = the
    distance to the nearest denser token (ties in density are broken by position, the
    lower first; the densest token takes its largest distance), centres = the
    ``clusters`` tokens with the largest ``rho * delta``, and every token joins its nearest
    centre. Distances are Euclidean over ``sqrt(D)``, in float64, computed pairwise (no
    matrix-product shortcut), so a sample's clusters do not depend on its batch.

    Returns int64 labels ``(B, n)``, numbered by each cluster's first position.
    """
    b, n, d = x.shape
    if not 1 <= clusters <= n:
        raise ConfigError(f"clusters must be in 1..{n}, got {clusters}")
    xd = x.detach().double()
    dist = torch.cdist(xd, xd, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(d)
    kn = min(int(neighbors), n - 1)
    if kn > 0:
        near = dist.topk(kn + 1, dim=-1, largest=False).values[..., 1:]
        density = torch.exp(-near.pow(2).mean(-1))
    else:
        density = torch.ones(b, n, dtype=xd.dtype, device=xd.device)
    order = torch.argsort(density, dim=1, descending=True, stable=True)
    ar = torch.arange(n, device=xd.device).expand(b, n)
    rank = torch.empty_like(order).scatter_(1, order, ar)
    denser = rank[:, None, :] < rank[:, :, None]  # [b, i, j]: j is denser than i
    delta = torch.where(denser, dist, torch.full_like(dist, math.inf)).amin(-1)
    delta = torch.where(torch.isinf(delta), dist.amax(-1), delta)
    score = density * delta
    centres = torch.argsort(score, dim=1, descending=True, stable=True)[:, :clusters]
    to_c = dist.gather(2, centres[:, None, :].expand(b, n, clusters))
    lab = to_c.argmin(-1)
    lab.scatter_(1, centres, torch.arange(clusters, device=xd.device).expand(b, clusters))
    first = torch.full((b, clusters), n, dtype=torch.int64, device=xd.device)
    first.scatter_reduce_(1, lab, ar, reduce="amin")
    inv = torch.argsort(torch.argsort(first, dim=1), dim=1)
    return inv.gather(1, lab)


# --- the codec -----------------------------------------------------------------------------
class _MergeEncoder(nn.Module):
    """What the device runs: clustering, the weighted merge and the latent transform."""

    def __init__(self, codec: TokenMergeCodec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, h):
        merged, _ = self.codec._merge(self.codec._tokens(h))
        return self.codec.g_a(merged)


@register_codec("token-merge")
class TokenMergeCodec(TokenCodecBase):
    """DPC-KNN token merging with a factorized entropy model over the merged tokens.

    Inputs: ``h`` float ``(B, N, D)`` (or ``(B, H, W, C)``, taken as ``H * W`` tokens).
    ``forward`` returns a :class:`CodecOutput` (features of the input's shape, estimated
    bits ``(B,)``, likelihoods ``{"y": (B, latent, clusters)}``) and keeps the cluster
    labels ``(B, N)`` as ``codec.last_labels``. ``compress`` returns ``B`` streams of
    ``packets`` packets (after ``update()``); ``decompress`` returns float32 features with
    the positions of lost clusters replaced by the learned fill.

    Parameters
    ----------
    feature_shape : (N, D) or (H, W, C)
        Token features (layout ``"tokens"``) or a channels-last map (``"hwc"``).
    clusters : int
        ``K``, the number of merged tokens sent per sample (the rate point), class token
        included when ``keep_first``.
    neighbors : int
        ``k`` of the k-nearest-neighbour density.
    latent : int
        Latent values per merged token.
    hidden : int
        Width of the encoder's and decoder's hidden layers.
    packets : int
        Packets per sample (at most ``clusters``); cluster ``c`` travels in packet
        ``c % packets``.
    keep_first : bool
        Token 0 (a class token) is a cluster of its own.
    weighted : bool
        Merge with learned importance weights (else plain means).
    backend : {"auto", "compressai", "torch"}
        Entropy-model implementation (see :mod:`flowcodec.codecs.entropy`).
    prior : {"factorized", "hyperprior"}
        Entropy model of the merged tokens' latents. ``"hyperprior"`` adds a packet 0
        holding ``z`` (``hyper`` values from the mean and max of the cluster latents) that
        sets a per-channel Gaussian (mean, scale) for the cluster packets
        ``1..packets``; a lost ``z`` packet conceals the whole sample with the fill.
    hyper : int
        Side values ``z`` per sample (hyperprior only).
    order : {"positions", "sizes"}
        What the stream says about where the merged tokens go. ``"positions"`` (the
        default) codes each token's cluster, and the decoder puts every cluster's token
        back at its members' positions. ``"sizes"`` codes only each cluster's size (4
        bytes instead of about 21 for ``K = 8`` of 65 tokens), and the decoder lays the
        clusters out one after another, cluster ``c`` repeated ``size_c`` times (token 0
        stays first with ``keep_first``): only for a tail whose answer does not depend on
        the order of the tokens after the first, such as attention blocks with the
        position embedding added before the split and a class-token readout (the
        ``cifar10-vit`` family). For such a tail, attention over the repeated tokens is
        attention over the ``K`` merged tokens weighted by their sizes.
    coder : {None, "rans", "arith"}
        How the merged tokens' latents are coded (see :class:`TokenPruneCodec`).
    """

    def __init__(self, feature_shape: Sequence[int], clusters: int = 8, neighbors: int = 5,
                 latent: int = 16, hidden: int = 64, packets: int = 2, keep_first: bool = True,
                 weighted: bool = True, backend: str = "auto", prior: str = "factorized",
                 hyper: int = 8, order: str = "positions",
                 coder: str | None = None) -> None:  # fmt: skip
        super().__init__(feature_shape)
        self._init_tokens("token-merge")
        n = self.n_tokens
        lo = 2 if keep_first else 1
        if keep_first and n < 2:
            raise ConfigError("keep_first needs at least 2 tokens")
        if not isinstance(clusters, int) or not lo <= clusters <= n:
            raise ConfigError(f"clusters must be an int in {lo}..{n}, got {clusters!r}")
        if not isinstance(neighbors, int) or neighbors < 1:
            raise ConfigError(f"neighbors must be a positive int, got {neighbors!r}")
        if latent < 1 or hidden < 1:
            raise ConfigError("latent and hidden must be positive")
        if not 1 <= packets <= clusters:
            raise ConfigError(f"packets must be in 1..{clusters} (clusters), got {packets}")
        if order not in ("positions", "sizes"):
            raise ConfigError(f"order must be 'positions' or 'sizes', got {order!r}")
        self.order = order
        self.clusters, self.neighbors = int(clusters), int(neighbors)
        self.latent, self.hidden, self.packets = int(latent), int(hidden), int(packets)
        self.keep_first, self.weighted, self.backend = bool(keep_first), bool(weighted), backend
        d = self.width
        self.scorer = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))
        nn.init.zeros_(self.scorer[1].weight)
        nn.init.zeros_(self.scorer[1].bias)
        self._init_transforms(self.latent, hidden, backend, prior, hyper, coder)

    def config(self) -> dict:
        return {**super().config(), "clusters": self.clusters, "neighbors": self.neighbors,
                "latent": self.latent, "hidden": self.hidden, "packets": self.packets,
                "keep_first": self.keep_first, "weighted": self.weighted,
                **({"first_alone": True} if self.keep_first else {}),
                **({"order": "sizes"} if self.order == "sizes" else {}),
                **self._prior_config()}  # fmt: skip

    @property
    def encoder(self) -> nn.Module:
        return _MergeEncoder(self)

    # --- pieces ----------------------------------------------------------------------------
    def cluster(self, t: torch.Tensor) -> torch.Tensor:
        """Canonical cluster labels ``(B, N)`` of tokens ``t`` ``(B, N, D)``."""
        if not self.keep_first:
            return dpc_knn(t, self.clusters, self.neighbors)
        rest = dpc_knn(t[:, 1:], self.clusters - 1, self.neighbors) + 1
        return torch.cat([torch.zeros_like(rest[:, :1]), rest], 1)

    def _merge(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(merged (B, K, D), labels (B, N))``: each cluster's (weighted) mean token."""
        lab = self.cluster(t)
        a = nn.functional.one_hot(lab, self.clusters).to(t.dtype)  # (B, N, K)
        if self.weighted:
            w = torch.exp(self.scorer(t).squeeze(-1).clamp(-20.0, 20.0))
            a = a * w[..., None]
        merged = torch.einsum("bnk,bnd->bkd", a, t) / a.sum(1)[..., None]
        return merged, lab

    def _restore(self, y_hat: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, K, M)`` and each output token's cluster ``(B, N)`` -> tokens
        ``(B, N, D)`` (with the position embedding when the order is ``"positions"``)."""
        hid = self.g_s_in(y_hat)
        per_pos = hid.gather(1, lab[..., None].expand(-1, -1, hid.shape[-1]))
        return self.g_s_out(per_pos + self.pos if self.order == "positions" else per_pos)

    def _slots(self, lab: torch.Tensor, lost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``order="sizes"``: each output slot's cluster and whether it is lost, from the
        labels ``(B, N)`` and the lost clusters ``(B, K)``. The received clusters come
        first, in cluster order, each repeated by its size, then the lost ones' slots;
        with ``keep_first`` slot 0 is cluster 0 (received or not), as in the decoder."""
        k = self.clusters
        key = lab + k * lost.gather(1, lab).long()
        if self.keep_first:
            key[:, 0] = -1
        key = key.sort(dim=1).values
        slot_lost = key >= k
        if self.keep_first:
            slot_lost[:, 0] = lost[:, 0]
        return key.clamp(min=0) % k, slot_lost

    def _cluster_ids(self, p: int) -> range:
        return range(p, self.clusters, self.packets)

    def _first_alone(self, p: int) -> bool:
        """Packet ``p`` holds cluster 0, which is token 0 alone (``keep_first``): its
        assignment code covers only the other members and clusters."""
        return self.keep_first and p == 0

    def _size_args(self, p: int) -> tuple[list[int], int | None, int | None]:
        """``order="sizes"``: packet ``p``'s clusters that its size code covers, and the
        total (known when there is one packet) or its bound."""
        ids = list(self._cluster_ids(p))[1 if self._first_alone(p) else 0:]
        if self.packets == 1:
            return ids, self.n_tokens - int(self.keep_first), None
        return ids, None, self.n_tokens

    def _side_bits(self, lab: torch.Tensor) -> torch.Tensor:
        """Exact bits of the position and assignment (or size) codes, per sample."""
        out = torch.zeros(lab.shape[0])
        if self.order == "sizes":
            for b in range(lab.shape[0]):
                counts = torch.bincount(lab[b].cpu(), minlength=self.clusters).tolist()
                for p in range(self.packets):
                    ids, m, n = self._size_args(p)
                    if ids:
                        sz = [counts[c] for c in ids]
                        out[b] += 8 * -(-size_bits(sum(sz), len(sz), n) // 8)
            return out
        pk = lab.cpu() % self.packets
        for b in range(lab.shape[0]):
            counts = torch.bincount(pk[b], minlength=self.packets).tolist()
            for p, m in enumerate(counts):
                k = len(self._cluster_ids(p))
                mm, kk = (m - 1, k - 1) if self._first_alone(p) else (m, k)
                out[b] += 8 * (-(-position_bits(m, self.n_tokens) // 8)
                               - (-assignment_bits(mm, kk) // 8 if kk else 0))  # fmt: skip
        return out

    # --- the three calls -------------------------------------------------------------------
    def forward(self, h: torch.Tensor, drop_prob: float = 0.0, flip_prob: float = 0.0,
                generator: torch.Generator | None = None) -> CodecOutput:  # fmt: skip
        self.check_features(h)
        t = self._tokens(h)
        merged, lab = self._merge(t)
        every = torch.ones(len(h), self.clusters, device=h.device)
        y_hat, lik, z_bits, extra = self._latent_forward(self.g_a(merged).transpose(1, 2), every)
        bits = -torch.log2(lik).sum((1, 2)) + self._side_bits(lab).to(h.device) + z_bits
        if self.order == "sizes":
            lost = torch.zeros(len(h), self.clusters, dtype=torch.bool)
            if drop_prob > 0:
                pk = torch.rand(len(h), self.packets, generator=generator) < drop_prob
                lost = pk[:, torch.arange(self.clusters) % self.packets]
                if self._hyper:
                    lost = lost | (torch.rand(len(h), 1, generator=generator) < drop_prob)
            slot, slot_lost = self._slots(lab, lost.to(lab.device))
            rec = self._restore(y_hat.transpose(1, 2), slot)
            if drop_prob > 0:
                rec = torch.where(slot_lost[..., None], self.fill.to(rec.dtype), rec)
            self.last_labels = lab
            return CodecOutput(rec.reshape(h.shape), bits, {"y": lik, **extra})
        rec = self._restore(y_hat.transpose(1, 2), lab)
        if drop_prob > 0:
            lost = torch.rand(len(h), self.packets, generator=generator) < drop_prob
            lost_pos = lost.gather(1, lab.cpu() % self.packets)  # (B, N)
            if self._hyper:  # a lost z packet loses every cluster of the sample
                lost_pos = lost_pos | (torch.rand(len(h), 1, generator=generator) < drop_prob)
            rec = torch.where(lost_pos.to(h.device)[..., None], self.fill.to(rec.dtype), rec)
        self.last_labels = lab
        return CodecOutput(rec.reshape(h.shape), bits, {"y": lik, **extra})

    @torch.no_grad()
    def compress(self, h: torch.Tensor) -> list[Bitstream]:
        self.check_features(h)
        return self._code_symbols(self._analysis(h))

    @torch.no_grad()
    def _analysis(self, h: torch.Tensor) -> TokenSymbols:
        """The networks of :meth:`compress`: the clustering, the merge and the quantised
        latents of the merged tokens ``(B, M, K)``, with each token's cluster."""
        t = self._tokens(h.to(self._device()).float())
        merged, lab = self._merge(t)
        every = torch.ones(len(t), self.clusters, device=t.device)
        sym, cidx, zsym = self._quantise(self.g_a(merged).transpose(1, 2), every)
        return TokenSymbols(lab.cpu(), sym, cidx, zsym)

    def _code_symbols(self, s: TokenSymbols) -> list[Bitstream]:
        """The coding of :meth:`compress`: the streams of :meth:`_analysis`'s output (the
        position and assignment, or size, codes, the token payloads and the framing)."""
        lab, sym, cidx = s.where, s.sym, s.cidx
        zpk = self._code_z(s.zsym)
        model = self._y_model()
        tables = frozen_tables(model)
        header = self._header()
        ids = [list(self._cluster_ids(p)) for p in range(self.packets)]
        # the token payloads of every packet, for the whole batch at once: (B, k, M) each
        tok = [self._encode_tokens_batch(model, tables, sym[:, :, i].transpose(1, 2), cidx)
               for i in ids]  # fmt: skip
        if self.order == "sizes":  # every packet's size codes, for the whole batch at once
            sides = self._encode_size_codes(lab)
        else:  # every packet's position and assignment codes, for the whole batch at once
            sides = [self._encode_sides(lab, p, len(ids[p])) for p in range(self.packets)]
        out = []
        for b in range(len(sym)):
            packets = [] if zpk is None else [zpk[b]]
            for p in range(self.packets):
                packets.append(sides[p][b] + tok[p][b])
            out.append(Bitstream(header, packets))
        return out

    def _encode_size_codes(self, lab: torch.Tensor) -> list[list[bytes]]:
        """``order="sizes"``: every token packet's size codes for every sample of the labels
        ``lab`` ``(B, N)`` (per packet, per sample). A size code that the batch form refuses
        is coded again sample by sample, so the error is the first sample's, as before."""
        lab = lab.numpy()
        kk = self.clusters
        counts = np.bincount((lab + kk * np.arange(len(lab))[:, None]).ravel(),
                             minlength=kk * len(lab)).reshape(len(lab), kk)  # fmt: skip
        args = [self._size_args(p) for p in range(self.packets)]
        try:
            return [encode_sizes_batch(counts[:, cov], n) if cov else [b""] * len(counts)
                    for cov, _, n in args]  # fmt: skip
        except ConfigError:
            for b in range(len(counts)):  # raises for the first sample refused
                for cov, _, n in args:
                    if cov:
                        encode_sizes(counts[b, cov].tolist(), n)
            raise

    def _encode_sides(self, lab: torch.Tensor, p: int, k: int) -> list[bytes]:
        """Token packet ``p``'s position and assignment codes for every sample of the labels
        ``lab`` ``(B, N)`` (``k``: the packet's clusters)."""
        lab = lab.numpy()
        mask = lab % self.packets == p
        data = encode_positions_mask(mask)
        first = self._first_alone(p)
        if first:  # position 0 is cluster 0 by construction: code the rest
            if k == 1:
                return data
            mask[:, 0] = False
            k = k - 1
        cut = np.cumsum(mask.sum(1))[:-1]
        local = np.split(lab[mask] // self.packets - int(first), cut)  # canonical in the packet
        return [a + b for a, b in zip(data, encode_assignment_batch(local, k))]

    def _decode_sizes(self, streams, tables, cidx, have_z) -> tuple[torch.Tensor, torch.Tensor]:
        """``order="sizes"``: ``(symbols (B, K, M), each output slot's cluster (B, N), -1
        where none arrived)``. Each packet's size codes are read, then its token payloads
        for the whole batch at once (:meth:`_decode_tokens_batch`), then the slots are laid
        out with array operations: the symbols, slots and errors of reading the samples one
        by one."""
        n, kk, nb = self.n_tokens, self.clusters, len(streams)
        sym = torch.zeros(nb, kk, self.latent, dtype=torch.int32)
        sizes = np.zeros((nb, kk), dtype=np.int64)
        have = np.zeros((nb, kk), dtype=bool)  # the clusters received
        recv = self._received(streams, have_z)  # per packet: (sample, data, format)
        payloads = [[] for _ in range(self.packets)]
        for p in range(self.packets):  # the size codes, for the whole batch at once
            if not recv[p]:
                continue
            ids = list(self._cluster_ids(p))
            cov, m, bound = self._size_args(p)
            rows = [b for b, _, _ in recv[p]]
            datas = [data for _, data, _ in recv[p]]
            if cov:
                sz, used = decode_sizes_batch(datas, len(cov), m=m, n=bound)
                sizes[np.array(rows)[:, None], np.array(cov)[None, :]] = sz
            else:
                used = [0] * len(rows)
            if len(cov) < len(ids):  # cluster 0, the class token alone
                sizes[rows, 0] = 1
            have[np.array(rows)[:, None], np.array(ids)[None, :]] = True
            payloads[p] = [bytes(d[u:]) for d, u in zip(datas, used)]
        for p in range(self.packets):  # the token payloads
            if recv[p]:
                rows = torch.tensor([b for b, _, _ in recv[p]])
                ids = torch.tensor(list(self._cluster_ids(p)))
                sym[rows[:, None], ids[None, :]] = self._decode_tokens_batch(
                    tables, payloads[p], cidx[rows], len(ids), [f for _, _, f in recv[p]])
        got = np.where(have, sizes, 0)
        total = got.sum(1)
        bad = (total > n) | (have.all(1) & (total != n))
        if bad.any():
            b = int(np.flatnonzero(bad)[0])
            raise BitstreamError(f"token-merge cluster sizes add up to {total[b]}, not {n}")
        slot = np.full((nb, n), -1, dtype=np.int64)
        at = 0
        if self.keep_first:  # slot 0 is the class token's, received or not
            slot[:, 0] = np.where(have[:, 0], 0, -1)
            got[:, 0] = 0
            at = 1
        # every received cluster repeated by its size, in cluster order, from slot ``at``
        reps = got.sum(1)
        rows = np.repeat(np.arange(nb), reps)
        cols = at + np.arange(len(rows)) - np.repeat(np.cumsum(reps) - reps, reps)
        fill = np.repeat(np.tile(np.arange(kk), nb), got.reshape(-1))
        inside = cols < n  # (a lost class token leaves slots beyond the last unfilled)
        slot[rows[inside], cols[inside]] = fill[inside]
        return sym, torch.from_numpy(slot)

    def _read_sides_batch(self, p: int, datas: list) -> tuple[list, np.ndarray, list[int]]:
        """Token packet ``p``'s position and assignment codes of several samples (its token
        payloads follow them): ``(members per sample, their global labels (all samples' in
        one int64 array, in member order), bytes used per sample)``."""
        ids = np.asarray(self._cluster_ids(p))
        k = len(ids)
        members, used = decode_positions_batch(datas, self.n_tokens)
        first = self._first_alone(p)
        for mem in members:
            if len(mem) < k:
                raise BitstreamError(f"token-merge packet {p}: {len(mem)} positions for {k} "
                                     "clusters")  # fmt: skip
            if first and (mem[0] != 0 or (k == 1 and len(mem) != 1)):
                raise BitstreamError(f"token-merge packet {p}: the class token is not a "
                                     "cluster of its own")  # fmt: skip
        sizes = [len(m) - int(first) for m in members]  # the assignment codes' members
        if k > int(first):
            local, used2 = decode_assignment_batch(datas, sizes, k - int(first), start=used)
        else:  # the class token alone
            local, used2 = [[] for _ in datas], [0] * len(datas)
        flat = np.fromiter(itertools.chain.from_iterable(local), np.int64, sum(sizes))
        if first:  # cluster 0 first, the others one up
            flat = np.insert(flat + 1, np.cumsum(sizes) - sizes, 0)
        return members, ids[flat], [a + b for a, b in zip(used, used2)]

    @torch.no_grad()
    def decompress(self, streams: Sequence[Bitstream]) -> torch.Tensor:
        return self._synthesis(self._decode_symbols(streams))

    @torch.no_grad()
    def _decode_symbols(self, streams: Sequence[Bitstream]) -> TokenDecoded:
        """The coding of :meth:`decompress`: the streams checked and read back to the
        clusters' symbols ``(B, K, M)`` and each output position's cluster (with the
        hyperprior, ``h_s`` runs here: the token payloads are read with the scales it
        gives)."""
        self.check_streams(streams, self._nz + self.packets)
        tables = frozen_tables(self._y_model())
        centre, cidx, have_z = self._read_z(streams)
        if self.order == "sizes":
            return TokenDecoded(*self._decode_sizes(streams, tables, cidx, have_z), centre)
        n, kk = self.n_tokens, self.clusters
        sym = torch.zeros(len(streams), kk, self.latent, dtype=torch.int32)
        lab = np.full((len(streams), n), -1, dtype=np.int64)
        # the side codes of every received packet, then each packet's token payloads for
        # the whole batch at once
        got = [[] for _ in range(self.packets)]  # per packet: (sample, data)
        sides = [None] * self.packets  # per packet: (samples, members, labels)
        payloads = [[] for _ in range(self.packets)]
        fmts = [[] for _ in range(self.packets)]
        for p, recv in enumerate(self._received(streams, have_z)):  # lost: the fill
            got[p] = [(b, data) for b, data, _ in recv]
            fmts[p] = [fmt for _, _, fmt in recv]
        for p in range(self.packets):
            if got[p]:
                datas = [d for _, d in got[p]]
                members, glob, start = self._read_sides_batch(p, datas)
                sides[p] = ([b for b, _ in got[p]], members, glob)
                payloads[p] = [bytes(d[i:]) for d, i in zip(datas, start)]
        for p in range(self.packets):
            if not sides[p]:
                continue
            ids = list(self._cluster_ids(p))
            at, members, glob = sides[p]
            psym = self._decode_tokens_batch(tables, payloads[p], cidx[at], len(ids), fmts[p])
            sym[torch.tensor(at)[:, None], torch.tensor(ids)[None, :]] = psym
            rows = np.repeat(at, [len(m) for m in members])
            cols = np.fromiter(itertools.chain.from_iterable(members), np.int64, len(rows))
            if (lab[rows, cols] >= 0).any():
                raise BitstreamError(f"token-merge packet {p} names positions that another "
                                     "packet holds")  # fmt: skip
            lab[rows, cols] = glob
        lab = torch.from_numpy(lab)
        nz, hz = self._nz, have_z.tolist()
        whole = [b for b, s in enumerate(streams)
                 if hz[b] and all(d is not None for d in s.packets[nz:])]  # fmt: skip
        self._check_canonical_rows(lab[whole])
        return TokenDecoded(sym, lab, centre)

    @torch.no_grad()
    def _synthesis(self, d: TokenDecoded) -> torch.Tensor:
        """The networks of :meth:`decompress`: features from :meth:`_decode_symbols`."""
        dev = self._device()
        y_hat = d.sym.to(dev).float() + d.centre[:, None, :]
        return self._with_fill(self._restore(y_hat, d.where.clamp(min=0).to(dev)), d.where >= 0)

    def _check_canonical_rows(self, rows: torch.Tensor) -> None:
        """The labels of complete streams ``(C, N)``: each covers every position, with the
        clusters numbered by first position (and, with ``keep_first``, the class token in a
        cluster of its own); the first stream that fails raises, with the message of its
        first failure."""
        if not len(rows):
            return
        holes = (rows < 0).any(1)
        first = torch.full((len(rows), self.clusters), self.n_tokens, dtype=torch.int64)
        pos = torch.arange(self.n_tokens).expand_as(rows)
        first.scatter_reduce_(1, rows.clamp(min=0), pos, reduce="amin")
        unordered = ~(first[:, 1:] > first[:, :-1]).all(1)
        shared = ~(rows[:, 1:] != 0).all(1) if self.keep_first else torch.zeros_like(holes)
        bad = holes | unordered | shared
        if not bool(bad.any()):
            return
        b = int(bad.nonzero()[0, 0])
        if holes[b]:
            raise BitstreamError("token-merge stream leaves positions without a cluster")
        if unordered[b]:
            raise BitstreamError("token-merge clusters are not numbered by first position")
        raise BitstreamError("token-merge: the class token shares its cluster")
