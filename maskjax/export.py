"""Weights in and out of maskjax: Hugging Face ``transformers`` model directories and plain ``.npz`` archives.

Export (``maskjax export``) writes a run's parameters as

* ``--format hf``: ``config.json`` + ``model.safetensors`` that ``transformers`` loads with no custom code:
  ``ViTMAEForPreTraining`` (MAE: encoder and decoder), ``ViTForMaskedImageModeling`` (SimMIM: encoder,
  mask token and the 1x1-conv + pixel-shuffle head), ``ViTModel`` (any image encoder, FLIP's image tower
  included) and ``BertForMaskedLM`` (post-norm MLM or masked-diffusion text encoders, with ``vocab.txt``);
* ``--format npz``: one NumPy array per tensor in PyTorch layout (``[out, in]`` linear weights, ``[out, in,
  kh, kw]`` convolutions). Image encoders use timm's / the MAE release's names (``patch_embed.proj.weight``,
  ``blocks.{i}.attn.qkv.weight`` with q, k, v stacked on dim 0, ``decoder_blocks.{i}...``,
  ``decoder_pred.weight``), so ``timm.create_model('vit_base_patch16_224').load_state_dict`` takes the
  encoder part and the MAE repository's ``models_mae`` the whole; text encoders use the Hugging Face names.

Import (config field ``init_from``) reads either kind back into a run's parameters before step 0: the
architecture is recognised from the tensor names, the file's own config is checked against the run's
(an error names the config key and the file's value), every tensor's shape is checked (an error names
the tensor and the maskjax parameter), and parts the file does not have (an MAE decoder when starting
from a ``ViTModel``) keep their fresh initialisation, which is reported.

Both directions are one table of :class:`Rule` (file name, maskjax parameter, layout), so an import
followed by an export gives back the same tensors. Fixed tables that maskjax computes rather than
learns (sin-cos positions) are written on export and checked on import. BERT's token-type table is
folded into the position table on import (maskjax feeds one segment type), written as zeros on export.
"""
from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np

from maskjax import storage
from maskjax.errors import MaskjaxError
from maskjax.config import ConfigError
from maskjax.models.hf_layout import BERT_BLOCK, LAYOUTS, VIT_BLOCK, Group, Rule  # noqa: F401 (tests use them)
from maskjax.models.hf_layout import block_rules as _block_rules, linear as _linear, norm as _norm

FORMATS = ("hf", "npz")
ARCHS = {  # --arch -> transformers class
    "vit_mae": "ViTMAEForPreTraining",
    "vit_mim": "ViTForMaskedImageModeling",
    "vit": "ViTModel",
    "bert": "BertForMaskedLM",
}


def interop(config):
    """The export/import rules the run's objective declares (:class:`maskjax.objectives.base.Interop`)."""
    from maskjax import objectives

    if config.objective not in objectives.REGISTRY:
        raise ConfigError("objective", f"unknown objective {config.objective!r}; known: {sorted(objectives.REGISTRY)}")
    return objectives.REGISTRY[config.objective].interop


def _own(config, arch: str):
    """The :class:`~maskjax.objectives.base.HFArch` the run's objective declares for ``arch``, or None."""
    return interop(config).own.get(arch)


def arch_class(config, arch: str) -> str:
    """The transformers class name of ``arch`` for this run."""
    own = _own(config, arch)
    return own.cls if own else ARCHS[arch]


def _objective(config):
    from maskjax import objectives

    return objectives.get(config)


def default_arch(config) -> str:
    """The first architecture the objective declares that can hold this run (a video MAE run: VideoMAE),
    else the first one (whose check then says why not)."""
    archs = interop(config).archs
    for arch in archs:
        try:
            check_exportable(config, arch)
        except (InteropError, ConfigError):
            continue
        return arch
    return archs[0]


def exportable() -> list[str]:
    """Objectives that declare a transformers architecture."""
    from maskjax import objectives

    return sorted(name for name, cls in objectives.REGISTRY.items() if cls.interop.archs)


