"""The block-wise denoising schedule as pure logic (no torch, no communication).

A video of ``latent_frames`` latent frames is cut into blocks. Block ``b``
enters the queue in iteration ``b`` and receives step ``s`` in iteration
``b + s``; it leaves, clean, after its last step. Within an iteration blocks
are processed newest first. The flat list of :class:`Task` in processing order
is the contract every rank follows: ranks never negotiate what comes next.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Block:
    id: int
    """Block index, 0 = oldest (start of the video)."""
    start: int
    """Index of the block's first latent frame in the video."""
    frames: int
    """Latent frames in the block."""


def split_blocks(latent_frames: int, block: int) -> list[Block]:
    """Cut ``latent_frames`` into blocks of ``block``; the first block takes the leftover.

    Wan's VAE maps the first latent frame to 1 frame and every other to 4, so
    ``4k+1`` frames give ``k+1`` latent frames, rarely a multiple of ``block``.
    Giving the remainder to the first block keeps every later block the same
    shape (one compiled shape in steady state) and no block smaller than ``block``.
    """
    if block < 1 or latent_frames < block:
        raise ValueError(f"need at least one block of {block} in {latent_frames} latent frames")
    n = latent_frames // block
    first = latent_frames - (n - 1) * block
    blocks = [Block(0, 0, first)]
    for b in range(1, n):
        blocks.append(Block(b, first + (b - 1) * block, block))
    return blocks


def pixel_frames(latent_start: int, latent_frames: int, temporal: int = 4) -> int:
    """Frames that latent frames ``[latent_start, latent_start + latent_frames)`` decode to.

    The Wan VAE is causal in time: the video's first latent frame decodes to one
    frame, every later one to ``temporal`` frames.
    """
    if latent_frames <= 0:
        return 0
    first = 1 if latent_start == 0 else 0
    return first + temporal * (latent_frames - first)


@dataclass(frozen=True, slots=True)
class Task:
    index: int
    """Position in the global processing order."""
    iteration: int
    """Iteration the task belongs to."""
    block: int
    """Block being denoised."""
    step: int
    """Denoising step the block receives (0 = pure noise in)."""
    older: int | None
    """Block whose last ``num_cat`` latent frames lead the input (state at the end of the previous iteration)."""
    newer: int | None
    """Block whose first-``num_cat``-frame K/V (computed earlier this iteration) are extra keys/values."""
    needs: int
    """Index of the last task whose result must be applied before this task's input is built (-1: none)."""
    last_step: bool
    """The block is clean after this step and leaves the queue."""
    full: bool = True
    """The step is computed (False: its features are forecast from the block's computed steps)."""


def full_steps(steps: int, warmup: int, interval: int, last: int) -> list[bool]:
    """Which denoising steps are computed when the others are forecast: the first ``warmup``, then
    every ``interval``-th, and the final ``last``. The same for every block, so every rank knows
    it from the config alone."""
    return [s < warmup or s >= steps - last or (s - warmup) % interval == 0 for s in range(steps)]


def last_full_step(full: list[bool], step: int) -> int:
    """The latest computed step at or before ``step`` (-1: none)."""
    return max((s for s in range(step + 1) if full[s]), default=-1)


def make_tasks(num_blocks: int, steps: int, full: list[bool] | None = None) -> list[Task]:
    """All tasks of a run, in processing order (iterations, newest block first); ``full`` marks the
    computed steps (default: all)."""
    if num_blocks < 1 or steps < 1:
        raise ValueError("need at least one block and one step")
    if full is not None and len(full) != steps:
        raise ValueError(f"need one full/forecast mark per step, got {len(full)} for {steps} steps")
    where: dict[tuple[int, int], int] = {}  # (iteration, block) -> task index
    tasks: list[Task] = []
    for it in range(num_blocks + steps - 1):
        newest = min(it, num_blocks - 1)
        oldest = max(0, it - steps + 1)
        for b in range(newest, oldest - 1, -1):
            # Inputs come from the end of the previous iteration: this block's own
            # latents and its older neighbour's (queued or just finished).
            deps = [where[k] for k in ((it - 1, b), (it - 1, b - 1)) if k in where]
            task = Task(
                index=len(tasks),
                iteration=it,
                block=b,
                step=it - b,
                older=b - 1 if b > 0 else None,
                newer=b + 1 if b < newest else None,
                needs=max(deps, default=-1),
                last_step=(it - b == steps - 1),
                full=True if full is None else full[it - b],
            )
            where[(it, b)] = task.index
            tasks.append(task)
    return tasks


