"""Fast forms of the book's model and alignment loss, swapped in for training; tests/test_model.py and
tests/test_align.py keep each equal to its readable form.

    MLP                   FastMLP: SwiGLU.apply, a backward that keeps g and u but not silu(g)
    Attention.attend      FastAttention: without a mask, SDPA's grouped-query path (flash / cuDNN)
    Decoder               FastDecoder: right_padded=True runs plain causal attention; masks additive, built once
    CausalLM              FastCausalLM: logits_at as flat indices (index_select), right_padded passed down
    align.alignment_loss  alignment_loss: same signature and value, one batched pass, no host sync
    evaluate.choice_logprobs  choice_logprobs: each shared prefix forwarded once into a KV cache, then the tails
"""

import torch
import torch.nn.functional as F

from ..align import MMD_MAX_ROWS, MMD_SIGMAS
from ..data import choices_of, left_pad
from ..data import logit_indices  # noqa: F401  (the host-side half of the sync-free call, re-exported)
from ..evaluate import _batches, _task_context, encode_choices
from ..model import MLP, Attention, CausalLM, Decoder, KVCache, project

KERNEL_CHUNK = 2 ** 26  # elements of [positions, rows, rows, bandwidths] evaluated at once (256 MB in fp32)


# ----------------------------------------------------------------------------- the model

def install(model):
    """Swap the fast forms into a built CausalLM in place (classes change, state_dict stays) and return it."""
    swap = {CausalLM: FastCausalLM, Decoder: FastDecoder, Attention: FastAttention, MLP: FastMLP}
    for m in model.modules():
        m.__class__ = swap.get(type(m), type(m))
    return model


class SwiGLU(torch.autograd.Function):
    """silu(g) * u keeping only g and u for the backward (autograd would also keep silu(g)); the backward runs
    autograd's own ops, so gradients are bitwise the book's MLP's."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph (MeTA-LoRA's second order): silu_backward has no derivative
            s = torch.sigmoid(g)
            return dy * u * s * (1 + g * (1 - s)), dy * F.silu(g)
        return torch.ops.aten.silu_backward(dy * u, g), dy * F.silu(g)


class FastMLP(MLP):
    def forward(self, x, a_outputs=None):
        h = SwiGLU.apply(project(self.gate_proj, x, a_outputs), project(self.up_proj, x, a_outputs))
        return project(self.down_proj, h, a_outputs)


class FastAttention(Attention):
    def attend(self, q, k, v, mask):
        if mask is None:  # plain causal: SDPA's flash / cuDNN kernels take grouped-query heads as they are
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_head)
        return super().attend(q, k, v, mask)  # with a mask, enable_gqa can leave only the math kernel on GPU


def is_right_padded(mask: torch.Tensor) -> bool:
    """Every row is ones then zeros (plain causal attention is exact); call it on the CPU batch (no host sync)."""
    m = mask.to(torch.int8)
    return bool((m[:, 1:] <= m[:, :-1]).all())


class FastDecoder(Decoder):
    def forward(self, input_ids, attention_mask=None, cache=None, position_ids=None, grad_ckpt=False,
                right_padded=None):
        """right_padded: True drops the mask, False applies it, None decides by is_right_padded (eager only)."""
        if attention_mask is not None and cache is None:
            if right_padded is None:
                right_padded = False if torch.compiler.is_compiling() else is_right_padded(attention_mask)
            if right_padded:
                if position_ids is None:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                attention_mask = None
        return super().forward(input_ids, attention_mask, cache, position_ids, grad_ckpt)

    def mask(self, attention_mask, T, past, x):
        m = super().mask(attention_mask, T, past, x)
        # additive, once per forward: SDPA would turn a bool mask into this in every layer
        return None if m is None else torch.zeros(m.shape, dtype=x.dtype, device=x.device).masked_fill_(~m, -torch.inf)


class FastCausalLM(CausalLM):
    def forward(self, input_ids, attention_mask=None, *, logits_at=None, cache=None, position_ids=None,
                right_padded=None):
        """As CausalLM's; `logits_at` may also be flat indices b·T + t (logit_indices: no sync, one shape)."""
        h = self.model(input_ids, attention_mask, cache, position_ids, grad_ckpt=self.gradient_checkpointing,
                       right_padded=right_padded)
        if logits_at is not None:
            if logits_at.dtype == torch.bool:
                h = h[logits_at]
            elif logits_at.dim() == 1 and not logits_at.is_floating_point():
                h = h.flatten(0, 1).index_select(0, logits_at)
            else:
                raise ValueError(f"logits_at must be a bool [batch, seq] mask or a 1-D integer tensor of flat indices "
                                 f"(logit_indices), got {logits_at.dtype} of shape {tuple(logits_at.shape)}")
        return self.lm_head(h)


