"""Models with controlled activations and tiny datasets for the explanation / pruning tests.

``colour_model``: a ProtoPNet whose trunk is an 8x8 average pool of the normalised image and whose add-on is
the identity, so a feature-map cell is the cell's mean normalised colour and a prototype "is" a colour: its
nearest patch is the cell whose colour is closest. Receptive field: jump 8, size 8, start 4 (cell (h, w)
covers pixels [8h, 8h + 8) x [8w, 8w + 8), centre (8h + 4, 8w + 4)).
"""

import torch
from torch import nn

from protokern.data import imagenet_normalize
from protokern.models import ProtoPNet

GREY = (0.5, 0.5, 0.5)
RED = (0.9, 0.1, 0.1)
GREEN = (0.1, 0.8, 0.1)
BLUE = (0.1, 0.2, 0.9)


def colour_model(colours, prototype_classes, num_classes: int, pool: int = 8) -> ProtoPNet:
    """ProtoPNet with prototypes = the normalised ``colours`` (P, 3) of the given classes."""
    model = ProtoPNet(nn.AvgPool2d(pool), num_classes=num_classes, prototype_classes=prototype_classes,
                      prototype_dim=3, out_channels=3)
    model.add_on = nn.Identity()
    with torch.no_grad():
        p = imagenet_normalize(torch.tensor(colours, dtype=torch.float32).view(-1, 3, 1, 1))
        model.prototype_layer.prototypes.copy_(p)
    return model.eval()


def canvas(size: int = 64, background=GREY) -> torch.Tensor:
    """A uniform (3, size, size) image."""
    return torch.tensor(background, dtype=torch.float32).view(3, 1, 1).expand(3, size, size).clone()


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
