"""NextItNet with TERACON's task-specific masks (Kim et al., KDD 2023, Sec. 4).

Each residual block masks the output of both of its convolutions with a task mask in (0, 1)^C:
task 1 (and every task when relation-aware masks are off) uses m = σ(s·e_t) (Eq. 11); once more
than one task exists, m_t = σ(s·(w_tᵀ tanh(s·E_t) + b_t)) with E_t = [e_t; e_j; −e_j for j ≠ t]
(Eqs. 12–13). Heads live in an nn.ModuleList grown by `add_task`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

RECOMPUTE_BYTES = 2**30  # a pass whose residual blocks would keep more for backward recomputes them there instead
SAVED_PER_POSITION = 5   # [C] float32 tensors a residual block keeps for backward per position it computes (measured:
                         # resources.json's activations at TTL's shapes)
CHECKPOINT_FORMAT = 2  # version of the checkpoint layout written by continual.training.loop.checkpoint_dict
LEGACY_FORMAT = 1      # the layout before it: the parsed command line under "args" (read by checkpoints.py)


@dataclass
class ModelConfig:
    n_items: int                                  # vocabulary with <UNK> (= task 1's class count)
    task_classes: list[int]                       # head sizes, one per task, task 1 first
    channels: int = 256
    dilations: list[int] = field(default_factory=lambda: [1, 4, 1, 4, 1, 4, 1, 4])
    kernel_size: int = 3
    task_emb_init: list[float] = field(default_factory=lambda: [0.0, 2.0])
    task_emb_dist: str = "uniform"                # uniform: U(task_emb_init); normal: N(mean, std) = task_emb_init
    relation: bool = False                        # relation-aware masks (Eq. 12–13)
    use_masks: bool = True                        # False: the fine-tuning baseline (no masks)
    own_blocks: list[int] = field(default_factory=list)  # per task: top residual blocks it has its own copy of
    own_embedding: list[bool] = field(default_factory=list)  # per task: whether it reads its own item embedding
    task_parts: list[str] = field(default_factory=list)      # per task: the BLOCK_PARTS kind its blocks add, or ""
    weight_owners: bool = False                   # CONURE: each convolution weight belongs to one task, or is free
    open_task: int = -1                           # the task that also reads the free weights (-1: none)
    item_heads: list[bool] = field(default_factory=list)  # per task (DITTO): its head maps the hidden state to a
                                                  # C-vector scored against its classes' item rows (empty: none)
    item_counts: list[int] = field(default_factory=list)  # --protocol time: n_items as each stage left it (task 1's
                                                  # first); empty: never grown. Row r was created at the first stage
                                                  # k (1-based) with r < item_counts[k − 1]

    def item_stage(self, row: int) -> int:
        """The stage that created item row `row` (1 for every row of a model that never grew)."""
        return next((k for k, count in enumerate(self.item_counts, 1) if row < count), 1)

    def items_at(self, stage: int) -> int:
        """The items that existed when stage `stage` (1-based) was trained: the candidates its task ranks on its own
        test users (n_items for a model that never grew)."""
        return self.item_counts[stage - 1] if stage <= len(self.item_counts) else self.n_items

    def first_new_item(self) -> int | None:
        """The first item row that the stage of the model's last task created (--protocol time), None when it created
        none (or the model did not grow at that stage: item_counts then ends at an earlier stage)."""
        counts = self.item_counts
        grew_now = len(counts) == self.n_tasks and len(counts) >= 2 and counts[-1] > counts[-2]
        return counts[-2] if grew_now else None

    def has_item_head(self, task: int) -> bool:
        return task < len(self.item_heads) and self.item_heads[task]

    def own_block_count(self, task: int) -> int:
        return self.own_blocks[task] if task < len(self.own_blocks) else 0

    def has_own_embedding(self, task: int) -> bool:
        return task < len(self.own_embedding) and self.own_embedding[task]

    def part_kind(self, task: int) -> str:
        return self.task_parts[task] if task < len(self.task_parts) else ""

    @property
    def n_tasks(self) -> int:
        return len(self.task_classes)

    @property
    def n_layers(self) -> int:
        return 2 * len(self.dilations)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dilation: int, n_out: int) -> torch.Tensor:
    """Dilated causal convolution producing the last `n_out` positions.

    x [B, n, C_in] holds the last n positions of the sequence; when n is shorter than the receptive
    window it is the whole sequence and is left-padded with zeros, as NextItNet's ZeroPad2d.
    weight [C_out, C_in, k]: out[t] = Σ_i weight[:, :, i] · x[t − (k−1−i)·dilation].
    The [B, n, C] memory is read as a channels-last image [B, C, 1, n], the authors' (1, k) conv2d layout,
    so oneDNN/cuDNN convolve it in place and return [B, n_out, C] memory: no transposes either way.
    """
    kernel = weight.shape[2]
    need = n_out + (kernel - 1) * dilation
    if x.shape[1] < need:
        x = F.pad(x, (0, 0, need - x.shape[1], 0))
    else:
        x = x[:, x.shape[1] - need:]
    image = x.unsqueeze(1).permute(0, 3, 1, 2)                                    # [B, C_in, 1, need], NHWC
    out = F.conv2d(image, weight.unsqueeze(2), bias, dilation=(1, dilation))        # [B, C_out, 1, n_out]
    return out.permute(0, 2, 3, 1).squeeze(1)                                      # [B, n_out, C_out]


def channels_last(conv: nn.Conv1d) -> nn.Conv1d:
    """Store the weight [C_out, C_in, k] with C_in innermost: the layout a channels-last conv reads, so no
    per-step reorder. Shape, values and state-dict keys are unchanged."""
    conv.weight = nn.Parameter(conv.weight.data.permute(0, 2, 1).contiguous().permute(0, 2, 1))
    return conv


class BlockPart(nn.Module):
    """What one task adds to one residual block: the weights its convolutions use, and what is added to each
    convolution's output. The identity here; the kinds are in BLOCK_PARTS."""

    def conv_weights(self, block: "ResidualBlock") -> tuple[torch.Tensor, torch.Tensor]:
        return block.conv1.weight, block.conv2.weight

    def add_first(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """conv1's output [B, n, C], given the block input at the same positions x [B, n, C]."""
        return out

    def add_second(self, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """conv2's output [B, n, C], given conv2's input at the same positions h [B, n, C]."""
        return out


class Bottleneck(nn.Module):
    """A position-wise C → C/4 → C bottleneck with a GELU between: half of a PeterRec model patch (Yuan et al.,
    SIGIR 2020), as the official code's `get_mp` (fajieyuan/SIGIR2020_peterrec, ops.py) with the cardinality its
    fine-tuning scripts set, 1: 1×1 convolutions (here Linear layers) whose weights are drawn from a normal of std
    0.02 truncated at two std and whose biases are 0, and GELU's tanh form. So a patch starts at about 1 % of its
    input's scale: the task starts from the frozen network's features (torch's default init, Tenrec's, starts at
    a fifth of it, which on held-out data kept the task at its majority class)."""
    init_std = 0.02

    def __init__(self, channels: int):
        super().__init__()
        self.down = nn.Linear(channels, max(channels // 4, 1))
        self.up = nn.Linear(max(channels // 4, 1), channels)
        for layer in (self.down, self.up):
            nn.init.trunc_normal_(layer.weight, std=self.init_std, a=-2 * self.init_std, b=2 * self.init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                 # [B, n, C] → [B, n, C]
        return self.up(F.gelu(self.down(x), approximate="tanh"))


class Patch(BlockPart):
    """A task's model patch of one residual block, parallel to its two convolutions (PeterRec's form (b), the
    official `peter_2mp_parallel`): conv1(x) + p1(x), and conv2(h) + p2(h), each before its LayerNorm. The official
    form also adds x itself (get_mp returns x + Σ bottlenecks), which moves the frozen network's function before
    anything is learned; here a patch adds only its bottleneck, so at its near-zero start the block is the frozen
    one."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.first = Bottleneck(channels)
        self.second = Bottleneck(channels)

    def add_first(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out + self.first(x)

    def add_second(self, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return out + self.second(h)


class Binarize(torch.autograd.Function):
    """scores → 1 where scores > threshold, else 0; the gradient passes straight through (Piggyback's Binarizer)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class WeightMask(BlockPart):
    """Piggyback (Mallya et al., ECCV 2018): a real-valued score per weight of both convolutions, thresholded into
    a binary mask of the frozen weights, scores initialised to mask_scale (the official '1s' init: every weight
    kept at the start); the official defaults, mask_scale 1e-2 and threshold 5e-3."""
    mask_scale, threshold = 1e-2, 5e-3

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.scores1 = nn.Parameter(torch.full((channels, channels, kernel_size), self.mask_scale))
        self.scores2 = nn.Parameter(torch.full((channels, channels, kernel_size), self.mask_scale))

    def conv_weights(self, block: "ResidualBlock") -> tuple[torch.Tensor, torch.Tensor]:
        return (block.conv1.weight * Binarize.apply(self.scores1, self.threshold),
                block.conv2.weight * Binarize.apply(self.scores2, self.threshold))


BLOCK_PARTS: dict[str, type[BlockPart]] = {"patch": Patch, "weight_mask": WeightMask}


class WeightOwners(nn.Module):
    """CONURE (Yuan et al., SIGIR 2021): which task owns each weight of a block's two convolutions, as int8 buffers
    [C_out, C_in, k]; 0 = free, t = task t (1-based), which pruned it into its part and froze it."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.register_buffer("conv1", torch.zeros(channels, channels, kernel_size, dtype=torch.int8))
        self.register_buffer("conv2", torch.zeros(channels, channels, kernel_size, dtype=torch.int8))


class OwnedWeights:
    """The BlockPart interface over WeightOwners for one reading task: task u (1-based) reads the weights of tasks
    1..u, and the free ones too while it is the open task (training before its pruning)."""

    def __init__(self, owners: WeightOwners, number: int, reads_free: bool):
        self.owners, self.number, self.reads_free = owners, number, reads_free

    def kept(self, owners: torch.Tensor) -> torch.Tensor:
        kept = (owners >= 1) & (owners <= self.number)
        return kept | (owners == 0) if self.reads_free else kept

    def conv_weights(self, block: "ResidualBlock") -> tuple[torch.Tensor, torch.Tensor]:
        return (block.conv1.weight * self.kept(self.owners.conv1).to(block.conv1.weight.dtype),
                block.conv2.weight * self.kept(self.owners.conv2).to(block.conv2.weight.dtype))

    def add_first(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out

    def add_second(self, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return out


class ResidualBlock(nn.Module):
    """conv(d) → LayerNorm → ReLU → × mask1 → conv(2d) → LayerNorm → ReLU → × mask2 → + input
    A task's BlockPart may replace the convolutions' weights (Piggyback's masked weights) and add to their
    outputs (PeterRec's patches)."""

    def __init__(self, channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.dilation = dilation
        self.conv1 = channels_last(nn.Conv1d(channels, channels, kernel_size, dilation=dilation))
        self.ln1 = nn.LayerNorm(channels, eps=1e-8)
        self.conv2 = channels_last(nn.Conv1d(channels, channels, kernel_size, dilation=2 * dilation))
        self.ln2 = nn.LayerNorm(channels, eps=1e-8)

    def receptive(self, n_out: int, length: int) -> tuple[int, int]:
        """Positions needed after conv1 and before conv1 to produce the last n_out outputs."""
        reach = self.conv1.kernel_size[0] - 1
        middle = min(length, n_out + reach * 2 * self.dilation)
        return middle, min(length, middle + reach * self.dilation)

    def forward(self, x: torch.Tensor, mask1: torch.Tensor, mask2: torch.Tensor, n_out: int, length: int,
                part: "BlockPart | OwnedWeights | None" = None) -> torch.Tensor:
        middle, _ = self.receptive(n_out, length)
        weight1, weight2 = part.conv_weights(self) if part is not None else (self.conv1.weight, self.conv2.weight)
        out = causal_conv(x, weight1, self.conv1.bias, self.dilation, middle)              # [B, middle, C]
        if part is not None:
            out = part.add_first(out, x[:, x.shape[1] - middle:])
        out = F.relu(self.ln1(out)) * mask1.to(out.dtype)  # under --amp the branch stays bf16
        inner = out
        out = causal_conv(out, weight2, self.conv2.bias, 2 * self.dilation, n_out)         # [B, n_out, C]
        if part is not None:
            out = part.add_second(out, inner[:, inner.shape[1] - n_out:])
        out = F.relu(self.ln2(out)) * mask2.to(out.dtype)
        return out + x[:, x.shape[1] - n_out:]                                            # fp32 residual stream


def _init_head(head: nn.Linear) -> nn.Linear:
    head.weight.data.normal_(0.0, 0.01)
    head.bias.data.fill_(0.1)
    return head


TASK_EMBEDDING_CLAMP = 6.0  # HAT's thres_emb: task embeddings are clamped to ±6 after each step (HAT's code, and
                            # TERACON's revised code, which keeps it), where σ(s·e) is saturated at any s ≥ 1


class NextItNet(nn.Module):
    """The backbone with per-task masks and heads. forward(items, task, s) → (logits, masks)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        channels = config.channels
        self.item_embedding = nn.Embedding(config.n_items, channels)
        bound = math.sqrt(1.0 / config.n_items)
        self.item_embedding.weight.data.uniform_(-bound, bound)
        self.blocks = nn.ModuleList(ResidualBlock(channels, config.kernel_size, d) for d in config.dilations)
        self.heads = nn.ModuleList(_init_head(nn.Linear(channels, channels if config.has_item_head(task) else n))
                                   for task, n in enumerate(config.task_classes))
        for task, n in enumerate(config.task_classes):
            if task and config.has_item_head(task):
                self.register_buffer(f"class_items_{task}", torch.zeros(n, dtype=torch.long))
        self.task_embedding = nn.Parameter(self._new_task_rows(config.n_tasks))  # [N, n_layers, C]
        self.task_blocks = nn.ModuleDict({
            str(task): nn.ModuleList(ResidualBlock(channels, config.kernel_size, d) for d in config.dilations[-count:])
            for task in range(config.n_tasks) if (count := config.own_block_count(task))})
        self.task_item_embeddings = nn.ModuleDict({
            str(task): nn.Embedding(config.n_items, channels) for task in range(config.n_tasks)
            if config.has_own_embedding(task)})
        self.task_parts = nn.ModuleDict({
            str(task): self._new_parts(kind) for task in range(config.n_tasks) if (kind := config.part_kind(task))})
        if config.weight_owners:
            self.weight_owners = nn.ModuleList(WeightOwners(channels, config.kernel_size) for _ in config.dilations)
        if config.relation:
            self._reset_relation()

    # ------------------------------------------------------------ tasks

    def _new_task_rows(self, n: int) -> torch.Tensor:
        first, second = self.config.task_emb_init
        rows = torch.empty(n, self.config.n_layers, self.config.channels)
        if self.config.task_emb_dist == "normal":
            return rows.normal_(first, second)                            # HAT's nn.Embedding: N(0, 1)
        return rows.uniform_(first, second)

    def _new_parts(self, kind: str) -> nn.ModuleList:
        """One BlockPart of `kind` per residual block."""
        if kind not in BLOCK_PARTS:
            raise ValueError(f"unknown block part {kind!r}; known: {', '.join(BLOCK_PARTS)}")
        return nn.ModuleList(BLOCK_PARTS[kind](self.config.channels, self.config.kernel_size) for _ in self.config.dilations)

    def _reset_relation(self) -> None:
        """Relation layers Linear(2N−1, 1) per task and masked layer, init N(0, 0.01) and bias 0.1.

        Their input grows with N, so (as the authors' code) they are re-initialised at each new stage.
        """
        n_tasks, n_layers = self.config.n_tasks, self.config.n_layers
        device = self.task_embedding.device
        self.relation_weight = nn.Parameter(torch.empty(n_tasks, n_layers, 2 * n_tasks - 1, device=device).normal_(0.0, 0.01))
        self.relation_bias = nn.Parameter(torch.full((n_tasks, n_layers), 0.1, device=device))

    def add_task(self, n_classes: int, relation: bool = True, own_blocks: int = 0, own_embedding: bool = False,
                 part: str = "", class_items: torch.Tensor | None = None) -> None:
        """Grow by one task: a new head, a new task-embedding row, fresh relation layers for every task (as the
        authors: every earlier task's masks move at each stage; docs/retention.md has the study that kept them). With
        `own_blocks` = k > 0 (not in the paper), the new task reads its own copies of the top k residual blocks,
        copied from the shared ones now: only its own terms train them, so the retention that holds the shared
        blocks for the earlier tasks never pulls on them. With `class_items` [n_classes] (DITTO's item task), the item
        row of each class: the new head maps the hidden state to a C-vector scored against those rows (class 0,
        <UNK>, reads row 0).
        """
        if not 0 <= own_blocks <= len(self.blocks):
            raise ValueError(f"own_blocks must be in 0..{len(self.blocks)} (got {own_blocks})")
        device = self.task_embedding.device
        if own_blocks or self.config.own_blocks:  # configs without own blocks stay as they were
            self.config.own_blocks = [self.config.own_block_count(t) for t in range(self.config.n_tasks)] + [own_blocks]
            if own_blocks:
                self.task_blocks[str(self.config.n_tasks)] = copy.deepcopy(self.blocks[len(self.blocks) - own_blocks:])
        if own_embedding or self.config.own_embedding:
            self.config.own_embedding = [self.config.has_own_embedding(t) for t in range(self.config.n_tasks)] + [own_embedding]
            if own_embedding:
                self.task_item_embeddings[str(self.config.n_tasks)] = copy.deepcopy(self.item_embedding)
        if part or self.config.task_parts:
            self.config.task_parts = [self.config.part_kind(t) for t in range(self.config.n_tasks)] + [part]
            if part:
                self.task_parts[str(self.config.n_tasks)] = self._new_parts(part).to(device)
        if class_items is not None or self.config.item_heads:
            self.config.item_heads = [self.config.has_item_head(t) for t in range(self.config.n_tasks)] + [
                class_items is not None]
            if class_items is not None:
                self.register_buffer(f"class_items_{self.config.n_tasks}", class_items.to(device, torch.long).clone())
        width = self.config.channels if class_items is not None else n_classes
        self.config.task_classes = [*self.config.task_classes, n_classes]
        self.heads.append(_init_head(nn.Linear(self.config.channels, width)).to(device))
        rows = self._new_task_rows(1).to(device)
        self.task_embedding = nn.Parameter(torch.cat([self.task_embedding.data, rows]))
        self.config.relation = relation
        if relation:
            self._reset_relation()
        else:
            for name in ("relation_weight", "relation_bias"):
                if hasattr(self, name):
                    delattr(self, name)

    def add_items(self, n_new: int, rows_from: "NextItNet | None" = None) -> None:
        """Grow the item index by `n_new` items at the stage being built (--protocol time; called before add_task, so
        the model holds the earlier stages' tasks): new rows at the end of the item embedding (and of every task's own
        copy of it) and of task 1's head, drawn as a fresh model of the grown size draws them (embedding
        U(±sqrt(1/n_items)), head N(0, 0.01) with bias 0.1); every existing row stays bit-identical.
        config.item_counts records the size each stage left, this one's last. With `rows_from` (a model already grown
        to the same size: the frozen previous model takes the student's new rows, as DITTO's teacher) the new rows
        are copies of its last rows, and a frozen model's stay frozen."""
        if n_new < 0:
            raise ValueError(f"n_new must be >= 0 (got {n_new})")
        config = self.config
        counts = config.item_counts + [config.n_items] * (config.n_tasks - len(config.item_counts))  # stages before
        n_items = config.n_items + n_new
        bound = math.sqrt(1.0 / n_items)
        device = self.item_embedding.weight.device
        frozen = not self.item_embedding.weight.requires_grad
        if rows_from is not None and rows_from.config.n_items != n_items:
            raise ValueError(f"rows_from has {rows_from.config.n_items} items, not {n_items}")
        if rows_from is None:
            rows = torch.empty(n_new, config.channels, device=device).uniform_(-bound, bound)   # [n_new, C]
        else:
            rows = rows_from.item_embedding.weight.detach()[config.n_items:].to(device)
        for embedding in [self.item_embedding, *self.task_item_embeddings.values()]:
            embedding.weight = nn.Parameter(torch.cat([embedding.weight.data, rows]), requires_grad=not frozen)
            embedding.num_embeddings = n_items
        if not config.has_item_head(0):                   # an item head (DITTO) scores every row: nothing to grow
            head = self.heads[0]
            if rows_from is None:
                weight = torch.empty(n_new, config.channels, device=device).normal_(0.0, 0.01)  # [n_new, C]
                bias = torch.full((n_new,), 0.1, device=device)                                # [n_new]
            else:
                weight, bias = (t.detach()[config.n_items:].to(device) for t in (rows_from.heads[0].weight,
                                                                                 rows_from.heads[0].bias))
            head.weight = nn.Parameter(torch.cat([head.weight.data, weight]), requires_grad=not frozen)
            head.bias = nn.Parameter(torch.cat([head.bias.data, bias]), requires_grad=not frozen)
            head.out_features = n_items
        config.n_items, config.task_classes = n_items, [n_items, *config.task_classes[1:]]
        config.item_counts = [*counts, n_items]

    # ------------------------------------------------------------ masks

    def clamp_task_embedding(self, task: int | None = None) -> None:
        """Clamp the task embeddings (one task's row, or every row with `task` None) to ±TASK_EMBEDDING_CLAMP."""
        with torch.no_grad():
            rows = self.task_embedding if task is None else self.task_embedding[task]
            rows.clamp_(-TASK_EMBEDDING_CLAMP, TASK_EMBEDDING_CLAMP)

    def task_masks(self, task: int, s: float) -> torch.Tensor:
        """Masks of every masked layer for `task` at scale s → [n_layers, C]."""
        embedding = self.task_embedding                                   # [N, n_layers, C]
        if not self.config.use_masks:
            return torch.ones_like(embedding[task])
        if not self.config.relation:
            return torch.sigmoid(s * embedding[task])                     # Eq. 11
        others = [j for j in range(self.config.n_tasks) if j != task]
        other_rows = embedding[others]                                    # [N−1, n_layers, C]
        signed = torch.stack([other_rows, -other_rows], dim=1).reshape(-1, *embedding.shape[1:])  # [2N−2, n_layers, C]
        context = torch.cat([embedding[task:task + 1], signed])           # [2N−1, n_layers, C]
        activated = torch.tanh(s * context)
        mixed = torch.einsum("klc,lk->lc", activated, self.relation_weight[task])  # [n_layers, C]
        mixed = mixed + self.relation_bias[task][:, None]
        return torch.sigmoid(s * mixed)                                   # Eq. 13

    # ------------------------------------------------------------ forward

    def task_stack(self, task: int) -> list[ResidualBlock]:
        """The residual blocks `task` reads: the shared ones, its own copies on top where it has them."""
        own = self.task_blocks[str(task)] if str(task) in self.task_blocks else []
        return [*self.blocks[:len(self.blocks) - len(own)], *own]

    def task_item_embedding(self, task: int) -> nn.Embedding:
        """The item embedding `task` reads: the shared one, or its own copy where it has one."""
        key = str(task)
        return self.task_item_embeddings[key] if key in self.task_item_embeddings else self.item_embedding

    def block_part(self, task: int, block: int) -> "BlockPart | OwnedWeights | None":
        """What `task` adds to residual block `block`: its own part, the weights it owns (CONURE), or nothing."""
        if str(task) in self.task_parts:
            return self.task_parts[str(task)][block]
        if self.config.weight_owners:
            return OwnedWeights(self.weight_owners[block], task + 1, task == self.config.open_task)
        return None

    def hidden(self, items: torch.Tensor, masks: torch.Tensor, last_only: bool, task: int = 0) -> torch.Tensor:
        """items [B, L] → hidden [B, C] (last position) or [B, L, C] under `task`'s embedding and blocks.

        With last_only, each layer computes only the positions the last output can see. A pass that builds a graph
        whose blocks would keep more than RECOMPUTE_BYTES for backward (TTL's stage-K batch of 1,024: about 3 GB)
        keeps only each block's input and recomputes the block in backward (the same values: the same operations
        again); smaller passes, the demo's and the benchmark's, keep everything.
        """
        length = items.shape[1]
        needed = [1 if last_only else length]
        for block in reversed(self.blocks):
            needed.append(block.receptive(needed[-1], length)[1])
        needed.reverse()                                                   # needed[i] = positions entering block i
        x = self.task_item_embedding(task)(items[:, length - needed[0]:])  # [B, needed[0], C]
        kept = items.shape[0] * sum(needed[1:]) * self.config.channels * 4 * SAVED_PER_POSITION
        recompute = torch.is_grad_enabled() and kept > RECOMPUTE_BYTES
        for i, block in enumerate(self.task_stack(task)):
            inputs = (x, masks[2 * i], masks[2 * i + 1], needed[i + 1], length, self.block_part(task, i))
            x = checkpoint(block, *inputs, use_reentrant=False) if recompute else block(*inputs)
        return x[:, -1] if last_only else x

    def forward(self, items: torch.Tensor, task: int, s: float, last_only: bool = True,
                masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of head `task` ([B, n_classes] or [B, L, n_classes]) and the masks used [n_layers, C]."""
        if masks is None:
            masks = self.task_masks(task, s)
        return self.logits(task, self.hidden(items, masks, last_only, task)), masks

    def logits(self, task: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head `task` on hidden states [..., C] → [..., n_classes]; an item head (DITTO) scores its output
        (W_t h + b) [..., C] against its classes' item rows (task 1: every item)."""
        out = self.heads[task](hidden)
        if not self.config.has_item_head(task):
            return out
        return out @ self.class_item_rows(task).t()

    def class_item_rows(self, task: int) -> torch.Tensor:
        """An item-head task's class rows of the item embedding [n_classes, C] (task 1: the whole table)."""
        weight = self.item_embedding.weight
        return weight if task == 0 else weight[self.class_items(task)]

    def class_items(self, task: int) -> torch.Tensor:
        """An item-head task k ≥ 2's item row of each class [n_classes] (its buffer class_items_k)."""
        return getattr(self, f"class_items_{task}")

    # ------------------------------------------------------------ checkpoints

    def config_dict(self) -> dict:
        return asdict(self.config)

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, share: bool = False) -> "NextItNet":
        """The checkpoint's model, with copies of its tensors; with `share`, its parameters and buffers ARE the
        checkpoint's tensors (no copy; for frozen models). The constructor's random draws are made either way, so
        what a stage draws after building its models does not depend on how they were built."""
        model = cls(ModelConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model_state"], strict=True, assign=share)
        return model
