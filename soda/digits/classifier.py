"""The digit classifier behind the two digits metrics: class accuracy of class-conditional
samples, and a Frechet distance (the FID recipe) on its penultimate features.

A small CNN trained on the same train split as dit-digits; the Frechet reference statistics
(mean and covariance of the held-out real digits' 64-d features) are stored with its weights
in soda/assets/digits_classifier.safetensors. Rebuild it with
`python -m soda.digits.classifier --out soda/assets/digits_classifier.safetensors`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from soda.errors import UserError

FORMAT = 1
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "digits_classifier.safetensors"
FEATURES = 64


class DigitCNN(nn.Module):
    """16x16x1 -> conv16 -> pool -> conv32 -> pool -> fc64 (the features) -> fc10."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(32 * 4 * 4, FEATURES)
        self.fc2 = nn.Linear(FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc1(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


class DigitClassifier:
    """Predicts digits of images [n, 1, 16, 16] in [-1, 1] (clipped first: samples overshoot)."""

    def __init__(self, net: DigitCNN, ref_mu: np.ndarray, ref_cov: np.ndarray, info: dict | None = None):
        self.net = net.eval()
        self.ref_mu = ref_mu
        self.ref_cov = ref_cov
        self.info = info or {}

    @classmethod
    def load_default(cls) -> "DigitClassifier":
        return cls.load(DEFAULT_PATH)

    @classmethod
    def load(cls, path: str | Path) -> "DigitClassifier":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(f"digit classifier not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != str(FORMAT):
            raise UserError(f"{path}: unsupported digit classifier format {meta.get('format')!r} (want {FORMAT})")
        net = DigitCNN()
        net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
        info = json.loads(meta.get("info", "{}"))
        return cls(net, tensors["ref_mu"].double().numpy(), tensors["ref_cov"].double().numpy(), info)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        state = {f"net.{k}": v.detach().contiguous() for k, v in self.net.state_dict().items()}
        state["ref_mu"] = torch.from_numpy(np.ascontiguousarray(self.ref_mu, dtype=np.float64))
        state["ref_cov"] = torch.from_numpy(np.ascontiguousarray(self.ref_cov, dtype=np.float64))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata={"format": str(FORMAT), "info": json.dumps(self.info)})

    @staticmethod
    def _prepare(images: np.ndarray) -> torch.Tensor:
        x = np.asarray(images, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (1, 16, 16):
            raise UserError(f"the digit classifier takes images [n, 1, 16, 16], got {list(x.shape)}")
        return torch.from_numpy(np.clip(x, -1.0, 1.0))

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate (64-d, post-ReLU) features, [n, 64] float64."""
        with torch.inference_mode():
            return self.net.features(self._prepare(images)).double().numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.net(self._prepare(images)).argmax(dim=1).numpy().astype(np.int64)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        labels = np.asarray(labels)
        if len(labels) != len(images):
            raise UserError(f"{len(images)} images but {len(labels)} labels")
        return float(np.mean(self.predict(images) == labels))

    def frechet(self, images: np.ndarray) -> float:
        """Frechet distance between the images' features and the held-out real digits' features.
        Biased by sample size like FID: compare numbers measured on the same number of images."""
        from soda.metrics import feature_stats, frechet_distance

        if len(images) < 2:
            raise UserError("the Frechet distance needs at least 2 images")
        mu, cov = feature_stats(self.features(images))
        return frechet_distance(mu, cov, self.ref_mu, self.ref_cov)


def _shift_batch(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels (background -1 fills the border)."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, [max_shift] * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    side = x.shape[-1]
    return torch.stack([padded[i, :, dy[i]:dy[i] + side, dx[i]:dx[i] + side] for i in range(n)])


def train_classifier(seed: int = 0, epochs: int = 30, batch_size: int = 64, lr: float = 1e-3,
                     threads: int = 1) -> DigitClassifier:
    """Train on the train split (random 1-pixel shifts), reference stats from the held-out split."""
    from soda.digits.data import load_split
    from soda.metrics import feature_stats

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    data = load_split()
    x = torch.from_numpy(data.train_images)
    y = torch.from_numpy(data.train_labels)
    net = DigitCNN()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(net(_shift_batch(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    clf = DigitClassifier(net, np.zeros(FEATURES), np.eye(FEATURES))
    clf.ref_mu, clf.ref_cov = feature_stats(clf.features(data.held_images))
    clf.info = {"seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                "train_accuracy": clf.accuracy(data.train_images, data.train_labels),
                "held_out_accuracy": clf.accuracy(data.held_images, data.held_labels),
                "held_out_count": int(len(data.held_labels))}
    return clf


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Train the shipped digit classifier.")
    p.add_argument("--out", default=str(DEFAULT_PATH))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args()
    clf = train_classifier(seed=args.seed, epochs=args.epochs)
    clf.save(args.out)
    print(json.dumps(clf.info))


if __name__ == "__main__":
    main()
