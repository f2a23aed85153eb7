"""CLIS (Li et al., arXiv 2210.05568; no code released) on our DINO detector: ``METHODS.md`` §CLIS.

Components and where they live:

* **TSS** – the task-specialised classification sub-network ``H_cls`` between the decoder and the
  language classifier, shared by every decoder layer: ``model.head.task_head_dim`` (1024 for CLIS)
  builds :class:`~..model.dino.TaskHeadClassifier` as the detector's ``class_head``, so evaluation and
  export need no method code.
* **SS** – :class:`CLISBranch`, the detector's training-only ``branch``: one box-anchored *tile query*
  per classification tile (content = one learned vector, reference box = the tile's pre-defined
  region), classified by the *same* ``H_cls`` and classifier parameter objects (``siamese=False``: a
  deep copy of ``H_cls`` for tiles, the paper's "without SS" ablation).
* **CLR** – the branch also holds ``W`` (``H_cls`` width -> 128), the momentum copies of ``H_cls`` and
  ``W`` and the FIFO queue of keys; :class:`CLISCriterion` adds ``L_imcls`` and ``L_con``.

Tile queries are decoded in a second decoder pass over the same encoder memory, with a self-attention
mask that lets each tile query see only itself. That is the attention-masked extra query group of
METHODS.md: in the joint pass no other query may attend to a tile query and a tile query attends to
itself alone, so the matching queries' computation is the same with or without tiles (and a
self-attention over one key has weight 1, so the tile outputs are the same too). Running it apart
keeps the detection outputs bit-identical to the baseline's, which is what makes ``alpha = beta = 0``
with TSS off reproduce the baseline loss exactly. ``tests/test_clis.py`` checks the joint masked pass
against this one.

Targets (classification mosaics in a mixed batch; :mod:`.clis_data` adds them) may carry
``tile_boxes`` float ``(n, 4)`` cxcywh normalised (the query anchors) and ``tile_labels`` int64 ``(n,)``;
detection targets with pasted tile regions carry ``paste_tile`` int64 ``(n,)``: the index of the
source tile among the batch's tiles (image-major), -1 for ordinary boxes.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model.box_ops import inverse_sigmoid
from ..model.criterion import SetCriterion, sigmoid_focal_loss
from ..model.dino import DINO, TaskHeadClassifier


@dataclasses.dataclass
class CLISConfig:
    """``[clis]`` section of a training config (METHODS.md values; the paper's where it gives them).
    TSS is ``model.head.task_head_dim`` (1024; 0 = off)."""

    alpha: float = 0.1  # weight of L_imcls (siamese tile classification)
    beta: float = 0.05  # weight of L_con (0.1 diverged in the paper); 0 turns CLR off (no paste, no queue)
    tau: float = 0.2
    embed_dim: int = 128  # W: H_cls width -> embed_dim
    queue_size: int = 115_712
    momentum: float = 0.999  # key encoder EMA; not given in the paper (MoCo's value)
    siamese: bool = True  # False: tiles get a deep copy of H_cls ("without SS")
    paste_tiles: int = 2  # t: tile regions pasted into the step's detection images
    paste_scale: tuple[float, float] = (0.15, 0.5)  # pasted longer side / detection image shorter side
    regions: str = ""  # pre-defined regions file (lt-distill clis-regions); "" = whole-tile boxes
    mosaics_per_image: int = 1  # mosaics per detection image in a step (paper: 16 images per det image)
    mosaic_det_loss: bool = True  # tiles also stay coarse detection boxes (RichSem / our baseline)

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError("clis.alpha and clis.beta must be >= 0")
        if self.tau <= 0 or not 0 <= self.momentum < 1:
            raise ValueError("clis.tau must be > 0 and clis.momentum in [0, 1)")
        if self.embed_dim < 1 or self.queue_size < 0 or self.paste_tiles < 0 or self.mosaics_per_image < 1:
            raise ValueError("clis.embed_dim and mosaics_per_image must be >= 1, queue_size and paste_tiles >= 0")
        lo, hi = self.paste_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"clis.paste_scale must satisfy 0 < lo <= hi <= 1, got {self.paste_scale}")


def contrastive_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo-style InfoNCE, mean over pairs, in fp32:
    ``-log(exp(q.k/tau) / (exp(q.k/tau) + sum_j exp(q.n_j/tau)))``.

    query ``(N, E)`` (with gradient), key ``(N, E)`` and queue ``(K, E)`` unit rows (no gradient; they are
    detached here). N = 0 gives 0; K = 0 gives 0 (the positive is the only candidate).
    """
    if query.shape[0] == 0:
        return query.float().sum() * 0.0
    query = query.float()
    pos = (query * key.detach().float()).sum(-1, keepdim=True)
    neg = query @ queue.detach().float().t()
    logits = torch.cat([pos, neg], 1) / tau
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


def _mean_count(count: int, device: torch.device) -> float:
    """Per-rank mean of ``count`` over the process group (as the criterion's box count), at least 1."""
    num = torch.tensor([float(count)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        num = num / dist.get_world_size()
    return max(num.item(), 1.0)


class CLISBranch(nn.Module):
    """Training-only branch of the CLIS detector (``DINO(..., branch=CLISBranch(...))``).

    ``feat_dim``: width of ``H_cls``'s output (``task_head_dim``; the hidden size when TSS is off and
    ``H_cls`` is the identity). ``task_head``: the detector's ``H_cls`` (None when TSS is off), used to
    initialise the momentum copy (and the tile copy when ``siamese`` is False). The branch never keeps a
    reference to it: the detector passes itself at call time, so ``H_cls`` has one owner in the
    state_dict (``class_head.task_head``).

    Per call it returns ``{"tile_logits": [(B, E, C) per decoder layer], "tile_valid": (B, E) bool,
    "tile_labels": (B, E) int64 (-1 padding), "tile_embed": (B, E, embed_dim) fp32 unit rows f_i,
    "hidden": (B, Q, D) last-layer matching-query states, "keepalive": 0-valued scalar}``.
    """

    output_key = "clis"

    def __init__(self, hidden_dim: int, feat_dim: int, task_head: nn.Module | None, embed_dim: int = 128,
                 queue_size: int = 115_712, momentum: float = 0.999, siamese: bool = True):
        super().__init__()
        self.momentum = momentum
        self.siamese = siamese
        self.tile_content = nn.Parameter(torch.empty(hidden_dim))
        nn.init.normal_(self.tile_content)
        self.proj = nn.Linear(feat_dim, embed_dim)  # W, shared by the query and the key side (as a momentum copy)
        self.tile_task_head = copy.deepcopy(task_head) if (task_head is not None and not siamese) else None
        self.key_task_head = copy.deepcopy(task_head) if task_head is not None else nn.Identity()
        self.key_proj = copy.deepcopy(self.proj)
        for p in (*self.key_task_head.parameters(), *self.key_proj.parameters()):
            p.requires_grad_(False)
        self.register_buffer("queue", torch.zeros(queue_size, embed_dim))
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    # -- the shared sub-networks -------------------------------------------------------------------
    @staticmethod
    def _online_task_head(detector: DINO) -> nn.Module:
        head = detector.class_head
        return head.task_head if isinstance(head, TaskHeadClassifier) else nn.Identity()

    @staticmethod
    def _classifier(detector: DINO) -> nn.Module:
        head = detector.class_head
        return head.classifier if isinstance(head, TaskHeadClassifier) else head

    def tile_task_head_of(self, detector: DINO) -> nn.Module:
        """``H_cls`` the tiles go through: the detector's own (siamese) or the branch's copy."""
        return self.tile_task_head if self.tile_task_head is not None else self._online_task_head(detector)

    @torch.no_grad()
    def momentum_update(self, detector: DINO) -> None:
        """``key <- m * key + (1 - m) * online`` for the copies of ``H_cls`` and ``W`` (MoCo, per step)."""
        pairs = [(self.key_proj, self.proj), (self.key_task_head, self._online_task_head(detector))]
        for key, online in pairs:
            for pk, po in zip(key.parameters(), online.parameters()):
                pk.mul_(self.momentum).add_(po.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def keys(self, hidden: torch.Tensor) -> torch.Tensor:
        """``f_d = norm(W_k H_k(hs))``: ``(N, D)`` -> ``(N, embed_dim)`` fp32 unit rows, no gradient."""
        with torch.autocast(hidden.device.type, enabled=False):
            return F.normalize(self.key_proj(self.key_task_head(hidden.float())), dim=-1)

    # -- the queue ---------------------------------------------------------------------------------
    def queue_keys(self) -> torch.Tensor:
        """A copy of the filled part of the queue ``(K_filled, embed_dim)`` (order irrelevant to the loss):
        the loss's graph keeps it, and :meth:`enqueue` overwrites the buffer before the backward pass."""
        return self.queue[: int(self.queue_len)].clone()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """FIFO: write ``keys`` ``(N, embed_dim)`` over the oldest entries (ring buffer). Per rank: the
        queue is never synchronised (each rank's keys are its own negatives)."""
        size = self.queue.shape[0]
        if size == 0 or keys.shape[0] == 0:
            return
        keys = keys.detach().to(self.queue.dtype)[-size:]
        idx = (int(self.queue_ptr) + torch.arange(len(keys), device=keys.device)) % size
        self.queue[idx] = keys
        self.queue_ptr.fill_((int(self.queue_ptr) + len(keys)) % size)
        self.queue_len.fill_(min(size, int(self.queue_len) + len(keys)))

    # -- tile queries ------------------------------------------------------------------------------
    @staticmethod
    def tile_batch(targets: list[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pad the targets' tiles: boxes ``(B, E, 4)`` cxcywh (padding: a centred half-size box), labels
        ``(B, E)`` (-1 padding) and valid ``(B, E)`` bool; E = most tiles of an image (0 possible)."""
        counts = [len(t["tile_boxes"]) if "tile_boxes" in t else 0 for t in targets]
        e = max(counts, default=0)
        boxes = torch.full((len(targets), e, 4), 0.5, device=device)
        labels = torch.full((len(targets), e), -1, dtype=torch.long, device=device)
        valid = torch.zeros((len(targets), e), dtype=torch.bool, device=device)
        for i, (t, n) in enumerate(zip(targets, counts)):
            if n:
                boxes[i, :n] = t["tile_boxes"].to(device).float()
                labels[i, :n] = t["tile_labels"].to(device)
                valid[i, :n] = True
        return boxes, labels, valid

    def forward(self, detector: DINO, mem, targets: list[dict], hidden: list[torch.Tensor]) -> dict:
        """detector (for its decoder, ``H_cls`` and classifier), encoder memory, targets, per-layer
        hidden states of the matching queries ``(B, Q, D)``: see the class docstring."""
        if self.training:
            self.momentum_update(detector)
        device = hidden[-1].device
        boxes, labels, valid = self.tile_batch(targets, device)
        b, e = labels.shape
        keepalive = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        out = {"tile_logits": [], "tile_valid": valid, "tile_labels": labels, "hidden": hidden[-1],
               "tile_embed": hidden[-1].new_zeros(b, 0, self.proj.out_features).float(), "keepalive": keepalive}
        if e == 0:
            return out
        content = self.tile_content.to(hidden[-1].dtype)[None, None].expand(b, e, -1)
        # Each tile query sees only itself: True = may not attend.
        mask = ~torch.eye(e, dtype=torch.bool, device=device)
        tile_hidden, _ = detector.transformer.decoder(content, inverse_sigmoid(boxes), mem, mask)
        head, classifier = self.tile_task_head_of(detector), self._classifier(detector)
        feats = [head(h) for h in tile_hidden]
        out["tile_logits"] = [classifier(f, detector.text_embeddings) for f in feats]
        with torch.autocast(device.type, enabled=False):  # L_con in fp32
            out["tile_embed"] = F.normalize(self.proj(feats[-1].float()), dim=-1)
        return out


class CLISCriterion(nn.Module):
    """``L = L_det + alpha * L_imcls + beta * L_con`` (METHODS.md), named terms weighted in one place.

    ``base``: the detector's :class:`SetCriterion` (``L_det``; pasted regions carry ``box_mask`` False
    so they get the class loss only). ``branch``: the model's :class:`CLISBranch` (for the key encoder
    and queue; held as a plain reference, not a submodule, because its state belongs to the model's
    state_dict and checkpoints). Terms: ``loss_imcls`` (last layer), ``loss_imcls_0`` .. (earlier
    layers), ``loss_con`` (last layer only)."""

    def __init__(self, base: SetCriterion, branch: CLISBranch, num_layers: int, alpha: float = 0.1,
                 beta: float = 0.05, tau: float = 0.2):
        super().__init__()
        self.base = base
        object.__setattr__(self, "branch", branch)  # not registered: see the class docstring
        self.alpha, self.beta, self.tau = alpha, beta, tau
        clis_weights = {"loss_imcls": alpha, "loss_con": beta, **{f"loss_imcls_{i}": alpha
                                                                   for i in range(num_layers - 1)}}
        self.weight_dict = {**base.weight_dict, **clis_weights}

    @property
    def matcher(self):
        return self.base.matcher

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """outputs of the CLIS detector, targets (see the module docstring) -> named, unweighted losses."""
        labels = [t["labels"].cpu() for t in targets] + [t["tile_labels"].cpu() for t in targets if "tile_labels" in t]
        classes = self.base.federated_subset(labels)
        losses = self.base.detection_losses(outputs, targets, classes)
        clis = outputs.get(CLISBranch.output_key)
        if clis is None:  # evaluation outputs: no branch ran
            return losses
        losses.update(self.image_classification_losses(clis, classes))
        losses["loss_con"] = self.contrastive(outputs, clis, targets) if self.beta > 0 else \
            clis["tile_embed"].sum() * 0.0
        return losses

    def image_classification_losses(self, clis: dict, classes: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``L_imcls``: sigmoid focal, one-hot target over the federated subset, every decoder layer,
        normalised by the number of labelled tiles (mean over ranks). Tiles get no box loss, no negatives."""
        keep = clis["tile_valid"] & (clis["tile_labels"] >= 0)
        labels = clis["tile_labels"][keep]
        num_tiles = _mean_count(len(labels), clis["hidden"].device)
        num_layers = sum(1 for k in self.weight_dict if k.startswith("loss_imcls"))
        names = [f"loss_imcls_{i}" for i in range(num_layers - 1)] + ["loss_imcls"]
        if not clis["tile_logits"]:
            return {n: clis["keepalive"] for n in names}
        out = {}
        for name, logits in zip(names, clis["tile_logits"]):
            logits = logits[keep].float()
            onehot = torch.zeros_like(logits)
            onehot[torch.arange(len(labels), device=logits.device), labels] = 1
            if classes is not None:
                sub = classes.to(logits.device)
                logits, onehot = logits[:, sub], onehot[:, sub]
            loss = sigmoid_focal_loss(logits, onehot, self.base.focal_alpha, self.base.focal_gamma)
            out[name] = loss.sum() / num_tiles + clis["keepalive"]
        return out

    def contrastive(self, outputs: dict, clis: dict, targets: list[dict]) -> torch.Tensor:
        """``L_con`` over the step's pasted regions: f_i of the source tile's query against f_d of the
        matching query assigned (Hungarian, last layer) to the paste, negatives from the queue; then the
        keys are enqueued."""
        pasted = [i for i, t in enumerate(targets) if "paste_tile" in t and bool((t["paste_tile"] >= 0).any())]
        tile_embed = clis["tile_embed"][clis["tile_valid"]]  # (T, E) image-major, as paste_tile counts
        if not pasted or len(tile_embed) == 0:
            return clis["tile_embed"].sum() * 0.0
        sub = {k: outputs[k][pasted] for k in ("pred_logits", "pred_boxes")}
        indices = self.base.matcher(sub, [targets[i] for i in pasted])
        hs, src_tiles = [], []
        for b, (query, target) in zip(pasted, indices):
            tile = targets[b]["paste_tile"].to(query.device)[target]
            hit = tile >= 0
            hs.append(clis["hidden"][b, query[hit].to(clis["hidden"].device)])
            src_tiles.append(tile[hit])
        keys = self.branch.keys(torch.cat(hs))
        query = tile_embed[torch.cat(src_tiles).to(tile_embed.device)]
        loss = contrastive_loss(query, keys, self.branch.queue_keys(), self.tau)
        self.branch.enqueue(keys)
        return loss

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective: ``sum_k weight_dict[k] * losses[k]``."""
        unknown = sorted(set(losses) - set(self.weight_dict))
        if unknown:
            raise KeyError(f"no weight for loss(es) {unknown}")
        return sum(self.weight_dict[k] * v for k, v in losses.items())


def attach_clis(model: DINO, base: SetCriterion, cfg: CLISConfig) -> CLISCriterion:
    """Give a built detector its CLIS branch and return the CLIS criterion around ``base``."""
    task_head = model.class_head.task_head if isinstance(model.class_head, TaskHeadClassifier) else None
    hidden_dim = model.transformer.d_model
    feat_dim = task_head[-2].out_features if task_head is not None else hidden_dim
    model.branch = CLISBranch(hidden_dim, feat_dim, task_head, cfg.embed_dim, cfg.queue_size, cfg.momentum,
                              cfg.siamese).to(model.text_embeddings.device)
    num_layers = len(model.transformer.decoder.layers)
    return CLISCriterion(base, model.branch, num_layers, cfg.alpha, cfg.beta, cfg.tau)
