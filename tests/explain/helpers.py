"""Models with controlled activations and tiny datasets for the explanation / pruning tests.

``colour_model``: a ProtoPNet whose trunk is an 8x8 average pool of the normalised image and whose add-on is
the identity, so a feature-map cell is the cell's mean normalised colour and a prototype "is" a colour: its
nearest patch is the cell whose colour is closest. Receptive field: jump 8, size 8, start 4 (cell (h, w)
covers pixels [8h, 8h + 8) x [8w, 8w + 8), centre (8h + 4, 8w + 4)).
"""

import torch
import torch.nn.functional as F
from torch import nn

from protokern.data import imagenet_normalize
from protokern.models import ProtoPNet

GREY = (0.5, 0.5, 0.5)
RED = (0.9, 0.1, 0.1)
GREEN = (0.1, 0.8, 0.1)
BLUE = (0.1, 0.2, 0.9)


def colour_model(colours, prototype_classes, num_classes: int, pool: int = 8, similarity: str = "log") -> ProtoPNet:
    """ProtoPNet with prototypes = the normalised ``colours`` of the given classes: (P, 3) colours (1 x 1
    prototypes) or (P, kh, kw, 3) grids of colours (kh x kw prototypes, row h of the grid = row h of cells)."""
    grid = torch.as_tensor(colours, dtype=torch.float32)
    grid = grid[:, None, None] if grid.dim() == 2 else grid  # (P, kh, kw, 3)
    model = ProtoPNet(nn.AvgPool2d(pool), num_classes=num_classes, prototype_classes=prototype_classes,
                      prototype_dim=3, out_channels=3, prototype_size=tuple(grid.shape[1:3]), similarity=similarity)
    model.add_on = nn.Identity()
    with torch.no_grad():
        model.prototype_layer.prototypes.copy_(imagenet_normalize(grid.permute(0, 3, 1, 2)))
    return model.eval()


def reference_distance_maps(z: torch.Tensor, prototypes: torch.Tensor, similarity: str) -> torch.Tensor:
    """(B, M, Hout, Wout) float64 distances of every (M, D, kh, kw) prototype to every kh x kw window of z
    (B, D, H, W), written out from the definitions (F.unfold windows; 2 - 2 cos for "cosine")."""
    kh, kw = prototypes.shape[2:]
    B, _, H, W = z.shape
    windows = F.unfold(z.double(), (kh, kw))[:, None]  # (B, 1, D*kh*kw, L)
    p = prototypes.double().flatten(1)[None, :, :, None]  # (1, M, D*kh*kw, 1)
    if similarity == "cosine":
        d = 2 - 2 * F.cosine_similarity(windows, p, dim=2, eps=1e-8)
    else:
        d = (windows - p).square().sum(2)
    return d.view(B, prototypes.shape[0], H - kh + 1, W - kw + 1)


def reference_similarity(d: torch.Tensor, similarity: str, eps: float = 1e-4) -> torch.Tensor:
    """The similarity of distances ``d``, written out: log((d + 1) / (d + eps)), -d or 1 - d / 2."""
    if similarity == "log":
        return torch.log((d + 1) / (d + eps))
    return -d if similarity == "linear" else 1 - d / 2


def reference_window_heatmaps(sim: torch.Tensor, window: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(P, Hout, Wout) maps of kh x kw window positions as (P, S, T) heatmaps with each position at its window's
    centre: bicubic over the pixels the Hout x Wout centres span, the edge pixels repeated outside (by index)."""
    (kh, kw), (_, hout, wout), (S, T) = window, sim.shape, size
    h, w = hout + kh - 1, wout + kw - 1
    top, left = round((kh - 1) / 2 * S / h), round((kw - 1) / 2 * T / w)
    ih, iw = round(hout * S / h), round(wout * T / w)
    inner = F.interpolate(sim[:, None].float(), size=(ih, iw), mode="bicubic", align_corners=False)[:, 0]
    rows, cols = (torch.arange(S) - top).clamp(0, ih - 1), (torch.arange(T) - left).clamp(0, iw - 1)
    return inner[:, rows][:, :, cols]


def canvas(size: int = 64, background=GREY) -> torch.Tensor:
    """A uniform (3, size, size) image."""
    return torch.tensor(background, dtype=torch.float32).view(3, 1, 1).expand(3, size, size).clone()


def paint_grid(image: torch.Tensor, cell: tuple[int, int], grid, cell_size: int = 8) -> torch.Tensor:
    """Paint a (kh, kw) grid of colours with its top-left on feature cell ``cell``, in place."""
    for dh, row in enumerate(grid):
        for dw, colour in enumerate(row):
            paint(image, (cell[0] + dh, cell[1] + dw), colour, cell_size)
    return image


def paint(image: torch.Tensor, cell: tuple[int, int], colour, cell_size: int = 8) -> torch.Tensor:
    """Fill feature cell ``(h, w)`` (a cell_size square) of ``image`` with ``colour``, in place."""
    h, w = cell
    image[:, h * cell_size:(h + 1) * cell_size, w * cell_size:(w + 1) * cell_size] = (
        torch.tensor(colour, dtype=torch.float32).view(3, 1, 1))
    return image


class ListDataset(torch.utils.data.Dataset):
    """``(image, label)`` pairs from lists, with optional ``boxes`` and ``classes``."""

    def __init__(self, images, labels, boxes=None, classes=None):
        self.images = list(images)
        self.targets = [int(y) for y in labels]
        if boxes is not None:
            self.boxes = torch.as_tensor(boxes, dtype=torch.float32)
        if classes is not None:
            self.classes = list(classes)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]