# ----------------------------------------------------------------------------- the alignment loss
#
# align.alignment_loss cuts each task's rows out (a host sync per task); here every task gets a 0/1 weight per row
# and position instead, and means, variances and kernel means are weighted sums. The groups as weights:
#   x      [R, S, k]  all rows (examples or tokens) at S positions, zero where not counted
#   w      [G, R, S'] 1 where row r counts for group g at position s (S' = 1: the same at every position)
#   member [G, R]     rows that belong to group g (at most one group per row; what max_rows subsamples)
#   ok     [G]        groups that take part (task_groups' rule: at least 2 rows, or 2 examples position-wise)

def _counted(x, m):
    """x in at least fp32, 0 where m is False (where, not multiply: a masked NaN gets a zero gradient)."""
    return torch.where(m[..., None], x.to(torch.promote_types(x.dtype, torch.float32)), 0.0)


def _wsum(w, x):
    """Σ_r w[g, r, s] · x[r, s, :] -> [G, S, k]; a w without per-position weights is one matmul."""
    if w.shape[2] == 1:
        return (w[:, :, 0] @ x.flatten(1)).view(w.shape[0], *x.shape[1:])
    return torch.einsum("grs,rsk->gsk", w, x)


def _reduce_pairs(D, valid, pair_reduction):
    """D, valid [P, S] -> each pair's mean over its valid positions, then mean or sum over pairs (no sync)."""
    n = valid.sum(-1)
    per_pair = torch.where(valid, D, 0.0).sum(-1) / n.clamp(min=1)
    keep = n > 0
    total = torch.where(keep, per_pair, 0.0).sum()
    return total / keep.sum().clamp(min=1) if pair_reduction == "mean" else total


