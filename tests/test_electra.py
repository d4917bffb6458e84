"""ELECTRA against independent references: the joint loss and its gradients against transformers'
``ElectraForMaskedLM`` (generator) + ``ElectraForPreTraining`` (discriminator) sharing one embedding
module, on identical weights, corrupted inputs and sampled tokens; the generator's sampler against the
softmax it samples from; the official masking rule (85% [MASK], 15% kept, no random tokens).

The reference side re-derives the official ``run_pretraining.py`` step from its parts: the generator's
MLM loss is the mean cross-entropy over the masked slots, the discriminator's input is the original
sequence with the sampled tokens written at those slots, a position is 'replaced' only where the
sampled token differs from the original, and the total is MLM + 50 x the mean sigmoid cross-entropy
over every real token.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import load_config, perturbed_setup, text_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _config(data_dir, *extra):
    return load_config("electra_text.py:tiny", "model.qkv_bias=True", "model.norm_eps=1e-12", "electra.embed_dim=16",
                       *extra, data_dir=data_dir)


def _hf_pair(config, params, tmp_path):
    """(ElectraForPreTraining, ElectraForMaskedLM) loaded by transformers from maskjax's exports of
    ``params``, then given one shared embedding module (ELECTRA's tied generator embeddings) with the
    generator's output layer tied to its word table, as in the official model."""
    from maskjax import export

    disc_dir, gen_dir = tmp_path / "disc", tmp_path / "gen"
    assert export.export(config, params, "hf", str(disc_dir), "electra_discriminator")["class"] == "ElectraForPreTraining"
    assert export.export(config, params, "hf", str(gen_dir))["class"] == "ElectraForPreTraining"  # the default
    export.export(config, params, "hf", str(gen_dir), "electra_generator")
    disc = transformers.ElectraForPreTraining.from_pretrained(str(disc_dir)).eval()
    gen = transformers.ElectraForMaskedLM.from_pretrained(str(gen_dir)).eval()
    gen.electra.embeddings = disc.electra.embeddings
    gen.generator_lm_head.weight = disc.electra.embeddings.word_embeddings.weight
    return disc, gen


def test_electra_loss_and_gradients_match_transformers(data_dir, tmp_path):
    from maskjax import export

    config = _config(data_dir)
    objective, graphdef, params = perturbed_setup(config, seed=0)
    rng = np.random.default_rng(0)
    assert "token_embed" not in params["generator"], "the generator must use the discriminator's tables"
    batch = jax.tree.map(jnp.asarray, text_batch(objective))
    inputs, selected = objective.corrupt(batch, jax.random.key(3), 0)
    _, targets, weights, idx = objective.generator_logits(nnx.merge(graphdef, params), batch, inputs, selected)
    # half the slots sample the original token: those must count as original, not replaced
    sampled = np.where(rng.uniform(size=targets.shape) < 0.5, np.asarray(targets),
                       rng.integers(5, objective.tokenizer.vocab_size, targets.shape)).astype(np.int32)

    def loss_fn(p):
        model = nnx.merge(graphdef, p)
        logits, t, w, i = objective.generator_logits(model, batch, inputs, selected)
        return objective.terms(model, batch, logits, t, w, i, jnp.asarray(sampled))

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(jax.tree.map(jnp.asarray, params))

    disc, gen = _hf_pair(config, params, tmp_path)
    tokens, idx_np, w_np = (np.asarray(x) for x in (batch["tokens"], idx, weights))
    labels = np.where(np.asarray(selected), tokens, -100).astype(np.int64)
    gen_out = gen(input_ids=torch.from_numpy(np.asarray(inputs, np.int64)), labels=torch.from_numpy(labels))
    fake = tokens.copy()
    for b in range(fake.shape[0]):
        fake[b, idx_np[b][w_np[b]]] = sampled[b][w_np[b]]
    replaced = (fake != tokens).astype(np.float32)
    assert 0 < replaced.sum() < w_np.sum(), "the sample must replace some masked tokens and keep others"
    disc_out = disc(input_ids=torch.from_numpy(fake.astype(np.int64)), labels=torch.from_numpy(replaced))
    total = gen_out.loss + config.electra.disc_weight * disc_out.loss
    total.backward()

    assert float(metrics["mlm_loss"]) == pytest.approx(gen_out.loss.item(), rel=1e-5)
    assert float(metrics["disc_loss"]) == pytest.approx(disc_out.loss.item(), rel=1e-5)
    assert float(loss) == pytest.approx(total.item(), rel=1e-5)
    assert float(metrics["replaced"]) == pytest.approx(replaced.mean(), abs=1e-6)

    grads = jax.tree.map(np.asarray, grads)
    compared = 0
    for model, arch in ((disc, "electra_discriminator"), (gen, "electra_generator")):
        theirs = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
        largest = max(float(np.max(np.abs(g))) for g in theirs.values())
        ours = export.to_tensors(config, grads, arch)
        for name in ours:
            if name == "electra.embeddings.token_type_embeddings.weight":
                continue  # a constant maskjax writes (one segment type)
            # floor: the key bias's gradient is zero in exact arithmetic and float32 noise (~1e-7
            # here, the discriminator's loss being weighted 50x) in both implementations
            scale = max(float(np.max(np.abs(theirs[name]))), 1e-4 * largest)
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-4 * scale, err_msg=name)
            compared += 1
    assert compared > 40


