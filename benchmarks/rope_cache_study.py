"""Why the fused rotary + KV-cache write takes 18.8 us per LlamaGen-XL layer at 512 rows, and what a
rewrite gains (a study, not package code).

`docs/benchmarks.md` ("LlamaGen-XL's decode step outside attention"): `_rope_cache_kernel`
(`aimkit/kernels/rope_cache.py`) is 0.68 ms of the 6.0 ms decode step at batch 256, ten times the
time its 7.8 MB of traffic need. Each of its programs computes the position's cos/sin itself (a
float64 `exp2`, libdevice's `cosf`/`sinf`) and loads and stores channel pairs with stride 2. This
script times, at the step's shapes and with one KV cache per layer (as in the model), the library
kernel against variants written here:

* ``table``: cos/sin gathered from a (positions, head_dim / 2) float32 table made once by
  :func:`aimkit.kernels.rotary.rotary_tables` (the reference's own tables) instead of computed;
* ``table + contiguous``: the same, each head's channels loaded and stored as one contiguous
  vector and split into pairs in registers (``tl.reshape`` + ``tl.split`` / ``tl.join``);

each over heads per program (``block_h``) and warps, every variant checked against
:func:`~aimkit.kernels.rope_cache.rope_cache_write_reference` (largest difference of q, k and v).
A variant that wins by microseconds per layer moves into the package; the rest is recorded in
``benchmarks/notes.md``.

GPU machine: ``source benchmarks/device_env.sh; python3 benchmarks/rope_cache_study.py --out $OUT/rope``
(under a minute). CPU check of the variants' maths in Triton's interpreter (no timing)::

    TRITON_INTERPRET=1 python3 benchmarks/rope_cache_study.py --device cpu --rows 4 --layers 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aimkit._io import write_text_atomic  # noqa: E402
from aimkit.kernels.rope_cache import rope_cache_write_, rope_cache_write_reference  # noqa: E402
from aimkit.kernels.rotary import rotary_tables  # noqa: E402

# LlamaGen-XL's attention: 20 heads of 64 channels, 2-D rotary on a 16 x 16 grid, 257 positions
N_HEAD, HEAD_DIM, GRID, POSITIONS, BASE = 20, 64, 16, 257, 10000.0


@triton.jit
def _rope_table_kernel(
    qkv_ptr, k_ptr, v_ptr, pos_ptr, q_ptr, cos_ptr, sin_ptr,
    n_head, n_kv_head, seqlen, s_qkv_b, s_k_b, s_k_h, s_k_s, s_v_b, s_v_h, s_v_s,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, CONTIGUOUS: tl.constexpr,
):
    # program (row, head block) as in the library kernel; cos/sin of the position gathered from
    # (seqlen, HEAD_DIM / 2) float32 tables; with CONTIGUOUS each head is one vector load/store
    HALF: tl.constexpr = HEAD_DIM // 2
    row = tl.program_id(0).to(tl.int64)
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[:, None]  # (BLOCK_H, 1)
    pairs = tl.arange(0, HALF)[None, :]  # (1, HALF)
    pos = tl.load(pos_ptr)
    in_cache = (pos >= 0) & (pos < seqlen)
    at = tl.where(in_cache, pos, 0)
    cos = tl.load(cos_ptr + at * HALF + pairs)  # (1, HALF)
    sin = tl.load(sin_ptr + at * HALF + pairs)
    v_start = n_head + n_kv_head
    live = heads < v_start + n_kv_head  # (BLOCK_H, 1)
    base = qkv_ptr + row * s_qkv_b + heads * HEAD_DIM
    if CONTIGUOUS:
        chans = tl.arange(0, HEAD_DIM)[None, :]
        x = tl.load(base + chans, mask=live, other=0.0).to(tl.float32)  # (BLOCK_H, HEAD_DIM)
        x0, x1 = tl.split(tl.reshape(x, (BLOCK_H, HALF, 2)))
    else:
        x0 = tl.load(base + 2 * pairs, mask=live, other=0.0).to(tl.float32)
        x1 = tl.load(base + 2 * pairs + 1, mask=live, other=0.0).to(tl.float32)
    is_v = heads >= v_start
    out_ty = q_ptr.dtype.element_ty
    y0 = tl.where(is_v, x0, x0 * cos - x1 * sin).to(out_ty)
    y1 = tl.where(is_v, x1, x0 * sin + x1 * cos).to(out_ty)
    is_q = live & (heads < n_head)
    is_k = live & (heads >= n_head) & (heads < v_start)
    is_v = live & is_v
    kh = tl.where(is_k, heads - n_head, 0)
    vh = tl.where(is_v, heads - v_start, 0)
    q_at = q_ptr + row * n_head * HEAD_DIM + heads * HEAD_DIM
    k_at = k_ptr + row * s_k_b + kh * s_k_h + pos * s_k_s
    v_at = v_ptr + row * s_v_b + vh * s_v_h + pos * s_v_s
    if CONTIGUOUS:
        y = tl.reshape(tl.join(y0, y1), (BLOCK_H, HEAD_DIM))
        tl.store(q_at + chans, y, mask=is_q)
        if in_cache:  # a position outside the cache writes nothing, as in the library kernel
            tl.store(k_at + chans, y.to(k_ptr.dtype.element_ty), mask=is_k)
            tl.store(v_at + chans, y.to(v_ptr.dtype.element_ty), mask=is_v)
    else:
        tl.store(q_at + 2 * pairs, y0, mask=is_q)
        tl.store(q_at + 2 * pairs + 1, y1, mask=is_q)
        if in_cache:
            tl.store(k_at + 2 * pairs, y0.to(k_ptr.dtype.element_ty), mask=is_k)
            tl.store(k_at + 2 * pairs + 1, y1.to(k_ptr.dtype.element_ty), mask=is_k)
            tl.store(v_at + 2 * pairs, y0.to(v_ptr.dtype.element_ty), mask=is_v)
            tl.store(v_at + 2 * pairs + 1, y1.to(v_ptr.dtype.element_ty), mask=is_v)


def rope_table_write_(qkv, k_cache, v_cache, position, cos, sin, *, block_h: int, num_warps: int,
                      contiguous: bool):
    """The variant kernels: same arguments and effects as ``rope_cache_write_`` (n_head = n_kv_head)."""
    rows, n_kv_head = qkv.shape[0], k_cache.shape[1]
    q = torch.empty(rows, n_kv_head, 1, HEAD_DIM, device=qkv.device, dtype=qkv.dtype)
    heads = 3 * n_kv_head
    _rope_table_kernel[(rows, triton.cdiv(heads, block_h))](
        qkv, k_cache, v_cache, position, q, cos, sin,
        n_kv_head, n_kv_head, k_cache.shape[2], qkv.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3],
        HEAD_DIM=HEAD_DIM, BLOCK_H=block_h, CONTIGUOUS=contiguous, num_warps=num_warps,
    )
    return q


def _inputs(rows: int, layers: int, device: str, dtype: torch.dtype):
    qkv = torch.randn(rows, 3 * N_HEAD * HEAD_DIM, device=device, dtype=dtype)
    caches = [(torch.zeros(rows, N_HEAD, POSITIONS, HEAD_DIM, device=device, dtype=dtype),
               torch.zeros(rows, N_HEAD, POSITIONS, HEAD_DIM, device=device, dtype=dtype)) for _ in range(layers)]
    position = torch.tensor([POSITIONS // 2], device=device)
    cos, sin = (t.contiguous() for t in rotary_tables(torch.arange(POSITIONS, device=device), HEAD_DIM, BASE,
                                                       "2d", GRID))
    return qkv, caches, position, cos, sin


def _variants(cos, sin, device: str):
    """name -> fn(qkv, k_cache, v_cache, position) for every variant and tiling."""
    heads = dict(n_head=N_HEAD, n_kv_head=N_HEAD, head_dim=HEAD_DIM, rope="2d", base=BASE, grid_size=GRID)
    out = {"library (default tiling)": lambda *a: rope_cache_write_(*a, **heads)}
    warps = (1, 2, 4) if device == "cuda" else (4,)
    blocks = (1, 2, 4, 8, 16) if device == "cuda" else (4,)
    for contiguous, block_h, num_warps in itertools.product((False, True), blocks, warps):
        name = f"table{' + contiguous' if contiguous else ''}, block_h {block_h}, {num_warps} warps"
        out[name] = (lambda *a, b=block_h, w=num_warps, c=contiguous:
                     rope_table_write_(*a, cos, sin, block_h=b, num_warps=w, contiguous=c))
    return out


def _max_error(fn, qkv, position) -> float:
    """Largest difference of q and the written k, v from the PyTorch reference."""
    heads = dict(n_head=N_HEAD, n_kv_head=N_HEAD, head_dim=HEAD_DIM, rope="2d", base=BASE, grid_size=GRID)
    got_k, got_v, want_k, want_v = (torch.zeros(qkv.shape[0], N_HEAD, POSITIONS, HEAD_DIM, device=qkv.device,
                                                dtype=qkv.dtype) for _ in range(4))
    got = fn(qkv, got_k, got_v, position)
    want = rope_cache_write_reference(qkv, want_k, want_v, position, **heads)
    return max((a.float() - b.float()).abs().max().item() for a, b in ((got, want), (got_k, want_k), (got_v, want_v)))


def _save(record: dict, out: Path) -> Path:
    """``out/rope_cache_study.json`` (the folder created), written atomically; its path."""
    path = out / "rope_cache_study.json"
    write_text_atomic(path, json.dumps(record, indent=1) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="512,32", help="decode rows (2 x images with guidance)")
    ap.add_argument("--layers", type=int, default=36, help="KV caches written in turn (LlamaGen-XL: 36)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", default=os.environ.get("OUT", "rope_cache_study"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device; on a CPU run it under TRITON_INTERPRET=1 with --device cpu")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    record = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "triton": triton.__version__,
              "shape": {"n_head": N_HEAD, "head_dim": HEAD_DIM, "positions": POSITIONS}, "rows": []}
    for rows in (int(r) for r in args.rows.split(",")):
        qkv, caches, position, cos, sin = _inputs(rows, args.layers, args.device, dtype)
        for name, fn in _variants(cos, sin, args.device).items():
            row = {"rows": rows, "variant": name, "max_abs_error": _max_error(fn, qkv, position)}
            if args.device == "cuda":
                from aimkit.bench.timing import graphed_call_seconds

                layer = itertools.cycle(caches)  # each captured call writes the next layer's cache
                row["us"] = graphed_call_seconds(lambda fn=fn: fn(qkv, *next(layer), position),
                                                 calls=args.layers) * 1e6
            record["rows"].append(row)
            print(json.dumps(row), flush=True)
    print(f"wrote {_save(record, Path(args.out))}")


if __name__ == "__main__":
    main()
