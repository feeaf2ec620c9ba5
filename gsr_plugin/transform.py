"""compressed-tensors transform types for grouped Walsh rotations.

Registered in compressed-tensors' ``TransformFactory`` registry on import:
``sequency-walsh`` (the GSR block), ``natural-walsh`` (Sylvester order, for ablations),
``sequency-permutation`` (the sequency row map alone, to fold it into a weight),
``random-orthogonal`` (the full-width random rotation baseline) and
``learned-orthogonal`` (FRTQ's learned matrices, fused from the modifier that learned
them).

For the Walsh types, a scheme's ``head_dim`` is the block size k: the rotation is block-diagonal
with identical k x k blocks ``M = D W / sqrt(k)``, ``W`` the +-1 Walsh matrix in the
type's order and ``D`` the diagonal of +-1 signs drawn from the factory's seed when
``scheme.randomize`` (identity otherwise). Like the built-in ``hadamard`` type the
stored weight is the +-1 matrix ``D W`` and the transform divides by ``sqrt(k)``, so
a consumer that multiplies by the stored matrix (vLLM's dense fallback for types
other than ``hadamard``) computes the same rotation.

Never label these matrices ``hadamard``: vLLM sends that type to a kernel that
assumes the natural order without signs.
"""

from __future__ import annotations

import contextlib

import torch
from compressed_tensors.transform import (
    HadamardFactory,
    RandomMatrixFactory,
    TransformArgs,
    TransformFactory,
    TransformLocation,
    TransformScheme,
)
from compressed_tensors.modeling.attention import HOOKED_ATTENTION_NAME, IMPL_ATTR, QuantizedAttentionImpl
from compressed_tensors.quantization.utils.helpers import KV_CACHE_TARGETS
from compressed_tensors.transform.factory.base import TransformBase
from compressed_tensors.transform.utils.matrix import get_transform_size
from compressed_tensors.utils import get_execution_device, get_offloaded_device
from torch import Tensor
from torch.nn import Module, Parameter
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from gsr_plugin.learn.orthogonal import rotate_inputs
from gsr_plugin.walsh import Ordering, grouped_walsh_transform, random_signs, sequency_permutation, walsh_matrix

__all__ = [
    "SEQUENCY_WALSH",
    "NATURAL_WALSH",
    "RANDOM_ORTHOGONAL",
    "SEQUENCY_PERMUTATION",
    "LEARNED_ORTHOGONAL",
    "LearnedRotationFactory",
    "BlockMatrixTransform",
    "fuse_into_weight",
    "is_linear_like",
    "LINEAR_LIKE_TYPES",
    "SequencyPermutationFactory",
    "RandomOrthogonalFactory",
    "TRANSFORM_TYPES",
    "WalshFactory",
    "KVCacheOnlyAttention",
    "SequencyWalshFactory",
    "NaturalWalshFactory",
    "GroupedWalshTransform",
    "register_transform_types",
]

SEQUENCY_WALSH = "sequency-walsh"
NATURAL_WALSH = "natural-walsh"
RANDOM_ORTHOGONAL = "random-orthogonal"
SEQUENCY_PERMUTATION = "sequency-permutation"
LEARNED_ORTHOGONAL = "learned-orthogonal"
TRANSFORM_TYPES: dict[str, Ordering] = {SEQUENCY_WALSH: "sequency", NATURAL_WALSH: "natural"}


class KVCacheOnlyAttention(QuantizedAttentionImpl):
    """compressed-tensors' hooked attention (which R3's query hook needs), quantizing
    the queries only when the attention has query quantization of its own.

    A KV-cache scheme (``kv_cache_scheme``) is put on the attention module as
    ``quantization_scheme.input_activations`` (targets ``KV_CACHE_TARGETS``), the
    attribute the base class reads for the *queries*: with a static KV cache the first
    forward fails (``no attribute 'q_scale'``), with a dynamic one the queries are
    quantized to the KV cache's grid without a word (compressed-tensors 0.19). Keys and
    values are quantized in the cache (``QuantizedKVCache``), after R3's key hook."""

    def forward(self, module: Module, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs):
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and list(scheme.targets) == KV_CACHE_TARGETS:
            attention = ALL_ATTENTION_FUNCTIONS[QuantizedAttentionImpl._original_impl]
            return attention(module, query, key, value, *args, **kwargs)
        return super().forward(module, query, key, value, *args, **kwargs)


