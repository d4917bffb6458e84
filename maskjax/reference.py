"""The config and recipe reference in ``docs/reference/``, generated from the code so it cannot go stale.

``python -m maskjax.reference`` rewrites ``docs/reference/config.md`` (every field of
:func:`maskjax.config.base_config` and of each objective's ``config_groups``, with its default and
meaning) and one page per shipped recipe
(``configs/*.py``): the paper it follows, each of the paper's hyperparameters next to the recipe's
value, and the differences marked. A test fails when a field has no description here or when the
committed pages differ from what this module writes.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "reference")

FIELDS = {
    "objective": "Masked objective (the registered names below; video MAE is mae with data.frames > 0).",
    "init_from": "Start from published weights: a Hugging Face model directory (config.json + model.safetensors) "
                 "or a maskjax/timm .npz; used only when the workdir has no checkpoint (see `maskjax export`).",
    "seed": "Seed of parameter init, masks and data order (each example's masks use fold_in(fold_in(key, step), row)).",
    "batch_size": "Global batch (examples per optimizer step, all processes together).",
    "total_steps": "Optimizer steps of the run; the learning-rate schedule spans them.",
    "log_every": "Steps between metric records (the host waits on the device only then).",
    "eval_every": "Steps between evaluations during training; 0 = at the end only.",
    "data.name": "TFDS dataset name (embedded: maskjax_digits, maskjax_moving_digits, maskjax_digit_captions, "
                 "maskjax_text; maskjax_image_text_folder builds from data.manual_dir).",
    "data.data_dir": "TFDS data_dir ('' = $MASKJAX_DATA_DIR or ~/tensorflow_datasets).",
    "data.manual_dir": "TFDS manual_dir: archives downloaded by hand (ImageNet) or the folder of image + caption "
                       "files of maskjax_image_text_folder.",
    "data.image_size": "Side of the square crops fed to the model, pixels.",
    "data.channels": "Image channels (1 for the digits, 3 for RGB).",
    "data.frames": "Video clip length in frames; 0 = images.",
    "data.frame_stride": "Temporal stride between sampled video frames.",
    "data.train_split": "TFDS split for training (slicing syntax allowed, e.g. train[:99%]).",
    "data.eval_split": "TFDS split for evaluation.",
    "data.image_key": "Feature holding the image or video.",
    "data.label_key": "Feature holding the class label (probes, k-NN, zero-shot).",
    "data.crop_scale": "Random-resized-crop area range (min, max) as a fraction of the image.",
    "data.flip": "Random horizontal flips.",
    "data.mean": "Per-channel mean subtracted from pixels in [0, 1].",
    "data.std": "Per-channel standard deviation pixels are divided by.",
    "data.num_threads": "Grain worker threads for decoding and augmentation.",
    "data.prefetch": "Batches prepared ahead of the device.",
    "data.tokenizer": "Tokenizer file: a WordPiece vocab.txt or a SentencePiece .model ('' = the vocabulary "
                      "stored beside an embedded corpus).",
    "data.seq_len": "Packed text length in tokens (MLM, MDLM) or caption length (FLIP).",
    "data.text_key": "Feature holding the text.",
    "model.patch_size": "ViT patch side in pixels.",
    "model.tubelet": "Frames per video token (3D tubelets).",
    "model.width": "Encoder width (embedding size).",
    "model.depth": "Encoder blocks.",
    "model.heads": "Attention heads (must divide width).",
    "model.mlp_ratio": "MLP hidden size / width (encoder and decoder).",
    "model.cls_token": "Prepend a learned cls token to image encoders.",
    "model.pos_embed": "Fixed positions of image/video encoders and the MAE decoder: sincos (MAE: separable "
                       "sin-cos over the grid axes) or sincos_1d (VideoMAE: one sinusoid table over the "
                       "flattened token index).",
    "model.dtype": "Compute dtype: float32, bfloat16 or float16 (parameters stay float32).",
    "model.remat": "Rematerialisation policy of each block: none, full, dots, dots_no_batch.",
    "model.scan_layers": "True: one lax.scan over the stacked blocks (compile time flat in depth); False: the same "
                         "blocks and parameters in a loop unrolled at trace time (faster steps on CPU, longer "
                         "compiles; checkpoints interchangeable).",
    "model.one_hot_gather": "Select kept tokens with a one-hot einsum instead of a gather (better when the "
                            "length axis is sharded; FLIP's trick).",
    "model.max_len": "Text position table size (must cover data.seq_len).",
    "model.positions": "Text positions: learned (BERT) or rotary.",
    "model.pre_norm": "Blocks of text and image encoders: pre-norm with a final LayerNorm (True) or post-norm after "
                      "a LayerNorm on the embeddings (False: BERT, data2vec 2.0).",
    "model.qkv_bias": "Biases on the query/key/value projections of every block (BERT, timm ViT, MAE release).",
    "model.attention": "Attention kernel: auto (cuDNN flash attention on a CUDA GPU in bfloat16/float16 where "
                       "the head size allows, Pallas splash attention on a TPU, else XLA), xla, cudnn or splash "
                       "(an error where it cannot run), or splash_interpret (the splash kernel in Pallas's "
                       "interpreter, any backend: slow, for correctness checks).",
    "model.norm_eps": "LayerNorm epsilon of every block (1e-6 MAE/timm, 1e-12 BERT and Hugging Face ViT).",
    "decoder.width": "MAE decoder width.",
    "decoder.depth": "MAE decoder blocks.",
    "decoder.heads": "MAE decoder attention heads.",
    "decoder.embed_bias": "Bias of the MAE decoder's input projection (False: VideoMAE's encoder_to_decoder).",
    "mask.kind": "Masker: random, block, inverse_block, grid, tube, spatiotemporal, filtered_noise (images, "
                 "video); token, word, span (text).",
    "mask.ratio": "Share of tokens hidden (MLM: selected for prediction).",
    "mask.cell": "Grid masking (SimMIM): cell side in patches.",
    "mask.min_patches": "Block masking (BEiT): smallest block in patches.",
    "mask.min_aspect": "Block masking: smallest aspect ratio (largest is its inverse).",
    "mask.block_length": "Inverse block masking (data2vec 2.0): side of the square of visible tokens around each "
                         "centre.",
    "mask.block_adjust": "Inverse block masking: extra share of the grid drawn as centres (fairseq's "
                         "mask_prob_adjust; overlaps make up for it).",
    "mask.filter": "Filtered-noise masking (ColorMAE): white, low, high or band.",
    "mask.low": "Filtered-noise masking: lower cut-off frequency in cycles per patch (Nyquist is 0.5).",
    "mask.high": "Filtered-noise masking: upper cut-off frequency in cycles per patch (Nyquist is 0.5).",
    "mask.schedule": "MLM masking-rate schedule over training: constant, linear, cosine (to final_ratio).",
    "mask.final_ratio": "MLM masking rate at the end of a linear or cosine schedule.",
    "mask.decoder_ratio": "VideoMAE V2 dual masking: share of tokens the decoder drops (0 = off).",
    "loss.norm_pix": "MAE: standardise every target patch by its own mean and unbiased variance.",
    "loss.norm_pix_mode": "What norm_pix standardises: 'patch' (the whole patch vector, (x - mean) / sqrt(var + "
                          "1e-6); MAE, MAE-ST) or 'channel' (each channel within a patch or tubelet, (x - mean) / "
                          "(std + 1e-6); VideoMAE).",
    "loss.target": "Reconstruction target: pixels or hog (MaskFeat).",
    "loss.hog_cell": "HOG cell side in pixels.",
    "loss.hog_bins": "HOG orientation bins.",
    "optim.base_lr": "Learning rate per base_batch examples: lr = base_lr * batch_size / base_batch.",
    "optim.base_batch": "Batch size base_lr refers to (256 for MAE, 512 for SimMIM).",
    "optim.b1": "AdamW beta1.",
    "optim.b2": "AdamW beta2.",
    "optim.eps": "AdamW epsilon (BERT's optimizer uses 1e-6).",
    "optim.bias_correction": "Adam's 1 - b^t correction of the moments; BERT's AdamWeightDecayOptimizer has none.",
    "optim.weight_decay": "AdamW decoupled weight decay, on the parameters whose role is in optim.decay_roles.",
    "optim.decay_roles": "Parameter roles weight decay applies to: kernel (weight matrices), embedding (token "
                         "tables), position (learned position tables), token (cls/mask), bias, norm, temperature. "
                         "`maskjax params` lists each parameter's role and whether it decays.",
    "optim.warmup_steps": "Linear warm-up steps.",
    "optim.warmup_linspace": "Warm-up as numpy.linspace(0, peak, warmup_steps): the peak is reached at the last "
                             "warm-up step (BEiT/DINO/VideoMAE cosine_scheduler) instead of the first step after "
                             "it (MAE's lr_sched.py).",
    "optim.schedule": "Decay after warm-up: cosine, linear or constant.",
    "optim.decay_start": "Where the decay's clock starts: warmup_end (decay over the steps after warm-up; MAE), "
                         "zero (decay over all steps, warm-up replacing its start; BERT's polynomial decay) or "
                         "zero_scaled (decay over all steps times the warm-up ramp min(1, step / warmup); ELECTRA).",
    "optim.min_lr_ratio": "Final learning rate as a fraction of the peak.",
    "optim.clip_norm": "Global gradient-norm clip; 0 = off.",
    "optim.grad_accum": "Micro-batches per step (gradient accumulation inside the jitted step; micro-batch i "
                        "takes rows i, i + n, ... and draws the full batch's masks for them).",
    "mesh.data": "Data-parallel axis size; -1 = the devices left over.",
    "mesh.fsdp": "Fully-sharded (ZeRO-3) axis size: parameters and optimizer state sharded, batch too.",
    "mesh.tensor": "Tensor-parallel axis size (heads and MLP hidden units).",
    "sharding_rules": "(logical name, mesh axes) pairs replacing entries of the rules table "
                      "(maskjax/sharding.py RULES), e.g. (('embed', None),) replicates parameters over fsdp or "
                      "(('act_embed', 'tensor'),) shards activations' features; `maskjax params` shows the result.",
    "mesh_dcn.data": "Part of mesh.data that crosses slices / nodes (multi-slice TPU, multi-node GPU).",
    "mesh_dcn.fsdp": "Part of mesh.fsdp that crosses slices / nodes.",
    "mesh_dcn.tensor": "Part of mesh.tensor that crosses slices / nodes.",
    "checkpoint.every": "Steps between Orbax checkpoints (state + loader position).",
    "checkpoint.keep": "Checkpoints kept.",
    "checkpoint.async_save": "Write checkpoints in the background.",
    "checkpoint.checksum": "Record SHA-256 of every checkpoint file; verify before restoring, fall back past damage.",
    "faults.nonfinite": "A step with a non-finite loss, gradient or update: stop (save the last good state, "
                        "exit 5) or skip (leave the state unchanged, count it).",
    "faults.max_skipped_steps": "With nonfinite=skip: stop after this many skipped steps; 0 = never.",
    "faults.bad_records": "An undecodable record: stop (error naming it) or skip (count it, keep the data order).",
    "eval.probe": "Linear probe and k-NN on frozen features after training (image encoders).",
    "eval.knn_k": "Neighbours of the k-NN classifier.",
    "eval.text_probe": "Text encoders: linear probe and k-NN on frozen mean-pooled features for the downstream "
                       "task eval.text_task, next to the same encoder at random init and a bag-of-words "
                       "classifier.",
    "eval.text_classes": "Classes of the package task: the packages with the most training documents.",
    "eval.text_task": "The downstream text task: 'package' (which standard-library package a maskjax_text "
                      "docstring comes from) or the name of a prepared TFDS classification dataset in "
                      "data.data_dir (array_record), e.g. 'glue/sst2', with a ClassLabel 'label'.",
    "eval.text_fields": "Text features of a TFDS task, encoded [CLS] a [SEP] b [SEP] (two for sentence pairs, "
                        "e.g. ('premise', 'hypothesis') for glue/mnli).",
    "eval.text_splits": "Train and eval splits of the downstream text task (glue/mnli: validation_matched).",
    "eval.num_images": "Reconstructions drawn into reconstructions.png.",
    "eval.batch_size": "Evaluation batch size.",
    "eval.max_batches": "Evaluation batches per split; 0 = the whole split.",
    "eval.finetune_epochs": "End-to-end fine-tuning epochs with a linear head on mean-pooled features (MAE's "
                            "main protocol; for text encoders the GLUE role, on eval.text_task); 0 = off.",
    "eval.finetune_lr": "Fine-tuning peak learning rate (AdamW, warm-up + cosine).",
    "eval.zero_shot": "FLIP: zero-shot classification of the eval split.",
    "eval.prompts": "FLIP zero-shot prompt templates ('{}' = class name).",
    "eval.class_names": "FLIP zero-shot class names ('' = the dataset's labels).",
}

def papers() -> dict[str, dict]:
    """Every paper an objective declares (``Objective.papers``), by the key recipes name it with."""
    from maskjax import objectives

    return {key: paper for cls in objectives.REGISTRY.values() for key, paper in cls.papers.items()}


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _fmt(value) -> str:
    if isinstance(value, str):
        return f"`{value!r}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, list):
        value = tuple(value)
    return f"`{value!r}`"


def all_fields() -> dict:
    """Every config key, base and objective groups, -> its meaning."""
    from maskjax import objectives

    out = dict(FIELDS)
    for cls in objectives.REGISTRY.values():
        for group, fields in cls.config_groups.items():
            out.update({f"{group}.{k}": v[1] for k, v in fields.items()})
    return out


def config_page() -> str:
    from maskjax import objectives
    from maskjax.config import base_config

    def table(defaults: dict, meanings: dict, note: str = "") -> list[str]:
        lines, group = [], None
        for key in sorted(defaults, key=lambda k: ("." in k, k)):
            head = key.split(".")[0] if "." in key else "top level"
            if head != group:
                group = head
                lines += ["", f"## {group}{note}", "", "| field | default | meaning |", "|---|---|---|"]
            lines.append(f"| `{key}` | {_fmt(defaults[key])} | {meanings[key]} |")
        return lines

    lines = ["# Config reference", "",
             "Every field the trainer reads, with its default (`maskjax.config.base_config`). Config files start",
             "from these and change fields; `--config.KEY=VALUE` overrides any of them on the command line.",
             "Generated by `python -m maskjax.reference`; do not edit by hand.", ""]
    lines += table(flatten(base_config().to_dict()), FIELDS)
    owners: dict[str, list[str]] = {}
    for name in sorted(objectives.REGISTRY):
        for group in objectives.REGISTRY[name].config_groups:
            owners.setdefault(group, []).append(name)
    lines += ["", "# Objective groups", "",
              "Groups only some objectives read. `maskjax.objectives.base_config(NAME)` adds those of objective",
              "NAME (its `config_groups`); a run's config.json holds its objective's groups and no others.", ""]
    for group in sorted(owners):
        fields = objectives.REGISTRY[owners[group][0]].config_groups[group]
        lines += table({f"{group}.{k}": v[0] for k, v in fields.items()},
                       {f"{group}.{k}": v[1] for k, v in fields.items()}, f" (objective {', '.join(owners[group])})")
    return "\n".join(lines) + "\n"


def _module(path: str):
    spec = importlib.util.spec_from_file_location(f"maskjax_recipe_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_page(path: str) -> tuple[str, dict, int]:
    """(the page of the recipe at ``path``, the paper it follows, how many of the paper's values it changes)."""
    module = _module(path)
    name = os.path.basename(path)[:-3]
    config = flatten(module.get_config().to_dict())
    paper = papers()[module.PAPER]
    doc = (module.__doc__ or "").strip()
    lines = [f"# Recipe `configs/{name}.py`", "", f"**Follows:** {paper['title']}.  ",
             f"**Official code:** {paper['official']}.", "", "```text", doc, "```", "",
             "## Against the paper", "",
             "The paper's hyperparameters (as maskjax config keys) next to this recipe's default variant;",
             "**differs** marks each one the recipe changes.", "", "| field | paper | this recipe | |", "|---|---|---|---|"]
    differs = 0
    for key, value in paper["values"].items():
        ours = config[key]
        same = (math.isclose(ours, value, rel_tol=1e-9) if isinstance(value, float) and not isinstance(ours, str)
                else tuple(ours) == tuple(value) if isinstance(value, tuple) else ours == value)
        differs += not same
        lines.append(f"| `{key}` | {_fmt(value)} | {_fmt(ours)} | {'' if same else '**differs**'} |")
    lines += ["", f"{differs} of {len(paper['values'])} paper hyperparameters differ."]
    return "\n".join(lines) + "\n", paper, differs


def pages() -> dict[str, str]:
    """File name (under docs/reference) -> content."""
    out = {"config.md": config_page()}
    index = ["# Recipes", "", "One page per shipped config: the paper it follows and what differs from it.", "",
             "| recipe | follows | differs |", "|---|---|---|"]
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        name = os.path.basename(path)[:-3]
        out[f"recipes/{name}.md"], paper, differs = recipe_page(path)
        index.append(f"| [{name}](recipes/{name}.md) | {paper['title'].split(' (')[0]} | "
                     f"{differs} of {len(paper['values'])} |")
    out["recipes.md"] = "\n".join(index) + "\n"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maskjax.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT, help="output folder (default: docs/reference)")
    args = parser.parse_args(argv)
    for name, content in pages().items():
        path = os.path.join(args.out, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(content)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
