"""The objective contract and registry (see the package docstring); objective modules import this,
never the package."""
from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp

from maskjax import config as config_lib
from maskjax import masking
from maskjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class HFArch:
    """A transformers architecture an objective describes itself (export only): ``cls`` the class
    name; ``groups(objective)`` its tensors as :class:`maskjax.models.hf_layout.Group` lists;
    ``config(objective)`` its ``config.json`` fields; ``constants(objective)`` tensors maskjax does not
    learn ({name: array}); ``check(objective)`` raises ``ConfigError`` naming a key the architecture
    cannot represent; ``tokenizer``: ship the run's vocabulary beside the weights."""

    cls: str
    groups: Callable
    config: Callable
    constants: Callable = lambda objective: {}
    check: Callable = lambda objective: None
    tokenizer: bool = False


@dataclasses.dataclass(frozen=True)
class Interop:
    """Which Hugging Face architectures (``maskjax export --arch`` names) can hold a run of an objective,
    the first being the default, and where its ViT encoder lives in the parameters (image objectives;
    None for text). ``own`` describes architectures the export module does not know ({arch: HFArch});
    the built-in ones are vit, vit_mae, vit_mim and bert. An objective with no architectures is refused
    by export and ``init_from``; ``own`` architectures are export only."""

    archs: tuple[str, ...] = ()
    encoder: str | None = None
    own: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A second network whose parameters live in the train state beside the student's
    (``state['teacher']``): sharded by its own logical names like every parameter, saved in every
    checkpoint (so resume is exact), never seen by the optimizer (no gradient, no moments, no weight
    decay), listed as not trainable by ``maskjax params``. An objective that declares one receives it
    as ``loss(model, batch, key, step, teacher)``.

    ``build(rngs)``: the teacher's module (parameters only). Then either

    * an **EMA** of the student: ``follows`` is the path of keys of the student's parameter subtree it
      tracks (the same tree as ``build``'s; ``()`` = all of it); it starts as a copy of that subtree,
      and after every applied update (inside the jitted step) becomes ``teacher + r * (student -
      teacher)`` = ``d * teacher + (1 - d) * student`` with ``r = rate(step) = 1 - d``, ``step``
      counting updates from 1 (fairseq's ``set_num_updates``). The rate, not the decay, is the
      argument: 1 - 0.99999 is not representable from a float32 decay (0.1% off);
    * or **frozen**: the parameter subtree ``path`` of the run in ``workdir`` at checkpoint ``step`` (0:
      the newest), or of a transformers model directory ``hf`` imported as a run of ``source_config``
      would be (``maskjax export``'s mapping: ViT / ViTMAE weights with fixed sin-cos positions), loaded
      once when a run starts fresh (its architecture must be ``build``'s); with neither, frozen at a
      random initialisation (a key of its own, not the student's: dBOT's first stage).
      ``source_config``: the config of the run the parameters come from (required with ``hf``; with
      ``workdir``, its saved config, read from its config.json when not given)."""

    build: Callable
    follows: tuple[str, ...] | None = None
    rate: Callable | None = None
    workdir: str | None = None
    step: int = 0
    path: tuple[str, ...] = ("encoder",)
    hf: str | None = None
    source_config: object = None

    def __post_init__(self):
        frozen = bool(self.workdir) + bool(self.hf)
        if (self.follows is None) != (self.rate is None) or (self.follows is not None and frozen) or frozen > 1:
            raise TypeError("a Teacher is an EMA (follows= and rate=) or frozen (workdir= or hf=, or neither: random)")
        if self.hf and self.source_config is None:
            raise TypeError("a Teacher from a transformers directory needs source_config= (the run it imports as)")

    @property
    def ema(self) -> bool:
        return self.follows is not None

    def source(self, params: dict) -> dict:
        """The student's parameter subtree an EMA teacher tracks."""
        for key in self.follows:
            params = params[key]
        return params


def ema_rate(start: float, end: float, steps: int) -> Callable:
    """``step -> 1 - decay`` for an EMA decay going linearly from ``start`` at step 0 to ``end`` at
    ``steps`` and staying there (fairseq's ``get_annealed_rate``, data2vec's decay schedule), computed
    from the complements so that 1 - 0.99999 keeps its digits in float32."""
    def rate(step):
        left = 1.0 - jnp.minimum(jnp.asarray(step, jnp.float32) / max(steps, 1), 1.0)
        return (1.0 - end) + (end - start) * left
    return rate


# What each evaluator (``maskjax.evaluate``) calls on the objective; declaring one without its
# methods fails at registration, not in the middle of an evaluation.
EVALUATORS = {
    "probe": ("features",),                              # linear probe + k-NN vs random init and raw pixels
    "reconstruction": ("reconstruct",),                  # the PNG of masked inputs and predictions
    "text": ("eval_step", "summarize"),                  # held-out loss/accuracy next to a unigram baseline
    "text_probe": ("text_features",),                    # frozen text features on a downstream task vs bag of words
    "zero_shot": ("zero_shot_logits", "class_embeddings"),  # class names as captions
    "generation": ("sample", "images"),                  # samples scored by a classifier's Fréchet distance (maskjax.quality)
}
# How ``maskjax sample`` renders the rows ``sample(model, key, num, steps, ...)`` returns, and what that
# needs besides ``sample`` and ``sample_steps`` (the default number of steps). Text: ``template(prompt,
# infill)`` gives the fixed tokens ([MASK] = generate), and ``sample`` also takes ``template``, ``order``
# ('ancestral' or 'confidence') and ``block`` (semi-autoregressive block size, 0 = off). Image:
# ``sample`` also takes ``labels`` ([num] classes or None), ``temperature``, ``guidance`` and ``trace``
# (return every step's tokens), and ``images(tokens, teacher=)`` turns tokens into images.
SAMPLE_KINDS = {"text": ("tokenizer", "template"), "image": ("images", "num_classes")}
REQUIRED = ("validate", "build", "loss", "batch_spec", "synthetic_batch", "flops")


class Objective:
    """The contract between an objective and everything that runs it (train, evaluate, bench, sweep,
    export, sample). Subclass it, set the class attributes, implement the required methods, and
    decorate with :func:`register`; nothing outside ``objectives/`` needs to know the new name.

    Required: ``validate()`` (raises ``ConfigError`` naming the key), ``build(rngs)`` (the model,
    parameters only), ``loss(model, batch, key, step) -> (scalar, metrics)`` (pure; each example's
    masks drawn from its own key, :func:`example_keys`), ``batch_spec()`` (``{name: (global shape,
    dtype)}``), ``synthetic_batch(rng)`` (a local batch of that spec for benchmarks), ``flops()``
    (analytic FLOPs of one training step).

    Declared capabilities: ``teacher()`` (a :class:`Teacher` in the train state; the loss then takes
    it as a fifth argument), ``evaluators`` (names from :data:`EVALUATORS`, each needing its methods),
    ``sample_kind`` (``sample(model, key, num, steps)`` and how ``maskjax sample`` renders it),
    ``interop`` (export/import), ``summary(results)`` (the sweep's downstream metric),
    ``mask_ratio`` and ``tokens_per_example`` (what sweeps and benchmarks report).
    """

    name: ClassVar[str]
    data_kind: ClassVar[str]  # the input pipeline that feeds it: 'image', 'image_text' or 'text'
    sample_kind: ClassVar[str | None] = None
    interop: ClassVar[Interop] = Interop()
    # ``maskjax bench --peer hf`` may time the PyTorch training step of the run's export architecture
    # (``maskjax.export.default_arch``, a key of ``maskjax.peer.PEERS``) beside this objective's step:
    # True only where that step is this objective's (MDLM exports as BERT but does not train as BERT).
    peer: ClassVar[bool] = False
    # Evaluation and sampling need the teacher too (a frozen tokenizer that maps images to the tokens the
    # model reads): its methods then take ``teacher=`` (``Setup.jit_model_call``'s ``teacher``).
    eval_teacher: ClassVar[bool] = False
    # The hyperparameters each paper the objective implements states, as config keys: {key: {"title",
    # "official", "values"}}; a recipe names one with ``PAPER = "key"``, docs/reference/recipes compares.
    papers: ClassVar[dict[str, dict]] = {}

    # The config groups only this objective reads, ``{group: {field: (default, meaning)}}``: added to
    # maskjax.config.base_config by :func:`base_config`, merged under a saved run's config.json by
    # :func:`from_saved`, documented in docs/reference/config.md. Objectives that read the same group
    # declare the same dict.
    config_groups: ClassVar[dict[str, dict[str, tuple]]] = {}

    def __init__(self, config):
        self.config = config

    @classmethod
    def defaults(cls) -> dict:
        """``{group: {field: default}}`` of :attr:`config_groups`."""
        return {group: {k: v[0] for k, v in fields.items()} for group, fields in cls.config_groups.items()}

    @property
    def evaluators(self) -> tuple[str, ...]:
        return ()

    def teacher(self) -> Teacher | None:
        """The :class:`Teacher` this objective's loss reads, or None."""
        return None

    # ``after_update(params, stats, key, step) -> params``: parameters rewritten from the loss's batch
    # statistics (:data:`STATS`) after each applied update (e.g. an EMA codebook, dead-code restarts);
    # None: the optimizer alone moves the parameters.
    after_update: ClassVar[Callable | None] = None

    @property
    def mask_ratio(self) -> float | None:
        """The one masking ratio a sweep or benchmark row reports (None: no single ratio)."""
        return None

    @property
    def tokens_per_example(self) -> int:
        raise NotImplementedError

    def summary(self, results: dict) -> tuple[str, float | None]:
        """(name, value) of the downstream metric in this objective's ``eval.json`` results."""
        if "pretrained" in results:
            return "linear_probe", results["pretrained"].get("linear_probe")
        return "none", None


# A loss may return, among its metrics, ``{STATS: {name: array}}``: batch statistics (code counts, sums of
# vectors) for the objective's ``after_update(params, stats, key, step) -> params``, which the trainer
# runs inside the jitted step after each applied optimizer update (never logged; averaged over
# micro-batches like every metric).
STATS = "_stats"

# The trainer adds ``batch[ROW]`` ([batch] int32, each example's row in the step's full batch) when it
# splits the batch for gradient accumulation; absent, the rows are 0..batch-1.
ROW = "row"


def example_rows(batch: dict) -> jax.Array:
    """[batch] int32: each example's row in the step's full batch."""
    if ROW in batch:
        return batch[ROW]
    size = next(iter(batch.values())).shape[0]
    return jnp.arange(size, dtype=jnp.int32)


def example_keys(key: jax.Array, batch: dict) -> jax.Array:
    """[batch] keys, one per example, from the step's key and the example's row: draws made from them
    (``masking.per_row``) give a row the same mask in the full batch and in any micro-batch."""
    return masking.row_keys(key, example_rows(batch))


REGISTRY: dict[str, type[Objective]] = {}
config_lib.objective_groups = lambda name: REGISTRY[name].defaults() if name in REGISTRY else {}


def register(cls):
    """Class decorator: makes ``cls`` available as ``config.objective = cls.name``, after checking that
    it implements the contract and every capability it declares."""
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise TypeError(f"{cls!r} is not an objectives.base.Objective subclass")
    missing = [m for m in REQUIRED if getattr(cls, m, None) is getattr(Objective, m, None)]
    missing += [a for a in ("name", "data_kind") if not isinstance(getattr(cls, a, None), str)]
    if cls.sample_kind is not None:
        if cls.sample_kind not in SAMPLE_KINDS:
            missing.append(f"sample_kind in {tuple(SAMPLE_KINDS)}")
        missing += [m for m in ("sample", "sample_steps", *SAMPLE_KINDS.get(cls.sample_kind, ()))
                    if not hasattr(cls, m)]
    if missing:
        raise TypeError(f"objective {getattr(cls, 'name', cls.__name__)!r} lacks {', '.join(missing)}")
    _check_groups(cls)
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise TypeError(f"objective name {cls.name!r} is taken by {REGISTRY[cls.name].__module__}")
    REGISTRY[cls.name] = cls
    return cls


def _check_groups(cls) -> None:
    shared = set(config_lib.base_config())
    for group, fields in cls.config_groups.items():
        if group in shared:
            raise TypeError(f"objective {cls.name!r}: config group {group!r} is in maskjax.config.base_config")
        bad = [k for k, v in fields.items() if not (isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], str))]
        if bad:
            raise TypeError(f"objective {cls.name!r}: {group}.{bad[0]} must be (default, meaning)")
        for other in REGISTRY.values():
            if other is not cls and group in other.config_groups and other.config_groups[group] != fields:
                raise TypeError(f"objective {cls.name!r}: config group {group!r} differs from {other.name!r}'s")


def base_config(name: str):
    """The defaults of a run of objective ``name``: :func:`maskjax.config.base_config` plus the groups
    the objective declares. Recipes start from this."""
    if name not in REGISTRY:
        raise ConfigError("objective", f"unknown objective {name!r}; known: {sorted(REGISTRY)}")
    c = config_lib.base_config()
    c.objective = name
    for group, fields in REGISTRY[name].defaults().items():
        c[group] = fields
    return c


def from_saved(saved: dict):
    """A run's saved ``config.json`` over the defaults of its objective (:func:`base_config`)."""
    cls = REGISTRY.get(saved.get("objective", ""))
    return config_lib.from_saved(saved, cls.defaults() if cls else None)


def saved_json(workdir: str, key: str) -> dict:
    """The ``config.json`` a run saved in ``workdir``, as a dict; a missing or unreadable one is a
    :class:`ConfigError` naming ``key`` (the config key that pointed there)."""
    import json

    from maskjax import storage

    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        raise ConfigError(key, f"{workdir!r} has no config.json (not a maskjax run, or not started yet)")
    try:
        saved = json.loads(storage.read_text(path))
    except (OSError, ValueError) as err:
        raise ConfigError(key, f"{path}: not a readable config ({type(err).__name__}: {err})") from None
    if not isinstance(saved, dict):
        raise ConfigError(key, f"{path}: not a readable config (a JSON {type(saved).__name__}, not an object)")
    return saved


def saved_config(workdir: str, key: str):
    """The config of the run in ``workdir`` (:func:`from_saved` of :func:`saved_json`)."""
    return from_saved(saved_json(workdir, key))


def check_evaluators(objective: Objective) -> tuple[str, ...]:
    """``objective.evaluators``, each known and backed by the methods it calls."""
    names = tuple(objective.evaluators)
    for name in names:
        if name not in EVALUATORS:
            raise TypeError(f"objective {objective.name!r} declares unknown evaluator {name!r}; known: {sorted(EVALUATORS)}")
        lacking = [m for m in EVALUATORS[name] if not callable(getattr(objective, m, None))]
        if lacking:
            raise TypeError(f"objective {objective.name!r} declares evaluator {name!r} but lacks {', '.join(lacking)}")
    return names


def check_transformer(model_config, group: str = "model", config=None) -> None:
    """Config checks every transformer shares: heads divide width, known dtype and remat policy
    (where the group has them). ``group`` names the config group in errors. With ``config`` (the whole
    run's), ``model.attention='cudnn'`` is checked against this group's head dimension and 'splash'
    against the platform."""
    from maskjax.models import layers

    m = model_config
    for key in ("width", "depth", "heads"):
        if not isinstance(m[key], int) or isinstance(m[key], bool) or m[key] < 1:
            raise ConfigError(f"{group}.{key}", f"must be a positive int, got {m[key]!r}")
    if m.width % m.heads:
        raise ConfigError(f"{group}.heads", f"{m.heads} does not divide {group}.width={m.width}")
    if "dtype" in m and m.dtype not in layers.DTYPES:
        raise ConfigError(f"{group}.dtype", f"must be one of {tuple(layers.DTYPES)}, got {m.dtype!r}")
    if "remat" in m and m.remat not in layers.REMAT_POLICIES:
        raise ConfigError(f"{group}.remat", f"must be one of {tuple(layers.REMAT_POLICIES)}, got {m.remat!r}")
    if config is not None and config.model.attention == "cudnn":
        dtype = layers.compute_dtype(config.model.dtype)
        why = layers.cudnn_unsupported(dtype)  # the platform and dtype
        if why is None:
            why = layers.cudnn_unsupported(dtype, m.width // m.heads)
            why = why and f"{why} in {group}.width / {group}.heads"
        if why:
            raise ConfigError("model.attention", f"'cudnn' {why}")
    if config is not None and config.model.attention == "splash" and layers.splash_unsupported():
        raise ConfigError("model.attention", f"'splash' {layers.splash_unsupported()}")


def get(config) -> Objective:
    """The objective ``config.objective`` names, constructed from the run's config."""
    if config.objective not in REGISTRY:
        raise ConfigError("objective", f"unknown objective {config.objective!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[config.objective](config)