class QueryRotationBesideKVCache:
    """Factory mixin: a ``q_attn`` transform (R3) leaves the queries unquantized
    beside a quantized KV cache (``KVCacheOnlyAttention``)."""

    def _apply_to_module(self, model: Module, module: Module, args: TransformArgs):
        super()._apply_to_module(model, module, args)
        if TransformLocation(args.location) == TransformLocation.Q_ATTN:
            impl = getattr(module, IMPL_ATTR)
            if type(impl) is QuantizedAttentionImpl:
                impl.__class__ = KVCacheOnlyAttention


class WalshFactory(QueryRotationBesideKVCache, HadamardFactory):
    """Creates ``GroupedWalshTransform``s. Overrides only what differs from the
    built-in Hadamard factory: the matrix (Walsh order, optional row signs) and the
    transform that applies it. Weights are cached per (size, precision), so fused
    (float64) and online (scheme precision) uses share signs but not dtype."""

    ordering: Ordering = "sequency"

    def __init__(self, name: str, scheme: TransformScheme, seed: int | None = None):
        super().__init__(name, scheme, seed)
        self._signs: dict[int, Tensor] = {}

    def create_transform(self, module: Module, args: TransformArgs) -> "GroupedWalshTransform":
        size = get_transform_size(module, args.location, self.scheme.head_dim)
        precision = self.scheme.precision if args.is_online() else torch.float64
        factory_kwargs = {
            "device": get_offloaded_device(module),
            "construct_device": get_execution_device(module),
        }
        weight = self.weights.get(size, precision, factory_kwargs=factory_kwargs)
        return GroupedWalshTransform(weight, self.ordering, self.scheme, args, type(module))

    def _create_weight(
        self,
        size: int,
        precision: torch.dtype,
        device: torch.device,
        construct_device: torch.device,
    ) -> Parameter:
        data = walsh_matrix(size, self.ordering, normalized=False, dtype=precision)
        if self.scheme.randomize:
            if size not in self._signs:
                self._signs[size] = random_signs(size, self.generator)
            data = self._signs[size].to(precision)[:, None] * data
        # a disk-offloaded module has no tensor device to keep the matrix on: build it
        # where the module executes; register_offload_module offloads online weights
        data = data.to(device=construct_device if device == "disk" else device)
        return Parameter(data, requires_grad=self.scheme.requires_grad)


class SequencyWalshFactory(WalshFactory):
    """Grouped sequency-ordered Walsh rotation (GSR, arXiv 2505.03810)."""

    ordering: Ordering = "sequency"


class NaturalWalshFactory(WalshFactory):
    """Grouped Sylvester-order Walsh rotation: the ablation of GSR's ordering."""

    ordering: Ordering = "natural"


_FUSE_CHUNK_ELEMENTS = 1 << 22  # 32 MB of float64 per slice when fusing into a weight

# modules that are not ``nn.Linear`` but hold an (out, in) ``weight`` applied as
# ``F.linear(x, weight)``: mixture-of-experts routers
LINEAR_LIKE_TYPES = {"MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter"}


def is_linear_like(module_type: type[Module]) -> bool:
    """``y = x W^T`` with ``W`` the module's (out, in) ``weight``."""
    return issubclass(module_type, torch.nn.Linear) or module_type.__name__ in LINEAR_LIKE_TYPES