def _no_autocast(x):
    """fp32 on purpose: under bf16 autocast the variances and kernels would lose the digits they need."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _kl(rows, eps=1e-8, pair_reduction="mean"):
    x, w, member, ok = rows
    w = w.to(x.dtype)
    G = w.shape[0]
    with _no_autocast(x):
        n = w.sum(1)[..., None]                                          # [G, S', 1]
        mu = _wsum(w, x) / n.clamp(min=1)                                # [G, S, k]
        # each row centred on its own group's mean (two passes, as the variance is usually computed); the one-hot
        # matmul picks that mean exactly and, unlike indexing, has a matmul for its backward
        d = x - (member.t().to(x.dtype) @ mu.flatten(1)).view_as(x)
        var = _wsum(w, d * d) / (n - 1).clamp(min=1)
        valid = ((n[..., 0] >= 2) & ok[:, None]).expand(mu.shape[:2])    # [G, S]
        # invalid positions get harmless stand-ins: their D is discarded, and finite values keep the
        # gradient finite too (a NaN in a discarded branch of `where` still poisons the backward)
        mu = torch.where(valid[..., None], mu, 0.0)
        v = torch.where(valid[..., None], var, 1.0) + eps
        p, q = torch.triu_indices(G, G, 1, device=x.device)              # unordered pairs p < q
        mp, mq, vp, vq = mu[p], mu[q], v[p], v[q]                        # [P, S, r]
        kl_pq = 0.5 * (vq.log() - vp.log() + vp / vq + (mq - mp) ** 2 / vq - 1).sum(-1)  # KL(p‖q) [P, S]
        kl_qp = 0.5 * (vp.log() - vq.log() + vq / vp + (mp - mq) ** 2 / vp - 1).sum(-1)  # KL(q‖p)
        return _reduce_pairs(0.5 * (kl_pq + kl_qp), valid[p] & valid[q], pair_reduction)


def _mmd(rows, sigmas=None, max_rows=MMD_MAX_ROWS, pair_reduction="mean"):
    x, w, member, ok = rows
    sig = torch.tensor(MMD_SIGMAS if sigmas is None else [float(s) for s in sigmas], dtype=x.dtype, device=x.device)
    w = w.to(x.dtype)
    G = w.shape[0]
    if max_rows is not None and max_rows < x.shape[0]:
        idx, keep = _pick_rows(member, int(max_rows))                    # [G, m] rows of each group
        x = x[idx.flatten()]                                             # [G·m, S, k], group by group
        own = w[torch.arange(G, device=x.device)[:, None], idx] * keep[..., None]     # [G, m, S']
        w = (torch.eye(G, dtype=w.dtype, device=x.device)[:, :, None, None] * own[None]).flatten(1, 2)
    with _no_autocast(x):
        K = _kernel_means(x, w, sig)                                     # [S, G, G]
        p, q = torch.triu_indices(G, G, 1, device=x.device)
        D = (K[:, p, p] + K[:, q, q] - 2 * K[:, p, q]).t()               # [P, S]
        present = ((w.sum(1) > 0) & ok[:, None]).expand(G, x.shape[1])   # ≥1 row of the group at that position
        return _reduce_pairs(D, present[p] & present[q], pair_reduction)


def _pick_rows(member, m):
    """(idx [G, m], keep [G, m]): per group, the rows linspace(0, n-1, m).round() picks (a smaller group: all)."""
    n = member.sum(1)[:, None]                                           # [G, 1]
    i = torch.arange(m, device=member.device)
    last = (n - 1).float()
    step = last / max(m - 1, 1)
    pos = torch.where(i < m // 2, step * i, last - step * (m - 1 - i)).round().long() if m > 1 else 0 * i
    want = torch.where(n > m, pos, i)
    idx = torch.searchsorted(member.long().cumsum(1), want + 1)          # the (want+1)-th row of the group
    return idx.clamp(max=member.shape[1] - 1), i < n.clamp(max=m)


def _kernel_means(x, w, sig):
    """[S, G, G]: per position, the mean Σ_σ exp(−‖x_r − x_t‖² / (2σ)) over rows r of p, t of q, in chunks."""
    R, S = x.shape[:2]
    chunk = max(1, KERNEL_CHUNK // (R * R * len(sig)))
    return torch.cat([_kernel_means_chunk(x[:, s:s + chunk], w if w.shape[2] == 1 else w[:, :, s:s + chunk], sig)
                      for s in range(0, S, chunk)])


def _kernel_means_chunk(x, w, sig):
    xs = x.transpose(0, 1)                                               # [S, R, k]
    # exact differences (not the |x|²+|y|²−2xy expansion): with σ down to 1e-6 the round-off of the expansion
    # (~1e-7·|x|²) would turn exp(−0/2σ)=1 into ~0.6 on the diagonal
    d = torch.cdist(xs, xs, compute_mode="donot_use_mm_for_euclid_dist") ** 2          # [S, R, R]
    k = GaussianKernels.apply(d, sig)
    ws = w.permute(2, 0, 1)                                              # [S', G, R]
    n = ws.sum(-1)
    return ws @ k @ ws.transpose(1, 2) / (n[:, :, None] * n[:, None, :]).clamp(min=1)


class GaussianKernels(torch.autograd.Function):
    """k(d) = Σ_σ exp(−d/(2σ)), keeping only k'(d) for the backward (not the [.., n_σ] exponentials)."""

    @staticmethod
    def forward(ctx, d, sig):
        c = -0.5 / sig
        e = (d[..., None] * c).exp_()                                    # [.., n_σ]: exp(−d/(2σ))
        ctx.save_for_backward(e @ c)
        return e.sum(-1)

    @staticmethod
    def backward(ctx, g):
        (dk,) = ctx.saved_tensors
        return g * dk, None


