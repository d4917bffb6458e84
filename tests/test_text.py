"""Text: tokenizers, the embedded corpus, packing, MLM masking and corruption, MDLM's ELBO and sampler,
the text encoder, and bad-input errors."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskjax import step as step_lib
from maskjax import config as config_lib
from maskjax import masking, objectives
from maskjax.config import ConfigError
from maskjax.data import DataError, TokenizerError, sources
from maskjax.data import text as text_data
from maskjax.data import tokenizer as tokenizer_lib
from maskjax.models import layers
from maskjax.models import text as text_model
from maskjax.objectives import mdlm, mlm
from maskjax.objectives.text import predicted_positions
from tests.conftest import load_config


def mlm_config(data_dir, *overrides):
    return load_config("mlm_text.py:tiny", *overrides, data_dir=data_dir)


def vocab(data_dir):
    return sources.load_tokenizer(mlm_config(data_dir).data)


# --------------------------------------------------------------------------- tokenizers and corpus


def test_embedded_corpus_has_disjoint_splits_and_a_vocab_beside_it(data_dir):
    b = sources.builder(mlm_config(data_dir).data)
    assert b.info.splits["train"].num_examples > 2000 and b.info.splits["validation"].num_examples > 200
    assert os.path.isfile(os.path.join(b.data_dir, "vocab.txt"))
    names = {split: {r["source"] for r in b.as_data_source(split)} for split in ("train", "validation")}
    assert not names["train"] & names["validation"]
    tok = vocab(data_dir)
    assert tok.vocab_size == 4096 and tok.piece(tok.mask_id) == "[MASK]" and tok.pad_id == 0
    ids = tok.encode_batch(["Return the absolute value of the argument."])[0]
    assert tok.unk_id not in ids and tok.decode(ids) == "return the absolute value of the argument."
    continuation = [i for i, p in enumerate(tok.pieces) if p.startswith("##")]
    assert continuation and not tok.word_start[continuation].any() and tok.word_start[tok.special_ids].all()


def _train_sentencepiece(tmp_path, user_symbols):
    import sentencepiece as spm

    text = tmp_path / "corpus.txt"
    from maskjax.data.text_corpus import help_topics

    text.write_text("\n".join(doc for _, doc in help_topics()[:200]))
    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=prefix, vocab_size=300, pad_id=0, unk_id=1,
                                   bos_id=2, eos_id=3, user_defined_symbols=user_symbols, minloglevel=2)
    return prefix + ".model"


def test_sentencepiece_model_is_accepted(tmp_path):
    tok = tokenizer_lib.load(_train_sentencepiece(tmp_path, ["[MASK]"]))
    assert (tok.pad_id, tok.cls_id, tok.sep_id) == (0, 2, 3) and tok.piece(tok.mask_id) == "[MASK]"
    ids = tok.encode_batch(["the value of the object"])[0]
    assert tok.decode(ids) == "the value of the object"
    assert tok.word_start[ids[0]] and tok.word_start.sum() < tok.vocab_size


def test_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        tokenizer_lib.load(str(tmp_path / "missing.txt"))
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"\x00not a sentencepiece model")
    with pytest.raises(TokenizerError, match="broken.model.*not a readable SentencePiece"):
        tokenizer_lib.load(str(broken))
    no_mask = tmp_path / "vocab.txt"
    no_mask.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "a", "##s"]))
    with pytest.raises(TokenizerError, match="vocab.txt.* has no mask token"):
        tokenizer_lib.load(str(no_mask))
    with pytest.raises(TokenizerError, match="sp.model.* has no mask token"):
        tokenizer_lib.load(_train_sentencepiece(tmp_path, []))


# --------------------------------------------------------------------------- packing and loading


class FakeTokenizer:
    pad_id, cls_id, sep_id, mask_id, unk_id = 0, 1, 2, 3, 4
    special_ids = [0, 1, 2, 3]
    vocab_size = 100
    word_start = np.ones(100, bool)


class FakeDocs:
    """Documents of lengths 3..12 with distinct token values, wrapped like Documents does."""

    tok = FakeTokenizer()

    def __init__(self, n=50):
        rng = np.random.default_rng(0)
        self.docs = [[1] + list(rng.integers(5, 100, rng.integers(1, 11))) + [2] for _ in range(n)]
        self.src = self.docs

    def __getitem__(self, i):
        return self.docs[i]


def test_packing_fills_rows_and_restarts_positions_per_document():
    docs = FakeDocs()
    packer = text_data.Packer(docs, seq_len=16, limit=len(docs.docs))
    rows = []
    while not packer.exhausted():
        rows.append(packer.row())
    stream = np.concatenate([r[0][r[1] > 0] for r in rows])
    np.testing.assert_array_equal(stream, np.concatenate(docs.docs))  # nothing lost, nothing repeated
    for tokens, segments, positions in rows[:-1]:
        assert (segments > 0).all()  # training rows are full
    for tokens, segments, positions in rows:
        for s in np.unique(segments[segments > 0]):
            np.testing.assert_array_equal(positions[segments == s], np.arange((segments == s).sum()))
    batch = text_data.make_batch(rows, docs.tok)
    assert not batch["maskable"][np.isin(batch["tokens"], [0, 1, 2, 3]) | (batch["segment_ids"] == 0)].any()
    assert batch["word_start"][batch["positions"] == 0].all()


def test_packed_documents_never_see_each_other():
    """A document's hidden states are the same packed beside others as alone in its row."""
    model = text_model.TextEncoder(layers.Transformer(width=32, depth=2, heads=2, mlp_dim=128, pre_norm=False),
                                   text_model.TextEmbedding(vocab_size=100, max_len=16), rngs=nnx.Rngs(params=0))
    docs = FakeDocs()
    packed = text_data.Packer(docs, seq_len=16).row()
    tokens, segments, positions = (jnp.asarray(x)[None] for x in packed)
    hidden = model(tokens, segments, positions)
    for s in np.unique(packed[1]):
        where = packed[1] == s
        alone = np.where(where, packed[0], 0), where.astype(np.int32), np.where(where, packed[2], 0)
        alone_hidden = model(*(jnp.asarray(x)[None] for x in alone))
        np.testing.assert_allclose(hidden[0][where], alone_hidden[0][where], atol=1e-5)


