"""Bundles (ONNX ranker, catalogue, card, checksums) and local recommendation from a bundle or a received model."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from device_helpers import TINY_RUN, item_ids, make_device, message, store_context, tiny_run, user_rows, write_csv

from fedinterest.client.app import app
from fedinterest.client.ingest import ingest_file
from fedinterest.client.local_models import NoModelError, load_latest
from fedinterest.client.recommend import recommend
from fedinterest.common import wire
from fedinterest.common.bundle import BundleError, load_bundle, write_bundle
from fedinterest.common.catalogue import Catalogue
from fedinterest.common.examples import history_batch
from fedinterest.common.model import InterestModel, ModelConfig

NUM_ITEMS = 40
CARD = {"data": "test", "rounds": 2, "privacy": {"epsilon": 3.0, "delta": 1e-5}}


def _config(num_items: int = NUM_ITEMS) -> ModelConfig:
    return ModelConfig(num_items=num_items, **{k: v for k, v in TINY_RUN.items() if k != "batch_size"})


def _model(seed: int = 0, num_items: int = NUM_ITEMS) -> InterestModel:
    torch.manual_seed(seed)
    return InterestModel(_config(num_items)).eval()


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "model.bundle"
    return write_bundle(out, state_dict=_model().state_dict(), model_config=_config(), catalogue_ids=item_ids(NUM_ITEMS), model_card=CARD)


def test_round_trip_keeps_catalogue_card_and_config(bundle_path: Path) -> None:
    bundle = load_bundle(bundle_path)
    assert bundle.catalogue == Catalogue(item_ids(NUM_ITEMS)) and bundle.card == CARD and bundle.model_config == _config()
    assert bundle_path.with_name("model.bundle.sha256").read_text().split() == [bundle.sha256, "model.bundle"]
    assert zipfile.ZipFile(bundle_path).namelist()[0] == "MANIFEST.json"


@pytest.mark.parametrize("length", [0, 1, 3, 10, 25])
def test_ranker_scores_equal_the_training_code_model(bundle_path: Path, length: int) -> None:
    ranker = load_bundle(bundle_path).ranker
    model = _model()
    history = np.random.default_rng(length).integers(1, NUM_ITEMS + 1, size=length)
    with torch.no_grad():
        expected = model.score_last(history_batch([history], model.config.max_len))[0].numpy()
    scores = ranker.scores(history)
    assert scores.shape == (NUM_ITEMS + 1,) and scores[0] == -np.inf
    np.testing.assert_allclose(scores[1:], expected[1:], rtol=1e-4, atol=1e-5)


def _corrupt(source: Path, target: Path, offset_fraction: float) -> Path:
    data = bytearray(source.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("offset", [0.0, 0.01, 0.5, 0.97, 0.9999])
def test_a_corrupted_bundle_is_refused_against_its_checksum(bundle_path: Path, tmp_path: Path, offset: float) -> None:
    copy = _corrupt(bundle_path, tmp_path / "copy.bundle", offset)
    (tmp_path / "copy.bundle.sha256").write_text(bundle_path.with_name("model.bundle.sha256").read_text())
    with pytest.raises(BundleError, match="SHA-256 is .* expected"):
        load_bundle(copy)
    expected = load_bundle(bundle_path).sha256
    with pytest.raises(BundleError, match="SHA-256 is .* expected"):
        load_bundle(bundle_path, expected_sha256=expected[::-1])


@pytest.mark.parametrize("offset", [0.3, 0.5, 0.7])
def test_corrupted_content_is_refused_even_without_the_checksum_file(bundle_path: Path, tmp_path: Path, offset: float) -> None:
    """Member bytes are checked against the manifest (and the zip CRCs) whatever else is known."""
    copy = _corrupt(bundle_path, tmp_path / "copy.bundle", offset)
    with pytest.raises(BundleError, match="corrupted|not a readable|invalid"):
        load_bundle(copy)


def test_a_truncated_or_foreign_file_is_refused(bundle_path: Path, tmp_path: Path) -> None:
    (tmp_path / "cut.bundle").write_bytes(bundle_path.read_bytes()[:1000])
    with pytest.raises(BundleError, match="not a readable"):
        load_bundle(tmp_path / "cut.bundle")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("MANIFEST.json", '{"format": "something-else"}')
    with pytest.raises(BundleError, match="not a fedinterest-bundle"):
        load_bundle(tmp_path / "other.zip")


def test_write_bundle_refuses_a_catalogue_of_another_size(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="catalogue has 39 items"):
        write_bundle(tmp_path / "b", state_dict=_model().state_dict(), model_config=_config(), catalogue_ids=item_ids(39), model_card={})


# --- recommend -------------------------------------------------------------------------------


def _device_with_history(tmp_path: Path, items: list[str]):
    device = make_device(tmp_path, num_items=NUM_ITEMS)
    with device.store() as store:
        ingest_file(store, write_csv(tmp_path / "h.csv", user_rows("u1", items)))
    return device


def test_recommend_without_a_model_ranks_by_catalogue_order(tmp_path: Path) -> None:
    device = _device_with_history(tmp_path, ["m1", "m2", "m3"])
    with device.store() as store:
        with pytest.raises(NoModelError, match="no model yet"):
            load_latest(store)
        result = recommend(store, 5)  # the fallback (issue 16, item 7): the user's items excluded
    assert [item for item, _ in result.items] == ["m4", "m5", "m6", "m7", "m8"] and result.model["kind"] == "fallback"


def test_recommend_from_a_bundle_excludes_history_and_returns_k(tmp_path: Path, bundle_path: Path) -> None:
    seen = [f"m{i}" for i in range(1, 31)] + ["not-in-catalogue"]
    device = _device_with_history(tmp_path, seen)
    with device.store() as store:
        store.save_model("bundle", bundle_path.read_bytes(), {})
        result = recommend(store, 5)
        assert len(result.items) == 5 and not {item for item, _ in result.items} & set(seen)
        assert [s for _, s in result.items] == sorted((s for _, s in result.items), reverse=True)
        assert result.model["kind"] == "bundle" and result.history_used == 30 and result.history_unknown == 1
        # Only 10 items are unseen: asking for more returns those 10.
        rest = recommend(store, 25)
        assert sorted(item for item, _ in rest.items) == sorted(f"m{i}" for i in range(31, 41))
        # The top-k equals ranking the model's own scores with the history masked.
        scores = _model().score_last(history_batch([np.arange(1, 31)], 10))[0].detach().numpy()
        scores[: 31] = -np.inf
        assert [item for item, _ in result.items] == [f"m{i}" for i in np.argsort(-scores)[:5]]


def test_the_clientapp_keeps_the_received_global_model_for_offline_ranking(tmp_path: Path) -> None:
    device = _device_with_history(tmp_path, [f"m{i}" for i in (3, 9, 1, 22, 17, 5, 8, 30, 2, 11, 14, 6)])
    run = tiny_run(NUM_ITEMS, epsilon_budget=50.0)
    global_model = _model(seed=4)
    reply = app(message("train", global_model, {wire.SERVER_ROUND: 1}), store_context(device.store_path, run))
    assert not reply.has_error(), reply.error
    metrics = reply.content.metric_records[wire.METRICS]
    assert metrics[wire.REFUSED] == 0 and metrics[wire.EPSILON][0] > 0
    with device.store() as store:
        loaded = load_latest(store)
        assert loaded.description["kind"] == "global" and loaded.description["server_round"] == 1
        assert loaded.description["message_type"] == "train"
        history = store.history().indices
        # The stored model is the global one the message carried, not the locally trained one.
        with torch.no_grad():
            expected = global_model.score_last(history_batch([history], 10))[0].numpy()
        np.testing.assert_allclose(loaded.ranker.scores(history)[1:], expected[1:], rtol=1e-6)
        result = recommend(store, 10)
        seen = set(store.raw_history())
    assert len(result.items) == 10 and not {item for item, _ in result.items} & seen


def test_a_bundle_of_another_catalogue_is_refused_and_nothing_installed(tmp_path: Path) -> None:
    """Issue 16, item 1: a bundle sharing no item with the device's catalogue is refused unless asked for."""
    from typer.testing import CliRunner

    from fedinterest.client.device_cli import app as device_app

    device = make_device(tmp_path, NUM_ITEMS)
    ingest_file(device.store(), write_csv(tmp_path / "h.csv", user_rows("u", ["m1", "m2", "m3"])))
    other_ids = [f"other-{i}" for i in range(1, NUM_ITEMS + 1)]
    foreign = write_bundle(tmp_path / "foreign.bundle", state_dict=_model().state_dict(), model_config=_config(), catalogue_ids=other_ids, model_card=CARD)
    runner = CliRunner()
    refused = runner.invoke(device_app, ["install-bundle", str(foreign), "--dir", str(device.root)])
    assert refused.exit_code == 2
    assert "shares no item with this device's" in refused.output and "--allow-other-catalogue" in refused.output
    with device.store() as store:
        assert store.latest_model() is None  # nothing was installed
    forced = runner.invoke(device_app, ["install-bundle", str(foreign), "--dir", str(device.root), "--allow-other-catalogue", "--json"])
    assert forced.exit_code == 0, forced.output
    assert '"shared_items": 0' in forced.output
    # A bundle of the device's own catalogue installs as before.
    own = write_bundle(tmp_path / "own.bundle", state_dict=_model().state_dict(), model_config=_config(), catalogue_ids=item_ids(NUM_ITEMS), model_card=CARD)
    assert runner.invoke(device_app, ["install-bundle", str(own), "--dir", str(device.root)]).exit_code == 0
