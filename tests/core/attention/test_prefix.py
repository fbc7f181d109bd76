"""Always-global prefix tokens (``prefix=P``) in DynamicSparseAttention / SparseEncoder.

The golden file holds outputs of the layer and the encoder recorded *before* the option existed
(``python tests/core/attention/test_prefix.py`` rewrites it): the default path must reproduce them
bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from core.attention import DynamicSparseAttention, SparseEncoder, SparseEncoderConfig

GOLDEN = Path(__file__).parent / "data" / "sparse_default_golden.pt"


def _golden_cases(state: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Outputs of fixed modules on fixed inputs; ``state`` (weights + inputs) from the file."""
    torch.manual_seed(1234)
    attn = DynamicSparseAttention(dim=32, heads=4, window=8, top_k=3).eval()
    x = torch.randn(2, 45, 32)
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[1, 30:] = False
    dense = DynamicSparseAttention(32, 4, 64, 2).eval()
    enc = SparseEncoder(SparseEncoderConfig(dim=32, heads=2, layers=2, window=8, top_k=4)).eval()
    if state is not None:
        attn.load_state_dict(state["attn"])
        dense.load_state_dict(state["dense"])
        enc.load_state_dict(state["enc"])
        x, mask = state["x"], state["mask"]
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out["attn_local_topk"], idx = attn.forward_with_indices(x, mask)
        assert idx is not None
        out["attn_local_topk_idx"] = idx
        out["attn_dense"] = dense(x)
        o = enc(x, mask, return_topk=True)
    assert o.topk_indices is not None
    out["encoder"] = o.last_hidden_state
    out["encoder_idx0"] = o.topk_indices[0]
    if state is None:
        out["_state"] = {  # type: ignore[assignment]
            "attn": attn.state_dict(),
            "dense": dense.state_dict(),
            "enc": enc.state_dict(),
            "x": x,
            "mask": mask,
        }
    return out


def test_default_outputs_are_bit_identical_to_before_the_option() -> None:
    saved = torch.load(GOLDEN, weights_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the file was written single-threaded: same reduction order
    try:
        now = _golden_cases(saved["state"])
    finally:
        torch.set_num_threads(threads)
    for key, want in saved["outputs"].items():
        assert torch.equal(now[key], want), key


def _layer(window: int = 4, top_k: int = 2) -> DynamicSparseAttention:
    torch.manual_seed(0)
    return DynamicSparseAttention(dim=16, heads=2, window=window, top_k=top_k).eval()


def test_global_branch_is_prefix_plus_picks_and_prefix_rows_are_dense() -> None:
    attn, P = _layer(), 3
    x = torch.randn(2, 30, 16)
    with torch.no_grad():
        y, idx = attn.forward_with_indices(x, force_gate="global", prefix=P)
    assert idx is not None and bool((idx >= P).all())  # picks come from the body only
    D, H, hd = 16, 2, 8
    W, b = attn.qkv.weight, attn.qkv.bias
    with torch.no_grad():
        q, k, v = (F.linear(x, W[i * D : (i + 1) * D], b[i * D : (i + 1) * D]) for i in range(3))
        scores = attn.scorer(x[:, P:])[..., 0]
        for i in range(2):
            keys = torch.cat([torch.arange(P), idx[i]])
            scale = torch.cat([torch.ones(P), torch.sigmoid(scores[i, idx[i] - P])])
            vv = v[i, keys] * scale[:, None]

            def heads(t: torch.Tensor) -> torch.Tensor:
                return t.view(t.shape[0], H, hd).transpose(0, 1)

            body = F.scaled_dot_product_attention(heads(q[i, P:]), heads(k[i, keys]), heads(vv))
            torch.testing.assert_close(
                y[i, P:], attn.out(body.transpose(0, 1).reshape(-1, D)), atol=1e-5, rtol=1e-5
            )
            pre = F.scaled_dot_product_attention(heads(q[i, :P]), heads(k[i]), heads(v[i]))
            torch.testing.assert_close(
                y[i, :P], attn.out(pre.transpose(0, 1).reshape(-1, D)), atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("top_k", [0, 2])
def test_every_token_sees_the_prefix_however_small_the_window(top_k: int) -> None:
    attn, P = _layer(window=2, top_k=top_k), 2
    x = torch.randn(1, 200, 16)
    x2 = x.clone()
    x2[:, 1] += 5.0  # change one prefix token
    with torch.no_grad():
        far = attn(x, prefix=P)[:, 100:] - attn(x2, prefix=P)[:, 100:]
        local = attn(x, prefix=0)[:, 100:] - attn(x2, prefix=0)[:, 100:]
    assert bool((far.abs().amax(-1) > 1e-4).all())  # reaches every token ...
    assert float(local.abs().max()) < 1e-6  # ... which without the prefix it does not (when k=0)
    if top_k == 0:
        assert torch.equal(attn(x, prefix=0), attn(x, force_gate="local"))


def test_padding_in_prefix_and_body_is_hidden_and_gradients_reach_the_prefix() -> None:
    cfg = SparseEncoderConfig(dim=16, heads=2, layers=2, window=4, top_k=3, position="none")
    torch.manual_seed(0)
    enc = SparseEncoder(cfg)
    x = torch.randn(2, 40, 16, requires_grad=True)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, 3:5] = False  # padded text tokens of the first sequence
    mask[1, 35:] = False
    out = enc(x, mask, return_topk=True, prefix=5)
    assert out.topk_indices is not None
    for idx in out.topk_indices:
        assert bool((idx >= 5).all())
    x2 = x.detach().clone()
    x2[0, 3:5] = 99.0  # padding content must not matter
    with torch.no_grad():
        enc.eval()
        a = enc(x.detach(), mask, prefix=5).last_hidden_state
        b = enc(x2, mask, prefix=5).last_hidden_state
    torch.testing.assert_close(a[0, 5:], b[0, 5:])
    enc.train()
    out.last_hidden_state[:, 5:].sum().backward()
    assert x.grad is not None and float(x.grad[:, :3].abs().sum()) > 0


def test_bad_prefix_is_rejected() -> None:
    attn = _layer()
    with pytest.raises(ValueError, match="prefix"):
        attn(torch.randn(1, 10, 16), prefix=10)
    with pytest.raises(ValueError, match="prefix"):
        attn(torch.randn(1, 10, 16), prefix=-1)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, :2] = True
    with pytest.raises(ValueError, match="after the prefix"):
        attn(torch.randn(1, 10, 16), mask, prefix=2)


if __name__ == "__main__":  # rewrite the golden file (only with the code before a change!)
    torch.set_num_threads(1)
    res = _golden_cases()
    st = res.pop("_state")
    torch.save({"outputs": res, "state": st}, GOLDEN)