def test_text_loader_resumes_exactly_and_splits_rows_by_process(data_dir):
    config = mlm_config(data_dir, "batch_size=8")
    loader = text_data.train_loader(config)
    [next(loader) for _ in range(3)]
    state = loader.get_state()
    expected = [next(loader) for _ in range(2)]
    loader.close()
    resumed = text_data.train_loader(config)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    resumed.close()
    halves = [text_data.train_loader(config, sources.block_rows(config.batch_size, p, 2)) for p in range(2)]
    whole = text_data.train_loader(config)
    for _ in range(2):
        parts, full = [next(h) for h in halves], next(whole)
        np.testing.assert_array_equal(np.concatenate([p["tokens"] for p in parts]), full["tokens"])
    for loader in halves + [whole]:
        loader.close()


# --------------------------------------------------------------------------- MLM masks


def _text_batch(batch=64, length=128, seed=0):
    rng = np.random.default_rng(seed)
    word_start = rng.random((batch, length)) < 0.6
    maskable = np.ones((batch, length), bool)
    maskable[:, 0] = False  # [CLS]
    maskable[:, length - 9:] = False  # padding at the end
    maskable[:, length // 3] = False  # a [SEP] inside
    return jnp.asarray(word_start), jnp.asarray(maskable)


@pytest.mark.parametrize("ratio", [0.15, 0.4])
def test_token_masking_rate_is_exact(ratio):
    word_start, maskable = _text_batch()
    budget = masking.mlm_budget(maskable, ratio, 128)
    eligible = int(maskable[0].sum())
    assert (np.asarray(budget) == round(ratio * eligible)).all()
    selected, _ = masking.select_tokens(jax.random.key(1), maskable, budget)
    np.testing.assert_array_equal(np.asarray(selected.sum(-1)), np.asarray(budget))
    assert not (selected & ~maskable).any()


@pytest.mark.parametrize("kind", ["word", "span"])
def test_word_and_span_masks_cover_whole_words_and_never_specials(kind):
    """Whole words only, except SpanBERT's last span, which the budget may cut inside a word
    (test_masks_reference.py checks both against the official algorithms)."""
    word_start, maskable = _text_batch()
    budget = masking.mlm_budget(maskable, 0.15, 128)
    selected, unit = jax.jit(lambda k: masking.select_text(kind, k, word_start, maskable, budget))(jax.random.key(2))
    selected, words = np.asarray(selected), np.asarray(masking.word_ids(word_start))
    assert not (selected & ~np.asarray(maskable)).any()
    assert (selected.sum(-1) <= np.asarray(budget)).all()
    assert selected.sum() >= 0.97 * np.asarray(budget).sum()
    for row in range(selected.shape[0]):
        cut = 0
        for w in np.unique(words[row]):
            inside = selected[row][words[row] == w]
            if np.asarray(maskable)[row][words[row] == w].all() and inside.any() and not inside.all():
                cut += 1
        assert cut <= (2 if kind == "span" else 0), (row, cut)


def test_bert_corruption_is_80_10_10_and_touches_only_selected():
    tokens = jax.random.randint(jax.random.key(0), (256, 128), 5, 1000)
    maskable = jnp.ones_like(tokens, bool).at[:, :4].set(False)
    budget = masking.mlm_budget(maskable, 0.15, 128)
    selected, unit = masking.select_tokens(jax.random.key(1), maskable, budget)
    out = mlm.bert_corrupt(jax.random.key(2), tokens, selected, unit, mask_id=3, vocab_size=1000)
    tokens, selected, out = map(np.asarray, (tokens, selected, out))
    np.testing.assert_array_equal(out[~selected], tokens[~selected])
    n = selected.sum()
    masked, same = (out[selected] == 3).sum() / n, (out[selected] == tokens[selected]).sum() / n
    random = 1 - masked - same
    assert abs(masked - 0.8) < 0.02 and abs(same - 0.1) < 0.015 and abs(random - 0.1) < 0.015
    off = mlm.bert_corrupt(jax.random.key(2), jnp.asarray(tokens), jnp.asarray(selected), jnp.asarray(unit), 3,
                           1000, replace=False)
    assert (np.asarray(off)[selected] == 3).all()


def test_masks_are_dynamic_and_the_rate_schedule_decays(data_dir):
    config = mlm_config(data_dir, "mask.ratio=0.3", "mask.schedule=linear", "mask.final_ratio=0.15",
                        "total_steps=100", "mlm.max_predictions=10")
    objective = objectives.get(config)
    word_start, maskable = _text_batch(8, 32)
    batch = {"tokens": jnp.full((8, 32), 7), "word_start": word_start, "maskable": maskable}
    _, first = objective.corrupt(batch, jax.random.key(0), 0)
    _, second = objective.corrupt(batch, jax.random.key(1), 0)
    _, late = objective.corrupt(batch, jax.random.key(0), 100)
    assert not np.array_equal(first, second)
    eligible = int(maskable[0].sum())
    assert int(first[0].sum()) == round(0.3 * eligible) and int(late[0].sum()) == round(0.15 * eligible)


def test_sparse_and_dense_prediction_give_the_same_loss(data_dir):
    loader = text_data.train_loader(mlm_config(data_dir))
    batch = {k: jnp.asarray(v) for k, v in next(loader).items()}
    loader.close()
    results = []
    for sparse in (True, False):
        objective = objectives.get(mlm_config(data_dir, f"mlm.sparse={sparse}"))
        model = objective.build(nnx.Rngs(params=0))
        loss, metrics = objective.loss(model, batch, jax.random.key(5), jnp.int32(0))
        results.append((float(loss), float(metrics["accuracy"])))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5)


