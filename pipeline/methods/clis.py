"""CLIS (Li et al., arXiv 2210.05568; no code released) on our DINO detector: ``METHODS.md`` §CLIS.

``method = "clis"``; ``[method_options]`` is :class:`CLISConfig`. Components and where they live:

* **TSS** – the task-specialised classification sub-network ``H_cls`` between the decoder and the
  language classifier, shared by every decoder layer: the method sets ``model.head.task_head_dim``,
  which builds :class:`~..model.dino.TaskHeadClassifier` as the detector's ``class_head``, so
  evaluation and export need no method code. CLIS uses no soft labels (no semantic branch).
* **SS** – :class:`CLISBranch`, the detector's training-only ``branch``: one box-anchored *tile query*
  per classification tile (content = one learned vector, reference box = the tile's pre-defined
  region), classified by the *same* ``H_cls`` and classifier parameter objects (``siamese=False``: a
  deep copy of ``H_cls`` for tiles, the paper's "without SS" ablation).
* **CLR** – the branch also holds ``W`` (``H_cls`` width -> 128) and the momentum copies of ``H_cls``
  and ``W`` (the key encoder); :class:`CLISLoss` (a criterion hook) holds the FIFO queue of keys, per
  rank, and computes ``L_imcls`` and ``L_con``.
* **Data** – :class:`.clis_data.MixedLoader`: detection images and mosaics in one step, tile-query
  anchors from the pre-defined regions (``lt-distill clis-regions``), ``t`` tile regions pasted into
  the detection images.

Tile queries are decoded in a second decoder pass over the same encoder memory, with a self-attention
mask that lets each tile query see only itself. That is the attention-masked extra query group of
METHODS.md: in the joint pass no other query may attend to a tile query and a tile query attends to
itself alone, so the matching queries' computation is the same with or without tiles (and a
self-attention over one key has weight 1, so the tile outputs are the same too). Running it apart
keeps the detection outputs bit-identical to the baseline's, which is what makes ``alpha = beta = 0``
with TSS off reproduce the baseline loss exactly. ``tests/test_clis.py`` checks the joint masked pass
against this one.

Targets (mosaics of a mixed batch; :mod:`.clis_data` adds them) may carry ``tile_boxes`` float
``(n, 4)`` cxcywh normalised (the query anchors) and ``tile_labels`` int64 ``(n,)``; detection targets
with pasted tile regions carry ``paste_tile`` int64 ``(n,)``: the index of the source tile among the
batch's tiles (image-major), -1 for ordinary boxes.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..model.box_ops import inverse_sigmoid
from ..model.criterion import sigmoid_focal_loss
from ..model.dino import DINO, TaskHeadClassifier
from .base import CriterionHook, Method


@dataclasses.dataclass
class CLISConfig:
    """``[method_options]`` of ``method = "clis"`` (METHODS.md values; the paper's where it gives them)."""

    task_head_dim: int = 1024  # TSS: width of H_cls (model.head.task_head_dim); 0 = TSS off
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
    mosaics_per_image: int = 1  # mosaic batches per detection batch in a step (paper: 16 images per det image)

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError("alpha and beta must be >= 0")
        if self.tau <= 0 or not 0 <= self.momentum < 1:
            raise ValueError("tau must be > 0 and momentum in [0, 1)")
        if self.task_head_dim < 0:
            raise ValueError("task_head_dim must be >= 0 (0 = TSS off)")
        if self.embed_dim < 1 or self.queue_size < 0 or self.paste_tiles < 0 or self.mosaics_per_image < 1:
            raise ValueError("embed_dim and mosaics_per_image must be >= 1, queue_size and paste_tiles >= 0")
        lo, hi = self.paste_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"paste_scale must satisfy 0 < lo <= hi <= 1, got {self.paste_scale}")


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
    """Training-only branch of the CLIS detector (``DINO.branch``; dropped on export).

    ``feat_dim``: width of ``H_cls``'s output (``task_head_dim``; the hidden size when TSS is off and
    ``H_cls`` is the identity). ``task_head``: the detector's ``H_cls`` (None when TSS is off), used to
    initialise the momentum copy (and the tile copy when ``siamese`` is False). The branch keeps no
    reference to it: the detector passes itself at call time, so ``H_cls`` has one owner in the
    state_dict (``class_head.task_head``).

    Per call it returns ``{"tile_logits": [(B, E, C) per decoder layer], "tile_valid": (B, E) bool,
    "tile_labels": (B, E) int64 (-1 padding), "tile_embed": (B, E, embed_dim) fp32 unit rows f_i,
    "hidden": (B, Q, D) last-layer matching-query states, "keys": :meth:`keys`, "keepalive": 0-valued
    scalar on every trainable parameter of the branch}``.
    """

    output_key = "clis"

    def __init__(self, hidden_dim: int, feat_dim: int, task_head: nn.Module | None, embed_dim: int = 128,
                 momentum: float = 0.999, siamese: bool = True):
        super().__init__()
        self.momentum = momentum
        self.tile_content = nn.Parameter(torch.empty(hidden_dim))
        nn.init.normal_(self.tile_content)
        self.proj = nn.Linear(feat_dim, embed_dim)  # W, shared by the query and the key side (as a momentum copy)
        self.tile_task_head = copy.deepcopy(task_head) if (task_head is not None and not siamese) else None
        self.key_task_head = copy.deepcopy(task_head) if task_head is not None else nn.Identity()
        self.key_proj = copy.deepcopy(self.proj)
        for p in (*self.key_task_head.parameters(), *self.key_proj.parameters()):
            p.requires_grad_(False)

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

    def forward(self, detector: DINO, mem, targets: list[dict], hidden: list[torch.Tensor]) -> dict[str, Any]:
        """detector (for its decoder, ``H_cls`` and classifier), encoder memory, targets, per-layer
        hidden states of the matching queries ``(B, Q, D)``: see the class docstring."""
        if self.training:
            self.momentum_update(detector)
        device = hidden[-1].device
        boxes, labels, valid = self.tile_batch(targets, device)
        b, e = labels.shape
        # Every trainable branch parameter stays in the graph even without tiles (DistributedDataParallel).
        keepalive = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        out = {"tile_logits": [], "tile_valid": valid, "tile_labels": labels, "hidden": hidden[-1], "keys": self.keys,
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


class CLISLoss(CriterionHook):
    """``alpha * L_imcls + beta * L_con`` (METHODS.md), added to ``L_det`` by ``SetCriterion``.

    ``loss_imcls``: sigmoid focal, one-hot target over the step's federated class subset, summed over
    every decoder layer (weight alpha each, as DETR's per-layer terms), normalised by the number of
    labelled tiles (mean over ranks); tiles get no box loss and no negatives. ``loss_con``: last layer,
    fp32, f_i of the source tile's query against f_d of the matching query Hungarian-assigned to the
    paste (key encoder, no gradient), negatives from the queue; the keys are enqueued afterwards.
    The queue is a buffer (``queue``, ``queue_len``, ``queue_ptr``): checkpointed with the criterion,
    and each rank's own (never synchronised: its own keys are its negatives)."""

    def __init__(self, alpha: float = 0.1, beta: float = 0.05, tau: float = 0.2, embed_dim: int = 128,
                 queue_size: int = 115_712, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.weights = {"loss_imcls": alpha, "loss_con": beta}
        self.beta, self.tau = beta, tau
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.register_buffer("queue", torch.zeros(queue_size, embed_dim))
        self.register_buffer("queue_len", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    # -- the queue ---------------------------------------------------------------------------------
    def queue_keys(self) -> torch.Tensor:
        """A copy of the filled part of the queue ``(K_filled, embed_dim)`` (order irrelevant to the loss):
        the loss's graph keeps it, and :meth:`enqueue` overwrites the buffer before the backward pass."""
        return self.queue[: int(self.queue_len)].clone()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """FIFO: write ``keys`` ``(N, embed_dim)`` over the oldest entries (a ring buffer)."""
        size = self.queue.shape[0]
        if size == 0 or keys.shape[0] == 0:
            return
        keys = keys.detach().to(self.queue)[-size:]
        idx = (int(self.queue_ptr) + torch.arange(len(keys), device=keys.device)) % size
        self.queue[idx] = keys
        self.queue_ptr.fill_((int(self.queue_ptr) + len(keys)) % size)
        self.queue_len.fill_(min(size, int(self.queue_len) + len(keys)))

    # -- losses ------------------------------------------------------------------------------------
    def extra_losses(self, outputs: dict[str, Any], targets: list[dict], indices: list, num_boxes: float,
                     classes: Any) -> dict[str, torch.Tensor]:
        clis = outputs.get(CLISBranch.output_key)
        if clis is None:  # no branch output (e.g. a batch without targets)
            return {}
        return {"loss_imcls": self.image_classification(clis, classes),
                "loss_con": self.contrastive(clis, targets, indices) if self.beta > 0 else clis["keepalive"]}

    def image_classification(self, clis: dict[str, Any], classes: Any) -> torch.Tensor:
        keep = clis["tile_valid"] & (clis["tile_labels"] >= 0)
        labels = clis["tile_labels"][keep]
        num_tiles = _mean_count(len(labels), clis["hidden"].device)
        total = clis["keepalive"]
        for logits in clis["tile_logits"]:
            logits = logits[keep].float()
            onehot = torch.zeros_like(logits)
            onehot[torch.arange(len(labels), device=logits.device), labels] = 1
            # The criterion hands a per-loss subset drawer (or a fixed subset); None = every class.
            sub = classes() if callable(classes) else classes
            if sub is not None:
                sub = sub.to(logits.device)
                logits, onehot = logits[:, sub], onehot[:, sub]
            total = total + sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma).sum() / num_tiles
        return total

    def contrastive(self, clis: dict[str, Any], targets: list[dict], indices: list) -> torch.Tensor:
        tile_embed = clis["tile_embed"][clis["tile_valid"]]  # (T, E) image-major, as paste_tile counts
        hs, src_tiles = [], []
        for b, (query, target) in enumerate(indices):
            if "paste_tile" not in targets[b] or len(target) == 0:
                continue
            tile = targets[b]["paste_tile"].to(query.device)[target]
            hit = tile >= 0
            hs.append(clis["hidden"][b, query[hit].to(clis["hidden"].device)])
            src_tiles.append(tile[hit])
        if not hs or len(tile_embed) == 0:
            return clis["keepalive"] + clis["tile_embed"].sum() * 0.0
        keys = clis["keys"](torch.cat(hs))
        query = tile_embed[torch.cat(src_tiles).to(tile_embed.device)]
        loss = contrastive_loss(query, keys, self.queue_keys(), self.tau)
        self.enqueue(keys)
        return loss + clis["keepalive"]


class CLIS(Method):
    """CLIS as a method: TSS through the model config, the tile-query branch on the detector, the
    L_imcls / L_con criterion hook, and mixed detection + mosaic batches."""

    name = "clis"
    Options = CLISConfig
    description = "CLIS: task-specialised head, siamese tile classification (tile queries), contrastive queue"

    def model_overrides(self) -> dict[str, Any]:
        return {"head": {"semantic_branch": False, "task_head_dim": self.options.task_head_dim}}

    def criterion_hooks(self, num_classes: int, hidden_dim: int = 0, loss: Any = None) -> dict[str, CriterionHook]:
        """``loss``: the model's ``LossConfig`` (its focal alpha / gamma serve L_imcls too)."""
        o = self.options
        focal = (loss.focal_alpha, loss.focal_gamma) if loss is not None else (0.25, 2.0)
        return {"clis": CLISLoss(o.alpha, o.beta, o.tau, o.embed_dim, o.queue_size, *focal)}

    def model_branch(self, model: nn.Module) -> nn.Module:
        head = model.class_head
        task_head = head.task_head if isinstance(head, TaskHeadClassifier) else None
        hidden_dim = model.transformer.d_model
        feat_dim = self.options.task_head_dim or hidden_dim
        return CLISBranch(hidden_dim, feat_dim, task_head, self.options.embed_dim, self.options.momentum,
                          self.options.siamese)

    def train_loader(self, detection: DataLoader, classification: DataLoader | None, seed: int) -> Any:
        from ..data.loader import AlternatingLoader
        from .clis_data import CLISBatchMixer, MixedLoader, PredefinedRegions

        if classification is None:  # no classification data: nothing to mix (CLIS reduces to TSS)
            return AlternatingLoader(detection, None)
        o = self.options
        regions = PredefinedRegions.load(o.regions) if o.regions else None
        paste = o.paste_tiles if o.beta > 0 else 0  # the paste feeds CLR only
        mixer = CLISBatchMixer(regions, paste, o.paste_scale, seed=seed)
        return MixedLoader(detection, classification, mixer, o.mosaics_per_image)
