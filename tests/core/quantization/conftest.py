"""A small classifier trained once per session on scikit-learn's digits (real 8×8 scans)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn


class DigitsNet(nn.Module):
    """Conv → Conv → Linear → Linear: exercises both packed layer kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, 10)
        return self.head(self.features(x))


@dataclass
class Trained:
    model: DigitsNet
    x_test: torch.Tensor
    y_test: torch.Tensor

    def accuracy(self, model: nn.Module) -> float:
        with torch.inference_mode():
            pred = model(self.x_test).argmax(1)
        return float((pred == self.y_test).float().mean()) * 100


@pytest.fixture(scope="session")
def digits_classifier() -> Trained:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)

    def to_x(a: object) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0

    xt, yt = to_x(x_tr), torch.tensor(y_tr)
    torch.manual_seed(0)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small trains faster without thread hand-offs
    try:
        for _ in range(8):
            perm = torch.randperm(len(xt))
            for i in range(0, len(xt), 128):
                idx = perm[i : i + 128]
                loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return Trained(model, to_x(x_te), torch.tensor(y_te))