def test_predicted_positions_are_the_selected_ones():
    selected = jnp.array([[False, True, False, True, True], [False, False, False, False, True]])
    idx, valid = predicted_positions(selected, 3)
    np.testing.assert_array_equal(idx[0], [1, 3, 4])
    assert valid[0].all() and np.asarray(valid[1]).tolist() == [True, False, False] and int(idx[1, 0]) == 4


# --------------------------------------------------------------------------- MDLM


def test_elbo_weight_matches_its_closed_form():
    t = jnp.linspace(0.01, 0.99, 50)
    np.testing.assert_allclose(mdlm.elbo_weight("loglinear", t, 1e-3), 1.0 / t, rtol=1e-5)
    np.testing.assert_allclose(mdlm.elbo_weight("cosine", t, 1e-3), np.pi / 2 * np.tan(np.pi / 2 * (1 - t)),
                               rtol=1e-4)
    assert float(mdlm.alpha("loglinear", 0.0, 1e-3)) == 1.0 and float(mdlm.alpha("cosine", 0.0, 1e-3)) == 1.0


def test_antithetic_times_are_evenly_spread():
    rows = jnp.arange(64)
    t = np.sort(np.asarray(mdlm.sample_times(jax.random.key(0), rows, 64, 1e-3)))
    np.testing.assert_allclose(np.diff(t), (1 - 1e-3) / 64, rtol=1e-4)
    assert t.min() >= 1e-3 and t.max() <= 1.0
    # A micro-batch of strided rows gets the times those rows have in the full batch.
    for antithetic in (True, False):
        full = np.asarray(mdlm.sample_times(jax.random.key(0), rows, 64, 1e-3, antithetic))
        part = np.asarray(mdlm.sample_times(jax.random.key(0), rows[1::4], 64, 1e-3, antithetic))
        np.testing.assert_array_equal(part, full[1::4])


