"""A small CNN trained on scikit-learn's digits (real 8×8 scans): the classifier on which the
quantization tests and ``vigil bench quantization`` measure the accuracy cost of INT8/INT4.

Conv → Conv → Linear → Linear, so it exercises both packed layer kinds. Training is seeded
and takes about a second on one thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class DigitsNet(nn.Module):
    """(B, 1, 8, 8) in 0..1 → (B, 10) logits."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class TrainedDigits:
    """The trained model (eval mode) and the held-out 30 % split."""

    model: DigitsNet
    x_test: torch.Tensor  # (N, 1, 8, 8)
    y_test: torch.Tensor  # (N,)

    def accuracy(self, model: Any) -> float:
        """Accuracy (percent) of ``model`` (any callable on images) on the held-out split."""
        with torch.inference_mode():
            pred = model(self.x_test).argmax(1)
        return float((pred == self.y_test).float().mean()) * 100


def train_digits(epochs: int = 10, batch_size: int = 64, seed: int = 0) -> TrainedDigits:
    """Train :class:`DigitsNet` with Adam on a stratified 70 % split (one thread, seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)

    def to_x(a: Any) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0

    xt, yt = to_x(x_tr), torch.tensor(y_tr)
    torch.manual_seed(seed)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small trains faster without thread hand-offs
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(epochs):
                perm = torch.randperm(len(xt))
                for i in range(0, len(xt), batch_size):
                    idx = perm[i : i + batch_size]
                    loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
    finally:
        torch.set_num_threads(threads)
    return TrainedDigits(model.eval(), to_x(x_te), torch.tensor(y_te))