def fuse_into_weight(value: Tensor, args: TransformArgs, module_type: type[Module], right_multiply) -> Tensor:
    """A weight with ``T`` fused where ``args.location`` says, in float64 slices.

    ``right_multiply(rows, transpose)`` returns ``rows @ M`` (``rows @ M.T`` when
    ``transpose``) on the last dim; with ``T = M`` (``M.T`` when ``args.inverse``) the
    result equals compressed-tensors' ``apply_transform_weight(T, value, location,
    module_type)``:

    =====================  ========================  ==============================
    location               Linear                    Embedding
    =====================  ========================  ==============================
    weight_input           ``value @ T.T``           ``T @ value``
    weight_output          ``T.T @ value``           ``value @ T``
    =====================  ========================  ==============================
    """
    location, inverse = TransformLocation(args.location), bool(args.inverse)
    # "rows": the result is value @ (T or T.T) row by row; otherwise column by column
    if is_linear_like(module_type):  # W @ T.T (weight_input), T.T @ W (weight_output)
        along_rows = location == TransformLocation.WEIGHT_INPUT
        transpose = (not inverse) if along_rows else inverse
    elif issubclass(module_type, torch.nn.Embedding):  # E @ T (weight_output), T @ E (weight_input)
        along_rows = location == TransformLocation.WEIGHT_OUTPUT
        transpose = inverse if along_rows else (not inverse)
    else:
        raise NotImplementedError(
            f"cannot transform the weight of {module_type.__name__} at {location.value}; "
            "target Linear or Embedding modules"
        )
    rows = value if along_rows else value.T
    out = torch.empty(rows.shape, dtype=value.dtype, device=value.device)
    # fused in float64, a slice of rows at a time: the float64 copies of a large
    # weight (a 49152 x 576 embedding is 226 MB in float64) never exist whole
    step = max(1, _FUSE_CHUNK_ELEMENTS // rows.shape[-1])
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step].to(torch.float64)
        out[start : start + step] = right_multiply(chunk, transpose).to(value.dtype)
    # contiguous: offload caches (disk) serialize the result as it is
    return out if along_rows else out.T.contiguous()


class GroupedWalshTransform(TransformBase):
    """Applies ``blockdiag(M, ..., M)`` (``M = weight / sqrt(k)``) where
    ``TransformArgs.location`` says, with the fast transform for large blocks.

    With ``T = M`` (``M.T`` when ``args.inverse``), the results equal compressed-tensors'
    ``apply_transform_weight(T, value, location, module_type)``:

    =====================  ========================  ==============================
    location               Linear                    Embedding
    =====================  ========================  ==============================
    online (input, ...)    ``value @ T``             ``value @ T``
    weight_input           ``value @ T.T``           ``T @ value``
    weight_output          ``T.T @ value``           ``value @ T``
    =====================  ========================  ==============================

    The row signs are read back from the weight (column 0 of every Walsh matrix is
    all ones), so a weight loaded from a checkpoint defines the transform alone.
    """

    _dynamic_tied_weights_keys: list[str] = ["weight"]

    def __init__(
        self,
        weight: Parameter,
        ordering: Ordering,
        scheme: TransformScheme,
        args: TransformArgs,
        module_type: type[Module],
    ):
        super().__init__()
        self.weight = weight
        self.ordering = ordering
        self.scheme = scheme
        self.args = args
        self.module_type = module_type

    def _signs(self) -> Tensor | None:
        signs = self.weight[:, 0]
        return None if bool((signs == 1).all()) else signs

    def _right_multiply(self, value: Tensor, transpose: bool) -> Tensor:
        """``value @ blockdiag(M)`` or ``value @ blockdiag(M).T`` on the last dim."""
        return grouped_walsh_transform(
            value,
            self.weight.shape[0],
            self.ordering,
            self._signs(),
            transpose=transpose,
        )

    def forward(self, value: Tensor) -> Tensor:
        location = TransformLocation(self.args.location)
        if location.is_online():
            # the scheme's precision, or the input's if that is wider (float64 stays float64)
            dtype = torch.promote_types(self.scheme.precision, value.dtype)
            return self._right_multiply(value.to(dtype), transpose=bool(self.args.inverse)).to(value.dtype)
        return fuse_into_weight(value, self.args, self.module_type, self._right_multiply)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(block={self.weight.shape[0]}, "
            f"ordering={self.ordering}, inverse={self.args.inverse})"
        )


class RandomOrthogonalFactory(QueryRotationBesideKVCache, RandomMatrixFactory):
    """A seeded random orthogonal matrix (Haar: QR of a Gaussian matrix, signs fixed
    by R's diagonal), for the full-width random rotation baseline. The built-in
    ``random-matrix`` type is invertible but not orthogonal, which no norm fusion can
    make exact. The inverse is computed in float64 (equal to the transpose to 1e-15)."""

    def _create_weight(self, size: int, device, precision: torch.dtype) -> Parameter:
        gaussian = torch.randn(size, size, generator=self.generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r))[None, :]
        return Parameter(q.to(precision).to(device), requires_grad=self.scheme.requires_grad)