def test_perfect_predictor_has_zero_loss_and_subs_never_predicts_mask():
    x0 = jax.random.randint(jax.random.key(0), (4, 16), 5, 50)
    masked = jax.random.bernoulli(jax.random.key(1), 0.5, (4, 16))
    perfect = 1e4 * jax.nn.one_hot(x0, 50)
    sums = mdlm.nelbo_sums(perfect, x0, masked, jnp.full((4,), 3.0), mask_id=3)
    assert float(sums["nelbo"]) == 0.0 and float(sums["correct"]) == float(masked.sum())
    uniform = jnp.zeros((4, 16, 50))
    sums = mdlm.nelbo_sums(uniform, x0, masked, jnp.ones((4,)), mask_id=3)
    np.testing.assert_allclose(float(sums["nelbo"]), float(masked.sum()) * np.log(49), rtol=1e-5)


def test_noise_masks_at_rate_one_minus_alpha_and_never_padding(data_dir):
    objective = objectives.get(load_config("mdlm_text.py:tiny", data_dir=data_dir))
    tokens = jnp.full((512, 32), 9)
    segments = jnp.ones((512, 32), jnp.int32).at[:, 28:].set(0)
    z, masked, weight = objective.noise({"tokens": tokens, "segment_ids": segments}, jax.random.key(0))
    assert not np.asarray(masked)[:, 28:].any()
    assert (np.asarray(z)[np.asarray(masked)] == objective.tokenizer.mask_id).all()
    rate = float(masked[:, :28].mean())
    assert abs(rate - 0.5) < 0.02  # E[1 - alpha(t)] = E[(1 - eps) t] ~ 1/2 for t ~ U(eps, 1)


def test_sampler_leaves_no_mask_tokens(data_dir):
    objective = objectives.get(load_config("mdlm_text.py:tiny", data_dir=data_dir))
    model = objective.build(nnx.Rngs(params=0))
    out = np.asarray(objective.sample(model, jax.random.key(0), num=3, steps=5))
    assert out.shape == (3, 32) and not (out == objective.tokenizer.mask_id).any()


# --------------------------------------------------------------------------- encoder and configs


@pytest.mark.parametrize("positions,pre_norm", [("learned", False), ("rotary", True)])
def test_text_encoder_shapes_names_and_tied_output(positions, pre_norm):
    model = text_model.TextEncoder(layers.Transformer(width=32, depth=2, heads=2, mlp_dim=128, pre_norm=pre_norm),
                                   text_model.TextEmbedding(vocab_size=64, max_len=16, positions=positions),
                                   rngs=nnx.Rngs(params=0))
    tokens = jnp.ones((2, 16), jnp.int32)
    hidden = model(tokens, jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(16), (2, 16)))
    assert hidden.shape == (2, 16, 32) and model.logits(hidden).shape == (2, 16, 64)
    state = nnx.state(model, nnx.Param)
    for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        assert len(leaf.get_metadata()["out_sharding"]) == leaf.get_value().ndim, path
    assert not any("kernel" in str(p) and "64" in str(np.shape(v)) for p, v in
                   jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0])  # no untied output matrix
    grads = nnx.grad(lambda m: jnp.sum(m.logits(m.token_embed[...][:4][None])))(model)
    assert float(jnp.abs(grads.token_embed[...]).sum()) > 0


def test_text_configs_validate(data_dir):
    for spec in ("mlm_text.py", "mlm_text.py:wwm", "mlm_text.py:span", "mlm_text.py:40", "mlm_text.py:decay",
                 "mdlm_text.py", "mdlm_text.py:cosine"):
        step_lib.validate(load_config(spec, data_dir=data_dir), num_devices=8)


