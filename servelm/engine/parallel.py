"""Tensor parallelism over the GPUs of one host: one process per GPU, Megatron-style layers.

Each rank holds a slice of every layer (nano-vllm and vLLM split the same way):

- ``qkv_proj`` and ``gate_up_proj`` are column-parallel: each rank keeps its heads' rows of q, k
  and v (query *and* KV heads are split, so each rank caches only its KV heads) and its share of
  the intermediate rows; no communication.
- ``o_proj`` and ``down_proj`` are row-parallel: each rank multiplies its input columns and the
  partial sums are all-reduced (two all-reduces per layer).
- ``lm_head`` is vocab-parallel: each rank computes logits for its slice of the vocabulary and an
  all-gather puts the whole row together on every rank. The embedding is replicated (a lookup reads
  only the rows it needs, so splitting it would save memory but no time).

Rank 0 is the engine: it schedules, samples and talks to clients. Before every model call it sends
the step's inputs (token ids, positions, block tables: not the sequences) to the workers through
shared memory, as nano-vllm does; workers run the same forward pass (and the same CUDA graphs) and
meet rank 0 in the collectives. NCCL on CUDA, gloo on the CPU (tests).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import socket
import struct
import traceback
from datetime import timedelta
from multiprocessing import shared_memory

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("servelm.engine")
# torch 2.13 renamed all_gather_into_tensor (kept, deprecated); the GPU machine's torch 2.11 has the old name only.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

SHM_BYTES = 1 << 26  # one step's pickled inputs; a 64k-token prefill is ~0.5 MB


class RowParallelLinear(nn.Module):
    """``x @ W.T`` over this rank's input columns, summed across ranks (all-reduce)."""

    def __init__(self, weight: torch.Tensor, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y


class VocabParallelHead(nn.Module):
    """LM head over this rank's vocabulary rows; ``forward`` returns full-vocabulary logits on every rank."""

    def __init__(self, weight: torch.Tensor, group, world: int):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.group, self.world = group, world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = F.linear(x, self.weight)  # [T, V / world]
        t, v = part.shape
        parts = torch.empty((self.world * t, v), dtype=part.dtype, device=part.device)
        _all_gather(parts, part, group=self.group)
        return parts.view(self.world, t, v).permute(1, 0, 2).reshape(t, self.world * v)


def check_shardable(cfg, world: int) -> None:
    """Raises ValueError unless the model's heads, KV heads, MLP and vocabulary divide by ``world``."""
    for what, n in (("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                    ("intermediate size", cfg.intermediate_size), ("vocabulary size", cfg.vocab_size)):
        if n % world:
            raise ValueError(f"tensor_parallel_size={world} does not divide the model's {what} ({n}); "
                             f"choose a size that divides {cfg.num_heads} heads and {cfg.num_kv_heads} KV heads")


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous().clone(), requires_grad=False)


@torch.no_grad()
def shard_model(model, rank: int, world: int, group=None) -> None:
    """Keep this rank's slice of every layer of a loaded (full) Llama model, in place.

    ``model.config`` becomes a per-rank copy (its head counts are this rank's, which sizes the KV cache).
    """
    cfg = model.config
    check_shardable(cfg, world)
    d = cfg.head_dim
    for layer in model.layers:
        a = layer.self_attn
        h, kvh = a.num_heads // world, a.num_kv_heads // world
        q_rows = slice(rank * h * d, (rank + 1) * h * d)
        k_rows = slice(a.q_size + rank * kvh * d, a.q_size + (rank + 1) * kvh * d)
        v_rows = slice(a.q_size + a.kv_size + rank * kvh * d, a.q_size + a.kv_size + (rank + 1) * kvh * d)
        w = a.qkv_proj.weight
        a.qkv_proj.weight = _param(torch.cat([w[q_rows], w[k_rows], w[v_rows]]))
        if a.qkv_proj.bias is not None:
            b = a.qkv_proj.bias
            a.qkv_proj.bias = _param(torch.cat([b[q_rows], b[k_rows], b[v_rows]]))
        a.qkv_proj.out_features = a.qkv_proj.weight.shape[0]
        a.o_proj = RowParallelLinear(a.o_proj.weight[:, q_rows].contiguous().clone(), group)
        a.num_heads, a.num_kv_heads, a.q_size, a.kv_size = h, kvh, h * d, kvh * d
        m = layer.mlp
        inter = m.intermediate_size // world
        w = m.gate_up_proj.weight
        own = slice(rank * inter, (rank + 1) * inter)
        m.gate_up_proj.weight = _param(torch.cat([w[own], w[m.intermediate_size:][own]]))
        m.gate_up_proj.out_features = 2 * inter
        m.down_proj = RowParallelLinear(m.down_proj.weight[:, own].contiguous().clone(), group)
        m.intermediate_size = inter
    vocab = cfg.vocab_size // world
    model.lm_head = VocabParallelHead(model.lm_head.weight[rank * vocab:(rank + 1) * vocab].contiguous().clone(),
                                      group, world)
    model.config = dataclasses.replace(cfg, num_heads=cfg.num_heads // world, num_kv_heads=cfg.num_kv_heads // world,
                                       intermediate_size=cfg.intermediate_size // world)
    if model.embed_tokens.weight.device.type == "cuda":
        torch.cuda.empty_cache()


# -- what travels to the workers each step -------------------------------------------------------

class _Tail:
    """A sequence's token ids from ``offset`` on, indexed by absolute position (what the runner reads)."""

    __slots__ = ("offset", "ids")

    def __init__(self, offset: int, ids: list[int]):
        self.offset, self.ids = offset, ids

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.ids[i.start - self.offset:i.stop - self.offset]
        return self.ids[i - self.offset]


class _PromptScoring:
    """What a worker needs of ``SamplingParams`` to score prompt tokens as rank 0 does."""

    __slots__ = ("prompt_logprobs",)

    def __init__(self, k: int):
        self.prompt_logprobs = k


class StepSeq:
    """The part of a :class:`Sequence` the model runner reads for one step. A sequence that scores its prompt
    (``prompt_logprobs``) brings how many tokens are scored so far, so every rank computes the same rows'
    logits: the vocabulary-parallel head gathers across ranks, and each rank must join each gather."""

    __slots__ = ("num_computed_tokens", "num_tokens", "block_table", "token_ids", "prompt_logprobs",
                 "num_prompt_tokens", "params")
    pending_tokens = 0  # async scheduling is off: every token is known on the host
    spec_token_ids = ()  # speculative decoding does not run under tensor parallelism

    def __init__(self, start: int, num_tokens: int, block_table: list[int], tail: list[int],
                 scoring: tuple[int, int, int] | None = None):
        self.num_computed_tokens, self.num_tokens, self.block_table = start, num_tokens, block_table
        self.token_ids = _Tail(start, tail)
        self.prompt_logprobs = self.params = None
        self.num_prompt_tokens = 0
        if scoring is not None:  # (k, prompt tokens scored so far, prompt length)
            k, done, self.num_prompt_tokens = scoring
            self.prompt_logprobs, self.params = [None] * done, _PromptScoring(k)

    @property
    def num_tokens_incl_pending(self) -> int:
        return self.num_tokens


def pack_items(items) -> list[tuple]:
    """(seq, n) pairs as plain tuples: only the tokens this step computes travel, not the whole history."""
    return [(s.num_computed_tokens, s.num_tokens, s.block_table, s.token_ids[s.num_computed_tokens:s.num_tokens], n,
             None if s.prompt_logprobs is None else
             (s.params.prompt_logprobs, len(s.prompt_logprobs), s.num_prompt_tokens))
            for s, n in items]


def unpack_items(packed: list[tuple]) -> list[tuple[StepSeq, int]]:
    return [(StepSeq(start, total, table, tail, scoring), n) for start, total, table, tail, n, scoring in packed]


class StepChannel:
    """Rank 0 → workers, one message at a time, through shared memory and two semaphores per worker.

    ``ready[r]`` says a message waits; ``free[r]`` says worker r has read the previous one (rank 0 may
    otherwise run ahead by a step whose GPU work it does not wait for). Semaphores, not Events: a
    multiprocessing ``Event.set()`` waits until every sleeper has woken, so setting the event of a
    worker that died while waiting on it would block rank 0 forever; ``Semaphore.release()`` never blocks.
    """

    def __init__(self, ctx, world: int):
        self.shm = shared_memory.SharedMemory(create=True, size=SHM_BYTES)
        self.ready = [ctx.Semaphore(0) for _ in range(world - 1)]
        self.free = [ctx.Semaphore(1) for _ in range(world - 1)]

    def send(self, method: str, args: tuple, alive) -> None:
        """Write one message once every worker has read the last; raises RuntimeError if ``alive()`` turns False."""
        data = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) + 4 > SHM_BYTES:
            raise ValueError(f"a tensor-parallel step message of {len(data)} bytes exceeds {SHM_BYTES}")
        for sem in self.free:
            while not sem.acquire(timeout=5.0):
                if not alive():
                    raise RuntimeError("a tensor-parallel worker process died; see its traceback above")
        self.shm.buf[:4] = struct.pack("<I", len(data))
        self.shm.buf[4:4 + len(data)] = data
        for sem in self.ready:
            sem.release()

    def close(self) -> None:
        self.shm.close()
        self.shm.unlink()


def _recv(shm, ready, free):
    ready.acquire()
    (n,) = struct.unpack("<I", bytes(shm.buf[:4]))
    method, args = pickle.loads(shm.buf[4:4 + n])
    free.release()
    return method, args


# -- process group ---------------------------------------------------------------------------------

def init_group(rank: int, world: int, port: int, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    # All ranks share one host: bootstrap over loopback. By default gloo binds to the address the
    # hostname resolves to, which in some VMs is unreachable (init then hangs).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    if dist.is_initialized():  # see _leave_group(): an NCCL group outlives its engine
        raise RuntimeError("a tensor-parallel engine already ran in this process and its NCCL group lives "
                           "until the process exits; start another tensor-parallel engine in a new process")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=10))


def agree_min(value: int, device: torch.device) -> int:
    """The smallest ``value`` over all ranks (every rank must size its KV pool alike)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorParallel:
    """Rank 0's handle on the worker processes (ranks 1..world-1); ``call`` runs a runner method on all of them."""

    def __init__(self, config, world: int, device: torch.device):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.world = world
        self.channel = StepChannel(ctx, world)
        port = free_port()
        self.procs = []
        for r in range(1, world):
            p = ctx.Process(target=_worker_main, name=f"servelm-tp{r}", daemon=True,
                            args=(config, r, world, port, self.channel.shm.name, self.channel.ready[r - 1],
                                  self.channel.free[r - 1]))
            p.start()
            self.procs.append(p)
        init_group(0, world, port, rank_device(device, 0))
        self.closed = False

    def call(self, method: str, *args) -> None:
        self.channel.send(method, args, self.alive)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        """Stop the workers and leave the process group (idempotent)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.channel.send("exit", (), self.alive)
        except RuntimeError:  # a worker is gone already; join/terminate the rest below
            pass
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        self.channel.close()
        _leave_group()


def _worker_main(config, rank: int, world: int, port: int, shm_name: str, ready, free) -> None:
    """A worker: load and shard the model, size the same KV pool as rank 0, then run steps until told to exit."""
    shm = shared_memory.SharedMemory(name=shm_name)
    try:
        from servelm.engine.llm_engine import build_runner  # noqa: PLC0415 (import cycle)
        from servelm.engine.models.loader import load_model

        device = rank_device(config.torch_device(), rank)
        dtype = config.torch_dtype(device)
        torch.manual_seed(config.seed)
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        init_group(rank, world, port, device)
        log.info("tensor-parallel worker %d/%d up on %s", rank, world, device)
        loaded = load_model(config.model, dtype, device, config.max_model_len, config.seed,
                            download_dir=config.download_dir)
        runner, num_blocks = build_runner(config, loaded, device, dtype, sampler=None)
        log.info("tensor-parallel worker %d ready: %d KV blocks", rank, num_blocks)
        while True:
            method, args = _recv(shm, ready, free)
            if method == "exit":
                break
            if method == "run":
                runner.run(unpack_items(args[0]))
            elif method == "all_logits":
                runner.all_logits(unpack_items(args[0])[0][0])
    except Exception:  # a dead worker would leave rank 0 waiting in a collective: say why loudly
        traceback.print_exc()
        os._exit(1)
    finally:
        shm.close()
    _leave_group()


def _leave_group() -> None:
    """Destroy a gloo group (CPU tests build several engines in one process). An NCCL group is left to
    process exit: after CUDA graphs captured its collectives, destroying it blocked for over a minute
    on the H200 machine."""
    if dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()
