"""Pure-PyTorch state-space-duality (SSD) maths of Mamba2: the reference of operations ``scan``
and ``state_update`` (:class:`aimkit.policy.ExecutionPolicy`), and the code that runs anywhere.

The scalar-decay SSM of Mamba2, per head ``h`` with a state of shape (P, N)::

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t ⊗ B_t
    y_t     = state_t @ C_t + D_h * x_t

Three ways to evaluate it live here:

* :func:`ssd_chunked`: the chunked SSD algorithm (quadratic attention-like form inside each chunk,
  a linear recurrence over chunk boundaries): the reference of mamba-ssm's Triton chunked scan
  (:mod:`aimkit.kernels.mamba_ssm`, op ``scan``).
* :func:`ssd_recurrent_step` / :func:`ssd_recurrent_step_`: one exact step of the recurrence, for
  decoding: the reference of aimkit's state-update kernel (:mod:`aimkit.kernels.ssm_step`, op
  ``state_update``).
* :func:`ssd_naive`: a per-time-step loop; slow, used only as ground truth in tests.

Shared shape conventions: batch ``Bt``, length ``L``, heads ``H``, head dim ``P``, groups ``G``
(``H % G == 0``; head ``h`` reads group ``h // (H // G)``), state size ``N``. ``dt`` is already
positive (softplus'ed, bias added) and ``A`` is negative. Work is done in float32 at least
(float64 inputs stay float64); ``y`` comes back in ``x``'s dtype, states in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ssd_chunked", "ssd_naive", "ssd_recurrent_step", "ssd_recurrent_step_"]


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[int, int]:
    """Validate the SSD argument shapes; returns (groups G, heads per group R)."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, L, H, P), got shape {tuple(x.shape)}")
    bt, length, nheads, _ = x.shape
    if dt.shape != (bt, length, nheads):
        raise ValueError(f"dt must be {(bt, length, nheads)}, got {tuple(dt.shape)}")
    if A.shape != (nheads,):
        raise ValueError(f"A must be ({nheads},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (bt, length) or C.shape != B.shape:
        raise ValueError(f"B and C must both be (B, L, G, N) with B, L = {bt}, {length}; "
                         f"got {tuple(B.shape)} and {tuple(C.shape)}")
    groups = B.shape[2]
    if nheads % groups:
        raise ValueError(f"number of heads {nheads} is not a multiple of the groups {groups}")
    return groups, nheads // groups


def _segsum(a: Tensor) -> Tensor:
    """Segment sums in log space: a (..., T) -> (..., T, T).

    ``out[..., i, j] = a[j+1] + ... + a[i]`` for ``i >= j`` and ``-inf`` above the diagonal, so
    ``exp(out)`` is the lower-triangular decay matrix. Each segment is summed directly (masked
    cumulative sum) rather than as a difference of two prefix sums, which keeps it accurate when
    the prefix sums grow large.
    """
    length = a.shape[-1]
    rows = a.unsqueeze(-1).expand(*a.shape, length)  # (..., T, T): rows[..., k, j] = a[k]
    strict = torch.ones(length, length, dtype=torch.bool, device=a.device).tril(-1)
    sums = rows.masked_fill(~strict, 0).cumsum(dim=-2)  # sums[..., i, j] = sum_{j<k<=i} a[k]
    keep = torch.ones(length, length, dtype=torch.bool, device=a.device).tril()
    return sums.masked_fill(~keep, float("-inf"))


def _chunked_inputs(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, groups: int,
                    ct: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Pad to whole chunks (``dt = 0``: no decay, no input) and split into chunks in ``ct``.

    Returns:
        ``(xdt, dA, dA_cum, Bs, Cs)``: xdt (B, c, Q, G, R, P) = dt * x; dA and its cumulative
        sum over the chunk (B, c, G, R, Q), the log of the per-step decay; Bs, Cs (B, c, Q, G, N).
    """
    bt, length, nheads, headdim = x.shape
    dstate = B.shape[-1]
    pad = (-length) % chunk_size
    xs, dts, Bs, Cs = (t.to(ct) for t in (x, dt, B, C))
    if pad:
        xs = F.pad(xs, (0, 0, 0, 0, 0, pad))
        dts = F.pad(dts, (0, 0, 0, pad))
        Bs = F.pad(Bs, (0, 0, 0, 0, 0, pad))
        Cs = F.pad(Cs, (0, 0, 0, 0, 0, pad))
    nchunks = (length + pad) // chunk_size
    q, g, r = chunk_size, groups, nheads // groups
    # heads become (group, head-within-group) so that B and C broadcast
    xs = xs.reshape(bt, nchunks, q, g, r, headdim)  # (B, c, Q, G, R, P)
    dts = dts.reshape(bt, nchunks, q, g, r)  # (B, c, Q, G, R)
    Bs = Bs.reshape(bt, nchunks, q, g, dstate)  # (B, c, Q, G, N)
    Cs = Cs.reshape(bt, nchunks, q, g, dstate)  # (B, c, Q, G, N)
    dA = (dts * A.to(ct).reshape(g, r)).permute(0, 1, 3, 4, 2)  # (B, c, G, R, Q)
    return xs * dts.unsqueeze(-1), dA, dA.cumsum(dim=-1), Bs, Cs


def _carry_states(chunk_states: Tensor, dA_cum: Tensor, initial: Tensor | None) -> tuple[Tensor, Tensor]:
    """The linear recurrence over chunk boundaries.

    Args:
        chunk_states: (B, c, G, R, P, N) state contributed by each chunk's own inputs at its end.
        dA_cum: (B, c, G, R, Q) cumulative log decay inside each chunk.
        initial: (B, G, R, P, N) state before the first chunk.

    Returns:
        ``(entering, final)``: entering (B, c, G, R, P, N), the state before each chunk; final
        (B, G, R, P, N), the state after the last one.
    """
    chunk_decay = torch.exp(dA_cum[..., -1])  # (B, c, G, R)
    state, entering = initial, []
    for k in range(chunk_states.shape[1]):
        entering.append(state)
        state = chunk_decay[:, k, :, :, None, None] * state + chunk_states[:, k]
    return torch.stack(entering, dim=1), state


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked SSD scan (the Mamba2 training algorithm) in plain PyTorch.

    Inside each chunk of ``chunk_size`` positions the output is a masked quadratic form
    ``(C Bᵀ ∘ decay) (dt x)``; the state entering each chunk is carried across chunks by a
    linear recurrence. Sequences whose length is not a multiple of ``chunk_size`` are padded
    with ``dt = 0`` (no decay, no input), which leaves outputs and final state unchanged.

    Args:
        x: inputs (B, L, H, P).
        dt: positive step sizes (B, L, H), already softplus'ed with the bias added.
        A: negative decay rates (H,).
        B: input projections (B, L, G, N), shared by the H // G heads of a group.
        C: output projections (B, L, G, N).
        chunk_size: chunk length Q.
        D: optional skip weights (H,): adds ``D[h] * x``.
        initial_state: optional state before the first position (B, H, P, N).
        return_final_state: also return the state after the last position.

    Returns:
        y (B, L, H, P) in ``x.dtype``; with ``return_final_state`` the pair
        ``(y, final_state)`` where final_state is (B, H, P, N) in the compute dtype.
    """
    groups, per_group = _check_shapes(x, dt, A, B, C)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    bt, length, nheads, headdim = x.shape
    dstate = B.shape[-1]
    ct = _compute_dtype(x, dt, A, B, C, D, initial_state)
    if initial_state is not None and initial_state.shape != (bt, nheads, headdim, dstate):
        raise ValueError(f"initial_state must be {(bt, nheads, headdim, dstate)}, got {tuple(initial_state.shape)}")
    xdt, dA, dA_cum, Bs, Cs = _chunked_inputs(x, dt, A, B, C, chunk_size, groups, ct)

    # 1. Within each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(dA_{j+1..i}) dt_j x_j.
    decay = torch.exp(_segsum(dA))  # (B, c, G, R, Q, Q)
    scores = torch.einsum("bcign,bcjgn->bcgij", Cs, Bs)  # (B, c, G, Q, Q)
    y = torch.einsum("bcgij,bcgrij,bcjgrp->bcigrp", scores, decay, xdt)  # (B, c, Q, G, R, P)

    # 2. State contributed by each chunk's own inputs, as seen at the chunk's end.
    to_end = torch.exp(dA_cum[..., -1:] - dA_cum)  # (B, c, G, R, Q)
    chunk_states = torch.einsum("bcjgn,bcgrj,bcjgrp->bcgrpn", Bs, to_end, xdt)  # (B, c, G, R, P, N)

    # 3. Carry states across chunk boundaries.
    if initial_state is None:
        initial = xdt.new_zeros(bt, groups, per_group, headdim, dstate)
    else:
        initial = initial_state.to(ct).reshape(bt, groups, per_group, headdim, dstate)
    entering, state = _carry_states(chunk_states, dA_cum, initial)  # (B, c, G, R, P, N), (B, G, R, P, N)

    # 4. Contribution of the entering state to every position of its chunk.
    y = y + torch.einsum("bcign,bcgrpn,bcgri->bcigrp", Cs, entering, torch.exp(dA_cum))

    y = y.reshape(bt, -1, nheads, headdim)[:, :length]  # (B, L, H, P)
    if D is not None:
        y = y + D.to(ct)[:, None] * x.to(ct)
    y = y.to(x.dtype)
    if return_final_state:
        return y, state.reshape(bt, nheads, headdim, dstate)
    return y


def ssd_recurrent_step(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One exact step of the SSM recurrence (decoding).

    ``state <- exp(dt A) state + dt x ⊗ B``; ``y = state C + D x``. Pure: the caller copies the
    returned state into its cache buffer.

    Args:
        state: state before this position (B, H, P, N).
        x: input (B, H, P).
        dt: positive step size (B, H).
        A: negative decay rates (H,).
        B: input projection (B, G, N).
        C: output projection (B, G, N).
        D: optional skip weights (H,).

    Returns:
        ``(y, new_state)``: y (B, H, P) in ``x.dtype``, new_state (B, H, P, N) in the compute
        dtype (float32, or float64 for float64 inputs).
    """
    bt, nheads, headdim, dstate = state.shape
    groups = B.shape[1]
    if nheads % groups:
        raise ValueError(f"number of heads {nheads} is not a multiple of the groups {groups}")
    r = nheads // groups
    ct = _compute_dtype(state, x, dt, A, B, C, D)
    s = state.to(ct).reshape(bt, groups, r, headdim, dstate)  # (B, G, R, P, N)
    xs = x.to(ct).reshape(bt, groups, r, headdim)  # (B, G, R, P)
    dts = dt.to(ct).reshape(bt, groups, r)  # (B, G, R)
    decay = torch.exp(dts * A.to(ct).reshape(groups, r))  # (B, G, R)
    Bs, Cs = B.to(ct), C.to(ct)  # (B, G, N)
    s = decay[..., None, None] * s + torch.einsum("bgr,bgrp,bgn->bgrpn", dts, xs, Bs)
    y = torch.einsum("bgrpn,bgn->bgrp", s, Cs).reshape(bt, nheads, headdim)  # (B, H, P)
    if D is not None:
        y = y + D.to(ct)[:, None] * x.to(ct)
    return y.to(x.dtype), s.reshape(bt, nheads, headdim, dstate)


def ssd_recurrent_step_(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None
) -> Tensor:
    """:func:`ssd_recurrent_step` that updates ``state`` in place and returns only y (B, H, P).

    When the state buffer already has the compute dtype (a float32 state, the default) the update
    is ``state = decay * state + (dt x) B^T`` as one in-place ``baddbmm`` per group, with no
    state-sized temporaries (3x fewer passes over the state on CPU). Other state dtypes fall back
    to the pure function and a copy.
    """
    bt, nheads, headdim, dstate = state.shape
    groups = B.shape[1]
    ct = _compute_dtype(state, x, dt, A, B, C, D)
    if state.dtype != ct or not state.is_contiguous() or nheads % groups:
        y, new_state = ssd_recurrent_step(state, x, dt, A, B, C, D)
        state.copy_(new_state)
        return y
    r = nheads // groups
    xs = x.to(ct).reshape(bt, groups, r, headdim)  # (B, G, R, P)
    dts = dt.to(ct).reshape(bt, groups, r)  # (B, G, R)
    decay = torch.exp(dts * A.to(ct).reshape(groups, r))  # (B, G, R)
    s = state.view(bt * groups, r * headdim, dstate)  # (B·G, R·P, N)
    s.mul_(decay.reshape(bt * groups, r, 1, 1).expand(-1, -1, headdim, 1).reshape(bt * groups, r * headdim, 1))
    dx = (dts[..., None] * xs).reshape(bt * groups, r * headdim, 1)  # (B·G, R·P, 1)
    s.baddbmm_(dx, B.to(ct).reshape(bt * groups, 1, dstate))
    y = torch.bmm(s, C.to(ct).reshape(bt * groups, dstate, 1)).reshape(bt, nheads, headdim)  # (B, H, P)
    if D is not None:
        y = y + D.to(ct)[:, None] * x.to(ct)
    return y.to(x.dtype)


def ssd_naive(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Ground truth for tests: the recurrence evaluated one position at a time.

    Heads are expanded to their groups explicitly and nothing is chunked, so this shares no
    code path with :func:`ssd_chunked`. Shapes as in :func:`ssd_chunked`.

    Returns:
        ``(y, final_state)``: y (B, L, H, P) in ``x.dtype``, final_state (B, H, P, N).
    """
    _check_shapes(x, dt, A, B, C)
    bt, length, nheads, headdim = x.shape
    ct = _compute_dtype(x, dt, A, B, C, D, initial_state)
    per_group = nheads // B.shape[2]
    Bh = B.to(ct).repeat_interleave(per_group, dim=2)  # (B, L, H, N)
    Ch = C.to(ct).repeat_interleave(per_group, dim=2)  # (B, L, H, N)
    xs, dts, As = x.to(ct), dt.to(ct), A.to(ct)
    if initial_state is None:
        state = xs.new_zeros(bt, nheads, headdim, B.shape[-1])
    else:
        state = initial_state.to(ct)
    ys = []
    for t in range(length):
        decay = torch.exp(dts[:, t] * As)  # (B, H)
        inp = (dts[:, t, :, None] * xs[:, t])[..., None] * Bh[:, t, :, None, :]  # (B, H, P, N)
        state = decay[:, :, None, None] * state + inp
        y_t = (state * Ch[:, t, :, None, :]).sum(-1)  # (B, H, P)
        if D is not None:
            y_t = y_t + D.to(ct)[:, None] * xs[:, t]
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else xs.new_zeros(xs.shape)
    return y.to(x.dtype), state