@pytest.mark.parametrize("overrides,error,needle", [
    (["data.seq_len=64"], ConfigError, "config.data.seq_len: 64 is longer than the 32 positions"),
    (["mlm.max_predictions=2"], ConfigError, "config.mlm.max_predictions"),
    (["mask.kind=block"], ConfigError, "config.mask.kind"),
    (["data.tokenizer=/nonexistent/vocab.txt"], TokenizerError, "'/nonexistent/vocab.txt' does not exist"),
    (["model.positions=alibi"], ConfigError, "config.model.positions"),
])
def test_bad_text_configs_name_the_problem(data_dir, overrides, error, needle):
    with pytest.raises(error, match=needle):
        step_lib.validate(mlm_config(data_dir, *overrides), num_devices=8)


def test_empty_corpus_is_a_data_error(data_dir, tmp_path):
    import tensorflow_datasets as tfds

    class EmptyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield "blank", {"text": "  "}
            yield "empty", {"text": ""}

    EmptyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = load_config("mlm_text.py:tiny", "data.name=empty_text", f"data.tokenizer={vocab(data_dir).path}",
                         data_dir=str(tmp_path))
    with pytest.raises(DataError, match="has no split 'validation'"):
        list(text_data.eval_batches(config, "validation", 8))
    with pytest.raises(DataError, match="'empty_text' is empty: its first 2 documents have no text"):
        next(iter(text_data.eval_batches(config, "train", 8)))
    config = load_config("mlm_text.py:tiny", "data.name=empty_text", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="data.tokenizer is not set"):
        sources.load_tokenizer(config.data)


# --------------------------------------------------------------------------- end to end