class SequencyPermutationFactory(TransformFactory):
    """The row map of the sequency order as a transform, for folding it into weights.

    A sequency block is a permuted natural one: ``B_seq = H[pi, :] / sqrt(k)`` with
    ``pi(s) = bitrev(gray(s))``, so ``x @ B_seq = x[..., pi^-1] @ H / sqrt(k)`` (blockwise).
    At ``weight_output`` this transform reorders a linear's output rows within each block
    of ``head_dim`` (``W -> W[pi^-1]``), so that its output is already in the order the
    natural ``hadamard`` transform then needs; ``inverse`` undoes it. It is a permutation,
    hence exact in any precision.
    """

    def create_transform(self, module: Module, args: TransformArgs) -> "SequencyPermutationTransform":
        if not isinstance(module, torch.nn.Linear) or args.is_online():
            raise NotImplementedError(
                f"{SEQUENCY_PERMUTATION} is fused into Linear weights only (weight_output or "
                f"weight_input), not {type(module).__name__} at {args.location}"
            )
        return SequencyPermutationTransform(self.scheme.head_dim, args)


class SequencyPermutationTransform(TransformBase):
    def __init__(self, block: int, args: TransformArgs):
        super().__init__()
        self.block = block
        self.args = args
        perm = sequency_permutation(block)
        self.register_buffer("order", torch.argsort(perm) if not args.inverse else perm, persistent=False)

    def forward(self, value: Tensor) -> Tensor:
        """Rows (weight_output) or columns (weight_input) gathered blockwise."""
        along_rows = TransformLocation(self.args.location) == TransformLocation.WEIGHT_OUTPUT
        x = value.T if along_rows else value
        blocks = x.reshape(*x.shape[:-1], x.shape[-1] // self.block, self.block)
        out = blocks[..., self.order.to(value.device)].reshape(x.shape)
        return (out.T if along_rows else out).contiguous()



class LearnedRotationFactory(TransformFactory):
    """Fuses learned orthogonal matrices (FRTQ) into the weights, offline only.

    ``blocks`` is one ``(m, k, k)`` stack for every target (R1: ``blockdiag(Q_1..Q_m)``
    of the residual stream), or a dict from a parent module's name to its stack (R2:
    one ``(1, k, k)`` per attention module, applied to every head of its v_proj and
    o_proj). A stack of one block is repeated over the transformed size. The matrices
    come from the modifier that learned them (or their saved file), never from the
    type name alone: a checkpoint's ``learned-orthogonal`` entry is a record of what
    was fused, and ``from_scheme`` on it is refused.
    """

    def __init__(
        self,
        name: str,
        scheme: TransformScheme,
        seed: int | None = None,
        blocks: Tensor | dict[str, Tensor] | None = None,
    ):
        if blocks is None:
            raise ValueError(
                f"{LEARNED_ORTHOGONAL} transforms are fused offline from learned matrices; "
                "re-apply them with FRTQModifier(rotations_from=DIR) on the checkpoint they "
                "came from (frtq/rotations.safetensors)"
            )
        super().__init__(name, scheme, seed)
        self.blocks = blocks
        self._names: dict[int, str] = {}

    def apply_to_model(self, model: Module, use_tqdm=True):
        self._names = {id(module): name for name, module in model.named_modules()}
        super().apply_to_model(model, use_tqdm)

    def create_transform(self, module: Module, args: TransformArgs) -> "BlockMatrixTransform":
        if args.is_online():
            raise NotImplementedError(f"{LEARNED_ORTHOGONAL} is fused into weights only, not applied at {args.location}")
        blocks = self.blocks
        if isinstance(blocks, dict):
            parent = self._names[id(module)].rsplit(".", 1)[0]
            if parent not in blocks:
                raise KeyError(f"no learned {self.name} matrix for {parent}")
            blocks = blocks[parent]
        return BlockMatrixTransform(blocks, args, type(module))


class BlockMatrixTransform(TransformBase):
    """Applies ``blockdiag(Q_1, ..., Q_m)`` (given blocks, float64) to a weight where
    ``TransformArgs.location`` says, as ``GroupedWalshTransform`` does."""

    def __init__(self, blocks: Tensor, args: TransformArgs, module_type: type[Module]):
        super().__init__()
        self.register_buffer("blocks", blocks.to(torch.float64), persistent=False)
        self.args = args
        self.module_type = module_type

    def _right_multiply(self, value: Tensor, transpose: bool) -> Tensor:
        blocks = self.blocks.to(value.device)
        k = blocks.shape[-1]
        if blocks.shape[0] == 1:  # one matrix for every block (R2: every head)
            blocks = blocks.expand(value.shape[-1] // k, k, k)
        if blocks.shape[0] * k != value.shape[-1]:
            raise ValueError(f"learned blocks {tuple(self.blocks.shape)} do not fit size {value.shape[-1]}")
        return rotate_inputs(value, blocks.transpose(-1, -2) if transpose else blocks)

    def forward(self, value: Tensor) -> Tensor:
        return fuse_into_weight(value, self.args, self.module_type, self._right_multiply)


@contextlib.contextmanager
def _eager_attention_keeping_hooks(model: Module):
    """llm-compressor's ``use_eager_attention`` for its calibration passes, keeping
    compressed-tensors' hooked attention where a model has it.

    llm-compressor 0.14 runs every calibration forward with the config's attention
    implementation set to ``eager`` (so that traced subgraphs hold an unconditional
    causal-mask add). That bypasses the hooked attention, where an R3 rotates the
    queries, while the key rotation (in the hooked KV cache) still runs: during
    calibration every layer after the first attends with rotated keys and unrotated
    queries, and GPTQ fits its weights to that (measured: W4 g64 GPTQ on the default
    model, R1+R2 27.24, R1+R2+R3 34.30, though R3 is exact in float). Here the hooked
    attention stays, with eager's mask (a tensor, as the traced graph expects), and
    the original implementation under it."""
    if model is None or getattr(getattr(model, "config", None), "_attn_implementation", None) != HOOKED_ATTENTION_NAME:
        from llmcompressor.utils import helpers

        with helpers._gsr_upstream_use_eager_attention(model):
            yield
        return
    mask = ALL_MASK_ATTENTION_FUNCTIONS[HOOKED_ATTENTION_NAME]
    ALL_MASK_ATTENTION_FUNCTIONS.register(HOOKED_ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    try:
        yield
    finally:
        ALL_MASK_ATTENTION_FUNCTIONS.register(HOOKED_ATTENTION_NAME, mask)


def install_calibration_attention() -> None:
    """Put ``_eager_attention_keeping_hooks`` in place of llm-compressor's
    ``use_eager_attention`` (read by ``calibration_forward_context`` at each call).
    Idempotent, also across reloads of this module: the upstream function is kept
    once, on its own module."""
    from llmcompressor.utils import helpers

    if not hasattr(helpers, "_gsr_upstream_use_eager_attention"):
        helpers._gsr_upstream_use_eager_attention = helpers.use_eager_attention
    helpers.use_eager_attention = _eager_attention_keeping_hooks


def register_transform_types() -> None:
    """Register the Walsh types in compressed-tensors' ``TransformFactory`` registry.

    Idempotent: a name already bound to a class of the same qualified name (an
    earlier import, or a reload of this module) is left as it is; a name bound to a
    foreign class raises, since silently shadowing it would change checkpoints.
    """
    registered = set(TransformFactory.registered_names())
    for name, factory in _FACTORIES.items():
        if name not in registered:
            TransformFactory.register_value(factory, name=name)
            continue
        current = TransformFactory.get_value_from_registry(name)
        if _qualified_name(current) != _qualified_name(factory):
            raise RuntimeError(
                f"transform type {name!r} is already registered to "
                f"{_qualified_name(current)}; gsr_plugin cannot register "
                f"{_qualified_name(factory)} under the same name"
            )


def _qualified_name(obj: type) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


_FACTORIES: dict[str, type[TransformFactory]] = {
    SEQUENCY_WALSH: SequencyWalshFactory,
    NATURAL_WALSH: NaturalWalshFactory,
    RANDOM_ORTHOGONAL: RandomOrthogonalFactory,
    SEQUENCY_PERMUTATION: SequencyPermutationFactory,
    LEARNED_ORTHOGONAL: LearnedRotationFactory,
}