class InteropError(MaskjaxError, ValueError):
    """A file or run that cannot be exported or imported; the message names the tensor, key or file."""





def vit_encoder_rules(prefix: str, path: str, qkv_bias: bool) -> list[Rule]:
    """A maskjax ``ViTEncoder`` at ``path`` as Hugging Face ViT tensors under ``prefix`` ('vit.' or '')."""
    emb = f"{prefix}embeddings."
    return [
        Rule(f"{emb}cls_token", f"{path}/cls"),
        Rule(f"{emb}patch_embeddings.projection.weight", f"{path}/patch_embed/kernel", "patch_conv"),
        Rule(f"{emb}patch_embeddings.projection.bias", f"{path}/patch_embed/bias"),
        *_block_rules(f"{prefix}encoder.layer.{{i}}.", f"{path}/blocks/blocks/", VIT_BLOCK, qkv_bias),
        *_norm(f"{prefix}layernorm", f"{path}/norm"),
    ]


def mae_decoder_rules(qkv_bias: bool) -> list[Rule]:
    return [
        *_linear("decoder.decoder_embed", "decoder/embed"),
        Rule("decoder.mask_token", "decoder/mask_token"),
        *_block_rules("decoder.decoder_layers.{i}.", "decoder/blocks/blocks/", VIT_BLOCK, qkv_bias),
        *_norm("decoder.decoder_norm", "decoder/norm"),
        *_linear("decoder.decoder_pred", "decoder/pred"),
    ]


def simmim_head_rules() -> list[Rule]:
    return [Rule("vit.embeddings.mask_token", "mask_token"), Rule("decoder.0.weight", "head/kernel", "shuffle_conv"),
            Rule("decoder.0.bias", "head/bias", "shuffle_bias")]


def bert_rules(qkv_bias: bool) -> list[Rule]:
    return [
        Rule("bert.embeddings.word_embeddings.weight", "token_embed"),
        Rule("bert.embeddings.position_embeddings.weight", "pos_embed"),
        *_norm("bert.embeddings.LayerNorm", "embed_norm"),
        *_block_rules("bert.encoder.layer.{i}.", "blocks/blocks/", BERT_BLOCK, qkv_bias),
        *_linear("cls.predictions.transform.dense", "head_dense"),
        *_norm("cls.predictions.transform.LayerNorm", "head_norm"),
        Rule("cls.predictions.bias", "output_bias"),
    ]


# ----------------------------------------------------------------------------------- architectures

def check_exportable(config, arch: str) -> None:
    """Raises :class:`InteropError` naming the config key when ``arch`` cannot represent this run."""
    from maskjax import objectives

    objective = config.objective
    known = list(ARCHS) + [a for cls in objectives.REGISTRY.values() for a in cls.interop.own]
    if arch not in known:
        raise InteropError(f"--arch {arch!r} is unknown; known: {', '.join(known)}")
    archs = interop(config).archs
    if arch not in archs:
        raise InteropError(f"--arch {arch} cannot hold a {objective!r} run; for {objective!r} use "
                           + (f"--arch {archs[0]}" if archs else "nothing yet: it has no transformers equivalent"))
    if _own(config, arch):
        _own(config, arch).check(_objective(config))
        return
    if arch == "bert":
        if config.model.pre_norm:
            raise ConfigError("model.pre_norm", "True: BertForMaskedLM is post-norm; only runs trained with "
                                                "model.pre_norm=False export as BERT")
        if config.model.positions != "learned":
            raise ConfigError("model.positions", f"{config.model.positions!r}: BertForMaskedLM has learned positions")
        return
    if config.data.frames:
        raise ConfigError("data.frames", f"{config.data.frames}: video encoders (3D tubelets) have no "
                                         "ViT/ViTMAE equivalent in transformers")
    if not config.model.cls_token:
        raise ConfigError("model.cls_token", "False: transformers' ViT models always have a cls token")
    if arch in ("vit_mae", "vit_mim") and config.loss.target != "pixels":
        raise ConfigError("loss.target", f"{config.loss.target!r}: {ARCHS[arch]} predicts pixels; "
                                         "export the encoder alone with --arch vit")
    if arch == "vit_mae" and (config.hpm.enabled):
        raise ConfigError("hpm.enabled", "True: the loss-prediction head has no ViTMAE equivalent; use --arch vit")