def _check_batch(a_output, token_mask, task_ids):
    if a_output.ndim != 3:
        raise ValueError(f"a_output must be [B, T, r], got shape {tuple(a_output.shape)}")
    B, T, _ = a_output.shape
    if token_mask.shape != (B, T):
        raise ValueError(f"token_mask has shape {tuple(token_mask.shape)}, expected {(B, T)} like the A-output")
    if task_ids.shape != (B,):
        raise ValueError(f"task_ids has shape {tuple(task_ids.shape)}, expected ({B},): one task id per example")


def _task_onehot(task_ids, num_tasks=None):
    """[G, B] bool, example b is of task g: tasks 0..num_tasks-1, or the ids present (a host sync); CPU ids are
    range-checked in eager mode."""
    if num_tasks is None:
        return task_ids[None] == task_ids.unique()[:, None]
    on_host = task_ids.device.type == "cpu" and not torch.compiler.is_compiling()
    if on_host and bool(((task_ids < 0) | (task_ids >= num_tasks)).any()):
        raise ValueError(f"task_ids must lie in [0, {num_tasks}), got {sorted(set(task_ids.tolist()))}")
    return task_ids[None] == torch.arange(num_tasks, device=task_ids.device)[:, None]


def _task_rows(z, token_mask, onehot, position_wise):
    """A-outputs z [B, T, M, r] of M modules -> (x, w, member, ok) as above, the modules as positions."""
    B, T, M, r = z.shape
    if position_wise:   # rows: examples; positions: (token, module)
        counts = token_mask[:, :, None].expand(B, T, M).reshape(B, T * M)
        x = _counted(z.reshape(B, T * M, r), counts)
        return x, onehot[:, :, None] & counts[None], onehot, onehot.sum(1) >= 2
    counts = token_mask.reshape(B * T)    # rows: tokens; positions: modules
    member = onehot.repeat_interleave(T, dim=1) & counts[None]           # [G, B·T]
    x = _counted(z.reshape(B * T, M, r), counts[:, None].expand(B * T, M))
    return x, member[:, :, None], member, member.sum(1) >= 2


def alignment_loss(a_outputs, token_mask, task_ids, kind="kl", position_wise=False, pair_reduction="mean",
                   module_reduction="mean", num_tasks=None, **kw):
    """nanoalign.align.alignment_loss (METHODS §3.3-3.5, same arguments and value), its groups as weights: no host
    sync when num_tasks is given, and the modules of one shape in one batched pass. Checks its arguments."""
    fns = {"kl": _kl, "mmd": _mmd}
    given = {"alignment kind": (kind, ("kl", "mmd")), "module_reduction": (module_reduction, ("mean", "sum")),
             "pair_reduction": (pair_reduction, ("mean", "sum"))}
    for name, (value, allowed) in given.items():
        if value not in allowed:
            raise ValueError(f"{name} must be {allowed[0]!r} or {allowed[1]!r}, got {value!r}")
    if not a_outputs:
        raise ValueError("no A-outputs to align: run the forward inside adapter_context(model, collect=True) "
                         "on a model with adapters applied")
    zs = list(a_outputs.values())
    for z in zs:
        _check_batch(z, token_mask, task_ids)
    device = zs[0].device
    token_mask, onehot = token_mask.bool().to(device), _task_onehot(task_ids.to(device), num_tasks)
    if onehot.shape[0] < 2:
        return torch.zeros((), device=device)
    # modules with A-outputs of one shape and dtype go in one go, as positions of one set of rows
    parts = [torch.stack(zs, 2)] if len({(z.shape, z.dtype) for z in zs}) == 1 else [z[:, :, None] for z in zs]
    total = sum(fns[kind](_task_rows(z, token_mask, onehot, position_wise), pair_reduction=pair_reduction, **kw)
                * z.shape[2] for z in parts)
    return total / len(zs) if module_reduction == "mean" else total