def num_iterations(num_blocks: int, steps: int) -> int:
    return num_blocks + steps - 1


def max_in_flight(steps: int, num_blocks: int) -> int:
    """Most blocks queued at once: bounded by ``steps``, not by video length."""
    return min(steps, num_blocks)


@dataclass(frozen=True, slots=True)
class Layout:
    """Which frames one task's forward pass sees (derived from the task alone)."""

    context: int
    """Leading latent frames taken from the older neighbour (their outputs are discarded)."""
    own: int
    """The block's own latent frames."""
    extra: int
    """Newer-neighbour frames whose cached K/V are appended."""
    keep: int
    """Own leading frames whose K/V must be cached for the older neighbour."""

    @property
    def frames(self) -> int:
        """Latent frames of the forward pass's input: context, then own."""
        return self.context + self.own


def layout(task: Task, blocks: list[Block], num_cat: int, steps: int) -> Layout:
    own = blocks[task.block].frames
    context = num_cat if task.older is not None else 0
    extra = num_cat if task.newer is not None else 0
    # The older neighbour runs right after this block in the same iteration
    # unless it has just received its last step.
    older_queued = task.block > 0 and task.step + 1 <= steps - 1
    keep = num_cat if older_queued else 0
    return Layout(context=context, own=own, extra=extra, keep=keep)


def split_layers(num_layers: int, world: int, counts: list[int] | None = None) -> list[tuple[int, int]]:
    """Contiguous layer ranges, one per rank: ``counts`` layers each, or sizes differing by at most one.

    Rank 0 also embeds and applies the scheduler and the last rank runs the
    head, so the spare layers of an even split go to the ranks in between first.
    """
    if not 1 <= world <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {world} ranks")
    if counts is not None:
        if len(counts) != world or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(f"cannot split {num_layers} layers over {world} ranks as {counts}")
        sizes = list(counts)
    else:
        base, spare = divmod(num_layers, world)
        order = list(range(1, world - 1)) + [world - 1, 0] if world > 2 else list(range(world))[::-1]
        sizes = [base] * world
        for r in order[:spare]:
            sizes[r] += 1
    ranges, start = [], 0
    for s in sizes:
        ranges.append((start, start + s))
        start += s
    return ranges


# -- causal (autoregressive) mode --------------------------------------------


@dataclass(frozen=True, slots=True)
class CausalTask:
    index: int
    """Position in the global processing order."""
    iteration: int
    """Iteration the task belongs to (in the sequential schedule: the chunk)."""
    chunk: int
    """Chunk being processed."""
    step: int
    """Denoising step (``steps`` for the commit pass)."""
    commit: bool
    """The pass on the chunk's clean latents at t = 0 that writes its K/V to the caches."""
    needs: int
    """Index of the task whose prediction must be applied before this input is built (-1: none)."""
    pending: bool
    """Younger chunks of the same iteration attend to this pass's K/V (staggered only)."""


def make_causal_tasks(num_chunks: int, steps: int, staggered: bool) -> list[CausalTask]:
    """All passes of a causal run, in processing order.

    Sequential: each chunk gets all its steps, then its commit pass, then the
    next chunk starts (what Self-Forcing and LongLive compute). Staggered:
    chunk ``c`` enters in iteration ``c`` and receives step ``s`` in iteration
    ``c + s`` (the commit in ``c + steps``); within an iteration chunks go
    oldest first, so each attends to the current K/V of the older chunks still
    in flight, and a commit reaches the caches before the younger chunks read them.
    """
    if num_chunks < 1 or steps < 1:
        raise ValueError("need at least one chunk and one step")
    tasks: list[CausalTask] = []
    where: dict[tuple[int, int], int] = {}

    def add(it: int, c: int, s: int, pending: bool) -> None:
        t = CausalTask(index=len(tasks), iteration=it, chunk=c, step=s, commit=s == steps,
                       needs=where.get((c, s - 1), -1), pending=pending)
        where[(c, s)] = t.index
        tasks.append(t)

    if staggered:
        for it in range(num_chunks + steps):
            oldest, newest = max(0, it - steps), min(it, num_chunks - 1)
            for c in range(oldest, newest + 1):
                add(it, c, it - c, pending=(it - c < steps and c < newest))
    else:
        for c in range(num_chunks):
            for s in range(steps + 1):
                add(c, c, s, pending=False)
    return tasks