def groups(config, arch: str, encoder_prefix: str | None = None) -> list[Group]:
    """The rule groups of ``arch`` for a run of ``config`` (the encoder's file prefix may be overridden
    for imports: a ``ViTModel`` file has no 'vit.' prefix)."""
    bias = config.model.qkv_bias
    if _own(config, arch):
        return _own(config, arch).groups(_objective(config))
    if arch == "bert":
        return [Group("text encoder", bert_rules(bias))]
    prefix = encoder_prefix if encoder_prefix is not None else ("" if arch == "vit" else "vit.")
    archs = interop(config).archs
    out = [Group("image encoder", vit_encoder_rules(prefix, interop(config).encoder, bias))]
    if "vit_mae" in archs and arch in ("vit_mae", "import"):
        out.append(Group("MAE decoder", mae_decoder_rules(bias), required=arch != "import"))
    if "vit_mim" in archs and arch in ("vit_mim", "import"):
        out.append(Group("SimMIM mask token and head", simmim_head_rules(), required=arch != "import"))
    return out


def _ctx(config) -> dict:
    return {"patch": config.model.patch_size, "channels": config.data.channels,
            "tubelet": config.model.tubelet if config.data.frames else 1}


def _grid(config) -> tuple:
    from maskjax.models import vit

    return vit.token_grid(config.data.image_size, config.model.patch_size)


def position_tables(config, arch: str, prefix: str = "vit.") -> dict[str, np.ndarray]:
    """The fixed tables maskjax computes (sin-cos positions with a zero row for the cls token), by file name."""
    from maskjax.models import vit

    if arch == "bert" or _own(config, arch):
        return {}
    tables = {}
    grid = _grid(config)
    table = lambda width: np.concatenate([np.zeros((1, width), np.float32), vit.sincos_pos_embed(width, grid)])[None]
    tables[f"{prefix}embeddings.position_embeddings"] = table(config.model.width)
    if arch in ("vit_mae", "import") and "vit_mae" in interop(config).archs:
        tables["decoder.decoder_pos_embed"] = table(config.decoder.width)
    return tables


def hf_config(config, arch: str, vocab_size: int = 0, pad_id: int = 0) -> dict:
    """The transformers ``config.json`` describing this run's model (no dropout: maskjax trains without)."""
    m = config.model
    common = dict(hidden_size=m.width, num_hidden_layers=m.depth, num_attention_heads=m.heads,
                  intermediate_size=int(m.width * m.mlp_ratio), hidden_act="gelu", hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, initializer_range=0.02, layer_norm_eps=m.norm_eps,
                  architectures=[arch_class(config, arch)], maskjax_objective=config.objective)
    if _own(config, arch):
        return dict(common, **_own(config, arch).config(_objective(config)))
    if arch == "bert":
        return dict(common, model_type="bert", vocab_size=vocab_size, max_position_embeddings=m.max_len,
                    type_vocab_size=2, pad_token_id=pad_id, position_embedding_type="absolute",
                    tie_word_embeddings=True)
    vision = dict(common, image_size=config.data.image_size, patch_size=m.patch_size,
                  num_channels=config.data.channels, qkv_bias=m.qkv_bias)
    if arch == "vit_mae":
        dec = config.decoder
        mask_ratio = config.mask.ratio
        return dict(vision, model_type="vit_mae", decoder_hidden_size=dec.width, decoder_num_hidden_layers=dec.depth,
                    decoder_num_attention_heads=dec.heads, decoder_intermediate_size=int(dec.width * m.mlp_ratio),
                    mask_ratio=mask_ratio, norm_pix_loss=bool(config.loss.norm_pix))
    return dict(vision, model_type="vit", encoder_stride=m.patch_size)


# ----------------------------------------------------------------------------------- tensors