# ----------------------------------------------------------------------------- option scoring

def shared_prefixes(tok, examples, max_len, joint, share_prefix):
    """The forwards to run: (example index, prefix ids, [(choice, tail ids, n scored)]) per unit. A choice's tokens
    are prefix + tail, and its score sums the log-probs of their last n (its continuation).

    A unit is a context shared by choices (tail = continuation); with share_prefix, one unit per example whose
    prefix is the longest token prefix all its choices share, leaving every tail a token: WinoGrande's two contexts
    share the words before the blank, PIQA's solutions often their first words.
    """
    units = []
    for e, ex in enumerate(examples):
        pairs = encode_choices(tok, ex, max_len, joint)
        if share_prefix:
            keep = max(1, max_len - max(len(cont) for _, cont in pairs))
            seqs = [ctx[-keep:] + cont for ctx, cont in pairs]
            n = 0
            while n < min(map(len, seqs)) - 1 and len({s[n] for s in seqs}) == 1:
                n += 1
            if n:  # (else: no token shared, one unit per context)
                tails = [(c, s[n:], len(cont)) for c, (s, (_, cont)) in enumerate(zip(seqs, pairs))]
                units.append((e, seqs[0][:n], tails))
                continue
        by_context = {}
        for c, (ctx, cont) in enumerate(pairs):
            by_context.setdefault(tuple(ctx), []).append((c, cont, len(cont)))
        for ctx, rows in by_context.items():
            keep = max(1, max_len - max(len(tail) for _, tail, _ in rows))
            units.append((e, list(ctx[-keep:]), rows))
    return units


def _padded_batches(items, lengths, batch_size, bounded, waste=0.1):
    """Consecutive runs of items (sorted by length) of at most batch_size; bounded also closes a run before an item
    that would make more than `waste` of the run's padded positions padding (long tails get batches of their own)."""
    out, run, real = [], [], 0
    for item, n in zip(items, lengths):
        if run and (len(run) == batch_size or bounded and real + n < (1 - waste) * (len(run) + 1) * n):
            out.append(run)
            run, real = [], 0
        run.append(item)
        real += n
    return out + [run] if run else out


