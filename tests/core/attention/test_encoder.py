"""SparseEncoder: config, typed output, HF-style save/load, and learning a task that needs globals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from core.attention import SparseEncoder, SparseEncoderConfig, SparseEncoderOutput


def small_config(**kw) -> SparseEncoderConfig:
    base = {"dim": 32, "heads": 2, "layers": 2, "window": 8, "top_k": 3, "max_len": 128}
    return SparseEncoderConfig(**{**base, **kw})


def test_features_in_hidden_states_out_with_per_layer_picks() -> None:
    torch.manual_seed(0)
    enc = SparseEncoder(small_config()).eval()
    out = enc(torch.randn(2, 40, 32), return_topk=True)
    assert isinstance(out, SparseEncoderOutput)
    assert out.last_hidden_state.shape == (2, 40, 32)
    assert out.topk_indices is not None and len(out.topk_indices) == 2
    assert all(i.shape == (2, 3) for i in out.topk_indices)
    assert enc(torch.randn(2, 40, 32)).topk_indices is None


def test_token_ids_and_padding_mask() -> None:
    torch.manual_seed(1)
    enc = SparseEncoder(small_config(vocab_size=20)).eval()
    ids = torch.randint(0, 20, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 12:] = False
    ids2 = ids.clone()
    ids2[1, 12:] = 7  # different padding content
    a = enc(ids, mask, return_topk=True)
    b = enc(ids2, mask)
    assert torch.allclose(a.last_hidden_state[1, :12], b.last_hidden_state[1, :12], atol=1e-5)
    assert a.topk_indices is not None and all((i[1] < 12).all() for i in a.topk_indices)


@pytest.mark.parametrize("position", ["sinusoidal", "learned", "none"])
def test_save_pretrained_round_trip(tmp_path: Path, position: str) -> None:
    torch.manual_seed(2)
    enc = SparseEncoder(small_config(vocab_size=50, position=position)).eval()
    folder = enc.save_pretrained(tmp_path / "enc")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "vigil-sparse-encoder" and cfg["architectures"] == ["SparseEncoder"]
    loaded = SparseEncoder.from_pretrained(folder)
    assert loaded.config == enc.config and not loaded.training
    ids = torch.randint(0, 50, (2, 64))
    assert torch.equal(loaded(ids).last_hidden_state, enc(ids).last_hidden_state)


def test_safetensors_file_is_readable_by_the_safetensors_library(tmp_path: Path) -> None:
    from safetensors import safe_open

    enc = SparseEncoder(small_config())
    enc.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(enc.state_dict())


def test_from_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        SparseEncoder.from_pretrained(tmp_path)
    SparseEncoder(small_config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        SparseEncoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type"):
        SparseEncoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "layers": 3}))
    with pytest.raises(RuntimeError):  # weights for 2 layers cannot fill 3
        SparseEncoder.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kw",
    [
        {"dim": 31},
        {"layers": 0},
        {"top_k": -1},
        {"vocab_size": 0},
        {"dropout": 1.5},
        {"position": "rotary"},
        {"select_noise": -0.1},
    ],
)
def test_bad_config(kw: dict) -> None:
    with pytest.raises(ValueError):
        small_config(**kw)


def test_bad_inputs() -> None:
    enc = SparseEncoder(small_config(max_len=16))
    with pytest.raises(ValueError, match="max_len"):
        enc(torch.randn(1, 17, 32))
    with pytest.raises(ValueError, match="features"):
        enc(torch.randint(0, 5, (1, 8)))
    ids_enc = SparseEncoder(small_config(vocab_size=10))
    with pytest.raises(ValueError, match="token ids"):
        ids_enc(torch.randn(1, 8, 32))


# --------------------------------------------------------------------------- learning
V, L, FAR = 8, 64, 24  # values, sequence length, nearest position of the marked token


def copy_task(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position 0 must output the value of the one *marked* token, placed >= FAR tokens away.

    Ids 0..V-1 are filler, V..2V-1 the marked values, 2V the query token at position 0.
    """
    ids = torch.randint(0, V, (n, L), generator=gen)
    pos = torch.randint(FAR, L, (n,), generator=gen)
    val = torch.randint(0, V, (n,), generator=gen)
    ids[torch.arange(n), pos] = V + val
    ids[:, 0] = 2 * V
    return ids, val


def train_copy(top_k: int, steps: int = 200, seed: int = 0) -> float:
    """Train a one-layer encoder (window 8: reach < FAR) on the copy task; return accuracy."""
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster and immune to CPU contention
    try:
        return _train_copy(top_k, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train_copy(top_k: int, steps: int, seed: int) -> float:
    cfg = SparseEncoderConfig(
        dim=32,
        heads=2,
        layers=1,
        window=8,
        top_k=top_k,
        ffn_mult=2,
        max_len=L,
        vocab_size=2 * V + 1,
    )
    enc, head = SparseEncoder(cfg), nn.Linear(32, V)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids, val = copy_task(gen, 32)
        loss = nn.functional.cross_entropy(head(enc(ids).last_hidden_state[:, 0]), val)
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc.eval()
    with torch.no_grad():
        ids, val = copy_task(torch.Generator().manual_seed(1234), 512)
        return (head(enc(ids).last_hidden_state[:, 0]).argmax(-1) == val).float().mean().item()


@pytest.mark.slow
def test_global_tokens_solve_a_task_the_window_cannot() -> None:
    window_only = train_copy(top_k=0)
    with_globals = train_copy(top_k=4)
    assert window_only < 0.3  # chance is 1/8: the marked token is out of the window's reach
    assert with_globals > 0.7
    assert with_globals - window_only > 0.4