def _get(params: dict, path: str):
    node = params
    for key in path.split("/"):
        if not isinstance(node, dict) or key not in node:
            raise InteropError(f"maskjax parameter {path!r} does not exist in this run")
        node = node[key]
    return node


def _set(params: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    node = params
    for key in parents:
        node = node[key]
    node[leaf] = value


def _expand(rule: Rule, params: dict) -> list[tuple[str, int | None]]:
    """(file name, layer index or None) of every tensor of ``rule``."""
    if "{i}" not in rule.name:
        return [(rule.name, None)]
    return [(rule.name.format(i=i), i) for i in range(np.shape(_get(params, rule.path))[0])]


def to_tensors(config, params: dict, arch: str) -> dict[str, np.ndarray]:
    """maskjax parameters (host NumPy, nested dict) -> Hugging Face tensors of ``arch`` (legacy names)."""
    check_exportable(config, arch)
    ctx = _ctx(config)
    out = {}
    for group in groups(config, arch):
        for rule in group.rules:
            value = np.asarray(_get(params, rule.path), np.float32)
            for name, i in _expand(rule, params):
                out[name] = np.ascontiguousarray(LAYOUTS[rule.layout][0](value if i is None else value[i], ctx))
    out.update(position_tables(config, arch, "" if arch == "vit" else "vit."))
    if arch == "bert":
        out["bert.embeddings.token_type_embeddings.weight"] = np.zeros((2, config.model.width), np.float32)
    if _own(config, arch):
        out.update(_own(config, arch).constants(_objective(config)))
    return out


# Hugging Face file names: transformers 5 renamed ViT's sub-modules and writes the decoder stack under
# 'decoder_encoder.layer'; both read as the legacy names (what the Hub's checkpoints use and we write).
_CANONICAL = [
    (re.compile(r"^(vit\.)?layers\.(\d+)\."), r"\1encoder.layer.\2."),
    (re.compile(r"^decoder\.decoder_encoder\.layer\."), "decoder.decoder_layers."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
]


def canonical(name: str) -> str:
    for pattern, repl in _CANONICAL:
        name = pattern.sub(repl, name)
    return name


# timm / MAE-release names for ViT archives (.npz) <-> the Hugging Face names above
_TIMM_BLOCK = [("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.output.dense"),
               ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")]
_TIMM_TOP = [("cls_token", "vit.embeddings.cls_token"), ("pos_embed", "vit.embeddings.position_embeddings"),
             ("patch_embed.proj", "vit.embeddings.patch_embeddings.projection"), ("norm", "vit.layernorm"),
             ("mask_token", "decoder.mask_token"), ("decoder_pos_embed", "decoder.decoder_pos_embed"),
             ("decoder_embed", "decoder.decoder_embed"), ("decoder_norm", "decoder.decoder_norm"),
             ("decoder_pred", "decoder.decoder_pred"), ("simmim_mask_token", "vit.embeddings.mask_token"),
             ("simmim_head", "decoder.0")]
_TIMM_STACKS = [("blocks", "vit.encoder.layer"), ("decoder_blocks", "decoder.decoder_layers")]


def to_timm(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face ViT / ViTMAE names -> timm / MAE-release names (q, k, v fused into ``attn.qkv``)."""
    hf = {canonical(k): v for k, v in tensors.items()}
    hf = {("vit." + k if not k.startswith(("vit.", "decoder")) else k): v for k, v in hf.items()}
    out = {}
    for timm_name, hf_name in _TIMM_TOP:
        for suffix in ("", ".weight", ".bias"):
            if hf_name + suffix in hf:
                out[timm_name + suffix] = hf.pop(hf_name + suffix)
    for timm_stack, hf_stack in _TIMM_STACKS:
        i = 0
        while f"{hf_stack}.{i}.attention.attention.query.weight" in hf:
            src, dst = f"{hf_stack}.{i}.", f"{timm_stack}.{i}."
            for part in ("weight", "bias"):
                qkv = [hf.pop(f"{src}attention.attention.{p}.{part}", None) for p in ("query", "key", "value")]
                if qkv[0] is not None:
                    out[f"{dst}attn.qkv.{part}"] = np.concatenate(qkv, axis=0)
            for timm_name, hf_name in _TIMM_BLOCK:
                for part in ("weight", "bias"):
                    out[f"{dst}{timm_name}.{part}"] = hf.pop(f"{src}{hf_name}.{part}")
            i += 1
    if hf:
        raise InteropError(f"no timm name for tensor {sorted(hf)[0]!r}")
    return out


def from_timm(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_timm` (also reads the MAE release's checkpoints saved as .npz)."""
    top = dict(_TIMM_TOP)
    stacks = dict(_TIMM_STACKS)
    block = dict(_TIMM_BLOCK)
    out = {}
    for name, value in tensors.items():
        stack, _, rest = name.partition(".")
        if stack in stacks and rest[:1].isdigit():
            i, _, sub = rest.partition(".")
            base, _, part = sub.rpartition(".")
            dst = f"{stacks[stack]}.{i}."
            if base == "attn.qkv":
                for p, chunk in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
                    out[f"{dst}attention.attention.{p}.{part}"] = chunk
            elif base in block:
                out[f"{dst}{block[base]}.{part}"] = value
            else:
                raise InteropError(f"unknown tensor {name!r} in a timm-style archive")
            continue
        base, dot, part = name.rpartition(".") if name.endswith((".weight", ".bias")) else (name, "", "")
        if base not in top:
            raise InteropError(f"unknown tensor {name!r} in a timm-style archive")
        out[top[base] + dot + part] = value
    return out


def is_timm(names) -> bool:
    return any(n.startswith(("blocks.", "patch_embed.")) for n in names)


# ----------------------------------------------------------------------------------- export

def export(config, params: dict, fmt: str, out: str, arch: str | None = None, step: int | None = None) -> dict:
    """Writes ``params`` (host NumPy nested dict) of a run of ``config`` to ``out``; returns a summary."""
    if fmt not in FORMATS:
        raise InteropError(f"--format {fmt!r} is unknown; known: {', '.join(FORMATS)}")
    archs = interop(config).archs
    if arch is None and not archs:
        raise InteropError(f"a {config.objective!r} run has no transformers equivalent to export to "
                           f"(objectives that have one: {', '.join(exportable())})")
    arch = arch or default_arch(config)
    tensors = to_tensors(config, params, arch)
    vocab, text = None, arch == "bert" or bool(_own(config, arch) and _own(config, arch).tokenizer)
    if text:
        from maskjax.data import sources

        vocab = sources.load_tokenizer(config.data)
    if fmt == "npz":
        if not out.endswith(".npz"):
            raise InteropError(f"--out {out!r}: an npz export is one file ending in .npz")
        arrays = tensors if arch == "bert" or _own(config, arch) else to_timm(tensors)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        storage.write_bytes(out, buffer.getvalue())
        return {"out": out, "format": fmt, "arch": arch, "class": arch_class(config, arch), "tensors": len(arrays),
                "step": step}
    from safetensors.numpy import save

    if storage.isfile(out):
        raise InteropError(f"--out {out!r} exists and is not a directory")
    hf = hf_config(config, arch, vocab.vocab_size if vocab else 0, vocab.pad_id if vocab else 0)
    hf["maskjax_step"] = step
    storage.write_bytes(storage.join(out, "model.safetensors"), save(tensors, metadata={"format": "pt"}))
    storage.write_text(storage.join(out, "config.json"), json.dumps(hf, indent=2, sort_keys=True))
    if vocab is not None and vocab.path.endswith(".txt"):  # BertTokenizer reads vocab.txt from the same folder
        storage.copy_file(vocab.path, storage.join(out, "vocab.txt"))
        storage.write_text(storage.join(out, "tokenizer_config.json"),
                           json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": vocab.lowercase,
                                       "model_max_length": config.model.max_len}, indent=2))
    return {"out": out, "format": fmt, "arch": arch, "class": arch_class(config, arch), "tensors": len(tensors),
            "step": step}


# ----------------------------------------------------------------------------------- import

def read(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
    """(tensors under canonical Hugging Face names, the file's config.json or None) of a model
    directory (``model.safetensors``) or an ``.npz`` archive."""
    if not storage.exists(path):
        raise InteropError(f"init_from {path!r} does not exist")
    if storage.isdir(path):
        weights = storage.join(path, "model.safetensors")
        if not storage.isfile(weights):
            raise InteropError(f"init_from {path!r} has no model.safetensors (PyTorch .bin files are not read: "
                               "re-save with save_pretrained(safe_serialization=True))")
        from safetensors.numpy import load

        try:
            tensors = load(storage.read_bytes(weights))
        except Exception as err:
            raise InteropError(f"{weights}: not a readable safetensors file ({err})") from None
        info = None
        if storage.isfile(storage.join(path, "config.json")):
            try:
                info = json.loads(storage.read_text(storage.join(path, "config.json")))
            except ValueError as err:
                raise InteropError(f"{storage.join(path, 'config.json')}: not valid JSON ({err})") from None
        return {canonical(k): np.asarray(v, np.float32) for k, v in tensors.items()}, info
    try:
        with np.load(io.BytesIO(storage.read_bytes(path))) as archive:
            tensors = {k: np.asarray(archive[k], np.float32) for k in archive.files}
    except Exception as err:
        raise InteropError(f"init_from {path!r}: not a readable .npz archive ({type(err).__name__}: {err})") from None
    if is_timm(tensors):
        tensors = from_timm(tensors)
    return {canonical(k): v for k, v in tensors.items()}, None


# (file config key, maskjax key, value of the run) pairs checked on import
def _expected(config, info: dict) -> list[tuple[str, str, Any]]:
    m = config.model
    pairs = [("hidden_size", "model.width", m.width), ("num_hidden_layers", "model.depth", m.depth),
             ("num_attention_heads", "model.heads", m.heads),
             ("intermediate_size", "model.mlp_ratio", int(m.width * m.mlp_ratio)),
             ("layer_norm_eps", "model.norm_eps", m.norm_eps)]
    if info.get("model_type") == "bert":
        pairs.append(("max_position_embeddings", "model.max_len", m.max_len))
    else:
        pairs += [("patch_size", "model.patch_size", m.patch_size), ("image_size", "data.image_size",
                  config.data.image_size), ("num_channels", "data.channels", config.data.channels),
                  ("qkv_bias", "model.qkv_bias", m.qkv_bias)]
        if info.get("model_type") == "vit_mae" and "vit_mae" in interop(config).archs:
            d = config.decoder
            pairs += [("decoder_hidden_size", "decoder.width", d.width), ("decoder_num_hidden_layers", "decoder.depth",
                      d.depth), ("decoder_num_attention_heads", "decoder.heads", d.heads),
                      ("decoder_intermediate_size", "model.mlp_ratio", int(d.width * m.mlp_ratio))]
    return pairs


def check_file_config(config, info: dict | None, path: str) -> None:
    """The file's ``config.json`` against the run's config: an error names the key to change."""
    if not info:
        return
    act = info.get("hidden_act", "gelu")
    if act != "gelu":
        raise InteropError(f"init_from {path!r}: hidden_act={act!r}; maskjax blocks use exact GELU ('gelu')")
    for hf_key, key, value in _expected(config, info):
        if hf_key not in info:
            continue
        theirs = info[hf_key]
        same = abs(theirs - value) <= 1e-3 * abs(value) if isinstance(value, float) else theirs == value
        if not same:
            raise ConfigError(key, f"{value!r} in this config, but init_from {path!r} has {hf_key}={theirs!r}")


def import_params(config, params: dict, path: str) -> tuple[dict, str]:
    """``params`` (host NumPy nested dict of a fresh run of ``config``) with every tensor ``path`` provides
    for it; returns (params, a one-line report). Errors name the tensor, the parameter or the config key."""
    tensors, info = read(path)
    archs = interop(config).archs
    if archs and all(_own(config, a) for a in archs):
        raise InteropError(f"init_from: a {config.objective!r} run exports to {', '.join(archs)} but cannot start "
                           "from a transformers model yet")
    if "bert" in archs:
        check_exportable(config, "bert")
        if "bert.embeddings.word_embeddings.weight" not in tensors:
            raise InteropError(f"init_from {path!r} is not a BERT model (no bert.embeddings.word_embeddings.weight)")
        check_file_config(config, info, path)  # after the architecture: a ViT file for a BERT run says so first
        tensors = dict(tensors)
        types = tensors.pop("bert.embeddings.token_type_embeddings.weight", None)
        if types is not None:  # maskjax feeds segment type 0 everywhere
            tensors["bert.embeddings.position_embeddings.weight"] = \
                tensors["bert.embeddings.position_embeddings.weight"] + types[0]
        found, tables = groups(config, "bert"), {}
    elif "vit" in archs:
        check_exportable(config, "vit")
        prefixes = [p for p in ("vit.", "") if f"{p}embeddings.patch_embeddings.projection.weight" in tensors]
        if not prefixes:
            raise InteropError(f"init_from {path!r} is not a ViT / ViTMAE model "
                               "(no embeddings.patch_embeddings.projection.weight)")
        check_file_config(config, info, path)
        found = groups(config, "import", prefixes[0])
        tables = position_tables(config, "import", prefixes[0])
        for name, table in tables.items():
            theirs = tensors.get(name)
            if theirs is None:
                continue
            if theirs.shape != table.shape or np.max(np.abs(theirs - table)) > 1e-4:
                raise InteropError(f"init_from {path!r}: {name} {tuple(theirs.shape)} is not maskjax's fixed sin-cos "
                                   f"table {tuple(table.shape)} (learned or differently laid out positions cannot "
                                   "be imported)")
    else:
        raise InteropError(f"init_from: a {config.objective!r} run cannot start from a transformers model "
                           f"(objectives that can: {', '.join(exportable())})")
    ctx = _ctx(config)
    loaded, fresh, used, stacks = 0, [], set(), []
    for group in found:
        present = [any(n in tensors for n, _ in _expand(r, params)) for r in group.rules]
        if not group.required and not any(present):
            fresh.append(group.name)
            continue
        for rule in group.rules:
            current = np.asarray(_get(params, rule.path))
            expanded = _expand(rule, params)
            if "{i}" in rule.name:
                stacks.append(rule.name.split("{i}")[0])
            for name, i in expanded:
                used.add(name)
                if name not in tensors:
                    raise InteropError(f"init_from {path!r} has no tensor {name!r} (for maskjax parameter "
                                       f"{rule.path}{'' if i is None else f' layer {i}'})")
            shape = current.shape if "{i}" not in rule.name else current.shape[1:]
            want = LAYOUTS[rule.layout][0](np.zeros(shape, np.float32), ctx).shape
            values = []
            for name, i in expanded:
                if tensors[name].shape != want:
                    raise InteropError(f"init_from {path!r}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                       f"maskjax parameter {rule.path} needs {tuple(want)}")
                values.append(LAYOUTS[rule.layout][1](tensors[name], shape, ctx))
                loaded += 1
            _set(params, rule.path, (np.stack(values) if "{i}" in rule.name else values[0]).astype(current.dtype))
    # Tensors left over: a layer beyond the run's depth is an error, anything else (a pooler, a tied
    # output matrix, another objective's head) is named in the report.
    ignored = sorted(set(tensors) - used - set(tables))
    for name in ignored:
        if any(name.startswith(stack) for stack in stacks):
            raise ConfigError("model.depth" if "decoder" not in name else "decoder.depth",
                              f"init_from {path!r} has tensor {name!r}, a layer beyond this config's depth")
    report = f"initialised {loaded} tensors from {path}"
    if ignored:
        report += f"; ignored {len(ignored)} tensors of the file ({ignored[0]}{', ...' if len(ignored) > 1 else ''})"
    if fresh:
        report += f"; not in the file, freshly initialised: {', '.join(fresh)}"
    return params, report