def _losses(workdir):
    from maskjax import metrics

    return [(r["step"], r["loss"]) for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def _recomputed_masked_accuracy(config, params) -> tuple[int, int]:
    from flax import nnx

    from maskjax import evaluate, sharding, step
    from maskjax.data import text as text_data

    setup = step.build(config)
    model = nnx.merge(setup.graphdef, jax.tree.map(np.asarray, jax.device_get(params)))
    objective, base_key = setup.objective, jax.random.key(config.seed + 3)
    size = evaluate._eval_batch_size(setup)
    correct = count = 0
    with sharding.activation_mesh(None):
        for i, (local, _) in enumerate(text_data.eval_batches(config, config.data.eval_split, size, None,
                                                              config.eval.max_batches)):
            batch = {k: jnp.asarray(v) for k, v in local.items()}
            inputs, selected = objective.corrupt(batch, jax.random.fold_in(base_key, i), config.total_steps)
            predicted = np.argmax(np.asarray(model.logits(objective.encode(model, batch, inputs))), axis=-1)
            chosen = np.asarray(selected)
            correct += int((predicted == local["tokens"])[chosen].sum())
            count += int(chosen.sum())
    return correct, count


@pytest.mark.library_paths
def test_mlm_run_resumes_exactly_and_reports_eval(data_dir, tmp_path):
    import json

    from maskjax import train

    config = mlm_config(data_dir, "log_every=1", "total_steps=6", "checkpoint.every=3")
    straight = train.train(config, str(tmp_path / "straight"), quiet=True)
    part = tmp_path / "part"
    train.train(config, str(part), stop_at=3, evaluate=False, quiet=True)
    assert train.train(config, str(part), evaluate=False, quiet=True)["start_step"] == 3
    assert _losses(part) == _losses(tmp_path / "straight")
    written = json.load(open(tmp_path / "straight" / "eval.json"))
    results = written["text"]
    # The held-out accuracy recomputed outside the evaluator: the same masks (its keys), the dense
    # prediction head on every position instead of the gathered one, the argmax compared in NumPy.
    correct, count = _recomputed_masked_accuracy(config, straight["state"]["params"])
    assert results["masked_tokens"] == count > 0
    assert results["accuracy"] == pytest.approx(correct / count, abs=1e-9)
    assert results["baseline_unigram_loss"] > 0 and 0 < results["baseline_most_frequent_accuracy"] < 0.3
    # the downstream task: 8 packages, frozen features of both encoders next to bag of words
    task = written["text_probe"]
    assert len(task["classes"]) == 8 and task["num_train"] > 500 and task["num_test"] > 50
    assert task["bag_of_words"]["linear_probe"] > task["majority_class"] + 0.3  # the task is learnable
    assert {"linear_probe", "knn"} <= set(task["pretrained"]) and {"linear_probe", "knn"} <= set(task["random_init"])
    assert objectives.get(config).summary(written) == ("text_probe", task["pretrained"]["linear_probe"])


@pytest.mark.library_paths
def test_mdlm_run_eval_and_sample_command(data_dir, tmp_path, capsys):
    import json

    from maskjax import cli, train

    workdir = str(tmp_path / "mdlm")
    train.train(load_config("mdlm_text.py:tiny", data_dir=data_dir), workdir, quiet=True)
    results = json.load(open(os.path.join(workdir, "eval.json")))["text"]
    assert results["perplexity_bound"] > 1 and results["baseline_unigram_perplexity_bound"] > 1
    capsys.readouterr()
    out_file = tmp_path / "samples.txt"
    assert cli.main(["sample", "--workdir", workdir, "--num", "2", "--steps", "4", "--out", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("--- sample") == 2 and "[MASK]" not in printed
    assert out_file.read_text().strip() == printed.strip()
    assert cli.main(["sample", "--workdir", workdir, "--num", "0"]) == 2
    # conditional: the prompt starts every sample; an infill template keeps its text around the gaps
    from maskjax import objectives

    tok = objectives.get(load_config("mdlm_text.py:tiny", data_dir=data_dir)).tokenizer
    prompt = tok.decode([tok.cls_id] + tok.encode_batch(["import os"])[0])
    assert cli.main(["sample", "--workdir", workdir, "--num", "2", "--steps", "4", "--prompt", "import os",
                     "--order", "confidence", "--block", "8"]) == 0
    samples = capsys.readouterr().out.split("--- sample")[1:]
    assert len(samples) == 2 and all(s.split("\n", 1)[1].startswith(prompt) for s in samples)
    assert cli.main(["sample", "--workdir", workdir, "--num", "1", "--steps", "4", "--infill",
                     "import [MASK:2] as np"]) == 0
    text = capsys.readouterr().out
    assert "[MASK]" not in text and text.rstrip().endswith("as np [SEP]")
    assert cli.main(["sample", "--workdir", workdir, "--infill", "no gap here"]) == 2


def test_cli_missing_tokenizer_is_one_line(data_dir, tmp_path):
    from tests.test_config import _cli

    workdir = tmp_path / "run"
    out = _cli("train", "--config", "configs/mlm_text.py:tiny", "--workdir", str(workdir),
               "--config.data.tokenizer=/nope/vocab.txt")
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0] == "maskjax: error: tokenizer file '/nope/vocab.txt' does not exist"
    assert not workdir.exists()


def test_recipes_match_the_papers_and_validate_with_a_tokenizer(data_dir):
    path = f"data.tokenizer={vocab(data_dir).path}"
    for phase, length, predictions in (("128", 128, 20), ("512", 512, 80)):
        c = load_config(f"bert_base.py:{phase}", path)
        assert (c.model.width, c.model.depth, c.model.heads, c.model.max_len) == (768, 12, 12, 512)
        assert (c.data.seq_len, c.mlm.max_predictions, c.batch_size, c.total_steps) == (length, predictions, 256, 10**6)
        assert config_lib.lr(c) == 1e-4 and c.optim.warmup_steps == 10_000 and c.optim.weight_decay == 0.01
        assert c.mask.ratio == 0.15 and c.mlm.replace and not c.model.pre_norm
        step_lib.validate(c, num_devices=8)
    c = load_config("mdlm_owt.py", path)
    assert (c.model.width, c.model.depth, c.data.seq_len, c.batch_size, config_lib.lr(c)) == (768, 12, 1024, 512, 3e-4)
    assert c.diffusion.schedule == "loglinear" and c.diffusion.antithetic
    step_lib.validate(c, num_devices=8)
    with pytest.raises(DataError, match="data.tokenizer is not set"):
        step_lib.validate(load_config("bert_base.py:128"), num_devices=8)


# --------------------------------------------------------------------------- autoregressive baseline


def test_ar_sees_only_the_past_of_its_own_segment(data_dir):
    """Changing tokens at positions >= k leaves the logits before k unchanged; changing a token of
    one segment leaves the other segment's logits unchanged; the bidirectional encoder fails both."""
    objective = objectives.get(load_config("ar_text.py:tiny", data_dir=data_dir))
    model = objective.build(nnx.Rngs(0))
    tok = objective.tokenizer
    rng = np.random.default_rng(0)
    length = objective.seq_len
    tokens = rng.integers(10, tok.vocab_size, (2, length)).astype(np.int32)
    segments = np.ones((2, length), np.int32)
    segments[:, length // 2:] = 2
    positions = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)])[None].repeat(2, 0)
    batch = {"segment_ids": jnp.asarray(segments), "positions": jnp.asarray(positions.astype(np.int32))}
    hidden = lambda t, causal=True: np.asarray(model(jnp.asarray(t), batch["segment_ids"], batch["positions"], causal))
    k = length // 4
    later = tokens.copy()
    later[:, k:length // 2] = rng.integers(10, tok.vocab_size, (2, length // 2 - k))
    np.testing.assert_allclose(hidden(later)[:, :k], hidden(tokens)[:, :k], atol=1e-6)
    assert not np.allclose(hidden(later)[:, k:length // 2], hidden(tokens)[:, k:length // 2], atol=1e-4)
    np.testing.assert_allclose(hidden(later)[:, length // 2:], hidden(tokens)[:, length // 2:], atol=1e-6)
    assert not np.allclose(hidden(later, False)[:, :k], hidden(tokens, False)[:, :k], atol=1e-4)


def test_ar_loss_is_next_token_cross_entropy_within_segments(data_dir):
    """The loss against torch's cross-entropy on the model's own logits, shifted by one, over the
    pairs whose next token is in the same segment (an independent re-derivation of the targets)."""
    torch = pytest.importorskip("torch")
    objective = objectives.get(load_config("ar_text.py:tiny", data_dir=data_dir))
    model = objective.build(nnx.Rngs(1))
    rng = np.random.default_rng(1)
    b, length = 3, objective.seq_len
    tokens = rng.integers(10, objective.tokenizer.vocab_size, (b, length)).astype(np.int32)
    segments = np.ones((b, length), np.int32)
    segments[0, 20:] = 2
    segments[1, 25:] = 0  # padding
    positions = np.where(segments == 2, np.arange(length) - 20, np.arange(length)).astype(np.int32)
    batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(segments), "positions": jnp.asarray(positions),
             "word_start": jnp.ones((b, length), bool), "maskable": jnp.asarray(segments > 0)}
    loss, metrics = objective.loss(model, batch, jax.random.key(0), 0)
    logits = np.asarray(model.logits(objective.encode(model, batch, batch["tokens"])))
    reference = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:, :-1]).reshape(-1, logits.shape[-1]),
                                                  torch.from_numpy(tokens[:, 1:].astype(np.int64)).reshape(-1),
                                                  reduction="none").reshape(b, length - 1).numpy()
    keep = np.zeros((b, length - 1), bool)
    for row in range(b):
        for i in range(length - 1):
            keep[row, i] = segments[row, i + 1] == segments[row, i] and segments[row, i + 1] > 0
    assert keep.sum() == (length - 2) + 24 + (length - 1)
    assert float(loss) == pytest.approx(reference[keep].mean(), rel=1e-5)


@pytest.mark.library_paths
def test_ar_run_reports_perplexity_beside_the_unigram_baseline(data_dir, tmp_path):
    import json

    from maskjax import cli, train

    workdir = str(tmp_path / "ar")
    config = load_config("ar_text.py:tiny", "log_every=1", data_dir=data_dir)
    train.train(config, workdir, quiet=True)
    part = tmp_path / "part"  # exact resume
    train.train(config, str(part), stop_at=3, evaluate=False, quiet=True)
    assert train.train(config, str(part), evaluate=False, quiet=True)["start_step"] == 3
    assert _losses(part) == _losses(workdir) and len(_losses(part)) == 6
    text = json.load(open(os.path.join(workdir, "eval.json")))["text"]
    assert text["predicted_tokens"] < text["tokens"]  # the first token of each segment piece has no context
    assert text["perplexity"] > 1 and text["baseline_unigram_perplexity"] > 1
    assert text["perplexity"] == pytest.approx(np.exp(text["loss"]), rel=1e-6)
    assert cli.main(["sample", "--workdir", workdir, "--num", "1"]) == 2  # refused in one line: AR has no sampler


def test_downstream_task_labels_documents_by_package_and_keeps_splits_apart(data_dir):
    from maskjax.data import text as text_data

    config = mlm_config(data_dir)
    train_b, train_y, names = text_data.classification_set(config, "train", 8)
    test_b, test_y, same = text_data.classification_set(config, "validation", 8, names)
    tok = objectives.get(config).tokenizer
    assert same == names == sorted(names) and len(names) == 8
    assert set(np.unique(train_y)) == set(range(8)) and set(np.unique(test_y)) <= set(range(8))
    for batch in (train_b, test_b):
        assert (batch["tokens"][:, 0] == tok.cls_id).all()
        lengths = batch["segment_ids"].sum(1)
        assert (batch["tokens"][np.arange(len(lengths)), lengths - 1] == tok.sep_id).all()
        assert (batch["tokens"][batch["segment_ids"] == 0] == tok.pad_id).all()
    assert text_data.package_label("email.mime.text:MIMEText:0") == "email"
    assert text_data.package_label("topic:assert:0") is None


@pytest.mark.library_paths
def test_text_finetune_learns_the_task_and_leaves_the_pretrained_parameters(data_dir):
    from maskjax import evaluate

    config = mlm_config(data_dir, "eval.finetune_epochs=1.5", "eval.finetune_lr=3e-3")
    setup = step_lib.build(config)
    params = step_lib.init_params_fn(setup, jax.random.key(5))
    before = jax.tree.map(np.asarray, params)
    task = evaluate.evaluate_text_probe(setup, params)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params)))
    for encoder in ("pretrained", "random_init"):
        tuned = task[encoder]["finetune"]
        assert tuned["steps"] == int(np.ceil(1.5 * (task["num_train"] // config.batch_size)))
        assert tuned["train_loss_last"] < tuned["train_loss_first"] - 0.3  # cross-entropy starts at ln 8 = 2.08
        assert tuned["accuracy"] > task["majority_class"] + 0.1  # the fine-tuned classifier beats the prior
    assert objectives.get(config).summary({"text_probe": task}) == ("text_finetune", task["pretrained"]["finetune"]["accuracy"])


class MaskjaxTestPairs(__import__("tensorflow_datasets").core.GeneratorBasedBuilder):
    """A sentence-pair classification set in GLUE's layout (premise, hypothesis, ClassLabel label; the
    test split unlabelled, -1), built from the embedded corpus's own sentences: the downstream task by
    TFDS name without a download."""

    VERSION = __import__("tensorflow_datasets").core.Version("1.0.0")

    def _info(self):
        import tensorflow_datasets as tfds

        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "premise": tfds.features.Text(), "hypothesis": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=["same", "different"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 40, labelled=True), "validation": self._generate_examples(40, 12, labelled=True),
                "test": self._generate_examples(52, 6, labelled=False)}

    def _generate_examples(self, start, count, labelled):
        words = ["alpha", "beta", "gamma", "delta", "omega"]
        for i in range(start, start + count):
            a, b = words[i % 5], words[(i * 3) % 5]
            yield i, {"premise": f"return the {a} value", "hypothesis": f"the {b} value",
                      "label": (0 if a == b else 1) if labelled or i % 2 else -1}


def test_downstream_task_by_tfds_name_encodes_pairs_and_drops_unlabelled_rows(data_dir):
    MaskjaxTestPairs(data_dir=data_dir, file_format="array_record").download_and_prepare()
    config = mlm_config(data_dir, "eval.text_task=maskjax_test_pairs", "eval.text_fields=('premise','hypothesis')")
    tok = vocab(data_dir)
    batch, labels, names = text_data.classification_set(config, "validation", 8)
    assert names == ["same", "different"] and len(labels) == 12
    for tokens, segments, label in zip(batch["tokens"], batch["segment_ids"], labels):
        row = tokens[segments > 0]
        seps = np.nonzero(row == tok.sep_id)[0]
        assert row[0] == tok.cls_id and len(seps) == 2 and seps[1] == len(row) - 1
        premise, hypothesis = tok.decode(row[1:seps[0]].tolist()), tok.decode(row[seps[0] + 1:seps[1]].tolist())
        assert premise.startswith("return the ") and hypothesis.startswith("the ")
        assert label == int(premise.split()[2] != hypothesis.split()[1])
    _, test_labels, _ = text_data.classification_set(config, "test", 8)
    assert len(test_labels) == 3 and (test_labels >= 0).all()  # the -1 rows are gone
    wrong = mlm_config(data_dir, "eval.text_task=maskjax_test_pairs")  # default field 'sentence'
    with pytest.raises(DataError, match="'sentence'.*eval.text_fields"):
        text_data.classification_set(wrong, "train", 8)
    with pytest.raises(DataError, match="eval.text_task='no_such_task'"):
        text_data.classification_set(mlm_config(data_dir, "eval.text_task=no_such_task"), "train", 8)
