"""Check the bitmap decode kernel (and the stun::bitmap_experts_mm op) against the masked dense product.

``python tests/bitmap_kernel_check.py cpu`` (with TRITON_INTERPRET=1: Triton's interpreter, small
shapes) or ``cuda`` (every shape class, every autotuner candidate, bf16 and float32). Prints ``ok``.
Run by tests/test_bitmap.py.
"""

import os
import sys

import torch

from stun_lightning.sparse.bitmap import compress_bitmap
from stun_lightning.sparse.bitmap_experts import bitmap_experts_mm
from stun_lightning.sparse.experts import align_pairs, pairs_layout, route_pairs
from stun_lightning.sparse.triton_bitmap import CONFIGS, launch_bitmap_decode


def _interpreter_index_fix() -> None:
    """Triton 3.6's interpreter turns a scalar (a 1-element array) into a range bound with
    ``int(array)``, which numpy >= 2.4 refuses; take ``.item()`` instead (interpreter only)."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_index_fix()


def case(device, dtype, e, n, k, top_k, tokens, sparsity, configs, empty=(1,)):
    g = torch.Generator().manual_seed(e * 1000 + n + k + tokens)
    w = torch.randn(e, n, k, generator=g)
    w[torch.rand(e, n, k, generator=g) < sparsity] = 0
    for i in empty:
        w[i % e] = 0
    w = w.to(device, dtype)
    bitmap, values, offsets = compress_bitmap(w)
    a = torch.randn(tokens, k, generator=g).to(device, dtype)
    index = torch.stack([torch.randperm(e, generator=g)[:top_k] for _ in range(tokens)]).to(device)
    expected = torch.einsum("pk,pnk->pn", a.float().repeat_interleave(top_k, 0), w.float()[index.view(-1)])
    scale = expected.abs().max().clamp(min=1)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    block_m, _ = pairs_layout(tokens * top_k, e)
    ids, blocks = align_pairs(index, e, block_m)
    for config in configs:
        out = launch_bitmap_decode(a, bitmap, values, offsets, ids, blocks, top_k, block_m, k, config=config)
        err = ((out.float() - expected).abs().max() / scale).item()
        assert err < tol, (e, n, k, top_k, tokens, sparsity, dtype, config, err)
    sorted_ids, block_expert = route_pairs(index, e)  # the op: kernel at decode, dense tiles + grouped_mm above
    out = bitmap_experts_mm(a, bitmap, values, offsets, sorted_ids, block_expert, top_k, k)
    err = ((out.float() - expected).abs().max() / scale).item()
    assert err < tol, ("op", e, n, k, top_k, tokens, sparsity, dtype, err)


def main(device: str) -> None:
    if device == "cpu":
        configs = [CONFIGS[0], CONFIGS[4]]
        for shape in [(4, 24, 130, 2, 3, 0.7), (3, 16, 64, 2, 1, 0.5), (5, 7, 45, 3, 4, 0.9)]:
            case("cpu", torch.float32, *shape, configs)
    else:
        configs = CONFIGS
        shapes = [
            (8, 2 * 448, 512, 2, 1, 0.7),  # Mixtral-like, 1 token
            (8, 512, 448, 2, 8, 0.5),  # down-like, 8 tokens
            (8, 2 * 448, 512, 2, 32, 0.8),  # 32 tokens
            (64, 2 * 96, 256, 8, 4, 0.7),  # Qwen3-like many experts
            (64, 256, 96, 8, 32, 0.5),
            (5, 7, 45, 3, 4, 0.9),  # odd sizes
            (4, 40, 130, 2, 17, 0.6),  # ragged tile, 17 tokens
            (6, 24, 200, 2, 300, 0.7),  # prefill: the op expands tiles
        ]
        for dtype in (torch.bfloat16, torch.float32):
            for shape in shapes:
                case("cuda", dtype, *shape, configs)
        case("cuda", torch.bfloat16, 4, 16, 64, 2, 3, 1.0, configs)  # every expert empty
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda")
