"""Models, tokenizer, tasks and checkpoints (issue 2)."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

from analysis.models.native import CheckpointError, load_checkpoint, save_checkpoint
from analysis.models.transformer import LoopConfig, LoopedTransformer
from analysis.tasks import N_STATEMENTS, CHAIN_CHARS, make_chain, shortcut_accuracy, solve_chain, text_chars, text_corpus
from analysis.models.tokenizers import CharTokenizer, TokenizerError

V = len(CHAIN_CHARS)


def small(**kw):
    base = dict(vocab_size=V, context_length=32, d_model=32, n_heads=2, d_mlp=64)
    base.update(kw)
    return base


def ids(text="a=7;b=a;c=b;?c="):
    return torch.tensor([CharTokenizer(CHAIN_CHARS).encode(text)])


@pytest.mark.parametrize("layout", ["pre", "huginn", "ouro"])
@pytest.mark.parametrize("injection", ["none", "adapter", "add"])
def test_shapes_for_every_layout_and_injection(layout, injection):
    torch.manual_seed(0)
    m = LoopedTransformer(LoopConfig(**small(norm_layout=layout, injection=injection, initial_state="random")))
    x = torch.randint(0, V, (3, 11))
    for r in (1, 4):
        out = m(x, iterations=r)
        assert out.shape == (3, 11, V)
        assert torch.isfinite(out).all()


def manual_stack(model, layers, x):
    """Independent reference: embeddings, the given layers in order, final norm, unembedding."""
    h = model.embed.tok(x) + model.embed.pos(torch.arange(x.shape[1]))
    for layer in layers:
        h = layer(h)
    return model.unembed(model.final_norm(h))


def test_deep_model_is_a_plain_stack_of_its_layers():
    torch.manual_seed(1)
    deep = LoopedTransformer(LoopConfig.deep(5, **small()))
    assert deep.cfg.is_deep and deep.cfg.describe() == "(5, -, -)"
    x = ids()
    with torch.no_grad():
        assert torch.allclose(deep(x), manual_stack(deep, deep.block, x), atol=1e-6)
    with pytest.raises(ValueError, match="iterations must be 1"):
        deep(x, iterations=2)


def test_looped_run_equals_its_unrolled_weight_tied_stack():
    """(p, k⊗r, c) with r iterations = a deep stack of p + k·r + c layers sharing the block's weights."""
    torch.manual_seed(2)
    cfg = LoopConfig(**small(n_prelude=1, n_block=2, n_coda=1, injection="none", initial_state="embed"))
    m = LoopedTransformer(cfg)
    x = ids()
    r = 5
    unrolled = list(m.prelude) + list(m.block) * r + list(m.coda)
    with torch.no_grad():
        assert torch.allclose(m(x, iterations=r), manual_stack(m, unrolled, x), atol=1e-5)


def test_adapter_injection_matches_a_hand_written_loop():
    torch.manual_seed(3)
    m = LoopedTransformer(LoopConfig(**small(injection="adapter", initial_state="zeros")))
    x = ids()
    with torch.no_grad():
        h = m.embed(x)
        for layer in m.prelude:
            h = layer(h)
        e = m.input_norm(h)
        s = torch.zeros_like(e)
        for _ in range(3):
            s = m.adapter(torch.cat([s, e], -1))
            for layer in m.block:
                s = layer(s)
        for layer in m.coda:
            s = layer(s)
        ref = m.unembed(m.final_norm(s))
        assert torch.allclose(m(x, iterations=3), ref, atol=1e-6)


def test_iterations_far_beyond_training_run_and_absurd_counts_are_refused():
    torch.manual_seed(4)
    m = LoopedTransformer(LoopConfig(**small(iterations=4)))
    with torch.no_grad():
        assert torch.isfinite(m(ids(), iterations=64)).all()
    for bad in (0, -1, 10_000, 2.5, True):
        with pytest.raises(ValueError, match="iterations"):
            m(ids(), iterations=bad)


