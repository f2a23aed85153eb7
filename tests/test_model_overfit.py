"""The tiny detector memorises two synthetic images on the CPU: the whole training path works."""

import time

import pytest
import torch

from lt_distill.pipeline.model import build_model, model_config
from lt_distill.pipeline.model.box_ops import box_cxcywh_to_xyxy, box_iou

COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.2, 1.0], [1.0, 0.9, 0.1]])
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def synthetic_image(g: torch.Generator, size: int, num_boxes: int) -> tuple[torch.Tensor, dict]:
    """Rectangles and ellipses in 4 colours (class = 2 * colour + shape) on noise; normalised image."""
    image = torch.rand(3, size, size, generator=g) * 0.4
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    boxes, labels = [], []
    for _ in range(num_boxes):
        w, h = (torch.rand(2, generator=g) * 0.25 + 0.2).tolist()
        cx = w / 2 + torch.rand(1, generator=g).item() * (1 - w)
        cy = h / 2 + torch.rand(1, generator=g).item() * (1 - h)
        colour, shape = int(torch.randint(0, 4, (1,), generator=g)), int(torch.randint(0, 2, (1,), generator=g))
        u, v = (xx / size - cx) / (w / 2), (yy / size - cy) / (h / 2)
        inside = (u.abs() <= 1) & (v.abs() <= 1) if shape == 0 else (u**2 + v**2 <= 1)
        image[:, inside] = COLOURS[colour][:, None]
        boxes.append([cx, cy, w, h])
        labels.append(2 * colour + shape)
    target = {
        "boxes": torch.tensor(boxes),
        "labels": torch.tensor(labels),
        "soft_labels": torch.nn.functional.one_hot(torch.tensor(labels), 8).float() * 0.8 + 0.025,
        "soft_mask": torch.ones(num_boxes, dtype=torch.bool),
        "orig_size": torch.tensor([size, size]),
        "size": torch.tensor([size, size]),
    }
    return (image - MEAN) / STD, target


def detected(detections: list[dict], targets: list[dict], size: int, top: int) -> tuple[int, int]:
    """Ground-truth boxes with a detection of the right class and IoU >= 0.5 among the top ``top``."""
    found = total = 0
    for det, tgt in zip(detections, targets):
        gt = box_cxcywh_to_xyxy(tgt["boxes"]) * size
        iou = box_iou(gt, det["boxes"][:top])[0]
        same_class = tgt["labels"][:, None] == det["labels"][None, :top]
        found += int(((iou >= 0.5) & same_class).any(1).sum())
        total += len(gt)
    return found, total


@pytest.mark.slow
def test_tiny_model_overfits_two_images():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    size, max_steps, top = 128, 160, 10
    pairs = [synthetic_image(g, size, n) for n in (3, 5)]
    for i, (_, t) in enumerate(pairs):
        t["image_id"] = i
    images = torch.stack([img for img, _ in pairs])
    targets = [t for _, t in pairs]
    text = torch.randn(8, 256, generator=g)  # random "class text embeddings"
    model, criterion, postprocess = build_model(model_config("tiny"), text, torch.ones(8))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=4e-4, weight_decay=1e-4)

    start = time.time()
    losses_seen, found = [], (0, 0)
    for step in range(1, max_steps + 1):
        model.train()
        loss = criterion.weighted_total(criterion(model(images, None, targets), targets))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        losses_seen.append(loss.item())
        if step % 10 == 0:
            model.eval()
            with torch.no_grad():
                detections = postprocess(model(images), torch.tensor([[size, size]] * 2))
            found = detected(detections, targets, size, top)
            fell = 1 - sum(losses_seen[-5:]) / 5 / losses_seen[0]
            if found[0] == found[1] and fell >= 0.8:
                break
    elapsed = time.time() - start
    print(f"overfit: {step} steps, {elapsed:.0f}s, loss {losses_seen[0]:.1f} -> {losses_seen[-1]:.2f}, found {found}")
    assert found == (8, 8), f"found {found[0]} of {found[1]} boxes after {step} steps"
    assert sum(losses_seen[-5:]) / 5 <= 0.2 * losses_seen[0]