def test_generator_samples_follow_its_softmax():
    from maskjax.objectives.electra import sample_tokens

    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0, 0.5]] * 40000)
    for temperature in (1.0, 0.5):
        draws = np.asarray(sample_tokens(jax.random.key(int(temperature * 10)), logits, temperature))
        freq = np.bincount(draws, minlength=5) / draws.size
        expected = np.asarray(jax.nn.softmax(logits[0] / temperature))
        # 40,000 draws: the standard error of each share is below 0.0025
        np.testing.assert_allclose(freq, expected, atol=0.01)
    # no gradient reaches the logits through the draw
    grad = jax.grad(lambda x: jnp.sum(sample_tokens(jax.random.key(0), x).astype(jnp.float32)))(logits[:2])
    assert not np.any(np.asarray(grad))


def test_masking_keeps_fifteen_percent_and_never_draws_random_tokens(data_dir):
    from maskjax import objectives

    objective = objectives.get(_config(data_dir, "batch_size=64"))
    batch = jax.tree.map(jnp.asarray, text_batch(objective, batch=64, seed=1))
    inputs, selected = (np.asarray(x) for x in objective.corrupt(batch, jax.random.key(0), 0))
    tokens, mask_id = np.asarray(batch["tokens"]), objective.tokenizer.mask_id
    assert np.array_equal(inputs[~selected], tokens[~selected])
    chosen = inputs[selected]
    masked, kept = chosen == mask_id, chosen == tokens[selected]
    assert np.all(masked | kept), "ELECTRA replaces a selected token by [MASK] or keeps it"
    assert masked.mean() == pytest.approx(0.85, abs=0.04)  # ~290 selected positions


def test_shared_embeddings_are_one_parameter_with_gradients_from_both_networks(data_dir):
    from maskjax import objectives
    from maskjax.models import layers

    objective = objectives.get(_config(data_dir))
    model = objective.build(nnx.Rngs(0))
    assert model.generator.token_embed is model.discriminator.token_embed
    roles = layers.param_roles(nnx.state(model))
    flat = {jax.tree_util.keystr(p): r for p, r in jax.tree_util.tree_flatten_with_path(roles)[0]}
    assert sum("token_embed" in k for k in flat) == 1 and sum("pos_embed" in k for k in flat) == 1


def test_exports_load_in_transformers_with_equal_outputs(data_dir, tmp_path):
    config = _config(data_dir)
    objective, graphdef, params = perturbed_setup(config, seed=1)
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
    batch = text_batch(objective, seed=2)
    args = [jnp.asarray(batch[k]) for k in ("tokens", "segment_ids", "positions")]
    disc_ours = np.asarray(model.disc_logits(model.discriminator(*args)))
    gen_ours = np.asarray(model.generator.logits(model.generator(*args)))
    disc, gen = _hf_pair(config, params, tmp_path)
    with torch.no_grad():
        ids = torch.from_numpy(batch["tokens"].astype(np.int64))
        np.testing.assert_allclose(disc(input_ids=ids).logits.numpy(), disc_ours, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(gen(input_ids=ids).logits.numpy(), gen_ours, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "disc" / "vocab.txt").is_file()


def test_recipe_learning_rate_is_electras_warmup_times_linear_decay():
    """model/optimization.py: polynomial_decay(lr, step, T, end 0, power 1) * min(1, step / warmup)."""
    from maskjax import step as step_lib

    config = load_config("electra_small.py", "total_steps=100", "optim.warmup_steps=10")
    schedule = step_lib.learning_rate_schedule(config)
    for step in (0, 1, 5, 9, 10, 11, 50, 99, 100):
        official = 5e-4 * (1 - step / 100) * min(1.0, step / 10)
        assert float(schedule(step)) == pytest.approx(official, rel=1e-5, abs=1e-12), step


@pytest.mark.library_paths
def test_electra_run_resumes_exactly_and_reports_both_networks(data_dir, tmp_path):
    import json

    from maskjax import metrics, train

    config = _config(data_dir, "log_every=1", "total_steps=6", "checkpoint.every=3")
    losses = lambda d: [(r["step"], r["loss"], r["disc_loss"]) for r in metrics.read_jsonl(str(d / "metrics.jsonl"))
                        if "loss" in r]
    train.train(config, str(tmp_path / "straight"), quiet=True)
    part = tmp_path / "part"
    train.train(config, str(part), stop_at=3, evaluate=False, quiet=True)
    assert train.train(config, str(part), evaluate=False, quiet=True)["start_step"] == 3
    assert losses(part) == losses(tmp_path / "straight") and len(losses(part)) == 6
    text = json.load(open(tmp_path / "straight" / "eval.json"))["text"]
    # after 6 steps: the generator is near its unigram baseline, the discriminator near 'all original'
    assert text["masked_tokens"] > 0 and text["loss"] > 0.5 * text["baseline_unigram_loss"]
    assert text["replaced_share"] > 0.05 and text["baseline_disc_accuracy"] == max(text["replaced_share"],
                                                                                   1 - text["replaced_share"])
    # eval/export/sample read the parameters alone (no Adam moments), and get the same values
    from maskjax import checkpoint, step as step_lib

    setup = step_lib.build(config)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "straight"), read_only=True)
    full = ckpt.restore_state(6, setup.abstract_state)["params"]
    alone = ckpt.restore_params(6, setup.abstract_state)
    ckpt.close()
    assert jax.tree.structure(alone) == jax.tree.structure(full)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(full)))