def test_random_initial_state_is_seeded():
    torch.manual_seed(5)
    m = LoopedTransformer(LoopConfig(**small(initial_state="random", initial_std=0.5)))
    with torch.no_grad():
        a, b, c = m(ids(), seed=1), m(ids(), seed=1), m(ids(), seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_shift_offsets_embed_earlier_tokens():
    torch.manual_seed(6)
    m = LoopedTransformer(LoopConfig(**small(shift_offsets=[2])))
    x = ids("a=7;")
    e = m.embed(x)[0]
    pad = m.embed.pad_id
    expect_pos2 = m.embed.tok(x[0, 2]) + m.embed.pos.weight[2] + m.embed.shift[0](x[0, 0])
    expect_pos0 = m.embed.tok(x[0, 0]) + m.embed.pos.weight[0] + m.embed.shift[0].weight[pad]
    assert torch.allclose(e[2], expect_pos2) and torch.allclose(e[0], expect_pos0)


def test_tied_shift_offset_reuses_the_token_table():
    torch.manual_seed(7)
    m = LoopedTransformer(LoopConfig(**small(shift_offsets=[1, 2], tied_shift_offsets=[1])))
    assert len(m.embed.shift) == 1  # only offset 2 has a table of its own
    x = ids("a=7;")
    e = m.embed(x)[0]
    tok, pos, two = m.embed.tok.weight, m.embed.pos.weight, m.embed.shift[0].weight
    pad = m.embed.pad_id
    # position 3 (';'): its token, the token one back ('7') through the token table, 'a' two back
    assert torch.allclose(e[3], tok[x[0, 3]] + pos[3] + tok[x[0, 2]] + two[x[0, 1]])
    # position 0: nothing one back (zero), the pad row two back
    assert torch.allclose(e[0], tok[x[0, 0]] + pos[0] + two[pad])
    with pytest.raises(ValueError, match="tied_shift_offsets"):
        LoopConfig(**small(shift_offsets=[2], tied_shift_offsets=[1]))


def test_context_length_is_enforced():
    m = LoopedTransformer(LoopConfig(**small(context_length=8)))
    with pytest.raises(ValueError, match="context"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="norm_layout"):
        LoopConfig(**small(norm_layout="post"))
    with pytest.raises(ValueError, match="injection"):
        LoopConfig(**small(injection="concat"))
    with pytest.raises(ValueError, match="unknown model config keys"):
        LoopConfig.from_dict(dict(small(), dropout=0.1))


# tokenizer ---------------------------------------------------------------

def test_tokenizer_round_trip_and_error_names_character_and_position():
    tok = CharTokenizer(text_chars())
    text = "def f(x):\n    return x ** 2  # squares"
    assert tok.decode(tok.encode(text)) == text
    chain = CharTokenizer(CHAIN_CHARS)
    with pytest.raises(TokenizerError) as err:
        chain.encode("a=7;B=a;?B=")
    assert "'B'" in str(err.value) and "position 4" in str(err.value)
    with pytest.raises(TokenizerError, match="position 1"):
        tok.encode("hé")  # é is not in the ASCII text vocabulary


# tasks ---------------------------------------------------------------------

def test_chain_generator_is_seeded_and_answers_are_right():
    a = [make_chain(random.Random(7), h) for h in range(1, 7)]
    b = [make_chain(random.Random(7), h) for h in range(1, 7)]
    assert a == b
    rng = random.Random(0)
    for _ in range(300):
        hops = rng.randint(1, 6)
        ex = make_chain(rng, hops)
        assert len(ex.prompt) == N_STATEMENTS * 4 + 3
        assert solve_chain(ex.prompt) == (ex.answer, hops)  # independent solver agrees
        digits = [c for c in ex.prompt if c.isdigit()]
        assert len(digits) == ex.n_chains == len(set(digits))


def test_solve_chain_on_the_issue_example_and_on_free_text():
    assert solve_chain("a=7;b=a;c=b;d=c;?d=") == ("7", 4)
    assert solve_chain("hello world") is None
    assert solve_chain("a=b;b=a;?a=") is None  # a cycle has no answer


def test_shortcut_accuracy_is_one_over_chains_on_average():
    rng = random.Random(1)
    exs = [make_chain(rng, 3) for _ in range(2000)]
    sc = shortcut_accuracy(exs)
    expected = sum(1 / ex.n_chains for ex in exs) / len(exs)
    assert sc["random_prompt_digit"] == pytest.approx(expected)
    assert 0 < sc["first_digit"] < 0.7


def test_text_corpus_ships_with_python():
    text = text_corpus()
    assert len(text) > 300_000 and "lambda" in text
    assert set(text) <= set(text_chars())


# checkpoints -----------------------------------------------------------------

def _save_tiny(folder):
    torch.manual_seed(0)
    m = LoopedTransformer(LoopConfig(**small())).eval()
    save_checkpoint(folder, m, CharTokenizer(CHAIN_CHARS), {"name": "chain"}, {"parameters": m.num_parameters()})
    return m


def test_checkpoint_round_trip(tmp_path):
    m = _save_tiny(tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded.model(ids()), m(ids()))
    assert loaded.name == "ck" and len(loaded.sha256) == 16 and loaded.card["parameters"] == m.num_parameters()


def test_corrupt_and_foreign_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="missing config.json, model.safetensors"):
        load_checkpoint(empty)

    ck = tmp_path / "ck"
    _save_tiny(ck)
    (ck / "model.safetensors").write_bytes(b"\x80\x04garbage that is not safetensors")
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        load_checkpoint(ck)

    foreign = tmp_path / "hf"
    _save_tiny(foreign)
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    with pytest.raises(CheckpointError, match="not a loopscope config"):
        load_checkpoint(foreign)

    mismatch = tmp_path / "mismatch"
    _save_tiny(mismatch)
    cfg = json.loads((mismatch / "config.json").read_text())
    cfg["model"]["d_model"] = 64
    (mismatch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_checkpoint(mismatch)

    (mismatch / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(mismatch)


def test_nan_weights_are_refused(tmp_path):
    ck = tmp_path / "nan"
    m = _save_tiny(ck)
    with torch.no_grad():
        m.unembed.weight[0, 0] = float("nan")
    save_checkpoint(ck, m, CharTokenizer(CHAIN_CHARS), {"name": "chain"}, {})
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(ck)


def test_training_is_seeded_and_reproducible(tmp_path):
    from analysis.training import train

    outs = []
    for name in ("a", "b"):
        train.main(["--preset", "chain-looped", "--out", str(tmp_path / name), "--steps", "3", "--batch", "8",
                    "--eval-every", "1000", "--threads", "1", "--seed", "3", "--statements", "4", "--max-hops", "2", "--heldout-per-hops", "8"])
        outs.append(load_checkpoint(tmp_path / name))
    assert outs[0].sha256 == outs[1].sha256
    card = outs[0].card
    assert set(card["accuracy_by_iterations"]) == {str(r) for r in train.ITERATION_SWEEP}
    assert card["training_steps"] == 3 and card["trained_iterations"]["mean"] == 6


def test_iteration_sampler_stays_in_range():
    from analysis.training.train import sample_iterations

    rng = random.Random(0)
    rs = [sample_iterations(rng, 6) for _ in range(2000)]
    assert min(rs) >= 2 and max(rs) <= 18
    assert 5 <= sum(rs) / len(rs) <= 7.5
