"""Conditional generation from a masked diffusion model: prompts and infill templates keep every given
token, no [MASK] is left, every order and block mode finishes, and a sampled [SEP] ends the document.

These are properties of the sampler, not of a trained model: a randomly initialised network samples
as validly as a trained one, which keeps the tests fast.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import load_config


@pytest.fixture(scope="module")
def mdlm(data_dir):
    from maskjax import objectives

    objective = objectives.get(load_config("mdlm_text.py:tiny", data_dir=data_dir))
    return objective, objective.build(nnx.Rngs(0))


@pytest.mark.parametrize("order,block", [("ancestral", 0), ("confidence", 0), ("ancestral", 8), ("confidence", 8)])
def test_given_tokens_never_change_and_no_mask_is_left(mdlm, order, block):
    objective, model = mdlm
    tok = objective.tokenizer
    templates = {"prompt": objective.template(prompt="def read(path): return"),
                 "infill": objective.template(infill="for [MASK:3] in range ( [MASK] ) : [MASK:4]"),
                 "free": objective.template()}
    for name, template in templates.items():
        out = np.asarray(jax.jit(lambda m, k, t: objective.sample(m, k, 6, 4, t, order, block))(
            model, jax.random.key(1), template))
        given = np.asarray(template) != tok.mask_id
        assert (out[:, given] == np.asarray(template)[given]).all(), (name, "a given token changed")
        assert not (out == tok.mask_id).any(), (name, "a [MASK] is left")
        # behind the first [SEP] there is only padding
        for row in out:
            seps = np.flatnonzero(row == tok.sep_id)
            if len(seps):
                assert (row[seps[0] + 1:] == tok.pad_id).all(), name
    infill = np.asarray(templates["infill"])
    assert (infill == tok.mask_id).sum() == 8 and infill[0] == tok.cls_id


def test_prompt_too_long_and_bad_templates_are_one_line_errors(mdlm):
    from maskjax.errors import ConfigError, UsageError

    objective, _ = mdlm
    with pytest.raises(ConfigError, match="data.seq_len"):
        objective.template(prompt="word " * 200)
    with pytest.raises(UsageError, match="no \\[MASK\\]"):
        objective.template(infill="nothing to fill")
    with pytest.raises(UsageError, match="not both"):
        objective.template(prompt="a", infill="b [MASK]")


def test_a_sampled_sep_ends_the_document(mdlm):
    objective, _ = mdlm
    tok = objective.tokenizer
    z = jnp.asarray([[tok.cls_id, 50, tok.sep_id, 60, tok.mask_id, tok.sep_id],
                     [tok.cls_id, 50, 51, 52, 53, 54]], jnp.int32)
    out, segments = (np.asarray(x) for x in objective.end_documents(z))
    assert out[0].tolist() == [tok.cls_id, 50, tok.sep_id] + [tok.pad_id] * 3
    assert segments[0].tolist() == [1, 1, 1, 0, 0, 0] and segments[1].tolist() == [1] * 6
    assert out[1].tolist() == np.asarray(z[1]).tolist()
