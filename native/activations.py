"""Activation statistics gathered while llama.cpp evaluates a GGUF: what an importance matrix is made of.

llama.cpp's scheduler can hand every node of the compute graph to an observer (`cb_eval` in
`llama_context_params`): first it asks whether the observer wants the node (ask=True), then, for the
nodes it said yes to, it calls again once the node is computed (ask=False). `ModelEvaluator` answers yes
for the matrix products whose first operand is a model weight (`blk.*` tensors, and `output.weight` on
request), and on the second call adds the squares of the product's input activations (`src[1]`) per input
column into float64 sums, and the number of input rows into counts. That is the data llama.cpp's own
imatrix tool records; the same rules decide which tensors count:

* `MUL_MAT`: weight ne = [n_in, n_out, n2, n3], input ne = [n_in, rows, i2, i3]. Input slice (i2, i3) is
  multiplied by weight matrix (i2 mod n2, i3 mod n3); an ordinary 2-D weight has a single matrix.
* `MUL_MAT_ID` (mixture-of-experts): weight ne = [n_in, n_out, n_expert], expert ids ne = [n_used,
  n_tokens] (int32), input ne = [n_in, n_in_slots, n_tokens] with n_in_slots either 1 (every chosen
  expert reads the token's one row) or n_used (slot k has its own row). The row of token t for its k-th
  expert is input[:, k mod n_in_slots, t]; it goes to expert ids[k, t], whose count grows by one.

Weight names may carry the scheduler's copy marks (`CUDA0#blk.0.attn_q.weight#0`); the part between the
'#'s is the name. Inputs that live in device memory are copied to the host first
(`ggml_backend_tensor_get`); host inputs are read in place.

While collecting, every token of a chunk is an output of the decode: llama.cpp drops the rows of tokens
whose logits are not wanted before the last layer's feed-forward block, which would then see one row per
batch instead of all of them. Unless `output.weight` is collected too, the callback then cancels the rest
of the graph after the final norm (the node llama.cpp names `result_norm`), so the output product for every
token, which nobody reads, is not computed: the evaluator never hands out logits. It does so only after the
model's first decode has shown that no watched product comes after that node.

A chunk's statistics join the totals only when the whole chunk has been evaluated; a chunk that fails or is
stopped leaves no trace in them.

Nothing raised inside a callback crosses into C: the callback remembers the exception, asks llama.cpp to
abort through the abort callback, and the exception is raised again when `llama_decode` returns.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp.llama_cpp as llama  # before numpy: on CUDA builds, numpy loaded first has crashed model loading
import numpy as np

from native.errors import EvaluationFailed, Stopped
from native.ggml import GGML, MAX_SRC, GGMLTensor, ggml
from native.input_spill import InputSpillWriter

__all__ = [
    "FINAL_NORM_INPUT",
    "CollectedStats",
    "InputObserver",
    "LogitsConsumer",
    "MatrixStats",
    "ModelEvaluator",
    "ProductAdjuster",
    "collect_activation_stats",
    "weight_name",
]

InputObserver = Callable[[str, np.ndarray], None]
"""Shown (weight name, its input rows as a view valid only during the call) for every dense product."""
LogitsConsumer = Callable[[int, np.ndarray], None]
"""Receives (position of the first row, logits of rows × n_vocab float32); the array is valid only during the call."""
ProductAdjuster = Callable[[str, np.ndarray, np.ndarray], None]
"""Given (weight name, the product's input rows n × n_in, its output rows n × n_out, writable), changes the output
in place before the rest of the graph reads it."""

DEFAULT_UBATCH = 512
"""Tokens per `llama_decode` call and per physical batch (llama.cpp's default); longer chunks take several."""

_TYPE_F32 = 0
_NAME_MARK = b"#"
_OUTPUT_WEIGHT = "output.weight"
_OUTPUT_WEIGHTS = (_OUTPUT_WEIGHT, "token_embd.weight")
"""The output product's weight: `output.weight`, or the token embedding where the model ties the two (the
embedding's lookup is a `GET_ROWS`, never a watched product)."""
_FINAL_NORM = b"result_norm"
"""llama.cpp's name for the final norm, the node just before the output product, in most architectures."""
_FINAL_NORM_KEY = "<final norm>"
FINAL_NORM_INPUT = _FINAL_NORM_KEY
"""The name an input observer gets for the final norm's output rows: the input of the output product, which is
skipped (`ModelEvaluator.output_weight` names its weight once a chunk has been evaluated)."""
"""Where the final norm's output is summed when the output product itself is skipped."""
_LAYER_PREFIX = "blk."
_LOAD_INTO_MEMORY = 0
"""`LLAMA_LOAD_MODE_NONE`: read the weights into buffers of their own rather than mapping the file (read-only)."""
_LAZY_OFF = 0
_DECODE_ABORTED = 2
_DECODE_NO_SLOT = 1

_OP_OFFSET = GGMLTensor.op.offset
_SRC_OFFSET = GGMLTensor.src.offset
_NAME_OFFSET = GGMLTensor.name.offset
_POINTER_SIZE = ctypes.sizeof(ctypes.c_void_p)
_SRC1_OFFSET = _SRC_OFFSET + _POINTER_SIZE


@dataclass
class MatrixStats:
    """Statistics of one weight tensor: one row of sums and one count per matrix (per expert for MoE)."""

    sums: np.ndarray
    """float64, shape (n_mat, n_in): the sum of squared inputs per input column."""
    counts: np.ndarray
    """int64, shape (n_mat,): how many input rows (tokens) each matrix multiplied."""


@dataclass
class CollectedStats:
    """Everything gathered over an evaluation: per weight tensor name, and how much text produced it."""

    matrices: dict[str, MatrixStats]
    chunks: int
    tokens: int
    chunk_size: int
    covariances: dict[str, np.ndarray] = field(default_factory=dict)
    """With `covariance_chunks`: per 2-D weight, the sum of x xᵀ over its input rows in those first chunks (float64,
    n_in × n_in). Weights that multiply the same input (a layer's q, k and v) share one array. The output
    product's weight is included even when its product is skipped (its input is the final norm's output)."""


def weight_name(raw_name: bytes) -> str:
    """The model weight's name inside a scheduler copy name: `CUDA0#blk.0.attn_k.weight#0` → `blk.0.attn_k.weight`."""
    first = raw_name.find(_NAME_MARK)
    if first >= 0:
        rest = raw_name[first + 1 :]
        second = rest.find(_NAME_MARK)
        raw_name = rest if second < 0 else rest[:second]
    return raw_name.decode(errors="replace")


def _read_int(address: int) -> int:
    return ctypes.c_int.from_address(address).value


def _read_pointer(address: int) -> int:
    return ctypes.c_void_p.from_address(address).value or 0


def _extent(tensor: GGMLTensor, element_size: int) -> int:
    """Bytes from the tensor's first element to the end of its last (what `ggml_nbytes` gives for plain types)."""
    if any(n <= 0 for n in tensor.ne):
        return 0
    return element_size + sum((tensor.ne[i] - 1) * tensor.nb[i] for i in range(4))


class _Accumulator:
    """Totals of finished chunks, and the running chunk's part, added to the totals only once the chunk succeeds."""

    __slots__ = ("chunk_counts", "chunk_sums", "counts", "sums", "touched")

    def __init__(self, n_mat: int, n_in: int) -> None:
        self.sums = np.zeros((n_mat, n_in), dtype=np.float64)
        self.counts = np.zeros(n_mat, dtype=np.int64)
        self.chunk_sums = np.zeros_like(self.sums)
        self.chunk_counts = np.zeros_like(self.counts)
        self.touched = False

    def commit(self) -> None:
        if self.touched:
            self.sums += self.chunk_sums
            self.counts += self.chunk_counts
            self.discard()

    def discard(self) -> None:
        if self.touched:
            self.chunk_sums.fill(0)
            self.chunk_counts.fill(0)
            self.touched = False

    def snapshot(self) -> MatrixStats:
        return MatrixStats(self.sums.copy(), self.counts.copy())


class _OutputProductSkip:
    """Whether to cancel the graph once the final norm is computed, decided on the model's first decode.

    The first decode runs whole, noting whether a node named `result_norm` came and whether any watched
    product came after it. Only if it came, and nothing watched followed, do later decodes stop there.
    """

    def __init__(self, wanted: bool) -> None:
        self.learning = wanted
        self.active = False
        self._norm_seen = False
        self._watched_after_norm = False

    def begin_decode(self) -> None:
        self._norm_seen = False

    def end_decode(self) -> None:
        if self.learning:
            self.learning = False
            self.active = self._norm_seen and not self._watched_after_norm

    def watches_norm(self) -> bool:
        return self.learning or self.active

    def continue_after_norm(self) -> bool:
        self._norm_seen = True
        return not self.active

    def note_watched_product(self) -> None:
        if self.learning and self._norm_seen:
            self._watched_after_norm = True


class _Collector:
    """The eval callback's state: which weights to watch, the running sums, and the first error seen."""

    def __init__(self, lib: GGML, *, collect_output: bool, skip_output_product: bool,
                 covariance_chunks: int = 0, spill: InputSpillWriter | None = None,
                 input_observer: InputObserver | None = None) -> None:
        self._lib = lib
        self._input_observer = input_observer
        self.output_weight: str | None = None
        """The output product's weight, seen in the first decode (it reads the final norm's output)."""
        self._collect_output = collect_output
        self.output_skip = _OutputProductSkip(skip_output_product)
        self._watched: dict[bytes, str | None] = {}
        self._staging: dict[str, np.ndarray] = {}
        self.matrices: dict[str, _Accumulator] = {}
        self.error: BaseException | None = None
        self.covariances: _InputRows | None = (
            _InputRows(covariance_chunks, spill if spill is not None else _CovarianceSums())
            if covariance_chunks > 0 else None
        )
        self._norm_node = 0

    def on_eval(self, node: int, ask: bool, _user_data: int | None) -> bool:
        """`ggml_backend_sched_eval_callback`: must never raise, and returns True to let the graph go on."""
        if self.error is not None:
            return False
        try:
            if ask:
                return self._wants(node)
            if self._is_final_norm(node):
                if self.covariances is not None or self._input_observer is not None:
                    norm = GGMLTensor.from_address(node)
                    rows = self._host_view(norm, node, np.float32)
                    if self.covariances is not None:
                        self.covariances.add(_FINAL_NORM_KEY, node, rows)
                    if self._input_observer is not None:
                        self._input_observer(FINAL_NORM_INPUT, rows)
                return self.output_skip.continue_after_norm()  # False cancels the rest of this graph split
            self._record(node)
        except BaseException as error:  # nothing may escape into C; raised again after the decode
            self.error = error
            return False
        return True

    def _name_if_watched(self, weight: int) -> str | None:
        raw = ctypes.string_at(weight + _NAME_OFFSET)
        try:
            return self._watched[raw]
        except KeyError:
            name = weight_name(raw)
            watched = name.startswith(_LAYER_PREFIX) or (self._collect_output and name in _OUTPUT_WEIGHTS)
            self._watched[raw] = name if watched else None
            return self._watched[raw]

    def _is_final_norm(self, node: int) -> bool:
        return self.output_skip.watches_norm() and ctypes.string_at(node + _NAME_OFFSET) == _FINAL_NORM

    def _wants(self, node: int) -> bool:
        op = _read_int(node + _OP_OFFSET)
        if op != self._lib.op_mul_mat and op != self._lib.op_mul_mat_id:
            if self._is_final_norm(node):
                self._norm_node = node
                return True
            return False
        weight = _read_pointer(node + _SRC_OFFSET)
        activations = _read_pointer(node + _SRC1_OFFSET)
        if activations and activations == self._norm_node:
            self.output_weight = weight_name(ctypes.string_at(weight + _NAME_OFFSET))
            if self.covariances is not None:
                self.covariances.output_weight = self.output_weight
        if not weight or not activations or _read_int(activations) != _TYPE_F32:
            return False
        if self._name_if_watched(weight) is None:
            return False
        self.output_skip.note_watched_product()
        return True

    def _record(self, node: int) -> None:
        product = GGMLTensor.from_address(node)
        weight = GGMLTensor.from_address(product.src[0])
        name = self._name_if_watched(product.src[0])
        if name is None:
            return
        activations = self._host_view(GGMLTensor.from_address(product.src[1]), product.src[1], np.float32)
        if product.op == self._lib.op_mul_mat_id:
            ids = self._copied_view(GGMLTensor.from_address(product.src[2]), product.src[2], np.int32, "ids")
            self._add_experts(name, weight, activations, ids)
        else:
            self._add_dense(name, weight, activations)
            if int(weight.ne[2]) == int(weight.ne[3]) == 1:
                if self.covariances is not None:
                    self.covariances.add(name, product.src[1], activations)
                if self._input_observer is not None:
                    self._input_observer(name, activations)

    def _accumulator(self, name: str, n_mat: int, n_in: int) -> _Accumulator:
        found = self.matrices.get(name)
        if found is None:
            found = self.matrices[name] = _Accumulator(n_mat, n_in)
        elif found.sums.shape != (n_mat, n_in):
            raise EvaluationFailed(
                f"llama.cpp multiplied {name} as {n_mat}×{n_in} after {found.sums.shape[0]}×{found.sums.shape[1]}; "
                "this model's graph is not one qdesk can collect statistics from."
            )
        found.touched = True
        return found

    def _add_dense(self, name: str, weight: GGMLTensor, activations: np.ndarray) -> None:
        n_slices3, n_slices2, n_rows, n_in = activations.shape
        weight_ne2, weight_ne3 = int(weight.ne[2]), int(weight.ne[3])
        target = self._accumulator(name, weight_ne2 * weight_ne3, n_in)
        if weight_ne2 == weight_ne3 == 1:
            target.chunk_sums[0] += _column_square_sums(activations.reshape(-1, n_in))
            target.chunk_counts[0] += n_slices3 * n_slices2 * n_rows
            return
        for i3 in range(n_slices3):
            for i2 in range(n_slices2):
                matrix = (i3 % weight_ne3) * weight_ne2 + (i2 % weight_ne2)
                target.chunk_sums[matrix] += _column_square_sums(activations[i3, i2])
                target.chunk_counts[matrix] += n_rows

    def _add_experts(self, name: str, weight: GGMLTensor, activations: np.ndarray, ids: np.ndarray) -> None:
        _, n_tokens, n_slots, n_in = activations.shape
        n_expert = int(weight.ne[2])
        expert_ids = ids[0, 0]  # (n_tokens, n_used)
        n_used = expert_ids.shape[1]
        if expert_ids.shape[0] != n_tokens or activations.shape[0] != 1:
            raise EvaluationFailed(
                f"llama.cpp chose experts of {name} for {expert_ids.shape[0]} tokens but gave {n_tokens} input rows; "
                "this model's graph is not one qdesk can collect statistics from."
            )
        target = self._accumulator(name, n_expert, n_in)
        experts = expert_ids.reshape(-1)
        if experts.size and (experts.min() < 0 or experts.max() >= n_expert):
            raise EvaluationFailed(f"llama.cpp routed a token of {name} to an expert outside 0..{n_expert - 1}; "
                                   "the model file may be damaged.")
        # pair p = token t, slot k (p = t * n_used + k) reads input row t * n_slots + k mod n_slots
        pairs = np.arange(experts.size)
        rows = (pairs // n_used) * n_slots + (pairs % n_used) % n_slots
        order = np.argsort(experts, kind="stable")
        sorted_experts = experts[order]
        present, starts = np.unique(sorted_experts, return_index=True)
        squares = np.square(activations.reshape(-1, n_in)[rows[order]], dtype=np.float64)
        target.chunk_sums[present] += np.add.reduceat(squares, starts, axis=0)
        target.chunk_counts += np.bincount(experts, minlength=n_expert).astype(np.int64)

    def _host_view(self, tensor: GGMLTensor, address: int, dtype: type[np.generic]) -> np.ndarray:
        """The tensor as a numpy array of shape (ne3, ne2, ne1, ne0): in place if it is in host memory."""
        if not self._lib.ggml_backend_buffer_is_host(tensor.buffer):
            return self._copied_view(tensor, address, dtype, "activations")
        return _array_at(tensor.data, tensor, dtype)

    def _copied_view(self, tensor: GGMLTensor, address: int, dtype: type[np.generic], role: str) -> np.ndarray:
        """The tensor copied out of its backend buffer (device or host) into staging memory reused per `role`."""
        size = _extent(tensor, np.dtype(dtype).itemsize)
        staging = self._staging.get(role)
        if staging is None or size > staging.size:
            staging = self._staging[role] = np.empty(size, dtype=np.uint8)
        if size:
            self._lib.ggml_backend_tensor_get(address, staging.ctypes.data, 0, size)
        return _array_at(staging.ctypes.data, tensor, dtype)

    def begin_decode(self) -> None:
        self.output_skip.begin_decode()
        self._norm_node = 0
        if self.covariances is not None:
            self.covariances.begin_decode()

    def commit_chunk(self) -> None:
        """Add the finished chunk to the totals, unless some input was infinite or NaN."""
        for name, accumulator in self.matrices.items():
            if accumulator.touched and not np.isfinite(accumulator.chunk_sums).all():
                self.discard_chunk()
                raise EvaluationFailed(
                    f"the inputs of {name} became infinite or NaN during evaluation; the model file may be damaged "
                    "or its weights overflow in this precision."
                )
        for accumulator in self.matrices.values():
            accumulator.commit()
        if self.covariances is not None:
            self.covariances.commit()

    def discard_chunk(self) -> None:
        """Forget what a failed or stopped chunk added, and the weights first seen in it."""
        for accumulator in self.matrices.values():
            accumulator.discard()
        if self.covariances is not None:
            self.covariances.discard()
        self.matrices = {name: found for name, found in self.matrices.items() if found.counts.any()}


class _InputRows:
    """Which weights read the same input, and where each distinct input's rows go: summed into x xᵀ in memory
    (`_CovarianceSums`) or written to disk (`native.input_spill.InputSpillWriter`).

    Products that read the same input node in one decode (q, k and v read the same normalised hidden state)
    share the first one's input, so its rows are taken once. Only the first `chunk_limit` chunks count.
    """

    def __init__(self, chunk_limit: int, sink: _CovarianceSums | InputSpillWriter) -> None:
        self.sink = sink
        self.owner: dict[str, str] = {}
        self._node_owner: dict[int, str] = {}
        self.chunk_limit = chunk_limit
        self.chunks_done = 0
        self.tokens = 0
        self._chunk_rows: dict[str, int] = {}
        self.output_weight: str | None = None
        """The output product's weight, seen in the first decode (it reads the final norm's output)."""

    def begin_decode(self) -> None:
        self._node_owner = {}

    def add(self, name: str, input_node: int, activations: np.ndarray) -> None:
        if self.chunks_done >= self.chunk_limit:
            return
        owner = self.owner.get(name)
        if owner is None:
            owner = self.owner[name] = self._node_owner.get(input_node, name)
        self._node_owner.setdefault(input_node, owner)
        if owner != name:
            return
        rows = activations.reshape(-1, activations.shape[-1])
        self._chunk_rows[name] = self._chunk_rows.get(name, 0) + rows.shape[0]
        self.sink.add(name, rows)

    def commit(self) -> None:
        if self.chunks_done >= self.chunk_limit:
            return
        self.sink.commit()
        self.chunks_done += 1
        self.tokens += max(self._chunk_rows.values(), default=0)
        self._chunk_rows = {}

    def discard(self) -> None:
        self.sink.discard()
        self._chunk_rows = {}

    def by_weight(self) -> dict[str, str]:
        """Each weight → the input (a weight's name, or the final norm's key) whose rows its product reads."""
        found = dict(self.owner)
        norm = found.pop(_FINAL_NORM_KEY, None)
        if norm is not None and self.output_weight is not None:
            found.setdefault(self.output_weight, norm)
        return found


class _CovarianceSums:
    """Sums of x xᵀ per distinct input, in memory (n_in² float64 each: for small models and tests).

    During a chunk the input rows are only copied; the products are computed when the chunk is committed, after
    llama.cpp's threads have finished the graph, so that the matrix products get the cores to themselves
    (computed inside the callback they took three times as long), and a chunk that fails is simply dropped. The
    price is one chunk's input rows held in float32 until the commit: tokens × Σ n_in over the distinct inputs
    (about 0.2 GB at 512 tokens on the starter model).
    """

    def __init__(self) -> None:
        self.totals: dict[str, np.ndarray] = {}
        self._pending: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, rows: np.ndarray) -> None:
        self._pending.setdefault(name, []).append(np.array(rows, dtype=np.float32, order="C", copy=True))

    def commit(self) -> None:
        pending, self._pending = self._pending, {}
        for name, pieces in pending.items():
            rows = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
            product = (rows.T @ rows).astype(np.float64)
            total = self.totals.get(name)
            if total is None:
                self.totals[name] = product
            else:
                total += product

    def discard(self) -> None:
        self._pending = {}


class _RawMemory:
    """Memory at an address, described to numpy through the array interface so that it is viewed, not copied."""

    __slots__ = ("__array_interface__",)

    def __init__(self, address: int, shape: tuple[int, ...], strides: tuple[int, ...], dtype: np.dtype, *,
                 read_only: bool = True) -> None:
        self.__array_interface__ = {
            "version": 3, "data": (address, read_only), "shape": shape, "strides": strides, "typestr": dtype.str,
        }


def _array_at(address: int, tensor: GGMLTensor, dtype: type[np.generic], *, writable: bool = False) -> np.ndarray:
    """A numpy view (ne3, ne2, ne1, ne0) with the tensor's byte strides, valid while the memory is; read-only unless
    `writable`."""
    shape = tuple(int(tensor.ne[i]) for i in (3, 2, 1, 0))
    strides = tuple(int(tensor.nb[i]) for i in (3, 2, 1, 0))
    return np.asarray(_RawMemory(address, shape, strides, np.dtype(dtype), read_only=not writable))


def _column_square_sums(rows: np.ndarray) -> np.ndarray:
    """Sum over rows of the squared values, per column, computed in float64 (squares of float32 are exact)."""
    return np.square(rows, dtype=np.float64).sum(axis=0)


@functools.cache
def _quiet_llama() -> Callable[[int, bytes, int | None], None]:
    """Route llama.cpp's and ggml's logging to a callback that drops it; the callback object lives forever."""

    @llama.llama_log_callback
    def discard(_level: int, _text: bytes, _user_data: int | None) -> None:
        return None

    llama.llama_log_set(discard, None)
    llama.llama_backend_init()
    return discard


def _release(context: int, model: int, batch: llama.llama_batch | None, _keep_alive: tuple[object, ...]) -> None:
    if context:
        llama.llama_free(context)
    if model:
        llama.llama_model_free(model)
    if batch is not None:
        llama.llama_batch_free(batch)


def _apply_adapters(model: int, context: int, loras: Sequence[tuple[Path | str, float]], model_name: str) -> None:
    """Load each LoRA adapter for `model` and set them all, with their scales, on `context`. The adapters belong to
    the model from then on: llama.cpp frees them with it, also when this raises."""
    if not loras:
        return
    adapters = []
    for path, _ in loras:
        adapter = llama.llama_adapter_lora_init(model, os.fsencode(path))
        if not adapter:
            raise EvaluationFailed(f"llama.cpp could not load the LoRA adapter {Path(path).name} for {model_name}; "
                                   "check that it is a LoRA adapter GGUF made for this base model (`qdesk convert "
                                   "ADAPTER_DIR` makes one).")
        adapters.append(adapter)
    handles = (llama.llama_adapter_lora_p_ctypes * len(adapters))(*adapters)
    scales = (ctypes.c_float * len(loras))(*(float(scale) for _, scale in loras))
    if llama.llama_set_adapters_lora(context, handles, len(adapters), scales):
        raise EvaluationFailed(f"llama.cpp could not set the LoRA adapters on the context of {model_name}; check "
                               "that each was made for this base model.")


class _WeightLocator:
    """An eval callback that notes where every named weight the graph reads lives and, while `adjust` is set, hands
    it the products of the `adjusted` weights once they are computed (it asks for no other node)."""

    def __init__(self, lib: GGML) -> None:
        self._lib = lib
        self.weights: dict[str, int] = {}
        self.error: BaseException | None = None
        self.adjusted: frozenset[str] = frozenset()
        self.adjust: ProductAdjuster | None = None
        self.adjust_error: BaseException | None = None
        self._output_staging = np.empty(0, dtype=np.uint8)

    def on_eval(self, node: int, ask: bool, _user_data: int | None) -> bool:
        if not ask:
            try:
                self._adjust_product(node)
            except BaseException as error:  # nothing may escape into C; raised again after the decode
                self.adjust_error = error
                return False
            return True
        try:
            for index in range(MAX_SRC):
                source = _read_pointer(node + _SRC_OFFSET + index * _POINTER_SIZE)
                if source:
                    raw = ctypes.string_at(source + _NAME_OFFSET)
                    if raw.endswith(b"weight") and b"#" not in raw:
                        self.weights.setdefault(raw.decode("utf-8", errors="replace"), source)
            return self.adjust is not None and self._is_adjusted_product(node)
        except BaseException as error:  # nothing may escape into C
            self.error = error
        return False

    def _is_adjusted_product(self, node: int) -> bool:
        if _read_int(node + _OP_OFFSET) != self._lib.op_mul_mat:
            return False
        weight = _read_pointer(node + _SRC_OFFSET)
        activations = _read_pointer(node + _SRC1_OFFSET)
        if not weight or not activations or _read_int(activations) != _TYPE_F32:
            return False
        return weight_name(ctypes.string_at(weight + _NAME_OFFSET)) in self.adjusted

    def _adjust_product(self, node: int) -> None:
        if self.adjust is None:
            return
        product = GGMLTensor.from_address(node)
        weight = GGMLTensor.from_address(product.src[0])
        if int(weight.ne[2]) != 1 or int(weight.ne[3]) != 1 or product.type != _TYPE_F32:
            return
        name = weight_name(ctypes.string_at(product.src[0] + _NAME_OFFSET))
        inputs = GGMLTensor.from_address(product.src[1])
        n_in, n_out = int(inputs.ne[0]), int(product.ne[0])
        if self._lib.ggml_backend_buffer_is_host(inputs.buffer):
            rows = _array_at(inputs.data, inputs, np.float32).reshape(-1, n_in)
        else:
            rows = np.empty(_extent(inputs, 4), dtype=np.uint8)
            self._lib.ggml_backend_tensor_get(product.src[1], rows.ctypes.data, 0, rows.nbytes)
            rows = _array_at(rows.ctypes.data, inputs, np.float32).reshape(-1, n_in).copy()
        size = _extent(product, 4)
        if self._lib.ggml_backend_buffer_is_host(product.buffer):
            self.adjust(name, rows, _array_at(product.data, product, np.float32, writable=True).reshape(-1, n_out))
            return
        if self._output_staging.size < size:
            self._output_staging = np.empty(size, dtype=np.uint8)
        self._lib.ggml_backend_tensor_get(node, self._output_staging.ctypes.data, 0, size)
        output = _array_at(self._output_staging.ctypes.data, product, np.float32, writable=True).reshape(-1, n_out)
        self.adjust(name, rows, output)
        self._lib.ggml_backend_tensor_set(node, self._output_staging.ctypes.data, 0, size)


class _AbortPoll:
    """`ggml_abort_callback` state, polled by llama.cpp between graph nodes: True stops the computation.

    It holds no reference to the evaluator, so that an evaluator nobody closed can still be collected.
    """

    def __init__(self, should_stop: Callable[[], bool] | None, collector: _Collector | None) -> None:
        self._should_stop = should_stop
        self._collector = collector
        self.stop_requested = False
        self.error: BaseException | None = None

    def __call__(self, _data: int | None) -> bool:
        if self._collector is not None and self._collector.error is not None:
            return True
        if self._should_stop is None:
            return False
        try:
            if self._should_stop():
                self.stop_requested = True
                return True
        except BaseException as error:  # nothing may escape into C; raised again after the decode
            self.error = error
            return True
        return False

    def take_error(self) -> BaseException | None:
        """The first exception raised in a callback since the last call (and forget it)."""
        error = self.error or (self._collector.error if self._collector is not None else None)
        self.error = None
        if self._collector is not None:
            self._collector.error = None
        return error


class ModelEvaluator:
    """A GGUF loaded into llama.cpp with one context, evaluating chunks of tokens and collecting statistics.

    Use it as a context manager (or call `close()`); the model and its context are freed on exit.
    `should_stop` is polled by llama.cpp while it computes, so a long decode stops promptly with `Stopped`.
    With `vocab_only` only the tokenizer is loaded (fast, no weights): tokenize and read the vocabulary, no more.
    With `editable_weights` the weights are read into memory rather than mapped, and `write_weight` replaces a
    weight's data in place (to measure what degrading one tensor does to the output), once a decode has shown
    where each weight lives; within `adjusting_products`, chosen products are handed to a function that may change
    their outputs as they are computed.
    With `covariance_chunks` > 0 the sums of x xᵀ over every dense weight's input rows in that many first chunks
    are collected as well (`CollectedStats.covariances`): n_in² floats per distinct input, for error feedback.
    Given a `spill` writer, those rows are written to its files instead (`native.input_spill`), and
    `finish_spill()` writes its manifest once the last chunk is done: nothing of them is held in memory.
    `input_observer(name, rows)` is shown every dense weight's input rows (a view, valid during the call only), and
    the final norm's as `FINAL_NORM_INPUT`.
    `loras` are LoRA adapter GGUFs with their scales, loaded for the model and set on its context (W·x + scale·B·A·x
    in every adapted product); llama.cpp frees them with the model. A `vocab_only` evaluator has no context and
    ignores them.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 512,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        collect: bool = True,
        collect_output: bool = False,
        should_stop: Callable[[], bool] | None = None,
        vocab_only: bool = False,
        editable_weights: bool = False,
        covariance_chunks: int = 0,
        spill: InputSpillWriter | None = None,
        input_observer: InputObserver | None = None,
        loras: Sequence[tuple[Path | str, float]] = (),
    ) -> None:
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1 (got {n_ctx})")
        self._path = Path(model_path)
        self._n_ctx = n_ctx
        self._collect = collect or collect_output or covariance_chunks > 0 or input_observer is not None
        self._chunks = 0
        self._tokens = 0
        self._collector = (
            _Collector(ggml(), collect_output=collect_output, skip_output_product=not collect_output,
                       covariance_chunks=covariance_chunks, spill=spill, input_observer=input_observer)
            if self._collect else None
        )
        self._abort_poll = _AbortPoll(should_stop, self._collector)
        self._context = 0
        self._model = 0
        self._batch: llama.llama_batch | None = None
        _quiet_llama()

        if not self._path.is_file():
            raise EvaluationFailed(f"{self._path} is not a file; check the path of the model.")
        model_params = llama.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        model_params.vocab_only = vocab_only
        if editable_weights:
            model_params.load_mode = _LOAD_INTO_MEMORY
            model_params.lazy_mode = _LAZY_OFF
        self._model = llama.llama_model_load_from_file(os.fsencode(self._path), model_params) or 0
        if not self._model:
            raise EvaluationFailed(
                f"llama.cpp could not load {self._path.name}; check that it is a complete GGUF model of an "
                "architecture this llama.cpp supports."
            )
        self._vocab = llama.llama_model_get_vocab(self._model)
        if vocab_only:
            self._callbacks: tuple[object, ...] = ()
            self._finalizer = weakref.finalize(self, _release, 0, self._model, None, ())
            self._finalizer.atexit = False
            return

        threads = n_threads if n_threads is not None else (os.cpu_count() or 1)
        context_params = llama.llama_context_default_params()
        context_params.n_ctx = n_ctx
        self._n_batch = min(n_ctx, DEFAULT_UBATCH)
        context_params.n_batch = self._n_batch
        context_params.n_ubatch = self._n_batch
        context_params.n_seq_max = 1
        context_params.n_threads = threads
        context_params.n_threads_batch = threads
        context_params.no_perf = True
        callbacks: list[object] = []
        self._locator = _WeightLocator(ggml()) if editable_weights and self._collector is None else None
        if self._locator is not None:
            locate_callback = llama.ggml_backend_sched_eval_callback(self._locator.on_eval)
            context_params.cb_eval = locate_callback
            context_params.cb_eval_user_data = None
            callbacks.append(locate_callback)
        if self._collector is not None:
            eval_callback = llama.ggml_backend_sched_eval_callback(self._collector.on_eval)
            context_params.cb_eval = eval_callback
            context_params.cb_eval_user_data = None
            callbacks.append(eval_callback)
        if self._collector is not None or should_stop is not None:
            abort_callback = llama.ggml_abort_callback(self._abort_poll)
            context_params.abort_callback = abort_callback
            context_params.abort_callback_data = None
            callbacks.append(abort_callback)
        self._callbacks = tuple(callbacks)
        self._context = llama.llama_init_from_model(self._model, context_params) or 0
        if not self._context:
            llama.llama_model_free(self._model)
            self._model = 0
            raise EvaluationFailed(
                f"llama.cpp could not create a context of {n_ctx} tokens for {self._path.name}; "
                "try a smaller context or fewer GPU layers."
            )
        try:
            _apply_adapters(self._model, self._context, loras, self._path.name)
        except BaseException:
            llama.llama_free(self._context)
            llama.llama_model_free(self._model)
            self._context = self._model = 0
            raise
        self._batch = llama.llama_batch_init(self._n_batch, 0, 1)
        self._batch_tokens = np.ctypeslib.as_array(self._batch.token, shape=(self._n_batch,))
        self._batch_positions = np.ctypeslib.as_array(self._batch.pos, shape=(self._n_batch,))
        self._batch_outputs = np.ctypeslib.as_array(self._batch.logits, shape=(self._n_batch,))
        np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self._n_batch,))[:] = 1
        for index in range(self._n_batch):
            self._batch.seq_id[index][0] = 0
        self._finalizer = weakref.finalize(self, _release, self._context, self._model, self._batch, self._callbacks)
        self._finalizer.atexit = False

    def __enter__(self) -> ModelEvaluator:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the context and the model (safe to call twice)."""
        if self._context or self._model:
            self._finalizer()
            self._context = self._model = 0
            self._batch = None

    def _live_context(self) -> int:
        if not self._context:
            state = "opened for its vocabulary only" if self._model else "closed"
            raise EvaluationFailed(f"the evaluator of {self._path.name} is {state}; open a new one to evaluate.")
        return self._context

    def _live_model(self) -> int:
        if not self._model:
            raise EvaluationFailed(f"the evaluator of {self._path.name} is closed; open a new one.")
        return self._model

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text` with the model's own tokenizer (`add_special` adds BOS/EOS as the model asks)."""
        self._live_model()
        data = text.encode("utf-8")
        capacity = len(data) + 8
        for _ in range(2):
            buffer = (llama.llama_token * capacity)()
            count = llama.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, parse_special)
            if count >= 0:
                return list(buffer[:count])
            capacity = -count
        raise EvaluationFailed(f"llama.cpp could not tokenize a text of {len(data)} bytes; the tokenizer of "
                               f"{self._path.name} may be damaged.")

    def chat_template(self) -> str | None:
        """The model's default chat template (`tokenizer.chat_template`), or None when it has none."""
        self._live_model()
        template = llama.llama_model_chat_template(self._model, None)
        return template.decode("utf-8", errors="replace") if template else None

    def bos_token(self) -> int | None:
        self._live_model()
        token = int(llama.llama_vocab_bos(self._vocab))
        return token if token >= 0 else None

    def n_ctx_train(self) -> int:
        self._live_model()
        return int(llama.llama_model_n_ctx_train(self._model))

    def n_vocab(self) -> int:
        self._live_model()
        return int(llama.llama_vocab_n_tokens(self._vocab))

    def adds_bos(self) -> bool:
        """Whether the model's tokenizer puts a BOS token in front of a text (`add_special`)."""
        self._live_model()
        return bool(llama.llama_vocab_get_add_bos(self._vocab))

    def token_piece(self, token: int) -> bytes:
        """The bytes token `token` stands for in a text (special tokens as their text)."""
        self._live_model()
        buffer = ctypes.create_string_buffer(64)
        count = llama.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
        if count < 0:
            buffer = ctypes.create_string_buffer(-count)
            count = llama.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
        return buffer.raw[: max(count, 0)]

    def vocabulary(self) -> list[bytes]:
        """Every token's text, in id order: two models share a vocabulary when these lists are equal."""
        self._live_model()
        return [llama.llama_vocab_get_text(self._vocab, token) or b"" for token in range(self.n_vocab())]

    def evaluate_logits(self, tokens: Sequence[int], first_output: int, consume: LogitsConsumer) -> None:
        """Decode `tokens` as one sequence from position 0 and hand the logits of positions >= `first_output`.

        `consume(position, logits)` is called after each physical batch with the rows of that batch's outputs
        (rows × n_vocab float32, position of the first row); the array points into llama.cpp's buffer and is
        valid only during the call. Only the wanted rows are computed, as in llama.cpp's perplexity tool.
        """
        if self._collector is not None and self._collector.output_skip.watches_norm():
            raise EvaluationFailed("this evaluator collects statistics and skips the output product; open one with "
                                   "collect=False to read logits.")
        context = self._checked_chunk(tokens)
        ids = np.asarray(tokens, dtype=np.int64)
        if not 0 <= first_output < ids.size:
            raise ValueError(f"first_output must lie in 0..{ids.size - 1} (got {first_output})")
        n_vocab = self.n_vocab()
        llama.llama_memory_clear(llama.llama_get_memory(context), True)
        for start in range(0, ids.size, self._n_batch):
            batch = ids[start : start + self._n_batch]
            first_row = max(first_output - start, 0)
            if first_row >= batch.size:
                self._decode(context, batch, start)
                continue
            self._decode(context, batch, start, first_output_row=first_row)
            rows = batch.size - first_row
            pointer = llama.llama_get_logits(context)
            logits = np.ctypeslib.as_array(pointer, shape=(rows, n_vocab))
            consume(start + first_row, logits)

    def evaluate_embedding_logits(self, embeddings: np.ndarray, first_output: int, consume: LogitsConsumer) -> None:
        """`evaluate_logits` with the input embeddings given (rows × n_embd float32) instead of token ids: the
        token embedding's lookup is skipped, so what a change of its weights does to the output alone can be told
        from what it does to the input (a tied embedding serves both)."""
        if self._collector is not None:
            raise EvaluationFailed("open the evaluator with collect=False to evaluate embeddings.")
        context = self._live_context()
        rows = np.ascontiguousarray(embeddings, dtype=np.float32)
        n_embd = int(llama.llama_model_n_embd(self._model))
        if rows.ndim != 2 or rows.shape[1] != n_embd or not 0 < rows.shape[0] <= self._n_ctx:
            raise ValueError(f"embeddings must be 1..{self._n_ctx} rows of {n_embd} values (got {rows.shape})")
        if not 0 <= first_output < rows.shape[0]:
            raise ValueError(f"first_output must lie in 0..{rows.shape[0] - 1} (got {first_output})")
        n_vocab = self.n_vocab()
        llama.llama_memory_clear(llama.llama_get_memory(context), True)
        batch = llama.llama_batch_init(self._n_batch, n_embd, 1)
        try:
            inputs = np.ctypeslib.as_array(batch.embd, shape=(self._n_batch, n_embd))
            positions = np.ctypeslib.as_array(batch.pos, shape=(self._n_batch,))
            outputs = np.ctypeslib.as_array(batch.logits, shape=(self._n_batch,))
            np.ctypeslib.as_array(batch.n_seq_id, shape=(self._n_batch,))[:] = 1
            for index in range(self._n_batch):
                batch.seq_id[index][0] = 0
            for start in range(0, rows.shape[0], self._n_batch):
                count = min(self._n_batch, rows.shape[0] - start)
                first_row = max(first_output - start, 0)
                inputs[:count] = rows[start : start + count]
                positions[:count] = np.arange(start, start + count)
                outputs[:count] = 0
                outputs[min(first_row, count - 1) : count] = 1
                batch.n_tokens = count
                self._abort_poll.stop_requested = False
                self._finish_decode(llama.llama_decode(context, batch), count)
                if first_row < count:
                    pointer = llama.llama_get_logits(context)
                    consume(start + first_row, np.ctypeslib.as_array(pointer, shape=(count - first_row, n_vocab)))
        finally:
            llama.llama_batch_free(batch)

    def weight_names(self) -> tuple[str, ...]:
        """The weights the graph has read so far (all of them after one decode), when opened with editable_weights."""
        return tuple(self._locator.weights) if self._locator is not None else ()

    def read_weight(self, name: str) -> np.ndarray:
        """The stored bytes of weight `name` (as uint8)."""
        tensor = self._weight(name)
        out = np.empty(ggml().ggml_nbytes(tensor), dtype=np.uint8)
        ggml().ggml_backend_tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
        return out

    def write_weight(self, name: str, data: np.ndarray) -> None:
        """Replace the stored bytes of weight `name` with `data` (same size and layout: the weight's own type)."""
        tensor = self._weight(name)
        raw = np.ascontiguousarray(data).view(np.uint8)
        size = ggml().ggml_nbytes(tensor)
        if raw.nbytes != size:
            raise ValueError(f"{name} holds {size} bytes; got {raw.nbytes}")
        ggml().ggml_backend_tensor_set(tensor, raw.ctypes.data, 0, size)

    @contextlib.contextmanager
    def adjusting_products(self, weights: Iterable[str], adjust: ProductAdjuster) -> Iterator[None]:
        """Within the block, every product of one of `weights` (2-D weights, F32 inputs) is handed to `adjust` as soon
        as it is computed, which may change its output before the rest of the graph reads it: to emulate what a
        kernel does that this model's weights do not (rounding the inputs, say). Editable evaluators only."""
        if self._locator is None:
            raise EvaluationFailed("open the evaluator with editable_weights=True (and collect=False) to adjust "
                                   "products.")
        self._live_context()
        self._locator.adjusted, self._locator.adjust = frozenset(weights), adjust
        try:
            yield
        finally:
            self._locator.adjusted, self._locator.adjust = frozenset(), None

    def weight_type(self, name: str) -> str:
        """ggml's name of the stored type of weight `name` ("f16", "f32", …)."""
        return ggml().type_name(GGMLTensor.from_address(self._weight(name)).type)

    def _weight(self, name: str) -> int:
        self._live_context()
        if self._locator is None:
            raise EvaluationFailed("open the evaluator with editable_weights=True to read or write weights.")
        if self._locator.error is not None:
            raise EvaluationFailed(f"locating the weights failed: {self._locator.error}")
        try:
            return self._locator.weights[name]
        except KeyError:
            raise EvaluationFailed(f"{name} is not a weight the model's graph has used; evaluate a chunk first.")\
                from None

    def clear(self) -> None:
        """Forget every token decoded so far (the next decode starts a new sequence)."""
        llama.llama_memory_clear(llama.llama_get_memory(self._live_context()), True)

    def decode_at(self, tokens: Sequence[int], first_position: int) -> None:
        """Decode `tokens` continuing the current sequence at `first_position` (at most one physical batch)."""
        context = self._live_context()
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or not 0 < ids.size <= self._n_batch:
            raise ValueError(f"decode_at takes 1..{self._n_batch} tokens (got {ids.size})")
        if first_position + ids.size > self._n_ctx:
            raise ValueError(f"positions up to {first_position + ids.size} do not fit the context of {self._n_ctx}")
        self._decode(context, ids, first_position)

    def _checked_chunk(self, tokens: Sequence[int]) -> int:
        context = self._live_context()
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("a chunk must be a non-empty sequence of token ids")
        if ids.size > self._n_ctx:
            raise ValueError(f"a chunk of {ids.size} tokens does not fit the context of {self._n_ctx}")
        n_vocab = self.n_vocab()
        if ids.min() < 0 or ids.max() >= n_vocab:
            raise ValueError(f"token ids must lie in 0..{n_vocab - 1} for {self._path.name}")
        return context

    def evaluate_chunk(self, tokens: Sequence[int]) -> None:
        """Decode `tokens` as one sequence from position 0 (the memory is cleared first), exactly as given.

        The chunk goes to llama.cpp in physical batches of up to 512 tokens, which keeps llama.cpp's logits
        buffer (n_vocab floats per output token; every token is an output while collecting) at one batch.

        The caller puts a BOS token in front where the model wants one. Raises `Stopped` when `should_stop`
        said so during the decode, `EvaluationFailed` when llama.cpp could not evaluate the tokens; either way
        nothing of this chunk is added to the statistics.
        """
        context = self._checked_chunk(tokens)
        ids = np.asarray(tokens, dtype=np.int64)
        llama.llama_memory_clear(llama.llama_get_memory(context), True)
        try:
            for start in range(0, ids.size, self._n_batch):
                self._decode(context, ids[start : start + self._n_batch], start)
        except BaseException:
            if self._collector is not None:
                self._collector.discard_chunk()
            raise
        if self._collector is not None:
            self._collector.commit_chunk()
        self._chunks += 1
        self._tokens += int(ids.size)

    def _decode(self, context: int, ids: np.ndarray, first_position: int, first_output_row: int | None = None) -> None:
        """One `llama_decode` of at most one physical batch, continuing the sequence at `first_position`.

        Outputs: every row while collecting, rows from `first_output_row` on when given, else the last row.
        """
        count = int(ids.size)
        self._batch_tokens[:count] = ids
        self._batch_positions[:count] = np.arange(first_position, first_position + count)
        self._batch_outputs[:count] = 1 if self._collect else 0
        if first_output_row is not None:
            self._batch_outputs[first_output_row:count] = 1
        self._batch_outputs[count - 1] = 1
        self._batch.n_tokens = count
        self._abort_poll.stop_requested = False
        if self._collector is not None:
            self._collector.begin_decode()
        self._finish_decode(llama.llama_decode(context, self._batch), count)

    def _finish_decode(self, status: int, count: int) -> None:
        error = self._abort_poll.take_error()
        if self._locator is not None and self._locator.adjust_error is not None:
            error, self._locator.adjust_error = error or self._locator.adjust_error, None
        if error is not None:
            raise error
        if status == _DECODE_ABORTED and self._abort_poll.stop_requested:
            raise Stopped(f"evaluation of {self._path.name} was stopped on request")
        if status == _DECODE_NO_SLOT:
            raise EvaluationFailed(f"llama.cpp found no room for {count} more tokens in its context of "
                                   f"{self._n_ctx}; use a larger context or shorter chunks.")
        if status != 0:
            raise EvaluationFailed(f"llama.cpp failed to evaluate {count} tokens of {self._path.name} (code "
                                   f"{status}); check the model with `qdesk info`, or try fewer GPU layers.")
        if self._collector is not None:
            self._collector.output_skip.end_decode()

    @property
    def output_weight(self) -> str | None:
        """The weight of the output product (the token embedding when tied), once a chunk has been evaluated while
        collecting."""
        return self._collector.output_weight if self._collector is not None else None

    def stats(self) -> CollectedStats:
        """A copy of the statistics so far (no matrices when the evaluator does not collect)."""
        matrices = {} if self._collector is None else {
            name: accumulator.snapshot() for name, accumulator in self._collector.matrices.items()
        }
        inputs = self._collector.covariances if self._collector is not None else None
        covariances = {}
        if inputs is not None and isinstance(inputs.sink, _CovarianceSums):
            covariances = {weight: inputs.sink.totals[owner] for weight, owner in inputs.by_weight().items()
                           if owner in inputs.sink.totals}
        return CollectedStats(matrices, chunks=self._chunks, tokens=self._tokens, chunk_size=self._n_ctx,
                              covariances=covariances)

    def finish_spill(self) -> None:
        """Write the manifest of the spilled input rows (which weights read each input); after the last chunk."""
        inputs = self._collector.covariances if self._collector is not None else None
        if inputs is None or not isinstance(inputs.sink, InputSpillWriter):
            raise EvaluationFailed("this evaluator spills no input rows; open it with covariance_chunks and spill.")
        inputs.sink.close(inputs.by_weight(), chunks=inputs.chunks_done, tokens=inputs.tokens)


def _known_length(items: Iterable[object]) -> int:
    return len(items) if isinstance(items, Sized) else 0


def collect_activation_stats(
    model_path: str | Path,
    chunks: Iterable[Sequence[int]],
    *,
    n_ctx: int,
    n_gpu_layers: int = 0,
    n_threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    total_chunks: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    collect_output: bool = False,
    covariance_chunks: int = 0,
) -> CollectedStats:
    """Evaluate each chunk of token ids with llama.cpp and return the activation statistics of every weight.

    `progress(done, total)` is called after loading (done = 0) and after every chunk; total is
    `total_chunks`, else `len(chunks)` when it has one, else 0 (unknown). `should_stop` is checked between
    chunks and while llama.cpp computes; when it returns True, `Stopped` is raised.
    """
    total = total_chunks if total_chunks is not None else _known_length(chunks)
    with ModelEvaluator(
        model_path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads, collect_output=collect_output,
        should_stop=should_stop, covariance_chunks=covariance_chunks,
    ) as evaluator:
        if progress is not None:
            progress(0, total)
        for done, chunk in enumerate(chunks, start=1):
            if should_stop is not None and should_stop():
                raise Stopped("activation statistics were stopped on request")
            evaluator.evaluate_chunk(chunk)
            if progress is not None:
                progress(done, total)
        return evaluator.stats()