@torch.no_grad()
def choice_logprobs(model, tok, examples, batch_size=32, max_len=1024, joint=False, task_id=None,
                    advance=None, by_length=False):
    """evaluate.choice_logprobs' sums, with the choices that share a prefix (`shared_prefixes`) sharing one forward
    of it: the left-padded prefixes fill a KV cache, and the prefix positions score the tokens they predict; then
    each choice's right-padded tail runs after its copy of the cached prefix. by_length shares the longest common
    prefix, batches the tails of 8 × batch_size prefixes by length (their caches are kept meanwhile) and closes a
    batch of prefixes or tails early rather than pad more than 10% of it (`_padded_batches`); off,
    the shared prefix is the context and each batch's tails run in one forward after it, which keeps the grids'
    cached scores bitwise reproducible.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    units = shared_prefixes(tok, examples, max_len, joint, share_prefix=by_length)
    rows = [(u, c, tail, n) for u, (_, _, tails) in enumerate(units) for c, tail, n in tails]  # one per choice
    rows_of = [[] for _ in units]
    for r, (u, *_) in enumerate(rows):
        rows_of[u].append(r)
    total = torch.zeros(len(rows), device=device)
    chunk = batch_size * (8 if by_length else 1)
    for parts, _ in _batches(units, chunk, [len(u[1]) for u in units]):
        cached = {}  # unit -> (its batch's cache and mask, its row there)
        for batch in _padded_batches(parts, [len(units[u][1]) for u in parts], batch_size, by_length):
            prefixes = [units[u][1] for u in batch]
            ids, mask = left_pad(prefixes, tok.pad_id)
            ids, mask = ids.to(device), mask.to(device)
            B, P = ids.shape
            picks = []  # (row, batch row, column, token): token t of prefix + tail is predicted at position t - 1
            for j, (u, prefix) in enumerate(zip(batch, prefixes)):
                for r in rows_of[u]:
                    seq, n = prefix + rows[r][2], rows[r][3]
                    picks += [(r, j, P - len(prefix) + t - 1, seq[t]) for t in range(len(seq) - n, len(prefix) + 1)]
            at = torch.zeros(B, P, dtype=torch.bool)
            for _, j, col, _ in picks:
                at[j, col] = True
            where = at.flatten().cumsum(0) - 1  # each selected position's row in the returned logits
            needed = not by_length or any(len(rows[r][2]) > 1 for u in batch for r in rows_of[u])
            cache = KVCache(model.config, B, P, dtype, device) if needed else None
            with _task_context(model, task_id, B, device):
                logp = model(ids, mask, logits_at=at.to(device), cache=cache).float().log_softmax(-1)
            got = logp[where[[j * P + col for _, j, col, _ in picks]].to(device),
                       torch.tensor([t for *_, t in picks], dtype=torch.long, device=device)]
            total = total.index_add(0, torch.tensor([r for r, *_ in picks], dtype=torch.long, device=device), got)
            cached.update({u: (cache, mask, j) for j, u in enumerate(batch)})
        todo = [r for u in parts for r in rows_of[u]]
        if by_length:
            todo = sorted((r for r in todo if len(rows[r][2]) > 1), key=lambda r: len(rows[r][2]))
            groups = _padded_batches(todo, [len(rows[r][2]) - 1 for r in todo], batch_size, bounded=True)
        else:
            groups = [todo] if max(len(rows[r][2]) for r in todo) > 1 else []
        for group in groups:  # each tail after its prefix, its cached keys/values right-aligned at P
            P = max(cached[rows[r][0]][1].shape[1] for r in group)
            O = max(len(rows[r][2]) for r in group)
            more = KVCache(model.config, len(group), P + O - 1, dtype, device)
            more.length = P
            ids = torch.full((len(group), O - 1), int(tok.pad_id), dtype=torch.long)
            mask = torch.zeros(len(group), P + O - 1, dtype=torch.bool)
            scored = torch.zeros(len(group), O - 1, dtype=torch.bool)  # tail position k predicts tail token k + 1
            targets = []
            for g, r in enumerate(group):
                (cache, prefix_mask, j), tail, n = cached[rows[r][0]], rows[r][2], rows[r][3]
                p = prefix_mask.shape[1]
                more.k[:, g, :, P - p:P], more.v[:, g, :, P - p:P] = cache.k[:, j], cache.v[:, j]
                mask[g, P - p:P] = prefix_mask[j].cpu()
                ids[g, :len(tail) - 1] = torch.tensor(tail[:-1], dtype=torch.long)
                mask[g, P:P + len(tail) - 1] = True
                scored[g, max(0, len(tail) - n - 1):len(tail) - 1] = True
                targets += tail[max(1, len(tail) - n):]
            with _task_context(model, task_id, len(group), device):
                logp = model(ids.to(device), mask.to(device), logits_at=scored.to(device),
                             cache=more).float().log_softmax(-1)
            token_lp = logp.gather(-1, torch.tensor(targets, device=device)[:, None]).squeeze(-1)
            where = torch.tensor(group)[scored.nonzero()[:, 0]].to(device)
            total = total.index_add(0, where, token_lp)
        if advance:
            advance(sum(len(rows_of[u]) for u in parts))
    scores = [[0.0] * len(choices_of(ex)[0]) for ex in examples]
    lengths = [[0] * len(s) for s in scores]
    for (u, c, _, n), v in zip(rows, total.tolist()):
        scores[units[u][0]][c], lengths[units[u][0]][c] = v, n
    return scores, lengths
